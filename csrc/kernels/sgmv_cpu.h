// Grouped (segmented) low-rank matmuls on the CPU, SGMV-style: expert e's rows of the dispatched
// layout use the slice rank_offsets[e]:rank_offsets[e+1] of a stacked bank. Ragged ranks need no
// padded weights. Framework-free; each function owns a range of output rows (no races).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "simd.h"

#include "dispatch_cpu.h"

namespace molora::kernels {

// Segment metadata shared by the grouped kernels.
struct GroupedMeta {
  const int32_t* order;           // [P] pair index per row, -1 = padding
  const int32_t* expert_offsets;  // [E+1]
  const int32_t* rank_offsets;    // [E+1]
  int64_t num_experts;
  int64_t top_k;
  int64_t num_rows;  // P
};

// Output columns per block of sgmv_expand_cols: one 64-byte line of fp32.
constexpr int64_t kExpandCols = 16;

inline namespace MOLORA_ISA {

// The row's coefficient c_i = w[p] * s_e (either factor may be absent).
template <typename acc_t>
inline acc_t row_coef(const acc_t* w, const acc_t* scales, int32_t p, int64_t e) {
  acc_t c = w != nullptr ? w[p] : acc_t(1);
  return scales != nullptr ? c * scales[e] : c;
}

// The row of slot p = t * top_k + j of the token-owned layouts: (false when the slot is empty)
// its dispatched row i = pos[p], expert e, bank columns [r0, r0 + r) and coefficient c.
template <typename acc_t>
struct SlotRow {
  int64_t i, e, r0, r;
  acc_t c;
};

template <typename acc_t>
inline bool slot_row(const GroupedMeta& m, const int32_t* pos, const acc_t* w,
                     const acc_t* scales, int64_t p, SlotRow<acc_t>& s) {
  s.i = pos[p];
  if (s.i < 0) return false;
  s.e = expert_of_row(m.expert_offsets, m.num_experts, s.i);
  s.r0 = m.rank_offsets[s.e];
  s.r = m.rank_offsets[s.e + 1] - s.r0;
  s.c = row_coef(w, scales, static_cast<int32_t>(p), s.e);
  return true;
}

// The next (up to) N real rows of expert e from row i on, stopping at seg_end (i advances past
// them; padding rows are skipped): their x rows, row indices and coefficients. Lanes past the
// count repeat the first x row (computed by the callers' tiles, never stored). Returns the count.
template <int N, typename scalar_t, typename acc_t>
inline int next_expert_rows(const GroupedMeta& m, const scalar_t* x, int64_t d, const acc_t* w,
                            const acc_t* scales, int64_t e, int64_t seg_end, int64_t& i,
                            const scalar_t* (&xr)[N], int64_t (&rows)[N], acc_t (&coef)[N]) {
  int n = 0;
  for (; i < seg_end && n < N; ++i) {
    const int32_t p = m.order[i];
    if (p < 0) continue;
    xr[n] = x + (p / m.top_k) * d;
    rows[n] = i;
    coef[n] = row_coef(w, scales, p, e);
    ++n;
  }
  for (int b = n; b < N; ++b) xr[b] = n > 0 ? xr[0] : x;
  return n;
}

// h[i, a] = c_i * dot(A[ro_e + a], x[t_i]) for rows [i0, i1); zero beyond r_e and on padding.
// A is [R, d] row-major (rank-major), x is [T, d]. Up to kRowBlock rows of one expert share each
// load of A. NOTE: 1.88 -> 0.80 ms against one row at a time (T=1024, k=2, d=512, E=8, r=16, fp32,
// 2-core x86 CPU machine, 2026-11-23).
template <typename scalar_t, typename acc_t>
void sgmv_shrink_range(const scalar_t* x, const scalar_t* A, const GroupedMeta& m, const acc_t* w,
                       const acc_t* scales, int64_t d, int64_t max_rank, int64_t i0, int64_t i1,
                       scalar_t* h) {
  constexpr int kRowBlock = 4;
  const int64_t covered = m.expert_offsets[m.num_experts];
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t a = 0; a < max_rank; ++a) h[i * max_rank + a] = scalar_t(0);
  int64_t i = i0;
  while (i < std::min(i1, covered)) {
    const int64_t e = expert_of_row(m.expert_offsets, m.num_experts, i);
    const int64_t seg_end = std::min<int64_t>(i1, m.expert_offsets[e + 1]);
    const int64_t r0 = m.rank_offsets[e], r = m.rank_offsets[e + 1] - r0;
    // The next (up to) kRowBlock real rows of expert e; padding rows stay zero.
    const scalar_t* xr[kRowBlock];
    int64_t rows[kRowBlock];
    acc_t coef[kRowBlock];
    const int n = next_expert_rows(m, x, d, w, scales, e, seg_end, i, xr, rows, coef);
    if (n == 0) continue;
    for (int64_t a = 0; a < r; ++a) {
      const scalar_t* ar = A + (r0 + a) * d;
      acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      MOLORA_PRAGMA(omp simd reduction(+ : s0, s1, s2, s3))
      for (int64_t c2 = 0; c2 < d; ++c2) {
        const acc_t av = static_cast<acc_t>(ar[c2]);
        s0 += av * static_cast<acc_t>(xr[0][c2]);
        s1 += av * static_cast<acc_t>(xr[1][c2]);
        s2 += av * static_cast<acc_t>(xr[2][c2]);
        s3 += av * static_cast<acc_t>(xr[3][c2]);
      }
      const acc_t sums[kRowBlock] = {s0, s1, s2, s3};
      for (int b = 0; b < n; ++b) h[rows[b] * max_rank + a] = static_cast<scalar_t>(coef[b] * sums[b]);
    }
  }
}

// y[t] = base[t] + sum_j c_i * sum_{a < r_e} h[i, a] * Bt[ro_e + a]  (i = pos[t, j]) for tokens
// [t0, t1). Bt is the bank transposed to [R, n] so the inner loop is contiguous. Token-owned, so
// several experts adding into one token need no atomics and the result is deterministic.
template <typename scalar_t, typename acc_t>
void sgmv_expand_range(const scalar_t* h, const scalar_t* Bt, const GroupedMeta& m,
                       const int32_t* pos, const acc_t* w, const acc_t* scales,
                       const scalar_t* base, int64_t n, int64_t max_rank, int64_t t0, int64_t t1,
                       acc_t* acc, scalar_t* y) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t o = 0; o < n; ++o) acc[o] = base != nullptr ? static_cast<acc_t>(base[t * n + o]) : acc_t(0);
    for (int64_t j = 0; j < m.top_k; ++j) {
      SlotRow<acc_t> sr;
      if (!slot_row(m, pos, w, scales, t * m.top_k + j, sr)) continue;
      const int64_t r0 = sr.r0, r = sr.r;
      const acc_t c = sr.c;
      const scalar_t* hr = h + sr.i * max_rank;
      int64_t a = 0;
      // Four rank columns per pass over acc: a quarter of the acc loads and stores.
      for (; a + 4 <= r; a += 4) {
        const acc_t c0 = c * static_cast<acc_t>(hr[a]), c1 = c * static_cast<acc_t>(hr[a + 1]);
        const acc_t c2 = c * static_cast<acc_t>(hr[a + 2]), c3 = c * static_cast<acc_t>(hr[a + 3]);
        const scalar_t* b0 = Bt + (r0 + a) * n;
        MOLORA_SIMD
        for (int64_t o = 0; o < n; ++o)
          acc[o] += c0 * static_cast<acc_t>(b0[o]) + c1 * static_cast<acc_t>(b0[n + o]) +
                    c2 * static_cast<acc_t>(b0[2 * n + o]) + c3 * static_cast<acc_t>(b0[3 * n + o]);
      }
      for (; a < r; ++a) {
        const acc_t coef = c * static_cast<acc_t>(hr[a]);
        const scalar_t* br = Bt + (r0 + a) * n;
        MOLORA_SIMD
        for (int64_t o = 0; o < n; ++o) acc[o] += coef * static_cast<acc_t>(br[o]);
      }
    }
    for (int64_t o = 0; o < n; ++o) y[t * n + o] = static_cast<scalar_t>(acc[o]);
  }
}

