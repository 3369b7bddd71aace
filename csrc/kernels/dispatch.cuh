// Token-dispatch kernels on the GPU: dispatch (histogram + exclusive scan + stable scatter of the
// (token, slot) pairs into expert order), the row gather into that layout, the weighted combine
// back to tokens and pair_dot (the routing-weight gradient of both).
// Framework-free device code: raw pointers, strides and sizes (csrc/kernels/cuda_compat.cuh lists
// what a kernel may use). Launchers: csrc/cuda/dispatch.cu. Contract: molora_ops/reference/
// dispatch.py (and the CPU kernels csrc/kernels/dispatch_cpu.h).
//
// Layout (int32): order [P] holds the flat pair p = t*k + j of every row of the expert-ordered
// layout (-1 = padding row), pos [T, k] the row of every pair (-1 = dropped pair, id -1),
// expert_offsets [E+1] the segment starts; each expert's segment is padded to a multiple of
// block_size; P = T*k (+ E*(block_size-1) when block_size > 1). Stable: within an expert, rows
// are in ascending pair index.
#pragma once

#include "cuda_compat.cuh"

namespace molora::kernels {

// ================================================================================================
// dispatch: three launches, no host synchronisation, fixed-size outputs (CUDA-graph safe).
//
// The pairs are cut into n_chunks chunks of `chunk` consecutive pairs, one block per chunk.
// A workspace counts [E][n_chunks] (int32, expert-major) holds
//   after 1. dispatch_count_kernel:      counts[e][c] = #pairs of chunk c with id e;
//   after 2. dispatch_chunk_scan_kernel: counts[e][c] = #pairs of expert e in chunks < c
//                                        (exclusive scan along the chunks), totals[e] = #pairs
//                                        of expert e;
//   3. dispatch_scatter_kernel: every block scans the padded totals over the experts itself (so no
//      fourth launch: E int32 reads per block), giving expert_offsets (written by block 0) and its
//      chunk's first row per expert, cursor[e] = expert_offsets[e] + counts[e][c]; it fills the
//      padding rows of order with -1, then scatters its chunk: the pairs of a tile of blockDim
//      pairs are ranked among equal ids (warp: __match_any_sync + popc of the lower lanes; across
//      the block's warps: the warps take their rows from cursor one after another, in warp order),
//      so rows follow pair order within a tile, tiles are visited in order and chunks get their
//      rows in chunk order: the layout is stable, as the reference.
// The per-expert counters live in shared memory (E * 4 bytes, E <= the launcher's limit) or, for
// more experts, in the block's column of the workspace in global memory (same code, a stride).
// Every id is checked (MOLORA_DEVICE_ASSERT) to lie in [-1, E): the host range check is skipped
// while a CUDA graph is captured.
// ================================================================================================

// Expert id of pair p (p = t*k + j) of ids [T, k] with strides (s0, s1).
template <typename index_t>
__device__ __forceinline__ int32_t dispatch_load_id(const index_t* __restrict__ ids, int64_t p,
                                                    int32_t k, int64_t s0, int64_t s1,
                                                    bool contiguous, int32_t E) {
  const int64_t off = contiguous ? p : (p / k) * s0 + (p % k) * s1;
  const int64_t id = static_cast<int64_t>(ids[off]);
  MOLORA_DEVICE_ASSERT(id >= -1 && id < E, "dispatch: expert id outside [-1, num_experts)");
  return static_cast<int32_t>(id);
}

// Pass 1: counts[e][c] = #{p in chunk c : id[p] == e}. Block c, any blockDim (multiple of 32).
// Counters in dynamic shared memory when smem_counters (E int32), otherwise the block's column
// of counts in global memory (zeroed here first: no memset launch). A warp adds each distinct id
// of its 32 pairs once (__match_any_sync: the lowest lane of each group adds the group's size),
// so "all tokens on one expert" costs one atomic per warp, not 32.
template <typename index_t>
__global__ void dispatch_count_kernel(const index_t* __restrict__ ids, int64_t s0, int64_t s1,
                                      bool contiguous, int32_t k, int64_t n, int32_t E,
                                      int64_t chunk, int32_t n_chunks, bool smem_counters,
                                      int32_t* __restrict__ counts) {
  MOLORA_DYNAMIC_SMEM(int32_t, local);
  const int32_t c = static_cast<int32_t>(blockIdx.x);
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  int32_t* cnt = smem_counters ? local : counts + c;
  const int64_t cs = smem_counters ? 1 : n_chunks;  // stride between experts in cnt
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) cnt[e * cs] = 0;
  __syncthreads();
  const int64_t p0 = static_cast<int64_t>(c) * chunk;
  const int64_t p1 = p0 + chunk < n ? p0 + chunk : n;
  for (int64_t base = p0; base < p1; base += blockDim.x) {  // block-uniform trip count
    const int64_t p = base + threadIdx.x;
    const int32_t id = p < p1 ? dispatch_load_id(ids, p, k, s0, s1, contiguous, E) : -1;
    const unsigned peers = __match_any_sync(kFullMask, id);
    if (id >= 0 && lane == __ffs(static_cast<int>(peers)) - 1)
      atomicAdd(&cnt[id * cs], static_cast<int32_t>(__popc(peers)));
  }
  if (smem_counters) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) counts[e * n_chunks + c] = local[e];
  }
}

