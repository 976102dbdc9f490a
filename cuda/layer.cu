// Device-side helpers of the composed layer (src/layer.rs) that are not kernels of their own.
#include <cuda_runtime.h>
#include <cstdint>

// Writes the expert offsets {0, 0x7f7f7f7f} of a one-expert grouped GEMM that owns every row: the GEMM
// clamps offsets to [0, max_rows] (include/moe_kernels.h), so the second becomes max_rows, whatever the
// token count. Two byte memsets instead of a kernel: they are graph nodes, need no host value, and
// cost no launch.
extern "C" int moek_cuda_whole_range_offsets(int32_t* offsets, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(offsets, 0, sizeof(int32_t), stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(offsets + 1, 0x7f, sizeof(int32_t), stream);
  return err;
}
