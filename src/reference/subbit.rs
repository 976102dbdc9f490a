//! CPU reference of the sub-1-bit kernels: the dense bf16 weights the decode kernel writes (which the fused
//! grouped GEMM multiplies by), the dense f16-level weights the fused matvec multiplies by, and the
//! products computed from them.

use crate::subbit::Compressed;
use half::bf16;

/// Every matrix of `view` as dense bf16 [M, R, C]: the CPU decoder's values (f16 levels) rounded to
/// bf16, to nearest even. The GPU decode must equal this bit for bit.
pub fn dense_bf16(view: &Compressed) -> Vec<bf16> {
    (0..view.matrices).flat_map(|m| view.decode(m).dense()).map(bf16::from_f32).collect()
}

/// Every matrix of `view` as dense f32 [M, R, C] holding the f16 levels exactly: the weights of the
/// fused matvec (`y = sum x * W` with W = 0, +pos or -neg, the levels in f16; see the header). These are
/// not [`dense_bf16`]'s values: a level rounded to bf16 moves by up to 2^-8 of itself, all of a row's
/// weights of one sign the same way, which shifts an output by up to 2^-8 of its positive and negative
/// partial sums; where those cancel (|y| far below them) that is a large error relative to y.
pub fn dense(view: &Compressed) -> Vec<f32> {
    (0..view.matrices).flat_map(|m| view.decode(m).dense()).collect()
}

/// `y[t, r] = sum over c of x[t, c] * w[r, c]` for `w` [rows, cols] (see [`dense`]) and `x` [tokens, cols],
/// accumulated in f64 and returned in f32 ([tokens, rows]).
pub fn matvec(w: &[f32], rows: usize, cols: usize, x: &[bf16], tokens: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(tokens * rows);
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            let sum: f64 = wr.iter().zip(xt).map(|(&a, b)| f64::from(a) * f64::from(b.to_f32())).sum();
            y.push(sum as f32);
        }
    }
    y
}

/// The grouped product: matrix m of `dense` ([M, R, C], see [`dense`]) for rows `offsets[m]..offsets[m+1]` of `x`
/// ([tokens, C]). Rows no matrix owns are NaN in the result ([tokens, R]).
pub fn grouped_matvec(dense: &[f32], rows: usize, cols: usize, offsets: &[i32], x: &[bf16], tokens: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; tokens * rows];
    for m in 0..offsets.len().saturating_sub(1) {
        let lo = (offsets[m].max(0) as usize).min(tokens);
        let hi = (offsets[m + 1].max(0) as usize).clamp(lo, tokens);
        if hi == lo {
            continue;
        }
        let w = &dense[m * rows * cols..(m + 1) * rows * cols];
        let part = matvec(w, rows, cols, &x[lo * cols..hi * cols], hi - lo);
        y[lo * rows..hi * rows].copy_from_slice(&part);
    }
    y
}

/// The fused grouped GEMM: for every matrix m and every row r of `x` ([num_rows, C]) it owns (rows
/// `offsets[m]..offsets[m+1]`, each clamped to `0..=num_rows`; offsets that go backwards own none),
/// `y[r, n] = row_scale[r] · sum over c of x[r, c] · w[m, n, c]`, the sum accumulated in f64 and the
/// result returned in f32 ([num_rows, R]). `w` is [`dense_bf16`] ([M, R, C]): the kernel multiplies by the decode's bf16 weights
/// on the tensor cores, not by the f16 levels. Rows no matrix owns are NaN. Where two matrices' rows
/// overlap (offsets out of order) the later one's product is kept.
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm(
    w: &[bf16],
    rows: usize,
    cols: usize,
    offsets: &[i32],
    x: &[bf16],
    num_rows: usize,
    row_scale: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = vec![f32::NAN; num_rows * rows];
    let clamp = |o: i32| (o.max(0) as usize).min(num_rows);
    for m in 0..offsets.len().saturating_sub(1) {
        let (lo, hi) = (clamp(offsets[m]), clamp(offsets[m + 1]));
        if hi <= lo {
            continue;
        }
        let wm: Vec<f32> = w[m * rows * cols..(m + 1) * rows * cols].iter().map(|v| v.to_f32()).collect();
        let part = matvec(&wm, rows, cols, &x[lo * cols..hi * cols], hi - lo);
        for (i, v) in part.into_iter().enumerate() {
            let r = lo + i / rows;
            let scale = row_scale.map_or(1.0, |s| f64::from(s[r]));
            y[lo * rows + i] = (f64::from(v) * scale) as f32;
        }
    }
    y
}
