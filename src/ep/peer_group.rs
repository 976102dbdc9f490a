//! One process driving every GPU of an expert-parallel group through peer access.

use super::{combine_raw, dispatch_raw, EpConfig, EpLayout};
use crate::check;
use crate::dtype::Element;
use crate::error::{bail, Error, Result, Status};
use crate::sys;
use cudarc::driver::sys as cu;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::ffi::c_void;
use std::sync::Arc;

/// Device memory from `cuMemAlloc` (not the stream-ordered pool: peer access and IPC handles apply
/// to plain allocations only), freed on drop.
struct SymmetricBuffer {
    ptr: cu::CUdeviceptr,
    stream: Arc<CudaStream>,
}

impl SymmetricBuffer {
    fn zeroed(stream: &Arc<CudaStream>, bytes: usize) -> Result<Self> {
        stream.context().bind_to_thread()?;
        let mut ptr: cu::CUdeviceptr = 0;
        // SAFETY: plain driver calls on the bound context; the result is checked.
        unsafe {
            cu::cuMemAlloc_v2(&mut ptr, bytes).result()?;
            let buffer = SymmetricBuffer { ptr, stream: stream.clone() };
            cu::cuMemsetD8_v2(ptr, 0, bytes).result()?;
            Ok(buffer)
        }
    }
}

impl Drop for SymmetricBuffer {
    fn drop(&mut self) {
        if self.stream.context().bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc on this context; the stream's work is finished first.
            unsafe {
                let _ = cu::cuStreamSynchronize(self.stream.cu_stream());
                let _ = cu::cuMemFree_v2(self.ptr);
            }
        }
    }
}

/// Lets every pair of the streams' devices read and write each other's memory.
fn enable_peer_access(streams: &[Arc<CudaStream>]) -> Result<()> {
    for (i, a) in streams.iter().enumerate() {
        for (j, b) in streams.iter().enumerate() {
            let (ca, cb) = (a.context(), b.context());
            if i == j || ca.ordinal() == cb.ordinal() {
                continue;
            }
            let mut can = 0;
            // SAFETY: plain driver queries and settings on live contexts.
            unsafe {
                cu::cuDeviceCanAccessPeer(&mut can, ca.cu_device(), cb.cu_device()).result()?;
                if can == 0 {
                    bail!(
                        InvalidRanks,
                        "GPU {} cannot access GPU {} directly (no peer access); this group needs NVLink or PCIe P2P",
                        ca.ordinal(),
                        cb.ordinal()
                    );
                }
                ca.bind_to_thread()?;
                let r = cu::cuCtxEnablePeerAccess(cb.cu_ctx(), 0);
                if r != cu::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                    r.result()?;
                }
            }
        }
    }
    Ok(())
}

/// Where [`EpRank::combine`] reads the expert outputs of the received rows.
pub enum ExpertOutput<'a, T> {
    /// The received rows themselves, overwritten in place by the expert computation.
    Received,
    /// A separate buffer of at least `max_received_rows * H` elements.
    Buffer(&'a CudaView<'a, T>),
}

/// Every rank of an expert-parallel group, driven from this process: one stream per GPU, peer access
/// between every pair, each rank's symmetric buffer and workspace allocated and zero-filled.
pub struct PeerGroup {
    ranks: Vec<EpRank>,
}

/// One rank of a [`PeerGroup`] or an [`super::IpcRank`]: its stream, buffers and the calls. Every rank
/// must make the same calls in the same order; a call waits on the device for the other ranks'
/// matching call, so (in one process) enqueue every rank's call before synchronising any of them.
pub struct EpRank {
    config: EpConfig,
    layout: EpLayout,
    rank: u32,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    peers: Vec<*mut c_void>,
    // Last: dropped after the workspace (its drop waits for the stream).
    symmetric: SymmetricBuffer,
}

impl PeerGroup {
    /// A group of `streams.len()` ranks (rank r drives `streams[r]`'s GPU; one GPU per rank).
    pub fn new(config: EpConfig, streams: &[Arc<CudaStream>]) -> Result<Self> {
        let layout = config.layout()?;
        if streams.len() != config.num_ranks as usize {
            bail!(InvalidRanks, "num_ranks = {} but {} streams were given", config.num_ranks, streams.len());
        }
        for (i, a) in streams.iter().enumerate() {
            if streams[..i].iter().any(|b| b.context().ordinal() == a.context().ordinal()) {
                bail!(InvalidRanks, "streams {i} and another are on GPU {}: one GPU per rank", a.context().ordinal());
            }
        }
        enable_peer_access(streams)?;
        let mut ranks = Vec::with_capacity(streams.len());
        for (r, s) in streams.iter().enumerate() {
            ranks.push(EpRank::allocate(config, layout, r as u32, s)?);
        }
        // Every zero fill completed inside allocate, before any rank can store into a peer.
        let peers: Vec<*mut c_void> = ranks.iter().map(|r| r.symmetric.ptr as *mut c_void).collect();
        for rank in &mut ranks {
            rank.peers.clone_from(&peers);
        }
        Ok(PeerGroup { ranks })
    }

