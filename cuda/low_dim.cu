// The residual add of the low-dimension expert-parallel combine (src/ep/low_dim.rs): out += residual,
// elementwise. The grouped GEMM has no residual epilogue, and the permutation's combine (which takes a
// residual) would need the ascend projection in a second [T, H] buffer plus an identity row map; this
// adds in place instead, one 16-byte vector (8 elements) per thread step.
#include <cuda_runtime.h>
#include <cstdint>

#include "common.cuh"
#include "moe_kernels.h"

namespace moek {

template <typename T>
__global__ void add_residual_kernel(T* out, const T* residual, int64_t vectors) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors; v += stride) {
    float b[8];
    load_as_float<T, 8>(residual + v * 8, b);
    // A plain load, not __ldg: `out` is written by this kernel.
    uint4 word = reinterpret_cast<const uint4*>(out)[v];
    T* elems = reinterpret_cast<T*>(&word);
#pragma unroll
    for (int i = 0; i < 8; ++i) elems[i] = from_float<T>(to_float(elems[i]) + b[i]);  // fp32 sum, one rounding
    reinterpret_cast<uint4*>(out)[v] = word;
  }
}

constexpr int kAddThreads = 256;

}  // namespace moek

// out[i] += residual[i] for `elements` (a positive multiple of 8; both pointers 16-byte aligned) bf16 or
// f16 values. Grid-stride with at most 8 blocks per SM: the add is bandwidth-bound, more blocks only
// add scheduling.
extern "C" int moek_cuda_add_residual(moek_dtype dtype, void* out, const void* residual, int64_t elements,
                                      cudaStream_t stream) {
  if (elements <= 0 || elements % 8 != 0) return cudaErrorInvalidValue;
  const int64_t vectors = elements / 8;
  const int sms = moek::current_device_attribute<cudaDevAttrMultiProcessorCount>();
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 132) * 8;
  const int64_t wanted = (vectors + moek::kAddThreads - 1) / moek::kAddThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < cap ? wanted : cap);
  switch (dtype) {
    case MOEK_DTYPE_BF16:
      moek::add_residual_kernel<__nv_bfloat16><<<blocks, moek::kAddThreads, 0, stream>>>(
          static_cast<__nv_bfloat16*>(out), static_cast<const __nv_bfloat16*>(residual), vectors);
      break;
    case MOEK_DTYPE_F16:
      moek::add_residual_kernel<__half><<<blocks, moek::kAddThreads, 0, stream>>>(
          static_cast<__half*>(out), static_cast<const __half*>(residual), vectors);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
