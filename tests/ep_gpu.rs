//! Expert-parallel dispatch and combine on 2 and 4 GPUs (one process, peer access) against the CPU
//! reference: exact received rows and offsets, the combined outputs after a per-expert function, run to
//! run bit identity, skewed loads (every token to one rank), T = 0 on some ranks, dropped ids, odd E
//! and H, repeated calls on one group, and a CUDA graph of dispatch + combine replayed on new inputs.
//! Skipped (with a notice) when fewer GPUs are present; `MOEK_REQUIRE_GPUS=N` makes N required.

mod common;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::ep::{EpConfig, EpRank, ExpertOutput, PeerGroup};
use moe_kernels::reference::ep::{self as reference, RankTokens};
use moe_kernels::sys;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::Rng;
use std::sync::Arc;

/// One stream on each of the first `n` GPUs, or None (with a notice) when there are fewer.
fn streams(n: usize) -> Option<Vec<Arc<CudaStream>>> {
    common::gpu()?;
    let have = CudaContext::device_count().unwrap_or(0) as usize;
    let required: usize = std::env::var("MOEK_REQUIRE_GPUS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    if have < n {
        assert!(required < n, "MOEK_REQUIRE_GPUS={required} but only {have} GPUs");
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED (needs {n} GPUs, found {have})");
        return None;
    }
    Some((0..n).map(|i| CudaContext::new(i).unwrap().new_stream().unwrap()).collect())
}

#[derive(Clone, Copy, Debug)]
enum Routing {
    /// k distinct experts per token, uniformly.
    Random,
    /// Every token's experts on the last rank.
    AllToOneRank,
    /// Random, with about one pair in eight dropped (id -1).
    SomeDropped,
}

/// One rank's inputs, as values exactly representable in bf16.
struct RankData {
    t: usize,
    x: Vec<f32>,
    ids: Vec<i32>,
    weights: Vec<f32>,
    residual: Vec<f32>,
}

fn bf16_round(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

fn make_rank(rng: &mut StdRng, cfg: &EpConfig, t: usize, routing: Routing) -> RankData {
    let (e, k, h) = (cfg.num_experts as usize, cfg.k as usize, cfg.hidden);
    let local = cfg.local_experts();
    let last = cfg.num_ranks as usize - 1;
    let mut ids = Vec::with_capacity(t * k);
    for _ in 0..t {
        match routing {
            Routing::AllToOneRank => ids.extend(sample(rng, local, k).into_iter().map(|j| (last * local + j) as i32)),
            _ => ids.extend(sample(rng, e, k).into_iter().map(|j| j as i32)),
        }
    }
    if let Routing::SomeDropped = routing {
        for id in ids.iter_mut() {
            if rng.random_range(0..8) == 0 {
                *id = -1;
            }
        }
    }
    let mut values = |n: usize| (0..n).map(|_| bf16_round(rng.random_range(-2.0f32..2.0))).collect::<Vec<f32>>();
    let x = values(t * h);
    let residual = values(t * h);
    let weights = (0..t * k).map(|_| rng.random_range(0.0f32..1.0)).collect();
    RankData { t, x, ids, weights, residual }
}

/// The per-expert function the tests play on each owner: a scale and shift by the local expert index,
/// rounded to bf16 (what an expert writing bf16 outputs would store).
fn expert_function(received: &reference::Received, hidden: usize) -> Vec<f32> {
    let mut out = received.rows.clone();
    for j in 0..received.expert_offsets.len() - 1 {
        let (a, b) = (received.expert_offsets[j] as usize, received.expert_offsets[j + 1] as usize);
        let scale = 0.5 + 0.25 * (j % 5) as f32;
        for v in &mut out[a * hidden..b * hidden] {
            *v = bf16_round(*v * scale - 0.125 * j as f32);
        }
    }
    out
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&f| bf16::from_f32(f)).collect()
}

/// Device copies of one rank's inputs and outputs.
struct RankBuffers {
    x: CudaSlice<bf16>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    residual: CudaSlice<bf16>,
    offsets: CudaSlice<i32>,
    out: CudaSlice<bf16>,
}

impl RankBuffers {
    fn new(rank: &EpRank, cfg: &EpConfig, d: &RankData) -> Self {
        let s = rank.stream();
        let (h, k) = (cfg.hidden, cfg.k as usize);
        let n = cfg.max_tokens;
        let mut b = RankBuffers {
            x: s.alloc_zeros(n * h).unwrap(),
            ids: s.alloc_zeros(n * k).unwrap(),
            weights: s.alloc_zeros(n * k).unwrap(),
            residual: s.alloc_zeros(n * h).unwrap(),
            offsets: s.alloc_zeros(cfg.local_experts() + 1).unwrap(),
            out: s.alloc_zeros(n * h).unwrap(),
        };
        b.upload(s, d);
        b
    }

