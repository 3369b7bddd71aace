// fp32 register-tiled kernels of the grouped expand, shrink and weight gradient, written with
// AVX2 + FMA intrinsics. Included only by csrc/cpu/sgmv_avx2.cpp (compiled with -mavx2 -mfma) and
// by csrc/cpu/sgmv_avx512.cpp, which builds the expand once more with 32-column zmm chunks
// (Zmm32); the portable kernels in sgmv_cpu.h serve every other dtype and CPU. Framework-free.
//
// All three run one GEMM micro-tile of kTileRows rows x 16 columns (12 ymm accumulators, one
// broadcast and two loads per 12 FMAs) over the rows of one expert, which share that expert's
// slice of the bank: in the expand and the weight gradient the 16 columns are output features,
// in the shrink 16 ranks of the packed bank. NOTE: 6 x 16 beat 4 x 16 and the token-owned form
// (1 load per FMA, 4-cycle FMA chains) in a standalone harness: expand T=1024, n=1376, E=8, k=2,
// r=16: 1.06 ms vs 1.15 (4 x 16), 1.6-2.3 (token-owned); as the op, 1.7-1.9 -> 1.3-1.5 ms against
// the portable expert-major kernel (E=64 k=8 r=8 n=1024: 2x). 2 threads, 2-core x86 CPU machine,
// 2026-12-04.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "sgmv_cpu.h"
#include "transpose_cpu.h"

namespace molora::kernels::avx2 {
// (The expand below is also built for AVX-512 by csrc/cpu/sgmv_avx512.cpp: the ISA namespace
// keeps the two copies of every inline function apart, csrc/kernels/isa.h.)
inline namespace MOLORA_ISA {

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

// The expand's column chunk: two vector registers of fp32 per row. Ymm16 (AVX2): 16 columns.
// Zmm32 (AVX-512, csrc/cpu/sgmv_avx512.cpp): 32 columns, so a micro-tile row still takes one
// broadcast per two FMAs (a 16-column zmm row would take one per FMA, and broadcasts from memory
// issue at one or two a cycle: no faster than the ymm tile).
struct Ymm16 {
  using reg = __m256;
  static constexpr int64_t kCols = 16, kLanes = 8;
  using Mask = ChunkMask;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, reg v) { _mm256_storeu_ps(p, v); }
  template <bool kTail>
  static void load(const float* p, const Mask& m, reg& a, reg& b) { load16<kTail>(p, m, a, b); }
  template <bool kTail>
  static void store(float* p, const Mask& m, reg a, reg b) { store16<kTail>(p, m, a, b); }
  // p[0, kCols) = p + (a, b), or (a, b) alone where keep == 0 (a row's first touch: whatever p
  // held is dropped, by an AND rather than a branch); lanes past the mask stay untouched.
  template <bool kTail>
  static void keep_add_store(float* p, const Mask& m, int32_t keep, reg a, reg b) {
    reg o0, o1;
    load<kTail>(p, m, o0, o1);
    const reg k = _mm256_castsi256_ps(_mm256_set1_epi32(keep));
    store<kTail>(p, m, _mm256_add_ps(_mm256_and_ps(o0, k), a),
                 _mm256_add_ps(_mm256_and_ps(o1, k), b));
  }
};

// NOTE: the expand alone, T=1024, n=1376, E=8, k=2, r=16, 2 threads, 2-core Xeon with AVX-512,
// 2026-12-04: 1.14 ms with Ymm16, 0.89 ms with Zmm32 (the layer forward 5.86 -> 5.58 ms).
#if defined(__AVX512F__)
struct Zmm32 {
  using reg = __m512;
  static constexpr int64_t kCols = 32, kLanes = 16;
  struct Mask {  // lanes [0, nb) of a 32-wide chunk
    __mmask16 lo, hi;
    explicit Mask(int64_t nb)
        : lo(static_cast<__mmask16>(nb >= 16 ? 0xffff : (1u << nb) - 1)),
          hi(static_cast<__mmask16>(nb >= 32 ? 0xffff : nb <= 16 ? 0 : (1u << (nb - 16)) - 1)) {}
  };
  static reg zero() { return _mm512_setzero_ps(); }
  static reg bcast(const float* p) { return _mm512_set1_ps(*p); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, reg v) { _mm512_storeu_ps(p, v); }
  template <bool kTail>
  static void load(const float* p, const Mask& m, reg& a, reg& b) {
    if constexpr (kTail) {
      a = _mm512_maskz_loadu_ps(m.lo, p);
      b = _mm512_maskz_loadu_ps(m.hi, p + 16);
    } else {
      a = _mm512_loadu_ps(p);
      b = _mm512_loadu_ps(p + 16);
    }
  }
  template <bool kTail>
  static void store(float* p, const Mask& m, reg a, reg b) {
    if constexpr (kTail) {
      _mm512_mask_storeu_ps(p, m.lo, a);
      _mm512_mask_storeu_ps(p + 16, m.hi, b);
    } else {
      _mm512_storeu_ps(p, a);
      _mm512_storeu_ps(p + 16, b);
    }
  }
  template <bool kTail>
  static void keep_add_store(float* p, const Mask& m, int32_t keep, reg a, reg b) {
    if (keep != 0) {
      reg o0, o1;
      load<kTail>(p, m, o0, o1);
      a = _mm512_add_ps(o0, a);
      b = _mm512_add_ps(o1, b);
    }
    store<kTail>(p, m, a, b);
  }
};
#endif

// (v0, v1)[i] = sum_{a < r} coef[i, a] * bank[a * ld, :V::kCols] for the RB rows i of one tile,
// from zero, one chunk of columns (masked on the last).
template <typename V, int RB, bool kTail>
[[gnu::always_inline]] inline void tile_products(const float* const* coef, const float* bank,
                                                 int64_t ld, int64_t r,
                                                 const typename V::Mask& m,
                                                 typename V::reg (&v0)[RB],
                                                 typename V::reg (&v1)[RB]) {
  for (int b = 0; b < RB; ++b) {
    v0[b] = V::zero();
    v1[b] = V::zero();
  }
  for (int64_t a = 0; a < r; ++a) {
    typename V::reg b0, b1;
    V::template load<kTail>(bank + a * ld, m, b0, b1);
    for (int b = 0; b < RB; ++b) {
      const typename V::reg c = V::bcast(coef[b] + a);
      v0[b] = V::fmadd(c, b0, v0[b]);
      v1[b] = V::fmadd(c, b1, v1[b]);
    }
  }
}

// dst[i] += sum_{a < r} coef[i, a] * bank[a * ld, :V::kCols] for the RB rows i of one tile (row
// pointers in coef / dst), one chunk of columns (masked on the last).
template <typename V, int RB, bool kTail>
inline void tile_accumulate(const float* const* coef, float* const* dst, const int32_t* keep,
                            const float* bank, int64_t ld, int64_t r, const typename V::Mask& m) {
  typename V::reg v0[RB], v1[RB];
  tile_products<V, RB, kTail>(coef, bank, ld, r, m, v0, v1);
  // Row by row: two rows of one token (a repeated expert id) both land. keep[b] = 0 on a row's
  // first touch: whatever dst held there is dropped, so it needs no zero fill.
  for (int b = 0; b < RB; ++b) V::template keep_add_store<kTail>(dst[b], m, keep[b], v0[b], v1[b]);
}

// Rows [t0, t1) of p (row stride ld floats): their first two cache lines on the way into L1.
// (Out of line: inlined, its registers pushed an accumulator of the micro-tile to the stack.)
[[gnu::noinline]] inline void prefetch_row_pairs(const float* p, int64_t ld, int64_t t0,
                                                 int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const char* line = reinterpret_cast<const char*>(p + t * ld);
    _mm_prefetch(line, _MM_HINT_T0);
    _mm_prefetch(line + 64, _MM_HINT_T0);
  }
}

