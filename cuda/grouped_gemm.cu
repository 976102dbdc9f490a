// Grouped-GEMM entry point: validates nothing (src/grouped_gemm.rs did), resolves the tile shape and the
// expert layout, and launches the kernel of the input type (grouped_gemm_bf16.cu, grouped_gemm_f16.cu).
#include "grouped_gemm_kernel.cuh"

// Built in their own translation units.
extern template cudaError_t moek::launch_grouped_gemm<__nv_bfloat16>(const moek::GemmParams&, moek_gemm_tile,
                                                                     moek_dtype, cudaStream_t);
extern template cudaError_t moek::launch_grouped_gemm<__half>(const moek::GemmParams&, moek_gemm_tile, moek_dtype,
                                                              cudaStream_t);

namespace moek {

// The sm_90a path (grouped_gemm_hopper.cu). AUTO asks grouped_gemm_hopper_auto (available, and not
// turned off by MOEK_GEMM_HOPPER=0).
bool grouped_gemm_hopper_auto(int num_experts);
cudaError_t launch_grouped_gemm_hopper(const GemmParams& p, bool f16, moek_dtype out_dtype, cudaStream_t stream);

namespace {

// Rows per expert from which AUTO takes the sm_90a kernel where it is available.
constexpr int64_t kHopperMinRowsPerExpert = 128;

// The tile shape for AUTO: by the average rows per expert the sizes allow.
moek_gemm_tile resolve_tile(const moek_grouped_gemm_args& a) {
  if (a.tile != MOEK_GEMM_TILE_AUTO) return a.tile;
  const int64_t per_expert = a.layout == MOEK_GEMM_MASKED ? a.capacity : a.max_rows / a.num_experts;
  if (per_expert <= TileSmall::BM) return MOEK_GEMM_TILE_SMALL;
  if (per_expert <= TileMedium::BM) return MOEK_GEMM_TILE_MEDIUM;
  if (per_expert >= kHopperMinRowsPerExpert && grouped_gemm_hopper_auto(a.num_experts)) {
    return MOEK_GEMM_TILE_HOPPER;
  }
  return MOEK_GEMM_TILE_LARGE;
}

}  // namespace
}  // namespace moek

extern "C" int moek_cuda_grouped_gemm(const moek_grouped_gemm_args* a, cudaStream_t stream) {
  using namespace moek;
  const bool masked = a->layout == MOEK_GEMM_MASKED;
  GemmParams p;
  p.a = a->a;
  p.b = a->b;
  p.out = a->out;
  p.row_scale = a->row_scale;
  p.experts.offsets = masked ? nullptr : a->expert_offsets;
  p.experts.counts = masked ? a->expert_counts : nullptr;
  p.experts.max_rows = masked ? 0 : a->max_rows;
  p.experts.capacity = masked ? static_cast<int32_t>(a->capacity) : 0;
  p.experts.num_experts = a->num_experts;
  p.n = a->n;
  p.k = a->k;
  p.n_out = a->epilogue == MOEK_EPILOGUE_SWIGLU ? a->n / 2 : a->n;
  p.epilogue = a->epilogue;
  const moek_gemm_tile tile = resolve_tile(*a);
  if (tile == MOEK_GEMM_TILE_HOPPER) {
    return launch_grouped_gemm_hopper(p, a->dtype == MOEK_DTYPE_F16, a->out_dtype, stream);
  }
  if (a->dtype == MOEK_DTYPE_BF16) return launch_grouped_gemm<__nv_bfloat16>(p, tile, a->out_dtype, stream);
  return launch_grouped_gemm<__half>(p, tile, a->out_dtype, stream);
}
