// The grouped GEMM's sm_90a path: the same semantics as the portable kernel (grouped_gemm_kernel.cuh),
// built from TMA, mbarriers and wgmma. One kernel template, two variants (struct Variant below):
//   Wide   (MOEK_GEMM_TILE_HOPPER, prefill, >= 128 rows per expert): 128 x 256 tiles, 2 consumer
//          warpgroups of 64 rows each, 384 threads;
//   Narrow (MOEK_GEMM_TILE_HOPPER_64, 33..127 rows per expert): 64 x 256 tiles, 1 consumer warpgroup,
//          256 threads. At 64 rows per expert (Mixtral T = 256) a 128-row tile would run the tensor
//          cores at twice the useful rate (~550 TFLOP/s to stream the weights at the HBM floor, at the
//          edge of what wgmma reaches); a 64-row tile needs ~275 TFLOP/s, so B streams at the memory
//          bandwidth, each byte once per 64 rows. Its stages are 40 KB (A's box is 64 rows).
// What follows describes Wide; Narrow is the same with one consumer and BM = 64.
//
// Persistent grid, one CTA per SM, 384 threads = 3 warpgroups. Each CTA walks the output tiles t =
// blockIdx.x, + gridDim.x, ...; a tile is 128 rows x 256 product columns of one expert (for SwiGLU:
// 128 output columns, whose 128 gate rows and 128 up rows of B make the 256). Tile order: expert, then
// n-block, then m-block (CTAs running together share B tiles in L2). The tile -> (expert, rows) map is a
// prefix sum over the experts' m-tile counts from the device offsets or counts, computed by each CTA in
// shared memory at start (counts clamped as in expert_tiles.cuh, so corrupt offsets stay in bounds).
//
// Warpgroup 0 is the producer (one thread issues TMA; registers given away with setmaxnreg): per
// 64-wide K step it loads the A box [128 rows, 64] and two B boxes [128 rows, 64] into one stage of a
// 4-stage ring, completing on the stage's "full" mbarrier. Warpgroups 1 and 2 are consumers: each
// multiplies its 64 rows of A by the 256 B rows with wgmma m64n256k16 (both operands in shared memory,
// 128-byte swizzle as TMA wrote them), fp32 accumulators in registers, then frees the stage on its
// "empty" mbarrier (one arrival per consumer warp). After the last K step the consumers apply the
// epilogue in registers and store straight to global memory, rows past the expert's end masked (A's
// box may run into the next expert's rows or past the buffer, where TMA zero-fills; K and N tails
// are zero-filled the same way). No atomics: deterministic.
//
// Staged epilogue (the default for bf16/f16 output of the plain epilogues, not SwiGLU, where it fits;
// MOEK_GEMM_HOPPER_EPILOGUE chooses otherwise: launch_epilogue says when and what it measured): a consumer whose 64 rows
// all belong to the tile's expert writes them, activated and rounded, 32 columns at a time into one of
// its two 4 KB subtile buffers (TMA's 64-byte swizzle), and one thread stores each subtile with TMA,
// asynchronously: the consumer reuses a buffer once the store before last has read it, and goes on to
// the next tile's K steps while the stores drain. Why: ncu had the tensor pipe 42% busy on Qwen3's
// down projection (K = 768) with direct stores, as every CTA ends its tiles at about the same time and
// 132 SMs' 64 KB bursts queue for HBM; torch._grouped_mm's CUTLASS kernel stores 128 x 32 subtiles this
// way. Rows past the expert's end (a tile's last rows) still take the direct, masked path: a TMA box
// would overwrite the next expert's rows. The 16 KB of buffers leave Wide its four stages.
//
// Tensor maps are encoded on the host per call (cuTensorMapEncodeTiled through cudart's driver entry
// point) and passed as __grid_constant__ parameters: A as 2-D [rows, K], B as 3-D [E, N, K].
#include "grouped_gemm_kernel.cuh"
#include "wgmma_sm90.cuh"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

