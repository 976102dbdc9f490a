//! Low-dimension expert parallelism (BigMac, Jin et al., AAAI 2025: descend, communicate, communicate,
//! ascend): tokens cross NVLink at a projected width r instead of the model width H.
//!
//! Dispatch projects each token down first, `x[T, H] · W_down^T` (W_down stored [r, H], the grouped
//! GEMM's [N, K]), then sends the T x r rows; the experts work at width r on what arrives. Combine
//! returns and weights the expert outputs at width r and only then projects up, `· W_up^T` (W_up stored
//! [H, r]), and adds the residual: the weighted sum over a token's slots is linear, so the ascend runs
//! once per token (T rows) rather than once per pair (T x k rows).
//!
//! Composed, not fused: a one-expert grouped GEMM ([`crate::grouped_gemm`]) before
//! [`EpRank::dispatch`], [`EpRank::combine`] at width r, a second one-expert grouped GEMM, and the
//! residual as a separate in-place add (`cuda/low_dim.cu`; the GEMM has no residual epilogue). Every
//! call enqueues only: no allocation, no host synchronisation, so a round captures into a CUDA graph.
//! [`crate::reference::low_dim`] is the CPU oracle.

use super::{EpConfig, EpRank, ExpertOutput};
use crate::check;
use crate::error::{bail, Result};
use crate::grouped_gemm::{self, GemmConfig, GemmInput, Layout};
use crate::sys;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, ValidAsZeroBits};
use std::collections::BTreeSet;
use std::ffi::c_void;
use std::marker::PhantomData;

/// The shape of a low-dimension group: the expert-parallel configuration at the projected width
/// (`ep.hidden` is r) and the model width H.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowDimConfig {
    /// The group the rows cross at width r: `ep.hidden` = r, a multiple of 8; dtype bf16 or f16.
    pub ep: EpConfig,
    /// H: the model width (x, the residual and the output), a multiple of 8.
    pub hidden: usize,
}

impl LowDimConfig {
    /// r: the projected width the rows travel at.
    pub fn projected(&self) -> usize {
        self.ep.hidden
    }

    /// Checks the shape, naming the bad field: the group's own checks, r and H multiples of 8, a
    /// dtype the projections' GEMM takes.
    pub fn validate(&self) -> Result<()> {
        let bf16 = sys::moek_dtype_MOEK_DTYPE_BF16;
        let f16 = sys::moek_dtype_MOEK_DTYPE_F16;
        if self.ep.dtype != bf16 && self.ep.dtype != f16 {
            bail!(InvalidDtype, "dtype = {} must be bf16 or f16 (the projections are GEMMs)", self.ep.dtype);
        }
        let r = self.ep.hidden;
        if r < 8 || r % 8 != 0 {
            bail!(InvalidValue, "projected width r (ep.hidden) = {r} must be a positive multiple of 8");
        }
        if self.hidden < 8 || self.hidden % 8 != 0 || self.hidden > i32::MAX as usize {
            bail!(InvalidValue, "hidden (H) = {} must be a positive multiple of 8 below 2^31", self.hidden);
        }
        self.ep.layout()?;
        self.descend().validate::<half::bf16, half::bf16>(Layout::Contiguous { max_rows: self.ep.max_tokens })?;
        self.ascend().validate::<half::bf16, half::bf16>(Layout::Contiguous { max_rows: self.ep.max_tokens })
    }

    /// Checks a dispatch's token count and buffer lengths (elements).
    pub fn check_dispatch(
        &self,
        num_tokens: usize,
        x: usize,
        w_down: usize,
        topk_ids: usize,
        topk_weights: Option<usize>,
    ) -> Result<()> {
        self.check_tokens(num_tokens)?;
        check::length("x", x, num_tokens * self.hidden)?;
        check::length("w_down", w_down, self.projected() * self.hidden)?;
        check::length("topk_ids", topk_ids, num_tokens * self.ep.k as usize)?;
        if let Some(w) = topk_weights {
            check::length("topk_weights", w, num_tokens * self.ep.k as usize)?;
        }
        Ok(())
    }

