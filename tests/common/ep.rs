//! The expert-parallel GPU tests' inputs, device buffers and checked round (dispatch, a per-expert
//! function, combine against the CPU reference), shared by the one-process (`ep_gpu`) and
//! one-process-per-GPU (`ep_ipc_gpu`) tests.
#![allow(dead_code)]

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::ep::{EpConfig, EpRank, ExpertOutput};
use moe_kernels::reference::ep::{self as reference, RankTokens};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::Rng;
use std::sync::Arc;

/// Whether at least `n` GPUs are visible (a notice is printed when not); `MOEK_REQUIRE_GPUS=N` makes
/// fewer than N a failure.
pub fn have_gpus(n: usize) -> bool {
    if super::common::gpu().is_none() {
        return false;
    }
    let have = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
    let required: usize = std::env::var("MOEK_REQUIRE_GPUS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    if have < n {
        assert!(required < n, "MOEK_REQUIRE_GPUS={required} but only {have} GPUs");
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED (needs {n} GPUs, found {have})");
        return false;
    }
    true
}

#[derive(Clone, Copy, Debug)]
pub enum Routing {
    /// k distinct experts per token, uniformly.
    Random,
    /// Every token's experts on the last rank.
    AllToOneRank,
    /// Random, with about one pair in eight dropped (id -1).
    SomeDropped,
}

/// One rank's inputs, as values exactly representable in bf16.
pub struct RankData {
    pub t: usize,
    pub x: Vec<f32>,
    pub ids: Vec<i32>,
    pub weights: Vec<f32>,
    pub residual: Vec<f32>,
}

