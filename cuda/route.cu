// Routing entry point: validates nothing (src/route.rs did), picks the kernel configuration, launches
// route_fast_kernel (route_fast.cuh: plain top-k of at most 256 experts, k <= 8, no bias) or
// route_kernel (route_kernel.cuh: everything) and, with an expert capacity, the two capacity passes.
#include "chunk_scan.cuh"
#include "route_fast.cuh"
#include "route_kernel.cuh"

#include <cstdlib>

namespace moek {
namespace {

// Values a lane holds when T is large enough to fill the GPU: 16 by default. MOEK_ROUTE_LANE_VALUES=32
// (read once) halves the lanes per token; it exists for tuning runs of the benchmarks.
int lane_values_target() {
  static const int target = [] {
    const char* v = std::getenv("MOEK_ROUTE_LANE_VALUES");
    return v != nullptr && std::atoi(v) == 32 ? 32 : 16;
  }();
  return target;
}

// Whether plain top-k may take route_fast_kernel: on unless MOEK_ROUTE_FAST=0 (read once; for
// tuning runs and for comparing the two paths).
bool fast_path_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("MOEK_ROUTE_FAST");
    return v == nullptr || std::atoi(v) != 0;
  }();
  return enabled;
}

// One block per chunk of pairs: a pair's position inside its expert is the expert's count in earlier
// chunks plus the pairs of the same expert earlier in this chunk; positions >= capacity are dropped.
__global__ void capacity_drop_kernel(int32_t* ids, float* weights, const int32_t* chunk_base, int64_t num_pairs,
                                     int64_t num_chunks, int capacity, int32_t* dropped) {
  extern __shared__ int32_t s_ids[];
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int32_t id = pair < num_pairs ? ids[pair] : -1;
  s_ids[threadIdx.x] = id;
  __syncthreads();
  if (pair >= num_pairs) return;
  const int32_t position =
      chunk_base[static_cast<int64_t>(id) * num_chunks + blockIdx.x] + count_equal_before(s_ids, threadIdx.x, id);
  if (position >= capacity) {
    ids[pair] = MOEK_DROPPED_ID;
    weights[pair] = 0.f;
    atomicAdd(dropped, 1);
  }
}

}  // namespace
}  // namespace moek

