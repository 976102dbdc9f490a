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
