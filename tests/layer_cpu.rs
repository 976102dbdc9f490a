//! The CPU reference of the whole layer against a direct per-token computation (no plan, no permute),
//! with the layer's routing or the caller's top-k and with shared experts, and the layer's argument
//! checks (Rust configuration and C interface).

use moe_kernels::layer::{LayerConfig, LayerImpl};
use moe_kernels::reference::grouped_gemm::{gelu, relative_frobenius_error, silu, Epilogue};
use moe_kernels::reference::layer::{moe_layer, round_to_bf16, RoutingInput, SharedWeights};
use moe_kernels::reference::route::route;
use moe_kernels::route::RoutingConfig;
use moe_kernels::Status;
use rand::{Rng, SeedableRng};

/// One expert on one token: down(act(gate_up(x))), each stage rounded to bf16 as the GPU stores it.
fn expert_on_token(cfg: &LayerConfig, xr: &[f32], w1: &[f32], w2: &[f32], i: usize) -> Vec<f32> {
    let dot = |w: &[f32], row: usize, v: &[f32]| -> f64 {
        v.iter().zip(&w[row * v.len()..(row + 1) * v.len()]).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
    };
    let mut mid: Vec<f32> = (0..i)
        .map(|j| match cfg.activation {
            Epilogue::SwiGlu => (silu(dot(w1, j, xr)) * dot(w1, i + j, xr)) as f32,
            Epilogue::Gelu => gelu(dot(w1, j, xr)) as f32,
            _ => dot(w1, j, xr).max(0.0) as f32,
        })
        .collect();
    round_to_bf16(&mut mid);
    let mut y: Vec<f32> = (0..cfg.hidden).map(|c| dot(w2, c, &mid) as f32).collect();
    round_to_bf16(&mut y);
    y
}

/// out[t] = shared(x[t]) + sum over token t's experts of weight * down(act(gate_up(x[t]))), one token at
/// a time; ids outside 0..E add nothing.
#[allow(clippy::too_many_arguments)]
fn direct(
    cfg: &LayerConfig,
    t: usize,
    x: &[f32],
    ids: &[i32],
    weights: &[f32],
    w1: &[f32],
    w2: &[f32],
    shared: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    let (h, i, k) = (cfg.hidden, cfg.intermediate, cfg.routing.k as usize);
    let (n1, e_count) = (cfg.gate_up_rows(), cfg.routing.num_experts as usize);
    let mut out = vec![0.0f32; t * h];
    for tok in 0..t {
        let xr = &x[tok * h..(tok + 1) * h];
        let o = &mut out[tok * h..(tok + 1) * h];
        if let Some((s1, s2)) = shared {
            o.copy_from_slice(&expert_on_token(cfg, xr, s1, s2, cfg.shared_intermediate));
        }
        for s in 0..k {
            let Ok(e) = usize::try_from(ids[tok * k + s]) else { continue };
            if e >= e_count {
                continue;
            }
            let y = expert_on_token(cfg, xr, &w1[e * n1 * h..(e + 1) * n1 * h], &w2[e * h * i..(e + 1) * h * i], i);
            for (o, v) in o.iter_mut().zip(&y) {
                *o += weights[tok * k + s] * v;
            }
        }
    }
    out
}

