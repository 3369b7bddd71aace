// The fp32 shrink, expand, weight gradient and routed_moe_lora's router linear compiled for
// AVX-512 (this file only: -mavx512f -mavx512vl -mavx2 -mfma -DMOLORA_ISA=isa_avx512, see
// CMakeLists.txt): the register-tiled kernels of csrc/kernels/sgmv_avx2_cpu.h with 32-column zmm
// chunks (Zmm32). As in sgmv_avx2.cpp, no torch header is included here, and the kernels' symbols
// live in molora::kernels::avx2::isa_avx512.
#include "sgmv_isa.h"

#include "../kernels/sgmv_avx2_cpu.h"

namespace molora::cpu::avx512 {

void expand_tile_panel(const float* hs, const int32_t* slots, const int32_t* bucket,
                       const uint8_t* touched, const int32_t* rank_offsets, int64_t E,
                       int64_t max_rank, const float* bt, int64_t ldb, int64_t n, int64_t n0,
                       int64_t n1, const float* base, int64_t t0, int64_t t1, const float* next_y,
                       int64_t next_rows, float* acc, float* y) {
  kernels::avx2::expand_tile_panel<kernels::avx2::Zmm32>(hs, slots, bucket, touched, rank_offsets,
                                                         E, max_rank, bt, ldb, n, n0, n1, base,
                                                         t0, t1, next_y, next_rows, acc, y);
}

void expand_pair_groups(const float* hs, int64_t max_rank, const int32_t* tok, const int32_t* p1,
                        const int32_t* p2, const int32_t* group_off, const int32_t* group_expert,
                        int64_t groups, const int32_t* rank_offsets, const float* bank, int64_t ld,
                        int64_t chunk_stride, const float* base, int64_t n, int64_t col0,
                        int64_t col1, float* y) {
  kernels::avx2::expand_pair_groups<kernels::avx2::Zmm32>(
      hs, max_rank, tok, p1, p2, group_off, group_expert, groups, rank_offsets, bank, ld,
      chunk_stride, base, n, col0, col1, y);
}

int64_t shrink_packed_size(int64_t r, int64_t d) {
  return kernels::avx2::shrink_packed_size(r, d, true);
}

void pack_shrink_bank(const float* bank, int64_t sa, int64_t sc, int64_t d, int64_t r0, int64_t r,
                      float* out) {
  kernels::avx2::pack_shrink_bank(bank, sa, sc, d, r0, r, out, true);
}

void shrink_rows(const float* x, const float* packed, const int64_t* pack_offsets,
                 const kernels::GroupedMeta& m, const float* w, const float* scales, int64_t d,
                 int64_t max_rank, int64_t i0, int64_t i1, float* h) {
  kernels::avx2::shrink_rows<kernels::avx2::kTileRows, true>(x, packed, pack_offsets, m, w,
                                                            scales, d, max_rank, i0, i1, h);
}

void weight_grad_chunks(const float* X, const float* hs, const int32_t* row_token,
                        const int32_t* expert_offsets, const int32_t* rank_offsets, int64_t E,
                        int64_t max_rank, int64_t n, int64_t c_begin, int64_t c_end, float* G,
                        int64_t ldg, int64_t g_col0) {
  kernels::avx2::weight_grad_chunks<kernels::avx2::Zmm32>(X, hs, row_token, expert_offsets,
                                                          rank_offsets, E, max_rank, n, c_begin,
                                                          c_end, G, ldg, g_col0);
}

void expand_grads_cols(const float* gy, int64_t n, const int32_t* row_token, const float* hs,
                       int64_t max_rank, const float* B, int64_t ldb,
                       const int32_t* expert_offsets, const int32_t* rank_offsets,
                       const float* scales, int64_t E, int64_t c0, int64_t c1,
                       const float* zero_row, float* u, float* dB) {
  kernels::avx2::expand_grads_cols(gy, n, row_token, hs, max_rank, B, ldb, expert_offsets,
                                   rank_offsets, scales, E, c0, c1, zero_row, u, dB);
}

void router_logits_rows(const float* x, const float* W, const float* bias, int64_t d, int64_t E,
                        int64_t t0, int64_t t1, float* logits) {
  kernels::avx2::router_logits_rows(x, W, bias, d, E, t0, t1, logits);
}

}  // namespace molora::cpu::avx512
