// Permutation's data movement: permute (token rows into the expert-grouped layout of the plan, cuda/plan.cu)
// and combine (fixed-order weighted sum back per token). Arguments were validated by src/permute.rs.
#include "common.cuh"
#include "moe_kernels.h"

namespace moek {
namespace {

constexpr int kRowBlock = 256;  // threads per block of permute and combine: one warp per slice of a token's row

// Warps of permute's padding pass (zero_padding): each checks 32 rows of row_source at a time.
constexpr int kPaddingWarps = 512;

// How each token's row is cut over warps (chosen by src/permute.rs, row_split): `slices` warps per
// token, each `width` 16-byte vectors wide (the last one narrower). At large T one slice spans the
// row; at small T several warps share a token, so that enough loads are in flight to cover the memory
// latency (one warp per token leaves most of the GPU idle at T = 64).
struct RowSplit {
  int64_t slices, width;
};

// The part of a token's row warp `gw` (below T * slices) owns: vectors [begin, end) of token `token`.
struct RowSlice {
  int64_t token, begin, end;
  __device__ RowSlice(int64_t gw, const RowSplit& split, int64_t vectors) {
    token = gw / split.slices;
    begin = (gw - token * split.slices) * split.width;
    end = min(begin + split.width, vectors);
  }
};

// Token t's k slots into the warp's shared arrays, by its lanes: each slot's row (-1 when the pair was
// not kept or the entry lies outside [0, rows)) and factor (1 without factors). Permute and combine
// both start with this.
__device__ __forceinline__ void load_token_slots(const int32_t* pair_row, const float* factors, int64_t t, int k,
                                                 int64_t rows, int32_t* s_row, float* s_factor) {
  for (int s = threadIdx.x & 31; s < k; s += 32) {
    const int64_t pair = t * k + s;
    const int32_t row = pair_row[pair];
    s_row[s] = (row >= 0 && row < rows) ? row : -1;
    s_factor[s] = factors != nullptr ? factors[pair] : 1.f;
  }
  __syncwarp();
}

// Token rows are read once and written to each of the token's k rows (reading them per output row
// instead fetches every token row k times from memory: the layout scatters a token's rows far apart).
// Warps 0..T*slices-1: one slice of one token each. Warps past those (only with zero_padding): zero
// the padding rows.
template <typename T>
__global__ void __launch_bounds__(kRowBlock) permute_kernel(moek_permute_args a, RowSplit split) {
  using V = Vec16<T>;
  __shared__ int32_t s_row[kRowBlock / 32][MOEK_PLAN_MAX_K];
  __shared__ float s_scale[kRowBlock / 32][MOEK_PLAN_MAX_K];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int64_t gw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t rows_in_use = max(int64_t{0}, min(static_cast<int64_t>(a.expert_offsets[a.num_experts]), a.max_rows));
  const int64_t vectors = a.hidden / V::VEC;
  const int64_t row_warps = a.num_tokens * split.slices;
  uint4* out = static_cast<uint4*>(a.out);
  if (gw >= row_warps) {
    // Warps past the rows exist only to zero padding; the grid's last block may hold a few more.
    if (a.zero_padding == 0 || gw - row_warps >= kPaddingWarps) return;
    for (int64_t base = (gw - row_warps) * 32; base < rows_in_use; base += kPaddingWarps * 32) {
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
  const RowSlice slice(gw, split, vectors);
  load_token_slots(a.pair_row, a.pair_scale, slice.token, a.k, rows_in_use, s_row[warp], s_scale[warp]);
  const uint4* in = reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + slice.token * a.hidden);
  // kLoadsAhead vectors per lane are loaded before any is stored, so each warp keeps that many loads in
  // flight (the stores could alias x as far as the compiler knows, so it would not hoist the loads).
  constexpr int kLoadsAhead = 4;
  for (int64_t base = slice.begin + lane; base < slice.end; base += 32 * kLoadsAhead) {
    uint4 value[kLoadsAhead];
#pragma unroll
    for (int j = 0; j < kLoadsAhead; ++j) {
      const int64_t v = base + 32 * j;
      if (v < slice.end) value[j] = __ldg(in + v);
    }
    for (int s = 0; s < a.k; ++s) {
      const int32_t row = s_row[warp][s];
      if (row < 0) continue;
      uint4* dst = out + row * vectors;
      const float scale = s_scale[warp][s];
#pragma unroll
      for (int j = 0; j < kLoadsAhead; ++j) {
        const int64_t v = base + 32 * j;
        if (v >= slice.end) break;
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

// One warp per slice of a token: out = residual + sum over slots, in slot order, of weight * y[row], in
// fp32. The slots' vectors are loaded kSlotsAhead at a time before they are summed (in slot order, so
// the result does not depend on the batching): a lane waits for one batch of loads, not for each slot.
template <typename T>
__global__ void __launch_bounds__(kRowBlock) combine_kernel(moek_combine_args a, RowSplit split) {
  using V = Vec16<T>;
  constexpr int kSlotsAhead = 8;
  __shared__ int32_t s_row[kRowBlock / 32][MOEK_PLAN_MAX_K];
  __shared__ float s_weight[kRowBlock / 32][MOEK_PLAN_MAX_K];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int64_t gw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (gw >= a.num_tokens * split.slices) return;
  const int64_t vectors = a.hidden / V::VEC;
  const RowSlice slice(gw, split, vectors);
  const int64_t t = slice.token;
  load_token_slots(a.pair_row, a.weights, t, a.k, a.max_rows, s_row[warp], s_weight[warp]);
  uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(a.out) + t * a.hidden);
  const uint4* residual =
      a.residual != nullptr ? reinterpret_cast<const uint4*>(static_cast<const T*>(a.residual) + t * a.hidden) : nullptr;
  const uint4* y = static_cast<const uint4*>(a.y);
  for (int64_t v = slice.begin + lane; v < slice.end; v += 32) {
    float acc[V::VEC];
    if (residual != nullptr) {
      V::unpack(residual[v], acc);
    } else {
#pragma unroll
      for (int i = 0; i < V::VEC; ++i) acc[i] = 0.f;
    }
    for (int s0 = 0; s0 < a.k; s0 += kSlotsAhead) {
      int32_t row[kSlotsAhead];
      uint4 value[kSlotsAhead];
#pragma unroll
      for (int j = 0; j < kSlotsAhead; ++j) {
        row[j] = s0 + j < a.k ? s_row[warp][s0 + j] : -1;
        if (row[j] >= 0) value[j] = __ldg(y + row[j] * vectors + v);
      }
#pragma unroll
      for (int j = 0; j < kSlotsAhead; ++j) {
        if (row[j] < 0) continue;
        float f[V::VEC];
        V::unpack(value[j], f);
        const float w = s_weight[warp][s0 + j];
#pragma unroll
        for (int i = 0; i < V::VEC; ++i) acc[i] = fmaf(w, f[i], acc[i]);
      }
    }
    out[v] = V::pack(acc);
  }
}

template <template <typename> class Kernel, typename Args>
cudaError_t launch_by_dtype(moek_dtype dtype, int64_t warps, const Args& a, const RowSplit& split, cudaStream_t stream) {
  if (warps <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((warps + kRowBlock / 32 - 1) / (kRowBlock / 32)));
  switch (dtype) {
    case MOEK_DTYPE_F32:
      Kernel<float>::launch(grid, a, split, stream);
      break;
    case MOEK_DTYPE_BF16:
      Kernel<__nv_bfloat16>::launch(grid, a, split, stream);
      break;
    default:
      Kernel<__half>::launch(grid, a, split, stream);
      break;
  }
  return cudaGetLastError();
}

template <typename T>
struct PermuteLaunch {
  static void launch(dim3 grid, const moek_permute_args& a, const RowSplit& split, cudaStream_t s) {
    permute_kernel<T><<<grid, kRowBlock, 0, s>>>(a, split);
  }
};
template <typename T>
struct CombineLaunch {
  static void launch(dim3 grid, const moek_combine_args& a, const RowSplit& split, cudaStream_t s) {
    combine_kernel<T><<<grid, kRowBlock, 0, s>>>(a, split);
  }
};

}  // namespace
}  // namespace moek

// `slices` warps per token, `width` vectors each (src/permute.rs, row_split).
extern "C" int moek_cuda_permute(const moek_permute_args* a, int64_t slices, int64_t width, cudaStream_t stream) {
  if (slices < 1 || width < 1) return cudaErrorInvalidValue;
  const int64_t padding_warps = a->zero_padding != 0 && a->max_rows > 0 ? moek::kPaddingWarps : 0;
  return moek::launch_by_dtype<moek::PermuteLaunch>(a->dtype, a->num_tokens * slices + padding_warps, *a,
                                                    moek::RowSplit{slices, width}, stream);
}

extern "C" int moek_cuda_combine(const moek_combine_args* a, int64_t slices, int64_t width, cudaStream_t stream) {
  if (slices < 1 || width < 1) return cudaErrorInvalidValue;
  return moek::launch_by_dtype<moek::CombineLaunch>(a->dtype, a->num_tokens * slices, *a,
                                                    moek::RowSplit{slices, width}, stream);
}

// Loads the combine kernel of `dtype` on the current device now (see moek_cuda_ep_preload in cuda/ep.cu:
// with lazy module loading, a first launch waits for the device's running kernels).
extern "C" int moek_cuda_combine_preload(moek_dtype dtype) {
  cudaFuncAttributes attr;
  switch (dtype) {
    case MOEK_DTYPE_F32:
      return cudaFuncGetAttributes(&attr, moek::combine_kernel<float>);
    case MOEK_DTYPE_BF16:
      return cudaFuncGetAttributes(&attr, moek::combine_kernel<__nv_bfloat16>);
    default:
      return cudaFuncGetAttributes(&attr, moek::combine_kernel<__half>);
  }
}

// Streaming multiprocessors of the current device (0 when it cannot be asked): src/permute.rs sizes
// the row split with it.
extern "C" int moek_cuda_sm_count() { return moek::current_device_attribute<cudaDevAttrMultiProcessorCount>(); }