// Pass 2: counts[e][:] <- its exclusive scan along the chunks, totals[e] <- its sum. Each expert
// gets `seg` consecutive lanes (seg a power of two <= 32; the launcher picks seg >= n_chunks up to
// 32), which walk its chunks seg at a time (coalesced: counts is expert-major) with a segmented
// shuffle scan; a warp handles 32 / seg experts. No block barrier in this kernel.
__global__ void dispatch_chunk_scan_kernel(int32_t* __restrict__ counts, int32_t n_chunks,
                                           int32_t E, int32_t seg,
                                           int32_t* __restrict__ totals) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int64_t experts_per_warp = kWarpSize / seg;
  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) +
                      threadIdx.x / kWarpSize) * experts_per_warp;
  if (e0 >= E) return;  // the whole warp
  const int64_t e = e0 + lane / seg;
  const int sub = lane & (seg - 1);
  const bool valid = e < E;
  int32_t* row = counts + e * n_chunks;
  int32_t carry = 0;
  for (int32_t c0 = 0; c0 < n_chunks; c0 += seg) {  // warp-uniform trip count
    const int32_t c = c0 + sub;
    const bool in = valid && c < n_chunks;
    const int32_t v = in ? row[c] : 0;
    int32_t incl = v;
    for (int o = 1; o < seg; o <<= 1) {
      const int32_t u = __shfl_up_sync(kFullMask, incl, o, seg);
      if (sub >= o) incl += u;
    }
    if (in) row[c] = carry + incl - v;
    carry += __shfl_sync(kFullMask, incl, seg - 1, seg);
  }
  if (valid && sub == 0) totals[e] = carry;
}

// Pass 3: block c scatters chunk c (see the overview above). blockDim <= 1024.
template <typename index_t>
__global__ void dispatch_scatter_kernel(const index_t* __restrict__ ids, int64_t s0, int64_t s1,
                                        bool contiguous, int32_t k, int64_t n, int32_t E,
                                        int64_t chunk, int32_t n_chunks, int32_t block_size,
                                        int64_t P, bool smem_counters,
                                        int32_t* __restrict__ counts,
                                        const int32_t* __restrict__ totals,
                                        int32_t* __restrict__ order, int32_t* __restrict__ pos,
                                        int32_t* __restrict__ expert_offsets) {
  MOLORA_DYNAMIC_SMEM(int32_t, local);
  __shared__ int32_t warp_sums[kWarpSize];
  const int32_t c = static_cast<int32_t>(blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & (kWarpSize - 1);
  const int warp = tid / kWarpSize;
  const int n_warps = static_cast<int>(blockDim.x) / kWarpSize;
  int32_t* cursor = smem_counters ? local : counts + c;
  const int64_t cs = smem_counters ? 1 : n_chunks;

  // --- expert offsets: exclusive scan of the padded segment lengths, blockDim experts a tile ---
  int32_t carry = 0;  // rows of the experts of the previous tiles (block-uniform)
  for (int64_t e0 = 0; e0 < E; e0 += blockDim.x) {
    const int64_t e = e0 + tid;
    int32_t total = 0, padded = 0;
    if (e < E) {
      total = totals[e];
      // total + block_size - 1 <= T*k + E*(block_size-1) = P <= INT32_MAX (checked on the host)
      padded = (total + block_size - 1) / block_size * block_size;
    }
    int32_t incl = padded;
#pragma unroll
    for (int o = 1; o < kWarpSize; o <<= 1) {
      const int32_t u = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += u;
    }
    if (lane == kWarpSize - 1) warp_sums[warp] = incl;
    __syncthreads();
    int32_t before = carry, tile_sum = 0;
    for (int w = 0; w < n_warps; ++w) {
      if (w < warp) before += warp_sums[w];
      tile_sum += warp_sums[w];
    }
    __syncthreads();  // warp_sums is rewritten by the next tile
    carry += tile_sum;
    if (e < E) {
      const int32_t start = before + incl - padded;
      cursor[e * cs] = start + counts[e * n_chunks + c];  // global counters: same address
      if (c == 0) expert_offsets[e] = start;
      if (e % gridDim.x == c)  // padding rows, each expert by one block
        for (int32_t r = start + total; r < start + padded; ++r) order[r] = -1;
    }
  }
  if (c == 0 && tid == 0) expert_offsets[E] = carry;
  // Rows after the last segment (pairs dropped with id -1) are padding too.
  for (int64_t r = carry + static_cast<int64_t>(c) * blockDim.x + tid; r < P;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x)
    order[r] = -1;
  __syncthreads();  // cursor complete

  // --- stable scatter of the chunk, blockDim pairs a tile ---
  const int64_t p0 = static_cast<int64_t>(c) * chunk;
  const int64_t p1 = p0 + chunk < n ? p0 + chunk : n;
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int64_t base = p0; base < p1; base += blockDim.x) {  // block-uniform trip count
    const int64_t p = base + tid;
    const bool in_chunk = p < p1;
    const int32_t id = in_chunk ? dispatch_load_id(ids, p, k, s0, s1, contiguous, E) : -1;
    const unsigned peers = __match_any_sync(kFullMask, id);
    const int leader = __ffs(static_cast<int>(peers)) - 1;  // lowest lane with this id
    const int32_t rank = __popc(peers & lower_lanes);       // equal ids in lower lanes
    // Warps claim their rows in warp order: warp w's leaders read and advance the cursors of
    // their (distinct) experts after warps 0..w-1 did. n_warps barriers per tile.
    int32_t first = 0;
    for (int w = 0; w < n_warps; ++w) {
      if (w == warp && id >= 0 && lane == leader) {
        first = cursor[id * cs];
        cursor[id * cs] = first + static_cast<int32_t>(__popc(peers));
      }
      __syncthreads();
    }
    first = __shfl_sync(kFullMask, first, leader);
    if (id >= 0) {
      const int32_t row = first + rank;
      order[row] = static_cast<int32_t>(p);
      pos[p] = row;
    } else if (in_chunk) {
      pos[p] = -1;
    }
  }
}

