// Expert parallelism inside one host: the kernels of dispatch and combine (src/ep/ checks the
// arguments, carves the workspace and runs the plan before these).
//
// Every rank owns a symmetric buffer the others can store into (peer access or CUDA IPC):
//   [0, 1024)                  flags, u32: count[R], data[R], returned[R] (flag[q] is written by rank q)
//   [counts_offset, ...)       per-expert counts of every rank's plan, int32 [R][E]
//   [received_offset, ...)     rows sent to this rank, grouped by local expert, then source rank
//   [returned_offset, ...)     partial sums returned to this rank, at its own plan's row of each head pair
//   [expand_offset, ...)       int32 per received row: the received row that holds its token's data
//   [members_offset, ...)      Member [k] per received row: for a token's first row here (its head), the
//                              received row and routing weight of each of its slots here, in slot order
// A token with several experts on one owner crosses NVLink once each way. Dispatch: the sender stores its
// row only at the head row there and, for every row, which row holds the data; the owner then copies the
// row to the others locally (ep_expand_kernel). Combine: the owner sums the token's expert outputs there,
// weighted, in slot order (ep_return_kernel) and returns one row per token and owner, not one per pair.
// For k = 8 of 256 experts on 4 ranks that is about 3.6 rows per token instead of 8, each way.
// A call's flags carry its sequence number (state[kSeq] + 1, counted per rank on the device), so no
// flag is ever reset and a captured graph replays correctly. Why no buffer is overwritten while still
// in use: a rank stores into a peer's counts, received rows or member lists only after that peer has
// signalled the matching call's counts, which it does after everything earlier on its stream (its
// previous combine included); returned rows likewise only after the peer's rows of the same call arrived.
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
  int64_t members_offset;   // Member [k] per received row (filled for head rows)
  int64_t num_pairs;        // T * k of this call (dispatch only)
  int64_t capacity;         // 0: contiguous layout; > 0: masked, rows per local expert
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
  int32_t* head_row;              // [T * k] this rank's plan row of each head pair, -1 for other pairs
  int32_t* received_counts;       // [L] rows each local expert keeps (this rank as owner)
};

// Masked layout: whether a row that would land at `row` of the owner's received rows for global expert
// `e` fits its expert's capacity (always, in the contiguous layout).
__device__ __forceinline__ bool row_kept(const EpLaunch& a, int32_t e, int32_t row) {
  const int L = a.num_experts / a.num_ranks;
  return a.capacity == 0 || row < (static_cast<int64_t>(e % L) + 1) * a.capacity;
}

// Masked layout: whether received row i is padding (past its expert's kept rows), whose map and member
// entries are stale and must not be read.
__device__ __forceinline__ bool padding_row(const EpLaunch& a, int64_t i) {
  return a.capacity > 0 && i % a.capacity >= a.received_counts[i / a.capacity];
}

// One entry of a head row's member list: a received row of the same token and its routing weight.
struct Member {
  int32_t row;  // -1: no more members
  float weight;
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
  // No pair is a head until the send step says so (dropped pairs never are): filled while the peers'
  // counts are on their way.
  for (int64_t p = threadIdx.x; p < a.num_pairs; p += blockDim.x) a.head_row[p] = -1;
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
  if (a.capacity == 0) {
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
      a.received_counts[j] = start - s_excl[me * L + j];
    }
    if (threadIdx.x == 0) {
      if (a.received_offsets != nullptr) a.received_offsets[L] = my_total;
      a.segment_start[L * R] = my_total;
    }
  } else {
    // Masked: local expert j owns rows [j * capacity, (j + 1) * capacity); a source's rows start after
    // the earlier sources' (rows at or past the capacity are dropped by the sender).
    const int64_t cap = a.capacity;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      int64_t base = static_cast<int64_t>(e % L) * cap;
      for (int q = 0; q < me; ++q) base += counts[static_cast<int64_t>(q) * E + e];
      a.send_base[e] = static_cast<int32_t>(min(base, static_cast<int64_t>(e % L + 1) * cap));
    }
    int32_t kept_total = 0;
    for (int base = 0; base < L; base += blockDim.x) {
      const int j = base + threadIdx.x;
      int32_t kept = 0;
      if (j < L) {
        int64_t start = 0;
        for (int q = 0; q < R; ++q) {
          a.segment_start[j * R + q] = static_cast<int32_t>(j * cap + min(start, cap));
          start += counts[static_cast<int64_t>(q) * E + me * L + j];
        }
        kept = static_cast<int32_t>(min(start, cap));
        a.received_counts[j] = kept;
        if (a.received_offsets != nullptr) a.received_offsets[j] = kept;
      }
      block_exclusive_sum(s_scratch, kept, kept_total);
    }
    if (threadIdx.x == 0) {
      if (a.received_offsets != nullptr) a.received_offsets[L] = kept_total;
      a.segment_start[L * R] = static_cast<int32_t>(L * cap);
    }
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

