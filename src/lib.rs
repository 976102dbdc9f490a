//! # moe-kernels
//!
//! Hand-written CUDA kernels for Mixture-of-Experts layers, with a safe Rust API over
//! [cudarc](https://docs.rs/cudarc) and a C interface (`include/moe_kernels.h`, linked from
//! `libmoe_kernels.a`).
//!
//! Every GPU call is stream-ordered, allocates nothing and never synchronises with the host, so it can
//! be captured into a CUDA graph. Arguments are checked before anything is enqueued; a bad one gives an
//! [`Error`] whose [`Status`] is the C status code and whose message names the argument.
//!
//! What is here now:
//! - [`route`]: expert scores and top-k selection (softmax / sigmoid, DeepSeek-V3 group-limited, MoGE
//!   grouped, Switch top-1 with capacity), with the CPU reference in [`reference::route`].
//! - [`permute`]: the device-side plan of the expert-grouped layout, permute and the deterministic
//!   weighted combine, with the CPU reference in [`reference::permute`].
//! - [`grouped_gemm`]: every expert's matrix product in one launch (contiguous or masked rows, SwiGLU /
//!   GELU / ReLU and row-scale epilogues; the portable mma.sync path, with split-K for decode, and an
//!   sm_90a TMA + wgmma path for prefill), with the CPU reference in [`reference::grouped_gemm`].
//! - [`layer`]: a whole MoE layer composed from the above (route, plan, permute, two grouped GEMMs,
//!   combine), or fused (route, plan, then one persistent kernel: [`layer::LayerImpl`]), with the CPU
//!   reference in [`reference::layer`].
//! - [`subbit`]: the sub-1-bit ternary expert format (encoder, validator, CPU decoder) and its kernels:
//!   lossless decode to dense bf16, the fused decode + matvec for 1..=8 tokens and the fused decode +
//!   grouped GEMM for tens of rows per expert (not yet run on a GPU), with the CPU reference in
//!   [`reference::subbit`].
//! - [`ep`]: expert parallelism across the GPUs of one host: dispatch and combine with NVLink peer
//!   stores and device-side flags, with the CPU reference in [`reference::ep`]; its low-dimension
//!   (BigMac) variant [`ep::LowDimRank`] with [`reference::low_dim`].
//!
//! Built without nvcc (see `scripts/setup-cuda.sh`), the crate still compiles and its CPU parts work;
//! GPU calls return [`Status::NoCudaKernels`]. [`KERNELS_BUILT`] tells which build this is.

pub mod capi;
mod check;
mod cuda;
pub mod device;
pub mod dtype;
pub mod ep;
pub mod error;
mod fused_layer;
pub mod grouped_gemm;
pub mod layer;
pub mod permute;
pub mod reference;
pub mod route;
pub mod subbit;
pub mod sys;
pub mod timing;

pub use cuda::KERNELS_BUILT;
pub use error::{Error, Result, Status};
