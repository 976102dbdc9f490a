//! CPU reference of low-dimension expert parallelism ([`crate::ep::LowDimRank`]): the expert-parallel
//! reference ([`super::ep`]) at the projected width r, with the descend and ascend projections as
//! one-expert grouped GEMMs ([`super::grouped_gemm`]) around it. Exact (f64 products), no rounding to
//! the rows' dtype in between.

use super::ep::{self, RankTokens, Received};
use super::grouped_gemm::{grouped_gemm, Epilogue};
use crate::ep::LowDimConfig;

/// `x[T, H] · w^T` for `w` [n, H]: the one-expert GEMM over every row.
fn project(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    grouped_gemm(x, w, &[0, rows as i32], n, k, Epilogue::Identity, None)
}

/// Every rank's tokens after the descend projection (`x · w_down^T`, [T, r]), in rank order.
pub fn descend(cfg: &LowDimConfig, ranks: &[RankTokens], w_down: &[f32]) -> Vec<Vec<f32>> {
    ranks.iter().map(|t| project(t.x, t.num_tokens, w_down, cfg.projected(), cfg.hidden)).collect()
}

/// Every rank's received rows (r wide) after a low-dimension dispatch of `ranks` (x H wide): the
/// expert-parallel dispatch of `projected` (from [`descend`]).
pub fn dispatch(cfg: &LowDimConfig, ranks: &[RankTokens], projected: &[Vec<f32>]) -> Vec<Received> {
    let low: Vec<RankTokens> =
        ranks.iter().zip(projected).map(|(t, p)| RankTokens { x: p, ids: t.ids, num_tokens: t.num_tokens }).collect();
    ep::dispatch(&cfg.ep, &low)
}

/// Every rank's output after a low-dimension combine: `out[t] = residual[t] + (sum over slots s, in
/// order, of weights[t, s] * expert output of (t, s)) · w_up^T`, with `expert_out[owner]` r wide in
/// `received[owner]`'s layout and `w_up` [H, r].
pub fn combine(
    cfg: &LowDimConfig,
    ranks: &[RankTokens],
    received: &[Received],
    expert_out: &[Vec<f32>],
    weights: &[Option<&[f32]>],
    w_up: &[f32],
    residual: &[Option<&[f32]>],
) -> Vec<Vec<f32>> {
    let none = vec![None; ranks.len()];
    let combined = ep::combine(&cfg.ep, ranks, received, expert_out, weights, &none);
    combined
        .iter()
        .zip(ranks)
        .zip(residual)
        .map(|((c, t), res)| {
            let mut out = project(c, t.num_tokens, w_up, cfg.hidden, cfg.projected());
            if let Some(res) = res {
                out.iter_mut().zip(*res).for_each(|(o, r)| *o += r);
            }
            out
        })
        .collect()
}
