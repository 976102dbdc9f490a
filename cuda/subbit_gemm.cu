// Fused sub-1-bit decode + grouped GEMM (src/subbit/gemm.rs validates the arguments; the header's
// moek_subbit_grouped_gemm has the contract, docs/subbit-gpu.md the design): for every expert m and every
// row r it owns, y[r][n] = row_scale[r] * sum over c of x[r][c] * Wb[m][n][c], Wb the bf16 weights the
// decode kernel writes. Correct on the H200 (tests/subbit_gpu.rs, memcheck; tests/subbit_gemm_cpu.rs replays
// the walkers on the CPU) but latency-bound: 614 us for Mixtral's gate pair at 64 rows per expert, 9x our
// bf16 grouped GEMM (docs/subbit-gpu.md has the profile and what comes next).
//
// A block takes one (expert, 64 activation rows, 128 weight rows, K slice) tile. Each of its 128 threads
// owns one weight row and walks that row's codewords once, left to right, across the slice: every
// pipeline step it writes the row's next 64 columns (zeros, then its nonzeros as bf16 levels) into the
// shared-memory W stage, keeping the phrase that crosses into the next step in registers. So no walker
// needs the image's restarts, no phrase is decoded twice and no stage is written by two threads. Beside
// it, the block copies the matching 64 x 64 slice of x into the X stage with cp.async, and all four warps
// multiply the stages with mma.sync m16n8k16 (fp32 accumulators; the same swizzled layout and ldmatrix
// addressing as grouped_gemm_kernel.cuh). Two stages: step s multiplies stage s % 2 while the walkers
// fill stage (s + 1) % 2, one barrier a step. The walk's dictionary lookups are issued four codewords
// ahead, so the MMA of a step covers most of their L2 latency; three blocks share an SM.
//
// K slices (split-K) start at tile boundaries of the image, where every tile's codewords start afresh:
// slice s of S takes tiles [s * tiles / S, (s + 1) * tiles / S) of every row.
//
// Bytes and FLOPs, per expert weight at 0.71 bit (P(0) = 0.885: 23.4 weights and 2.7 nonzeros a codeword),
// for one m-tile (an expert's 64 rows; a second m-tile of the same expert walks the weights again):
//   HBM:   0.089 bytes of codewords + 8 / C (levels, tile offsets); the restarts (0.016) are not read.
//   L1/L2: one 8-byte dictionary lookup per codeword (1 / 23.4 per weight).
//   smem:  2 bytes written per weight (zeros, then ~0.115 scattered nonzero stores), 2 bytes read back
//          by ldmatrix per weight and warp column (2 warps share a B fragment row).
// Per activation row: C * 2 bytes of x read per 128 weight rows (from L2 after the first block),
// R * 2 bytes of y written (with S slices also S * R * 4 bytes of fp32 partials, written and read).
// FLOP: 2 * rows * R * C. Mixtral-8x7B's gate pair at 64 rows per expert (2 x 14336 x 4096, 128 rows):
// 1.5e10 FLOP, 10.4 MB of codewords, 1 MB of x, 3.7 MB of y; mma.sync at ~600 TFLOP/s is ~25 us, HBM
// ~4 us, and the walks ~15-17M warp instructions beside the MMA's ~11M (a warp runs its slowest lane's
// trips: ~1.8 times the mean at 64 columns a step), ~28M in all or ~53k cycles of issue on 132 SMs x 4
// schedulers: issue (walks and mma.sync sharing the schedulers) is the expected bound, ~30-40 us against
// ~55-60 us for the bf16 product of the dense weights (235 MB from HBM).
#include <algorithm>

#include "common.cuh"
#include "expert_tiles.cuh"
#include "grouped_gemm_kernel.cuh"
#include "mma_sm80.cuh"
#include "moe_kernels.h"
#include "subbit_image.cuh"

