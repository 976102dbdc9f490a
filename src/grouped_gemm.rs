//! The grouped GEMM: every expert's matrix product in one launch, `out[r] = epilogue(a[r] · b[e]^T) ·
//! row_scale[r]` for the rows r of each expert e, which rows belong to which expert living in device
//! memory only. Semantics: `moek_grouped_gemm` in `include/moe_kernels.h`;
//! [`crate::reference::grouped_gemm`] is the CPU oracle.
//!
//! The kernels are the portable tensor-core path (mma.sync, cp.async; sm_80 and later) and, on a
//! compute capability 9.0 device, an sm_90a path (TMA, wgmma, a persistent grid) in two tile sizes:
//! [`Tile::Hopper`] (128-row tiles, prefill), which [`Tile::Auto`] picks from 128 rows per expert,
//! and [`Tile::Hopper64`] (64-row tiles), which it picks from 33 to 127, both where
//! [`hopper_available`] says they run. Neither path allocates or synchronises, so a call can be
//! captured into a CUDA graph and replayed with different counts in the same buffers. With few output
//! tiles (decode) the portable path splits K over more CTAs when given a workspace of
//! [`GemmConfig::workspace_bytes`] bytes (see "Split-K" in the header); the sm_90a path never splits K
//! and needs no workspace.
//!
//! Tuning overrides, read once per process (for sweeps):
//! `MOEK_GEMM_TILE=small|medium|large|hopper|hopper64` replaces [`Tile::Auto`] (as do two candidate
//! decode tiles, `small6`: SMALL with 6 stages, and
//! `medium64`: 64 × 128 with BK = 64; `auto` keeps the automatic choice), `MOEK_GEMM_HOPPER=0` keeps
//! the automatic choice on the portable path, `MOEK_GEMM_SPLIT_K=n` (1..=64) replaces `split_k = 0`,
//! `MOEK_GEMM_SPLIT_TARGET=ctas` replaces the CTA count the automatic split aims at (768), and
//! `MOEK_GEMM_HOPPER_EPILOGUE=direct|staged-all` changes how the sm_90a kernel stores 16-bit outputs (by
//! default through shared memory and TMA for the plain epilogues, with direct stores for SwiGLU;
//! `direct`: direct stores always; `staged-all`: SwiGLU staged too).

use crate::check;
use crate::dtype::{self, Element};
use crate::error::{bail, Result};
use crate::sys;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::sync::{Arc, OnceLock};

pub use crate::reference::grouped_gemm::Epilogue;

/// Input element types of the grouped GEMM (A and B have the same one): bf16 and f16.
pub trait GemmInput: Element {}
impl GemmInput for half::bf16 {}
impl GemmInput for half::f16 {}

/// The kernel's tile shape (output rows × columns per CTA).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tile {
    /// Chosen from the average rows per expert the sizes allow (see the header).
    #[default]
    Auto,
    /// 32 × 64: decode, a few rows per expert, the weights streamed once per 32 rows.
    Small,
    /// 64 × 128.
    Medium,
    /// 128 × 128: prefill.
    Large,
    /// The sm_90a kernel (128 × 256 tiles, TMA and wgmma): prefill on a compute capability 9.0 device.
    /// Forced where [`hopper_available`] is false, the call fails with a CUDA error. It never splits K.
    Hopper,
    /// The sm_90a kernel with 64 × 256 tiles (one consumer warpgroup): 33 to 127 rows per expert, where
    /// 128-row tiles would waste half the tensor-core work. Runs wherever [`Tile::Hopper`] does; never
    /// splits K.
    Hopper64,
}

/// Which rows of A and the output each expert owns (the sizes only; the counts live on the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Expert e owns rows `offsets[e]..offsets[e+1]` of A ([max_rows, K]) and the output.
    Contiguous {
        /// Rows of A, the output and the row scale.
        max_rows: usize,
    },
    /// A is [E, capacity, K]; expert e owns its first `counts[e]` rows.
    Masked {
        /// Rows per expert.
        capacity: usize,
    },
}

