// The grouped CPU kernels (and the rank-wise masked ones, csrc/kernels/masked_cpu.h) built a
// second time for AVX2 + FMA (csrc/cpu/sgmv_avx2.cpp), fp32 only, and the runtime check that picks
// them. The extension's baseline build targets plain x86-64 (SSE2: 4 lanes, no FMA), where the
// rank-16 expand runs at a fifth of what the same loops reach with 8-lane FMAs; ATen's BLAS
// dispatches on the CPU the same way.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../kernels/sgmv_cpu.h"

namespace molora::cpu::avx2 {

// Whether this build has the AVX2 copies and the CPU runs them (checked once).
bool available();

// The shrink: its bank packed per expert (pack_offsets[e] floats in, shrink_packed_size(r_e, d)
// floats each), then the dispatched rows [i0, i1).
int64_t shrink_packed_size(int64_t r, int64_t d);
void pack_shrink_bank(const float* bank, int64_t sa, int64_t sc, int64_t d, int64_t r0, int64_t r,
                      float* out);
void shrink_rows(const float* x, const float* packed, const int64_t* pack_offsets,
                 const kernels::GroupedMeta& m, const float* w, const float* scales, int64_t d,
                 int64_t max_rank, int64_t i0, int64_t i1, float* h);
void sgmv_expand_range(const float* h, const float* Bt, const kernels::GroupedMeta& m,
                       const int32_t* pos, const float* w, const float* scales, const float* base,
                       int64_t n, int64_t max_rank, int64_t t0, int64_t t1, float* acc, float* y);
void sgmv_expand_cols(const int32_t* row_token, const float* hs, const float* Bt,
                      const kernels::GroupedMeta& m, int64_t n, int64_t max_rank, int64_t n0,
                      int64_t nb, float* acc);
// The register-tiled kernels (csrc/kernels/sgmv_avx2_cpu.h): one token tile of the expand over a
// panel of columns (its places from kernels::expand_tile_slots), and
// the weight gradient over a range of 16-column chunks.
void expand_tile_panel(const float* hs, const int32_t* slots, const int32_t* bucket,
                       const uint8_t* touched, const int32_t* rank_offsets, int64_t E,
                       int64_t max_rank, const float* bt, int64_t ldb, int64_t n, int64_t n0,
                       int64_t n1, const float* base, int64_t t0, int64_t t1, const float* next_y,
                       int64_t next_rows, float* acc, float* y);
void weight_grad_chunks(const float* X, const float* hs, const int32_t* row_token,
                        const int32_t* expert_offsets, const int32_t* rank_offsets, int64_t E,
                        int64_t max_rank, int64_t n, int64_t c_begin, int64_t c_end, float* G,
                        int64_t ldg, int64_t g_col0);
// The rank-wise masked kernels (csrc/kernels/masked_cpu.h) built for AVX2 + FMA: their `omp
// simd` loops in 8-lane FMAs instead of baseline x86-64's 4-lane multiply-adds.
void rank_sparse_shrink_range(const float* x, const float* A, const int32_t* ids, int64_t k,
                              int64_t d, int64_t t0, int64_t t1, float* h);
void rank_sparse_expand_range(const float* values, const int32_t* ids, const float* Bt,
                              const float* w, float scale, const float* base, int64_t k, int64_t n,
                              int64_t t0, int64_t t1, float* acc, float* y);
void rank_sparse_weight_grad_range(const float* x, const float* coef, const int32_t* order,
                                   const int32_t* offsets, int64_t k, int64_t d, int64_t g0,
                                   int64_t g1, float* acc, float* G);
// kernels::transpose_rows built for AVX2 (8 x 8 pieces in ymm registers): fp32 only.
void transpose_rows(const float* in, int64_t s0, int64_t s1, int64_t rows, int64_t cols,
                    int64_t i0, int64_t i1, float* out);
void sgmv_weight_grad_range(const float* x, const float* h, const kernels::GroupedMeta& m,
                            const float* w, const float* scales, int64_t d, int64_t max_rank,
                            int64_t g0, int64_t g1, float* acc, float* G);

}  // namespace molora::cpu::avx2