pub fn bf16_round(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

pub fn make_rank(rng: &mut StdRng, cfg: &EpConfig, t: usize, routing: Routing) -> RankData {
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
pub fn expert_function(received: &reference::Received, hidden: usize) -> Vec<f32> {
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

pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&f| bf16::from_f32(f)).collect()
}

/// Device copies of one rank's inputs and outputs.
pub struct RankBuffers {
    pub x: CudaSlice<bf16>,
    pub ids: CudaSlice<i32>,
    pub weights: CudaSlice<f32>,
    pub residual: CudaSlice<bf16>,
    pub offsets: CudaSlice<i32>,
    pub out: CudaSlice<bf16>,
}

impl RankBuffers {
    pub fn new(rank: &EpRank, cfg: &EpConfig, d: &RankData) -> Self {
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
    pub fn upload(&mut self, s: &Arc<CudaStream>, d: &RankData) {
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

pub fn tokens_of(data: &[RankData]) -> Vec<RankTokens<'_>> {
    data.iter().map(|d| RankTokens { x: &d.x, ids: &d.ids, num_tokens: d.t }).collect()
}

/// Enqueues the dispatch of every rank in `ranks` (`bufs[i]` is `ranks[i]`'s; `data` holds every rank
/// of the group, indexed by rank).
pub fn dispatch_all(ranks: &[&EpRank], data: &[RankData], bufs: &mut [RankBuffers]) {
    for (rank, b) in ranks.iter().zip(bufs.iter_mut()) {
        let d = &data[rank.rank() as usize];
        let w = b.weights.slice(..);
        rank.dispatch(d.t, &b.x.slice(..), &b.ids.slice(..), Some(&w), &mut b.offsets.slice_mut(..)).unwrap();
    }
}

/// Enqueues the combine of every rank in `ranks` (indexed as in [`dispatch_all`]).
pub fn combine_all(ranks: &[&EpRank], data: &[RankData], bufs: &mut [RankBuffers], with_residual: bool) {
    for (rank, b) in ranks.iter().zip(bufs.iter_mut()) {
        let d = &data[rank.rank() as usize];
        let r = b.residual.slice(..);
        let residual = if with_residual { Some(&r) } else { None };
        rank.combine(d.t, ExpertOutput::Received, residual, &mut b.out.slice_mut(..)).unwrap();
    }
}

/// Where one rank's received rows sit on the GPU: packed by expert (contiguous layout) or at
/// `j * capacity` (masked layout).
pub struct ReceivedLayout {
    offsets: Vec<i32>,
    capacity: usize,
    /// Rows to read back: the used ones, or the whole masked area.
    pub gpu_rows: usize,
}

impl ReceivedLayout {
    pub fn new(cfg: &EpConfig, want: &reference::Received) -> Self {
        let offsets = want.expert_offsets.clone();
        let local = cfg.local_experts();
        let gpu_rows = if cfg.capacity > 0 { local * cfg.capacity } else { offsets[local] as usize };
        ReceivedLayout { offsets, capacity: cfg.capacity, gpu_rows }
    }

    /// Rows local expert j received.
    pub fn count(&self, j: usize) -> usize {
        (self.offsets[j + 1] - self.offsets[j]) as usize
    }

    /// The GPU row of local expert j's i-th row.
    pub fn gpu_row(&self, j: usize, i: usize) -> usize {
        if self.capacity > 0 {
            j * self.capacity + i
        } else {
            self.offsets[j] as usize + i
        }
    }

    /// What dispatch writes to received_offsets: the offsets, or (masked) each expert's count and
    /// their sum.
    pub fn written_offsets(&self) -> Vec<i32> {
        if self.capacity == 0 {
            return self.offsets.clone();
        }
        let local = self.offsets.len() - 1;
        let mut v: Vec<i32> = (0..local).map(|j| self.count(j) as i32).collect();
        v.push(self.offsets[local]);
        v
    }
}

pub fn max_abs_error(got: &[bf16], want: &[f32]) -> f32 {
    got.iter().zip(want).map(|(g, w)| (g.to_f32() - w).abs() / (1.0 + w.abs())).fold(0.0, f32::max)
}

/// One dispatch + expert function + combine round on the ranks in `ranks` (all of the group in one
/// process, or this process's own), checked against the reference of the whole group (`data` holds
/// every rank's inputs, indexed by rank; `bufs[i]` is `ranks[i]`'s); returns their output bits (for
/// the run-to-run check).
pub fn round(
    ranks: &[&EpRank],
    cfg: &EpConfig,
    data: &[RankData],
    bufs: &mut [RankBuffers],
    case: &str,
) -> Vec<Vec<u16>> {
    let (h, local) = (cfg.hidden, cfg.local_experts());
    for (rank, b) in ranks.iter().zip(bufs.iter_mut()) {
        b.upload(rank.stream(), &data[rank.rank() as usize]);
        // Poison the received rows, so a row the dispatch misses cannot pass by accident.
        let poison = vec![bf16::from_f32(-999.0); rank.layout().max_received_rows * h];
        rank.write_received_rows(&poison).unwrap();
    }
    dispatch_all(ranks, data, bufs);
    let want = reference::dispatch(cfg, &tokens_of(data));
    let outputs: Vec<Vec<f32>> = want.iter().map(|w| expert_function(w, h)).collect();
    for (rank, b) in ranks.iter().zip(bufs.iter()) {
        let w = &want[rank.rank() as usize];
        let offsets = rank.stream().clone_dtoh(&b.offsets).unwrap();
        let layout = ReceivedLayout::new(cfg, w);
        assert_eq!(offsets, layout.written_offsets(), "{case}: rank {} received offsets", rank.rank());
        let got: Vec<bf16> = rank.received_rows_to_host(layout.gpu_rows).unwrap();
        for j in 0..local {
            for i in 0..layout.count(j) {
                let (g, x) = (layout.gpu_row(j, i), w.expert_offsets[j] as usize + i);
                let same =
                    got[g * h..(g + 1) * h].iter().zip(&w.rows[x * h..(x + 1) * h]).all(|(a, b)| a.to_f32() == *b);
                assert!(same, "{case}: rank {} received row {i} of local expert {j} differs", rank.rank());
            }
        }
        // The experts' outputs where the GPU keeps the rows; NaN in the masked layout's padding, which
        // combine must never read.
        let mut placed = vec![f32::NAN; layout.gpu_rows * h];
        for j in 0..local {
            for i in 0..layout.count(j) {
                let (g, x) = (layout.gpu_row(j, i), w.expert_offsets[j] as usize + i);
                placed[g * h..(g + 1) * h].copy_from_slice(&outputs[rank.rank() as usize][x * h..(x + 1) * h]);
            }
        }
        rank.write_received_rows(&to_bf16(&placed)).unwrap();
    }
    combine_all(ranks, data, bufs, true);
    let weights: Vec<Option<&[f32]>> = data.iter().map(|d| Some(d.weights.as_slice())).collect();
    let residual: Vec<Option<&[f32]>> = data.iter().map(|d| Some(d.residual.as_slice())).collect();
    let expected = reference::combine(cfg, &tokens_of(data), &want, &outputs, &weights, &residual);
    let mut bits = Vec::new();
    for (rank, b) in ranks.iter().zip(bufs.iter()) {
        let (d, e) = (&data[rank.rank() as usize], &expected[rank.rank() as usize]);
        let got = rank.stream().clone_dtoh(&b.out).unwrap();
        let got = &got[..d.t * h];
        let err = max_abs_error(got, e);
        assert!(err < 1e-2, "{case}: rank {} combine error {err}", rank.rank());
        bits.push(got.iter().map(|v| v.to_bits()).collect());
    }
    bits
}
