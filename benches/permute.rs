//! Permutation benchmarks on the GPU, timed with CUDA events (criterion's `iter_custom`), plus a JSON
//! of medians (MOEK_BENCH_JSON, default target/bench-permute.json) for benches/RESULTS.md. Each case is
//! timed back to back on a stream and as one call's share of a CUDA graph of 20 calls. The plan at
//! T = 4096 is timed on each path too (`_fused`, `_chunked`, `_cluster`: one cluster of 16 blocks on
//! sm_90, the chunked path elsewhere); permute and combine at decode sizes of
//! the layer presets (rows cut over several warps) as well as at T = 16384.

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::{sys, CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::permute::{combine, permute, plan_with_path, PlanConfig, PlanOutput, PlanPath, PlanView};
use moe_kernels::timing;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

const GRAPH_CALLS: usize = 20;

/// Buffers of one problem: balanced random routing of T tokens, k of E experts, rows of width H.
struct Problem {
    cfg: PlanConfig,
    t: usize,
    hidden: usize,
    ids: CudaSlice<i32>,
    counts: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    row_source: CudaSlice<i32>,
    pair_row: CudaSlice<i32>,
    errors: CudaSlice<i32>,
    workspace: CudaSlice<u8>,
    x: CudaSlice<bf16>,
    rows: CudaSlice<bf16>,
    weights: CudaSlice<f32>,
    out: CudaSlice<bf16>,
}

impl Problem {
    fn new(stream: &Arc<CudaStream>, t: usize, e: u32, k: u32, hidden: usize) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let cfg = PlanConfig::new(e, k);
        let pairs = t * k as usize;
        let max_rows = cfg.max_rows(t).unwrap();
        let ids: Vec<i32> = (0..pairs).map(|_| rng.random_range(0..e as i32)).collect();
        let x: Vec<bf16> = (0..t * hidden).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
        let w: Vec<f32> = (0..pairs).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let mut p = Problem {
            cfg,
            t,
            hidden,
            ids: stream.clone_htod(&ids).unwrap(),
            counts: stream.alloc_zeros(e as usize).unwrap(),
            offsets: stream.alloc_zeros(e as usize + 1).unwrap(),
            row_source: stream.alloc_zeros(max_rows).unwrap(),
            pair_row: stream.alloc_zeros(pairs).unwrap(),
            errors: stream.alloc_zeros(1).unwrap(),
            workspace: stream.alloc_zeros(cfg.workspace_bytes(t).unwrap()).unwrap(),
            x: stream.clone_htod(&x).unwrap(),
            rows: stream.alloc_zeros((max_rows * hidden).max(1)).unwrap(),
            weights: stream.clone_htod(&w).unwrap(),
            out: stream.alloc_zeros((t * hidden).max(1)).unwrap(),
        };
        p.plan(stream, None).unwrap();
        p
    }

    /// The plan on a forced path (`None`: the automatic choice).
    fn plan(&mut self, stream: &Arc<CudaStream>, path: Option<PlanPath>) -> moe_kernels::Result<()> {
        let mut out = PlanOutput {
            expert_counts: self.counts.slice_mut(..),
            expert_offsets: self.offsets.slice_mut(..),
            row_source: self.row_source.slice_mut(..),
            pair_row: self.pair_row.slice_mut(..),
            rank_counts: None,
            rank_offsets: None,
            error_count: self.errors.slice_mut(..),
            workspace: self.workspace.slice_mut(..),
        };
        plan_with_path(stream, &self.cfg, self.t, &self.ids.slice(..), &mut out, path)
    }

    fn permute(&mut self, stream: &Arc<CudaStream>) -> moe_kernels::Result<()> {
        let view = PlanView {
            expert_offsets: self.offsets.slice(..),
            row_source: self.row_source.slice(..),
            pair_row: self.pair_row.slice(..),
        };
        permute(
            stream,
            &self.cfg,
            self.t,
            self.hidden,
            &self.x.slice(..),
            &view,
            None,
            false,
            &mut self.rows.slice_mut(..),
        )
    }

    fn combine(&mut self, stream: &Arc<CudaStream>) -> moe_kernels::Result<()> {
        let w = self.weights.slice(..);
        let pair_row = self.pair_row.slice(..);
        combine(
            stream,
            &self.cfg,
            self.t,
            self.hidden,
            &self.rows.slice(..),
            &pair_row,
            Some(&w),
            None,
            &mut self.out.slice_mut(..),
        )
    }
}

