// The portable grouped GEMM (sm_80 and later): out[rows of expert e] = epilogue(A[rows] . B[e]^T).
//
// One CTA computes one BM x BN output tile of one expert: blockIdx.x is an m-tile over all experts'
// rows (expert_tiles.cuh maps it to an expert and its rows; surplus CTAs exit), blockIdx.y an n-tile.
// A [rows, K] and B [E, N, K] tiles stream through a STAGES-deep cp.async ring in shared memory
// (16-byte copies; rows past the expert's end, B rows past N and the K tail are zero-filled, so
// nothing outside the buffers is read), are read with ldmatrix from an XOR-swizzled layout (no bank
// conflicts) and multiplied with mma.sync m16n8k16, fp32 accumulation in registers. The epilogue
// applies the activation and the row scale in registers and stores the tile directly; no atomics, so
// the result is bit-identical from run to run.
//
// Split-K (splits > 1, blockIdx.z the slice): slice s multiplies k-tiles [s * kt / S, (s + 1) * kt / S)
// (empty when there are fewer k-tiles than slices: it stores zeros) and stores its raw fp32 products
// to the workspace; grouped_gemm_reduce.cuh then sums the slices in order 0..S-1 and applies the
// epilogue, so the result is still bit-identical from run to run (for a given number of slices).
//
// SwiGLU: the CTA's B tile interleaves 8-row blocks of the gate (rows j..j+7) and the matching up rows
// (N/2 + j..), so each thread holds gate and up accumulators of the same output element.
#pragma once

#include "common.cuh"
#include "expert_tiles.cuh"
#include "mma_sm80.cuh"
#include "moe_kernels.h"

#include <type_traits>

namespace moek {

// Everything the kernel reads, resolved by the launcher (cuda/grouped_gemm.cu).
struct GemmParams {
  const void* a;           // [rows, K]
  const void* b;           // [E, N, K]
  void* out;               // [rows, n_out]
  const float* row_scale;  // [rows] or nullptr
  ExpertRows experts;
  int64_t n;               // N: columns of the product (rows of each B[e])
  int64_t k;               // K
  int64_t n_out;           // output columns: N, or N/2 for SwiGLU
  int32_t epilogue;        // moek_gemm_epilogue
  int32_t splits;          // K slices (gridDim.z); 1: no split, the epilogue stores `out`
  float* partial;          // splits > 1: [splits, rows_total, n] fp32 slice products (the workspace)
  int64_t rows_total;      // rows of A and the output (max_rows, or E * capacity)
  // Gathered A (the fused layer's gate|up, cuda/fused_layer.cu): row r of the product reads row
  // a_rows[r] / gather_k of `a` (a plan's row_source: pair -> token), or zeros where that is negative
  // or not below gather_tokens. Read only by gemm_tile<..., GATHER = true>.
  const int32_t* a_rows;
  int32_t gather_k;
  int64_t gather_tokens;
};

// A tile shape: BM x BN outputs per CTA, BK of K per pipeline stage, WARPS_M x WARPS_N warps.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct GemmTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // one warp's tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;             // mma tiles per warp
  static constexpr int CH = BK / 8;                             // 16-byte chunks per tile row
  static constexpr int A_LOADS = BM * CH / THREADS, B_LOADS = BN * CH / THREADS;
  static constexpr int STAGE_BYTES = (BM + BN) * BK * 2;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "a warp tile is whole m16 x (2 x n8) blocks");
  static_assert(BK % 16 == 0 && (CH == 4 || CH == 8), "the swizzle covers 4 or 8 chunks a row");
  static_assert(THREADS % CH == 0 && (BM * CH) % THREADS == 0 && (BN * CH) % THREADS == 0, "even loads");
};

// Byte offset of (row, chunk) in a tile of CH-chunk rows: chunks XOR-swizzled so that the 8 rows one
// ldmatrix phase reads (and the rows cp.async writes together) fall in 8 different 16-byte bank groups.
template <int CH>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  const int phys = CH == 8 ? (chunk ^ (row & 7)) : (chunk ^ ((row >> 1) & 3));
  return static_cast<uint32_t>((row * CH + phys) * 16);
}

