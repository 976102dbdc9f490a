// Plain top-k routing for rows of at most 256 experts and k <= 8, without a bias: the fast path of
// moek_cuda_route (route.cu picks it; route_kernel.cuh stays the general path).
//
// Why a second kernel: route_kernel spends about 85 thread instructions per logit (ncu: 1370 warp
// instructions per 4 tokens), so softmax top-8 of 128 was instruction-bound at a third of the copy
// bandwidth. Reading the logits at 60% of ~4.2 TB/s leaves ~30 instructions per logit (13 us x 132
// SMs x 4 schedulers x ~1.9 GHz x 32 lanes / 65536 x 128 logits, at ~75% of issue slots). This
// kernel is laid out for that budget; per lane (16 values, f32, softmax top-8 of 128, from the SASS):
//   row copy (cp.async, next token's) and its loads back               ~30
//   the lane's two best values (a tournament)                           44  (3 per value)
//   row max; exp2 sum (softmax without renormalisation); 1/sum          ~65 (3 per value)
//   threshold: the k-th largest of the group's 16 lane heads            ~60 (two 8-lane bitonic sorts)
//   candidate mask (value >= threshold), count, scan                    ~65
//   packing the candidates (18 per candidate; the warp waits for its    ~50
//   busiest lane, 2-3 on random data)
//   sorting the <= 16 candidates over the 8 lanes (bitonic, 64-bit)     ~110
//   weight and stores of the lane's output slot                          ~40
// about 470 a lane, ~30 a logit, against route_kernel's ~85. The threshold leaves few candidates: on
// uniform random logits (E = 128, k = 8) 8 in 54% of tokens, 8.7 in the mean, more than 16 in 5e-5
// (scripts/route-fast-sim.py simulates this selection; the same threshold from each lane's two best
// with 4 lanes a token would leave more than 16 in 21%).
//
// Layout: a token is handled by 8 consecutive lanes; the row's 16-byte chunks (VEC values) go to lane
// c % 8 (coalesced, as route_kernel), NV values a lane. The kernel is persistent: each lane copies
// its chunks of its next token into shared memory (cp.async, two row buffers) while it routes the
// current one, whose values it reads back into registers; the packing reads its few candidates from
// there again by a run-time index, which registers cannot take.
//
// Selection is exact, on the same packed (key, ~index) candidates as route_kernel (ties to the lower
// index): the threshold tau is a row value with at least k values >= it (k of the lane heads are), so
// every top-k value is a candidate; sorting the candidates puts the q-th best in lane q. Where that
// cannot run (more than 16 candidates: many equal logits; fewer than k: NaN; tau = -inf) the token
// takes k rounds of the group's best, which is exact for any data.
#pragma once

#include "mma_sm80.cuh"
#include "route_kernel.cuh"

#include <algorithm>
#include <atomic>
#include <cstdlib>

