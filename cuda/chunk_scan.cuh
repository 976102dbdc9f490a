// Counting helpers: a block-wide scan (the plan's offsets, cuda/plan.cu) and, for routing's capacity pass
// (cuda/route.cu), a per-expert scan of per-chunk counts and a pair's rank among equal ids earlier in
// its chunk.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace moek {
namespace {

// Block-wide exclusive prefix sum of one value per thread (blockDim.x a multiple of 32, `s` at least
// 33 entries of shared memory): returns this thread's exclusive sum and adds the block's total to
// `carry` (same in every thread). Warps scan with shuffles; one warp scans the warp totals.
__device__ __forceinline__ int32_t block_exclusive_sum(int32_t* s, int32_t v, int32_t& carry) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  int32_t inclusive = v;
  for (int off = 1; off < 32; off <<= 1) {
    const int32_t up = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += up;
  }
  if (lane == 31) s[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int32_t total = lane < warps ? s[lane] : 0;
    int32_t scanned = total;
    for (int off = 1; off < 32; off <<= 1) {
      const int32_t up = __shfl_up_sync(0xffffffffu, scanned, off);
      if (lane >= off) scanned += up;
    }
    if (lane < warps) s[lane] = scanned - total;  // exclusive sum of the earlier warps' totals
    if (lane == 31) s[32] = scanned;              // the block's total (scanned over all 32 lanes)
  }
  __syncthreads();
  const int32_t exclusive = carry + s[warp] + inclusive - v;
  carry += s[32];
  __syncthreads();  // s is reused by the next call
  return exclusive;
}

// In place, one block (of 256 threads) per row of counts ([rows][num_chunks]): exclusive prefix sum
// along the row; the row's total goes to totals[row] when totals is not null.
__global__ void chunk_exclusive_scan_kernel(int32_t* counts, int64_t num_chunks, int32_t* totals) {
  __shared__ int32_t s[256];
  int32_t* c = counts + static_cast<int64_t>(blockIdx.x) * num_chunks;
  int32_t carry = 0;
  for (int64_t base = 0; base < num_chunks; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int32_t sum = block_exclusive_sum(s, i < num_chunks ? c[i] : 0, carry);
    if (i < num_chunks) c[i] = sum;
  }
  if (totals != nullptr && threadIdx.x == 0) totals[blockIdx.x] = carry;
}

// How many of the first `n` entries of the shared array `s` equal v: a pair's rank among the pairs of
// the same expert earlier in its chunk (the order that makes plans deterministic).
__device__ __forceinline__ int32_t count_equal_before(const int32_t* s, int n, int32_t v) {
  int32_t r = 0;
  for (int j = 0; j < n; ++j) r += s[j] == v;
  return r;
}

}  // namespace
}  // namespace moek
