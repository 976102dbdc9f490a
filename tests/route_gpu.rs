//! GPU routing against the CPU reference, on fresh random logits, over the shape matrix of the
//! foundation issue: E in {1, 8, 60, 64, 128, 256, 384, 1024}, k in {1, 2, 6, 8}, T in {0, 1, 7, 4096,
//! 65536}, every mode, f32 and bf16 logits. Skips (with a notice) where there is no GPU.
//!
//! Ids must equal the reference's except at a true near-tie: the keys the two picks have under the
//! reference's own arithmetic differ by less than 1e-6 relative (checked here, token by token).
//! Weights of tokens whose ids match must agree within 1e-5 relative.

mod common;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::reference::route as reference;
use moe_kernels::route::{route, RouteOutput, RoutingConfig, RoutingMode, ScoreFunction};
use moe_kernels::Status;
use rand::Rng;
use std::sync::Arc;

const EXPERTS: [u32; 8] = [1, 8, 60, 64, 128, 256, 384, 1024];
const KS: [u32; 4] = [1, 2, 6, 8];
const TOKENS: [usize; 5] = [0, 1, 7, 4096, 65536];
const POISON_ID: i32 = i32::MIN + 7;

/// The routing variants exercised for one (E, k).
fn variants(e: u32, k: u32) -> Vec<(RoutingConfig, bool)> {
    let divides = |d: u32, n: u32| n % d == 0;
    let groups_of_e = [8, 4, 2, 1].into_iter().find(|&g| divides(g, e)).unwrap();
    let mut v = vec![
        (RoutingConfig::top_k(e, k), false),
        (
            RoutingConfig {
                score: ScoreFunction::Sigmoid,
                renormalize: true,
                scale: 2.5,
                ..RoutingConfig::top_k(e, k)
            },
            true,
        ),
    ];
    // DeepSeek-V3 style: keep half the groups (at least one), provided k experts remain reachable.
    let topk_groups = (groups_of_e / 2).max(1);
    if k <= topk_groups * (e / groups_of_e) {
        v.push((
            RoutingConfig {
                mode: RoutingMode::GroupLimited { num_groups: groups_of_e, topk_groups },
                ..RoutingConfig::deepseek_v3()
            }
            .with_shape(e, k),
            true,
        ));
    }
    let moge_groups = [8, 4, 2, 1].into_iter().find(|&g| divides(g, e) && divides(g, k)).unwrap();
    v.push((RoutingConfig::moge(e, moge_groups, k), false));
    v
}

trait WithShape {
    fn with_shape(self, e: u32, k: u32) -> Self;
}
impl WithShape for RoutingConfig {
    fn with_shape(self, e: u32, k: u32) -> Self {
        RoutingConfig { num_experts: e, k, ..self }
    }
}

/// Logits with no near-ties at all (distinct ranks spaced 0.01 apart, shuffled per token), for the
/// capacity runs, whose exact drop pattern would otherwise hinge on a near-tie anywhere.
fn separated_logits(rng: &mut impl Rng, t: usize, e: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * e);
    let mut ranks: Vec<usize> = (0..e).collect();
    for _ in 0..t {
        for i in (1..e).rev() {
            ranks.swap(i, rng.random_range(0..=i));
        }
        out.extend(ranks.iter().map(|&r| r as f32 * 0.01 + rng.random_range(0.0..0.004)));
    }
    out
}

