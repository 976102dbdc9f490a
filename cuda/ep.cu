// Expert parallelism inside one host: the kernels of dispatch and combine (src/ep/ checks the
// arguments, carves the workspace and runs the plan before these).
//
// Every rank owns a symmetric buffer the others can store into (peer access or CUDA IPC):
//   [0, 1024)                  flags, u32: count[R], data[R], returned[R] (flag[q] is written by rank q)
//   [counts_offset, ...)       per-expert counts of every rank's plan, int32 [R][E]
//   [received_offset, ...)     rows sent to this rank, grouped by local expert, then source rank
//   [returned_offset, ...)     expert outputs of this rank's own pairs, in its plan's row order
//   [expand_offset, ...)       int32 per received row: the received row that holds its token's data
// A token with several experts on one owner crosses NVLink once: the sender stores its row only at the
// first of those experts' rows and, for every row, which row holds the data; the owner then copies the
// row to the others locally (ep_expand_kernel). For DeepSeek-V3's routing on 4 ranks that is about 2.2x
// fewer bytes over NVLink than one row per pair.
// A call's flags carry its sequence number (state[kSeq] + 1, counted per rank on the device), so no
// flag is ever reset and a captured graph replays correctly. Why no buffer is overwritten while still
// in use: a rank stores into a peer's counts or received rows only after that peer has signalled the
// matching call's counts, which it does after everything earlier on its stream; returned rows likewise
// only after the peer's rows of the same call arrived.
#include "chunk_scan.cuh"
#include "common.cuh"
#include "moe_kernels.h"

namespace moek {
namespace {

// Mirrors src/ep/launch.rs (EpLaunch): keep the two in the same order.
struct EpLaunch {
  char* peers[MOEK_EP_MAX_RANKS];  // every rank's symmetric buffer, as this device addresses it
  int32_t num_ranks, rank, num_experts, k;
  int64_t row_bytes;        // bytes per row (H * element size, a multiple of 16)
  int64_t counts_offset;    // byte offsets inside the symmetric buffer
  int64_t received_offset;
  int64_t returned_offset;
  int64_t expand_offset;    // int32 per received row: the row holding its token's data
  // This rank's workspace.
  const int32_t* expert_counts;   // [E] pairs this rank keeps per global expert (its plan)
  const int32_t* expert_offsets;  // [E + 1] its plan's offsets (row_align 1)
  const int32_t* row_source;      // [T * k] its plan's pair of each row
  const int32_t* pair_row;        // [T * k] its plan's row of each pair (-1: not kept)
  uint32_t* state;                // [4]: sequence number, blocks done in send, blocks done in return
  int32_t* send_base;             // [E] where this rank's first row of expert e lands at the owner
  int32_t* segment_start;         // [L * R + 1] received rows of (local expert j, source q) start at [j * R + q]
  int32_t* segment_source_row;    // [L * R] the source's plan row of that segment's first row
  int32_t* received_offsets;      // [L + 1] caller's output (dispatch only)
};

enum Flag { kCountFlag = 0, kDataFlag = 1, kReturnedFlag = 2 };
enum State { kSeq = 0, kSendDone = 1, kReturnDone = 2 };

__device__ __forceinline__ uint32_t* flag_at(char* buffer, Flag kind, int from_rank) {
  return reinterpret_cast<uint32_t*>(buffer) + kind * MOEK_EP_MAX_RANKS + from_rank;
}

__device__ __forceinline__ void store_release_system(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire_system(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Threads 0..R-1 each wait until rank `tid`'s flag of this kind in this rank's buffer reaches `seq`,
// then the block proceeds (the acquire plus the barrier order the peers' stores before what follows).
__device__ void wait_for_ranks(const EpLaunch& a, Flag kind, uint32_t seq) {
  if (threadIdx.x < a.num_ranks) {
    const uint32_t* f = flag_at(a.peers[a.rank], kind, threadIdx.x);
    while (load_acquire_system(f) != seq) __nanosleep(64);
  }
  __syncthreads();
}

// Threads 0..R-1 each tell rank `tid` that this rank's stores of this kind for call `seq` are done.
// Called after a barrier that follows the stores; the system fence makes them visible first.
__device__ void signal_ranks(const EpLaunch& a, Flag kind, uint32_t seq) {
  if (threadIdx.x < a.num_ranks) {
    __threadfence_system();
    store_release_system(flag_at(a.peers[threadIdx.x], kind, a.rank), seq);
  }
}

// After the block's stores: true in the one block that finishes last (all other blocks' stores are then
// visible to it), which also resets the counter for the next call.
__device__ bool last_block_done(uint32_t* done) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    last = atomicAdd(done, 1u) == gridDim.x - 1;
    if (last) *done = 0;
  }
  __syncthreads();
  return last;
}

// One block. Sends this rank's per-expert counts to every rank, waits for everyone's, then derives
// where this rank's rows land at each owner (send_base) and how this rank's received rows are laid out
// (received offsets and segments). Dynamic shared memory: E ints plus 33 of scan scratch.
__global__ void __launch_bounds__(1024) ep_counts_kernel(const EpLaunch a) {
  extern __shared__ int32_t s_mem[];
  int32_t* s_excl = s_mem;                   // [E] exclusive sum of totals inside each owner's experts
  int32_t* s_scratch = s_mem + a.num_experts;
  const int R = a.num_ranks, E = a.num_experts, L = E / R, me = a.rank;
  const uint32_t seq = a.state[kSeq] + 1;
  for (int q = 0; q < R; ++q) {
    int32_t* dst = reinterpret_cast<int32_t*>(a.peers[q] + a.counts_offset) + static_cast<int64_t>(me) * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) dst[e] = a.expert_counts[e];
  }
  __syncthreads();
  signal_ranks(a, kCountFlag, seq);
  wait_for_ranks(a, kCountFlag, seq);

