//! Grouped-GEMM benchmarks on the GPU for the shapes (Mixtral-8x7B, Qwen3-30B-A3B, a DeepSeek-V3
//! expert-parallel slice; T in {1, 16, 64, 256, 4096, 16384}, balanced routing, and uneven routing at
//! T = 4096, the `_uneven` cases, as a layer's real routing gives): the gate|up projection
//! with SwiGLU and the down projection with the routing weight as row scale, bf16. Timed with CUDA
//! events (criterion's `iter_custom`) and as one call's share of a CUDA graph of calls, plus a JSON of
//! medians (MOEK_BENCH_JSON, default target/bench-grouped-gemm.json) with the weight bytes touched and
//! the FLOP, for benches/RESULTS.md and `compare_torch.py --suite gemm` (same case names).
//! The library's tuning overrides apply (read by moe_kernels::grouped_gemm, not here): for A/B runs,
//! `MOEK_GEMM_TILE=auto|small|medium|large|small6|medium64|hopper|hopper64` forces a tile shape
//! (default auto), `MOEK_GEMM_HOPPER=0` keeps auto on the portable path, `MOEK_GEMM_SPLIT_K=n` forces
//! the K slices.

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys;
use half::bf16;
use moe_kernels::grouped_gemm::{grouped_gemm, Epilogue, ExpertRows, GemmConfig};
use rand::{Rng, SeedableRng};
use std::time::Duration;

mod common;
use common::{measure, random_buffer, wanted, write_json};

const GRAPH_CALLS: usize = 10;
const TOKENS: [usize; 6] = [1, 16, 64, 256, 4096, 16384];

/// An MoE layer's expert shapes: E experts (on this GPU), hidden H, expert width I, and the rows T tokens
/// give this GPU.
struct Model {
    name: &'static str,
    experts: usize,
    hidden: usize,
    inter: usize,
    rows: fn(usize) -> usize,
}

const MODELS: [Model; 3] = [
    Model { name: "mixtral", experts: 8, hidden: 4096, inter: 14336, rows: |t| t * 2 },
    Model { name: "qwen3_30b_a3b", experts: 128, hidden: 2048, inter: 768, rows: |t| t * 8 },
    // 32 local experts of 256, 8 per token: T * 8 * 32 / 256 rows.
    Model { name: "deepseek_v3_ep8", experts: 32, hidden: 7168, inter: 2048, rows: |t| t * 8 * 32 / 256 },
];

/// Balanced routing: the first `rows % E` experts get one row more than the others.
fn balanced_offsets(rows: usize, experts: usize) -> Vec<i32> {
    let mut offsets = vec![0i32];
    for e in 0..experts {
        let count = rows / experts + usize::from(e < rows % experts);
        offsets.push(offsets[e] + count as i32);
    }
    offsets
}

/// Uneven routing (a layer's experts are not balanced): expert e's share of the rows is proportional to
/// 50 + (37 e mod 101), so from 50 to 150, rounded down; the rows left over go one each to the first
/// experts. benches/compare_torch.py builds the same counts.
fn uneven_offsets(rows: usize, experts: usize) -> Vec<i32> {
    let weight = |e: usize| 50 + (37 * e) % 101;
    let total: usize = (0..experts).map(weight).sum();
    let mut counts: Vec<usize> = (0..experts).map(|e| rows * weight(e) / total).collect();
    let left = rows - counts.iter().sum::<usize>();
    for count in counts.iter_mut().take(left) {
        *count += 1;
    }
    let mut offsets = vec![0i32];
    for (e, count) in counts.iter().enumerate() {
        offsets.push(offsets[e] + *count as i32);
    }
    offsets
}

/// Token counts that also get the uneven routing.
const UNEVEN_TOKENS: [usize; 1] = [4096];

/// The routings measured at T tokens: (case-name suffix, offsets).
fn routings(rows: usize, experts: usize, t: usize) -> Vec<(&'static str, Vec<i32>)> {
    let mut all = vec![("", balanced_offsets(rows, experts))];
    if UNEVEN_TOKENS.contains(&t) {
        all.push(("_uneven", uneven_offsets(rows, experts)));
    }
    all
}