// Enqueues the routing described by `a`, whose arguments the caller (src/route.rs) has validated.
// `capacity_chunk` is the number of pairs per capacity chunk the workspace was sized for.
extern "C" int moek_cuda_route(const moek_route_args* a, int32_t capacity_chunk, cudaStream_t stream) {
  using namespace moek;
  const int64_t T = a->num_tokens;
  const int E = a->num_experts;
  const int k = a->k;
  const int64_t num_pairs = T * k;
  const int64_t num_chunks = (num_pairs + capacity_chunk - 1) / capacity_chunk;
  cudaError_t err = cudaSuccess;

  if (a->capacity > 0) {
    err = cudaMemsetAsync(a->dropped_count, 0, sizeof(int32_t), stream);
    if (err != cudaSuccess) return err;
    if (T == 0) return cudaSuccess;
    err = cudaMemsetAsync(a->workspace, 0, sizeof(int32_t) * E * num_chunks, stream);
    if (err != cudaSuccess) return err;
  }
  if (T == 0) return cudaSuccess;

  // Widest vector load that divides the row (and, under the group limit, the group) and matches the
  // pointer's alignment.
  const bool limited = a->mode == MOEK_ROUTE_GROUP_LIMITED;
  const int group_size = limited ? E / a->num_groups : E;
  const size_t elem = a->logits_dtype == MOEK_DTYPE_F32 ? 4 : 2;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(a->logits);
  // Instantiated widths: 4 and 1 for f32; 8, 4 and 1 for bf16 (route_f32.cu, route_bf16.cu).
  int vec = 16 / static_cast<int>(elem);
  while (vec > 1 && (E % vec != 0 || group_size % vec != 0 || addr % (vec * elem) != 0)) vec = vec == 4 ? 1 : vec / 2;
  const int row_chunks = E / vec;
  // Lanes per token: the fewest that hold at most 16 values each; then more, while the grid would be
  // too small to fill the GPU (about 128K threads), since a token's latency then sets the time.
  auto values_per_lane = [&](int l) { return ((row_chunks + l - 1) / l) * vec; };
  int lanes = 1;
  while (lanes < 32 && values_per_lane(lanes) > lane_values_target()) lanes <<= 1;
  while (lanes < 32 && T * lanes < (int64_t{1} << 17) && values_per_lane(lanes) > vec) lanes <<= 1;
  const int nv = values_per_lane(lanes);

  auto align8 = [](size_t x) { return (x + 7) & ~static_cast<size_t>(7); };
  const size_t off_candidates = align8(static_cast<size_t>(k) * 12);
  const size_t off_chunk_top2 = off_candidates + (a->mode == MOEK_ROUTE_GROUPED ? 0 : kCandidateCap * 12);
  const size_t off_groups = off_chunk_top2 + (limited ? static_cast<size_t>(row_chunks) * 8 : 0);
  const size_t per_token = align8(off_groups + (limited ? static_cast<size_t>(a->num_groups) * 8 : 0));
  int tokens_per_block = kRouteBlock / lanes;
  while (tokens_per_block * per_token > kRouteMaxSharedBytes && tokens_per_block * lanes > 32) tokens_per_block /= 2;

  RouteParams p;
  p.logits = a->logits;
  p.bias = a->bias;
  p.ids = a->topk_ids;
  p.weights = a->topk_weights;
  p.num_tokens = T;
  p.num_experts = E;
  p.k = k;
  p.mode = a->mode == MOEK_ROUTE_SWITCH ? MOEK_ROUTE_TOPK : a->mode;
  p.score_function = a->score_function;
  p.num_groups = (limited || a->mode == MOEK_ROUTE_GROUPED) ? a->num_groups : 1;
  p.topk_groups = a->topk_groups;
  p.renormalize = a->renormalize;
  p.scale = a->scale;
  p.chunks_per_row = row_chunks;
  p.smem_per_token = static_cast<int>(per_token);
  p.off_candidates = static_cast<int>(off_candidates);
  p.off_chunk_top2 = static_cast<int>(off_chunk_top2);
  p.off_groups = static_cast<int>(off_groups);
  p.chunk_counts = static_cast<int32_t*>(a->workspace);
  p.capacity = a->capacity;
  p.chunk = capacity_chunk;
  p.num_chunks = num_chunks;

  const dim3 block(tokens_per_block * lanes);
  const dim3 grid(static_cast<unsigned>((T + tokens_per_block - 1) / tokens_per_block));
  const size_t smem = tokens_per_block * per_token;
  // The fast path (route_fast.cuh): plain top-k without a bias, k <= 8, whole 16-byte chunks, at
  // least 8 of them (every lane of a token holds data) and at most 32 values a lane (E <= 256).
  const int full_vec = 16 / static_cast<int>(elem);
  const bool plain = a->mode == MOEK_ROUTE_TOPK || a->mode == MOEK_ROUTE_SWITCH;
  if (fast_path_enabled() && plain && a->bias == nullptr && k <= kFastMaxK && vec == full_vec &&
      row_chunks >= kFastLanes && row_chunks * vec <= kFastLanes * kFastMaxValues) {
    const int fast_nv = (row_chunks + kFastLanes - 1) / kFastLanes * vec <= 16 ? 16 : 32;
    const bool full = row_chunks * vec == kFastLanes * fast_nv;
    err = a->logits_dtype == MOEK_DTYPE_F32 ? launch_route_fast<float>(p, fast_nv, full, stream)
                                            : launch_route_fast<__nv_bfloat16>(p, fast_nv, full, stream);
  } else {
    err = a->logits_dtype == MOEK_DTYPE_F32
              ? launch_route<float>(p, vec, lanes, nv, grid, block, smem, stream)
              : launch_route<__nv_bfloat16>(p, vec, lanes, nv, grid, block, smem, stream);
  }
  if (err != cudaSuccess || a->capacity == 0) return err;

  chunk_exclusive_scan_kernel<<<E, 256, 0, stream>>>(p.chunk_counts, num_chunks, nullptr);
  capacity_drop_kernel<<<static_cast<unsigned>(num_chunks), capacity_chunk, capacity_chunk * sizeof(int32_t),
                         stream>>>(p.ids, p.weights, p.chunk_counts, num_pairs, num_chunks, a->capacity,
                                   a->dropped_count);
  return cudaGetLastError();
}
