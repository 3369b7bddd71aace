// Token dispatch on the CPU: histogram + exclusive scan + stable scatter of (token, slot) pairs
// into expert order, and the row gather / weighted combine around it. Framework-free.
#pragma once

#include <cstdint>

#include "isa.h"
#include "simd.h"

namespace molora::kernels {
inline namespace MOLORA_ISA {

// Pass 1 (one chunk of pairs [p0, p1)): counts[e] += #pairs with id e. Ids of -1 are dropped.
inline void count_ids(const int32_t* ids, int64_t p0, int64_t p1, int32_t* counts) {
  for (int64_t p = p0; p < p1; ++p)
    if (ids[p] >= 0) ++counts[ids[p]];
}

// Pass 2 (one chunk): cursor[e] is this chunk's first free row of expert e; chunks are scattered
// in pair order, so within an expert pairs stay in ascending pair index (stable).
inline void scatter_pairs(const int32_t* ids, int64_t p0, int64_t p1, int32_t* cursor,
                          int32_t* order, int32_t* pos) {
  for (int64_t p = p0; p < p1; ++p) {
    const int32_t e = ids[p];
    if (e < 0) {
      pos[p] = -1;
      continue;
    }
    const int32_t row = cursor[e]++;
    order[row] = static_cast<int32_t>(p);
    pos[p] = row;
  }
}

// The expert that owns row `row`: the last e with expert_offsets[e] <= row (binary search;
// empty experts share an offset with their successor and are skipped).
inline int64_t expert_of_row(const int32_t* offsets, int64_t num_experts, int64_t row) {
  int64_t lo = 0, hi = num_experts;  // invariant: offsets[lo] <= row < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= row) lo = mid; else hi = mid;
  }
  return lo;
}

// x_perm[i] = w[p] * x[p / k] for rows [i0, i1), p = order[i]; padding rows are zero.
template <typename scalar_t, typename acc_t>
void gather_rows_range(const scalar_t* x, const int32_t* order, const acc_t* w, int64_t k,
                       int64_t d, int64_t i0, int64_t i1, scalar_t* x_perm) {
  for (int64_t i = i0; i < i1; ++i) {
    scalar_t* out = x_perm + i * d;
    const int32_t p = order[i];
    if (p < 0) {
      for (int64_t c = 0; c < d; ++c) out[c] = scalar_t(0);
      continue;
    }
    const scalar_t* src = x + (p / k) * d;
    const acc_t c0 = w != nullptr ? w[p] : acc_t(1);
    for (int64_t c = 0; c < d; ++c) out[c] = static_cast<scalar_t>(c0 * static_cast<acc_t>(src[c]));
  }
}

// y[t] = sum_j w[t,j] * y_perm[pos[t,j]] for tokens [t0, t1). Token-owned: no races, and the
// sum over j runs in slot order, so results are deterministic. `acc` holds d values.
template <typename scalar_t, typename acc_t>
void combine_rows_range(const scalar_t* y_perm, const int32_t* pos, const acc_t* w, int64_t k,
                        int64_t d, int64_t t0, int64_t t1, acc_t* acc, scalar_t* y) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t c = 0; c < d; ++c) acc[c] = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t row = pos[t * k + j];
      if (row < 0) continue;
      const acc_t c0 = w != nullptr ? w[t * k + j] : acc_t(1);
      const scalar_t* src = y_perm + static_cast<int64_t>(row) * d;
      MOLORA_SIMD
      for (int64_t c = 0; c < d; ++c) acc[c] += c0 * static_cast<acc_t>(src[c]);
    }
    for (int64_t c = 0; c < d; ++c) y[t * d + c] = static_cast<scalar_t>(acc[c]);
  }
}

// out[t,j] = dot(a[t or pos[t,j]], b[pos[t,j]]), 0 where pos == -1: routing-weight gradients.
template <typename scalar_t, typename acc_t>
void pair_dot_range(const scalar_t* a, const scalar_t* b, const int32_t* pos, int64_t k,
                    int64_t d, bool a_by_token, int64_t t0, int64_t t1, acc_t* out) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t row = pos[t * k + j];
      acc_t s = 0;
      if (row >= 0) {
        const scalar_t* ra = a + (a_by_token ? t : static_cast<int64_t>(row)) * d;
        const scalar_t* rb = b + static_cast<int64_t>(row) * d;
        MOLORA_SIMD_SUM(s)
        for (int64_t c = 0; c < d; ++c) s += static_cast<acc_t>(ra[c]) * static_cast<acc_t>(rb[c]);
      }
      out[t * k + j] = s;
    }
  }
}

}  // namespace MOLORA_ISA
}  // namespace molora::kernels