/// The reference over many threads (capacity applied afterwards, in token order, as it must be).
fn reference_route(cfg: &RoutingConfig, t: usize, logits: &[f32], bias: Option<&[f32]>) -> reference::Routing {
    let e = cfg.num_experts as usize;
    let per = t.div_ceil(16).max(1);
    let uncapped = RoutingConfig { capacity: 0, ..*cfg };
    let parts: Vec<reference::Routing> = std::thread::scope(|s| {
        let handles: Vec<_> = logits[..t * e]
            .chunks(per * e)
            .map(|rows| s.spawn(move || reference::route(&uncapped, rows.len() / e, rows, bias)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids: Vec<i32> = parts.iter().flat_map(|p| p.ids.iter().copied()).collect();
    let mut weights: Vec<f32> = parts.iter().flat_map(|p| p.weights.iter().copied()).collect();
    let dropped = reference::apply_capacity(cfg, &mut ids, &mut weights);
    reference::Routing { ids, weights, dropped }
}

/// True when `a` and `b` are within `rel` of each other, relative to the larger magnitude.
fn close(a: f32, b: f32, rel: f32) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) || a == b
}

/// Checks one token whose GPU ids differ from the reference's: the difference must be a near-tie.
fn near_tie(
    cfg: &RoutingConfig,
    row: &[f32],
    bias: Option<&[f32]>,
    gpu_ids: &[i32],
    cpu_ids: &[i32],
) -> Result<(), String> {
    let scores = reference::scores(cfg.score, row);
    let keys = reference::keys(&scores, bias);
    let e = cfg.num_experts as usize;
    let mut seen = vec![false; e];
    for &id in gpu_ids {
        if id < 0 || id as usize >= e || std::mem::replace(&mut seen[id as usize], true) {
            return Err(format!("GPU ids {gpu_ids:?} are not k distinct experts"));
        }
    }
    let keys_match =
        |expected: &[i32]| gpu_ids.iter().zip(expected).all(|(&g, &c)| close(keys[g as usize], keys[c as usize], 1e-6));
    if keys_match(cpu_ids) {
        return Ok(());
    }
    // Group-limited: the kept groups themselves may sit at a near-tie; try the swap of the last kept
    // and the first dropped group when their ranks are that close.
    if let RoutingMode::GroupLimited { num_groups, topk_groups } = cfg.mode {
        let gs = reference::group_scores(&keys, num_groups as usize);
        let mut order: Vec<usize> = (0..num_groups as usize).collect();
        order.sort_by(|&a, &b| gs[b].partial_cmp(&gs[a]).unwrap());
        let (tg, n) = (topk_groups as usize, num_groups as usize);
        if tg < n && close(gs[order[tg - 1]], gs[order[tg]], 1e-6) {
            let swapped = (reference::kept_groups(&keys, n, tg) & !(1 << order[tg - 1])) | (1 << order[tg]);
            let alt: Vec<i32> = reference::select(cfg, &keys, swapped).iter().map(|&x| x as i32).collect();
            if keys_match(&alt) {
                return Ok(());
            }
        }
    }
    Err(format!("GPU ids {gpu_ids:?} vs reference {cpu_ids:?}: not a near-tie"))
}

struct Case<'a> {
    stream: &'a Arc<CudaStream>,
    cfg: RoutingConfig,
    t: usize,
    logits: &'a [f32],
    bias: Option<&'a [f32]>,
    bf16_logits: bool,
}

/// Cases run, near-tie tokens seen and failures of a sweep of [`check_case`].
#[derive(Default)]
struct Tally {
    cases: usize,
    ties: usize,
    failures: Vec<String>,
}

impl Tally {
    /// Runs one case, keeping its failure under the label `name()` gives.
    fn check(&mut self, case: &Case, name: impl FnOnce() -> String) {
        self.cases += 1;
        match check_case(case) {
            Ok(ties) => self.ties += ties,
            Err(m) => self.failures.push(format!("{}: {m}", name())),
        }
    }

    /// Prints the counts and fails the test if any case failed.
    fn finish(self, what: &str) {
        let (cases, failures) = (self.cases, &self.failures);
        eprintln!("{cases} {what} cases, {} near-tie tokens, {} failures", self.ties, failures.len());
        assert!(failures.is_empty(), "{} of {cases} cases failed:\n{}", failures.len(), failures.join("\n"));
    }
}

/// Runs one case on the GPU (outputs poisoned first) and compares with the reference.
fn check_case(c: &Case) -> Result<usize, String> {
    let Case { stream, cfg, t, logits, bias, bf16_logits } = *c;
    let (e, k) = (cfg.num_experts as usize, cfg.k as usize);
    // The reference sees exactly the values the GPU sees.
    let host: Vec<f32> =
        if bf16_logits { logits.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() } else { logits.to_vec() };
    let expected = reference_route(&cfg, t, &host, bias);

    let n = (t * k).max(1);
    let mut ids = stream.clone_htod(&vec![POISON_ID; n]).unwrap();
    let mut weights = stream.clone_htod(&vec![f32::NAN; n]).unwrap();
    let mut dropped = stream.clone_htod(&[-5i32]).unwrap();
    let ws_bytes = cfg.workspace_bytes(t).unwrap();
    let mut workspace: CudaSlice<u8> = stream.alloc_zeros(ws_bytes.max(1)).unwrap();
    let d_bias = bias.map(|b| stream.clone_htod(b).unwrap());
    let mut out = RouteOutput {
        topk_ids: ids.slice_mut(..),
        topk_weights: weights.slice_mut(..),
        dropped_count: Some(dropped.slice_mut(..)),
        workspace: (ws_bytes > 0).then(|| workspace.slice_mut(..)),
    };
    let bias_view = d_bias.as_ref().map(|b| b.slice(..));
    let run = if bf16_logits {
        let d: CudaSlice<bf16> =
            stream.clone_htod(&host.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()).unwrap();
        route(stream, &cfg, t, &d.slice(..), bias_view.as_ref(), &mut out)
    } else {
        let d = stream.clone_htod(if host.is_empty() { &[0.0f32][..] } else { &host[..] }).unwrap();
        route(stream, &cfg, t, &d.slice(..), bias_view.as_ref(), &mut out)
    };
    run.map_err(|err| format!("route failed: {err}"))?;
    let got_ids = stream.clone_dtoh(&ids).unwrap();
    let got_w = stream.clone_dtoh(&weights).unwrap();
    let got_dropped = stream.clone_dtoh(&dropped).unwrap()[0];
    stream.synchronize().unwrap();

    if t == 0 && (got_ids[0] != POISON_ID || !got_w[0].is_nan()) {
        return Err("T = 0 wrote topk outputs".into());
    }
    if cfg.capacity > 0 && got_dropped as u32 != expected.dropped {
        return Err(format!("dropped {got_dropped} vs reference {}", expected.dropped));
    }
    let mut ties = 0;
    for tok in 0..t {
        let r = tok * k..(tok + 1) * k;
        let (g, cids) = (&got_ids[r.clone()], &expected.ids[r.clone()]);
        if g == cids {
            for (j, (&gw, &cw)) in got_w[r.clone()].iter().zip(&expected.weights[r.clone()]).enumerate() {
                if !close(gw, cw, 1e-5) {
                    return Err(format!("token {tok} slot {j}: weight {gw} vs reference {cw} (ids {g:?})"));
                }
            }
        } else {
            near_tie(&cfg, &host[tok * e..(tok + 1) * e], bias, g, cids).map_err(|m| format!("token {tok}: {m}"))?;
            ties += 1;
        }
    }
    if ties > t / 100 + 2 {
        return Err(format!("{ties} near-tie tokens of {t}: too many to be chance"));
    }
    Ok(ties)
}

#[test]
fn routing_matches_reference_over_the_shape_matrix() {
    let _serial = common::serial();
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("routing_matches_reference_over_the_shape_matrix");
    let quick = std::env::var("MOEK_TEST_QUICK").is_ok_and(|v| v == "1");
    let mut tally = Tally::default();
    for &e in &EXPERTS {
        let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.1..0.1)).collect();
        for &t in &TOKENS {
            if quick && t > 4096 {
                continue;
            }
            let logits: Vec<f32> = (0..t * e as usize).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            let separated = separated_logits(&mut rng, t, e as usize);
            for &k in KS.iter().filter(|&&k| k <= e) {
                let mut runs: Vec<(RoutingConfig, bool, &[f32], bool)> = Vec::new();
                for (cfg, with_bias) in variants(e, k) {
                    runs.push((cfg, with_bias, &logits, false));
                    runs.push((cfg, with_bias, &logits, true));
                }
                // Capacity: Switch for k = 1, GShard-style top-k with capacity otherwise; about a
                // quarter of the pairs over capacity.
                let capacity = ((t * k as usize) as u32 * 3 / (4 * e)).max(1);
                let capped = if k == 1 {
                    RoutingConfig::switch(e, capacity)
                } else {
                    RoutingConfig { capacity, ..RoutingConfig::top_k(e, k) }
                };
                runs.push((capped, false, &separated, false));
                for (cfg, with_bias, data, bf) in runs {
                    let case = Case {
                        stream: &stream,
                        cfg,
                        t,
                        logits: data,
                        bias: with_bias.then_some(&bias[..]),
                        bf16_logits: bf,
                    };
                    tally.check(&case, || format!("E={e} k={k} T={t} bf16={bf} {cfg:?}"));
                }
            }
        }
    }
    tally.finish("routing");
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let _serial = common::serial();
    let Some((_ctx, stream)) = common::gpu() else { return };
    let (t, e, k) = (64usize, 64u32, 4u32);
    let logits = stream.clone_htod(&vec![0.25f32; t * e as usize]).unwrap();
    let mut ids = stream.clone_htod(&vec![POISON_ID; t * k as usize]).unwrap();
    let mut weights = stream.clone_htod(&vec![f32::NAN; t * k as usize]).unwrap();
    let mut small_ids = stream.clone_htod(&vec![POISON_ID; t * k as usize - 1]).unwrap();
    let mut workspace: CudaSlice<u8> = stream.alloc_zeros(64).unwrap();
    let cases: Vec<(RoutingConfig, Status, bool)> = vec![
        (RoutingConfig::top_k(e, 0), Status::InvalidK, false),
        (RoutingConfig::top_k(e, e + 1), Status::InvalidK, false),
        (RoutingConfig::top_k(0, 1), Status::InvalidNumExperts, false),
        (RoutingConfig::top_k(2048, 4), Status::InvalidNumExperts, false),
        (
            RoutingConfig {
                mode: RoutingMode::GroupLimited { num_groups: 7, topk_groups: 2 },
                ..RoutingConfig::top_k(e, k)
            },
            Status::InvalidGroups,
            false,
        ),
        (
            RoutingConfig {
                mode: RoutingMode::GroupLimited { num_groups: 8, topk_groups: 9 },
                ..RoutingConfig::top_k(e, k)
            },
            Status::InvalidTopkGroups,
            false,
        ),
        (RoutingConfig::moge(e, 8, 4), Status::InvalidGroups, false),
        (RoutingConfig::switch(e, 0), Status::InvalidCapacity, false),
        (RoutingConfig { scale: f32::NAN, ..RoutingConfig::top_k(e, k) }, Status::InvalidValue, false),
        (RoutingConfig::top_k(e, k), Status::BufferTooSmall, true),
        (RoutingConfig::switch(e, 4), Status::WorkspaceTooSmall, false),
    ];
    let mut dropped = stream.clone_htod(&[-3i32]).unwrap();
    for (cfg, status, use_small) in cases {
        let mut out = RouteOutput {
            topk_ids: if use_small { small_ids.slice_mut(..) } else { ids.slice_mut(..) },
            topk_weights: weights.slice_mut(..),
            dropped_count: Some(dropped.slice_mut(..)),
            workspace: Some(workspace.slice_mut(..4)),
        };
        let err = route(&stream, &cfg, t, &logits.slice(..), None, &mut out).expect_err("bad input accepted");
        assert_eq!(err.status, status, "{cfg:?}: {err}");
        eprintln!("refused as expected: {err}");
    }
    // A misaligned workspace (through the Rust API: a byte view starting at offset 1).
    let cfg = RoutingConfig::switch(e, 4);
    let need = cfg.workspace_bytes(t).unwrap();
    let mut big: CudaSlice<u8> = stream.alloc_zeros(need + 8).unwrap();
    let mut out = RouteOutput {
        topk_ids: ids.slice_mut(..t),
        topk_weights: weights.slice_mut(..t),
        dropped_count: Some(dropped.slice_mut(..)),
        workspace: Some(big.slice_mut(1..)),
    };
    let err = route(&stream, &cfg, t, &logits.slice(..), None, &mut out).expect_err("misaligned accepted");
    assert_eq!(err.status, Status::Misaligned, "{err}");
    stream.synchronize().unwrap();
    assert!(stream.clone_dtoh(&ids).unwrap().iter().all(|&x| x == POISON_ID), "a refused call wrote ids");
    assert!(stream.clone_dtoh(&weights).unwrap().iter().all(|x| x.is_nan()), "a refused call wrote weights");
    assert!(stream.clone_dtoh(&small_ids).unwrap().iter().all(|&x| x == POISON_ID));
    assert_eq!(stream.clone_dtoh(&dropped).unwrap()[0], -3, "a refused call wrote dropped_count");
}