namespace moek {
namespace hopper {

constexpr int BN = 256, BK = 64;
constexpr int B_BOX_ROWS = 128;                        // rows of each of the two B boxes
constexpr int B_BYTES = BN * BK * 2;                   // 32 KB
// Shared memory a launch may need beyond Variant::smem_bytes (the static part, with slack).
constexpr size_t kStaticSmemSlack = 256;
// The H100/H200 opt-in shared memory per block (227 KB): every variant fits it at the most experts.
constexpr size_t kSmemOptin = 232448;
// The staged epilogue's subtiles: 32 output columns (64 bytes, stored with the 64-byte swizzle) x a
// consumer's 64 rows, 4 KB; each consumer has two, alternating.
constexpr int OUT_SUB = 32;
constexpr int OUT_SUB_BYTES = 64 * OUT_SUB * 2;

// A kernel variant: CONSUMERS warpgroups of 64 rows each (BM = 64 * CONSUMERS) behind one producer
// warpgroup, a STAGES-deep ring.
template <int CONSUMERS_, int STAGES_, bool STAGED_ = false>
struct Variant {
  static constexpr int CONSUMERS = CONSUMERS_, STAGES = STAGES_;
  static constexpr bool STAGED = STAGED_;  // the staged (TMA store) epilogue
  static constexpr int BM = 64 * CONSUMERS;
  static constexpr int THREADS = 128 * (1 + CONSUMERS);
  static constexpr int A_BYTES = BM * BK * 2;             // A's box: BM rows of 64
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int OUT_BYTES = STAGED ? CONSUMERS * 2 * OUT_SUB_BYTES : 0;  // each consumer's two subtiles
  static constexpr int BAR_BYTES = 2 * STAGES * 8;        // full[STAGES], empty[STAGES]
  static constexpr int CONSUMER_WARPS = 4 * CONSUMERS;    // arrivals that free a stage

  // Dynamic shared memory: 1024 bytes of alignment slack (the swizzled tiles need 1024-byte
  // alignment), the ring, the staged output rows, the barriers, the E + 1 prefix of m-tiles.
  static constexpr size_t smem_bytes(int num_experts) {
    return 1024 + PIPE_BYTES + OUT_BYTES + BAR_BYTES + (static_cast<size_t>(num_experts) + 1) * sizeof(int32_t);
  }

