// Argument checks of the router family, shared by the CPU launchers (csrc/cpu/router.cpp) and the
// CUDA launchers (csrc/cuda/router.cu), so both raise the same exception classes with the same
// messages. ATen only, header-only. Data-reading checks (the ids' value range) stay with the
// launchers: the CUDA launchers run them only in the opt-in host mode.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "check.h"

namespace molora {

// logits [T, E], float, E >= 1. Returns E.
inline int64_t check_router_logits(const char* op, const at::Tensor& logits) {
  check_float(op, "logits", logits);
  check_dim(op, "logits", logits, 2);
  MOLORA_CHECK_VALUE(logits.size(1) >= 1, op, ": logits must have at least one expert column");
  return logits.size(1);
}

inline void check_router_k(const char* op, int64_t k, int64_t E) {
  MOLORA_CHECK_VALUE(k >= 1 && k <= E, op, ": k must be in [1, E] = [1, ", E, "], got ", k);
}

inline void check_topk_softmax_temperature(double temperature) {
  MOLORA_CHECK_VALUE(temperature > 0, "topk_softmax: temperature must be > 0, got ", temperature);
}

// The optional selection bias [E] as a contiguous opmath tensor (undefined when absent).
inline at::Tensor check_router_bias(const char* op, const std::optional<at::Tensor>& bias,
                                    int64_t n, const at::Tensor& ref) {
  if (!bias.has_value()) return at::Tensor();
  check_float(op, "bias", *bias);
  check_device(op, "bias", *bias, ref);
  MOLORA_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape (", n,
                     "), got ", bias->sizes());
  return bias->to(opmath_dtype(ref.scalar_type())).contiguous();
}

// softmax_topp's scalar options (E from check_router_logits).
inline void check_softmax_topp_args(int64_t E, double top_p, int64_t min_k, double eps) {
  MOLORA_CHECK_VALUE(top_p > 0 && top_p <= 1, "softmax_topp: top_p must be in (0, 1], got ", top_p);
  MOLORA_CHECK_VALUE(min_k >= 1 && min_k <= E, "softmax_topp: min_k must be in [1, E] = [1, ", E,
                     "], got ", min_k);
  MOLORA_CHECK_VALUE(eps >= 0, "softmax_topp: eps must be >= 0, got ", eps);
}

// Shared shape/dtype/device checks of the two router backward ops (not the ids' value range,
// which reads the data: check_index_range(op, "ids", ids, -1, E) after this). Returns E.
inline int64_t check_route_grad_args(const char* op, const at::Tensor& grad_weights,
                                     const at::Tensor& weights, const at::Tensor& ids,
                                     const at::Tensor& logits) {
  const int64_t E = check_router_logits(op, logits);
  check_float(op, "grad_weights", grad_weights);
  check_float(op, "weights", weights);
  check_index(op, "ids", ids);
  check_dim(op, "ids", ids, 2);
  check_size(op, "ids", ids, 0, logits.size(0));
  MOLORA_CHECK_VALUE(weights.sizes() == ids.sizes() && grad_weights.sizes() == ids.sizes(), op,
                     ": grad_weights, weights and ids must share one shape (T, k); got ",
                     grad_weights.sizes(), ", ", weights.sizes(), ", ", ids.sizes());
  check_device(op, "grad_weights", grad_weights, logits);
  check_device(op, "weights", weights, logits);
  check_device(op, "ids", ids, logits);
  return E;
}

}  // namespace molora
