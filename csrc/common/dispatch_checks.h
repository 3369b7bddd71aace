// Argument checks of the dispatch family (dispatch, gather_rows, combine_rows, pair_dot), shared by
// the CPU launchers (csrc/cpu/dispatch.cpp) and the CUDA launchers (csrc/cuda/dispatch.cu), so
// both raise the same exception classes with the same messages. ATen only, header-only.
//
// `check_values = false` skips the checks that read index VALUES (check_index_range: aminmax +
// .item(), a host synchronisation). The CUDA launchers pass cuda::host_value_checks() (the
// opt-in host mode, outside graph capture); their kernels MOLORA_DEVICE_ASSERT the same ranges,
// so a bad index stops the kernel instead of touching memory out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <optional>

#include "check.h"

namespace molora {

// dispatch(ids [T, k], num_experts, block_size): int32/int64 ids in [-1, E). Returns the number
// of rows P of the expert-ordered layout (T*k, plus E*(block_size-1) when block_size > 1).
inline int64_t check_dispatch_args(const char* op, const at::Tensor& ids, int64_t num_experts,
                                   int64_t block_size, bool check_values = true) {
  check_index(op, "ids", ids);
  check_dim(op, "ids", ids, 2);
  MOLORA_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  MOLORA_CHECK_VALUE(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  // The size checks read no data, so they come before the value check: an over-large (e.g.
  // expanded) ids fails here without the aminmax pass over its T*k elements. The row count is
  // bounded without computing E*(block_size-1), which overflows int64 for a huge block_size.
  MOLORA_CHECK_VALUE(num_experts <= INT32_MAX - 1, op, ": num_experts must be < 2^31 - 1, got ",
                     num_experts);
  const int64_t n_pairs = ids.numel();
  const bool fits = n_pairs <= INT32_MAX &&
                    (block_size == 1 || block_size - 1 <= (INT32_MAX - n_pairs) / num_experts);
  MOLORA_CHECK_VALUE(fits, op, ": T*k + E*(block_size-1) (T*k = ", n_pairs, ", E = ",
                     num_experts, ", block_size = ", block_size,
                     ") dispatched rows do not fit the int32 layout");
  if (check_values) check_index_range(op, "ids", ids, -1, num_experts);
  return block_size == 1 ? n_pairs : n_pairs + num_experts * (block_size - 1);
}

// gather_rows (data = x [T, d], data_rows = T) / combine_rows (data = y_perm [P, d], data_rows =
// P): float data, order [P] and pos [T, k] int32/int64 on data's device, optional weights [T, k];
// order values in [-1, T*k), pos values in [-1, P).
inline void check_rows_args(const char* op, const at::Tensor& data, const at::Tensor& order,
                            const at::Tensor& pos, const std::optional<at::Tensor>& weights,
                            int64_t data_rows, const char* data_name, bool check_values = true) {
  check_float(op, data_name, data);
  check_dim(op, data_name, data, 2);
  check_index(op, "order", order);
  check_index(op, "pos", pos);
  check_dim(op, "order", order, 1);
  check_dim(op, "pos", pos, 2);
  check_device(op, "order", order, data);
  check_device(op, "pos", pos, data);
  MOLORA_CHECK_VALUE(data.size(0) == data_rows, op, ": ", data_name, " must have ", data_rows,
                     " rows, got shape ", data.sizes());
  check_pair_weights(op, weights, pos, data);
  if (check_values) {
    check_index_range(op, "order", order, -1, pos.numel());
    check_index_range(op, "pos", pos, -1, order.size(0));
  }
}

// pair_dot(a [T, d] (a_by_token) or [P, d], b [P, d], pos [T, k], a_by_token): a and b float of one
// dtype, pos int32/int64 with values in [-1, P).
inline void check_pair_dot_args(const char* op, const at::Tensor& a, const at::Tensor& b,
                                const at::Tensor& pos, bool a_by_token, bool check_values = true) {
  check_float(op, "a", a);
  check_same_dtype(op, "b", b, "a", a);
  check_dim(op, "a", a, 2);
  check_dim(op, "b", b, 2);
  check_index(op, "pos", pos);
  check_dim(op, "pos", pos, 2);
  check_device(op, "b", b, a);
  check_device(op, "pos", pos, a);
  const int64_t T = pos.size(0), d = a.size(1);
  check_size(op, "b", b, 1, d);
  if (a_by_token) check_size(op, "a", a, 0, T);
  else check_size(op, "a", a, 0, b.size(0));
  if (check_values) check_index_range(op, "pos", pos, -1, b.size(0));
}

}  // namespace molora