/// The shape of a grouped GEMM, apart from the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmConfig {
    /// E, 1..=8192.
    pub num_experts: u32,
    /// Columns of the product (rows of each `B[e]`): a multiple of 8, of 16 for SwiGLU, at most 2^21.
    pub n: usize,
    /// The reduced dimension, a multiple of 8.
    pub k: usize,
    pub epilogue: Epilogue,
    pub tile: Tile,
    /// K slices: 0 chooses (a split only with a workspace), 1 never splits, 2..=64 force that many
    /// (then the workspace is required). Ignored when the tile is or resolves to [`Tile::Hopper`] or
    /// [`Tile::Hopper64`].
    pub split_k: u32,
}

impl GemmConfig {
    /// The plain product (identity epilogue, automatic tile) of E experts' [n, k] weights.
    pub fn new(num_experts: u32, n: usize, k: usize) -> Self {
        GemmConfig { num_experts, n, k, epilogue: Epilogue::Identity, tile: Tile::Auto, split_k: 0 }
    }

    /// Columns of the output: n, or n / 2 with SwiGLU.
    pub fn output_columns(&self) -> usize {
        self.epilogue.output_columns(self.n)
    }

    /// The C argument struct for this configuration, with every pointer NULL.
    pub fn to_args(
        &self,
        layout: Layout,
        dtype: sys::moek_dtype,
        out_dtype: sys::moek_dtype,
    ) -> sys::moek_grouped_gemm_args {
        let wide = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let (layout, max_rows, capacity) = match layout {
            Layout::Contiguous { max_rows } => (sys::moek_gemm_layout_MOEK_GEMM_CONTIGUOUS, wide(max_rows), 0),
            Layout::Masked { capacity } => (sys::moek_gemm_layout_MOEK_GEMM_MASKED, 0, wide(capacity)),
        };
        sys::moek_grouped_gemm_args {
            layout,
            dtype,
            out_dtype,
            epilogue: match self.epilogue {
                Epilogue::Identity => sys::moek_gemm_epilogue_MOEK_EPILOGUE_IDENTITY,
                Epilogue::SwiGlu => sys::moek_gemm_epilogue_MOEK_EPILOGUE_SWIGLU,
                Epilogue::Gelu => sys::moek_gemm_epilogue_MOEK_EPILOGUE_GELU,
                Epilogue::Relu => sys::moek_gemm_epilogue_MOEK_EPILOGUE_RELU,
            },
            tile: match self.tile {
                Tile::Auto => sys::moek_gemm_tile_MOEK_GEMM_TILE_AUTO,
                Tile::Small => sys::moek_gemm_tile_MOEK_GEMM_TILE_SMALL,
                Tile::Medium => sys::moek_gemm_tile_MOEK_GEMM_TILE_MEDIUM,
                Tile::Large => sys::moek_gemm_tile_MOEK_GEMM_TILE_LARGE,
                Tile::Hopper => sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER,
                Tile::Hopper64 => sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER_64,
            },
            num_experts: i32::try_from(self.num_experts).unwrap_or(i32::MAX),
            n: wide(self.n),
            k: wide(self.k),
            max_rows,
            capacity,
            a: std::ptr::null(),
            b: std::ptr::null(),
            expert_offsets: std::ptr::null(),
            expert_counts: std::ptr::null(),
            row_scale: std::ptr::null(),
            out: std::ptr::null_mut(),
            split_k: i32::try_from(self.split_k).unwrap_or(i32::MAX),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
        }
    }

    /// Bytes of workspace that split-K needs with `layout` (0: no split); less is allowed with
    /// `split_k = 0` (no split then). Depends on the shape, not on the dtypes, nor on the device: 0 for
    /// [`Tile::Hopper`] and [`Tile::Hopper64`], and for [`Tile::Auto`] the portable path's need, enough
    /// for whichever kernel runs.
    pub fn workspace_bytes(&self, layout: Layout) -> Result<usize> {
        let bf16 = sys::moek_dtype_MOEK_DTYPE_BF16;
        workspace_bytes(&self.to_args(layout, bf16, bf16))
    }

    /// Checks the configuration for inputs of type `T`, output `O` and `layout`, naming the bad field.
    pub fn validate<T: GemmInput, O: Element>(&self, layout: Layout) -> Result<()> {
        check_shape(&self.to_args(layout, T::DTYPE, O::DTYPE)).map(|_| ())
    }
}

