// Routing kernels for f32 logits (vector loads of 4 floats, or scalar for rows not a multiple of 4),
// and the plain top-k fast path (route_fast.cuh).
#include "route_fast.cuh"

namespace moek {
template <>
cudaError_t launch_route<float>(const RouteParams& p, int vec, int lanes, int nv, dim3 grid, dim3 block, size_t smem,
                                cudaStream_t stream) {
  return vec == 4 ? launch_route_lanes<float, 4>(p, lanes, nv, grid, block, smem, stream)
                  : launch_route_lanes<float, 1>(p, lanes, nv, grid, block, smem, stream);
}

template <>
cudaError_t launch_route_fast<float>(const RouteParams& p, int nv, bool full, cudaStream_t stream) {
  return launch_route_fast_variants<float>(p, nv, full, stream);
}
}  // namespace moek