// The slots [s0, s1) of one expert through tile_accumulate, kTileRows at a time. slots[2 s] is
// the slot p (its hs row), slots[2 s + 1] its token's row in the tile (out + row * ldo), stored
// as ~row where it is the row's first touch (its old value is dropped, not added).
template <typename V, bool kTail>
inline void expert_rows_accumulate(const int32_t* slots, int64_t s0, int64_t s1, const float* hs,
                                   int64_t max_rank, const float* bank, int64_t ld, int64_t r,
                                   const typename V::Mask& m, float* out, int64_t ldo,
                                   const float* ahead = nullptr, int64_t pf0 = 0,
                                   int64_t pf1 = 0) {
  const float* coef[kTileRows];
  float* dst[kTileRows];
  int32_t keep[kTileRows];
  // The rows [pf0, pf1) of `ahead` (two lines each) on their way into cache, a share before each
  // micro-tile. NOTE: the whole share as one burst before the expert's rows (a quarter of the
  // kernel's samples on its prefetches: the line-fill buffers full) ran the op at T=1024 n=1376
  // E=8 k=2 r=16 in 0.57-0.60 ms hot and 0.62-0.67 right after a GEMM, spread 0.49-0.51 and
  // 0.59-0.65 (interleaved A/B of the two builds, 2 threads, 2-core Xeon, 2026-12-05).
  const int64_t tiles = (s1 - s0 + kTileRows - 1) / kTileRows;
  const int64_t pf_step = tiles > 0 ? (pf1 - pf0 + tiles - 1) / tiles : pf1 - pf0;
  const auto prefetch_share = [&]() {
    if (ahead == nullptr) return;
    const int64_t end = std::min(pf1, pf0 + pf_step);
    prefetch_row_pairs(ahead, ldo, pf0, end);
    pf0 = end;
  };
  const auto place = [&](int b, int64_t s) {
    const int32_t row = slots[2 * s + 1];
    coef[b] = hs + int64_t{slots[2 * s]} * max_rank;
    dst[b] = out + int64_t{row < 0 ? ~row : row} * ldo;
    keep[b] = row < 0 ? 0 : -1;
  };
  int64_t s = s0;
  for (; s + kTileRows <= s1; s += kTileRows) {
    for (int b = 0; b < kTileRows; ++b) place(b, s + b);
    prefetch_share();
    tile_accumulate<V, kTileRows, kTail>(coef, dst, keep, bank, ld, r, m);
  }
  prefetch_share();
  // The last 1-5 rows in one narrower tile (one row at a time ran 2 FMA chains per B load).
  const int rest = static_cast<int>(s1 - s);
  for (int b = 0; b < rest; ++b) place(b, s + b);
  switch (rest) {
    case 5: tile_accumulate<V, 5, kTail>(coef, dst, keep, bank, ld, r, m); break;
    case 4: tile_accumulate<V, 4, kTail>(coef, dst, keep, bank, ld, r, m); break;
    case 3: tile_accumulate<V, 3, kTail>(coef, dst, keep, bank, ld, r, m); break;
    case 2: tile_accumulate<V, 2, kTail>(coef, dst, keep, bank, ld, r, m); break;
    case 1: tile_accumulate<V, 1, kTail>(coef, dst, keep, bank, ld, r, m); break;
    default: break;
  }
}

// The expand over one tile of tokens [t0, t1) (places from expand_tile_slots), columns [n0, n1):
//   y[t, n0:n1] = base[t, n0:n1] + sum_j hs[t * k + j, :r_e] @ Bt[ro_e : ro_e + r_e, n0:n1]
// (e = the slot's expert), where hs [T * k, max_rank] holds the coefficient-scaled h row of every
// slot (expand_slots_prepare) and bt the bank's columns from n0 on, transposed: Bt[a, j] at
// bt[a * ldb + j - n0]. Each 6 x V::kCols micro-tile reads one [r_e, V::kCols] slice of it for six
// rows. The caller keeps (n1 - n0) x (t1 - t0) small enough for the tile's accumulators to stay in
// L2 while every expert passes over them, n1 - n0 a multiple of V::kCols unless n1 = n. With
// 32-column chunks (Zmm32) the tile's rows of y are the accumulators: y is written in place, with
// no buffer and no copy out. With 16-column chunks (Ymm16) they live in `acc`, chunk-major
// (acc[c][t][16], lanes past n unused: each chunk's rows contiguous), and each row leaves it in one
// span. NOTE: straight into y against through the buffer (the op, medians, 2 threads, 2-core Xeon,
// 2026-12-05): Zmm32, T=1024 E=8 k=2 r=16 n=1376 0.61 -> 0.48 ms, n=1375 0.68 -> 0.55, n=512 (the
// backward's d x) 0.22 -> 0.19, E=64 k=8 r=8 n=1024 on par (1.13 ms); Ymm16 (the AVX2 copy),
// n=1376 0.85 -> 0.95, E=64 1.48 -> 1.81 ms: twice the passes down rows n floats apart. Slots are
// added in a fixed order: deterministic. Scratch: acc [(t1 - t0) * (n1 - n0 rounded up to
// V::kCols)] with 16-column chunks.
template <typename V = Ymm16>
inline void expand_tile_panel(const float* hs, const int32_t* slots, const int32_t* bucket,
                              const uint8_t* touched, const int32_t* rank_offsets, int64_t E,
                              int64_t max_rank, const float* bt, int64_t ldb, int64_t n,
                              int64_t n0, int64_t n1, const float* base, int64_t t0, int64_t t1,
                              const float* next_y, int64_t next_rows, float* acc, float* y) {
  constexpr bool kDirect = V::kCols >= 32;
  const int64_t rows = t1 - t0;
  const int64_t chunks = (n1 - n0 + V::kCols - 1) / V::kCols;
  const typename V::Mask last(n1 - n0 - (chunks - 1) * V::kCols);
  // Chunk c of row t accumulates at out + c * chunk_step + t * row_step.
  float* const out = kDirect ? y + t0 * n + n0 : acc;
  const int64_t row_step = kDirect ? n : V::kCols;
  const int64_t chunk_step = kDirect ? V::kCols : rows * V::kCols;
  // The rows that no place writes first: base copied in, or zeros.
  for (int64_t t = 0; t < rows; ++t) {
    if (base == nullptr && touched[t]) continue;
    const float* src = base != nullptr ? base + (t0 + t) * n + n0 : nullptr;
    for (int64_t c = 0; c < chunks; ++c) {
      float* dst = out + c * chunk_step + t * row_step;
      typename V::reg v0 = V::zero(), v1 = V::zero();
      if (c + 1 < chunks) {
        if (src != nullptr) V::template load<false>(src + c * V::kCols, last, v0, v1);
        V::template store<false>(dst, last, v0, v1);
      } else {
        if (src != nullptr) V::template load<true>(src + c * V::kCols, last, v0, v1);
        V::template store<true>(dst, last, v0, v1);
      }
    }
  }
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t e = 0; e < E; ++e) {
      const float* ahead = nullptr;
      int64_t pf0 = 0, pf1 = 0;
      if constexpr (kDirect) {
        // The rows' next chunk (after the last one: the next tile's rows of this panel) on its
        // way into cache while this one computes: in a training step y is a cold block of memory
        // (the backward's allocations in between), and its first touch stalled the kernel.
        // NOTE: the expand right after a d x GEMM (y cold) 1.35 -> 0.95-1.04 ms, hot on par
        // (0.6); T=1024 llama up training step 1.46-1.49x -> 1.40-1.43x the base linear's
        // (interleaved A/B of the two builds, 2 threads, 2-core Xeon with AVX-512, 2026-12-05).
        ahead = c + 1 < chunks ? out + (c + 1) * chunk_step : next_y;
        const int64_t ahead_rows = c + 1 < chunks ? rows : next_rows;
        pf0 = e * ahead_rows / E;
        pf1 = (e + 1) * ahead_rows / E;
      }
      const int64_t r0 = rank_offsets[e], r = rank_offsets[e + 1] - r0;
      const float* bank = bt + r0 * ldb + c * V::kCols;
      if (c + 1 < chunks)
        expert_rows_accumulate<V, false>(slots, bucket[e], bucket[e + 1], hs, max_rank, bank, ldb,
                                         r, last, out + c * chunk_step, row_step, ahead, pf0, pf1);
      else
        expert_rows_accumulate<V, true>(slots, bucket[e], bucket[e + 1], hs, max_rank, bank, ldb,
                                        r, last, out + c * chunk_step, row_step, ahead, pf0, pf1);
    }
  }
  if constexpr (!kDirect) {
    for (int64_t t = 0; t < rows; ++t) {
      float* dst = y + (t0 + t) * n + n0;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* a = acc + c * chunk_step + t * row_step;
        const typename V::reg v0 = V::loadu(a), v1 = V::loadu(a + V::kLanes);
        if (c + 1 < chunks)
          V::template store<false>(dst + c * V::kCols, last, v0, v1);
        else
          V::template store<true>(dst + c * V::kCols, last, v0, v1);
      }
    }
  }
}

