//! The fused sub-1-bit decode + grouped GEMM: `y[r] = row_scale[r] · x[r] · Wb[m]^T` for the rows r each
//! expert m owns, with Wb the dense bf16 weights [`super::decode_on_gpu`] writes; the dense weights never
//! reach global memory. For tens of rows per expert (prefill, batched decode); [`super::matvec`] is the
//! kernel for a few. Semantics: `moek_subbit_grouped_gemm` in `include/moe_kernels.h`;
//! [`crate::reference::subbit::grouped_gemm`] is the CPU oracle; `cuda/subbit_gemm.cu` is the kernel (its
//! bytes and FLOPs at the top) and `docs/subbit-gpu.md` the design. Not yet run on a GPU.
//!
//! Split-K: with few output tiles the kernel cuts K at the image's tile boundaries into slices computed
//! by different blocks, their fp32 partial products added in slice order by a second kernel
//! (deterministic). The number of slices comes from the sizes only (see `auto_splits`), so the
//! workspace query needs no device; `MOEK_SUBBIT_GEMM_SPLIT_TARGET=blocks` (read once per process)
//! replaces the number of blocks the automatic choice aims at.

use super::gpu::{check_weights, DeviceWeights};
use super::image::check_descriptor;
use crate::check;
use crate::error::{bail, Result};
use crate::sys;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;
use std::os::raw::c_void;
use std::sync::{Arc, OnceLock};

/// Activation rows and weight rows of the kernel's block tile (cuda/subbit_gemm.cu kBM and kBN).
const BLOCK_ROWS: i64 = 64;
const BLOCK_WEIGHT_ROWS: i64 = 128;

/// The automatic split aims at this many blocks: what runs at once on a 132-SM H100/H200 at the
/// kernel's 3 blocks an SM (its registers), so that the slices never start a second, mostly idle wave.
/// A guess until the first GPU run: every slice also writes and reads 4 · num_rows · R bytes of fp32
/// partial products (the Mixtral down pair at 64 rows per expert: 6 slices, 12.6 MB).
const SPLIT_TARGET_BLOCKS: i64 = 396;

/// `MOEK_SUBBIT_GEMM_SPLIT_TARGET`, or the default.
fn split_target() -> i64 {
    static VALUE: OnceLock<i64> = OnceLock::new();
    *VALUE.get_or_init(|| {
        std::env::var("MOEK_SUBBIT_GEMM_SPLIT_TARGET")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|&v| v >= 1)
            .unwrap_or(SPLIT_TARGET_BLOCKS)
    })
}

/// The automatic number of K slices: the most (at most one a tile) whose blocks still fit in
/// `target` blocks, counting the blocks of the rows spread evenly over the experts; 1 when one slice
/// already has that many.
fn auto_splits(w: &sys::moek_subbit_weights, num_rows: i64, target: i64) -> i64 {
    let m = i64::from(w.matrices);
    let per_expert = (num_rows + m - 1) / m;
    let blocks = m
        * ((per_expert + BLOCK_ROWS - 1) / BLOCK_ROWS)
        * ((i64::from(w.rows) + BLOCK_WEIGHT_ROWS - 1) / BLOCK_WEIGHT_ROWS);
    if blocks == 0 {
        return 1;
    }
    (target / blocks).clamp(1, i64::from(w.tiles_per_row))
}

/// The checked shape of a call: the K slices it runs with given enough workspace, and the workspace
/// bytes those need.
struct Plan {
    splits: i64,
    workspace_bytes: usize,
}

