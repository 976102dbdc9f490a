//! A whole MoE layer on one GPU, composed from the crate's kernels: route the router logits, plan the
//! expert-grouped layout, permute the token rows, gate|up projection with the activation, down
//! projection, and the deterministic weighted combine. Six launches (seven with the plan's two kernels),
//! no allocation and no host synchronisation in [`moe_layer`], so a call can be captured in a CUDA graph.
//! [`crate::reference::layer`] is the CPU oracle.
//!
//! The C entry point `moek_layer` (include/moe_kernels.h) and [`moe_layer`] share one validation and launch sequence: one
//! workspace, carved into the stages' buffers. Not here yet: shared (always-on) experts, precomputed
//! top-k ids as input, the fused single-kernel form.

use crate::check;
use crate::error::{bail, Result};
use crate::grouped_gemm::{self, GemmConfig, Layout};
use crate::permute::{self, PlanConfig};
use crate::reference::grouped_gemm::Epilogue;
use crate::route::{self, LogitsElem, RoutingConfig};
use crate::sys;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
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
    /// Mixtral-8x7B: top-2 of 8 experts, H = 4096, I = 14336, SwiGLU.
    pub fn mixtral_8x7b() -> Self {
        Self::swiglu(RoutingConfig::mixtral(), 4096, 14336)
    }

    /// Qwen3-30B-A3B: top-8 of 128 experts, H = 2048, I = 768, SwiGLU.
    pub fn qwen3_30b_a3b() -> Self {
        Self::swiglu(RoutingConfig::qwen3_moe(), 2048, 768)
    }

    /// DeepSeek-V3's routing (sigmoid + bias, best 4 of 8 groups, top-8, scale 2.5) over the 32 experts
    /// one GPU holds in an 8-way expert-parallel slice; H = 7168, I = 2048, SwiGLU.
    pub fn deepseek_v3_slice() -> Self {
        let routing = RoutingConfig {
            num_experts: 32,
            mode: crate::route::RoutingMode::GroupLimited { num_groups: 8, topk_groups: 4 },
            ..RoutingConfig::deepseek_v3()
        };
        Self::swiglu(routing, 7168, 2048)
    }

    fn swiglu(routing: RoutingConfig, hidden: usize, intermediate: usize) -> Self {
        LayerConfig { routing, hidden, intermediate, activation: Epilogue::SwiGlu }
    }

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

    /// Checks the configuration, naming the bad field.
    pub fn validate(&self) -> Result<()> {
        carve(&self.to_args(0, sys::moek_dtype_MOEK_DTYPE_F32)).map(|_| ())
    }

    /// Device workspace bytes [`moe_layer`] needs for up to `num_tokens` tokens.
    pub fn workspace_bytes(&self, num_tokens: usize) -> Result<usize> {
        layer_workspace_bytes(&self.to_args(num_tokens, sys::moek_dtype_MOEK_DTYPE_F32))
    }

    /// The C argument struct for this configuration, with every pointer NULL.
    pub fn to_args(&self, num_tokens: usize, logits_dtype: sys::moek_dtype) -> sys::moek_layer_args {
        let wide = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let gemm = GemmConfig { epilogue: self.activation, ..GemmConfig::new(1, 8, 8) };
        sys::moek_layer_args {
            routing: self.routing.to_args(0, logits_dtype),
            num_tokens: wide(num_tokens),
            hidden: wide(self.hidden),
            intermediate: wide(self.intermediate),
            activation: gemm.to_args(Layout::Contiguous { max_rows: 0 }, 0, 0).epilogue,
            x: std::ptr::null(),
            logits: std::ptr::null(),
            bias: std::ptr::null(),
            w_gate_up: std::ptr::null(),
            w_down: std::ptr::null(),
            out: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
        }
    }
}

/// Where the layer's buffers live in its workspace: byte offsets, each 256-byte aligned.
struct Carve {
    t: i64,
    max_rows: i64,
    route_workspace_bytes: usize,
    plan_workspace_bytes: usize,
    ids: usize,
    weights: usize,
    dropped: usize,
    route_workspace: usize,
    counts: usize,
    offsets: usize,
    row_source: usize,
    pair_row: usize,
    errors: usize,
    plan_workspace: usize,
    rows: usize,
    mid: usize,
    down: usize,
    total: usize,
}

