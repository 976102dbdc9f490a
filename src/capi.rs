//! The C interface of `include/moe_kernels.h`, implemented here so that argument checking is written
//! once (in Rust) and serves the C ABI, the Rust API and builds without CUDA alike. The signatures are
//! checked against the bindgen declarations in `src/sys.rs` at compile time (see the bottom).

use crate::error::{bail, last_error_ptr, status_text, to_status, Result};
use crate::subbit::gemm as subbit_gemm;
use crate::subbit::gpu as subbit;
use crate::{ep, grouped_gemm, layer, permute, route, sys};
use std::os::raw::c_char;
use std::os::raw::c_void;

/// Reads a caller's struct, refusing NULL.
///
/// # Safety
/// `p` is NULL or points to a valid `T`.
unsafe fn read_args<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    match unsafe { p.as_ref() } {
        Some(v) => Ok(v),
        None => bail!(NullPointer, "{name} is NULL"),
    }
}

/// A size query: checks `args`, then writes `compute(args)` to `out` (named `out_name` in errors).
///
/// # Safety
/// `args` is NULL or valid; `out` is NULL or writable.
unsafe fn query<A, T>(
    args: *const A,
    out: *mut T,
    out_name: &str,
    compute: impl FnOnce(&A) -> Result<T>,
) -> sys::moek_status {
    to_status((|| {
        let a = unsafe { read_args(args, "args") }?;
        if out.is_null() {
            bail!(NullPointer, "{out_name} is NULL");
        }
        let value = compute(a)?;
        unsafe { out.write(value) };
        Ok(())
    })())
}

/// See `moek_status_string` in the header.
#[no_mangle]
pub extern "C" fn moek_status_string(status: sys::moek_status) -> *const c_char {
    status_text(status).as_ptr()
}

/// See `moek_last_error_message` in the header.
#[no_mangle]
pub extern "C" fn moek_last_error_message() -> *const c_char {
    last_error_ptr()
}

/// See `moek_version` in the header.
#[no_mangle]
pub extern "C" fn moek_version() -> u32 {
    sys::MOEK_VERSION_MAJOR * 10000 + sys::MOEK_VERSION_MINOR * 100 + sys::MOEK_VERSION_PATCH
}

/// See `moek_route_workspace_size` in the header.
///
/// # Safety
/// `args` is NULL or valid; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn moek_route_workspace_size(
    args: *const sys::moek_route_args,
    bytes: *mut usize,
) -> sys::moek_status {
    unsafe { query(args, bytes, "bytes", route::workspace_bytes) }
}

/// See `moek_route` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_route(args: *const sys::moek_route_args, stream: sys::cudaStream_t) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| route::route_raw(a, stream)))
}

/// See `moek_plan_max_rows` in the header.
///
/// # Safety
/// `args` is NULL or valid; `rows` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn moek_plan_max_rows(args: *const sys::moek_plan_args, rows: *mut i64) -> sys::moek_status {
    unsafe { query(args, rows, "rows", permute::plan_max_rows) }
}

/// See `moek_plan_workspace_size` in the header.
///
/// # Safety
/// `args` is NULL or valid; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn moek_plan_workspace_size(
    args: *const sys::moek_plan_args,
    bytes: *mut usize,
) -> sys::moek_status {
    unsafe { query(args, bytes, "bytes", permute::plan_workspace_bytes) }
}

/// See `moek_plan` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_plan(args: *const sys::moek_plan_args, stream: sys::cudaStream_t) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| permute::plan_raw(a, stream)))
}

/// See `moek_permute` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_permute(
    args: *const sys::moek_permute_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| permute::permute_raw(a, stream)))
}

/// See `moek_combine` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_combine(
    args: *const sys::moek_combine_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| permute::combine_raw(a, stream)))
}

/// See `moek_grouped_gemm_workspace_size` in the header.
///
/// # Safety
/// `args` is NULL or valid; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn moek_grouped_gemm_workspace_size(
    args: *const sys::moek_grouped_gemm_args,
    bytes: *mut usize,
) -> sys::moek_status {
    unsafe { query(args, bytes, "bytes", grouped_gemm::workspace_bytes) }
}

