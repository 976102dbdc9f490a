// Grouped-GEMM entry point: validates nothing and chooses nothing (src/grouped_gemm.rs did), maps the
// expert layout, and launches the kernel of the input type (grouped_gemm_bf16.cu, grouped_gemm_f16.cu).
#include "grouped_gemm_kernel.cuh"

// Built in their own translation units.
extern template cudaError_t moek::launch_grouped_gemm<__nv_bfloat16>(const moek::GemmParams&, moek_gemm_tile,
                                                                     moek_dtype, cudaStream_t);
extern template cudaError_t moek::launch_grouped_gemm<__half>(const moek::GemmParams&, moek_gemm_tile, moek_dtype,
                                                              cudaStream_t);

namespace moek {

// The sm_90a path (grouped_gemm_hopper.cu); `narrow`: its 64-row variant (MOEK_GEMM_TILE_HOPPER_64).
cudaError_t launch_grouped_gemm_hopper(const GemmParams& p, bool narrow, bool f16, moek_dtype out_dtype,
                                       cudaStream_t stream);

}  // namespace moek

// `a->tile` is resolved (never AUTO): src/grouped_gemm.rs (resolved_tile) chooses it, the sm_90a
// kernel included, and reads the environment overrides. `splits`: K slices, chosen there too
// (split_plan) for these arguments and a workspace of at least splits * rows * n floats; 1 does not
// touch the workspace. The sm_90a kernels (HOPPER, HOPPER_64) never split.
extern "C" int moek_cuda_grouped_gemm(const moek_grouped_gemm_args* a, int32_t splits, cudaStream_t stream) {
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
  p.splits = splits;
  p.partial = splits > 1 ? static_cast<float*>(a->workspace) : nullptr;
  p.rows_total = masked ? a->capacity * a->num_experts : a->max_rows;
  p.a_rows = nullptr;  // A is not gathered here (only the fused layer gathers)
  p.gather_k = 1;
  p.gather_tokens = 0;
  const moek_gemm_tile tile = a->tile;
  if (tile == MOEK_GEMM_TILE_HOPPER || tile == MOEK_GEMM_TILE_HOPPER_64) {
    p.splits = 1;
    p.partial = nullptr;
    return launch_grouped_gemm_hopper(p, tile == MOEK_GEMM_TILE_HOPPER_64, a->dtype == MOEK_DTYPE_F16, a->out_dtype,
                                      stream);
  }
  if (a->dtype == MOEK_DTYPE_BF16) return launch_grouped_gemm<__nv_bfloat16>(p, tile, a->out_dtype, stream);
  return launch_grouped_gemm<__half>(p, tile, a->out_dtype, stream);
}
