//! GPU permutation against the CPU reference on fresh random inputs: plans on odd shapes (skewed loads,
//! empty experts, dropped and out-of-range ids, capacity, row alignment, ranks) on every plan path
//! (fused, chunked and cluster, forced; the cluster path runs as chunked before sm_90), permute and combine in f32/bf16/f16 for H in {8, 2048, 2880, 7168} at
//! small T (rows cut over several warps) and larger T, combine bit for bit against its exact fp32
//! arithmetic and run to run, and a CUDA-graph replay. Skips (with a notice) where there is no GPU.

mod common;

use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use half::{bf16, f16};
use moe_kernels::dtype::Element;
use moe_kernels::permute::{combine, permute, plan_with_path, PlanConfig, PlanOutput, PlanPath, PlanView};
use moe_kernels::reference::permute as reference;
use rand::Rng;
use std::sync::Arc;

const POISON: i32 = i32::MIN + 11;

/// Device buffers of a plan, poisoned.
struct DevicePlan {
    counts: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    row_source: CudaSlice<i32>,
    pair_row: CudaSlice<i32>,
    rank_counts: CudaSlice<i32>,
    rank_offsets: CudaSlice<i32>,
    errors: CudaSlice<i32>,
    workspace: CudaSlice<u8>,
}

impl DevicePlan {
    fn new(stream: &Arc<CudaStream>, cfg: &PlanConfig, t: usize) -> Self {
        let e = cfg.num_experts as usize;
        let r = cfg.num_ranks.max(1) as usize;
        let poison = |n: usize| stream.clone_htod(&vec![POISON; n.max(1)]).unwrap();
        DevicePlan {
            counts: poison(e),
            offsets: poison(e + 1),
            row_source: poison(cfg.max_rows(t).unwrap()),
            pair_row: poison(t * cfg.k as usize),
            rank_counts: poison(r),
            rank_offsets: poison(r + 1),
            errors: poison(1),
            // Poisoned too: the plan must not depend on what the workspace held.
            workspace: stream.clone_htod(&vec![0xA5u8; cfg.workspace_bytes(t).unwrap().max(4)]).unwrap(),
        }
    }

    fn run(&mut self, stream: &Arc<CudaStream>, cfg: &PlanConfig, t: usize, ids: &CudaSlice<i32>) {
        self.run_on(stream, cfg, t, &ids.slice(..), None);
    }

    /// The plan on a forced path (`None`: the automatic choice).
    fn run_on(
        &mut self,
        stream: &Arc<CudaStream>,
        cfg: &PlanConfig,
        t: usize,
        ids: &CudaView<'_, i32>,
        path: Option<PlanPath>,
    ) {
        let ranks = cfg.num_ranks > 1;
        let mut out = PlanOutput {
            expert_counts: self.counts.slice_mut(..),
            expert_offsets: self.offsets.slice_mut(..),
            row_source: self.row_source.slice_mut(..),
            pair_row: self.pair_row.slice_mut(..),
            rank_counts: ranks.then(|| self.rank_counts.slice_mut(..)),
            rank_offsets: ranks.then(|| self.rank_offsets.slice_mut(..)),
            error_count: self.errors.slice_mut(..),
            workspace: self.workspace.slice_mut(..),
        };
        plan_with_path(stream, cfg, t, ids, &mut out, path).unwrap();
    }

    fn view(&self) -> PlanView<'_> {
        PlanView {
            expert_offsets: self.offsets.slice(..),
            row_source: self.row_source.slice(..),
            pair_row: self.pair_row.slice(..),
        }
    }

    /// Checks every output against the reference plan.
    fn check(
        &self,
        stream: &Arc<CudaStream>,
        cfg: &PlanConfig,
        t: usize,
        expected: &reference::Plan,
    ) -> Result<(), String> {
        let get = |s: &CudaSlice<i32>| stream.clone_dtoh(s).unwrap();
        let (e, pairs) = (cfg.num_experts as usize, t * cfg.k as usize);
        let eq = |name: &str, got: &[i32], want: &[i32]| {
            if got == want {
                Ok(())
            } else {
                let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                Err(format!("{name} differs at {i}: {} vs reference {}", got[i], want[i]))
            }
        };
        eq("expert_counts", &get(&self.counts)[..e], &expected.expert_counts)?;
        eq("expert_offsets", &get(&self.offsets)[..e + 1], &expected.expert_offsets)?;
        let rows = expected.row_source.len();
        eq("row_source", &get(&self.row_source)[..rows], &expected.row_source)?;
        if pairs > 0 {
            eq("pair_row", &get(&self.pair_row)[..pairs], &expected.pair_row)?;
        }
        eq("error_count", &get(&self.errors)[..1], &[expected.errors as i32])?;
        if cfg.num_ranks > 1 {
            let r = cfg.num_ranks as usize;
            eq("rank_counts", &get(&self.rank_counts)[..r], &expected.rank_counts)?;
            eq("rank_offsets", &get(&self.rank_offsets)[..r + 1], &expected.rank_offsets)?;
        }
        Ok(())
    }
}