// ================================================================================================
// gather_rows / combine_rows / pair_dot: one warp per output row (token row for combine, pair for
// pair_dot), rows grid-strided over the warps of the grid. VEC > 1: every lane moves 16 bytes
// (VEC elements) at a time; the launcher takes that path only when the rows' base pointers and
// strides are 16-byte aligned, the columns contiguous and d % VEC == 0; VEC == 1 reads any strides.
// Arithmetic in fp32 (the reference's opmath for fp32/fp16/bf16).
// ================================================================================================

template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    f[0] = static_cast<float>(p[0]);
  } else {
    const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = static_cast<float>(v.v[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_from_float(T* __restrict__ p, const float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = static_cast<T>(f[0]);
  } else {
    Vec<T, VEC> v;
#pragma unroll
    for (int i = 0; i < VEC; ++i) v.v[i] = static_cast<T>(f[i]);
    *reinterpret_cast<Vec<T, VEC>*>(p) = v;
  }
}

__device__ __forceinline__ int64_t warp_global_id() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int64_t warp_grid_stride() {
  return static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
}

// x_perm[i] = w[p] * x[p / k] with p = order[i] (w = 1 without weights), zero rows where p == -1
// (the reference's padding rows). x [T, d] with strides (xs0, xs1) (xs1 == 1 when VEC > 1);
// order [P] with stride os; w: contiguous fp32 [T*k] or nullptr; x_perm [P, d] contiguous.
// Without weights the product is by 1.0f: a bit-exact copy.
template <typename scalar_t, typename index_t, int VEC>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ x, int64_t xs0, int64_t xs1,
                                   const index_t* __restrict__ order, int64_t os,
                                   const float* __restrict__ w, int32_t k, int64_t n_pairs,
                                   int64_t P, int64_t d, scalar_t* __restrict__ x_perm) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  for (int64_t i = warp_global_id(); i < P; i += warp_grid_stride()) {
    const int64_t p = static_cast<int64_t>(order[i * os]);  // warp-uniform
    MOLORA_DEVICE_ASSERT(p >= -1 && p < n_pairs, "gather_rows: order value outside [-1, T*k)");
    scalar_t* orow = x_perm + i * d;
    float f[VEC];
    if (p < 0) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) f[v] = 0.0f;
      for (int64_t col = static_cast<int64_t>(lane) * VEC; col < d; col += kWarpSize * VEC)
        store_from_float<scalar_t, VEC>(orow + col, f);
      continue;
    }
    const scalar_t* xrow = x + (p / k) * xs0;
    const float scale = w != nullptr ? w[p] : 1.0f;
#pragma unroll 4
    for (int64_t col = static_cast<int64_t>(lane) * VEC; col < d; col += kWarpSize * VEC) {
      load_as_float<scalar_t, VEC>(xrow + col * xs1, f);
#pragma unroll
      for (int v = 0; v < VEC; ++v) f[v] *= scale;
      store_from_float<scalar_t, VEC>(orow + col, f);
    }
  }
}