    /// Checks a combine's token count and buffer lengths (elements; `None` for an absent buffer).
    pub fn check_combine(&self, num_tokens: usize, w_up: usize, residual: Option<usize>, out: usize) -> Result<()> {
        self.check_tokens(num_tokens)?;
        check::length("w_up", w_up, self.hidden * self.projected())?;
        if let Some(r) = residual {
            check::length("residual", r, num_tokens * self.hidden)?;
        }
        check::length("out", out, num_tokens * self.hidden)
    }

    fn check_tokens(&self, num_tokens: usize) -> Result<()> {
        if num_tokens > self.ep.max_tokens {
            bail!(InvalidNumTokens, "num_tokens = {num_tokens} is outside 0..={}", self.ep.max_tokens);
        }
        Ok(())
    }

    /// Split-K space for both projections, the largest any call of 1..=max_tokens rows can use. Only
    /// the first [`SPLIT_SCAN_ROWS`] row counts are asked: the automatic split serves few tiles, and far
    /// fewer rows than that already make enough (a call beyond them given less space does not split).
    fn split_workspace_bytes(&self) -> Result<usize> {
        let mut bytes = 0;
        for m in 1..=self.ep.max_tokens.min(SPLIT_SCAN_ROWS) {
            let layout = Layout::Contiguous { max_rows: m };
            bytes = bytes.max(self.descend().workspace_bytes(layout)?).max(self.ascend().workspace_bytes(layout)?);
        }
        Ok(bytes)
    }

    /// The descend projection as a one-expert GEMM: [T, H] · [r, H]^T.
    fn descend(&self) -> GemmConfig {
        GemmConfig::new(1, self.projected(), self.hidden)
    }

    /// The ascend projection: [T, r] · [H, r]^T.
    fn ascend(&self) -> GemmConfig {
        GemmConfig::new(1, self.hidden, self.projected())
    }
}

/// Row counts [`LowDimConfig::split_workspace_bytes`] asks about (the automatic split aims at 768 CTAs
/// of at least 32 rows each, so beyond a few thousand rows it never splits).
const SPLIT_SCAN_ROWS: usize = 65536;

/// One rank of a low-dimension group: an [`EpRank`] made for width r (from a [`super::PeerGroup`] or an
/// [`super::IpcRank`]) and the low-dimension workspace the projections need, allocated once here.
/// Every rank makes the same calls in the same order, as with [`EpRank`]. The calls are the C
/// interface's (`moek_ep_low_dim_dispatch` / `_combine`) on that workspace, so one code path serves both.
pub struct LowDimRank<'a, T: GemmInput + ValidAsZeroBits> {
    ep: &'a EpRank,
    config: LowDimConfig,
    /// The C path's workspace (see [`Carve`]): the projected and combined rows ([max_tokens, r] each),
    /// the one-expert GEMMs' offsets and their split-K space.
    workspace: CudaSlice<u8>,
    carve: Carve,
    _rows: PhantomData<T>,
}

impl<'a, T: GemmInput + ValidAsZeroBits> LowDimRank<'a, T> {
    /// Wraps `ep` (whose configuration's `hidden` is r) for model width `hidden` (H): checks the shape,
    /// allocates the workspace, and runs each kernel the projections can use once on scratch rows (returns
    /// after they finished). The warm-up is what makes one-process groups safe: with lazy module loading a
    /// kernel's first launch waits for the device's running kernels, and the ascend is launched right
    /// after a combine that spins until the other ranks' combines are enqueued (docs/expert-parallel.md).
    pub fn new(ep: &'a EpRank, hidden: usize) -> Result<Self> {
        let config = LowDimConfig { ep: *ep.config(), hidden };
        if T::DTYPE != config.ep.dtype {
            bail!(InvalidDtype, "the group was made for dtype {} but T is {}", config.ep.dtype, T::DTYPE);
        }
        config.validate()?;
        let stream = ep.stream();
        stream.context().bind_to_thread()?;
        let bytes = workspace_bytes_for(&config)?;
        let workspace = stream.alloc_zeros::<u8>(bytes)?;
        let carve = carve(&config, bytes);
        let me = LowDimRank { ep, config, workspace, carve, _rows: PhantomData };
        me.warm_up()?;
        Ok(me)
    }

