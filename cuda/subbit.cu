// Sub-1-bit weights on the GPU (src/subbit/gpu.rs validates the arguments): the lossless decode to dense
// bf16 and the fused decode + matrix-vector product for a few tokens. docs/subbit-gpu.md has the design
// and its expected bounds; src/subbit/image.rs the image these kernels read.
//
// A dictionary entry is two 32-bit masks over the phrase's slots: `nonzero` and `sign` (with an end
// marker at slot `length` in `sign` where `nonzero` is clear). Both kernels walk a phrase's nonzeros
// with find-first-set, a handful of integer instructions each, and never touch its zeros.
//
// Fused matvec: every thread owns one (row, sub-stream of a tile) stream of codewords (tiles split at
// the image's restarts, every 256 columns, into as many sub-streams as still fit on the GPU at once, the
// block adding a row's sub-streams in order) and walks it alone, so a warp has
// 32 independent dependency chains in flight and no scans or shuffles in its loop. One trip of the loop
// consumes up to two nonzeros (x from shared memory, one FMA per token with the row's level) and, when
// the phrase has no nonzero left, steps to the next codeword, whose entry was already fetched on the trip
// that started the current one (and whose codeword came in a 16-byte load of 8 fetched 8 codewords
// earlier). Lanes take the same number of trips give or take the spread of their tiles' nonzero counts,
// so lanes idle only at a stream's end.
//
// The codewords are numbered by frequency in the image, so the first `table` entries (the hottest) sit
// in shared memory, loaded once per block of a persistent grid; the others come through L1/L2 and share
// few cache lines.
//
// Per weight at 0.71 bit (P(0) = 0.885: 23.4 weights and 2.7 nonzeros per codeword):
//   HBM:   0.089 bytes of codewords, + 8 / cols (levels and tile offsets);
//   smem:  one 8-byte lookup per codeword that hits the table, x reads of 2 * NT bytes per nonzero
//          (0.115 per weight);
//   L1/L2: one 8-byte lookup per codeword that misses the table (1 - the table's share of the uses);
//   issue: per trip about 16 + 2 * NT warp instructions a nonzero slot and ~26 for the step to the
//          next codeword (run by the warp on nearly every trip), ~1.6 trips a codeword.
// The Mixtral pair of experts (1.2e8 weights) is then about 15 us of issue at T = 1 on 132 SMs x 4
// schedulers (docs/subbit-gpu.md), far above its 2.5 us of HBM time: instruction issue, not memory, is
// the bound.
#include <algorithm>

#include "common.cuh"
#include "moe_kernels.h"
#include "subbit_image.cuh"

namespace moek {
namespace {

// Decode: warps per block and the columns of each warp's staging ring (two halves, written out one
// half at a time; a chunk of 32 phrases covers at most 32 * 32 = one half).
constexpr int kDecodeWarps = 4;
constexpr int kRing = 2048;
constexpr int kHalf = kRing / 2;
static_assert(32 * kMaxPhrase <= kHalf, "a chunk must fit in one half of the ring");
// Fused matvec: most threads (rows) per block; nonzeros a thread consumes per trip of its walk.
constexpr int kMatvecMaxThreads = 256;
constexpr int kConsumesPerTrip = 2;
// The shared memory the system keeps per block.
constexpr size_t kReservedSmem = 1024;
// Largest shared-memory x window (tile_cols * NT bf16); wider tiles read x through L1.
constexpr size_t kMaxSmemX = 64 * 1024;

// ---- lossless decode ------------------------------------------------------------------------------

// One warp per (row, tile). Lane l takes codeword base + l of each chunk of 32, an exclusive scan of the
// lengths places its phrase, and it writes only its nonzeros into the warp's zeroed ring in shared
// memory; every complete half of the ring then goes out as 16-byte stores (consecutive across the warp)
// and is zeroed again. The next chunk's entries are fetched before this one is placed.
__global__ void __launch_bounds__(32 * kDecodeWarps) decode_kernel(Image im, __nv_bfloat16* out, int64_t tiles_total) {
  __shared__ uint4 s_ring[kDecodeWarps][kRing * sizeof(__nv_bfloat16) / sizeof(uint4)];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kDecodeWarps + warp;
  if (tile >= tiles_total) return;
  const int64_t row = tile / im.tiles;  // matrix * rows + r
  const int t = static_cast<int>(tile % im.tiles);
  const int col0 = t * im.tile_cols;
  const int width = min(im.tile_cols, im.cols - col0);
  const uint32_t pair = __ldg(im.levels + row);
  // bf16 of the f16 levels, rounded to nearest even as the CPU decoder does.
  const __nv_bfloat16 plus = __float2bfloat16_rn(level(pair, 0));
  const __nv_bfloat16 minus = __float2bfloat16_rn(-level(pair, 1));
  __nv_bfloat16* dst = out + row * im.cols + col0;
  const bool vector = (reinterpret_cast<uintptr_t>(dst) & 15) == 0;
  uint4* ring4 = s_ring[warp];
  __nv_bfloat16* ring = reinterpret_cast<__nv_bfloat16*>(ring4);
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.f);
  for (int i = lane; i < kRing / 8; i += 32) ring4[i] = zero4;
  __syncwarp();

