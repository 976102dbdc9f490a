//! Routing: per-token expert scores and top-k selection (plain, DeepSeek-V3 group-limited, MoGE
//! grouped, Switch top-1 with capacity). The semantics are those of `moek_route` in
//! `include/moe_kernels.h`; [`crate::reference::route`] is the CPU oracle of the same function.

use crate::check;
use crate::dtype::Element;
use crate::error::{bail, Result};
use crate::sys;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// Pairs per chunk of the capacity pass: the workspace holds one counter per (expert, chunk).
pub(crate) const CAPACITY_CHUNK: i64 = 256;

/// How a row of logits becomes expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFunction {
    /// Softmax over the row (Mixtral, Qwen3, Switch).
    Softmax,
    /// Element-wise sigmoid (DeepSeek-V3).
    Sigmoid,
}

/// Which experts may be selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingMode {
    /// The k best keys of the row.
    TopK,
    /// DeepSeek-V3: keep the `topk_groups` best of `num_groups` contiguous groups (ranked by the sum
    /// of their two best keys), then the k best keys inside them.
    GroupLimited { num_groups: u32, topk_groups: u32 },
    /// MoGE (Pangu Pro MoE): k / `num_groups` best keys inside each of `num_groups` groups.
    Grouped { num_groups: u32 },
    /// Switch Transformer: top-1 with an expert capacity (set [`RoutingConfig::capacity`]).
    Switch,
}

/// Everything that defines a routing function, apart from the number of tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoutingConfig {
    /// E, 1..=1024.
    pub num_experts: u32,
    /// Experts per token, 1..=min(E, 32).
    pub k: u32,
    pub score: ScoreFunction,
    pub mode: RoutingMode,
    /// Divide the selected weights by their sum.
    pub renormalize: bool,
    /// Multiplier of the weights (DeepSeek-V3's routed_scaling_factor).
    pub scale: f32,
    /// Pairs kept per expert, in token order (0: no limit; required by [`RoutingMode::Switch`]).
    pub capacity: u32,
}

impl RoutingConfig {
    /// Plain top-k over softmax scores, no renormalisation, scale 1.
    pub fn top_k(num_experts: u32, k: u32) -> Self {
        RoutingConfig {
            num_experts,
            k,
            score: ScoreFunction::Softmax,
            mode: RoutingMode::TopK,
            renormalize: false,
            scale: 1.0,
            capacity: 0,
        }
    }
    /// Mixtral-8x7B: softmax top-2 of 8, renormalised.
    pub fn mixtral() -> Self {
        RoutingConfig { renormalize: true, ..Self::top_k(8, 2) }
    }
    /// Qwen3-30B-A3B: softmax top-8 of 128, renormalised.
    pub fn qwen3_moe() -> Self {
        RoutingConfig { renormalize: true, ..Self::top_k(128, 8) }
    }
    /// DeepSeek-V3: sigmoid scores, correction bias for selection, 8 groups of 32 with the best 4
    /// kept, top-8, renormalised, scaled by 2.5.
    pub fn deepseek_v3() -> Self {
        RoutingConfig {
            num_experts: 256,
            k: 8,
            score: ScoreFunction::Sigmoid,
            mode: RoutingMode::GroupLimited { num_groups: 8, topk_groups: 4 },
            renormalize: true,
            scale: 2.5,
            capacity: 0,
        }
    }
    /// Switch Transformer: softmax top-1 with an expert capacity.
    pub fn switch(num_experts: u32, capacity: u32) -> Self {
        RoutingConfig { mode: RoutingMode::Switch, capacity, ..Self::top_k(num_experts, 1) }
    }
    /// MoGE: softmax, k / num_groups experts inside each group, renormalised.
    pub fn moge(num_experts: u32, num_groups: u32, k: u32) -> Self {
        RoutingConfig { mode: RoutingMode::Grouped { num_groups }, renormalize: true, ..Self::top_k(num_experts, k) }
    }

