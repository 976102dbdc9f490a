//! GPU timing with CUDA events, shared by the examples and benchmarks.

use crate::error::Result;
use cudarc::driver::{sys::CUevent_flags, CudaStream};
use std::sync::Arc;

/// Runs `op` `warmup` times, then `reps` times between two timing events, and returns the mean time
/// of one run in microseconds (device time, back-to-back launches on `stream`).
pub fn mean_us(
    stream: &Arc<CudaStream>,
    warmup: usize,
    reps: usize,
    mut op: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        op()?;
    }
    let ctx = stream.context();
    // Events must be created with timing enabled (cudarc's default disables it).
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(stream)?;
    for _ in 0..reps {
        op()?;
    }
    end.record(stream)?;
    let ms = start.elapsed_ms(&end)?;
    Ok(f64::from(ms) * 1e3 / reps.max(1) as f64)
}

/// The median of `samples` repetitions of [`mean_us`] over `reps` runs each.
pub fn median_us(
    stream: &Arc<CudaStream>,
    samples: usize,
    reps: usize,
    mut op: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut times = Vec::with_capacity(samples);
    op()?;
    for _ in 0..samples.max(1) {
        times.push(mean_us(stream, 1, reps, &mut op)?);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Captures `calls` runs of `op` into a CUDA graph on `stream` and returns one call's share of the
/// graph's median replay time (median of `samples` means over `reps` replays): device time without
/// launch gaps, the way a graph-captured engine runs it. `op` must be capturable (no host sync, no
/// allocation) and the context's event tracking off, since nothing may record events inside a capture.
pub fn graph_median_us(
    stream: &Arc<CudaStream>,
    calls: usize,
    samples: usize,
    reps: usize,
    mut op: impl FnMut() -> Result<()>,
) -> Result<f64> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    stream.synchronize()?;
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    for _ in 0..calls {
        op()?;
    }
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))?
        .ok_or_else(|| crate::Error::new(crate::Status::Cuda, "the stream capture produced no graph"))?;
    Ok(median_us(stream, samples, reps, || Ok(graph.launch()?))? / calls.max(1) as f64)
}