namespace moek {
namespace {

// The block's tile: activation rows, weight rows (one walker thread each) and columns per step.
constexpr int kBM = 64;
constexpr int kBN = 128;
constexpr int kBK = 64;
constexpr int kThreads = 128;
constexpr int kWarpsM = 2, kWarpsN = 2;
constexpr int kWTM = kBM / kWarpsM, kWTN = kBN / kWarpsN;  // one warp's tile: 32 x 64
constexpr int kMI = kWTM / 16, kNI = kWTN / 8;
constexpr int kCH = kBK / 8;  // 16-byte chunks per stage row
constexpr int kXBytes = kBM * kBK * 2;
constexpr int kWBytes = kBN * kBK * 2;
constexpr int kStageBytes = kXBytes + kWBytes;
constexpr int kStages = 2;
constexpr int kXLoads = kBM * kCH / kThreads;  // 16-byte copies of x per thread and step
// Dictionary entries a walker has in flight (codewords after the current one).
constexpr int kAhead = 4;
// Blocks the automatic reduce grid stops at (a grid-stride loop does the rest).
constexpr int kReduceBlocks = 4096;
static_assert(kBN == kThreads, "one walker thread per weight row of the block");
static_assert(kRestartCols % kBK == 0, "tiles (multiples of 256 columns) hold whole steps");
static_assert(kWarpsM * kWarpsN * 32 == kThreads && kMI * 16 == kWTM && kNI % 2 == 0, "warp tiling");
static_assert(kXLoads * kThreads == kBM * kCH, "even x copies");

struct GemmArgs {
  Image im;
  ExpertRows experts;          // offsets [M + 1], max_rows = num_rows
  const __nv_bfloat16* x;      // [num_rows, C]
  const float* row_scale;      // [num_rows] or nullptr
  __nv_bfloat16* y;            // [num_rows, R]
  float* partial;              // splits > 1: [splits, num_rows, R]
  int64_t num_rows;
  int32_t splits;              // K slices (blocks of one tile), 1..tiles
  int32_t m_tiles;             // m-tiles of the grid (m_tile_bound)
  int32_t n_blocks;            // ceil(R / kBN)
  int32_t x_async;             // x rows 16-byte aligned (C % 8 == 0, x aligned): cp.async copies
  int32_t y_pairs;             // R even and y 4-byte aligned: output pairs in one store
};

// Byte offset of column c (0..kBK-1) of stage row `row` (the grouped GEMM's swizzled 16-byte chunks).
__device__ __forceinline__ uint32_t stage_col(int row, int c) {
  return swizzled<kCH>(row, c >> 3) + static_cast<uint32_t>(c & 7) * 2;
}

// One weight row's walk over the slice: the codewords of its tiles in order, one phrase at a time. A
// phrase belongs to the tile it is in; its slots past the tile's width (the last phrase's padding) and
// past its own length (only a corrupt entry has those) are masked off when it is loaded, so a nonzero is
// always a column of the tile at or after the phrase's start.
struct Walker {
  // The entries of codewords `next` .. `next + kAhead - 1` (their 2-byte codes are read one by one
  // through L1: 16-byte groups of 8 would hold 8 more registers through the MMA).
  uint64_t ahead[kAhead];
  uint32_t next;
  // Where the walk is: the current phrase's codeword, the current tile's codeword end and the slice's.
  uint32_t i, stop, last;
  int tile, tile_stop;     // the current tile (of the row) and the slice's end
  int col0, width, at;     // the tile's first column (of the matrix), its width, the phrase's first column in it
  uint32_t nonzero, sign;  // the current phrase's nonzero slots not yet written, and its signs
  int length;
  uint32_t levels;         // the row's levels as bf16 bits: plus (low half), minus (high half)
  int64_t tiles_at;        // index of the row's first tile offset
  bool live;

  __device__ __forceinline__ uint64_t entry(const Image& im, uint32_t k) {
    return k < last ? __ldg(im.dict + min(static_cast<uint32_t>(__ldg(im.codes + k)), im.max_code)) : kNoPhrase;
  }

  // The entry of codeword k: the head of the queue when k follows the previous one (the valid image's
  // only case), else fetched afresh with the queue refilled behind it.
  __device__ __forceinline__ uint64_t take(const Image& im, uint32_t k) {
    if (k != next) {
#pragma unroll
      for (int j = 0; j < kAhead; ++j) ahead[j] = entry(im, k + j);
      next = k;
    }
    const uint64_t e = ahead[0];
#pragma unroll
    for (int j = 0; j + 1 < kAhead; ++j) ahead[j] = ahead[j + 1];
    ahead[kAhead - 1] = entry(im, k + kAhead);
    next = k + 1;
    return e;
  }

  __device__ __forceinline__ void load(uint64_t e) {
    const Phrase p = phrase_of(e);
    const int room = min(p.length, width - at);  // at < width here
    nonzero = p.nonzero & (room >= 32 ? ~0u : (1u << max(room, 0)) - 1u);
    sign = p.sign;
    length = p.length;
  }