// How the copy steps cut a row over warps (chosen by src/ep/launch.rs, row_slices): `slices` warps per
// row, each `width` 16-byte vectors (the last one narrower). Few rows (decode) get several warps each, so
// that a row is one or two rounds of loads rather than seven: the rounds' latency is the copy's time there.
struct RowSlices {
  int64_t slices, width;
};

// Work item `w` of a copy step: row w / slices, vectors [begin, end) of it.
struct RowSlice {
  int64_t row, begin, end;
  bool first;  // the row's first slice (which writes the row's bookkeeping)
  __device__ RowSlice(int64_t w, const RowSlices& cut, int64_t vectors) {
    row = w / cut.slices;
    const int64_t slice = w - row * cut.slices;
    begin = slice * cut.width;
    end = min(begin + cut.width, vectors);
    first = slice == 0;
  }
};

// One warp copies 16-byte words [begin, end) from src to dst (dst may be a peer's memory): kCopyUnroll
// loads in flight per lane before their stores.
__device__ __forceinline__ void copy_range(const uint4* src, uint4* dst, int64_t begin, int64_t end) {
  const int lane = threadIdx.x & 31;
  for (int64_t v0 = begin + lane; v0 < end; v0 += 32 * kCopyUnroll) {
    uint4 w[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t v = v0 + u * 32;
      if (v < end) w[u] = src[v];
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t v = v0 + u * 32;
      if (v < end) dst[v] = w[u];
    }
  }
}

// Token `token`'s kept slots whose experts live on `owner`, in slot order, seen by one warp (slot
// base + lane in each round). Returns the row at the owner of the first of them (the head), the same in
// every lane. When that is `dest_row` and `list` is not NULL, the lanes holding the slots also write the
// head's member list (each slot's row at the owner and its routing weight; -1 after the last).
__device__ int32_t token_head_row(const EpLaunch& a, const int32_t* topk_ids, const float* weights, int32_t token,
                                  int owner, int32_t dest_row, Member* list) {
  const int lane = threadIdx.x & 31, L = a.num_experts / a.num_ranks;
  int32_t head_row = -1, listed = 0;
  for (int base = 0; base < a.k; base += 32) {  // k <= 64: at most two rounds
    const int slot = base + lane;
    bool member = false;
    int32_t row = -1;
    if (slot < a.k) {
      const int64_t q = static_cast<int64_t>(token) * a.k + slot;
      const int32_t plan_row = a.pair_row[q];
      const int32_t e = plan_row >= 0 ? topk_ids[q] : -1;  // kept pairs have ids in 0..E-1
      if (e >= 0 && e / L == owner) {
        row = a.send_base[e] + (plan_row - a.expert_offsets[e]);
        member = row_kept(a, e, row);
      }
    }
    const uint32_t mask = __ballot_sync(0xffffffffu, member);
    if (mask != 0 && head_row < 0) head_row = __shfl_sync(0xffffffffu, row, __ffs(mask) - 1);
    if (list != nullptr && head_row == dest_row && member) {
      const float w = weights != nullptr ? weights[static_cast<int64_t>(token) * a.k + slot] : 1.f;
      list[listed + __popc(mask & ((1u << lane) - 1))] = Member{row, w};
    }
    listed += __popc(mask);
  }
  if (list != nullptr && head_row == dest_row)
    for (int j = listed + lane; j < a.k; j += 32) list[j] = Member{-1, 0.f};
  return head_row;
}

