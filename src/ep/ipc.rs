//! One process per GPU: each rank allocates its own symmetric buffer, exports it as a CUDA IPC
//! handle (64 plain bytes), and opens every other rank's handle to build its peers table.
//!
//! The caller moves the handles between its processes over its own channel (a socket, a file, an
//! all-gather of its framework): the library never talks to other processes.
//!
//! ```text
//! let mut me = IpcRank::new(config, rank, &stream)?;    // allocates, zero-fills, waits for the fill
//! publish(rank, me.export_handle());                    // caller's channel
//! let handles: Vec<IpcHandle> = gather_all_in_rank_order();
//! me.connect(&handles)?;                                // opens every other rank's buffer
//! me.dispatch(..)?; /* experts */ me.combine(..)?;      // the EpRank calls, through Deref
//! me.disconnect(); barrier(); drop(me);                 // see "Teardown" below
//! ```
//!
//! Zero fill: every rank's buffer must be zero before any rank's first dispatch (the flags start
//! from zero). [`IpcRank::new`] returns only after its own fill completed, so a rank that publishes
//! its handle after `new` and dispatches only after it holds every rank's handle needs no other
//! barrier: the exchange of handles is the barrier.
//!
//! Teardown: when every rank made the same calls, no peer stores into a rank's buffer after that
//! rank's last combine completed. Still, every rank closes the others' buffers
//! ([`IpcRank::disconnect`]) and passes a barrier over the caller's channel before dropping (freeing
//! its own), so that no buffer is freed while another process has it open or (after a failure
//! half-way) still stores into it.
//!
//! Peer access is enabled lazily by the driver when a handle is opened
//! (`CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`); the GPUs must be able to access each other (NVLink or
//! PCIe P2P). Unlike [`super::PeerGroup`], a first kernel launch that waits for the running kernels
//! of its own device cannot deadlock here: each device is driven by its own process, so a rank
//! waiting for its peers only delays itself.

use super::{EpConfig, EpRank};
use crate::error::{bail, Error, Result, Status};
use cudarc::driver::sys as cu;
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// Bytes of a CUDA IPC memory handle.
pub const IPC_HANDLE_BYTES: usize = 64;

/// A rank's symmetric buffer as another process can open it (`cuIpcGetMemHandle`'s opaque bytes).
pub type IpcHandle = [u8; IPC_HANDLE_BYTES];

/// This process's rank of an expert-parallel group whose other ranks live in other processes (one
/// GPU each). Derefs to [`EpRank`] for the calls ([`EpRank::dispatch`], [`EpRank::combine`]), which
/// fail naming the missing peer until [`IpcRank::connect`] has run.
pub struct IpcRank {
    // First: dropped (its stream waited for, the handles closed) before the rank frees its buffer.
    opened: OpenedPeers,
    rank: EpRank,
    handle: IpcHandle,
}

/// Other ranks' buffers opened in this process, closed on drop.
struct OpenedPeers {
    ptrs: Vec<cu::CUdeviceptr>,
    stream: Arc<CudaStream>,
}

impl Drop for OpenedPeers {
    fn drop(&mut self) {
        if self.ptrs.is_empty() || self.stream.context().bind_to_thread().is_err() {
            return;
        }
        // SAFETY: every pointer came from cuIpcOpenMemHandle in this context; this rank's work that
        // may store through them is finished first.
        unsafe {
            let _ = cu::cuStreamSynchronize(self.stream.cu_stream());
            for &p in &self.ptrs {
                let _ = cu::cuIpcCloseMemHandle(p);
            }
        }
    }
}