  // Writes columns [from, to) of the tile (from a multiple of kHalf, to - from <= kHalf) and zeroes
  // their ring slots.
  auto flush = [&](int from, int to) {
    const int n = to - from;
    const int base = from & (kRing - 1);
    int scalar_from = 0;
    if (vector) {
      const int n8 = n / 8;
      uint4* d4 = reinterpret_cast<uint4*>(dst + from);
      for (int i = lane; i < n8; i += 32) {
        d4[i] = ring4[base / 8 + i];
        ring4[base / 8 + i] = zero4;
      }
      scalar_from = n8 * 8;
    }
    for (int i = scalar_from + lane; i < n; i += 32) {
      dst[from + i] = ring[base + i];
      ring[base + i] = zero;
    }
    __syncwarp();
  };
  auto fetch = [&](uint64_t i, uint32_t hi) -> uint64_t {
    return i < hi ? __ldg(im.dict + min(static_cast<uint32_t>(__ldg(im.codes + i)), im.max_code)) : kNoPhrase;
  };

  const Range range = tile_range(im, tile);
  int done = 0;     // columns placed (phrase starts up to here)
  int written = 0;  // columns written out, a multiple of kHalf until the tail
  uint64_t next = fetch(uint64_t{range.lo} + lane, range.hi);
  for (uint64_t base = range.lo; base < range.hi && done < width; base += 32) {
    const Phrase p = phrase_of(next);
    next = fetch(base + 32 + lane, range.hi);
    int inclusive = p.length;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, o);
      if (lane >= o) inclusive += up;
    }
    const int start = done + inclusive - p.length;
    // invariant: written <= done < written + kHalf, so this chunk's columns [done, done + kHalf) lie in
    // the ring's window [written, written + kRing) and never reach a slot not yet written out.
    for (uint32_t m = p.nonzero; m != 0; m &= m - 1) {
      const int j = __ffs(m) - 1;
      const int c = start + j;
      if (c < width) ring[c & (kRing - 1)] = (p.sign >> j) & 1 ? minus : plus;
    }
    __syncwarp();
    done += __shfl_sync(0xffffffffu, inclusive, 31);
    while (written + kHalf <= min(done, width)) {
      flush(written, written + kHalf);
      written += kHalf;
    }
  }
  // The tail (and, for a corrupt image that ends early, zeros for the columns it never placed).
  while (written < width) {
    const int to = min(written + kHalf, width);
    flush(written, to);
    written = to;
  }
}

// ---- fused decode + matvec ------------------------------------------------------------------------