/// Stream and graph medians of `op`, in microseconds.
fn times(stream: &Arc<CudaStream>, mut op: impl FnMut() -> moe_kernels::Result<()>) -> (f64, f64) {
    let stream_us = timing::median_us(stream, 21, 20, &mut op).unwrap();
    let graph_us = timing::graph_median_us(stream, GRAPH_CALLS, 11, 5, op).unwrap();
    (stream_us, graph_us)
}

fn row(name: &str, t: usize, bytes: f64, (stream_us, graph_us): (f64, f64)) -> String {
    format!("{{\"case\":\"{name}\",\"tokens\":{t},\"stream_us\":{stream_us:.3},\"graph_us\":{graph_us:.3},\"bytes\":{bytes}}}")
}

fn benches(crit: &mut Criterion) {
    if !moe_kernels::KERNELS_BUILT || !unsafe { sys::is_culib_present() } {
        eprintln!("SKIPPED: permutation benchmarks need a GPU and a build with CUDA kernels");
        return;
    }
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let mut rows = Vec::new();
    for (t, path, suffix) in [
        (4096usize, None, ""),
        (4096, Some(PlanPath::Fused), "_fused"),
        (4096, Some(PlanPath::Chunked), "_chunked"),
        (4096, Some(PlanPath::Cluster), "_cluster"),
        (32768, None, ""),
    ] {
        let mut p = Problem::new(&stream, t, 256, 8, 8);
        let name = format!("plan_E256_k8_T{t}{suffix}");
        crit.bench_function(&name, |b| {
            b.iter_custom(|n| {
                Duration::from_secs_f64(
                    timing::mean_us(&stream, 0, n as usize, || p.plan(&stream, path)).unwrap() * 1e-6 * n as f64,
                )
            })
        });
        // Bytes: ids read, pair_row and row_source written (counts and offsets are negligible).
        rows.push(row(&name, t, (t * 8 * 12) as f64, times(&stream, || p.plan(&stream, path))));
    }
    // (T, E, k, H): T = 16384 is prefill (one warp per token); the rest are the layer presets' decode
    // sizes (DeepSeek-V3's 32 local experts, Qwen3-30B-A3B, Mixtral), where rows are cut over warps.
    let cases = [
        (16384usize, 256u32, 8u32, 7168usize, "T16384_H7168_k8"),
        (1, 32, 8, 7168, "T1_H7168_k8"),
        (64, 32, 8, 7168, "T64_H7168_k8"),
        (256, 32, 8, 7168, "T256_H7168_k8"),
        (64, 128, 8, 2048, "T64_H2048_k8"),
        (64, 8, 2, 4096, "T64_H4096_k2"),
    ];
    for (t, e, k, h, shape) in cases {
        let mut p = Problem::new(&stream, t, e, k, h);
        // Bytes that must move: permute reads each token row once and writes k rows; combine reads k rows
        // per token and writes one.
        let moved = (t * h * 2 + t * k as usize * h * 2) as f64;
        let name = format!("permute_bf16_{shape}");
        crit.bench_function(&name, |b| {
            b.iter_custom(|n| {
                Duration::from_secs_f64(
                    timing::mean_us(&stream, 0, n as usize, || p.permute(&stream)).unwrap() * 1e-6 * n as f64,
                )
            })
        });
        rows.push(row(&name, t, moved, times(&stream, || p.permute(&stream))));
        let name = format!("combine_bf16_{shape}");
        crit.bench_function(&name, |b| {
            b.iter_custom(|n| {
                Duration::from_secs_f64(
                    timing::mean_us(&stream, 0, n as usize, || p.combine(&stream)).unwrap() * 1e-6 * n as f64,
                )
            })
        });
        rows.push(row(&name, t, moved, times(&stream, || p.combine(&stream))));
    }
    let path = std::env::var("MOEK_BENCH_JSON").unwrap_or_else(|_| "target/bench-permute.json".into());
    std::fs::write(&path, format!("[\n{}\n]\n", rows.join(",\n"))).unwrap();
    eprintln!("wrote {path}");
}

criterion_group! {
    name = permute_benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1)).sample_size(10);
    targets = benches
}
criterion_main!(permute_benches);
