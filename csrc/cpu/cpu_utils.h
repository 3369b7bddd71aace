// Small helpers shared by the CPU launchers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/check.h"
#include "../kernels/transpose_cpu.h"

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
// cache-blocked copy in parallel. NOTE: B [1376, 128] fp32 (the expand's bank): the strided
// m.t().contiguous() took 0.13-0.22 ms of the expand's 1.1-1.5 (T=1024, 2 threads, 2-core x86 CPU
// machine, 2026-12-04).
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
      kernels::transpose_rows(in, s0, s1, rows, cols, i0, i1, o);
    });
  });
  return out;
}

}  // namespace molora::cpu
