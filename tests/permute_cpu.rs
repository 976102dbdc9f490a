//! CPU-side permutation tests (run everywhere): the plan's defining properties on random ids, the
//! permute-then-combine identity, and argument checks of the Rust API and the C interface.

use moe_kernels::capi;
use moe_kernels::permute::PlanConfig;
use moe_kernels::reference::permute as reference;
use moe_kernels::{sys, Status};
use proptest::prelude::*;

fn arb_case() -> impl Strategy<Value = (PlanConfig, usize, Vec<i32>)> {
    (1u32..=70, 1u32..=9, 0u32..6, prop_oneof![Just(1u32), Just(4), Just(16)], 0usize..40, any::<bool>())
        .prop_flat_map(|(e, k, capacity, row_align, t, ranks)| {
            let num_ranks = if ranks { [4, 2, 1].into_iter().find(|r| e % r == 0).unwrap() } else { 0 };
            let cfg = PlanConfig { num_experts: e, k, capacity, row_align, num_ranks };
            // Mostly valid ids, some dropped (-1), a few out of range.
            let id = prop_oneof![8 => 0..e as i32, 1 => Just(-1), 1 => prop_oneof![Just(-7), Just(e as i32), Just(i32::MAX)]];
            (Just(cfg), Just(t), proptest::collection::vec(id, t * k as usize))
        })
}