/// Checks the shape fields and returns the number of rows of A and the output.
pub(crate) fn check_shape(a: &sys::moek_grouped_gemm_args) -> Result<i64> {
    let bf16 = sys::moek_dtype_MOEK_DTYPE_BF16;
    let f16 = sys::moek_dtype_MOEK_DTYPE_F16;
    if a.dtype != bf16 && a.dtype != f16 {
        bail!(InvalidDtype, "dtype = {} must be MOEK_DTYPE_BF16 or MOEK_DTYPE_F16", a.dtype);
    }
    if a.out_dtype != a.dtype && a.out_dtype != sys::moek_dtype_MOEK_DTYPE_F32 {
        let why = if dtype::size_of(a.out_dtype).is_none() { "is not a moek_dtype" } else { "must be dtype or f32" };
        bail!(InvalidDtype, "out_dtype = {} {why} (dtype = {})", a.out_dtype, a.dtype);
    }
    if a.epilogue > sys::moek_gemm_epilogue_MOEK_EPILOGUE_RELU {
        bail!(InvalidEnum, "epilogue = {} is not a moek_gemm_epilogue", a.epilogue);
    }
    if a.tile > sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER_64 {
        bail!(InvalidEnum, "tile = {} is not a moek_gemm_tile", a.tile);
    }
    let e = a.num_experts;
    if e < 1 || e > sys::MOEK_GEMM_MAX_EXPERTS as i32 {
        bail!(InvalidNumExperts, "num_experts = {e} is outside 1..={}", sys::MOEK_GEMM_MAX_EXPERTS);
    }
    if a.n < 8 || a.n % 8 != 0 || a.n > i64::from(sys::MOEK_GEMM_MAX_N) {
        bail!(InvalidValue, "n = {} must be a positive multiple of 8 up to {}", a.n, sys::MOEK_GEMM_MAX_N);
    }
    if a.epilogue == sys::moek_gemm_epilogue_MOEK_EPILOGUE_SWIGLU && a.n % 16 != 0 {
        bail!(InvalidValue, "n = {} must be a multiple of 16 for SwiGLU (n/2 a multiple of 8)", a.n);
    }
    if a.k < 8 || a.k % 8 != 0 || a.k > i64::from(i32::MAX) {
        bail!(InvalidValue, "k = {} must be a positive multiple of 8 below 2^31", a.k);
    }
    if !(0..=sys::MOEK_GEMM_MAX_SPLIT_K as i32).contains(&a.split_k) {
        bail!(InvalidValue, "split_k = {} is outside 0..={}", a.split_k, sys::MOEK_GEMM_MAX_SPLIT_K);
    }
    let limit = i64::from(i32::MAX);
    match a.layout {
        sys::moek_gemm_layout_MOEK_GEMM_CONTIGUOUS => {
            if !(0..=limit).contains(&a.max_rows) {
                bail!(InvalidValue, "max_rows = {} is outside 0..=2^31-1", a.max_rows);
            }
            Ok(a.max_rows)
        }
        sys::moek_gemm_layout_MOEK_GEMM_MASKED => {
            if !(0..=limit / i64::from(e)).contains(&a.capacity) {
                bail!(
                    InvalidCapacity,
                    "capacity = {} is negative or num_experts * capacity exceeds 2^31-1",
                    a.capacity
                );
            }
            Ok(a.capacity * i64::from(e))
        }
        other => bail!(InvalidEnum, "layout = {other} is not a moek_gemm_layout"),
    }
}

/// The tuning overrides of the environment, read once (see the module documentation).
struct Overrides {
    tile: Option<sys::moek_gemm_tile>,
    /// `MOEK_GEMM_HOPPER=0`: AUTO never takes the sm_90a kernels.
    hopper_off: bool,
    split_k: Option<i32>,
    split_target: Option<u64>,
}

