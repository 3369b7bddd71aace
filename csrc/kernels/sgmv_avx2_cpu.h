// fp32 register-tiled kernels of the grouped expand, shrink and weight gradient, written with
// AVX2 + FMA intrinsics. Included only by csrc/cpu/sgmv_avx2.cpp (compiled with -mavx2 -mfma); the
// portable kernels in sgmv_cpu.h serve every other dtype and CPU. Framework-free.
//
// The expand and the weight gradient run a GEMM micro-tile of kTileRows rows x 16 columns (12 ymm
// accumulators, one broadcast and two loads per 12 FMAs) over the rows of one expert, which share
// that expert's slice of the bank; the shrink, a dot-product form, runs 3 x 4 tiles (below). NOTE: 6 x 16 beat 4 x 16 and the token-owned form (1 load per FMA, 4-cycle
// FMA chains) in a standalone harness: expand T=1024, n=1376, E=8, k=2, r=16: 1.06 ms vs 1.15
// (4 x 16), 1.6-2.3 (token-owned); as the op, 1.7-1.9 -> 1.3-1.5 ms against the portable
// expert-major kernel (E=64 k=8 r=8 n=1024: 2x). 2 threads, 2-core x86 CPU machine, 2026-12-04.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "sgmv_cpu.h"

namespace molora::kernels::avx2 {

constexpr int64_t kTileCols = 16;  // two ymm of fp32
constexpr int kTileRows = 6;

// Lanes [0, nb) of a 16-wide column chunk, for the last (narrower) chunk of a row.
struct ChunkMask {
  __m256i lo, hi;
  explicit ChunkMask(int64_t nb) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nb)), idx);
    hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nb) - 8), idx);
  }
};

template <bool kTail>
inline void load16(const float* p, const ChunkMask& m, __m256& a, __m256& b) {
  if constexpr (kTail) {
    a = _mm256_maskload_ps(p, m.lo);
    b = _mm256_maskload_ps(p + 8, m.hi);
  } else {
    a = _mm256_loadu_ps(p);
    b = _mm256_loadu_ps(p + 8);
  }
}

template <bool kTail>
inline void store16(float* p, const ChunkMask& m, __m256 a, __m256 b) {
  if constexpr (kTail) {
    _mm256_maskstore_ps(p, m.lo, a);
    _mm256_maskstore_ps(p + 8, m.hi, b);
  } else {
    _mm256_storeu_ps(p, a);
    _mm256_storeu_ps(p + 8, b);
  }
}

// acc[row_of(i)] += sum_{a < r} coef[i, a] * bank[a * ld, :16] for the RB rows i of one tile
// (row pointers in coef / dst), bank columns read 16 at a time (masked on the last chunk).
template <int RB, bool kTail>
inline void tile_accumulate(const float* const* coef, float* const* dst, const float* bank,
                            int64_t ld, int64_t r, const ChunkMask& m) {
  __m256 v0[RB], v1[RB];
  for (int b = 0; b < RB; ++b) {
    v0[b] = _mm256_setzero_ps();
    v1[b] = _mm256_setzero_ps();
  }
  for (int64_t a = 0; a < r; ++a) {
    __m256 b0, b1;
    load16<kTail>(bank + a * ld, m, b0, b1);
    for (int b = 0; b < RB; ++b) {
      const __m256 c = _mm256_broadcast_ss(coef[b] + a);
      v0[b] = _mm256_fmadd_ps(c, b0, v0[b]);
      v1[b] = _mm256_fmadd_ps(c, b1, v1[b]);
    }
  }
  // Row by row: two rows of one token (a repeated expert id) both land.
  for (int b = 0; b < RB; ++b) {
    float* d = dst[b];
    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), v0[b]));
    _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_loadu_ps(d + 8), v1[b]));
  }
}

// The slots [s0, s1) of one expert (indices into slots[]) through tile_accumulate, kTileRows at a
// time; acc row of slot p: acc + (p / k - t0) * 16.
template <bool kTail>
inline void expert_rows_accumulate(const int32_t* slots, int64_t s0, int64_t s1, const float* hs,
                                   int64_t max_rank, int64_t k, int64_t t0, const float* bank,
                                   int64_t ld, int64_t r, const ChunkMask& m, float* acc) {
  const float* coef[kTileRows];
  float* dst[kTileRows];
  int64_t s = s0;
  for (; s + kTileRows <= s1; s += kTileRows) {
    for (int b = 0; b < kTileRows; ++b) {
      const int64_t p = slots[s + b];
      coef[b] = hs + p * max_rank;
      dst[b] = acc + (p / k - t0) * kTileCols;
    }
    tile_accumulate<kTileRows, kTail>(coef, dst, bank, ld, r, m);
  }
  // The last 1-5 rows in one narrower tile (one row at a time ran 2 FMA chains per B load).
  const int rest = static_cast<int>(s1 - s);
  for (int b = 0; b < rest; ++b) {
    const int64_t p = slots[s + b];
    coef[b] = hs + p * max_rank;
    dst[b] = acc + (p / k - t0) * kTileCols;
  }
  switch (rest) {
    case 5: tile_accumulate<5, kTail>(coef, dst, bank, ld, r, m); break;
    case 4: tile_accumulate<4, kTail>(coef, dst, bank, ld, r, m); break;
    case 3: tile_accumulate<3, kTail>(coef, dst, bank, ld, r, m); break;
    case 2: tile_accumulate<2, kTail>(coef, dst, bank, ld, r, m); break;
    case 1: tile_accumulate<1, kTail>(coef, dst, bank, ld, r, m); break;
    default: break;
  }
}

