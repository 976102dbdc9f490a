// Plain top-k routing for rows of at most 256 experts and k <= 8, without a bias: the fast path of
// moek_cuda_route (route.cu picks it; route_kernel.cuh stays the general path).
//
// Why a second kernel: route_kernel spends about 85 thread instructions per logit (ncu: 1370 warp
// instructions per 4 tokens), so softmax top-8 of 128 was instruction-bound at a third of the copy
// bandwidth. Reading the logits at 60% of ~4.2 TB/s leaves ~30 instructions per logit. Per lane
// (16 values, f32, softmax top-8 of 128, SASS of the common path, 2 packing rounds, n = 10):
//   row copy (cp.async, next token's, running offsets) and its loads back   ~35
//   the lane's two best values (a tournament)                                47
//   row max; exp2 sum (softmax without renormalisation); 1/sum              ~82
//   threshold: k-th largest of the 16 heads' 16-bit keys (one word)          57
//   candidate mask, count, scan                                             ~63
//   packing the candidates (the warp waits for its busiest lane)            ~57
//   ranking by counting (FADD + LEA.HI a comparison) and the tie check     ~110 (route-fix: run
//   by every group, so full-warp barriers replace the group's MATCH/REDUX/VOTE checks, and the
//   rank sum in integers: about 22 fewer on this path, 1646 -> 1630 SASS in the f32 16-value
//   FULL kernel on sm_90a)
//   weight and stores of the lane's output slot                             ~63
// 536 in all (the 64-bit bitonic sort before it: 572), of which 225 on the ALU pipe (287) and 23
// shuffles (56). The threshold leaves few candidates: on uniform random logits (E = 128, k = 8)
// 8 in 48% of tokens, 8.9 in the mean (scripts/route-fast-sim.py simulates this selection).
//
// V2 (the default; MOEK_ROUTE_FAST_V=1 selects the first): the same selection, 440
// per lane on that path instead of 525 by a walk of the sm_90a SASS at n = 10 (414 vs 497 at n = 8;
// static 1384 vs 1632 in the f32 16-value FULL kernel): heads from four groups (18 min/max, not 44;
// top_two_groups), the mask from the signs of x - tau (an FADD and a funnel shift a value), the
// offsets and n from a shared counter (one ATOMS, not a 3-step scan and a broadcast), 1/sum by
// rcp.approx, the ranking unrolled, and the loop's steps precomputed by the host (RouteParams'
// fast_* fields) with running output pointers. Its termination is the same: the rank loop has at
// most 8 trips, the packing at most NV; no new collective, and the counter is reset by lane 0
// between warp barriers. Cheaper heads mean a few more candidates (8.73 -> 9.23 a token).
//
// Layout: a token is handled by 8 consecutive lanes; the row's 16-byte chunks (VEC values) go to lane
// c % 8 (coalesced, as route_kernel), NV values a lane. The kernel is persistent: each lane copies
// its chunks of its next token into shared memory (cp.async, two row buffers) while it routes the
// current one, whose values it reads back into registers; the packing reads its few candidates from
// there again by a run-time index, which registers cannot take.
//
// Selection is exact (ties to the lower index): at least k row values are >= the threshold tau (k of
// the lane heads are), so every top-k value is a candidate; a candidate's rank (how many candidates
// are greater) is its output slot. Where that cannot run (more than 16 candidates; fewer than k:
// NaN; tau = -inf; two candidates of equal value) the token takes k rounds of the group's best on
// packed (key, ~index) words as route_kernel, which is exact for any data.
//
// Termination (no input can hang it: NaN, +-inf, all-equal rows, any T >= 1; T = 0 never launches):
//   - the persistent loop: `base` is block-uniform and grows by gridDim.x * TOKENS > 0 up to T (an
//     int64 far from overflow: T < 2^31), so every warp runs the same whole iterations; tokens past T
//     are routed from stale row copies (any bits, NaN included) and write nothing.
//   - the packing loop clears one bit of a 32-bit mask a trip (<= NV trips); the ranking loop runs
//     n / 2 rounded up <= 8 trips (n <= 16, the same in the group); the rounds run k <= 8 trips. No
//     loop searches for a rank or waits for a count to reach a value; ties only fail the rank check.
//   - collectives: full-warp shuffles and barriers (xor8 and kin, __syncwarp()) sit only where every
//     lane of the warp runs them together: `sorted` and `ranked` differ between the 4 or 2 tokens of
//     a warp, so packing and ranking run in every group (nothing to do where not sorted), and only
//     the rounds (LaneGroup shuffles, the group's mask) are under a group-divergent branch.
//     route-top8b summed the ranks with a full-warp shuffle inside `if (sorted)`: a warp whose tokens
//     split there waited forever (likely the graph test's trigger, T = 1000: the last
//     warp's 3 tokens past T route uninitialised shared memory, which may take the rounds beside
//     a sorted valid token; the tied rows of the other fast-path test split warps too).
//     `sorted && sum(...)` would do the same by its short circuit.
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
// Resident blocks a variant is built for. 16 values a lane: 4 blocks (64 registers a thread, 32
// warps an SM; left alone ptxas took 76 registers, 24 warps). 32 values a lane: 6 blocks (at most
// 85 registers, what it used before; 64 spilled on sm_80).
template <int NV>
constexpr int fast_min_blocks() {
  return NV <= 16 ? 4 : 6;
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
__device__ __forceinline__ float sum8(float v) {
#pragma unroll
  for (int o = 1; o < kFastLanes; o <<= 1) v += xor8(v, o);
  return v;
}
__device__ __forceinline__ int isum8(int v) {
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

// V2's cheaper heads: t1 the lane's maximum, t2 the second largest of the maxima of its four
// groups of N / 4 consecutive slots (N - 4 + 6 min/max, 18 for 16 values, not 44). t2 is then a
// real value at another slot than t1 (fmaxf/fminf skip NaN: NaN may duplicate a head, harmless
// as above), at most the lane's second largest, equal to it unless the two largest share a group
// (a quarter of lanes or less): the threshold below stays exact, only a little lower on average
// (scripts: 8.73 -> 9.23 candidates a token on normal logits, top-8 of 128; more than 16, which
// takes the rounds, in 2 tokens of 10^4).
template <int N>
__device__ __forceinline__ void top_two_groups(const float (&x)[N], float& t1, float& t2) {
  static_assert(N >= 8 && N % 4 == 0, "four groups");
  constexpr int G = N / 4;
  float g[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    g[i] = x[i * G];
#pragma unroll
    for (int s = 1; s < G; ++s) g[i] = fmaxf(g[i], x[i * G + s]);
  }
  const float hi01 = fmaxf(g[0], g[1]), lo01 = fminf(g[0], g[1]);
  const float hi23 = fmaxf(g[2], g[3]), lo23 = fminf(g[2], g[3]);
  t1 = fmaxf(hi01, hi23);
  t2 = fmaxf(fminf(hi01, hi23), fmaxf(lo01, lo23));
}

// The group's threshold (k <= 8): the smallest float whose 16-bit key (the high half of the
// order-preserving key) is at least the k-th largest of the 16 heads' keys, every lane's t1 and t2;
// at least k row values (the heads above it) are >= it. Both keys travel in one word, t1's in the
// high half: each step of the two 8-lane bitonic sorts is one shuffle and one VIMNMX.U16x2. Each
// list is sorted descending; the top k of both are then max(A[i], B[k-1-i]) for i < k (the first
// step of a bitonic merge), so their minimum is the k-th largest. The 16-bit keys cost candidates
// only where values share one (a relative step of 2^-7); the result is the same in every lane, and
// NaN (no candidates: the rounds) where the k-th key is that of -inf or NaN.
__device__ __forceinline__ float kth_largest_head(int rank, float t1, float t2, int k) {
  auto key = [](float f) {
    const uint32_t b = __float_as_uint(f);
    return b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
  };
  uint32_t v = __byte_perm(key(t2), key(t1), 0x7632);  // t1's key << 16 | t2's key
#pragma unroll
  for (int size = 2; size <= kFastLanes; size <<= 1) {
#pragma unroll
    for (int j = size / 2; j > 0; j >>= 1) {
      const uint32_t o = xor8(v, j);
      v = keeps_max(rank, size, j, false) ? __vmaxu2(v, o) : __vminu2(v, o);
    }
  }
  const uint32_t mirror = from_lane8(v, max(k - 1 - rank, 0));
  uint32_t kth = rank < k ? max(v >> 16, mirror & 0xffffu) : 0xffffu;
#pragma unroll
  for (int o = 1; o < kFastLanes; o <<= 1) kth = min(kth, xor8(kth, o));
  return key_to_float(kth << 16);
}

// Expert of slot s (chunk s / VEC, element s % VEC) of lane r, which holds chunks r + 8 i.
template <int VEC>
__device__ __forceinline__ uint32_t slot_expert(uint32_t r, uint32_t s) {
  return (r + (s / VEC) * kFastLanes) * VEC + s % VEC;
}

// rank plus the sign bit of (mine - theirs): 1 where theirs is the greater; one FADD (FMA pipe) and
// one LEA.HI.
__device__ __forceinline__ uint32_t beats(uint32_t rank, float mine, uint32_t theirs) {
  return rank + (__float_as_uint(mine - __uint_as_float(theirs)) >> 31);
}

// 2^x by the hardware approximation (relative error about 2^-22), subnormal results kept.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1/x by the hardware approximation (about 1 ulp): for the row's exponential sum, which is >= 1
// (the row maximum's term is 2^0) or NaN, so no subnormal input or result.
__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace route_fast_detail

// Routes the token whose first output pair is `pair` (t * k; valid: t < T; an invalid token is routed
// too, from whatever its row copy holds, so that every lane of the warp runs every shuffle, and
// writes nothing). row: the token's row copy in shared memory (chunk c at c, the lane's own chunks
// present), cand: its candidate space.
//
// V2 (the default): the same selection with fewer instructions on the common path: heads
// from four groups (top_two_groups), the candidate mask from the signs of x - tau, the packing
// trip's expert in fewer ops, the ranking loop unrolled (a group-uniform exit a pair), 1/sum by
// rcp.approx, and the output through the lane's running pointers (ids_out, w_out: ids + t * k + r,
// weights + t * k + r); `pair` is then the token t itself (used only for the capacity counts).
template <typename T, int NV, bool FULL, bool V2>
__device__ __forceinline__ void route_fast_token(const RouteParams& p, int64_t pair, bool valid, const uint4* row,
                                                 uint64_t* cand, int r, int32_t* ids_out, float* w_out,
                                                 int* count) {
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
  if constexpr (V2) {
    top_two_groups(x, t1, t2);
  } else {
    top_two(x, t1, t2);
  }
  // softmax: 2^(x log2 e - shift) * inv_sum is the score, shift the row maximum times log2 e.
  const float shift = max8(t1) * kLog2e;
  float inv_sum = 1.f;
  if (softmax && !p.renormalize) {
    // The row's sum needs every exponential: the approximate 2^x as route_kernel (relative error
    // ~1e-7 in a sum that only scales the weights); four partial sums for instruction parallelism.
    float part[4];
#pragma unroll
    for (int s = 0; s < NV; ++s) {
      const float term = fast_exp2(fmaf(x[s], kLog2e, -shift));  // 0 for -inf
      part[s % 4] = s < 4 ? term : part[s % 4] + term;
    }
    const float sum = sum8((part[0] + part[1]) + (part[2] + part[3]));
    inv_sum = V2 ? rcp_approx(sum) : 1.f / sum;
  }

  // Candidates: values >= tau. tau is a real row value (k heads are >= it) unless the row has NaN or
  // -inf, so slots past the row (-inf) never qualify when tau > -inf.
  const float tau = kth_largest_head(r, t1, t2, k);
  uint32_t mask = 0;
  if constexpr (V2) {
    // The sign of x - tau, shifted in from the top slot down (one FADD and one SHF a value): set
    // where x < tau in the keys' order (-0 < +0: +0 - -0 = +0, -0 - +0 = -0; x - x = +0), clear for
    // x >= tau, and clear for NaN (the canonical NaN): a NaN candidate never ranks (its differences
    // are NaN both ways), so the rank sum falls short and the token takes the exact rounds. Slots
    // past the row (-inf) are below any tau > -inf; tau = -inf or NaN leaves the token unsorted.
    // All ones to start: the bits shifted above slot NV - 1 stay set, so ~below needs no mask.
    uint32_t below = ~0u;
#pragma unroll
    for (int s = NV - 1; s >= 0; --s) below = __funnelshift_l(__float_as_uint(x[s] - tau), below, 1);
    mask = ~below;
  } else {
#pragma unroll
    for (int s = 0; s < NV; ++s) mask |= (x[s] >= tau ? 1u : 0u) << s;
  }
  const int own = __popc(mask);
  int offset, n;
  if constexpr (V2) {
    // The offsets from the group's counter in shared memory (zero here; reset below once every lane
    // has read it), not a scan: the list's order is the order the atomics ran in, which the ranking
    // does not depend on (a rank is a count of greater candidates). The fallback reads no list.
    offset = atomicAdd(count, own);
    __syncwarp();
    n = *count;
  } else {
    offset = exclusive_sum8(own, r);
    n = from_lane8(offset + own, L - 1);
  }
  // Uniform over the group (tau and n are).
  const bool sorted = tau > -INFINITY && n >= k && n <= kFastCandidates;

  // Candidates as (value bits, expert) word pairs, in lane order; a lane reads its own values back
  // from its row copy. Lane q < k ends with the q-th best (sel_value, sel_expert).
  //
  // `sorted` is uniform over the group but NOT over the warp: the four tokens of a warp differ (and
  // a token past T routes whatever its stale row copy holds). So every lane of the warp runs the
  // packing and ranking below, whatever its group's data: a group that is not sorted packs and ranks
  // nothing (m = 0). The full-warp sum of the ranks is then reached by all 32 lanes together (inside
  // `if (sorted)`, as route-top8b had it, lanes of a group in the rounds never meet it and the warp
  // hangs), and the barriers can name the whole warp (a full-mask __syncwarp; a group's mask costs a
  // MATCH/REDUX/VOTE convergence check each).
  float sel_value = 0.f;
  uint32_t sel_expert = 0;
  const int m = sorted ? n : 0;
  if (!sorted) mask = 0;
  uint2* list = reinterpret_cast<uint2*>(cand);
  uint2* out = list + offset;
  // Terminates: each trip clears one set bit of a 32-bit mask (at most NV trips).
  if constexpr (V2) {
    // slot_expert as (s % VEC | r * VEC) + (s / VEC) * 8 * VEC (VEC a power of two, r * VEC its
    // multiple), hoisted: lane_bits once, then two ops and an add a trip.
    static_assert((VEC & (VEC - 1)) == 0, "VEC a power of two");
    const uint32_t lane_bits = static_cast<uint32_t>(r) * VEC;
    while (mask != 0) {
      const uint32_t s = 31 - __clz(mask);
      mask ^= 1u << s;
      const uint32_t e = ((s & (VEC - 1)) | lane_bits) + (s & ~static_cast<uint32_t>(VEC - 1)) * kFastLanes;
      *out++ = make_uint2(__float_as_uint(to_float(srow[e])), e);
    }
  } else {
    while (mask != 0) {
      const uint32_t s = 31 - __clz(mask);
      mask ^= 1u << s;
      const uint32_t e = slot_expert<VEC>(r, s);
      *out++ = make_uint2(__float_as_uint(to_float(srow[e])), e);
    }
  }
  if (r == L - 1) list[m] = make_uint2(__float_as_uint(-INFINITY), 0);  // pads the pairs read below
  __syncwarp();
  // Rank by counting: lane q takes candidates q and q + 8; a candidate's output slot is the number
  // of candidates whose value is greater, read from the sign of (mine - theirs) (beats below).
  // Candidates are numbers >= tau > -inf, so the difference is never NaN except inf - inf (a tie:
  // the canonical NaN, sign clear), and -0 - +0 = -0 ranks +0 above -0, as the keys do. The padding
  // -inf beats nothing. Each pair of candidates adds at most 1 to the group's rank sum (x - y and
  // y - x never both have the sign set), exactly 1 where the two differ, so the sum is n (n - 1) / 2
  // exactly when all n values differ, and the ranks are then 0..n-1, each once. Equal values (or a
  // difference flushed to zero) rank equal, the sum falls short, and the token takes the rounds,
  // which break ties by index as the CPU reference does. No loop searches for a rank.
  const uint2 c0 = r < m ? list[r] : list[m], c1 = r + L < m ? list[r + L] : list[m];
  const float v0 = __uint_as_float(c0.x), v1 = __uint_as_float(c1.x);
  uint32_t rank0 = 0, rank1 = 0;
  const uint4* pairs = reinterpret_cast<const uint4*>(cand);
  // Terminates: m <= 16 (0 where not sorted), the same in the group; at most 8 trips, no shuffle.
  if constexpr (V2) {
    // Unrolled: 8 trips at most, each leaving (group-uniformly: m is) once past the candidates.
#pragma unroll
    for (int j = 0; j < kFastCandidates; j += 2) {
      if (j >= m) break;
      const uint4 w = pairs[j / 2];
      rank0 = beats(rank0, v0, w.x);
      rank0 = beats(rank0, v0, w.z);
      rank1 = beats(rank1, v1, w.x);
      rank1 = beats(rank1, v1, w.z);
    }
  } else {
    for (int j = 0; j < m; j += 2) {
      const uint4 w = pairs[j / 2];
      rank0 = beats(rank0, v0, w.x);
      rank0 = beats(rank0, v0, w.z);
      rank1 = beats(rank1, v1, w.x);
      rank1 = beats(rank1, v1, w.z);
    }
  }
  const int mine = (r < m ? static_cast<int>(rank0) : 0) + (r + L < m ? static_cast<int>(rank1) : 0);
  // Not under `sorted &&`: its short circuit would put the shuffles in a group-divergent branch.
  const int rank_sum = isum8(mine);  // integer adds: no I2F/F2I round trip
  const bool ranked = sorted && 2 * rank_sum == m * (m - 1);  // uniform over the group
  // Every lane has read every candidate before any slot below is written over them (and the
  // group's count, which V2 resets for the next token: the writes before its next atomics are
  // ordered by the barriers below and the kernel's one after the token).
  __syncwarp();
  if (V2 && r == 0) *count = 0;
  if (ranked && r < m && rank0 < static_cast<uint32_t>(k)) list[rank0] = c0;
  if (ranked && r + L < m && rank1 < static_cast<uint32_t>(k)) list[rank1] = c1;
  __syncwarp();
  if (ranked) {
    const uint2 c = list[r];
    sel_value = __uint_as_float(c.x);
    sel_expert = c.y;
  }
  if (!ranked) {
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
    // Terminates: k is a kernel parameter (the same in every lane); the shuffles name the group only.
    for (int q = 0; q < k; ++q) {
      const uint64_t win = grp.max(local);
      if (r == q) {
        sel_value = key_to_float(candidate_key(win));
        sel_expert = candidate_index(win);
      }
      if (local == win) {
#pragma unroll
        for (int s = 0; s < NV; ++s) key[s] = slot_expert<VEC>(r, s) == candidate_index(win) ? 0u : key[s];
        local = lane_best();
      }
    }
  }

  // Lane q < k writes output slot q: its score, renormalised by the group-wide sum of the k selected
  // scores (a fixed tree order), then scaled. The softmax score takes 2^x as the sum did, with the
  // same shift, so that its rounding cancels in the ratio (the non-ftz form keeps tiny weights).
  float score = 0.f;
  if (r < k) {
    score = softmax ? exp2_approx(fmaf(sel_value, kLog2e, -shift)) * inv_sum : 1.f / (1.f + expf(-sel_value));
  }
  if (p.renormalize) score /= sum8(score);
  if (valid && r < k) {
    if constexpr (V2) {
      *ids_out = static_cast<int32_t>(sel_expert);
      *w_out = score * p.scale;
      // pair is the token here (V2 passes t, not t * k).
      if (p.capacity > 0) atomicAdd(p.chunk_counts + sel_expert * p.num_chunks + (pair * k + r) / p.chunk, 1);
    } else {
      p.ids[pair + r] = static_cast<int32_t>(sel_expert);
      p.weights[pair + r] = score * p.scale;
      if (p.capacity > 0) atomicAdd(p.chunk_counts + sel_expert * p.num_chunks + (pair + r) / p.chunk, 1);
    }
  }
}

// FULL: every lane's chunks exist (E = 8 * NV), so no load needs a bound check.
// Persistent: block b routes tokens b * 32 + [0, 32), then the same plus gridDim.x * 32, and so on;
// each lane copies its chunks of the next token's row into shared memory with cp.async while it
// routes the current one (two row buffers), so loads and instructions overlap inside every warp
// rather than only across warps.
template <typename T, int NV, bool FULL, bool V2>
__global__ void __launch_bounds__(fast_block<NV>(), fast_min_blocks<NV>()) route_fast_kernel(RouteParams p) {
  constexpr int L = kFastLanes;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CPL = NV / VEC;
  constexpr int TOKENS = fast_block<NV>() / L;
  static_assert(NV % VEC == 0 && NV <= kFastMaxValues, "whole chunks per lane");
  // Two row buffers (chunk c at c), and the candidates: 16 and a zero pad, plus one more word, so
  // that each token's list is 16-byte aligned (read in pairs) and the four tokens of a warp read
  // different banks (rows 144 bytes apart).
  __shared__ __align__(16) uint4 s_row[2][TOKENS][CPL * L];
  __shared__ __align__(16) uint64_t s_cand[TOKENS][kFastCandidates + 2];
  __shared__ int s_count[V2 ? TOKENS : 1];  // V2: each token's candidate count (route_fast_token)

  const int r = threadIdx.x & (L - 1);
  const int tg = threadIdx.x / L;
  const int64_t num_tokens = p.num_tokens;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * TOKENS;
  // Running offsets (a 64-bit add a token, not a product): this lane's first chunk of the next
  // token's row, and the current token's first output pair.
  const int64_t row_step = stride * p.num_experts;
  int64_t base = static_cast<int64_t>(blockIdx.x) * TOKENS;
  const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(p.logits) + (base + tg) * p.num_experts) + r;
  int64_t pair = (base + tg) * p.k;
  // Copies this lane's chunks of the row at src into buffer b; nothing for a token past the end
  // (its row copy holds stale data: it is routed, in step with its warp, but writes nothing).
  auto fetch = [&](int b, bool valid) {
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int c = r + j * L;
      if (valid && (FULL || c < p.chunks_per_row)) cp_async_16(smem_addr(&s_row[b][tg][c]), src + j * L, true);
    }
  };
  if constexpr (V2) {
    // The same loop with its per-token bookkeeping trimmed: the row buffer as a byte offset (0 or
    // kBuf) toggled a token, the tokens left to this lane's group as one running count, running
    // output pointers, and the steps from the parameters (host-computed constants, not products).
    // p.fast_stride is gridDim.x * TOKENS (launch_route_fast_variant), so base stays block-uniform.
    constexpr uint32_t kBuf = sizeof(s_row[0]);
    const uint32_t dst0 = smem_addr(&s_row[0][tg][r]);
    const char* row0 = reinterpret_cast<const char*>(s_row[0][tg]);
    uint32_t buf = 0;
    int64_t left = num_tokens - (base + tg);  // > 0: the current token is valid
    char* ids_out = reinterpret_cast<char*>(p.ids + pair + r);
    char* w_out = reinterpret_cast<char*>(p.weights + pair + r);
    auto fetch2 = [&](uint32_t dst, bool valid) {
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        const int c = r + j * L;
        if (valid && (FULL || c < p.chunks_per_row)) cp_async_16(dst + j * L * 16, src + j * L, true);
      }
    };
    if (r == 0) s_count[tg] = 0;
    __syncwarp();
    fetch2(dst0, left > 0);
    cp_async_commit();
    // invariant: base is the same in every thread of the block, so every warp runs whole iterations.
    for (; base < num_tokens; base += p.fast_stride) {
      src = reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(src) + p.fast_row_step);
      fetch2(dst0 + (buf ^ kBuf), left > p.fast_stride);
      cp_async_commit();   // an empty group past the last token keeps the wait below uniform
      cp_async_wait<1>();  // this lane's copies of the current row have landed (only it reads them)
      route_fast_token<T, NV, FULL, true>(p, num_tokens - left, left > 0, reinterpret_cast<const uint4*>(row0 + buf),
                                          s_cand[tg], r, reinterpret_cast<int32_t*>(ids_out),
                                          reinterpret_cast<float*>(w_out), &s_count[tg]);
      __syncwarp();  // the candidate space is reused by the next token
      buf ^= kBuf;
      left -= p.fast_stride;
      ids_out += p.fast_out_step;
      w_out += p.fast_out_step;
    }
    return;
  }
  int b = 0;
  fetch(b, base + tg < num_tokens);
  cp_async_commit();
  // invariant: base is the same in every thread of the block, so every warp runs whole iterations.
  for (; base < num_tokens; base += stride, b ^= 1, pair += stride * p.k) {
    src = reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(src) + row_step);
    fetch(b ^ 1, base + stride + tg < num_tokens);
    cp_async_commit();   // an empty group past the last token keeps the wait below uniform
    cp_async_wait<1>();  // this lane's copies of the current row have landed (only it reads them)
    route_fast_token<T, NV, FULL, false>(p, pair, base + tg < num_tokens, s_row[b][tg], s_cand[tg], r, nullptr, nullptr,
                                         nullptr);
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

