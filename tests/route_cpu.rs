//! CPU-side routing tests (run everywhere, CI included): the reference's defining properties, and the
//! argument checks of the Rust API and the C interface.

use moe_kernels::capi;
use moe_kernels::reference::route as reference;
use moe_kernels::route::{RoutingConfig, RoutingMode, ScoreFunction};
use moe_kernels::{sys, Status};
use proptest::prelude::*;
use std::ffi::CStr;

fn arb_config() -> impl Strategy<Value = RoutingConfig> {
    (1u32..=96, 1u32..=8, any::<bool>(), any::<bool>(), 0u8..4, 0u32..6).prop_filter_map(
        "valid configurations only",
        |(e, k, sigmoid, renormalize, mode, capacity)| {
            let mode = match mode {
                0 => RoutingMode::TopK,
                1 => {
                    let g = [8, 4, 2, 1].into_iter().find(|g| e % g == 0)?;
                    RoutingMode::GroupLimited { num_groups: g, topk_groups: (g / 2).max(1) }
                }
                2 => RoutingMode::Grouped { num_groups: [4, 2, 1].into_iter().find(|g| e % g == 0 && k % g == 0)? },
                _ => RoutingMode::Switch,
            };
            let k = if mode == RoutingMode::Switch { 1 } else { k };
            let capacity = if mode == RoutingMode::Switch { capacity.max(1) } else { capacity };
            let score = if sigmoid { ScoreFunction::Sigmoid } else { ScoreFunction::Softmax };
            let cfg = RoutingConfig { num_experts: e, k, score, mode, renormalize, scale: 1.5, capacity };
            cfg.validate().ok().map(|_| cfg)
        },
    )
}

proptest! {
    #[test]
    fn reference_selects_k_distinct_best_experts(
        cfg in arb_config(),
        t in 0usize..24,
        seed in any::<u64>(),
    ) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let e = cfg.num_experts as usize;
        let k = cfg.k as usize;
        let logits: Vec<f32> = (0..t * e).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let r = reference::route(&cfg, t, &logits, None);
        prop_assert_eq!(r.ids.len(), t * k);
        let mut per_expert = vec![0u32; e];
        for tok in 0..t {
            let ids = &r.ids[tok * k..(tok + 1) * k];
            let row = &logits[tok * e..(tok + 1) * e];
            let keys = reference::keys(&reference::scores(cfg.score, row), None);
            let kept: Vec<usize> = ids.iter().filter(|&&x| x >= 0).map(|&x| x as usize).collect();
            // Distinct, in range.
            let mut sorted = kept.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), kept.len());
            // Descending keys (dropped slots aside).
            for w in kept.windows(2) {
                prop_assert!(keys[w[0]] >= keys[w[1]]);
            }
            for &x in &kept {
                per_expert[x] += 1;
            }
            match cfg.mode {
                RoutingMode::TopK | RoutingMode::Switch if cfg.capacity == 0 => {
                    // Nothing unselected beats the worst selected.
                    let worst = kept.iter().map(|&x| keys[x]).fold(f32::INFINITY, f32::min);
                    let better = (0..e).filter(|x| !kept.contains(x) && keys[*x] > worst).count();
                    prop_assert_eq!(better, 0);
                }
                RoutingMode::Grouped { num_groups } if cfg.capacity == 0 => {
                    let size = e / num_groups as usize;
                    for g in 0..num_groups as usize {
                        let n = kept.iter().filter(|&&x| x / size == g).count();
                        prop_assert_eq!(n, k / num_groups as usize);
                    }
                }
                RoutingMode::GroupLimited { num_groups, topk_groups } => {
                    let size = e / num_groups as usize;
                    let mut groups: Vec<usize> = kept.iter().map(|&x| x / size).collect();
                    groups.sort();
                    groups.dedup();
                    prop_assert!(groups.len() <= topk_groups as usize);
                }
                _ => {}
            }
            // Weights: renormalised ones sum to the scale (without drops).
            if cfg.renormalize && cfg.capacity == 0 {
                let s: f32 = r.weights[tok * k..(tok + 1) * k].iter().sum();
                prop_assert!((s - cfg.scale).abs() < 1e-4, "weights sum to {s}");
            }
        }
        if cfg.capacity > 0 {
            prop_assert!(per_expert.iter().all(|&n| n <= cfg.capacity));
            let dropped = r.ids.iter().filter(|&&x| x < 0).count() as u32;
            prop_assert_eq!(dropped, r.dropped);
        }
    }
}