  // Moves to the next tile that has a codeword and loads its first phrase; false past the slice.
  __device__ __forceinline__ bool enter_next_tile(const Image& im) {
    while (++tile < tile_stop) {
      col0 += im.tile_cols;
      width = min(im.tile_cols, im.cols - col0);
      at = 0;
      // Tile boundaries clamped to [the previous tile's end, the slice's end]: a valid image's tiles
      // follow each other, so i is already there.
      i = min(max(__ldg(im.offsets + tiles_at + tile), stop), last);
      stop = min(max(__ldg(im.offsets + tiles_at + tile + 1), i), last);
      if (i < stop) {
        load(take(im, i));
        return true;
      }
    }
    return false;
  }

  // Starts the walk of row `row` (matrix * R + n) over tiles [t0, t1); an inactive walker (past R) only
  // ever writes zeros.
  __device__ __forceinline__ void start(const Image& im, int64_t row, int t0, int t1, bool active) {
    tiles_at = row * im.tiles;
    live = false;
    next = ~0u;  // nothing queued: the first take fills the queue (i < last <= codes_count, never ~0u)
    nonzero = 0;
    sign = 0;
    length = 0;
    levels = 0;
    if (!active) return;
    const uint32_t pair = __ldg(im.levels + row);
    // bf16 of the f16 levels, rounded to nearest even: the decode kernel's values.
    levels = __bfloat16_as_ushort(__float2bfloat16_rn(level(pair, 0))) |
             static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(-level(pair, 1)))) << 16;
    const uint32_t lo = min(__ldg(im.offsets + tiles_at + t0), im.codes_count);
    last = min(max(__ldg(im.offsets + tiles_at + t1), lo), im.codes_count);
    stop = lo;
    tile = t0 - 1;
    tile_stop = t1;
    col0 = (t0 - 1) * im.tile_cols;
    live = enter_next_tile(im);
  }

  // The current phrase is written: on to the next one (in this tile, or the next tile's first).
  __device__ __forceinline__ void advance(const Image& im) {
    at += length;
    ++i;
    if (at >= width || i >= stop) {  // a valid image ends both together
      live = enter_next_tile(im);
      return;
    }
    load(take(im, i));
  }

  // Writes this walker's row `row` of the W stage at `w`: columns [k0, k0 + kBK) of the matrix, zeros
  // where the row has none. invariant: every nonzero not yet written lies at column k0 or later (the
  // previous step wrote all below its end, and the next phrase starts at or after it), so the stores stay
  // inside the row's 64 columns.
  __device__ __forceinline__ void emit(const Image& im, unsigned char* w, int row, int k0) {
#pragma unroll
    for (int ch = 0; ch < kCH; ++ch) *reinterpret_cast<uint4*>(w + swizzled<kCH>(row, ch)) = make_uint4(0, 0, 0, 0);
    const int k_end = k0 + kBK;
    while (live) {
      while (nonzero != 0) {
        const int j = __ffs(nonzero) - 1;
        const int c = col0 + at + j;
        if (c >= k_end) return;  // the phrase goes on in the next step
        *reinterpret_cast<unsigned short*>(w + stage_col(row, c - k0)) =
            static_cast<unsigned short>((sign >> j) & 1 ? levels >> 16 : levels);
        nonzero &= nonzero - 1;
      }
      advance(im);
      if (col0 + at >= k_end) return;  // the next phrase starts in a later step
    }
  }
};

