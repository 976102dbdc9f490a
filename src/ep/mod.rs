//! Expert parallelism across the GPUs of one host: dispatch every token's rows to the ranks that own
//! its experts, and combine the expert outputs back (the header's "Expert parallelism" section).
//!
//! Rank r of R owns experts `r*E/R .. (r+1)*E/R`. Each rank holds a *symmetric buffer* that every
//! rank stores into directly from its kernels (NVLink peer stores, flags with release/acquire at
//! system scope), so neither call synchronises with the host and both capture into a CUDA graph.
//!
//! - [`EpConfig`] is the shape all ranks agree on; [`EpConfig::layout`] sizes the buffers.
//! - [`PeerGroup`] drives every GPU of the host from one process (peer access), allocating and
//!   zero-filling the buffers; [`EpRank::dispatch`] and [`EpRank::combine`] are the per-rank calls.
//! - [`IpcRank`] is one rank of a group with one process per GPU: its buffers are shared with the
//!   other processes as CUDA IPC handles (plain bytes the caller exchanges over its own channel).
//! - [`LowDimRank`] wraps an [`EpRank`] made for a projected width r: BigMac's low-dimension
//!   dispatch and combine, with the descend and ascend projections around the exchange.
//! - Engines with their own buffers call `moek_ep_dispatch` / `moek_ep_combine` through the C
//!   interface (the header says how to share them through CUDA IPC from C).
//!
//! The CPU reference of the whole expert-parallel step is [`crate::reference::ep`].

mod ipc;
pub(crate) mod launch;
mod low_dim;
mod peer_group;

pub use ipc::{IpcHandle, IpcRank, IPC_HANDLE_BYTES};
pub(crate) use low_dim::{low_dim_combine_raw, low_dim_dispatch_raw, low_dim_workspace_bytes};
pub use low_dim::{LowDimConfig, LowDimRank};
pub use peer_group::{EpRank, ExpertOutput, PeerGroup};

use crate::error::{bail, Result};
use crate::{check, dtype, sys};

/// Most ranks one group can have (the header's `MOEK_EP_MAX_RANKS`).
pub const MAX_RANKS: usize = sys::MOEK_EP_MAX_RANKS as usize;

/// Bytes of the flags at the start of every symmetric buffer (3 kinds x [`MAX_RANKS`] u32).
const FLAG_BYTES: usize = 1024;
/// Alignment of every region of the buffers.
const ALIGN: usize = 256;

fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// The shape every rank of an expert-parallel group agrees on (the header's `moek_ep_config`
/// without the rank).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpConfig {
    /// R: ranks (GPUs) in the group, 1..=[`MAX_RANKS`], dividing `num_experts`.
    pub num_ranks: u32,
    /// E: experts over all ranks.
    pub num_experts: u32,
    /// Slots (experts) per token.
    pub k: u32,
    /// H: elements per row, a multiple of 8.
    pub hidden: usize,
    /// Most tokens any rank passes to one call.
    pub max_tokens: usize,
    /// Element type of the rows.
    pub dtype: sys::moek_dtype,
    /// 0: the contiguous layout (received rows grouped by expert, offsets). > 0: the masked layout,
    /// `[E/R, capacity, H]` with per-expert counts; pairs beyond an expert's capacity are dropped.
    pub capacity: usize,
}

/// Sizes and offsets of an [`EpConfig`], the same on every rank (the header's `moek_ep_layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpLayout {
    /// Bytes of each rank's symmetric buffer.
    pub symmetric_bytes: usize,
    /// Byte offset of the received rows inside the symmetric buffer.
    pub received_offset: usize,
    /// Rows a rank can receive: R * max_tokens * k, or E/R * capacity in the masked layout.
    pub max_received_rows: usize,
    /// Bytes of each rank's local workspace.
    pub workspace_bytes: usize,
    /// Byte offset of the per-expert counts of every rank inside the symmetric buffer.
    pub(crate) counts_offset: usize,
    /// Byte offset of the returned rows (this rank's own pairs) inside the symmetric buffer.
    pub(crate) returned_offset: usize,
    /// Byte offset of the expansion map (int32 per received row: the row that holds its token's data).
    pub(crate) expand_offset: usize,
    /// Byte offset of the member lists (k entries of {row, weight} per received row; see cuda/ep.cu).
    pub(crate) members_offset: usize,
}