proptest! {
    #[test]
    fn plan_is_a_stable_bijection_between_kept_pairs_and_rows((cfg, t, ids) in arb_case()) {
        let plan = reference::plan(&cfg, t, &ids);
        let (e, k) = (cfg.num_experts as usize, cfg.k as usize);
        // Bijection: every kept pair's row points back at it; every non-padding row at a kept pair.
        let mut kept = 0;
        for (p, &row) in plan.pair_row.iter().enumerate() {
            if row >= 0 {
                kept += 1;
                prop_assert_eq!(plan.row_source[row as usize], p as i32);
                prop_assert_eq!(ids[p], {
                    let x = plan.expert_offsets.partition_point(|&o| o <= row) - 1;
                    x as i32
                });
            }
        }
        let rows: Vec<i32> = plan.row_source.iter().copied().filter(|&s| s >= 0).collect();
        prop_assert_eq!(rows.len(), kept);
        for &s in &rows {
            prop_assert_eq!(plan.row_source[plan.pair_row[s as usize] as usize], s);
        }
        // Counts sum to the kept pairs; blocks aligned; pairs in increasing order inside an expert.
        prop_assert_eq!(plan.expert_counts.iter().sum::<i32>() as usize, kept);
        for x in 0..e {
            prop_assert_eq!(plan.expert_offsets[x] % cfg.row_align as i32, 0);
            let block = &plan.row_source[plan.expert_offsets[x] as usize..plan.expert_offsets[x + 1] as usize];
            let members: Vec<i32> = block.iter().copied().filter(|&s| s >= 0).collect();
            prop_assert_eq!(members.len() as i32, plan.expert_counts[x]);
            prop_assert!(members.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(block[..members.len()] == members[..], "padding after the pairs");
            if cfg.capacity > 0 {
                prop_assert!(plan.expert_counts[x] <= cfg.capacity as i32);
            }
        }
        // Errors: exactly the ids out of range.
        let bad = ids.iter().filter(|&&x| x != -1 && (x < 0 || x as usize >= e)).count();
        prop_assert_eq!(plan.errors as usize, bad);
        prop_assert!(plan.row_source.len() <= cfg.max_rows(t).unwrap());
        // Ranks: contiguous groups of experts.
        if cfg.num_ranks > 1 {
            let per = e / cfg.num_ranks as usize;
            for r in 0..cfg.num_ranks as usize {
                prop_assert_eq!(plan.rank_offsets[r], plan.expert_offsets[r * per]);
                prop_assert_eq!(plan.rank_counts[r], plan.expert_counts[r * per..(r + 1) * per].iter().sum::<i32>());
            }
        }
        let _ = k;
    }

    #[test]
    fn permute_then_combine_with_weights_one_over_k_is_the_identity(
        e in 1u32..20, k in 1u32..6, t in 1usize..20, hidden in 1usize..4, seed in any::<u64>(),
    ) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let hidden = hidden * 8;
        let cfg = PlanConfig { row_align: 4, ..PlanConfig::new(e, k) };
        let ids: Vec<i32> = (0..t * k as usize).map(|_| rng.random_range(0..e as i32)).collect();
        let x: Vec<f32> = (0..t * hidden).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let plan = reference::plan(&cfg, t, &ids);
        let rows = reference::permute(&plan, &x, hidden, k as usize, None);
        let w = vec![1.0 / k as f32; t * k as usize];
        let back = reference::combine(&plan.pair_row, &rows, hidden, k as usize, Some(&w), None);
        for (a, b) in back.iter().zip(&x) {
            prop_assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}

#[test]
fn capacity_keeps_the_lowest_pairs_and_padding_aligns_blocks() {
    let cfg = PlanConfig { capacity: 2, row_align: 4, ..PlanConfig::new(3, 2) };
    // Pairs: (0,0)->1 (0,1)->1 (1,0)->1 (1,1)->0 (2,0)->-1 (2,1)->2
    let plan = reference::plan(&cfg, 3, &[1, 1, 1, 0, -1, 2]);
    assert_eq!(plan.expert_counts, vec![1, 2, 1]);
    assert_eq!(plan.expert_offsets, vec![0, 4, 8, 12]);
    assert_eq!(plan.pair_row, vec![4, 5, -1, 0, -1, 8]);
    assert_eq!(&plan.row_source[..], &[3, -1, -1, -1, 0, 1, -1, -1, 5, -1, -1, -1]);
    assert_eq!(plan.errors, 0);
}

#[test]
fn bad_plans_name_their_field() {
    let cases = [
        (PlanConfig::new(0, 2), Status::InvalidNumExperts),
        (PlanConfig::new(8193, 2), Status::InvalidNumExperts),
        (PlanConfig::new(8, 0), Status::InvalidK),
        (PlanConfig::new(8, 65), Status::InvalidK),
        (PlanConfig { row_align: 0, ..PlanConfig::new(8, 2) }, Status::InvalidValue),
        (PlanConfig { num_ranks: 3, ..PlanConfig::new(8, 2) }, Status::InvalidValue),
    ];
    for (cfg, status) in cases {
        let err = cfg.validate(16).expect_err("accepted a bad plan");
        assert_eq!(err.status, status, "{cfg:?}: {err}");
    }
    assert_eq!(PlanConfig::new(256, 8).max_rows(4096).unwrap(), 4096 * 8);
    assert_eq!(PlanConfig { row_align: 128, ..PlanConfig::new(256, 8) }.max_rows(10).unwrap(), 80 + 256 * 127);
    assert_eq!(PlanConfig { capacity: 3, ..PlanConfig::new(4, 8) }.max_rows(100).unwrap(), 12);
    let err = PlanConfig::new(1, 64).validate(i32::MAX as usize).expect_err("rows past 2^31 accepted");
    assert_eq!(err.status, Status::InvalidNumTokens);
}

#[test]
fn c_interface_checks_permutation_arguments() {
    let cfg = PlanConfig::new(16, 4);
    let mut a = cfg.to_args(32);
    let stream = std::ptr::null_mut();
    assert_eq!(unsafe { capi::moek_plan(&a, stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    let (mut rows, mut bytes) = (0i64, 0usize);
    assert_eq!(unsafe { capi::moek_plan_max_rows(&a, &mut rows) }, sys::moek_status_MOEK_SUCCESS);
    assert_eq!(rows, 128);
    assert_eq!(unsafe { capi::moek_plan_workspace_size(&a, &mut bytes) }, sys::moek_status_MOEK_SUCCESS);
    assert_eq!(bytes, (16 + 1) * 4); // one chunk: its histogram and its error counter
    a.topk_ids = 0x1000 as *const i32;
    a.expert_counts = 0x2000 as *mut i32;
    a.expert_offsets = 0x3000 as *mut i32;
    a.row_source = 0x4000 as *mut i32;
    a.pair_row = 0x5001 as *mut i32;
    assert_eq!(unsafe { capi::moek_plan(&a, stream) }, sys::moek_status_MOEK_ERROR_MISALIGNED);
    a.pair_row = 0x5000 as *mut i32;
    a.error_count = 0x6000 as *mut i32;
    a.workspace = 0x7000 as *mut _;
    a.workspace_bytes = bytes - 4;
    assert_eq!(unsafe { capi::moek_plan(&a, stream) }, sys::moek_status_MOEK_ERROR_WORKSPACE_TOO_SMALL);

    let mut p = sys::moek_permute_args {
        dtype: sys::moek_dtype_MOEK_DTYPE_BF16,
        num_tokens: 32,
        k: 4,
        num_experts: 16,
        hidden: 12,
        max_rows: 128,
        x: 0x1000 as *const _,
        row_source: 0x2000 as *const i32,
        pair_row: std::ptr::null(),
        expert_offsets: 0x3000 as *const i32,
        pair_scale: std::ptr::null(),
        zero_padding: 0,
        out: 0x4000 as *mut _,
    };
    assert_eq!(unsafe { capi::moek_permute(&p, stream) }, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    p.hidden = 16;
    p.out = 0x4008 as *mut _;
    assert_eq!(unsafe { capi::moek_permute(&p, stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    let message = unsafe { std::ffi::CStr::from_ptr(capi::moek_last_error_message()) }.to_string_lossy();
    assert!(message.contains("pair_row"), "{message}");
    p.pair_row = 0x5000 as *const i32;
    assert_eq!(unsafe { capi::moek_permute(&p, stream) }, sys::moek_status_MOEK_ERROR_MISALIGNED);
    p.dtype = 9;
    assert_eq!(unsafe { capi::moek_permute(&p, stream) }, sys::moek_status_MOEK_ERROR_INVALID_DTYPE);

    let c = sys::moek_combine_args {
        dtype: sys::moek_dtype_MOEK_DTYPE_F32,
        num_tokens: 32,
        k: 4,
        hidden: 64,
        max_rows: 128,
        y: 0x1000 as *const _,
        pair_row: std::ptr::null(),
        weights: std::ptr::null(),
        residual: std::ptr::null(),
        out: 0x2000 as *mut _,
    };
    assert_eq!(unsafe { capi::moek_combine(&c, stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
}
