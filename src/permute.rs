//! Permutation: the plan (expert-grouped rows for every (token, slot) pair, computed on the device),
//! permute (gather token rows into that layout) and combine (the weighted, fixed-order sum back per
//! token). Semantics: `moek_plan`, `moek_permute`, `moek_combine` in `include/moe_kernels.h`;
//! [`crate::reference::permute`] is the CPU oracle.

use crate::check;
use crate::dtype::{self, Element};
use crate::error::{bail, Result};
use crate::sys;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// Fewest pairs per chunk of the plan (cuda/plan.cu): a plan of up to this many pairs is one launch.
/// `MOEK_PLAN_CHUNK_PAIRS` overrides it (a tuning knob for benchmarks, read once).
const PLAN_MIN_CHUNK_PAIRS: i64 = 1024;

/// Chunks of the plan's counting sort for `pairs` pairs over `num_experts` experts. Every block of the
/// placement pass reads all chunks' histograms, so the count is capped (at 128, and at 32768 histogram
/// entries in all); larger inputs get longer chunks instead.
fn plan_chunks(pairs: i64, num_experts: i32) -> i64 {
    static MIN_PAIRS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let min_pairs = *MIN_PAIRS.get_or_init(|| {
        std::env::var("MOEK_PLAN_CHUNK_PAIRS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&v| v > 0)
            .unwrap_or(PLAN_MIN_CHUNK_PAIRS)
    });
    let max_chunks = (32768 / i64::from(num_experts.max(1))).clamp(1, 128);
    ((pairs + min_pairs - 1) / min_pairs).clamp(1, max_chunks)
}

/// Which kernels compute a plan (cuda/plan.cu). [`plan`] chooses by itself (see [`plan_path`]); tests
/// and benchmarks force one through [`plan_with_path`] to compare them.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanPath {
    /// One launch, one block per chunk, every block counting every pair itself; no workspace.
    Fused,
    /// A count kernel writing per-chunk histograms to the workspace, then the place kernel (one launch
    /// when there is one chunk).
    Chunked,
    /// One launch of one thread-block cluster (sm_90 and later), a block per chunk, at most
    /// [`PLAN_CLUSTER_MAX_BLOCKS`] chunks: the chunk histograms are exchanged through distributed shared
    /// memory instead of the workspace. Where a cluster cannot run (an older GPU, one chunk) the same
    /// chunks take the chunked path.
    Cluster,
}

/// Most blocks (chunks) of the cluster path: the largest cluster sm_90 allows (non-portable above 8).
/// `MOEK_PLAN_CLUSTER_BLOCKS` (2..=16, read once) lowers it for sweeps.
pub const PLAN_CLUSTER_MAX_BLOCKS: i64 = 16;

/// Most pairs the cluster path takes when `MOEK_PLAN_PATH=cluster` turns it on (off by default: not
/// yet measured): T = 4096 at k = 8, 16 chunks of 2048 pairs. `MOEK_PLAN_CLUSTER_MAX_PAIRS` (read
/// once) overrides it.
const PLAN_CLUSTER_MAX_PAIRS: i64 = 32768;

/// Chunks of the cluster path for `pairs` pairs over `num_experts` experts: those of the chunked path
/// ([`plan_chunks`], so the workspace its fallback needs is there), at most the cluster's blocks.
fn plan_cluster_chunks(pairs: i64, num_experts: i32) -> i64 {
    static BLOCKS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let blocks = *BLOCKS.get_or_init(|| {
        std::env::var("MOEK_PLAN_CLUSTER_BLOCKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|v| (2..=PLAN_CLUSTER_MAX_BLOCKS).contains(v))
            .unwrap_or(PLAN_CLUSTER_MAX_BLOCKS)
    });
    plan_chunks(pairs, num_experts).min(blocks)
}

/// Most pairs the fused plan takes by default: none. It reads every id in every block, and on the H200
/// (2026-11-28) it lost wherever it was measured: the E = 256, k = 8, T = 4096 plan took 10.6 us fused
/// and 8.1 us chunked, and the whole layer at T = 64 was 0.3-3.3 us slower with it. It stays for
/// sweeps: `MOEK_PLAN_FUSED_MAX_PAIRS` (read once) or `MOEK_PLAN_FUSED=1` turn it on.
const PLAN_FUSED_MAX_PAIRS: i64 = -1;
/// Most experts the fused plan takes by default: up to here its shared memory (E x (warps + 3) counters)
/// fits 32 warps.
const PLAN_FUSED_MAX_EXPERTS: i32 = 1024;

/// Pair limits of the automatic path choice (-1: the path is off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PlanLimits {
    /// Most pairs the fused path takes.
    pub fused: i64,
    /// Most pairs the cluster path takes.
    pub cluster: i64,
}

