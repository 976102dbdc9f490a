//! The grouped GEMM: every expert's matrix product in one launch, `out[r] = epilogue(a[r] · b[e]^T) ·
//! row_scale[r]` for the rows r of each expert e, which rows belong to which expert living in device
//! memory only. Semantics: `moek_grouped_gemm` in `include/moe_kernels.h`;
//! [`crate::reference::grouped_gemm`] is the CPU oracle.
//!
//! The kernels are the portable tensor-core path (mma.sync, cp.async; sm_80 and later) and, for
//! prefill sizes on a compute capability 9.0 device, an sm_90a path (TMA, wgmma, a persistent grid;
//! [`Tile::Hopper`], which [`Tile::Auto`] picks from 128 rows per expert where
//! [`hopper_available`] says it runs). Neither needs a workspace, allocates or synchronises, so a call
//! can be captured into a CUDA graph and replayed with different counts in the same buffers.

use crate::check;
use crate::dtype::{self, Element};
use crate::error::{bail, Result};
use crate::sys;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::sync::Arc;

pub use crate::reference::grouped_gemm::Epilogue;

/// Input element types of the grouped GEMM (A and B have the same one): bf16 and f16.
pub trait GemmInput: Element {}
impl GemmInput for half::bf16 {}
impl GemmInput for half::f16 {}

/// The kernel's tile shape (output rows × columns per CTA).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tile {
    /// Chosen from the average rows per expert the sizes allow (see the header).
    #[default]
    Auto,
    /// 32 × 64: decode, a few rows per expert, the weights streamed once per 32 rows.
    Small,
    /// 64 × 128.
    Medium,
    /// 128 × 128: prefill.
    Large,
    /// The sm_90a kernel (128 × 256 tiles, TMA and wgmma): prefill on a compute capability 9.0 device.
    /// Forced where [`hopper_available`] is false, the call fails with a CUDA error.
    Hopper,
}

/// Which rows of A and the output each expert owns (the sizes only; the counts live on the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Expert e owns rows `offsets[e]..offsets[e+1]` of A ([max_rows, K]) and the output.
    Contiguous {
        /// Rows of A, the output and the row scale.
        max_rows: usize,
    },
    /// A is [E, capacity, K]; expert e owns its first `counts[e]` rows.
    Masked {
        /// Rows per expert.
        capacity: usize,
    },
}

/// The shape of a grouped GEMM, apart from the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmConfig {
    /// E, 1..=8192.
    pub num_experts: u32,
    /// Columns of the product (rows of each `B[e]`): a multiple of 8, of 16 for SwiGLU, at most 2^21.
    pub n: usize,
    /// The reduced dimension, a multiple of 8.
    pub k: usize,
    pub epilogue: Epilogue,
    pub tile: Tile,
}

impl GemmConfig {
    /// The plain product (identity epilogue, automatic tile) of E experts' [n, k] weights.
    pub fn new(num_experts: u32, n: usize, k: usize) -> Self {
        GemmConfig { num_experts, n, k, epilogue: Epilogue::Identity, tile: Tile::Auto }
    }

    /// Columns of the output: n, or n / 2 with SwiGLU.
    pub fn output_columns(&self) -> usize {
        self.epilogue.output_columns(self.n)
    }

    /// The C argument struct for this configuration, with every pointer NULL.
    pub fn to_args(
        &self,
        layout: Layout,
        dtype: sys::moek_dtype,
        out_dtype: sys::moek_dtype,
    ) -> sys::moek_grouped_gemm_args {
        let wide = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let (layout, max_rows, capacity) = match layout {
            Layout::Contiguous { max_rows } => (sys::moek_gemm_layout_MOEK_GEMM_CONTIGUOUS, wide(max_rows), 0),
            Layout::Masked { capacity } => (sys::moek_gemm_layout_MOEK_GEMM_MASKED, 0, wide(capacity)),
        };
        sys::moek_grouped_gemm_args {
            layout,
            dtype,
            out_dtype,
            epilogue: match self.epilogue {
                Epilogue::Identity => sys::moek_gemm_epilogue_MOEK_EPILOGUE_IDENTITY,
                Epilogue::SwiGlu => sys::moek_gemm_epilogue_MOEK_EPILOGUE_SWIGLU,
                Epilogue::Gelu => sys::moek_gemm_epilogue_MOEK_EPILOGUE_GELU,
                Epilogue::Relu => sys::moek_gemm_epilogue_MOEK_EPILOGUE_RELU,
            },
            tile: match self.tile {
                Tile::Auto => sys::moek_gemm_tile_MOEK_GEMM_TILE_AUTO,
                Tile::Small => sys::moek_gemm_tile_MOEK_GEMM_TILE_SMALL,
                Tile::Medium => sys::moek_gemm_tile_MOEK_GEMM_TILE_MEDIUM,
                Tile::Large => sys::moek_gemm_tile_MOEK_GEMM_TILE_LARGE,
                Tile::Hopper => sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER,
            },
            num_experts: i32::try_from(self.num_experts).unwrap_or(i32::MAX),
            n: wide(self.n),
            k: wide(self.k),
            max_rows,
            capacity,
            a: std::ptr::null(),
            b: std::ptr::null(),
            expert_offsets: std::ptr::null(),
            expert_counts: std::ptr::null(),
            row_scale: std::ptr::null(),
            out: std::ptr::null_mut(),
        }
    }