// The top-2 expand over tokens grouped by their pair of experts (expand_pair_groups): one tile of
// RB tokens of one group, NE live experts (1 or 2, in ascending id), one chunk of columns
// [col, col + V::kCols) (masked on the last):
//   y[t] = ((base[t] +) T_1[t]) + T_2[t],   T_i[t] = sum_{a < r_i} coef_i[t, a] * bank_i[a * ld, :]
// Each y row is written once, its lines never read (no base) or read once (base). The sums and
// their order are those of the per-expert tiles above (experts in ascending id, each product
// from zero, then added), so both paths give the same bits. coef[i * RB + b], dst[b] and src[b]
// (base rows, or null) are row pointers at column 0.
template <typename V, int RB, int NE, bool kTail>
inline void pair_tile_accumulate(const float* const* coef, float* const* dst,
                                 const float* const* src, int64_t col, const float* const* bank,
                                 const int64_t* r, int64_t ld, const typename V::Mask& m) {
  typename V::reg v0[RB], v1[RB];
#pragma GCC unroll 2
  for (int i = 0; i < NE; ++i) {
    typename V::reg a0[RB], a1[RB];
    tile_products<V, RB, kTail>(coef + i * RB, bank[i], ld, r[i], m, a0, a1);
    for (int b = 0; b < RB; ++b) {
      if (i > 0) {
        a0[b] = V::add(v0[b], a0[b]);
        a1[b] = V::add(v1[b], a1[b]);
      } else if (src[0] != nullptr) {
        typename V::reg o0, o1;
        V::template load<kTail>(src[b] + col, m, o0, o1);
        a0[b] = V::add(o0, a0[b]);
        a1[b] = V::add(o1, a1[b]);
      }
      v0[b] = a0[b];
      v1[b] = a1[b];
    }
  }
  for (int b = 0; b < RB; ++b) V::template store<kTail>(dst[b] + col, m, v0[b], v1[b]);
}

// pair_tile_accumulate over every chunk of the columns [n0, n1) (n1 - n0 a multiple of V::kCols
// unless n1 = n) for one tile of rb <= kTileRows rows.
template <typename V, int NE>
inline void pair_tile_cols(const float* const* coef, float* const* dst, const float* const* src,
                           int rb, const float* const* bank, const int64_t* r, int64_t ld,
                           int64_t chunk_stride, int64_t n, int64_t n0, int64_t n1) {
  const typename V::Mask full(V::kCols), last(n - (n - 1) / V::kCols * V::kCols);
  const float* bk[NE];
  for (int64_t c0 = n0; c0 < n1; c0 += V::kCols) {
    const int64_t c = (c0 - n0) / V::kCols;
    for (int i = 0; i < NE; ++i) bk[i] = bank[i] + c * chunk_stride;
    const bool tail = c0 + V::kCols > n;
#define MOLORA_PAIR_TILE(RB)                                                                     \
  case RB:                                                                                        \
    if (tail)                                                                                     \
      pair_tile_accumulate<V, RB, NE, true>(coef, dst, src, c0, bk, r, ld, last);                 \
    else                                                                                          \
      pair_tile_accumulate<V, RB, NE, false>(coef, dst, src, c0, bk, r, ld, full);                \
    break;
    switch (rb) {
      MOLORA_PAIR_TILE(1) MOLORA_PAIR_TILE(2) MOLORA_PAIR_TILE(3)
      MOLORA_PAIR_TILE(4) MOLORA_PAIR_TILE(5) MOLORA_PAIR_TILE(6)
      default: break;
    }
#undef MOLORA_PAIR_TILE
  }
}

// The top-2 expand of the tokens grouped by their pair of experts, columns [col0, col1) (col0 a
// multiple of V::kCols), in panels of kPairPanelCols so a group's bank slices stay in L1 across its
// tiles. Group g holds the sorted tokens [group_off[g], group_off[g + 1]): token tok[s], its first
// live expert's hs row p1[s] and its second's p2[s] (unused with one live expert);
// group_expert[2 g], group_expert[2 g + 1] (-1: none) their experts, ascending. Expert e's bank
// slice of chunk c (relative to col0) is bank + rank_offsets[e] * ld + c * chunk_stride. base
// [T, n] or null. NOTE: panels of 64, 128, 256 and 704 columns (a thread's whole share): the op at
// T=1024 n=1376 E=8 k=2 r=16 in 511-513, 502-534, 541-545 and 535-543 us (hot, 2 threads, 2-core
// Xeon with AVX-512, 2026-12-05).
// NOTE: in the op the kernel is bound by y's traffic, not by its FMAs (2026-12-06, T=1024 n=1376
// E=8 k=2 r=16, 2 threads, a standalone harness): hot 458 us without the rows' prefetch (497 with),
// 397 with its stores sent to 510 rows that stay in L2. So the tile shape did not matter: 3 rows x
// 2 chunks (one broadcast per 4 FMAs, not 2) ran the kernel alone 6-25% faster or 7% slower with
// the build's code layout, and the layer forward on par in paired runs (1.235-1.246x against
// 1.238-1.244x). Each panel's B^T turned round by the kernel into a 64 KiB buffer just before use
// (the thread's B^T, 47-62 us a call from a cold bank into a cold buffer, gone): the op on par, and
// 8 lines of the next panel's bank prefetched per tile made it 80 us slower. In the op the kernel
// took 543 us a call (median) both with the layer run back to back and after other
// implementations, where 2 threads fill y's 5.6 MB in 111-154 us from L3 and 367 us from memory
// (2026-12-06): y's traffic costs it by its pattern (each tile's 6 scattered rows, 512 bytes a
// row), not by the bytes.
constexpr int64_t kPairPanelCols = 128;
// NOTE: the rows 1, 2 or 3 tiles ahead prefetched, against none, as routed_moe_lora's expand
// timed as the bench suite does (T=1024 n=1376 E=8 k=2 r=16; forward / training step against
// the base linear, uniform and Zipf routing): none 1.25-1.27x / 1.32-1.36x (its expand 1.18 ms
// in a training step, where y is a cold block: 0.64 ms in the forward alone), 1 tile 1.25x /
// 1.29-1.30x, 2 tiles 1.25-1.28x / 1.26-1.29x, 3 tiles 1.23-1.27x / 1.26-1.31x; the token tiles
// 1.29-1.32x / 1.30-1.32x (2 threads, 2-core Xeon with AVX-512, 2026-12-05). Only the first
// two lines of each row's panel: 1.220-1.245x / 1.302-1.317x against 1.234-1.245x /
// 1.295-1.305x (paired runs as in routed_moe_lora_cpu's NOTE, 2026-12-06).
constexpr int64_t kPairAheadTiles = 2;
template <typename V>
inline void expand_pair_groups(const float* hs, int64_t max_rank, const int32_t* tok,
                               const int32_t* p1, const int32_t* p2, const int32_t* group_off,
                               const int32_t* group_expert, int64_t groups,
                               const int32_t* rank_offsets, const float* bank, int64_t ld,
                               int64_t chunk_stride, const float* base, int64_t n, int64_t col0,
                               int64_t col1, float* y) {
  const int64_t live = group_off[groups];
  const float* coef[2 * kTileRows];
  float* dst[kTileRows];
  const float* src[kTileRows];
  for (int64_t n0 = col0; n0 < col1; n0 += kPairPanelCols) {
    const int64_t n1 = std::min(col1, n0 + kPairPanelCols);
    const int64_t c_off = (n0 - col0) / V::kCols;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t g0 = group_off[g], g1 = group_off[g + 1];
      const int32_t e1 = group_expert[2 * g], e2 = group_expert[2 * g + 1];
      const int ne = e2 >= 0 ? 2 : 1;
      const float* bk[2] = {bank + rank_offsets[e1] * ld + c_off * chunk_stride,
                            bank + rank_offsets[e2 >= 0 ? e2 : e1] * ld + c_off * chunk_stride};
      const int64_t r[2] = {rank_offsets[e1 + 1] - rank_offsets[e1],
                            e2 >= 0 ? rank_offsets[e2 + 1] - rank_offsets[e2] : 0};
      for (int64_t s = g0; s < g1; s += kTileRows) {
        const int rb = static_cast<int>(std::min<int64_t>(kTileRows, g1 - s));
        for (int b = 0; b < rb; ++b) {
          const int64_t t = tok[s + b];
          coef[b] = hs + int64_t{p1[s + b]} * max_rank;
          coef[rb + b] = ne > 1 ? hs + int64_t{p2[s + b]} * max_rank : nullptr;
          dst[b] = y + t * n;
          src[b] = base != nullptr ? base + t * n : nullptr;
        }
        // The panel's lines of the rows kPairAheadTiles tiles on (in sorted order, across
        // groups) on their way into cache: a cold y's rows, in no order the hardware could follow.
        const int64_t q1 = std::min<int64_t>(live, s + (kPairAheadTiles + 1) * kTileRows);
        for (int64_t q = s + kPairAheadTiles * kTileRows; q < q1; ++q) {
          const char* line = reinterpret_cast<const char*>(y + int64_t{tok[q]} * n + n0);
          for (int64_t c = 0; c < (n1 - n0) * 4; c += 64) _mm_prefetch(line + c, _MM_HINT_T0);
        }
        if (ne > 1)
          pair_tile_cols<V, 2>(coef, dst, src, rb, bk, r, ld, chunk_stride, n, n0, n1);
        else
          pair_tile_cols<V, 1>(coef, dst, src, rb, bk, r, ld, chunk_stride, n, n0, n1);
      }
    }
  }
}