#[test]
fn routing_replays_from_a_cuda_graph() {
    let _serial = common::serial();
    let Some((ctx, stream)) = common::gpu() else { return };
    // cudarc's per-buffer event tracking would record events inside the capture; the test owns all
    // ordering here (one stream).
    unsafe { ctx.disable_event_tracking() };
    let mut rng = common::rng("routing_replays_from_a_cuda_graph");
    let cfg = RoutingConfig { capacity: 40, ..RoutingConfig::deepseek_v3() };
    let (t, e, k) = (1000usize, 256usize, 8usize);
    let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.1..0.1)).collect();
    let d_bias = stream.clone_htod(&bias).unwrap();
    let mut d_logits = stream.alloc_zeros::<f32>(t * e).unwrap();
    let mut ids = stream.alloc_zeros::<i32>(t * k).unwrap();
    let mut weights = stream.alloc_zeros::<f32>(t * k).unwrap();
    let mut dropped = stream.alloc_zeros::<i32>(1).unwrap();
    let mut workspace = stream.alloc_zeros::<u8>(cfg.workspace_bytes(t).unwrap()).unwrap();
    stream.synchronize().unwrap();
    stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    {
        let mut out = RouteOutput {
            topk_ids: ids.slice_mut(..),
            topk_weights: weights.slice_mut(..),
            dropped_count: Some(dropped.slice_mut(..)),
            workspace: Some(workspace.slice_mut(..)),
        };
        route(&stream, &cfg, t, &d_logits.slice(..), Some(&d_bias.slice(..)), &mut out).unwrap();
    }
    let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap().expect("a graph");
    for replay in 0..3 {
        let logits = separated_logits(&mut rng, t, e);
        stream.memcpy_htod(&logits, &mut d_logits).unwrap();
        stream.memset_zeros(&mut ids).unwrap();
        graph.launch().unwrap();
        let expected = reference_route(&cfg, t, &logits, Some(&bias));
        let got_ids = stream.clone_dtoh(&ids).unwrap();
        let got_dropped = stream.clone_dtoh(&dropped).unwrap()[0];
        stream.synchronize().unwrap();
        assert_eq!(got_ids, expected.ids, "replay {replay}: ids differ");
        assert_eq!(got_dropped as u32, expected.dropped, "replay {replay}: dropped count");
    }
}

