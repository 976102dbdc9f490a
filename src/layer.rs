//! A whole MoE layer on one GPU, composed from the crate's kernels: route the router logits (or take the
//! caller's top-k ids and weights), plan the expert-grouped layout, permute the token rows, gate|up
//! projection with the activation, down projection, the shared (always-on) experts, and the
//! deterministic weighted combine. Seven launches (two more with shared experts), no allocation and no
//! host synchronisation in [`moe_layer`], so a call can be captured in a CUDA graph.
//! [`crate::reference::layer`] is the CPU oracle.
//!
//! The C entry point `moek_layer` (include/moe_kernels.h) and [`moe_layer`] share one validation and
//! launch sequence: one workspace, carved into the stages' buffers. Two implementations
//! ([`LayerImpl`], chosen per call through [`LayerConfig::implementation`]): the composed stages above,
//! or the fused one: route and plan, then one persistent kernel for gate|up, down and the combine
//! (docs/fused-layer.md). Not here yet: a gate on the shared experts' output (Qwen2-MoE).
//!
//! ```no_run
//! use moe_kernels::layer::{moe_layer, LayerBuffers, LayerConfig, LayerInputs, Routing};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ctx = cudarc::driver::CudaContext::new(0)?;
//! let stream = ctx.new_stream()?;
//! let cfg = LayerConfig::qwen3_30b_a3b();
//! let (t, e, h, i) = (64, 128, cfg.hidden, cfg.intermediate);
//! let x = stream.alloc_zeros::<half::bf16>(t * h)?; // the tokens
//! let logits = stream.alloc_zeros::<f32>(t * e)?; // the router's output
//! let w_gate_up = stream.alloc_zeros::<half::bf16>(e * 2 * i * h)?;
//! let w_down = stream.alloc_zeros::<half::bf16>(e * h * i)?;
//! let mut out = stream.alloc_zeros::<half::bf16>(t * h)?;
//! let mut buffers = LayerBuffers::new(&stream, &cfg, t)?; // once, outside the run path
//! let inputs = LayerInputs {
//!     x: x.slice(..),
//!     routing: Routing::Logits { logits: logits.slice(..), bias: None },
//!     w_gate_up: w_gate_up.slice(..),
//!     w_down: w_down.slice(..),
//!     shared: None,
//! };
//! moe_layer(&stream, &cfg, t, &inputs, &mut buffers, &mut out.slice_mut(..))?;
//! # Ok(())
//! # }
//! ```

use crate::check;
use crate::error::{bail, Result};
use crate::fused_layer;
use crate::grouped_gemm::{self, GemmConfig, Layout};
use crate::permute::{self, PlanConfig};
use crate::reference::grouped_gemm::Epilogue;
use crate::route::{self, LogitsElem, RoutingConfig};
use crate::sys;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;
use std::sync::Arc;

/// Which implementation runs a layer call (the C header's `moek_layer_impl`). Both compute the same
/// function and differ only in fp32 summation order; each is bit-identical from run to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LayerImpl {
    /// The library chooses (now: [`LayerImpl::Composed`]); `MOEK_LAYER_IMPL=auto|composed|fused`,
    /// read once per process, replaces this choice.
    #[default]
    Auto,
    /// Route, plan, permute, two grouped GEMMs, combine: a launch (or two) per stage.
    Composed,
    /// Route, plan (and the shared experts' two GEMMs), then one persistent kernel that gathers the
    /// token rows through the plan and runs gate|up, down and the combine (docs/fused-layer.md).
    Fused,
}

impl LayerImpl {
    /// The C enum value.
    pub fn to_raw(self) -> sys::moek_layer_impl {
        match self {
            LayerImpl::Auto => sys::moek_layer_impl_MOEK_LAYER_AUTO,
            LayerImpl::Composed => sys::moek_layer_impl_MOEK_LAYER_COMPOSED,
            LayerImpl::Fused => sys::moek_layer_impl_MOEK_LAYER_FUSED,
        }
    }

