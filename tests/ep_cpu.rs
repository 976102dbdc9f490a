//! Expert parallelism without a GPU: the configuration checks (each bad field refused with a named
//! status before anything is enqueued, through the C interface) and the CPU reference's own invariants.

use moe_kernels::capi::{moek_ep_combine, moek_ep_dispatch, moek_ep_layout_query};
use moe_kernels::ep::EpConfig;
use moe_kernels::reference::ep::{combine, dispatch, RankTokens};
use moe_kernels::{sys, Status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ffi::c_void;

fn config() -> EpConfig {
    EpConfig {
        num_ranks: 4,
        num_experts: 256,
        k: 8,
        hidden: 7168,
        max_tokens: 4096,
        dtype: sys::moek_dtype_MOEK_DTYPE_BF16,
        capacity: 0,
    }
}

fn status_of(cfg: EpConfig) -> Option<Status> {
    cfg.layout().err().map(|e| e.status)
}

#[test]
fn bad_configurations_are_refused_with_named_statuses() {
    assert_eq!(status_of(config()), None);
    assert_eq!(status_of(EpConfig { num_ranks: 3, ..config() }), Some(Status::InvalidRanks), "3 does not divide 256");
    assert_eq!(status_of(EpConfig { num_ranks: 0, ..config() }), Some(Status::InvalidRanks));
    assert_eq!(status_of(EpConfig { num_ranks: 128, num_experts: 256, ..config() }), Some(Status::InvalidRanks));
    assert_eq!(status_of(EpConfig { k: 0, ..config() }), Some(Status::InvalidK));
    assert_eq!(status_of(EpConfig { hidden: 7170, ..config() }), Some(Status::InvalidValue));
    assert_eq!(status_of(EpConfig { dtype: 7, ..config() }), Some(Status::InvalidDtype));
    assert_eq!(status_of(EpConfig { num_experts: 0, ..config() }), Some(Status::InvalidNumExperts));
    let message = config_message(EpConfig { num_ranks: 3, ..config() });
    assert!(message.contains("num_ranks = 3") && message.contains("256"), "{message}");
}

fn config_message(cfg: EpConfig) -> String {
    cfg.layout().unwrap_err().to_string()
}

#[test]
fn layout_sizes_hold_every_row_a_rank_can_receive() {
    let cfg = config();
    let l = cfg.layout().unwrap();
    assert_eq!(l.max_received_rows, 4 * 4096 * 8);
    let row = 7168 * 2;
    assert!(l.symmetric_bytes >= l.received_offset + l.max_received_rows * row + 4096 * 8 * row);
    assert_eq!(l.symmetric_bytes % 256, 0);
    assert_eq!(l.received_offset % 256, 0);
    let mut c_layout =
        sys::moek_ep_layout { symmetric_bytes: 0, received_offset: 0, max_received_rows: 0, workspace_bytes: 0 };
    let c = cfg.to_c(0);
    assert_eq!(unsafe { moek_ep_layout_query(&c, &mut c_layout) }, sys::moek_status_MOEK_SUCCESS);
    assert_eq!(c_layout.symmetric_bytes, l.symmetric_bytes);
    assert_eq!(c_layout.workspace_bytes, l.workspace_bytes);
}

/// A dispatch whose group is valid except for what `spoil` changes; the buffers are host memory that
/// the checks never touch (every case here fails before any launch).
fn dispatch_status(spoil: impl FnOnce(&mut sys::moek_ep_dispatch_args)) -> sys::moek_status {
    let cfg = EpConfig { max_tokens: 16, hidden: 64, num_experts: 8, num_ranks: 2, k: 2, ..config() };
    let l = cfg.layout().unwrap();
    let mut peer_a = vec![0u8; l.symmetric_bytes + 256];
    let mut peer_b = vec![0u8; l.symmetric_bytes + 256];
    let mut ws = vec![0u8; l.workspace_bytes + 256];
    let align = |v: &mut Vec<u8>| {
        let p = v.as_mut_ptr();
        unsafe { p.add(p.align_offset(256)) as *mut c_void }
    };
    let peers = [align(&mut peer_a), align(&mut peer_b)];
    let x = vec![0u128; 64];
    let ids = [0i32; 32];
    let mut offsets = vec![0i32; 8];
    let mut a = sys::moek_ep_dispatch_args {
        group: sys::moek_ep_group {
            config: cfg.to_c(1),
            peers: peers.as_ptr(),
            symmetric_bytes: l.symmetric_bytes,
            workspace: align(&mut ws),
            workspace_bytes: l.workspace_bytes,
        },
        num_tokens: 16,
        x: x.as_ptr() as *const c_void,
        topk_ids: ids.as_ptr(),
        topk_weights: std::ptr::null(),
        received_expert_offsets: offsets.as_mut_ptr(),
    };
    spoil(&mut a);
    unsafe { moek_ep_dispatch(&a, std::ptr::null_mut()) }
}

#[test]
fn bad_dispatch_arguments_are_refused_before_anything_is_sent() {
    let s = |st: Status| st as sys::moek_status;
    assert_eq!(dispatch_status(|a| a.group.config.rank = 2), s(Status::InvalidRanks));
    assert_eq!(dispatch_status(|a| a.group.config.rank = -1), s(Status::InvalidRanks));
    assert_eq!(dispatch_status(|a| a.group.symmetric_bytes -= 1), s(Status::BufferTooSmall));
    assert_eq!(dispatch_status(|a| a.group.workspace_bytes -= 1), s(Status::WorkspaceTooSmall));
    assert_eq!(dispatch_status(|a| a.group.peers = std::ptr::null()), s(Status::NullPointer));
    assert_eq!(dispatch_status(|a| a.num_tokens = 17), s(Status::InvalidNumTokens));
    assert_eq!(dispatch_status(|a| a.x = std::ptr::null()), s(Status::NullPointer));
    assert_eq!(dispatch_status(|a| a.received_expert_offsets = std::ptr::null_mut()), s(Status::NullPointer));
    assert_eq!(dispatch_status(|a| a.group.config.num_experts = 9), s(Status::InvalidRanks));
    let mut combine = sys::moek_ep_combine_args {
        group: sys::moek_ep_group {
            config: config().to_c(0),
            peers: std::ptr::null(),
            symmetric_bytes: 0,
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
        },
        num_tokens: 0,
        expert_out: std::ptr::null(),
        residual: std::ptr::null(),
        out: std::ptr::null_mut(),
    };
    assert_eq!(unsafe { moek_ep_combine(&combine, std::ptr::null_mut()) }, s(Status::BufferTooSmall));
    combine.group.config.num_ranks = 3;
    assert_eq!(unsafe { moek_ep_combine(&combine, std::ptr::null_mut()) }, s(Status::InvalidRanks));
}

#[test]
fn reference_round_trip_sums_each_tokens_kept_slots() {
    // Identity experts and weight 1: every token gets its own row times the number of slots kept.
    let mut rng = StdRng::seed_from_u64(7);
    let cfg = EpConfig {
        num_ranks: 4,
        num_experts: 60,
        k: 6,
        hidden: 16,
        max_tokens: 50,
        dtype: sys::moek_dtype_MOEK_DTYPE_F32,
        capacity: 0,
    };
    let counts = [50usize, 0, 1, 23];
    let xs: Vec<Vec<f32>> =
        counts.iter().map(|&t| (0..t * 16).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
    let ids: Vec<Vec<i32>> = counts
        .iter()
        .map(|&t| (0..t * 6).map(|_| if rng.random_range(0..10) == 0 { -1 } else { rng.random_range(0..60) }).collect())
        .collect();
    let ranks: Vec<RankTokens> =
        (0..4).map(|r| RankTokens { x: &xs[r], ids: &ids[r], num_tokens: counts[r] }).collect();
    let received = dispatch(&cfg, &ranks);
    let total: usize = received.iter().map(|r| r.origin.len()).sum();
    let kept: usize = ids.iter().flatten().filter(|&&i| i >= 0).count();
    assert_eq!(total, kept, "every kept pair arrives exactly once");
    for (owner, got) in received.iter().enumerate() {
        assert_eq!(got.expert_offsets.len(), 16);
        for (i, &(q, pair)) in got.origin.iter().enumerate() {
            let j = got.expert_offsets.partition_point(|&o| o as usize <= i) - 1;
            assert_eq!(ids[q][pair], (owner * 15 + j) as i32, "row {i} of rank {owner} is in its expert's block");
        }
    }
    let outputs: Vec<Vec<f32>> = received.iter().map(|r| r.rows.clone()).collect();
    let out = combine(&cfg, &ranks, &received, &outputs, &[None; 4], &[None; 4]);
    for r in 0..4 {
        for t in 0..counts[r] {
            let slots = ids[r][t * 6..(t + 1) * 6].iter().filter(|&&i| i >= 0).count() as f32;
            for c in 0..16 {
                let want = xs[r][t * 16 + c] * slots;
                assert!((out[r][t * 16 + c] - want).abs() < 1e-5, "rank {r} token {t}");
            }
        }
    }
}

#[test]
fn reference_rounds_each_owners_sum_to_the_dtype() {
    // One token, k = 2, E = 4 on 2 ranks. Outputs 1 and 2^-9 (both exact in bf16): on one owner their
    // sum is rounded to bf16 there (1 + 2^-9 -> 1); on two owners each returns exactly and the sum keeps
    // the 2^-9 (fp32).
    let cfg = EpConfig { num_ranks: 2, num_experts: 4, k: 2, hidden: 8, max_tokens: 1, ..config() };
    let x = vec![0.5f32; 8];
    let small = 2f32.powi(-9);
    for (ids, want) in [([0i32, 1], 1.0f32), ([0, 2], 1.0 + small)] {
        let ranks = [RankTokens { x: &x, ids: &ids, num_tokens: 1 }, RankTokens { x: &[], ids: &[], num_tokens: 0 }];
        let received = dispatch(&cfg, &ranks);
        // Expert output 1 for slot 0's row, 2^-9 for slot 1's, wherever they landed.
        let outputs: Vec<Vec<f32>> = received
            .iter()
            .map(|r| r.origin.iter().flat_map(|&(_, pair)| [if pair == 0 { 1.0 } else { small }; 8]).collect())
            .collect();
        let out = combine(&cfg, &ranks, &received, &outputs, &[None; 2], &[None; 2]);
        assert_eq!(out[0], vec![want; 8], "ids {ids:?}");
    }
}

#[test]
fn masked_layout_sizes_and_reference_keep_each_experts_first_rows() {
    let cfg = EpConfig { capacity: 5, ..config() };
    assert_eq!(cfg.layout().unwrap().max_received_rows, 64 * 5, "E/R x capacity rows");
    let huge = EpConfig { capacity: 1 << 30, ..config() };
    assert_eq!(status_of(huge), Some(Status::InvalidValue), "row indices must stay 32-bit");
    // Two ranks, E = 4 (two per rank), k = 1, capacity 2: expert 0 gets three rows (rank 0's tokens 0
    // and 2, rank 1's token 0) and keeps the first two in (source, pair) order.
    let cfg = EpConfig { num_ranks: 2, num_experts: 4, k: 1, hidden: 8, max_tokens: 3, capacity: 2, ..config() };
    let (x0, x1): (Vec<f32>, Vec<f32>) = ((0..24).map(|v| v as f32).collect(), (0..24).map(|v| -(v as f32)).collect());
    let (ids0, ids1) = ([0i32, 3, 0], [0i32, 1, 2]);
    let ranks = [RankTokens { x: &x0, ids: &ids0, num_tokens: 3 }, RankTokens { x: &x1, ids: &ids1, num_tokens: 3 }];
    let received = dispatch(&cfg, &ranks);
    assert_eq!(
        received[0].origin,
        vec![(0, 0), (0, 2), (1, 1)],
        "expert 0 keeps 2 of 3; expert 1 gets rank 1's pair 1"
    );
    assert_eq!(received[0].expert_offsets, vec![0, 2, 3]);
    // The dropped pair (rank 1's token 0) adds nothing: identity experts, weight 1.
    let outputs: Vec<Vec<f32>> = received.iter().map(|r| r.rows.clone()).collect();
    let out = combine(&cfg, &ranks, &received, &outputs, &[None; 2], &[None; 2]);
    assert_eq!(&out[1][..8], &[0.0; 8], "rank 1's token 0 was dropped");
    assert_eq!(&out[1][8..16], &x1[8..16], "rank 1's token 1 kept");
}