/// Logits of one of the kinds the fast top-k path must get exactly right: uniform, quantised (many
/// exact ties, so candidates tie on keys), four levels (more than 16 candidates: the fallback),
/// uniform with the row's maximum repeated (ties among the heads), and rows with -inf entries
/// (masked experts, at least one finite value a row; a threshold of -inf takes the fallback).
fn fast_path_logits(rng: &mut impl Rng, kind: usize, t: usize, e: usize) -> Vec<f32> {
    let mut out: Vec<f32> = (0..t * e)
        .map(|_| match kind {
            0 => rng.random_range(-4.0f32..4.0),
            1 => rng.random_range(-32i32..=32) as f32 / 8.0,
            2 => rng.random_range(0i32..4) as f32,
            _ => rng.random_range(-4.0f32..4.0),
        })
        .collect();
    if kind == 3 {
        for row in out.chunks_mut(e) {
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for _ in 0..rng.random_range(1..4) {
                row[rng.random_range(0..e)] = top;
            }
        }
    }
    if kind == 4 {
        for row in out.chunks_mut(e) {
            let masked = rng.random_range(0..e);
            for _ in 0..masked {
                row[rng.random_range(0..e)] = f32::NEG_INFINITY;
            }
            if row.iter().all(|x| x.is_infinite()) {
                row[0] = 0.5;
            }
        }
    }
    out
}

