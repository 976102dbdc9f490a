//! Expert-parallel dispatch and combine across the GPUs of this host (one process, peer access):
//! DeepSeek-V3's shape (H = 7168, k = 8, E = 256, balanced random routing) at T tokens per rank.
//!
//! Timing: every rank's calls are captured into one CUDA graph per rank (`GRAPH_CALLS` calls), the
//! graphs launched together, and each rank's stream timed with CUDA events; a call's time is the
//! slowest rank's share. "stream" launches the same calls eagerly from this thread (host launch
//! overhead included). Combine cannot run without its dispatch, so it is timed as
//! (dispatch + combine) - dispatch.
//!
//! Low-dimension mode (BigMac, `LowDimRank`): with MOEK_EP_LOW_DIM_R=r (a multiple of 8, e.g. 896 =
//! H/8) every T also times the low-dimension dispatch (descend projection [T, H] -> [T, r], then the
//! exchange at width r) and dispatch + combine (exchange back at width r, the weighted sum, the ascend
//! projection [T, r] -> [T, H]; no residual, like the full-width rows), projections included, and
//! prints its speed-up over the full-width rows of the same run.
//!
//! Env: MOEK_EP_RANKS (default: every GPU, at most 4), MOEK_EP_TOKENS (comma list, default
//! 128,4096), MOEK_EP_LOW_DIM_R (off by default), MOEK_BENCH_JSON (output path). Compare with
//! `benches/compare_nccl.py`.

#[path = "common/mod.rs"]
mod common;

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::ep::{EpConfig, EpRank, ExpertOutput, LowDimRank, PeerGroup};
use moe_kernels::sys;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use std::sync::Arc;

const GRAPH_CALLS: usize = 10;
const SAMPLES: usize = 7;

struct Rank {
    x: CudaSlice<bf16>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    offsets: CudaSlice<i32>,
    out: CudaSlice<bf16>,
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Dispatch,
    DispatchCombine,
}

fn enqueue(rank: &EpRank, b: &mut Rank, t: usize, op: Op) {
    let w = b.weights.slice(..);
    rank.dispatch(t, &b.x.slice(..), &b.ids.slice(..), Some(&w), &mut b.offsets.slice_mut(..)).unwrap();
    if op == Op::DispatchCombine {
        rank.combine(t, ExpertOutput::Received, None, &mut b.out.slice_mut(..)).unwrap();
    }
}