// The expand for small batches as the dense form: hd[t, ro_e + a] += c_i * h[i, a] over the
// slots of tokens [t0, t1) (i = pos[t, j]); y = base + hd B^T is then one BLAS GEMM that reads B
// in place (T * R * n FMAs, fewer than the R * n transposed copy of B the other kernels need
// while T is small).
template <typename scalar_t, typename acc_t>
void expand_rows_dense(const scalar_t* h, const GroupedMeta& m, const int32_t* pos,
                       const acc_t* w, const acc_t* scales, int64_t max_rank, int64_t R,
                       int64_t t0, int64_t t1, acc_t* hd) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t j = 0; j < m.top_k; ++j) {
      SlotRow<acc_t> sr;
      if (!slot_row(m, pos, w, scales, t * m.top_k + j, sr)) continue;
      for (int64_t a = 0; a < sr.r; ++a)
        hd[t * R + sr.r0 + a] += sr.c * static_cast<acc_t>(h[sr.i * max_rank + a]);
    }
  }
}

// The token-tiled expand's inputs for slots [p0, p1) (p = t * top_k + j): the expert of each slot
// (-1 when empty) and its coefficient-scaled h row in slot order, hs[p, a] = c_p * h[pos[p], a]
// (0 beyond r_e and on empty slots), so the tiles read neither pos nor the routing weights.
template <typename scalar_t, typename acc_t>
void expand_slots_prepare(const scalar_t* h, const GroupedMeta& m, const int32_t* pos,
                          const acc_t* w, const acc_t* scales, int64_t max_rank, int64_t p0,
                          int64_t p1, int32_t* slot_expert, acc_t* hs) {
  for (int64_t p = p0; p < p1; ++p) {
    acc_t* out = hs + p * max_rank;
    SlotRow<acc_t> sr;
    if (!slot_row(m, pos, w, scales, p, sr)) {
      slot_expert[p] = -1;
      for (int64_t a = 0; a < max_rank; ++a) out[a] = acc_t(0);
      continue;
    }
    slot_expert[p] = static_cast<int32_t>(sr.e);
    for (int64_t a = 0; a < max_rank; ++a)
      out[a] = a < sr.r ? sr.c * static_cast<acc_t>(h[sr.i * max_rank + a]) : acc_t(0);
  }
}