struct MatvecParams {
  Image im;
  const uint32_t* restarts;    // per (matrix, row, tile): tile_cols / kRestartCols packed restarts
  const __nv_bfloat16* x;      // [num_tokens, cols]
  __nv_bfloat16* y;            // [num_tokens, rows]
  float* partial;              // [tiles, num_tokens, rows] when tiles > 1
  const int32_t* offsets;      // grouped: [matrices + 1]; NULL: one matrix
  int32_t matrix;
  int32_t matrices;
  int64_t num_tokens;
  int32_t subs;                // sub-streams per (row, tile): threads of a block per row
  int32_t stride;              // restarts per sub-stream (tile_cols / kRestartCols / subs, exact: subs is a
                               // power of two of at most tile_cols / kRestartCols)
  int32_t rows_per_block;      // blockDim.x / subs
  int32_t row_groups;          // ceil(rows / rows_per_block)
  int64_t items;               // (matrix, row group, tile) work items
  int32_t table;               // dictionary entries held in shared memory (a prefix)
  int32_t table_slots;         // table rounded up to even (the x window is 16-byte aligned after it)
};

// Where x's values of the block's tile come from: the shared-memory window ([tile_cols][NT] bf16, NT
// tokens of a column in one vector load), or (tiles too wide for it) global memory through L1.
template <int NT, bool kSmem>
struct XTile {
  using Word = typename std::conditional<NT == 8, uint4,
               typename std::conditional<NT == 4, uint2,
               typename std::conditional<NT == 2, uint32_t, uint16_t>::type>::type>::type;
  const __nv_bfloat16* xs;   // shared window
  const __nv_bfloat16* xg;   // global: x + tok0 * cols + col0
  int64_t cols;
  int ntok;
  // acc[j] += w * x[token j][c]
  __device__ __forceinline__ void fma(uint32_t c, float w, float (&acc)[NT]) const {
    if constexpr (kSmem) {
      const Word v = *reinterpret_cast<const Word*>(xs + static_cast<size_t>(c) * NT);
      const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j] = fmaf(w, __bfloat162float(e[j]), acc[j]);
    } else {
#pragma unroll
      for (int j = 0; j < NT; ++j)
        if (j < ntok) acc[j] = fmaf(w, __bfloat162float(xg[j * cols + c]), acc[j]);
    }
  }
};

// One thread's sub-stream of a tile: codewords [lo, hi) whose first phrase starts at column `at` of the
// tile's `width` columns, and the columns past 0..width dropped.
struct Stream {
  Range range;
  int at;
};
// Sub-stream s (of p.subs) of tile `tile`: restarts s * stride and (s + 1) * stride, clamped to the
// tile's codewords (a corrupt image gives wrong values, never an out-of-bounds read or a long walk).
__device__ __forceinline__ Stream sub_stream(const MatvecParams& p, int64_t tile, int s) {
  const Range whole = tile_range(p.im, tile);
  if (p.subs == 1) return {whole, 0};
  const int per_tile = p.im.tile_cols / kRestartCols;
  const uint32_t* r = p.restarts + tile * per_tile;
  const int j0 = s * p.stride;
  const int j1 = j0 + p.stride;
  const uint32_t first = __ldg(r + j0);
  const uint32_t lo = whole.lo + min(first >> 5, whole.hi - whole.lo);
  // The last sub-stream runs to the tile's end whatever stride says.
  const uint32_t end =
      s + 1 < p.subs && j1 < per_tile ? whole.lo + min(__ldg(r + j1) >> 5, whole.hi - whole.lo) : whole.hi;
  return {{lo, max(end, lo)}, j0 * kRestartCols + static_cast<int>(first & 31)};
}

