// The routing kernel: scores over the experts, then top-k selection per token (plain, DeepSeek-V3
// group-limited, MoGE grouped). Included by one translation unit per logits dtype (route_f32.cu,
// route_bf16.cu) so they build in parallel; the entry point and capacity pass are in route.cu.
//
// Layout: a token is handled by a group of L lanes (L a power of two, 1..32, a template parameter so
// every index below folds to constants). The row's E scores are cut into chunks of VEC experts (one
// vector load each); chunk c belongs to lane c % L, which keeps it in registers (NV values per lane).
// Candidates are packed (key, ~index) words, so every comparison is a plain integer one, the maximum
// is unique, and ties go to the lower expert index, exactly as in the CPU reference.
#pragma once

#include "common.cuh"
#include "moe_kernels.h"

namespace moek {

constexpr int kRouteBlock = 128;
constexpr int kRouteMaxSharedBytes = 48 * 1024;
// Candidates a token may keep for the ranking selection; more (many equal keys) falls back to rounds.
constexpr int kCandidateCap = 64;

struct RouteParams {
  const void* logits;
  const float* bias;
  int32_t* ids;
  float* weights;
  int64_t num_tokens;
  int num_experts;
  int k;
  int mode;  // MOEK_ROUTE_TOPK, _GROUP_LIMITED or _GROUPED (Switch runs as TOPK)
  int score_function;
  int num_groups;
  int topk_groups;
  int renormalize;
  float scale;
  int chunks_per_row;  // E / VEC
  // Per-token shared memory, offsets in bytes (see route_kernel).
  int smem_per_token;
  int off_candidates;
  int off_chunk_top2;
  int off_groups;
  // Capacity bookkeeping: counts[expert * num_chunks + chunk] of pairs per chunk of pair indices.
  int32_t* chunk_counts;
  int capacity;
  int chunk;
  int64_t num_chunks;
  // route_fast's V2 loop (set by launch_route_fast_variant, unused elsewhere): the grid's tokens a
  // trip (gridDim.x * tokens a block, > 0), and what it advances the lane's row pointer and output
  // pointers by, in bytes, so that the loop adds constant operands instead of recomputing them.
  int64_t fast_stride = 0;
  int64_t fast_row_step = 0;
  int64_t fast_out_step = 0;
};

// Launches route_kernel for logits of type T (defined in route_f32.cu / route_bf16.cu).
// `vec` is one of route_vector_widths<T>(); see moek_cuda_route for how vec, lanes and nv are chosen.
template <typename T>
cudaError_t launch_route(const RouteParams& p, int vec, int lanes, int nv, dim3 grid, dim3 block, size_t smem,
                         cudaStream_t stream);

namespace route_detail {

// Expert held in slot s = j * VEC + v of the group's lane `rank`: chunk rank + j * L, element v.
template <int VEC, int L>
__device__ __forceinline__ uint32_t slot_expert(int rank, int s) {
  return static_cast<uint32_t>((rank + (s / VEC) * L) * VEC + s % VEC);
}

// Inserts x into the running pair of best keys (t1 >= t2).
__device__ __forceinline__ void keep_top2(uint32_t x, uint32_t& t1, uint32_t& t2) {
  t2 = max(t2, min(t1, x));
  t1 = max(t1, x);
}

// DeepSeek-V3's group limit: zeroes the keys of experts outside the topk_groups best groups, a group
// ranking by the sum of its two best keys. Chunks never straddle groups (the launcher picks VEC so).
template <int VEC, int L, int NV>
__device__ void limit_groups(const RouteParams& p, const LaneGroup<L>& grp, uint32_t (&key)[NV], unsigned char* tok) {
  constexpr int CPL = NV / VEC;
  uint32_t* s_chunk = reinterpret_cast<uint32_t*>(tok + p.off_chunk_top2);  // [chunks][2]
  float* s_group_score = reinterpret_cast<float*>(tok + p.off_groups);      // [groups]
  int* s_keep = reinterpret_cast<int*>(s_group_score + p.num_groups);      // [groups]
  const int group_size = p.num_experts / p.num_groups;
  const int chunks_per_group = group_size / VEC;
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    const int c = grp.rank + j * L;
    if (c < p.chunks_per_row) {
      uint32_t t1 = 0, t2 = 0;
#pragma unroll
      for (int v = 0; v < VEC; ++v) keep_top2(key[j * VEC + v], t1, t2);
      s_chunk[2 * c] = t1;
      s_chunk[2 * c + 1] = t2;
    }
  }
  grp.sync();
  for (int g = grp.rank; g < p.num_groups; g += L) {
    uint32_t t1 = 0, t2 = 0;
    for (int c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c) {
      const uint32_t a = s_chunk[2 * c], b = s_chunk[2 * c + 1];  // a >= b
      t2 = max(max(t2, b), min(t1, a));
      t1 = max(t1, a);
    }
    s_group_score[g] = key_to_float(t1) + (group_size > 1 ? key_to_float(t2) : 0.f);
  }
  grp.sync();
  for (int g = grp.rank; g < p.num_groups; g += L) {
    const float mine = s_group_score[g];
    int rank = 0;
    for (int h = 0; h < p.num_groups; ++h) {
      const float other = s_group_score[h];
      rank += (other > mine) || (other == mine && h < g);
    }
    s_keep[g] = rank < p.topk_groups;
  }
  grp.sync();
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    const int c = grp.rank + j * L;
    if (c < p.chunks_per_row && !s_keep[c * VEC / group_size]) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) key[j * VEC + v] = 0;
    }
  }
}