namespace moek {

constexpr int kFastLanes = 8;                    // lanes per token
constexpr int kFastMaxK = kFastLanes;            // output slot q is lane q's
constexpr int kFastCandidates = 2 * kFastLanes;  // sorted in one pass: two per lane
constexpr int kFastMaxValues = 32;               // values a lane: rows of up to 256 experts

// Threads per block: 32 tokens with 16 values a lane, 16 tokens with 32 (two row buffers of 1 KB a
// token for f32 then fit the 48 KB of static shared memory).
template <int NV>
constexpr int fast_block() {
  return NV <= 16 ? 256 : 128;
}

// Launches route_fast_kernel for logits of type T (route_f32.cu, route_bf16.cu); nv is 16 or 32, full
// whether every lane holds nv real values (the row has exactly 8 * nv experts).
template <typename T>
cudaError_t launch_route_fast(const RouteParams& p, int nv, bool full, cudaStream_t stream);

namespace route_fast_detail {

constexpr unsigned kWarp = 0xffffffffu;

// Shuffles among a token's 8 lanes for code every lane of the warp reaches together (or has left
// the kernel): a full-warp mask spares the divergence check the compiler adds around shuffles whose
// mask names only the group (a MATCH/REDUX/VOTE sequence per reduction in route_kernel's LaneGroup).
// Inside the group-divergent fallback, LaneGroup's own shuffles are used instead.
template <typename V>
__device__ __forceinline__ V xor8(V v, int offset) {
  return __shfl_xor_sync(kWarp, v, offset, kFastLanes);
}
template <typename V>
__device__ __forceinline__ V from_lane8(V v, int src) {
  return __shfl_sync(kWarp, v, src, kFastLanes);
}
__device__ __forceinline__ float max8(float v) {
#pragma unroll
  for (int o = 1; o < kFastLanes; o <<= 1) v = fmaxf(v, xor8(v, o));
  return v;
}
__device__ __forceinline__ float min8(float v) {
#pragma unroll
  for (int o = 1; o < kFastLanes; o <<= 1) v = fminf(v, xor8(v, o));
  return v;
}
__device__ __forceinline__ float sum8(float v) {
#pragma unroll
  for (int o = 1; o < kFastLanes; o <<= 1) v += xor8(v, o);
  return v;
}
__device__ __forceinline__ int exclusive_sum8(int v, int rank) {
  int inclusive = v;
#pragma unroll
  for (int o = 1; o < kFastLanes; o <<= 1) {
    const int up = __shfl_up_sync(kWarp, inclusive, o, kFastLanes);
    if (rank >= o) inclusive += up;
  }
  return inclusive - v;
}

// In step (size, j) of a bitonic sort over the 8 lanes, whether this lane keeps the larger of its
// value and lane (rank ^ j)'s. Blocks of `size` lanes alternate descending and ascending (the last
// block, size 8, descending; `ascending` flips the whole order).
__device__ __forceinline__ bool keeps_max(int rank, int size, int j, bool ascending) {
  return (((rank & size) == 0) == ((rank & j) == 0)) != ascending;
}

// The best and second best of W sorted pairs (a[i] >= b[i]), merged pairwise, level by level (a
// template recursion, so every index is a constant and the arrays stay in registers).
template <int W>
__device__ __forceinline__ void merge_pairs(float (&a)[W], float (&b)[W], float& t1, float& t2) {
  if constexpr (W == 1) {
    t1 = a[0];
    t2 = b[0];
  } else {
    float a2[W / 2], b2[W / 2];
#pragma unroll
    for (int i = 0; i < W / 2; ++i) {
      // Second best of two sorted pairs: the loser of the two heads, or the better second.
      a2[i] = fmaxf(a[2 * i], a[2 * i + 1]);
      b2[i] = fmaxf(fminf(a[2 * i], a[2 * i + 1]), fmaxf(b[2 * i], b[2 * i + 1]));
    }
    merge_pairs<W / 2>(a2, b2, t1, t2);
  }
}

// The two largest of x (t1 >= t2) by a tournament: 3N - 4 min/max instructions in log2(N) levels,
// not a chain of N. fmaxf/fminf skip NaN, so NaN values may duplicate a head (harmless: a threshold
// that is too high leaves fewer than k candidates, and the token takes the fallback).
template <int N>
__device__ __forceinline__ void top_two(const float (&x)[N], float& t1, float& t2) {
  static_assert(N >= 2 && (N & (N - 1)) == 0, "a power of two");
  float a[N / 2], b[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    a[i] = fmaxf(x[2 * i], x[2 * i + 1]);
    b[i] = fminf(x[2 * i], x[2 * i + 1]);
  }
  merge_pairs<N / 2>(a, b, t1, t2);
}

// The k-th largest (k <= 8) of the group's 16 heads, every lane's t1 and t2. Each list is sorted
// descending over the 8 lanes; the top k of both lists are then max(A[i], B[k-1-i]) for i < k (the
// first step of a bitonic merge), so their minimum is the k-th largest. The same in every lane.
__device__ __forceinline__ float kth_largest_head(int rank, float t1, float t2, int k) {
  float a = t1, b = t2;
#pragma unroll
  for (int size = 2; size <= kFastLanes; size <<= 1) {
#pragma unroll
    for (int j = size / 2; j > 0; j >>= 1) {
      const float oa = xor8(a, j), ob = xor8(b, j);
      const bool up = keeps_max(rank, size, j, false);
      a = up ? fmaxf(a, oa) : fminf(a, oa);
      b = up ? fmaxf(b, ob) : fminf(b, ob);
    }
  }
  const float b_mirror = from_lane8(b, max(k - 1 - rank, 0));
  return min8(rank < k ? fmaxf(a, b_mirror) : INFINITY);
}

// One compare-exchange step of a bitonic network over the 8 lanes, on packed candidates.
__device__ __forceinline__ uint64_t exchange(uint64_t v, int j, bool keep_max) {
  const uint64_t o = xor8(v, j);
  return (o > v) == keep_max ? o : v;
}

// The 8 best of 16 packed candidates, two a lane (a and b, 0 where none), the q-th best in lane q:
// a sorted descending and b ascending over the lanes make a bitonic sequence of 16, whose upper half
// max(a, b) is bitonic and holds the 8 best; three merge steps sort it.
__device__ __forceinline__ uint64_t best_eight(int rank, uint64_t a, uint64_t b) {
#pragma unroll
  for (int size = 2; size <= kFastLanes; size <<= 1) {
#pragma unroll
    for (int j = size / 2; j > 0; j >>= 1) {
      a = exchange(a, j, keeps_max(rank, size, j, false));
      b = exchange(b, j, keeps_max(rank, size, j, true));
    }
  }
  uint64_t c = max(a, b);
#pragma unroll
  for (int j = kFastLanes / 2; j > 0; j >>= 1) c = exchange(c, j, keeps_max(rank, kFastLanes, j, false));
  return c;
}

// Expert of slot s (chunk s / VEC, element s % VEC) of lane r, which holds chunks r + 8 i.
template <int VEC>
__device__ __forceinline__ uint32_t slot_expert(uint32_t r, uint32_t s) {
  return (r + (s / VEC) * kFastLanes) * VEC + s % VEC;
}

// ordered_key for a value known to be a number (not NaN), so the key is never 0.
__device__ __forceinline__ uint32_t number_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
}

}  // namespace route_fast_detail