// One (m-tile, 128 weight rows, K slice) tile; blockIdx.x = (split * n_blocks + n_block) * m_tiles + m_tile,
// the m-tiles fastest so that the blocks of one expert's weight rows run together.
// Registers (ptxas, CUDA 13): 168 on sm_90a, 166 on sm_80, no spills, so 3 blocks (12 warps) share an SM. The
// walk inlined in the step loop holds ~40 of them beside the 64 accumulators (127 without it); asking
// for 4 blocks an SM (128 registers) spilled ~100 bytes, and 3 (170) still spilled 24-32, so no minimum
// is asked for.
__global__ void __launch_bounds__(kThreads) subbit_gemm_kernel(const GemmArgs p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int m_tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.m_tiles));
  const int rest = static_cast<int>(blockIdx.x / static_cast<unsigned>(p.m_tiles));
  const int n_block = rest % p.n_blocks;
  const int split = rest / p.n_blocks;
  MTile tile;
  if (!find_m_tile<kBM, kThreads>(p.experts, m_tile, reinterpret_cast<int32_t*>(smem), tile)) return;
  const Image& im = p.im;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;

  // The slice: whole tiles of the image, so every walk starts at a tile's first codeword.
  const int t0 = static_cast<int>(static_cast<int64_t>(im.tiles) * split / p.splits);
  const int t1 = static_cast<int>(static_cast<int64_t>(im.tiles) * (split + 1) / p.splits);
  const int k_begin = t0 * im.tile_cols;
  const int k_stop = min(t1 * im.tile_cols, im.cols);
  const int steps = (k_stop - k_begin + kBK - 1) / kBK;

  const int n = n_block * kBN + tid;  // this thread's weight row
  Walker walker;
  walker.start(im, static_cast<int64_t>(tile.expert) * im.rows + n, t0, t1, n < im.rows);

  const uint32_t base = smem_addr(smem);
  // Copies x's columns [k0, k0 + kBK) of the tile's rows into the X stage at smem + off: 16-byte cp.async
  // copies (zero-filled past the rows and C), or element by element where x's rows are not 16-byte aligned.
  auto load_x = [&](int off, int k0) {
    const int chunk = tid % kCH;
    const int col = k0 + chunk * 8;
#pragma unroll
    for (int l = 0; l < kXLoads; ++l) {
      const int r = tid / kCH + l * (kThreads / kCH);
      const bool row_ok = r < tile.rows;
      const __nv_bfloat16* src = p.x + (tile.row0 + (row_ok ? r : 0)) * static_cast<int64_t>(im.cols) + col;
      if (p.x_async) {
        const bool ok = row_ok && col < im.cols;  // C % 8 == 0: a chunk is all in or all out
        cp_async_16(base + off + swizzled<kCH>(r, chunk), ok ? src : p.x, ok);
      } else {
        unsigned short v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          v[e] = row_ok && col + e < im.cols ? __bfloat16_as_ushort(src[e]) : 0;
        }
        uint4 packed;
        packed.x = v[0] | static_cast<uint32_t>(v[1]) << 16;
        packed.y = v[2] | static_cast<uint32_t>(v[3]) << 16;
        packed.z = v[4] | static_cast<uint32_t>(v[5]) << 16;
        packed.w = v[6] | static_cast<uint32_t>(v[7]) << 16;
        *reinterpret_cast<uint4*>(smem + off + swizzled<kCH>(r, chunk)) = packed;
      }
    }
  };

  float acc[kMI][kNI][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;

  // One step's product: the X stage (A, [kBM][kBK]) times the W stage (B, [kBN][kBK]) into acc.
  auto multiply = [&](int off) {
    const uint32_t sa = base + off;
    const uint32_t sb = sa + kXBytes;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[kMI][4];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        const int row = warp_m * kWTM + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], sa + swizzled<kCH>(row, kk * 2 + (lane >> 4)));
      }
      // B a pair of n8 blocks at a time: fewer fragment registers live beside the walk's state.
#pragma unroll
      for (int nj = 0; nj < kNI / 2; ++nj) {
        uint32_t bf[4];
        const int row = warp_n * kWTN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(bf, sb + swizzled<kCH>(row, kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) {
          mma_16816<__nv_bfloat16>(acc[mi][2 * nj], af[mi], bf[0], bf[1]);
          mma_16816<__nv_bfloat16>(acc[mi][2 * nj + 1], af[mi], bf[2], bf[3]);
        }
      }
    }
  };

  // Step 0's stages, then: multiply stage s while x and the walks fill stage s + 1. invariant: a stage
  // is written only after the barrier that ends the step which last read it.
  load_x(0, k_begin);
  cp_async_commit();
  walker.emit(im, smem + kXBytes, tid, k_begin);
  cp_async_wait<0>();
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    const int cur = (s & 1) * kStageBytes, nxt = ((s + 1) & 1) * kStageBytes;
    const bool more = s + 1 < steps;
    if (more) load_x(nxt, k_begin + (s + 1) * kBK);
    cp_async_commit();
    multiply(cur);
    if (more) walker.emit(im, smem + nxt + kXBytes, tid, k_begin + (s + 1) * kBK);
    __syncwarp();  // the walks diverge; the next step's ldmatrix and mma.sync need whole warps
    cp_async_wait<0>();
    __syncthreads();
  }

  // Epilogue: thread (g, q) of a warp holds rows g and g + 8 of each m16 block, columns 2q and 2q + 1 of
  // each n8 block. One slice: y = acc * row_scale in bf16; several: the raw fp32 slice products.
  const int g = lane >> 2, q = lane & 3;
  const int64_t R = im.rows;
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_m * kWTM + mi * 16 + g + h * 8;
      if (r >= tile.rows) continue;
      const int64_t row = tile.row0 + r;
      const float scale = p.splits == 1 && p.row_scale != nullptr ? __ldg(p.row_scale + row) : 1.f;
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        const int64_t col = static_cast<int64_t>(n_block) * kBN + warp_n * kWTN + ni * 8 + q * 2;
        if (col >= R) continue;
        const float v0 = acc[mi][ni][h * 2] * scale, v1 = acc[mi][ni][h * 2 + 1] * scale;
        const bool second = col + 1 < R;
        if (p.splits == 1) {
          __nv_bfloat16* out = p.y + row * R + col;
          if (p.y_pairs) {
            store_pair(out, v0, v1);  // R even: col + 1 < R too
          } else {
            out[0] = __float2bfloat16_rn(v0);
            if (second) out[1] = __float2bfloat16_rn(v1);
          }
        } else {
          float* out = p.partial + (static_cast<int64_t>(split) * p.num_rows + row) * R + col;
          if (R % 2 == 0) {
            store_pair(out, v0, v1);  // the workspace is 16-byte aligned and row * R + col even
          } else {
            out[0] = v0;
            if (second) out[1] = v1;
          }
        }
      }
    }
  }
}