    /// New inputs into the same buffers, outputs poisoned.
    fn upload(&mut self, s: &Arc<CudaStream>, d: &RankData) {
        if d.t > 0 {
            s.memcpy_htod(&to_bf16(&d.x), &mut self.x.slice_mut(..d.x.len())).unwrap();
            s.memcpy_htod(&d.ids, &mut self.ids.slice_mut(..d.ids.len())).unwrap();
            s.memcpy_htod(&d.weights, &mut self.weights.slice_mut(..d.weights.len())).unwrap();
            s.memcpy_htod(&to_bf16(&d.residual), &mut self.residual.slice_mut(..d.residual.len())).unwrap();
        }
        let poison_offsets = vec![-7i32; self.offsets.len()];
        s.memcpy_htod(&poison_offsets, &mut self.offsets).unwrap();
        let poison = vec![bf16::from_f32(12345.0); self.out.len()];
        s.memcpy_htod(&poison, &mut self.out).unwrap();
    }
}

fn tokens_of(data: &[RankData]) -> Vec<RankTokens<'_>> {
    data.iter().map(|d| RankTokens { x: &d.x, ids: &d.ids, num_tokens: d.t }).collect()
}

fn dispatch_all(ranks: &[EpRank], data: &[RankData], bufs: &mut [RankBuffers]) {
    for ((rank, d), b) in ranks.iter().zip(data).zip(bufs.iter_mut()) {
        rank.dispatch(d.t, &b.x.slice(..), &b.ids.slice(..), &mut b.offsets.slice_mut(..)).unwrap();
    }
}

fn combine_all(ranks: &[EpRank], data: &[RankData], bufs: &mut [RankBuffers], with_residual: bool) {
    for ((rank, d), b) in ranks.iter().zip(data).zip(bufs.iter_mut()) {
        let w = b.weights.slice(..);
        let r = b.residual.slice(..);
        let residual = if with_residual { Some(&r) } else { None };
        rank.combine(d.t, ExpertOutput::Received, Some(&w), residual, &mut b.out.slice_mut(..)).unwrap();
    }
}

fn max_abs_error(got: &[bf16], want: &[f32]) -> f32 {
    got.iter().zip(want).map(|(g, w)| (g.to_f32() - w).abs() / (1.0 + w.abs())).fold(0.0, f32::max)
}

/// One dispatch + expert function + combine round on every rank, checked against the reference;
/// returns every rank's output bits (for the run-to-run check).
fn round(ranks: &[EpRank], cfg: &EpConfig, data: &[RankData], bufs: &mut [RankBuffers], case: &str) -> Vec<Vec<u16>> {
    let (h, local) = (cfg.hidden, cfg.local_experts());
    for ((rank, d), b) in ranks.iter().zip(data).zip(bufs.iter_mut()) {
        b.upload(rank.stream(), d);
        // Poison the received rows, so a row the dispatch misses cannot pass by accident.
        let poison = vec![bf16::from_f32(-999.0); rank.layout().max_received_rows * h];
        rank.write_received_rows(&poison).unwrap();
    }
    dispatch_all(ranks, data, bufs);
    let want = reference::dispatch(cfg, &tokens_of(data));
    let mut outputs = Vec::new();
    for ((rank, b), w) in ranks.iter().zip(bufs.iter()).zip(&want) {
        let offsets = rank.stream().clone_dtoh(&b.offsets).unwrap();
        assert_eq!(offsets, w.expert_offsets, "{case}: rank {} received offsets", rank.rank());
        let rows = offsets[local] as usize;
        let got: Vec<bf16> = rank.received_rows_to_host(rows).unwrap();
        let bad = got.iter().zip(&w.rows).position(|(g, x)| g.to_f32() != *x);
        assert!(bad.is_none(), "{case}: rank {} received row {} differs", rank.rank(), bad.unwrap_or(0) / h);
        let f = expert_function(w, h);
        outputs.push(f.clone());
        rank.write_received_rows(&to_bf16(&f)).unwrap();
    }
    combine_all(ranks, data, bufs, true);
    let weights: Vec<Option<&[f32]>> = data.iter().map(|d| Some(d.weights.as_slice())).collect();
    let residual: Vec<Option<&[f32]>> = data.iter().map(|d| Some(d.residual.as_slice())).collect();
    let expected = reference::combine(cfg, &tokens_of(data), &want, &outputs, &weights, &residual);
    let mut bits = Vec::new();
    for ((rank, b), (d, e)) in ranks.iter().zip(bufs.iter()).zip(data.iter().zip(&expected)) {
        let got = rank.stream().clone_dtoh(&b.out).unwrap();
        let got = &got[..d.t * h];
        let err = max_abs_error(got, e);
        assert!(err < 1e-2, "{case}: rank {} combine error {err}", rank.rank());
        bits.push(got.iter().map(|v| v.to_bits()).collect());
    }
    bits
}