#[test]
fn fast_top_k_path_matches_reference() {
    let _serial = common::serial();
    // route_fast_kernel's domain: plain top-k without a bias, k <= 8, whole 16-byte chunks, 8 or more
    // of them and at most 256 experts (f32 E = 32..=256 in steps of 4, bf16 E = 64..=256 in steps of
    // 8); full rows and rows that leave the last lanes short, both value counts (16 and 32 a lane).
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("fast_top_k_path_matches_reference");
    // MOEK_TEST_QUICK=1 (the memcheck run): uniform and fallback data, k = 1 and 8 only.
    let quick = std::env::var("MOEK_TEST_QUICK").is_ok_and(|v| v == "1");
    let mut tally = Tally::default();
    for &(e, bf) in &[
        (32u32, false),
        (36, false),
        (64, false),
        (64, true),
        (120, false),
        (120, true),
        (128, false),
        (128, true),
        (136, false),
        (192, true),
        (248, false),
        (248, true),
        (256, false),
        (256, true),
    ] {
        for kind in (0..5).filter(|&kind| !quick || kind % 2 == 0) {
            let t = [1000usize, 7, 1000, 1000, 1000][kind];
            let logits = fast_path_logits(&mut rng, kind, t, e as usize);
            for k in [1u32, 2, 3, 6, 8].into_iter().filter(|&k| !quick || k == 1 || k == 8) {
                let configs = [
                    RoutingConfig::top_k(e, k),
                    RoutingConfig { renormalize: true, scale: 2.5, ..RoutingConfig::top_k(e, k) },
                    RoutingConfig { score: ScoreFunction::Sigmoid, ..RoutingConfig::top_k(e, k) },
                    RoutingConfig { score: ScoreFunction::Sigmoid, renormalize: true, ..RoutingConfig::top_k(e, k) },
                ];
                for cfg in configs {
                    let case = Case { stream: &stream, cfg, t, logits: &logits, bias: None, bf16_logits: bf };
                    tally.check(&case, || format!("E={e} k={k} T={t} bf16={bf} kind={kind} {cfg:?}"));
                }
            }
        }
    }
    tally.finish("fast-path");
}

