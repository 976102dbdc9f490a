//! Element types of tensors passed to the kernels.

use crate::sys;
use cudarc::driver::DeviceRepr;

/// A tensor element type the kernels take: f32, bf16 or f16.
pub trait Element: DeviceRepr + Copy {
    /// The header's `moek_dtype` of this type.
    const DTYPE: sys::moek_dtype;
    /// Converts to f32 (exactly).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type (to nearest even).
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: sys::moek_dtype = sys::moek_dtype_MOEK_DTYPE_F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for half::bf16 {
    const DTYPE: sys::moek_dtype = sys::moek_dtype_MOEK_DTYPE_BF16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl Element for half::f16 {
    const DTYPE: sys::moek_dtype = sys::moek_dtype_MOEK_DTYPE_F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// Bytes of one element of `dtype` (None for a value that is not a moek_dtype).
pub(crate) fn size_of(dtype: sys::moek_dtype) -> Option<usize> {
    match dtype {
        sys::moek_dtype_MOEK_DTYPE_F32 => Some(4),
        sys::moek_dtype_MOEK_DTYPE_BF16 | sys::moek_dtype_MOEK_DTYPE_F16 => Some(2),
        _ => None,
    }
}
