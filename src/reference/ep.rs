//! CPU reference of expert-parallel dispatch and combine (`moek_ep_dispatch`, `moek_ep_combine` in
//! `include/moe_kernels.h`): the received rows of every rank in the documented order, and every
//! rank's combined output.

use crate::ep::EpConfig;
use crate::permute::PlanConfig;
use crate::reference::permute;

/// What one rank passes to dispatch.
pub struct RankTokens<'a> {
    /// [T, H] token rows.
    pub x: &'a [f32],
    /// [T, k] global expert ids (-1 or out of range: not sent).
    pub ids: &'a [i32],
    /// T of this rank.
    pub num_tokens: usize,
}

/// The rows one rank receives.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// [rows, H], grouped by local expert, then source rank, then pair index.
    pub rows: Vec<f32>,
    /// [E/R + 1] first row of each local expert; the last entry is the number of rows.
    pub expert_offsets: Vec<i32>,
    /// Per row: the source rank and the pair (t * k + s) there.
    pub origin: Vec<(usize, usize)>,
}

fn rank_plan(cfg: &EpConfig, t: &RankTokens) -> permute::Plan {
    permute::plan(&PlanConfig::new(cfg.num_experts, cfg.k), t.num_tokens, t.ids)
}

/// Every rank's received rows after a dispatch of `ranks` (one entry per rank).
pub fn dispatch(cfg: &EpConfig, ranks: &[RankTokens]) -> Vec<Received> {
    let (r, h, k) = (cfg.num_ranks as usize, cfg.hidden, cfg.k as usize);
    let local = cfg.local_experts();
    assert_eq!(ranks.len(), r, "one RankTokens per rank");
    let plans: Vec<permute::Plan> = ranks.iter().map(|t| rank_plan(cfg, t)).collect();
    (0..r)
        .map(|owner| {
            let mut rows = Vec::new();
            let mut origin = Vec::new();
            let mut expert_offsets = vec![0i32];
            for j in 0..local {
                let e = owner * local + j;
                for (q, (plan, t)) in plans.iter().zip(ranks).enumerate() {
                    let (a, b) = (plan.expert_offsets[e] as usize, plan.expert_offsets[e + 1] as usize);
                    for &pair in &plan.row_source[a..b] {
                        let tok = pair as usize / k;
                        rows.extend_from_slice(&t.x[tok * h..(tok + 1) * h]);
                        origin.push((q, pair as usize));
                    }
                }
                expert_offsets.push(origin.len() as i32);
            }
            Received { rows, expert_offsets, origin }
        })
        .collect()
}

/// Every rank's combined output: `out[t] = residual[t] + sum over slots s (in order) of
/// weights[t, s] * (expert output of pair (t, s))`, in fp32, where `expert_out[owner]` holds the
/// outputs of `received[owner]`'s rows (same layout, H wide).
pub fn combine(
    cfg: &EpConfig,
    ranks: &[RankTokens],
    received: &[Received],
    expert_out: &[Vec<f32>],
    weights: &[Option<&[f32]>],
    residual: &[Option<&[f32]>],
) -> Vec<Vec<f32>> {
    let (h, k) = (cfg.hidden, cfg.k as usize);
    let plans: Vec<permute::Plan> = ranks.iter().map(|t| rank_plan(cfg, t)).collect();
    // Each source's outputs in its own plan's row order (where moek_ep_combine returns them).
    let mut returned: Vec<Vec<f32>> = ranks.iter().map(|t| vec![0.0; t.num_tokens * k * h]).collect();
    for (owner, got) in received.iter().enumerate() {
        for (i, &(q, pair)) in got.origin.iter().enumerate() {
            let row = plans[q].pair_row[pair] as usize;
            returned[q][row * h..(row + 1) * h].copy_from_slice(&expert_out[owner][i * h..(i + 1) * h]);
        }
    }
    plans
        .iter()
        .zip(&returned)
        .enumerate()
        .map(|(q, (plan, y))| permute::combine(&plan.pair_row, y, h, k, weights[q], residual[q]))
        .collect()
}