    /// Launches, on scratch rows, one projection of each distinct kernel plan (tile, K slices) a call
    /// of 1..=max_tokens rows can take, and the residual add; waits for them.
    fn warm_up(&self) -> Result<()> {
        let (rows, h) = (self.config.ep.max_tokens, self.config.hidden);
        if rows == 0 {
            return Ok(());
        }
        let stream = self.ep.stream().clone();
        let cu = stream.cu_stream() as sys::cudaStream_t;
        // Zeros: the values do not matter, only that each kernel is loaded.
        let mut scratch = stream.alloc_zeros::<T>(rows * h)?;
        let w = stream.alloc_zeros::<T>(h * self.config.projected())?;
        let (sp, _g0) = scratch.device_ptr_mut(&stream);
        let (wp, _g1) = w.device_ptr(&stream);
        let (ws, _g2) = self.workspace.device_ptr(&stream);
        let (sp, wp, ws) = (sp as *mut c_void, wp as *const c_void, ws as *mut u8);
        // SAFETY: inside the workspace (allocated for this carve).
        let combined = unsafe { ws.add(self.carve.combined) } as *mut c_void;
        let dtype = self.config.ep.dtype;
        let (mut down, mut up) = (BTreeSet::new(), BTreeSet::new());
        for m in 1..=rows {
            let layout = Layout::Contiguous { max_rows: m };
            if down.insert(grouped_gemm::kernel_plan::<T, T>(&self.config.descend(), layout)?) {
                project(&self.config.descend(), dtype, m, sp, wp, ws as *mut c_void, ws, &self.carve, cu)?;
            }
            if up.insert(grouped_gemm::kernel_plan::<T, T>(&self.config.ascend(), layout)?) {
                project(&self.config.ascend(), dtype, m, combined, wp, sp, ws, &self.carve, cu)?;
            }
        }
        let code = crate::cuda::add_residual(dtype, sp, sp as *const c_void, (rows * h) as i64, cu);
        crate::cuda::status(code)?;
        stream.synchronize()?;
        Ok(())
    }

    /// The C description of this rank's low-dimension group.
    fn group(&self) -> Result<sys::moek_ep_low_dim_group> {
        let (ws, _g) = self.workspace.device_ptr(self.ep.stream());
        Ok(sys::moek_ep_low_dim_group {
            group: self.ep.group()?,
            model_hidden: self.config.hidden as i64,
            low_dim_workspace: ws as *mut c_void,
            low_dim_workspace_bytes: self.workspace.len(),
        })
    }