    /// The implementation named `auto`, `composed` or `fused` (any case; `MOEK_LAYER_IMPL`'s values).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(LayerImpl::Auto),
            "composed" => Some(LayerImpl::Composed),
            "fused" => Some(LayerImpl::Fused),
            _ => None,
        }
    }

    /// The implementation of a C enum value, refusing values outside the enum.
    pub fn from_raw(raw: sys::moek_layer_impl) -> Result<Self> {
        match raw {
            sys::moek_layer_impl_MOEK_LAYER_AUTO => Ok(LayerImpl::Auto),
            sys::moek_layer_impl_MOEK_LAYER_COMPOSED => Ok(LayerImpl::Composed),
            sys::moek_layer_impl_MOEK_LAYER_FUSED => Ok(LayerImpl::Fused),
            other => bail!(InvalidEnum, "implementation = {other} is not a moek_layer_impl (0, 1 or 2)"),
        }
    }
}

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
    /// I_s: the shared experts' intermediate width, 0 for none (else a multiple of 8). Several shared
    /// experts of width w are one of width S * w (their gate rows, up rows and down columns
    /// concatenated); they use the same activation.
    pub shared_intermediate: usize,
    /// Which implementation runs the calls ([`LayerImpl::Auto`] unless forcing one).
    pub implementation: LayerImpl,
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
        LayerConfig {
            routing,
            hidden,
            intermediate,
            activation: Epilogue::SwiGlu,
            shared_intermediate: 0,
            implementation: LayerImpl::Auto,
        }
    }

    /// Rows of each expert's first weight matrix: 2I with SwiGLU, I otherwise.
    pub fn gate_up_rows(&self) -> usize {
        self.first_rows(self.intermediate)
    }

    /// Rows of the shared experts' first weight matrix: 2 I_s with SwiGLU, I_s otherwise (0 without).
    pub fn shared_gate_up_rows(&self) -> usize {
        self.first_rows(self.shared_intermediate)
    }

    fn first_rows(&self, intermediate: usize) -> usize {
        match self.activation {
            Epilogue::SwiGlu => 2 * intermediate,
            _ => intermediate,
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

    /// Device workspace bytes [`moe_layer`] needs for up to `num_tokens` tokens (enough for either
    /// routing input).
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
            topk_ids: std::ptr::null(),
            topk_weights: std::ptr::null(),
            w_gate_up: std::ptr::null(),
            w_down: std::ptr::null(),
            shared_intermediate: wide(self.shared_intermediate),
            w_shared_gate_up: std::ptr::null(),
            w_shared_down: std::ptr::null(),
            out: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
            implementation: self.implementation.to_raw(),
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
    shared_offsets: usize,
    shared_mid: usize,
    shared_out: usize,
    /// The fused kernel's counters ([`fused_layer::counter_words`] u32).
    counters: usize,
    counter_words: i64,
    /// Split-K room for the grouped GEMMs (the rest of the workspace, see [`split_k_room`]).
    gemm_workspace: usize,
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

/// The two grouped GEMMs of `experts` experts of intermediate width `intermediate` over `max_rows` rows
/// (pointers NULL): the routed experts', or the shared experts' as one expert owning every token.
fn gemm_args(
    a: &sys::moek_layer_args,
    experts: i32,
    intermediate: i64,
    max_rows: i64,
) -> (sys::moek_grouped_gemm_args, sys::moek_grouped_gemm_args) {
    let bf16_dtype = sys::moek_dtype_MOEK_DTYPE_BF16;
    let rows = Layout::Contiguous { max_rows: max_rows as usize };
    let experts = u32::try_from(experts).unwrap_or(0);
    let (h, i) = (a.hidden.max(0) as usize, intermediate.max(0) as usize);
    let mut gate_up = GemmConfig::new(experts, i, h).to_args(rows, bf16_dtype, bf16_dtype);
    gate_up.epilogue = a.activation;
    if a.activation == sys::moek_gemm_epilogue_MOEK_EPILOGUE_SWIGLU {
        gate_up.n = 2 * intermediate;
    }
    let down = GemmConfig::new(experts, h, i).to_args(rows, bf16_dtype, bf16_dtype);
    (gate_up, down)
}

/// Split-K workspace bytes for a layer call of `t` tokens: the most any of its grouped GEMMs asks for at
/// a power-of-two token count up to `t`'s next power of two. Taking the ladder (and not `t` alone) keeps
/// the answer non-decreasing in `t`, so a workspace sized for T serves every smaller call; a call whose
/// own need is larger runs that GEMM unsplit (split_k = 0 splits only when the room suffices), never
/// wrongly. Split-K sums decode shapes with few output tiles in fixed order (deterministic); its need is
/// bounded (a few MB) because it splits only small row counts.
fn split_k_room(a: &sys::moek_layer_args, t: i64) -> Result<usize> {
    let mut room = 0usize;
    let mut p = 1i64;
    while p < 2 * t.max(1) {
        let routed = sys::moek_plan_args { num_tokens: p, ..plan_args(a) };
        let (gate_up, down) = gemm_args(a, a.routing.num_experts, a.intermediate, permute::plan_max_rows(&routed)?);
        room = room.max(grouped_gemm::workspace_bytes(&gate_up)?).max(grouped_gemm::workspace_bytes(&down)?);
        if a.shared_intermediate > 0 {
            let (gate_up, down) = gemm_args(a, 1, a.shared_intermediate, p);
            room = room.max(grouped_gemm::workspace_bytes(&gate_up)?).max(grouped_gemm::workspace_bytes(&down)?);
        }
        p *= 2;
    }
    Ok(room)
}

/// Whether the caller routed the tokens (top-k ids given, no logits): the layer skips its router.
fn caller_routed(a: &sys::moek_layer_args) -> bool {
    a.logits.is_null() && !a.topk_ids.is_null()
}

/// Checks a layer call's shape fields and lays out its workspace.
fn carve(a: &sys::moek_layer_args) -> Result<Carve> {
    let t = a.num_tokens;
    LayerImpl::from_raw(a.implementation)?;
    if !(0..=i64::from(i32::MAX)).contains(&t) {
        bail!(InvalidNumTokens, "num_tokens = {t} is outside 0..=2^31-1");
    }
    let routing = routing_args(a, t);
    // With the caller's ids only E and k matter; the plan checks those.
    if !caller_routed(a) {
        route::check_shape(&routing)?;
    }
    let relu = sys::moek_gemm_epilogue_MOEK_EPILOGUE_RELU;
    if a.activation == sys::moek_gemm_epilogue_MOEK_EPILOGUE_IDENTITY || a.activation > relu {
        bail!(InvalidValue, "activation = {}: a layer needs SWIGLU, GELU or RELU", a.activation);
    }
    for (name, v) in [("hidden", a.hidden), ("intermediate", a.intermediate)] {
        if v < 8 || v % 8 != 0 || v > i64::from(i32::MAX) {
            bail!(InvalidValue, "{name} = {v} must be a positive multiple of 8 below 2^31");
        }
    }
    let shared = a.shared_intermediate;
    if shared != 0 && (shared < 8 || shared % 8 != 0 || shared > i64::from(i32::MAX)) {
        bail!(
            InvalidValue,
            "shared_intermediate = {shared} must be 0 (no shared experts) or a positive multiple of 8 below 2^31"
        );
    }
    let plan = plan_args(a);
    let max_rows = permute::plan_max_rows(&plan)?;
    let (gate_up, down) = gemm_args(a, a.routing.num_experts, a.intermediate, max_rows);
    grouped_gemm::check_shape(&gate_up)?;
    grouped_gemm::check_shape(&down)?;
    if shared > 0 {
        let (gate_up, down) = gemm_args(a, 1, shared, t);
        grouped_gemm::check_shape(&gate_up)?;
        grouped_gemm::check_shape(&down)?;
    }
    let (pairs, e) = ((t * i64::from(a.routing.k)) as usize, a.routing.num_experts as usize);
    let rows = max_rows as usize;
    let (h, i) = (a.hidden as usize, a.intermediate as usize);
    let route_workspace_bytes = if caller_routed(a) { 0 } else { route::workspace_bytes(&routing)? };
    let plan_workspace_bytes = permute::plan_workspace_bytes(&plan)?;
    let gemm_room = split_k_room(a, t)?;
    let counter_words = fused_layer::counter_words(max_rows, i64::from(a.routing.num_experts));
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
        shared_offsets: take(if shared > 0 { 8 } else { 0 }),
        shared_mid: take(t as usize * shared as usize * 2),
        shared_out: take(if shared > 0 { t as usize * h * 2 } else { 0 }),
        counters: take(counter_words as usize * 4),
        counter_words,
        gemm_workspace: take(gemm_room),
        total: 0,
    })
    .map(|c| Carve { total, ..c })
}

