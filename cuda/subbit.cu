// Sub-1-bit weights on the GPU (src/subbit/gpu.rs validates the arguments): the lossless decode to dense
// bf16 and the fused decode + matrix-vector product for a few tokens.
//
// Decoding a tile. A warp takes its tile's codewords 32 * kCodesPerLane at a time, lane l the
// kCodesPerLane consecutive ones from l * kCodesPerLane (one coalesced range per warp), looks each up in
// the dictionary, and an exclusive warp scan of the lanes' phrase lengths says at which column each
// lane's first phrase starts. A dictionary entry is the phrase's 2-bit symbols with every slot past its
// length set to 3 (a value no symbol takes), so the length, the positive mask and the negative mask each
// come from a few bit operations on the one 8-byte word.
//
// The dictionary (2^16 entries x 8 bytes = 512 KB) is read through L1 (__ldg): it does not fit in shared
// memory (227 KB per block), and a per-block copy would cost more L2 reads than a matrix's codewords (132
// SMs x 512 KB = 66 MB against 5 MB of codewords for a Mixtral expert). Tunstall codewords are nearly
// equiprobable, so L1 (what shared memory leaves of 256 KB per SM) holds a fraction of the hot set and the
// rest comes from L2 (60 MB on H200, where the table stays resident).
//
// Bytes and FLOPs of the fused matvec, per weight, at 0.71 bit/weight (P(0) = 0.885, ~22.5 weights per
// codeword, ~2.6 nonzeros per codeword):
//   HBM:   0.089 bytes (the codewords) + 4 / cols (tile offsets, per row and tile) + 4 / cols (levels);
//   L1/L2: 8 / 22.5 = 0.36 bytes of dictionary (4x the HBM bytes: the likely limit, not HBM);
//   x:     2 * NT * tile_cols bytes of L2 per block and tile, against rows_per_block * tile_cols * 0.089
//          bytes of codewords (22.5 * NT / rows_per_block times the HBM bytes);
//   math:  NT fp32 adds per nonzero weight (0.115 * NT per weight) plus the warp reduction per row and
//          tile; the dense product would be 2 * T FLOPs per weight.
// So the kernel is bound by the dictionary lookups (L1/L2 latency and throughput), not by FLOPs.
#include <algorithm>

#include "common.cuh"
#include "moe_kernels.h"

