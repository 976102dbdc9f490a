// Permutation: the plan (counting sort of (token, slot) pairs by expert, stable in pair order),
// permute (gather token rows into the expert-grouped layout) and combine (fixed-order weighted sum back
// per token). Arguments were validated by src/permute.rs.
#include "chunk_scan.cuh"
#include "common.cuh"
#include "moe_kernels.h"

namespace moek {
namespace {

constexpr int kPlanBlock = 256;  // pairs per chunk and threads per block of the plan's chunk passes
constexpr int kRowBlock = 256;   // threads per block of permute and combine: one warp per row or token

// Per chunk: how many pairs go to each expert (counts[e * num_chunks + chunk]); ids out of range
// (other than MOEK_DROPPED_ID) are added to *error_count.
__global__ void plan_histogram_kernel(const int32_t* ids, int64_t pairs, int E, int64_t num_chunks, int32_t* counts,
                                      int32_t* error_count) {
  extern __shared__ int32_t hist[];
  __shared__ int32_t bad;
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p < pairs) {
    const int32_t id = ids[p];
    if (id >= 0 && id < E) {
      atomicAdd(&hist[id], 1);
    } else if (id != MOEK_DROPPED_ID) {
      atomicAdd(&bad, 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e * num_chunks + blockIdx.x] = hist[e];
  if (threadIdx.x == 0 && bad != 0) atomicAdd(error_count, bad);
}

// One block: per-expert kept counts (capped by capacity), padded block offsets (exclusive scan),
// per-rank sums, and -1 in row_source for every padding row.
__global__ void plan_offsets_kernel(const int32_t* totals, int E, int capacity, int align, int ranks,
                                    int32_t* expert_counts, int32_t* offsets, int32_t* rank_counts,
                                    int32_t* rank_offsets, int32_t* row_source) {
  __shared__ int32_t s[1024];
  int32_t carry = 0;
  for (int base = 0; base < E; base += blockDim.x) {
    const int e = base + threadIdx.x;
    int32_t padded = 0;
    if (e < E) {
      const int32_t c = capacity > 0 ? min(totals[e], capacity) : totals[e];
      expert_counts[e] = c;
      padded = (c + align - 1) / align * align;
    }
    const int32_t offset = block_exclusive_sum(s, padded, carry);
    if (e < E) offsets[e] = offset;
  }
  if (threadIdx.x == 0) offsets[E] = carry;
  __syncthreads();  // offsets and counts, written by this block, are visible to it from here on
  if (ranks > 1) {
    const int per = E / ranks;
    for (int r = threadIdx.x; r < ranks; r += blockDim.x) {
      int32_t sum = 0;
      for (int e = r * per; e < (r + 1) * per; ++e) sum += expert_counts[e];
      rank_counts[r] = sum;
      rank_offsets[r] = offsets[r * per];
    }
    if (threadIdx.x == 0) rank_offsets[ranks] = carry;
  }
  if (align > 1) {
    for (int e = 0; e < E; ++e) {
      for (int32_t row = offsets[e] + expert_counts[e] + threadIdx.x; row < offsets[e + 1]; row += blockDim.x) {
        row_source[row] = -1;
      }
    }
  }
}

// Per chunk: each pair's row = its expert's block offset + the expert's pairs in earlier chunks + its
// rank among the same expert's pairs earlier in the chunk; pairs past the capacity, dropped or with an
// id out of range get row -1.
__global__ void plan_scatter_kernel(const int32_t* ids, int64_t pairs, int E, int capacity, const int32_t* chunk_base,
                                    int64_t num_chunks, const int32_t* offsets, int32_t* row_source,
                                    int32_t* pair_row) {
  __shared__ int32_t s_ids[kPlanBlock];
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int32_t id = p < pairs ? ids[p] : -1;
  s_ids[threadIdx.x] = id;
  __syncthreads();
  if (p >= pairs) return;
  if (id < 0 || id >= E) {
    pair_row[p] = -1;
    return;
  }
  const int32_t position = chunk_base[static_cast<int64_t>(id) * num_chunks + blockIdx.x] +
                           count_equal_before(s_ids, threadIdx.x, id);
  if (capacity > 0 && position >= capacity) {
    pair_row[p] = -1;
    return;
  }
  const int32_t row = offsets[id] + position;
  row_source[row] = static_cast<int32_t>(p);
  pair_row[p] = row;
}

// 16-byte vectors of T: VEC elements each.
template <typename T>
struct Vec16 {
  static constexpr int VEC = 16 / sizeof(T);
  __device__ __forceinline__ static void unpack(const uint4& w, float (&out)[VEC]) {
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  }
  __device__ __forceinline__ static uint4 pack(const float (&in)[VEC]) {
    uint4 w;
    T* e = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(in[i]);
    return w;
  }
};

// One warp per row of the layout: copy (or scale) the source token's row; padding rows zeroed on
// request; rows past expert_offsets[E] untouched.
template <typename T>
__global__ void __launch_bounds__(kRowBlock) permute_kernel(moek_permute_args a) {
  using V = Vec16<T>;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  const int64_t rows_in_use = min(static_cast<int64_t>(a.expert_offsets[a.num_experts]), a.max_rows);
  if (row >= rows_in_use) return;
  const int64_t vectors = a.hidden / V::VEC;
  uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(a.out) + row * a.hidden);
  const int32_t src = a.row_source[row];
  if (src < 0 || src >= a.num_tokens * a.k) {  // padding (or a corrupt entry: nothing is read)
    if (a.zero_padding) {
      for (int64_t v = lane; v < vectors; v += 32) out[v] = make_uint4(0, 0, 0, 0);
    }
    return;
  }
  const uint4* in = reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + (src / a.k) * a.hidden);
  if (a.pair_scale == nullptr) {
#pragma unroll 4
    for (int64_t v = lane; v < vectors; v += 32) out[v] = __ldg(in + v);
    return;
  }
  const float scale = a.pair_scale[src];
#pragma unroll 4
  for (int64_t v = lane; v < vectors; v += 32) {
    float f[V::VEC];
    V::unpack(__ldg(in + v), f);
#pragma unroll
    for (int i = 0; i < V::VEC; ++i) f[i] *= scale;
    out[v] = V::pack(f);
  }
}

// One warp per token: out = residual + sum over slots, in slot order, of weight * y[row], in fp32.
template <typename T>
__global__ void __launch_bounds__(kRowBlock) combine_kernel(moek_combine_args a) {
  using V = Vec16<T>;
  __shared__ int32_t s_row[kRowBlock / 32][MOEK_PLAN_MAX_K];
  __shared__ float s_weight[kRowBlock / 32][MOEK_PLAN_MAX_K];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (t >= a.num_tokens) return;
  for (int s = lane; s < a.k; s += 32) {
    const int64_t pair = t * a.k + s;
    const int32_t row = a.pair_row[pair];
    s_row[warp][s] = (row >= 0 && row < a.max_rows) ? row : -1;
    s_weight[warp][s] = a.weights != nullptr ? a.weights[pair] : 1.f;
  }
  __syncwarp();
  const int64_t vectors = a.hidden / V::VEC;
  uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(a.out) + t * a.hidden);
  const uint4* residual =
      a.residual != nullptr ? reinterpret_cast<const uint4*>(static_cast<const T*>(a.residual) + t * a.hidden) : nullptr;
  const T* y = static_cast<const T*>(a.y);
  for (int64_t v = lane; v < vectors; v += 32) {
    float acc[V::VEC];
    if (residual != nullptr) {
      V::unpack(residual[v], acc);
    } else {
#pragma unroll
      for (int i = 0; i < V::VEC; ++i) acc[i] = 0.f;
    }
    for (int s = 0; s < a.k; ++s) {
      const int32_t row = s_row[warp][s];
      if (row < 0) continue;
      float f[V::VEC];
      V::unpack(__ldg(reinterpret_cast<const uint4*>(y + row * a.hidden) + v), f);
      const float w = s_weight[warp][s];
#pragma unroll
      for (int i = 0; i < V::VEC; ++i) acc[i] = fmaf(w, f[i], acc[i]);
    }
    out[v] = V::pack(acc);
  }
}

