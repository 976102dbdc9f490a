//! CPU reference of a whole MoE layer, composed from the other references: route the logits (or take
//! the given top-k), plan the expert-grouped layout, permute the token rows, gate|up with the
//! activation, down, the shared experts, and the weighted combine. Where the GPU layer
//! ([`crate::layer`]) stores an intermediate in bf16 (the activation, the down projection's rows, the
//! shared experts' output), the reference rounds to bf16 too, so the two differ only by fp32
//! accumulation order.

use super::grouped_gemm::{grouped_gemm, Epilogue};
use super::permute::{combine, permute, plan};
use super::route::route;
use crate::layer::LayerConfig;

/// Rounds every value to the nearest bf16 (what storing it in a bf16 buffer does).
pub fn round_to_bf16(values: &mut [f32]) {
    for v in values {
        *v = half::bf16::from_f32(*v).to_f32();
    }
}

/// How the reference's tokens pick their experts (see [`crate::layer::Routing`]).
pub enum RoutingInput<'a> {
    /// Route router `logits` `[T, E]` with the optional selection `bias` `[E]`.
    Logits { logits: &'a [f32], bias: Option<&'a [f32]> },
    /// The caller's top-k `ids` `[T, k]` and `weights` `[T, k]` (`None`: every weight 1).
    TopK { ids: &'a [i32], weights: Option<&'a [f32]> },
}

/// The shared experts' weights, `[shared_gate_up_rows, H]` and `[H, I_s]`.
pub struct SharedWeights<'a> {
    pub w_gate_up: &'a [f32],
    pub w_down: &'a [f32],
}

/// One expert's two projections on `rows` `[n, H]`: gate|up with the activation, down; each result
/// rounded to bf16 as the GPU stores it.
fn expert(cfg: &LayerConfig, rows: &[f32], w_gate_up: &[f32], w_down: &[f32], intermediate: usize) -> Vec<f32> {
    let h = cfg.hidden;
    let count = [0, (rows.len() / h) as i32];
    let n_gate_up = w_gate_up.len() / h;
    let mut mid = grouped_gemm(rows, w_gate_up, &count, n_gate_up, h, cfg.activation, None);
    round_to_bf16(&mut mid);
    let mut y = grouped_gemm(&mid, w_down, &count, h, intermediate, Epilogue::Identity, None);
    round_to_bf16(&mut y);
    y
}

/// The layer's output `[T, H]` (f32, not rounded) for tokens `x` `[T, H]`, the routing input,
/// `w_gate_up` `[E, gate_up_rows, H]`, `w_down` `[E, H, I]` and the optional shared experts (their
/// output, rounded to bf16, is the combine's residual as on the GPU). `progress(done, total)` is called
/// after each expert's matrix products (the slow part).
#[allow(clippy::too_many_arguments)]
pub fn moe_layer(
    cfg: &LayerConfig,
    num_tokens: usize,
    x: &[f32],
    routing: RoutingInput<'_>,
    w_gate_up: &[f32],
    w_down: &[f32],
    shared: Option<SharedWeights<'_>>,
    mut progress: impl FnMut(usize, usize),
) -> Vec<f32> {
    let (h, i, k) = (cfg.hidden, cfg.intermediate, cfg.routing.k as usize);
    let experts = cfg.routing.num_experts as usize;
    let n_gate_up = cfg.gate_up_rows();
    let routed;
    let (ids, weights) = match routing {
        RoutingInput::Logits { logits, bias } => {
            routed = route(&cfg.routing, num_tokens, logits, bias);
            (&routed.ids[..], Some(&routed.weights[..]))
        }
        RoutingInput::TopK { ids, weights } => (ids, weights),
    };
    let layout = plan(&cfg.plan_config(), num_tokens, ids);
    let rows = permute(&layout, x, h, k, None);
    let mut down = vec![0.0f32; layout.row_source.len() * h];
    for e in 0..experts {
        let (first, last) = (layout.expert_offsets[e] as usize, layout.expert_offsets[e + 1] as usize);
        if last > first {
            let gate_up = &w_gate_up[e * n_gate_up * h..(e + 1) * n_gate_up * h];
            let w = &w_down[e * h * i..(e + 1) * h * i];
            let y = expert(cfg, &rows[first * h..last * h], gate_up, w, i);
            down[first * h..last * h].copy_from_slice(&y);
        }
        progress(e + 1, experts);
    }
    let residual = shared
        .filter(|_| num_tokens > 0)
        .map(|s| expert(cfg, &x[..num_tokens * h], s.w_gate_up, s.w_down, cfg.shared_intermediate));
    combine(&layout.pair_row, &down, h, k, weights, residual.as_deref())
}