namespace moek {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kCodesPerLane = 4;
// Blocks per SM the fused kernel's registers are capped for (128 a thread): without a minimum ptxas
// aimed at 64 and spilled the NT = 8 variants, at 3 (85) one variant still spilled; it takes 64..98, so
// three blocks (24 warps) fit an SM by registers below 85.
constexpr int kMatvecBlocksPerSm = 2;
constexpr int kChunk = 32 * kCodesPerLane;  // codewords a warp takes at a time
constexpr int kMaxPhrase = 32;
constexpr uint64_t kEven = 0x5555555555555555ull;
// Largest shared-memory x window (tile_cols * NT bf16): no opt-in needed; larger tiles read x through L1.
constexpr size_t kMaxSmemX = 48 * 1024;

// The image's sections (see moek_subbit_weights) as typed device pointers.
struct Image {
  const uint64_t* dict;
  const uint32_t* levels;   // per row: f16 positive level (low half), f16 negative magnitude (high half)
  const uint32_t* offsets;  // per (matrix, row, tile), then the total
  const uint16_t* codes;
  uint32_t codes_count;
  uint32_t max_code;        // D - 1
  int32_t rows, cols, tile_cols, tiles;
};

Image image_of(const moek_subbit_weights& w) {
  const char* base = static_cast<const char*>(w.image);
  Image im;
  im.dict = reinterpret_cast<const uint64_t*>(base + w.dictionary_at);
  im.levels = reinterpret_cast<const uint32_t*>(base + w.scales_at);
  im.offsets = reinterpret_cast<const uint32_t*>(base + w.offsets_at);
  im.codes = reinterpret_cast<const uint16_t*>(base + w.codes_at);
  im.codes_count = static_cast<uint32_t>(w.codes);
  im.max_code = static_cast<uint32_t>(w.dictionary_entries - 1);
  im.rows = w.rows;
  im.cols = w.cols;
  im.tile_cols = w.tile_cols;
  im.tiles = w.tiles_per_row;
  return im;
}

// A tile's codeword range, clamped to the codewords (a corrupt image gives wrong values, never an
// out-of-bounds read).
struct Range {
  uint32_t lo, hi;
};
__device__ __forceinline__ Range tile_range(const Image& im, int64_t tile) {
  const uint32_t lo = min(__ldg(im.offsets + tile), im.codes_count);
  const uint32_t hi = min(max(__ldg(im.offsets + tile + 1), lo), im.codes_count);
  return {lo, hi};
}

// Marks a codeword slot past the range: its entry becomes all 3s, a phrase of length 0.
constexpr uint32_t kNoCode = 0xffffffffu;

// The lane's codewords base + lane * kCodesPerLane + u of [base, hi).
__device__ __forceinline__ void fetch_codes(const Image& im, int64_t base, uint32_t hi, int lane,
                                            uint32_t (&code)[kCodesPerLane]) {
#pragma unroll
  for (int u = 0; u < kCodesPerLane; ++u) {
    const int64_t i = base + lane * kCodesPerLane + u;
    code[u] = i < hi ? min(static_cast<uint32_t>(__ldg(im.codes + i)), im.max_code) : kNoCode;
  }
}

__device__ __forceinline__ void expand(const Image& im, const uint32_t (&code)[kCodesPerLane],
                                       uint64_t (&entry)[kCodesPerLane]) {
#pragma unroll
  for (int u = 0; u < kCodesPerLane; ++u) entry[u] = code[u] == kNoCode ? ~0ull : __ldg(im.dict + code[u]);
}

__device__ __forceinline__ int phrase_length(uint64_t e) {
  const uint64_t end = e & (e >> 1) & kEven;  // bit 2j set where slot j holds 3
  return end != 0 ? (__ffsll(static_cast<long long>(end)) - 1) >> 1 : kMaxPhrase;
}
__device__ __forceinline__ uint64_t positive_mask(uint64_t e) { return e & ~(e >> 1) & kEven; }
__device__ __forceinline__ uint64_t negative_mask(uint64_t e) { return (e >> 1) & ~e & kEven; }

// Exclusive scan of the lanes' phrase lengths: the column (from the chunk's start) of the lane's first
// phrase; *total gets the chunk's columns.
__device__ __forceinline__ int chunk_starts(const uint64_t (&entry)[kCodesPerLane], int lane, int* total) {
  int mine = 0;
#pragma unroll
  for (int u = 0; u < kCodesPerLane; ++u) mine += phrase_length(entry[u]);
  int inclusive = mine;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  *total = __shfl_sync(0xffffffffu, inclusive, 31);
  return inclusive - mine;
}

__device__ __forceinline__ float level(uint32_t pair, int which) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(which == 0 ? pair & 0xffff : pair >> 16)));
}

// ---- lossless decode ------------------------------------------------------------------------------

// One warp per tile. Each chunk's symbols are laid out in shared memory first, so the bf16 stores are
// consecutive across the warp (a phrase per lane would scatter them).
__global__ void __launch_bounds__(kThreads) decode_kernel(Image im, __nv_bfloat16* out, int64_t tiles_total) {
  __shared__ uint8_t s_sym[kWarps][kChunk * kMaxPhrase];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (tile >= tiles_total) return;
  const int64_t row = tile / im.tiles;  // matrix * rows + r
  const int t = static_cast<int>(tile % im.tiles);
  const int col0 = t * im.tile_cols;
  const int width = min(im.tile_cols, im.cols - col0);
  const uint32_t pair = __ldg(im.levels + row);
  // bf16 of the f16 levels, rounded to nearest even as the CPU decoder does.
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.f);
  const __nv_bfloat16 plus = __float2bfloat16_rn(level(pair, 0));
  const __nv_bfloat16 minus = __float2bfloat16_rn(-level(pair, 1));
  __nv_bfloat16* dst = out + row * im.cols + col0;
  uint8_t* sym = s_sym[warp];
  const Range range = tile_range(im, tile);
  int done = 0;  // columns of the tile decoded so far
  for (int64_t base = range.lo; base < range.hi && done < width; base += kChunk) {
    uint32_t code[kCodesPerLane];
    uint64_t entry[kCodesPerLane];
    fetch_codes(im, base, range.hi, lane, code);
    expand(im, code, entry);
    int total;
    int at = chunk_starts(entry, lane, &total);
#pragma unroll
    for (int u = 0; u < kCodesPerLane; ++u) {
      const int len = phrase_length(entry[u]);
      for (int j = 0; j < len; ++j) sym[at + j] = static_cast<uint8_t>((entry[u] >> (2 * j)) & 3);
      at += len;
    }
    __syncwarp();
    const int n = min(total, width - done);
    for (int i = lane; i < n; i += 32) {
      const uint8_t s = sym[i];
      dst[done + i] = s == 1 ? plus : (s == 2 ? minus : zero);
    }
    __syncwarp();
    done += total;
  }
}

