//! The grouped-GEMM CPU reference (the oracle for the kernels of the grouped-GEMM issue) against a plain
//! per-expert matrix loop, the epilogues against known values, and the masked layout against the
//! contiguous one.

use moe_kernels::reference::grouped_gemm::{
    erf, gelu, grouped_gemm, grouped_gemm_masked, relative_frobenius_error, silu, Epilogue,
};
use proptest::prelude::*;

/// C = A·B^T for one expert, the obvious way, in f64.
fn dense(a: &[f32], b: &[f32], rows: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0.0; rows * n];
    for r in 0..rows {
        for j in 0..n {
            for i in 0..k {
                c[r * n + j] += f64::from(a[r * k + i]) * f64::from(b[j * k + i]);
            }
        }
    }
    c
}

proptest! {
    #[test]
    fn grouped_equals_the_per_expert_loop(
        counts in proptest::collection::vec(0usize..5, 1..6),
        n8 in 1usize..3, k8 in 1usize..3, seed in any::<u64>(), swiglu in any::<bool>(),
    ) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (n, k) = (n8 * 8, k8 * 8);
        let e = counts.len();
        let mut offsets = vec![0i32];
        for &c in &counts {
            offsets.push(offsets.last().unwrap() + c as i32);
        }
        let rows = *offsets.last().unwrap() as usize;
        let a: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let b: Vec<f32> = (0..e * n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let scale: Vec<f32> = (0..rows).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let epilogue = if swiglu { Epilogue::SwiGlu } else { Epilogue::Identity };
        let got = grouped_gemm(&a, &b, &offsets, n, k, epilogue, Some(&scale));
        let cols = epilogue.output_columns(n);
        prop_assert_eq!(got.len(), rows * cols);
        for x in 0..e {
            let (lo, hi) = (offsets[x] as usize, offsets[x + 1] as usize);
            let c = dense(&a[lo * k..hi * k], &b[x * n * k..(x + 1) * n * k], hi - lo, n, k);
            for r in 0..hi - lo {
                for j in 0..cols {
                    let want = if swiglu { silu(c[r * n + j]) * c[r * n + n / 2 + j] } else { c[r * n + j] };
                    let want = want * f64::from(scale[lo + r]);
                    prop_assert!((f64::from(got[(lo + r) * cols + j]) - want).abs() <= 1e-6 * want.abs().max(1.0));
                }
            }
        }
    }

    #[test]
    fn masked_layout_equals_contiguous_rows(counts in proptest::collection::vec(0i32..4, 1..5), seed in any::<u64>()) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (n, k, capacity, e) = (16, 8, 4, counts.len());
        let a: Vec<f32> = (0..e * capacity * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let b: Vec<f32> = (0..e * n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let masked = grouped_gemm_masked(&a, &b, &counts, capacity, n, k, Epilogue::Relu);
        // The same rows packed contiguously.
        let mut packed = Vec::new();
        let mut offsets = vec![0i32];
        for (x, &c) in counts.iter().enumerate() {
            packed.extend_from_slice(&a[x * capacity * k..(x * capacity + c as usize) * k]);
            offsets.push(offsets.last().unwrap() + c);
        }
        let contiguous = grouped_gemm(&packed, &b, &offsets, n, k, Epilogue::Relu, None);
        for (x, &c) in counts.iter().enumerate() {
            for i in 0..capacity {
                let got = &masked[(x * capacity + i) * n..(x * capacity + i + 1) * n];
                if i < c as usize {
                    let r = offsets[x] as usize + i;
                    prop_assert_eq!(got, &contiguous[r * n..(r + 1) * n]);
                } else {
                    prop_assert!(got.iter().all(|&v| v == 0.0));
                }
            }
        }
    }
}

#[test]
fn activations_match_known_values() {
    // erf and GELU against values from the error function's tables.
    for (x, want) in [(0.0, 0.0), (0.5, 0.520_499_877_8), (1.0, 0.842_700_792_9), (-2.0, -0.995_322_265_0)] {
        assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
    }
    assert!((gelu(1.0) - 0.841_344_746_1).abs() < 2e-7);
    assert!((gelu(-1.0) + 0.158_655_253_9).abs() < 2e-7);
    assert!((silu(1.0) - 0.731_058_578_6).abs() < 1e-9);
    let e = grouped_gemm(&[1.0, 0.0], &[-2.0, 5.0, 3.0, 1.0], &[0, 1], 2, 2, Epilogue::Relu, None);
    assert_eq!(e, vec![0.0, 3.0]);
    assert_eq!(relative_frobenius_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((relative_frobenius_error(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-6);
}