  static_assert(A_BYTES % 1024 == 0 && STAGE_BYTES % 1024 == 0, "swizzled boxes start 1024-byte aligned");
};
// MOEK_GEMM_TILE_HOPPER: 128 x 256, 48 KB stages (192 KB ring).
using Wide = Variant<2, 4>;
// MOEK_GEMM_TILE_HOPPER_64: 64 x 256, 40 KB stages (160 KB ring). A fifth stage (200 KB) would not
// fit beside the tile table of 8192 experts; four already keep 128 KB of weights in flight per SM,
// several times what the HBM latency needs at 1/132 of its bandwidth.
using Narrow = Variant<1, 4>;
// The same with the staged epilogue (bf16/f16 output); they fit fewer experts (see `fits`).
using WideStaged = Variant<2, 4, true>;
using NarrowStaged = Variant<1, 4, true>;
// Both fit the most experts, and Wide needs the more shared memory: one availability check serves both.
static_assert(Wide::smem_bytes(MOEK_GEMM_MAX_EXPERTS) + kStaticSmemSlack <= kSmemOptin, "Wide fits 8192 experts");
static_assert(Narrow::smem_bytes(MOEK_GEMM_MAX_EXPERTS) <= Wide::smem_bytes(MOEK_GEMM_MAX_EXPERTS), "Wide bounds both");

// Output columns per tile: 256 product columns, or 128 SwiGLU outputs.
constexpr __host__ __device__ int out_cols_per_tile(bool swiglu) { return swiglu ? BN / 2 : BN; }

#if defined(MOEK_SM90A)

// Wide's register split (Narrow's 256 threads have 255 registers each without it).
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;  // 128 * 40 + 256 * 232 <= 64K

// One output tile.
struct Tile {
  int32_t expert;
  int32_t n_block;
  int32_t row0;  // first row (of A and the output)
  int32_t rows;  // valid rows from row0, 1..BM
};

// Tile t (< prefix[E] * n_tiles): experts in order, each expert's tiles n-block-major.
template <int BM>
__device__ __forceinline__ Tile decode_tile(const ExpertRows& r, const int32_t* prefix, int64_t t, int32_t n_tiles) {
  const int32_t q = static_cast<int32_t>(t / n_tiles);  // the m-tile index over all experts
  int lo = 0, hi = r.num_experts - 1;
  while (lo < hi) {  // the last expert whose first m-tile is at or before q: it has a tile there
    const int mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= q) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int32_t m_tiles = prefix[lo + 1] - prefix[lo];
  const int64_t local = t - static_cast<int64_t>(prefix[lo]) * n_tiles;
  const int32_t m_block = static_cast<int32_t>(local % m_tiles);
  int64_t start;
  int32_t count;
  r.rows(lo, start, count);
  Tile tile;
  tile.expert = lo;
  tile.n_block = static_cast<int32_t>(local / m_tiles);
  tile.row0 = static_cast<int32_t>(start + static_cast<int64_t>(m_block) * BM);
  tile.rows = min(BM, count - m_block * BM);
  return tile;
}

// The epilogue of one consumer's 64 rows straight to global memory: activation EPI (a compile-time
// moek_gemm_epilogue, see with_epilogue), row scale, rounding; rows past the tile's and columns past N
// masked. Each pair's address is the row's base plus a constant, and its column test one compare with
// a constant, so a pair costs a few instructions (ncu, Qwen3's down projection: the run-time switch
// this replaces took the consumers as long as their main loop).
template <typename Tout, int EPI>
__device__ __forceinline__ void store_tile(const GemmParams& p, const Tile& tile, int consumer, float (&acc)[128]) {
  constexpr bool SWIGLU = EPI == MOEK_EPILOGUE_SWIGLU;
  constexpr int COLS = SWIGLU ? BN / 2 : BN;  // output columns of the tile
  const int t = threadIdx.x & 127, lane = t & 31, warp = t / 32;
  const int g = lane >> 2, q = lane & 3;
  const int64_t col0 = static_cast<int64_t>(tile.n_block) * COLS + q * 2;
  // Pair j (columns 8j + 2q, + 1 of the tile) lies inside the output when 8j < left (n_out is even).
  const int left = static_cast<int>(min(p.n_out - col0, static_cast<int64_t>(COLS)));
  // Accumulator 4j + 2h + c holds row (warp * 16 + g + 8h) of this warpgroup's 64, product column
  // 8j + 2q + c of the tile's 256 (SwiGLU: columns 0..127 the gate rows of outputs n_block * 128 + c,
  // 128..255 their up rows).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = consumer * 64 + warp * 16 + g + h * 8;
    if (r >= tile.rows) continue;
    const int64_t row = static_cast<int64_t>(tile.row0) + r;
    const float scale = p.row_scale != nullptr ? __ldg(p.row_scale + row) : 1.f;
    Tout* out = static_cast<Tout*>(p.out) + row * p.n_out + col0;
#pragma unroll
    for (int j = 0; j < COLS / 8; ++j) {
      float x, y;
      if constexpr (SWIGLU) {
        x = silu(acc[4 * j + 2 * h]) * acc[4 * (j + 16) + 2 * h] * scale;
        y = silu(acc[4 * j + 2 * h + 1]) * acc[4 * (j + 16) + 2 * h + 1] * scale;
      } else {
        x = activate<EPI>(acc[4 * j + 2 * h]) * scale;
        y = activate<EPI>(acc[4 * j + 2 * h + 1]) * scale;
      }
      if (8 * j < left) store_pair(out + 8 * j, x, y);
    }
  }
}

// Two adjacent outputs (16-bit) into a staged subtile: row r (0..63) of the consumer's rows, column c
// (even, 0..31) of the subtile, at TMA's 64-byte swizzle (16-byte chunk c / 8 of the 64-byte row XOR
// bits 1-2 of r), so the 8 rows a warp writes at once fall in different banks.
template <typename Tout>
__device__ __forceinline__ void stage_pair(uint32_t buf, int r, int c, float x, float y) {
  const uint32_t at = buf + r * (OUT_SUB * 2) + ((((c * 2) >> 4) ^ ((r >> 1) & 3)) << 4) + (c * 2) % 16;
  alignas(4) Tout pair[2];
  store_pair(pair, x, y);  // the direct epilogue's rounding, into registers
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(at), "r"(*reinterpret_cast<const uint32_t*>(pair)) : "memory");
}

