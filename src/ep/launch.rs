//! How a validated dispatch or combine becomes launches: the workspace carve, the kernels' argument
//! block (mirrored in cuda/ep.cu) and the order of the steps.

use super::{align_up, EpLayout, MAX_RANKS};
use crate::cuda::{self, CopyCut, EpStep};
use crate::error::Result;
use crate::{permute, sys};
use std::ffi::c_void;

/// The kernels' argument block; the same fields in the same order as `EpLaunch` in cuda/ep.cu.
#[repr(C)]
pub(crate) struct EpLaunch {
    peers: [*mut u8; MAX_RANKS],
    num_ranks: i32,
    rank: i32,
    num_experts: i32,
    k: i32,
    row_bytes: i64,
    counts_offset: i64,
    received_offset: i64,
    returned_offset: i64,
    expand_offset: i64,
    members_offset: i64,
    num_pairs: i64,
    capacity: i64,
    expert_counts: *const i32,
    expert_offsets: *const i32,
    row_source: *const i32,
    pair_row: *const i32,
    state: *mut u32,
    send_base: *mut i32,
    segment_start: *mut i32,
    segment_source_row: *mut i32,
    received_offsets: *mut i32,
    head_row: *mut i32,
    received_counts: *mut i32,
}

/// Byte offsets of the pieces of a rank's workspace (each 256-byte aligned).
pub(crate) struct Carve {
    /// u32 [4]: the call's sequence number and two block counters; must start zeroed.
    state: usize,
    expert_counts: usize,
    expert_offsets: usize,
    row_source: usize,
    pair_row: usize,
    error_count: usize,
    send_base: usize,
    segment_start: usize,
    segment_source_row: usize,
    /// i32 per pair: this rank's plan row of each head pair (the first of a token's slots on an
    /// owner, where that owner's sum returns), -1 for the others.
    head_row: usize,
    /// i32 per local expert: the rows it keeps (this rank as owner; the masked layout's counts).
    received_counts: usize,
    plan_workspace: usize,
    plan_workspace_bytes: usize,
    /// Bytes of the whole workspace.
    pub(crate) total: usize,
}

impl Carve {
    /// The carve for a configuration already checked by [`super::layout`] (up to the workspace).
    pub(crate) fn new(c: &sys::moek_ep_config) -> Result<Carve> {
        let e = c.num_experts as usize;
        let pairs = c.max_tokens as usize * c.k as usize;
        let plan_workspace_bytes = permute::plan_workspace_bytes(&plan_args(c, c.max_tokens))?;
        let mut at = 0;
        let mut take = |bytes: usize| {
            let start = at;
            at += align_up(bytes.max(1));
            start
        };
        let state = take(16);
        let expert_counts = take(e * 4);
        let expert_offsets = take((e + 1) * 4);
        let row_source = take(pairs * 4);
        let pair_row = take(pairs * 4);
        let error_count = take(4);
        let send_base = take(e * 4);
        let segment_start = take((e + 1) * 4);
        let segment_source_row = take(e * 4);
        let head_row = take(pairs * 4);
        let received_counts = take(e * 4);
        let plan_workspace = take(plan_workspace_bytes);
        Ok(Carve {
            state,
            expert_counts,
            expert_offsets,
            row_source,
            pair_row,
            error_count,
            send_base,
            segment_start,
            segment_source_row,
            head_row,
            received_counts,
            plan_workspace,
            plan_workspace_bytes,
            total: at,
        })
    }
}

/// The plan of this rank's pairs over all E experts, one row per kept pair (no padding), so that a
/// pair's row is also where its expert output returns to.
fn plan_args(c: &sys::moek_ep_config, num_tokens: i64) -> sys::moek_plan_args {
    let mut a = permute::PlanConfig::new(c.num_experts as u32, c.k as u32).to_args(num_tokens as usize);
    a.num_tokens = num_tokens;
    a
}

