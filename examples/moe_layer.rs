//! The crate's main job: a whole MoE layer on the GPU, for model presets with random weights. Each preset
//! is checked against the CPU reference on a few tokens, then timed stage by stage at a decode and a
//! prefill size. The ceiling beside each time is the larger of the weight-streaming floor (decode) and
//! the FLOPs at the measured matrix rate (prefill). Without a GPU it runs the CPU reference on
//! small versions of the presets and says so.
//!
//!     cargo run --release --example moe_layer

use cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaStream};
use half::bf16;
use moe_kernels::layer::{
    moe_layer, moe_layer_staged, LayerBuffers, LayerConfig, LayerImpl, LayerInputs, Routing, SharedExperts, STAGES,
};
use moe_kernels::reference::grouped_gemm::{relative_frobenius_error, Epilogue};
use moe_kernels::reference::layer as reference;
use moe_kernels::route::RoutingConfig;
use std::io::{IsTerminal, Write};
use std::sync::Arc;

const COPY_GBPS: f64 = 4282.0; // H200 device copy, shared/GPU.md
/// H200 bf16 matrix rate measured on random data (an 8192^3 product through PyTorch, the device tool's
/// KINDS.md): the compute ceiling. The datasheet's 990 TFLOP/s is not reached by any library here.
const MATRIX_TFLOPS: f64 = 788.0;
const CHECK_TOKENS: usize = 8;
const TIMED_TOKENS: [usize; 2] = [64, 4096];

struct Preset {
    name: &'static str,
    cfg: LayerConfig,
    with_bias: bool,
}

fn presets() -> Vec<Preset> {
    vec![
        Preset { name: "Mixtral-8x7B", cfg: LayerConfig::mixtral_8x7b(), with_bias: false },
        Preset { name: "Qwen3-30B-A3B", cfg: LayerConfig::qwen3_30b_a3b(), with_bias: false },
        Preset {
            name: "DeepSeek-V3 slice (32 experts + the shared one)",
            cfg: LayerConfig { shared_intermediate: 2048, ..LayerConfig::deepseek_v3_slice() },
            with_bias: true,
        },
        Preset {
            name: "Switch-style (top-1 of 128, ReLU)",
            cfg: LayerConfig {
                routing: RoutingConfig::switch(128, 40), // 1.25 x 4096 tokens / 128 experts
                hidden: 768,
                intermediate: 3072,
                activation: Epilogue::Relu,
                shared_intermediate: 0,
                implementation: LayerImpl::Auto,
            },
            with_bias: false,
        },
    ]
}

/// `len` pseudo-random values uniform in [-scale, scale), from `seed`, generated on all cores
/// (the Mixtral preset has 1.4 billion weights).
fn random_values(len: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0f32; len];
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let chunk = len.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut x = seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)) | 1;
                for v in part {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *v = ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
                }
            });
        }
    });
    out
}

/// The values as bf16, and back as f32 (what the GPU sees), so the reference uses the same numbers.
fn as_bf16(values: &mut [f32]) -> Vec<bf16> {
    values
        .iter_mut()
        .map(|v| {
            let b = bf16::from_f32(*v);
            *v = b.to_f32();
            b
        })
        .collect()
}

/// Random inputs and weights of a preset (weights scaled so activations stay near 1).
struct Model {
    w_gate_up: Vec<f32>,
    w_down: Vec<f32>,
    bias: Vec<f32>,
    /// The shared experts' weights (empty without).
    shared_gate_up: Vec<f32>,
    shared_down: Vec<f32>,
}

impl Model {
    /// Values already rounded to bf16, so the GPU's copies are exact.
    fn new(cfg: &LayerConfig, seed: u64) -> Self {
        let e = cfg.routing.num_experts as usize;
        let (h, i, i_s) = (cfg.hidden, cfg.intermediate, cfg.shared_intermediate);
        let weights = |len: usize, fan_in: usize, seed: u64| {
            let mut w = random_values(len, 1.7 / (fan_in.max(1) as f32).sqrt(), seed);
            as_bf16(&mut w);
            w
        };
        Model {
            w_gate_up: weights(e * cfg.gate_up_rows() * h, h, seed),
            w_down: weights(e * h * i, i, seed + 1),
            bias: random_values(e, 0.1, seed + 2),
            shared_gate_up: weights(cfg.shared_gate_up_rows() * h, h, seed + 3),
            shared_down: weights(h * i_s, i_s, seed + 4),
        }
    }