  const int32_t* counts = reinterpret_cast<const int32_t*>(a.peers[me] + a.counts_offset);  // [R][E]
  int32_t my_total = 0;
  for (int owner = 0; owner < R; ++owner) {
    int32_t carry = 0;
    for (int base = 0; base < L; base += blockDim.x) {
      const int j = base + threadIdx.x;
      int32_t total = 0;
      if (j < L)
        for (int q = 0; q < R; ++q) total += counts[static_cast<int64_t>(q) * E + owner * L + j];
      const int32_t excl = block_exclusive_sum(s_scratch, total, carry);
      if (j < L) s_excl[owner * L + j] = excl;
    }
    if (owner == me) my_total = carry;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t base = s_excl[e];
    for (int q = 0; q < me; ++q) base += counts[static_cast<int64_t>(q) * E + e];
    a.send_base[e] = base;
  }
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    int32_t start = s_excl[me * L + j];
    if (a.received_offsets != nullptr) a.received_offsets[j] = start;
    for (int q = 0; q < R; ++q) {
      a.segment_start[j * R + q] = start;
      start += counts[static_cast<int64_t>(q) * E + me * L + j];
    }
  }
  if (threadIdx.x == 0) {
    if (a.received_offsets != nullptr) a.received_offsets[L] = my_total;
    a.segment_start[L * R] = my_total;
  }
  // Each source's plan offset of my experts: an exclusive scan of its counts up to my last expert.
  for (int q = 0; q < R; ++q) {
    int32_t carry = 0;
    for (int base = 0; base < (me + 1) * L; base += blockDim.x) {
      const int e = base + threadIdx.x;
      const int32_t v = e < (me + 1) * L ? counts[static_cast<int64_t>(q) * E + e] : 0;
      const int32_t excl = block_exclusive_sum(s_scratch, v, carry);
      if (e >= me * L && e < (me + 1) * L) a.segment_source_row[(e - me * L) * R + q] = excl;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) a.state[kSeq] = seq;
}

constexpr int kCopyThreads = 256;
constexpr int kCopyUnroll = 4;

// One warp copies a row of `vectors` 16-byte words from src to dst (dst may be a peer's memory):
// kCopyUnroll loads in flight per lane before their stores.
__device__ __forceinline__ void copy_row(const uint4* src, uint4* dst, int64_t vectors) {
  const int lane = threadIdx.x & 31;
  for (int64_t v0 = lane; v0 < vectors; v0 += 32 * kCopyUnroll) {
    uint4 w[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t v = v0 + u * 32;
      if (v < vectors) w[u] = src[v];
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t v = v0 + u * 32;
      if (v < vectors) dst[v] = w[u];
    }
  }
}

// Every row of this rank's plan goes to its expert's owner: row r holds pair p = row_source[r], token
// p / k, expert e = topk_ids[p]; it lands at send_base[e] + (r - expert_offsets[e]) of the owner's
// received rows. The last block to finish signals every rank, then waits for every rank's rows.
__global__ void __launch_bounds__(kCopyThreads) ep_send_kernel(const EpLaunch a, const char* x, const int32_t* topk_ids) {
  const int L = a.num_experts / a.num_ranks;
  const int64_t rows = a.expert_offsets[a.num_experts];
  const int64_t vectors = a.row_bytes / 16;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kCopyThreads / 32);
  // Rows are in expert order, so in plan order every rank would send to rank 0 first, then all to rank
  // 1, ...: one receiver's links carry everything at a time. Starting at the next rank's rows (and
  // wrapping round, this rank's own last) makes the ranks send to different receivers at once.
  const int64_t start = rows > 0 ? a.expert_offsets[((a.rank + 1) % a.num_ranks) * L] : 0;
  for (int64_t i = blockIdx.x * (kCopyThreads / 32) + threadIdx.x / 32; i < rows; i += warps) {
    const int64_t r = (start + i) % rows;
    const int32_t pair = a.row_source[r];
    const int32_t e = topk_ids[pair];
    const int owner = e / L;
    const int32_t dest_row = a.send_base[e] + static_cast<int32_t>(r - a.expert_offsets[e]);
    // The token's first kept slot on the same owner holds the data there (every lane finds the same).
    const int32_t token_first = pair - pair % a.k;
    int32_t data_row = dest_row;
    for (int32_t q = token_first; q < pair; ++q) {
      const int32_t row_q = a.pair_row[q];
      const int32_t e_q = topk_ids[q];
      if (row_q >= 0 && e_q / L == owner) {
        data_row = a.send_base[e_q] + (row_q - a.expert_offsets[e_q]);
        break;
      }
    }
    char* peer = a.peers[owner];
    if ((threadIdx.x & 31) == 0) reinterpret_cast<int32_t*>(peer + a.expand_offset)[dest_row] = data_row;
    if (data_row != dest_row) continue;
    const uint4* src = reinterpret_cast<const uint4*>(x + (pair / a.k) * a.row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(peer + a.received_offset + static_cast<int64_t>(dest_row) * a.row_bytes);
    copy_row(src, dst, vectors);
  }
  if (!last_block_done(&a.state[kSendDone])) return;
  const uint32_t seq = a.state[kSeq];
  signal_ranks(a, kDataFlag, seq);
  wait_for_ranks(a, kDataFlag, seq);
}

// After every rank's rows arrived: each received row whose token's data was stored at another row of
// this rank (expand map) gets a copy of it. Map entries outside 0..rows are ignored (never an access
// outside the buffer).
__global__ void __launch_bounds__(kCopyThreads) ep_expand_kernel(const EpLaunch a) {
  const int segments = a.num_experts;  // (E / R) local experts x R sources
  const int64_t rows = a.segment_start[segments];
  const int64_t vectors = a.row_bytes / 16;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kCopyThreads / 32);
  char* own = a.peers[a.rank];
  const int32_t* map = reinterpret_cast<const int32_t*>(own + a.expand_offset);
  for (int64_t j = blockIdx.x * (kCopyThreads / 32) + threadIdx.x / 32; j < rows; j += warps) {
    const int32_t from = map[j];
    if (from == j || from < 0 || from >= rows) continue;
    const uint4* src = reinterpret_cast<const uint4*>(own + a.received_offset + from * a.row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(own + a.received_offset + j * a.row_bytes);
    copy_row(src, dst, vectors);
  }
}

// Every received row's expert output goes back to its source: received row i lies in segment
// g = (local expert, source) with segment_start[g] <= i < segment_start[g + 1], and lands at the
// source's plan row segment_source_row[g] + (i - segment_start[g]). Then signal and wait as in send.
__global__ void __launch_bounds__(kCopyThreads) ep_return_kernel(const EpLaunch a, const char* expert_out) {
  const int R = a.num_ranks, segments = (a.num_experts / R) * R;
  const int64_t rows = a.segment_start[segments];
  const int64_t vectors = a.row_bytes / 16;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kCopyThreads / 32);
  for (int64_t i = blockIdx.x * (kCopyThreads / 32) + threadIdx.x / 32; i < rows; i += warps) {
    int lo = 0, hi = segments;  // the last segment starting at or before i (skips empty ones)
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (a.segment_start[mid] <= i) lo = mid; else hi = mid;
    }
    const int64_t source_row = a.segment_source_row[lo] + (i - a.segment_start[lo]);
    const uint4* src = reinterpret_cast<const uint4*>(expert_out + i * a.row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(a.peers[lo % R] + a.returned_offset + source_row * a.row_bytes);
    copy_row(src, dst, vectors);
  }
  if (!last_block_done(&a.state[kReturnDone])) return;
  const uint32_t seq = a.state[kSeq];
  signal_ranks(a, kReturnedFlag, seq);
  wait_for_ranks(a, kReturnedFlag, seq);
}

}  // namespace
}  // namespace moek