    /// The C argument struct for this configuration, with every pointer NULL.
    pub fn to_args(&self, num_tokens: usize, logits_dtype: sys::moek_dtype) -> sys::moek_route_args {
        let (mode, num_groups, topk_groups) = match self.mode {
            RoutingMode::TopK => (sys::moek_route_mode_MOEK_ROUTE_TOPK, 0, 0),
            RoutingMode::GroupLimited { num_groups, topk_groups } => {
                (sys::moek_route_mode_MOEK_ROUTE_GROUP_LIMITED, num_groups, topk_groups)
            }
            RoutingMode::Grouped { num_groups } => (sys::moek_route_mode_MOEK_ROUTE_GROUPED, num_groups, 0),
            RoutingMode::Switch => (sys::moek_route_mode_MOEK_ROUTE_SWITCH, 0, 0),
        };
        let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        sys::moek_route_args {
            mode,
            score_function: match self.score {
                ScoreFunction::Softmax => sys::moek_score_function_MOEK_SCORE_SOFTMAX,
                ScoreFunction::Sigmoid => sys::moek_score_function_MOEK_SCORE_SIGMOID,
            },
            logits_dtype,
            num_tokens: i64::try_from(num_tokens).unwrap_or(i64::MAX),
            num_experts: clamp(self.num_experts),
            k: clamp(self.k),
            num_groups: clamp(num_groups),
            topk_groups: clamp(topk_groups),
            capacity: clamp(self.capacity),
            renormalize: self.renormalize as i32,
            scale: self.scale,
            logits: std::ptr::null(),
            bias: std::ptr::null(),
            topk_ids: std::ptr::null_mut(),
            topk_weights: std::ptr::null_mut(),
            dropped_count: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
        }
    }

    /// Checks the configuration (the same checks `moek_route` makes), naming the bad field.
    pub fn validate(&self) -> Result<()> {
        check_shape(&self.to_args(0, sys::moek_dtype_MOEK_DTYPE_F32))
    }

    /// Device workspace bytes [`route`] needs for `num_tokens` tokens (0 without capacity).
    pub fn workspace_bytes(&self, num_tokens: usize) -> Result<usize> {
        workspace_bytes(&self.to_args(num_tokens, sys::moek_dtype_MOEK_DTYPE_F32))
    }
}