// The shrink reads the bank packed per expert: each 16-rank chunk of expert e as a panel of
// 16-float steps, zero past the expert's ranks, so the reduction down d streams one contiguous
// panel. A wide chunk (9-16 ranks) takes one step per column c: At[c, a0 : a0 + 16). A narrow one
// (at most 8 ranks, only ever an expert's last) takes a step per column pair (c, c + 1), rank i
// in lanes 2i (column c) and 2i + 1 (column c + 1), so a 64-bit broadcast of x[t, c : c + 2]
// feeds 16 lanes too. NOTE: T=1024 E=8 k=2 r=16, the backward's u (d=1376): 0.78-1.0 ms, where
// the dot-product form (3 rows x 4 ranks, horizontal sums, 7 loads per 12 FMAs) ran 0.98-1.45;
// the forward (d=512) and E=64 k=8 r=8 d=1024 on par with it. One broadcast per 8-lane FMA (8
// ranks x 12 rows) ran E=64 at 2.5-3.7 ms against 1.2-1.7: broadcasts from memory issue at one
// per cycle here. Reading the transposed bank in place (one 64-byte piece every R floats) ran it
// 3x slower than packed panels. Min of alternating runs, 2 threads, 2-core x86 CPU machine,
// 2026-12-04.
inline int64_t shrink_panel_steps(int64_t ranks, int64_t d) { return ranks > 8 ? d : (d + 1) / 2; }

// Floats of a wide chunk's panel: 16 * d, or in the column-pair layout of the AVX-512 copy
// (`pairs`, below) 32 per column pair.
inline int64_t shrink_wide_floats(int64_t d, bool pairs) { return 16 * (pairs ? d + d % 2 : d); }

// Floats of an expert's packed panels: every chunk but a narrow last one is wide.
inline int64_t shrink_packed_size(int64_t r, int64_t d, bool pairs = false) {
  const int64_t full = r / 16, rest = r % 16;
  const int64_t last = rest == 0  ? 0
                       : rest > 8 ? shrink_wide_floats(d, pairs)
                                  : 16 * shrink_panel_steps(rest, d);
  return full * shrink_wide_floats(d, pairs) + last;
}

// Packs ranks [r0, r0 + r) of bank(a, c) = bank[a * sa + c * sc] (any strides: A [R, d], or the
// transposed view B^T the backward passes) into the panels at `out` (shrink_packed_size floats).
// NOTE: a full 16-rank chunk turned round 8 x 8 in registers (A [R, d]) or copied 16 floats a
// step (the backward's B^T view), where the element loop ran. The whole shrink, E = 8, k = 2,
// r = 16: T = 16, h (d = 512) 36 -> 29 us, the backward's u (d = 1376) 113 -> 55 us; T = 1024,
// h 234 -> 160-175 us, u 540 -> 445-476 us (2 threads, 2-core Xeon, 2026-12-05).
inline void pack_shrink_bank(const float* bank, int64_t sa, int64_t sc, int64_t d, int64_t r0,
                             int64_t r, float* out, bool pairs = false) {
  for (int64_t a0 = 0; a0 < r; a0 += 16) {
    const int64_t w = std::min<int64_t>(16, r - a0);
    float* o = out + (a0 / 16) * shrink_wide_floats(d, pairs);
    const float* src = bank + (r0 + a0) * sa;
    const int64_t steps = shrink_panel_steps(w, d);
    int64_t c = 0;
    if (w == 16 && sc == 1) {  // the panel is the chunk's 16 rows turned round
      transpose_rows(src, sa, 1, 16, d, 0, 16, o);
      c = d;
    } else if (w == 16 && sa == 1) {
      for (; c < d; ++c) {
        _mm256_storeu_ps(o + c * 16, _mm256_loadu_ps(src + c * sc));
        _mm256_storeu_ps(o + c * 16 + 8, _mm256_loadu_ps(src + c * sc + 8));
      }
    } else {
      std::fill(o, o + 16 * steps, 0.0f);
    }
    for (; c < d; ++c) {
      float* step = w > 8 ? o + c * 16 : o + (c / 2) * 16 + (c % 2);
      const int64_t lane = w > 8 ? 1 : 2;
      for (int64_t j = 0; j < w; ++j) step[j * lane] = src[j * sa + c * sc];
    }
#if defined(__AVX512F__)
    // The column-pair layout, turned round in place: pair (c, c + 1) as 32 floats, ranks 0-7
    // then 8-15, rank a of column c in lane 2a and of c + 1 in lane 2a + 1 (an odd d's last
    // column paired with zeros).
    if (pairs && w > 8) {
      const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
      for (int64_t c0 = 0; c0 < d; c0 += 2) {
        const __m512 s0 = _mm512_loadu_ps(o + c0 * 16);
        const __m512 s1 = c0 + 1 < d ? _mm512_loadu_ps(o + c0 * 16 + 16) : _mm512_setzero_ps();
        _mm512_storeu_ps(o + c0 * 16, _mm512_permutex2var_ps(s0, lo, s1));
        _mm512_storeu_ps(o + c0 * 16 + 16, _mm512_permutex2var_ps(s0, hi, s1));
      }
    }
#endif
  }
}