// Routes token t (valid: t < T; an invalid token is routed too, from a copy of the last row, so that
// every lane of the warp runs every shuffle, and writes nothing). row: the token's row copy in shared
// memory (chunk c at c, the lane's own chunks present), cand: its candidate space.
template <typename T, int NV, bool FULL>
__device__ __forceinline__ void route_fast_token(const RouteParams& p, int64_t t, bool valid, const uint4* row,
                                                 uint64_t* cand, int r) {
  using namespace route_fast_detail;
  constexpr int L = kFastLanes;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CPL = NV / VEC;  // chunks per lane
  const int k = p.k;
  const bool softmax = p.score_function == MOEK_SCORE_SOFTMAX;
  const T* srow = reinterpret_cast<const T*>(row);

  // The lane's chunks r + 8 j; missing chunks (rows of fewer than 8 * CPL chunks) read as -inf.
  float x[NV];
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    const int c = r + j * L;
    const bool present = FULL || c < p.chunks_per_row;
    uint4 w = make_uint4(0, 0, 0, 0);
    if (present) w = row[c];
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int v = 0; v < VEC; ++v) x[j * VEC + v] = present ? to_float(e[v]) : -INFINITY;
  }

  float t1, t2;
  top_two(x, t1, t2);
  const float row_max = max8(t1);  // softmax: exp(x - row_max) * inv_sum is the score
  float inv_sum = 1.f;
  if (softmax && !p.renormalize) {
    // The row's sum needs every exponential: the approximate 2^x as route_kernel (relative error
    // ~1e-7 in a sum that only scales the weights); four partial sums for instruction parallelism.
    const float shift = row_max * kLog2e;
    float part[4];
#pragma unroll
    for (int s = 0; s < NV; ++s) {
      const float term = fast_exp2(fmaf(x[s], kLog2e, -shift));  // 0 for -inf
      part[s % 4] = s < 4 ? term : part[s % 4] + term;
    }
    inv_sum = 1.f / sum8((part[0] + part[1]) + (part[2] + part[3]));
  }

  // Candidates: values >= tau. tau is a real row value (k heads are >= it) unless the row has NaN or
  // -inf, so slots past the row (-inf) never qualify when tau > -inf.
  const float tau = kth_largest_head(r, t1, t2, k);
  uint32_t mask = 0;
