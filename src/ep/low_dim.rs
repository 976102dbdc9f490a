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
use crate::grouped_gemm::{self, ExpertRows, GemmConfig, GemmInput, Layout};
use crate::sys;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, ValidAsZeroBits};
use std::collections::BTreeSet;
use std::ffi::c_void;

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

    /// The descend projection as a one-expert GEMM: [T, H] · [r, H]^T.
    fn descend(&self) -> GemmConfig {
        GemmConfig::new(1, self.projected(), self.hidden)
    }

    /// The ascend projection: [T, r] · [H, r]^T.
    fn ascend(&self) -> GemmConfig {
        GemmConfig::new(1, self.hidden, self.projected())
    }
}

/// One rank of a low-dimension group: an [`EpRank`] made for width r (from a [`super::PeerGroup`] or an
/// [`super::IpcRank`]) and the buffers the projections need, allocated once here. Every rank makes
/// the same calls in the same order, as with [`EpRank`].
pub struct LowDimRank<'a, T: GemmInput + ValidAsZeroBits> {
    ep: &'a EpRank,
    config: LowDimConfig,
    /// [max_tokens, r]: this rank's tokens after the descend projection (what dispatch sends).
    projected: CudaSlice<T>,
    /// [max_tokens, r]: the weighted sum of a token's expert outputs (what the ascend projects).
    combined: CudaSlice<T>,
    /// The one-expert GEMMs' offsets `[0, >= max_rows]`: written once here, since the GEMM clamps them
    /// to the call's `max_rows` (= T), so no call writes them again.
    offsets: CudaSlice<i32>,
    /// Split-K space for the projections (decode: few tokens, K = H long); None when no split needs any.
    workspace: Option<CudaSlice<u8>>,
}

impl<'a, T: GemmInput + ValidAsZeroBits> LowDimRank<'a, T> {
    /// Wraps `ep` (whose configuration's `hidden` is r) for model width `hidden` (H): checks the shape,
    /// allocates the buffers, and runs each kernel the projections can use once on scratch rows (returns
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
        let (rows, r) = (config.ep.max_tokens, config.projected());
        // One row at least: a zero-length allocation gives no pointer to pass.
        let projected = stream.alloc_zeros::<T>(rows.max(1) * r)?;
        let combined = stream.alloc_zeros::<T>(rows.max(1) * r)?;
        let mut offsets = stream.alloc_zeros::<i32>(2)?;
        {
            let (p, _g) = offsets.device_ptr_mut(stream);
            crate::cuda::status(crate::cuda::whole_range_offsets(p as *mut i32, stream.cu_stream() as _))?;
        }
        // The split-K need varies with the rows; take the largest any call can have.
        let mut bytes = 0;
        for m in 1..=rows {
            let layout = Layout::Contiguous { max_rows: m };
            bytes = bytes.max(config.descend().workspace_bytes(layout)?).max(config.ascend().workspace_bytes(layout)?);
        }
        let workspace = if bytes > 0 { Some(stream.alloc_zeros::<u8>(bytes)?) } else { None };
        let mut me = LowDimRank { ep, config, projected, combined, offsets, workspace };
        me.warm_up()?;
        Ok(me)
    }

    /// Launches, on scratch rows, one projection of each distinct kernel plan (tile, K slices) a call
    /// of 1..=max_tokens rows can take, and the residual add; waits for them.
    fn warm_up(&mut self) -> Result<()> {
        let (rows, h) = (self.config.ep.max_tokens, self.config.hidden);
        if rows == 0 {
            return Ok(());
        }
        let stream = self.ep.stream().clone();
        // Zeros: the values do not matter, only that each kernel is loaded.
        let mut scratch = stream.alloc_zeros::<T>(rows * h)?;
        let w = stream.alloc_zeros::<T>(h * self.config.projected())?;
        let (mut down, mut up) = (BTreeSet::new(), BTreeSet::new());
        for m in 1..=rows {
            let layout = Layout::Contiguous { max_rows: m };
            if down.insert(grouped_gemm::kernel_plan::<T, T>(&self.config.descend(), layout)?) {
                self.project_down(m, &scratch.slice(..), &w.slice(..))?;
            }
            if up.insert(grouped_gemm::kernel_plan::<T, T>(&self.config.ascend(), layout)?) {
                self.project_up(m, &w.slice(..), &mut scratch.slice_mut(..))?;
            }
        }
        {
            let (p, _g) = scratch.device_ptr_mut(&stream);
            let elements = (rows * h) as i64;
            let code = crate::cuda::add_residual(
                T::DTYPE,
                p as *mut c_void,
                p as *const c_void,
                elements,
                stream.cu_stream() as _,
            );
            crate::cuda::status(code)?;
        }
        stream.synchronize()?;
        Ok(())
    }

    fn project_down(&mut self, m: usize, x: &CudaView<'_, T>, w_down: &CudaView<'_, T>) -> Result<()> {
        let stream = self.ep.stream();
        let rows = ExpertRows::Contiguous { offsets: self.offsets.slice(..), max_rows: m };
        let mut ws = self.workspace.as_mut().map(|w| w.slice_mut(..));
        let out = &mut self.projected.slice_mut(..);
        grouped_gemm::grouped_gemm(stream, &self.config.descend(), x, w_down, &rows, None, out, ws.as_mut())
    }

    fn project_up(&mut self, m: usize, w_up: &CudaView<'_, T>, out: &mut CudaViewMut<'_, T>) -> Result<()> {
        let stream = self.ep.stream();
        let rows = ExpertRows::Contiguous { offsets: self.offsets.slice(..), max_rows: m };
        let mut ws = self.workspace.as_mut().map(|w| w.slice_mut(..));
        let a = self.combined.slice(..);
        grouped_gemm::grouped_gemm(stream, &self.config.ascend(), &a, w_up, &rows, None, out, ws.as_mut())
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
        // T = 0 still joins the exchange (every rank makes every call); it only has nothing to project.
        if num_tokens > 0 {
            self.project_down(num_tokens, x, w_down)?;
        }
        // The one dispatch call of this module (an API change of EpRank::dispatch is made here).
        self.ep.dispatch(num_tokens, &self.projected.slice(..), topk_ids, topk_weights, received_offsets)
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
        // Resolved (and checked) before anything is enqueued, so a bad residual leaves no half-done call.
        let residual = residual.map(|r| r.device_ptr(&stream));
        if let Some((rp, _)) = &residual {
            check::pointer("residual", *rp as *const u8, num_tokens > 0, 16)?;
        }
        // The one combine call of this module (an API change of EpRank::combine is made here). No
        // residual here: it is H wide, the exchange r wide.
        self.ep.combine(num_tokens, expert_out, None, &mut self.combined.slice_mut(..))?;
        if num_tokens == 0 {
            return Ok(());
        }
        self.project_up(num_tokens, w_up, out)?;
        if let Some((rp, _)) = &residual {
            let (op, _g) = out.device_ptr_mut(&stream);
            let elements = (num_tokens * c.hidden) as i64;
            let code = crate::cuda::add_residual(
                T::DTYPE,
                op as *mut c_void,
                *rp as *const c_void,
                elements,
                stream.cu_stream() as _,
            );
            crate::cuda::status(code)?;
        }
        Ok(())
    }
}