fn launch_block(a: &sys::moek_ep_group, lay: &EpLayout, peers: &[usize], carve: &Carve) -> EpLaunch {
    let c = &a.config;
    let ws = a.workspace as *mut u8;
    // SAFETY (of the adds below): every offset lies inside the workspace, checked to be at least the
    // carve's total.
    let at = |off: usize| unsafe { ws.add(off) };
    let mut table = [std::ptr::null_mut(); MAX_RANKS];
    for (slot, &p) in table.iter_mut().zip(peers) {
        *slot = p as *mut u8;
    }
    let elem = crate::dtype::size_of(c.dtype).expect("checked by layout");
    EpLaunch {
        peers: table,
        num_ranks: c.num_ranks,
        rank: c.rank,
        num_experts: c.num_experts,
        k: c.k,
        row_bytes: c.hidden * elem as i64,
        counts_offset: lay.counts_offset as i64,
        received_offset: lay.received_offset as i64,
        returned_offset: lay.returned_offset as i64,
        expand_offset: lay.expand_offset as i64,
        members_offset: lay.members_offset as i64,
        num_pairs: 0,
        capacity: c.capacity,
        expert_counts: at(carve.expert_counts) as *const i32,
        expert_offsets: at(carve.expert_offsets) as *const i32,
        row_source: at(carve.row_source) as *const i32,
        pair_row: at(carve.pair_row) as *const i32,
        state: at(carve.state) as *mut u32,
        send_base: at(carve.send_base) as *mut i32,
        segment_start: at(carve.segment_start) as *mut i32,
        segment_source_row: at(carve.segment_source_row) as *mut i32,
        received_offsets: std::ptr::null_mut(),
        head_row: at(carve.head_row) as *mut i32,
        received_counts: at(carve.received_counts) as *mut i32,
    }
}

/// The workspace carve and the kernels' argument block of a call of `group`.
fn prepare(group: &sys::moek_ep_group, lay: &EpLayout, peers: &[usize]) -> Result<(Carve, EpLaunch)> {
    let carve = Carve::new(&group.config)?;
    let block = launch_block(group, lay, peers, &carve);
    Ok((carve, block))
}

/// Blocks per SM of the copy steps by default; `MOEK_EP_BLOCKS_PER_SM` overrides it (a tuning knob for
/// benchmarks, read once).
const COPY_BLOCKS_PER_SM: usize = 4;

/// 16-byte vectors one warp loads in one round of a copy (32 lanes, 4 loads in flight each: kCopyUnroll
/// in cuda/ep.cu): no row is cut finer than this.
const VECTORS_PER_ROUND: usize = 128;

/// The grid of a copy step over about `rows` rows of `row_bytes` bytes (the count is known on the
/// device only; any count is covered, the hint only sizes the grid). Blocks of 8 warps, at most
/// [`COPY_BLOCKS_PER_SM`] per SM and at least one (the last block signals the peers even when nothing is
/// sent). When there are fewer rows than the grid's warps (decode), each row is cut over several warps,
/// down to one round of loads each: a 14 KB row is seven dependent rounds for one warp, and those
/// rounds, not the bytes, set the time at T = 128. `MOEK_EP_MAX_SLICES` caps the cut (1: a warp per
/// row; a knob for benchmarks, read once).
fn copy_cut(rows: usize, row_bytes: usize) -> CopyCut {
    static KNOBS: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    let (per_sm, max_slices) = *KNOBS.get_or_init(|| {
        let knob = |name: &str, range: std::ops::RangeInclusive<usize>, default: usize| {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|v| range.contains(v)).unwrap_or(default)
        };
        (knob("MOEK_EP_BLOCKS_PER_SM", 1..=32, COPY_BLOCKS_PER_SM), knob("MOEK_EP_MAX_SLICES", 1..=64, 64))
    });
    let sms = cuda::sm_count().unwrap_or(132) as usize;
    let grid_warps = per_sm * sms * 8;
    let vectors = (row_bytes / 16).max(1);
    let slices = grid_warps.div_ceil(rows.max(1)).min(vectors.div_ceil(VECTORS_PER_ROUND)).clamp(1, max_slices);
    CopyCut {
        blocks: (rows * slices).div_ceil(8).clamp(1, per_sm * sms) as i32,
        slices: slices as i64,
        width: vectors.div_ceil(slices) as i64,
    }
}

