// The fused MoE layer (docs/fused-layer.md): after route and plan, ONE persistent launch does gate|up
// with the activation, down and the weighted combine, with no permuted copy of x in memory.
//
// Work items, numbered in the order they are claimed from an atomic ticket (M = m-tiles over all
// experts, from the plan's device-side offsets; N1, N2 = n-tiles of the two products):
//   [0, M*N1)            gate|up tile (n1, m) at n1 * M + m: A rows gathered from x through the plan's
//                        row_source (token = pair / k), activation in the epilogue, h (bf16) stored in
//                        the plan's expert-grouped row order; then gate_done[m] += 1 (release).
//   [M*N1, M*(N1+N2))    down tile (n2, m): waits (acquire) for gate_done[m] == N1, A = h, y (bf16) rows
//                        stored unscaled; then down_done[expert] += 1 (release).
//   then ceil(T / CT)    combine of CT tokens: waits for down_done[e] == (m-tiles of e) * N2 for every
//                        expert e of its tokens, then out[t] = residual[t] + sum over slots s in order
//                        0..k-1 of weight[t, s] * y[pair_row[t, s]] in fp32 (the composed combine's
//                        arithmetic, cuda/permute.cu).
// Every wait is for items with smaller numbers, claimed earlier by blocks that are running (a block
// claims only while resident), so the smallest unfinished item never waits: no deadlock, whatever the
// grid size. Each output element is computed by one tile in a fixed K order and summed in slot order:
// bit-identical from run to run (no float atomics). Same n-tile items of consecutive m-tiles run
// together (n-major numbering), so blocks that read the same weight tile run at the same time (L2).
#include <algorithm>

#include "grouped_gemm_kernel.cuh"

namespace moek {
namespace {

// Counter words in the caller's buffer: [0] the ticket, then gate_done[m_bound], then down_done[E].
struct FusedParams {
  GemmParams gate_up;  // a = x (gathered), b = w_gate_up, out = h [max_rows, I]
  GemmParams down;     // a = h, b = w_down, out = y [max_rows, H]
  const int32_t* topk_ids;  // [T, k]: the expert of each kept pair
  const float* weights;     // [T, k] or nullptr (weight 1)
  const int32_t* pair_row;  // [T, k]
  const __nv_bfloat16* residual;  // [T, H] or nullptr
  __nv_bfloat16* out;             // [T, H]
  int64_t num_tokens;
  int64_t hidden;
  int32_t k;
  int32_t n1_tiles, n2_tiles;
  int32_t combine_tokens;  // CT: tokens per combine item
  uint32_t* ticket;
  uint32_t* gate_done;
  uint32_t* down_done;
};

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void add_release(uint32_t* p, uint32_t v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// A wait this long means a broken dependency (a bug, or counters not zeroed): trap, so that the launch
// fails with an error instead of hanging the GPU. Real waits last microseconds to milliseconds.
constexpr uint64_t kWaitLimitNs = 10'000'000'000ull;

// Spins until *p >= target (the counters only grow).
__device__ __forceinline__ void wait_at_least(const uint32_t* p, uint32_t target) {
  if (load_acquire(p) >= target) return;
  const uint64_t start = global_ns();
  while (load_acquire(p) < target) {
    __nanosleep(64);
    if (global_ns() - start > kWaitLimitNs) __trap();
  }
}

// Publishes a finished item: every thread's stores, then one release increment. The barrier orders the
// block's stores before thread 0's release (the pattern of CUTLASS's semaphore).
__device__ __forceinline__ void publish(uint32_t* counter) {
  __syncthreads();
  if (threadIdx.x == 0) add_release(counter, 1);
}

// Combine item `c`: tokens [c * CT, (c + 1) * CT).
template <int THREADS>
__device__ void combine_item(const FusedParams& p, int64_t c, const int32_t* prefix) {
  const int64_t t0 = c * p.combine_tokens;
  const int64_t t1 = min(t0 + p.combine_tokens, p.num_tokens);
  const int E = p.down.experts.num_experts;
  const int64_t max_rows = p.down.experts.max_rows;
  // Wait for the experts of every kept pair (each thread some pairs, then a barrier: acquire + bar.sync
  // orders the y rows before every thread's loads).
  for (int64_t pair = t0 * p.k + threadIdx.x; pair < t1 * p.k; pair += THREADS) {
    const int32_t row = __ldg(p.pair_row + pair);
    const int32_t e = __ldg(p.topk_ids + pair);
    if (row < 0 || row >= max_rows || e < 0 || e >= E) continue;
    wait_at_least(p.down_done + e, static_cast<uint32_t>(prefix[e + 1] - prefix[e]) * p.n2_tiles);
  }
  __syncthreads();
  const int64_t vectors = p.hidden / 8;  // 16-byte vectors of 8 bf16
  const uint4* y = static_cast<const uint4*>(p.down.out);
  for (int64_t i = threadIdx.x; i < (t1 - t0) * vectors; i += THREADS) {
    const int64_t t = t0 + i / vectors, v = i % vectors;
    float acc[8];
    if (p.residual != nullptr) {
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(p.residual + t * p.hidden) + v);
      const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&w);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = __bfloat162float(e[j]);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = 0.f;
    }
    for (int s = 0; s < p.k; ++s) {
      const int64_t pair = t * p.k + s;
      const int32_t row = __ldg(p.pair_row + pair);
      if (row < 0 || row >= max_rows) continue;
      const float weight = p.weights != nullptr ? __ldg(p.weights + pair) : 1.f;
      // y was written during this launch: read it through L2 (__ldcg), never a stale L1 line.
      const uint4 w = __ldcg(y + row * vectors + v);
      const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&w);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = fmaf(weight, __bfloat162float(e[j]), acc[j]);
    }
    uint4 packed;
    __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = __float2bfloat16_rn(acc[j]);
    reinterpret_cast<uint4*>(p.out + t * p.hidden)[v] = packed;
  }
}

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS) fused_layer_kernel(const FusedParams p) {
  constexpr int BM = Cfg::BM, THREADS = Cfg::THREADS;
  extern __shared__ __align__(128) unsigned char smem[];
  // The m-tile prefix lives past the pipeline ring, for the whole launch.
  int32_t* prefix = reinterpret_cast<int32_t*>(smem + Cfg::PIPE_BYTES);
  __shared__ uint32_t s_item;
  const int64_t m_tiles = scan_m_tiles<BM, THREADS>(p.gate_up.experts, prefix);
  const int64_t gate_items = m_tiles * p.n1_tiles;
  const int64_t down_items = m_tiles * p.n2_tiles;
  const int64_t combine_items = (p.num_tokens + p.combine_tokens - 1) / p.combine_tokens;
  const int64_t total = gate_items + down_items + combine_items;
  for (;;) {
    __syncthreads();  // the previous item is done in every thread: s_item and the ring are free
    if (threadIdx.x == 0) s_item = atomicAdd(p.ticket, 1u);
    __syncthreads();
    int64_t item = s_item;
    if (item >= total) return;
    if (item < gate_items) {
      const int32_t m = static_cast<int32_t>(item % m_tiles);
      const MTile tile = locate_m_tile(p.gate_up.experts, BM, m, prefix);
      gemm_tile<__nv_bfloat16, __nv_bfloat16, Cfg, true>(p.gate_up, tile, static_cast<int>(item / m_tiles), 0, smem);
      publish(p.gate_done + m);
      continue;
    }
    item -= gate_items;
    if (item < down_items) {
      const int32_t m = static_cast<int32_t>(item % m_tiles);
      if (threadIdx.x == 0) wait_at_least(p.gate_done + m, static_cast<uint32_t>(p.n1_tiles));
      __syncthreads();
      const MTile tile = locate_m_tile(p.down.experts, BM, m, prefix);
      gemm_tile<__nv_bfloat16, __nv_bfloat16, Cfg>(p.down, tile, static_cast<int>(item / m_tiles), 0, smem);
      publish(p.down_done + tile.expert);
      continue;
    }
    combine_item<THREADS>(p, item - down_items, prefix);
  }
}