    /// The ranks, in rank order.
    pub fn ranks(&self) -> &[EpRank] {
        &self.ranks
    }
}

impl EpRank {
    /// Rank `rank`'s symmetric buffer and workspace on `stream`'s GPU, zero-filled (returns after the
    /// fill completed). The peers table holds this rank's own buffer only; the others stay NULL (and
    /// calls fail naming them) until the owner of the rank fills them in.
    pub(super) fn allocate(config: EpConfig, layout: EpLayout, rank: u32, stream: &Arc<CudaStream>) -> Result<Self> {
        let symmetric = SymmetricBuffer::zeroed(stream, layout.symmetric_bytes)?;
        let workspace = stream.alloc_zeros::<u8>(layout.workspace_bytes)?;
        // cuMemsetD8 runs on the legacy stream, alloc_zeros on `stream`: wait for the whole context.
        stream.context().synchronize()?;
        let mut peers = vec![std::ptr::null_mut(); config.num_ranks as usize];
        peers[rank as usize] = symmetric.ptr as *mut c_void;
        Ok(EpRank { config, layout, rank, stream: stream.clone(), workspace, peers, symmetric })
    }

    /// This rank's own symmetric buffer.
    pub(super) fn symmetric_ptr(&self) -> cu::CUdeviceptr {
        self.symmetric.ptr
    }

    /// Sets peer `q`'s buffer as this rank's device addresses it.
    pub(super) fn set_peer(&mut self, q: usize, ptr: cu::CUdeviceptr) {
        self.peers[q] = ptr as *mut c_void;
    }

    /// This rank's index.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The stream this rank's calls are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The group's configuration.
    pub fn config(&self) -> &EpConfig {
        &self.config
    }

    /// The group's layout.
    pub fn layout(&self) -> &EpLayout {
        &self.layout
    }

    /// Device address of the received rows, `[max_received_rows, H]` (valid until the next dispatch);
    /// the offsets [`EpRank::dispatch`] writes say which rows are in use.
    pub fn received_rows_ptr(&self) -> u64 {
        self.symmetric.ptr + self.layout.received_offset as u64
    }

    /// The C description of this rank's group (its buffers and the peers'), valid while the rank lives.
    pub(super) fn group(&self) -> Result<sys::moek_ep_group> {
        self.stream.context().bind_to_thread()?;
        let (ws, _guard) = self.workspace.device_ptr(&self.stream);
        Ok(sys::moek_ep_group {
            config: self.config.to_c(self.rank),
            peers: self.peers.as_ptr(),
            symmetric_bytes: self.layout.symmetric_bytes,
            workspace: ws as *mut c_void,
            workspace_bytes: self.layout.workspace_bytes,
        })
    }

    fn check_dtype<T: Element>(&self) -> Result<()> {
        if T::DTYPE != self.config.dtype {
            bail!(InvalidDtype, "the group was made for dtype {} but the rows are {}", self.config.dtype, T::DTYPE);
        }
        Ok(())
    }