fn overrides() -> &'static Overrides {
    static OVERRIDES: OnceLock<Overrides> = OnceLock::new();
    OVERRIDES.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let ignored = |name: &str, v: &str| eprintln!("moe-kernels: ignoring {name}={v} (see the grouped_gemm docs)");
        let tile = var("MOEK_GEMM_TILE").and_then(|v| match v.to_ascii_lowercase().as_str() {
            "auto" => None,
            "small" => Some(sys::moek_gemm_tile_MOEK_GEMM_TILE_SMALL),
            "medium" => Some(sys::moek_gemm_tile_MOEK_GEMM_TILE_MEDIUM),
            "large" => Some(sys::moek_gemm_tile_MOEK_GEMM_TILE_LARGE),
            "small6" => Some(TILE_SMALL_DEEP),
            "medium64" => Some(TILE_MEDIUM_K64),
            "hopper" => Some(sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER),
            "hopper64" => Some(sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER_64),
            _ => {
                ignored("MOEK_GEMM_TILE", &v);
                None
            }
        });
        let split_k = var("MOEK_GEMM_SPLIT_K").and_then(|v| match v.parse::<i32>() {
            Ok(s) if (1..=sys::MOEK_GEMM_MAX_SPLIT_K as i32).contains(&s) => Some(s),
            _ => {
                ignored("MOEK_GEMM_SPLIT_K", &v);
                None
            }
        });
        let split_target = var("MOEK_GEMM_SPLIT_TARGET").and_then(|v| match v.parse::<u64>() {
            Ok(t) if t >= 1 => Some(t),
            _ => {
                ignored("MOEK_GEMM_SPLIT_TARGET", &v);
                None
            }
        });
        let hopper_off = var("MOEK_GEMM_HOPPER").is_some_and(|v| v == "0");
        Overrides { tile, hopper_off, split_k, split_target }
    })
}

/// Candidate decode tiles reachable only through `MOEK_GEMM_TILE` (codes beyond moek_gemm_tile, as
/// cuda/grouped_gemm_kernel.cuh's kTileSmallDeep and kTileMediumK64): SMALL with 6 stages, and
/// 64 × 128 with BK = 64 (3 stages, 8 warps).
const TILE_SMALL_DEEP: sys::moek_gemm_tile = 101;
const TILE_MEDIUM_K64: sys::moek_gemm_tile = 102;

/// The automatic split aims at this many CTAs (of the fewest the sizes allow, see [`auto_splits`]): two
/// per SM of a 132-SM H100/H200. Swept on the H200 (MOEK_GEMM_SPLIT_K = 1..16 at T = 1, 2026-11-28):
/// splitting pays only where few output tiles each stream a long K (Mixtral down, 128 tiles of
/// K = 14336: 117 us unsplit, 64 us at 3-4 slices; a DeepSeek-V3 expert's gate|up, 64 tiles of
/// K = 7168: 59 us, 35 us at 4); every extra slice of a short K costs 3-5 us (Qwen3 down, K = 768:
/// 16 us unsplit, 22 us at 2, 96 us at 16).
const SPLIT_TARGET_CTAS: u64 = 264;
/// The split never makes the most CTAs the sizes allow (rows spread over min(E, rows) experts) exceed
/// this many times the target: Mixtral's down projection at T = 16 (up to 512 SMALL tiles) ran at
/// 219 us unsplit and 234 us in 2 slices.
const SPLIT_SPREAD_FACTOR: u64 = 2;
/// At most this many slices automatically.
const SPLIT_MAX_AUTO: u64 = 16;
/// Each slice gets at least this much of K (automatic choice): K = 2048 split in 2 already lost 0.4-1.2
/// us in the sweep, K = 7168 in 4 won 24 us.
const SPLIT_MIN_K_PER_SLICE: u64 = 1536;
/// The slices' fp32 traffic (written once, read once) stays below the weights' bytes over this: a
/// 64-row expert of K = 7168 may split 4 ways (partials 14% of its weight bytes).
const SPLIT_TRAFFIC_RATIO: u64 = 4;
/// AUTO takes a sm_90a tile only where the rows sure to exist make at least this many of its output
/// tiles: one expert of 64 rows (a shared expert at decode) makes 16-32 wgmma tiles that cannot fill
/// 132 SMs and cannot split K, where a portable tile with split-K can.
const HOPPER_MIN_TILES: u64 = 64;
/// The SMs of an H100/H200, for tile choices that must not depend on the device (the workspace query
/// does not ask it): fewer sure MEDIUM_K64 tiles than this take the SMALL tile.
const SM_COUNT_HINT: u64 = 132;