template <typename Cfg>
size_t fused_smem_bytes(int num_experts) {
  return Cfg::PIPE_BYTES + ((static_cast<size_t>(num_experts) + 1) * sizeof(int32_t) + 15) / 16 * 16;
}

// Co-resident blocks per SM of the kernel at `smem` bytes, asked once per device, shape and smem size
// (a host-side query: legal during stream capture, no synchronisation). 0 when it cannot be asked.
template <typename Cfg>
int fused_blocks_per_sm(size_t smem) {
  static std::atomic<int64_t> cache[64];  // per device: smem << 16 | (blocks + 1), 0 unknown
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  const int64_t known = cache[device].load(std::memory_order_relaxed);
  if (known != 0 && (known >> 16) == static_cast<int64_t>(smem)) return static_cast<int>(known & 0xffff) - 1;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fused_layer_kernel<Cfg>, Cfg::THREADS, smem) !=
      cudaSuccess) {
    return 0;
  }
  cache[device].store((static_cast<int64_t>(smem) << 16) | (blocks + 1), std::memory_order_relaxed);
  return blocks;
}

template <typename Cfg>
cudaError_t launch_fused(FusedParams p, int64_t counter_words, cudaStream_t stream) {
  const int E = p.gate_up.experts.num_experts;
  const int64_t m_bound = m_tile_bound(p.gate_up.experts, Cfg::BM);
  if (counter_words < 1 + m_bound + E) return cudaErrorInvalidValue;
  p.n1_tiles = static_cast<int32_t>(p.gate_up.epilogue == MOEK_EPILOGUE_SWIGLU
                                        ? (p.gate_up.n_out + Cfg::BN / 2 - 1) / (Cfg::BN / 2)
                                        : (p.gate_up.n_out + Cfg::BN - 1) / Cfg::BN);
  p.n2_tiles = static_cast<int32_t>((p.down.n_out + Cfg::BN - 1) / Cfg::BN);
  // About 4 vectors of 8 elements per thread per combine item.
  p.combine_tokens = static_cast<int32_t>(std::max<int64_t>(1, Cfg::THREADS * 4 / (p.hidden / 8)));
  const int64_t items_bound =
      m_bound * (p.n1_tiles + p.n2_tiles) + (p.num_tokens + p.combine_tokens - 1) / p.combine_tokens;
  if (items_bound >= (int64_t{1} << 31)) return cudaErrorInvalidValue;  // the ticket is 32-bit
  p.gate_done = p.ticket + 1;
  p.down_done = p.gate_done + m_bound;
  // The counters start at zero in every call: a memset node, captured with the kernel.
  cudaError_t err = cudaMemsetAsync(p.ticket, 0, (1 + m_bound + E) * sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  const size_t smem = fused_smem_bytes<Cfg>(E);
  auto kernel = fused_layer_kernel<Cfg>;
  err = allow_max_dynamic_smem(kernel);
  if (err != cudaSuccess) return err;
  const int per_sm = fused_blocks_per_sm<Cfg>(smem);
  const int sms = current_device_attribute<cudaDevAttrMultiProcessorCount>();
  if (per_sm < 1 || sms < 1) return cudaErrorInvalidConfiguration;
  // Persistent: no more blocks than fit at once, nor than there are items.
  const int64_t grid = std::min<int64_t>(static_cast<int64_t>(per_sm) * sms, items_bound);
  kernel<<<static_cast<unsigned>(grid), Cfg::THREADS, smem, stream>>>(p);
  return cudaGetLastError();
}

// The product `a . b^T` over rows offsets[e]..offsets[e+1] of each expert: the parts of GemmParams
// both phases share.
GemmParams phase(const moek_layer_args* a, const int32_t* offsets, int64_t max_rows, const void* in,
                 const void* w, void* out, int64_t n, int64_t k, int32_t epilogue) {
  GemmParams g;
  g.a = in;
  g.b = w;
  g.out = out;
  g.row_scale = nullptr;
  g.experts.offsets = offsets;
  g.experts.counts = nullptr;
  g.experts.max_rows = max_rows;
  g.experts.capacity = 0;
  g.experts.num_experts = a->routing.num_experts;
  g.n = n;
  g.k = k;
  g.n_out = epilogue == MOEK_EPILOGUE_SWIGLU ? n / 2 : n;
  g.epilogue = epilogue;
  g.splits = 1;
  g.partial = nullptr;
  g.rows_total = max_rows;
  g.a_rows = nullptr;
  g.gather_k = 1;
  g.gather_tokens = 0;
  return g;
}

}  // namespace
}  // namespace moek