// y[t] = sum_j w[t, j] * y_perm[pos[t, j]] over the slots j (in slot order, fp32) with
// pos[t, j] >= 0. Token-owned rows: no atomics, deterministic. y_perm [P, d] with strides
// (ys0, ys1); pos [T, k] with strides (ps0, ps1); w contiguous fp32 [T*k] or nullptr; y [T, d]
// contiguous. The warp loads 32 slots' (row, weight) at a time, one per lane, and broadcasts them
// by shuffle; every lane accumulates VEC columns.
template <typename scalar_t, typename index_t, int VEC>
__global__ void combine_rows_kernel(const scalar_t* __restrict__ y_perm, int64_t ys0, int64_t ys1,
                                    const index_t* __restrict__ pos, int64_t ps0, int64_t ps1,
                                    const float* __restrict__ w, int32_t k, int64_t T, int64_t P,
                                    int64_t d, scalar_t* __restrict__ y) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  for (int64_t t = warp_global_id(); t < T; t += warp_grid_stride()) {
    for (int64_t c0 = 0; c0 < d; c0 += kWarpSize * VEC) {  // warp-uniform trip count
      const int64_t col = c0 + static_cast<int64_t>(lane) * VEC;
      const bool active = col < d;
      float acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = 0.0f;
      for (int32_t j0 = 0; j0 < k; j0 += kWarpSize) {
        const int32_t j = j0 + lane;
        int32_t my_row = -1;
        float my_w = 0.0f;
        if (j < k) {
          const int64_t r = static_cast<int64_t>(pos[t * ps0 + j * ps1]);
          MOLORA_DEVICE_ASSERT(r >= -1 && r < P, "combine_rows: pos value outside [-1, P)");
          my_row = static_cast<int32_t>(r);
          my_w = w != nullptr ? w[t * k + j] : 1.0f;
        }
        const int32_t n_slots = k - j0 < kWarpSize ? k - j0 : kWarpSize;
        for (int32_t s = 0; s < n_slots; ++s) {  // warp-uniform trip count
          const int32_t row = __shfl_sync(kFullMask, my_row, s);
          const float ws = __shfl_sync(kFullMask, my_w, s);
          if (row < 0 || !active) continue;  // dropped pair (warp-uniform) / ragged last tile
          float f[VEC];
          load_as_float<scalar_t, VEC>(y_perm + row * ys0 + col * ys1, f);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] += ws * f[v];
        }
      }
      if (active) store_from_float<scalar_t, VEC>(y + t * d + col, acc);
    }
  }
}

// out[t, j] = dot(a[t if a_by_token else pos[t, j]], b[pos[t, j]]) in fp32, 0 where pos == -1.
// One warp per pair q = t*k + j: lanes stride the columns (VEC at a time), fp32 partial sums, a
// butterfly reduction; lane 0 writes. a: strides (as0, as1), a_rows rows; b [P, d]: (bs0, bs1);
// pos [T, k]: (ps0, ps1); out [T, k] fp32 contiguous.
template <typename scalar_t, typename index_t, int VEC>
__global__ void pair_dot_kernel(const scalar_t* __restrict__ a, int64_t as0, int64_t as1,
                                const scalar_t* __restrict__ b, int64_t bs0, int64_t bs1,
                                const index_t* __restrict__ pos, int64_t ps0, int64_t ps1,
                                bool a_by_token, int32_t k, int64_t T, int64_t a_rows,
                                int64_t b_rows, int64_t d, float* __restrict__ out) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int64_t n_pairs = T * k;
  for (int64_t q = warp_global_id(); q < n_pairs; q += warp_grid_stride()) {
    const int64_t t = q / k, j = q - t * k;
    const int64_t row = static_cast<int64_t>(pos[t * ps0 + j * ps1]);  // warp-uniform
    MOLORA_DEVICE_ASSERT(row >= -1 && row < b_rows && (a_by_token || row < a_rows),
                         "pair_dot: pos value outside [-1, P)");
    if (row < 0) {
      if (lane == 0) out[q] = 0.0f;
      continue;
    }
    const scalar_t* ar = a + (a_by_token ? t : row) * as0;
    const scalar_t* br = b + row * bs0;
    float s = 0.0f;
#pragma unroll 4
    for (int64_t col = static_cast<int64_t>(lane) * VEC; col < d; col += kWarpSize * VEC) {
      float fa[VEC], fb[VEC];
      load_as_float<scalar_t, VEC>(ar + col * as1, fa);
      load_as_float<scalar_t, VEC>(br + col * bs1, fb);
#pragma unroll
      for (int v = 0; v < VEC; ++v) s += fa[v] * fb[v];
    }
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
    if (lane == 0) out[q] = s;
  }
}

}  // namespace molora::kernels