// Floats (4 lines) a shrink tile fetches ahead along each of its rows. NOTE: 128 on par, 256
// 10-15% slower; the next tile's first lines fetched as well: no faster (T=1024 E=8 k=2 r=16 h
// and u, E=64 k=8 r=8; 2 threads, 2-core Xeon, 2026-12-05).
constexpr int64_t kShrinkAhead = 64;

// The reduction's walk down d that the ymm and zmm tiles share: step(c, pair) for every panel
// step at panel + c * (kWide ? 16 : 8): a column c (pair false), or in the narrow layout a column
// pair (c, c + 1) (pair true) and, for odd d, the last column alone (pair false: its odd lanes are
// zero in the panel). The x rows are scattered tokens, one stream each: their next lines are
// fetched ahead as it goes.
template <bool kWide, int RB, typename Step>
inline void shrink_walk(const float* const* xr, int64_t d, Step&& step) {
  for (int64_t c0 = 0; c0 < d; c0 += 16) {
    for (int b = 0; b < RB; ++b)
      _mm_prefetch(reinterpret_cast<const char*>(xr[b] + c0 + kShrinkAhead), _MM_HINT_T0);
    const int64_t c1 = std::min(d, c0 + 16);
    if constexpr (kWide) {
      for (int64_t c = c0; c < c1; ++c) step(c, std::false_type{});
    } else {
      for (int64_t c = c0; c + 1 < c1; c += 2) step(c, std::true_type{});
    }
  }
  if constexpr (!kWide) {
    if (d % 2 == 1) step(d - 1, std::false_type{});
  }
}

// h[rows b, a0 : a0 + na) of one panel for 6 rows of one expert: the GEMM micro-tile of the
// expand turned round, 12 accumulators while the reduction runs down d, per step two loads of the
// panel and 6 broadcasts of x per 12 FMAs. Rows past `nr` repeat row 0 and are never stored.
template <bool kWide>
inline void shrink_tile(const float* const* xr, int nr, const float* panel, int64_t d, int64_t na,
                        const float* coef, float* const* hrow) {
  constexpr int RB = kTileRows;
  __m256 v0[RB], v1[RB];
  for (int b = 0; b < RB; ++b) {
    v0[b] = _mm256_setzero_ps();
    v1[b] = _mm256_setzero_ps();
  }
  shrink_walk<kWide, RB>(xr, d, [&](int64_t c, auto pair) {
    const float* step = panel + c * (kWide ? 16 : 8);
    const __m256 p0 = _mm256_loadu_ps(step), p1 = _mm256_loadu_ps(step + 8);
    for (int b = 0; b < RB; ++b) {
      __m256 xv;
      if constexpr (decltype(pair)::value)
        xv = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(xr[b] + c)));
      else
        xv = _mm256_broadcast_ss(xr[b] + c);
      v0[b] = _mm256_fmadd_ps(xv, p0, v0[b]);
      v1[b] = _mm256_fmadd_ps(xv, p1, v1[b]);
    }
  });
  // Constant trip counts (b < nr tested inside) keep the accumulators in registers.
  const ChunkMask m(na);
  for (int b = 0; b < RB; ++b) {
    if (b >= nr) continue;
    const __m256 cv = _mm256_set1_ps(coef[b]);
    if constexpr (kWide) {
      _mm256_maskstore_ps(hrow[b], m.lo, _mm256_mul_ps(cv, v0[b]));
      _mm256_maskstore_ps(hrow[b] + 8, m.hi, _mm256_mul_ps(cv, v1[b]));
    } else {
      // Lane pairs (column c, c + 1) of ranks 0-3 | 4-7 summed: hadd gives ranks 0 1 4 5 2 3 6 7.
      const __m256 sums = _mm256_castpd_ps(_mm256_permute4x64_pd(
          _mm256_castps_pd(_mm256_hadd_ps(v0[b], v1[b])), 0xD8));
      _mm256_maskstore_ps(hrow[b], m.lo, _mm256_mul_ps(cv, sums));
    }
  }
}

#if defined(__AVX512F__)
// x[c : c + 2] in every lane pair (a column pair: kPair), or x[c] in every lane (an odd d's last
// column), for the column-pair panels of the zmm tiles below.
template <bool kPair>
inline __m512 x_step_bcast(const float* x, int64_t c) {
  if constexpr (kPair)
    return _mm512_castpd_ps(
        _mm512_broadcastsd_pd(_mm_load_sd(reinterpret_cast<const double*>(x + c))));
  else
    return _mm512_set1_ps(x[c]);
}

// The same micro-tile on AVX-512 for a narrow chunk (at most 8 ranks), where one panel step (8
// ranks of a column pair) is one zmm: RB rows keep RB accumulators, one panel load and RB 64-bit
// broadcasts per RB FMAs.
template <int RB>
inline void shrink_tile_zmm_narrow(const float* const* xr, int nr, const float* panel, int64_t d,
                                   int64_t na, const float* coef, float* const* hrow) {
  __m512 v[RB];
  for (int b = 0; b < RB; ++b) v[b] = _mm512_setzero_ps();
  shrink_walk<false, RB>(xr, d, [&](int64_t c, auto pair) {
    const __m512 p = _mm512_loadu_ps(panel + c * 8);
    for (int b = 0; b < RB; ++b)
      v[b] = _mm512_fmadd_ps(x_step_bcast<decltype(pair)::value>(xr[b], c), p, v[b]);
  });
  // Lanes 2a (column c) and 2a + 1 (column c + 1) of rank a summed into lane a.
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 0, 0, 0, 0, 0, 0, 0, 0);
  const __mmask16 m = static_cast<__mmask16>((1u << na) - 1);
  for (int b = 0; b < RB; ++b) {
    if (b >= nr) continue;
    const __m512 sums = _mm512_add_ps(_mm512_permutexvar_ps(even, v[b]),
                                      _mm512_permutexvar_ps(odd, v[b]));
    _mm512_mask_storeu_ps(hrow[b], m, _mm512_mul_ps(_mm512_set1_ps(coef[b]), sums));
  }
}

// A wide chunk (9-16 ranks) on AVX-512, in the column-pair layout (pack_shrink_bank with
// `pairs`): one 64-bit broadcast of x[t, c : c + 2] feeds two FMAs (ranks 0-7 and 8-15, two
// accumulators a row), where the one-column layout (16 ranks of a column a step) took one
// broadcast per FMA, and broadcasts from memory issue at one a cycle here. NOTE: against that
// layout with 8-row tiles, the op at T=1024 E=8 k=2 r=16 (medians, 2 threads, 2-core Xeon with
// AVX-512, 2026-12-05): h (d=512) 0.18 -> 0.15-0.16 ms, d=511 0.18 -> 0.15, the backward's u
// (d=1376, B^T) 0.49 -> 0.43-0.44; E=64 k=8 r=8 d=1024 (narrow chunks only, now in 6-row tiles)
// on par (h 0.89-0.94 ms, u 0.97-1.04). With 8-row tiles here GCC kept the panel registers on
// the stack and reloaded them for every FMA (h 0.21 ms).
template <int RB>
inline void shrink_tile_zmm_pairs(const float* const* xr, int nr, const float* panel, int64_t d,
                                  int64_t na, const float* coef, float* const* hrow) {
  __m512 lo[RB], hi[RB];
  for (int b = 0; b < RB; ++b) lo[b] = hi[b] = _mm512_setzero_ps();
  shrink_walk<false, RB>(xr, d, [&](int64_t c, auto pair) {
    // (an odd d's last column alone: paired with zeros in the panel)
    const __m512 p0 = _mm512_loadu_ps(panel + c * 16), p1 = _mm512_loadu_ps(panel + c * 16 + 16);
    for (int b = 0; b < RB; ++b) {
      const __m512 xv = x_step_bcast<decltype(pair)::value>(xr[b], c);
      lo[b] = _mm512_fmadd_ps(xv, p0, lo[b]);
      hi[b] = _mm512_fmadd_ps(xv, p1, hi[b]);
    }
  });
  // Lanes 2a (column c) and 2a + 1 (column c + 1) of rank a summed into lane a.
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __mmask16 m = static_cast<__mmask16>(na >= 16 ? 0xffff : (1u << na) - 1);
  for (int b = 0; b < RB; ++b) {
    if (b >= nr) continue;
    const __m512 sums = _mm512_add_ps(_mm512_permutex2var_ps(lo[b], even, hi[b]),
                                      _mm512_permutex2var_ps(lo[b], odd, hi[b]));
    _mm512_mask_storeu_ps(hrow[b], m, _mm512_mul_ps(_mm512_set1_ps(coef[b]), sums));
  }
}
#endif

