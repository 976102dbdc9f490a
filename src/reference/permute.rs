//! CPU reference of the permutation: the plan, permute and combine, as `moek_plan`, `moek_permute` and
//! `moek_combine` define them in `include/moe_kernels.h`.

use crate::permute::PlanConfig;

/// The expert-grouped layout of T tokens' k slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Pairs kept per expert (E).
    pub expert_counts: Vec<i32>,
    /// [E + 1] first row of each expert's block; the last entry is the number of rows in use.
    pub expert_offsets: Vec<i32>,
    /// [rows in use] the pair (t * k + s) of each row, -1 for padding rows.
    pub row_source: Vec<i32>,
    /// [T * k] the row of each pair, -1 where the pair is not kept.
    pub pair_row: Vec<i32>,
    /// Pairs kept per rank (R; empty for one rank).
    pub rank_counts: Vec<i32>,
    /// [R + 1] first row of each rank's experts (empty for one rank).
    pub rank_offsets: Vec<i32>,
    /// Pairs whose id was out of range (neither an expert nor -1).
    pub errors: u32,
}

/// Plans `num_tokens` tokens of `ids` ([T, k]).
pub fn plan(cfg: &PlanConfig, num_tokens: usize, ids: &[i32]) -> Plan {
    let (e, k) = (cfg.num_experts as usize, cfg.k as usize);
    let align = cfg.row_align.max(1) as usize;
    let pairs = num_tokens * k;
    assert!(ids.len() >= pairs, "ids shorter than [T, k]");
    // Pairs of each expert in increasing pair index, up to the capacity.
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); e];
    let mut errors = 0;
    for (p, &id) in ids[..pairs].iter().enumerate() {
        if id == -1 {
            continue;
        }
        if id < 0 || id as usize >= e {
            errors += 1;
            continue;
        }
        let m = &mut members[id as usize];
        if cfg.capacity == 0 || m.len() < cfg.capacity as usize {
            m.push(p);
        }
    }
    let mut expert_offsets = vec![0i32; e + 1];
    for x in 0..e {
        expert_offsets[x + 1] = expert_offsets[x] + members[x].len().div_ceil(align) as i32 * align as i32;
    }
    let mut row_source = vec![-1i32; expert_offsets[e] as usize];
    let mut pair_row = vec![-1i32; pairs];
    for (x, m) in members.iter().enumerate() {
        for (i, &p) in m.iter().enumerate() {
            let row = expert_offsets[x] as usize + i;
            row_source[row] = p as i32;
            pair_row[p] = row as i32;
        }
    }
    let expert_counts: Vec<i32> = members.iter().map(|m| m.len() as i32).collect();
    let (rank_counts, rank_offsets) = if cfg.num_ranks > 1 {
        let per = e / cfg.num_ranks as usize;
        let counts = expert_counts.chunks(per).map(|c| c.iter().sum()).collect();
        let offsets = (0..=cfg.num_ranks as usize).map(|r| expert_offsets[r * per]).collect();
        (counts, offsets)
    } else {
        (Vec::new(), Vec::new())
    };
    Plan { expert_counts, expert_offsets, row_source, pair_row, rank_counts, rank_offsets, errors }
}

/// Gathers token rows of `x` ([T, H]) into the plan's layout: [rows in use, H], padding rows zero,
/// each row times `pair_scale[pair]` when given.
pub fn permute(plan: &Plan, x: &[f32], hidden: usize, k: usize, pair_scale: Option<&[f32]>) -> Vec<f32> {
    let mut out = vec![0.0f32; plan.row_source.len() * hidden];
    for (row, &src) in plan.row_source.iter().enumerate() {
        if src < 0 {
            continue;
        }
        let t = src as usize / k;
        let scale = pair_scale.map_or(1.0, |s| s[src as usize]);
        let dst = &mut out[row * hidden..(row + 1) * hidden];
        for (d, &v) in dst.iter_mut().zip(&x[t * hidden..(t + 1) * hidden]) {
            *d = if pair_scale.is_some() { v * scale } else { v };
        }
    }
    out
}

/// `out[t] = residual[t] + sum over slots s (in order) of weights[t, s] * y[pair_row[t, s]]`, in fp32;
/// pairs with no row add nothing.
pub fn combine(
    pair_row: &[i32],
    y: &[f32],
    hidden: usize,
    k: usize,
    weights: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let tokens = pair_row.len() / k;
    let rows = y.len() / hidden.max(1);
    let mut out = match residual {
        Some(r) => r[..tokens * hidden].to_vec(),
        None => vec![0.0f32; tokens * hidden],
    };
    for t in 0..tokens {
        let acc = &mut out[t * hidden..(t + 1) * hidden];
        for s in 0..k {
            let p = t * k + s;
            let row = pair_row[p];
            if row < 0 || row as usize >= rows {
                continue;
            }
            let w = weights.map_or(1.0, |w| w[p]);
            let src = &y[row as usize * hidden..(row as usize + 1) * hidden];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a += w * v;
            }
        }
    }
    out
}