impl IpcRank {
    /// Rank `rank` of a group of `config.num_ranks` processes, on `stream`'s GPU: allocates its
    /// symmetric buffer (`cuMemAlloc`: IPC handles cover plain allocations, not the stream-ordered
    /// pool) and workspace, zero-fills both, waits for the fill, and exports the handle.
    pub fn new(config: EpConfig, rank: u32, stream: &Arc<CudaStream>) -> Result<Self> {
        let layout = config.layout()?;
        if rank >= config.num_ranks {
            bail!(InvalidRanks, "rank = {rank} is outside 0..{}", config.num_ranks);
        }
        let ep = EpRank::allocate(config, layout, rank, stream)?;
        let mut raw = cu::CUipcMemHandle { reserved: [0; IPC_HANDLE_BYTES] };
        stream.context().bind_to_thread()?;
        // SAFETY: the pointer is the base of a live cuMemAlloc allocation of the bound context.
        unsafe { cu::cuIpcGetMemHandle(&mut raw, ep.symmetric_ptr()) }.result()?;
        let handle = raw.reserved.map(|b| b as u8);
        Ok(IpcRank { opened: OpenedPeers { ptrs: Vec::new(), stream: stream.clone() }, rank: ep, handle })
    }

    /// This rank's handle, for the caller to send to every other rank.
    pub fn export_handle(&self) -> IpcHandle {
        self.handle
    }

    /// Whether [`IpcRank::connect`] has run.
    pub fn is_connected(&self) -> bool {
        self.opened.ptrs.len() + 1 == self.rank.config().num_ranks as usize
    }

    /// Opens every other rank's buffer from `handles` (one per rank, in rank order, this rank's own
    /// included and checked) and fills the peers table. Call once, after every rank's
    /// [`IpcRank::new`] returned (see the module's note on the zero fill).
    pub fn connect(&mut self, handles: &[IpcHandle]) -> Result<()> {
        let r = self.rank.config().num_ranks as usize;
        let me = self.rank.rank() as usize;
        if handles.len() != r {
            bail!(InvalidRanks, "handles has {} entries but num_ranks = {r}", handles.len());
        }
        if handles[me] != self.handle {
            bail!(InvalidValue, "handles[{me}] is not this rank's own handle (handles go in rank order)");
        }
        if r > 1 && self.is_connected() {
            bail!(InvalidValue, "connect was already called on rank {me}");
        }
        if let Some(q) = (0..r).find(|&q| q != me && handles[q] == self.handle) {
            bail!(InvalidValue, "handles[{q}] is this rank's own handle (rank {me})");
        }
        // Opened into a fresh set first, so that a failure closes what it opened and leaves this
        // rank unconnected (and connect can be retried).
        let mut fresh = OpenedPeers { ptrs: Vec::with_capacity(r - 1), stream: self.opened.stream.clone() };
        fresh.stream.context().bind_to_thread()?;
        let others = || (0..r).filter(move |&q| q != me);
        for q in others() {
            let raw = cu::CUipcMemHandle { reserved: handles[q].map(|b| b as std::ffi::c_char) };
            let mut ptr: cu::CUdeviceptr = 0;
            let flags = cu::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
            // SAFETY: a plain driver call on the bound context; the opened pointer is recorded at once
            // so that it is closed on every path.
            let opened = unsafe { cu::cuIpcOpenMemHandle_v2(&mut ptr, raw, flags) }.result();
            opened.map_err(|e| Error::new(Status::Cuda, format!("opening handles[{q}] (rank {q}'s buffer): {e}")))?;
            fresh.ptrs.push(ptr);
        }
        for (q, &ptr) in others().zip(&fresh.ptrs) {
            self.rank.set_peer(q, ptr);
        }
        self.opened = fresh;
        Ok(())
    }

    /// Waits for this rank's stream and closes the other ranks' buffers (the peers table empties;
    /// calls fail until [`IpcRank::connect`] runs again). For an orderly teardown: every rank
    /// disconnects, a barrier over the caller's channel, then every rank drops (frees its buffer), so
    /// no buffer is freed while another process still has it open. Dropping disconnects too.
    pub fn disconnect(&mut self) {
        let me = self.rank.rank() as usize;
        for q in (0..self.rank.config().num_ranks as usize).filter(|&q| q != me) {
            self.rank.set_peer(q, 0);
        }
        let stream = self.opened.stream.clone();
        // The old set's drop waits for the stream and closes the handles.
        self.opened = OpenedPeers { ptrs: Vec::new(), stream };
    }
}

impl std::ops::Deref for IpcRank {
    type Target = EpRank;

    fn deref(&self) -> &EpRank {
        &self.rank
    }
}
