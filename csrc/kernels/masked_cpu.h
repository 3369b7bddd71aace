// Rank-wise masked activation on the CPU (SMoRA, FlyLoRA, MoRA): top-k over the ranks of one
// token, gathered-row shrink, kept-column expand, and the rank-usage histogram. Framework-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

#include "topk_cpu.h"

namespace molora::kernels {

// Top-k ranks of one token by key = (score or h) + bias, |key| if use_abs; values = h[ids].
// `scores` (any float dtype upstream) arrives in opmath.
template <typename scalar_t, typename acc_t>
void rank_topk_row(const scalar_t* h, const acc_t* scores, const acc_t* bias, int64_t R,
                   int64_t k, bool use_abs, acc_t* key, int32_t* scratch, scalar_t* values,
                   int32_t* ids) {
  for (int64_t c = 0; c < R; ++c) {
    acc_t v = scores != nullptr ? scores[c] : static_cast<acc_t>(h[c]);
    if (bias != nullptr) v += bias[c];
    key[c] = use_abs ? std::abs(v) : v;
  }
  stable_topk_desc(key, R, k, ids, scratch);
  for (int64_t j = 0; j < k; ++j) values[j] = h[ids[j]];
}

// h[t, j] = dot(A[ids[t, j]], x[t]) (0 for id -1) for tokens [t0, t1).
template <typename scalar_t, typename acc_t>
void rank_sparse_shrink_range(const scalar_t* x, const scalar_t* A, const int32_t* ids, int64_t k,
                              int64_t d, int64_t t0, int64_t t1, scalar_t* h) {
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* xr = x + t * d;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ids[t * k + j];
      acc_t s = 0;
      if (id >= 0) {
        const scalar_t* ar = A + static_cast<int64_t>(id) * d;
        MOLORA_SIMD_SUM(s)
        for (int64_t c = 0; c < d; ++c) s += static_cast<acc_t>(ar[c]) * static_cast<acc_t>(xr[c]);
      }
      h[t * k + j] = static_cast<scalar_t>(s);
    }
  }
}

// y[t] = base[t] + scale * sum_j w[t,j] * values[t,j] * Bt[ids[t,j]] for tokens [t0, t1): only
// the kept rows of Bt ([R, n], the bank transposed) are read.
template <typename scalar_t, typename acc_t>
void rank_sparse_expand_range(const scalar_t* values, const int32_t* ids, const scalar_t* Bt,
                              const acc_t* w, acc_t scale, const scalar_t* base, int64_t k,
                              int64_t n, int64_t t0, int64_t t1, acc_t* acc, scalar_t* y) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t o = 0; o < n; ++o) acc[o] = base != nullptr ? static_cast<acc_t>(base[t * n + o]) : acc_t(0);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ids[t * k + j];
      if (id < 0) continue;
      acc_t coef = scale * static_cast<acc_t>(values[t * k + j]);
      if (w != nullptr) coef *= w[t * k + j];
      const scalar_t* br = Bt + static_cast<int64_t>(id) * n;
      MOLORA_SIMD
      for (int64_t o = 0; o < n; ++o) acc[o] += coef * static_cast<acc_t>(br[o]);
    }
    for (int64_t o = 0; o < n; ++o) y[t * n + o] = static_cast<scalar_t>(acc[o]);
  }
}

// out[t] = 0 except out[t, ids[t, j]] += src[t, j], for tokens [t0, t1) of out [T, R]: each row
// zeroed and scattered in one pass (no separate fill of the whole output).
template <typename scalar_t>
void rank_scatter_range(const scalar_t* src, const int32_t* ids, int64_t k, int64_t R, int64_t t0,
                        int64_t t1, scalar_t* out) {
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(out + t * R, out + (t + 1) * R, scalar_t(0));
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ids[t * k + j];
      if (id >= 0) out[t * R + id] += src[t * k + j];
    }
  }
}

// G[g] = sum over pairs p with rank g of coef[p] * x[p / k], for bank rows [g0, g1). `order` and
// `offsets` group the pairs by rank (molora.dispatch over the ids), so each bank row is owned by
// one thread and summed in pair order (deterministic).
template <typename scalar_t, typename acc_t>
void rank_sparse_weight_grad_range(const scalar_t* x, const acc_t* coef, const int32_t* order,
                                   const int32_t* offsets, int64_t k, int64_t d, int64_t g0,
                                   int64_t g1, acc_t* acc, scalar_t* G) {
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t c = 0; c < d; ++c) acc[c] = 0;
    for (int64_t i = offsets[g]; i < offsets[g + 1]; ++i) {
      const int32_t p = order[i];
      const acc_t cf = coef[p];
      const scalar_t* xr = x + (p / k) * d;
      MOLORA_SIMD
      for (int64_t c = 0; c < d; ++c) acc[c] += cf * static_cast<acc_t>(xr[c]);
    }
    for (int64_t c = 0; c < d; ++c) G[g * d + c] = static_cast<scalar_t>(acc[c]);
  }
}

}  // namespace molora::kernels
