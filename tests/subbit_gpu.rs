//! The sub-1-bit kernels against the CPU on fresh random inputs: the GPU decode equals the CPU decode bit
//! for bit; the fused matvec (plain and grouped) matches the reference product of the dense weights it
//! multiplies by (the f16 levels, `reference::dense`, not the decode's bf16 values: see there) on odd
//! shapes (rows and cols off the tile, one row, one expert, empty experts, more than 8 rows of an expert,
//! tiles too wide for the shared-memory x window, tiles of several restarts), 1..=8 tokens, outputs
//! poisoned first; run-to-run bit identity; a CUDA-graph replay. The fused decode + grouped GEMM against
//! the product of the decode's bf16 weights (`reference::grouped_gemm`): Mixtral-like small shapes (tile
//! 256 and 512), one row, experts without rows, all rows on one expert, 64 rows per expert, R and C off
//! the block and the image's tiles, rows no expert owns, with and without a row scale, every K-slice
//! count; and its CUDA-graph replay with new offsets in the same buffers. Skips (with a notice) where
//! there is no GPU. Every test holds `common::serial()`: two of them capture graphs.

mod common;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::reference::subbit as reference;
use moe_kernels::subbit::{
    decode_on_gpu, encode, grouped_gemm, matvec, random_iid, Compressed, DeviceWeights, Experts,
};
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
    let _serial = common::serial();
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
    let _serial = common::serial();
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
    let _serial = common::serial();
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
    let _serial = common::serial();
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

/// The grouped GEMM's shapes: (matrices, rows R, cols C, tile_cols, P(0)).
const GEMM_SHAPES: [(usize, usize, usize, usize, f64); 6] = [
    (2, 300, 1000, 256, 0.885),  // Mixtral-like, small: 4 tiles a row (up to 4 K slices)
    (2, 300, 1000, 512, 0.885),  // the same with 2 tiles a row
    (3, 37, 2049, 1024, 0.885),  // R and C odd: element-wise x copies and y stores
    (1, 129, 1001, 256, 0.9),    // two blocks of weight rows, the second of one row; C not a multiple of 8
    (2, 136, 5000, 1024, 0.885), // 5 tiles, the last partial
    (2, 64, 4096, 2048, 0.885),  // Mixtral's K
];

/// (what, num_rows, offsets) for `m` experts: 64 rows each, a single row, experts without rows, all rows
/// on the first or the last expert, rows past a block of 64, rows no expert owns, random offsets.
fn gemm_routings(rng: &mut impl Rng, m: usize) -> Vec<(String, usize, Vec<i32>)> {
    let each = |count: usize| (0..=m).map(|e| (e * count) as i32).collect::<Vec<_>>();
    let on = |e: usize, rows: usize| (0..=m).map(|j| if j > e { rows as i32 } else { 0 }).collect::<Vec<_>>();
    let mut all = vec![
        ("64 rows per expert".to_string(), 64 * m, each(64)),
        ("one row on the first expert".to_string(), 1, on(0, 1)),
        ("one row on the last expert".to_string(), 1, on(m - 1, 1)),
        ("all rows on the first expert".to_string(), 100, on(0, 100)),
        ("all rows on the last expert".to_string(), 130, on(m - 1, 130)),
        ("65 rows per expert".to_string(), 65 * m, each(65)),
    ];
    // Experts without rows between others, and rows past the last expert's end (never written).
    let mut gaps = vec![0i32];
    for e in 0..m {
        let last = *gaps.last().unwrap();
        gaps.push(last + if e % 2 == 1 { 0 } else { 37 });
    }
    let owned = *gaps.last().unwrap() as usize;
    all.push(("experts without rows, rows past the end".to_string(), owned + 11, gaps));
    for rows in [17usize, 150] {
        all.push((format!("random over {rows} rows"), rows, offsets_of(rng, m, rows)));
    }
    all
}

fn random_scale(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(0.25f32..2.0)).collect()
}