/// Ids of one load shape: 0 balanced random, 1 all on one expert, 2 half the experts empty, 3 random
/// with dropped (-1) and out-of-range ids mixed in.
fn ids_of(rng: &mut impl Rng, shape: u32, pairs: usize, e: u32) -> Vec<i32> {
    let hot = rng.random_range(0..e) as i32;
    (0..pairs)
        .map(|_| match shape {
            1 => hot,
            2 => rng.random_range(0..e.div_ceil(2)) as i32 * 2 % e as i32,
            3 => match rng.random_range(0..10) {
                0 => -1,
                1 => [e as i32, -2, i32::MAX, i32::MIN][rng.random_range(0..4)],
                _ => rng.random_range(0..e) as i32,
            },
            _ => rng.random_range(0..e) as i32,
        })
        .collect()
}

#[test]
fn plans_match_the_reference_on_odd_shapes() {
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("plans_match_the_reference_on_odd_shapes");
    let mut failures = Vec::new();
    let mut cases = 0;
    // T * k spans one chunk and several, and the fused path's default limit (32768 pairs: T = 4096 with
    // k = 8 below it, 4097 above); both paths are forced on every case.
    for &t in &[0usize, 1, 7, 300, 4096, 4097, 33000] {
        // E = 1024 and 8192: one thread per expert and fewer warps per chunk (cuda/plan.cu).
        for &e in &[1u32, 8, 60, 384, 1024, 8192] {
            for &k in &[1u32, 2, 8, 64] {
                for shape in 0..4 {
                    let variants = [
                        PlanConfig::new(e, k),
                        PlanConfig { row_align: 128, capacity: (t as u32 * k / e).max(1), ..PlanConfig::new(e, k) },
                        PlanConfig {
                            row_align: 8,
                            num_ranks: [4, 2, 1].into_iter().find(|r| e % r == 0).unwrap(),
                            ..PlanConfig::new(e, k)
                        },
                    ];
                    let ids = ids_of(&mut rng, shape, t * k as usize, e);
                    // One leading element: the ids start 4 bytes into the buffer for odd shapes, so the
                    // fused path's scalar loads (ids not 16-byte aligned) are checked too.
                    let lead = (shape % 2) as usize;
                    let mut padded = vec![7; lead];
                    padded.extend_from_slice(&ids);
                    padded.push(0);
                    let d_ids = stream.clone_htod(&padded).unwrap();
                    let view = d_ids.slice(lead..lead + ids.len());
                    for cfg in variants {
                        let expected = reference::plan(&cfg, t, &ids);
                        for path in [PlanPath::Fused, PlanPath::Chunked, PlanPath::Cluster] {
                            cases += 1;
                            let mut d = DevicePlan::new(&stream, &cfg, t);
                            d.run_on(&stream, &cfg, t, &view, Some(path));
                            if let Err(m) = d.check(&stream, &cfg, t, &expected) {
                                failures.push(format!("T={t} E={e} k={k} shape={shape} {path:?} {cfg:?}: {m}"));
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {cases} plans differ:\n{}", failures.len(), failures.join("\n"));
}

/// What combine computes, element by element: the residual (or 0), then every kept slot's weight × y
/// in slot order, each one fused multiply-add in fp32, rounded to T once. However the kernel cuts a row
/// over warps, it must give exactly these bits.
fn combine_exact<T: Element>(
    pair_row: &[i32],
    y: &[T],
    hidden: usize,
    k: usize,
    weights: &[f32],
    residual: &[T],
) -> Vec<T> {
    let rows = (y.len() / hidden) as i32;
    let mut out = Vec::with_capacity(residual.len());
    for t in 0..pair_row.len() / k {
        for h in 0..hidden {
            let mut acc = residual[t * hidden + h].to_f32();
            for s in 0..k {
                let row = pair_row[t * k + s];
                if (0..rows).contains(&row) {
                    acc = weights[t * k + s].mul_add(y[row as usize * hidden + h].to_f32(), acc);
                }
            }
            out.push(T::from_f32(acc));
        }
    }
    out
}

/// Permute and combine for one element type, against the reference.
fn check_rows<T: Element + PartialEq + std::fmt::Debug>(stream: &Arc<CudaStream>, rng: &mut impl Rng) -> Vec<String> {
    let mut failures = Vec::new();
    // Small T with wide rows: each token's row cut over several warps (src/permute.rs, row_split), the
    // last slice narrower where H = 2880; k = 64 takes the combine's slot batches 8 times. T = 129: fewer
    // slices; T = 300 (H = 8) and 2000 (H = 64): one warp per token, the whole row.
    let shapes = [
        (1usize, 1u32, 1u32, 8usize),
        (1, 32, 8, 7168),
        (3, 128, 8, 2048),
        (2, 256, 64, 2880),
        (7, 60, 2, 2880),
        (64, 32, 8, 7168),
        (64, 8, 2, 4096),
        (129, 384, 8, 7168),
        (300, 8, 2, 8),
        (2000, 16, 4, 64),
    ];
    for &(t, e, k, hidden) in &shapes {
        let cfg = PlanConfig { row_align: 16, ..PlanConfig::new(e, k) };
        let pairs = t * k as usize;
        let max_rows = cfg.max_rows(t).unwrap();
        let ids = ids_of(rng, 3, pairs, e);
        let x: Vec<T> = (0..t * hidden).map(|_| T::from_f32(rng.random_range(-2.0f32..2.0))).collect();
        let scale: Vec<f32> = (0..pairs).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let y: Vec<T> = (0..max_rows * hidden).map(|_| T::from_f32(rng.random_range(-2.0f32..2.0))).collect();
        let residual: Vec<T> = (0..t * hidden).map(|_| T::from_f32(rng.random_range(-2.0f32..2.0))).collect();
        let expected_plan = reference::plan(&cfg, t, &ids);
        let d_ids = stream.clone_htod(&ids).unwrap();
        let mut d = DevicePlan::new(stream, &cfg, t);
        d.run(stream, &cfg, t, &d_ids);
        let d_x = stream.clone_htod(&x).unwrap();
        let d_scale = stream.clone_htod(&scale).unwrap();
        let poison = T::from_f32(12345.0);
        let rows_used = expected_plan.row_source.len();
        let label = format!("{:?} T={t} E={e} k={k} H={hidden}", std::any::type_name::<T>());

        // Permute, scaled, padding zeroed; then unscaled with padding left alone.
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        for (with_scale, zero_padding) in [(true, true), (false, false)] {
            let mut out = stream.clone_htod(&vec![poison; max_rows * hidden]).unwrap();
            let scale_view = d_scale.slice(..);
            permute(
                stream,
                &cfg,
                t,
                hidden,
                &d_x.slice(..),
                &d.view(),
                with_scale.then_some(&scale_view),
                zero_padding,
                &mut out.slice_mut(..),
            )
            .unwrap();
            let got = stream.clone_dtoh(&out).unwrap();
            let want = reference::permute(&expected_plan, &xf, hidden, k as usize, with_scale.then_some(&scale[..]));
            for row in 0..max_rows {
                let src = if row < rows_used { expected_plan.row_source[row] } else { -2 };
                for h in 0..hidden {
                    let g = got[row * hidden + h];
                    let w = match src {
                        -2 => poison,
                        -1 if !zero_padding => poison,
                        _ => T::from_f32(want[row * hidden + h]),
                    };
                    if g != w {
                        failures.push(format!("{label} permute scale={with_scale}: row {row} col {h}: {g:?} vs {w:?}"));
                        break;
                    }
                }
            }
        }

        // Combine with weights and residual, twice: bit-identical, and within fp32 rounding of the
        // reference (plus the output type's rounding).
        let d_y = stream.clone_htod(&y).unwrap();
        let d_res = stream.clone_htod(&residual).unwrap();
        let yf: Vec<f32> = y.iter().map(|v| v.to_f32()).collect();
        let rf: Vec<f32> = residual.iter().map(|v| v.to_f32()).collect();
        let want = reference::combine(&expected_plan.pair_row, &yf, hidden, k as usize, Some(&scale), Some(&rf));
        let mut results = Vec::new();
        for _ in 0..2 {
            let mut out = stream.clone_htod(&vec![poison; t * hidden]).unwrap();
            let (w, r) = (d_scale.slice(..), d_res.slice(..));
            combine(
                stream,
                &cfg,
                t,
                hidden,
                &d_y.slice(..),
                &d.view().pair_row,
                Some(&w),
                Some(&r),
                &mut out.slice_mut(..),
            )
            .unwrap();
            results.push(stream.clone_dtoh(&out).unwrap());
        }
        if results[0] != results[1] {
            failures.push(format!("{label} combine: two runs differ"));
        }
        let exact = combine_exact(&expected_plan.pair_row, &y, hidden, k as usize, &scale, &residual);
        if let Some(i) = results[0].iter().zip(&exact).position(|(g, w)| g != w) {
            failures.push(format!("{label} combine: element {i}: {:?} vs exact fp32 {:?}", results[0][i], exact[i]));
        }
        let tolerance = if std::mem::size_of::<T>() == 4 { 1e-5 } else { 1.0 / 128.0 };
        for (i, (g, w)) in results[0].iter().zip(&want).enumerate() {
            let g = g.to_f32();
            if (g - w).abs() > tolerance * w.abs().max(1.0) {
                failures.push(format!("{label} combine: element {i}: {g} vs reference {w}"));
                break;
            }
        }
    }
    failures
}

#[test]
fn permute_and_combine_match_the_reference() {
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("permute_and_combine_match_the_reference");
    let mut failures = check_rows::<f32>(&stream, &mut rng);
    failures.extend(check_rows::<bf16>(&stream, &mut rng));
    failures.extend(check_rows::<f16>(&stream, &mut rng));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn plan_permute_combine_replay_from_a_cuda_graph() {
    let Some((ctx, stream)) = common::gpu() else { return };
    unsafe { ctx.disable_event_tracking() };
    let mut rng = common::rng("plan_permute_combine_replay_from_a_cuda_graph");
    let (t, hidden) = (500usize, 64usize);
    let cfg = PlanConfig { row_align: 8, capacity: 90, ..PlanConfig::new(32, 4) };
    let pairs = t * 4;
    let max_rows = cfg.max_rows(t).unwrap();
    let mut d_ids = stream.alloc_zeros::<i32>(pairs).unwrap();
    let x: Vec<f32> = (0..t * hidden).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let d_x = stream.clone_htod(&x).unwrap();
    let mut d = DevicePlan::new(&stream, &cfg, t);
    let mut rows = stream.alloc_zeros::<f32>(max_rows * hidden).unwrap();
    let mut out = stream.alloc_zeros::<f32>(t * hidden).unwrap();
    // The automatic path, then the cluster path (a cluster launch captured in the graph; 2 chunks).
    for path in [None, Some(PlanPath::Cluster)] {
        stream.synchronize().unwrap();
        stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        d.run_on(&stream, &cfg, t, &d_ids.slice(..), path);
        permute(&stream, &cfg, t, hidden, &d_x.slice(..), &d.view(), None, true, &mut rows.slice_mut(..)).unwrap();
        combine(&stream, &cfg, t, hidden, &rows.slice(..), &d.view().pair_row, None, None, &mut out.slice_mut(..))
            .unwrap();
        let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap().expect("a graph");
        for replay in 0..3 {
            let ids = ids_of(&mut rng, replay % 4, pairs, 32);
            stream.memcpy_htod(&ids, &mut d_ids).unwrap();
            graph.launch().unwrap();
            let expected = reference::plan(&cfg, t, &ids);
            d.check(&stream, &cfg, t, &expected).unwrap_or_else(|m| panic!("{path:?} replay {replay}: {m}"));
            let want_rows = reference::permute(&expected, &x, hidden, 4, None);
            let want = reference::combine(&expected.pair_row, &want_rows, hidden, 4, None, None);
            let got = stream.clone_dtoh(&out).unwrap();
            assert_eq!(got, want, "{path:?} replay {replay}: combine of the permuted rows");
        }
    }
}