// The staged epilogue of one consumer's 64 full rows, SUBTILES subtiles of 32 output columns through
// the consumer's two buffers at `base`: wait until the store of the subtile before last has read its
// buffer, write this one (activation, row scale, rounding), and let one thread store it with TMA.
template <typename Tout, int EPI>
__device__ __forceinline__ void stage_subtiles(const GemmParams& p, const CUtensorMap& map_c, const Tile& tile,
                                               int consumer, float (&acc)[128], uint32_t base) {
  constexpr bool SWIGLU = EPI == MOEK_EPILOGUE_SWIGLU;
  constexpr int SUBTILES = out_cols_per_tile(SWIGLU) / OUT_SUB;
  const int t = threadIdx.x & 127, lane = t & 31, warp = t / 32;
  const int g = lane >> 2, q = lane & 3;
  const bool leader = t == 0;
  const int barrier = 1 + consumer;  // a hardware barrier per consumer warpgroup (0 is __syncthreads)
  const int64_t row0 = static_cast<int64_t>(tile.row0) + consumer * 64;
  float scale[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    scale[h] = p.row_scale != nullptr ? __ldg(p.row_scale + row0 + warp * 16 + g + h * 8) : 1.f;
  }
  const int32_t col0 = tile.n_block * out_cols_per_tile(SWIGLU);
#pragma unroll
  for (int sub = 0; sub < SUBTILES; ++sub) {
    const uint32_t buf = base + (sub & 1) * OUT_SUB_BYTES;
    if (leader) sm90::bulk_wait_read<1>();
    sm90::named_barrier(barrier, 128);
#pragma unroll
    for (int jj = 0; jj < OUT_SUB / 8; ++jj) {
      const int j = sub * (OUT_SUB / 8) + jj;  // 8-column chunk of the tile's outputs
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float x, y;
        if constexpr (SWIGLU) {
          x = silu(acc[4 * j + 2 * h]) * acc[4 * (j + 16) + 2 * h] * scale[h];
          y = silu(acc[4 * j + 2 * h + 1]) * acc[4 * (j + 16) + 2 * h + 1] * scale[h];
        } else {
          x = activate<EPI>(acc[4 * j + 2 * h]) * scale[h];
          y = activate<EPI>(acc[4 * j + 2 * h + 1]) * scale[h];
        }
        stage_pair<Tout>(buf, warp * 16 + g + h * 8, jj * 8 + q * 2, x, y);
      }
    }
    sm90::fence_async_shared();
    sm90::named_barrier(barrier, 128);
    if (leader) {
      if (col0 + sub * OUT_SUB < p.n_out) {
        sm90::tma_store_2d(&map_c, buf, col0 + sub * OUT_SUB, static_cast<int32_t>(row0));
      }
      sm90::bulk_commit();
    }
  }
}

#endif  // MOEK_SM90A