// The register-tiled expand's places (csrc/kernels/sgmv_avx2_cpu.h) for the token tile [t0, t1),
// bucketed by expert (counting sort, stable): place s of expert e (bucket[e] <= s < bucket[e + 1])
// holds the slot p (slots[2 s], its hs row) and its token's row in the tile (slots[2 s + 1], no
// division in the tile loops). Without base, a row's first place in processing order (experts in
// turn) is marked ~row: it writes its row instead of adding to it, and only rows no slot touches
// are zero-filled (no zero pass over the whole tile). NOTE: that pass was 13% of the kernel's
// samples (perf, T=1024, n=1376, E=8, k=2, r=16); without it 1.43-1.69 -> 1.24-1.38 ms (min of
// alternating runs, 2 threads, 2-core x86 CPU machine, 2026-12-04); E=64 k=8 r=8 n=1024 on par.
// Experts of rank 0 get no places. Scratch: slots [2 * (t1 - t0) * k], bucket [E + 1],
// touched [t1 - t0].
inline void expand_tile_slots(const int32_t* slot_expert, const int32_t* rank_offsets, int64_t E,
                              int64_t k, bool has_base, int64_t t0, int64_t t1, int32_t* slots,
                              int32_t* bucket, uint8_t* touched) {
  const auto live = [&](int64_t p) {
    const int32_t e = slot_expert[p];
    return e >= 0 && rank_offsets[e + 1] > rank_offsets[e];
  };
  std::fill(bucket, bucket + E + 1, 0);
  for (int64_t p = t0 * k; p < t1 * k; ++p)
    if (live(p)) ++bucket[slot_expert[p] + 1];
  for (int64_t e = 0; e < E; ++e) bucket[e + 1] += bucket[e];
  // bucket[e] is the next free place of expert e while filling, then expert e's end: shift back.
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t p = t * k; p < (t + 1) * k; ++p)
      if (live(p)) {
        int32_t* place = slots + 2 * bucket[slot_expert[p]]++;
        place[0] = static_cast<int32_t>(p);
        place[1] = static_cast<int32_t>(t - t0);
      }
  for (int64_t e = E; e > 0; --e) bucket[e] = bucket[e - 1];
  bucket[0] = 0;
  std::fill(touched, touched + (t1 - t0), has_base ? 1 : 0);
  if (has_base) return;
  for (int64_t s = 0; s < bucket[E]; ++s) {
    int32_t& row = slots[2 * s + 1];
    if (!touched[row]) {
      touched[row] = 1;
      row = ~row;
    }
  }
}