    /// The wrapped rank (its stream, received rows at width r, layout).
    pub fn ep(&self) -> &'a EpRank {
        self.ep
    }

    /// The group's shape.
    pub fn config(&self) -> &LowDimConfig {
        &self.config
    }

    /// Projects this rank's `num_tokens` rows of `x` ([T, H]) down with `w_down` ([r, H]) and sends
    /// them, r wide, to the owners of their `topk_ids` ([T, k]) with their `topk_weights` (`None`: 1),
    /// like [`EpRank::dispatch`]: the received rows (`ep().received_rows_ptr()`, r wide) and their
    /// per-local-expert offsets (`received_offsets`, `E/R + 1` entries) are the experts' input.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &mut self,
        num_tokens: usize,
        x: &CudaView<'_, T>,
        w_down: &CudaView<'_, T>,
        topk_ids: &CudaView<'_, i32>,
        topk_weights: Option<&CudaView<'_, f32>>,
        received_offsets: &mut CudaViewMut<'_, i32>,
    ) -> Result<()> {
        self.config.check_dispatch(num_tokens, x.len(), w_down.len(), topk_ids.len(), topk_weights.map(|w| w.len()))?;
        check::length("received_offsets", received_offsets.len(), self.config.ep.local_experts() + 1)?;
        let stream = self.ep.stream().clone();
        stream.context().bind_to_thread()?;
        let (xp, _g0) = x.device_ptr(&stream);
        let (wp, _g1) = w_down.device_ptr(&stream);
        let (ids, _g2) = topk_ids.device_ptr(&stream);
        let weights = topk_weights.map(|w| w.device_ptr(&stream));
        let (offs, _g3) = received_offsets.device_ptr_mut(&stream);
        let a = sys::moek_ep_low_dim_dispatch_args {
            group: self.group()?,
            num_tokens: num_tokens as i64,
            x: xp as *const c_void,
            w_down: wp as *const c_void,
            topk_ids: ids as *const i32,
            topk_weights: weights.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const f32),
            received_expert_offsets: offs as *mut i32,
        };
        low_dim_dispatch_raw(&a, stream.cu_stream() as sys::cudaStream_t)
    }

    /// Returns the expert outputs (r wide; in place in the received rows or in a buffer, as for
    /// [`EpRank::combine`]) and writes, for this rank's `num_tokens` tokens,
    /// `out[t] = residual[t] + (sum_s weights[t, s] * output of (t, s)) · w_up^T` (the dispatch's
    /// weights; each owner's sum rounded to T as in [`EpRank::combine`]) with `w_up` [H, r]
    /// and `out` [T, H]. The weighted sum is rounded to T at width r before the ascend projection, and
    /// the projection to T before the residual is added (fp32 sum).
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        &mut self,
        num_tokens: usize,
        expert_out: ExpertOutput<'_, T>,
        w_up: &CudaView<'_, T>,
        residual: Option<&CudaView<'_, T>>,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        let c = self.config;
        c.check_combine(num_tokens, w_up.len(), residual.map(|r| r.len()), out.len())?;
        let stream = self.ep.stream().clone();
        stream.context().bind_to_thread()?;
        let buffer = match &expert_out {
            ExpertOutput::Received => None,
            ExpertOutput::Buffer(v) => {
                check::length("expert_out", v.len(), self.ep.layout().max_received_rows * c.projected())?;
                Some(v.device_ptr(&stream))
            }
        };
        let eo = buffer.as_ref().map_or(self.ep.received_rows_ptr(), |(p, _)| *p);
        let (wp, _g0) = w_up.device_ptr(&stream);
        let residual = residual.map(|r| r.device_ptr(&stream));
        let (op, _g1) = out.device_ptr_mut(&stream);
        let a = sys::moek_ep_low_dim_combine_args {
            group: self.group()?,
            num_tokens: num_tokens as i64,
            expert_out: eo as *const c_void,
            w_up: wp as *const c_void,
            residual: residual.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const c_void),
            out: op as *mut c_void,
        };
        low_dim_combine_raw(&a, stream.cu_stream() as sys::cudaStream_t)
    }
}

// ---- the C interface (moek_ep_low_dim_*): the same steps on the caller's buffers ----

/// Where the C path keeps its buffers inside the caller's low-dimension workspace (byte offsets): at 0
/// the descend projection's output [max_tokens, r] (what dispatch sends), then:
struct Carve {
    /// [max_tokens, r]: the combine's weighted sums (what the ascend projects).
    combined: usize,
    /// Two i32: the one-expert GEMMs' offsets.
    offsets: usize,
    /// The projections' split-K space: where it starts, and how much of it the caller gave.
    split: usize,
    split_bytes: usize,
}

const CARVE_ALIGN: usize = 256;

/// The carve of a workspace of `workspace_bytes` for `c` (the split-K space is what lies past `split`).
fn carve(c: &LowDimConfig, workspace_bytes: usize) -> Carve {
    let elem = crate::dtype::size_of(c.ep.dtype).unwrap_or(2);
    let rows = (c.ep.max_tokens.max(1) * c.projected() * elem).div_ceil(CARVE_ALIGN) * CARVE_ALIGN;
    let split = 2 * rows + CARVE_ALIGN;
    Carve { combined: rows, offsets: 2 * rows, split, split_bytes: workspace_bytes.saturating_sub(split) }
}

