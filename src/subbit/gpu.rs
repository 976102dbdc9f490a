//! The sub-1-bit kernels: lossless decode to dense bf16 and the fused decode + matrix-vector product for
//! 1..=8 tokens (one matrix, or grouped by expert through device offsets); the fused decode + grouped
//! GEMM is in [`super::gemm`]. Semantics: the "Sub-1-bit"
//! section of `include/moe_kernels.h`; [`crate::reference::subbit`] is the CPU oracle. The bytes and
//! FLOPs of the fused kernel are worked out at the top of `cuda/subbit.cu` and in `docs/subbit-gpu.md`:
//! 0.089 bytes of codewords per weight from HBM, one dictionary lookup per ~23 weights (shared memory
//! for the hottest codewords, L1/L2 for the rest); instruction issue is the expected bound.
//!
//! A buffer reaches the GPU only through [`Compressed::parse`]: [`DeviceWeights::upload`] copies its
//! image (see [`super::image`]) to the device once; every call then takes the uploaded weights.
//!
//! Tuning overrides, read once per process (for sweeps): `MOEK_SUBBIT_ROWS_PER_BLOCK` (a multiple of 32
//! in 32..=256, default 256) sets the fused kernel's threads per block, `MOEK_SUBBIT_TABLE_ENTRIES`
//! (0..=65536) how many of the hottest dictionary entries each block keeps in shared memory (lowered to
//! what fits a block beside the x window; by default as many as still let the blocks the work needs
//! share an SM), and `MOEK_SUBBIT_SUBSTREAM_COLS` (a power of two in 256..=65536) how many columns of a
//! tile one thread walks (by default: a tile is split at the image's restarts into as many sub-streams
//! as still run in one wave).

use super::image::check_descriptor;
use super::Compressed;
use crate::check;
use crate::error::{bail, Result};
use crate::sys;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;
use std::os::raw::c_void;
use std::sync::{Arc, OnceLock};

/// Rows per block of the fused kernel from `MOEK_SUBBIT_ROWS_PER_BLOCK`, or 0 (automatic).
fn rows_per_block() -> i32 {
    static VALUE: OnceLock<i32> = OnceLock::new();
    *VALUE.get_or_init(|| {
        std::env::var("MOEK_SUBBIT_ROWS_PER_BLOCK")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|v| (32..=256).contains(v) && v % 32 == 0)
            .unwrap_or(0)
    })
}

/// Shared-memory dictionary entries of the fused kernel from `MOEK_SUBBIT_TABLE_ENTRIES`, or -1
/// (automatic).
fn table_entries() -> i32 {
    static VALUE: OnceLock<i32> = OnceLock::new();
    *VALUE.get_or_init(|| {
        std::env::var("MOEK_SUBBIT_TABLE_ENTRIES")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|v| (0..=65536).contains(v))
            .unwrap_or(-1)
    })
}

/// `moek_subbit_parse`: validates `num_bytes` bytes at `bytes` and fills `*out`.
///
/// # Safety
/// `bytes` is NULL or points to `num_bytes` readable bytes; `out` is NULL or writable.
pub(crate) unsafe fn parse_raw(
    bytes: *const c_void,
    num_bytes: usize,
    out: *mut sys::moek_subbit_weights,
) -> Result<()> {
    if bytes.is_null() {
        bail!(NullPointer, "bytes is NULL");
    }
    if out.is_null() {
        bail!(NullPointer, "weights is NULL");
    }
    let buffer = unsafe { std::slice::from_raw_parts(bytes.cast::<u8>(), num_bytes) };
    let descriptor = Compressed::parse(buffer)?.descriptor()?;
    unsafe { out.write(descriptor) };
    Ok(())
}

/// `moek_subbit_write_image`: validates the buffer and writes its image to `image`.
///
/// # Safety
/// `bytes` is NULL or points to `num_bytes` readable bytes; `image` is NULL or points to `image_bytes`
/// writable bytes that do not overlap them.
pub(crate) unsafe fn write_image_raw(
    bytes: *const c_void,
    num_bytes: usize,
    image: *mut c_void,
    image_bytes: usize,
) -> Result<()> {
    if bytes.is_null() {
        bail!(NullPointer, "bytes is NULL");
    }
    if image.is_null() {
        bail!(NullPointer, "image is NULL");
    }
    let buffer = unsafe { std::slice::from_raw_parts(bytes.cast::<u8>(), num_bytes) };
    let view = Compressed::parse(buffer)?;
    let out = unsafe { std::slice::from_raw_parts_mut(image.cast::<u8>(), image_bytes) };
    view.write_image(out)
}