fn row(name: &str, t: usize, bytes: f64, flop: f64, (stream_us, graph_us): (f64, f64)) -> String {
    format!(
        "{{\"case\":\"{name}\",\"tokens\":{t},\"stream_us\":{stream_us:.3},\"graph_us\":{graph_us:.3},\"bytes\":{bytes},\"flop\":{flop}}}"
    )
}

fn benches(crit: &mut Criterion) {
    if !moe_kernels::KERNELS_BUILT || !unsafe { sys::is_culib_present() } {
        eprintln!("SKIPPED: grouped-GEMM benchmarks need a GPU and a build with CUDA kernels");
        return;
    }
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut rows_json = Vec::new();
    for m in &MODELS {
        let (e, h, i) = (m.experts, m.hidden, m.inter);
        let w_gate_up = random_buffer(&stream, &mut rng, e * 2 * i * h);
        let w_down = random_buffer(&stream, &mut rng, e * h * i);
        for (t, (routing, host_offsets)) in
            TOKENS.into_iter().flat_map(|t| routings((m.rows)(t), m.experts, t).into_iter().map(move |r| (t, r)))
        {
            let rows = (m.rows)(t);
            let touched = rows.min(e);
            let offsets = stream.clone_htod(&host_offsets).unwrap();
            let x = random_buffer(&stream, &mut rng, rows * h);
            let mut mid = stream.alloc_zeros::<bf16>((rows * i).max(1)).unwrap();
            let mut out = stream.alloc_zeros::<bf16>((rows * h).max(1)).unwrap();
            let scale: Vec<f32> = (0..rows.max(1)).map(|_| rng.random_range(0.0f32..1.0)).collect();
            let scale = stream.clone_htod(&scale).unwrap();
            let gate_up = GemmConfig { epilogue: Epilogue::SwiGlu, ..GemmConfig::new(e as u32, 2 * i, h) };
            let down = GemmConfig::new(e as u32, h, i);
            let experts = ExpertRows::Contiguous { offsets: offsets.slice(..), max_rows: rows };
            // Split-K's workspace, as an engine would size it (the larger of the two projections' needs).
            let layout = experts.layout();
            let ws_bytes = gate_up.workspace_bytes(layout).unwrap().max(down.workspace_bytes(layout).unwrap());
            let mut workspace = stream.alloc_zeros::<u8>(ws_bytes.max(16)).unwrap();

            let mut run_gate_up = || {
                grouped_gemm(
                    &stream,
                    &gate_up,
                    &x.slice(..),
                    &w_gate_up.slice(..),
                    &experts,
                    None,
                    &mut mid.slice_mut(..),
                    Some(&mut workspace.slice_mut(..)),
                )
            };
            let name = format!("{}_T{t}{routing}_gate_up", m.name);
            let bytes = ((touched * 2 * i * h + rows * h + rows * i) * 2) as f64;
            let flop = (2 * rows * 2 * i * h) as f64;
            if wanted(&name) {
                rows_json.push(row(
                    &name,
                    t,
                    bytes,
                    flop,
                    measure(crit, &stream, &name, GRAPH_CALLS, &mut run_gate_up),
                ));
            }

            let mut run_down = || {
                let s = scale.slice(..);
                grouped_gemm(
                    &stream,
                    &down,
                    &mid.slice(..),
                    &w_down.slice(..),
                    &experts,
                    Some(&s),
                    &mut out.slice_mut(..),
                    Some(&mut workspace.slice_mut(..)),
                )
            };
            let name = format!("{}_T{t}{routing}_down", m.name);
            let bytes = ((touched * h * i + rows * i + rows * h) * 2) as f64;
            let flop = (2 * rows * h * i) as f64;
            if wanted(&name) {
                rows_json.push(row(&name, t, bytes, flop, measure(crit, &stream, &name, GRAPH_CALLS, &mut run_down)));
            }
        }
    }
    write_json("target/bench-grouped-gemm.json", &rows_json);
}

criterion_group! {
    name = grouped_gemm_benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_millis(500)).sample_size(10);
    targets = benches
}
criterion_main!(grouped_gemm_benches);
