//! Finding the GPU: one place that says why there is none, for the examples and the tests.

use cudarc::driver::CudaContext;
use std::sync::Arc;

/// A context on GPU 0, or why there is none: the crate was built without kernels, there is no CUDA
/// driver, or the driver found no usable device.
pub fn first_gpu() -> std::result::Result<Arc<CudaContext>, String> {
    if !crate::KERNELS_BUILT {
        return Err("this build has no CUDA kernels (no nvcc at build time)".to_string());
    }
    // SAFETY: only asks whether libcuda can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda) on this machine".to_string());
    }
    CudaContext::new(0).map_err(|e| format!("no usable GPU ({e})"))
}
