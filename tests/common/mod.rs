//! Helpers shared by the GPU tests.
#![allow(dead_code)]

use cudarc::driver::{CudaContext, CudaStream};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;

/// The first GPU and a fresh stream, or None (with a printed notice) when there is none or the crate
/// was built without kernels. `MOEK_REQUIRE_GPU=1` turns the skip into a failure.
pub fn gpu() -> Option<(Arc<CudaContext>, Arc<CudaStream>)> {
    let require = std::env::var("MOEK_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let why = match moe_kernels::device::first_gpu() {
        Ok(ctx) => {
            let stream = ctx.new_stream().expect("creating a stream");
            return Some((ctx, stream));
        }
        Err(why) => why,
    };
    assert!(!require, "MOEK_REQUIRE_GPU=1 but {why}");
    // Written to the process's stderr directly, so the notice shows even though libtest captures
    // test output.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED (GPU test): {why}");
    None
}

/// A fresh generator, its seed printed so a failure can be replayed with MOEK_SEED.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("MOEK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: seed {seed} (rerun with MOEK_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// Holds a process-wide lock for a test's duration: tests of one binary that capture CUDA graphs take
/// it so that no other test thread creates streams or loads kernels while a capture is open (the
/// H200 run of route_gpu with 4 test threads saw a stream creation refused and a capture invalidated).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