    /// Sends this rank's `num_tokens` rows of `x` ([T, H]) to the owners of their `topk_ids` ([T, k])
    /// and waits (on the device) for every rank's rows; writes the received rows' per-local-expert
    /// offsets (`E/R + 1` entries) to `received_offsets`. `topk_weights` ([T, k], `None`: all 1) are
    /// the weights the matching [`EpRank::combine`] applies: they travel with the rows, so that each
    /// owner returns one weighted sum per token rather than one row per pair.
    pub fn dispatch<T: Element>(
        &self,
        num_tokens: usize,
        x: &CudaView<'_, T>,
        topk_ids: &CudaView<'_, i32>,
        topk_weights: Option<&CudaView<'_, f32>>,
        received_offsets: &mut CudaViewMut<'_, i32>,
    ) -> Result<()> {
        self.check_dtype::<T>()?;
        let c = &self.config;
        check::length("x", x.len(), num_tokens * c.hidden)?;
        check::length("topk_ids", topk_ids.len(), num_tokens * c.k as usize)?;
        if let Some(w) = topk_weights {
            check::length("topk_weights", w.len(), num_tokens * c.k as usize)?;
        }
        check::length("received_offsets", received_offsets.len(), c.local_experts() + 1)?;
        let group = self.group()?;
        let (xp, _g0) = x.device_ptr(&self.stream);
        let (ids, _g1) = topk_ids.device_ptr(&self.stream);
        let w = topk_weights.map(|w| w.device_ptr(&self.stream));
        let (offs, _g2) = received_offsets.device_ptr_mut(&self.stream);
        let a = sys::moek_ep_dispatch_args {
            group,
            num_tokens: num_tokens as i64,
            x: xp as *const c_void,
            topk_ids: ids as *const i32,
            topk_weights: w.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const f32),
            received_expert_offsets: offs as *mut i32,
        };
        dispatch_raw(&a, self.stream.cu_stream() as sys::cudaStream_t)
    }

    /// Brings the expert outputs of the received rows back and writes, for this rank's `num_tokens`
    /// tokens, `out[t] = residual[t] + sum_s weights[t, s] * output of (t, s)` with the dispatch's
    /// weights: each owner sums a token's slots there (fp32, slot order, rounded to T) and returns that
    /// one row; the owners' sums are added in fp32 in a fixed order (the header's contract). Call after
    /// this rank's matching [`EpRank::dispatch`], on the same stream.
    pub fn combine<T: Element>(
        &self,
        num_tokens: usize,
        expert_out: ExpertOutput<'_, T>,
        residual: Option<&CudaView<'_, T>>,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        self.check_dtype::<T>()?;
        let c = &self.config;
        if let Some(r) = residual {
            check::length("residual", r.len(), num_tokens * c.hidden)?;
        }
        check::length("out", out.len(), num_tokens * c.hidden)?;
        let group = self.group()?;
        let buffer = match &expert_out {
            ExpertOutput::Received => None,
            ExpertOutput::Buffer(v) => {
                check::length("expert_out", v.len(), self.layout.max_received_rows * c.hidden)?;
                Some(v.device_ptr(&self.stream))
            }
        };
        let eo = buffer.as_ref().map_or(self.received_rows_ptr(), |(p, _)| *p);
        let r = residual.map(|r| r.device_ptr(&self.stream));
        let (o, _g) = out.device_ptr_mut(&self.stream);
        let a = sys::moek_ep_combine_args {
            group,
            num_tokens: num_tokens as i64,
            expert_out: eo as *const c_void,
            residual: r.as_ref().map_or(std::ptr::null(), |(p, _)| *p as *const c_void),
            out: o as *mut c_void,
        };
        combine_raw(&a, self.stream.cu_stream() as sys::cudaStream_t)
    }

    /// Copies the first `rows` received rows to the host (synchronises this rank's stream; for tests
    /// and debugging).
    pub fn received_rows_to_host<T: Element + Default>(&self, rows: usize) -> Result<Vec<T>> {
        if rows > self.layout.max_received_rows {
            return Err(Error::new(
                Status::BufferTooSmall,
                format!("rows = {rows} but at most {} are received", self.layout.max_received_rows),
            ));
        }
        let mut host = vec![T::default(); rows * self.config.hidden];
        self.stream.synchronize()?;
        self.stream.context().bind_to_thread()?;
        // SAFETY: the host vector holds exactly the bytes copied, which lie inside the symmetric buffer.
        unsafe {
            cu::cuMemcpyDtoH_v2(
                host.as_mut_ptr() as *mut c_void,
                self.received_rows_ptr(),
                std::mem::size_of_val(host.as_slice()),
            )
            .result()?;
        }
        Ok(host)
    }

    /// Copies host rows into the received rows (synchronously; for tests that play the experts).
    pub fn write_received_rows<T: Element>(&self, rows: &[T]) -> Result<()> {
        check::length("received rows", self.layout.max_received_rows * self.config.hidden, rows.len())?;
        self.stream.synchronize()?;
        self.stream.context().bind_to_thread()?;
        // On this rank's stream, then waited for: a synchronous copy from pageable memory may return
        // before its DMA lands, and a non-blocking stream would not wait for it.
        // SAFETY: `rows` fits in the received rows region of the symmetric buffer (checked above) and
        // outlives the copy (waited for below).
        unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                self.received_rows_ptr(),
                rows.as_ptr() as *const c_void,
                std::mem::size_of_val(rows),
                self.stream.cu_stream(),
            )
            .result()?;
        }
        self.stream.synchronize()?;
        Ok(())
    }
}