/// Validates the shape fields (weights, num_rows, split_k) and plans the slices.
fn plan(a: &sys::moek_subbit_grouped_gemm_args) -> Result<Plan> {
    let w = &a.weights;
    // Before the descriptor's own checks: a bound of this call, not of the image.
    if w.matrices > sys::MOEK_GEMM_MAX_EXPERTS as i32 {
        bail!(
            InvalidValue,
            "weights.matrices = {} is above MOEK_GEMM_MAX_EXPERTS = {} (the block scheduler's table)",
            w.matrices,
            sys::MOEK_GEMM_MAX_EXPERTS
        );
    }
    check_descriptor(w)?;
    if !(0..=i64::from(i32::MAX)).contains(&a.num_rows) {
        bail!(InvalidNumTokens, "num_rows = {} is outside 0..=2^31-1", a.num_rows);
    }
    if !(0..=sys::MOEK_SUBBIT_GEMM_MAX_SPLIT_K as i32).contains(&a.split_k) {
        bail!(InvalidValue, "split_k = {} is outside 0..={}", a.split_k, sys::MOEK_SUBBIT_GEMM_MAX_SPLIT_K);
    }
    let tiles = i64::from(w.tiles_per_row);
    let splits = match a.split_k {
        0 => auto_splits(w, a.num_rows, split_target()),
        s => i64::from(s).min(tiles),
    };
    // The grid (cuda/subbit_gemm.cu): m_tile_bound x ceil(R / 128) x slices blocks in one dimension.
    let m = i64::from(w.matrices);
    let m_tiles = (a.num_rows + m * (BLOCK_ROWS - 1)) / BLOCK_ROWS;
    let n_blocks = (i64::from(w.rows) + BLOCK_WEIGHT_ROWS - 1) / BLOCK_WEIGHT_ROWS;
    if m_tiles.checked_mul(n_blocks).and_then(|b| b.checked_mul(splits)).is_none_or(|b| b > i64::from(i32::MAX)) {
        bail!(
            InvalidValue,
            "num_rows = {} and weights.rows = {} need more than 2^31-1 blocks of {BLOCK_ROWS} x {BLOCK_WEIGHT_ROWS}",
            a.num_rows,
            w.rows
        );
    }
    let workspace_bytes = if splits > 1 {
        4i64.checked_mul(splits)
            .and_then(|n| n.checked_mul(a.num_rows))
            .and_then(|n| n.checked_mul(i64::from(w.rows)))
            .and_then(|n| usize::try_from(n).ok())
    } else {
        Some(0)
    };
    match workspace_bytes {
        Some(workspace_bytes) => Ok(Plan { splits, workspace_bytes }),
        None => bail!(InvalidNumTokens, "num_rows = {}: the workspace size overflows", a.num_rows),
    }
}

/// `moek_subbit_grouped_gemm_workspace_size`: validates the shape fields and returns the workspace bytes.
pub(crate) fn grouped_gemm_workspace_bytes(a: &sys::moek_subbit_grouped_gemm_args) -> Result<usize> {
    plan(a).map(|p| p.workspace_bytes)
}

/// Validates a call's arguments in full, then enqueues it.
pub(crate) fn grouped_gemm_raw(a: &sys::moek_subbit_grouped_gemm_args, stream: sys::cudaStream_t) -> Result<()> {
    let plan = plan(a)?;
    check_weights(&a.weights)?;
    check::pointer("expert_offsets", a.expert_offsets, true, 4)?;
    let rows = a.num_rows > 0;
    check::pointer("x", a.x, rows, 2)?;
    check::pointer("y", a.y, rows, 2)?;
    check::pointer("row_scale", a.row_scale, false, 4)?;
    // Without the workspace the automatic choice runs unsplit; an explicit split needs it.
    let splits = if a.workspace_bytes >= plan.workspace_bytes {
        plan.splits
    } else if a.split_k == 0 {
        1
    } else {
        bail!(
            WorkspaceTooSmall,
            "workspace_bytes = {} but split_k = {} needs {}",
            a.workspace_bytes,
            a.split_k,
            plan.workspace_bytes
        );
    };
    check::pointer("workspace", a.workspace, splits > 1, 16)?;
    crate::cuda::status(crate::cuda::subbit_grouped_gemm(a, splits as i32, stream))
}

impl DeviceWeights {
    /// Bytes of workspace [`grouped_gemm`] needs for `num_rows` rows with `split_k` (0: the automatic
    /// choice; 1: none). Less is allowed with `split_k = 0` (no split then).
    pub fn grouped_gemm_workspace_bytes(&self, num_rows: usize, split_k: u32) -> Result<usize> {
        grouped_gemm_workspace_bytes(&self.gemm_args(num_rows, split_k))
    }

    fn gemm_args(&self, num_rows: usize, split_k: u32) -> sys::moek_subbit_grouped_gemm_args {
        sys::moek_subbit_grouped_gemm_args {
            weights: self.descriptor,
            num_rows: i64::try_from(num_rows).unwrap_or(i64::MAX),
            expert_offsets: std::ptr::null(),
            x: std::ptr::null(),
            row_scale: std::ptr::null(),
            y: std::ptr::null_mut(),
            split_k: i32::try_from(split_k).unwrap_or(i32::MAX),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
        }
    }
}