// Two adjacent output elements, one store.
__device__ __forceinline__ void store_pair(float* p, float x, float y) { *reinterpret_cast<float2*>(p) = make_float2(x, y); }
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}
__device__ __forceinline__ void store_pair(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}

// x * sigmoid(x), with the fast division (a reciprocal and a multiply, 2 ulp) instead of the IEEE one,
// whose refinement and slow-path call sat at every SwiGLU output (64 a thread in the sm_90a epilogue);
// the error is far below the output's rounding.
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.f + __expf(-x)); }

// The plain epilogues' activation, known at compile time (EPI: a moek_gemm_epilogue other than SwiGLU,
// which pairs two accumulators and is written out where it is used).
template <int EPI>
__device__ __forceinline__ float activate(float x) {
  if constexpr (EPI == MOEK_EPILOGUE_GELU) {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  } else if constexpr (EPI == MOEK_EPILOGUE_RELU) {
    return fmaxf(x, 0.f);
  } else {
    return x;
  }
}

// The same chosen at run time, for code outside a hot per-element loop.
__device__ __forceinline__ float activate(int epilogue, float x) {
  switch (epilogue) {
    case MOEK_EPILOGUE_GELU:
      return activate<MOEK_EPILOGUE_GELU>(x);
    case MOEK_EPILOGUE_RELU:
      return activate<MOEK_EPILOGUE_RELU>(x);
    default:
      return x;
  }
}

// Calls body(std::integral_constant<int, EPI>{}) with p.epilogue as a compile-time EPI. Why: an
// epilogue that switches on the activation per element is a branch ladder around every store (and
// GELU's erf inlined at every one); on the H200 the sm_90a kernel's consumers spent as long in such
// an epilogue as in the main loop of Qwen3's down projection (K = 768: ncu, 2026-11-28), issue-bound
// and missing the instruction cache. One switch per tile leaves straight-line stores.
template <typename Body>
__device__ __forceinline__ void with_epilogue(int epilogue, Body&& body) {
  switch (epilogue) {
    case MOEK_EPILOGUE_SWIGLU:
      body(std::integral_constant<int, MOEK_EPILOGUE_SWIGLU>{});
      break;
    case MOEK_EPILOGUE_GELU:
      body(std::integral_constant<int, MOEK_EPILOGUE_GELU>{});
      break;
    case MOEK_EPILOGUE_RELU:
      body(std::integral_constant<int, MOEK_EPILOGUE_RELU>{});
      break;
    default:
      body(std::integral_constant<int, MOEK_EPILOGUE_IDENTITY>{});
      break;
  }
}

// One BM x BN output tile (n-tile `n_tile`, K slice `split` of p.splits) of m-tile `tile`, computed by
// all Cfg::THREADS threads of the block in `smem` (Cfg::PIPE_BYTES). The grouped GEMM kernel below runs
// one per CTA; the fused layer's persistent kernel runs many in turn (it separates them with a barrier:
// the prologue here overwrites the ring the previous tile's last stage was read from). GATHER: A's rows
// come through p.a_rows (see GemmParams).
template <typename Tin, typename Tout, typename Cfg, bool GATHER = false>
__device__ __forceinline__ void gemm_tile(const GemmParams& p, const MTile& tile, int n_tile, int split,
                                          unsigned char* smem) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, CH = Cfg::CH, STAGES = Cfg::STAGES;
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  const bool swiglu = p.epilogue == MOEK_EPILOGUE_SWIGLU;
  const int64_t K = p.k;
  const int k_tiles_all = static_cast<int>((K + BK - 1) / BK);
  // This CTA's k-tiles (all of them without a split).
  const int kt_begin = static_cast<int>(static_cast<int64_t>(k_tiles_all) * split / p.splits);
  const int k_tiles = static_cast<int>(static_cast<int64_t>(k_tiles_all) * (split + 1) / p.splits) - kt_begin;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;

  // This thread's 16-byte copies of every stage: the same rows and chunk each time, K advancing.
  const int chunk = tid % CH;
  const Tin* a_base = static_cast<const Tin*>(p.a);
  const Tin* b_base = static_cast<const Tin*>(p.b);
  const Tin* a_src[Cfg::A_LOADS];
  const Tin* b_src[Cfg::B_LOADS];
  uint32_t a_ok = 0, b_ok = 0;
