//! Expert-parallel dispatch and combine on 2 and 4 GPUs (one process, peer access) against the CPU
//! reference: exact received rows and offsets, the combined outputs after a per-expert function, run to
//! run bit identity, skewed loads (every token to one rank), T = 0 on some ranks, dropped ids, odd E
//! and H, repeated calls on one group, and a CUDA graph of dispatch + combine replayed on new inputs.
//! Skipped (with a notice) when fewer GPUs are present; `MOEK_REQUIRE_GPUS=N` makes N required.

mod common;
#[path = "common/ep.rs"]
mod ep_common;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaStream};
use ep_common::{
    combine_all, dispatch_all, make_rank, max_abs_error, round, tokens_of, RankBuffers, RankData, Routing,
};
use moe_kernels::ep::{EpConfig, EpRank, PeerGroup};
use moe_kernels::reference::ep as reference;
use moe_kernels::sys;
use rand::rngs::StdRng;
use std::sync::Arc;

/// One stream on each of the first `n` GPUs, or None (with a notice) when there are fewer.
fn streams(n: usize) -> Option<Vec<Arc<CudaStream>>> {
    if !ep_common::have_gpus(n) {
        return None;
    }
    Some((0..n).map(|i| CudaContext::new(i).unwrap().new_stream().unwrap()).collect())
}

fn run_configs(num_ranks: u32) {
    let Some(streams) = streams(num_ranks as usize) else { return };
    let mut rng = common::rng(&format!("ep_dispatch_combine_{num_ranks}"));
    // (E, k, H): Mixtral-like, odd E and H, DeepSeek-like, one expert per rank.
    let shapes = [(8u32, 2u32, 2880usize), (60, 6, 512), (256, 8, 1024), (num_ranks, 1, 64), (384, 8, 256)];
    // Capacity 0: the contiguous layout; 3 (most experts overflow: drops everywhere) and 64: masked.
    let layouts = [0usize, 3, 64];
    for ((e, k, h), capacity) in shapes.into_iter().flat_map(|s| layouts.map(move |c| (s, c))) {
        if e % num_ranks != 0 {
            continue;
        }
        let max_tokens = 300;
        let cfg = EpConfig {
            num_ranks,
            num_experts: e,
            k,
            hidden: h,
            max_tokens,
            dtype: sys::moek_dtype_MOEK_DTYPE_BF16,
            capacity,
        };
        let group = PeerGroup::new(cfg, &streams).unwrap();
        let ranks: Vec<&EpRank> = group.ranks().iter().collect();
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
                ranks.iter().zip(&data).map(|(&rank, d)| RankBuffers::new(rank, &cfg, d)).collect()
            });
            let case = format!("R={num_ranks} E={e} k={k} H={h} capacity={capacity} T={counts:?} {routing:?}");
            let first = round(&ranks, &cfg, &data, bufs, &case);
            let again = round(&ranks, &cfg, &data, bufs, &case);
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
        capacity: 0,
    };
    let group = PeerGroup::new(cfg, &streams).unwrap();
    let ranks: Vec<&EpRank> = group.ranks().iter().collect();
    let fresh = |rng: &mut StdRng| -> Vec<RankData> {
        (0..num_ranks as usize).map(|r| make_rank(rng, &cfg, [64, 17][r % 2], Routing::Random)).collect()
    };
    let data = fresh(&mut rng);
    let mut bufs: Vec<RankBuffers> = ranks.iter().zip(&data).map(|(&r, d)| RankBuffers::new(r, &cfg, d)).collect();
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
        dispatch_all(&ranks[i..i + 1], &data, &mut bufs[i..i + 1]);
        combine_all(&ranks[i..i + 1], &data, &mut bufs[i..i + 1], false);
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
