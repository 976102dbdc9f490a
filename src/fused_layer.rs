//! The fused implementation of the MoE layer (docs/fused-layer.md): which implementation a call runs,
//! the fused kernel's counters, and its launch after route and plan. The kernel itself is
//! `cuda/fused_layer.cu`; [`crate::layer`] validates the call and carves the workspace.

use crate::error::{bail, Result};
use crate::layer::LayerImpl;
use crate::sys;
use std::sync::OnceLock;

/// Rows of the smallest m-tile among the fused kernel's tile shapes: the counters are sized for it,
/// so they suffice for every shape.
const MIN_TILE_ROWS: i64 = 32;

/// The environment's replacement for [`LayerImpl::Auto`], read once per process (unset, unknown or
/// `auto`: none).
fn env_impl() -> LayerImpl {
    static CHOICE: OnceLock<LayerImpl> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        std::env::var("MOEK_LAYER_IMPL").ok().and_then(|v| LayerImpl::from_name(&v)).unwrap_or_default()
    })
}

/// The implementation a layer call runs: the requested one, or for [`LayerImpl::Auto`] the
/// environment's override, else the heuristic. Refuses values outside the enum.
pub(crate) fn resolve(a: &sys::moek_layer_args) -> Result<LayerImpl> {
    let requested = LayerImpl::from_raw(a.implementation)?;
    let chosen = match requested {
        LayerImpl::Auto => env_impl(),
        other => other,
    };
    Ok(match chosen {
        // The heuristic: the composed pipeline until H200 measurements say where the fused kernel
        // wins (it has no split-K, so decode shapes with few weight tiles favour the composed GEMMs).
        LayerImpl::Auto => LayerImpl::Composed,
        other => other,
    })
}

/// m-tiles of `bm` rows the plan's layout can need over `max_rows` rows of `e` experts (each expert's
/// last tile may be partial), as the kernel's `m_tile_bound`.
fn m_tile_bound(max_rows: i64, e: i64, bm: i64) -> i64 {
    (max_rows + e * (bm - 1)) / bm
}

/// Counter words (u32) the fused kernel needs: the ticket, one per m-tile, one per expert.
pub(crate) fn counter_words(max_rows: i64, num_experts: i64) -> i64 {
    1 + m_tile_bound(max_rows, num_experts, MIN_TILE_ROWS) + num_experts
}

/// Checks that the fused kernel's work items fit its 32-bit ticket (they do for every realistic shape).
pub(crate) fn check_shape(a: &sys::moek_layer_args, max_rows: i64) -> Result<()> {
    let e = i64::from(a.routing.num_experts);
    let n1 = (a.intermediate + MIN_TILE_ROWS - 1) / MIN_TILE_ROWS;
    let n2 = (a.hidden + 63) / 64;
    let items = m_tile_bound(max_rows, e, MIN_TILE_ROWS)
        .checked_mul(n1 + n2)
        .and_then(|v| v.checked_add(a.num_tokens))
        .unwrap_or(i64::MAX);
    if items >= 1 << 31 {
        bail!(InvalidValue, "implementation = FUSED: {items} work items exceed the fused kernel's 2^31 (use COMPOSED)");
    }
    Ok(())
}

/// The tile shape of the fused kernel: by the average rows per expert, as the grouped GEMM's AUTO
/// chooses among its portable shapes; `MOEK_LAYER_FUSED_TILE=small|medium|large` (read once) forces one.
pub(crate) fn tile(max_rows: i64, num_experts: i32) -> sys::moek_gemm_tile {
    static FORCED: OnceLock<Option<sys::moek_gemm_tile>> = OnceLock::new();
    let forced = FORCED.get_or_init(|| {
        std::env::var("MOEK_LAYER_FUSED_TILE").ok().and_then(|v| match v.trim() {
            "small" => Some(sys::moek_gemm_tile_MOEK_GEMM_TILE_SMALL),
            "medium" => Some(sys::moek_gemm_tile_MOEK_GEMM_TILE_MEDIUM),
            "large" => Some(sys::moek_gemm_tile_MOEK_GEMM_TILE_LARGE),
            _ => None,
        })
    });
    if let Some(t) = forced {
        return *t;
    }
    let per_expert = max_rows / i64::from(num_experts.max(1));
    if per_expert <= 32 {
        sys::moek_gemm_tile_MOEK_GEMM_TILE_SMALL
    } else if per_expert <= 64 {
        sys::moek_gemm_tile_MOEK_GEMM_TILE_MEDIUM
    } else {
        sys::moek_gemm_tile_MOEK_GEMM_TILE_LARGE
    }
}

/// Enqueues the fused kernel of a validated layer call.
pub(crate) fn enqueue(
    a: &sys::moek_layer_args,
    buffers: &crate::cuda::FusedBuffers,
    stream: sys::cudaStream_t,
) -> Result<()> {
    let tile = tile(buffers.max_rows, a.routing.num_experts);
    crate::cuda::status(crate::cuda::fused_layer(a, buffers, tile, stream))
}