// The expand for large batches, step 1 of 2, rows [i0, i1): the token of every dispatched row
// (-1 on padding) and its coefficient-scaled h row, hs[i, a] = c_i * h[i, a] in opmath (0 on
// padding: every row of hs is written), so the column blocks of step 2 neither divide nor
// multiply per row again (86 blocks at n = 1376).
template <typename scalar_t, typename acc_t>
void expand_rows_prepare(const scalar_t* h, const GroupedMeta& m, const acc_t* w,
                         const acc_t* scales, int64_t max_rank, int64_t i0, int64_t i1,
                         int32_t* row_token, acc_t* hs) {
  const int64_t covered = m.expert_offsets[m.num_experts];
  for (int64_t i = i0; i < i1; ++i) {
    const int32_t p = i < covered ? m.order[i] : -1;
    row_token[i] = p < 0 ? -1 : static_cast<int32_t>(p / m.top_k);
    if (p < 0) {
      for (int64_t a = 0; a < max_rank; ++a) hs[i * max_rank + a] = acc_t(0);
      continue;
    }
    const int64_t e = expert_of_row(m.expert_offsets, m.num_experts, i);
    const acc_t c = row_coef(w, scales, p, e);
    for (int64_t a = 0; a < max_rank; ++a)
      hs[i * max_rank + a] = c * static_cast<acc_t>(h[i * max_rank + a]);
  }
}

