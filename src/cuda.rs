//! The nvcc-built launchers (`cuda/*.cu`), or stand-ins that report their absence when the crate was
//! built without a CUDA compiler.

use crate::error::{Error, Result, Status};
use crate::sys;

/// True when this build contains the CUDA kernels (nvcc was found at build time).
pub const KERNELS_BUILT: bool = cfg!(moek_cuda);

/// Result of a launcher: a `cudaError_t` value (0 is success), or [`NO_KERNELS`].
type LaunchCode = i32;
const NO_KERNELS: LaunchCode = -1;

#[cfg(moek_cuda)]
mod launchers {
    use crate::sys;
    extern "C" {
        pub fn moek_cuda_route(
            args: *const sys::moek_route_args,
            capacity_chunk: i32,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_plan(
            args: *const sys::moek_plan_args,
            num_chunks: i64,
            path: i32,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_permute(
            args: *const sys::moek_permute_args,
            slices: i64,
            width: i64,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_combine(
            args: *const sys::moek_combine_args,
            slices: i64,
            width: i64,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_sm_count() -> i32;
        pub fn moek_cuda_grouped_gemm(
            args: *const sys::moek_grouped_gemm_args,
            splits: i32,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_gemm_hopper_available(num_experts: i32) -> i32;
        pub fn moek_cuda_whole_range_offsets(offsets: *mut i32, stream: sys::cudaStream_t) -> i32;
        pub fn moek_cuda_add_residual(
            dtype: sys::moek_dtype,
            out: *mut std::ffi::c_void,
            residual: *const std::ffi::c_void,
            elements: i64,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_subbit_decode(args: *const sys::moek_subbit_decode_args, stream: sys::cudaStream_t) -> i32;
        pub fn moek_cuda_subbit_matvec(
            args: *const sys::moek_subbit_matvec_args,
            rows_per_block: i32,
            table_entries: i32,
            substream_cols: i32,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_subbit_grouped_gemm(
            args: *const sys::moek_subbit_grouped_gemm_args,
            splits: i32,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_ep_counts(
            a: *const crate::ep::launch::EpLaunch,
            dtype: sys::moek_dtype,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_ep_send(
            a: *const crate::ep::launch::EpLaunch,
            x: *const std::ffi::c_void,
            topk_ids: *const i32,
            topk_weights: *const f32,
            blocks: i32,
            slices: i64,
            width: i64,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_ep_expand(
            a: *const crate::ep::launch::EpLaunch,
            blocks: i32,
            slices: i64,
            width: i64,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_ep_return(
            a: *const crate::ep::launch::EpLaunch,
            dtype: sys::moek_dtype,
            expert_out: *const std::ffi::c_void,
            blocks: i32,
            slices: i64,
            width: i64,
            stream: sys::cudaStream_t,
        ) -> i32;
        pub fn moek_cuda_fused_layer(
            args: *const sys::moek_layer_args,
            topk_ids: *const i32,
            weights: *const f32,
            expert_offsets: *const i32,
            row_source: *const i32,
            pair_row: *const i32,
            max_rows: i64,
            h: *mut std::ffi::c_void,
            y: *mut std::ffi::c_void,
            residual: *const std::ffi::c_void,
            counters: *mut u32,
            counter_words: i64,
            tile: i32,
            stream: sys::cudaStream_t,
        ) -> i32;
    }
}

/// Enqueues routing (arguments already validated).
pub(crate) fn route(args: &sys::moek_route_args, capacity_chunk: i32, stream: sys::cudaStream_t) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: `args` was validated by route::check_shape/check_pointers; the pointers are the
        // caller's device buffers, sized for the shape (the C contract, or checked by the Rust API).
        unsafe { launchers::moek_cuda_route(args, capacity_chunk, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (args, capacity_chunk, stream);
        NO_KERNELS
    }
}

/// Enqueues a permutation plan in `num_chunks` chunks on `path`: the chunked pair of kernels, the fused
/// one-launch kernel or the one-cluster kernel (which falls back to the chunked pair where it cannot
/// run); arguments already validated.
pub(crate) fn plan(
    args: &sys::moek_plan_args,
    num_chunks: i64,
    path: crate::permute::PlanPath,
    stream: sys::cudaStream_t,
) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        use crate::permute::PlanPath;
        let path = match path {
            PlanPath::Chunked => 0,
            PlanPath::Fused => 1,
            PlanPath::Cluster => 2,
        };
        // SAFETY: validated by permute::plan_raw; the buffers are the caller's, sized per the header.
        unsafe { launchers::moek_cuda_plan(args, num_chunks, path, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (args, num_chunks, path, stream);
        NO_KERNELS
    }
}

/// Enqueues permute (arguments already validated), each token's row cut into `slices` warps of
/// `width` 16-byte vectors.
pub(crate) fn permute(args: &sys::moek_permute_args, slices: i64, width: i64, stream: sys::cudaStream_t) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: validated by permute::permute_raw; the buffers are the caller's, sized per the header.
        unsafe { launchers::moek_cuda_permute(args, slices, width, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (args, slices, width, stream);
        NO_KERNELS
    }
}

/// Enqueues combine (arguments already validated), cut as [`permute`].
pub(crate) fn combine(args: &sys::moek_combine_args, slices: i64, width: i64, stream: sys::cudaStream_t) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: validated by permute::combine_raw; the buffers are the caller's, sized per the header.
        unsafe { launchers::moek_cuda_combine(args, slices, width, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (args, slices, width, stream);
        NO_KERNELS
    }
}

/// Streaming multiprocessors of the current device, when it can be asked (cached per device by the
/// launcher library; no synchronisation).
pub(crate) fn sm_count() -> Option<u32> {
    #[cfg(moek_cuda)]
    {
        // SAFETY: only queries the current device's attributes.
        let n = unsafe { launchers::moek_cuda_sm_count() };
        u32::try_from(n).ok().filter(|&n| n > 0)
    }
    #[cfg(not(moek_cuda))]
    {
        None
    }
}

/// Enqueues a grouped GEMM in `splits` K slices (arguments already validated; with `splits` > 1 the
/// workspace holds `splits` × rows × n floats).
pub(crate) fn grouped_gemm(args: &sys::moek_grouped_gemm_args, splits: i32, stream: sys::cudaStream_t) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: validated by grouped_gemm::grouped_gemm_raw; the buffers are the caller's, sized per
        // the header.
        unsafe { launchers::moek_cuda_grouped_gemm(args, splits, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (args, splits, stream);
        NO_KERNELS
    }
}

/// Whether the grouped GEMM's sm_90a kernel runs `num_experts` experts on the current device.
pub(crate) fn gemm_hopper_available(num_experts: i32) -> bool {
    #[cfg(moek_cuda)]
    {
        // SAFETY: only queries the current device and the loaded kernel's attributes.
        unsafe { launchers::moek_cuda_gemm_hopper_available(num_experts) != 0 }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = num_experts;
        false
    }
}

/// Enqueues the offsets `[0, >= max_rows]` of a one-expert grouped GEMM that owns all its rows (the GEMM
/// clamps them to `max_rows`); `offsets` is a device buffer of two `i32`.
pub(crate) fn whole_range_offsets(offsets: *mut i32, stream: sys::cudaStream_t) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: `offsets` points at two i32 of device memory (the layer's workspace).
        unsafe { launchers::moek_cuda_whole_range_offsets(offsets, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (offsets, stream);
        NO_KERNELS
    }
}

/// Enqueues `out[i] += residual[i]` over `elements` values of `dtype` (bf16 or f16; a positive multiple
/// of 8, both pointers 16-byte aligned: checked by the caller, src/ep/low_dim.rs).
pub(crate) fn add_residual(
    dtype: sys::moek_dtype,
    out: *mut std::ffi::c_void,
    residual: *const std::ffi::c_void,
    elements: i64,
    stream: sys::cudaStream_t,
) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: both pointers hold `elements` values of `dtype` in device memory (the caller's checks).
        unsafe { launchers::moek_cuda_add_residual(dtype, out, residual, elements, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (dtype, out, residual, elements, stream);
        NO_KERNELS
    }
}

/// Enqueues the sub-1-bit decode (arguments already validated).
pub(crate) fn subbit_decode(args: &sys::moek_subbit_decode_args, stream: sys::cudaStream_t) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: validated by subbit::gpu::decode_raw; the image is the caller's copy of a validated
        // buffer's image and `out` holds M * R * C bf16 (the header's contract).
        unsafe { launchers::moek_cuda_subbit_decode(args, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (args, stream);
        NO_KERNELS
    }
}

/// Enqueues the fused sub-1-bit matvec (arguments already validated; `rows_per_block` 0 (automatic) or
/// a multiple of 32 in 32..=256; `table_entries` negative (automatic) or the dictionary entries to keep
/// in shared memory).
pub(crate) fn subbit_matvec(
    args: &sys::moek_subbit_matvec_args,
    rows_per_block: i32,
    table_entries: i32,
    substream_cols: i32,
    stream: sys::cudaStream_t,
) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: validated by subbit::gpu::matvec_raw; the buffers are the caller's, sized per the header.
        unsafe { launchers::moek_cuda_subbit_matvec(args, rows_per_block, table_entries, substream_cols, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (args, rows_per_block, table_entries, substream_cols, stream);
        NO_KERNELS
    }
}

/// Enqueues the fused sub-1-bit decode + grouped GEMM in `splits` K slices (arguments already validated;
/// with `splits` > 1 the workspace holds `splits` × num_rows × R floats).
pub(crate) fn subbit_grouped_gemm(
    args: &sys::moek_subbit_grouped_gemm_args,
    splits: i32,
    stream: sys::cudaStream_t,
) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: validated by subbit::gemm::grouped_gemm_raw; the buffers are the caller's, sized per the
        // header, and the workspace holds the slices when splits > 1.
        unsafe { launchers::moek_cuda_subbit_grouped_gemm(args, splits, stream) }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (args, splits, stream);
        NO_KERNELS
    }
}

/// The three steps of expert-parallel dispatch and combine (cuda/ep.cu), arguments already validated.
pub(crate) enum EpStep {
    /// Exchange per-expert counts and derive where rows land (one block); first makes sure the later
    /// steps' kernels for rows of `dtype` are loaded (see cuda/ep.cu, moek_cuda_ep_preload).
    Counts { dtype: sys::moek_dtype },
    /// Store this rank's rows into the owners' buffers (a token once per owner) with the expansion map
    /// and the member lists (rows and routing weights, NULL weights meaning 1), signal, wait for
    /// everyone's.
    Send { x: *const std::ffi::c_void, topk_ids: *const i32, topk_weights: *const f32, cut: CopyCut },
    /// Copy each token's row, received once per owner, to its other expert rows there.
    Expand { cut: CopyCut },
    /// Sum each token's expert outputs on this rank (weighted, slot order, fp32, rounded to `dtype`) and
    /// store the sum into its source's buffer, signal, wait.
    Return { dtype: sys::moek_dtype, expert_out: *const std::ffi::c_void, cut: CopyCut },
}

/// The grid of an expert-parallel copy step: `blocks` blocks of 8 warps; each row cut into `slices`
/// warps' shares of `width` 16-byte vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CopyCut {
    pub(crate) blocks: i32,
    pub(crate) slices: i64,
    pub(crate) width: i64,
}

/// Enqueues one step of expert-parallel dispatch or combine.
pub(crate) fn ep_step(a: &crate::ep::launch::EpLaunch, step: EpStep, stream: sys::cudaStream_t) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: validated by ep::dispatch_raw / ep::combine_raw: the peers' buffers and the workspace
        // are at least the layout's sizes, and the plan the steps read was enqueued before them.
        unsafe {
            match step {
                EpStep::Counts { dtype } => launchers::moek_cuda_ep_counts(a, dtype, stream),
                EpStep::Send { x, topk_ids, topk_weights, cut } => launchers::moek_cuda_ep_send(
                    a,
                    x,
                    topk_ids,
                    topk_weights,
                    cut.blocks,
                    cut.slices,
                    cut.width,
                    stream,
                ),
                EpStep::Expand { cut } => launchers::moek_cuda_ep_expand(a, cut.blocks, cut.slices, cut.width, stream),
                EpStep::Return { dtype, expert_out, cut } => {
                    launchers::moek_cuda_ep_return(a, dtype, expert_out, cut.blocks, cut.slices, cut.width, stream)
                }
            }
        }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (a, step, stream);
        NO_KERNELS
    }
}

/// The device buffers of a fused layer launch besides those of its `moek_layer_args`: the routing and
/// plan results, the scratch rows (`h` `[max_rows, I]`, `y` `[max_rows, H]`, bf16), the residual
/// (`[T, H]` bf16 or NULL) and the counters (`counter_words` u32).
pub(crate) struct FusedBuffers {
    pub topk_ids: *const i32,
    pub weights: *const f32,
    pub expert_offsets: *const i32,
    pub row_source: *const i32,
    pub pair_row: *const i32,
    pub max_rows: i64,
    pub h: *mut std::ffi::c_void,
    pub y: *mut std::ffi::c_void,
    pub residual: *const std::ffi::c_void,
    pub counters: *mut u32,
    pub counter_words: i64,
}

/// Enqueues the fused layer kernel (and its counters' memset) with tile shape `tile` (a
/// `moek_gemm_tile`: SMALL, MEDIUM or LARGE); arguments already validated.
pub(crate) fn fused_layer(
    args: &sys::moek_layer_args,
    b: &FusedBuffers,
    tile: sys::moek_gemm_tile,
    stream: sys::cudaStream_t,
) -> LaunchCode {
    #[cfg(moek_cuda)]
    {
        // SAFETY: validated by layer::layer_raw; the buffers are the caller's (x, weights, out) or the
        // layer's workspace, carved for this call's shape.
        unsafe {
            launchers::moek_cuda_fused_layer(
                args,
                b.topk_ids,
                b.weights,
                b.expert_offsets,
                b.row_source,
                b.pair_row,
                b.max_rows,
                b.h,
                b.y,
                b.residual,
                b.counters,
                b.counter_words,
                tile as i32,
                stream,
            )
        }
    }
    #[cfg(not(moek_cuda))]
    {
        let _ = (args, b, tile, stream);
        NO_KERNELS
    }
}

/// Maps a launcher's code to a result.
pub(crate) fn status(code: LaunchCode) -> Result<()> {
    match code {
        0 => Ok(()),
        NO_KERNELS => Err(Error::new(
            Status::NoCudaKernels,
            "this build has no CUDA kernels: nvcc was not found when moe-kernels was compiled",
        )),
        e => Err(Error::new(Status::Cuda, format!("cudaError {e} while enqueueing the kernels"))),
    }
}
