//! The sub-1-bit kernels against the CPU on fresh random inputs: the GPU decode equals the CPU decode bit
//! for bit; the fused matvec (plain and grouped) matches the reference product of the dense weights it
//! multiplies by (the f16 levels, `reference::dense`, not the decode's bf16 values: see there) on odd
//! shapes (rows and cols off the tile, one row, one expert, empty experts, more than 8 rows of an expert,
//! tiles too wide for the shared-memory x window, tiles of several restarts), 1..=8 tokens, outputs
//! poisoned first; run-to-run bit identity; a CUDA-graph replay. Skips (with a notice) where there is no
//! GPU.

mod common;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::reference::subbit as reference;
use moe_kernels::subbit::{decode_on_gpu, encode, matvec, random_iid, Compressed, DeviceWeights, Experts};
use rand::Rng;
use std::sync::Arc;

/// A bf16 NaN with a payload no kernel writes: a value still holding it was never written.
const POISON: u16 = 0x7fa5;

/// (matrices, rows, cols, tile_cols, P(0)).
const SHAPES: [(usize, usize, usize, usize, f64); 11] = [
    (1, 1, 1, 256, 0.885),
    // One output per token, so a y whose positive and negative parts cancel is judged alone: with the
    // decode's bf16 weights as the reference this failed at T=1 (MOEK_SEED=4901957154976623329: y =
    // 0.00806 against 0.00837, the levels' bf16 rounding; the kernel's value was right).
    (1, 1, 300, 256, 0.5),
    (1, 1, 300, 1024, 0.5),    // cols < a tile: restarts past the row's end
    (1, 4, 1500, 2048, 0.885), // one partial tile of several restarts, the last one partial
    (2, 3, 700, 256, 0.885),
    (3, 17, 1300, 512, 0.95),
    (1, 37, 2049, 1024, 0.885),
    (2, 64, 4096, 2048, 0.885),
    (1, 9, 5000, 8192, 0.885), // one tile wider than the shared-memory window for NT >= 2
    (2, 300, 1000, 256, 0.0),  // no zeros at all: short phrases
    (1, 5, 3000, 1024, 0.999), // almost all zeros: 32-symbol phrases
];

fn compressed(rng: &mut impl Rng, m: usize, r: usize, c: usize, tile: usize, p0: f64) -> Vec<u8> {
    let ms: Vec<_> = (0..m).map(|_| random_iid(rng, r, c, p0)).collect();
    encode(&ms, tile).unwrap()
}

fn random_x(rng: &mut impl Rng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect()
}

fn poisoned(stream: &Arc<CudaStream>, n: usize) -> CudaSlice<bf16> {
    stream.clone_htod(&vec![bf16::from_bits(POISON); n.max(1)]).unwrap()
}

/// Relative Frobenius error of `got` against `want` over the entries where `want` is not NaN; entries
/// where `want` is NaN must still hold the poison.
fn check(got: &[bf16], want: &[f32], what: &str) -> Result<(), String> {
    let (mut err, mut norm) = (0f64, 0f64);
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            if g.to_bits() != POISON {
                return Err(format!("{what}: entry {i} belongs to no expert but was written ({g})"));
            }
            continue;
        }
        if g.to_bits() == POISON {
            return Err(format!("{what}: entry {i} was not written"));
        }
        let d = f64::from(g.to_f32()) - f64::from(w);
        err += d * d;
        norm += f64::from(w) * f64::from(w);
    }
    let rel = (err / norm.max(1e-30)).sqrt();
    if rel < 1e-2 {
        Ok(())
    } else {
        Err(format!("{what}: relative Frobenius error {rel:.3e}"))
    }
}

#[test]
fn gpu_decode_equals_cpu_decode_bit_for_bit() {
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("gpu_decode_equals_cpu_decode_bit_for_bit");
    for (m, r, c, tile, p0) in SHAPES {
        let bytes = compressed(&mut rng, m, r, c, tile, p0);
        let view = Compressed::parse(&bytes).unwrap();
        let weights = DeviceWeights::upload(&stream, &view).unwrap();
        let mut out = poisoned(&stream, m * r * c);
        decode_on_gpu(&stream, &weights, &mut out.slice_mut(..)).unwrap();
        let got = stream.clone_dtoh(&out).unwrap();
        let want = reference::dense_bf16(&view);
        if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            let (mat, row, col) = (i / (r * c), i / c % r, i % c);
            panic!(
                "{m} x {r} x {c}, tile {tile}, P(0) {p0}: matrix {mat} row {row} col {col} is {} (bits {:#06x}), the CPU says {} ({:#06x})",
                got[i],
                got[i].to_bits(),
                want[i],
                want[i].to_bits()
            );
        }
    }
}

