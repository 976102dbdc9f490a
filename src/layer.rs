//! A whole MoE layer on one GPU, composed from the crate's kernels: route the router logits, plan the
//! expert-grouped layout, permute the token rows, gate|up projection with the activation, down
//! projection, and the deterministic weighted combine. Six launches (seven with the plan's two kernels),
//! no allocation and no host synchronisation in [`moe_layer`], so a call can be captured in a CUDA graph.
//! [`crate::reference::layer`] is the CPU oracle.
//!
//! Not here yet: shared (always-on) experts, precomputed top-k ids as input, the fused single-kernel
//! form, and a C entry point.

use crate::error::{bail, Result};
use crate::grouped_gemm::{grouped_gemm, ExpertRows, GemmConfig};
use crate::permute::{combine, permute, plan, PlanConfig, PlanOutput, PlanView};
use crate::reference::grouped_gemm::Epilogue;
use crate::route::{route, LogitsElem, RouteOutput, RoutingConfig};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use half::bf16;
use std::sync::Arc;

/// What defines a layer, apart from the number of tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerConfig {
    /// How tokens pick experts (E and k come from here).
    pub routing: RoutingConfig,
    /// H: the model width, a multiple of 8.
    pub hidden: usize,
    /// I: each expert's intermediate width, a multiple of 8.
    pub intermediate: usize,
    /// [`Epilogue::SwiGlu`] (the gate|up weights are [E, 2I, H], gate rows first), or
    /// [`Epilogue::Gelu`] / [`Epilogue::Relu`] (up weights [E, I, H]).
    pub activation: Epilogue,
}

impl LayerConfig {
    /// Rows of each expert's first weight matrix: 2I with SwiGLU, I otherwise.
    pub fn gate_up_rows(&self) -> usize {
        match self.activation {
            Epilogue::SwiGlu => 2 * self.intermediate,
            _ => self.intermediate,
        }
    }

    /// The plan the layer uses: packed rows, no capacity of its own (routing already dropped the pairs
    /// over an expert capacity).
    pub fn plan_config(&self) -> PlanConfig {
        PlanConfig::new(self.routing.num_experts, self.routing.k)
    }

    fn gate_up_gemm(&self) -> GemmConfig {
        GemmConfig {
            epilogue: self.activation,
            ..GemmConfig::new(self.routing.num_experts, self.gate_up_rows(), self.hidden)
        }
    }

    fn down_gemm(&self) -> GemmConfig {
        GemmConfig::new(self.routing.num_experts, self.hidden, self.intermediate)
    }

    /// Checks the configuration, naming the bad field.
    pub fn validate(&self) -> Result<()> {
        self.routing.validate()?;
        if self.activation == Epilogue::Identity {
            bail!(InvalidValue, "activation = Identity: a layer needs SwiGlu, Gelu or Relu");
        }
        if self.hidden == 0 || self.hidden % 8 != 0 {
            bail!(InvalidValue, "hidden = {} must be a positive multiple of 8", self.hidden);
        }
        if self.intermediate == 0 || self.intermediate % 8 != 0 {
            bail!(InvalidValue, "intermediate = {} must be a positive multiple of 8", self.intermediate);
        }
        self.gate_up_gemm().validate::<bf16, bf16>(crate::grouped_gemm::Layout::Contiguous { max_rows: 0 })?;
        self.down_gemm().validate::<bf16, bf16>(crate::grouped_gemm::Layout::Contiguous { max_rows: 0 })
    }
}

/// Device scratch of [`moe_layer`] for up to `max_tokens` tokens: routing results, the plan, and the
/// permuted, intermediate and expert-output rows. Allocated once, outside the run path.
pub struct LayerBuffers {
    max_tokens: usize,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    dropped: CudaSlice<i32>,
    route_workspace: CudaSlice<u8>,
    counts: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    row_source: CudaSlice<i32>,
    pair_row: CudaSlice<i32>,
    errors: CudaSlice<i32>,
    plan_workspace: CudaSlice<u8>,
    rows: CudaSlice<bf16>,
    mid: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
}

impl LayerBuffers {
    /// Allocates the scratch for calls of up to `max_tokens` tokens.
    pub fn new(stream: &Arc<CudaStream>, cfg: &LayerConfig, max_tokens: usize) -> Result<Self> {
        cfg.validate()?;
        let plan_cfg = cfg.plan_config();
        let e = cfg.routing.num_experts as usize;
        let pairs = max_tokens * cfg.routing.k as usize;
        let rows = plan_cfg.max_rows(max_tokens)?;
        // Every buffer gets at least one element: a zero-length allocation has no device pointer.
        let n = |len: usize| len.max(1);
        Ok(LayerBuffers {
            max_tokens,
            ids: stream.alloc_zeros(n(pairs))?,
            weights: stream.alloc_zeros(n(pairs))?,
            dropped: stream.alloc_zeros(1)?,
            route_workspace: stream.alloc_zeros(n(cfg.routing.workspace_bytes(max_tokens)?))?,
            counts: stream.alloc_zeros(e)?,
            offsets: stream.alloc_zeros(e + 1)?,
            row_source: stream.alloc_zeros(n(rows))?,
            pair_row: stream.alloc_zeros(n(pairs))?,
            errors: stream.alloc_zeros(1)?,
            plan_workspace: stream.alloc_zeros(n(plan_cfg.workspace_bytes(max_tokens)?))?,
            rows: stream.alloc_zeros(n(rows * cfg.hidden))?,
            mid: stream.alloc_zeros(n(rows * cfg.intermediate))?,
            down: stream.alloc_zeros(n(rows * cfg.hidden))?,
        })
    }