// ---- fused decode + matvec ------------------------------------------------------------------------

struct MatvecParams {
  Image im;
  const __nv_bfloat16* x;      // [num_tokens, cols]
  __nv_bfloat16* y;            // [num_tokens, rows]
  float* partial;              // [tiles, num_tokens, rows] when tiles > 1
  const int32_t* offsets;      // grouped: [matrices + 1]; NULL: one matrix
  int32_t matrix;
  int32_t matrices;
  int64_t num_tokens;
  int32_t rows_per_block;
  int32_t row_groups;
};

// NT tokens' values of one column as NT consecutive bf16 (one vector load from shared memory).
template <int NT>
struct Column {
  using Word = typename std::conditional<NT == 8, uint4,
               typename std::conditional<NT == 4, uint2,
               typename std::conditional<NT == 2, uint32_t, uint16_t>::type>::type>::type;
  __device__ __forceinline__ static void add(const __nv_bfloat16* xs, uint32_t c, float (&acc)[NT]) {
    const Word w = *reinterpret_cast<const Word*>(xs + static_cast<size_t>(c) * NT);
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&w);
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j] += __bfloat162float(v[j]);
  }
};

// Where x's values of the block's tile come from: the shared-memory window ([tile_cols][NT] bf16), or
// (tiles too wide for it) global memory through L1.
template <int NT, bool kSmem>
struct XTile {
  const __nv_bfloat16* xs;   // shared window
  const __nv_bfloat16* xg;   // global: x + tok0 * cols + col0
  int64_t cols;
  int ntok;
  __device__ __forceinline__ void add(uint32_t c, float (&acc)[NT]) const {
    if constexpr (kSmem) {
      Column<NT>::add(xs, c, acc);
    } else {
#pragma unroll
      for (int j = 0; j < NT; ++j)
        if (j < ntok) acc[j] += __bfloat162float(xg[j * cols + c]);
    }
  }
};

// Adds the lane's phrases of one chunk: x over the positive symbols to pos, over the negative ones to
// neg. Columns at or past `width` (padding of the tile's last phrase) are skipped.
template <int NT, bool kSmem>
__device__ __forceinline__ int accumulate_chunk(const uint64_t (&entry)[kCodesPerLane], int lane, int done,
                                                int width, const XTile<NT, kSmem>& x, float (&pos)[NT],
                                                float (&neg)[NT]) {
  int total;
  int at = done + chunk_starts(entry, lane, &total);
#pragma unroll
  for (int u = 0; u < kCodesPerLane; ++u) {
    for (uint64_t m = positive_mask(entry[u]); m != 0; m &= m - 1) {
      const uint32_t c = at + ((__ffsll(static_cast<long long>(m)) - 1) >> 1);
      if (c < static_cast<uint32_t>(width)) x.add(c, pos);
    }
    for (uint64_t m = negative_mask(entry[u]); m != 0; m &= m - 1) {
      const uint32_t c = at + ((__ffsll(static_cast<long long>(m)) - 1) >> 1);
      if (c < static_cast<uint32_t>(width)) x.add(c, neg);
    }
    at += phrase_length(entry[u]);
  }
  return total;
}