#[test]
fn fused_matvec_matches_the_dense_reference() {
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("fused_matvec_matches_the_dense_reference");
    let mut failures = Vec::new();
    for (m, r, c, tile, p0) in SHAPES {
        if p0 == 0.0 {
            continue; // every weight nonzero: the relative error is fine but the case adds nothing here
        }
        let bytes = compressed(&mut rng, m, r, c, tile, p0);
        let view = Compressed::parse(&bytes).unwrap();
        let weights = DeviceWeights::upload(&stream, &view).unwrap();
        let dense = reference::dense(&view);
        for t in 1..=8usize {
            let matrix = rng.random_range(0..m);
            let x = random_x(&mut rng, t * c);
            let d_x = stream.clone_htod(&x).unwrap();
            let mut y = poisoned(&stream, t * r);
            let mut ws = stream.alloc_zeros::<u8>(weights.matvec_workspace_bytes(t).unwrap().max(16)).unwrap();
            matvec(
                &stream,
                &weights,
                &Experts::Matrix(matrix),
                t,
                &d_x.slice(..),
                &mut y.slice_mut(..),
                Some(&mut ws.slice_mut(..)),
            )
            .unwrap();
            let got = stream.clone_dtoh(&y).unwrap();
            let w = &dense[matrix * r * c..(matrix + 1) * r * c];
            let want = reference::matvec(w, r, c, &x, t);
            if let Err(e) = check(&got[..t * r], &want, &format!("{m} x {r} x {c} tile {tile}, matrix {matrix}, T={t}"))
            {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random expert offsets over `rows` rows for `m` experts: some experts empty, some with more than 8
/// rows when there are enough; the last offset may stop short of `rows` (rows no expert owns).
fn offsets_of(rng: &mut impl Rng, m: usize, rows: usize) -> Vec<i32> {
    let owned = if rows > 1 && rng.random_bool(0.5) { rows - 1 } else { rows };
    let mut cuts: Vec<usize> = (0..m - 1).map(|_| rng.random_range(0..=owned)).collect();
    cuts.sort_unstable();
    let mut offsets = vec![0i32];
    offsets.extend(cuts.iter().map(|&x| x as i32));
    offsets.push(owned as i32);
    offsets
}

#[test]
fn grouped_matvec_matches_the_dense_reference() {
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("grouped_matvec_matches_the_dense_reference");
    let mut failures = Vec::new();
    for (m, r, c, tile, p0) in [(8, 40, 1000, 256, 0.885), (1, 33, 3000, 1024, 0.885), (3, 7, 9000, 8192, 0.9)] {
        let bytes = compressed(&mut rng, m, r, c, tile, p0);
        let view = Compressed::parse(&bytes).unwrap();
        let weights = DeviceWeights::upload(&stream, &view).unwrap();
        let dense = reference::dense(&view);
        for rows in [1usize, 2, 5, 8, 16, 27] {
            let offsets = offsets_of(&mut rng, m, rows);
            let x = random_x(&mut rng, rows * c);
            let d_x = stream.clone_htod(&x).unwrap();
            let d_offsets = stream.clone_htod(&offsets).unwrap();
            let mut y = poisoned(&stream, rows * r);
            let mut ws = stream.alloc_zeros::<u8>(weights.matvec_workspace_bytes(rows).unwrap().max(16)).unwrap();
            matvec(
                &stream,
                &weights,
                &Experts::Offsets(d_offsets.slice(..)),
                rows,
                &d_x.slice(..),
                &mut y.slice_mut(..),
                Some(&mut ws.slice_mut(..)),
            )
            .unwrap();
            let got = stream.clone_dtoh(&y).unwrap();
            let want = reference::grouped_matvec(&dense, r, c, &offsets, &x, rows);
            if let Err(e) = check(&got[..rows * r], &want, &format!("{m} x {r} x {c} tile {tile}, offsets {offsets:?}"))
            {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn matvec_is_bit_identical_from_run_to_run_and_replays_from_a_cuda_graph() {
    let Some((ctx, stream)) = common::gpu() else { return };
    unsafe { ctx.disable_event_tracking() };
    let mut rng = common::rng("matvec_is_bit_identical_from_run_to_run_and_replays_from_a_cuda_graph");
    let (m, r, c, t) = (2usize, 96usize, 3000usize, 5usize);
    let bytes = compressed(&mut rng, m, r, c, 1024, 0.885);
    let view = Compressed::parse(&bytes).unwrap();
    let weights = DeviceWeights::upload(&stream, &view).unwrap();
    let dense = reference::dense(&view);
    let offsets = vec![0i32, 2, t as i32];
    let d_offsets = stream.clone_htod(&offsets).unwrap();
    let mut d_x = stream.clone_htod(&random_x(&mut rng, t * c)).unwrap();
    let mut y = poisoned(&stream, t * r);
    let mut ws = stream.alloc_zeros::<u8>(weights.matvec_workspace_bytes(t).unwrap()).unwrap();
    stream.synchronize().unwrap();
    stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    matvec(
        &stream,
        &weights,
        &Experts::Offsets(d_offsets.slice(..)),
        t,
        &d_x.slice(..),
        &mut y.slice_mut(..),
        Some(&mut ws.slice_mut(..)),
    )
    .unwrap();
    let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap().expect("a graph");
    for replay in 0..3 {
        let x = random_x(&mut rng, t * c);
        stream.memcpy_htod(&x, &mut d_x).unwrap();
        stream.memcpy_htod(&vec![bf16::from_bits(POISON); t * r], &mut y).unwrap();
        graph.launch().unwrap();
        let first = stream.clone_dtoh(&y).unwrap();
        let want = reference::grouped_matvec(&dense, r, c, &offsets, &x, t);
        check(&first, &want, &format!("replay {replay}")).unwrap();
        graph.launch().unwrap();
        let second = stream.clone_dtoh(&y).unwrap();
        assert!(
            first.iter().zip(&second).all(|(a, b)| a.to_bits() == b.to_bits()),
            "replay {replay}: two runs on the same inputs differ"
        );
    }
}
