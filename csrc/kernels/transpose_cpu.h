// Cache-blocked matrix transpose for the CPU launchers. Framework-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "isa.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace molora::kernels {
inline namespace MOLORA_ISA {

// Rows and columns of one block: a 32 x 32 fp32 block is 4 KiB read and 4 KiB written, so both
// sides stay in L1 while the block turns round. NOTE: untuned.
constexpr int64_t kTransposeBlock = 32;

#if defined(__AVX2__)
// out[j * ldo + q] = in[q * ldi + j] for q, j < 8.
inline void transpose8x8(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m256 r[8], t[8];
  for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(in + q * ldi);
  for (int q = 0; q < 8; q += 2) {
    t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
    t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
  }
  for (int q = 0; q < 8; q += 4) {
    r[q] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(out + q * ldo, _mm256_permute2f128_ps(r[q], r[q + 4], 0x20));
    _mm256_storeu_ps(out + (q + 4) * ldo, _mm256_permute2f128_ps(r[q], r[q + 4], 0x31));
  }
}
#endif

// out[j, i] = in[i * s0 + j * s1] for rows i in [i0, i1) (any strides: the bank as the caller
// holds it), j in [0, cols); out is [cols, rows] row-major.
template <typename scalar_t>
void transpose_rows(const scalar_t* in, int64_t s0, int64_t s1, int64_t rows, int64_t cols,
                    int64_t i0, int64_t i1, scalar_t* out) {
  constexpr int64_t B = kTransposeBlock;
  for (int64_t ib = i0; ib < i1; ib += B) {
    const int64_t ie = std::min(i1, ib + B);
    for (int64_t jb = 0; jb < cols; jb += B) {
      const int64_t je = std::min(cols, jb + B);
      int64_t i = ib;
#if defined(__AVX2__)
      // (Built with AVX2, csrc/cpu/sgmv_avx2.cpp: 8 x 8 pieces, 24 shuffles per 64 floats.)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (s1 == 1) {
          for (; i + 8 <= ie; i += 8) {
            int64_t j = jb;
            for (; j + 8 <= je; j += 8) transpose8x8(in + i * s0 + j, s0, out + j * rows + i, rows);
            for (; j < je; ++j)
              for (int64_t q = i; q < i + 8; ++q) out[j * rows + q] = in[q * s0 + j];
          }
        }
      }
#endif
#if defined(__SSE2__)
      // fp32 with unit column stride: 4 x 4 pieces turned in registers (baseline x86-64 has SSE);
      // element by element ran the [1376, 128] bank at about 0.25 floats per cycle.
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (s1 == 1) {
          for (; i + 4 <= ie; i += 4) {
            int64_t j = jb;
            for (; j + 4 <= je; j += 4) {
              const float* src = in + i * s0 + j;
              __m128 r0 = _mm_loadu_ps(src), r1 = _mm_loadu_ps(src + s0);
              __m128 r2 = _mm_loadu_ps(src + 2 * s0), r3 = _mm_loadu_ps(src + 3 * s0);
              _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
              _mm_storeu_ps(out + j * rows + i, r0);
              _mm_storeu_ps(out + (j + 1) * rows + i, r1);
              _mm_storeu_ps(out + (j + 2) * rows + i, r2);
              _mm_storeu_ps(out + (j + 3) * rows + i, r3);
            }
            for (; j < je; ++j)
              for (int64_t q = i; q < i + 4; ++q) out[j * rows + q] = in[q * s0 + j];
          }
        }
      }
#endif
      for (int64_t j = jb; j < je; ++j)
        for (int64_t q = i; q < ie; ++q) out[j * rows + q] = in[q * s0 + j * s1];
    }
  }
}

}  // namespace MOLORA_ISA
}  // namespace molora::kernels