#[test]
fn reference_layer_equals_the_direct_computation() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let configs = [
        (RoutingConfig::mixtral(), Epilogue::SwiGlu, 0),
        (RoutingConfig::moge(16, 4, 4), Epilogue::Gelu, 8),
        (RoutingConfig::switch(8, 3), Epilogue::Relu, 0), // capacity 3 of 8 experts drops some of 40 tokens
        (RoutingConfig::qwen3_moe(), Epilogue::SwiGlu, 24),
    ];
    for (routing, activation, shared_intermediate) in configs {
        for (t, caller_routed) in [(0usize, false), (1, false), (40, false), (1, true), (40, true)] {
            let cfg = LayerConfig {
                routing,
                hidden: 24,
                intermediate: 16,
                activation,
                shared_intermediate,
                implementation: LayerImpl::Auto,
            };
            let (e, k) = (routing.num_experts as usize, routing.k as usize);
            let draw = |rng: &mut rand::rngs::StdRng, n: usize, s: f32| {
                (0..n).map(|_| rng.random_range(-s..s)).collect::<Vec<f32>>()
            };
            let x = draw(&mut rng, t * 24, 1.0);
            let logits = draw(&mut rng, t * e, 3.0);
            let w1 = draw(&mut rng, e * cfg.gate_up_rows() * 24, 0.4);
            let w2 = draw(&mut rng, e * 24 * 16, 0.4);
            let s1 = draw(&mut rng, cfg.shared_gate_up_rows() * 24, 0.4);
            let s2 = draw(&mut rng, 24 * shared_intermediate, 0.4);
            let shared = (shared_intermediate > 0).then_some((&s1[..], &s2[..]));
            let reference_shared = shared.map(|(w_gate_up, w_down)| SharedWeights { w_gate_up, w_down });
            let (got, want) = if caller_routed {
                // Ids as a caller passes them, with -1 and out-of-range ones (dropped).
                let ids: Vec<i32> = (0..t * k).map(|_| rng.random_range(-1..e as i32 + 2)).collect();
                let weights = draw(&mut rng, t * k, 1.0);
                let input = RoutingInput::TopK { ids: &ids, weights: Some(&weights) };
                let got = moe_layer(&cfg, t, &x, input, &w1, &w2, reference_shared, |_, _| {});
                (got, direct(&cfg, t, &x, &ids, &weights, &w1, &w2, shared))
            } else {
                let input = RoutingInput::Logits { logits: &logits, bias: None };
                let got = moe_layer(&cfg, t, &x, input, &w1, &w2, reference_shared, |_, _| {});
                let r = route(&cfg.routing, t, &logits, None);
                (got, direct(&cfg, t, &x, &r.ids, &r.weights, &w1, &w2, shared))
            };
            assert_eq!(got.len(), t * 24);
            if t > 0 {
                let err = relative_frobenius_error(&got, &want);
                assert!(err < 1e-6, "{routing:?} {activation:?} T={t} caller_routed={caller_routed}: error {err}");
            }
        }
    }
}

#[test]
fn layer_configuration_is_checked() {
    let good = LayerConfig {
        routing: RoutingConfig::mixtral(),
        hidden: 64,
        intermediate: 32,
        activation: Epilogue::SwiGlu,
        shared_intermediate: 0,
        implementation: LayerImpl::Auto,
    };
    good.validate().unwrap();
    LayerConfig { shared_intermediate: 64, ..good }.validate().unwrap();
    let cases = [
        (LayerConfig { hidden: 60, ..good }, Status::InvalidValue),
        (LayerConfig { intermediate: 0, ..good }, Status::InvalidValue),
        (LayerConfig { activation: Epilogue::Identity, ..good }, Status::InvalidValue),
        (LayerConfig { shared_intermediate: 12, ..good }, Status::InvalidValue),
        (LayerConfig { routing: RoutingConfig { k: 0, ..RoutingConfig::mixtral() }, ..good }, Status::InvalidK),
    ];
    for (cfg, status) in cases {
        let err = cfg.validate().expect_err("accepted a bad layer");
        assert_eq!(err.status, status, "{cfg:?}: {err}");
    }
}