// Fast selection: a threshold no larger than the k-th best key leaves a few candidates; each
// candidate's rank among them is its output position. The threshold is the k-th largest of the lanes'
// two best keys (k real keys clear it), so on random data the candidates are about k plus a few.
// Returns false, selecting nothing, when they are fewer than k or more than kCandidateCap.
template <int VEC, int L, int NV>
__device__ bool select_by_ranking(const RouteParams& p, const LaneGroup<L>& grp, const uint32_t (&key)[NV],
                                  const float (&score)[NV], unsigned char* tok) {
  const int k = p.k;
  uint32_t t1 = 0, t2 = 0;
#pragma unroll
  for (int s = 0; s < NV; ++s) keep_top2(key[s], t1, t2);
  uint32_t threshold = 1;  // every valid key, when the lanes' best two are fewer than k
  if (2 * L >= k) {
    if constexpr (L < 32) {
      // Rank each lane's two heads against all 2L (independent broadcasts: short latency chains).
      int above1 = 0, atleast1 = 0, above2 = 0, atleast2 = 0;
#pragma unroll
      for (int q = 0; q < L; ++q) {
        const uint32_t a = grp.broadcast(t1, q), b = grp.broadcast(t2, q);
        above1 += (a > t1) + (b > t1);
        atleast1 += (a >= t1) + (b >= t1);
        above2 += (a > t2) + (b > t2);
        atleast2 += (a >= t2) + (b >= t2);
      }
      uint32_t kth = 0;  // this lane's head if it is the k-th largest (all such heads are equal)
      if (above1 < k && k <= atleast1) kth = t1;
      if (above2 < k && k <= atleast2) kth = max(kth, t2);
      threshold = max(grp.max(kth), 1u);
    } else {
      // A whole warp per token: extract the largest head k times (equal heads together) instead of
      // 64 broadcasts; the value at which k are taken is the threshold.
      uint32_t head = t1, next = t2;
      int taken = 0;
      for (int r = 0; r < k; ++r) {
        const uint32_t v = grp.max(head);
        const int hits = __popc(__ballot_sync(grp.mask, head == v));
        if (taken < k && taken + hits >= k) threshold = max(v, 1u);
        taken += hits;
        if (head == v) {
          head = next;
          next = 0;
        }
      }
    }
  }
  int mine = 0;
#pragma unroll
  for (int s = 0; s < NV; ++s) mine += key[s] >= threshold;
  const int offset = grp.exclusive_sum(mine);
  const int n = grp.broadcast(offset + mine, L - 1);
  if (n < k || n > kCandidateCap) return false;

  uint64_t* s_cand = reinterpret_cast<uint64_t*>(tok + p.off_candidates);
  float* s_cand_score = reinterpret_cast<float*>(s_cand + kCandidateCap);
  int pos = offset;
#pragma unroll
  for (int s = 0; s < NV; ++s) {
    if (key[s] >= threshold) {
      s_cand[pos] = pack_candidate(key[s], slot_expert<VEC, L>(grp.rank, s));
      s_cand_score[pos] = score[s];
      ++pos;
    }
  }
  grp.sync();
  uint64_t* s_sel = reinterpret_cast<uint64_t*>(tok);
  float* s_sel_score = reinterpret_cast<float*>(tok + 8 * k);
  for (int i = grp.rank; i < n; i += L) {
    const uint64_t c = s_cand[i];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += s_cand[j] > c;
    if (rank < k) {
      s_sel[rank] = c;
      s_sel_score[rank] = s_cand_score[i];
    }
  }
  return true;
}