// One thread's walk of its stream: acc[j] += W[r, c] * x[j][c] over the stream's phrases. Codewords
// come 8 at a time in aligned 16-byte loads (the image pads its codeword section to 16 bytes, so such a
// load never leaves the image), one group ahead; dictionary entries two codewords ahead (an L2 miss of
// the table is ~300-600 cycles: one phrase's trips did not cover it).
template <int NT, bool kSmem>
__device__ __forceinline__ void walk(const Image& im, const uint64_t* table, uint32_t table_size, Stream st,
                                     int width, float plus, float minus, const XTile<NT, kSmem>& x,
                                     float (&acc)[NT]) {
  const Range range = st.range;
  int at = st.at;  // the current phrase's first column
  if (range.lo >= range.hi || at >= width) return;
  const uint4* groups = reinterpret_cast<const uint4*>(im.codes);
  const uint32_t last_group = (im.codes_count - 1) >> 3;  // codes_count >= hi > lo >= 0
  auto lookup = [&](uint32_t code) -> uint64_t {
    code = min(code, im.max_code);
    return code < table_size ? table[code] : __ldg(im.dict + code);
  };
  uint32_t group = range.lo >> 3;
  uint4 now = __ldg(groups + group);
  uint4 ahead = __ldg(groups + min(group + 1, last_group));
  uint32_t i = range.lo;  // the current phrase's codeword
  Phrase p = phrase_of(lookup(pick(now, i & 7)));
  // Codeword k's code; called for k = lo + 1, lo + 2, ... in order, so k's group is the current one or
  // the next.
  auto next_code = [&](uint32_t k) -> uint32_t {
    if ((k >> 3) != group) {
      group = k >> 3;
      now = ahead;
      ahead = __ldg(groups + min(group + 1, last_group));
    }
    return pick(now, k & 7);
  };
  // The entries of codewords i + 1 and i + 2 (absent past the range: never used, the walk stops first).
  uint64_t pending = range.lo + 1 < range.hi ? lookup(next_code(range.lo + 1)) : kNoPhrase;
  uint64_t pending2 = range.lo + 2 < range.hi ? lookup(next_code(range.lo + 2)) : kNoPhrase;
  for (;;) {
    // kConsumesPerTrip nonzeros a trip: the step to the next codeword (run by the warp on nearly every
    // trip, as some lane almost always needs it) is then paid per ~1.6 instead of ~2.7 trips a codeword.
#pragma unroll
    for (int u = 0; u < kConsumesPerTrip; ++u) {
      if (p.nonzero != 0) {
        const int j = __ffs(p.nonzero) - 1;
        const uint32_t c = static_cast<uint32_t>(at + j);
        const float w = (p.sign >> j) & 1 ? minus : plus;
        if (c < static_cast<uint32_t>(width)) x.fma(c, w, acc);
        p.nonzero &= p.nonzero - 1;
      }
    }
    if (p.nonzero == 0) {
      at += p.length;
      if (++i >= range.hi || at >= width) break;
      p = phrase_of(pending);
      pending = pending2;
      if (i + 2 < range.hi) pending2 = lookup(next_code(i + 2));
    }
  }
}

