// Small helpers shared by the CPU launchers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/check.h"
#include "../kernels/transpose_cpu.h"
#include "sgmv_isa.h"

namespace molora::cpu {

// Rows per at::parallel_for task so each task does about GRAIN_SIZE elements of work.
inline int64_t grain_for(int64_t work_per_row) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_row));
}

// Index tensors are consumed as contiguous int32.
inline at::Tensor as_i32(const at::Tensor& t) { return t.to(at::kInt).contiguous(); }

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace molora::cpu

// fp32, fp64, fp16 and bf16: every floating dtype the CPU kernels accept.
#define MOLORA_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace molora::cpu {

// m^T as a contiguous [cols, rows] tensor: m.t() itself where that is already contiguous, else a
// cache-blocked copy in parallel (8 x 8 AVX2 pieces for fp32 where the CPU has them).
// NOTE: B [1376, 128] fp32 (the expand's bank), 2 threads, 2-core Xeon: the strided
// m.t().contiguous() 0.12-0.15 ms, 4 x 4 SSE pieces 0.06-0.15 ms (the expand with and without
// it: 0.81 against 0.75 ms), 8 x 8 AVX2 pieces 0.014 ms (2026-12-05).
inline at::Tensor transposed(const at::Tensor& m) {
  const at::Tensor mt = m.t();
  if (mt.is_contiguous()) return mt;
  const int64_t rows = m.size(0), cols = m.size(1);
  at::Tensor out = at::empty({cols, rows}, m.options());
  MOLORA_DISPATCH_FLOATING(m.scalar_type(), "molora_transpose", [&] {
    const scalar_t* in = m.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t s0 = m.stride(0), s1 = m.stride(1);
    at::parallel_for(0, rows, kernels::kTransposeBlock, [&](int64_t i0, int64_t i1) {
      MOLORA_AVX2_OR_FALL_THROUGH(avx2::transpose_rows(reinterpret_cast<const float*>(in), s0, s1,
                                                        rows, cols, i0, i1,
                                                        reinterpret_cast<float*>(o)))
      kernels::transpose_rows(in, s0, s1, rows, cols, i0, i1, o);
    });
  });
  return out;
}

}  // namespace molora::cpu