#[test]
fn capacity_keeps_the_lowest_token_indices() {
    let cfg = RoutingConfig::switch(2, 2);
    // Every token prefers expert 1; tokens 0 and 1 get it, 2 and 3 are dropped.
    let logits = [0.0, 1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0];
    let r = reference::route(&cfg, 4, &logits, None);
    assert_eq!(r.ids, vec![1, 1, -1, -1]);
    assert_eq!(r.dropped, 2);
    assert_eq!(r.weights[2], 0.0);
}

#[test]
fn ties_go_to_the_lower_expert_index() {
    let cfg = RoutingConfig::top_k(6, 3);
    let r = reference::route(&cfg, 1, &[1.0, 2.0, 2.0, 0.5, 2.0, 2.0], None);
    assert_eq!(r.ids, vec![1, 2, 4]);
}

#[test]
fn deepseek_groups_rank_by_their_two_best() {
    // 4 groups of 2; group 3 has the single best expert but group 0 and 1 the best pairs.
    let mut cfg = RoutingConfig::deepseek_v3();
    cfg.num_experts = 8;
    cfg.k = 2;
    cfg.mode = RoutingMode::GroupLimited { num_groups: 4, topk_groups: 2 };
    let logits = [2.0, 2.0, 1.9, 1.9, -3.0, -3.0, 5.0, -5.0];
    let r = reference::route(&cfg, 1, &logits, None);
    assert_eq!(r.ids, vec![0, 1], "group 3 (best single expert, weak pair) must be excluded");
}

#[test]
fn bad_configurations_name_their_field() {
    let cases = [
        (RoutingConfig::top_k(8, 0), Status::InvalidK),
        (RoutingConfig::top_k(8, 9), Status::InvalidK),
        (RoutingConfig::top_k(64, 33), Status::InvalidK),
        (RoutingConfig::top_k(0, 1), Status::InvalidNumExperts),
        (RoutingConfig::top_k(1025, 1), Status::InvalidNumExperts),
        (
            RoutingConfig {
                mode: RoutingMode::GroupLimited { num_groups: 3, topk_groups: 1 },
                ..RoutingConfig::top_k(8, 2)
            },
            Status::InvalidGroups,
        ),
        (
            RoutingConfig {
                mode: RoutingMode::GroupLimited { num_groups: 4, topk_groups: 5 },
                ..RoutingConfig::top_k(8, 2)
            },
            Status::InvalidTopkGroups,
        ),
        (
            RoutingConfig {
                mode: RoutingMode::GroupLimited { num_groups: 4, topk_groups: 0 },
                ..RoutingConfig::top_k(8, 2)
            },
            Status::InvalidTopkGroups,
        ),
        (
            RoutingConfig {
                mode: RoutingMode::GroupLimited { num_groups: 4, topk_groups: 1 },
                ..RoutingConfig::top_k(8, 3)
            },
            Status::InvalidK,
        ),
        (RoutingConfig::moge(8, 4, 2), Status::InvalidGroups),
        (RoutingConfig::switch(8, 0), Status::InvalidCapacity),
        (RoutingConfig { k: 2, ..RoutingConfig::switch(8, 4) }, Status::InvalidK),
        (RoutingConfig { scale: f32::INFINITY, ..RoutingConfig::top_k(8, 2) }, Status::InvalidValue),
    ];
    for (cfg, status) in cases {
        let err = cfg.validate().expect_err("accepted a bad configuration");
        assert_eq!(err.status, status, "{cfg:?}: {err}");
        assert!(!err.message.is_empty());
    }
    RoutingConfig::deepseek_v3().validate().unwrap();
    RoutingConfig::mixtral().validate().unwrap();
    RoutingConfig::qwen3_moe().validate().unwrap();
}

fn last_message() -> String {
    unsafe { CStr::from_ptr(capi::moek_last_error_message()) }.to_string_lossy().into_owned()
}

