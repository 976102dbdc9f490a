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