/// Plan, counts exchange, row stores (one per token and owner, with its member list), expansion at the
/// owner (arguments
/// validated by [`super::dispatch_raw`]).
pub(crate) fn dispatch(
    a: &sys::moek_ep_dispatch_args,
    lay: &EpLayout,
    peers: &[usize],
    stream: sys::cudaStream_t,
) -> Result<()> {
    let c = &a.group.config;
    let (carve, mut block) = prepare(&a.group, lay, peers)?;
    let ws = a.group.workspace as *mut u8;
    // SAFETY: offsets inside the workspace (its size was checked against the carve).
    let at = |off: usize| unsafe { ws.add(off) };
    let mut plan = plan_args(c, a.num_tokens);
    plan.topk_ids = a.topk_ids;
    plan.expert_counts = at(carve.expert_counts) as *mut i32;
    plan.expert_offsets = at(carve.expert_offsets) as *mut i32;
    plan.row_source = at(carve.row_source) as *mut i32;
    plan.pair_row = at(carve.pair_row) as *mut i32;
    plan.error_count = at(carve.error_count) as *mut i32;
    plan.workspace = at(carve.plan_workspace) as *mut c_void;
    plan.workspace_bytes = carve.plan_workspace_bytes;
    permute::plan_raw(&plan, stream)?;
    block.received_offsets = a.received_expert_offsets;
    let rows = a.num_tokens as usize * c.k as usize;
    block.num_pairs = rows as i64;
    cuda::status(cuda::ep_step(&block, EpStep::Counts { dtype: c.dtype }, stream))?;
    // Balanced routing receives about as many rows as it sends: the hint for the received rows' steps.
    let cut = copy_cut(rows, block.row_bytes as usize);
    let send = EpStep::Send { x: a.x, topk_ids: a.topk_ids, topk_weights: a.topk_weights, cut };
    cuda::status(cuda::ep_step(&block, send, stream))?;
    let expand = EpStep::Expand { cut };
    cuda::status(cuda::ep_step(&block, expand, stream))
}

/// Per-owner weighted sums returned to their sources, then each token's sum over its owners in slot order
/// of their head pairs (arguments validated by [`super::combine_raw`]).
pub(crate) fn combine(
    a: &sys::moek_ep_combine_args,
    lay: &EpLayout,
    peers: &[usize],
    stream: sys::cudaStream_t,
) -> Result<()> {
    let c = &a.group.config;
    let (carve, block) = prepare(&a.group, lay, peers)?;
    let pairs = a.num_tokens as usize * c.k as usize;
    let cut = copy_cut(pairs, block.row_bytes as usize);
    let back = EpStep::Return { dtype: c.dtype, expert_out: a.expert_out, cut };
    cuda::status(cuda::ep_step(&block, back, stream))?;
    let own = peers[c.rank as usize] as *const u8;
    let pairs = pairs as i64;
    let sum = sys::moek_combine_args {
        dtype: c.dtype,
        num_tokens: a.num_tokens,
        k: c.k,
        hidden: c.hidden,
        max_rows: pairs,
        // SAFETY: inside this rank's symmetric buffer (checked to be at least the layout's size).
        y: unsafe { own.add(lay.returned_offset) } as *const c_void,
        // The owners' sums, weights applied there: one row per head pair, none for the others.
        // SAFETY: inside the workspace.
        pair_row: unsafe { (a.group.workspace as *const u8).add(carve.head_row) } as *const i32,
        weights: std::ptr::null(),
        residual: a.residual,
        out: a.out,
    };
    permute::combine_raw(&sum, stream)
}
