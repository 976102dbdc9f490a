//! CPU reference of a whole MoE layer, composed from the other references: route the logits, plan the
//! expert-grouped layout, permute the token rows, gate|up with the activation, down, and the weighted
//! combine. Where the GPU layer ([`crate::layer`]) stores an intermediate in bf16 (the activation and
//! the down projection's rows), the reference rounds to bf16 too, so the two differ only by fp32
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

/// The layer's output `[T, H]` (f32, not rounded) for tokens `x` `[T, H]`, router `logits` `[T, E]`, the
/// optional selection `bias` `[E]`, `w_gate_up` `[E, gate_up_rows, H]` and `w_down` `[E, H, I]`.
/// `progress(done, total)` is called after each expert's matrix products (the slow part).
#[allow(clippy::too_many_arguments)]
pub fn moe_layer(
    cfg: &LayerConfig,
    num_tokens: usize,
    x: &[f32],
    logits: &[f32],
    bias: Option<&[f32]>,
    w_gate_up: &[f32],
    w_down: &[f32],
    mut progress: impl FnMut(usize, usize),
) -> Vec<f32> {
    let (h, i, k) = (cfg.hidden, cfg.intermediate, cfg.routing.k as usize);
    let experts = cfg.routing.num_experts as usize;
    let n_gate_up = cfg.gate_up_rows();
    let routing = route(&cfg.routing, num_tokens, logits, bias);
    let layout = plan(&cfg.plan_config(), num_tokens, &routing.ids);
    let rows = permute(&layout, x, h, k, None);
    let mut down = vec![0.0f32; layout.row_source.len() * h];
    for e in 0..experts {
        let (first, last) = (layout.expert_offsets[e] as usize, layout.expert_offsets[e + 1] as usize);
        if last > first {
            let count = [0, (last - first) as i32];
            let a = &rows[first * h..last * h];
            let gate_up = &w_gate_up[e * n_gate_up * h..(e + 1) * n_gate_up * h];
            let mut mid = grouped_gemm(a, gate_up, &count, n_gate_up, h, cfg.activation, None);
            round_to_bf16(&mut mid);
            let w = &w_down[e * h * i..(e + 1) * h * i];
            let mut y = grouped_gemm(&mid, w, &count, h, i, Epilogue::Identity, None);
            round_to_bf16(&mut y);
            down[first * h..last * h].copy_from_slice(&y);
        }
        progress(e + 1, experts);
    }
    combine(&layout.pair_row, &down, h, k, Some(&routing.weights), None)
}
