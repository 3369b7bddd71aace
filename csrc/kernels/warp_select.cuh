// Warp-level building blocks of the top-k selections (router, rank top-k): the selection order as
// an integer key, and butterfly reductions. Framework-free device code (cuda_compat.cuh rules).
//
// Selection order of the contract (reference: torch.sort(key, descending=True, stable=True)):
// larger key first, equal keys -> lower id first, NaN above every number, -0.0 == +0.0. The fp32
// key is mapped to a uint32 whose unsigned order is that order (NaNs and zeros canonicalised
// first), so a selection compares (ordered key desc, id asc) with integer compares only and no
// float corner cases. Every key maps to >= ord(-inf) = 0x007fffff > 0, so 0 means "no candidate".
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_compat.cuh"

namespace molora::kernels {

__device__ __forceinline__ uint32_t float_bits(float v) {
#if defined(MOLORA_CUDA_EMULATION)
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
#else
  return __float_as_uint(v);  // the same bit copy, as a register move
#endif
}

__device__ __forceinline__ uint32_t ordered_key(float v) {
  if (v != v) return 0xffffffffu;  // NaN: above +inf, all NaNs equal (ties -> lower id)
  if (v == 0.0f) v = 0.0f;         // -0.0 == +0.0
  const uint32_t u = float_bits(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr uint32_t kNoKey = 0u;        // below every ordered_key
constexpr int32_t kNoId = 0x7fffffff;  // id of "no candidate"

// (key, id) comes after (lim_key, lim_id) in the selection order, i.e. is still selectable once
// (lim_key, lim_id) has been selected. The order is total (ids unique), so "after the previous
// pick" is exactly "not picked yet": no taken-marks needed.
__device__ __forceinline__ bool after(uint32_t key, int32_t id, uint32_t lim_key, int32_t lim_id) {
  return key < lim_key || (key == lim_key && id > lim_id);
}

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const uint32_t w = __shfl_xor_sync(kFullMask, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__device__ __forceinline__ int32_t warp_min_i32(int32_t v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const int32_t w = __shfl_xor_sync(kFullMask, v, o);
    v = w < v ? w : v;
  }
  return v;
}

// Butterfly reductions: every lane ends with the bitwise-same value (each step adds the same two
// operands on both partner lanes, and fp add is commutative), so results are warp-uniform.
__device__ __forceinline__ float warp_max_f(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum_f(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

}  // namespace molora::kernels
