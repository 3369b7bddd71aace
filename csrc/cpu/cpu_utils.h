// Small helpers shared by the CPU launchers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/check.h"

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
