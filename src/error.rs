//! Status codes (shared with the C header) and the Rust error type.

use crate::sys;
use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::fmt;

/// What went wrong, as a C status code would say it. Values equal the header's `moek_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    NullPointer = sys::moek_status_MOEK_ERROR_NULL_POINTER,
    InvalidNumTokens = sys::moek_status_MOEK_ERROR_INVALID_NUM_TOKENS,
    InvalidNumExperts = sys::moek_status_MOEK_ERROR_INVALID_NUM_EXPERTS,
    InvalidK = sys::moek_status_MOEK_ERROR_INVALID_K,
    InvalidGroups = sys::moek_status_MOEK_ERROR_INVALID_GROUPS,
    InvalidTopkGroups = sys::moek_status_MOEK_ERROR_INVALID_TOPK_GROUPS,
    InvalidCapacity = sys::moek_status_MOEK_ERROR_INVALID_CAPACITY,
    InvalidDtype = sys::moek_status_MOEK_ERROR_INVALID_DTYPE,
    InvalidEnum = sys::moek_status_MOEK_ERROR_INVALID_ENUM,
    Misaligned = sys::moek_status_MOEK_ERROR_MISALIGNED,
    WorkspaceTooSmall = sys::moek_status_MOEK_ERROR_WORKSPACE_TOO_SMALL,
    BufferTooSmall = sys::moek_status_MOEK_ERROR_BUFFER_TOO_SMALL,
    InvalidValue = sys::moek_status_MOEK_ERROR_INVALID_VALUE,
    NoCudaKernels = sys::moek_status_MOEK_ERROR_NO_CUDA_KERNELS,
    Cuda = sys::moek_status_MOEK_ERROR_CUDA,
    InvalidRanks = sys::moek_status_MOEK_ERROR_INVALID_RANKS,
}

impl Status {
    /// The header's text for this status (what `moek_status_string` returns).
    pub fn description(self) -> &'static str {
        status_text(self as sys::moek_status).to_str().expect("ASCII")
    }
}

/// The static description of any status value, known or not.
pub(crate) fn status_text(status: sys::moek_status) -> &'static CStr {
    match status {
        sys::moek_status_MOEK_SUCCESS => c"success",
        sys::moek_status_MOEK_ERROR_NULL_POINTER => c"a required pointer is NULL",
        sys::moek_status_MOEK_ERROR_INVALID_NUM_TOKENS => c"invalid num_tokens",
        sys::moek_status_MOEK_ERROR_INVALID_NUM_EXPERTS => c"invalid num_experts",
        sys::moek_status_MOEK_ERROR_INVALID_K => c"invalid k",
        sys::moek_status_MOEK_ERROR_INVALID_GROUPS => c"invalid num_groups",
        sys::moek_status_MOEK_ERROR_INVALID_TOPK_GROUPS => c"invalid topk_groups",
        sys::moek_status_MOEK_ERROR_INVALID_CAPACITY => c"invalid capacity",
        sys::moek_status_MOEK_ERROR_INVALID_DTYPE => c"unsupported dtype",
        sys::moek_status_MOEK_ERROR_INVALID_ENUM => c"invalid enum value",
        sys::moek_status_MOEK_ERROR_MISALIGNED => c"misaligned pointer",
        sys::moek_status_MOEK_ERROR_WORKSPACE_TOO_SMALL => c"workspace too small",
        sys::moek_status_MOEK_ERROR_BUFFER_TOO_SMALL => c"buffer too small",
        sys::moek_status_MOEK_ERROR_INVALID_VALUE => c"invalid value",
        sys::moek_status_MOEK_ERROR_NO_CUDA_KERNELS => {
            c"built without CUDA kernels (no nvcc at build time; see scripts/setup-cuda.sh)"
        }
        sys::moek_status_MOEK_ERROR_CUDA => c"a CUDA call failed",
        sys::moek_status_MOEK_ERROR_INVALID_RANKS => c"invalid num_ranks or rank",
        _ => c"unknown status",
    }
}

/// An error from any moe-kernels call: the status and a message naming the argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// The status code the C interface returns for it.
    pub status: Status,
    /// Which argument was wrong and why (or the CUDA error).
    pub message: String,
}

impl Error {
    pub(crate) fn new(status: Status, message: impl Into<String>) -> Self {
        Error { status, message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.description(), self.message)
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::new(Status::Cuda, format!("CUDA driver: {e}"))
    }
}

/// Result of moe-kernels calls.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for returning an error naming an argument.
macro_rules! bail {
    ($status:ident, $($fmt:tt)+) => {
        return Err($crate::error::Error::new($crate::error::Status::$status, format!($($fmt)+)))
    };
}
pub(crate) use bail;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Converts a result to a C status, keeping the message for `moek_last_error_message`.
pub(crate) fn to_status(result: Result<()>) -> sys::moek_status {
    let (status, message) = match result {
        Ok(()) => (sys::moek_status_MOEK_SUCCESS, String::new()),
        Err(e) => (e.status as sys::moek_status, e.to_string()),
    };
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|cell| *cell.borrow_mut() = message);
    status
}

/// Pointer to the calling thread's last error message (valid until its next call).
pub(crate) fn last_error_ptr() -> *const std::os::raw::c_char {
    LAST_ERROR.with(|cell| cell.borrow().as_ptr())
}