fn run_configs(num_ranks: u32) {
    let Some(streams) = streams(num_ranks as usize) else { return };
    let mut rng = common::rng(&format!("ep_dispatch_combine_{num_ranks}"));
    // (E, k, H): Mixtral-like, odd E and H, DeepSeek-like, one expert per rank.
    let shapes = [(8u32, 2u32, 2880usize), (60, 6, 512), (256, 8, 1024), (num_ranks, 1, 64), (384, 8, 256)];
    for (e, k, h) in shapes {
        if e % num_ranks != 0 {
            continue;
        }
        let max_tokens = 300;
        let cfg =
            EpConfig { num_ranks, num_experts: e, k, hidden: h, max_tokens, dtype: sys::moek_dtype_MOEK_DTYPE_BF16 };
        let group = PeerGroup::new(cfg, &streams).unwrap();
        let ranks = group.ranks();
        // Tokens per rank: T = 0 and 1 somewhere, the maximum somewhere.
        let pattern = [33usize, 0, 1, max_tokens];
        let counts: Vec<usize> = (0..num_ranks as usize).map(|r| pattern[r % pattern.len()]).collect();
        let mut bufs: Option<Vec<RankBuffers>> = None;
        for routing in [Routing::Random, Routing::AllToOneRank, Routing::SomeDropped] {
            if matches!(routing, Routing::AllToOneRank) && (k as usize) > cfg.local_experts() {
                continue;
            }
            let data: Vec<RankData> = counts.iter().map(|&t| make_rank(&mut rng, &cfg, t, routing)).collect();
            let bufs = bufs.get_or_insert_with(|| {
                ranks.iter().zip(&data).map(|(rank, d)| RankBuffers::new(rank, &cfg, d)).collect()
            });
            let case = format!("R={num_ranks} E={e} k={k} H={h} T={counts:?} {routing:?}");
            let first = round(ranks, &cfg, &data, bufs, &case);
            let again = round(ranks, &cfg, &data, bufs, &case);
            assert_eq!(first, again, "{case}: outputs differ between two identical runs");
        }
    }
}

/// One rank: every row goes to itself (the case compute-sanitizer can run: with several GPUs its
/// serialised kernels would wait on the peers' flags forever).
#[test]
fn dispatch_and_combine_on_one_gpu() {
    run_configs(1);
}

#[test]
fn dispatch_and_combine_on_two_gpus() {
    run_configs(2);
}

#[test]
fn dispatch_and_combine_on_four_gpus() {
    run_configs(4);
}

/// Dispatch + combine (identity experts: the received rows are their own outputs) captured into one
/// graph per rank, replayed on new inputs.
#[test]
fn dispatch_and_combine_replay_from_cuda_graphs() {
    let Some(streams) = streams(2) else { return };
    let mut rng = common::rng("dispatch_and_combine_replay_from_cuda_graphs");
    let num_ranks = streams.len() as u32;
    let cfg = EpConfig {
        num_ranks,
        num_experts: 16,
        k: 4,
        hidden: 1024,
        max_tokens: 64,
        dtype: sys::moek_dtype_MOEK_DTYPE_BF16,
    };
    let group = PeerGroup::new(cfg, &streams).unwrap();
    let ranks = group.ranks();
    let fresh = |rng: &mut StdRng| -> Vec<RankData> {
        (0..num_ranks as usize).map(|r| make_rank(rng, &cfg, [64, 17][r % 2], Routing::Random)).collect()
    };
    let data = fresh(&mut rng);
    let mut bufs: Vec<RankBuffers> = ranks.iter().zip(&data).map(|(r, d)| RankBuffers::new(r, &cfg, d)).collect();
    for s in &streams {
        s.synchronize().unwrap();
        // SAFETY: the test's buffers are used on their own streams only; no events inside a capture.
        unsafe { s.context().disable_event_tracking() };
    }
    let mut graphs = Vec::new();
    for (i, rank) in ranks.iter().enumerate() {
        let s = rank.stream();
        s.context().bind_to_thread().unwrap();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        dispatch_all(&ranks[i..i + 1], &data[i..i + 1], &mut bufs[i..i + 1]);
        combine_all(&ranks[i..i + 1], &data[i..i + 1], &mut bufs[i..i + 1], false);
        graphs.push(s.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("a graph"));
    }
    for replay in 0..3 {
        let data = fresh(&mut rng);
        for ((rank, d), b) in ranks.iter().zip(&data).zip(bufs.iter_mut()) {
            // Same token counts as captured (the graph holds them); new values and routing.
            b.upload(rank.stream(), d);
            rank.stream().synchronize().unwrap();
        }
        for g in &graphs {
            g.launch().unwrap();
        }
        let want = reference::dispatch(&cfg, &tokens_of(&data));
        let outputs: Vec<Vec<f32>> = want.iter().map(|w| w.rows.clone()).collect();
        let weights: Vec<Option<&[f32]>> = data.iter().map(|d| Some(d.weights.as_slice())).collect();
        let expected = reference::combine(&cfg, &tokens_of(&data), &want, &outputs, &weights, &[None, None]);
        for ((rank, b), (d, e)) in ranks.iter().zip(&bufs).zip(data.iter().zip(&expected)) {
            rank.stream().synchronize().unwrap();
            let got = rank.stream().clone_dtoh(&b.out).unwrap();
            let err = max_abs_error(&got[..d.t * cfg.hidden], e);
            assert!(err < 1e-2, "replay {replay}: rank {} error {err}", rank.rank());
        }
    }
}