#[test]
fn c_interface_checks_layer_arguments() {
    use moe_kernels::{capi, sys};
    let cfg = LayerConfig {
        routing: RoutingConfig::qwen3_moe(),
        hidden: 64,
        intermediate: 32,
        activation: Epilogue::SwiGlu,
        shared_intermediate: 0,
        implementation: LayerImpl::Auto,
    };
    let mut a = cfg.to_args(16, sys::moek_dtype_MOEK_DTYPE_F32);
    let mut bytes = 0usize;
    assert_eq!(unsafe { capi::moek_layer_workspace_size(&a, &mut bytes) }, sys::moek_status_MOEK_SUCCESS);
    // Routing results, the plan and three row buffers, each rounded up to 256 bytes: at least the rows.
    assert!(bytes >= 16 * 8 * (64 + 32 + 64) * 2, "{bytes}");
    let mut more = 0usize;
    a.num_tokens = 17;
    assert_eq!(unsafe { capi::moek_layer_workspace_size(&a, &mut more) }, sys::moek_status_MOEK_SUCCESS);
    assert!(more >= bytes, "the workspace must grow with T: {more} < {bytes}");
    a.num_tokens = 16;
    let stream = std::ptr::null_mut();
    let message =
        || unsafe { std::ffi::CStr::from_ptr(capi::moek_last_error_message()) }.to_string_lossy().into_owned();
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(message().contains('x'), "{}", message());
    a.x = 0x1000 as *const _;
    a.logits = 0x2000 as *const _;
    a.w_gate_up = 0x3000 as *const _;
    a.w_down = 0x4008 as *const _;
    a.out = 0x5000 as *mut _;
    a.workspace = 0x10000 as *mut _;
    a.workspace_bytes = bytes;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_MISALIGNED);
    assert!(message().contains("w_down"), "{}", message());
    a.w_down = 0x4000 as *const _;
    a.workspace_bytes = bytes - 1;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_WORKSPACE_TOO_SMALL);
    a.activation = sys::moek_gemm_epilogue_MOEK_EPILOGUE_IDENTITY;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("activation"), "{}", message());
    a.activation = sys::moek_gemm_epilogue_MOEK_EPILOGUE_SWIGLU;
    a.routing.k = 0;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_INVALID_K);
    a.routing.k = 8;
    a.hidden = 12;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("hidden"), "{}", message());
    a.hidden = 64;
    assert_eq!(unsafe { capi::moek_layer(std::ptr::null(), stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    // The implementation: a value outside the enum is refused by the size query and the call alike.
    a.implementation = 3;
    assert_eq!(unsafe { capi::moek_layer_workspace_size(&a, &mut more) }, sys::moek_status_MOEK_ERROR_INVALID_ENUM);
    assert!(message().contains("implementation"), "{}", message());
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_INVALID_ENUM);
    for implementation in [sys::moek_layer_impl_MOEK_LAYER_COMPOSED, sys::moek_layer_impl_MOEK_LAYER_FUSED] {
        a.implementation = implementation;
        let mut same = 0usize;
        assert_eq!(unsafe { capi::moek_layer_workspace_size(&a, &mut same) }, sys::moek_status_MOEK_SUCCESS);
        assert_eq!(same, bytes, "one workspace serves both implementations");
    }
    a.implementation = sys::moek_layer_impl_MOEK_LAYER_AUTO;

    // The routing input: exactly one of logits and topk_ids; bias only with logits, weights only with ids.
    a.topk_ids = 0x6000 as *const _;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("logits and topk_ids"), "{}", message());
    a.logits = std::ptr::null();
    a.bias = 0x7000 as *const _;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("bias"), "{}", message());
    a.bias = std::ptr::null();
    a.topk_ids = 0x6002 as *const _;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_MISALIGNED);
    assert!(message().contains("topk_ids"), "{}", message());
    a.topk_ids = std::ptr::null();
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(message().contains("logits"), "{}", message());
    a.logits = 0x2000 as *const _;
    a.topk_weights = 0x6000 as *const _;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("topk_weights"), "{}", message());
    a.topk_weights = std::ptr::null();

    // Shared experts: the width is a shape field (the workspace grows), the weights are required with it.
    a.shared_intermediate = 20;
    assert_eq!(unsafe { capi::moek_layer_workspace_size(&a, &mut more) }, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("shared_intermediate"), "{}", message());
    a.shared_intermediate = 32;
    let mut with_shared = 0usize;
    assert_eq!(unsafe { capi::moek_layer_workspace_size(&a, &mut with_shared) }, sys::moek_status_MOEK_SUCCESS);
    assert!(with_shared >= bytes + 16 * (32 + 64) * 2, "{with_shared} vs {bytes}");
    a.workspace_bytes = with_shared;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(message().contains("w_shared_gate_up"), "{}", message());
    a.shared_intermediate = 0;
    a.w_shared_down = 0x8000 as *const _;
    a.workspace_bytes = bytes;
    assert_eq!(unsafe { capi::moek_layer(&a, stream) }, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("shared"), "{}", message());
}

#[test]
fn layer_implementations_round_trip_through_c_and_names() {
    for (name, implementation) in
        [("auto", LayerImpl::Auto), ("Composed", LayerImpl::Composed), (" fused ", LayerImpl::Fused)]
    {
        assert_eq!(LayerImpl::from_name(name), Some(implementation));
        assert_eq!(LayerImpl::from_raw(implementation.to_raw()).unwrap(), implementation);
    }
    assert_eq!(LayerImpl::from_name("fastest"), None);
    assert_eq!(LayerImpl::from_raw(7).unwrap_err().status, Status::InvalidEnum);
    assert_eq!(LayerImpl::default(), LayerImpl::Auto);
    assert_eq!(LayerConfig::mixtral_8x7b().implementation, LayerImpl::Auto);
}
