//! The MoE layer on the GPU, both implementations (composed and fused), against the CPU reference:
//! every routing mode, the caller's top-k ids (with dropped and out-of-range ids) instead of logits,
//! shared experts (SwiGLU and GELU), T = 0, 1, 7 and 300, H = 2880 for one preset, E = 60, all tokens
//! on one expert, most experts without tokens, run-to-run bit identity, and a CUDA graph replayed on
//! new inputs in the same buffers. Skips (with a notice) where there is no GPU.

mod common;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::layer::{moe_layer, LayerBuffers, LayerConfig, LayerImpl, LayerInputs, Routing, SharedExperts};
use moe_kernels::reference::grouped_gemm::{relative_frobenius_error, Epilogue};
use moe_kernels::reference::layer as reference;
use moe_kernels::route::{RoutingConfig, RoutingMode};
use rand::Rng;
use std::sync::Arc;

fn configs() -> Vec<(LayerConfig, bool)> {
    let layer = |routing, hidden, intermediate, activation, shared_intermediate| LayerConfig {
        routing,
        hidden,
        intermediate,
        activation,
        shared_intermediate,
        implementation: LayerImpl::Auto,
    };
    let deepseek_small = RoutingConfig {
        num_experts: 32,
        mode: RoutingMode::GroupLimited { num_groups: 8, topk_groups: 4 },
        ..RoutingConfig::deepseek_v3()
    };
    vec![
        (layer(RoutingConfig::mixtral(), 256, 512, Epilogue::SwiGlu, 0), false),
        (layer(RoutingConfig::qwen3_moe(), 2880, 64, Epilogue::SwiGlu, 0), false),
        // DeepSeek-V3's form: a shared expert beside the routed ones.
        (layer(deepseek_small, 128, 96, Epilogue::SwiGlu, 192), true),
        (layer(RoutingConfig::moge(60, 6, 6), 64, 40, Epilogue::Gelu, 24), false),
        (layer(RoutingConfig::switch(60, 4), 136, 48, Epilogue::Relu, 0), false),
    ]
}

/// Where a call's routing comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Input {
    /// The layer routes the logits.
    Logits,
    /// The caller's ids (some -1 or out of range: dropped) and weights.
    TopK,
}

/// Inputs and weights on the host (values exactly representable in bf16) and on the device.
struct Problem {
    x: Vec<f32>,
    logits: Vec<f32>,
    bias: Vec<f32>,
    ids: Vec<i32>,
    weights: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
    shared1: Vec<f32>,
    shared2: Vec<f32>,
    d_x: CudaSlice<bf16>,
    d_logits: CudaSlice<f32>,
    d_bias: CudaSlice<f32>,
    d_ids: CudaSlice<i32>,
    d_weights: CudaSlice<f32>,
    d_w1: CudaSlice<bf16>,
    d_w2: CudaSlice<bf16>,
    d_shared1: CudaSlice<bf16>,
    d_shared2: CudaSlice<bf16>,
}

fn bf16_values(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-scale..scale)).to_f32()).collect()
}

/// Top-k ids as a caller might pass them: mostly valid, some -1 and some past E (both add nothing).
fn caller_ids(rng: &mut impl Rng, n: usize, e: usize) -> Vec<i32> {
    (0..n)
        .map(|_| match rng.random_range(0..20) {
            0 => -1,
            1 => (e + rng.random_range(0..3)) as i32,
            _ => rng.random_range(0..e as i32),
        })
        .collect()
}

