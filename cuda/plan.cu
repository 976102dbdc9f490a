// The permutation plan: a stable counting sort of (token, slot) pairs by expert, in at most two launches.
//
// The pairs are cut into `num_chunks` contiguous chunks (src/permute.rs picks the number: few enough that
// every block can afford to read every chunk's histogram). With more than one chunk, plan_count_kernel
// writes each chunk's per-expert histogram to the workspace; then plan_place_kernel, one block per chunk,
// (1) counts its chunk again per warp (each warp owns a contiguous slice of the chunk), (2) sums the
// chunk histograms into expert totals and into the expert's pairs in earlier chunks, (3) scans the padded
// totals into offsets (every block computes the same offsets; block 0 writes them out), and (4) places
// each pair at offset + pairs of its expert in earlier chunks + in earlier warps' slices + earlier in its
// own warp's slice, which is the pair's rank in pair order: the plan is deterministic. With one chunk
// the count kernel is skipped and the whole plan is one launch.
//
// That is the chunked path. For small T * k (src/permute.rs, plan_path) the fused path replaces the
// count kernel and step (1): plan_fused_kernel, one launch with the same chunks, has every block count
// all pairs itself with shared-memory atomics (before its chunk, after it, and per warp slice of its
// chunk), then run steps (2)-(4) as above. Both paths share steps (2)-(4) (lay_out_and_place), so their
// outputs are identical.
// The cluster path (sm_90 and later; src/permute.rs chooses it only when asked, MOEK_PLAN_PATH=cluster)
// is the chunked path in one launch of one thread-block cluster, one block per chunk (at most 16 chunks):
// each block counts its chunk per warp as in step (1), sums the warps into its chunk histogram in its
// own shared memory, and after a cluster barrier reads every block's histogram through distributed
// shared memory for step (2), then runs steps (3)-(4) (lay_out_and_place) as above. No count kernel,
// no workspace, no wait for a prerequisite grid and no global round trip for the histograms; the
// outputs are identical (the same integer sums, the same placement code).
// Arguments were validated by src/permute.rs.
#include <cooperative_groups.h>

#include <atomic>
#include <cstdlib>

#include "chunk_scan.cuh"
#include "common.cuh"
#include "moe_kernels.h"