// A persistent grid: block b takes work items b, b + gridDim.x, ...; item = (matrix, row group, tile)
// with the tile fastest (grouped) or (row group, tile) of p.matrix. Thread k of the block owns row
// group * rows_per_block + k % rows_per_block of the item's matrix and sub-stream k / rows_per_block of
// its tile, and walks it once per group of NT tokens; with several sub-streams the block then adds them
// up in shared memory in sub-stream order (deterministic). Blocks first copy the hottest `table`
// dictionary entries to shared memory.
template <int NT, bool kSmem>
__global__ void __launch_bounds__(kMatvecMaxThreads) matvec_kernel(MatvecParams p) {
  extern __shared__ uint4 s_raw[];
  uint64_t* table = reinterpret_cast<uint64_t*>(s_raw);
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(table + p.table_slots);
  const Image& im = p.im;
  // [NT][blockDim.x] partial sums of the sub-streams, after the x window (a multiple of 512 bytes).
  float* red = reinterpret_cast<float*>(xs + (kSmem ? static_cast<size_t>(im.tile_cols) * NT : 0));
  {
    // 16-byte loads, 8 in flight a thread: the table is up to ~100 KB and every block waits for it.
    // table_slots is even and the dictionary section is padded to 16 bytes, so the last pair stays
    // inside the image.
    const uint4* from = reinterpret_cast<const uint4*>(im.dict);
    uint4* to = reinterpret_cast<uint4*>(table);
    const int pairs = p.table_slots / 2;
#pragma unroll 8
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) to[i] = __ldg(from + i);
  }
  // (the first item's __syncthreads orders these stores before any lookup)

  const int rpb = p.rows_per_block;
  const int sub = threadIdx.x / rpb;
  const int64_t per_matrix = static_cast<int64_t>(p.row_groups) * im.tiles;
  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    const int t = static_cast<int>(item % im.tiles);
    const int group = static_cast<int>((item / im.tiles) % p.row_groups);
    int64_t tok_lo = 0, tok_hi = p.num_tokens;
    int m = p.matrix;
    if (p.offsets != nullptr) {
      m = static_cast<int>(item / per_matrix);
      tok_lo = min(max(static_cast<int64_t>(__ldg(p.offsets + m)), int64_t{0}), p.num_tokens);
      tok_hi = min(max(static_cast<int64_t>(__ldg(p.offsets + m + 1)), tok_lo), p.num_tokens);
    }
    if (tok_hi <= tok_lo) continue;  // an expert without tokens reads none of its weights (block-uniform)
    const int col0 = t * im.tile_cols;
    const int width = min(im.tile_cols, im.cols - col0);
    const int r = group * rpb + threadIdx.x % rpb;
    const bool mine = r < im.rows;
    const int64_t row = static_cast<int64_t>(m) * im.rows + r;
    Stream st{{0, 0}, 0};
    float plus = 0.f, minus = 0.f;
    if (mine) {
      st = sub_stream(p, row * im.tiles + t, sub);
      const uint32_t pair = __ldg(im.levels + row);
      plus = level(pair, 0);
      minus = -level(pair, 1);
    }
    // Token j of this group's output for row r: y (one tile a row) or the tile's partial sum.
    auto store = [&](int64_t tok, int rr, float v) {
      if (im.tiles == 1) {
        p.y[tok * im.rows + rr] = __float2bfloat16_rn(v);
      } else {
        p.partial[(static_cast<int64_t>(t) * p.num_tokens + tok) * im.rows + rr] = v;
      }
    };
    for (int64_t tok0 = tok_lo; tok0 < tok_hi; tok0 += NT) {
      const int ntok = static_cast<int>(min(static_cast<int64_t>(NT), tok_hi - tok0));
      const __nv_bfloat16* xg = p.x + tok0 * im.cols + col0;
      __syncthreads();  // the table is in; the previous window and sums are no longer read
      if constexpr (kSmem) {
        // Coalesced reads of each token's row segment; padding tokens are zeros.
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          for (int c = threadIdx.x; c < width; c += blockDim.x) {
            xs[c * NT + j] = j < ntok ? xg[static_cast<int64_t>(j) * im.cols + c] : __float2bfloat16_rn(0.f);
          }
        }
      }
      __syncthreads();
      float acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j] = 0.f;
      const XTile<NT, kSmem> x{xs, xg, im.cols, ntok};
      if (mine) walk<NT, kSmem>(im, table, static_cast<uint32_t>(p.table), st, width, plus, minus, x, acc);
      if (p.subs == 1) {
        if (mine) {
#pragma unroll
          for (int j = 0; j < NT; ++j)
            if (j < ntok) store(tok0 + j, r, acc[j]);
        }
        continue;
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) red[j * blockDim.x + threadIdx.x] = acc[j];
      __syncthreads();
      // invariant: every thread reaches the barrier above (no early exit in this loop), and the next
      // token group's first barrier orders these reads before `red` is written again.
      for (int k = threadIdx.x; k < rpb * NT; k += blockDim.x) {
        const int rl = k % rpb;
        const int j = k / rpb;
        const int rr = group * rpb + rl;
        if (j < ntok && rr < im.rows) {
          float sum = 0.f;
          for (int s = 0; s < p.subs; ++s) sum += red[j * blockDim.x + s * rpb + rl];
          store(tok0 + j, rr, sum);
        }
      }
    }
  }
}

// y = the sum of the tiles' partial products in tile order, for the token rows in use.
__global__ void __launch_bounds__(256) reduce_kernel(MatvecParams p) {
  const Image& im = p.im;
  int64_t tok_lo = 0, tok_hi = p.num_tokens;
  if (p.offsets != nullptr) {
    tok_lo = min(max(static_cast<int64_t>(__ldg(p.offsets)), int64_t{0}), p.num_tokens);
    tok_hi = min(max(static_cast<int64_t>(__ldg(p.offsets + p.matrices)), tok_lo), p.num_tokens);
  }
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t tok = i / im.rows;
  if (tok < tok_lo || tok >= tok_hi) return;
  const int64_t plane = p.num_tokens * im.rows;
  float sum = 0.f;
  for (int t = 0; t < im.tiles; ++t) sum += p.partial[t * plane + i];
  p.y[i] = __float2bfloat16_rn(sum);
}