#[test]
fn fast_top_k_path_replays_from_a_cuda_graph() {
    let _serial = common::serial();
    let Some((ctx, stream)) = common::gpu() else { return };
    unsafe { ctx.disable_event_tracking() };
    let mut rng = common::rng("fast_top_k_path_replays_from_a_cuda_graph");
    let cfg = RoutingConfig::top_k(128, 8);
    let (t, e, k) = (1000usize, 128usize, 8usize);
    let mut d_logits = stream.alloc_zeros::<f32>(t * e).unwrap();
    let mut ids = stream.alloc_zeros::<i32>(t * k).unwrap();
    let mut weights = stream.alloc_zeros::<f32>(t * k).unwrap();
    stream.synchronize().unwrap();
    stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    {
        let mut out = RouteOutput {
            topk_ids: ids.slice_mut(..),
            topk_weights: weights.slice_mut(..),
            dropped_count: None,
            workspace: None,
        };
        route(&stream, &cfg, t, &d_logits.slice(..), None, &mut out).unwrap();
    }
    let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap().expect("a graph");
    for replay in 0..3 {
        let logits = separated_logits(&mut rng, t, e);
        stream.memcpy_htod(&logits, &mut d_logits).unwrap();
        stream.memset_zeros(&mut ids).unwrap();
        graph.launch().unwrap();
        let expected = reference_route(&cfg, t, &logits, None);
        let got_ids = stream.clone_dtoh(&ids).unwrap();
        let got_w = stream.clone_dtoh(&weights).unwrap();
        stream.synchronize().unwrap();
        assert_eq!(got_ids, expected.ids, "replay {replay}: ids differ");
        for (i, (&g, &c)) in got_w.iter().zip(&expected.weights).enumerate() {
            assert!(close(g, c, 1e-5), "replay {replay}, pair {i}: weight {g} vs reference {c}");
        }
    }
}