/// The descriptor's fields and its device image pointer.
pub(super) fn check_weights(w: &sys::moek_subbit_weights) -> Result<()> {
    check_descriptor(w)?;
    check::pointer("weights.image", w.image, true, 16)
}

/// Columns of a tile each fused-matvec thread walks from `MOEK_SUBBIT_SUBSTREAM_COLS`, or 0 (automatic).
fn substream_cols() -> i32 {
    static VALUE: OnceLock<i32> = OnceLock::new();
    *VALUE.get_or_init(|| {
        std::env::var("MOEK_SUBBIT_SUBSTREAM_COLS")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|v| (256..=65536).contains(v) && v.count_ones() == 1)
            .unwrap_or(0)
    })
}

/// Validates a decode's arguments, then enqueues it.
pub(crate) fn decode_raw(a: &sys::moek_subbit_decode_args, stream: sys::cudaStream_t) -> Result<()> {
    check_weights(&a.weights)?;
    let w = &a.weights;
    let elements = i64::from(w.matrices).checked_mul(i64::from(w.rows)).and_then(|n| n.checked_mul(i64::from(w.cols)));
    if elements.is_none_or(|n| n > i64::MAX / 2) {
        bail!(InvalidValue, "weights: {} x {} x {} bf16 values do not fit in memory", w.matrices, w.rows, w.cols);
    }
    check::pointer("out", a.out, true, 2)?;
    crate::cuda::status(crate::cuda::subbit_decode(a, stream))
}

/// Validates the shape fields of a matvec and returns its workspace bytes.
pub(crate) fn matvec_workspace_bytes(a: &sys::moek_subbit_matvec_args) -> Result<usize> {
    check_descriptor(&a.weights)?;
    let w = &a.weights;
    if a.expert_offsets.is_null() {
        if !(0..w.matrices).contains(&a.matrix) {
            bail!(InvalidValue, "matrix = {} is outside 0..{}", a.matrix, w.matrices);
        }
        if !(1..=i64::from(sys::MOEK_SUBBIT_MAX_TOKENS)).contains(&a.num_tokens) {
            bail!(InvalidNumTokens, "num_tokens = {} is outside 1..={}", a.num_tokens, sys::MOEK_SUBBIT_MAX_TOKENS);
        }
    } else if !(0..=i64::from(i32::MAX)).contains(&a.num_tokens) {
        bail!(InvalidNumTokens, "num_tokens = {} is outside 0..=2^31-1", a.num_tokens);
    }
    match workspace_for(w, a.num_tokens) {
        Some(b) => Ok(b),
        None => bail!(InvalidNumTokens, "num_tokens = {}: the workspace size overflows", a.num_tokens),
    }
}

/// The fp32 partial sums of every tile: 4 · tiles · T · R bytes, none with one tile per row.
fn workspace_for(w: &sys::moek_subbit_weights, num_tokens: i64) -> Option<usize> {
    if w.tiles_per_row == 1 {
        return Some(0);
    }
    4i64.checked_mul(i64::from(w.tiles_per_row))
        .and_then(|n| n.checked_mul(num_tokens))
        .and_then(|n| n.checked_mul(i64::from(w.rows)))
        .and_then(|n| usize::try_from(n).ok())
}

/// Validates a matvec's arguments in full, then enqueues it.
pub(crate) fn matvec_raw(a: &sys::moek_subbit_matvec_args, stream: sys::cudaStream_t) -> Result<()> {
    let need = matvec_workspace_bytes(a)?;
    check::pointer("weights.image", a.weights.image, true, 16)?;
    check::pointer("expert_offsets", a.expert_offsets, false, 4)?;
    let rows = a.num_tokens > 0;
    check::pointer("x", a.x, rows, 2)?;
    check::pointer("y", a.y, rows, 2)?;
    if a.workspace_bytes < need {
        bail!(WorkspaceTooSmall, "workspace_bytes = {} but this call needs {need}", a.workspace_bytes);
    }
    check::pointer("workspace", a.workspace, need > 0, 16)?;
    crate::cuda::status(crate::cuda::subbit_matvec(a, rows_per_block(), table_entries(), substream_cols(), stream))
}

/// A validated buffer's image in device memory.
pub struct DeviceWeights {
    pub(super) image: CudaSlice<u8>,
    pub(super) descriptor: sys::moek_subbit_weights,
}

impl DeviceWeights {
    /// Copies `view`'s image to the device (an allocation and a copy on `stream`: do it once, not per call).
    pub fn upload(stream: &Arc<CudaStream>, view: &Compressed) -> Result<Self> {
        let descriptor = view.descriptor()?;
        let image = stream.clone_htod(&view.image()?)?;
        Ok(DeviceWeights { image, descriptor })
    }

