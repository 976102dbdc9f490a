// Grouped-GEMM kernels for fp16 A and B (output fp16 or fp32), every tile shape.
#include "grouped_gemm_kernel.cuh"

namespace moek {
template <>
cudaError_t launch_grouped_gemm<__half>(const GemmParams& p, moek_gemm_tile tile, moek_dtype out_dtype,
                                        cudaStream_t stream) {
  return launch_grouped_gemm_for<__half>(p, tile, out_dtype, stream);
}
}  // namespace moek
