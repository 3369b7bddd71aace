// Argument checks of the rank-wise masked-activation family, shared by the CPU launchers
// (csrc/cpu/masked.cpp) and the CUDA launchers (csrc/cuda/masked.cu), so both raise the same
// exception classes with the same messages. ATen only, header-only.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "check.h"

namespace molora {

// rank_topk(h [T, R], k, scores [T, R]?, bias [R]?): float inputs on h's device, k in [1, R].
inline void check_rank_topk_args(const char* op, const at::Tensor& h, int64_t k,
                                 const std::optional<at::Tensor>& scores,
                                 const std::optional<at::Tensor>& bias) {
  check_float(op, "h", h);
  check_dim(op, "h", h, 2);
  const int64_t R = h.size(1);
  MOLORA_CHECK_VALUE(k >= 1 && k <= R, op, ": k must be in [1, R] = [1, ", R, "], got ", k);
  if (h.numel() > 0) check_index_bound(op, "ids", R);  // the int32 ids it returns
  if (scores.has_value()) {
    check_float(op, "scores", *scores);
    check_device(op, "scores", *scores, h);
    MOLORA_CHECK_VALUE(scores->sizes() == h.sizes(), op, ": scores must have the shape of h ",
                       h.sizes(), ", got ", scores->sizes());
  }
  if (bias.has_value()) {
    check_float(op, "bias", *bias);
    check_device(op, "bias", *bias, h);
    MOLORA_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == R, op, ": bias must have shape (", R,
                       "), got ", bias->sizes());
  }
}

// id_histogram(ids [...], num_bins): int32/int64 ids, num_bins >= 1. The value range of the ids
// ([-1, num_bins)) is checked separately (check_index_range reads the data).
inline void check_id_histogram_args(const char* op, const at::Tensor& ids, int64_t num_bins) {
  check_index(op, "ids", ids);
  MOLORA_CHECK_VALUE(num_bins >= 1, op, ": num_bins must be >= 1, got ", num_bins);
  if (ids.numel() > 0) check_index_bound(op, "ids", num_bins);
}

// Rank ids [T, k] of ranks in [-1, num_ranks) on ref's device. check_values = false skips the
// value range (it reads the data to the host: the CUDA launchers check it only in the opt-in host
// mode; their kernels assert it on the device).
inline void check_rank_ids(const char* op, const at::Tensor& ids, int64_t T, int64_t num_ranks,
                           const at::Tensor& ref, bool check_values = true) {
  check_index(op, "ids", ids);
  check_dim(op, "ids", ids, 2);
  check_size(op, "ids", ids, 0, T);
  check_device(op, "ids", ids, ref);
  // every mode, also without the value read: the kernels narrow the ids to int32
  if (ids.numel() > 0) check_index_bound(op, "ids", num_ranks);
  if (check_values) check_index_range(op, "ids", ids, -1, num_ranks);
}

// rank_scatter(src [T, k], ids [T, k], num_ranks).
inline void check_rank_scatter_args(const char* op, const at::Tensor& src, const at::Tensor& ids,
                                    int64_t num_ranks, bool check_values = true) {
  check_float(op, "src", src);
  check_dim(op, "src", src, 2);
  MOLORA_CHECK_VALUE(num_ranks >= 1, op, ": num_ranks must be >= 1, got ", num_ranks);
  check_rank_ids(op, ids, src.size(0), num_ranks, src, check_values);
  MOLORA_CHECK_VALUE(ids.sizes() == src.sizes(), op, ": ids must have the shape of src ",
                     src.sizes(), ", got ", ids.sizes());
}

}  // namespace molora
