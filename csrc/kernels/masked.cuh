// Id histogram on the GPU: per-block shared-memory counts, then one global atomic per bin and
// block. Framework-free device code.
#pragma once

#include <cstdint>

namespace molora::kernels {

// counts[b] += #{i : ids[i] == b}; ids of -1 are skipped. Launch with num_bins * 4 bytes of
// dynamic shared memory when num_bins fits, else use_shared = false (global atomics only).
template <typename index_t>
__global__ void id_histogram_kernel(const index_t* __restrict__ ids, int64_t n, int32_t num_bins,
                                    bool use_shared, int32_t* __restrict__ counts) {
  extern __shared__ int32_t local[];
  if (use_shared) {
    for (int32_t b = threadIdx.x; b < num_bins; b += blockDim.x) local[b] = 0;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    if (id < 0) continue;
    atomicAdd(use_shared ? &local[id] : &counts[id], 1);
  }
  if (use_shared) {
    __syncthreads();
    for (int32_t b = threadIdx.x; b < num_bins; b += blockDim.x)
      if (local[b] != 0) atomicAdd(&counts[b], local[b]);
  }
}

}  // namespace molora::kernels
