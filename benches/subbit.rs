//! Sub-1-bit kernel benchmarks on the GPU for Mixtral-8x7B expert shapes: gate (or up) [14336, 4096] and
//! down [4096, 14336], two experts (a token's top-2) in one compressed buffer, i.i.d. ternary weights at
//! P(0) = 0.885 (about 0.71 bit/weight). Cases: the fused grouped matvec for T = 1..8 tokens (each token
//! a row of both experts: offsets [0, T, 2T]), the dense decode of both experts, and the fused decode +
//! grouped GEMM at 64 rows per expert (`_gemm64`, automatic K slices) beside our bf16 grouped GEMM
//! (`moe_kernels::grouped_gemm`, automatic tile and split) on the decoded dense weights with the same x
//! and offsets (`_gemm64_dense_bf16`). Timed with CUDA
//! events (criterion's `iter_custom`) and as one call's share of a CUDA graph of calls, plus a JSON of
//! medians (MOEK_BENCH_JSON, default target/bench-subbit.json) with the bytes moved (compressed image
//! sections read from HBM, x, y; the decode's dense output) and the dense-equivalent FLOP, for
//! `compare_torch.py --suite subbit` (same case names; torch runs the bf16 product of dense weights).
//! `MOEK_SUBBIT_ROWS_PER_BLOCK` and `MOEK_SUBBIT_TABLE_ENTRIES` (read by the library) override the fused
//! kernel's rows per block and shared-memory dictionary entries, `MOEK_SUBBIT_GEMM_SPLIT_TARGET` the
//! grouped GEMM's automatic K slices; `MOEK_BENCH_ONLY` runs only the cases whose name contains it.

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys;
use half::bf16;
use moe_kernels::grouped_gemm::{grouped_gemm as dense_grouped_gemm, ExpertRows, GemmConfig, Layout};
use moe_kernels::subbit::{
    decode_on_gpu, encode, grouped_gemm, matvec, random_iid, Compressed, DeviceWeights, Experts,
};
use rand::SeedableRng;
use std::time::Duration;

mod common;
use common::{measure, random_buffer, wanted, write_json};

const GRAPH_CALLS: usize = 10;
const EXPERTS: usize = 2;
const TILE_COLS: usize = 2048;
/// (name, rows, cols) of one expert's matrix.
const SHAPES: [(&str, usize, usize); 2] = [("mixtral_gate", 14336, 4096), ("mixtral_down", 4096, 14336)];
/// Rows per expert of the grouped GEMM cases.
const GEMM_ROWS_PER_EXPERT: usize = 64;

fn row(name: &str, t: usize, bytes: f64, flop: f64, dense_bytes: f64, (stream_us, graph_us): (f64, f64)) -> String {
    format!(
        "{{\"case\":\"{name}\",\"tokens\":{t},\"stream_us\":{stream_us:.3},\"graph_us\":{graph_us:.3},\"bytes\":{bytes},\"flop\":{flop},\"dense_weight_bytes\":{dense_bytes}}}"
    )
}