/// The defaults: both one-launch paths off.
const PLAN_LIMITS: PlanLimits = PlanLimits { fused: PLAN_FUSED_MAX_PAIRS, cluster: -1 };

/// The path of a plan of `pairs` pairs over `num_experts` experts: cluster up to `limits.cluster`
/// pairs, else fused up to `limits.fused` pairs and [`PLAN_FUSED_MAX_EXPERTS`] experts, chunked beyond;
/// `forced` (`MOEK_PLAN_FUSED=1` or `0`, or a caller's choice) wins.
pub(crate) fn plan_path(pairs: i64, num_experts: i32, limits: PlanLimits, forced: Option<PlanPath>) -> PlanPath {
    match forced {
        Some(path) => path,
        None if pairs <= limits.cluster => PlanPath::Cluster,
        None if pairs <= limits.fused && num_experts <= PLAN_FUSED_MAX_EXPERTS => PlanPath::Fused,
        None => PlanPath::Chunked,
    }
}

/// The environment's plan settings, read once: the paths' pair limits and a forced path.
/// `MOEK_PLAN_PATH=cluster` turns the cluster path on up to `MOEK_PLAN_CLUSTER_MAX_PAIRS` (default
/// [`PLAN_CLUSTER_MAX_PAIRS`]).
fn plan_overrides() -> (PlanLimits, Option<PlanPath>) {
    static OVERRIDES: std::sync::OnceLock<(PlanLimits, Option<PlanPath>)> = std::sync::OnceLock::new();
    *OVERRIDES.get_or_init(|| {
        let limit = |name: &str, fallback: i64| {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&v: &i64| v >= 0).unwrap_or(fallback)
        };
        let fused = limit("MOEK_PLAN_FUSED_MAX_PAIRS", PLAN_LIMITS.fused);
        let cluster = match std::env::var("MOEK_PLAN_PATH").ok().as_deref() {
            Some("cluster") => limit("MOEK_PLAN_CLUSTER_MAX_PAIRS", PLAN_CLUSTER_MAX_PAIRS),
            _ => PLAN_LIMITS.cluster,
        };
        let forced = match std::env::var("MOEK_PLAN_FUSED").ok().as_deref() {
            Some("1") => Some(PlanPath::Fused),
            Some("0") => Some(PlanPath::Chunked),
            _ => None,
        };
        (PlanLimits { fused, cluster }, forced)
    })
}

/// What defines a plan, apart from the number of tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// E, 1..=8192.
    pub num_experts: u32,
    /// Slots per token, 1..=64.
    pub k: u32,
    /// Pairs kept per expert, lowest pair index first (0: no limit).
    pub capacity: u32,
    /// Every expert's block of rows starts at a multiple of this (1: packed).
    pub row_align: u32,
    /// GPUs the experts are spread over, E / ranks contiguous experts each (0 or 1: one GPU).
    pub num_ranks: u32,
}

impl PlanConfig {
    /// A packed plan for one GPU, no capacity.
    pub fn new(num_experts: u32, k: u32) -> Self {
        PlanConfig { num_experts, k, capacity: 0, row_align: 1, num_ranks: 0 }
    }

    /// The C argument struct for this configuration, with every pointer NULL.
    pub fn to_args(&self, num_tokens: usize) -> sys::moek_plan_args {
        let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        sys::moek_plan_args {
            num_tokens: i64::try_from(num_tokens).unwrap_or(i64::MAX),
            k: clamp(self.k),
            num_experts: clamp(self.num_experts),
            capacity: clamp(self.capacity),
            row_align: clamp(self.row_align),
            num_ranks: clamp(self.num_ranks),
            topk_ids: std::ptr::null(),
            expert_counts: std::ptr::null_mut(),
            expert_offsets: std::ptr::null_mut(),
            row_source: std::ptr::null_mut(),
            pair_row: std::ptr::null_mut(),
            rank_counts: std::ptr::null_mut(),
            rank_offsets: std::ptr::null_mut(),
            error_count: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
        }
    }

