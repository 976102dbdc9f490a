// Routing kernels for bf16 logits (vector loads of 8 or 4 values, or scalar), and the plain top-k
// fast path (route_fast.cuh).
#include "route_fast.cuh"

namespace moek {
template <>
cudaError_t launch_route<__nv_bfloat16>(const RouteParams& p, int vec, int lanes, int nv, dim3 grid, dim3 block,
                                        size_t smem, cudaStream_t stream) {
  switch (vec) {
    case 8:
      return launch_route_lanes<__nv_bfloat16, 8>(p, lanes, nv, grid, block, smem, stream);
    case 4:
      return launch_route_lanes<__nv_bfloat16, 4>(p, lanes, nv, grid, block, smem, stream);
    default:
      return launch_route_lanes<__nv_bfloat16, 1>(p, lanes, nv, grid, block, smem, stream);
  }
}

template <>
cudaError_t launch_route_fast<__nv_bfloat16>(const RouteParams& p, int nv, bool full, cudaStream_t stream) {
  return launch_route_fast_variants<__nv_bfloat16>(p, nv, full, stream);
}
}  // namespace moek