/// See `moek_grouped_gemm` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_grouped_gemm(
    args: *const sys::moek_grouped_gemm_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| grouped_gemm::grouped_gemm_raw(a, stream)))
}

/// See `moek_grouped_gemm_hopper_available` in the header.
#[no_mangle]
pub extern "C" fn moek_grouped_gemm_hopper_available(num_experts: i32) -> i32 {
    i32::from(grouped_gemm::hopper_available_raw(num_experts))
}

/// See `moek_layer_workspace_size` in the header.
///
/// # Safety
/// `args` and `bytes` are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn moek_layer_workspace_size(
    args: *const sys::moek_layer_args,
    bytes: *mut usize,
) -> sys::moek_status {
    unsafe { query(args, bytes, "bytes", layer::layer_workspace_bytes) }
}

/// See `moek_layer` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_layer(args: *const sys::moek_layer_args, stream: sys::cudaStream_t) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| layer::layer_raw(a, stream, &mut |_| Ok(()))))
}

/// See `moek_subbit_parse` in the header.
///
/// # Safety
/// `bytes` is NULL or points to `num_bytes` readable bytes; `weights` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn moek_subbit_parse(
    bytes: *const c_void,
    num_bytes: usize,
    weights: *mut sys::moek_subbit_weights,
) -> sys::moek_status {
    to_status(unsafe { subbit::parse_raw(bytes, num_bytes, weights) })
}

/// See `moek_subbit_write_image` in the header.
///
/// # Safety
/// `bytes` is NULL or points to `num_bytes` readable bytes; `image` is NULL or points to `image_bytes`
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn moek_subbit_write_image(
    bytes: *const c_void,
    num_bytes: usize,
    image: *mut c_void,
    image_bytes: usize,
) -> sys::moek_status {
    to_status(unsafe { subbit::write_image_raw(bytes, num_bytes, image, image_bytes) })
}

/// See `moek_subbit_decode` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_subbit_decode(
    args: *const sys::moek_subbit_decode_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| subbit::decode_raw(a, stream)))
}

/// See `moek_subbit_matvec_workspace_size` in the header.
///
/// # Safety
/// `args` is NULL or valid; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn moek_subbit_matvec_workspace_size(
    args: *const sys::moek_subbit_matvec_args,
    bytes: *mut usize,
) -> sys::moek_status {
    unsafe { query(args, bytes, "bytes", subbit::matvec_workspace_bytes) }
}

/// See `moek_subbit_matvec` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_subbit_matvec(
    args: *const sys::moek_subbit_matvec_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| subbit::matvec_raw(a, stream)))
}

/// See `moek_subbit_grouped_gemm_workspace_size` in the header.
///
/// # Safety
/// `args` is NULL or valid; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn moek_subbit_grouped_gemm_workspace_size(
    args: *const sys::moek_subbit_grouped_gemm_args,
    bytes: *mut usize,
) -> sys::moek_status {
    unsafe { query(args, bytes, "bytes", subbit_gemm::grouped_gemm_workspace_bytes) }
}

/// See `moek_subbit_grouped_gemm` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_subbit_grouped_gemm(
    args: *const sys::moek_subbit_grouped_gemm_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| subbit_gemm::grouped_gemm_raw(a, stream)))
}

/// See `moek_ep_layout_query` in the header.
///
/// # Safety
/// `config` is NULL or valid; `layout` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn moek_ep_layout_query(
    config: *const sys::moek_ep_config,
    layout: *mut sys::moek_ep_layout,
) -> sys::moek_status {
    unsafe {
        query(config, layout, "layout", |c| {
            let l = ep::layout(c)?;
            Ok(sys::moek_ep_layout {
                symmetric_bytes: l.symmetric_bytes,
                received_offset: l.received_offset,
                max_received_rows: l.max_received_rows as i64,
                workspace_bytes: l.workspace_bytes,
            })
        })
    }
}

