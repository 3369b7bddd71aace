// Every op schema of molora_ops (semantics, shapes and dtypes: docs/OPS.md), defined once and
// registered in three namespaces from it:
//   molora       the public ops (CPU kernels in C++, CUDA through the backend switch, fake +
//                autograd from Python: molora_ops/ops/);
//   molora_cuda  the hand-written CUDA kernels alone (CUDA builds; the switch calls them);
//   molora_emu   the same CUDA kernels emulated on the CPU (test module molora_ops._C_emu).
#pragma once

#include <torch/library.h>

namespace molora {

inline void define_schemas(torch::Library& m) {
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

}  // namespace molora