namespace moek {
namespace {

constexpr int kCountThreads = 256;
// Shared memory the place kernel may use (opted in above the default 48 KB; sm_80 allows 163 KB).
constexpr int kPlaceSmemLimit = 160 * 1024;

// Chunk c of `pairs` pairs cut into num_chunks nearly equal chunks: [begin, end).
struct Chunk {
  int64_t begin, end;
  __device__ Chunk(int64_t pairs, int64_t num_chunks, int64_t c) {
    const int64_t len = (pairs + num_chunks - 1) / num_chunks;
    begin = min(c * len, pairs);
    end = min(begin + len, pairs);
  }
};

// Programmatic dependent launch (sm_90): the count kernel lets the place kernel start at once; the place
// kernel counts its own chunk (which needs only the ids) and then waits for the count kernel's results.
// Without the launch attribute (or before sm_90) the wait returns at once.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ bool valid_expert(int32_t id, int E) { return id >= 0 && id < E; }

// Per chunk: how many pairs go to each expert (hist[chunk * E + e]), and how many ids are out of range
// (bad[chunk]; MOEK_DROPPED_ID is not an error).
__global__ void __launch_bounds__(kCountThreads)
    plan_count_kernel(const int32_t* __restrict__ ids, int64_t pairs, int E, int64_t num_chunks, int32_t* hist,
                      int32_t* bad) {
  extern __shared__ int32_t s_hist[];
  __shared__ int32_t s_bad;
  allow_dependent_launch();
  for (int e = threadIdx.x; e < E; e += blockDim.x) s_hist[e] = 0;
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();
  const Chunk chunk(pairs, num_chunks, blockIdx.x);
  int32_t my_bad = 0;
  for (int64_t p = chunk.begin + threadIdx.x; p < chunk.end; p += blockDim.x) {
    const int32_t id = __ldg(ids + p);
    if (valid_expert(id, E)) {
      atomicAdd(&s_hist[id], 1);
    } else {
      my_bad += id != MOEK_DROPPED_ID;
    }
  }
  if (my_bad != 0) atomicAdd(&s_bad, my_bad);
  __syncthreads();
  int32_t* out = hist + static_cast<int64_t>(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) out[e] = s_hist[e];
  if (threadIdx.x == 0) bad[blockIdx.x] = s_bad;
}

struct PlaceArgs {
  const int32_t* ids;
  int64_t pairs;
  int E, capacity, align, ranks;
  int64_t num_chunks;
  const int32_t* hist;  // [num_chunks][E] (num_chunks > 1)
  const int32_t* bad;   // [num_chunks] (num_chunks > 1)
  int32_t *expert_counts, *expert_offsets, *rank_counts, *rank_offsets, *row_source, *pair_row, *error_count;
};

// Shared memory of the place and fused kernels, carved from one dynamic array.
struct PlaceSmem {
  int32_t* offset;   // [E]: first row of each expert
  int32_t* slice;    // [warps][E]: pairs of the expert in the warp's slice, then its position base
  int32_t* scratch;  // [blockDim]: scans and partial sums
  int32_t* before;   // [E] (fused kernel only): the expert's pairs in earlier chunks
  int32_t* after;    // [E] (fused kernel only): the expert's pairs in later chunks
  __device__ PlaceSmem(int32_t* base, int E, int warps, int threads)
      : offset(base),
        slice(base + E),
        scratch(base + E + warps * E),
        before(scratch + threads),
        after(before + E) {}
  static size_t bytes(int E, int warps, int threads, bool fused) {
    return sizeof(int32_t) * (static_cast<size_t>(E) * (1 + warps + (fused ? 2 : 0)) + threads);
  }
};

// The warp's slice of the chunk: [begin, end).
__device__ __forceinline__ void warp_slice(const Chunk& chunk, int warps, int warp, int64_t& begin, int64_t& end) {
  const int64_t len = (chunk.end - chunk.begin + warps - 1) / warps;
  begin = min(chunk.begin + warp * len, chunk.end);
  end = min(begin + len, chunk.end);
}

// Lanes whose key equals this lane's (keys in 0..max_key): one ballot per bit of the key. (A warp-level
// multisplit: uniform code, where __match_any_sync is slower on this data.)
__device__ __forceinline__ unsigned lanes_with_same_key(uint32_t key, int bits) {
  unsigned same = 0xffffffffu;
  for (int b = 0; b < bits; ++b) {
    const bool set = (key >> b) & 1u;
    const unsigned ballot = __ballot_sync(0xffffffffu, set);
    same &= set ? ballot : ~ballot;
  }
  return same;
}

// Walks the warp's slice 32 pairs at a time, in pair order. counters[e] counts the expert's pairs seen
// so far (plus whatever it started at); visit(p, id, position) is called for every pair p of the slice
// with its expert id (-1 when out of range or dropped) and counters[id] + the pairs of the same expert
// earlier in this step, i.e. its position in pair order. Ids are loaded kBatch steps ahead, so a warp
// has kBatch loads in flight instead of one. Returns this lane's count of out-of-range ids.
constexpr int kBatch = 8;
template <typename Visit>
__device__ __forceinline__ int32_t walk_slice(const int32_t* __restrict__ ids, int64_t begin, int64_t end, int E,
                                              int32_t* counters, Visit visit) {
  const int lane = threadIdx.x & 31;
  const int bits = 32 - __clz(E);  // keys are id + 1 in 0..E (0: no expert)
  int32_t bad = 0;
  for (int64_t base = begin; base < end; base += 32 * kBatch) {
    int32_t id[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t p = base + j * 32 + lane;
      id[j] = p < end ? __ldg(ids + p) : MOEK_DROPPED_ID;
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (base + j * 32 >= end) break;  // warp-uniform
      const int64_t p = base + j * 32 + lane;
      const bool valid = valid_expert(id[j], E);
      bad += !valid && id[j] != MOEK_DROPPED_ID;
      const int32_t key = valid ? id[j] : -1;
      const unsigned same = lanes_with_same_key(static_cast<uint32_t>(key + 1), bits);
      const int32_t rank = __popc(same & ((1u << lane) - 1));
      const int32_t position = key >= 0 ? counters[key] + rank : -1;
      __syncwarp();  // every lane has read its counter before the group's first lane moves it on
      if (key >= 0 && rank == 0) counters[key] += __popc(same);
      __syncwarp();
      if (p < end) visit(p, key, position);
    }
  }
  return bad;
}

// Adds the expert's count in chunks first, first + stride, ... to total, and those of chunks before this
// block's to before. The loads go out kBatch at a time: this is a chain of L2 reads otherwise.
__device__ __forceinline__ void sum_chunks(const PlaceArgs& a, int e, int64_t first, int stride, int32_t& total,
                                           int32_t& before) {
  for (int64_t c0 = first; c0 < a.num_chunks; c0 += kBatch * stride) {
    int32_t n[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t c = c0 + j * stride;
      n[j] = c < a.num_chunks ? __ldg(a.hist + c * a.E + e) : 0;
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      total += n[j];
      before += c0 + j * stride < blockIdx.x ? n[j] : 0;
    }
  }
}

// What both plan kernels do once every warp's slice is counted (s.slice[w][e]: the expert's pairs in
// warp w's slice of this block's chunk): per expert, the total and the pairs before the chunk come from
// totals(e, total, before), which every thread calls once per round of blockDim experts (e >= E
// included, so that it may synchronise the block); then the offsets (every block computes the same;
// block 0 writes them, the counts, the padding rows and the rank sums) and each warp's position base;
// then every pair of the warp's slice [begin, end) is placed, in order. laid_out() is called by every
// thread once the offsets are known (every value totals() returned has been used by then).
struct Nothing {
  __device__ void operator()() const {}
};
// Step (2)'s partial sums, `split` threads per expert (thread e + j * E holds the j-th part), gathered
// through scratch into expert e's total and earlier-chunks count. Every thread of the block calls it.
__device__ __forceinline__ void gather_split_partials(const PlaceSmem& s, int E, int split, int e, int32_t part_total,
                                                      int32_t part_before, int32_t& total, int32_t& before) {
  s.scratch[threadIdx.x] = part_total;
  __syncthreads();
  if (e < E) {
    for (int j = 0; j < split; ++j) total += s.scratch[j * E + e];
  }
  __syncthreads();
  s.scratch[threadIdx.x] = part_before;
  __syncthreads();
  if (e < E) {
    for (int j = 0; j < split; ++j) before += s.scratch[j * E + e];
  }
  __syncthreads();
}

template <typename Totals, typename LaidOut = Nothing>
__device__ __forceinline__ void lay_out_and_place(const PlaceArgs& a, const PlaceSmem& s, int64_t begin, int64_t end,
                                                  int32_t* my_slice, Totals totals, LaidOut laid_out = {}) {
  const int warps = blockDim.x / 32;
  const int E = a.E;
  // The scan below needs the whole block in step; experts are taken blockDim at a time.
  int32_t carry = 0;
  for (int base = 0; base < E; base += blockDim.x) {
    const int e = base + threadIdx.x;
    int32_t total = 0, before = 0;
    totals(e, total, before);
    int32_t kept = 0, padded = 0;
    if (e < E) {
      kept = a.capacity > 0 ? min(total, a.capacity) : total;
      padded = (kept + a.align - 1) / a.align * a.align;
      // Position of the first pair of each warp's slice among the expert's pairs.
      int32_t running = before;
      for (int w = 0; w < warps; ++w) {
        const int32_t n = s.slice[w * E + e];
        s.slice[w * E + e] = running;
        running += n;
      }
    }
    const int32_t offset = block_exclusive_sum(s.scratch, padded, carry);
    if (e < E) {
      s.offset[e] = offset;
      if (blockIdx.x == 0) {
        a.expert_counts[e] = kept;
        a.expert_offsets[e] = offset;
        for (int32_t row = offset + kept; row < offset + padded; ++row) a.row_source[row] = -1;
      }
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) a.expert_offsets[E] = carry;
  __syncthreads();  // offsets, slice bases and (block 0) expert_counts visible to the whole block
  laid_out();

  // Block 0: per-rank sums.
  if (blockIdx.x == 0 && a.ranks > 1) {
    const int per = E / a.ranks;
    for (int r = threadIdx.x; r < a.ranks; r += blockDim.x) {
      int32_t sum = 0;
      for (int e = r * per; e < (r + 1) * per; ++e) sum += a.expert_counts[e];
      a.rank_counts[r] = sum;
      a.rank_offsets[r] = s.offset[r * per];
    }
    if (threadIdx.x == 0) a.rank_offsets[a.ranks] = carry;
  }

  // Place every pair of the slice, in order; pairs without a valid id or past the capacity get -1.
  walk_slice(a.ids, begin, end, E, my_slice, [&](int64_t p, int32_t id, int32_t position) {
    if (id < 0 || (a.capacity > 0 && position >= a.capacity)) {
      a.pair_row[p] = -1;
    } else {
      const int32_t row = s.offset[id] + position;
      a.row_source[row] = static_cast<int32_t>(p);
      a.pair_row[p] = row;
    }
  });
}

// The chunked path's second kernel, one block per chunk (see the top of the file).
// Launch bounds: MOEK_PLAN_WARPS=32 must fit the register file (64 registers a thread).
__global__ void __launch_bounds__(1024) plan_place_kernel(PlaceArgs a) {
  extern __shared__ int32_t smem[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32;
  const int E = a.E;
  const PlaceSmem s(smem, E, warps, blockDim.x);
  const Chunk chunk(a.pairs, a.num_chunks, blockIdx.x);
  int64_t begin, end;
  warp_slice(chunk, warps, warp, begin, end);
  int32_t* my_slice = s.slice + warp * E;

  // (1) Per-warp histogram of the slice.
  __shared__ int32_t s_bad;  // out-of-range ids of the chunk (used with one chunk)
  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) s.slice[i] = 0;
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();
  const int32_t lane_bad = walk_slice(a.ids, begin, end, E, my_slice, [](int64_t, int32_t, int32_t) {});
  if (a.num_chunks == 1 && lane_bad != 0) atomicAdd(&s_bad, lane_bad);
  wait_for_prerequisite_grid();  // the chunk histograms (num_chunks > 1) are complete from here on
  __syncthreads();

  // Block 0: the error count.
  if (blockIdx.x == 0 && warp == 0) {
    int32_t bad = 0;
    if (a.num_chunks > 1) {
      for (int64_t c = threadIdx.x; c < a.num_chunks; c += 32) bad += a.bad[c];
    } else if (threadIdx.x == 0) {
      bad = s_bad;
    }
    for (int off = 16; off > 0; off >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, off);
    if (threadIdx.x == 0) *a.error_count = bad;
  }

  // (2) Per expert: total pairs and pairs in earlier chunks. With several chunks, `split` threads share
  // an expert, each summing every split-th chunk histogram; partial sums meet in scratch.
  const int split = a.num_chunks > 1 && E <= static_cast<int>(blockDim.x) / 2 ? blockDim.x / E : 1;
  int32_t part_total = 0, part_before = 0;
  if (a.num_chunks > 1 && split > 1 && static_cast<int>(threadIdx.x) < split * E) {
    sum_chunks(a, threadIdx.x % E, threadIdx.x / E, split, part_total, part_before);
  }
  // (3), (4): offsets, then placement.
  lay_out_and_place(a, s, begin, end, my_slice, [&](int e, int32_t& total, int32_t& before) {
    if (a.num_chunks > 1 && split > 1) {
      // split > 1 means E <= blockDim / 2: one round, partials gathered through scratch.
      gather_split_partials(s, E, split, e, part_total, part_before, total, before);
    } else if (e < E) {
      if (a.num_chunks > 1) {
        sum_chunks(a, e, 0, 1, total, before);
      } else {
        for (int w = 0; w < warps; ++w) total += s.slice[w * E + e];
      }
    }
  });
}

// Most blocks of a cluster (sm_90 allows 16 with the non-portable cluster size attribute).
constexpr int kMaxClusterBlocks = 16;

// The cluster path's kernel: one cluster of num_chunks (2..16) blocks, one block per chunk (see the top
// of the file). Compiled for sm_90 and later only; src/permute.rs and moek_cuda_plan never launch it on
// an older device.
__global__ void __launch_bounds__(1024) plan_cluster_kernel(PlaceArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ int32_t smem[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32;
  const int E = a.E;
  const int blocks = static_cast<int>(a.num_chunks);  // the cluster is the grid: rank == blockIdx.x
  const PlaceSmem s(smem, E, warps, blockDim.x);
  int32_t* chunk_hist = s.before;  // [E]: the expert's pairs in this block's chunk, read by every block
  const Chunk chunk(a.pairs, a.num_chunks, blockIdx.x);
  int64_t begin, end;
  warp_slice(chunk, warps, warp, begin, end);
  int32_t* my_slice = s.slice + warp * E;

  // (1) Per-warp histogram of the slice, then the chunk's histogram and out-of-range count.
  __shared__ int32_t s_bad;
  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) s.slice[i] = 0;
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();
  const int32_t lane_bad = walk_slice(a.ids, begin, end, E, my_slice, [](int64_t, int32_t, int32_t) {});
  if (lane_bad != 0) atomicAdd(&s_bad, lane_bad);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t n = 0;
    for (int w = 0; w < warps; ++w) n += s.slice[w * E + e];
    chunk_hist[e] = n;
  }
  cluster.sync();  // every block's chunk_hist and s_bad are complete and visible to the cluster

  // Block 0: the error count, from every block's s_bad.
  if (blockIdx.x == 0 && warp == 0) {
    const int lane = threadIdx.x;
    int32_t bad = lane < blocks ? *cluster.map_shared_rank(&s_bad, static_cast<unsigned>(lane)) : 0;
    for (int off = 16; off > 0; off >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, off);
    if (lane == 0) *a.error_count = bad;
  }

  // (2) Per expert: total pairs and pairs in earlier chunks, from the blocks' chunk histograms (all
  // loads of a thread issued before any is used). As in plan_place_kernel, `split` threads share an
  // expert when E <= blockDim / 2, each reading every split-th block; partial sums meet in scratch.
  auto sum_blocks = [&](int e, int first, int stride, int32_t& total, int32_t& before) {
    int32_t n[kMaxClusterBlocks];
#pragma unroll
    for (int j = 0; j < kMaxClusterBlocks; ++j) {
      const int r = first + j * stride;
      n[j] = r < blocks ? cluster.map_shared_rank(chunk_hist, static_cast<unsigned>(r))[e] : 0;
    }
#pragma unroll
    for (int j = 0; j < kMaxClusterBlocks; ++j) {
      total += n[j];
      before += first + j * stride < static_cast<int>(blockIdx.x) ? n[j] : 0;
    }
  };
  const int split = E <= static_cast<int>(blockDim.x) / 2 ? blockDim.x / E : 1;
  int32_t part_total = 0, part_before = 0;
  if (split > 1 && static_cast<int>(threadIdx.x) < split * E) {
    sum_blocks(threadIdx.x % E, threadIdx.x / E, split, part_total, part_before);
  }
  // (3), (4): offsets, then placement. Once the offsets are known this block reads no other block's
  // shared memory: it arrives at the exit barrier then (relaxed: every value it loaded from the cluster
  // has been used, and nothing it wrote need be seen), and waits for the others only at its end.
  const auto done_reading = [] { asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory"); };
  const auto totals = [&](int e, int32_t& total, int32_t& before) {
    if (split > 1) {
      // One round (E <= blockDim / 2), partials gathered through scratch.
      gather_split_partials(s, E, split, e, part_total, part_before, total, before);
    } else if (e < E) {
      sum_blocks(e, 0, 1, total, before);
    }
  };
  lay_out_and_place(a, s, begin, end, my_slice, totals, done_reading);
  // No block's shared memory goes away while another block may still read it.
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#else
  __trap();  // never launched before sm_90
#endif
}

// Calls f(p, id) for every pair p of the block's stride (p = threadIdx.x, + blockDim, ...), ids loaded
// kBatch 16-byte vectors at a time where `ids` is 16-byte aligned (one round of memory latency for 32
// ids a thread instead of one per id).
template <typename F>
__device__ __forceinline__ void for_each_id(const int32_t* __restrict__ ids, int64_t pairs, F f) {
  const bool aligned = (reinterpret_cast<uintptr_t>(ids) & 15) == 0;
  const int64_t quads = aligned ? pairs / 4 : 0;
  const int4* ids4 = reinterpret_cast<const int4*>(ids);
  for (int64_t q0 = threadIdx.x; q0 < quads; q0 += static_cast<int64_t>(blockDim.x) * kBatch) {
    int4 v[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t q = q0 + j * static_cast<int64_t>(blockDim.x);
      if (q < quads) v[j] = __ldg(ids4 + q);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t q = q0 + j * static_cast<int64_t>(blockDim.x);
      if (q < quads) {
        f(4 * q, v[j].x);
        f(4 * q + 1, v[j].y);
        f(4 * q + 2, v[j].z);
        f(4 * q + 3, v[j].w);
      }
    }
  }
  for (int64_t p = 4 * quads + threadIdx.x; p < pairs; p += blockDim.x) f(p, __ldg(ids + p));
}

// The fused path: the whole plan in one launch, one block per chunk and no workspace. Every block
// counts every pair itself (shared-memory atomics: integer counts, so their order does not matter):
// pairs before its chunk, after it, and per warp slice of its own chunk. That costs each block a read
// of all ids, which is cheap for small T * k and removes the count kernel, the wait for it and the
// reads of its histograms (a chain of latencies that is most of the chunked path's time there).
// Launch bounds: 32 warps must fit the register file (65536 / 1024 threads = 64 registers each).
__global__ void __launch_bounds__(1024) plan_fused_kernel(PlaceArgs a) {
  extern __shared__ int32_t smem[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32;
  const int E = a.E;
  const PlaceSmem s(smem, E, warps, blockDim.x);
  const Chunk chunk(a.pairs, a.num_chunks, blockIdx.x);
  int64_t begin, end;
  warp_slice(chunk, warps, warp, begin, end);
  int32_t* my_slice = s.slice + warp * E;

  __shared__ int32_t s_bad;  // out-of-range ids of all pairs (used by block 0)
  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) s.slice[i] = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s.before[e] = s.after[e] = 0;
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();
  // Pairs of the chunk: warp w's slice is [begin + w * len, + len) (warp_slice); 32-bit offsets, as
  // pair indices are (src/permute.rs checks T * k < 2^31).
  const uint32_t len = static_cast<uint32_t>((chunk.end - chunk.begin + warps - 1) / warps);
  int32_t bad = 0;
  for_each_id(a.ids, a.pairs, [&](int64_t p, int32_t id) {
    if (!valid_expert(id, E)) {
      bad += id != MOEK_DROPPED_ID;
      return;
    }
    int32_t* counter = p < chunk.begin ? s.before + id
                       : p >= chunk.end
                           ? s.after + id
                           : s.slice + (static_cast<uint32_t>(p - chunk.begin) / len) * E + id;
    atomicAdd(counter, 1);
  });
  if (blockIdx.x == 0) {
    for (int off = 16; off > 0; off >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, off);
    if ((threadIdx.x & 31) == 0 && bad != 0) atomicAdd(&s_bad, bad);
  }
  __syncthreads();
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.error_count = s_bad;
  lay_out_and_place(a, s, begin, end, my_slice, [&](int e, int32_t& total, int32_t& before) {
    if (e < E) {
      before = s.before[e];
      total = before + s.after[e];
      for (int w = 0; w < warps; ++w) total += s.slice[w * E + e];
    }
  });
}

// Whether to overlap the place kernel's start with the count kernel: on sm_90 and later, unless
// MOEK_PLAN_PDL=0 (a tuning knob, read once).
bool programmatic_launch() {
  static const bool enabled = [] {
    const char* v = std::getenv("MOEK_PLAN_PDL");
    return v == nullptr || std::atoi(v) != 0;
  }();
  if (!enabled) return false;
  return current_device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9;
}

// Warps per block of the place kernel: 16 by default; MOEK_PLAN_WARPS (1..32) overrides it for tuning.
// The fused kernel: 32 by default (its blocks read every id), MOEK_PLAN_FUSED_WARPS (1..32).
int max_warps(bool fused) {
  auto read = [](const char* name, int fallback) {
    const char* v = std::getenv(name);
    const int w = v != nullptr ? std::atoi(v) : 0;
    return w >= 1 && w <= 32 ? w : fallback;
  };
  static const int place = read("MOEK_PLAN_WARPS", 16);
  static const int fused_warps = read("MOEK_PLAN_FUSED_WARPS", 32);
  return fused ? fused_warps : place;
}

// Warps of the place, fused or cluster kernel: as many as the shared-memory limit allows, at most
// max_warps() (the cluster kernel takes the place kernel's, MOEK_PLAN_WARPS). `extra`: the layout with
// the two extra [E] arrays (fused: before and after; cluster: the chunk histogram).
int place_warps(int E, bool fused, bool extra) {
  for (int w = max_warps(fused); w > 1; --w) {
    if (PlaceSmem::bytes(E, w, 32 * w, extra) <= kPlaceSmemLimit) return w;
  }
  return 1;
}

// Makes `config` launch its whole grid (along x) as one thread-block cluster; `attr` is the attribute's
// storage, which the config points at.
void as_one_cluster(cudaLaunchConfig_t& config, cudaLaunchAttribute& attr) {
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = config.gridDim.x;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
}

// Whether a cluster of `blocks` blocks of the cluster kernel can run on this device (sm_90 and later,
// and the occupancy calculator finds room for one such cluster). Remembered per configuration (the
// last one asked, per thread: a plan's shape rarely changes between calls).
bool cluster_fits(int blocks, int threads, size_t smem) {
  if (current_device_attribute<cudaDevAttrComputeCapabilityMajor>() < 9) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  struct Key {
    int device, blocks, threads;
    size_t smem;
    bool fits;
  };
  thread_local Key last = {-1, 0, 0, 0, false};
  if (last.device == device && last.blocks == blocks && last.threads == threads && last.smem == smem) {
    return last.fits;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute cluster;
  as_one_cluster(config, cluster);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, plan_cluster_kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the fallback launch reports its own status
    return false;              // not remembered: the next call asks again
  }
  const bool fits = clusters >= 1;
  last = {device, blocks, threads, smem, fits};
  return fits;
}

}  // namespace
}  // namespace moek

// Workspace (chunked path): hist[num_chunks][E], then bad[num_chunks] (unused with one chunk). The fused
// and cluster paths (src/permute.rs, plan_path, chooses; `path`: 0 chunked, 1 fused, 2 cluster) use
// none. The cluster path takes 2..16 chunks on sm_90 and later; elsewhere (one chunk, an older device,
// no room for the cluster) it runs the chunked path with the same chunks, whose workspace
// src/permute.rs sizes for at least that many.
extern "C" int moek_cuda_plan(const moek_plan_args* a, int64_t num_chunks, int path, cudaStream_t stream) {
  using namespace moek;
  const int E = a->num_experts;
  const int64_t pairs = a->num_tokens * a->k;
  if (num_chunks < 1 || path < 0 || path > 2) return cudaErrorInvalidValue;
  const bool fused = path == 1;
  int32_t* hist = static_cast<int32_t*>(a->workspace);
  int32_t* bad = hist + num_chunks * E;
  bool cluster = false;
  int warps = 0;
  size_t smem = 0;
  if (path == 2 && num_chunks > 1 && num_chunks <= kMaxClusterBlocks) {
    warps = place_warps(E, false, true);
    smem = PlaceSmem::bytes(E, warps, 32 * warps, true);
    if (num_chunks > 8) {  // above the portable cluster size
      const cudaError_t err =
          cudaFuncSetAttribute(plan_cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
      if (err != cudaSuccess) return err;
    }
    if (smem > 48 * 1024) {
      const cudaError_t err = allow_max_dynamic_smem(plan_cluster_kernel);
      if (err != cudaSuccess) return err;
    }
    cluster = cluster_fits(static_cast<int>(num_chunks), 32 * warps, smem);
  }
  if (!cluster) {
    warps = place_warps(E, fused, fused);
    smem = PlaceSmem::bytes(E, warps, 32 * warps, fused);
  }
  if (num_chunks > 1 && !fused && !cluster) {
    plan_count_kernel<<<static_cast<unsigned>(num_chunks), kCountThreads, E * sizeof(int32_t), stream>>>(
        a->topk_ids, pairs, E, num_chunks, hist, bad);
  }
  auto kernel = cluster ? plan_cluster_kernel : fused ? plan_fused_kernel : plan_place_kernel;
  if (!cluster && smem > 48 * 1024) {  // above the default limit: opt in (per device, so on every such call)
    const cudaError_t err = allow_max_dynamic_smem(kernel);
    if (err != cudaSuccess) return err;
  }
  PlaceArgs p;
  p.ids = a->topk_ids;
  p.pairs = pairs;
  p.E = E;
  p.capacity = a->capacity;
  p.align = a->row_align;
  p.ranks = a->num_ranks > 1 ? a->num_ranks : 0;
  p.num_chunks = num_chunks;
  p.hist = hist;
  p.bad = bad;
  p.expert_counts = a->expert_counts;
  p.expert_offsets = a->expert_offsets;
  p.rank_counts = a->rank_counts;
  p.rank_offsets = a->rank_offsets;
  p.row_source = a->row_source;
  p.pair_row = a->pair_row;
  p.error_count = a->error_count;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(num_chunks));
  config.blockDim = dim3(32 * warps);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  if (cluster) {
    as_one_cluster(config, attr[0]);
  } else if (num_chunks > 1 && !fused && programmatic_launch()) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, p);
  return err != cudaSuccess ? err : cudaGetLastError();
}