// The expand over one tile of tokens [t0, t1), every output column:
//   y[t] = base[t] + sum_j hs[t * k + j, :r_e] @ Bt[ro_e : ro_e + r_e, :]   (e = slot_expert)
// hs [T * k, max_rank] holds the coefficient-scaled h row of every slot (expand_slots_prepare),
// Bt is the bank transposed to [R, n]. The tile's slots are bucketed by expert (counting sort,
// stable), so each 6 x 16 micro-tile reads one [r_e, 16] slice of Bt for six rows. Outputs live
// in acc, one panel of `panel` columns at a time (a multiple of 16), chunk-major: acc[c][t][16]
// for the panel's 16-column chunk c (zero-padded past n). base enters and y leaves acc in spans
// of `panel` contiguous columns per row, so y is written once per element with no row buffer.
// NOTE: per 64-byte chunk instead, the strided base/y row accesses took 40% of the kernel's time
// (perf, T=1024, n=1376). Owned by one thread; slots are added in a fixed order: deterministic.
// Scratch: slots [(t1 - t0) * k], bucket [E + 1], acc [(t1 - t0) * panel].
inline void expand_token_tile(const float* hs, const int32_t* slot_expert,
                              const int32_t* rank_offsets, int64_t E, int64_t k,
                              int64_t max_rank, const float* Bt, int64_t n, int64_t panel,
                              const float* base, int64_t t0, int64_t t1, int32_t* slots,
                              int32_t* bucket, float* acc, float* y) {
  std::fill(bucket, bucket + E + 1, 0);
  for (int64_t p = t0 * k; p < t1 * k; ++p)
    if (slot_expert[p] >= 0) ++bucket[slot_expert[p] + 1];
  for (int64_t e = 0; e < E; ++e) bucket[e + 1] += bucket[e];
  // bucket[e] is the next free place of expert e while filling, then expert e's end: shift back.
  for (int64_t p = t0 * k; p < t1 * k; ++p)
    if (slot_expert[p] >= 0) slots[bucket[slot_expert[p]]++] = static_cast<int32_t>(p);
  for (int64_t e = E; e > 0; --e) bucket[e] = bucket[e - 1];
  bucket[0] = 0;

  const int64_t rows = t1 - t0;
  for (int64_t n0 = 0; n0 < n; n0 += panel) {
    const int64_t n1 = std::min(n, n0 + panel);
    const int64_t chunks = (n1 - n0 + kTileCols - 1) / kTileCols;
    const ChunkMask last(n1 - n0 - (chunks - 1) * kTileCols);
    for (int64_t t = 0; t < rows; ++t) {
      const float* src = base != nullptr ? base + (t0 + t) * n + n0 : nullptr;
      for (int64_t c = 0; c < chunks; ++c) {
        float* a = acc + (c * rows + t) * kTileCols;
        __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
        if (src != nullptr) {
          if (c + 1 < chunks)
            load16<false>(src + c * kTileCols, last, v0, v1);
          else
            load16<true>(src + c * kTileCols, last, v0, v1);
        }
        _mm256_storeu_ps(a, v0);
        _mm256_storeu_ps(a + 8, v1);
      }
    }
    for (int64_t c = 0; c < chunks; ++c) {
      float* a = acc + c * rows * kTileCols;
      const int64_t c0 = n0 + c * kTileCols;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r0 = rank_offsets[e], r = rank_offsets[e + 1] - r0;
        if (r == 0 || bucket[e] == bucket[e + 1]) continue;
        const float* bank = Bt + r0 * n + c0;
        if (c + 1 < chunks)
          expert_rows_accumulate<false>(slots, bucket[e], bucket[e + 1], hs, max_rank, k, t0,
                                        bank, n, r, last, a);
        else
          expert_rows_accumulate<true>(slots, bucket[e], bucket[e + 1], hs, max_rank, k, t0,
                                       bank, n, r, last, a);
      }
    }
    for (int64_t t = 0; t < rows; ++t) {
      float* dst = y + (t0 + t) * n + n0;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* a = acc + (c * rows + t) * kTileCols;
        const __m256 v0 = _mm256_loadu_ps(a), v1 = _mm256_loadu_ps(a + 8);
        if (c + 1 < chunks)
          store16<false>(dst + c * kTileCols, last, v0, v1);
        else
          store16<true>(dst + c * kTileCols, last, v0, v1);
      }
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int kShrinkRows = 3, kShrinkRanks = 4;

// out[b][a] = dot(xr[b], ar[a]) over d for a 3-row x 4-rank tile: 12 vector accumulators, 7 loads
// per 12 FMAs (the portable kernel: one rank at a time, 5 loads per 4 FMAs on 4 dependent
// chains). The last d % 8 columns through masked loads. NOTE: T=1024 E=8 k=2 r=16: d=512
// 0.50 -> 0.30 ms, d=1376 (the backward's u) 1.37 -> 0.86 ms; E=64 k=8 r=8 d=1024: 2.53 -> 1.52.
inline void shrink_tile(const float* const* xr, const float* const* ar, int64_t d,
                        const ChunkMask& m, float out[kShrinkRows][kShrinkRanks]) {
  __m256 acc[kShrinkRows][kShrinkRanks];
  for (int b = 0; b < kShrinkRows; ++b)
    for (int a = 0; a < kShrinkRanks; ++a) acc[b][a] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    __m256 xv[kShrinkRows];
    for (int b = 0; b < kShrinkRows; ++b) xv[b] = _mm256_loadu_ps(xr[b] + c);
    for (int a = 0; a < kShrinkRanks; ++a) {
      const __m256 av = _mm256_loadu_ps(ar[a] + c);
      for (int b = 0; b < kShrinkRows; ++b) acc[b][a] = _mm256_fmadd_ps(xv[b], av, acc[b][a]);
    }
  }
  if (c < d) {
    __m256 xv[kShrinkRows];
    for (int b = 0; b < kShrinkRows; ++b) xv[b] = _mm256_maskload_ps(xr[b] + c, m.lo);
    for (int a = 0; a < kShrinkRanks; ++a) {
      const __m256 av = _mm256_maskload_ps(ar[a] + c, m.lo);
      for (int b = 0; b < kShrinkRows; ++b) acc[b][a] = _mm256_fmadd_ps(xv[b], av, acc[b][a]);
    }
  }
  for (int b = 0; b < kShrinkRows; ++b)
    for (int a = 0; a < kShrinkRanks; ++a) out[b][a] = hsum(acc[b][a]);
}

