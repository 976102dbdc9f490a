//! Low-dimension expert parallelism (BigMac: descend, dispatch at width r, combine at width r, ascend)
//! on 1, 2 and 4 GPUs (one process, peer access) against the CPU reference: the received rows and
//! offsets after the descend projection, then the output after a per-expert function, the ascend and
//! the residual; odd shapes (H = 2880, r = 360), T = 0 and T = 1 on some ranks, run to run bit identity,
//! and a CUDA graph of the whole round replayed on new inputs. Skipped (with a notice) when fewer GPUs
//! are present; `MOEK_REQUIRE_GPUS=N` makes N required.

mod common;
#[path = "common/ep.rs"]
mod ep_common;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use ep_common::{expert_function, make_rank, max_abs_error, to_bf16, tokens_of, RankBuffers, RankData, Routing};
use half::bf16;
use moe_kernels::ep::{EpConfig, ExpertOutput, LowDimConfig, LowDimRank, PeerGroup};
use moe_kernels::reference::ep::Received;
use moe_kernels::reference::grouped_gemm::relative_frobenius_error;
use moe_kernels::reference::low_dim as reference;
use moe_kernels::sys;
use rand::rngs::StdRng;
use rand::Rng;
use std::sync::Arc;

/// Per element, |got - want| / (1 + |want|) for the received rows: each is one GEMM output, rounded
/// to bf16 (2^-9 relative) against an f64 reference.
const ROW_TOLERANCE: f32 = 2e-2;
/// Per element of the output, |got - want| / (1 + rms(want)): the ascend's inputs (the r-wide sums) are
/// rounded to bf16, so an output's error scales with the size of the terms it sums, not with its own
/// value (an output near zero can be a sum of large terms). A CPU emulation of the kernels' roundings
/// (projection, r-wide sum, ascend, residual add each rounded to bf16) reached 2.5e-2 on these shapes
/// (the largest outputs' last-bit rounding twice over), with a relative Frobenius error below 3e-3.
const OUTPUT_TOLERANCE: f64 = 5e-2;
/// ||got - want|| / ||want|| over a rank's whole output.
const FROBENIUS_TOLERANCE: f64 = 1e-2;

fn streams(n: usize) -> Option<Vec<Arc<CudaStream>>> {
    if !ep_common::have_gpus(n) {
        return None;
    }
    Some((0..n).map(|i| CudaContext::new(i).unwrap().new_stream().unwrap()).collect())
}

/// The two projections, shared by every rank (bf16-exact values scaled to keep the rows near 1).
struct Projections {
    down: Vec<f32>,
    up: Vec<f32>,
}

impl Projections {
    fn new(rng: &mut StdRng, cfg: &LowDimConfig) -> Self {
        let (h, r) = (cfg.hidden, cfg.projected());
        let mut values = |n: usize, k: usize| {
            let a = (3.0 / k as f32).sqrt();
            (0..n).map(|_| bf16::from_f32(rng.random_range(-a..a)).to_f32()).collect::<Vec<f32>>()
        };
        Projections { down: values(r * h, h), up: values(h * r, r) }
    }
}

/// Device weights on one rank.
struct Weights {
    down: CudaSlice<bf16>,
    up: CudaSlice<bf16>,
}

fn weights_on(s: &Arc<CudaStream>, p: &Projections) -> Weights {
    Weights { down: s.clone_htod(&to_bf16(&p.down)).unwrap(), up: s.clone_htod(&to_bf16(&p.up)).unwrap() }
}

/// The full-width configuration the test's token buffers are made for (x, residual, out: H wide).
fn full_width(cfg: &LowDimConfig) -> EpConfig {
    EpConfig { hidden: cfg.hidden, ..cfg.ep }
}

fn dispatch_all(lows: &mut [LowDimRank<bf16>], data: &[RankData], bufs: &mut [RankBuffers], w: &[Weights]) {
    for ((low, b), w) in lows.iter_mut().zip(bufs.iter_mut()).zip(w) {
        let d = &data[low.ep().rank() as usize];
        let weights = b.weights.slice(..);
        let (x, ids) = (b.x.slice(..), b.ids.slice(..));
        low.dispatch(d.t, &x, &w.down.slice(..), &ids, Some(&weights), &mut b.offsets.slice_mut(..)).unwrap();
    }
}

fn combine_all(lows: &mut [LowDimRank<bf16>], data: &[RankData], bufs: &mut [RankBuffers], w: &[Weights]) {
    for ((low, b), w) in lows.iter_mut().zip(bufs.iter_mut()).zip(w) {
        let d = &data[low.ep().rank() as usize];
        let (residual, up) = (b.residual.slice(..), w.up.slice(..));
        low.combine(d.t, ExpertOutput::Received, &up, Some(&residual), &mut b.out.slice_mut(..)).unwrap();
    }
}

