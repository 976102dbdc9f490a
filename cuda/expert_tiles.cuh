// The grouped GEMM's tile scheduler: which expert and which rows an m-tile index stands for, computed by
// every CTA from the device-side offsets (contiguous layout) or counts (masked layout), so the host never
// needs the row counts. Corrupt offsets or counts are clamped: a tile's rows always lie inside the buffers.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace moek {

// Where each expert's rows are.
struct ExpertRows {
  const int32_t* offsets;  // contiguous: [E + 1], expert e owns rows offsets[e]..offsets[e+1]
  const int32_t* counts;   // masked: [E], expert e owns rows e*capacity .. e*capacity + counts[e]
  int64_t max_rows;        // contiguous: rows of the buffers; offsets are clamped to [0, max_rows]
  int32_t capacity;        // masked: rows per expert; counts are clamped to [0, capacity]
  int32_t num_experts;

  // First row and number of rows of expert e (0 rows when its offsets go backwards).
  __device__ __forceinline__ void rows(int e, int64_t& start, int32_t& count) const {
    if (counts != nullptr) {
      start = static_cast<int64_t>(e) * capacity;
      count = min(max(__ldg(counts + e), 0), capacity);
      return;
    }
    const int64_t lo = min(max(static_cast<int64_t>(__ldg(offsets + e)), int64_t{0}), max_rows);
    const int64_t hi = min(max(static_cast<int64_t>(__ldg(offsets + e + 1)), int64_t{0}), max_rows);
    start = lo;
    count = hi > lo ? static_cast<int32_t>(hi - lo) : 0;
  }
};

// Upper bound of the m-tiles of BM rows over all experts, from host-known sizes only: the grid's size.
__host__ __device__ inline int64_t m_tile_bound(const ExpertRows& r, int bm) {
  if (r.counts != nullptr) return static_cast<int64_t>(r.num_experts) * ((r.capacity + bm - 1) / bm);
  const int64_t by_rows = (r.max_rows + static_cast<int64_t>(r.num_experts) * (bm - 1)) / bm;
  return by_rows;
}

// The rows one m-tile covers.
struct MTile {
  int32_t expert;
  int64_t row0;  // first row of the tile (in A's and the output's row numbering)
  int32_t rows;  // 1..BM valid rows from row0
};

// Tile prefixes saturate here, beyond any grid's m-tile count (m_tile_bound < 2^28 for valid shapes),
// so corrupt offsets cannot overflow the scan.
constexpr int32_t kTileSaturation = (1 << 30) - 1;

__device__ __forceinline__ int32_t saturating_add(int32_t a, int32_t b) { return min(a + b, kTileSaturation); }

// prefix[e] = m-tiles (of BM rows) of experts 0..e-1, prefix[E] = their total; returned to every thread.
// All THREADS threads call it; it ends with a barrier.
template <int BM, int THREADS>
__device__ int32_t scan_m_tiles(const ExpertRows& r, int32_t* prefix) {
  constexpr int WARPS = THREADS / 32;
  __shared__ int32_t warp_sums[WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int E = r.num_experts;
  int32_t carry = 0;
  if (threadIdx.x == 0) prefix[0] = 0;
  for (int base = 0; base < E; base += THREADS) {
    const int e = base + threadIdx.x;
    int32_t v = 0;
    if (e < E) {
      int64_t start;
      int32_t count;
      r.rows(e, start, count);
      v = (count + BM - 1) / BM;
    }
    int32_t inclusive = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t up = __shfl_up_sync(0xffffffffu, inclusive, o);
      if (lane >= o) inclusive = saturating_add(inclusive, up);
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    int32_t before = 0, chunk_total = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      if (w < warp) before = saturating_add(before, warp_sums[w]);
      chunk_total = saturating_add(chunk_total, warp_sums[w]);
    }
    if (e < E) prefix[e + 1] = saturating_add(carry, saturating_add(before, inclusive));
    carry = saturating_add(carry, chunk_total);
    __syncthreads();  // warp_sums is rewritten by the next chunk; prefix is complete after the last
  }
  return carry;
}

// The expert and rows of m-tile `mt` (below prefix[E]) from a prefix scan_m_tiles wrote; reads
// `prefix` only, so a persistent kernel scans once and locates many tiles.
__device__ __forceinline__ MTile locate_m_tile(const ExpertRows& r, int bm, int32_t mt, const int32_t* prefix) {
  // The last expert whose first tile is at or before mt: it has a tile there (prefix[E] > mt).
  int lo = 0, hi = r.num_experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= mt) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  int64_t start;
  int32_t count;
  r.rows(lo, start, count);
  const int32_t local = mt - prefix[lo];
  MTile tile;
  tile.expert = lo;
  tile.row0 = start + static_cast<int64_t>(local) * bm;
  tile.rows = min(bm, count - local * bm);
  return tile;
}

// Finds the expert and rows of m-tile `mt`; false (the same in every thread) when the experts have fewer
// tiles. `prefix` is shared memory for E + 1 ints; called by all THREADS threads of the block, it ends
// with a barrier, after which `prefix` may be reused.
template <int BM, int THREADS>
__device__ bool find_m_tile(const ExpertRows& r, int32_t mt, int32_t* prefix, MTile& tile) {
  const int32_t total = scan_m_tiles<BM, THREADS>(r, prefix);
  if (mt >= total) return false;
  tile = locate_m_tile(r, BM, mt, prefix);
  __syncthreads();  // everyone has read prefix
  return true;
}

}  // namespace moek