// The shrink, the expand's token tile and the weight gradient built a third time, for AVX-512
// (csrc/cpu/sgmv_avx512.cpp): 32-column chunks of two zmm per row. The panel the expand is given
// must be a multiple of 32 wide (but the last, which ends at n); the weight gradient's chunks are
// kChunkCols wide.
namespace molora::cpu::avx512 {

// Whether this build has the AVX-512 copy and the CPU runs it (checked once); MOLORA_CPU_ISA=avx2
// keeps the AVX2 copy (tests of that path on an AVX-512 machine).
bool available();

void expand_tile_panel(const float* hs, const int32_t* slots, const int32_t* bucket,
                       const uint8_t* touched, const int32_t* rank_offsets, int64_t E,
                       int64_t max_rank, const float* bt, int64_t ldb, int64_t n, int64_t n0,
                       int64_t n1, const float* base, int64_t t0, int64_t t1, const float* next_y,
                       int64_t next_rows, float* acc, float* y);
// The top-2 expand over tokens grouped by their pair of experts
// (kernels::avx2::expand_pair_groups), columns [col0, col1).
void expand_pair_groups(const float* hs, int64_t max_rank, const int32_t* tok, const int32_t* p1,
                        const int32_t* p2, const int32_t* group_off, const int32_t* group_expert,
                        int64_t groups, const int32_t* rank_offsets, const float* bank, int64_t ld,
                        int64_t chunk_stride, const float* base, int64_t n, int64_t col0,
                        int64_t col1, float* y);
constexpr int64_t kChunkCols = 32;
// The shrink: its bank packed as cpu::avx2's is, but wide chunks (9-16 ranks) in column pairs
// (kernels::avx2::pack_shrink_bank with `pairs`), then the dispatched rows, 6 rows a tile.
int64_t shrink_packed_size(int64_t r, int64_t d);
void pack_shrink_bank(const float* bank, int64_t sa, int64_t sc, int64_t d, int64_t r0, int64_t r,
                      float* out);
void shrink_rows(const float* x, const float* packed, const int64_t* pack_offsets,
                 const kernels::GroupedMeta& m, const float* w, const float* scales, int64_t d,
                 int64_t max_rank, int64_t i0, int64_t i1, float* h);
void weight_grad_chunks(const float* X, const float* hs, const int32_t* row_token,
                        const int32_t* expert_offsets, const int32_t* rank_offsets, int64_t E,
                        int64_t max_rank, int64_t n, int64_t c_begin, int64_t c_end, float* G,
                        int64_t ldg, int64_t g_col0);
// The expand's u and dB in one pass over gy's columns [c0, c1) (kernels::avx2::expand_grads_cols;
// B row-major [n, ldb]).
void expand_grads_cols(const float* gy, int64_t n, const int32_t* row_token, const float* hs,
                       int64_t max_rank, const float* B, int64_t ldb,
                       const int32_t* expert_offsets, const int32_t* rank_offsets,
                       const float* scales, int64_t E, int64_t c0, int64_t c1,
                       const float* zero_row, float* u, float* dB);
// The router's linear, rows [t0, t1) of logits [T, E] = x [T, d] W^T + bias (or none).
void router_logits_rows(const float* x, const float* W, const float* bias, int64_t d, int64_t E,
                        int64_t t0, int64_t t1, float* logits);

}  // namespace molora::cpu::avx512

// fp32 on a CPU with AVX2 + FMA runs the AVX2 copy of a kernel (`call`, float pointers) and
// returns from the enclosing lambda; every other case falls through to the baseline copy.
// (For the launchers, csrc/cpu/*.cpp, built with MOLORA_HAVE_AVX2_KERNELS.)
#ifdef MOLORA_HAVE_AVX2_KERNELS
#define MOLORA_AVX2_OR_FALL_THROUGH(call)          \
  if constexpr (std::is_same_v<scalar_t, float>) { \
    if (cpu::avx2::available()) {                  \
      call;                                        \
      return;                                      \
    }                                              \
  }
#else
#define MOLORA_AVX2_OR_FALL_THROUGH(call)
#endif
