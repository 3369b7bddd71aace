// Rank-wise masked activation on the CPU (SMoRA, FlyLoRA, MoRA): top-k over the ranks of one
// token, gathered-row shrink, kept-column expand, and the rank-usage histogram. Framework-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "isa.h"
#include "simd.h"
#include "topk_cpu.h"

namespace molora::kernels {
// (Also built for AVX2 + FMA by csrc/cpu/sgmv_avx2.cpp: distinct symbols per ISA, isa.h.)
inline namespace MOLORA_ISA {

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

#if defined(__AVX2__) && defined(__FMA__)
// out_row = src_row (or 0) + sum_j coef[j] * rows[j] for j < nr, fp32: 32 columns (4 ymm) at a
// time with the rows streaming through registers, one load per FMA and no accumulator in memory.
inline void scaled_rows_fma_f32(const float* coef, const float* const* rows, int nr,
                                const float* src_row, int64_t n, float* out_row) {
  int64_t o = 0;
  for (; o + 32 <= n; o += 32) {
    __m256 a[4];
    for (int q = 0; q < 4; ++q)
      a[q] = src_row != nullptr ? _mm256_loadu_ps(src_row + o + 8 * q) : _mm256_setzero_ps();
    for (int j = 0; j < nr; ++j) {
      const __m256 c = _mm256_set1_ps(coef[j]);
      for (int q = 0; q < 4; ++q)
        a[q] = _mm256_fmadd_ps(c, _mm256_loadu_ps(rows[j] + o + 8 * q), a[q]);
    }
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out_row + o + 8 * q, a[q]);
  }
  for (; o < n; ++o) {
    float s = src_row != nullptr ? src_row[o] : 0.0f;
    for (int j = 0; j < nr; ++j) s = std::fma(coef[j], rows[j][o], s);
    out_row[o] = s;
  }
}

// out[j] = dot(rows[j], x_row) for j < nr <= 8, fp32: the rows' dot products side by side, one x
// load per nr row loads and FMAs (a dot product at a time waits on its one accumulator chain).
inline void dot_rows_f32(const float* x_row, const float* const* rows, int nr, int64_t d,
                         float* out) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    const __m256 xv = _mm256_loadu_ps(x_row + c);
    for (int j = 0; j < 8; ++j)
      if (j < nr) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[j] + c), xv, a[j]);
  }
  for (int j = 0; j < nr; ++j) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a[j]), _mm256_extractf128_ps(a[j], 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    float s = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
    for (int64_t e = c; e < d; ++e) s = std::fma(rows[j][e], x_row[e], s);
    out[j] = s;
  }
}

// out_row = src_row (or 0) + the sum, in item order, of coef * row over the items i < count for
// which item(i, coef, row) returns true: up to 16 rows per pass of scaled_rows_fma_f32, each pass
// after the first adding to out_row. The fp32 AVX2 body of the expand and the weight gradient.
template <typename Item>
inline void scaled_rows_sum_f32(int64_t count, Item&& item, const float* src_row, int64_t n,
                                float* out_row) {
  constexpr int kAtOnce = 16;  // NOTE: untuned
  float coef[kAtOnce];
  const float* rows[kAtOnce];
  int nr = 0;
  const float* src = src_row;
  for (int64_t i = 0; i < count; ++i) {
    if (!item(i, coef[nr], rows[nr])) continue;
    if (++nr == kAtOnce) {
      scaled_rows_fma_f32(coef, rows, nr, src, n, out_row);
      src = out_row;
      nr = 0;
    }
  }
  if (nr > 0 || src != out_row) scaled_rows_fma_f32(coef, rows, nr, src, n, out_row);
}
#endif

// h[t, j] = dot(A[ids[t, j]], x[t]) (0 for id -1) for tokens [t0, t1).
template <typename scalar_t, typename acc_t>
void rank_sparse_shrink_range(const scalar_t* x, const scalar_t* A, const int32_t* ids, int64_t k,
                              int64_t d, int64_t t0, int64_t t1, scalar_t* h) {
#if defined(__AVX2__) && defined(__FMA__)
  // NOTE: SMoRA's T=256, d=512, k=8 of 64 ranks, in its module's forward: 65 us as the loop
  // below in baseline x86-64, 44 us as that loop built for AVX2 (one dot product at a time), 27 us
  // here. Torch profiler, 2 threads, 2-core Xeon, 2026-12-05.
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j0 = 0; j0 < k; j0 += 8) {
        const int nr = static_cast<int>(std::min<int64_t>(8, k - j0));
        const float* rows[8];
        float dots[8];
        for (int j = 0; j < nr; ++j) {  // id -1: any row (its dot is dropped)
          const int32_t id = ids[t * k + j0 + j];
          rows[j] = A + static_cast<int64_t>(id < 0 ? 0 : id) * d;
        }
        dot_rows_f32(x + t * d, rows, nr, d, dots);
        for (int j = 0; j < nr; ++j) h[t * k + j0 + j] = ids[t * k + j0 + j] < 0 ? 0.0f : dots[j];
      }
    }
    return;
  }
#endif
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
#if defined(__AVX2__) && defined(__FMA__)
  // NOTE: SMoRA's T=256, n=1376, k=8 of 64 ranks, in its module's forward: 268 us as the loop
  // below in baseline x86-64, 238 us as that loop built for AVX2 (an accumulator pass in memory
  // per kept row), 143 us here. Torch profiler, 2 threads, 2-core Xeon, 2026-12-05.
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (int64_t t = t0; t < t1; ++t) {
      const int32_t* id = ids + t * k;
      scaled_rows_sum_f32(
          k,
          [&](int64_t j, float& c, const float*& row) {
            if (id[j] < 0) return false;
            c = scale * values[t * k + j] * (w != nullptr ? w[t * k + j] : 1.0f);
            row = Bt + static_cast<int64_t>(id[j]) * n;
            return true;
          },
          base != nullptr ? base + t * n : nullptr, n, y + t * n);
    }
    return;
  }
#endif
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
#if defined(__AVX2__) && defined(__FMA__)
  // NOTE: the SMoRA module's backward (T=256, d_in=512, d_out=1376, 64 ranks, k=8) 2.08 -> 1.93
  // ms with this in place of the loop below (the bench's rows, 2 threads, 2-core Xeon, 2026-12-05).
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (int64_t g = g0; g < g1; ++g) {
      const int32_t* pairs = order + offsets[g];
      scaled_rows_sum_f32(
          offsets[g + 1] - offsets[g],
          [&](int64_t i, float& c, const float*& row) {
            c = coef[pairs[i]];
            row = x + (pairs[i] / k) * d;
            return true;
          },
          nullptr, d, G + g * d);
    }
    return;
  }
#endif
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

}  // namespace MOLORA_ISA
}  // namespace molora::kernels
