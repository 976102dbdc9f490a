// The sub-1-bit device image as the kernels read it (src/subbit/image.rs writes it): typed section
// pointers, a tile's clamped codeword range, a dictionary entry as a phrase, a row's levels, and codeword
// k of an aligned group of 8. Shared by the decode and matvec kernels (subbit.cu) and the fused decode +
// grouped GEMM (subbit_gemm.cu), which must all read the image the same way.
//
// A dictionary entry is two 32-bit masks over the phrase's slots: `nonzero` and `sign` (with an end
// marker at slot `length` in `sign` where `nonzero` is clear). The kernels walk a phrase's nonzeros with
// find-first-set, a handful of integer instructions each, and never touch its zeros.
#pragma once

#include <cstdint>
#include <cuda_fp16.h>

#include "moe_kernels.h"

namespace moek {
namespace {

constexpr int kMaxPhrase = 32;
// A phrase of length 0: no codeword (past a tile's range).
constexpr uint64_t kNoPhrase = 1ull << 32;
// Columns between two restarts of a tile in the image (src/subbit/image.rs RESTART_COLS).
constexpr int kRestartCols = 256;

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

// A phrase as the loops use it: the nonzero slots not yet consumed, the signs, the length.
struct Phrase {
  uint32_t nonzero, sign;
  int length;
};
__device__ __forceinline__ Phrase phrase_of(uint64_t e) {
  Phrase p;
  p.nonzero = static_cast<uint32_t>(e);
  p.sign = static_cast<uint32_t>(e >> 32);
  const uint32_t end = p.sign & ~p.nonzero;
  p.length = end != 0 ? __ffs(end) - 1 : kMaxPhrase;
  return p;
}

__device__ __forceinline__ float level(uint32_t pair, int which) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(which == 0 ? pair & 0xffff : pair >> 16)));
}

// Codeword k (0..7) of an aligned group of 8.
__device__ __forceinline__ uint32_t pick(const uint4& g, uint32_t k) {
  const uint32_t w = (k & 4) ? ((k & 2) ? g.w : g.z) : ((k & 2) ? g.y : g.x);
  return (k & 1) ? (w >> 16) : (w & 0xffffu);
}

}  // namespace
}  // namespace moek