/// Checks every field of `args` but the pointers.
pub(crate) fn check_shape(a: &sys::moek_route_args) -> Result<()> {
    if a.mode > sys::moek_route_mode_MOEK_ROUTE_SWITCH {
        bail!(InvalidEnum, "mode = {} is not a moek_route_mode", a.mode);
    }
    if a.score_function > sys::moek_score_function_MOEK_SCORE_SIGMOID {
        bail!(InvalidEnum, "score_function = {} is not a moek_score_function", a.score_function);
    }
    if a.logits_dtype != sys::moek_dtype_MOEK_DTYPE_F32 && a.logits_dtype != sys::moek_dtype_MOEK_DTYPE_BF16 {
        bail!(InvalidDtype, "logits_dtype = {}: routing takes f32 or bf16 logits", a.logits_dtype);
    }
    if a.num_tokens < 0 || a.num_tokens > i64::from(i32::MAX) {
        bail!(InvalidNumTokens, "num_tokens = {} is outside 0..=2^31-1", a.num_tokens);
    }
    let e = a.num_experts;
    if e < 1 || e > sys::MOEK_ROUTE_MAX_EXPERTS as i32 {
        bail!(InvalidNumExperts, "num_experts = {e} is outside 1..={}", sys::MOEK_ROUTE_MAX_EXPERTS);
    }
    if a.k < 1 || a.k > e || a.k > sys::MOEK_ROUTE_MAX_K as i32 {
        bail!(InvalidK, "k = {} is outside 1..=min(num_experts = {e}, {})", a.k, sys::MOEK_ROUTE_MAX_K);
    }
    if !a.scale.is_finite() {
        bail!(InvalidValue, "scale = {} is not finite", a.scale);
    }
    if a.capacity < 0 {
        bail!(InvalidCapacity, "capacity = {} is negative", a.capacity);
    }
    let grouped =
        a.mode == sys::moek_route_mode_MOEK_ROUTE_GROUP_LIMITED || a.mode == sys::moek_route_mode_MOEK_ROUTE_GROUPED;
    if grouped {
        let g = a.num_groups;
        if g < 1 || g > sys::MOEK_ROUTE_MAX_GROUPS as i32 || e % g != 0 {
            bail!(
                InvalidGroups,
                "num_groups = {g} must divide num_experts = {e} and lie in 1..={}",
                sys::MOEK_ROUTE_MAX_GROUPS
            );
        }
    }
    match a.mode {
        sys::moek_route_mode_MOEK_ROUTE_GROUP_LIMITED => {
            let (g, tg) = (a.num_groups, a.topk_groups);
            if tg < 1 || tg > g {
                bail!(InvalidTopkGroups, "topk_groups = {tg} is outside 1..=num_groups = {g}");
            }
            if a.k > tg * (e / g) {
                bail!(
                    InvalidK,
                    "k = {} exceeds the {} experts of the topk_groups = {tg} kept groups",
                    a.k,
                    tg * (e / g)
                );
            }
        }
        sys::moek_route_mode_MOEK_ROUTE_GROUPED if a.k % a.num_groups != 0 => {
            bail!(InvalidGroups, "num_groups = {} does not divide k = {}", a.num_groups, a.k);
        }
        sys::moek_route_mode_MOEK_ROUTE_SWITCH => {
            if a.k != 1 {
                bail!(InvalidK, "k = {}: Switch routing is top-1", a.k);
            }
            if a.capacity == 0 {
                bail!(InvalidCapacity, "capacity = 0: Switch routing needs an expert capacity >= 1");
            }
        }
        _ => {}
    }
    Ok(())
}

/// Workspace bytes for `args` (after [`check_shape`]).
pub(crate) fn workspace_bytes(a: &sys::moek_route_args) -> Result<usize> {
    check_shape(a)?;
    if a.capacity == 0 {
        return Ok(0);
    }
    let pairs = a.num_tokens * i64::from(a.k);
    let chunks = (pairs + CAPACITY_CHUNK - 1) / CAPACITY_CHUNK;
    Ok(usize::try_from(chunks * i64::from(a.num_experts) * 4).expect("fits: T < 2^31, k, E <= 1024"))
}

/// Checks the pointers and workspace of `args` (after [`check_shape`]).
fn check_pointers(a: &sys::moek_route_args) -> Result<()> {
    let has_tokens = a.num_tokens > 0;
    let elem = if a.logits_dtype == sys::moek_dtype_MOEK_DTYPE_F32 { 4 } else { 2 };
    check::pointer("logits", a.logits, has_tokens, elem)?;
    check::pointer("bias", a.bias, false, 4)?;
    check::pointer("topk_ids", a.topk_ids, has_tokens, 4)?;
    check::pointer("topk_weights", a.topk_weights, has_tokens, 4)?;
    check::pointer("dropped_count", a.dropped_count, a.capacity > 0, 4)?;
    let need = workspace_bytes(a)?;
    if a.workspace_bytes < need {
        bail!(WorkspaceTooSmall, "workspace_bytes = {} but this call needs {need}", a.workspace_bytes);
    }
    check::pointer("workspace", a.workspace, need > 0, 4)?;
    Ok(())
}

/// Validates `args` in full, then enqueues the kernels. Shared by the C entry point and [`route`].
pub(crate) fn route_raw(a: &sys::moek_route_args, stream: sys::cudaStream_t) -> Result<()> {
    check_shape(a)?;
    check_pointers(a)?;
    crate::cuda::status(crate::cuda::route(a, CAPACITY_CHUNK as i32, stream))
}

