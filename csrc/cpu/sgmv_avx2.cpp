// The fp32 grouped kernels, and the rank-wise masked ones (SMoRA, FlyLoRA: masked_cpu.h),
// compiled for AVX2 + FMA (this file only: -mavx2 -mfma -DMOLORA_ISA=isa_avx2, see
// CMakeLists.txt). No torch header is included here, so no torch inline function is ever
// instantiated with AVX2 code; the kernels' own symbols live in molora::kernels::isa_avx2
// (csrc/kernels/isa.h).
#include "sgmv_isa.h"

#include "../kernels/masked_cpu.h"
#include "../kernels/sgmv_avx2_cpu.h"
#include "../kernels/transpose_cpu.h"

namespace molora::cpu::avx2 {

// The launcher (csrc/cpu/sgmv.cpp) gives the expand panels of whole 32-column chunks: whole
// 16-column chunks here.
static_assert(32 % kernels::avx2::Ymm16::kCols == 0);

int64_t shrink_packed_size(int64_t r, int64_t d) {
  return kernels::avx2::shrink_packed_size(r, d);
}

void pack_shrink_bank(const float* bank, int64_t sa, int64_t sc, int64_t d, int64_t r0, int64_t r,
                      float* out) {
  kernels::avx2::pack_shrink_bank(bank, sa, sc, d, r0, r, out);
}

void shrink_rows(const float* x, const float* packed, const int64_t* pack_offsets,
                 const kernels::GroupedMeta& m, const float* w, const float* scales, int64_t d,
                 int64_t max_rank, int64_t i0, int64_t i1, float* h) {
  kernels::avx2::shrink_rows(x, packed, pack_offsets, m, w, scales, d, max_rank, i0, i1, h);
}

void sgmv_expand_range(const float* h, const float* Bt, const kernels::GroupedMeta& m,
                       const int32_t* pos, const float* w, const float* scales, const float* base,
                       int64_t n, int64_t max_rank, int64_t t0, int64_t t1, float* acc, float* y) {
  kernels::sgmv_expand_range<float, float>(h, Bt, m, pos, w, scales, base, n, max_rank, t0, t1,
                                           acc, y);
}

void sgmv_expand_cols(const int32_t* row_token, const float* hs, const float* Bt,
                      const kernels::GroupedMeta& m, int64_t n, int64_t max_rank, int64_t n0,
                      int64_t nb, float* acc) {
  kernels::sgmv_expand_cols<float, float>(row_token, hs, Bt, m, n, max_rank, n0, nb, acc);
}

void rank_sparse_shrink_range(const float* x, const float* A, const int32_t* ids, int64_t k,
                              int64_t d, int64_t t0, int64_t t1, float* h) {
  kernels::rank_sparse_shrink_range<float, float>(x, A, ids, k, d, t0, t1, h);
}

void rank_sparse_expand_range(const float* values, const int32_t* ids, const float* Bt,
                              const float* w, float scale, const float* base, int64_t k, int64_t n,
                              int64_t t0, int64_t t1, float* acc, float* y) {
  kernels::rank_sparse_expand_range<float, float>(values, ids, Bt, w, scale, base, k, n, t0, t1,
                                                  acc, y);
}

void rank_sparse_weight_grad_range(const float* x, const float* coef, const int32_t* order,
                                   const int32_t* offsets, int64_t k, int64_t d, int64_t g0,
                                   int64_t g1, float* acc, float* G) {
  kernels::rank_sparse_weight_grad_range<float, float>(x, coef, order, offsets, k, d, g0, g1, acc,
                                                       G);
}

void transpose_rows(const float* in, int64_t s0, int64_t s1, int64_t rows, int64_t cols,
                    int64_t i0, int64_t i1, float* out) {
  kernels::transpose_rows<float>(in, s0, s1, rows, cols, i0, i1, out);
}

void sgmv_weight_grad_range(const float* x, const float* h, const kernels::GroupedMeta& m,
                            const float* w, const float* scales, int64_t d, int64_t max_rank,
                            int64_t g0, int64_t g1, float* acc, float* G) {
  kernels::sgmv_weight_grad_range<float, float>(x, h, m, w, scales, d, max_rank, g0, g1, acc, G);
}

void expand_tile_panel(const float* hs, const int32_t* slots, const int32_t* bucket,
                       const uint8_t* touched, const int32_t* rank_offsets, int64_t E,
                       int64_t max_rank, const float* bt, int64_t ldb, int64_t n, int64_t n0,
                       int64_t n1, const float* base, int64_t t0, int64_t t1, const float* next_y,
                       int64_t next_rows, float* acc, float* y) {
  kernels::avx2::expand_tile_panel<kernels::avx2::Ymm16>(hs, slots, bucket, touched, rank_offsets,
                                                         E, max_rank, bt, ldb, n, n0, n1, base,
                                                         t0, t1, next_y, next_rows, acc, y);
}

void weight_grad_chunks(const float* X, const float* hs, const int32_t* row_token,
                        const int32_t* expert_offsets, const int32_t* rank_offsets, int64_t E,
                        int64_t max_rank, int64_t n, int64_t c_begin, int64_t c_end, float* G,
                        int64_t ldg, int64_t g_col0) {
  kernels::avx2::weight_grad_chunks(X, hs, row_token, expert_offsets, rank_offsets, E, max_rank,
                                    n, c_begin, c_end, G, ldg, g_col0);
}

}  // namespace molora::cpu::avx2