    /// Checks the configuration for inputs of type `T`, output `O` and `layout`, naming the bad field.
    pub fn validate<T: GemmInput, O: Element>(&self, layout: Layout) -> Result<()> {
        check_shape(&self.to_args(layout, T::DTYPE, O::DTYPE)).map(|_| ())
    }
}

/// Checks the shape fields and returns the number of rows of A and the output.
pub(crate) fn check_shape(a: &sys::moek_grouped_gemm_args) -> Result<i64> {
    let bf16 = sys::moek_dtype_MOEK_DTYPE_BF16;
    let f16 = sys::moek_dtype_MOEK_DTYPE_F16;
    if a.dtype != bf16 && a.dtype != f16 {
        bail!(InvalidDtype, "dtype = {} must be MOEK_DTYPE_BF16 or MOEK_DTYPE_F16", a.dtype);
    }
    if a.out_dtype != a.dtype && a.out_dtype != sys::moek_dtype_MOEK_DTYPE_F32 {
        let why = if dtype::size_of(a.out_dtype).is_none() { "is not a moek_dtype" } else { "must be dtype or f32" };
        bail!(InvalidDtype, "out_dtype = {} {why} (dtype = {})", a.out_dtype, a.dtype);
    }
    if a.epilogue > sys::moek_gemm_epilogue_MOEK_EPILOGUE_RELU {
        bail!(InvalidEnum, "epilogue = {} is not a moek_gemm_epilogue", a.epilogue);
    }
    if a.tile > sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER {
        bail!(InvalidEnum, "tile = {} is not a moek_gemm_tile", a.tile);
    }
    let e = a.num_experts;
    if e < 1 || e > sys::MOEK_GEMM_MAX_EXPERTS as i32 {
        bail!(InvalidNumExperts, "num_experts = {e} is outside 1..={}", sys::MOEK_GEMM_MAX_EXPERTS);
    }
    if a.n < 8 || a.n % 8 != 0 || a.n > i64::from(sys::MOEK_GEMM_MAX_N) {
        bail!(InvalidValue, "n = {} must be a positive multiple of 8 up to {}", a.n, sys::MOEK_GEMM_MAX_N);
    }
    if a.epilogue == sys::moek_gemm_epilogue_MOEK_EPILOGUE_SWIGLU && a.n % 16 != 0 {
        bail!(InvalidValue, "n = {} must be a multiple of 16 for SwiGLU (n/2 a multiple of 8)", a.n);
    }
    if a.k < 8 || a.k % 8 != 0 || a.k > i64::from(i32::MAX) {
        bail!(InvalidValue, "k = {} must be a positive multiple of 8 below 2^31", a.k);
    }
    let limit = i64::from(i32::MAX);
    match a.layout {
        sys::moek_gemm_layout_MOEK_GEMM_CONTIGUOUS => {
            if !(0..=limit).contains(&a.max_rows) {
                bail!(InvalidValue, "max_rows = {} is outside 0..=2^31-1", a.max_rows);
            }
            Ok(a.max_rows)
        }
        sys::moek_gemm_layout_MOEK_GEMM_MASKED => {
            if !(0..=limit / i64::from(e)).contains(&a.capacity) {
                bail!(
                    InvalidCapacity,
                    "capacity = {} is negative or num_experts * capacity exceeds 2^31-1",
                    a.capacity
                );
            }
            Ok(a.capacity * i64::from(e))
        }
        other => bail!(InvalidEnum, "layout = {other} is not a moek_gemm_layout"),
    }
}

/// Validates a grouped GEMM's arguments in full, then enqueues it. Shared by the C entry point and
/// [`grouped_gemm`].
pub(crate) fn grouped_gemm_raw(a: &sys::moek_grouped_gemm_args, stream: sys::cudaStream_t) -> Result<()> {
    let rows = check_shape(a)? > 0;
    let masked = a.layout == sys::moek_gemm_layout_MOEK_GEMM_MASKED;
    check::pointer("a", a.a, rows, 16)?;
    check::pointer("b", a.b, true, 16)?;
    check::pointer("expert_offsets", a.expert_offsets, !masked, 4)?;
    check::pointer("expert_counts", a.expert_counts, masked, 4)?;
    check::pointer("row_scale", a.row_scale, false, 4)?;
    check::pointer("out", a.out, rows, 16)?;
    crate::cuda::status(crate::cuda::grouped_gemm(a, stream))
}