/// Rows per expert from which AUTO takes the sm_90a kernel's 128-row tiles where it is available.
const HOPPER_MIN_ROWS_PER_EXPERT: i64 = 128;
/// Rows per expert from which AUTO takes its 64-row tiles (up to [`HOPPER_MIN_ROWS_PER_EXPERT`] - 1).
/// Below, a 64-row wgmma tile is mostly empty rows and the portable SMALL tile (32 rows, split-K)
/// streams the weights at the floor already.
const HOPPER64_MIN_ROWS_PER_EXPERT: i64 = 33;

/// The m-tiles of BM rows that exist however the rows fall: all rows on one expert (contiguous), or
/// every expert's capacity (masked).
fn sure_m_tiles(a: &sys::moek_grouped_gemm_args, bm: u64) -> u64 {
    if a.layout == sys::moek_gemm_layout_MOEK_GEMM_MASKED {
        a.num_experts.max(0) as u64 * (a.capacity.max(0) as u64).div_ceil(bm)
    } else {
        (a.max_rows.max(0) as u64).div_ceil(bm)
    }
}

/// The tile `a` runs with: its own, the environment's for AUTO, else AUTO resolved by the average rows
/// per expert. The launcher (cuda/grouped_gemm.cu) receives this, never AUTO. `ask_device`: whether
/// AUTO may ask the current device for the sm_90a kernel (from [`HOPPER64_MIN_ROWS_PER_EXPERT`] rows
/// per expert, unless `MOEK_GEMM_HOPPER=0`); without it, the portable tile it would otherwise take
/// (MEDIUM or LARGE) stands for either.
fn resolved_tile(a: &sys::moek_grouped_gemm_args, ask_device: bool) -> sys::moek_gemm_tile {
    if a.tile != sys::moek_gemm_tile_MOEK_GEMM_TILE_AUTO {
        return a.tile;
    }
    if let Some(t) = overrides().tile {
        return t;
    }
    let per_expert = if a.layout == sys::moek_gemm_layout_MOEK_GEMM_MASKED {
        a.capacity
    } else {
        a.max_rows / i64::from(a.num_experts)
    };
    // The output tiles of a BM x BN tile that surely exist (every row on one expert).
    let sure_tiles = |bm: u64, bn: u64| sure_m_tiles(a, bm).saturating_mul((a.n.max(0) as u64).div_ceil(bn));
    let hopper = |bm: u64| {
        per_expert >= HOPPER64_MIN_ROWS_PER_EXPERT
            && ask_device
            && !overrides().hopper_off
            && sure_tiles(bm, 256) >= HOPPER_MIN_TILES
            && hopper_available_raw(a.num_experts)
    };
    match per_expert {
        ..=32 => sys::moek_gemm_tile_MOEK_GEMM_TILE_SMALL,
        p if p < HOPPER_MIN_ROWS_PER_EXPERT && hopper(64) => sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER_64,
        // 64 x 128 with BK = 64: Mixtral T = 256 (64 rows per expert) ran 532 / 299 us against 777 / 419
        // on the BK = 32 MEDIUM tile (H200 sweep, 2026-11-28). Where its tiles would not cover the SMs
        // (a lone shared expert of 64 rows: 32-56 tiles), the 32 x 64 SMALL tile makes four times as many.
        33..=64 if sure_tiles(64, 128) < SM_COUNT_HINT => sys::moek_gemm_tile_MOEK_GEMM_TILE_SMALL,
        33..=64 => TILE_MEDIUM_K64,
        _ if hopper(128) => sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER,
        // LARGE never splits K, so where its tiles would not cover the SMs (one expert of 128 rows
        // against a narrow n: the low-dimension projections at T = 128 made 7 CTAs over K = 7168 and
        // took about 130 us on the H200) the 64 x 128 tile, which can split K, takes over.
        _ if sure_tiles(128, 128) < SM_COUNT_HINT => TILE_MEDIUM_K64,
        _ => sys::moek_gemm_tile_MOEK_GEMM_TILE_LARGE,
    }
}

