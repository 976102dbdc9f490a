//! Argument checks shared by the operations: pointers and buffer lengths, each failure naming the
//! argument.

use crate::error::{bail, Result};

/// `p` must be non-NULL when `required`, and aligned to `align` bytes when given.
pub(crate) fn pointer<T>(name: &str, p: *const T, required: bool, align: usize) -> Result<()> {
    if p.is_null() {
        if required {
            bail!(NullPointer, "{name} is NULL");
        }
        return Ok(());
    }
    if (p as usize) % align != 0 {
        bail!(Misaligned, "{name} = {p:?} is not aligned to {align} bytes");
    }
    Ok(())
}

/// A buffer of `have` elements must hold `need`.
pub(crate) fn length(name: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        bail!(BufferTooSmall, "{name} has {have} elements but {need} are needed");
    }
    Ok(())
}