#pragma unroll
  for (int i = 0; i < Cfg::A_LOADS; ++i) {
    const int row = tid / CH + i * (Cfg::THREADS / CH);
    bool ok = row < tile.rows;
    int64_t a_row = tile.row0 + (ok ? row : 0);
    if (GATHER) {
      const int32_t pair = ok ? __ldg(p.a_rows + a_row) : -1;
      const int64_t token = pair / p.gather_k;
      ok = pair >= 0 && token < p.gather_tokens;
      a_row = ok ? token : 0;
    }
    a_ok |= static_cast<uint32_t>(ok) << i;
    a_src[i] = a_base + a_row * K + chunk * 8;
  }
  const Tin* b_expert = b_base + static_cast<int64_t>(tile.expert) * p.n * K;
#pragma unroll
  for (int i = 0; i < Cfg::B_LOADS; ++i) {
    const int r = tid / CH + i * (Cfg::THREADS / CH);  // row of the CTA's B tile
    int64_t b_row;
    bool ok;
    if (swiglu) {
      const int64_t j = static_cast<int64_t>(n_tile) * (BN / 2) + (r / 16) * 8 + (r & 7);
      ok = j < p.n_out;
      b_row = ((r >> 3) & 1) ? p.n_out + j : j;
    } else {
      b_row = static_cast<int64_t>(n_tile) * BN + r;
      ok = b_row < p.n;
    }
    b_ok |= static_cast<uint32_t>(ok) << i;
    b_src[i] = b_expert + (ok ? b_row : 0) * K + chunk * 8;
  }

  const uint32_t smem_base = smem_addr(smem);
  auto load_stage = [&](int stage, int kt) {
    const uint32_t sa = smem_base + stage * Cfg::STAGE_BYTES;
    const uint32_t sb = sa + BM * BK * 2;
    const bool k_ok = static_cast<int64_t>(kt) * BK + chunk * 8 < K;
    const int64_t k_off = static_cast<int64_t>(kt) * BK;
#pragma unroll
    for (int i = 0; i < Cfg::A_LOADS; ++i) {
      const bool ok = k_ok && ((a_ok >> i) & 1);
      cp_async_16(sa + swizzled<CH>(tid / CH + i * (Cfg::THREADS / CH), chunk), ok ? a_src[i] + k_off : a_base, ok);
    }
#pragma unroll
    for (int i = 0; i < Cfg::B_LOADS; ++i) {
      const bool ok = k_ok && ((b_ok >> i) & 1);
      cp_async_16(sb + swizzled<CH>(tid / CH + i * (Cfg::THREADS / CH), chunk), ok ? b_src[i] + k_off : b_base, ok);
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage kt is in shared memory for everyone; stage kt-1 is no longer read
    const int next = kt + STAGES - 1;
    if (next < k_tiles) load_stage(next % STAGES, kt_begin + next);
    cp_async_commit();

    const uint32_t sa = smem_base + (kt % STAGES) * Cfg::STAGE_BYTES;
    const uint32_t sb = sa + BM * BK * 2;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t af[MI][4];
      uint32_t bf[NI / 2][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int row = warp_m * Cfg::WTM + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], sa + swizzled<CH>(row, kk * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        const int row = warp_n * Cfg::WTN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(bf[nj], sb + swizzled<CH>(row, kk * 2 + ((lane >> 3) & 1)));
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          mma_16816<Tin>(acc[mi][ni], af[mi], bf[ni / 2][(ni & 1) * 2], bf[ni / 2][(ni & 1) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: thread (g, q) of a warp holds rows g and g + 8 of each m16 block, columns 2q and 2q + 1 of
  // each n8 block.
  const int g = lane >> 2, q = lane & 3;
  Tout* out = static_cast<Tout*>(p.out);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_m * Cfg::WTM + mi * 16 + g + h * 8;
      if (r >= tile.rows) continue;
      const int64_t row = tile.row0 + r;
      if (p.splits > 1) {
        // This slice's raw products, in B's row numbering (SwiGLU: gate columns j, up columns n_out + j).
        float* part = p.partial + (static_cast<int64_t>(split) * p.rows_total + row) * p.n;
        if (swiglu) {
#pragma unroll
          for (int ni = 0; ni < NI; ni += 2) {
            const int block = warp_n * (Cfg::WTN / 8) + ni;
            const int64_t j = static_cast<int64_t>(n_tile) * (BN / 2) + (block / 2) * 8 + q * 2;
            if (j >= p.n_out) continue;
            store_pair(part + j, acc[mi][ni][h * 2], acc[mi][ni][h * 2 + 1]);
            store_pair(part + p.n_out + j, acc[mi][ni + 1][h * 2], acc[mi][ni + 1][h * 2 + 1]);
          }
        } else {
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) {
            const int64_t col = static_cast<int64_t>(n_tile) * BN + warp_n * Cfg::WTN + ni * 8 + q * 2;
            if (col >= p.n) continue;
            store_pair(part + col, acc[mi][ni][h * 2], acc[mi][ni][h * 2 + 1]);
          }
        }
        continue;
      }
      const float scale = p.row_scale != nullptr ? __ldg(p.row_scale + row) : 1.f;
      Tout* out_row = out + row * p.n_out;
      if (swiglu) {
#pragma unroll
        for (int ni = 0; ni < NI; ni += 2) {
          const int block = warp_n * (Cfg::WTN / 8) + ni;  // even: a gate block, block + 1 its up block
          const int64_t j = static_cast<int64_t>(n_tile) * (BN / 2) + (block / 2) * 8 + q * 2;
          if (j >= p.n_out) continue;
          const float x = silu(acc[mi][ni][h * 2]) * acc[mi][ni + 1][h * 2] * scale;
          const float y = silu(acc[mi][ni][h * 2 + 1]) * acc[mi][ni + 1][h * 2 + 1] * scale;
          store_pair(out_row + j, x, y);
        }
      } else {
        with_epilogue(p.epilogue, [&](auto epi) {  // the activation known at compile time, as in the stores
          constexpr int EPI = decltype(epi)::value;
          if constexpr (EPI != MOEK_EPILOGUE_SWIGLU) {  // handled above
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
              const int64_t col = static_cast<int64_t>(n_tile) * BN + warp_n * Cfg::WTN + ni * 8 + q * 2;
              if (col >= p.n_out) continue;
              const float x = activate<EPI>(acc[mi][ni][h * 2]) * scale;
              const float y = activate<EPI>(acc[mi][ni][h * 2 + 1]) * scale;
              store_pair(out_row + col, x, y);
            }
          }
        });
      }
    }
  }
}

