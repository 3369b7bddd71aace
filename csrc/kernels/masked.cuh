// Rank-wise masked-activation kernels on the GPU: rank top-k (SMoRA / FlyLoRA rank selection with
// the balancing bias), id histogram (rank usage / tokens per expert), rank scatter (the backward of
// rank_topk's value gather).
// Framework-free device code: raw pointers and sizes (csrc/kernels/cuda_compat.cuh lists what a
// kernel may use).
#pragma once


#include "cuda_compat.cuh"
#include "warp_select.cuh"

namespace molora::kernels {

// ------------------------------------------------------------------------------------------------
// rank_topk
//
// Selection order (ordered uint32 keys, ties -> lower id; NaN largest, -0 == +0) and the warp
// reductions: warp_select.cuh.
// ------------------------------------------------------------------------------------------------

template <typename src_t>
__device__ __forceinline__ uint32_t rank_key(const src_t* __restrict__ row, int64_t col_stride,
                                             const float* __restrict__ bias, int32_t c,
                                             bool use_abs) {
  float v = static_cast<float>(row[c * col_stride]);
  if (bias != nullptr) v += bias[c];  // fp32 add, as the reference (key in opmath + bias)
  if (use_abs) v = fabsf(v);
  return ordered_key(v);
}

// One warp per token row, rows grid-strided over the warps of the grid.
//   key[c] = ordered(|(src[t, c] + bias[c])|?) with src = scores if given else h (the launcher
//   passes the key source as `src`, `h` only for the value gather).
//   Lane l owns the columns c = i * 32 + l. NPL > 0: its keys live in NPL registers (R <= 32 *
//   NPL; fully unrolled so the array stays in registers). NPL == 0: any R, keys re-read from
//   global memory (L1/L2-resident after the first pass) on every rescan.
//   Each lane caches its best remaining candidate (largest key, lowest id). k rounds: warp max of
//   the cached keys (5 shuffles); the lanes holding that key are found by a ballot: one lane ->
//   its id by one shuffle (the usual case), several (a tie across lanes) -> warp min of their ids
//   (5 shuffles), i.e. the lower id wins as in the reference. Only the winning lane rescans its
//   columns, for the best candidate that comes after the winner in the order (no "taken" marks:
//   the order is total, so "after the previous pick" is exactly "not yet picked").
//   Round j's id is parked in lane j % 32 and every 32 rounds (and at the end) the warp writes 32
//   ids and the 32 gathered values with coalesced stores.
// Cost per row: R/32 loads per lane, then k * (~7-12 shuffles + one lane's NPL-long rescan).
// NOTE: untuned. For SMoRA/FlyLoRA sizes (R <= 64, k = 8) the shuffle rounds, not the
// R * 2-byte row read, should bound it (estimate ~80 shuffles per row vs 128 bytes).
template <typename scalar_t, typename src_t, int NPL>
__global__ void rank_topk_kernel(const scalar_t* __restrict__ h, int64_t h_row_stride,
                                 int64_t h_col_stride, const src_t* __restrict__ src,
                                 int64_t src_row_stride, int64_t src_col_stride,
                                 const float* __restrict__ bias, int64_t T, int32_t R, int32_t k,
                                 bool use_abs, scalar_t* __restrict__ values,
                                 int32_t* __restrict__ ids) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
       t < T; t += warp_stride) {
    const src_t* row = src + t * src_row_stride;
    uint32_t keys[NPL > 0 ? NPL : 1];
    if constexpr (NPL > 0) {
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int32_t c = i * kWarpSize + lane;
        keys[i] = c < R ? rank_key(row, src_col_stride, bias, c, use_abs) : kNoKey;
      }
    }
    // Best candidate of this lane among its columns that come after (lim_key, lim_id).
    uint32_t best_key = kNoKey;
    int32_t best_id = kNoId;
    auto rescan = [&](uint32_t lim_key, int32_t lim_id) {
      best_key = kNoKey;
      best_id = kNoId;
      if constexpr (NPL > 0) {
#pragma unroll
        for (int i = 0; i < NPL; ++i) {
          const int32_t c = i * kWarpSize + lane;
          // strict '>' keeps the lowest id among this lane's equal keys (ascending scan)
          if (c < R && keys[i] > best_key && after(keys[i], c, lim_key, lim_id)) {
            best_key = keys[i];
            best_id = c;
          }
        }
      } else {
        for (int32_t c = lane; c < R; c += kWarpSize) {
          const uint32_t kc = rank_key(row, src_col_stride, bias, c, use_abs);
          if (kc > best_key && after(kc, c, lim_key, lim_id)) {
            best_key = kc;
            best_id = c;
          }
        }
      }
    };
    rescan(0xffffffffu, -1);  // everything comes after (max key, id -1)

    const scalar_t* hrow = h + t * h_row_stride;
    scalar_t* vrow = values + t * k;
    int32_t* irow = ids + t * k;
    int32_t parked = 0;
    for (int32_t j = 0; j < k; ++j) {
      const uint32_t win_key = warp_max_u32(best_key);
      const unsigned holders = __ballot_sync(kFullMask, best_key == win_key);
      int32_t win_id;
      if (__popc(holders) == 1) {  // warp-uniform branch
        win_id = __shfl_sync(kFullMask, best_id, __ffs(static_cast<int>(holders)) - 1);
      } else {
        win_id = warp_min_i32(best_key == win_key ? best_id : kNoId);
      }
      MOLORA_DEVICE_ASSERT(win_key != kNoKey && win_id >= 0 && win_id < R,
                           "rank_topk: ran out of candidates (k > R?)");
      if (best_id == win_id) rescan(win_key, win_id);  // ids are unique: the winner lane only
      const int slot = j & (kWarpSize - 1);
      if (slot == lane) parked = win_id;
      if (slot == kWarpSize - 1 || j == k - 1) {
        const int32_t base = j - slot;
        if (lane <= slot) {
          irow[base + lane] = parked;
          vrow[base + lane] = hrow[parked * h_col_stride];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// id_histogram
// ------------------------------------------------------------------------------------------------

// counts[b] += #{i : ids[i] == b}; ids of -1 are skipped (counts zeroed by the launcher).
// copies > 0: the block keeps `copies` private sub-histograms of num_bins int32 in dynamic shared
// memory (copies * num_bins * 4 bytes), warp w counting into copy w % copies, so warps of a block
// do not contend on the same shared counter (rank ids of popular ranks: r = 64 bins, T * k ids);
// then one global atomic per non-empty bin per block. copies == 0: global atomics only (bins too
// many for shared memory). NOTE: untuned.
template <typename index_t>
__global__ void id_histogram_kernel(const index_t* __restrict__ ids, int64_t n, int32_t num_bins,
                                    int32_t copies, int32_t* __restrict__ counts) {
  MOLORA_DYNAMIC_SMEM(int32_t, local);
  const bool use_shared = copies > 0;
  if (use_shared) {
    const int32_t total = copies * num_bins;
    for (int32_t b = threadIdx.x; b < total; b += blockDim.x) local[b] = 0;
    __syncthreads();
  }
  int32_t* mine =
      use_shared ? local + static_cast<int32_t>((threadIdx.x / kWarpSize) % copies) * num_bins
                 : counts;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    MOLORA_DEVICE_ASSERT(id >= -1 && id < num_bins, "id_histogram: id outside [-1, num_bins)");
    if (id < 0) continue;
    atomicAdd(&mine[id], 1);
  }
  if (use_shared) {
    __syncthreads();
    for (int32_t b = threadIdx.x; b < num_bins; b += blockDim.x) {
      int32_t sum = 0;
      for (int32_t c = 0; c < copies; ++c) sum += local[c * num_bins + b];
      if (sum != 0) atomicAdd(&counts[b], sum);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// rank_scatter: out[t, r] = sum_j [ids[t, j] == r] * src[t, j] (the h-gradient of rank_topk)
// ------------------------------------------------------------------------------------------------

// One warp per token row (grid-strided). Every element of out is written exactly once (zeros
// included: no memset pass, no atomics, deterministic): lane l builds columns c = l, l + 32, ...
// by scanning the row's k (id, src) pairs, which the warp first loads into registers 32 at a time
// and broadcasts by shuffle. Duplicate ids in a row add up in slot order, in fp32 (as the
// reference's accumulate in opmath). Writes are coalesced along the row.
// Cost per row: R writes + R/32 * k shuffle-compares per lane. NOTE: untuned; for
// R = 64, k = 8 the R-wide store dominates.
template <typename scalar_t, typename index_t>
__global__ void rank_scatter_kernel(const scalar_t* __restrict__ src, int64_t src_row_stride,
                                    int64_t src_col_stride, const index_t* __restrict__ ids,
                                    int64_t ids_row_stride, int64_t ids_col_stride, int64_t T,
                                    int32_t k, int32_t R, scalar_t* __restrict__ out) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
       t < T; t += warp_stride) {
    scalar_t* orow = out + t * R;
    for (int32_t c0 = 0; c0 < R; c0 += kWarpSize) {
      const int32_t c = c0 + lane;
      float acc = 0.0f;
      for (int32_t j0 = 0; j0 < k; j0 += kWarpSize) {
        const int32_t j = j0 + lane;
        int32_t my_id = -1;
        float my_val = 0.0f;
        if (j < k) {
          my_id = static_cast<int32_t>(ids[t * ids_row_stride + j * ids_col_stride]);
          MOLORA_DEVICE_ASSERT(my_id >= -1 && my_id < R, "rank_scatter: id outside [-1, R)");
          my_val = static_cast<float>(src[t * src_row_stride + j * src_col_stride]);
        }
        const int32_t n = k - j0 < kWarpSize ? k - j0 : kWarpSize;
        for (int32_t s = 0; s < n; ++s) {  // warp-uniform trip count
          const int32_t id = __shfl_sync(kFullMask, my_id, s);
          const float v = __shfl_sync(kFullMask, my_val, s);
          if (id == c) acc += v;
        }
      }
      if (c < R) orow[c] = static_cast<scalar_t>(acc);
    }
  }
}

}  // namespace molora::kernels