// h[i, a] = c_i * sum_c x[t_i, c] * A[ro_e + a, c] for the dispatched rows [i0, i1); 0 beyond r_e
// and on padding rows. `packed` holds every expert's panels (pack_shrink_bank) from
// packed + pack_offsets[e]. RB rows of one expert at a time (their x rows read from L1 as the
// reduction runs down them), through the expert's ranks 16 at a time: six in the ymm tile and in
// the zmm ones (kZmm; wide chunks in the column-pair layout). Rows are owned by the caller's
// thread and reduced in a fixed order: deterministic.
template <int RB = kTileRows, bool kZmm = false>
inline void shrink_rows(const float* x, const float* packed, const int64_t* pack_offsets,
                        const GroupedMeta& m, const float* w, const float* scales, int64_t d,
                        int64_t max_rank, int64_t i0, int64_t i1, float* h) {
  static_assert(kZmm || RB == kTileRows, "the ymm tile is kTileRows rows");
  std::fill(h + i0 * max_rank, h + i1 * max_rank, 0.0f);
  const int64_t covered = std::min<int64_t>(i1, m.expert_offsets[m.num_experts]);
  int64_t i = i0;
  while (i < covered) {
    const int64_t e = expert_of_row(m.expert_offsets, m.num_experts, i);
    const int64_t seg_end = std::min<int64_t>(covered, m.expert_offsets[e + 1]);
    const int64_t r = m.rank_offsets[e + 1] - m.rank_offsets[e];
    if (r == 0) {
      i = seg_end;
      continue;
    }
    while (i < seg_end) {
      const float* xr[RB];
      int64_t rows[RB];
      float coef[RB];
      const int nr = next_expert_rows(m, x, d, w, scales, e, seg_end, i, xr, rows, coef);
      if (nr == 0) continue;
      float* hrow[RB];
      for (int64_t a0 = 0; a0 < r; a0 += 16) {
        for (int b = 0; b < RB; ++b) hrow[b] = h + rows[std::min(b, nr - 1)] * max_rank + a0;
        const int64_t na = std::min<int64_t>(16, r - a0);
        const float* panel = packed + pack_offsets[e] + (a0 / 16) * shrink_wide_floats(d, kZmm);
#if defined(__AVX512F__)
        if constexpr (kZmm) {
          if (na > 8)
            shrink_tile_zmm_pairs<RB>(xr, nr, panel, d, na, coef, hrow);
          else
            shrink_tile_zmm_narrow<RB>(xr, nr, panel, d, na, coef, hrow);
          continue;
        }
#endif
        if (na > 8)
          shrink_tile<true>(xr, nr, panel, d, na, coef, hrow);
        else
          shrink_tile<false>(xr, nr, panel, d, na, coef, hrow);
      }
    }
  }
}

// Rows ahead whose X chunk a weight-gradient tile fetches into L1 while it works on the current
// one: the rows are the dispatch's (scattered tokens), which no hardware prefetcher predicts.
// NOTE: the op, medians, 2 threads, 2-core Xeon with AVX-512, 2026-12-05: T=1024 E=8 k=2 r=16 dB
// (d=1376, transposed) 0.66 -> 0.52-0.56 ms (16 ahead: 0.55, 4: 0.59), dA (d=512) 0.23 -> 0.22;
// E=64 k=8 r=8 d=1024: dB 1.27 -> 0.98 ms, dA 1.11 -> 0.87. The AVX2 copy: dB 1.04 -> 0.88 ms,
// E=64 dB 1.56 -> 1.48, dA 1.49 -> 1.40.
constexpr int64_t kWeightGradAhead = 8;

// G[ro_e + a0 + b, c0 : c0 + V::kCols) for b < rb (<= RB) of one expert (held at G + (a0 + b)
// * ldg + gc: G's rows may be a window of its columns), over the dispatched rows [i0, i1) of one
// row block: 2 * RB accumulators (loaded from G, or zero on the expert's
// first block) while the rows stream past: two loads of an X row chunk, RB broadcasts of hs per
// 2 * RB FMAs. Rows are added in dispatch order, whatever the blocking: deterministic.
template <typename V, int RB, bool kTail>
inline void weight_grad_tile(const float* X, const float* hs, const int32_t* row_token,
                             int64_t i0, int64_t i1, int64_t max_rank, int64_t n, int64_t c0,
                             int64_t a0, int rb, bool first, const typename V::Mask& m, float* G,
                             int64_t ldg, int64_t gc) {
  typename V::reg v0[RB], v1[RB];
  for (int b = 0; b < RB; ++b) {
    if (first || b >= rb) {
      v0[b] = V::zero();
      v1[b] = V::zero();
    } else {
      V::template load<kTail>(G + (a0 + b) * ldg + gc, m, v0[b], v1[b]);
    }
  }
  // rb < RB only on an expert's last rank block: the idle lanes repeat the last bank row's
  // coefficient and are never stored.
  int64_t col[RB];
  for (int b = 0; b < RB; ++b) col[b] = a0 + std::min(b, rb - 1);
  for (int64_t i = i0; i < i1; ++i) {
    const int32_t t = row_token[i];
    if (i + kWeightGradAhead < i1 && row_token[i + kWeightGradAhead] >= 0) {
      const float* ahead = X + int64_t{row_token[i + kWeightGradAhead]} * n + c0;
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + V::kCols - 1), _MM_HINT_T0);
    }
    if (t < 0) continue;
    typename V::reg x0, x1;
    V::template load<kTail>(X + t * n + c0, m, x0, x1);
    const float* h = hs + i * max_rank;
    for (int b = 0; b < RB; ++b) {
      const typename V::reg c = V::bcast(h + col[b]);
      v0[b] = V::fmadd(c, x0, v0[b]);
      v1[b] = V::fmadd(c, x1, v1[b]);
    }
  }
  // Loops over the constant RB (b < rb tested inside) keep v0 / v1 in registers: a runtime trip
  // count indexes the arrays and spilled all 12 accumulators to the stack (GCC -O3). NOTE: the
  // spilled form ran T=1024 E=8 k=2 r=16 dB (d=1376) in 1.84-2.04 ms, dA (d=512) 0.91-1.02 ms;
  // in registers 0.92-1.43 / 0.39-0.45 ms (E=64 k=8 r=8 d=1024: 3.3-3.7 -> 1.5-2.3 ms). Min of
  // alternating runs, 2 threads, 2-core x86 CPU machine, 2026-12-04.
  for (int b = 0; b < RB; ++b)
    if (b < rb) V::template store<kTail>(G + (a0 + b) * ldg + gc, m, v0[b], v1[b]);
}

// Ranks per weight-gradient tile: as many accumulator pairs as leave registers for the X chunk
// and the broadcast (16 ymm: 6; 32 zmm: 8, so rank 16 is two full tiles), 4 up to rank 4 (ymm:
// up to 8, as 8 = 4 + 4 wastes no lanes where 6 + 2 would waste 4).
template <typename V>
constexpr int kWeightGradRanks = 6;
template <typename V>
constexpr int kWeightGradSmallRank = 8;
#if defined(__AVX512F__)
template <>
constexpr int kWeightGradRanks<Zmm32> = 8;
template <>
constexpr int kWeightGradSmallRank<Zmm32> = 4;
#endif

