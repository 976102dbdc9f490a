//! The C interface of `include/moe_kernels.h`, implemented here so that argument checking is written
//! once (in Rust) and serves the C ABI, the Rust API and builds without CUDA alike. The signatures are
//! checked against the bindgen declarations in `src/sys.rs` at compile time (see the bottom).

use crate::error::{bail, last_error_ptr, status_text, to_status, Result};
use crate::{route, sys};
use std::os::raw::c_char;

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
    to_status((|| {
        let a = unsafe { read_args(args, "args") }?;
        if bytes.is_null() {
            bail!(NullPointer, "bytes is NULL");
        }
        let n = route::workspace_bytes(a)?;
        unsafe { bytes.write(n) };
        Ok(())
    })())
}

/// See `moek_route` in the header.
///
/// # Safety
/// `args` is NULL or valid, and its pointers satisfy the header's contract.
#[no_mangle]
pub unsafe extern "C" fn moek_route(args: *const sys::moek_route_args, stream: sys::cudaStream_t) -> sys::moek_status {
    to_status(unsafe { read_args(args, "args") }.and_then(|a| route::route_raw(a, stream)))
}

// Compile-time proof that the definitions above have the header's signatures.
const _: [unsafe extern "C" fn(sys::moek_status) -> *const c_char; 2] = [sys::moek_status_string, moek_status_string];
const _: [unsafe extern "C" fn() -> *const c_char; 2] = [sys::moek_last_error_message, moek_last_error_message];
const _: [unsafe extern "C" fn() -> u32; 2] = [sys::moek_version, moek_version];
type WorkspaceFn = unsafe extern "C" fn(*const sys::moek_route_args, *mut usize) -> sys::moek_status;
const _: [WorkspaceFn; 2] = [sys::moek_route_workspace_size, moek_route_workspace_size];
type RouteFn = unsafe extern "C" fn(*const sys::moek_route_args, sys::cudaStream_t) -> sys::moek_status;
const _: [RouteFn; 2] = [sys::moek_route, moek_route];