    fn shared(&self) -> Option<reference::SharedWeights<'_>> {
        (!self.shared_down.is_empty())
            .then(|| reference::SharedWeights { w_gate_up: &self.shared_gate_up, w_down: &self.shared_down })
    }
}

/// Progress of the CPU reference (seconds per preset) on stderr: a line that updates itself on a
/// terminal, one line when stderr goes to a file (so logs stay readable).
fn progress(name: &str) -> impl FnMut(usize, usize) + '_ {
    let terminal = std::io::stderr().is_terminal();
    move |done, total| {
        let mut err = std::io::stderr();
        if !terminal {
            if done == 1 {
                let _ = writeln!(err, "  CPU reference for {name}: {total} experts ...");
            }
            return;
        }
        let _ = write!(err, "\r  CPU reference for {name}: expert {done} / {total}   ");
        if done == total {
            let _ = write!(err, "\r{:70}\r", "");
        }
        let _ = err.flush();
    }
}

fn cpu_only(why: &str) {
    println!("No GPU found ({why}).");
    println!("Running the CPU reference on small versions of the presets (H = 256, I = 128, T = 16):");
    for p in presets() {
        let cfg = LayerConfig { hidden: 256, intermediate: 128, ..p.cfg };
        let t = 16;
        let cfg = LayerConfig { shared_intermediate: cfg.shared_intermediate.min(128), ..cfg };
        let m = Model::new(&cfg, 1);
        let mut x = random_values(t * cfg.hidden, 1.0, 7);
        as_bf16(&mut x);
        let logits = random_values(t * cfg.routing.num_experts as usize, 3.0, 9);
        let routing = reference::RoutingInput::Logits { logits: &logits, bias: p.with_bias.then_some(&m.bias[..]) };
        let out = reference::moe_layer(&cfg, t, &x, routing, &m.w_gate_up, &m.w_down, m.shared(), |_, _| {});
        let norm = out.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt();
        println!("  {}: output [{t}, {}], Frobenius norm {norm:.4}", p.name, cfg.hidden);
    }
}

