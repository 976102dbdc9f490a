// Permutation's data movement: permute (token rows into the expert-grouped layout of the plan, cuda/plan.cu)
// and combine (fixed-order weighted sum back per token). Arguments were validated by src/permute.rs.
#include "common.cuh"
#include "moe_kernels.h"

namespace moek {
namespace {

constexpr int kRowBlock = 256;   // threads per block of permute and combine: one warp per row or token

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

// Warps of permute's padding pass (zero_padding): each checks 32 rows of row_source at a time.
constexpr int kPaddingWarps = 512;

// Token rows are read once and written to each of the token's k rows (reading them per output row
// instead fetches every token row k times from memory: the layout scatters a token's rows far apart).
// Warps 0..T-1: one token each. Warps past T (only with zero_padding): zero the padding rows.
template <typename T>
__global__ void __launch_bounds__(kRowBlock) permute_kernel(moek_permute_args a) {
  using V = Vec16<T>;
  __shared__ int32_t s_row[kRowBlock / 32][MOEK_PLAN_MAX_K];
  __shared__ float s_scale[kRowBlock / 32][MOEK_PLAN_MAX_K];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int64_t gw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t rows_in_use = max(int64_t{0}, min(static_cast<int64_t>(a.expert_offsets[a.num_experts]), a.max_rows));
  const int64_t vectors = a.hidden / V::VEC;
  uint4* out = static_cast<uint4*>(a.out);
  if (gw >= a.num_tokens) {
    // Warps past T exist only to zero padding; the grid's last block may hold a few more than asked.
    if (a.zero_padding == 0 || gw - a.num_tokens >= kPaddingWarps) return;
    for (int64_t base = (gw - a.num_tokens) * 32; base < rows_in_use; base += kPaddingWarps * 32) {
      const int64_t row = base + lane;
      unsigned pad = __ballot_sync(0xffffffffu, row < rows_in_use && a.row_source[row] < 0);
      while (pad != 0) {
        const int64_t r = base + __ffs(pad) - 1;
        pad &= pad - 1;
        for (int64_t v = lane; v < vectors; v += 32) out[r * vectors + v] = make_uint4(0, 0, 0, 0);
      }
    }
    return;
  }
  const int64_t t = gw;
  for (int s = lane; s < a.k; s += 32) {
    const int64_t pair = t * a.k + s;
    const int32_t row = a.pair_row[pair];
    s_row[warp][s] = (row >= 0 && row < rows_in_use) ? row : -1;  // -1: not kept (or a corrupt entry)
    s_scale[warp][s] = a.pair_scale != nullptr ? a.pair_scale[pair] : 1.f;
  }
  __syncwarp();
  const uint4* in = reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + t * a.hidden);
  // kLoadsAhead vectors per lane are loaded before any is stored, so each warp keeps that many loads in
  // flight (the stores could alias x as far as the compiler knows, so it would not hoist the loads).
  constexpr int kLoadsAhead = 4;
  for (int64_t base = lane; base < vectors; base += 32 * kLoadsAhead) {
    uint4 value[kLoadsAhead];
#pragma unroll
    for (int j = 0; j < kLoadsAhead; ++j) {
      const int64_t v = base + 32 * j;
      if (v < vectors) value[j] = __ldg(in + v);
    }
    for (int s = 0; s < a.k; ++s) {
      const int32_t row = s_row[warp][s];
      if (row < 0) continue;
      uint4* dst = out + row * vectors;
      const float scale = s_scale[warp][s];
#pragma unroll
      for (int j = 0; j < kLoadsAhead; ++j) {
        const int64_t v = base + 32 * j;
        if (v >= vectors) break;
        if (a.pair_scale == nullptr) {
          dst[v] = value[j];
        } else {
          float f[V::VEC];
          V::unpack(value[j], f);
#pragma unroll
          for (int i = 0; i < V::VEC; ++i) f[i] *= scale;
          dst[v] = V::pack(f);
        }
      }
    }
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

extern "C" int moek_cuda_permute(const moek_permute_args* a, cudaStream_t stream) {
  const int64_t padding_warps = a->zero_padding != 0 && a->max_rows > 0 ? moek::kPaddingWarps : 0;
  return moek::launch_by_dtype<moek::PermuteLaunch>(a->dtype, a->num_tokens + padding_warps, *a, stream);
}

extern "C" int moek_cuda_combine(const moek_combine_args* a, cudaStream_t stream) {
  return moek::launch_by_dtype<moek::CombineLaunch>(a->dtype, a->num_tokens, *a, stream);
}