/// Row `tok` of the mixed batch below: tokens of one warp (4 to 8 a warp on the fast path) that take
/// different selections, so that a warp-wide shuffle inside one of them would hang the warp (as the
/// route-top8b merge's did): distinct values (ranked by counting), all equal (more than 16
/// candidates: the rounds), distinct but for two equal maxima (sorted, but the rank check fails on
/// the tie: the rounds), one finite value among -inf (a threshold of -inf: the rounds).
fn mixed_row(rng: &mut impl Rng, tok: usize, e: usize) -> Vec<f32> {
    let mut row: Vec<f32> = (0..e).map(|i| i as f32 * 0.01 + rng.random_range(0.0..0.004)).collect();
    for i in (1..e).rev() {
        row.swap(i, rng.random_range(0..=i));
    }
    match tok % 5 {
        1 => row.iter_mut().for_each(|x| *x = 0.25),
        2 => {
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let first = row.iter().position(|&x| x == top).unwrap();
            row[(first + e / 2) % e] = top;
        }
        3 => {
            row.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
            row[rng.random_range(0..e)] = 1.5;
        }
        _ => {}
    }
    row
}

#[test]
fn fast_top_k_path_mixes_selections_within_a_warp() {
    let _serial = common::serial();
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("fast_top_k_path_mixes_selections_within_a_warp");
    let mut tally = Tally::default();
    // T past every multiple of the tokens a warp, a block and a grid stride hold (and 1, 2).
    for &(e, bf) in &[(128u32, false), (256, false), (64, true), (120, false)] {
        for t in [1usize, 2, 5, 9, 33, 100, 1001] {
            let logits: Vec<f32> = (0..t).flat_map(|tok| mixed_row(&mut rng, tok, e as usize)).collect();
            for k in [1u32, 3, 8] {
                for cfg in
                    [RoutingConfig::top_k(e, k), RoutingConfig { renormalize: true, ..RoutingConfig::top_k(e, k) }]
                {
                    let case = Case { stream: &stream, cfg, t, logits: &logits, bias: None, bf16_logits: bf };
                    tally.check(&case, || format!("E={e} k={k} T={t} bf16={bf} {cfg:?}"));
                }
            }
        }
    }
    tally.finish("mixed fast-path");

    // NaN logits have no reference order; the kernel must still finish and name real experts.
    let (t, e, k) = (37usize, 128usize, 8usize);
    let logits: Vec<f32> = (0..t * e)
        .map(|i| match (i / e) % 3 {
            0 => f32::NAN,
            1 if i % 7 == 0 => f32::NAN,
            _ => rng.random_range(-4.0f32..4.0),
        })
        .collect();
    let cfg = RoutingConfig::top_k(e as u32, k as u32);
    let d_logits = stream.clone_htod(&logits).unwrap();
    let mut ids = stream.alloc_zeros::<i32>(t * k).unwrap();
    let mut weights = stream.alloc_zeros::<f32>(t * k).unwrap();
    let mut out = RouteOutput {
        topk_ids: ids.slice_mut(..),
        topk_weights: weights.slice_mut(..),
        dropped_count: None,
        workspace: None,
    };
    route(&stream, &cfg, t, &d_logits.slice(..), None, &mut out).unwrap();
    let got = stream.clone_dtoh(&ids).unwrap();
    stream.synchronize().unwrap();
    assert!(got.iter().all(|&id| (0..e as i32).contains(&id)), "NaN rows: ids out of range: {got:?}");
}
