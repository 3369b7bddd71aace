// Device-side portability layer of the CUDA kernels (csrc/kernels/*.cuh).
//
// The kernels are compiled twice from the same source:
//   - by nvcc, for the GPU (csrc/cuda/*.cu, into molora_ops._C with a CUDA torch, or compile-only
//     for sm_90/sm_80 in CI);
//   - by the host C++ compiler with MOLORA_CUDA_EMULATION defined, into the test-only module
//     molora_ops._C_emu (csrc/emu/): every CUDA thread of a block is a host thread, __syncthreads
//     and the warp intrinsics are barriers, blocks run one after another. CI has no GPU; this is
//     how the kernels' logic (indexing, reductions, scans, tie-breaking, ragged edges) is tested
//     there against the reference.
//
// What a kernel may use, so that both compilations agree (csrc/emu/cuda_emu.h implements it):
//   threadIdx, blockIdx, blockDim, gridDim, dim3, warpSize; __global__, __device__, __host__,
//   __forceinline__, __restrict__; static `__shared__ T name[N];` arrays declared in the kernel
//   body; dynamic shared memory only through MOLORA_DYNAMIC_SMEM(type, name);
//   __syncthreads, __syncwarp; __shfl_sync, __shfl_xor_sync, __shfl_up_sync, __shfl_down_sync,
//   __ballot_sync, __any_sync, __all_sync, __match_any_sync, all with the FULL mask
//   (kFullMask) and every lane of the warp present; __popc, __popcll, __ffs, __clz;
//   atomicAdd / atomicMax / atomicMin / atomicCAS / atomicExch on int32, uint32, uint64, float;
//   __threadfence, __threadfence_block; __ldg; the <cmath>/<cfloat> float and double functions
//   (expf, logf, fmaxf, ...) plus __expf, __logf, __fdividef; printf; MOLORA_DEVICE_ASSERT.
// Element types are template parameters (float, c10::Half, c10::BFloat16 from the launchers);
// convert with static_cast<float>(x) / static_cast<T>(f).
// Not allowed: cub / cooperative groups, inline PTX, partial masks or warp-synchronous code that
// relies on implicit lockstep (use __syncwarp), a block waiting on another block (spin-waits on
// flags: in emulation blocks run sequentially, so that deadlocks; split phases into launches),
// block sizes that are not a multiple of 32.
#pragma once

#include <cstdint>

#if defined(MOLORA_CUDA_EMULATION)
#include "../emu/cuda_emu.h"
#else
#include <cuda_runtime.h>

#include <cstdio>

// kernel<<<grid, block, smem, stream>>>(args...). `kernel` is a function name or a pointer to a
// __global__ function (write `auto* k = &my_kernel<float, 4>;` for templates with commas).
#define MOLORA_LAUNCH(grid, block, smem, stream, kernel, ...) \
  (kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)

// `type* name` pointing at the block's dynamic shared memory (16-byte aligned).
#define MOLORA_DYNAMIC_SMEM(type, name)                                    \
  extern __shared__ __align__(16) unsigned char molora_dynamic_smem_raw[]; \
  type* name = reinterpret_cast<type*>(molora_dynamic_smem_raw)

// A violated device-side invariant (an index out of range that the host could not check, e.g.
// while capturing a CUDA graph) stops the kernel with an error instead of touching memory out of
// bounds. Code after a failed assert does not run (in emulation the thread stops as well).
#define MOLORA_DEVICE_ASSERT(cond, msg)                                                    \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      printf("molora device assert failed: %s [%s] (%s:%d)\n", msg, #cond, __FILE__,      \
             __LINE__);                                                                   \
      __trap();                                                                           \
    }                                                                                     \
  } while (0)
#endif

namespace molora::kernels {
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// 16-byte vector of N elements of T, for vectorised loads/stores (host checks the alignment).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
}  // namespace molora::kernels