/// Enqueues `y[r, n] = row_scale[r] · sum over c of x[r, c] · Wb[m][n, c]` for every row r of `x`
/// ([num_rows, C]) that expert m owns (`offsets[m]..offsets[m+1]`, [M + 1] on the device, clamped to
/// `0..=num_rows`) into `y` ([num_rows, R]), with Wb the dense bf16 weights (the f16 levels rounded to
/// bf16) and fp32 accumulation; rows no expert owns are left untouched. `row_scale` (`[num_rows]`) is
/// optional. `split_k` (0 automatic, 1 never, n that many, at most one a tile of the image) cuts K into
/// slices added in a fixed order; `workspace` (at least [`DeviceWeights::grouped_gemm_workspace_bytes`])
/// holds their partial products. No allocation, no host synchronisation: capturable in a CUDA graph.
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm(
    stream: &Arc<CudaStream>,
    weights: &DeviceWeights,
    offsets: &CudaView<'_, i32>,
    num_rows: usize,
    x: &CudaView<'_, bf16>,
    row_scale: Option<&CudaView<'_, f32>>,
    y: &mut CudaViewMut<'_, bf16>,
    split_k: u32,
    workspace: Option<&mut CudaViewMut<'_, u8>>,
) -> Result<()> {
    check::length("expert_offsets", offsets.len(), weights.matrices() + 1)?;
    check::length("x", x.len(), num_rows * weights.cols())?;
    check::length("y", y.len(), num_rows * weights.rows())?;
    if let Some(s) = row_scale {
        check::length("row_scale", s.len(), num_rows)?;
    }
    stream.context().bind_to_thread()?;
    let (image, _g0) = weights.image.device_ptr(stream);
    let (offsets_ptr, _g1) = offsets.device_ptr(stream);
    let (x_ptr, _g2) = x.device_ptr(stream);
    let scale = row_scale.map(|s| s.device_ptr(stream));
    let (y_ptr, _g3) = y.device_ptr_mut(stream);
    let ws_len = workspace.as_ref().map_or(0, |w| w.len());
    let ws = workspace.map(|w| w.device_ptr_mut(stream));
    let a = sys::moek_subbit_grouped_gemm_args {
        weights: sys::moek_subbit_weights { image: image as *const c_void, ..weights.descriptor },
        expert_offsets: offsets_ptr as *const i32,
        x: x_ptr as *const c_void,
        row_scale: scale.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const f32),
        y: y_ptr as *mut c_void,
        workspace: ws.as_ref().map_or(std::ptr::null_mut(), |(p, _)| *p as *mut c_void),
        workspace_bytes: ws_len,
        ..weights.gemm_args(num_rows, split_k)
    };
    grouped_gemm_raw(&a, stream.cu_stream() as sys::cudaStream_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(matrices: i32, rows: i32, tiles_per_row: i32) -> sys::moek_subbit_weights {
        sys::moek_subbit_weights {
            matrices,
            rows,
            cols: tiles_per_row * 2048,
            tile_cols: 2048,
            tiles_per_row,
            dictionary_entries: 3,
            codes: 0,
            image_bytes: 0,
            dictionary_at: 0,
            scales_at: 0,
            offsets_at: 0,
            codes_at: 0,
            image: std::ptr::null(),
        }
    }

    #[test]
    fn automatic_splits_fill_one_wave_of_the_target() {
        // Mixtral-8x7B at 64 rows per expert: the gate pair makes 224 blocks (no split), the down pair
        // 64 (6 of its 7 tiles' slices: 384 blocks).
        assert_eq!(auto_splits(&weights(2, 14336, 2), 128, SPLIT_TARGET_BLOCKS), 1);
        assert_eq!(auto_splits(&weights(2, 4096, 7), 128, SPLIT_TARGET_BLOCKS), 6);
        // Never more slices than tiles, never fewer than one; no rows: one.
        assert_eq!(auto_splits(&weights(1, 128, 3), 1, SPLIT_TARGET_BLOCKS), 3);
        assert_eq!(auto_splits(&weights(8, 14336, 2), 8192, SPLIT_TARGET_BLOCKS), 1);
        assert_eq!(auto_splits(&weights(2, 4096, 7), 0, SPLIT_TARGET_BLOCKS), 1);
    }
}