template <typename Tin, typename Tout, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS) grouped_gemm_kernel(const GemmParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  MTile tile;
  if (!find_m_tile<Cfg::BM, Cfg::THREADS>(p.experts, static_cast<int32_t>(blockIdx.x),
                                          reinterpret_cast<int32_t*>(smem), tile)) {
    return;
  }
  gemm_tile<Tin, Tout, Cfg>(p, tile, static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.z), smem);
}

}  // namespace moek

// The split-K reduction (it uses GemmParams and the epilogue helpers above).
#include "grouped_gemm_reduce.cuh"

namespace moek {

// The tile shapes, by moek_gemm_tile.
using TileSmall = GemmTile<32, 64, 64, 1, 4, 4>;    // decode: few rows per expert, weights streamed
using TileMedium = GemmTile<64, 128, 32, 2, 2, 4>;  // tens of rows per expert
using TileLarge = GemmTile<128, 128, 32, 2, 4, 4>;  // prefill
// Candidates for the decode tiles, reachable only through MOEK_GEMM_TILE (src/grouped_gemm.rs passes
// these codes in place of a moek_gemm_tile) until the H200 sweep says which to keep:
// more bytes in flight per SM (6 stages, 72 KB: 3 CTAs an SM, 5 tiles of B in flight each), and
// MEDIUM with 128-byte rows of B per stage (BK = 64; BK = 32 fetches 64-byte pieces of 128 rows).
using TileSmallDeep = GemmTile<32, 64, 64, 1, 4, 6>;
using TileMediumK64 = GemmTile<64, 128, 64, 2, 4, 3>;
constexpr int kTileSmallDeep = 101;
constexpr int kTileMediumK64 = 102;

// Dynamic shared memory of a launch: the pipeline ring, which first holds the scheduler's E + 1 prefix.
template <typename Cfg>
size_t gemm_smem_bytes(int num_experts) {
  const size_t prefix = (static_cast<size_t>(num_experts) + 1) * sizeof(int32_t);
  return prefix > Cfg::PIPE_BYTES ? prefix : Cfg::PIPE_BYTES;
}

template <typename Tin, typename Tout, typename Cfg>
cudaError_t launch_gemm_tile(const GemmParams& p, cudaStream_t stream) {
  const int64_t m_tiles = m_tile_bound(p.experts, Cfg::BM);
  const int64_t n_tiles = p.epilogue == MOEK_EPILOGUE_SWIGLU ? (p.n_out + Cfg::BN / 2 - 1) / (Cfg::BN / 2)
                                                             : (p.n_out + Cfg::BN - 1) / Cfg::BN;
  if (m_tiles == 0 || n_tiles == 0) return cudaSuccess;
  if (m_tiles > kTileSaturation || n_tiles > 65535 || p.splits < 1 || p.splits > 65535) return cudaErrorInvalidValue;
  const size_t smem = gemm_smem_bytes<Cfg>(p.experts.num_experts);
  auto kernel = grouped_gemm_kernel<Tin, Tout, Cfg>;
  // Every launch (a host-side attribute, legal during stream capture): the default allows only 48 KB
  // less the kernel's static shared memory, which the 48 KB rings would already exceed.
  const cudaError_t err = allow_max_dynamic_smem(kernel);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles), static_cast<unsigned>(p.splits));
  kernel<<<grid, Cfg::THREADS, smem, stream>>>(p);
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess || p.splits == 1) return launched;
  return launch_gemm_reduce<Tout>(p, stream);
}

