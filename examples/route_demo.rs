//! Routing demo: the model presets on random logits, run on the GPU, checked against the CPU reference,
//! with a time table. Without a GPU it runs the CPU reference at a small size and says so.
//!
//!     cargo run --release --example route_demo

use cudarc::driver::CudaSlice;
use moe_kernels::reference::route as reference;
use moe_kernels::route::{route, RouteOutput, RoutingConfig};
use rand::{Rng, SeedableRng};

const COPY_GBPS: f64 = 4282.0; // H200 device copy, shared/GPU.md

fn presets() -> Vec<(&'static str, RoutingConfig, bool)> {
    vec![
        ("Mixtral-8x7B (softmax top-2 of 8)", RoutingConfig::mixtral(), false),
        ("Qwen3-30B-A3B (softmax top-8 of 128)", RoutingConfig::qwen3_moe(), false),
        ("DeepSeek-V3 (sigmoid+bias, 4 of 8 groups, top-8 of 256)", RoutingConfig::deepseek_v3(), true),
        ("MoGE (top-1 in each of 8 groups of 8)", RoutingConfig::moge(64, 8, 8), false),
        ("Switch (top-1 of 128, capacity 1.25 T/E)", RoutingConfig::switch(128, 160), false),
    ]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let gpu = moe_kernels::device::first_gpu();
    let ctx = match gpu {
        Ok(ctx) => ctx,
        Err(why) => {
            println!("No GPU found ({why}): running the CPU reference only, at T = 256.");
            for (name, cfg, with_bias) in presets() {
                let e = cfg.num_experts as usize;
                let logits: Vec<f32> = (0..256 * e).map(|_| rng.random_range(-4.0f32..4.0)).collect();
                let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.1f32..0.1)).collect();
                let r = reference::route(&cfg, 256, &logits, with_bias.then_some(&bias[..]));
                let k = cfg.k as usize;
                println!("{name}: token 0 -> ids {:?}, weights {:?}", &r.ids[..k], &r.weights[..k]);
            }
            return Ok(());
        }
    };
    let stream = ctx.new_stream()?;
    const T: usize = 16384;
    println!("Routing T = {T} tokens on the GPU, checked against the CPU reference");
    println!("| preset | ids equal to reference | time us | logits GB/s | fraction of copy bw |");
    println!("|---|---|---|---|---|");
    for (name, cfg, with_bias) in presets() {
        let (e, k) = (cfg.num_experts as usize, cfg.k as usize);
        let logits: Vec<f32> = (0..T * e).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let d_logits = stream.clone_htod(&logits)?;
        let d_bias = stream.clone_htod(&bias)?;
        let mut ids: CudaSlice<i32> = stream.alloc_zeros(T * k)?;
        let mut weights: CudaSlice<f32> = stream.alloc_zeros(T * k)?;
        let mut dropped: CudaSlice<i32> = stream.alloc_zeros(1)?;
        let mut workspace: CudaSlice<u8> = stream.alloc_zeros(cfg.workspace_bytes(T)?.max(1))?;
        let bias_view = d_bias.slice(..);
        let mut run = || {
            let mut out = RouteOutput {
                topk_ids: ids.slice_mut(..),
                topk_weights: weights.slice_mut(..),
                dropped_count: Some(dropped.slice_mut(..)),
                workspace: Some(workspace.slice_mut(..)),
            };
            route(&stream, &cfg, T, &d_logits.slice(..), with_bias.then_some(&bias_view), &mut out)
        };
        let us = moe_kernels::timing::median_us(&stream, 11, 20, &mut run)?;
        let got = stream.clone_dtoh(&ids)?;
        let expected = reference::route(&cfg, T, &logits, with_bias.then_some(&bias[..]));
        let same = got.chunks(k).zip(expected.ids.chunks(k)).filter(|(a, b)| a == b).count();
        let gbps = (T * e * 4) as f64 / (us * 1e-6) / 1e9;
        println!("| {name} | {same} / {T} | {us:.1} | {gbps:.0} | {:.0}% |", 100.0 * gbps / COPY_GBPS);
    }
    println!("(a token whose ids differ sits at a near-tie of two scores; tests/route_gpu.rs checks each one)");
    Ok(())
}