// Every row of this rank's plan goes to its expert's owner: row r holds pair p = row_source[r], token
// p / k, expert e = topk_ids[p]; it lands at send_base[e] + (r - expert_offsets[e]) of the owner's
// received rows. Only the token's head row there gets the data, with the member list that combine sums
// by. The last block to finish signals every rank, then waits for every rank's rows.
__global__ void __launch_bounds__(kCopyThreads) ep_send_kernel(const EpLaunch a, const char* x, const int32_t* topk_ids,
                                                                const float* weights, const RowSlices cut) {
  const int L = a.num_experts / a.num_ranks;
  const int64_t rows = a.expert_offsets[a.num_experts];
  const int64_t vectors = a.row_bytes / 16;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kCopyThreads / 32);
  // Rows are in expert order, so in plan order every rank would send to rank 0 first, then all to rank
  // 1, ...: one receiver's links carry everything at a time. Starting at the next rank's rows (and
  // wrapping round, this rank's own last) makes the ranks send to different receivers at once.
  const int64_t start = rows > 0 ? a.expert_offsets[((a.rank + 1) % a.num_ranks) * L] : 0;
  for (int64_t w = blockIdx.x * (kCopyThreads / 32) + threadIdx.x / 32; w < rows * cut.slices; w += warps) {
    const RowSlice part(w, cut, vectors);
    const int64_t r = (start + part.row) % rows;
    const int32_t pair = a.row_source[r];
    const int32_t e = topk_ids[pair];
    const int owner = e / L;
    const int32_t dest_row = a.send_base[e] + static_cast<int32_t>(r - a.expert_offsets[e]);
    if (!row_kept(a, e, dest_row)) continue;  // masked layout, past the expert's capacity: dropped
    char* peer = a.peers[owner];
    Member* list = reinterpret_cast<Member*>(peer + a.members_offset) + static_cast<int64_t>(dest_row) * a.k;
    const int32_t head = token_head_row(a, topk_ids, weights, pair / a.k, owner, dest_row, part.first ? list : nullptr);
    if (part.first && (threadIdx.x & 31) == 0) reinterpret_cast<int32_t*>(peer + a.expand_offset)[dest_row] = head;
    if (head != dest_row) continue;  // warp-uniform: only the head row carries the data
    if (part.first && (threadIdx.x & 31) == 0) a.head_row[pair] = static_cast<int32_t>(r);
    const uint4* src = reinterpret_cast<const uint4*>(x + (pair / a.k) * a.row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(peer + a.received_offset + static_cast<int64_t>(dest_row) * a.row_bytes);
    copy_range(src, dst, part.begin, part.end);
  }
  if (!last_block_done(&a.state[kSendDone])) return;
  const uint32_t seq = a.state[kSeq];
  signal_ranks(a, kDataFlag, seq);
  wait_for_ranks(a, kDataFlag, seq);
}

// After every rank's rows arrived: each received row whose token's data was stored at another row of
// this rank (expand map) gets a copy of it. Map entries outside 0..rows are ignored (never an access
// outside the buffer).
__global__ void __launch_bounds__(kCopyThreads) ep_expand_kernel(const EpLaunch a, const RowSlices cut) {
  const int segments = a.num_experts;  // (E / R) local experts x R sources
  const int64_t rows = a.segment_start[segments];
  const int64_t vectors = a.row_bytes / 16;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kCopyThreads / 32);
  char* own = a.peers[a.rank];
  const int32_t* map = reinterpret_cast<const int32_t*>(own + a.expand_offset);
  for (int64_t w = blockIdx.x * (kCopyThreads / 32) + threadIdx.x / 32; w < rows * cut.slices; w += warps) {
    const RowSlice part(w, cut, vectors);
    const int64_t j = part.row;
    if (padding_row(a, j)) continue;
    const int32_t from = map[j];
    if (from == j || from < 0 || from >= rows) continue;
    const uint4* src = reinterpret_cast<const uint4*>(own + a.received_offset + from * a.row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(own + a.received_offset + j * a.row_bytes);
    copy_range(src, dst, part.begin, part.end);
  }
}

