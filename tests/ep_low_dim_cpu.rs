//! Low-dimension expert parallelism without a GPU: the shape and length checks (each bad argument
//! refused with a named status) and the CPU reference's own invariant: with r = H and identity
//! projections it is the full-width expert-parallel reference.

use moe_kernels::ep::{EpConfig, LowDimConfig};
use moe_kernels::reference::ep::{self as full, RankTokens};
use moe_kernels::reference::low_dim;
use moe_kernels::{sys, Status};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

fn config() -> LowDimConfig {
    LowDimConfig {
        ep: EpConfig {
            num_ranks: 4,
            num_experts: 256,
            k: 8,
            hidden: 896,
            max_tokens: 4096,
            dtype: sys::moek_dtype_MOEK_DTYPE_BF16,
            capacity: 0,
        },
        hidden: 7168,
    }
}

fn with_r(r: usize) -> LowDimConfig {
    let c = config();
    LowDimConfig { ep: EpConfig { hidden: r, ..c.ep }, ..c }
}

fn status<T>(r: moe_kernels::Result<T>) -> Option<Status> {
    r.err().map(|e| e.status)
}

#[test]
fn bad_shapes_are_refused_with_named_statuses() {
    assert_eq!(status(config().validate()), None);
    assert_eq!(status(with_r(360).validate()), None, "r = 360 (H = 2880 / 8) is a multiple of 8");
    assert_eq!(status(with_r(900).validate()), Some(Status::InvalidValue));
    assert_eq!(status(with_r(0).validate()), Some(Status::InvalidValue));
    let msg = with_r(900).validate().unwrap_err().to_string();
    assert!(msg.contains("r (ep.hidden) = 900"), "{msg}");
    let c = config();
    assert_eq!(status(LowDimConfig { hidden: 7170, ..c }.validate()), Some(Status::InvalidValue));
    assert_eq!(status(LowDimConfig { hidden: 0, ..c }.validate()), Some(Status::InvalidValue));
    let f32_group = LowDimConfig { ep: EpConfig { dtype: sys::moek_dtype_MOEK_DTYPE_F32, ..c.ep }, ..c };
    assert_eq!(status(f32_group.validate()), Some(Status::InvalidDtype), "the projections take bf16/f16 only");
    let f16_group = LowDimConfig { ep: EpConfig { dtype: sys::moek_dtype_MOEK_DTYPE_F16, ..c.ep }, ..c };
    assert_eq!(status(f16_group.validate()), None);
    // The group's own checks still apply.
    let bad_ranks = LowDimConfig { ep: EpConfig { num_ranks: 3, ..c.ep }, ..c };
    assert_eq!(status(bad_ranks.validate()), Some(Status::InvalidRanks));
}

#[test]
fn short_buffers_and_too_many_tokens_are_refused() {
    let c = config();
    let (h, r, k) = (7168, 896, 8);
    let t = 5;
    assert_eq!(status(c.check_dispatch(t, t * h, r * h, t * k, Some(t * k))), None);
    assert_eq!(status(c.check_dispatch(0, 0, r * h, 0, None)), None, "T = 0 needs no token buffers");
    assert_eq!(status(c.check_dispatch(4097, 4097 * h, r * h, 4097 * k, None)), Some(Status::InvalidNumTokens));
    let e = c.check_dispatch(t, t * h - 1, r * h, t * k, None).unwrap_err();
    assert_eq!(e.status, Status::BufferTooSmall);
    assert!(e.to_string().contains("x has"), "{e}");
    let e = c.check_dispatch(t, t * h, r * h - 8, t * k, None).unwrap_err();
    assert!(e.to_string().contains("w_down"), "{e}");
    assert!(c.check_dispatch(t, t * h, r * h, t * k - 1, None).unwrap_err().to_string().contains("topk_ids"));

    assert_eq!(status(c.check_combine(t, h * r, Some(t * h), t * h)), None);
    assert_eq!(status(c.check_combine(t, h * r, None, t * h)), None);
    let named = |e: moe_kernels::Error| e.to_string();
    assert!(named(c.check_dispatch(t, t * h, r * h, t * k, Some(t * k - 1)).unwrap_err()).contains("topk_weights"));
    assert!(named(c.check_combine(t, h * r - 1, None, t * h).unwrap_err()).contains("w_up"));
    assert!(named(c.check_combine(t, h * r, Some(t * h - 1), t * h).unwrap_err()).contains("residual"));
    assert!(named(c.check_combine(t, h * r, None, t * r).unwrap_err()).contains("out"), "out is H wide");
    assert_eq!(status(c.check_combine(4097, h * r, None, 4097 * h)), Some(Status::InvalidNumTokens));
}

/// With r = H and identity projections, the low-dimension reference is the full-width one.
#[test]
fn identity_projections_reduce_to_the_full_width_reference() {
    let mut rng = StdRng::seed_from_u64(7);
    let (r, h, e, k) = (2usize, 24usize, 8u32, 3u32);
    let ep = EpConfig { num_ranks: r as u32, num_experts: e, k, hidden: h, max_tokens: 9, dtype: 1, capacity: 0 };
    let cfg = LowDimConfig { ep, hidden: h };
    let identity: Vec<f32> = (0..h * h).map(|i| if i / h == i % h { 1.0 } else { 0.0 }).collect();
    let counts = [9usize, 0];
    let xs: Vec<Vec<f32>> = counts.iter().map(|&t| (0..t * h).map(|_| rng.random_range(-2.0..2.0)).collect()).collect();
    let ids: Vec<Vec<i32>> = counts
        .iter()
        .map(|&t| (0..t).flat_map(|_| sample(&mut rng, e as usize, k as usize).into_iter().map(|j| j as i32)).collect())
        .collect();
    let weights: Vec<Vec<f32>> = counts.iter().map(|&t| (0..t * k as usize).map(|_| rng.random()).collect()).collect();
    let residual: Vec<Vec<f32>> = counts.iter().map(|&t| (0..t * h).map(|_| rng.random()).collect()).collect();
    let tokens: Vec<RankTokens> =
        (0..r).map(|q| RankTokens { x: &xs[q], ids: &ids[q], num_tokens: counts[q] }).collect();
    let projected = low_dim::descend(&cfg, &tokens, &identity);
    assert_eq!(projected, xs);
    let got = low_dim::dispatch(&cfg, &tokens, &projected);
    let want = full::dispatch(&ep, &tokens);
    assert_eq!(got, want);
    let outputs: Vec<Vec<f32>> = want.iter().map(|w| w.rows.iter().map(|v| v * 0.5 - 1.0).collect()).collect();
    let w: Vec<Option<&[f32]>> = weights.iter().map(|w| Some(w.as_slice())).collect();
    let res: Vec<Option<&[f32]>> = residual.iter().map(|v| Some(v.as_slice())).collect();
    let low = low_dim::combine(&cfg, &tokens, &got, &outputs, &w, &identity, &res);
    let full = full::combine(&ep, &tokens, &want, &outputs, &w, &res);
    for (a, b) in low.iter().zip(&full) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
}