fn benches(crit: &mut Criterion) {
    if !moe_kernels::KERNELS_BUILT || !unsafe { sys::is_culib_present() } {
        eprintln!("SKIPPED: sub-1-bit benchmarks need a GPU and a build with CUDA kernels");
        return;
    }
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut rows_json = Vec::new();
    for (shape, r, c) in SHAPES {
        let ms: Vec<_> = (0..EXPERTS).map(|_| random_iid(&mut rng, r, c, 0.885)).collect();
        let bytes = encode(&ms, TILE_COLS).unwrap();
        let view = Compressed::parse(&bytes).unwrap();
        eprintln!("{shape}: {:.4} bit/weight, {} bytes", view.bits_per_parameter(), bytes.len());
        let weights = DeviceWeights::upload(&stream, &view).unwrap();
        let d = view.descriptor().unwrap();
        // What streams from HBM: levels, tile offsets and codewords (the dictionary stays in L2).
        let weight_bytes = (d.image_bytes - d.scales_at) as f64;
        let dense_bytes = (EXPERTS * r * c * 2) as f64;
        for t in 1..=8usize {
            if !wanted(&format!("{shape}_T{t}")) {
                continue;
            }
            let rows = EXPERTS * t;
            let offsets = stream.clone_htod(&[0i32, t as i32, rows as i32]).unwrap();
            let x = random_buffer(&stream, &mut rng, rows * c);
            let mut y = stream.alloc_zeros::<bf16>(rows * r).unwrap();
            let mut ws = stream.alloc_zeros::<u8>(weights.matvec_workspace_bytes(rows).unwrap().max(16)).unwrap();
            let experts = Experts::Offsets(offsets.slice(..));
            let mut op = || {
                matvec(
                    &stream,
                    &weights,
                    &experts,
                    rows,
                    &x.slice(..),
                    &mut y.slice_mut(..),
                    Some(&mut ws.slice_mut(..)),
                )
            };
            let name = format!("{shape}_T{t}");
            let moved = weight_bytes + ((rows * c + rows * r) * 2) as f64;
            let flop = (2 * rows * r * c) as f64;
            rows_json.push(row(
                &name,
                t,
                moved,
                flop,
                dense_bytes,
                measure(crit, &stream, &name, GRAPH_CALLS, &mut op),
            ));
        }
        // Decoded once whatever MOEK_BENCH_ONLY says: the dense grouped GEMM below multiplies by it.
        let mut dense = stream.alloc_zeros::<bf16>(EXPERTS * r * c).unwrap();
        decode_on_gpu(&stream, &weights, &mut dense.slice_mut(..)).unwrap();
        let name = format!("{shape}_decode");
        if wanted(&name) {
            let mut op = || decode_on_gpu(&stream, &weights, &mut dense.slice_mut(..));
            rows_json.push(row(
                &name,
                0,
                weight_bytes + dense_bytes,
                0.0,
                dense_bytes,
                measure(crit, &stream, &name, GRAPH_CALLS, &mut op),
            ));
        }

        // The fused decode + grouped GEMM, then our bf16 grouped GEMM on the weights just decoded.
        let per = GEMM_ROWS_PER_EXPERT;
        let name = format!("{shape}_gemm{per}");
        if wanted(&name) {
            let rows = EXPERTS * per;
            let offsets = stream.clone_htod(&[0i32, per as i32, rows as i32]).unwrap();
            let x = random_buffer(&stream, &mut rng, rows * c);
            let mut y = stream.alloc_zeros::<bf16>(rows * r).unwrap();
            let need = weights.grouped_gemm_workspace_bytes(rows, 0).unwrap();
            eprintln!("{name}: {need} bytes of workspace (0: one K slice)");
            let mut ws = stream.alloc_zeros::<u8>(need.max(16)).unwrap();
            let mut op = || {
                grouped_gemm(
                    &stream,
                    &weights,
                    &offsets.slice(..),
                    rows,
                    &x.slice(..),
                    None,
                    &mut y.slice_mut(..),
                    0,
                    Some(&mut ws.slice_mut(..)),
                )
            };
            let io = ((rows * c + rows * r) * 2) as f64;
            let flop = (2 * rows * r * c) as f64;
            let timed = measure(crit, &stream, &name, GRAPH_CALLS, &mut op);
            rows_json.push(row(&name, per, weight_bytes + io, flop, dense_bytes, timed));

            let cfg = GemmConfig::new(EXPERTS as u32, r, c);
            let layout = Layout::Contiguous { max_rows: rows };
            let mut dense_ws = stream.alloc_zeros::<u8>(cfg.workspace_bytes(layout).unwrap().max(16)).unwrap();
            let experts = ExpertRows::Contiguous { offsets: offsets.slice(..), max_rows: rows };
            let mut op = || {
                dense_grouped_gemm(
                    &stream,
                    &cfg,
                    &x.slice(..),
                    &dense.slice(..),
                    &experts,
                    None,
                    &mut y.slice_mut(..),
                    Some(&mut dense_ws.slice_mut(..)),
                )
            };
            let name = format!("{name}_dense_bf16");
            let timed = measure(crit, &stream, &name, GRAPH_CALLS, &mut op);
            rows_json.push(row(&name, per, dense_bytes + io, flop, dense_bytes, timed));
        }
    }
    write_json("target/bench-subbit.json", &rows_json);
}

criterion_group! {
    name = subbit_benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_millis(500)).sample_size(10);
    targets = benches
}
criterion_main!(subbit_benches);
