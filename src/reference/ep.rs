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
    /// [E/R + 1] first row of each local expert in `rows`; the last entry is the number of rows. In the
    /// masked layout (`capacity > 0`) the GPU places local expert j's rows at `j * capacity`, and its
    /// count is `expert_offsets[j + 1] - expert_offsets[j]`.
    pub expert_offsets: Vec<i32>,
    /// Per row: the source rank and the pair (t * k + s) there.
    pub origin: Vec<(usize, usize)>,
}

fn rank_plan(cfg: &EpConfig, t: &RankTokens) -> permute::Plan {
    permute::plan(&PlanConfig::new(cfg.num_experts, cfg.k), t.num_tokens, t.ids)
}

/// Every rank's received rows after a dispatch of `ranks` (one entry per rank); with `capacity > 0`
/// each expert keeps its first `capacity` rows (the masked layout) and the others are dropped.
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
                let mut kept = 0;
                for (q, (plan, t)) in plans.iter().zip(ranks).enumerate() {
                    let (a, b) = (plan.expert_offsets[e] as usize, plan.expert_offsets[e + 1] as usize);
                    for &pair in &plan.row_source[a..b] {
                        // The masked layout keeps an expert's first `capacity` rows (sources in order).
                        if cfg.capacity > 0 && kept == cfg.capacity {
                            break;
                        }
                        kept += 1;
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

/// A value as the rows' dtype stores it (f32 unchanged).
fn round_to(dtype: crate::sys::moek_dtype, v: f32) -> f32 {
    match dtype {
        crate::sys::moek_dtype_MOEK_DTYPE_BF16 => half::bf16::from_f32(v).to_f32(),
        crate::sys::moek_dtype_MOEK_DTYPE_F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// Every rank's combined output, as `moek_ep_combine` defines it: for token t of rank q and each rank o
/// holding some of t's kept slots, the owner's sum S(t, o) = sum over those slots s (in slot order) of
/// `weights[q][t, s] * (expert output of pair (t, s))` in fp32, rounded to the dtype; then `out[t] =
/// residual[t] + sum of the S(t, o)` in fp32, in the slot order of each owner's first slot.
/// `expert_out[owner]` holds the outputs of `received[owner]`'s rows (same layout, H wide); the weights
/// are the ones given to dispatch.
pub fn combine(
    cfg: &EpConfig,
    ranks: &[RankTokens],
    received: &[Received],
    expert_out: &[Vec<f32>],
    weights: &[Option<&[f32]>],
    residual: &[Option<&[f32]>],
) -> Vec<Vec<f32>> {
    let (h, k) = (cfg.hidden, cfg.k as usize);
    // Where each source pair's expert output is: (owner, received row).
    let mut output_of: Vec<Vec<Option<(usize, usize)>>> = ranks.iter().map(|t| vec![None; t.num_tokens * k]).collect();
    for (owner, got) in received.iter().enumerate() {
        for (i, &(q, pair)) in got.origin.iter().enumerate() {
            output_of[q][pair] = Some((owner, i));
        }
    }
    ranks
        .iter()
        .enumerate()
        .map(|(q, t)| {
            let mut out = match residual[q] {
                Some(r) => r[..t.num_tokens * h].to_vec(),
                None => vec![0.0f32; t.num_tokens * h],
            };
            for tok in 0..t.num_tokens {
                let slots = &output_of[q][tok * k..(tok + 1) * k];
                // The token's owners, in the order of their first slots.
                let mut owners: Vec<usize> = Vec::new();
                for &(owner, _) in slots.iter().flatten() {
                    if !owners.contains(&owner) {
                        owners.push(owner);
                    }
                }
                for owner in owners {
                    let mut sum = vec![0.0f32; h];
                    for (s, &(o, row)) in slots.iter().enumerate().filter_map(|(s, x)| x.as_ref().map(|x| (s, x))) {
                        if o != owner {
                            continue;
                        }
                        let w = weights[q].map_or(1.0, |w| w[tok * k + s]);
                        for (a, &v) in sum.iter_mut().zip(&expert_out[owner][row * h..(row + 1) * h]) {
                            *a += w * v;
                        }
                    }
                    for (o, v) in out[tok * h..(tok + 1) * h].iter_mut().zip(sum) {
                        *o += round_to(cfg.dtype, v);
                    }
                }
            }
            out
        })
        .collect()
}