// Sub-streams per (row, tile): the most (powers of two, at most the tile's restarts and threads / 32)
// whose threads still fit on the GPU at once, `resident` threads; every thread is a dependent chain, so
// more of them hide more latency, but a second wave would double the time.
int pick_subs(int64_t streams, int per_tile, int threads, int64_t resident) {
  int subs = 1;
  while (subs * 2 <= per_tile && threads / (subs * 2) >= 32 && streams * subs * 2 <= resident) subs *= 2;
  return subs;
}

template <int NT, bool kSmem>
cudaError_t launch_matvec_as(MatvecParams p, int threads, bool table_given, int substream_cols,
                             cudaStream_t stream) {
  const size_t window = kSmem ? static_cast<size_t>(p.im.tile_cols) * NT * sizeof(__nv_bfloat16) : 0;
  const size_t sums = static_cast<size_t>(threads) * NT * sizeof(float);
  const int sms = std::max(1, current_device_attribute<cudaDevAttrMultiProcessorCount>());
  auto kernel = matvec_kernel<NT, kSmem>;
  const size_t optin = static_cast<size_t>(current_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>());
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(optin));
  if (err != cudaSuccess) return err;
  // Blocks an SM takes without a table (registers, threads): how many threads can run at once.
  int fit = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, threads, window + sums);
  if (err != cudaSuccess) return err;
  fit = std::max(1, fit);
  const int per_tile = p.im.tile_cols / kRestartCols;
  const int64_t streams = static_cast<int64_t>(p.offsets != nullptr ? p.matrices : 1) * p.im.rows * p.im.tiles;
  if (substream_cols > 0) {
    // A power of two, so that it divides per_tile: sub-stream s ends at restart (s + 1) * stride, so a
    // stride rounded down (threads / 32 = 3, 5, 6 or 7 with MOEK_SUBBIT_ROWS_PER_BLOCK) would drop the
    // tile's last per_tile - subs * stride restarts' columns.
    const int most = std::max(1, std::min({p.im.tile_cols / std::max(kRestartCols, substream_cols), per_tile, threads / 32}));
    p.subs = 1;
    while (p.subs * 2 <= most) p.subs *= 2;
  } else {
    p.subs = pick_subs(streams, per_tile, threads, static_cast<int64_t>(fit) * threads * sms);
  }
  p.stride = per_tile / p.subs;
  p.rows_per_block = threads / p.subs;
  p.row_groups = (p.im.rows + p.rows_per_block - 1) / p.rows_per_block;
  p.items = static_cast<int64_t>(p.offsets != nullptr ? p.matrices : 1) * p.row_groups * p.im.tiles;
  // What a block may have: the device's limit, and (table chosen here) the share that still lets the
  // blocks the items need sit on an SM together (every thread is one dependent chain: more resident
  // blocks hide more latency than a larger table saves).
  const size_t fixed = window + (p.subs > 1 ? sums : 0);
  size_t budget = optin;
  if (!table_given) {
    const int64_t want = std::min<int64_t>(fit, std::max<int64_t>(1, (p.items + sms - 1) / sms));
    const size_t per_sm = static_cast<size_t>(current_device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>());
    const size_t share = per_sm / static_cast<size_t>(want);
    budget = std::min(budget, share > kReservedSmem ? share - kReservedSmem : 0);
  }
  const size_t room = budget > fixed ? (budget - fixed) / sizeof(uint64_t) : 0;
  p.table = static_cast<int32_t>(std::min<size_t>(p.table, room & ~size_t{1}));
  p.table_slots = (p.table + 1) & ~1;
  const size_t smem = static_cast<size_t>(p.table_slots) * sizeof(uint64_t) + fixed;
  // A persistent grid of as many blocks as fit at once (never more than there are items).
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(std::max(1, per_sm)) * sms;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(p.items, resident));
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <int NT>
cudaError_t launch_matvec(const MatvecParams& p, int threads, bool table_given, int substream_cols,
                          cudaStream_t stream) {
  if (static_cast<size_t>(p.im.tile_cols) * NT * sizeof(__nv_bfloat16) <= kMaxSmemX) {
    return launch_matvec_as<NT, true>(p, threads, table_given, substream_cols, stream);
  }
  return launch_matvec_as<NT, false>(p, threads, table_given, substream_cols, stream);
}

}  // namespace
}  // namespace moek