template <typename V, bool kTail>
inline void weight_grad_chunk(const float* X, const float* hs, const int32_t* row_token,
                              int64_t i0, int64_t i1, int64_t max_rank, int64_t n, int64_t c0,
                              int64_t r, bool first, const typename V::Mask& m, float* G,
                              int64_t ldg, int64_t gc) {
  constexpr int kBig = kWeightGradRanks<V>;
  const int block = r <= kWeightGradSmallRank<V> ? 4 : kBig;
  for (int64_t a0 = 0; a0 < r; a0 += block) {
    const int rb = static_cast<int>(std::min<int64_t>(block, r - a0));
    if (block == 4)
      weight_grad_tile<V, 4, kTail>(X, hs, row_token, i0, i1, max_rank, n, c0, a0, rb, first, m,
                                    G, ldg, gc);
    else
      weight_grad_tile<V, kBig, kTail>(X, hs, row_token, i0, i1, max_rank, n, c0, a0, rb, first,
                                       m, G, ldg, gc);
  }
}

// Dispatched rows per block of the weight gradient: the block's slices of X stay in L2 while
// every column chunk of the thread passes over them. NOTE: 32, 64, 128 and one block per expert
// were on par at T=1024 (E=8 k=2 r=16), within the machine's noise. With the rows fetched ahead
// (kWeightGradAhead), 128-512 ran the AVX-512 copy 5-10% faster than 64 but the AVX2 copy 10-15%
// slower (T=1024 E=8 k=2 r=16 and E=64 k=8 r=8, separate builds, 2-core Xeon, 2026-12-05): kept.
constexpr int64_t kWeightGradRows = 64;

// The grouped weight gradient over the column chunks [c_begin, c_end) (V::kCols columns each):
//   G[ro_e + a, c] = sum_{rows i of expert e} hs[i, a] * X[token_i, c]
// hs [P, max_rank] holds the coefficient-scaled rows in dispatch order, row_token the token of
// each dispatched row (-1 on padding). X rows are read in place: nothing is gathered or copied.
// Row blocks are the outer loop, so each X row is read as one contiguous span (the thread's
// columns) while it is in cache, not one 64-byte line per chunk pass over all rows. A chunk is
// owned by one thread and rows are summed in dispatch order: deterministic. G holds columns
// [g_col0, g_col0 + ldg) of every bank row (ldg = n, g_col0 = 0: all of G [R, n]; a thread's
// window of columns where the caller turns G round afterwards).
template <typename V = Ymm16>
inline void weight_grad_chunks(const float* X, const float* hs, const int32_t* row_token,
                               const int32_t* expert_offsets, const int32_t* rank_offsets,
                               int64_t E, int64_t max_rank, int64_t n, int64_t c_begin,
                               int64_t c_end, float* G, int64_t ldg, int64_t g_col0) {
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = rank_offsets[e], r = rank_offsets[e + 1] - r0;
    const int64_t i0 = expert_offsets[e], i1 = expert_offsets[e + 1];
    if (r == 0) continue;
    // An expert with no rows still gets its zero rows (one empty block).
    for (int64_t b0 = i0; b0 < i1 || b0 == i0; b0 += kWeightGradRows) {
      const int64_t b1 = std::min(i1, b0 + kWeightGradRows);
      for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
        const int64_t c0 = chunk * V::kCols, nb = std::min(V::kCols, n - c0);
        const typename V::Mask m(nb);
        if (nb == V::kCols)
          weight_grad_chunk<V, false>(X, hs, row_token, b0, b1, max_rank, n, c0, r, b0 == i0, m,
                                      G + r0 * ldg, ldg, c0 - g_col0);
        else
          weight_grad_chunk<V, true>(X, hs, row_token, b0, b1, max_rank, n, c0, r, b0 == i0, m,
                                     G + r0 * ldg, ldg, c0 - g_col0);
      }
    }
  }
}

#if defined(__AVX512F__)
// The expand's two backward products in one pass over the output gradient (AVX-512 only: a
// 16-rank slice is one zmm): per dispatched row i of expert e, u[i, a] = s_e gy[t_i] . B[:, ro_e
// + a] (unweighted), and dB[c, ro_e + a] = sum_i gy[t_i, c] hs[i, a] (hs = c_i h, prepare_rows).
// A tile is NR rows of one expert and one 16-rank slice (lanes past the slice masked off) over
// the caller's columns [c0, c1), 4 columns a step: per column one zmm of B and NR broadcasts of
// gy feed 2 NR FMAs (u in NR accumulators across the columns, dB's column in one, added to what
// the earlier tiles of the expert left in dB). A gy row is read once per slot and slice, where
// the shrink and the weight gradient each read it once (measurements: the launcher,
// sgmv_expand_backward_cpu in csrc/cpu/sgmv.cpp).
template <int NR>
inline void expand_grads_tile(const float* const* gr, const float* hs, int64_t max_rank,
                              const float* B, int64_t ldb, int64_t c0, int64_t c1, __mmask16 m,
                              bool first, float u_scale, float* dB, float* const* u) {
  __m512 h[NR], acc[NR];
  for (int j = 0; j < NR; ++j) {
    h[j] = _mm512_maskz_loadu_ps(m, hs + j * max_rank);
    acc[j] = _mm512_setzero_ps();
  }
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) {
    // One dB accumulator a column: 8 + 8 + 4 + 4 zmm with the broadcast. NOTE: two a column
    // (shorter FMA chains) spilled zmm registers to the stack; one ran the op at 0.82-0.86 ms
    // against 0.92 (T=1024 E=8 k=2 r=16 n=1376, 2 threads, 2-core Xeon, 2026-12-05). Software
    // prefetch of B's and dB's lines 8-32 columns ahead: no faster.
    __m512 b[4], d[4];
    for (int q = 0; q < 4; ++q) {
      b[q] = _mm512_maskz_loadu_ps(m, B + (c + q) * ldb);
      d[q] = _mm512_setzero_ps();
    }
    for (int j = 0; j < NR; ++j) {
      for (int q = 0; q < 4; ++q) {
        const __m512 g = _mm512_set1_ps(gr[j][c + q]);
        acc[j] = _mm512_fmadd_ps(g, b[q], acc[j]);
        d[q] = _mm512_fmadd_ps(g, h[j], d[q]);
      }
    }
    for (int q = 0; q < 4; ++q) {
      float* dp = dB + (c + q) * ldb;
      __m512 v = d[q];
      if (!first) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, dp));
      _mm512_mask_storeu_ps(dp, m, v);
    }
  }
  for (; c < c1; ++c) {
    const __m512 b = _mm512_maskz_loadu_ps(m, B + c * ldb);
    __m512 d = _mm512_setzero_ps();
    for (int j = 0; j < NR; ++j) {
      const __m512 g = _mm512_set1_ps(gr[j][c]);
      acc[j] = _mm512_fmadd_ps(g, b, acc[j]);
      d = _mm512_fmadd_ps(g, h[j], d);
    }
    float* dp = dB + c * ldb;
    if (!first) d = _mm512_add_ps(d, _mm512_maskz_loadu_ps(m, dp));
    _mm512_mask_storeu_ps(dp, m, d);
  }
  const __m512 sc = _mm512_set1_ps(u_scale);
  for (int j = 0; j < NR; ++j) _mm512_mask_storeu_ps(u[j], m, _mm512_mul_ps(acc[j], sc));
}

