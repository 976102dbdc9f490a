//! Helpers shared by the benchmarks.
#![allow(dead_code)]

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use rand::Rng;
use std::sync::Arc;

/// A device buffer of `len` random values (a random block repeated: the values do not matter for the
/// time, and generating gigabytes on the host would).
pub fn random_buffer(stream: &Arc<CudaStream>, rng: &mut impl Rng, len: usize) -> CudaSlice<bf16> {
    let block: Vec<bf16> = (0..len.min(1 << 22)).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
    let mut buf = stream.alloc_zeros::<bf16>(len.max(1)).unwrap();
    let mut start = 0;
    while start < len {
        let end = (start + block.len()).min(len);
        stream.memcpy_htod(&block[..end - start], &mut buf.slice_mut(start..end)).unwrap();
        start = end;
    }
    buf
}

/// Whether a case runs: MOEK_BENCH_ONLY (if set) must occur in its name. Unlike criterion's own filter
/// it also skips the stream and graph medians, so a sweep over one size costs seconds, not a full run.
pub fn wanted(case: &str) -> bool {
    std::env::var("MOEK_BENCH_ONLY").map_or(true, |only| case.contains(&only))
}

/// Criterion's measurement of `op`, then its stream median and its median share of a CUDA graph of
/// `graph_calls` calls, both in microseconds (the JSON's `stream_us` and `graph_us`).
pub fn measure(
    crit: &mut criterion::Criterion,
    stream: &Arc<CudaStream>,
    name: &str,
    graph_calls: usize,
    mut op: impl FnMut() -> moe_kernels::Result<()>,
) -> (f64, f64) {
    crit.bench_function(name, |b| {
        b.iter_custom(|n| {
            let us = moe_kernels::timing::mean_us(stream, 0, n as usize, &mut op).unwrap();
            std::time::Duration::from_secs_f64(us * 1e-6 * n as f64)
        })
    });
    let stream_us = moe_kernels::timing::median_us(stream, 11, 10, &mut op).unwrap();
    let graph_us = moe_kernels::timing::graph_median_us(stream, graph_calls, 7, 3, op).unwrap();
    (stream_us, graph_us)
}

/// Writes a bench's JSON rows to MOEK_BENCH_JSON, else to `default_path`.
pub fn write_json(default_path: &str, rows: &[String]) {
    let path = std::env::var("MOEK_BENCH_JSON").unwrap_or_else(|_| default_path.into());
    std::fs::write(&path, format!("[\n{}\n]\n", rows.join(",\n"))).unwrap();
    eprintln!("wrote {path}");
}