/// Whether `tile` is one of the sm_90a kernel's (which never split K).
fn is_hopper(tile: sys::moek_gemm_tile) -> bool {
    tile == sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER || tile == sys::moek_gemm_tile_MOEK_GEMM_TILE_HOPPER_64
}

/// BM, BN, BK of a tile (cuda/grouped_gemm_kernel.cuh: TileSmall, TileMedium, TileLarge).
fn tile_shape(tile: sys::moek_gemm_tile) -> (u64, u64, u64) {
    match tile {
        sys::moek_gemm_tile_MOEK_GEMM_TILE_SMALL | TILE_SMALL_DEEP => (32, 64, 64),
        sys::moek_gemm_tile_MOEK_GEMM_TILE_MEDIUM => (64, 128, 32),
        TILE_MEDIUM_K64 => (64, 128, 64),
        _ => (128, 128, 32),
    }
}

/// The automatic number of K slices for a shape with `rows` rows (> 0) on the portable `tile`: 1
/// unless the CTAs sure to exist fall short of [`SPLIT_TARGET_CTAS`]; never for the LARGE tile
/// (prefill). Deterministic: from the sizes only.
///
/// The sizes do not say how the rows spread over the experts, so the split is sized from the fewest
/// m-tiles the rows can make, all of them on one expert: ceil(rows / BM) (masked: E · ceil(capacity /
/// BM), the only count its sizes give). The upper bound (rows spread over min(E, rows) experts)
/// overstates the work when the rows gather: at T = 1 of a DeepSeek-V3 slice (max_rows = 8, one
/// expert touched) it counted 8 m-tiles (896 CTAs, no split) where one m-tile (112 CTAs) did the work.
/// The upper bound still caps the split ([`SPLIT_SPREAD_FACTOR`]), and so do the K per slice and
/// the slices' fp32 traffic against the weights.
fn auto_splits(a: &sys::moek_grouped_gemm_args, tile: sys::moek_gemm_tile, rows: u64) -> u64 {
    if tile == sys::moek_gemm_tile_MOEK_GEMM_TILE_LARGE {
        return 1;
    }
    let (bm, bn, _) = tile_shape(tile);
    let (e, n, k) = (a.num_experts as u64, a.n as u64, a.k as u64);
    // (fewest, most) m-tiles; each expert's rows start a new tile, each real m-tile holds a row.
    let m_min = sure_m_tiles(a, bm);
    let m_max =
        if a.layout == sys::moek_gemm_layout_MOEK_GEMM_MASKED { m_min } else { ((rows + e * (bm - 1)) / bm).min(rows) };
    // SwiGLU: a tile covers bn / 2 outputs of n / 2, the same count.
    let n_tiles = n.div_ceil(bn);
    let ctas = m_min.saturating_mul(n_tiles);
    let target = overrides().split_target.unwrap_or(SPLIT_TARGET_CTAS);
    if ctas >= target {
        return 1;
    }
    let by_ctas = target.div_ceil(ctas.max(1));
    let by_spread = target.saturating_mul(SPLIT_SPREAD_FACTOR) / m_max.saturating_mul(n_tiles).max(1);
    let by_k = k / SPLIT_MIN_K_PER_SLICE;
    // Weight bytes streamed (at most one [n, k] matrix per row) against 8 bytes per row and column a slice.
    let by_traffic = (e.min(rows) * k * 2) / (rows * 8 * SPLIT_TRAFFIC_RATIO);
    by_ctas.min(by_spread).min(SPLIT_MAX_AUTO).min(by_k).min(by_traffic).max(1)
}

/// How a call runs: its resolved tile, its K slices (split_k, the environment or the automatic
/// choice; always 1 on the sm_90a kernels) and the workspace bytes they need (0 for one slice).
struct SplitPlan {
    tile: sys::moek_gemm_tile,
    splits: i32,
    bytes: usize,
}