template <typename Tin, typename Tout, typename V>
__global__ void __launch_bounds__(V::THREADS, 1)
    grouped_gemm_hopper_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                               const __grid_constant__ CUtensorMap map_c, const GemmParams p, int32_t n_tiles) {
#if defined(MOEK_SM90A)
  constexpr int BM = V::BM, STAGES = V::STAGES, STAGE_BYTES = V::STAGE_BYTES, A_BYTES = V::A_BYTES;
  constexpr int PIPE_BYTES = V::PIPE_BYTES, OUT_BYTES = V::OUT_BYTES, BAR_BYTES = V::BAR_BYTES;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = sm90::smem_u32(smem_raw);
  const uint32_t ring = (raw + 1023u) & ~1023u;  // stage s: A at ring + s * STAGE_BYTES, B after it
  unsigned char* aligned = smem_raw + (ring - raw);
  const uint32_t out_stage = ring + PIPE_BYTES;  // consumer c's two subtile buffers at + c * 2 * OUT_SUB_BYTES
  const uint32_t full_bar = out_stage + OUT_BYTES;        // full[s] at full_bar + 8s
  const uint32_t empty_bar = full_bar + STAGES * 8;
  int32_t* prefix = reinterpret_cast<int32_t*>(aligned + PIPE_BYTES + OUT_BYTES + BAR_BYTES);

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      sm90::mbar_init(full_bar + 8 * s, 1);
      sm90::mbar_init(empty_bar + 8 * s, V::CONSUMER_WARPS);
    }
    sm90::mbar_fence_init();
    sm90::tma_prefetch_map(&map_a);
    sm90::tma_prefetch_map(&map_b);
    if constexpr (V::STAGED) sm90::tma_prefetch_map(&map_c);
  }
  const int32_t m_total = scan_m_tiles<BM, V::THREADS>(p.experts, prefix);  // ends with a barrier: barriers initialised
  const int64_t tiles = static_cast<int64_t>(m_total) * n_tiles;
  const int k_tiles = static_cast<int>((p.k + BK - 1) / BK);
  const bool swiglu = p.epilogue == MOEK_EPILOGUE_SWIGLU;
  const int wg = threadIdx.x / 128;

  if (wg == 0) {
    if constexpr (V::CONSUMERS > 1) sm90::setmaxnreg_dec<PRODUCER_REGS>();
    if (threadIdx.x == 0) {
      uint32_t it = 0;  // K steps issued so far: stage it % STAGES, round it / STAGES
      for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
        const Tile tile = decode_tile<BM>(p.experts, prefix, t, n_tiles);
        const int32_t n0 = swiglu ? tile.n_block * (BN / 2) : tile.n_block * BN;
        const int32_t n1 = swiglu ? static_cast<int32_t>(p.n_out) + n0 : n0 + B_BOX_ROWS;
        // The second B box lies wholly past N only for the last plain n-block: then it is not loaded
        // (its product columns are never stored, so whatever that half of the stage holds is harmless).
        const bool second = n1 < p.n;
        const uint32_t stage_bytes = second ? STAGE_BYTES : STAGE_BYTES - B_BOX_ROWS * BK * 2;
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
          const uint32_t s = it % STAGES;
          const uint32_t round = it / STAGES;
          sm90::mbar_wait(empty_bar + 8 * s, (round & 1) ^ 1);  // round 0: free from the start
          const uint32_t bar = full_bar + 8 * s;
          const uint32_t sa = ring + s * STAGE_BYTES;
          const uint32_t sb = sa + A_BYTES;
          sm90::mbar_arrive_expect_tx(bar, stage_bytes);
          const int32_t k0 = kt * BK;
          sm90::tma_load_2d(sa, &map_a, bar, k0, tile.row0);
          sm90::tma_load_3d(sb, &map_b, bar, k0, n0, tile.expert);
          if (second) sm90::tma_load_3d(sb + B_BOX_ROWS * BK * 2, &map_b, bar, k0, n1, tile.expert);
        }
      }
    }
  } else {
    if constexpr (V::CONSUMERS > 1) sm90::setmaxnreg_inc<CONSUMER_REGS>();
    const int consumer = wg - 1;  // rows consumer * 64 .. + 63 of each tile
    const bool arrives = (threadIdx.x & 31) == 0;
    uint32_t it = 0;
    float acc[128];
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
      const Tile tile = decode_tile<BM>(p.experts, prefix, t, n_tiles);
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i] = 0.f;
      for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const uint32_t s = it % STAGES;
        sm90::mbar_wait(full_bar + 8 * s, (it / STAGES) & 1);
        const uint32_t sa = ring + s * STAGE_BYTES + consumer * 64 * BK * 2;
        const uint32_t sb = ring + s * STAGE_BYTES + A_BYTES;
        sm90::fence_regs(acc);  // the zeroing (or the last tile's epilogue) stays before the fence
        sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          sm90::wgmma_m64n256k16<Tin>(acc, sm90::desc_k128(sa + kk * 32), sm90::desc_k128(sb + kk * 32), 1);
        }
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_regs(acc);
        if (arrives) sm90::mbar_arrive(empty_bar + 8 * s);
      }
      const bool staged = V::STAGED && (consumer + 1) * 64 <= tile.rows;
      with_epilogue(p.epilogue, [&](auto epi) {
        if constexpr (V::STAGED) {
          if (staged) {
            stage_subtiles<Tout, decltype(epi)::value>(p, map_c, tile, consumer, acc, out_stage + consumer * 2 * OUT_SUB_BYTES);
            return;
          }
        }
        store_tile<Tout, decltype(epi)::value>(p, tile, consumer, acc);
      });
    }
    // The staged rows must be read out before the CTA's shared memory goes away.
    if (V::STAGED && threadIdx.x % 128 == 0) sm90::bulk_wait_all();
  }