/// See `moek_ep_dispatch` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_ep_dispatch(
    args: *const sys::moek_ep_dispatch_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| ep::dispatch_raw(a, stream)))
}

/// See `moek_ep_combine` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_ep_combine(
    args: *const sys::moek_ep_combine_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| ep::combine_raw(a, stream)))
}

/// See `moek_ep_low_dim_workspace_size` in the header.
///
/// # Safety
/// `group` is NULL or valid; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn moek_ep_low_dim_workspace_size(
    group: *const sys::moek_ep_low_dim_group,
    bytes: *mut usize,
) -> sys::moek_status {
    unsafe { query(group, bytes, "bytes", ep::low_dim_workspace_bytes) }
}

/// See `moek_ep_low_dim_dispatch` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_ep_low_dim_dispatch(
    args: *const sys::moek_ep_low_dim_dispatch_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| ep::low_dim_dispatch_raw(a, stream)))
}

/// See `moek_ep_low_dim_combine` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_ep_low_dim_combine(
    args: *const sys::moek_ep_low_dim_combine_args,
    stream: sys::cudaStream_t,
) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| ep::low_dim_combine_raw(a, stream)))
}

// Compile-time proof that the definitions above have the header's signatures.
const _: [unsafe extern "C" fn(sys::moek_status) -> *const c_char; 2] = [sys::moek_status_string, moek_status_string];
const _: [unsafe extern "C" fn() -> *const c_char; 2] = [sys::moek_last_error_message, moek_last_error_message];
const _: [unsafe extern "C" fn() -> u32; 2] = [sys::moek_version, moek_version];
type WorkspaceFn = unsafe extern "C" fn(*const sys::moek_route_args, *mut usize) -> sys::moek_status;
const _: [WorkspaceFn; 2] = [sys::moek_route_workspace_size, moek_route_workspace_size];
type RouteFn = unsafe extern "C" fn(*const sys::moek_route_args, sys::cudaStream_t) -> sys::moek_status;
const _: [RouteFn; 2] = [sys::moek_route, moek_route];
type PlanRowsFn = unsafe extern "C" fn(*const sys::moek_plan_args, *mut i64) -> sys::moek_status;
const _: [PlanRowsFn; 2] = [sys::moek_plan_max_rows, moek_plan_max_rows];
type PlanSizeFn = unsafe extern "C" fn(*const sys::moek_plan_args, *mut usize) -> sys::moek_status;
const _: [PlanSizeFn; 2] = [sys::moek_plan_workspace_size, moek_plan_workspace_size];
type PlanFn = unsafe extern "C" fn(*const sys::moek_plan_args, sys::cudaStream_t) -> sys::moek_status;
const _: [PlanFn; 2] = [sys::moek_plan, moek_plan];
type PermuteFn = unsafe extern "C" fn(*const sys::moek_permute_args, sys::cudaStream_t) -> sys::moek_status;
const _: [PermuteFn; 2] = [sys::moek_permute, moek_permute];
type CombineFn = unsafe extern "C" fn(*const sys::moek_combine_args, sys::cudaStream_t) -> sys::moek_status;
const _: [CombineFn; 2] = [sys::moek_combine, moek_combine];
type GemmSizeFn = unsafe extern "C" fn(*const sys::moek_grouped_gemm_args, *mut usize) -> sys::moek_status;
const _: [GemmSizeFn; 2] = [sys::moek_grouped_gemm_workspace_size, moek_grouped_gemm_workspace_size];
type GemmFn = unsafe extern "C" fn(*const sys::moek_grouped_gemm_args, sys::cudaStream_t) -> sys::moek_status;
const _: [GemmFn; 2] = [sys::moek_grouped_gemm, moek_grouped_gemm];
const _: [unsafe extern "C" fn(i32) -> i32; 2] =
    [sys::moek_grouped_gemm_hopper_available, moek_grouped_gemm_hopper_available];