    /// Checks the configuration for `num_tokens` tokens, naming the bad field.
    pub fn validate(&self, num_tokens: usize) -> Result<()> {
        plan_max_rows(&self.to_args(num_tokens)).map(|_| ())
    }

    /// Rows the layout can need: size `row_source` and permuted buffers with it.
    pub fn max_rows(&self, num_tokens: usize) -> Result<usize> {
        plan_max_rows(&self.to_args(num_tokens)).map(|r| r as usize)
    }

    /// Device workspace bytes [`plan`] needs.
    pub fn workspace_bytes(&self, num_tokens: usize) -> Result<usize> {
        plan_workspace_bytes(&self.to_args(num_tokens))
    }

    /// Ranks the plan reports on (0 when it is for one GPU).
    fn ranks(&self) -> usize {
        if self.num_ranks > 1 {
            self.num_ranks as usize
        } else {
            0
        }
    }
}

/// Checks the shape fields of a plan and returns its maximum number of rows.
pub(crate) fn plan_max_rows(a: &sys::moek_plan_args) -> Result<i64> {
    if a.num_tokens < 0 || a.num_tokens > i64::from(i32::MAX) {
        bail!(InvalidNumTokens, "num_tokens = {} is outside 0..=2^31-1", a.num_tokens);
    }
    let e = a.num_experts;
    if e < 1 || e > sys::MOEK_PLAN_MAX_EXPERTS as i32 {
        bail!(InvalidNumExperts, "num_experts = {e} is outside 1..={}", sys::MOEK_PLAN_MAX_EXPERTS);
    }
    if a.k < 1 || a.k > sys::MOEK_PLAN_MAX_K as i32 {
        bail!(InvalidK, "k = {} is outside 1..={}", a.k, sys::MOEK_PLAN_MAX_K);
    }
    if a.capacity < 0 {
        bail!(InvalidCapacity, "capacity = {} is negative", a.capacity);
    }
    if a.row_align < 1 {
        bail!(InvalidValue, "row_align = {} must be at least 1", a.row_align);
    }
    if a.num_ranks < 0 || (a.num_ranks > 1 && e % a.num_ranks != 0) {
        bail!(InvalidValue, "num_ranks = {} must be 0, 1 or divide num_experts = {e}", a.num_ranks);
    }
    let pairs = a.num_tokens * i64::from(a.k);
    if pairs > i64::from(i32::MAX) {
        bail!(InvalidNumTokens, "num_tokens * k = {pairs} pairs; pair indices are 32-bit");
    }
    let kept = if a.capacity > 0 { pairs.min(i64::from(e) * i64::from(a.capacity)) } else { pairs };
    let rows = kept + i64::from(e) * i64::from(a.row_align - 1);
    if rows > i64::from(i32::MAX) {
        bail!(InvalidNumTokens, "the layout would need {rows} rows; row indices are 32-bit");
    }
    Ok(rows)
}

/// Workspace bytes of a plan: a histogram of E counters per chunk, then one error counter per chunk.
pub(crate) fn plan_workspace_bytes(a: &sys::moek_plan_args) -> Result<usize> {
    plan_max_rows(a)?;
    let chunks = plan_chunks(a.num_tokens * i64::from(a.k), a.num_experts);
    Ok((chunks * (i64::from(a.num_experts) + 1) * 4) as usize)
}

/// Validates a plan's arguments in full, then enqueues it. Shared by the C entry point and [`plan`].
pub(crate) fn plan_raw(a: &sys::moek_plan_args, stream: sys::cudaStream_t) -> Result<()> {
    plan_raw_on(a, None, stream)
}