extern "C" int moek_cuda_subbit_decode(const moek_subbit_decode_args* a, cudaStream_t stream) {
  const moek::Image im = moek::image_of(a->weights);
  const int64_t tiles = static_cast<int64_t>(a->weights.matrices) * a->weights.rows * a->weights.tiles_per_row;
  const int64_t blocks = (tiles + moek::kDecodeWarps - 1) / moek::kDecodeWarps;
  moek::decode_kernel<<<static_cast<unsigned>(blocks), 32 * moek::kDecodeWarps, 0, stream>>>(
      im, static_cast<__nv_bfloat16*>(a->out), tiles);
  return cudaGetLastError();
}

// rows_per_block: the threads of a block, a multiple of 32 in 32..256 (0: 256).
// table_entries: dictionary entries kept in shared memory, 0..65536, lowered to what fits a block beside
// the x window; negative: as many as let the blocks the work needs share an SM.
// substream_cols: columns of a tile each thread walks (a power of two from 256 to tile_cols, rounded
// into range); 0: the most sub-streams whose threads fit on the GPU at once (pick_subs).
extern "C" int moek_cuda_subbit_matvec(const moek_subbit_matvec_args* a, int32_t rows_per_block,
                                       int32_t table_entries, int32_t substream_cols, cudaStream_t stream) {
  if (a->num_tokens <= 0) return cudaSuccess;
  const moek_subbit_weights& w = a->weights;
  const int threads = rows_per_block > 0 ? std::min(rows_per_block, moek::kMatvecMaxThreads) : 256;
  moek::MatvecParams p;
  p.im = moek::image_of(w);
  // The restarts follow the codewords, 16-byte aligned (src/subbit/image.rs restarts_at).
  const size_t restarts_at = (w.codes_at + 2 * static_cast<size_t>(w.codes) + 15) / 16 * 16;
  p.restarts = reinterpret_cast<const uint32_t*>(static_cast<const char*>(w.image) + restarts_at);
  p.x = static_cast<const __nv_bfloat16*>(a->x);
  p.y = static_cast<__nv_bfloat16*>(a->y);
  p.partial = static_cast<float*>(a->workspace);
  p.offsets = a->expert_offsets;
  p.matrix = a->matrix;
  p.matrices = w.matrices;
  p.num_tokens = a->num_tokens;
  // subs, stride, rows_per_block, row_groups and items: set by launch_matvec_as.
  const bool table_given = table_entries >= 0;
  p.table = std::min(table_given ? table_entries : 65536, w.dictionary_entries);
  p.table_slots = 0;
  const int64_t nt = std::min<int64_t>(a->num_tokens, MOEK_SUBBIT_MAX_TOKENS);
  cudaError_t err;
  if (nt <= 1) {
    err = moek::launch_matvec<1>(p, threads, table_given, substream_cols, stream);
  } else if (nt <= 2) {
    err = moek::launch_matvec<2>(p, threads, table_given, substream_cols, stream);
  } else if (nt <= 4) {
    err = moek::launch_matvec<4>(p, threads, table_given, substream_cols, stream);
  } else {
    err = moek::launch_matvec<8>(p, threads, table_given, substream_cols, stream);
  }
  if (err != cudaSuccess || w.tiles_per_row == 1) return err;
  const int64_t elements = a->num_tokens * w.rows;
  moek::reduce_kernel<<<static_cast<unsigned>((elements + 255) / 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}