/// Element types routing accepts for logits (f32 and bf16).
pub trait LogitsElem: Element {}
impl LogitsElem for f32 {}
impl LogitsElem for half::bf16 {}

/// Device buffers routing writes.
pub struct RouteOutput<'a> {
    /// [T, k] expert ids, descending by key; `MOEK_DROPPED_ID` (-1) for pairs over capacity.
    pub topk_ids: CudaViewMut<'a, i32>,
    /// [T, k] weights.
    pub topk_weights: CudaViewMut<'a, f32>,
    /// One int32: pairs dropped by the capacity (required when capacity > 0).
    pub dropped_count: Option<CudaViewMut<'a, i32>>,
    /// At least [`RoutingConfig::workspace_bytes`] bytes (required when that is not 0).
    pub workspace: Option<CudaViewMut<'a, u8>>,
}

/// Routes `num_tokens` rows of `logits` ([T, E], f32 or bf16) on `stream`: no allocation, no host
/// synchronisation, capturable in a CUDA graph.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use moe_kernels::route::{route, RouteOutput, RoutingConfig};
/// let ctx = cudarc::driver::CudaContext::new(0)?;
/// let stream = ctx.default_stream();
/// let cfg = RoutingConfig::qwen3_moe();
/// let t = 64;
/// let logits = stream.clone_htod(&vec![0.5f32; t * 128])?;
/// let mut ids = stream.alloc_zeros::<i32>(t * 8)?;
/// let mut weights = stream.alloc_zeros::<f32>(t * 8)?;
/// let mut out = RouteOutput {
///     topk_ids: ids.slice_mut(..),
///     topk_weights: weights.slice_mut(..),
///     dropped_count: None,
///     workspace: None,
/// };
/// route(&stream, &cfg, t, &logits.slice(..), None, &mut out)?;
/// # Ok(()) }
/// ```
pub fn route<L: LogitsElem>(
    stream: &Arc<CudaStream>,
    cfg: &RoutingConfig,
    num_tokens: usize,
    logits: &CudaView<'_, L>,
    bias: Option<&CudaView<'_, f32>>,
    out: &mut RouteOutput<'_>,
) -> Result<()> {
    let mut args = cfg.to_args(num_tokens, L::DTYPE);
    check_shape(&args)?;
    let (t, e, k) = (num_tokens, cfg.num_experts as usize, cfg.k as usize);
    check::length("logits", logits.len(), t * e)?;
    if let Some(b) = bias {
        check::length("bias", b.len(), e)?;
    }
    check::length("topk_ids", out.topk_ids.len(), t * k)?;
    check::length("topk_weights", out.topk_weights.len(), t * k)?;
    if let Some(d) = &out.dropped_count {
        check::length("dropped_count", d.len(), 1)?;
    }
    stream.context().bind_to_thread()?;
    let (logits_ptr, _g1) = logits.device_ptr(stream);
    let bias_ptr = bias.map(|b| b.device_ptr(stream));
    let (ids_ptr, _g2) = out.topk_ids.device_ptr_mut(stream);
    let (w_ptr, _g3) = out.topk_weights.device_ptr_mut(stream);
    let dropped = out.dropped_count.as_mut().map(|d| d.device_ptr_mut(stream));
    let ws_len = out.workspace.as_ref().map_or(0, |w| w.len());
    let workspace = out.workspace.as_mut().map(|w| w.device_ptr_mut(stream));
    args.logits = logits_ptr as *const _;
    args.bias = bias_ptr.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const f32);
    args.topk_ids = ids_ptr as *mut i32;
    args.topk_weights = w_ptr as *mut f32;
    args.dropped_count = dropped.as_ref().map_or(std::ptr::null_mut(), |(p, _)| *p as *mut i32);
    args.workspace = workspace.as_ref().map_or(std::ptr::null_mut(), |(p, _)| *p as *mut _);
    args.workspace_bytes = ws_len;
    route_raw(&args, stream.cu_stream() as sys::cudaStream_t)
}
