// Counting helpers of the permutation plan: count (expert, chunk of 256 pairs) occurrences, scan the
// counts per expert, then place each pair at its expert's count in earlier chunks plus its rank among
// equal ids earlier in its own chunk. (Routing's capacity pass in route.cu does the same with its own
// copy, measured on the GPU before this header existed; fold it in once both run there again.)
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace moek {
namespace {

// Block-wide exclusive prefix sum of one value per thread (Hillis-Steele in `s`, blockDim.x entries);
// returns this thread's exclusive sum and adds the block's total to `carry` (same in every thread).
__device__ __forceinline__ int32_t block_exclusive_sum(int32_t* s, int32_t v, int32_t& carry) {
  s[threadIdx.x] = v;
  __syncthreads();
  for (int off = 1; off < blockDim.x; off <<= 1) {
    const int32_t add = threadIdx.x >= off ? s[threadIdx.x - off] : 0;
    __syncthreads();
    s[threadIdx.x] += add;
    __syncthreads();
  }
  const int32_t exclusive = carry + s[threadIdx.x] - v;
  carry += s[blockDim.x - 1];
  __syncthreads();
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