/// [`plan_raw`] on the given path (`None`: the automatic choice).
fn plan_raw_on(a: &sys::moek_plan_args, path: Option<PlanPath>, stream: sys::cudaStream_t) -> Result<()> {
    plan_max_rows(a)?;
    let tokens = a.num_tokens > 0;
    let ranks = a.num_ranks > 1;
    check::pointer("topk_ids", a.topk_ids, tokens, 4)?;
    check::pointer("expert_counts", a.expert_counts, true, 4)?;
    check::pointer("expert_offsets", a.expert_offsets, true, 4)?;
    check::pointer("row_source", a.row_source, tokens, 4)?;
    check::pointer("pair_row", a.pair_row, tokens, 4)?;
    check::pointer("rank_counts", a.rank_counts, ranks, 4)?;
    check::pointer("rank_offsets", a.rank_offsets, ranks, 4)?;
    check::pointer("error_count", a.error_count, true, 4)?;
    let need = plan_workspace_bytes(a)?;
    if a.workspace_bytes < need {
        bail!(WorkspaceTooSmall, "workspace_bytes = {} but this call needs {need}", a.workspace_bytes);
    }
    check::pointer("workspace", a.workspace, true, 4)?;
    let pairs = a.num_tokens * i64::from(a.k);
    let (limits, forced) = plan_overrides();
    let path = plan_path(pairs, a.num_experts, limits, path.or(forced));
    let chunks = match path {
        PlanPath::Cluster => plan_cluster_chunks(pairs, a.num_experts),
        PlanPath::Fused | PlanPath::Chunked => plan_chunks(pairs, a.num_experts),
    };
    crate::cuda::status(crate::cuda::plan(a, chunks, path, stream))
}

/// Warps per SM the row split of permute and combine aims at by default (see [`row_split`]).
/// `MOEK_PERMUTE_WARPS_PER_SM` overrides it (a tuning knob for benchmarks, read once).
const ROW_WARPS_PER_SM: i64 = 8;
/// SMs assumed when the device cannot be asked (an H100/H200's count).
const DEFAULT_SM_COUNT: i64 = 132;

/// How permute and combine cut each token's row over warps (cuda/permute.cu): `slices` warps per token,
/// each `width` 16-byte vectors wide (the last one narrower).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowSplit {
    pub slices: i64,
    pub width: i64,
}

/// The row split for `num_tokens` rows of `vectors` 16-byte vectors: enough slices that about
/// `target_warps` warps run (one warp per token leaves the GPU latency-bound at small T: at T = 64 only
/// 64 warps walk whole rows), each slice a multiple of 32 vectors (one per lane) so that no lane idles
/// and the access pattern stays that of whole rows. From `target_warps` tokens on, one slice per token.
pub(crate) fn row_split(num_tokens: i64, vectors: i64, target_warps: i64) -> RowSplit {
    let vectors = vectors.max(1);
    let wanted = if num_tokens > 0 { (target_warps.max(1) + num_tokens - 1) / num_tokens } else { 1 };
    let slices = wanted.clamp(1, (vectors + 31) / 32);
    let width = ((vectors + slices - 1) / slices + 31) / 32 * 32;
    RowSplit { slices: (vectors + width - 1) / width, width }
}

/// The row split of a permute or combine call on the current device.
fn device_row_split(dtype: sys::moek_dtype, num_tokens: i64, hidden: i64) -> RowSplit {
    static WARPS_PER_SM: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let per_sm = *WARPS_PER_SM.get_or_init(|| {
        std::env::var("MOEK_PERMUTE_WARPS_PER_SM")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&v| v > 0)
            .unwrap_or(ROW_WARPS_PER_SM)
    });
    let sms = crate::cuda::sm_count().map_or(DEFAULT_SM_COUNT, i64::from);
    let element = dtype::size_of(dtype).unwrap_or(2) as i64;
    row_split(num_tokens, hidden * element / 16, per_sm * sms)
}

/// Checks the shape shared by permute and combine.
fn check_rows(dtype: sys::moek_dtype, num_tokens: i64, k: i32, hidden: i64, max_rows: i64) -> Result<()> {
    if dtype::size_of(dtype).is_none() {
        bail!(InvalidDtype, "dtype = {dtype} is not a moek_dtype");
    }
    if !(0..=i64::from(i32::MAX)).contains(&num_tokens) {
        bail!(InvalidNumTokens, "num_tokens = {num_tokens} is outside 0..=2^31-1");
    }
    if k < 1 || k > sys::MOEK_PLAN_MAX_K as i32 {
        bail!(InvalidK, "k = {k} is outside 1..={}", sys::MOEK_PLAN_MAX_K);
    }
    if hidden < 8 || hidden % 8 != 0 {
        bail!(InvalidValue, "hidden = {hidden} must be a positive multiple of 8");
    }
    if !(0..=i64::from(i32::MAX)).contains(&max_rows) {
        bail!(InvalidValue, "max_rows = {max_rows} is outside 0..=2^31-1");
    }
    Ok(())
}

