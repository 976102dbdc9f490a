//! The CPU reference of the whole layer against a direct per-token computation (no plan, no permute),
//! and the layer configuration's checks.

use moe_kernels::layer::LayerConfig;
use moe_kernels::reference::grouped_gemm::{gelu, relative_frobenius_error, silu, Epilogue};
use moe_kernels::reference::layer::{moe_layer, round_to_bf16};
use moe_kernels::reference::route::route;
use moe_kernels::route::RoutingConfig;
use moe_kernels::Status;
use rand::{Rng, SeedableRng};

/// out[t] = sum over token t's routed experts of weight * down(act(gate_up(x[t]))), one token at a time.
fn direct(cfg: &LayerConfig, t: usize, x: &[f32], logits: &[f32], w1: &[f32], w2: &[f32]) -> Vec<f32> {
    let (h, i, k) = (cfg.hidden, cfg.intermediate, cfg.routing.k as usize);
    let n1 = cfg.gate_up_rows();
    let r = route(&cfg.routing, t, logits, None);
    let mut out = vec![0.0f32; t * h];
    for tok in 0..t {
        let xr = &x[tok * h..(tok + 1) * h];
        for s in 0..k {
            let e = r.ids[tok * k + s];
            if e < 0 {
                continue;
            }
            let e = e as usize;
            let dot = |w: &[f32], row: usize, v: &[f32]| -> f64 {
                v.iter().zip(&w[row * v.len()..(row + 1) * v.len()]).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
            };
            let w1e = &w1[e * n1 * h..(e + 1) * n1 * h];
            let mut mid: Vec<f32> = (0..i)
                .map(|j| match cfg.activation {
                    Epilogue::SwiGlu => (silu(dot(w1e, j, xr)) * dot(w1e, i + j, xr)) as f32,
                    Epilogue::Gelu => gelu(dot(w1e, j, xr)) as f32,
                    _ => dot(w1e, j, xr).max(0.0) as f32,
                })
                .collect();
            round_to_bf16(&mut mid);
            let w2e = &w2[e * h * i..(e + 1) * h * i];
            let mut y: Vec<f32> = (0..h).map(|c| dot(w2e, c, &mid) as f32).collect();
            round_to_bf16(&mut y);
            for (o, v) in out[tok * h..(tok + 1) * h].iter_mut().zip(&y) {
                *o += r.weights[tok * k + s] * v;
            }
        }
    }
    out
}

#[test]
fn reference_layer_equals_the_direct_computation() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let configs = [
        (RoutingConfig::mixtral(), Epilogue::SwiGlu),
        (RoutingConfig::moge(16, 4, 4), Epilogue::Gelu),
        (RoutingConfig::switch(8, 3), Epilogue::Relu), // capacity 3 of 8 experts drops some of 40 tokens
    ];
    for (routing, activation) in configs {
        for t in [0usize, 1, 40] {
            let cfg = LayerConfig { routing, hidden: 24, intermediate: 16, activation };
            let e = routing.num_experts as usize;
            let mut draw = |n: usize, s: f32| (0..n).map(|_| rng.random_range(-s..s)).collect::<Vec<f32>>();
            let x = draw(t * 24, 1.0);
            let logits = draw(t * e, 3.0);
            let w1 = draw(e * cfg.gate_up_rows() * 24, 0.4);
            let w2 = draw(e * 24 * 16, 0.4);
            let got = moe_layer(&cfg, t, &x, &logits, None, &w1, &w2, |_, _| {});
            let want = direct(&cfg, t, &x, &logits, &w1, &w2);
            assert_eq!(got.len(), t * 24);
            if t > 0 {
                let err = relative_frobenius_error(&got, &want);
                assert!(err < 1e-6, "{routing:?} {activation:?} T={t}: relative error {err}");
            }
        }
    }
}

#[test]
fn layer_configuration_is_checked() {
    let good =
        LayerConfig { routing: RoutingConfig::mixtral(), hidden: 64, intermediate: 32, activation: Epilogue::SwiGlu };
    good.validate().unwrap();
    let cases = [
        (LayerConfig { hidden: 60, ..good }, Status::InvalidValue),
        (LayerConfig { intermediate: 0, ..good }, Status::InvalidValue),
        (LayerConfig { activation: Epilogue::Identity, ..good }, Status::InvalidValue),
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
    let cfg =
        LayerConfig { routing: RoutingConfig::qwen3_moe(), hidden: 64, intermediate: 32, activation: Epilogue::SwiGlu };
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
    assert_eq!(unsafe { capi::moek_layer(std::ptr::null(), stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
}