#[test]
fn fused_grouped_gemm_matches_the_dense_bf16_reference() {
    let _serial = common::serial();
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("fused_grouped_gemm_matches_the_dense_bf16_reference");
    let mut failures = Vec::new();
    for (m, r, c, tile, p0) in GEMM_SHAPES {
        let bytes = compressed(&mut rng, m, r, c, tile, p0);
        let view = Compressed::parse(&bytes).unwrap();
        let weights = DeviceWeights::upload(&stream, &view).unwrap();
        let dense = reference::dense_bf16(&view);
        let tiles = c.div_ceil(tile) as u32;
        for (case, (what, rows, offsets)) in gemm_routings(&mut rng, m).into_iter().enumerate() {
            let x = random_x(&mut rng, rows * c);
            let scale = (case % 2 == 1).then(|| random_scale(&mut rng, rows));
            let want = reference::grouped_gemm(&dense, r, c, &offsets, &x, rows, scale.as_deref());
            let d_x = stream.clone_htod(&x).unwrap();
            let d_offsets = stream.clone_htod(&offsets).unwrap();
            let d_scale = scale.as_ref().map(|s| stream.clone_htod(s).unwrap());
            let mut splits = vec![0u32, 1, 2, tiles, tiles + 3];
            splits.dedup();
            for split_k in splits {
                let mut y = poisoned(&stream, rows * r);
                let need = weights.grouped_gemm_workspace_bytes(rows, split_k).unwrap();
                let mut ws = stream.alloc_zeros::<u8>(need.max(16)).unwrap();
                let scale_view = d_scale.as_ref().map(|s| s.slice(..));
                grouped_gemm(
                    &stream,
                    &weights,
                    &d_offsets.slice(..),
                    rows,
                    &d_x.slice(..),
                    scale_view.as_ref(),
                    &mut y.slice_mut(..),
                    split_k,
                    Some(&mut ws.slice_mut(..)),
                )
                .unwrap();
                let got = stream.clone_dtoh(&y).unwrap();
                let label = format!(
                    "{m} x {r} x {c} tile {tile}, {what} (offsets {offsets:?}), scaled {}, split_k {split_k}",
                    scale.is_some()
                );
                if let Err(e) = check(&got[..rows * r], &want, &label) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn grouped_gemm_is_bit_identical_from_run_to_run_and_replays_new_offsets_from_a_cuda_graph() {
    let _serial = common::serial();
    let Some((ctx, stream)) = common::gpu() else { return };
    unsafe { ctx.disable_event_tracking() };
    let mut rng =
        common::rng("grouped_gemm_is_bit_identical_from_run_to_run_and_replays_new_offsets_from_a_cuda_graph");
    let (m, r, c, rows) = (2usize, 300usize, 1000usize, 128usize);
    let bytes = compressed(&mut rng, m, r, c, 256, 0.885);
    let view = Compressed::parse(&bytes).unwrap();
    let weights = DeviceWeights::upload(&stream, &view).unwrap();
    let dense = reference::dense_bf16(&view);
    // Automatic slices (4 tiles a row: this shape splits), so the graph holds the reduce kernel too.
    let need = weights.grouped_gemm_workspace_bytes(rows, 0).unwrap();
    assert!(need > 0, "the automatic choice should split this small shape");
    let mut d_offsets = stream.clone_htod(&[0i32, 64, 128]).unwrap();
    let mut d_x = stream.clone_htod(&random_x(&mut rng, rows * c)).unwrap();
    let scale = random_scale(&mut rng, rows);
    let d_scale = stream.clone_htod(&scale).unwrap();
    let mut y = poisoned(&stream, rows * r);
    let mut ws = stream.alloc_zeros::<u8>(need).unwrap();
    let run = |d_offsets: &CudaSlice<i32>, d_x: &CudaSlice<bf16>, y: &mut CudaSlice<bf16>, ws: &mut CudaSlice<u8>| {
        grouped_gemm(
            &stream,
            &weights,
            &d_offsets.slice(..),
            rows,
            &d_x.slice(..),
            Some(&d_scale.slice(..)),
            &mut y.slice_mut(..),
            0,
            Some(&mut ws.slice_mut(..)),
        )
        .unwrap()
    };
    // Once outside the capture: loads the kernels before it.
    run(&d_offsets, &d_x, &mut y, &mut ws);
    stream.synchronize().unwrap();
    stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    run(&d_offsets, &d_x, &mut y, &mut ws);
    let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap().expect("a graph");
    let routings = [vec![0i32, 64, 128], vec![0, 0, 128], vec![0, 1, 1], vec![0, 100, 120], vec![0, 70, 70]];
    for (replay, offsets) in routings.iter().enumerate() {
        let x = random_x(&mut rng, rows * c);
        stream.memcpy_htod(&x, &mut d_x).unwrap();
        stream.memcpy_htod(offsets, &mut d_offsets).unwrap();
        stream.memcpy_htod(&vec![bf16::from_bits(POISON); rows * r], &mut y).unwrap();
        graph.launch().unwrap();
        let first = stream.clone_dtoh(&y).unwrap();
        let want = reference::grouped_gemm(&dense, r, c, offsets, &x, rows, Some(&scale));
        check(&first, &want, &format!("replay {replay}, offsets {offsets:?}")).unwrap();
        graph.launch().unwrap();
        let second = stream.clone_dtoh(&y).unwrap();
        assert!(
            first.iter().zip(&second).all(|(a, b)| a.to_bits() == b.to_bits()),
            "replay {replay}: two runs on the same inputs differ"
        );
    }
}