// General selection, k rounds: each takes the group-wide best of every lane's best candidate; only the
// lane that held the winner rescans its keys. MoGE runs k / G rounds inside each of its G groups, so
// its selections come out in group order (route_kernel sorts them).
template <int VEC, int L, int NV>
__device__ void select_by_rounds(const RouteParams& p, const LaneGroup<L>& grp, uint32_t (&key)[NV],
                                 const float (&score)[NV], unsigned char* tok) {
  uint64_t* s_sel = reinterpret_cast<uint64_t*>(tok);
  float* s_sel_score = reinterpret_cast<float*>(tok + 8 * p.k);
  const bool grouped = p.mode == MOEK_ROUTE_GROUPED;
  const int passes = grouped ? p.num_groups : 1;
  const int per_pass = grouped ? p.k / p.num_groups : p.k;
  const uint32_t pass_width = grouped ? p.num_experts / p.num_groups : p.num_experts;
  int r = 0;
  for (int g = 0; g < passes; ++g) {
    const uint32_t lo = g * pass_width, hi = lo + pass_width;
    uint64_t local = 0;
#pragma unroll
    for (int s = 0; s < NV; ++s) {
      const uint32_t e = slot_expert<VEC, L>(grp.rank, s);
      const uint64_t c = pack_candidate(key[s], e);
      if (e >= lo && e < hi && c > local) local = c;
    }
    for (int q = 0; q < per_pass; ++q, ++r) {
      const uint64_t win = grp.max(local);
      const uint32_t win_expert = candidate_index(win);
      float win_score = 0.f;
      if (local == win) {  // this lane held the winner: drop it and find the lane's next best
        local = 0;
#pragma unroll
        for (int s = 0; s < NV; ++s) {
          const uint32_t e = slot_expert<VEC, L>(grp.rank, s);
          if (e == win_expert) {
            win_score = score[s];
            key[s] = 0;
          }
          const uint64_t c = pack_candidate(key[s], e);
          if (e >= lo && e < hi && c > local) local = c;
        }
      }
      win_score = grp.broadcast(win_score, (win_expert / VEC) & (L - 1));
      if (grp.rank == 0) {
        s_sel[r] = win;
        s_sel_score[r] = win_score;
      }
    }
  }
}

}  // namespace route_detail