/// Validates permute's arguments, then enqueues it.
pub(crate) fn permute_raw(a: &sys::moek_permute_args, stream: sys::cudaStream_t) -> Result<()> {
    check_rows(a.dtype, a.num_tokens, a.k, a.hidden, a.max_rows)?;
    if a.num_experts < 1 || a.num_experts > sys::MOEK_PLAN_MAX_EXPERTS as i32 {
        bail!(InvalidNumExperts, "num_experts = {} is outside 1..={}", a.num_experts, sys::MOEK_PLAN_MAX_EXPERTS);
    }
    let rows = a.max_rows > 0;
    check::pointer("x", a.x, rows && a.num_tokens > 0, 16)?;
    check::pointer("row_source", a.row_source, rows, 4)?;
    check::pointer("pair_row", a.pair_row, a.num_tokens > 0, 4)?;
    check::pointer("expert_offsets", a.expert_offsets, true, 4)?;
    check::pointer("pair_scale", a.pair_scale, false, 4)?;
    check::pointer("out", a.out, rows, 16)?;
    let split = device_row_split(a.dtype, a.num_tokens, a.hidden);
    crate::cuda::status(crate::cuda::permute(a, split.slices, split.width, stream))
}

/// Validates combine's arguments, then enqueues it.
pub(crate) fn combine_raw(a: &sys::moek_combine_args, stream: sys::cudaStream_t) -> Result<()> {
    check_rows(a.dtype, a.num_tokens, a.k, a.hidden, a.max_rows)?;
    let tokens = a.num_tokens > 0;
    check::pointer("y", a.y, tokens && a.max_rows > 0, 16)?;
    check::pointer("pair_row", a.pair_row, tokens, 4)?;
    check::pointer("weights", a.weights, false, 4)?;
    check::pointer("residual", a.residual, false, 16)?;
    check::pointer("out", a.out, tokens, 16)?;
    let split = device_row_split(a.dtype, a.num_tokens, a.hidden);
    crate::cuda::status(crate::cuda::combine(a, split.slices, split.width, stream))
}

/// Device buffers a plan writes. Sizes: E, E + 1, max_rows, T * k, R, R + 1, 1, and
/// [`PlanConfig::workspace_bytes`].
pub struct PlanOutput<'a> {
    pub expert_counts: CudaViewMut<'a, i32>,
    pub expert_offsets: CudaViewMut<'a, i32>,
    pub row_source: CudaViewMut<'a, i32>,
    pub pair_row: CudaViewMut<'a, i32>,
    /// Required when the plan has more than one rank.
    pub rank_counts: Option<CudaViewMut<'a, i32>>,
    /// Required when the plan has more than one rank.
    pub rank_offsets: Option<CudaViewMut<'a, i32>>,
    pub error_count: CudaViewMut<'a, i32>,
    pub workspace: CudaViewMut<'a, u8>,
}

/// Plans `num_tokens` tokens of `topk_ids` ([T, k]) on `stream`: no allocation, no host synchronisation.
pub fn plan(
    stream: &Arc<CudaStream>,
    cfg: &PlanConfig,
    num_tokens: usize,
    topk_ids: &CudaView<'_, i32>,
    out: &mut PlanOutput<'_>,
) -> Result<()> {
    plan_with_path(stream, cfg, num_tokens, topk_ids, out, None)
}