type LayerSizeFn = unsafe extern "C" fn(*const sys::moek_layer_args, *mut usize) -> sys::moek_status;
const _: [LayerSizeFn; 2] = [sys::moek_layer_workspace_size, moek_layer_workspace_size];
type LayerFn = unsafe extern "C" fn(*const sys::moek_layer_args, sys::cudaStream_t) -> sys::moek_status;
const _: [LayerFn; 2] = [sys::moek_layer, moek_layer];
type SubbitParseFn = unsafe extern "C" fn(*const c_void, usize, *mut sys::moek_subbit_weights) -> sys::moek_status;
const _: [SubbitParseFn; 2] = [sys::moek_subbit_parse, moek_subbit_parse];
type SubbitImageFn = unsafe extern "C" fn(*const c_void, usize, *mut c_void, usize) -> sys::moek_status;
const _: [SubbitImageFn; 2] = [sys::moek_subbit_write_image, moek_subbit_write_image];
type SubbitDecodeFn = unsafe extern "C" fn(*const sys::moek_subbit_decode_args, sys::cudaStream_t) -> sys::moek_status;
const _: [SubbitDecodeFn; 2] = [sys::moek_subbit_decode, moek_subbit_decode];
type SubbitSizeFn = unsafe extern "C" fn(*const sys::moek_subbit_matvec_args, *mut usize) -> sys::moek_status;
const _: [SubbitSizeFn; 2] = [sys::moek_subbit_matvec_workspace_size, moek_subbit_matvec_workspace_size];
type SubbitMatvecFn = unsafe extern "C" fn(*const sys::moek_subbit_matvec_args, sys::cudaStream_t) -> sys::moek_status;
const _: [SubbitMatvecFn; 2] = [sys::moek_subbit_matvec, moek_subbit_matvec];
type SubbitGemmSizeFn = unsafe extern "C" fn(*const sys::moek_subbit_grouped_gemm_args, *mut usize) -> sys::moek_status;
const _: [SubbitGemmSizeFn; 2] =
    [sys::moek_subbit_grouped_gemm_workspace_size, moek_subbit_grouped_gemm_workspace_size];
type SubbitGemmFn =
    unsafe extern "C" fn(*const sys::moek_subbit_grouped_gemm_args, sys::cudaStream_t) -> sys::moek_status;
const _: [SubbitGemmFn; 2] = [sys::moek_subbit_grouped_gemm, moek_subbit_grouped_gemm];
type EpLayoutFn = unsafe extern "C" fn(*const sys::moek_ep_config, *mut sys::moek_ep_layout) -> sys::moek_status;
const _: [EpLayoutFn; 2] = [sys::moek_ep_layout_query, moek_ep_layout_query];
type EpDispatchFn = unsafe extern "C" fn(*const sys::moek_ep_dispatch_args, sys::cudaStream_t) -> sys::moek_status;
const _: [EpDispatchFn; 2] = [sys::moek_ep_dispatch, moek_ep_dispatch];
type EpCombineFn = unsafe extern "C" fn(*const sys::moek_ep_combine_args, sys::cudaStream_t) -> sys::moek_status;
const _: [EpCombineFn; 2] = [sys::moek_ep_combine, moek_ep_combine];
type LowDimSizeFn = unsafe extern "C" fn(*const sys::moek_ep_low_dim_group, *mut usize) -> sys::moek_status;
const _: [LowDimSizeFn; 2] = [sys::moek_ep_low_dim_workspace_size, moek_ep_low_dim_workspace_size];
type LowDimDispatchFn =
    unsafe extern "C" fn(*const sys::moek_ep_low_dim_dispatch_args, sys::cudaStream_t) -> sys::moek_status;
const _: [LowDimDispatchFn; 2] = [sys::moek_ep_low_dim_dispatch, moek_ep_low_dim_dispatch];
type LowDimCombineFn =
    unsafe extern "C" fn(*const sys::moek_ep_low_dim_combine_args, sys::cudaStream_t) -> sys::moek_status;
const _: [LowDimCombineFn; 2] = [sys::moek_ep_low_dim_combine, moek_ep_low_dim_combine];
