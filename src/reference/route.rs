//! CPU reference of routing: the definition the GPU kernels are tested against, written for clarity.
//!
//! Arithmetic is fp32, as on the GPU; candidates are compared by an integer key with the float's order
//! (so -0.0 ranks below +0.0, exactly as the kernels compare), ties going to the lower expert index.

use crate::route::{RoutingConfig, RoutingMode, ScoreFunction};

/// Result of routing T tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// [T, k] expert ids in descending key order; -1 for pairs dropped by the capacity.
    pub ids: Vec<i32>,
    /// [T, k] weights (0 for dropped pairs).
    pub weights: Vec<f32>,
    /// Pairs dropped by the capacity.
    pub dropped: u32,
}

/// Integer with the order of the float (for non-NaN values); never 0.
pub fn ordered_key(f: f32) -> u32 {
    let b = f.to_bits();
    let k = if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 };
    k.max(1)
}

/// The scores of one row of logits (softmax over the row, or sigmoid), in fp32.
pub fn scores(score: ScoreFunction, row: &[f32]) -> Vec<f32> {
    match score {
        ScoreFunction::Softmax => {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
            // Times the reciprocal of the sum, as the kernel does (one division per row, not per expert).
            let inv = 1.0 / exps.iter().sum::<f32>();
            exps.iter().map(|&e| e * inv).collect()
        }
        ScoreFunction::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
    }
}

/// Selection keys: the score plus the bias, when there is one.
pub fn keys(scores: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    match bias {
        Some(b) => scores.iter().zip(b).map(|(&s, &b)| s + b).collect(),
        None => scores.to_vec(),
    }
}

/// True when expert a ranks before expert b.
fn before(keys: &[f32], a: usize, b: usize) -> bool {
    let (ka, kb) = (ordered_key(keys[a]), ordered_key(keys[b]));
    ka > kb || (ka == kb && a < b)
}

/// The n best of `candidates` by key (ties: lower index first), best first.
fn best_of(keys: &[f32], candidates: impl Iterator<Item = usize>, n: usize) -> Vec<usize> {
    let mut all: Vec<usize> = candidates.collect();
    all.sort_by(|&a, &b| if before(keys, a, b) { std::cmp::Ordering::Less } else { std::cmp::Ordering::Greater });
    all.truncate(n);
    all
}

/// DeepSeek-V3 group ranks: the sum of each group's two best keys (its best key for groups of one).
pub fn group_scores(keys: &[f32], num_groups: usize) -> Vec<f32> {
    let size = keys.len() / num_groups;
    (0..num_groups)
        .map(|g| {
            let best = best_of(keys, g * size..(g + 1) * size, 2);
            best.iter().map(|&e| keys[e]).fold(None, |acc: Option<f32>, v| Some(acc.map_or(v, |a| a + v))).unwrap()
        })
        .collect()
}

/// The groups DeepSeek-V3's rule keeps, as a bit mask.
pub fn kept_groups(keys: &[f32], num_groups: usize, topk_groups: usize) -> u64 {
    let gs = group_scores(keys, num_groups);
    let mut order: Vec<usize> = (0..num_groups).collect();
    // Stable sort by descending score keeps the lower group first on ties.
    order.sort_by(|&a, &b| gs[b].partial_cmp(&gs[a]).unwrap_or(std::cmp::Ordering::Equal));
    order[..topk_groups].iter().fold(0u64, |m, &g| m | (1 << g))
}

/// The selected experts of one token, best first, restricted to the groups in `allowed` for the
/// group-limited mode (pass [`kept_groups`] for the reference's own choice).
pub fn select(cfg: &RoutingConfig, keys: &[f32], allowed: u64) -> Vec<usize> {
    let e = cfg.num_experts as usize;
    let k = cfg.k as usize;
    let mut chosen = match cfg.mode {
        RoutingMode::TopK | RoutingMode::Switch => best_of(keys, 0..e, k),
        RoutingMode::GroupLimited { num_groups, .. } => {
            let size = e / num_groups as usize;
            best_of(keys, (0..e).filter(|&x| allowed >> (x / size) & 1 == 1), k)
        }
        RoutingMode::Grouped { num_groups } => {
            let (g, size) = (num_groups as usize, e / num_groups as usize);
            (0..g).flat_map(|grp| best_of(keys, grp * size..(grp + 1) * size, k / g)).collect()
        }
    };
    chosen.sort_by(|&a, &b| if before(keys, a, b) { std::cmp::Ordering::Less } else { std::cmp::Ordering::Greater });
    chosen
}

/// Weights of the chosen experts: their scores, renormalised (summed in the chosen order) and scaled.
pub fn weights(cfg: &RoutingConfig, scores: &[f32], chosen: &[usize]) -> Vec<f32> {
    let sum: f32 = chosen.iter().map(|&e| scores[e]).sum();
    chosen.iter().map(|&e| if cfg.renormalize { scores[e] / sum } else { scores[e] } * cfg.scale).collect()
}

/// Routes `num_tokens` rows of `logits` ([T, E], row-major).
pub fn route(cfg: &RoutingConfig, num_tokens: usize, logits: &[f32], bias: Option<&[f32]>) -> Routing {
    let (e, k) = (cfg.num_experts as usize, cfg.k as usize);
    assert!(logits.len() >= num_tokens * e, "logits shorter than [T, E]");
    let mut ids = Vec::with_capacity(num_tokens * k);
    let mut weights_out = Vec::with_capacity(num_tokens * k);
    for row in logits.chunks_exact(e).take(num_tokens) {
        let s = scores(cfg.score, row);
        let keys = keys(&s, bias);
        let allowed = match cfg.mode {
            RoutingMode::GroupLimited { num_groups, topk_groups } => {
                kept_groups(&keys, num_groups as usize, topk_groups as usize)
            }
            _ => u64::MAX,
        };
        let chosen = select(cfg, &keys, allowed);
        ids.extend(chosen.iter().map(|&x| x as i32));
        weights_out.extend(weights(cfg, &s, &chosen));
    }
    let dropped = apply_capacity(cfg, &mut ids, &mut weights_out);
    Routing { ids, weights: weights_out, dropped }
}

/// Drops pairs beyond `cfg.capacity` per expert, in order of token then slot; returns how many.
pub fn apply_capacity(cfg: &RoutingConfig, ids: &mut [i32], weights: &mut [f32]) -> u32 {
    if cfg.capacity == 0 {
        return 0;
    }
    let mut taken = vec![0u32; cfg.num_experts as usize];
    let mut dropped = 0;
    for (id, w) in ids.iter_mut().zip(weights.iter_mut()) {
        let slot = &mut taken[*id as usize];
        if *slot >= cfg.capacity {
            *id = -1;
            *w = 0.0;
            dropped += 1;
        } else {
            *slot += 1;
        }
    }
    dropped
}
