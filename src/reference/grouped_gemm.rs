//! CPU reference of the grouped GEMM (the oracle for the grouped-GEMM kernels, written ahead of them):
//! for every expert e, the rows `offsets[e]..offsets[e+1]` of A ([rows, K]) times `B[e]^T` (B as [E, N, K],
//! the nn.Linear layout), followed by an epilogue. Products are accumulated in f64, so the reference is
//! more exact than any fp32-accumulating kernel it checks.

/// What is applied to each row of `A·B[e]^T` before it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// The product as it is ([rows, N]).
    Identity,
    /// SwiGLU on concatenated gate|up weights: columns 0..N/2 are the gate, N/2..N the up projection;
    /// the output is [rows, N/2] = silu(gate) * up.
    SwiGlu,
    /// GELU with the error function (PyTorch's default), [rows, N].
    Gelu,
    /// max(x, 0), [rows, N] (Switch Transformer).
    Relu,
}

impl Epilogue {
    /// Output columns for N product columns.
    pub fn output_columns(self, n: usize) -> usize {
        match self {
            Epilogue::SwiGlu => n / 2,
            _ => n,
        }
    }
}

/// silu(x) = x * sigmoid(x).
pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// erf(x), from Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, plenty for an fp32 oracle).
pub fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// GELU(x) = x * (1 + erf(x / sqrt 2)) / 2.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// Applies the epilogue to one row of products (f64), times the row's scale, into `out` (f32).
fn finish_row(products: &[f64], epilogue: Epilogue, scale: f64, out: &mut [f32]) {
    match epilogue {
        Epilogue::SwiGlu => {
            let half = products.len() / 2;
            for (j, o) in out.iter_mut().enumerate() {
                *o = (silu(products[j]) * products[half + j] * scale) as f32;
            }
        }
        Epilogue::Identity | Epilogue::Gelu | Epilogue::Relu => {
            for (o, &p) in out.iter_mut().zip(products) {
                let v = match epilogue {
                    Epilogue::Gelu => gelu(p),
                    Epilogue::Relu => p.max(0.0),
                    _ => p,
                };
                *o = (v * scale) as f32;
            }
        }
    }
}

/// One row of A times B[e]^T.
fn row_products(a_row: &[f32], b_expert: &[f32], n: usize, k: usize) -> Vec<f64> {
    (0..n)
        .map(|j| a_row.iter().zip(&b_expert[j * k..(j + 1) * k]).map(|(&x, &w)| f64::from(x) * f64::from(w)).sum())
        .collect()
}

/// The contiguous layout: `a` is [rows, K] with expert e owning rows `offsets[e]..offsets[e+1]`
/// (offsets has E + 1 entries, non-decreasing); `b` is [E, N, K]; `row_scale` (one per row of A) scales
/// each output row. Returns `[offsets[E], output_columns(N)]`; rows between experts' blocks (padding,
/// when `offsets[e+1] - offsets[e]` covers them) are computed like any other row of their expert.
pub fn grouped_gemm(
    a: &[f32],
    b: &[f32],
    offsets: &[i32],
    n: usize,
    k: usize,
    epilogue: Epilogue,
    row_scale: Option<&[f32]>,
) -> Vec<f32> {
    let experts = offsets.len() - 1;
    let rows = offsets[experts] as usize;
    let cols = epilogue.output_columns(n);
    assert!(a.len() >= rows * k && b.len() >= experts * n * k, "A or B shorter than the shape");
    let mut out = vec![0.0f32; rows * cols];
    for e in 0..experts {
        let b_expert = &b[e * n * k..(e + 1) * n * k];
        for r in offsets[e] as usize..offsets[e + 1] as usize {
            let products = row_products(&a[r * k..(r + 1) * k], b_expert, n, k);
            let scale = row_scale.map_or(1.0, |s| f64::from(s[r]));
            finish_row(&products, epilogue, scale, &mut out[r * cols..(r + 1) * cols]);
        }
    }
    out
}

/// The masked (capacity) layout: `a` is [E, capacity, K] and expert e uses its first `counts[e]` rows.
/// Returns [E, capacity, output_columns(N)] with the unused rows zero.
pub fn grouped_gemm_masked(
    a: &[f32],
    b: &[f32],
    counts: &[i32],
    capacity: usize,
    n: usize,
    k: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    let experts = counts.len();
    let cols = epilogue.output_columns(n);
    let mut out = vec![0.0f32; experts * capacity * cols];
    for (e, &count) in counts.iter().enumerate() {
        let b_expert = &b[e * n * k..(e + 1) * n * k];
        for i in 0..(count.max(0) as usize).min(capacity) {
            let r = e * capacity + i;
            let products = row_products(&a[r * k..(r + 1) * k], b_expert, n, k);
            finish_row(&products, epilogue, 1.0, &mut out[r * cols..(r + 1) * cols]);
        }
    }
    out
}

/// ||got - want|| / ||want|| (Frobenius), the error measure of the grouped-GEMM acceptance.
pub fn relative_frobenius_error(got: &[f32], want: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (f64::from(g) - f64::from(w)).powi(2);
        norm += f64::from(w).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}