/// Runs the layer on the GPU: a check against the reference on a few tokens, then the timing table.
fn run_preset(stream: &Arc<CudaStream>, p: &Preset) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = &p.cfg;
    let (e, h) = (cfg.routing.num_experts as usize, cfg.hidden);
    let max_t = *TIMED_TOKENS.iter().max().unwrap();
    let m = Model::new(cfg, 11);
    let upload = |v: &[f32]| stream.clone_htod(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>());
    let (w_gate_up, w_down) = (upload(&m.w_gate_up)?, upload(&m.w_down)?);
    let (shared_gate_up, shared_down) = (upload(&m.shared_gate_up)?, upload(&m.shared_down)?);
    let bias = stream.clone_htod(&m.bias)?;
    let mut x_host = random_values(max_t * h, 1.0, 21);
    let x = stream.clone_htod(&as_bf16(&mut x_host))?;
    let logits_host = random_values(max_t * e, 3.0, 23);
    let logits = stream.clone_htod(&logits_host)?;
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(max_t * h)?;
    let mut buffers = LayerBuffers::new(stream, cfg, max_t)?;
    let inputs = |t: usize| LayerInputs {
        x: x.slice(..t * h),
        routing: Routing::Logits { logits: logits.slice(..t * e), bias: p.with_bias.then(|| bias.slice(..)) },
        w_gate_up: w_gate_up.slice(..),
        w_down: w_down.slice(..),
        shared: (cfg.shared_intermediate > 0)
            .then(|| SharedExperts { w_gate_up: shared_gate_up.slice(..), w_down: shared_down.slice(..) }),
    };

    // Correctness on the first CHECK_TOKENS tokens.
    let t = CHECK_TOKENS;
    moe_layer(stream, cfg, t, &inputs(t), &mut buffers, &mut out.slice_mut(..t * h))?;
    let got: Vec<f32> = stream.clone_dtoh(&out.slice(..t * h))?.iter().map(|v| v.to_f32()).collect();
    let routing =
        reference::RoutingInput::Logits { logits: &logits_host[..t * e], bias: p.with_bias.then_some(&m.bias[..]) };
    let want =
        reference::moe_layer(cfg, t, &x_host[..t * h], routing, &m.w_gate_up, &m.w_down, m.shared(), progress(p.name));
    let err = relative_frobenius_error(&got, &want);
    println!(
        "{}: {t} tokens against the CPU reference, relative error {err:.2e} ({})",
        p.name,
        if err < 1e-2 { "ok" } else { "TOO LARGE" }
    );

    // Whole-layer time (nothing between the launches), then stage times (an event after each stage),
    // each averaged over repeated calls after a warm-up call.
    let ctx = stream.context();
    const REPS: usize = 10;
    for &t in &TIMED_TOKENS {
        let events: Vec<_> = (0..=STAGES.len())
            .map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
            .collect::<Result<_, _>>()?;
        let mut layer_ms = 0.0f64;
        for rep in 0..=REPS {
            events[0].record(stream)?;
            moe_layer(stream, cfg, t, &inputs(t), &mut buffers, &mut out.slice_mut(..t * h))?;
            events[1].record(stream)?;
            if rep > 0 {
                layer_ms += f64::from(events[0].elapsed_ms(&events[1])?) / REPS as f64;
            }
        }
        let mut stage_ms = vec![0.0f64; STAGES.len()];
        for rep in 0..=REPS {
            events[0].record(stream)?;
            let mut next = 1;
            moe_layer_staged(stream, cfg, t, &inputs(t), &mut buffers, &mut out.slice_mut(..t * h), |_| {
                events[next].record(stream)?;
                next += 1;
                Ok(())
            })?;
            if rep > 0 {
                for (i, ms) in stage_ms.iter_mut().enumerate() {
                    *ms += f64::from(events[i].elapsed_ms(&events[i + 1])?) / REPS as f64;
                }
            }
        }
        // Experts the tokens touched: their weights must be read at least once. Routed pairs: each does
        // both projections.
        let routed = moe_kernels::reference::route::route(
            &cfg.routing,
            t,
            &logits_host[..t * e],
            p.with_bias.then_some(&m.bias[..]),
        );
        let mut touched_experts: Vec<i32> = routed.ids.iter().copied().filter(|&id| id >= 0).collect();
        let pairs = touched_experts.len();
        touched_experts.sort_unstable();
        touched_experts.dedup();
        let touched = touched_experts.len();
        let weights_per_expert = cfg.gate_up_rows() * h + h * cfg.intermediate;
        let shared_weights = cfg.shared_gate_up_rows() * h + h * cfg.shared_intermediate;
        let weight_bytes = 2 * (touched * weights_per_expert + shared_weights);
        let floor_us = weight_bytes as f64 / (COPY_GBPS * 1e3);
        let flop = 2.0 * (pairs * weights_per_expert + t * shared_weights) as f64;
        let compute_us = flop / (MATRIX_TFLOPS * 1e6);
        let (ceiling_us, bound) = if floor_us >= compute_us { (floor_us, "weights") } else { (compute_us, "FLOPs") };
        let layer_us = layer_ms * 1e3;
        let stages: Vec<String> = STAGES.iter().zip(&stage_ms).map(|(s, ms)| format!("{s} {:.1}", ms * 1e3)).collect();
        println!(
            "  T={t:5}: {layer_us:8.1} us, {:5.1} TFLOP/s; ceiling {ceiling_us:.1} us ({bound}) = {:.0}% of the time; \
             {touched} experts touched",
            flop / (layer_us * 1e6),
            100.0 * ceiling_us / layer_us
        );
        println!("           stages (an event after each): {}", stages.join(", "));
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = match moe_kernels::device::first_gpu() {
        Ok(ctx) => ctx,
        Err(why) => {
            cpu_only(&why);
            return Ok(());
        }
    };
    let stream = ctx.new_stream()?;
    println!("One MoE layer per preset on the GPU (bf16 weights and activations, fp32 accumulation).");
    println!("The ceiling is the larger of the touched experts' weight bytes over {COPY_GBPS} GB/s (copy");
    println!("bandwidth) and the FLOPs over {MATRIX_TFLOPS} TFLOP/s (measured bf16 matrix rate). Stage times");
    println!("come from an event after each stage, so they add up to a bit more than the layer's time.");
    for p in presets() {
        run_preset(&stream, &p)?;
    }
    Ok(())
}