// y = row_scale * (the slices' partial products added in slice order), for the rows from the first
// expert's first to the last expert's end (clamped offsets, as the matvec's reduce).
__global__ void __launch_bounds__(256) subbit_gemm_reduce_kernel(const GemmArgs p) {
  const int64_t R = p.im.rows;
  const int32_t m = p.experts.num_experts;
  const int64_t lo = min(max(static_cast<int64_t>(__ldg(p.experts.offsets)), int64_t{0}), p.num_rows);
  const int64_t hi = min(max(static_cast<int64_t>(__ldg(p.experts.offsets + m)), lo), p.num_rows);
  const int64_t plane = p.num_rows * R;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = lo * R + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < hi * R; i += stride) {
    float sum = __ldcs(p.partial + i);
    for (int s = 1; s < p.splits; ++s) sum += __ldcs(p.partial + s * plane + i);
    const float scale = p.row_scale != nullptr ? __ldg(p.row_scale + i / R) : 1.f;
    p.y[i] = __float2bfloat16_rn(sum * scale);
  }
}

}  // namespace
}  // namespace moek

// splits: the K slices src/subbit/gemm.rs chose (1..tiles_per_row; the workspace holds them when > 1).
extern "C" int moek_cuda_subbit_grouped_gemm(const moek_subbit_grouped_gemm_args* a, int32_t splits,
                                             cudaStream_t stream) {
  if (a->num_rows <= 0) return cudaSuccess;
  const moek_subbit_weights& w = a->weights;
  moek::GemmArgs p;
  p.im = moek::image_of(w);
  p.experts.offsets = a->expert_offsets;
  p.experts.counts = nullptr;
  p.experts.max_rows = a->num_rows;
  p.experts.capacity = 0;
  p.experts.num_experts = w.matrices;
  p.x = static_cast<const __nv_bfloat16*>(a->x);
  p.row_scale = a->row_scale;
  p.y = static_cast<__nv_bfloat16*>(a->y);
  p.partial = static_cast<float*>(a->workspace);
  p.num_rows = a->num_rows;
  p.splits = std::max(1, std::min(splits, w.tiles_per_row));
  const int64_t m_tiles = moek::m_tile_bound(p.experts, moek::kBM);
  p.n_blocks = (w.rows + moek::kBN - 1) / moek::kBN;
  const int64_t blocks = m_tiles * p.n_blocks * p.splits;
  if (m_tiles == 0) return cudaSuccess;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;  // refused by the argument checks already
  p.m_tiles = static_cast<int32_t>(m_tiles);
  p.x_async = (w.cols % 8 == 0 && (reinterpret_cast<uintptr_t>(a->x) & 15) == 0) ? 1 : 0;
  p.y_pairs = (w.rows % 2 == 0 && (reinterpret_cast<uintptr_t>(a->y) & 3) == 0) ? 1 : 0;
  // The pipeline's stages, which first hold the m-tile scheduler's M + 1 prefix (M <= 8192: 32 KB).
  const size_t prefix = (static_cast<size_t>(w.matrices) + 1) * sizeof(int32_t);
  const size_t smem = std::max(prefix, static_cast<size_t>(moek::kStages * moek::kStageBytes));
  auto kernel = moek::subbit_gemm_kernel;
  cudaError_t err = moek::allow_max_dynamic_smem(kernel);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), moek::kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t elements = a->num_rows * w.rows;
  const int64_t reduce_blocks = std::min<int64_t>((elements + 255) / 256, moek::kReduceBlocks);
  moek::subbit_gemm_reduce_kernel<<<static_cast<unsigned>(reduce_blocks), 256, 0, stream>>>(p);
  return cudaGetLastError();
}