/// Median over samples of the slowest rank's time per call, in microseconds, running `run` (which
/// enqueues `calls` calls on every rank) between events on every stream.
fn time_calls(streams: &[Arc<CudaStream>], calls: usize, mut run: impl FnMut()) -> f64 {
    let mut samples = Vec::new();
    run(); // warm-up
    for s in streams {
        s.synchronize().unwrap();
    }
    for _ in 0..SAMPLES {
        let events: Vec<_> = streams
            .iter()
            .map(|s| {
                let ctx = s.context();
                let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
                let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
                start.record(s).unwrap();
                (start, end)
            })
            .collect();
        run();
        for (s, (_, end)) in streams.iter().zip(&events) {
            end.record(s).unwrap();
        }
        let slowest = streams
            .iter()
            .zip(&events)
            .map(|(s, (start, end))| {
                s.synchronize().unwrap();
                start.elapsed_ms(end).unwrap() as f64 * 1e3 / calls as f64
            })
            .fold(0.0, f64::max);
        samples.push(slowest);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// (stream, graph) microseconds per call of `enqueue(rank index)` on every rank: launched eagerly, then
/// captured into one graph per rank (`GRAPH_CALLS` calls each) and replayed.
fn time_op(streams: &[Arc<CudaStream>], mut enqueue: impl FnMut(usize)) -> (f64, f64) {
    let stream_us = time_calls(streams, GRAPH_CALLS, || {
        for _ in 0..GRAPH_CALLS {
            for i in 0..streams.len() {
                enqueue(i);
            }
        }
    });
    let graphs: Vec<_> = (0..streams.len())
        .map(|i| {
            let s = &streams[i];
            s.context().bind_to_thread().unwrap();
            s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
            for _ in 0..GRAPH_CALLS {
                enqueue(i);
            }
            s.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("a graph")
        })
        .collect();
    let graph_us = time_calls(streams, GRAPH_CALLS, || {
        for g in &graphs {
            g.launch().unwrap();
        }
    });
    (stream_us, graph_us)
}

/// Routing ids of `t` tokens: k distinct experts of E each, uniformly.
fn random_ids(rng: &mut StdRng, t: usize, e: u32, k: u32) -> Vec<i32> {
    (0..t).flat_map(|_| sample(rng, e as usize, k as usize).into_iter().map(|j| j as i32)).collect()
}

/// One rank's low-dimension buffers: the full-width ones and the two projections.
struct LowRank {
    base: Rank,
    w_down: CudaSlice<bf16>,
    w_up: CudaSlice<bf16>,
}

fn enqueue_low(low: &mut LowDimRank<bf16>, b: &mut LowRank, t: usize, op: Op) {
    let (x, ids, wd, w) = (b.base.x.slice(..), b.base.ids.slice(..), b.w_down.slice(..), b.base.weights.slice(..));
    low.dispatch(t, &x, &wd, &ids, Some(&w), &mut b.base.offsets.slice_mut(..)).unwrap();
    if op == Op::DispatchCombine {
        let wu = b.w_up.slice(..);
        low.combine(t, ExpertOutput::Received, &wu, None, &mut b.base.out.slice_mut(..)).unwrap();
    }
}

/// Times the low-dimension calls at width `r` for `t` tokens per rank (model width `h`); returns
/// (dispatch, dispatch + combine) as (stream, graph) microseconds.
fn low_dim(streams: &[Arc<CudaStream>], cfg: EpConfig, h: usize, rng: &mut StdRng) -> [(f64, f64); 2] {
    let (t, r) = (cfg.max_tokens, cfg.hidden);
    let group = PeerGroup::new(cfg, streams).unwrap();
    let mut lows: Vec<LowDimRank<bf16>> = group.ranks().iter().map(|q| LowDimRank::new(q, h).unwrap()).collect();
    let mut bufs: Vec<LowRank> = streams
        .iter()
        .map(|s| {
            let ids = random_ids(rng, t, cfg.num_experts, cfg.k);
            LowRank {
                base: Rank {
                    x: common::random_buffer(s, rng, t * h),
                    ids: s.clone_htod(&ids).unwrap(),
                    weights: s.clone_htod(&vec![0.125f32; t * cfg.k as usize]).unwrap(),
                    offsets: s.alloc_zeros(cfg.local_experts() + 1).unwrap(),
                    out: s.alloc_zeros(t * h).unwrap(),
                },
                // Unscaled random values: they do not change the time (rows stay far from bf16 overflow).
                w_down: common::random_buffer(s, rng, r * h),
                w_up: common::random_buffer(s, rng, h * r),
            }
        })
        .collect();
    for s in streams {
        s.synchronize().unwrap();
    }
    [Op::Dispatch, Op::DispatchCombine].map(|op| time_op(streams, |i| enqueue_low(&mut lows[i], &mut bufs[i], t, op)))
}

fn main() {
    let Ok(gpus) = CudaContext::device_count() else {
        eprintln!("no GPU: nothing to measure");
        return;
    };
    let ranks: usize =
        std::env::var("MOEK_EP_RANKS").ok().and_then(|v| v.parse().ok()).unwrap_or((gpus as usize).min(4));
    if ranks < 2 || ranks > gpus as usize {
        eprintln!("needs at least 2 GPUs (found {gpus}, asked for {ranks}): nothing to measure");
        return;
    }
    let tokens: Vec<usize> = std::env::var("MOEK_EP_TOKENS")
        .unwrap_or_else(|_| "128,4096".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let low_dim_r: Option<usize> =
        std::env::var("MOEK_EP_LOW_DIM_R").ok().and_then(|v| v.trim().parse().ok()).filter(|&r| r > 0);
    let streams: Vec<Arc<CudaStream>> =
        (0..ranks).map(|i| CudaContext::new(i).unwrap().new_stream().unwrap()).collect();
    let (e, k, h) = (256u32, 8u32, 7168usize);
    let mut rng = StdRng::seed_from_u64(1);
    let mut rows = Vec::new();
    for &t in &tokens {
        let cfg = EpConfig {
            num_ranks: ranks as u32,
            num_experts: e,
            k,
            hidden: h,
            max_tokens: t,
            dtype: sys::moek_dtype_MOEK_DTYPE_BF16,
            capacity: 0,
        };
        let group = PeerGroup::new(cfg, &streams).unwrap();
        let mut bufs: Vec<Rank> = group
            .ranks()
            .iter()
            .map(|r| {
                let s = r.stream();
                let ids = random_ids(&mut rng, t, e, k);
                Rank {
                    x: common::random_buffer(s, &mut rng, t * h),
                    ids: s.clone_htod(&ids).unwrap(),
                    weights: s.clone_htod(&vec![0.125f32; t * k as usize]).unwrap(),
                    offsets: s.alloc_zeros(e as usize / ranks + 1).unwrap(),
                    out: s.alloc_zeros(t * h).unwrap(),
                }
            })
            .collect();
        for s in &streams {
            s.synchronize().unwrap();
            // SAFETY: each buffer is used on its own rank's stream only.
            unsafe { s.context().disable_event_tracking() };
        }
        let ranks_of = group.ranks();
        let mut result = |op: Op| time_op(&streams, |i| enqueue(&ranks_of[i], &mut bufs[i], t, op));
        let dispatch = result(Op::Dispatch);
        let both = result(Op::DispatchCombine);
        let combine = (both.0 - dispatch.0, both.1 - dispatch.1);
        // Bytes each rank sends (its own share included, as all_to_all_single counts them).
        let bytes = (t * k as usize * h * 2) as f64;
        for (name, (s_us, g_us)) in [("dispatch", dispatch), ("combine", combine), ("dispatch+combine", both)] {
            let moved = if name == "dispatch+combine" { 2.0 * bytes } else { bytes };
            let gbps = moved / (g_us * 1e-6) / 1e9;
            println!(
                "{name:>17} R={ranks} T={t:>5}: stream {s_us:9.2} us  graph {g_us:9.2} us  {gbps:7.1} GB/s per rank"
            );
            rows.push(format!(
                "  {{\"case\": \"{name} R={ranks} T={t}\", \"stream_us\": {s_us:.3}, \"graph_us\": {g_us:.3}, \"bytes_per_rank\": {moved}, \"gbps_per_rank\": {gbps:.1}}}"
            ));
        }
        drop(group);
        if let Some(r) = low_dim_r {
            let low_cfg = EpConfig { hidden: r, ..cfg };
            let [low_dispatch, low_both] = low_dim(&streams, low_cfg, h, &mut rng);
            let full = [dispatch, both];
            let names = ["dispatch", "dispatch+combine"];
            for ((name, (s_us, g_us)), f) in names.iter().zip([low_dispatch, low_both]).zip(full) {
                let speedup = f.1 / g_us;
                println!(
                    "{:>17} R={ranks} T={t:>5}: stream {s_us:9.2} us  graph {g_us:9.2} us  {speedup:5.2}x full width (graph)",
                    format!("lowdim r={r} {name}")
                );
                rows.push(format!(
                    "  {{\"case\": \"lowdim {name} R={ranks} T={t} r={r}\", \"stream_us\": {s_us:.3}, \"graph_us\": {g_us:.3}, \"speedup_vs_full_graph\": {speedup:.3}}}"
                ));
            }
        }
    }
    common::write_json("target/bench-ep.json", &rows);
}
