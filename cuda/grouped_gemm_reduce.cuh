// The grouped GEMM's split-K reduction: out[row, c] = epilogue(sum over s = 0..S-1 of partial[s, row, c])
// for the rows experts own, summed in fp32 in that order (bit-identical from run to run), then the
// activation (SwiGLU: gate column c and up column n_out + c) and the row scale, as the GEMM's own
// epilogue does. Included by grouped_gemm_kernel.cuh after GemmParams and the epilogue helpers.
//
// A CTA takes kReduceRows rows of one expert (the same m-tile scheduler as the GEMM, so rows no expert
// owns are never written) and kReduceThreads * 4 output columns; each thread owns 4 adjacent columns
// (16-byte loads: n, n_out and the workspace are multiples of 8 elements / 16-byte aligned).
#pragma once

namespace moek {

constexpr int kReduceRows = 8;
constexpr int kReduceThreads = 128;
constexpr int kReduceCols = kReduceThreads * 4;

// Four adjacent outputs, one store (out is 16-byte aligned and the column a multiple of 4).
__device__ __forceinline__ void store_quad(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
template <typename T>
__device__ __forceinline__ void store_quad(T* p, const float (&v)[4]) {
  store_pair(p, v[0], v[1]);
  store_pair(p + 2, v[2], v[3]);
}

// Sum over the slices of 4 columns of one row, in slice order.
__device__ __forceinline__ void sum_slices(const float* p, int64_t slice_stride, int splits, float (&v)[4]) {
  float4 x = __ldcs(reinterpret_cast<const float4*>(p));
  v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  for (int s = 1; s < splits; ++s) {
    x = __ldcs(reinterpret_cast<const float4*>(p + s * slice_stride));
    v[0] += x.x, v[1] += x.y, v[2] += x.z, v[3] += x.w;
  }
}

template <typename Tout>
__global__ void __launch_bounds__(kReduceThreads, 4) grouped_gemm_reduce_kernel(const GemmParams p) {
  extern __shared__ int32_t prefix[];  // E + 1
  MTile tile;
  if (!find_m_tile<kReduceRows, kReduceThreads>(p.experts, static_cast<int32_t>(blockIdx.x), prefix, tile)) return;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * kReduceThreads + threadIdx.x) * 4;
  if (c >= p.n_out) return;
  const bool swiglu = p.epilogue == MOEK_EPILOGUE_SWIGLU;
  const int64_t slice_stride = p.rows_total * p.n;
  Tout* out = static_cast<Tout*>(p.out);
  for (int r = 0; r < tile.rows; ++r) {
    const int64_t row = tile.row0 + r;
    const float* part = p.partial + row * p.n + c;
    const float scale = p.row_scale != nullptr ? __ldg(p.row_scale + row) : 1.f;
    float v[4];
    sum_slices(part, slice_stride, p.splits, v);
    if (swiglu) {
      float up[4];
      sum_slices(part + p.n_out, slice_stride, p.splits, up);
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = silu(v[i]) * up[i] * scale;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = activate(p.epilogue, v[i]) * scale;
    }
    store_quad(out + row * p.n_out + c, v);
  }
}

// Enqueues the reduction of p.splits slices in p.partial into p.out (after the GEMM, same stream).
template <typename Tout>
cudaError_t launch_gemm_reduce(const GemmParams& p, cudaStream_t stream) {
  const int64_t m_tiles = m_tile_bound(p.experts, kReduceRows);
  const int64_t col_blocks = (p.n_out + kReduceCols - 1) / kReduceCols;
  if (m_tiles == 0 || col_blocks == 0) return cudaSuccess;
  if (m_tiles > kTileSaturation || col_blocks > 65535) return cudaErrorInvalidValue;
  const size_t smem = (static_cast<size_t>(p.experts.num_experts) + 1) * sizeof(int32_t);
  auto kernel = grouped_gemm_reduce_kernel<Tout>;
  if (smem > 48 * 1024) {
    const cudaError_t err = allow_max_dynamic_smem(kernel);
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(static_cast<unsigned>(m_tiles), static_cast<unsigned>(col_blocks)), kReduceThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace moek