/// Workspace bytes of a layer call (see `moek_layer_workspace_size`). The router's workspace is left
/// out when the caller passes top-k ids and no logits.
pub(crate) fn layer_workspace_bytes(a: &sys::moek_layer_args) -> Result<usize> {
    carve(a).map(|c| c.total)
}

/// The stages of a layer call, in order, as passed to [`moe_layer_staged`]'s callback.
/// "route" enqueues nothing when the caller routed the tokens, "shared" nothing without shared experts.
/// With [`LayerImpl::Fused`], "permute", "gate_up" and "down" enqueue nothing and "combine" is the
/// fused kernel (gate|up, down and combine in one launch).
pub const STAGES: [&str; 7] = ["route", "plan", "permute", "gate_up", "down", "shared", "combine"];

/// Every grouped GEMM of a call may split K into the room after the fixed buffers (see split_k_room).
fn with_room(a: &sys::moek_layer_args, c: &Carve, mut g: sys::moek_grouped_gemm_args) -> sys::moek_grouped_gemm_args {
    g.workspace = (a.workspace as usize + c.gemm_workspace) as *mut std::ffi::c_void;
    g.workspace_bytes = a.workspace_bytes - c.gemm_workspace;
    g
}

/// Enqueues the shared experts of a validated call (nothing without them or tokens): one expert that
/// owns every token, straight from x (no permutation). Returns their bf16 output, the combine's
/// residual (NULL when there is none).
fn enqueue_shared(a: &sys::moek_layer_args, c: &Carve, stream: sys::cudaStream_t) -> Result<*const std::ffi::c_void> {
    if a.shared_intermediate == 0 || c.t == 0 {
        return Ok(std::ptr::null());
    }
    let at = |offset: usize| (a.workspace as usize + offset) as *mut std::ffi::c_void;
    let shared_offsets = at(c.shared_offsets) as *mut i32;
    crate::cuda::status(crate::cuda::whole_range_offsets(shared_offsets, stream))?;
    let (gate_up, down) = gemm_args(a, 1, a.shared_intermediate, c.t);
    let (mut gate_up, mut down) = (with_room(a, c, gate_up), with_room(a, c, down));
    gate_up.a = a.x;
    gate_up.b = a.w_shared_gate_up;
    gate_up.expert_offsets = shared_offsets;
    gate_up.out = at(c.shared_mid);
    grouped_gemm::grouped_gemm_raw(&gate_up, stream)?;
    down.a = at(c.shared_mid);
    down.b = a.w_shared_down;
    down.expert_offsets = shared_offsets;
    down.out = at(c.shared_out);
    grouped_gemm::grouped_gemm_raw(&down, stream)?;
    Ok(at(c.shared_out))
}

