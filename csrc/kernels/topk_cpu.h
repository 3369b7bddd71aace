// Stable descending top-k over one row of keys: the order every molora selection op promises
// (larger key first, equal keys -> lower index first, NaN above every number as in torch.topk /
// torch.sort; NaNs tie with each other). Framework-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>

#include "isa.h"

namespace molora::kernels {
inline namespace MOLORA_ISA {

// The selection order "a ranks above b": a strict weak order with NaN the largest key. A plain
// `a > b` is false for every comparison with a NaN, which would let a NaN block all later keys of
// an insertion (or break std::stable_sort's ordering requirement).
template <typename key_t>
inline bool key_above(key_t a, key_t b) {
  return a > b || (a != a && b == b);
}

// Writes the indices of the k largest keys of key[0..n) into ids[0..k), descending.
// `scratch` holds n int32 (used only when k is large enough for a sort to beat insertion).
template <typename key_t>
inline void stable_topk_desc(const key_t* key, int64_t n, int64_t k, int32_t* ids,
                             int32_t* scratch) {
  if (k <= 16) {
    // Insertion into a k-long sorted list: O(n*k) with no allocation; ties never displace an
    // earlier (lower) index because the comparison is strict.
    int64_t filled = 0;
    for (int64_t e = 0; e < n; ++e) {
      const key_t v = key[e];
      if (filled == k && !key_above(v, key[ids[k - 1]])) continue;
      int64_t j = filled < k ? filled++ : k - 1;
      while (j > 0 && key_above(v, key[ids[j - 1]])) {
        ids[j] = ids[j - 1];
        --j;
      }
      ids[j] = static_cast<int32_t>(e);
    }
    return;
  }
  std::iota(scratch, scratch + n, 0);
  std::stable_sort(scratch, scratch + n, [key](int32_t a, int32_t b) { return key_above(key[a], key[b]); });
  std::copy(scratch, scratch + k, ids);
}

}  // namespace MOLORA_ISA
}  // namespace molora::kernels
