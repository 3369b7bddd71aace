// The molora op library: every schema, and the CPU implementation of each, side by side.
// Semantics, shapes and dtypes: docs/OPS.md. Fake (meta) kernels and autograd are registered once,
// from Python (molora_ops/ops/), for every backend.
#include <torch/library.h>

#include "ops.h"
#include "registration.h"

TORCH_LIBRARY(molora, m) {
  // Family 1: router. weights are fp32 (fp64 for fp64 logits), ids int32, ties -> lower id.
  m.def("softmax_topk(Tensor logits, int k, bool renormalize) -> (Tensor weights, Tensor ids)");
  m.def("topk_softmax(Tensor logits, int k, float temperature) -> (Tensor weights, Tensor ids)");
  m.def(
      "sigmoid_topk(Tensor logits, int k, Tensor? bias, bool normalize, bool bias_in_weights, "
      "float scale) -> (Tensor weights, Tensor ids)");
  m.def(
      "softmax_topp(Tensor logits, float top_p, int min_k, float entropy_threshold, float q, "
      "float eps) -> (Tensor weights, Tensor ids)");
  m.def(
      "softmax_route_backward(Tensor grad_weights, Tensor weights, Tensor ids, Tensor logits, "
      "bool renormalized, float scale) -> Tensor");
  m.def(
      "sigmoid_topk_backward(Tensor grad_weights, Tensor weights, Tensor ids, Tensor logits, "
      "Tensor? bias, bool normalize, bool bias_in_weights, float scale) -> Tensor");

  // Family 2: dispatch metadata (order, pos, expert_offsets), row gather and weighted combine.
  m.def(
      "dispatch(Tensor ids, int num_experts, int block_size) -> "
      "(Tensor order, Tensor pos, Tensor expert_offsets)");
  m.def("gather_rows(Tensor x, Tensor order, Tensor pos, Tensor? weights) -> Tensor");
  m.def("combine_rows(Tensor y_perm, Tensor order, Tensor pos, Tensor? weights) -> Tensor");
  m.def("pair_dot(Tensor a, Tensor b, Tensor pos, bool a_by_token) -> Tensor");

  // Family 3: grouped low-rank matmuls over a stacked bank A [R, d_in], B [d_out, R].
  m.def(
      "sgmv_shrink(Tensor x, Tensor A, Tensor rank_offsets, Tensor order, Tensor pos, "
      "Tensor expert_offsets, Tensor? weights, Tensor? scales, int max_rank) -> Tensor");
  m.def(
      "sgmv_expand(Tensor h, Tensor B, Tensor rank_offsets, Tensor order, Tensor pos, "
      "Tensor expert_offsets, Tensor? weights, Tensor? scales, Tensor? base) -> Tensor");
  m.def(
      "sgmv_weight_grad(Tensor x, Tensor h, Tensor rank_offsets, Tensor order, Tensor pos, "
      "Tensor expert_offsets, Tensor? weights, Tensor? scales, int total_rank) -> Tensor");
  m.def(
      "stacked_gated_lora(Tensor x, Tensor A, Tensor B, Tensor gate, Tensor rank_offsets, "
      "Tensor? scales, Tensor? base, bool shared_a) -> Tensor");
  m.def(
      "stacked_gated_lora_backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor gate, "
      "Tensor rank_offsets, Tensor? scales, bool shared_a) -> "
      "(Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_gate)");

  // Family 4: rank-wise masked activation.
  m.def(
      "rank_topk(Tensor h, int k, Tensor? scores, Tensor? bias, bool use_abs) -> "
      "(Tensor values, Tensor ids)");
  m.def("rank_sparse_shrink(Tensor x, Tensor A, Tensor ids) -> Tensor");
  m.def(
      "rank_sparse_expand(Tensor values, Tensor ids, Tensor B, Tensor? weights, float scale, "
      "Tensor? base) -> Tensor");
  m.def("id_histogram(Tensor ids, int num_bins) -> Tensor");
  m.def("rank_scatter(Tensor src, Tensor ids, int num_ranks) -> Tensor");
  m.def("rank_sparse_weight_grad(Tensor x, Tensor g, Tensor ids, int num_ranks) -> Tensor");
}

TORCH_LIBRARY_IMPL(molora, CPU, m) {
  m.impl("softmax_topk", &molora::softmax_topk_cpu);
  m.impl("topk_softmax", &molora::topk_softmax_cpu);
  m.impl("sigmoid_topk", &molora::sigmoid_topk_cpu);
  m.impl("softmax_topp", &molora::softmax_topp_cpu);
  m.impl("softmax_route_backward", &molora::softmax_route_backward_cpu);
  m.impl("sigmoid_topk_backward", &molora::sigmoid_topk_backward_cpu);
  m.impl("dispatch", &molora::dispatch_cpu);
  m.impl("gather_rows", &molora::gather_rows_cpu);
  m.impl("combine_rows", &molora::combine_rows_cpu);
  m.impl("pair_dot", &molora::pair_dot_cpu);
  m.impl("sgmv_shrink", &molora::sgmv_shrink_cpu);
  m.impl("sgmv_expand", &molora::sgmv_expand_cpu);
  m.impl("sgmv_weight_grad", &molora::sgmv_weight_grad_cpu);
  m.impl("stacked_gated_lora", &molora::stacked_gated_lora_cpu);
  m.impl("stacked_gated_lora_backward", &molora::stacked_gated_lora_backward_cpu);
  m.impl("rank_topk", &molora::rank_topk_cpu);
  m.impl("rank_sparse_shrink", &molora::rank_sparse_shrink_cpu);
  m.impl("rank_sparse_expand", &molora::rank_sparse_expand_cpu);
  m.impl("id_histogram", &molora::id_histogram_cpu);
  m.impl("rank_scatter", &molora::rank_scatter_cpu);
  m.impl("rank_sparse_weight_grad", &molora::rank_sparse_weight_grad_cpu);
}

REGISTER_EXTENSION(_C)