    /// The most tokens one call may pass.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Rows each expert received in the last call ([E], on the device).
    pub fn expert_counts(&self) -> CudaView<'_, i32> {
        self.counts.slice(..)
    }
}

/// The stages of [`moe_layer`], in order, as passed to [`moe_layer_staged`]'s callback.
pub const STAGES: [&str; 6] = ["route", "plan", "permute", "gate_up", "down", "combine"];

/// `out[t] = sum over token t's experts e of weight(t, e) * down_e(act(gate_up_e(x[t])))`, on `stream`.
/// `x` [T, H] bf16, `logits` [T, E] (f32 or bf16), `bias` [E] (selection only, as DeepSeek-V3's),
/// `w_gate_up` [E, gate_up_rows, H], `w_down` [E, H, I], `out` [T, H] bf16.
#[allow(clippy::too_many_arguments)]
pub fn moe_layer<L: LogitsElem>(
    stream: &Arc<CudaStream>,
    cfg: &LayerConfig,
    num_tokens: usize,
    x: &CudaView<'_, bf16>,
    logits: &CudaView<'_, L>,
    bias: Option<&CudaView<'_, f32>>,
    w_gate_up: &CudaView<'_, bf16>,
    w_down: &CudaView<'_, bf16>,
    buffers: &mut LayerBuffers,
    out: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    moe_layer_staged(stream, cfg, num_tokens, x, logits, bias, w_gate_up, w_down, buffers, out, |_| Ok(()))
}

/// [`moe_layer`], calling `after_stage(name)` once each stage of [`STAGES`] is enqueued (to record
/// timing events between stages, for instance).
#[allow(clippy::too_many_arguments)]
pub fn moe_layer_staged<L: LogitsElem>(
    stream: &Arc<CudaStream>,
    cfg: &LayerConfig,
    num_tokens: usize,
    x: &CudaView<'_, bf16>,
    logits: &CudaView<'_, L>,
    bias: Option<&CudaView<'_, f32>>,
    w_gate_up: &CudaView<'_, bf16>,
    w_down: &CudaView<'_, bf16>,
    buffers: &mut LayerBuffers,
    out: &mut CudaViewMut<'_, bf16>,
    mut after_stage: impl FnMut(&'static str) -> Result<()>,
) -> Result<()> {
    cfg.validate()?;
    if num_tokens > buffers.max_tokens {
        bail!(
            InvalidNumTokens,
            "num_tokens = {num_tokens} but the buffers were sized for {} tokens",
            buffers.max_tokens
        );
    }
    let (t, h) = (num_tokens, cfg.hidden);
    let plan_cfg = cfg.plan_config();
    let b = buffers;
    let mut routed = RouteOutput {
        topk_ids: b.ids.slice_mut(..),
        topk_weights: b.weights.slice_mut(..),
        dropped_count: (cfg.routing.capacity > 0).then(|| b.dropped.slice_mut(..)),
        workspace: Some(b.route_workspace.slice_mut(..)),
    };
    route(stream, &cfg.routing, t, logits, bias, &mut routed)?;
    after_stage("route")?;
    let mut layout = PlanOutput {
        expert_counts: b.counts.slice_mut(..),
        expert_offsets: b.offsets.slice_mut(..),
        row_source: b.row_source.slice_mut(..),
        pair_row: b.pair_row.slice_mut(..),
        rank_counts: None,
        rank_offsets: None,
        error_count: b.errors.slice_mut(..),
        workspace: b.plan_workspace.slice_mut(..),
    };
    plan(stream, &plan_cfg, t, &b.ids.slice(..), &mut layout)?;
    after_stage("plan")?;
    let view = PlanView {
        expert_offsets: b.offsets.slice(..),
        row_source: b.row_source.slice(..),
        pair_row: b.pair_row.slice(..),
    };
    permute(stream, &plan_cfg, t, h, x, &view, None, false, &mut b.rows.slice_mut(..))?;
    after_stage("permute")?;
    let max_rows = plan_cfg.max_rows(t)?;
    let experts = ExpertRows::Contiguous { offsets: b.offsets.slice(..), max_rows };
    let rows = b.rows.slice(..max_rows * h);
    grouped_gemm(stream, &cfg.gate_up_gemm(), &rows, w_gate_up, &experts, None, &mut b.mid.slice_mut(..))?;
    after_stage("gate_up")?;
    let mid = b.mid.slice(..max_rows * cfg.intermediate);
    grouped_gemm(stream, &cfg.down_gemm(), &mid, w_down, &experts, None, &mut b.down.slice_mut(..))?;
    after_stage("down")?;
    let weights = b.weights.slice(..);
    combine(stream, &plan_cfg, t, h, &b.down.slice(..), &b.pair_row.slice(..), Some(&weights), None, out)?;
    after_stage("combine")
}