// Block b: column tile b % tiles, row group (b / tiles) % row_groups, matrix b / (tiles * row_groups)
// (grouped) or p.matrix. Warp w takes rows r0 + w, r0 + w + kWarps, ... of the group; for each it
// decodes its tile, forms pos_level * sum(x at +) - neg_level * sum(x at -) per token and reduces the
// lanes. The next row's first codewords are fetched while this row's dictionary entries are in flight.
template <int NT, bool kSmem>
__global__ void __launch_bounds__(kThreads, kMatvecBlocksPerSm) matvec_kernel(MatvecParams p) {
  extern __shared__ uint4 s_x_raw[];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(s_x_raw);
  const Image& im = p.im;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int t = static_cast<int>(blockIdx.x % im.tiles);
  const int64_t rest = blockIdx.x / im.tiles;
  const int group = static_cast<int>(rest % p.row_groups);
  int64_t tok_lo = 0, tok_hi = p.num_tokens;
  int m = p.matrix;
  if (p.offsets != nullptr) {
    m = static_cast<int>(rest / p.row_groups);
    tok_lo = min(max(static_cast<int64_t>(__ldg(p.offsets + m)), int64_t{0}), p.num_tokens);
    tok_hi = min(max(static_cast<int64_t>(__ldg(p.offsets + m + 1)), tok_lo), p.num_tokens);
  }
  if (tok_hi <= tok_lo) return;  // an expert without tokens reads none of its weights
  const int col0 = t * im.tile_cols;
  const int width = min(im.tile_cols, im.cols - col0);
  const int r0 = group * p.rows_per_block;
  const int r_end = min(r0 + p.rows_per_block, im.rows);
  // This warp's rows (at most 32: rows_per_block <= 32 * kWarps); lane k holds row k's codeword range.
  const int my_rows = r_end > r0 + warp ? (r_end - r0 - warp + kWarps - 1) / kWarps : 0;
  Range mine{0, 0};
  if (lane < my_rows) mine = tile_range(im, (static_cast<int64_t>(m) * im.rows + r0 + warp + lane * kWarps) * im.tiles + t);

  for (int64_t tok0 = tok_lo; tok0 < tok_hi; tok0 += NT) {
    const int ntok = static_cast<int>(min(static_cast<int64_t>(NT), tok_hi - tok0));
    const __nv_bfloat16* xg = p.x + tok0 * im.cols + col0;
    if constexpr (kSmem) {
      __syncthreads();  // the previous token group's window is no longer read
      // Coalesced reads of each token's row segment; padding tokens are zeros.
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        for (int c = threadIdx.x; c < width; c += kThreads) {
          xs[c * NT + j] = j < ntok ? xg[static_cast<int64_t>(j) * im.cols + c] : __float2bfloat16_rn(0.f);
        }
      }
      __syncthreads();
    }
    const XTile<NT, kSmem> x{xs, xg, im.cols, ntok};
    uint32_t next[kCodesPerLane];
    if (my_rows > 0) {
      fetch_codes(im, __shfl_sync(0xffffffffu, mine.lo, 0), __shfl_sync(0xffffffffu, mine.hi, 0), lane, next);
    }
    for (int k = 0; k < my_rows; ++k) {
      const int r = r0 + warp + k * kWarps;
      const uint32_t lo = __shfl_sync(0xffffffffu, mine.lo, k);
      const uint32_t hi = __shfl_sync(0xffffffffu, mine.hi, k);
      uint64_t entry[kCodesPerLane];
      expand(im, next, entry);
      if (k + 1 < my_rows) {
        fetch_codes(im, __shfl_sync(0xffffffffu, mine.lo, k + 1), __shfl_sync(0xffffffffu, mine.hi, k + 1), lane,
                    next);
      }
      float pos[NT], neg[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) pos[j] = neg[j] = 0.f;
      int done = accumulate_chunk(entry, lane, 0, width, x, pos, neg);
      for (int64_t base = int64_t{lo} + kChunk; base < hi && done < width; base += kChunk) {
        uint32_t code[kCodesPerLane];
        fetch_codes(im, base, hi, lane, code);
        expand(im, code, entry);
        done += accumulate_chunk(entry, lane, done, width, x, pos, neg);
      }
      const uint32_t pair = __ldg(im.levels + static_cast<int64_t>(m) * im.rows + r);
      const float plus = level(pair, 0), minus = level(pair, 1);
      float mine_value = 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float v = plus * pos[j] - minus * neg[j];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == j) mine_value = v;
      }
      if (lane < ntok) {
        const int64_t tok = tok0 + lane;
        if (im.tiles == 1) {
          p.y[tok * im.rows + r] = __float2bfloat16_rn(mine_value);
        } else {
          p.partial[(static_cast<int64_t>(t) * p.num_tokens + tok) * im.rows + r] = mine_value;
        }
      }
    }
  }
}