// A group of column blocks in and out: block b of the group holds acc[b][t, :nb_b] =
// src[t, n0 + 16 b : ...] (0 without src), and back. Rows outermost: each row's span of the group
// (up to 512 B) is read or written in one piece; row by row per block, every row was a new page
// (the row stride is n * 4 bytes) for every one of the group's blocks.
template <typename scalar_t, typename acc_t>
void group_rows_load(const scalar_t* src, int64_t T, int64_t n, int64_t n0, int64_t n1,
                     acc_t* acc) {
  const int64_t nblk = (n1 - n0 + kExpandCols - 1) / kExpandCols;
  if (src == nullptr) {
    std::fill(acc, acc + nblk * T * kExpandCols, acc_t(0));
    return;
  }
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* row = src + t * n;
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t c0 = n0 + b * kExpandCols, nb = std::min(kExpandCols, n1 - c0);
      acc_t* dst = acc + b * T * kExpandCols + t * nb;
      for (int64_t o = 0; o < nb; ++o) dst[o] = static_cast<acc_t>(row[c0 + o]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void group_rows_store(const acc_t* acc, int64_t T, int64_t n, int64_t n0, int64_t n1,
                      scalar_t* dst) {
  const int64_t nblk = (n1 - n0 + kExpandCols - 1) / kExpandCols;
  for (int64_t t = 0; t < T; ++t) {
    scalar_t* row = dst + t * n;
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t c0 = n0 + b * kExpandCols, nb = std::min(kExpandCols, n1 - c0);
      const acc_t* src = acc + b * T * kExpandCols + t * nb;
      for (int64_t o = 0; o < nb; ++o) row[c0 + o] = static_cast<scalar_t>(src[o]);
    }
  }
}

// Step 2, expert-major over one block of kExpandCols output columns [n0, n0 + nb):
// acc[t, :nb] (opmath rows of the block, holding base or 0 on entry) += hs[i, :r_e] @
// Bt[ro_e : ro_e + r_e, n0 : n0 + nb) for every dispatched row i (token t_i). A block row is one
// 64-byte line of fp32, so the block's acc [T, 16] stays in L2 and the expert's [r_e, 16] slice
// of Bt in L1 while its rows stream past; each row's 16 outputs stay in registers through the
// rank loop, four rows at a time (four independent FMA chains per B load). The token-owned
// kernel above instead reloads a token's whole [r_e, n] slice of Bt from L2 for every slot. A
// block is owned by one thread and rows are added in dispatch order (experts ascending, then
// stable token order): deterministic.
template <typename scalar_t, typename acc_t>
void sgmv_expand_cols(const int32_t* row_token, const acc_t* hs, const scalar_t* Bt,
                      const GroupedMeta& m, int64_t n, int64_t max_rank, int64_t n0, int64_t nb,
                      acc_t* acc) {
  constexpr int kRows = 4;
  for (int64_t e = 0; e < m.num_experts; ++e) {
    const int64_t r0 = m.rank_offsets[e], r = m.rank_offsets[e + 1] - r0;
    if (r == 0) continue;
    const scalar_t* bcol = Bt + r0 * n + n0;
    int64_t i = m.expert_offsets[e];
    const int64_t end = m.expert_offsets[e + 1];
    while (i < end) {
      acc_t* dst[kRows];
      const acc_t* hr[kRows];
      int nr = 0;
      for (; i < end && nr < kRows; ++i) {
        if (row_token[i] < 0) continue;
        dst[nr] = acc + static_cast<int64_t>(row_token[i]) * nb;
        hr[nr] = hs + i * max_rank;
        ++nr;
      }
      if (nr == kRows && nb == kExpandCols) {
        acc_t v0[kExpandCols], v1[kExpandCols], v2[kExpandCols], v3[kExpandCols];
        for (int64_t o = 0; o < kExpandCols; ++o) {
          v0[o] = 0; v1[o] = 0; v2[o] = 0; v3[o] = 0;
        }
        const acc_t *h0 = hr[0], *h1 = hr[1], *h2 = hr[2], *h3 = hr[3];
        for (int64_t a = 0; a < r; ++a) {
          const scalar_t* br = bcol + a * n;
          MOLORA_SIMD
          for (int64_t o = 0; o < kExpandCols; ++o) {
            const acc_t bv = static_cast<acc_t>(br[o]);
            v0[o] += h0[a] * bv;
            v1[o] += h1[a] * bv;
            v2[o] += h2[a] * bv;
            v3[o] += h3[a] * bv;
          }
        }
        // Sequential adds: two rows of one token (a repeated expert id) both land.
        for (int64_t o = 0; o < kExpandCols; ++o) dst[0][o] += v0[o];
        for (int64_t o = 0; o < kExpandCols; ++o) dst[1][o] += v1[o];
        for (int64_t o = 0; o < kExpandCols; ++o) dst[2][o] += v2[o];
        for (int64_t o = 0; o < kExpandCols; ++o) dst[3][o] += v3[o];
        continue;
      }
      for (int b = 0; b < nr; ++b) {  // a partial group, or the last, narrower column block
        for (int64_t a = 0; a < r; ++a) {
          const acc_t ha = hr[b][a];
          const scalar_t* br = bcol + a * n;
          for (int64_t o = 0; o < nb; ++o) dst[b][o] += ha * static_cast<acc_t>(br[o]);
        }
      }
    }
  }
}

// Grouped X^T Y: G[ro_e + a] = sum_{rows i of e} c_i * h[i, a] * x[t_i] for bank rows [g0, g1).
// Each bank row is owned by one thread, so accumulation order is fixed (deterministic). Gives dA
// (x = input, h = grad of the shrink output) and dB^T (x = grad of the output, h = shrink output).
// Up to kBankBlock bank rows of one expert share each load of an x row; `acc` holds
// kBankBlock * d values. NOTE: 1.59 -> 1.05 ms against one bank row at a time (same shape).
inline constexpr int kBankBlock = 4;

template <typename scalar_t, typename acc_t>
void sgmv_weight_grad_range(const scalar_t* x, const scalar_t* h, const GroupedMeta& m,
                            const acc_t* w, const acc_t* scales, int64_t d, int64_t max_rank,
                            int64_t g0, int64_t g1, acc_t* acc, scalar_t* G) {
  for (int64_t g = g0; g < g1;) {
    // The expert owning bank row g (ranks of zero width are skipped by the search), and the
    // block of its bank rows handled together.
    const int64_t e = expert_of_row(m.rank_offsets, m.num_experts, g);
    const int64_t a0 = g - m.rank_offsets[e];
    const int nb = static_cast<int>(std::min<int64_t>({kBankBlock, g1 - g, m.rank_offsets[e + 1] - g}));
    for (int64_t c2 = 0; c2 < kBankBlock * d; ++c2) acc[c2] = 0;
    for (int64_t i = m.expert_offsets[e]; i < m.expert_offsets[e + 1]; ++i) {
      const int32_t p = m.order[i];
      if (p < 0) continue;
      const acc_t c = row_coef(w, scales, p, e);
      acc_t coef[kBankBlock] = {0, 0, 0, 0};
      for (int b = 0; b < nb; ++b) coef[b] = c * static_cast<acc_t>(h[i * max_rank + a0 + b]);
      const scalar_t* xr = x + (p / m.top_k) * d;
      MOLORA_SIMD
      for (int64_t c2 = 0; c2 < d; ++c2) {
        const acc_t xv = static_cast<acc_t>(xr[c2]);
        acc[c2] += coef[0] * xv;
        acc[d + c2] += coef[1] * xv;
        acc[2 * d + c2] += coef[2] * xv;
        acc[3 * d + c2] += coef[3] * xv;
      }
    }
    for (int b = 0; b < nb; ++b)
      for (int64_t c2 = 0; c2 < d; ++c2) G[(g + b) * d + c2] = static_cast<scalar_t>(acc[b * d + c2]);
    g += nb;
  }
}

// Dense stacked gating: out[t, c] = gate[t, e(c)] * s_e * h[t, c] over the R bank columns, with
// col_expert[c] = e(c). Shared by the gated forward (h = x A^T) and its backward (h = dy B).
template <typename acc_t>
void gate_rank_blocks_range(const acc_t* h, const acc_t* gate, const acc_t* scales,
                            const int32_t* col_expert, int64_t E, int64_t R, int64_t t0,
                            int64_t t1, acc_t* out) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t c = 0; c < R; ++c) {
      const int32_t e = col_expert[c];
      const acc_t s = scales != nullptr ? scales[e] : acc_t(1);
      out[t * R + c] = gate[t * E + e] * s * h[t * R + c];
    }
  }
}

// dgate[t, e] = s_e * sum_{c in e} dhg[t, c] * h[t, c].
template <typename acc_t>
void gate_grad_range(const acc_t* dhg, const acc_t* h, const acc_t* scales,
                     const int32_t* rank_offsets, int64_t E, int64_t R, int64_t t0, int64_t t1,
                     acc_t* dgate) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t e = 0; e < E; ++e) {
      acc_t s = 0;
      for (int64_t c = rank_offsets[e]; c < rank_offsets[e + 1]; ++c) s += dhg[t * R + c] * h[t * R + c];
      dgate[t * E + e] = scales != nullptr ? s * scales[e] : s;
    }
  }
}

}  // namespace MOLORA_ISA
}  // namespace molora::kernels