#else
  // Never launched: the host launches this kernel only where its sm_90a code was loaded.
  __trap();
#endif
}

// ---- host side ----

// cuTensorMapEncodeTiled from the driver, looked up once through cudart.
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
    if (err != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A row-major tensor of 16-bit elements, `rank` 2 ([rows, K]) or 3 ([E, N, K]), in boxes of box_cols
// x box_rows (x 1) elements with the given swizzle (its span is box_cols * 2 bytes). False when the
// driver rejects it (a base not 16-byte aligned, a row not a multiple of 16 bytes).
bool encode(CUtensorMap* map, CUtensorMapDataType type, const void* base, int rank, const uint64_t* dims,
            uint32_t box_cols, uint32_t box_rows, CUtensorMapSwizzle swizzle) {
  const PFN_cuTensorMapEncodeTiled_v12000 fn = encode_fn();
  if (fn == nullptr) return false;
  cuuint64_t size[3] = {dims[0], dims[1], rank == 3 ? dims[2] : 1};
  cuuint64_t stride[2] = {dims[0] * 2, dims[0] * dims[1] * 2};  // bytes of dims 1 and 2
  cuuint32_t box[3] = {box_cols, box_rows, 1};
  cuuint32_t elem_stride[3] = {1, 1, 1};
  const CUresult r = fn(map, type, static_cast<cuuint32_t>(rank), const_cast<void*>(base), size, stride, box,
                        elem_stride, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

template <typename Tin, typename Tout, typename V>
cudaError_t launch(const GemmParams& p, cudaStream_t stream) {
  const bool swiglu = p.epilogue == MOEK_EPILOGUE_SWIGLU;
  const int64_t rows = p.experts.counts != nullptr
                           ? static_cast<int64_t>(p.experts.num_experts) * p.experts.capacity
                           : p.experts.max_rows;
  const int64_t n_tiles = (p.n_out + out_cols_per_tile(swiglu) - 1) / out_cols_per_tile(swiglu);
  const int64_t m_bound = m_tile_bound(p.experts, V::BM);
  if (rows == 0 || m_bound == 0 || n_tiles == 0) return cudaSuccess;
  if (m_bound > kTileSaturation || n_tiles > (int64_t{1} << 20)) return cudaErrorInvalidValue;

  const CUtensorMapDataType type =
      std::is_same<Tin, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  CUtensorMap map_a, map_b, map_c{};
  const uint64_t dims_a[2] = {static_cast<uint64_t>(p.k), static_cast<uint64_t>(rows)};
  const uint64_t dims_b[3] = {static_cast<uint64_t>(p.k), static_cast<uint64_t>(p.n),
                              static_cast<uint64_t>(p.experts.num_experts)};
  // Operands: 64-wide K boxes (128 bytes) in the 128-byte swizzle that desc_k128 describes.
  if (!encode(&map_a, type, p.a, 2, dims_a, BK, V::BM, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode(&map_b, type, p.b, 3, dims_b, BK, B_BOX_ROWS, CU_TENSOR_MAP_SWIZZLE_128B)) {
    return cudaErrorNotSupported;
  }
  if constexpr (V::STAGED) {
    static_assert(sizeof(Tout) == 2, "the staged epilogue writes 16-bit outputs");
    const CUtensorMapDataType out_type =
        std::is_same<Tout, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    const uint64_t dims_c[2] = {static_cast<uint64_t>(p.n_out), static_cast<uint64_t>(rows)};
    if (!encode(&map_c, out_type, p.out, 2, dims_c, OUT_SUB, 64, CU_TENSOR_MAP_SWIZZLE_64B)) {
      return cudaErrorNotSupported;
    }
  }

  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t tiles = m_bound * n_tiles;
  const unsigned grid = static_cast<unsigned>(tiles < sms ? tiles : sms);
  const size_t smem = V::smem_bytes(p.experts.num_experts);
  auto kernel = grouped_gemm_hopper_kernel<Tin, Tout, V>;
  err = allow_max_dynamic_smem(kernel);
  if (err != cudaSuccess) return err;
  kernel<<<grid, V::THREADS, smem, stream>>>(map_a, map_b, map_c, p, static_cast<int32_t>(n_tiles));
  return cudaGetLastError();
}

// Whether variant V's kernel (bf16 in and out) was loaded with its sm_90a body: binary version 9.0 and
// its static shared memory (the scan's warp sums, V::THREADS / 32 ints); a plain sm_90 build of the
// file (MOEK_CUDA_ARCHS=90) has the trap body and none, and must not be launched.
template <typename V>
bool has_sm90a_body() {
  cudaFuncAttributes attr{};
  return cudaFuncGetAttributes(&attr, grouped_gemm_hopper_kernel<__nv_bfloat16, __nv_bfloat16, V>) == cudaSuccess &&
         attr.binaryVersion == 90 && attr.sharedSizeBytes >= V::THREADS / 32 * sizeof(int32_t);
}

// Whether the current device runs the sm_90a kernels, every variant (compute capability 9.0, this build
// holds their sm_90a code, the driver encodes tensor maps, enough shared memory for E experts' prefix:
// Wide needs more than Narrow, so its check covers both; the staged variants are checked per launch,
// `fits`). Cached per device; safe during stream
// capture (no stream work).
bool available(int num_experts) {
  constexpr int kDevices = 64;
  static std::atomic<int> state[kDevices];  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (device < 0 || device >= kDevices) return false;
  int known = state[device].load(std::memory_order_relaxed);
  if (known == 0) {
    int major = 0, minor = 0;
    bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
              cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
              major == 9 && minor == 0 && has_sm90a_body<Wide>() && has_sm90a_body<Narrow>() &&
              has_sm90a_body<WideStaged>() && has_sm90a_body<NarrowStaged>() && encode_fn() != nullptr;
    (void)cudaGetLastError();
    known = ok ? 2 : 1;
    state[device].store(known, std::memory_order_relaxed);
  }
  if (known != 2) return false;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return Wide::smem_bytes(num_experts) + kStaticSmemSlack <= static_cast<size_t>(optin);
}

// Which epilogue MOEK_GEMM_HOPPER_EPILOGUE asks for (read once): unset or "staged", the staged one for
// the plain epilogues (identity, GELU, ReLU) and the direct one for SwiGLU; "direct", the direct one
// always; "staged-all", the staged one for SwiGLU too (for measuring it). Anything else: the default.
enum class EpiloguePolicy { kStagedPlain, kDirect, kStagedAll };

EpiloguePolicy epilogue_policy() {
  static const EpiloguePolicy policy = [] {
    const char* v = std::getenv("MOEK_GEMM_HOPPER_EPILOGUE");
    if (v != nullptr && std::strcmp(v, "direct") == 0) return EpiloguePolicy::kDirect;
    if (v != nullptr && std::strcmp(v, "staged-all") == 0) return EpiloguePolicy::kStagedAll;
    return EpiloguePolicy::kStagedPlain;
  }();
  return policy;
}

// Whether variant V's shared memory for E experts fits the current device.
template <typename V>
bool fits(int num_experts) {
  const int optin = current_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>();
  return V::smem_bytes(num_experts) + kStaticSmemSlack <= static_cast<size_t>(optin);
}

// 16-bit outputs of the plain epilogues (not SwiGLU) take the staged epilogue where it fits and its
// output map encodes (row pitch a multiple of 16 bytes, 16-byte aligned base); otherwise, and for f32,
// the direct one. Measured on the H200 (2026-11-28, same run, after the compile-time epilogue): staged
// down projections 1-18% faster, balanced and uneven (Qwen3 T = 4096 210 us against 256 direct, T =
// 16384 800 against 921, uneven 273 against 323; DeepSeek T = 4096 264 against 283, uneven 334 against
// 401; Mixtral within 1-2%). Before that change the staged kernel's direct fallback (a tile's last,
// partial rows) carried the slow per-element epilogue, and uneven experts ran 40-80% slower staged.
// SwiGLU stays direct unless MOEK_GEMM_HOPPER_EPILOGUE=staged-all: its tiles write 128 columns, and
// staging them was 1-2.5% slower with the old epilogue code.
template <typename Tin, typename Tout, typename Direct, typename Staged>
cudaError_t launch_epilogue(const GemmParams& p, cudaStream_t stream) {
  if constexpr (sizeof(Tout) == 2) {
    const EpiloguePolicy policy = epilogue_policy();
    const bool staged = policy == EpiloguePolicy::kStagedAll ||
                        (policy == EpiloguePolicy::kStagedPlain && p.epilogue != MOEK_EPILOGUE_SWIGLU);
    if (staged && fits<Staged>(p.experts.num_experts)) {
      const cudaError_t err = launch<Tin, Tout, Staged>(p, stream);
      if (err != cudaErrorNotSupported) return err;
    }
  }
  return launch<Tin, Tout, Direct>(p, stream);
}

template <typename Direct, typename Staged>
cudaError_t launch_variant(const GemmParams& p, bool f16, bool f32_out, cudaStream_t stream) {
  if (f16) {
    return f32_out ? launch<__half, float, Direct>(p, stream) : launch_epilogue<__half, __half, Direct, Staged>(p, stream);
  }
  return f32_out ? launch<__nv_bfloat16, float, Direct>(p, stream)
                 : launch_epilogue<__nv_bfloat16, __nv_bfloat16, Direct, Staged>(p, stream);
}

}  // namespace hopper

bool grouped_gemm_hopper_available(int num_experts) { return hopper::available(num_experts); }

// `narrow`: MOEK_GEMM_TILE_HOPPER_64 (64-row tiles), else MOEK_GEMM_TILE_HOPPER (128-row tiles).
cudaError_t launch_grouped_gemm_hopper(const GemmParams& p, bool narrow, bool f16, moek_dtype out_dtype,
                                       cudaStream_t stream) {
  if (!hopper::available(p.experts.num_experts)) return cudaErrorNotSupported;
  const bool f32_out = out_dtype == MOEK_DTYPE_F32;
  return narrow ? hopper::launch_variant<hopper::Narrow, hopper::NarrowStaged>(p, f16, f32_out, stream)
                : hopper::launch_variant<hopper::Wide, hopper::WideStaged>(p, f16, f32_out, stream);
}

}  // namespace moek

extern "C" int moek_cuda_gemm_hopper_available(int num_experts) {
  return moek::grouped_gemm_hopper_available(num_experts) ? 1 : 0;
}