/// [`plan`] on a forced path (`None`: the automatic choice, as [`plan`]), for tests and benchmarks.
/// The outputs are the same on either path.
#[doc(hidden)]
pub fn plan_with_path(
    stream: &Arc<CudaStream>,
    cfg: &PlanConfig,
    num_tokens: usize,
    topk_ids: &CudaView<'_, i32>,
    out: &mut PlanOutput<'_>,
    path: Option<PlanPath>,
) -> Result<()> {
    let mut a = cfg.to_args(num_tokens);
    let max_rows = plan_max_rows(&a)? as usize;
    let (e, pairs, ranks) = (cfg.num_experts as usize, num_tokens * cfg.k as usize, cfg.ranks());
    check::length("topk_ids", topk_ids.len(), pairs)?;
    check::length("expert_counts", out.expert_counts.len(), e)?;
    check::length("expert_offsets", out.expert_offsets.len(), e + 1)?;
    check::length("row_source", out.row_source.len(), max_rows)?;
    check::length("pair_row", out.pair_row.len(), pairs)?;
    if ranks > 0 {
        check::length("rank_counts", out.rank_counts.as_ref().map_or(0, |v| v.len()), ranks)?;
        check::length("rank_offsets", out.rank_offsets.as_ref().map_or(0, |v| v.len()), ranks + 1)?;
    }
    check::length("error_count", out.error_count.len(), 1)?;
    stream.context().bind_to_thread()?;
    let (ids, _g0) = topk_ids.device_ptr(stream);
    let (counts, _g1) = out.expert_counts.device_ptr_mut(stream);
    let (offsets, _g2) = out.expert_offsets.device_ptr_mut(stream);
    let (row_source, _g3) = out.row_source.device_ptr_mut(stream);
    let (pair_row, _g4) = out.pair_row.device_ptr_mut(stream);
    let rank_counts = out.rank_counts.as_mut().map(|v| v.device_ptr_mut(stream));
    let rank_offsets = out.rank_offsets.as_mut().map(|v| v.device_ptr_mut(stream));
    let (errors, _g5) = out.error_count.device_ptr_mut(stream);
    let ws_len = out.workspace.len();
    let (ws, _g6) = out.workspace.device_ptr_mut(stream);
    a.topk_ids = ids as *const i32;
    a.expert_counts = counts as *mut i32;
    a.expert_offsets = offsets as *mut i32;
    a.row_source = row_source as *mut i32;
    a.pair_row = pair_row as *mut i32;
    a.rank_counts = rank_counts.as_ref().map_or(std::ptr::null_mut(), |(p, _)| *p as *mut i32);
    a.rank_offsets = rank_offsets.as_ref().map_or(std::ptr::null_mut(), |(p, _)| *p as *mut i32);
    a.error_count = errors as *mut i32;
    a.workspace = ws as *mut _;
    a.workspace_bytes = ws_len;
    plan_raw_on(&a, path, stream.cu_stream() as sys::cudaStream_t)
}

/// The plan's device outputs permute and combine read.
pub struct PlanView<'a> {
    pub expert_offsets: CudaView<'a, i32>,
    pub row_source: CudaView<'a, i32>,
    pub pair_row: CudaView<'a, i32>,
}

/// Gathers the rows of `x` ([T, H]) into the plan's layout in `out` ([max_rows, H]); rows of pairs are
/// multiplied by `pair_scale[pair]` when given, padding rows zeroed when `zero_padding`.
#[allow(clippy::too_many_arguments)]
pub fn permute<T: Element>(
    stream: &Arc<CudaStream>,
    cfg: &PlanConfig,
    num_tokens: usize,
    hidden: usize,
    x: &CudaView<'_, T>,
    plan: &PlanView<'_>,
    pair_scale: Option<&CudaView<'_, f32>>,
    zero_padding: bool,
    out: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let max_rows = cfg.max_rows(num_tokens)?;
    let pairs = num_tokens * cfg.k as usize;
    check::length("x", x.len(), num_tokens * hidden)?;
    check::length("expert_offsets", plan.expert_offsets.len(), cfg.num_experts as usize + 1)?;
    check::length("row_source", plan.row_source.len(), max_rows)?;
    check::length("pair_row", plan.pair_row.len(), pairs)?;
    if let Some(s) = pair_scale {
        check::length("pair_scale", s.len(), pairs)?;
    }
    check::length("out", out.len(), max_rows * hidden)?;
    stream.context().bind_to_thread()?;
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (rs, _g1) = plan.row_source.device_ptr(stream);
    let (offs, _g2) = plan.expert_offsets.device_ptr(stream);
    let (pr, _g4) = plan.pair_row.device_ptr(stream);
    let scale = pair_scale.map(|s| s.device_ptr(stream));
    let (out_ptr, _g3) = out.device_ptr_mut(stream);
    let a = sys::moek_permute_args {
        dtype: T::DTYPE,
        num_tokens: num_tokens as i64,
        k: cfg.k as i32,
        num_experts: cfg.num_experts as i32,
        hidden: hidden as i64,
        max_rows: max_rows as i64,
        x: x_ptr as *const _,
        row_source: rs as *const i32,
        pair_row: pr as *const i32,
        expert_offsets: offs as *const i32,
        pair_scale: scale.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const f32),
        zero_padding: zero_padding as i32,
        out: out_ptr as *mut _,
    };
    permute_raw(&a, stream.cu_stream() as sys::cudaStream_t)
}