/// Bytes of a low-dimension workspace for `c`: the fixed part and the most split-K space any call can use.
fn workspace_bytes_for(c: &LowDimConfig) -> Result<usize> {
    Ok(carve(c, 0).split + c.split_workspace_bytes()?)
}

/// The low-dimension shape of a C group, checked (every field of the configuration but the rank, r,
/// H, the dtype).
fn config_of(g: &sys::moek_ep_low_dim_group) -> Result<LowDimConfig> {
    let c = &g.group.config;
    super::layout(c)?; // the field checks, before any cast below
    let ep = EpConfig {
        num_ranks: c.num_ranks as u32,
        num_experts: c.num_experts as u32,
        k: c.k as u32,
        hidden: c.hidden as usize,
        max_tokens: c.max_tokens as usize,
        dtype: c.dtype,
        capacity: c.capacity as usize,
    };
    if g.model_hidden < 8 || g.model_hidden % 8 != 0 || g.model_hidden > i64::from(i32::MAX) {
        bail!(InvalidValue, "model_hidden (H) = {} must be a positive multiple of 8 below 2^31", g.model_hidden);
    }
    let config = LowDimConfig { ep, hidden: g.model_hidden as usize };
    config.validate()?;
    Ok(config)
}

/// Checks the low-dimension workspace and the token count; returns the shape and the carve.
fn check_low_dim(g: &sys::moek_ep_low_dim_group, num_tokens: i64) -> Result<(LowDimConfig, Carve)> {
    let config = config_of(g)?;
    if num_tokens < 0 || num_tokens as usize > config.ep.max_tokens {
        bail!(InvalidNumTokens, "num_tokens = {num_tokens} is outside 0..={}", config.ep.max_tokens);
    }
    let carve = carve(&config, g.low_dim_workspace_bytes);
    // This call's projections only: two size questions, not the size query's scan over every row count
    // up to max_tokens (thousands of them, on every call).
    let split_need = if num_tokens > 0 {
        let layout = Layout::Contiguous { max_rows: num_tokens as usize };
        config.descend().workspace_bytes(layout)?.max(config.ascend().workspace_bytes(layout)?)
    } else {
        0
    };
    let need = carve.split + split_need;
    if g.low_dim_workspace_bytes < need {
        bail!(
            WorkspaceTooSmall,
            "low_dim_workspace_bytes = {} but this call needs {need} (moek_ep_low_dim_workspace_size: enough for any)",
            g.low_dim_workspace_bytes
        );
    }
    check::pointer("low_dim_workspace", g.low_dim_workspace as *const u8, true, CARVE_ALIGN)?;
    Ok((config, carve))
}

/// See `moek_ep_low_dim_workspace_size` in the header.
pub(crate) fn low_dim_workspace_bytes(g: &sys::moek_ep_low_dim_group) -> Result<usize> {
    workspace_bytes_for(&config_of(g)?)
}

/// One projection of the C path: `out[T, n] = a[T, k] · b[n, k]^T`, a one-expert grouped GEMM over
/// the offsets and split-K space in the low-dimension workspace.
#[allow(clippy::too_many_arguments)]
fn project(
    gemm: &GemmConfig,
    dtype: sys::moek_dtype,
    num_tokens: usize,
    a: *const c_void,
    b: *const c_void,
    out: *mut c_void,
    workspace: *mut u8,
    carve: &Carve,
    stream: sys::cudaStream_t,
) -> Result<()> {
    // SAFETY: the carve lies inside the workspace (checked against low_dim_workspace_bytes).
    let offsets = unsafe { workspace.add(carve.offsets) } as *mut i32;
    crate::cuda::status(crate::cuda::whole_range_offsets(offsets, stream))?;
    let mut args = gemm.to_args(Layout::Contiguous { max_rows: num_tokens }, dtype, dtype);
    args.a = a;
    args.b = b;
    args.out = out;
    args.expert_offsets = offsets;
    args.workspace = unsafe { workspace.add(carve.split) } as *mut c_void;
    args.workspace_bytes = carve.split_bytes;
    grouped_gemm::grouped_gemm_raw(&args, stream)
}

