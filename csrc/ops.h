// Every host entry point of molora_ops: the C++ API surface in one screen. The schemas (and what
// each argument means) are declared in molora_ops/ops/<family>.py and documented in docs/OPS.md.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace molora {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Family 1: router (cpu/router.cpp)
std::tuple<Tensor, Tensor> softmax_topk_cpu(const Tensor& logits, int64_t k, bool renormalize);
std::tuple<Tensor, Tensor> topk_softmax_cpu(const Tensor& logits, int64_t k, double temperature);
std::tuple<Tensor, Tensor> sigmoid_topk_cpu(const Tensor& logits, int64_t k, const OptTensor& bias,
                                            bool normalize, bool bias_in_weights, double scale);
std::tuple<Tensor, Tensor> softmax_topp_cpu(const Tensor& logits, double top_p, int64_t min_k,
                                            double entropy_threshold, double q, double eps);
// (routed_moe_lora's router, not an op: the linear and softmax_topk_cpu, in one pass where it can)
std::tuple<Tensor, Tensor, Tensor> softmax_topk_linear_cpu(const Tensor& x,
                                                           const Tensor& router_weight,
                                                           const OptTensor& router_bias, int64_t k,
                                                           bool renormalize);
Tensor softmax_route_backward_cpu(const Tensor& grad_weights, const Tensor& weights,
                                  const Tensor& ids, const Tensor& logits, bool renormalized,
                                  double scale);
Tensor sigmoid_topk_backward_cpu(const Tensor& grad_weights, const Tensor& weights,
                                 const Tensor& ids, const Tensor& logits, const OptTensor& bias,
                                 bool normalize, bool bias_in_weights, double scale);

// Family 2: dispatch, gather, combine (cpu/dispatch.cpp)
std::tuple<Tensor, Tensor, Tensor> dispatch_cpu(const Tensor& ids, int64_t num_experts,
                                                int64_t block_size);
Tensor gather_rows_cpu(const Tensor& x, const Tensor& order, const Tensor& pos,
                       const OptTensor& weights);
Tensor combine_rows_cpu(const Tensor& y_perm, const Tensor& order, const Tensor& pos,
                        const OptTensor& weights);
Tensor pair_dot_cpu(const Tensor& a, const Tensor& b, const Tensor& pos, bool a_by_token);

// Family 3: grouped low-rank matmuls (cpu/sgmv.cpp)
Tensor sgmv_shrink_cpu(const Tensor& x, const Tensor& A, const Tensor& rank_offsets,
                       const Tensor& order, const Tensor& pos, const Tensor& expert_offsets,
                       const OptTensor& weights, const OptTensor& scales, int64_t max_rank);
Tensor sgmv_expand_cpu(const Tensor& h, const Tensor& B, const Tensor& rank_offsets,
                       const Tensor& order, const Tensor& pos, const Tensor& expert_offsets,
                       const OptTensor& weights, const OptTensor& scales, const OptTensor& base);
Tensor sgmv_weight_grad_cpu(const Tensor& x, const Tensor& h, const Tensor& rank_offsets,
                            const Tensor& order, const Tensor& pos, const Tensor& expert_offsets,
                            const OptTensor& weights, const OptTensor& scales, int64_t total_rank,
                            bool transposed);
std::tuple<Tensor, Tensor, Tensor> sgmv_expand_backward_cpu(
    const Tensor& grad_y, const Tensor& h, const Tensor& B, const Tensor& rank_offsets,
    const Tensor& order, const Tensor& pos, const Tensor& expert_offsets, const OptTensor& weights,
    const OptTensor& scales);
Tensor stacked_gated_lora_cpu(const Tensor& x, const Tensor& A, const Tensor& B,
                              const Tensor& gate, const Tensor& rank_offsets,
                              const OptTensor& scales, const OptTensor& base, bool shared_a);
Tensor fused_moe_lora_cpu(const Tensor& x, const Tensor& A, const Tensor& B,
                          const Tensor& rank_offsets, const OptTensor& weights, const Tensor& ids,
                          const OptTensor& scales, const OptTensor& base);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> routed_moe_lora_cpu(
    const Tensor& x, const Tensor& router_weight, const OptTensor& router_bias, const Tensor& A,
    const Tensor& B, const Tensor& rank_offsets, const OptTensor& scales, const OptTensor& base,
    const OptTensor& weight, const OptTensor& bias, int64_t top_k, bool renormalize,
    int64_t max_rank);
std::tuple<Tensor, Tensor, Tensor, Tensor> stacked_gated_lora_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& gate,
    const Tensor& rank_offsets, const OptTensor& scales, bool shared_a);

// Family 4: rank-wise masked activation (cpu/masked.cpp)
std::tuple<Tensor, Tensor> rank_topk_cpu(const Tensor& h, int64_t k, const OptTensor& scores,
                                         const OptTensor& bias, bool use_abs);
Tensor rank_sparse_shrink_cpu(const Tensor& x, const Tensor& A, const Tensor& ids);
Tensor rank_sparse_expand_cpu(const Tensor& values, const Tensor& ids, const Tensor& B,
                              const OptTensor& weights, double scale, const OptTensor& base);
Tensor id_histogram_cpu(const Tensor& ids, int64_t num_bins);
Tensor rank_scatter_cpu(const Tensor& src, const Tensor& ids, int64_t num_ranks);
Tensor rank_sparse_weight_grad_cpu(const Tensor& x, const Tensor& g, const Tensor& ids,
                                   int64_t num_ranks);

}  // namespace molora