fn check_output(case: &str, rank: usize, got: &[bf16], want: &[f32]) {
    let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
    let rms = (want.iter().map(|&w| f64::from(w).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let worst = got.iter().zip(want).map(|(&g, &w)| f64::from((g - w).abs())).fold(0.0, f64::max);
    let err = worst / (1.0 + rms);
    assert!(err < OUTPUT_TOLERANCE, "{case}: rank {rank} output error {worst} (rms {rms})");
    let rel = relative_frobenius_error(&got, want);
    assert!(rel < FROBENIUS_TOLERANCE, "{case}: rank {rank} relative error {rel}");
}

/// One checked round on every rank; returns the output bits.
fn round(
    lows: &mut [LowDimRank<bf16>],
    cfg: &LowDimConfig,
    p: &Projections,
    data: &[RankData],
    bufs: &mut [RankBuffers],
    w: &[Weights],
    case: &str,
) -> Vec<Vec<u16>> {
    let (r, local) = (cfg.projected(), cfg.ep.local_experts());
    for (low, b) in lows.iter().zip(bufs.iter_mut()) {
        let ep = low.ep();
        b.upload(ep.stream(), &data[ep.rank() as usize]);
        let poison = vec![bf16::from_f32(-999.0); ep.layout().max_received_rows * r];
        ep.write_received_rows(&poison).unwrap();
    }
    dispatch_all(lows, data, bufs, w);
    let tokens = tokens_of(data);
    let projected = reference::descend(cfg, &tokens, &p.down);
    let want = reference::dispatch(cfg, &tokens, &projected);
    let mut outputs = vec![Vec::new(); lows.len()];
    for (low, b) in lows.iter().zip(bufs.iter()) {
        let (ep, q) = (low.ep(), low.ep().rank() as usize);
        let w = &want[q];
        let offsets = ep.stream().clone_dtoh(&b.offsets).unwrap();
        assert_eq!(offsets, w.expert_offsets, "{case}: rank {q} received offsets");
        let rows = offsets[local] as usize;
        let got: Vec<bf16> = ep.received_rows_to_host(rows).unwrap();
        let err = max_abs_error(&got, &w.rows);
        assert!(err < ROW_TOLERANCE, "{case}: rank {q} received rows (projected) error {err}");
        // The experts see the rows as they arrived; the reference combine takes the same outputs.
        let arrived = Received {
            rows: got.iter().map(|v| v.to_f32()).collect(),
            expert_offsets: offsets,
            origin: w.origin.clone(),
        };
        outputs[q] = expert_function(&arrived, r);
        ep.write_received_rows(&to_bf16(&outputs[q])).unwrap();
    }
    combine_all(lows, data, bufs, w);
    let weights: Vec<Option<&[f32]>> = data.iter().map(|d| Some(d.weights.as_slice())).collect();
    let residual: Vec<Option<&[f32]>> = data.iter().map(|d| Some(d.residual.as_slice())).collect();
    let expected = reference::combine(cfg, &tokens, &want, &outputs, &weights, &p.up, &residual);
    let mut bits = Vec::new();
    for (low, b) in lows.iter().zip(bufs.iter()) {
        let q = low.ep().rank() as usize;
        let got = low.ep().stream().clone_dtoh(&b.out).unwrap();
        let got = &got[..data[q].t * cfg.hidden];
        check_output(case, q, got, &expected[q]);
        bits.push(got.iter().map(|v| v.to_bits()).collect());
    }
    bits
}

fn run_configs(num_ranks: u32) {
    let Some(streams) = streams(num_ranks as usize) else { return };
    let mut rng = common::rng(&format!("ep_low_dim_{num_ranks}"));
    // (E, k, H, r): gpt-oss-like width with r = H/8, DeepSeek-like routing, the smallest widths.
    let shapes = [(8u32, 2u32, 2880usize, 360usize), (256, 8, 1024, 128), (num_ranks * 2, 1, 64, 8), (60, 6, 512, 64)];
    for (e, k, h, r) in shapes {
        if e % num_ranks != 0 {
            continue;
        }
        let max_tokens = 300;
        let ep = EpConfig {
            num_ranks,
            num_experts: e,
            k,
            hidden: r,
            max_tokens,
            dtype: sys::moek_dtype_MOEK_DTYPE_BF16,
            capacity: 0,
        };
        let cfg = LowDimConfig { ep, hidden: h };
        let group = PeerGroup::new(ep, &streams).unwrap();
        let mut lows: Vec<LowDimRank<bf16>> = group.ranks().iter().map(|q| LowDimRank::new(q, h).unwrap()).collect();
        let p = Projections::new(&mut rng, &cfg);
        let w: Vec<Weights> = streams.iter().map(|s| weights_on(s, &p)).collect();
        // Tokens per rank: T = 0 and 1 somewhere, the maximum somewhere.
        let pattern = [33usize, 0, 1, max_tokens];
        let counts: Vec<usize> = (0..num_ranks as usize).map(|q| pattern[q % pattern.len()]).collect();
        let full = full_width(&cfg);
        let mut bufs: Option<Vec<RankBuffers>> = None;
        for routing in [Routing::Random, Routing::SomeDropped] {
            let data: Vec<RankData> = counts.iter().map(|&t| make_rank(&mut rng, &full, t, routing)).collect();
            let bufs = bufs.get_or_insert_with(|| {
                group.ranks().iter().zip(&data).map(|(q, d)| RankBuffers::new(q, &full, d)).collect()
            });
            let case = format!("R={num_ranks} E={e} k={k} H={h} r={r} T={counts:?} {routing:?}");
            let first = round(&mut lows, &cfg, &p, &data, bufs, &w, &case);
            let again = round(&mut lows, &cfg, &p, &data, bufs, &w, &case);
            assert_eq!(first, again, "{case}: outputs differ between two identical runs");
        }
    }
}

/// One rank: every row goes to itself (also the case compute-sanitizer can run).
#[test]
fn low_dim_dispatch_and_combine_on_one_gpu() {
    run_configs(1);
}

#[test]
fn low_dim_dispatch_and_combine_on_two_gpus() {
    run_configs(2);
}

#[test]
fn low_dim_dispatch_and_combine_on_four_gpus() {
    run_configs(4);
}

/// Descend + dispatch + combine + ascend + residual (identity experts) captured into one graph per
/// rank, replayed on new inputs: nothing in the calls allocates or waits for the host.
#[test]
fn low_dim_round_replays_from_cuda_graphs() {
    let _serial = common::serial();
    // Two ranks where there are two GPUs, else one (asked only once a GPU is known to be there: without
    // a driver the count itself fails).
    if !ep_common::have_gpus(1) {
        return;
    }
    let have = CudaContext::device_count().unwrap_or(1).clamp(1, 2) as usize;
    let Some(streams) = streams(have) else { return };
    let mut rng = common::rng("low_dim_round_replays_from_cuda_graphs");
    let num_ranks = streams.len() as u32;
    let ep = EpConfig { num_ranks, num_experts: 16, k: 4, hidden: 360, max_tokens: 64, dtype: 1, capacity: 0 };
    assert_eq!(ep.dtype, sys::moek_dtype_MOEK_DTYPE_BF16);
    let cfg = LowDimConfig { ep, hidden: 2880 };
    let group = PeerGroup::new(ep, &streams).unwrap();
    let mut lows: Vec<LowDimRank<bf16>> = group.ranks().iter().map(|q| LowDimRank::new(q, 2880).unwrap()).collect();
    let p = Projections::new(&mut rng, &cfg);
    let w: Vec<Weights> = streams.iter().map(|s| weights_on(s, &p)).collect();
    let full = full_width(&cfg);
    let fresh = |rng: &mut StdRng| -> Vec<RankData> {
        (0..num_ranks as usize).map(|q| make_rank(rng, &full, [64, 17][q % 2], Routing::Random)).collect()
    };
    let data = fresh(&mut rng);
    let mut bufs: Vec<RankBuffers> =
        group.ranks().iter().zip(&data).map(|(q, d)| RankBuffers::new(q, &full, d)).collect();
    for s in &streams {
        s.synchronize().unwrap();
        // SAFETY: the test's buffers are used on their own streams only; no events inside a capture.
        unsafe { s.context().disable_event_tracking() };
    }
    let mut graphs = Vec::new();
    for i in 0..lows.len() {
        let s = lows[i].ep().stream().clone();
        s.context().bind_to_thread().unwrap();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        dispatch_all(&mut lows[i..i + 1], &data, &mut bufs[i..i + 1], &w[i..i + 1]);
        combine_all(&mut lows[i..i + 1], &data, &mut bufs[i..i + 1], &w[i..i + 1]);
        graphs.push(s.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("a graph"));
    }
    for replay in 0..3 {
        let data = fresh(&mut rng);
        for (low, b) in lows.iter().zip(bufs.iter_mut()) {
            // Same token counts as captured (the graph holds them); new values and routing.
            b.upload(low.ep().stream(), &data[low.ep().rank() as usize]);
            low.ep().stream().synchronize().unwrap();
        }
        for g in &graphs {
            g.launch().unwrap();
        }
        let tokens = tokens_of(&data);
        let projected = reference::descend(&cfg, &tokens, &p.down);
        let want = reference::dispatch(&cfg, &tokens, &projected);
        // Identity experts: the received rows (the projected tokens, rounded to bf16 as sent) are the outputs.
        let outputs: Vec<Vec<f32>> =
            want.iter().map(|x| x.rows.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()).collect();
        let weights: Vec<Option<&[f32]>> = data.iter().map(|d| Some(d.weights.as_slice())).collect();
        let residual: Vec<Option<&[f32]>> = data.iter().map(|d| Some(d.residual.as_slice())).collect();
        let expected = reference::combine(&cfg, &tokens, &want, &outputs, &weights, &p.up, &residual);
        for (low, b) in lows.iter().zip(&bufs) {
            let q = low.ep().rank() as usize;
            low.ep().stream().synchronize().unwrap();
            let got = low.ep().stream().clone_dtoh(&b.out).unwrap();
            check_output(&format!("replay {replay}"), q, &got[..data[q].t * cfg.hidden], &expected[q]);
        }
    }
}