    /// Matrices M.
    pub fn matrices(&self) -> usize {
        self.descriptor.matrices as usize
    }

    /// Rows R of each matrix (output features).
    pub fn rows(&self) -> usize {
        self.descriptor.rows as usize
    }

    /// Columns C of each matrix (input features).
    pub fn cols(&self) -> usize {
        self.descriptor.cols as usize
    }

    /// Bytes of the device image (dictionary included).
    pub fn image_bytes(&self) -> usize {
        self.descriptor.image_bytes
    }

    /// Bytes of workspace a matvec of `num_tokens` rows needs (0 when a row is one tile).
    pub fn matvec_workspace_bytes(&self, num_tokens: usize) -> Result<usize> {
        match i64::try_from(num_tokens).ok().and_then(|t| workspace_for(&self.descriptor, t)) {
            Some(b) => Ok(b),
            None => bail!(InvalidNumTokens, "num_tokens = {num_tokens}: the workspace size overflows"),
        }
    }

    fn args(&self, matrix: usize, num_tokens: usize) -> sys::moek_subbit_matvec_args {
        sys::moek_subbit_matvec_args {
            weights: self.descriptor,
            matrix: i32::try_from(matrix).unwrap_or(i32::MAX),
            num_tokens: i64::try_from(num_tokens).unwrap_or(i64::MAX),
            expert_offsets: std::ptr::null(),
            x: std::ptr::null(),
            y: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
        }
    }
}

/// Decodes every matrix into `out` ([M, R, C] bf16), exactly the CPU decoder's values.
pub fn decode(stream: &Arc<CudaStream>, weights: &DeviceWeights, out: &mut CudaViewMut<'_, bf16>) -> Result<()> {
    check::length("out", out.len(), weights.matrices() * weights.rows() * weights.cols())?;
    stream.context().bind_to_thread()?;
    let (image, _g0) = weights.image.device_ptr(stream);
    let (out_ptr, _g1) = out.device_ptr_mut(stream);
    let a = sys::moek_subbit_decode_args {
        weights: sys::moek_subbit_weights { image: image as *const c_void, ..weights.descriptor },
        out: out_ptr as *mut c_void,
    };
    decode_raw(&a, stream.cu_stream() as sys::cudaStream_t)
}

/// Which weights a matvec multiplies by.
pub enum Experts<'a> {
    /// One matrix (0..M) for all 1..=8 rows.
    Matrix(usize),
    /// Grouped: matrix m owns rows `offsets[m]..offsets[m+1]` ([M + 1] on the device).
    Offsets(CudaView<'a, i32>),
}

/// `y[t, r] = sum over c of x[t, c] * W[m][r, c]` for the `num_tokens` rows of `x` ([T, C]) into `y`
/// ([T, R]), m given by `experts`; fp32 accumulation. The workspace ([`DeviceWeights::matvec_workspace_bytes`])
/// is needed when a row has more than one tile.
pub fn matvec(
    stream: &Arc<CudaStream>,
    weights: &DeviceWeights,
    experts: &Experts<'_>,
    num_tokens: usize,
    x: &CudaView<'_, bf16>,
    y: &mut CudaViewMut<'_, bf16>,
    workspace: Option<&mut CudaViewMut<'_, u8>>,
) -> Result<()> {
    let matrix = match experts {
        Experts::Matrix(m) => *m,
        Experts::Offsets(offsets) => {
            check::length("expert_offsets", offsets.len(), weights.matrices() + 1)?;
            0
        }
    };
    check::length("x", x.len(), num_tokens * weights.cols())?;
    check::length("y", y.len(), num_tokens * weights.rows())?;
    stream.context().bind_to_thread()?;
    let (image, _g0) = weights.image.device_ptr(stream);
    let offsets = match experts {
        Experts::Offsets(o) => Some(o.device_ptr(stream)),
        Experts::Matrix(_) => None,
    };
    let (x_ptr, _g1) = x.device_ptr(stream);
    let (y_ptr, _g2) = y.device_ptr_mut(stream);
    let ws_len = workspace.as_ref().map_or(0, |w| w.len());
    let ws = workspace.map(|w| w.device_ptr_mut(stream));
    let a = sys::moek_subbit_matvec_args {
        weights: sys::moek_subbit_weights { image: image as *const c_void, ..weights.descriptor },
        expert_offsets: offsets.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const i32),
        x: x_ptr as *const c_void,
        y: y_ptr as *mut c_void,
        workspace: ws.as_ref().map_or(std::ptr::null_mut(), |(p, _)| *p as *mut c_void),
        workspace_bytes: ws_len,
        ..weights.args(matrix, num_tokens)
    };
    matvec_raw(&a, stream.cu_stream() as sys::cudaStream_t)
}