#pragma unroll
  for (int s = 0; s < NV; ++s) mask |= (x[s] >= tau ? 1u : 0u) << s;
  const int own = __popc(mask);
  const int offset = exclusive_sum8(own, r);
  const int n = from_lane8(offset + own, L - 1);
  // Uniform over the group (tau and n are).
  const bool sorted = tau > -INFINITY && n >= k && n <= kFastCandidates;

  uint64_t a = 0, b = 0;  // this lane's candidates for the sort (0: none; real ones are never 0)
  if (sorted) {
    // Packed in lane order; a lane reads its own values back from its row copy.
    uint64_t* out = cand + offset;
    while (mask != 0) {
      const uint32_t s = 31 - __clz(mask);
      mask ^= 1u << s;
      const uint32_t e = slot_expert<VEC>(r, s);
      *out++ = pack_candidate(number_key(to_float(srow[e])), e);
    }
    __syncwarp(0xffu << (threadIdx.x & 24));
    if (r < n) a = cand[r];
    if (r + L < n) b = cand[r + L];
  }
  uint64_t best = best_eight(r, a, b);  // lane q: the q-th best (every group sorts, in step)
  if (!sorted) {
    // Exact for any data: k rounds, each taking the group's best packed candidate; only the lane
    // that held the winner rescans its keys (route_kernel's general selection, in registers).
    // The keys come from the row copy, so that x need not live across the sort.
    const LaneGroup<L> grp;
    uint32_t key[NV];
#pragma unroll
    for (int s = 0; s < NV; ++s) {
      const bool present = FULL || r + (s / VEC) * L < p.chunks_per_row;
      key[s] = present ? ordered_key(to_float(srow[slot_expert<VEC>(r, s)])) : 0u;
    }
    auto lane_best = [&]() {
      uint64_t m = 0;
#pragma unroll
      for (int s = 0; s < NV; ++s) m = max(m, pack_candidate(key[s], slot_expert<VEC>(r, s)));
      return m;
    };
    uint64_t local = lane_best();
    for (int q = 0; q < k; ++q) {
      const uint64_t win = grp.max(local);
      if (r == q) best = win;
      if (local == win) {
#pragma unroll
        for (int s = 0; s < NV; ++s) key[s] = slot_expert<VEC>(r, s) == candidate_index(win) ? 0u : key[s];
        local = lane_best();
      }
    }
  }

  // Lane q < k writes output slot q: its score, renormalised by the group-wide sum of the k selected
  // scores (a fixed tree order), then scaled; as route_kernel's output stage.
  const bool writes = valid && r < k;
  const float v = key_to_float(candidate_key(best));
  float score = 0.f;
  if (r < k) score = softmax ? expf(v - row_max) * inv_sum : 1.f / (1.f + expf(-v));
  if (p.renormalize) score /= sum8(score);
  if (writes) {
    const int64_t pair = t * k + r;
    const uint32_t e = candidate_index(best);
    p.ids[pair] = static_cast<int32_t>(e);
    p.weights[pair] = score * p.scale;
    if (p.capacity > 0) atomicAdd(p.chunk_counts + e * p.num_chunks + pair / p.chunk, 1);
  }
}