/// `out[t] = residual[t] + sum over slots of weights[t, s] * y[pair_row[t, s]]` (fp32, fixed order).
#[allow(clippy::too_many_arguments)]
pub fn combine<T: Element>(
    stream: &Arc<CudaStream>,
    cfg: &PlanConfig,
    num_tokens: usize,
    hidden: usize,
    y: &CudaView<'_, T>,
    pair_row: &CudaView<'_, i32>,
    weights: Option<&CudaView<'_, f32>>,
    residual: Option<&CudaView<'_, T>>,
    out: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let max_rows = cfg.max_rows(num_tokens)?;
    let pairs = num_tokens * cfg.k as usize;
    check::length("y", y.len(), max_rows * hidden)?;
    check::length("pair_row", pair_row.len(), pairs)?;
    if let Some(w) = weights {
        check::length("weights", w.len(), pairs)?;
    }
    if let Some(r) = residual {
        check::length("residual", r.len(), num_tokens * hidden)?;
    }
    check::length("out", out.len(), num_tokens * hidden)?;
    stream.context().bind_to_thread()?;
    let (y_ptr, _g0) = y.device_ptr(stream);
    let (pr, _g1) = pair_row.device_ptr(stream);
    let w = weights.map(|w| w.device_ptr(stream));
    let r = residual.map(|r| r.device_ptr(stream));
    let (out_ptr, _g2) = out.device_ptr_mut(stream);
    let a = sys::moek_combine_args {
        dtype: T::DTYPE,
        num_tokens: num_tokens as i64,
        k: cfg.k as i32,
        hidden: hidden as i64,
        max_rows: max_rows as i64,
        y: y_ptr as *const _,
        pair_row: pr as *const i32,
        weights: w.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const f32),
        residual: r.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const _),
        out: out_ptr as *mut _,
    };
    combine_raw(&a, stream.cu_stream() as sys::cudaStream_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_split_covers_each_row_in_lane_multiples() {
        for t in [0i64, 1, 2, 7, 64, 500, 1055, 1056, 16384, i64::from(i32::MAX)] {
            for vectors in [1i64, 2, 31, 32, 33, 360, 720, 896, 1792, 100_000] {
                for target in [1i64, 528, 1056, 8448] {
                    let s = row_split(t, vectors, target);
                    let case = format!("T={t} vectors={vectors} target={target}: {s:?}");
                    assert!(s.slices >= 1 && s.width >= 32 && s.width % 32 == 0, "{case}");
                    assert!(s.slices * s.width >= vectors, "{case}: the row is not covered");
                    assert!((s.slices - 1) * s.width < vectors, "{case}: an empty slice");
                    // Never more warps than asked for (rounding only lowers the count).
                    assert!(t == 0 || s.slices <= (target + t - 1) / t, "{case}");
                    if t >= target || t == 0 {
                        assert_eq!(s.slices, 1, "{case}: large T keeps one warp per token");
                    }
                }
            }
        }
    }

    #[test]
    fn row_split_at_the_measured_decode_shapes() {
        // H200 (132 SMs) at the default 8 warps per SM; bf16 rows (8 elements a vector).
        let target = 8 * 132;
        // DeepSeek-V3 slice, T = 64, H = 7168: 14 warps of 64 vectors per token instead of one of 896.
        assert_eq!(row_split(64, 7168 / 8, target), RowSplit { slices: 14, width: 64 });
        // One token: every 32 vectors a warp.
        assert_eq!(row_split(1, 7168 / 8, target), RowSplit { slices: 28, width: 32 });
        // Qwen3-30B-A3B (H = 2048) and Mixtral (H = 4096), T = 64: as thin as a lane each.
        assert_eq!(row_split(64, 2048 / 8, target), RowSplit { slices: 8, width: 32 });
        assert_eq!(row_split(64, 4096 / 8, target), RowSplit { slices: 16, width: 32 });
        // gpt-oss's H = 2880 (360 vectors): the last slice is narrower (8 vectors).
        assert_eq!(row_split(7, 2880 / 8, target), RowSplit { slices: 12, width: 32 });
        // Prefill: one warp per token, the whole row (as before the split existed).
        assert_eq!(row_split(16384, 7168 / 8, target), RowSplit { slices: 1, width: 896 });
    }

    #[test]
    fn plan_path_is_chunked_by_default_and_fused_below_a_set_limit() {
        // Off by default (measured slower), even for an empty plan.
        let default = |pairs, e| plan_path(pairs, e, PLAN_LIMITS, None);
        assert_eq!(default(0, 1), PlanPath::Chunked);
        assert_eq!(default(4096 * 8, 256), PlanPath::Chunked);
        // With a limit (MOEK_PLAN_FUSED_MAX_PAIRS): fused up to it and the expert cap.
        let auto = |pairs, e| plan_path(pairs, e, PlanLimits { fused: 32768, cluster: -1 }, None);
        assert_eq!(auto(4096 * 8, 256), PlanPath::Fused);
        assert_eq!(auto(4096 * 8 + 1, 256), PlanPath::Chunked);
        assert_eq!(auto(0, 1), PlanPath::Fused);
        assert_eq!(auto(100, PLAN_FUSED_MAX_EXPERTS), PlanPath::Fused);
        assert_eq!(auto(100, PLAN_FUSED_MAX_EXPERTS + 1), PlanPath::Chunked);
        // A limit of 0 leaves only empty plans fused; a forced path wins over everything.
        assert_eq!(plan_path(1, 8, PlanLimits { fused: 0, cluster: -1 }, None), PlanPath::Chunked);
        for (pairs, e) in [(0, 1), (1 << 30, 8192), (1000, 8)] {
            for path in [PlanPath::Fused, PlanPath::Chunked, PlanPath::Cluster] {
                assert_eq!(plan_path(pairs, e, PLAN_LIMITS, Some(path)), path);
            }
        }
    }

    #[test]
    fn plan_path_is_cluster_up_to_its_limit_when_turned_on() {
        // MOEK_PLAN_PATH=cluster: the cluster limit goes first, then the fused one, then chunked.
        let on = PlanLimits { fused: -1, cluster: PLAN_CLUSTER_MAX_PAIRS };
        assert_eq!(plan_path(4096 * 8, 256, on, None), PlanPath::Cluster);
        assert_eq!(plan_path(4096 * 8 + 1, 256, on, None), PlanPath::Chunked);
        assert_eq!(plan_path(100, 8192, on, None), PlanPath::Cluster);
        let both = PlanLimits { fused: 1 << 20, cluster: 1000 };
        assert_eq!(plan_path(1000, 256, both, None), PlanPath::Cluster);
        assert_eq!(plan_path(1001, 256, both, None), PlanPath::Fused);
    }

    #[test]
    fn cluster_chunks_fit_one_cluster_and_the_chunked_workspace() {
        for pairs in [0i64, 1, 1024, 1025, 4096 * 8, 32768 * 8, 1 << 30] {
            for e in [1i32, 8, 256, 1024, 8192] {
                let c = plan_cluster_chunks(pairs, e);
                assert!((1..=PLAN_CLUSTER_MAX_BLOCKS).contains(&c), "pairs={pairs} E={e}: {c}");
                assert!(c <= plan_chunks(pairs, e), "pairs={pairs} E={e}: {c}");
            }
        }
        // T = 4096, k = 8, E = 256: one cluster of 16 blocks of 2048 pairs (unless the knob lowers it).
        if std::env::var_os("MOEK_PLAN_CLUSTER_BLOCKS").is_none() && std::env::var_os("MOEK_PLAN_CHUNK_PAIRS").is_none()
        {
            assert_eq!(plan_cluster_chunks(4096 * 8, 256), 16);
        }
    }
}