/// The routing arguments of a layer call, for `t` tokens (pointers NULL).
fn routing_args(a: &sys::moek_layer_args, t: i64) -> sys::moek_route_args {
    sys::moek_route_args {
        num_tokens: t,
        logits: std::ptr::null(),
        bias: std::ptr::null(),
        topk_ids: std::ptr::null_mut(),
        topk_weights: std::ptr::null_mut(),
        dropped_count: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        workspace_bytes: 0,
        ..a.routing
    }
}

/// The plan configuration of a layer call (packed rows; routing already applied any capacity).
fn plan_args(a: &sys::moek_layer_args) -> sys::moek_plan_args {
    let clamp = |v: i32| u32::try_from(v).unwrap_or(0);
    PlanConfig::new(clamp(a.routing.num_experts), clamp(a.routing.k)).to_args(a.num_tokens.max(0) as usize)
}

/// The two grouped GEMMs of a layer call over `max_rows` rows (pointers NULL).
fn gemm_args(a: &sys::moek_layer_args, max_rows: i64) -> (sys::moek_grouped_gemm_args, sys::moek_grouped_gemm_args) {
    let bf16_dtype = sys::moek_dtype_MOEK_DTYPE_BF16;
    let rows = Layout::Contiguous { max_rows: max_rows as usize };
    let experts = u32::try_from(a.routing.num_experts).unwrap_or(0);
    let (h, i) = (a.hidden.max(0) as usize, a.intermediate.max(0) as usize);
    let mut gate_up = GemmConfig::new(experts, i, h).to_args(rows, bf16_dtype, bf16_dtype);
    gate_up.epilogue = a.activation;
    if a.activation == sys::moek_gemm_epilogue_MOEK_EPILOGUE_SWIGLU {
        gate_up.n = 2 * a.intermediate;
    }
    let down = GemmConfig::new(experts, h, i).to_args(rows, bf16_dtype, bf16_dtype);
    (gate_up, down)
}

/// Checks a layer call's shape fields and lays out its workspace.
fn carve(a: &sys::moek_layer_args) -> Result<Carve> {
    let t = a.num_tokens;
    if !(0..=i64::from(i32::MAX)).contains(&t) {
        bail!(InvalidNumTokens, "num_tokens = {t} is outside 0..=2^31-1");
    }
    let routing = routing_args(a, t);
    route::check_shape(&routing)?;
    let relu = sys::moek_gemm_epilogue_MOEK_EPILOGUE_RELU;
    if a.activation == sys::moek_gemm_epilogue_MOEK_EPILOGUE_IDENTITY || a.activation > relu {
        bail!(InvalidValue, "activation = {}: a layer needs SWIGLU, GELU or RELU", a.activation);
    }
    for (name, v) in [("hidden", a.hidden), ("intermediate", a.intermediate)] {
        if v < 8 || v % 8 != 0 || v > i64::from(i32::MAX) {
            bail!(InvalidValue, "{name} = {v} must be a positive multiple of 8 below 2^31");
        }
    }
    let plan = plan_args(a);
    let max_rows = permute::plan_max_rows(&plan)?;
    let (gate_up, down) = gemm_args(a, max_rows);
    grouped_gemm::check_shape(&gate_up)?;
    grouped_gemm::check_shape(&down)?;
    let (pairs, e) = ((t * i64::from(a.routing.k)) as usize, a.routing.num_experts as usize);
    let rows = max_rows as usize;
    let (h, i) = (a.hidden as usize, a.intermediate as usize);
    let route_workspace_bytes = route::workspace_bytes(&routing)?;
    let plan_workspace_bytes = permute::plan_workspace_bytes(&plan)?;
    let mut total = 0usize;
    let mut take = |bytes: usize| {
        let at = total;
        total += bytes.div_ceil(256) * 256;
        at
    };
    Ok(Carve {
        t,
        max_rows,
        route_workspace_bytes,
        plan_workspace_bytes,
        ids: take(pairs * 4),
        weights: take(pairs * 4),
        dropped: take(4),
        route_workspace: take(route_workspace_bytes),
        counts: take(e * 4),
        offsets: take((e + 1) * 4),
        row_source: take(rows * 4),
        pair_row: take(pairs * 4),
        errors: take(4),
        plan_workspace: take(plan_workspace_bytes),
        rows: take(rows * h * 2),
        mid: take(rows * i * 2),
        down: take(rows * h * 2),
        total: 0,
    })
    .map(|c| Carve { total, ..c })
}