using moek::EpLaunch;

extern "C" int moek_cuda_combine_preload(moek_dtype dtype);

// Loads, on the current device, every kernel that is launched while an earlier one of the same call may
// be spinning on a flag: the send, expand and return kernels and combine's. With lazy module loading (CUDA's
// default) a kernel's first launch waits for the device's running kernels; when one process drives all
// ranks, that wait would hold the host thread before it enqueues the other ranks' work, and the
// spinning kernel waits for exactly that work: a deadlock. Done once per device and dtype.
extern "C" int moek_cuda_ep_preload(moek_dtype dtype) {
  static std::atomic<uint32_t> loaded[64];  // per device: a bit per dtype
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  const uint32_t bit = 1u << (static_cast<int>(dtype) & 7);
  if (device >= 0 && device < 64 && (loaded[device].load() & bit) != 0) return cudaSuccess;
  cudaFuncAttributes attr;
  if ((e = cudaFuncGetAttributes(&attr, moek::ep_send_kernel)) != cudaSuccess) return e;
  if ((e = cudaFuncGetAttributes(&attr, moek::ep_expand_kernel)) != cudaSuccess) return e;
  if ((e = cudaFuncGetAttributes(&attr, moek::ep_return_kernel)) != cudaSuccess) return e;
  if ((e = static_cast<cudaError_t>(moek_cuda_combine_preload(dtype))) != cudaSuccess) return e;
  if (device >= 0 && device < 64) loaded[device].fetch_or(bit);
  return cudaSuccess;
}

