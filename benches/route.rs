//! Routing benchmarks on the GPU, timed with CUDA events (criterion's `iter_custom`), plus a JSON of
//! medians for benches/RESULTS.md (path in MOEK_BENCH_JSON, default target/bench-route.json).
//!
//! Each case is timed two ways: back-to-back launches on a stream, and replays of a CUDA graph holding
//! 20 calls (device time without launch gaps, the way a graph-captured engine runs it).

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::{sys, CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::route::{route, LogitsElem, RouteOutput, RoutingConfig};
use moe_kernels::timing;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

struct Case {
    name: &'static str,
    cfg: RoutingConfig,
    tokens: usize,
    bf16: bool,
    bias: bool,
}

fn cases() -> Vec<Case> {
    let softmax_top8 = RoutingConfig::top_k(128, 8);
    vec![
        Case { name: "deepseek_v3_T4096", cfg: RoutingConfig::deepseek_v3(), tokens: 4096, bf16: false, bias: true },
        Case { name: "deepseek_v3_T65536", cfg: RoutingConfig::deepseek_v3(), tokens: 65536, bf16: false, bias: true },
        Case { name: "softmax_top8_of_128_T65536_f32", cfg: softmax_top8, tokens: 65536, bf16: false, bias: false },
        Case { name: "softmax_top8_of_128_T65536_bf16", cfg: softmax_top8, tokens: 65536, bf16: true, bias: false },
        Case { name: "mixtral_T4096", cfg: RoutingConfig::mixtral(), tokens: 4096, bf16: false, bias: false },
        Case {
            name: "switch_E128_T65536_capacity",
            cfg: RoutingConfig::switch(128, 640),
            tokens: 65536,
            bf16: false,
            bias: false,
        },
        Case {
            name: "moge_E64_G8_k8_T4096",
            cfg: RoutingConfig::moge(64, 8, 8),
            tokens: 4096,
            bf16: false,
            bias: false,
        },
        // The plain top-k fast path's other shapes: renormalised (Qwen3), and 32 values a lane.
        Case {
            name: "qwen3_softmax_top8_of_128_renorm_T65536",
            cfg: RoutingConfig::qwen3_moe(),
            tokens: 65536,
            bf16: false,
            bias: false,
        },
        Case {
            name: "softmax_top8_of_256_T65536_f32",
            cfg: RoutingConfig::top_k(256, 8),
            tokens: 65536,
            bf16: false,
            bias: false,
        },
    ]
}

/// Device buffers for one case.
struct Buffers<L> {
    logits: CudaSlice<L>,
    bias: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    dropped: CudaSlice<i32>,
    workspace: CudaSlice<u8>,
}

impl<L: LogitsElem> Buffers<L> {
    fn new(stream: &Arc<CudaStream>, c: &Case, convert: impl Fn(f32) -> L) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (t, e, k) = (c.tokens, c.cfg.num_experts as usize, c.cfg.k as usize);
        let host: Vec<L> = (0..t * e).map(|_| convert(rng.random_range(-4.0f32..4.0))).collect();
        let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        Buffers {
            logits: stream.clone_htod(&host).unwrap(),
            bias: stream.clone_htod(&bias).unwrap(),
            ids: stream.alloc_zeros(t * k).unwrap(),
            weights: stream.alloc_zeros(t * k).unwrap(),
            dropped: stream.alloc_zeros(1).unwrap(),
            workspace: stream.alloc_zeros(c.cfg.workspace_bytes(t).unwrap().max(1)).unwrap(),
        }
    }

    fn run(&mut self, stream: &Arc<CudaStream>, c: &Case) -> moe_kernels::Result<()> {
        let mut out = RouteOutput {
            topk_ids: self.ids.slice_mut(..),
            topk_weights: self.weights.slice_mut(..),
            dropped_count: Some(self.dropped.slice_mut(..)),
            workspace: Some(self.workspace.slice_mut(..)),
        };
        let bias = self.bias.slice(..);
        route(stream, &c.cfg, c.tokens, &self.logits.slice(..), c.bias.then_some(&bias), &mut out)
    }
}

/// Bytes the routing must move: logits (and bias) read, ids and weights written.
fn bytes(c: &Case) -> f64 {
    let (t, e, k) = (c.tokens as f64, f64::from(c.cfg.num_experts), f64::from(c.cfg.k));
    t * e * if c.bf16 { 2.0 } else { 4.0 } + t * k * 8.0
}

fn logits_bytes(c: &Case) -> f64 {
    c.tokens as f64 * f64::from(c.cfg.num_experts) * if c.bf16 { 2.0 } else { 4.0 }
}

const GRAPH_CALLS: usize = 20;

fn measure<L: LogitsElem>(
    crit: &mut Criterion,
    stream: &Arc<CudaStream>,
    c: &Case,
    convert: impl Fn(f32) -> L,
) -> String {
    let mut b = Buffers::new(stream, c, convert);
    crit.bench_function(c.name, |bench| {
        bench.iter_custom(|iters| {
            let us = timing::mean_us(stream, 0, iters as usize, || b.run(stream, c)).unwrap();
            Duration::from_secs_f64(us * 1e-6 * iters as f64)
        })
    });
    let stream_us = timing::median_us(stream, 21, 50, || b.run(stream, c)).unwrap();
    let graph_us = timing::graph_median_us(stream, GRAPH_CALLS, 11, 10, || b.run(stream, c)).unwrap();
    format!(
        "{{\"case\":\"{}\",\"tokens\":{},\"experts\":{},\"k\":{},\"stream_us\":{stream_us:.3},\"graph_us\":{graph_us:.3},\"bytes\":{},\"logits_bytes\":{}}}",
        c.name,
        c.tokens,
        c.cfg.num_experts,
        c.cfg.k,
        bytes(c),
        logits_bytes(c)
    )
}

fn benches(crit: &mut Criterion) {
    if !moe_kernels::KERNELS_BUILT || !unsafe { sys::is_culib_present() } {
        eprintln!("SKIPPED: routing benchmarks need a GPU and a build with CUDA kernels");
        return;
    }
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    // The benchmark orders everything on one stream; event tracking would record inside captures.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let mut rows = Vec::new();
    for c in cases() {
        rows.push(if c.bf16 { measure(crit, &stream, &c, bf16::from_f32) } else { measure(crit, &stream, &c, |x| x) });
    }
    let path = std::env::var("MOEK_BENCH_JSON").unwrap_or_else(|_| "target/bench-route.json".into());
    std::fs::write(&path, format!("[\n{}\n]\n", rows.join(",\n"))).unwrap();
    eprintln!("wrote {path}");
}

criterion_group! {
    name = route_benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1)).sample_size(20);
    targets = benches
}
criterion_main!(route_benches);