/// The [`SplitPlan`] of `a`; `ask_device` as for [`resolved_tile`].
fn split_plan(a: &sys::moek_grouped_gemm_args, ask_device: bool) -> Result<SplitPlan> {
    let rows = check_shape(a)? as u64;
    let tile = resolved_tile(a, ask_device);
    let single = SplitPlan { tile, splits: 1, bytes: 0 };
    if rows == 0 || is_hopper(tile) {
        return Ok(single);
    }
    let splits = match a.split_k {
        0 => match overrides().split_k {
            Some(s) => s as u64,
            None => auto_splits(a, tile, rows),
        },
        s => s as u64,
    };
    if splits <= 1 {
        return Ok(single);
    }
    let bytes = splits * rows * a.n as u64 * 4; // < 2^6 * 2^31 * 2^21 * 4: no overflow
    match usize::try_from(bytes) {
        Ok(bytes) => Ok(SplitPlan { tile, splits: splits as i32, bytes }),
        Err(_) => bail!(InvalidValue, "split_k = {splits} needs {bytes} bytes of workspace, beyond this platform"),
    }
}

/// The kernels a call of `cfg` over `layout` with inputs `T` and output `O` runs on the current device,
/// given at least [`GemmConfig::workspace_bytes`] of workspace: its resolved tile and K slices. Equal
/// answers launch the same kernels, so callers that must have every kernel loaded before a launch
/// that could wait on a spinning one (src/ep/low_dim.rs) warm up one call per distinct answer.
pub(crate) fn kernel_plan<T: GemmInput, O: Element>(cfg: &GemmConfig, layout: Layout) -> Result<(i32, i32)> {
    let plan = split_plan(&cfg.to_args(layout, T::DTYPE, O::DTYPE), true)?;
    Ok((plan.tile as i32, plan.splits))
}

/// See `moek_grouped_gemm_workspace_size` in the header. Does not ask the device: for AUTO it answers
/// as for the portable path, which covers a call that then runs the sm_90a kernel (no workspace).
pub(crate) fn workspace_bytes(a: &sys::moek_grouped_gemm_args) -> Result<usize> {
    split_plan(a, false).map(|plan| plan.bytes)
}

/// Validates a grouped GEMM's arguments in full, then enqueues it. Shared by the C entry point and
/// [`grouped_gemm`].
pub(crate) fn grouped_gemm_raw(a: &sys::moek_grouped_gemm_args, stream: sys::cudaStream_t) -> Result<()> {
    let rows = check_shape(a)? > 0;
    let plan = split_plan(a, true)?;
    let need = plan.bytes;
    let splits = if a.workspace_bytes >= need {
        plan.splits
    } else if a.split_k >= 2 {
        bail!(
            WorkspaceTooSmall,
            "workspace_bytes = {} is below the {need} bytes split_k = {} needs",
            a.workspace_bytes,
            a.split_k
        );
    } else {
        1
    };
    check::pointer("workspace", a.workspace, splits > 1, 16)?;
    let masked = a.layout == sys::moek_gemm_layout_MOEK_GEMM_MASKED;
    check::pointer("a", a.a, rows, 16)?;
    check::pointer("b", a.b, true, 16)?;
    check::pointer("expert_offsets", a.expert_offsets, !masked, 4)?;
    check::pointer("expert_counts", a.expert_counts, masked, 4)?;
    check::pointer("row_scale", a.row_scale, false, 4)?;
    check::pointer("out", a.out, rows, 16)?;
    let mut a = *a;
    a.tile = plan.tile; // the launcher takes a resolved tile, never AUTO
    crate::cuda::status(crate::cuda::grouped_gemm(&a, splits, stream))
}

/// Whether [`Tile::Hopper`] and [`Tile::Hopper64`] can run `num_experts` experts on the current CUDA
/// device (false without the CUDA kernels; the two have the same requirements). Shared by the C entry
/// point, AUTO's choice and [`hopper_available`].
pub(crate) fn hopper_available_raw(num_experts: i32) -> bool {
    (1..=sys::MOEK_GEMM_MAX_EXPERTS as i32).contains(&num_experts) && crate::cuda::gemm_hopper_available(num_experts)
}