// h[i, a] = c_i * dot(A[ro_e + a], x[t_i]) for the dispatched rows [i0, i1); 0 beyond r_e and on
// padding rows. Three rows of one expert at a time, through all of the expert's ranks in blocks
// of four: the x rows are read from memory once and the expert's [r_e, d] slice of A stays in
// cache. Rows are owned by the caller's thread: deterministic.
inline void shrink_rows(const float* x, const float* A, const GroupedMeta& m, const float* w,
                        const float* scales, int64_t d, int64_t max_rank, int64_t i0, int64_t i1,
                        float* h) {
  std::fill(h + i0 * max_rank, h + i1 * max_rank, 0.0f);
  const ChunkMask tail(d % 8);
  const int64_t covered = std::min<int64_t>(i1, m.expert_offsets[m.num_experts]);
  int64_t i = i0;
  while (i < covered) {
    const int64_t e = expert_of_row(m.expert_offsets, m.num_experts, i);
    const int64_t seg_end = std::min<int64_t>(covered, m.expert_offsets[e + 1]);
    const int64_t r0 = m.rank_offsets[e], r = m.rank_offsets[e + 1] - r0;
    if (r == 0) {
      i = seg_end;
      continue;
    }
    while (i < seg_end) {
      const float* xr[kShrinkRows];
      int64_t rows[kShrinkRows];
      float coef[kShrinkRows];
      const int nr = next_expert_rows(m, x, d, w, scales, e, seg_end, i, xr, rows, coef);
      if (nr == 0) continue;
      for (int64_t a0 = 0; a0 < r; a0 += kShrinkRanks) {
        const int na = static_cast<int>(std::min<int64_t>(kShrinkRanks, r - a0));
        const float* ar[kShrinkRanks];
        for (int a = 0; a < kShrinkRanks; ++a) ar[a] = A + (r0 + a0 + std::min(a, na - 1)) * d;
        float out[kShrinkRows][kShrinkRanks];
        shrink_tile(xr, ar, d, tail, out);
        for (int b = 0; b < nr; ++b)
          for (int a = 0; a < na; ++a) h[rows[b] * max_rank + a0 + a] = coef[b] * out[b][a];
      }
    }
  }
}