template <template <typename> class Kernel, typename Args>
cudaError_t launch_by_dtype(moek_dtype dtype, int64_t warps, const Args& a, cudaStream_t stream) {
  if (warps <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((warps + kRowBlock / 32 - 1) / (kRowBlock / 32)));
  switch (dtype) {
    case MOEK_DTYPE_F32:
      Kernel<float>::launch(grid, a, stream);
      break;
    case MOEK_DTYPE_BF16:
      Kernel<__nv_bfloat16>::launch(grid, a, stream);
      break;
    default:
      Kernel<__half>::launch(grid, a, stream);
      break;
  }
  return cudaGetLastError();
}

template <typename T>
struct PermuteLaunch {
  static void launch(dim3 grid, const moek_permute_args& a, cudaStream_t s) { permute_kernel<T><<<grid, kRowBlock, 0, s>>>(a); }
};
template <typename T>
struct CombineLaunch {
  static void launch(dim3 grid, const moek_combine_args& a, cudaStream_t s) { combine_kernel<T><<<grid, kRowBlock, 0, s>>>(a); }
};

}  // namespace
}  // namespace moek

// Workspace: counts[E][num_chunks], then totals[E].
extern "C" int moek_cuda_plan(const moek_plan_args* a, int32_t chunk, cudaStream_t stream) {
  using namespace moek;
  if (chunk != kPlanBlock) return cudaErrorInvalidValue;  // the workspace was sized for another chunk
  const int64_t pairs = a->num_tokens * a->k;
  const int E = a->num_experts;
  const int64_t num_chunks = (pairs + kPlanBlock - 1) / kPlanBlock;
  int32_t* counts = static_cast<int32_t*>(a->workspace);
  int32_t* totals = counts + num_chunks * E;
  const int ranks = a->num_ranks > 1 ? a->num_ranks : 0;
  cudaError_t err = cudaMemsetAsync(a->error_count, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  if (pairs > 0) {
    plan_histogram_kernel<<<static_cast<unsigned>(num_chunks), kPlanBlock, E * sizeof(int32_t), stream>>>(
        a->topk_ids, pairs, E, num_chunks, counts, a->error_count);
  }
  chunk_exclusive_scan_kernel<<<E, 256, 0, stream>>>(counts, num_chunks, totals);
  plan_offsets_kernel<<<1, 1024, 0, stream>>>(totals, E, a->capacity, a->row_align, ranks, a->expert_counts,
                                              a->expert_offsets, a->rank_counts, a->rank_offsets, a->row_source);
  if (pairs > 0) {
    plan_scatter_kernel<<<static_cast<unsigned>(num_chunks), kPlanBlock, 0, stream>>>(
        a->topk_ids, pairs, E, a->capacity, counts, num_chunks, a->expert_offsets, a->row_source, a->pair_row);
  }
  return cudaGetLastError();
}

extern "C" int moek_cuda_permute(const moek_permute_args* a, cudaStream_t stream) {
  return moek::launch_by_dtype<moek::PermuteLaunch>(a->dtype, a->max_rows, *a, stream);
}

extern "C" int moek_cuda_combine(const moek_combine_args* a, cudaStream_t stream) {
  return moek::launch_by_dtype<moek::CombineLaunch>(a->dtype, a->num_tokens, *a, stream);
}