impl EpConfig {
    /// The C struct for rank `rank`.
    pub fn to_c(&self, rank: u32) -> sys::moek_ep_config {
        let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        sys::moek_ep_config {
            num_ranks: clamp(self.num_ranks),
            rank: clamp(rank),
            num_experts: clamp(self.num_experts),
            k: clamp(self.k),
            hidden: i64::try_from(self.hidden).unwrap_or(i64::MAX),
            max_tokens: i64::try_from(self.max_tokens).unwrap_or(i64::MAX),
            dtype: self.dtype,
            capacity: i64::try_from(self.capacity).unwrap_or(i64::MAX),
        }
    }

    /// Checks the configuration and computes the layout, naming the bad field.
    pub fn layout(&self) -> Result<EpLayout> {
        layout(&self.to_c(0))
    }

    /// Experts per rank.
    pub fn local_experts(&self) -> usize {
        (self.num_experts / self.num_ranks.max(1)) as usize
    }
}

/// Checks a C configuration (all but `rank`) and computes its layout.
pub(crate) fn layout(c: &sys::moek_ep_config) -> Result<EpLayout> {
    let r = c.num_ranks;
    if r < 1 || r as usize > MAX_RANKS {
        bail!(InvalidRanks, "num_ranks = {r} is outside 1..={MAX_RANKS}");
    }
    let e = c.num_experts;
    if e < 1 || e > sys::MOEK_PLAN_MAX_EXPERTS as i32 {
        bail!(InvalidNumExperts, "num_experts = {e} is outside 1..={}", sys::MOEK_PLAN_MAX_EXPERTS);
    }
    if e % r != 0 {
        bail!(InvalidRanks, "num_ranks = {r} does not divide num_experts = {e}");
    }
    if c.k < 1 || c.k > sys::MOEK_PLAN_MAX_K as i32 {
        bail!(InvalidK, "k = {} is outside 1..={}", c.k, sys::MOEK_PLAN_MAX_K);
    }
    let Some(elem) = dtype::size_of(c.dtype) else {
        bail!(InvalidDtype, "dtype = {} is not f32, bf16 or f16", c.dtype);
    };
    if c.hidden < 8 || c.hidden % 8 != 0 {
        bail!(InvalidValue, "hidden = {} must be a positive multiple of 8", c.hidden);
    }
    if c.max_tokens < 0 || c.max_tokens > i64::from(i32::MAX) {
        bail!(InvalidNumTokens, "max_tokens = {} is outside 0..=2^31-1", c.max_tokens);
    }
    let (ranks, k, hidden) = (r as usize, c.k as usize, c.hidden as usize);
    let pairs = c.max_tokens as usize * k;
    if c.capacity < 0 || c.capacity > i64::from(i32::MAX) {
        bail!(InvalidValue, "capacity = {} is outside 0..=2^31-1", c.capacity);
    }
    let received_rows = if c.capacity > 0 { (e / r) as usize * c.capacity as usize } else { ranks * pairs };
    if ranks * pairs > i32::MAX as usize {
        bail!(InvalidNumTokens, "num_ranks * max_tokens * k = {}; row indices are 32-bit", ranks * pairs);
    }
    // A sender's row index at the owner is at most the masked rows plus its own pairs: 32-bit as well.
    if c.capacity > 0 && received_rows + ranks * pairs > i32::MAX as usize {
        bail!(
            InvalidValue,
            "num_experts / num_ranks * capacity = {received_rows} (plus the pairs sent); row indices are 32-bit"
        );
    }
    let row_bytes = hidden * elem;
    let counts_offset = FLAG_BYTES;
    let received_offset = counts_offset + align_up(ranks * e as usize * 4);
    let returned_offset = received_offset + align_up(received_rows * row_bytes);
    let expand_offset = returned_offset + align_up(pairs * row_bytes);
    let members_offset = expand_offset + align_up(received_rows * 4);
    let symmetric_bytes = members_offset + align_up(received_rows * k * 8);
    let workspace_bytes = launch::Carve::new(c)?.total;
    Ok(EpLayout {
        symmetric_bytes,
        received_offset,
        max_received_rows: received_rows,
        workspace_bytes,
        counts_offset,
        returned_offset,
        expand_offset,
        members_offset,
    })
}