// Every expert over the columns [c0, c1) of gy [T, n] and dB [n, ldb] (ldb = R; all of dB's
// ranks in those columns written, zeros for experts without rows). u: this column range's part
// of u, rows [P, max_rank], written where a row has ranks (the caller zero-fills, and sums the
// parts of the column ranges). Padding rows (row_token -1) read `zero_row` (n zeros).
inline void expand_grads_cols(const float* gy, int64_t n, const int32_t* row_token,
                              const float* hs, int64_t max_rank, const float* B, int64_t ldb,
                              const int32_t* expert_offsets, const int32_t* rank_offsets,
                              const float* scales, int64_t E, int64_t c0, int64_t c1,
                              const float* zero_row, float* u, float* dB) {
  constexpr int kRows = 8;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t i0 = expert_offsets[e], i1 = expert_offsets[e + 1];
    const int64_t r0 = rank_offsets[e], r = rank_offsets[e + 1] - r0;
    const float s = scales != nullptr ? scales[e] : 1.0f;
    for (int64_t a0 = 0; a0 < r; a0 += 16) {
      const int64_t w = std::min<int64_t>(16, r - a0);
      const __mmask16 m = static_cast<__mmask16>(w == 16 ? 0xffff : (1u << w) - 1);
      if (i0 == i1) {
        for (int64_t c = c0; c < c1; ++c)
          _mm512_mask_storeu_ps(dB + c * ldb + r0 + a0, m, _mm512_setzero_ps());
        continue;
      }
      for (int64_t i = i0; i < i1; i += kRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kRows, i1 - i));
        const float* gr[kRows];
        float* ur[kRows];
        for (int j = 0; j < nr; ++j) {
          const int32_t t = row_token[i + j];
          gr[j] = t >= 0 ? gy + t * n : zero_row;
          ur[j] = u + (i + j) * max_rank + a0;
        }
        const float* hs_i = hs + i * max_rank + a0;
        const float* Bs = B + r0 + a0;
        float* dBs = dB + r0 + a0;
        const bool first = i == i0;
        switch (nr) {
#define MOLORA_EXPAND_GRADS_TILE(NR)                                                    \
  case NR:                                                                              \
    expand_grads_tile<NR>(gr, hs_i, max_rank, Bs, ldb, c0, c1, m, first, s, dBs, ur);    \
    break;
          MOLORA_EXPAND_GRADS_TILE(1) MOLORA_EXPAND_GRADS_TILE(2) MOLORA_EXPAND_GRADS_TILE(3)
          MOLORA_EXPAND_GRADS_TILE(4) MOLORA_EXPAND_GRADS_TILE(5) MOLORA_EXPAND_GRADS_TILE(6)
          MOLORA_EXPAND_GRADS_TILE(7) MOLORA_EXPAND_GRADS_TILE(8)
#undef MOLORA_EXPAND_GRADS_TILE
        }
      }
    }
  }
}
#endif

#if defined(__AVX512F__)
// The router's linear for two rows x0, x1 (the same row twice where only one is left) and EB
// experts from e0: 2 x EB zmm accumulators down d, 16 floats a step, reduced to
// logits[0 / E + e0 + j] = x . W[e0 + j] + bias[e0 + j] (the second row's only where nr = 2).
template <int EB>
inline void router_logits_block(const float* x0, const float* x1, int nr, int64_t d,
                                const float* W, const float* bias, int64_t E, int64_t e0,
                                float* logits) {
  // The steps written out, no lambda over the accumulator arrays: with one, GCC kept them on
  // the stack and stored every accumulator back each step. NOTE: the routed op's router at
  // T=1024 d=512 E=8 k=2 (medians, 2 threads, 2-core Xeon, 2026-12-05): alone and hot 86 -> 71
  // us; its C++ stage timer right after a GEMM of the layer's size 183 -> 148 us (one run each).
  const float* const w = W + e0 * d;
  __m512 acc0[EB], acc1[EB];
#pragma GCC unroll 8
  for (int j = 0; j < EB; ++j) {
    acc0[j] = _mm512_setzero_ps();
    acc1[j] = _mm512_setzero_ps();
  }
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    const __m512 a = _mm512_loadu_ps(x0 + c), b = _mm512_loadu_ps(x1 + c);
#pragma GCC unroll 8
    for (int j = 0; j < EB; ++j) {
      const __m512 wj = _mm512_loadu_ps(w + j * d + c);
      acc0[j] = _mm512_fmadd_ps(a, wj, acc0[j]);
      acc1[j] = _mm512_fmadd_ps(b, wj, acc1[j]);
    }
  }
  if (c < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - c)) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(m, x0 + c), b = _mm512_maskz_loadu_ps(m, x1 + c);
#pragma GCC unroll 8
    for (int j = 0; j < EB; ++j) {
      const __m512 wj = _mm512_maskz_loadu_ps(m, w + j * d + c);
      acc0[j] = _mm512_fmadd_ps(a, wj, acc0[j]);
      acc1[j] = _mm512_fmadd_ps(b, wj, acc1[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < EB; ++j) {
    const float bj = bias != nullptr ? bias[e0 + j] : 0.0f;
    logits[e0 + j] = _mm512_reduce_add_ps(acc0[j]) + bj;
    if (nr > 1) logits[E + e0 + j] = _mm512_reduce_add_ps(acc1[j]) + bj;
  }
}

// Rows [t0, t1) of logits [T, E] = x [T, d] W^T + bias (W [E, d] row-major, bias [E] or null),
// two rows at a time, while the rows kRouterAhead on are prefetched: x comes from memory here
// (the pipeline's first read of it), and the hardware streams alone left the kernel waiting on
// it. NOTE: with routed_moe_lora's softmax-top-k in the same pass (csrc/cpu/router.cpp), at
// T=1024 d=512 E=8 k=2 timed as the bench suite does (one call after other implementations'),
// the router took 163-171 us with 8-32 rows ahead, 195 with none, against 260-280 for the
// BLAS linear (ATen addmm) then softmax_topk (2 threads, 2-core Xeon with AVX-512, 2026-12-05).
// Each thread's shares of B and A also prefetched into L2 here (a slice every 8 rows, for the
// expand's B^T transposes and the shrink's pack): the layer forward 1.265x the base linear
// against 1.250-1.252x, and the transposes no faster (49-53 us a call; 2026-12-06).
constexpr int64_t kRouterAhead = 16;
inline void router_logits_rows(const float* x, const float* W, const float* bias, int64_t d,
                               int64_t E, int64_t t0, int64_t t1, float* logits) {
  for (int64_t t = t0; t < t1; t += 2) {
    for (int64_t q = t + kRouterAhead; q < std::min(t1, t + kRouterAhead + 2); ++q)
      for (int64_t c = 0; c < d; c += 16)
        _mm_prefetch(reinterpret_cast<const char*>(x + q * d + c), _MM_HINT_T0);
    const int nr = t + 1 < t1 ? 2 : 1;
    const float* x0 = x + t * d;
    const float* x1 = nr > 1 ? x0 + d : x0;
    float* out = logits + t * E;
    int64_t e0 = 0;
    for (; e0 + 8 <= E; e0 += 8) router_logits_block<8>(x0, x1, nr, d, W, bias, E, e0, out);
    switch (E - e0) {
      case 7: router_logits_block<7>(x0, x1, nr, d, W, bias, E, e0, out); break;
      case 6: router_logits_block<6>(x0, x1, nr, d, W, bias, E, e0, out); break;
      case 5: router_logits_block<5>(x0, x1, nr, d, W, bias, E, e0, out); break;
      case 4: router_logits_block<4>(x0, x1, nr, d, W, bias, E, e0, out); break;
      case 3: router_logits_block<3>(x0, x1, nr, d, W, bias, E, e0, out); break;
      case 2: router_logits_block<2>(x0, x1, nr, d, W, bias, E, e0, out); break;
      case 1: router_logits_block<1>(x0, x1, nr, d, W, bias, E, e0, out); break;
      default: break;
    }
  }
}
#endif

}  // inline namespace MOLORA_ISA
}  // namespace molora::kernels::avx2