/// Workspace bytes of a layer call (see `moek_layer_workspace_size`).
pub(crate) fn layer_workspace_bytes(a: &sys::moek_layer_args) -> Result<usize> {
    carve(a).map(|c| c.total)
}

/// The stages of a layer call, in order, as passed to [`moe_layer_staged`]'s callback.
pub const STAGES: [&str; 6] = ["route", "plan", "permute", "gate_up", "down", "combine"];

/// Validates a layer call in full, then enqueues its stages, calling `after_stage` once each is
/// enqueued. Shared by the C entry point and [`moe_layer_staged`].
pub(crate) fn layer_raw(
    a: &sys::moek_layer_args,
    stream: sys::cudaStream_t,
    after_stage: &mut dyn FnMut(&'static str) -> Result<()>,
) -> Result<()> {
    let c = carve(a)?;
    let tokens = c.t > 0;
    let logits_align = if a.routing.logits_dtype == sys::moek_dtype_MOEK_DTYPE_BF16 { 2 } else { 4 };
    check::pointer("x", a.x, tokens, 16)?;
    check::pointer("logits", a.logits, tokens, logits_align)?;
    check::pointer("bias", a.bias, false, 4)?;
    check::pointer("w_gate_up", a.w_gate_up, true, 16)?;
    check::pointer("w_down", a.w_down, true, 16)?;
    check::pointer("out", a.out, tokens, 16)?;
    check::pointer("workspace", a.workspace, true, 256)?;
    if a.workspace_bytes < c.total {
        bail!(WorkspaceTooSmall, "workspace_bytes = {} but this call needs {}", a.workspace_bytes, c.total);
    }
    let base = a.workspace as usize;
    let at = |offset: usize| (base + offset) as *mut std::ffi::c_void;
    let ids = at(c.ids) as *mut i32;
    let weights = at(c.weights) as *mut f32;
    let offsets = at(c.offsets) as *mut i32;
    let row_source = at(c.row_source) as *mut i32;
    let pair_row = at(c.pair_row) as *mut i32;
    let mut route_args = routing_args(a, c.t);
    route_args.logits = a.logits;
    route_args.bias = a.bias;
    route_args.topk_ids = ids;
    route_args.topk_weights = weights;
    route_args.dropped_count = at(c.dropped) as *mut i32;
    route_args.workspace = if c.route_workspace_bytes > 0 { at(c.route_workspace) } else { std::ptr::null_mut() };
    route_args.workspace_bytes = c.route_workspace_bytes;
    route::route_raw(&route_args, stream)?;
    after_stage("route")?;

    let mut plan = plan_args(a);
    plan.topk_ids = ids;
    plan.expert_counts = at(c.counts) as *mut i32;
    plan.expert_offsets = offsets;
    plan.row_source = row_source;
    plan.pair_row = pair_row;
    plan.error_count = at(c.errors) as *mut i32;
    plan.workspace = at(c.plan_workspace);
    plan.workspace_bytes = c.plan_workspace_bytes;
    permute::plan_raw(&plan, stream)?;
    after_stage("plan")?;

    let bf16_dtype = sys::moek_dtype_MOEK_DTYPE_BF16;
    let permute_args = sys::moek_permute_args {
        dtype: bf16_dtype,
        num_tokens: c.t,
        k: a.routing.k,
        num_experts: a.routing.num_experts,
        hidden: a.hidden,
        max_rows: c.max_rows,
        x: a.x,
        row_source,
        pair_row,
        expert_offsets: offsets,
        pair_scale: std::ptr::null(),
        zero_padding: 0,
        out: at(c.rows),
    };
    permute::permute_raw(&permute_args, stream)?;
    after_stage("permute")?;

    let (mut gate_up, mut down) = gemm_args(a, c.max_rows);
    gate_up.a = at(c.rows);
    gate_up.b = a.w_gate_up;
    gate_up.expert_offsets = offsets;
    gate_up.out = at(c.mid);
    grouped_gemm::grouped_gemm_raw(&gate_up, stream)?;
    after_stage("gate_up")?;
    down.a = at(c.mid);
    down.b = a.w_down;
    down.expert_offsets = offsets;
    down.out = at(c.down);
    grouped_gemm::grouped_gemm_raw(&down, stream)?;
    after_stage("down")?;

    let combine_args = sys::moek_combine_args {
        dtype: bf16_dtype,
        num_tokens: c.t,
        k: a.routing.k,
        hidden: a.hidden,
        max_rows: c.max_rows,
        y: at(c.down),
        pair_row,
        weights,
        residual: std::ptr::null(),
        out: a.out,
    };
    permute::combine_raw(&combine_args, stream)?;
    after_stage("combine")
}

/// A workspace for [`moe_layer`] calls of up to `max_tokens` tokens, allocated once, outside the run
/// path.
pub struct LayerBuffers {
    max_tokens: usize,
    workspace: CudaSlice<u8>,
}

impl LayerBuffers {
    /// Allocates the workspace for calls of up to `max_tokens` tokens.
    pub fn new(stream: &Arc<CudaStream>, cfg: &LayerConfig, max_tokens: usize) -> Result<Self> {
        let bytes = cfg.workspace_bytes(max_tokens)?;
        Ok(LayerBuffers { max_tokens, workspace: stream.alloc_zeros(bytes.max(256))? })
    }

    /// The most tokens one call may pass.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}

/// `out[t] = sum over token t's experts e of weight(t, e) * down_e(act(gate_up_e(x[t])))`, on `stream`.
/// `x` `[T, H]` bf16, `logits` `[T, E]` (f32 or bf16), `bias` `[E]` (selection only, as DeepSeek-V3's),
/// `w_gate_up` `[E, gate_up_rows, H]`, `w_down` `[E, H, I]`, `out` `[T, H]` bf16.
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
    let mut a = cfg.to_args(num_tokens, L::DTYPE);
    carve(&a)?;
    if num_tokens > buffers.max_tokens {
        bail!(InvalidNumTokens, "num_tokens = {num_tokens} but the buffers were sized for {}", buffers.max_tokens);
    }
    let (t, e, h) = (num_tokens, cfg.routing.num_experts as usize, cfg.hidden);
    check::length("x", x.len(), t * h)?;
    check::length("logits", logits.len(), t * e)?;
    if let Some(b) = bias {
        check::length("bias", b.len(), e)?;
    }
    check::length("w_gate_up", w_gate_up.len(), e * cfg.gate_up_rows() * h)?;
    check::length("w_down", w_down.len(), e * h * cfg.intermediate)?;
    check::length("out", out.len(), t * h)?;
    stream.context().bind_to_thread()?;
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (logits_ptr, _g1) = logits.device_ptr(stream);
    let bias_ptr = bias.map(|b| b.device_ptr(stream));
    let (w1, _g2) = w_gate_up.device_ptr(stream);
    let (w2, _g3) = w_down.device_ptr(stream);
    let ws_len = buffers.workspace.len();
    let (ws, _g4) = buffers.workspace.device_ptr_mut(stream);
    let (out_ptr, _g5) = out.device_ptr_mut(stream);
    a.x = x_ptr as *const _;
    a.logits = logits_ptr as *const _;
    a.bias = bias_ptr.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const f32);
    a.w_gate_up = w1 as *const _;
    a.w_down = w2 as *const _;
    a.out = out_ptr as *mut _;
    a.workspace = ws as *mut _;
    a.workspace_bytes = ws_len;
    layer_raw(&a, stream.cu_stream() as sys::cudaStream_t, &mut after_stage)
}