#[test]
fn c_interface_checks_arguments_before_touching_the_gpu() {
    let cfg = RoutingConfig::deepseek_v3();
    let mut args = cfg.to_args(16, sys::moek_dtype_MOEK_DTYPE_F32);
    let stream = std::ptr::null_mut();
    // NULL args and NULL pointers with tokens to route.
    assert_eq!(unsafe { capi::moek_route(std::ptr::null(), stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert_eq!(unsafe { capi::moek_route(&args, stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(last_message().contains("logits"), "{}", last_message());
    // Fake device addresses: never dereferenced on the host; checks fail before any launch.
    args.logits = 0x1000 as *const _;
    args.topk_ids = 0x2000 as *mut i32;
    args.topk_weights = 0x3002 as *mut f32;
    assert_eq!(unsafe { capi::moek_route(&args, stream) }, sys::moek_status_MOEK_ERROR_MISALIGNED);
    assert!(last_message().contains("topk_weights"), "{}", last_message());
    args.topk_weights = 0x3000 as *mut f32;
    args.k = 0;
    assert_eq!(unsafe { capi::moek_route(&args, stream) }, sys::moek_status_MOEK_ERROR_INVALID_K);
    args.k = 8;
    args.mode = 17;
    assert_eq!(unsafe { capi::moek_route(&args, stream) }, sys::moek_status_MOEK_ERROR_INVALID_ENUM);
    args.mode = sys::moek_route_mode_MOEK_ROUTE_GROUP_LIMITED;
    args.logits_dtype = sys::moek_dtype_MOEK_DTYPE_F16;
    assert_eq!(unsafe { capi::moek_route(&args, stream) }, sys::moek_status_MOEK_ERROR_INVALID_DTYPE);
    args.logits_dtype = sys::moek_dtype_MOEK_DTYPE_F32;
    args.num_tokens = -1;
    assert_eq!(unsafe { capi::moek_route(&args, stream) }, sys::moek_status_MOEK_ERROR_INVALID_NUM_TOKENS);
    // Workspace queries: capacity needs one counter per (expert, chunk of 256 pairs).
    let mut bytes = usize::MAX;
    args.num_tokens = 1000;
    assert_eq!(unsafe { capi::moek_route_workspace_size(&args, &mut bytes) }, sys::moek_status_MOEK_SUCCESS);
    assert_eq!(bytes, 0);
    args.capacity = 10;
    assert_eq!(unsafe { capi::moek_route_workspace_size(&args, &mut bytes) }, sys::moek_status_MOEK_SUCCESS);
    assert_eq!(bytes, 256 * 4 * (1000 * 8usize).div_ceil(256));
    assert_eq!(
        unsafe { capi::moek_route_workspace_size(&args, std::ptr::null_mut()) },
        sys::moek_status_MOEK_ERROR_NULL_POINTER
    );
    // Capacity without dropped_count, then without a large enough workspace.
    assert_eq!(unsafe { capi::moek_route(&args, stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(last_message().contains("dropped_count"));
    args.dropped_count = 0x4000 as *mut i32;
    args.workspace = 0x5000 as *mut _;
    args.workspace_bytes = bytes - 1;
    assert_eq!(unsafe { capi::moek_route(&args, stream) }, sys::moek_status_MOEK_ERROR_WORKSPACE_TOO_SMALL);
}

#[test]
fn statuses_have_descriptions_and_the_version_matches_the_header() {
    for s in 0..=16u32 {
        let text = unsafe { CStr::from_ptr(capi::moek_status_string(s)) }.to_str().unwrap();
        assert!(!text.is_empty());
    }
    assert!(Status::NoCudaKernels.description().contains("without CUDA"));
    assert_eq!(
        capi::moek_version(),
        sys::MOEK_VERSION_MAJOR * 10000 + sys::MOEK_VERSION_MINOR * 100 + sys::MOEK_VERSION_PATCH
    );
}

#[test]
fn a_build_without_kernels_says_so() {
    if moe_kernels::KERNELS_BUILT {
        return; // covered by the GPU tests and the C program instead
    }
    let mut args = RoutingConfig::top_k(8, 2).to_args(4, sys::moek_dtype_MOEK_DTYPE_F32);
    args.logits = 0x1000 as *const _;
    args.topk_ids = 0x2000 as *mut i32;
    args.topk_weights = 0x3000 as *mut f32;
    assert_eq!(unsafe { capi::moek_route(&args, std::ptr::null_mut()) }, sys::moek_status_MOEK_ERROR_NO_CUDA_KERNELS);
}
