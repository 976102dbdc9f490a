//! Size and encoder speed of the sub-1-bit format on i.i.d. ternary 2080 x 6144 matrices (the Mixtral
//! expert shape QMoE-style formats are judged on), for P(0) in {0.80, 0.885, 0.95}, beside the Shannon
//! limit, plus the quantizer's speed on Gaussian weights. CPU only.
//!
//!     cargo run --release --example ternary_size

use moe_kernels::subbit::{encode, entropy, quantize, random_iid, Compressed};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (rows, cols) = (2080usize, 6144usize);
    let params = (rows * cols) as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    println!("{rows} x {cols} i.i.d. ternary matrix, {cores} cores");
    println!("| P(0) | bit/parameter (all included) | Shannon limit | over the limit | encode Mparam/s/core | decode check |");
    println!("|---|---|---|---|---|---|");
    for p0 in [0.80, 0.885, 0.95] {
        let m = random_iid(&mut rng, rows, cols, p0);
        let start = Instant::now();
        let bytes = encode(std::slice::from_ref(&m), 2048)?;
        let seconds = start.elapsed().as_secs_f64();
        let view = Compressed::parse(&bytes)?;
        let ok = view.decode(0).symbols == m.symbols;
        let bits = view.bits_per_parameter();
        let limit = entropy([p0, (1.0 - p0) / 2.0, (1.0 - p0) / 2.0]);
        println!(
            "| {p0} | {bits:.4} | {limit:.4} | {:.1}% | {:.1} | {} |",
            100.0 * (bits / limit - 1.0),
            params / seconds / 1e6 / cores as f64,
            if ok { "lossless" } else { "MISMATCH" }
        );
    }
    let weights: Vec<f32> =
        (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0) * rng.random_range(0.0f32..1.0)).collect();
    let start = Instant::now();
    let q = quantize(&weights, rows, cols);
    let seconds = start.elapsed().as_secs_f64();
    let zeros = q.symbols.iter().filter(|&&s| s == 0).count() as f64 / params;
    println!("quantize (one thread): {:.1} Mparam/s, P(0) = {zeros:.3} on these weights", params / seconds / 1e6);
    Ok(())
}