// y = the sum of the tiles' partial products in tile order, for the token rows in use.
__global__ void __launch_bounds__(kThreads) reduce_kernel(MatvecParams p) {
  const Image& im = p.im;
  int64_t tok_lo = 0, tok_hi = p.num_tokens;
  if (p.offsets != nullptr) {
    tok_lo = min(max(static_cast<int64_t>(__ldg(p.offsets)), int64_t{0}), p.num_tokens);
    tok_hi = min(max(static_cast<int64_t>(__ldg(p.offsets + p.matrices)), tok_lo), p.num_tokens);
  }
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t tok = i / im.rows;
  if (tok < tok_lo || tok >= tok_hi) return;
  const int64_t plane = p.num_tokens * im.rows;
  float sum = 0.f;
  for (int t = 0; t < im.tiles; ++t) sum += p.partial[t * plane + i];
  p.y[i] = __float2bfloat16_rn(sum);
}

template <int NT>
cudaError_t launch_matvec(const MatvecParams& p, int64_t blocks, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.im.tile_cols) * NT * sizeof(__nv_bfloat16);
  if (smem <= kMaxSmemX) {
    matvec_kernel<NT, true><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  } else {
    matvec_kernel<NT, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace moek

extern "C" int moek_cuda_subbit_decode(const moek_subbit_decode_args* a, cudaStream_t stream) {
  const moek::Image im = moek::image_of(a->weights);
  const int64_t tiles = static_cast<int64_t>(a->weights.matrices) * a->weights.rows * a->weights.tiles_per_row;
  const int64_t blocks = (tiles + moek::kWarps - 1) / moek::kWarps;
  moek::decode_kernel<<<static_cast<unsigned>(blocks), moek::kThreads, 0, stream>>>(
      im, static_cast<__nv_bfloat16*>(a->out), tiles);
  return cudaGetLastError();
}

// rows_per_block: a multiple of 8 in 8..256 (0: chosen here so that the matrices with tokens fill the
// GPU about four blocks per SM deep).
extern "C" int moek_cuda_subbit_matvec(const moek_subbit_matvec_args* a, int32_t rows_per_block,
                                       cudaStream_t stream) {
  if (a->num_tokens <= 0) return cudaSuccess;
  const moek_subbit_weights& w = a->weights;
  const bool grouped = a->expert_offsets != nullptr;
  if (rows_per_block <= 0) {
    int device = 0, sms = 132;
    if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    // Matrices that can have tokens: at most one per token.
    const int64_t active = grouped ? std::min<int64_t>(w.matrices, a->num_tokens) : 1;
    const int64_t per_matrix_blocks = std::max<int64_t>(1, 4 * static_cast<int64_t>(sms) / active);
    const int64_t work = static_cast<int64_t>(w.rows) * w.tiles_per_row;
    int64_t rpb = (work + per_matrix_blocks - 1) / per_matrix_blocks;
    rpb = std::min<int64_t>(256, std::max<int64_t>(8, (rpb + 7) / 8 * 8));
    rows_per_block = static_cast<int32_t>(rpb);
  }
  moek::MatvecParams p;
  p.im = moek::image_of(w);
  p.x = static_cast<const __nv_bfloat16*>(a->x);
  p.y = static_cast<__nv_bfloat16*>(a->y);
  p.partial = static_cast<float*>(a->workspace);
  p.offsets = a->expert_offsets;
  p.matrix = a->matrix;
  p.matrices = w.matrices;
  p.num_tokens = a->num_tokens;
  p.rows_per_block = rows_per_block;
  p.row_groups = (w.rows + rows_per_block - 1) / rows_per_block;
  const int64_t blocks = static_cast<int64_t>(grouped ? w.matrices : 1) * p.row_groups * w.tiles_per_row;
  const int64_t nt = std::min<int64_t>(a->num_tokens, MOEK_SUBBIT_MAX_TOKENS);
  cudaError_t err;
  if (nt <= 1) {
    err = moek::launch_matvec<1>(p, blocks, stream);
  } else if (nt <= 2) {
    err = moek::launch_matvec<2>(p, blocks, stream);
  } else if (nt <= 4) {
    err = moek::launch_matvec<4>(p, blocks, stream);
  } else {
    err = moek::launch_matvec<8>(p, blocks, stream);
  }
  if (err != cudaSuccess || w.tiles_per_row == 1) return err;
  const int64_t elements = a->num_tokens * w.rows;
  moek::reduce_kernel<<<static_cast<unsigned>((elements + moek::kThreads - 1) / moek::kThreads), moek::kThreads, 0,
                        stream>>>(p);
  return cudaGetLastError();
}