/// Validates a layer call in full, then enqueues its stages, calling `after_stage` once each is
/// enqueued. Shared by the C entry point and [`moe_layer_staged`].
pub(crate) fn layer_raw(
    a: &sys::moek_layer_args,
    stream: sys::cudaStream_t,
    after_stage: &mut dyn FnMut(&'static str) -> Result<()>,
) -> Result<()> {
    let c = carve(a)?;
    let fused = fused_layer::resolve(a)? == LayerImpl::Fused;
    if fused {
        fused_layer::check_shape(a, c.max_rows)?;
    }
    let tokens = c.t > 0;
    let routed_by_caller = caller_routed(a);
    if !a.logits.is_null() && !a.topk_ids.is_null() {
        bail!(InvalidValue, "logits and topk_ids are both set: pass one routing input");
    }
    check::pointer("x", a.x, tokens, 16)?;
    if routed_by_caller {
        check::pointer("topk_ids", a.topk_ids, tokens, 4)?;
        check::pointer("topk_weights", a.topk_weights, false, 4)?;
        if !a.bias.is_null() {
            bail!(InvalidValue, "bias is set with topk_ids: the bias only steers the layer's own routing");
        }
    } else {
        let logits_align = if a.routing.logits_dtype == sys::moek_dtype_MOEK_DTYPE_BF16 { 2 } else { 4 };
        check::pointer("logits", a.logits, tokens, logits_align)?;
        check::pointer("bias", a.bias, false, 4)?;
        if !a.topk_weights.is_null() {
            bail!(InvalidValue, "topk_weights is set without topk_ids: with logits the layer routes");
        }
    }
    check::pointer("w_gate_up", a.w_gate_up, true, 16)?;
    check::pointer("w_down", a.w_down, true, 16)?;
    let shared = a.shared_intermediate > 0;
    check::pointer("w_shared_gate_up", a.w_shared_gate_up, shared, 16)?;
    check::pointer("w_shared_down", a.w_shared_down, shared, 16)?;
    let shared_weights_given = !a.w_shared_gate_up.is_null() || !a.w_shared_down.is_null();
    if !shared && shared_weights_given {
        bail!(InvalidValue, "shared expert weights are set but shared_intermediate = 0");
    }
    check::pointer("out", a.out, tokens, 16)?;
    check::pointer("workspace", a.workspace, true, 256)?;
    if a.workspace_bytes < c.total {
        bail!(WorkspaceTooSmall, "workspace_bytes = {} but this call needs {}", a.workspace_bytes, c.total);
    }
    let base = a.workspace as usize;
    let at = |offset: usize| (base + offset) as *mut std::ffi::c_void;
    let offsets = at(c.offsets) as *mut i32;
    let row_source = at(c.row_source) as *mut i32;
    let pair_row = at(c.pair_row) as *mut i32;
    let (ids, weights) = if routed_by_caller {
        (a.topk_ids, a.topk_weights)
    } else {
        let ids = at(c.ids) as *mut i32;
        let weights = at(c.weights) as *mut f32;
        let mut route_args = routing_args(a, c.t);
        route_args.logits = a.logits;
        route_args.bias = a.bias;
        route_args.topk_ids = ids;
        route_args.topk_weights = weights;
        route_args.dropped_count = at(c.dropped) as *mut i32;
        route_args.workspace = if c.route_workspace_bytes > 0 { at(c.route_workspace) } else { std::ptr::null_mut() };
        route_args.workspace_bytes = c.route_workspace_bytes;
        route::route_raw(&route_args, stream)?;
        (ids as *const i32, weights as *const f32)
    };
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

    if fused {
        for stage in ["permute", "gate_up", "down"] {
            after_stage(stage)?;
        }
        let residual = enqueue_shared(a, &c, stream)?;
        after_stage("shared")?;
        let buffers = crate::cuda::FusedBuffers {
            topk_ids: ids,
            weights,
            expert_offsets: offsets,
            row_source,
            pair_row,
            max_rows: c.max_rows,
            h: at(c.mid),
            y: at(c.down),
            residual,
            counters: at(c.counters) as *mut u32,
            counter_words: c.counter_words,
        };
        fused_layer::enqueue(a, &buffers, stream)?;
        return after_stage("combine");
    }

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

    let with_room = |g| with_room(a, &c, g);
    let (gate_up, down) = gemm_args(a, a.routing.num_experts, a.intermediate, c.max_rows);
    let (mut gate_up, mut down) = (with_room(gate_up), with_room(down));
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

    let residual = enqueue_shared(a, &c, stream)?;
    after_stage("shared")?;

    let combine_args = sys::moek_combine_args {
        dtype: bf16_dtype,
        num_tokens: c.t,
        k: a.routing.k,
        hidden: a.hidden,
        max_rows: c.max_rows,
        y: at(c.down),
        pair_row,
        weights,
        residual,
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

/// How the tokens of a [`moe_layer`] call pick their experts.
pub enum Routing<'a, L: LogitsElem = f32> {
    /// The layer routes: router `logits` `[T, E]` (f32 or bf16) and the optional selection `bias` `[E]`
    /// (DeepSeek-V3's correction bias), per the [`LayerConfig`]'s routing.
    Logits { logits: CudaView<'a, L>, bias: Option<CudaView<'a, f32>> },
    /// The caller routed: top-k expert `ids` `[T, k]` (-1, or any id outside `0..E`, adds nothing) and
    /// their `weights` `[T, k]` (`None`: every weight 1). Only E and k of the config's routing are read.
    TopK { ids: CudaView<'a, i32>, weights: Option<CudaView<'a, f32>> },
}

/// The shared (always-on) experts' weights: `w_gate_up` `[shared_gate_up_rows, H]` and `w_down`
/// `[H, I_s]`, bf16 (see [`LayerConfig::shared_intermediate`]).
pub struct SharedExperts<'a> {
    pub w_gate_up: CudaView<'a, bf16>,
    pub w_down: CudaView<'a, bf16>,
}

/// The device inputs of a [`moe_layer`] call.
pub struct LayerInputs<'a, L: LogitsElem = f32> {
    /// The tokens `[T, H]`.
    pub x: CudaView<'a, bf16>,
    /// The router's logits or the caller's top-k.
    pub routing: Routing<'a, L>,
    /// `[E, gate_up_rows, H]` (gate rows first with SwiGLU).
    pub w_gate_up: CudaView<'a, bf16>,
    /// `[E, H, I]`.
    pub w_down: CudaView<'a, bf16>,
    /// Required exactly when the config's `shared_intermediate` is not 0.
    pub shared: Option<SharedExperts<'a>>,
}