// For every token with rows here, the weighted sum of its expert outputs goes back to its source: head
// row i (expand map[i] == i) lies in segment g = (local expert, source) with segment_start[g] <= i <
// segment_start[g + 1]; the sum of its members' outputs, weight times output in slot order in fp32,
// rounded to T, lands at the source's plan row segment_source_row[g] + (i - segment_start[g]). Member
// rows outside 0..rows end the list (never an access outside the buffer). Then signal and wait as in send.
template <typename T>
__global__ void __launch_bounds__(kCopyThreads) ep_return_kernel(const EpLaunch a, const char* expert_out,
                                                                  const RowSlices cut) {
  using V = Vec16<T>;
  constexpr int kAhead = 4;  // members' vectors loaded before they are summed
  __shared__ Member s_members[kCopyThreads / 32][MOEK_PLAN_MAX_K];
  const int R = a.num_ranks, segments = (a.num_experts / R) * R;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t rows = a.segment_start[segments];
  const int64_t vectors = a.row_bytes / 16;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kCopyThreads / 32);
  const char* own = a.peers[a.rank];
  const int32_t* map = reinterpret_cast<const int32_t*>(own + a.expand_offset);
  const Member* lists = reinterpret_cast<const Member*>(own + a.members_offset);
  const uint4* y = reinterpret_cast<const uint4*>(expert_out);
  for (int64_t w = blockIdx.x * (kCopyThreads / 32) + threadIdx.x / 32; w < rows * cut.slices; w += warps) {
    const RowSlice part(w, cut, vectors);
    const int64_t i = part.row;
    if (padding_row(a, i) || map[i] != i) continue;  // not a head: its output is summed at its head (warp-uniform)
    int lo = 0, hi = segments;  // the last segment starting at or before i (skips empty ones)
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (a.segment_start[mid] <= i) lo = mid; else hi = mid;
    }
    const int64_t source_row = a.segment_source_row[lo] + (i - a.segment_start[lo]);
    int count = 0;  // members before the first invalid entry
    for (int j = lane; j < a.k; j += 32) s_members[warp][j] = lists[i * a.k + j];
    __syncwarp();
    while (count < a.k && s_members[warp][count].row >= 0 && s_members[warp][count].row < rows) ++count;
    uint4* dst = reinterpret_cast<uint4*>(a.peers[lo % R] + a.returned_offset + source_row * a.row_bytes);
    for (int64_t v = part.begin + lane; v < part.end; v += 32) {
      float acc[V::VEC];
#pragma unroll
      for (int e = 0; e < V::VEC; ++e) acc[e] = 0.f;
      for (int j0 = 0; j0 < count; j0 += kAhead) {
        uint4 value[kAhead];
#pragma unroll
        for (int j = 0; j < kAhead; ++j)
          if (j0 + j < count) value[j] = y[s_members[warp][j0 + j].row * vectors + v];
#pragma unroll
        for (int j = 0; j < kAhead; ++j) {
          if (j0 + j >= count) break;
          float f[V::VEC];
          V::unpack(value[j], f);
          const float w = s_members[warp][j0 + j].weight;
#pragma unroll
          for (int e = 0; e < V::VEC; ++e) acc[e] = fmaf(w, f[e], acc[e]);
        }
      }
      dst[v] = V::pack(acc);
    }
    __syncwarp();  // the list is read by every lane before the next row's overwrites it
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
  switch (dtype) {
    case MOEK_DTYPE_F32:
      e = cudaFuncGetAttributes(&attr, moek::ep_return_kernel<float>);
      break;
    case MOEK_DTYPE_BF16:
      e = cudaFuncGetAttributes(&attr, moek::ep_return_kernel<__nv_bfloat16>);
      break;
    default:
      e = cudaFuncGetAttributes(&attr, moek::ep_return_kernel<__half>);
      break;
  }
  if (e != cudaSuccess) return e;
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

extern "C" int moek_cuda_ep_send(const EpLaunch* a, const void* x, const int32_t* topk_ids, const float* topk_weights,
                                 int blocks, int64_t slices, int64_t width, cudaStream_t stream) {
  if (slices < 1 || width < 1) return cudaErrorInvalidValue;
  moek::ep_send_kernel<<<blocks, moek::kCopyThreads, 0, stream>>>(*a, static_cast<const char*>(x), topk_ids,
                                                                   topk_weights, moek::RowSlices{slices, width});
  return cudaGetLastError();
}

extern "C" int moek_cuda_ep_expand(const EpLaunch* a, int blocks, int64_t slices, int64_t width, cudaStream_t stream) {
  if (slices < 1 || width < 1) return cudaErrorInvalidValue;
  moek::ep_expand_kernel<<<blocks, moek::kCopyThreads, 0, stream>>>(*a, moek::RowSlices{slices, width});
  return cudaGetLastError();
}

extern "C" int moek_cuda_ep_return(const EpLaunch* a, moek_dtype dtype, const void* expert_out, int blocks,
                                   int64_t slices, int64_t width, cudaStream_t stream) {
  if (slices < 1 || width < 1) return cudaErrorInvalidValue;
  const char* out = static_cast<const char*>(expert_out);
  const moek::RowSlices cut{slices, width};
  switch (dtype) {
    case MOEK_DTYPE_F32:
      moek::ep_return_kernel<float><<<blocks, moek::kCopyThreads, 0, stream>>>(*a, out, cut);
      break;
    case MOEK_DTYPE_BF16:
      moek::ep_return_kernel<__nv_bfloat16><<<blocks, moek::kCopyThreads, 0, stream>>>(*a, out, cut);
      break;
    default:
      moek::ep_return_kernel<__half><<<blocks, moek::kCopyThreads, 0, stream>>>(*a, out, cut);
      break;
  }
  return cudaGetLastError();
}