/// Checks a group (configuration, rank, peers, buffer sizes) and returns its layout and peer pointers.
fn check_group(g: &sys::moek_ep_group) -> Result<(EpLayout, Vec<usize>)> {
    let lay = layout(&g.config)?;
    let r = g.config.num_ranks;
    if g.config.rank < 0 || g.config.rank >= r {
        bail!(InvalidRanks, "rank = {} is outside 0..{r}", g.config.rank);
    }
    if g.symmetric_bytes < lay.symmetric_bytes {
        bail!(
            BufferTooSmall,
            "symmetric_bytes = {} but this configuration needs {}",
            g.symmetric_bytes,
            lay.symmetric_bytes
        );
    }
    check::pointer("peers", g.peers, true, std::mem::align_of::<*mut u8>())?;
    // SAFETY: the caller passes R pointers (the header's contract); checked non-NULL above.
    let peers = unsafe { std::slice::from_raw_parts(g.peers, r as usize) };
    for (q, &p) in peers.iter().enumerate() {
        check::pointer(&format!("peers[{q}]"), p as *const u8, true, ALIGN)?;
    }
    if g.workspace_bytes < lay.workspace_bytes {
        bail!(
            WorkspaceTooSmall,
            "workspace_bytes = {} but this configuration needs {}",
            g.workspace_bytes,
            lay.workspace_bytes
        );
    }
    check::pointer("workspace", g.workspace as *const u8, true, ALIGN)?;
    Ok((lay, peers.iter().map(|&p| p as usize).collect()))
}

fn check_tokens(g: &sys::moek_ep_group, num_tokens: i64) -> Result<()> {
    if num_tokens < 0 || num_tokens > g.config.max_tokens {
        bail!(InvalidNumTokens, "num_tokens = {num_tokens} is outside 0..={}", g.config.max_tokens);
    }
    Ok(())
}

/// A dispatch's arguments after [`check_dispatch`]: its layout and the peers' buffers.
pub(crate) struct Checked {
    lay: EpLayout,
    peers: Vec<usize>,
}

/// Validates a dispatch in full (nothing enqueued).
pub(crate) fn check_dispatch(a: &sys::moek_ep_dispatch_args) -> Result<Checked> {
    let (lay, peers) = check_group(&a.group)?;
    check_tokens(&a.group, a.num_tokens)?;
    let tokens = a.num_tokens > 0;
    check::pointer("x", a.x as *const u8, tokens, 16)?;
    check::pointer("topk_ids", a.topk_ids, tokens, 4)?;
    check::pointer("topk_weights", a.topk_weights, false, 4)?;
    check::pointer("received_expert_offsets", a.received_expert_offsets, true, 4)?;
    Ok(Checked { lay, peers })
}

/// Enqueues a dispatch that [`check_dispatch`] accepted.
pub(crate) fn launch_dispatch(a: &sys::moek_ep_dispatch_args, c: &Checked, stream: sys::cudaStream_t) -> Result<()> {
    launch::dispatch(a, &c.lay, &c.peers, stream)
}

/// Validates a dispatch in full, then enqueues it (the C entry point and [`EpRank::dispatch`]).
pub(crate) fn dispatch_raw(a: &sys::moek_ep_dispatch_args, stream: sys::cudaStream_t) -> Result<()> {
    launch_dispatch(a, &check_dispatch(a)?, stream)
}

/// Validates a combine in full (nothing enqueued).
pub(crate) fn check_combine(a: &sys::moek_ep_combine_args) -> Result<Checked> {
    let (lay, peers) = check_group(&a.group)?;
    check_tokens(&a.group, a.num_tokens)?;
    // Whether rows arrive is known on the device only, so expert_out is needed whenever any can.
    check::pointer("expert_out", a.expert_out as *const u8, lay.max_received_rows > 0, 16)?;
    let tokens = a.num_tokens > 0;
    check::pointer("residual", a.residual as *const u8, false, 16)?;
    check::pointer("out", a.out as *const u8, tokens, 16)?;
    Ok(Checked { lay, peers })
}

/// Enqueues a combine that [`check_combine`] accepted.
pub(crate) fn launch_combine(a: &sys::moek_ep_combine_args, c: &Checked, stream: sys::cudaStream_t) -> Result<()> {
    launch::combine(a, &c.lay, &c.peers, stream)
}

/// Validates a combine in full, then enqueues it (the C entry point and [`EpRank::combine`]).
pub(crate) fn combine_raw(a: &sys::moek_ep_combine_args, stream: sys::cudaStream_t) -> Result<()> {
    launch_combine(a, &check_combine(a)?, stream)
}
