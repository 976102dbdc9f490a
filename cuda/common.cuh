// Device helpers shared by the kernel families: element conversion, vector loads, ordered keys and
// warp-level reductions.
#pragma once

#include <atomic>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace moek {

// Host side: attribute Attr of the current device, asked once per device and process (launchers read
// it on every call); 0 when it cannot be asked. Never synchronises, so it may run during graph capture.
template <cudaDeviceAttr Attr>
int current_device_attribute() {
  static std::atomic<int> cache[64];  // per device: 0 unknown, else the value + 1
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  int known = cache[device].load(std::memory_order_relaxed);
  if (known == 0) {
    int value = 0;
    if (cudaDeviceGetAttribute(&value, Attr, device) != cudaSuccess) return 0;
    known = value + 1;
    cache[device].store(known, std::memory_order_relaxed);
  }
  return known - 1;
}

// Host side: lets `kernel` launch with as much dynamic shared memory as the current device allows a
// block (the opt-in limit less the kernel's static shared memory). Always that one value, never a
// call's own size: the attribute belongs to the function, process-wide, so per-call sizes raced
// between host threads (one thread lowered it between another's set and launch, whose launch then
// failed with cudaErrorInvalidValue: seen in grouped_gemm_gpu's parallel tests on the H200). No stream
// work, so it may run during graph capture.
template <typename Kernel>
cudaError_t allow_max_dynamic_smem(Kernel* kernel) {
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  const int optin = current_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>();
  if (optin <= static_cast<int>(attr.sharedSizeBytes)) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              optin - static_cast<int>(attr.sharedSizeBytes));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Loads VEC consecutive elements of T starting at p (which must be aligned to VEC * sizeof(T)) as
// floats, in one vector load of VEC * sizeof(T) bytes.
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* p, float (&out)[VEC]) {
  constexpr int BYTES = VEC * sizeof(T);
  static_assert(BYTES == 2 || BYTES == 4 || BYTES == 8 || BYTES == 16, "vector width");
  using Word = typename std::conditional<BYTES == 16, uint4,
               typename std::conditional<BYTES == 8, uint2,
               typename std::conditional<BYTES == 4, uint32_t, uint16_t>::type>::type>::type;
  Word w = __ldg(reinterpret_cast<const Word*>(p));
  const T* elems = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = to_float(elems[v]);
}

// 16-byte vectors of T: VEC elements each.
template <typename T>
struct Vec16 {
  static constexpr int VEC = 16 / sizeof(T);
  __device__ __forceinline__ static void unpack(const uint4& w, float (&out)[VEC]) {
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  }
  __device__ __forceinline__ static uint4 pack(const float (&in)[VEC]) {
    uint4 w;
    T* e = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(in[i]);
    return w;
  }
};

constexpr float kLog2e = 1.4426950408889634f;

// 2^x by the hardware approximation (relative error about 2^-22; flushes subnormal results to 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Maps a float to an unsigned integer with the same order (for non-NaN values), so that selections
// can compare integers. 0 is never produced for a real value: it marks "no candidate".
__device__ __forceinline__ uint32_t ordered_key(float f) {
  uint32_t b = __float_as_uint(f);
  uint32_t k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return k == 0 ? 1u : k;
}

// Inverse of ordered_key (exact for every key it produced from a non-NaN float).
__device__ __forceinline__ float key_to_float(uint32_t k) {
  uint32_t b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  return __uint_as_float(b);
}

// A candidate as one 64-bit word: key in the high half, the bitwise NOT of the index in the low half.
// The maximum of packed candidates is the highest key, ties going to the lowest index; every packed
// value is distinct because indices are.
__device__ __forceinline__ uint64_t pack_candidate(uint32_t key, uint32_t index) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~index);
}
__device__ __forceinline__ uint32_t candidate_index(uint64_t c) { return ~static_cast<uint32_t>(c); }
__device__ __forceinline__ uint32_t candidate_key(uint64_t c) { return static_cast<uint32_t>(c >> 32); }

// A token's group of W consecutive lanes (W a power of two <= 32, groups aligned in the warp).
// Shuffles and warp barriers name only the group's lanes, so different groups of one warp may take
// different branches.
template <int W>
struct LaneGroup {
  static_assert(W >= 1 && W <= 32 && (W & (W - 1)) == 0, "a power of two up to 32");
  static constexpr int width = W;  // lanes in the group
  int rank;                        // this lane's index inside the group
  int first;                       // warp lane of the group's lane 0
  unsigned mask;                   // the group's lanes

  __device__ __forceinline__ LaneGroup() {
    const int lane = threadIdx.x & 31;
    rank = lane & (W - 1);
    first = lane & ~(W - 1);
    mask = (W == 32) ? 0xffffffffu : (((1u << W) - 1u) << first);
  }
  template <typename T>
  __device__ __forceinline__ T xor_shuffle(T v, int offset) const { return __shfl_xor_sync(mask, v, offset); }
  // The value of `v` held by the group's lane `src`.
  template <typename T>
  __device__ __forceinline__ T broadcast(T v, int src) const { return __shfl_sync(mask, v, first + src); }
  __device__ __forceinline__ void sync() const { __syncwarp(mask); }

  // Group-wide reductions; every lane of the group gets the result, bit-identical in every lane
  // (each butterfly step combines the same two values in both partners).
  template <typename T>
  __device__ __forceinline__ T max(T v) const {
    for (int o = 1; o < W; o <<= 1) {
      const T other = xor_shuffle(v, o);
      v = other > v ? other : v;
    }
    return v;
  }
  template <typename T>
  __device__ __forceinline__ T min(T v) const {
    for (int o = 1; o < W; o <<= 1) {
      const T other = xor_shuffle(v, o);
      v = other < v ? other : v;
    }
    return v;
  }
  __device__ __forceinline__ float sum(float v) const {
    for (int o = 1; o < W; o <<= 1) v += xor_shuffle(v, o);
    return v;
  }
  // Exclusive prefix sum over the group's lanes.
  __device__ __forceinline__ int exclusive_sum(int v) const {
    int inclusive = v;
    for (int o = 1; o < W; o <<= 1) {
      const int up = __shfl_up_sync(mask, inclusive, o, W);
      if (rank >= o) inclusive += up;
    }
    return inclusive - v;
  }
};

}  // namespace moek