extern "C" int moek_cuda_ep_counts(const EpLaunch* a, moek_dtype dtype, cudaStream_t stream) {
  const int loaded = moek_cuda_ep_preload(dtype);
  if (loaded != cudaSuccess) return loaded;
  // E <= MOEK_PLAN_MAX_EXPERTS (8192): at most 32.9 KB, under the default 48 KB limit.
  const size_t smem = (static_cast<size_t>(a->num_experts) + 33) * sizeof(int32_t);
  moek::ep_counts_kernel<<<1, 1024, smem, stream>>>(*a);
  return cudaGetLastError();
}

extern "C" int moek_cuda_ep_send(const EpLaunch* a, const void* x, const int32_t* topk_ids, int blocks,
                                 cudaStream_t stream) {
  moek::ep_send_kernel<<<blocks, moek::kCopyThreads, 0, stream>>>(*a, static_cast<const char*>(x), topk_ids);
  return cudaGetLastError();
}

extern "C" int moek_cuda_ep_expand(const EpLaunch* a, int blocks, cudaStream_t stream) {
  moek::ep_expand_kernel<<<blocks, moek::kCopyThreads, 0, stream>>>(*a);
  return cudaGetLastError();
}

extern "C" int moek_cuda_ep_return(const EpLaunch* a, const void* expert_out, int blocks, cudaStream_t stream) {
  moek::ep_return_kernel<<<blocks, moek::kCopyThreads, 0, stream>>>(*a, static_cast<const char*>(expert_out));
  return cudaGetLastError();
}