// FULL: every lane's chunks exist (E = 8 * NV), so no load needs a bound check.
// Persistent: block b routes tokens b * 32 + [0, 32), then the same plus gridDim.x * 32, and so on;
// each lane copies its chunks of the next token's row into shared memory with cp.async while it
// routes the current one (two row buffers), so loads and instructions overlap inside every warp
// rather than only across warps.
template <typename T, int NV, bool FULL>
__global__ void __launch_bounds__(fast_block<NV>()) route_fast_kernel(RouteParams p) {
  constexpr int L = kFastLanes;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CPL = NV / VEC;
  constexpr int TOKENS = fast_block<NV>() / L;
  static_assert(NV % VEC == 0 && NV <= kFastMaxValues, "whole chunks per lane");
  // Two row buffers (chunk c at c), and the candidates: one word of padding per token keeps the four
  // tokens of a warp on different banks.
  __shared__ __align__(16) uint4 s_row[2][TOKENS][CPL * L];
  __shared__ uint64_t s_cand[TOKENS][kFastCandidates + 1];

  const int r = threadIdx.x & (L - 1);
  const int tg = threadIdx.x / L;
  const int64_t num_tokens = p.num_tokens;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * TOKENS;
  // Copies this lane's chunks of token t's row (the last row for t past the end) into buffer b.
  auto fetch = [&](int b, int64_t t) {
    const uint4* src =
        reinterpret_cast<const uint4*>(static_cast<const T*>(p.logits) + min(t, num_tokens - 1) * p.num_experts);
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int c = r + j * L;
      if (FULL || c < p.chunks_per_row) {
        cp_async_16(smem_addr(&s_row[b][tg][c]), src + c, true);
      }
    }
  };
  int b = 0;
  int64_t base = static_cast<int64_t>(blockIdx.x) * TOKENS;
  fetch(b, base + tg);
  cp_async_commit();
  // invariant: base is the same in every thread of the block, so every warp runs whole iterations.
  for (; base < num_tokens; base += stride, b ^= 1) {
    if (base + stride < num_tokens) fetch(b ^ 1, base + stride + tg);
    cp_async_commit();   // an empty group past the last token keeps the wait below uniform
    cp_async_wait<1>();  // this lane's copies of the current row have landed (only it reads them)
    route_fast_token<T, NV, FULL>(p, base + tg, base + tg < num_tokens, s_row[b][tg], s_cand[tg], r);
    __syncwarp();  // the candidate space is reused by the next token
  }
}

// MOEK_ROUTE_FAST_BLOCKS_PER_SM=n (read once; for tuning runs): at most n resident blocks per SM
// (0: no cap from residency, one block per 32 or 16 tokens); unset or negative: as many as fit.
inline int fast_blocks_per_sm_knob() {
  static const int knob = [] {
    const char* v = std::getenv("MOEK_ROUTE_FAST_BLOCKS_PER_SM");
    return v != nullptr ? std::atoi(v) : -1;
  }();
  return knob;
}

// Blocks per SM that fit for this variant on the current device (asked once per device; 0 when it
// cannot be asked). No stream work, no synchronisation: safe while a graph is being captured.
template <typename T, int NV, bool FULL>
int fast_resident_blocks() {
  static std::atomic<int> cache[64];  // per device: 0 unknown, else the value + 1
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  int known = cache[device].load(std::memory_order_relaxed);
  if (known == 0) {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, route_fast_kernel<T, NV, FULL>, fast_block<NV>(), 0) !=
        cudaSuccess) {
      return 0;
    }
    known = blocks + 1;
    cache[device].store(known, std::memory_order_relaxed);
  }
  return known - 1;
}

// One block per 32 (or 16) tokens, but no more than the GPU holds at once (the kernel is persistent).
template <typename T, int NV, bool FULL>
cudaError_t launch_route_fast_variant(const RouteParams& p, cudaStream_t stream) {
  constexpr int tokens = fast_block<NV>() / kFastLanes;
  int64_t blocks = (p.num_tokens + tokens - 1) / tokens;
  const int knob = fast_blocks_per_sm_knob();
  if (knob != 0) {
    int per_sm = fast_resident_blocks<T, NV, FULL>();
    if (knob > 0) per_sm = std::min(per_sm, knob);
    const int sms = current_device_attribute<cudaDevAttrMultiProcessorCount>();
    if (per_sm > 0 && sms > 0) blocks = std::min(blocks, static_cast<int64_t>(per_sm) * sms);
  }
  route_fast_kernel<T, NV, FULL><<<static_cast<unsigned>(blocks), fast_block<NV>(), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_route_fast_variants(const RouteParams& p, int nv, bool full, cudaStream_t stream) {
  if (nv <= 16) {
    return full ? launch_route_fast_variant<T, 16, true>(p, stream) : launch_route_fast_variant<T, 16, false>(p, stream);
  }
  return full ? launch_route_fast_variant<T, 32, true>(p, stream) : launch_route_fast_variant<T, 32, false>(p, stream);
}

}  // namespace moek