/// Whether [`Tile::Hopper`] and [`Tile::Hopper64`] can run `num_experts` experts on `stream`'s device:
/// compute capability 9.0, a build with sm_90a code (`MOEK_CUDA_ARCHS` holds `90a`), enough shared
/// memory for the experts' tile table.
pub fn hopper_available(stream: &Arc<CudaStream>, num_experts: u32) -> Result<bool> {
    stream.context().bind_to_thread()?;
    Ok(hopper_available_raw(i32::try_from(num_experts).unwrap_or(i32::MAX)))
}

/// The device-side description of which rows each expert owns.
pub enum ExpertRows<'a> {
    /// [E + 1] offsets (from [`crate::permute::plan`], for instance); A and the output have `max_rows`
    /// rows.
    Contiguous { offsets: CudaView<'a, i32>, max_rows: usize },
    /// `[E]` counts; A is `[E, capacity, K]` and the output `[E, capacity, output columns]`.
    Masked { counts: CudaView<'a, i32>, capacity: usize },
}

impl ExpertRows<'_> {
    /// The sizes of this description.
    pub fn layout(&self) -> Layout {
        match self {
            ExpertRows::Contiguous { max_rows, .. } => Layout::Contiguous { max_rows: *max_rows },
            ExpertRows::Masked { capacity, .. } => Layout::Masked { capacity: *capacity },
        }
    }
}

/// Enqueues `out[r] = epilogue(a[r] · b[e]^T) · row_scale[r]` for the rows r each expert e owns, on
/// `stream`: no allocation, no host synchronisation. `a` is [rows, K], `b` [E, N, K], `out` [rows,
/// output columns] with rows = `max_rows` or E · capacity; the output is T or f32. Rows no expert owns
/// are left untouched. `workspace` (at least [`GemmConfig::workspace_bytes`] bytes, or `None`) lets it
/// split K when the output tiles are few (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm<T: GemmInput, O: Element>(
    stream: &Arc<CudaStream>,
    cfg: &GemmConfig,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    experts: &ExpertRows<'_>,
    row_scale: Option<&CudaView<'_, f32>>,
    out: &mut CudaViewMut<'_, O>,
    workspace: Option<&mut CudaViewMut<'_, u8>>,
) -> Result<()> {
    let mut args = cfg.to_args(experts.layout(), T::DTYPE, O::DTYPE);
    let rows = check_shape(&args)? as usize;
    let (e, n, k) = (cfg.num_experts as usize, cfg.n, cfg.k);
    check::length("a", a.len(), rows * k)?;
    check::length("b", b.len(), e * n * k)?;
    match experts {
        ExpertRows::Contiguous { offsets, .. } => check::length("expert_offsets", offsets.len(), e + 1)?,
        ExpertRows::Masked { counts, .. } => check::length("expert_counts", counts.len(), e)?,
    }
    if let Some(s) = row_scale {
        check::length("row_scale", s.len(), rows)?;
    }
    check::length("out", out.len(), rows * cfg.output_columns())?;
    stream.context().bind_to_thread()?;
    let (a_ptr, _g0) = a.device_ptr(stream);
    let (b_ptr, _g1) = b.device_ptr(stream);
    let (rows_ptr, _g2) = match experts {
        ExpertRows::Contiguous { offsets, .. } => offsets.device_ptr(stream),
        ExpertRows::Masked { counts, .. } => counts.device_ptr(stream),
    };
    let scale = row_scale.map(|s| s.device_ptr(stream));
    let (out_ptr, _g3) = out.device_ptr_mut(stream);
    let workspace_len = workspace.as_ref().map_or(0, |w| w.len());
    let ws = workspace.map(|w| w.device_ptr_mut(stream));
    args.a = a_ptr as *const _;
    args.b = b_ptr as *const _;
    match experts {
        ExpertRows::Contiguous { .. } => args.expert_offsets = rows_ptr as *const i32,
        ExpertRows::Masked { .. } => args.expert_counts = rows_ptr as *const i32,
    }
    args.row_scale = scale.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const f32);
    args.out = out_ptr as *mut _;
    if let Some((p, _)) = &ws {
        args.workspace = *p as *mut _;
        args.workspace_bytes = workspace_len;
    }
    grouped_gemm_raw(&args, stream.cu_stream() as sys::cudaStream_t)
}