impl Problem {
    fn new(stream: &Arc<CudaStream>, rng: &mut impl Rng, cfg: &LayerConfig, t: usize) -> Self {
        let (e, h, i) = (cfg.routing.num_experts as usize, cfg.hidden, cfg.intermediate);
        let k = cfg.routing.k as usize;
        let x = bf16_values(rng, t * h, 1.0);
        let logits: Vec<f32> = (0..t * e).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let ids = caller_ids(rng, t * k, e);
        let weights: Vec<f32> = (0..t * k).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let w1 = bf16_values(rng, e * cfg.gate_up_rows() * h, 1.7 / (h as f32).sqrt());
        let w2 = bf16_values(rng, e * h * i, 1.7 / (i as f32).sqrt());
        let i_s = cfg.shared_intermediate;
        let shared1 = bf16_values(rng, cfg.shared_gate_up_rows() * h, 1.7 / (h as f32).sqrt());
        let shared2 = bf16_values(rng, h * i_s, 1.7 / (i_s.max(1) as f32).sqrt());
        let up = |v: &[f32]| {
            let b: Vec<bf16> = v.iter().map(|&f| bf16::from_f32(f)).collect();
            stream.clone_htod(if b.is_empty() { &[bf16::ZERO][..] } else { &b[..] }).unwrap()
        };
        let up32 = |v: &[f32]| stream.clone_htod(if v.is_empty() { &[0.0f32][..] } else { v }).unwrap();
        Problem {
            d_x: up(&x),
            d_logits: up32(&logits),
            d_bias: up32(&bias),
            d_ids: stream.clone_htod(if ids.is_empty() { &[0i32][..] } else { &ids[..] }).unwrap(),
            d_weights: up32(&weights),
            d_w1: up(&w1),
            d_w2: up(&w2),
            d_shared1: up(&shared1),
            d_shared2: up(&shared2),
            x,
            logits,
            bias,
            ids,
            weights,
            w1,
            w2,
            shared1,
            shared2,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        stream: &Arc<CudaStream>,
        cfg: &LayerConfig,
        t: usize,
        bias: bool,
        input: Input,
        b: &mut LayerBuffers,
        out: &mut CudaSlice<bf16>,
    ) {
        let routing = match input {
            Input::Logits => {
                Routing::Logits { logits: self.d_logits.slice(..), bias: bias.then(|| self.d_bias.slice(..)) }
            }
            Input::TopK => Routing::TopK { ids: self.d_ids.slice(..), weights: Some(self.d_weights.slice(..)) },
        };
        let inputs = LayerInputs {
            x: self.d_x.slice(..),
            routing,
            w_gate_up: self.d_w1.slice(..),
            w_down: self.d_w2.slice(..),
            shared: (cfg.shared_intermediate > 0)
                .then(|| SharedExperts { w_gate_up: self.d_shared1.slice(..), w_down: self.d_shared2.slice(..) }),
        };
        moe_layer(stream, cfg, t, &inputs, b, &mut out.slice_mut(..)).unwrap();
    }

    fn expected(&self, cfg: &LayerConfig, t: usize, bias: bool, input: Input) -> Vec<f32> {
        let routing = match input {
            Input::Logits => {
                reference::RoutingInput::Logits { logits: &self.logits, bias: bias.then_some(&self.bias[..]) }
            }
            Input::TopK => reference::RoutingInput::TopK { ids: &self.ids, weights: Some(&self.weights) },
        };
        let shared = (cfg.shared_intermediate > 0)
            .then(|| reference::SharedWeights { w_gate_up: &self.shared1, w_down: &self.shared2 });
        reference::moe_layer(cfg, t, &self.x, routing, &self.w1, &self.w2, shared, |_, _| {})
    }
}

/// Both implementations, forced (so MOEK_LAYER_IMPL cannot change what a test covers).
const IMPLS: [LayerImpl; 2] = [LayerImpl::Composed, LayerImpl::Fused];

fn download(stream: &Arc<CudaStream>, out: &CudaSlice<bf16>) -> Vec<f32> {
    stream.clone_dtoh(out).unwrap().iter().map(|v| v.to_f32()).collect()
}

#[test]
fn layer_matches_the_reference_and_repeats_bit_for_bit() {
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("layer_matches_the_reference_and_repeats_bit_for_bit");
    let mut failures = Vec::new();
    let cases = configs().into_iter().flat_map(|c| [(c, Input::Logits), (c, Input::TopK)]);
    for (((cfg, bias), input), implementation) in cases.flat_map(|c| IMPLS.map(|i| (c, i))) {
        let cfg = LayerConfig { implementation, ..cfg };
        for t in [0usize, 1, 7, 300] {
            let p = Problem::new(&stream, &mut rng, &cfg, t);
            let mut buffers = LayerBuffers::new(&stream, &cfg, t).unwrap();
            let poison = bf16::from_f32(12345.0);
            let mut out = stream.clone_htod(&vec![poison; (t * cfg.hidden).max(1)]).unwrap();
            p.run(&stream, &cfg, t, bias, input, &mut buffers, &mut out);
            let first = download(&stream, &out);
            let want = p.expected(&cfg, t, bias, input);
            let label = format!(
                "{implementation:?} {:?} {input:?} H={} I={} I_s={} T={t}",
                cfg.routing.mode, cfg.hidden, cfg.intermediate, cfg.shared_intermediate
            );
            if t == 0 {
                // Compare with the poison as stored: bf16 rounds 12345 to 12352.
                if first[0] != poison.to_f32() {
                    failures.push(format!("{label}: T=0 wrote the output"));
                }
                continue;
            }
            let err = relative_frobenius_error(&first, &want);
            if err.is_nan() || err >= 1e-2 {
                failures.push(format!("{label}: relative error {err}"));
            }
            p.run(&stream, &cfg, t, bias, input, &mut buffers, &mut out);
            if download(&stream, &out) != first {
                failures.push(format!("{label}: two runs differ"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn layer_handles_skewed_and_sparse_routing() {
    let Some((_ctx, stream)) = common::gpu() else { return };
    let mut rng = common::rng("layer_handles_skewed_and_sparse_routing");
    let mut failures = Vec::new();
    // Mixtral-like (E = 8, 37 rows an expert at T = 150: the 64-row tiles), E = 60 top-1 and top-6.
    let shapes = [(configs()[0].0, 150usize), (configs()[4].0, 65), (configs()[3].0, 33), (configs()[1].0, 1)];
    for ((cfg, t), implementation) in shapes.into_iter().flat_map(|c| IMPLS.map(|i| (c, i))) {
        let cfg = LayerConfig { implementation, ..cfg };
        let (e, k) = (cfg.routing.num_experts as usize, cfg.routing.k as usize);
        let mut p = Problem::new(&stream, &mut rng, &cfg, t);
        for (name, ids) in [
            // Every pair on one expert (the last one): one expert owns all rows, the rest none.
            ("one expert", vec![e as i32 - 1; t * k]),
            // Only experts 0 and 5 (most experts empty), with some pairs dropped.
            ("two experts", (0..t * k).map(|i| [0, 5, 0, -1][i % 4]).collect()),
        ] {
            p.ids = ids;
            stream.memcpy_htod(&p.ids, &mut p.d_ids).unwrap();
            let mut buffers = LayerBuffers::new(&stream, &cfg, t).unwrap();
            let mut out = stream.clone_htod(&vec![bf16::from_f32(12345.0); t * cfg.hidden]).unwrap();
            p.run(&stream, &cfg, t, false, Input::TopK, &mut buffers, &mut out);
            let first = download(&stream, &out);
            let err = relative_frobenius_error(&first, &p.expected(&cfg, t, false, Input::TopK));
            let label = format!("{implementation:?} {:?} E={e} k={k} T={t} {name}", cfg.routing.mode);
            if err.is_nan() || err >= 1e-2 {
                failures.push(format!("{label}: relative error {err}"));
            }
            p.run(&stream, &cfg, t, false, Input::TopK, &mut buffers, &mut out);
            if download(&stream, &out) != first {
                failures.push(format!("{label}: two runs differ"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn layer_replays_from_a_cuda_graph_on_new_inputs() {
    for implementation in IMPLS {
        replay_from_a_cuda_graph(implementation);
    }
}

fn replay_from_a_cuda_graph(implementation: LayerImpl) {
    let Some((ctx, stream)) = common::gpu() else { return };
    // SAFETY: this test's buffers are used on this one stream only; nothing may record events in a capture.
    unsafe { ctx.disable_event_tracking() };
    let mut rng = common::rng("layer_replays_from_a_cuda_graph_on_new_inputs");
    let (cfg, bias) = configs()[2];
    let cfg = LayerConfig { implementation, ..cfg };
    let t = 129;
    let mut p = Problem::new(&stream, &mut rng, &cfg, t);
    let mut buffers = LayerBuffers::new(&stream, &cfg, t).unwrap();
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(t * cfg.hidden).unwrap();
    stream.synchronize().unwrap();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    p.run(&stream, &cfg, t, bias, Input::Logits, &mut buffers, &mut out);
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("a graph");
    for round in 0..2 {
        // New tokens and logits written into the captured buffers, then a replay.
        p.x = bf16_values(&mut rng, t * cfg.hidden, 1.0);
        p.logits = (0..p.logits.len()).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let xs: Vec<bf16> = p.x.iter().map(|&f| bf16::from_f32(f)).collect();
        stream.memcpy_htod(&xs, &mut p.d_x).unwrap();
        stream.memcpy_htod(&p.logits, &mut p.d_logits).unwrap();
        graph.launch().unwrap();
        let err = relative_frobenius_error(&download(&stream, &out), &p.expected(&cfg, t, bias, Input::Logits));
        assert!(err < 1e-2, "{implementation:?} replay {round}: relative error {err}");
    }
}