// G[ro_e + a0 + b, c0 : c0 + 16) for b < rb (<= RB) of one expert: 2 * RB accumulators while
// the expert's dispatched rows [i0, i1) stream past (two loads of an X row chunk, RB broadcasts of
// hs per 2 * RB FMAs). The rows are scattered over X, so the chunk of the row kAhead rows on
// (up to row `rows`, the next experts' included) is prefetched. NOTE: without it the first load
// of each row chunk took a quarter of the kernel.
template <int RB, bool kTail>
inline void weight_grad_block(const float* X, const float* hs, const int32_t* row_token,
                              int64_t i0, int64_t i1, int64_t rows, int64_t max_rank, int64_t n,
                              int64_t c0, int64_t a0, int rb, const ChunkMask& m, float* G) {
  constexpr int64_t kAhead = 16;  // NOTE: untuned
  __m256 v0[RB], v1[RB];
  for (int b = 0; b < RB; ++b) {
    v0[b] = _mm256_setzero_ps();
    v1[b] = _mm256_setzero_ps();
  }
  // rb < RB only on an expert's last rank block: the idle lanes repeat the last bank row's
  // coefficient and are never stored.
  int64_t col[RB];
  for (int b = 0; b < RB; ++b) col[b] = a0 + std::min(b, rb - 1);
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kAhead < rows && row_token[i + kAhead] >= 0) {
      const float* ahead = X + row_token[i + kAhead] * n + c0;
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + kTileCols - 1), _MM_HINT_T0);
    }
    const int32_t t = row_token[i];
    if (t < 0) continue;
    __m256 x0, x1;
    load16<kTail>(X + t * n + c0, m, x0, x1);
    const float* h = hs + i * max_rank;
    for (int b = 0; b < RB; ++b) {
      const __m256 c = _mm256_broadcast_ss(h + col[b]);
      v0[b] = _mm256_fmadd_ps(c, x0, v0[b]);
      v1[b] = _mm256_fmadd_ps(c, x1, v1[b]);
    }
  }
  for (int b = 0; b < rb; ++b) store16<kTail>(G + (a0 + b) * n + c0, m, v0[b], v1[b]);
}

template <bool kTail>
inline void weight_grad_expert(const float* X, const float* hs, const int32_t* row_token,
                               int64_t i0, int64_t i1, int64_t rows, int64_t max_rank, int64_t n,
                               int64_t c0, int64_t r, const ChunkMask& m, float* G) {
  // Rank blocks of 6, or of 4 up to rank 8 (8 = 4 + 4 wastes no lanes; 6 + 2 would waste 4).
  const int block = r <= 8 ? 4 : kTileRows;
  for (int64_t a0 = 0; a0 < r; a0 += block) {
    const int rb = static_cast<int>(std::min<int64_t>(block, r - a0));
    if (block == 4)
      weight_grad_block<4, kTail>(X, hs, row_token, i0, i1, rows, max_rank, n, c0, a0, rb, m, G);
    else
      weight_grad_block<kTileRows, kTail>(X, hs, row_token, i0, i1, rows, max_rank, n, c0, a0,
                                          rb, m, G);
  }
}

// The grouped weight gradient over the column chunks [c_begin, c_end) (16 columns each):
//   G[ro_e + a, c] = sum_{rows i of expert e} hs[i, a] * X[token_i, c]
// hs [P, max_rank] holds the coefficient-scaled rows in dispatch order, row_token the token of
// each dispatched row (-1 on padding). X rows are read in place: nothing is gathered or copied.
// A chunk is owned by one thread and rows are summed in dispatch order: deterministic.
inline void weight_grad_chunks(const float* X, const float* hs, const int32_t* row_token,
                               const int32_t* expert_offsets, const int32_t* rank_offsets,
                               int64_t E, int64_t max_rank, int64_t n, int64_t c_begin,
                               int64_t c_end, float* G) {
  for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
    const int64_t c0 = chunk * kTileCols, nb = std::min(kTileCols, n - c0);
    const ChunkMask m(nb);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = rank_offsets[e], r = rank_offsets[e + 1] - r0;
      const int64_t i0 = expert_offsets[e], i1 = expert_offsets[e + 1], rows = expert_offsets[E];
      if (nb == kTileCols)
        weight_grad_expert<false>(X, hs, row_token, i0, i1, rows, max_rank, n, c0, r, m,
                                  G + r0 * n);
      else
        weight_grad_expert<true>(X, hs, row_token, i0, i1, rows, max_rank, n, c0, r, m,
                                 G + r0 * n);
    }
  }
}

}  // namespace molora::kernels::avx2