// The V2 router (route_fast_token) by default: on the H200 (2026-11-28) it took softmax top-8 of 128 at
// T = 65536 from 16.05 to 14.45 us, passing the same tests and memcheck. MOEK_ROUTE_FAST_V=1 (read once;
// for A/B runs) selects the first.
inline bool fast_v2_knob() {
  static const bool knob = [] {
    const char* v = std::getenv("MOEK_ROUTE_FAST_V");
    return v == nullptr || std::atoi(v) != 1;
  }();
  return knob;
}

// Blocks per SM that fit for this variant on the current device (asked once per device; 0 when it
// cannot be asked). No stream work, no synchronisation: safe while a graph is being captured.
template <typename T, int NV, bool FULL, bool V2>
int fast_resident_blocks() {
  static std::atomic<int> cache[64];  // per device: 0 unknown, else the value + 1
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  int known = cache[device].load(std::memory_order_relaxed);
  if (known == 0) {
    int blocks = 0;
    const auto kernel = route_fast_kernel<T, NV, FULL, V2>;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, fast_block<NV>(), 0) != cudaSuccess) return 0;
    known = blocks + 1;
    cache[device].store(known, std::memory_order_relaxed);
  }
  return known - 1;
}

// One block per 32 (or 16) tokens, but no more than the GPU holds at once (the kernel is persistent).
template <typename T, int NV, bool FULL, bool V2>
cudaError_t launch_route_fast_variant(const RouteParams& p, cudaStream_t stream) {
  constexpr int tokens = fast_block<NV>() / kFastLanes;
  int64_t blocks = (p.num_tokens + tokens - 1) / tokens;
  const int knob = fast_blocks_per_sm_knob();
  if (knob != 0) {
    int per_sm = fast_resident_blocks<T, NV, FULL, V2>();
    if (knob > 0) per_sm = std::min(per_sm, knob);
    const int sms = current_device_attribute<cudaDevAttrMultiProcessorCount>();
    if (per_sm > 0 && sms > 0) blocks = std::min(blocks, static_cast<int64_t>(per_sm) * sms);
  }
  RouteParams q = p;
  q.fast_stride = blocks * tokens;
  q.fast_row_step = q.fast_stride * p.num_experts * static_cast<int64_t>(sizeof(T));
  q.fast_out_step = q.fast_stride * p.k * static_cast<int64_t>(sizeof(int32_t));
  route_fast_kernel<T, NV, FULL, V2><<<static_cast<unsigned>(blocks), fast_block<NV>(), 0, stream>>>(q);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_route_fast_variants(const RouteParams& p, int nv, bool full, cudaStream_t stream) {
  if (fast_v2_knob()) {
    if (nv <= 16) {
      return full ? launch_route_fast_variant<T, 16, true, true>(p, stream)
                  : launch_route_fast_variant<T, 16, false, true>(p, stream);
    }
    return full ? launch_route_fast_variant<T, 32, true, true>(p, stream)
                : launch_route_fast_variant<T, 32, false, true>(p, stream);
  }
  if (nv <= 16) {
    return full ? launch_route_fast_variant<T, 16, true, false>(p, stream)
                : launch_route_fast_variant<T, 16, false, false>(p, stream);
  }
  return full ? launch_route_fast_variant<T, 32, true, false>(p, stream)
              : launch_route_fast_variant<T, 32, false, false>(p, stream);
}

}  // namespace moek