// Shared memory per token (offsets in RouteParams): the k selections (packed u64, then float scores),
// the ranking candidates, and for the group limit each chunk's two best keys and each group's score
// and kept flag.
template <typename T, int VEC, int L, int NV>
__global__ void __launch_bounds__(kRouteBlock) route_kernel(RouteParams p) {
  using namespace route_detail;
  constexpr int CPL = NV / VEC;
  static_assert(NV % VEC == 0, "whole chunks per lane");
  extern __shared__ __align__(16) unsigned char smem[];
  const LaneGroup<L> grp;
  const int tokens_per_block = blockDim.x / L;
  const int tg = threadIdx.x / L;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * tokens_per_block + tg;
  if (t >= p.num_tokens) return;  // the whole lane group leaves together
  unsigned char* tok = smem + static_cast<size_t>(tg) * p.smem_per_token;
  const int E = p.num_experts;
  const int k = p.k;

  float value[NV];
  const T* row = static_cast<const T*>(p.logits) + t * E;
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    const int c = grp.rank + j * L;
    float x[VEC];
    if (c < p.chunks_per_row) {
      load_as_float<T, VEC>(row + c * VEC, x);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) x[v] = -INFINITY;
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) value[j * VEC + v] = x[v];
  }

  // Keys (0 for slots past the row). Softmax and sigmoid are increasing, so without a bias, and outside
  // the group limit (which sums scores), ranking by the logit orders exactly as ranking by the score,
  // except where fp32 rounding makes two scores equal (the larger logit then wins). That path turns
  // only the k winners into scores. `value` then holds logits; otherwise it holds the fp32 scores.
  const bool softmax = p.score_function == MOEK_SCORE_SOFTMAX;
  const bool by_logit = p.bias == nullptr && p.mode != MOEK_ROUTE_GROUP_LIMITED;
  uint32_t key[NV];
  float row_max = 0.f, inv_sum = 1.f;  // softmax: exp(x - row_max) * inv_sum is the score
  if (by_logit) {
    uint32_t top = 0;
#pragma unroll
    for (int s = 0; s < NV; ++s) {
      const bool valid = grp.rank + (s / VEC) * L < p.chunks_per_row;
      key[s] = valid ? ordered_key(value[s]) : 0u;
      top = max(top, key[s]);
    }
    if (softmax) {
      row_max = key_to_float(grp.max(top));
      if (!p.renormalize) {
        // The row's sum needs every exponential; an approximate 2^x (relative error ~1e-7, plus the
        // rounding of its argument) is plenty for a sum that only scales the weights.
        const float shift = row_max * kLog2e;
        float sum = 0.f;
#pragma unroll
        for (int s = 0; s < NV; ++s) sum += fast_exp2(fmaf(value[s], kLog2e, -shift));  // 0 for -inf slots
        inv_sum = 1.f / grp.sum(sum);
      }
    }
  } else {
    // Scores in fp32: softmax as exp(x - max) times the reciprocal of their sum (as the reference).
    if (softmax) {
      float m = -INFINITY;
#pragma unroll
      for (int s = 0; s < NV; ++s) m = fmaxf(m, value[s]);
      m = grp.max(m);
      float sum = 0.f;
#pragma unroll
      for (int s = 0; s < NV; ++s) {
        value[s] = expf(value[s] - m);  // 0 for the -inf of slots past the row
        sum += value[s];
      }
      const float inv = 1.f / grp.sum(sum);
#pragma unroll
      for (int s = 0; s < NV; ++s) value[s] *= inv;
    } else {
#pragma unroll
      for (int s = 0; s < NV; ++s) value[s] = 1.f / (1.f + expf(-value[s]));
    }
#pragma unroll
    for (int s = 0; s < NV; ++s) {
      const bool valid = grp.rank + (s / VEC) * L < p.chunks_per_row;
      const float b = p.bias != nullptr && valid ? __ldg(p.bias + slot_expert<VEC, L>(grp.rank, s)) : 0.f;
      key[s] = valid ? ordered_key(value[s] + b) : 0u;
    }
  }

  if (p.mode == MOEK_ROUTE_GROUP_LIMITED) limit_groups<VEC, L, NV>(p, grp, key, tok);
  const bool grouped = p.mode == MOEK_ROUTE_GROUPED;
  if (grouped || !select_by_ranking<VEC, L, NV>(p, grp, key, value, tok)) {
    select_by_rounds<VEC, L, NV>(p, grp, key, value, tok);
  }
  grp.sync();

  // Output: each lane takes selections i = rank, rank + L, ... Their position is i (descending key,
  // ties to the lower id), except for MoGE, whose group-by-group selections are ranked here. Weights
  // are renormalised by the group-wide sum of the selected scores (a fixed tree order), then scaled.
  uint64_t* s_sel = reinterpret_cast<uint64_t*>(tok);
  float* s_sel_score = reinterpret_cast<float*>(tok + 8 * k);
  float partial = 0.f;
  for (int i = grp.rank; i < k; i += L) {
    float v = s_sel_score[i];
    if (by_logit) v = softmax ? expf(v - row_max) * inv_sum : 1.f / (1.f + expf(-v));
    s_sel_score[i] = v;  // only this lane reads entry i again
    partial += v;
  }
  const float sum = grp.sum(partial);
  for (int i = grp.rank; i < k; i += L) {
    const uint64_t c = s_sel[i];
    int position = i;
    if (grouped) {
      position = 0;
      for (int q = 0; q < k; ++q) position += s_sel[q] > c;
    }
    const float w = p.renormalize ? s_sel_score[i] / sum : s_sel_score[i];
    const int64_t pair = t * k + position;
    const uint32_t e = candidate_index(c);
    p.ids[pair] = static_cast<int32_t>(e);
    p.weights[pair] = w * p.scale;
    if (p.capacity > 0) atomicAdd(p.chunk_counts + e * p.num_chunks + pair / p.chunk, 1);
  }
}

template <typename T, int VEC, int L, int NV>
cudaError_t launch_route_variant(const RouteParams& p, dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
  route_kernel<T, VEC, L, NV><<<grid, block, smem, stream>>>(p);
  return cudaGetLastError();
}

// Instantiates the (L, NV) variants the launcher picks (moek_cuda_route): up to 8, 16 or 32 values a
// lane.
template <typename T, int VEC, int L>
cudaError_t launch_route_nv(const RouteParams& p, int nv, dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
  if (nv <= 8) return launch_route_variant<T, VEC, L, 8>(p, grid, block, smem, stream);
  if (nv <= 16) return launch_route_variant<T, VEC, L, 16>(p, grid, block, smem, stream);
  return launch_route_variant<T, VEC, L, 32>(p, grid, block, smem, stream);
}

template <typename T, int VEC>
cudaError_t launch_route_lanes(const RouteParams& p, int lanes, int nv, dim3 grid, dim3 block, size_t smem,
                               cudaStream_t stream) {
  switch (lanes) {
    case 1:
      return launch_route_nv<T, VEC, 1>(p, nv, grid, block, smem, stream);
    case 2:
      return launch_route_nv<T, VEC, 2>(p, nv, grid, block, smem, stream);
    case 4:
      return launch_route_nv<T, VEC, 4>(p, nv, grid, block, smem, stream);
    case 8:
      return launch_route_nv<T, VEC, 8>(p, nv, grid, block, smem, stream);
    case 16:
      return launch_route_nv<T, VEC, 16>(p, nv, grid, block, smem, stream);
    default:
      return launch_route_nv<T, VEC, 32>(p, nv, grid, block, smem, stream);
  }
}

}  // namespace moek