template <typename Tin, typename Tout>
cudaError_t launch_gemm_out(const GemmParams& p, moek_gemm_tile tile, cudaStream_t stream) {
  switch (static_cast<int>(tile)) {
    case MOEK_GEMM_TILE_SMALL:
      return launch_gemm_tile<Tin, Tout, TileSmall>(p, stream);
    case MOEK_GEMM_TILE_MEDIUM:
      return launch_gemm_tile<Tin, Tout, TileMedium>(p, stream);
    case kTileSmallDeep:
      return launch_gemm_tile<Tin, Tout, TileSmallDeep>(p, stream);
    case kTileMediumK64:
      return launch_gemm_tile<Tin, Tout, TileMediumK64>(p, stream);
    default:
      return launch_gemm_tile<Tin, Tout, TileLarge>(p, stream);
  }
}

// Launches for A/B of type Tin: output Tin or fp32; `tile` is resolved (not AUTO). Instantiated once
// per input type in its own translation unit (grouped_gemm_bf16.cu, grouped_gemm_f16.cu), which build
// in parallel.
template <typename Tin>
cudaError_t launch_grouped_gemm(const GemmParams& p, moek_gemm_tile tile, moek_dtype out_dtype, cudaStream_t stream) {
  if (out_dtype == MOEK_DTYPE_F32) return launch_gemm_out<Tin, float>(p, tile, stream);
  return launch_gemm_out<Tin, Tin>(p, tile, stream);
}

}  // namespace moek