/// `out[t] = shared(x[t]) + sum over token t's experts e of weight(t, e) * down_e(act(gate_up_e(x[t])))`,
/// on `stream`, `out` `[T, H]` bf16. No allocation, no host synchronisation: capturable in a CUDA graph.
pub fn moe_layer<L: LogitsElem>(
    stream: &Arc<CudaStream>,
    cfg: &LayerConfig,
    num_tokens: usize,
    inputs: &LayerInputs<'_, L>,
    buffers: &mut LayerBuffers,
    out: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    moe_layer_staged(stream, cfg, num_tokens, inputs, buffers, out, |_| Ok(()))
}

/// [`moe_layer`], calling `after_stage(name)` once each stage of [`STAGES`] is enqueued (to record
/// timing events between stages, for instance).
pub fn moe_layer_staged<L: LogitsElem>(
    stream: &Arc<CudaStream>,
    cfg: &LayerConfig,
    num_tokens: usize,
    inputs: &LayerInputs<'_, L>,
    buffers: &mut LayerBuffers,
    out: &mut CudaViewMut<'_, bf16>,
    mut after_stage: impl FnMut(&'static str) -> Result<()>,
) -> Result<()> {
    let mut a = cfg.to_args(num_tokens, L::DTYPE);
    if num_tokens > buffers.max_tokens {
        bail!(InvalidNumTokens, "num_tokens = {num_tokens} but the buffers were sized for {}", buffers.max_tokens);
    }
    let (t, e, h) = (num_tokens, cfg.routing.num_experts as usize, cfg.hidden);
    let k = cfg.routing.k as usize;
    check::length("x", inputs.x.len(), t * h)?;
    match &inputs.routing {
        Routing::Logits { logits, bias } => {
            check::length("logits", logits.len(), t * e)?;
            if let Some(b) = bias {
                check::length("bias", b.len(), e)?;
            }
        }
        Routing::TopK { ids, weights } => {
            check::length("topk_ids", ids.len(), t * k)?;
            if let Some(w) = weights {
                check::length("topk_weights", w.len(), t * k)?;
            }
        }
    }
    check::length("w_gate_up", inputs.w_gate_up.len(), e * cfg.gate_up_rows() * h)?;
    check::length("w_down", inputs.w_down.len(), e * h * cfg.intermediate)?;
    match (&inputs.shared, cfg.shared_intermediate) {
        (None, 0) => {}
        (Some(s), i_s) if i_s > 0 => {
            check::length("shared.w_gate_up", s.w_gate_up.len(), cfg.shared_gate_up_rows() * h)?;
            check::length("shared.w_down", s.w_down.len(), h * i_s)?;
        }
        (None, i_s) => {
            bail!(NullPointer, "shared: the config has shared_intermediate = {i_s} but no weights were given")
        }
        (Some(_), _) => bail!(InvalidValue, "shared: weights given but the config has shared_intermediate = 0"),
    }
    check::length("out", out.len(), t * h)?;
    stream.context().bind_to_thread()?;
    let (x_ptr, _g0) = inputs.x.device_ptr(stream);
    // Device pointers (with their guards) of whichever routing input was given; the others stay NULL.
    let (logits, bias, ids, weights) = match &inputs.routing {
        Routing::Logits { logits, bias } => {
            (Some(logits.device_ptr(stream)), bias.as_ref().map(|b| b.device_ptr(stream)), None, None)
        }
        Routing::TopK { ids, weights } => {
            (None, None, Some(ids.device_ptr(stream)), weights.as_ref().map(|w| w.device_ptr(stream)))
        }
    };
    let (w1, _g2) = inputs.w_gate_up.device_ptr(stream);
    let (w2, _g3) = inputs.w_down.device_ptr(stream);
    let shared_ptrs = inputs.shared.as_ref().map(|s| (s.w_gate_up.device_ptr(stream), s.w_down.device_ptr(stream)));
    let ws_len = buffers.workspace.len();
    let (ws, _g4) = buffers.workspace.device_ptr_mut(stream);
    let (out_ptr, _g5) = out.device_ptr_mut(stream);
    let ptr = |p: &Option<(u64, _)>| p.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const std::ffi::c_void);
    a.x = x_ptr as *const _;
    a.logits = ptr(&logits);
    a.bias = ptr(&bias) as *const f32;
    a.topk_ids = ptr(&ids) as *const i32;
    a.topk_weights = ptr(&weights) as *const f32;
    a.w_gate_up = w1 as *const _;
    a.w_down = w2 as *const _;
    if let Some(((p1, _), (p2, _))) = &shared_ptrs {
        a.w_shared_gate_up = *p1 as *const _;
        a.w_shared_down = *p2 as *const _;
    }
    a.out = out_ptr as *mut _;
    a.workspace = ws as *mut _;
    a.workspace_bytes = ws_len;
    layer_raw(&a, stream.cu_stream() as sys::cudaStream_t, &mut after_stage)
}