/// Whether [`Tile::Hopper`] can run `num_experts` experts on the current CUDA device (false without
/// the CUDA kernels). Shared by the C entry point and [`hopper_available`].
pub(crate) fn hopper_available_raw(num_experts: i32) -> bool {
    (1..=sys::MOEK_GEMM_MAX_EXPERTS as i32).contains(&num_experts) && crate::cuda::gemm_hopper_available(num_experts)
}

/// Whether [`Tile::Hopper`] can run `num_experts` experts on `stream`'s device: compute capability
/// 9.0, a build with sm_90a code (`MOEK_CUDA_ARCHS` holds `90a`), enough shared memory for the
/// experts' tile table.
pub fn hopper_available(stream: &Arc<CudaStream>, num_experts: u32) -> Result<bool> {
    stream.context().bind_to_thread()?;
    Ok(hopper_available_raw(i32::try_from(num_experts).unwrap_or(i32::MAX)))
}

/// The device-side description of which rows each expert owns.
pub enum ExpertRows<'a> {
    /// [E + 1] offsets (from [`crate::permute::plan`], for instance); A and the output have `max_rows`
    /// rows.
    Contiguous { offsets: CudaView<'a, i32>, max_rows: usize },
    /// `[E]` counts; A is `[E, capacity, K]` and the output `[E, capacity, output columns]`.
    Masked { counts: CudaView<'a, i32>, capacity: usize },
}

impl ExpertRows<'_> {
    /// The sizes of this description.
    pub fn layout(&self) -> Layout {
        match self {
            ExpertRows::Contiguous { max_rows, .. } => Layout::Contiguous { max_rows: *max_rows },
            ExpertRows::Masked { capacity, .. } => Layout::Masked { capacity: *capacity },
        }
    }
}

/// Enqueues `out[r] = epilogue(a[r] · b[e]^T) · row_scale[r]` for the rows r each expert e owns, on
/// `stream`: no allocation, no host synchronisation. `a` is [rows, K], `b` [E, N, K], `out` [rows,
/// output columns] with rows = `max_rows` or E · capacity; the output is T or f32. Rows no expert owns
/// are left untouched.
pub fn grouped_gemm<T: GemmInput, O: Element>(
    stream: &Arc<CudaStream>,
    cfg: &GemmConfig,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    experts: &ExpertRows<'_>,
    row_scale: Option<&CudaView<'_, f32>>,
    out: &mut CudaViewMut<'_, O>,
) -> Result<()> {
    let mut args = cfg.to_args(experts.layout(), T::DTYPE, O::DTYPE);
    let rows = check_shape(&args)? as usize;
    let (e, n, k) = (cfg.num_experts as usize, cfg.n, cfg.k);
    check::length("a", a.len(), rows * k)?;
    check::length("b", b.len(), e * n * k)?;
    match experts {
        ExpertRows::Contiguous { offsets, .. } => check::length("expert_offsets", offsets.len(), e + 1)?,
        ExpertRows::Masked { counts, .. } => check::length("expert_counts", counts.len(), e)?,
    }
    if let Some(s) = row_scale {
        check::length("row_scale", s.len(), rows)?;
    }
    check::length("out", out.len(), rows * cfg.output_columns())?;
    stream.context().bind_to_thread()?;
    let (a_ptr, _g0) = a.device_ptr(stream);
    let (b_ptr, _g1) = b.device_ptr(stream);
    let (rows_ptr, _g2) = match experts {
        ExpertRows::Contiguous { offsets, .. } => offsets.device_ptr(stream),
        ExpertRows::Masked { counts, .. } => counts.device_ptr(stream),
    };
    let scale = row_scale.map(|s| s.device_ptr(stream));
    let (out_ptr, _g3) = out.device_ptr_mut(stream);
    args.a = a_ptr as *const _;
    args.b = b_ptr as *const _;
    match experts {
        ExpertRows::Contiguous { .. } => args.expert_offsets = rows_ptr as *const i32,
        ExpertRows::Masked { .. } => args.expert_counts = rows_ptr as *const i32,
    }
    args.row_scale = scale.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const f32);
    args.out = out_ptr as *mut _;
    grouped_gemm_raw(&args, stream.cu_stream() as sys::cudaStream_t)
}