// Enqueues the counters' memset and the fused kernel (arguments validated by src/fused_layer.rs): the
// layer's x, weights, shape and out from `a`; the routing and plan results; h [max_rows, I] and
// y [max_rows, H] bf16 scratch; residual [T, H] bf16 or NULL; `counters` of `counter_words` u32 (at least
// 1 + m-tile bound + E); `tile` a moek_gemm_tile shape (SMALL, MEDIUM or LARGE).
extern "C" int moek_cuda_fused_layer(const moek_layer_args* a, const int32_t* topk_ids, const float* weights,
                                     const int32_t* expert_offsets, const int32_t* row_source,
                                     const int32_t* pair_row, int64_t max_rows, void* h, void* y,
                                     const void* residual, uint32_t* counters, int64_t counter_words, int32_t tile,
                                     cudaStream_t stream) {
  using namespace moek;
  if (a->num_tokens == 0) return cudaSuccess;
  const bool swiglu = a->activation == MOEK_EPILOGUE_SWIGLU;
  FusedParams p;
  p.gate_up = phase(a, expert_offsets, max_rows, a->x, a->w_gate_up, h,
                    swiglu ? 2 * a->intermediate : a->intermediate, a->hidden, a->activation);
  p.gate_up.a_rows = row_source;
  p.gate_up.gather_k = a->routing.k;
  p.gate_up.gather_tokens = a->num_tokens;
  p.down = phase(a, expert_offsets, max_rows, h, a->w_down, y, a->hidden, a->intermediate, MOEK_EPILOGUE_IDENTITY);
  p.topk_ids = topk_ids;
  p.weights = weights;
  p.pair_row = pair_row;
  p.residual = static_cast<const __nv_bfloat16*>(residual);
  p.out = static_cast<__nv_bfloat16*>(a->out);
  p.num_tokens = a->num_tokens;
  p.hidden = a->hidden;
  p.k = a->routing.k;
  p.ticket = counters;
  switch (tile) {
    case MOEK_GEMM_TILE_SMALL:
      return launch_fused<TileSmall>(p, counter_words, stream);
    case MOEK_GEMM_TILE_MEDIUM:
      return launch_fused<TileMedium>(p, counter_words, stream);
    default:
      return launch_fused<TileLarge>(p, counter_words, stream);
  }
}
