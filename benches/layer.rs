//! The whole MoE layer (moe_kernels::layer: route, plan, permute, gate|up with SwiGLU, down, combine) on
//! the GPU for the model presets at decode and prefill sizes, random router logits (about balanced),
//! bf16. Timed with CUDA events (criterion's `iter_custom`) and as a CUDA graph of one layer call, plus
//! a JSON of medians (MOEK_BENCH_JSON, default target/bench-layer.json) with the bytes of the weights
//! the tokens touch and the FLOP, for `compare_torch.py --suite layer` (same case names).
//!
//! Both implementations run: `layer_{preset}_T{t}` is the composed one, `..._fused` the fused kernel
//! (`..._auto` the automatic choice). `MOEK_BENCH_LAYER_IMPLS=composed,fused,auto` picks which (default
//! composed,fused), `MOEK_BENCH_TOKENS=1,16,64` the token counts (default 1, 16, 64, 256, 4096, 16384);
//! `MOEK_BENCH_ONLY` (as in every bench) keeps the cases whose name contains it.

use criterion::{criterion_group, criterion_main, Criterion};
use moe_kernels::layer::{moe_layer, LayerBuffers, LayerConfig, LayerImpl, LayerInputs, Routing};
use moe_kernels::reference::route::route as reference_route;
use moe_kernels::timing;
use rand::{Rng, SeedableRng};
use std::time::Duration;

mod common;
use common::{random_buffer, wanted, write_json};

const TOKENS: [usize; 6] = [1, 16, 64, 256, 4096, 16384];

/// A comma-separated environment list, each entry parsed by `parse` (unset: `default`).
fn env_list<T>(name: &str, default: Vec<T>, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    match std::env::var(name) {
        Ok(v) => v.split(',').map(|s| parse(s).unwrap_or_else(|| panic!("{name}: cannot parse {s:?}"))).collect(),
        Err(_) => default,
    }
}

/// A case name's suffix per implementation (the composed one keeps the names of earlier results).
fn suffix(implementation: LayerImpl) -> &'static str {
    match implementation {
        LayerImpl::Composed => "",
        LayerImpl::Fused => "_fused",
        LayerImpl::Auto => "_auto",
    }
}

/// The presets of examples/moe_layer.rs that compare_torch.py also builds (SwiGLU experts).
fn presets() -> Vec<(&'static str, LayerConfig, bool)> {
    vec![
        ("mixtral", LayerConfig::mixtral_8x7b(), false),
        ("qwen3_30b_a3b", LayerConfig::qwen3_30b_a3b(), false),
        ("deepseek_v3_slice32", LayerConfig::deepseek_v3_slice(), true),
    ]
}

fn benches(crit: &mut Criterion) {
    let ctx = match moe_kernels::device::first_gpu() {
        Ok(ctx) => ctx,
        Err(why) => {
            eprintln!("SKIPPED: layer benchmarks need a GPU ({why})");
            return;
        }
    };
    // SAFETY: every buffer here is used on this one stream; graph capture must not record events.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut rows = Vec::new();
    let tokens = env_list("MOEK_BENCH_TOKENS", TOKENS.to_vec(), |s| s.trim().parse().ok());
    let impls = env_list("MOEK_BENCH_LAYER_IMPLS", vec![LayerImpl::Composed, LayerImpl::Fused], LayerImpl::from_name);
    for (name, cfg, with_bias) in presets() {
        let (e, h, i) = (cfg.routing.num_experts as usize, cfg.hidden, cfg.intermediate);
        let max_t = tokens.iter().copied().max().unwrap_or(1);
        let w_gate_up = random_buffer(&stream, &mut rng, e * cfg.gate_up_rows() * h);
        let w_down = random_buffer(&stream, &mut rng, e * h * i);
        let x = random_buffer(&stream, &mut rng, max_t * h);
        let logits_host: Vec<f32> = (0..max_t * e).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let bias_host: Vec<f32> = (0..e).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let logits = stream.clone_htod(&logits_host).unwrap();
        let bias = stream.clone_htod(&bias_host).unwrap();
        let mut out = stream.alloc_zeros(max_t * h).unwrap();
        let mut buffers = LayerBuffers::new(&stream, &cfg, max_t).unwrap();
        for (t, implementation) in tokens.iter().flat_map(|&t| impls.iter().map(move |&i| (t, i))) {
            let case = format!("layer_{name}_T{t}{}", suffix(implementation));
            if !wanted(&case) {
                continue;
            }
            let cfg = LayerConfig { implementation, ..cfg };
            let inputs = LayerInputs {
                x: x.slice(..t * h),
                routing: Routing::Logits { logits: logits.slice(..t * e), bias: with_bias.then(|| bias.slice(..)) },
                w_gate_up: w_gate_up.slice(..),
                w_down: w_down.slice(..),
                shared: None,
            };
            let mut call = || moe_layer(&stream, &cfg, t, &inputs, &mut buffers, &mut out.slice_mut(..t * h));
            crit.bench_function(&case, |b| {
                b.iter_custom(|n| {
                    Duration::from_secs_f64(
                        timing::mean_us(&stream, 0, n as usize, &mut call).unwrap() * 1e-6 * n as f64,
                    )
                })
            });
            let stream_us = timing::median_us(&stream, 5, 5, &mut call).unwrap();
            let graph_us = timing::graph_median_us(&stream, 1, 5, 5, &mut call).unwrap();
            // Weights of the experts the tokens touch (each read at least once), and the FLOP of the
            // two projections over the routed rows.
            let routed = reference_route(&cfg.routing, t, &logits_host[..t * e], with_bias.then_some(&bias_host[..]));
            let mut touched: Vec<i32> = routed.ids.iter().copied().filter(|&id| id >= 0).collect();
            touched.sort_unstable();
            touched.dedup();
            let bytes = touched.len() * (cfg.gate_up_rows() * h + h * i) * 2;
            let pairs = routed.ids.iter().filter(|&&id| id >= 0).count();
            let flop = 2 * pairs * (cfg.gate_up_rows() * h + h * i);
            rows.push(format!(
                "{{\"case\":\"{case}\",\"tokens\":{t},\"stream_us\":{stream_us:.3},\"graph_us\":{graph_us:.3},\"bytes\":{bytes},\"flop\":{flop}}}"
            ));
        }
    }
    write_json("target/bench-layer.json", &rows);
}

criterion_group! {
    name = layer_benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1)).sample_size(10);
    targets = benches
}
criterion_main!(layer_benches);