/// See `moek_ep_low_dim_dispatch` in the header: checks everything, then enqueues the descend
/// projection into the workspace and the dispatch of its rows.
pub(crate) fn low_dim_dispatch_raw(a: &sys::moek_ep_low_dim_dispatch_args, stream: sys::cudaStream_t) -> Result<()> {
    let (config, carve) = check_low_dim(&a.group, a.num_tokens)?;
    let tokens = a.num_tokens > 0;
    check::pointer("x", a.x as *const u8, tokens, 16)?;
    check::pointer("w_down", a.w_down as *const u8, tokens, 16)?;
    let workspace = a.group.low_dim_workspace as *mut u8;
    let ep_args = sys::moek_ep_dispatch_args {
        group: a.group.group,
        num_tokens: a.num_tokens,
        x: workspace as *const c_void, // the projected rows, at the carve's start
        topk_ids: a.topk_ids,
        topk_weights: a.topk_weights,
        received_expert_offsets: a.received_expert_offsets,
    };
    let checked = super::check_dispatch(&ep_args)?;
    // T = 0 still joins the exchange (every rank makes every call); it only has nothing to project.
    if tokens {
        let n = a.num_tokens as usize;
        project(
            &config.descend(),
            config.ep.dtype,
            n,
            a.x,
            a.w_down,
            workspace as *mut c_void,
            workspace,
            &carve,
            stream,
        )?;
    }
    super::launch_dispatch(&ep_args, &checked, stream)
}

/// See `moek_ep_low_dim_combine` in the header: checks everything, then enqueues the combine at width
/// r into the workspace, the ascend projection into `out` and the residual add.
pub(crate) fn low_dim_combine_raw(a: &sys::moek_ep_low_dim_combine_args, stream: sys::cudaStream_t) -> Result<()> {
    let (config, carve) = check_low_dim(&a.group, a.num_tokens)?;
    let tokens = a.num_tokens > 0;
    check::pointer("w_up", a.w_up as *const u8, tokens, 16)?;
    check::pointer("residual", a.residual as *const u8, false, 16)?;
    check::pointer("out", a.out as *const u8, tokens, 16)?;
    if tokens && !a.residual.is_null() {
        // The ascend writes out before the residual is read: overlapping buffers would add a sum to itself.
        let bytes = a.num_tokens as usize * config.hidden * crate::dtype::size_of(config.ep.dtype).unwrap_or(2);
        let (r, o) = (a.residual as usize, a.out as usize);
        if r < o + bytes && o < r + bytes {
            bail!(InvalidValue, "residual overlaps out (the ascend projection is written to out first)");
        }
    }
    let workspace = a.group.low_dim_workspace as *mut u8;
    // SAFETY: inside the workspace (the carve was checked against its length).
    let combined = unsafe { workspace.add(carve.combined) } as *mut c_void;
    let ep_args = sys::moek_ep_combine_args {
        group: a.group.group,
        num_tokens: a.num_tokens,
        expert_out: a.expert_out,
        residual: std::ptr::null(), // H wide; the exchange is r wide
        out: combined,
    };
    let checked = super::check_combine(&ep_args)?;
    super::launch_combine(&ep_args, &checked, stream)?;
    if !tokens {
        return Ok(());
    }
    let n = a.num_tokens as usize;
    project(&config.ascend(), config.ep.dtype, n, combined as *const c_void, a.w_up, a.out, workspace, &carve, stream)?;
    if !a.residual.is_null() {
        let elements = (n * config.hidden) as i64;
        crate::cuda::status(crate::cuda::add_residual(config.ep.dtype, a.out, a.residual, elements, stream))?;
    }
    Ok(())
}
