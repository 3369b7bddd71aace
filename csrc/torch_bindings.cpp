// The C++ CPU kernels of the molora ops. The schemas (and fake kernels, autograd, Python-served
// kernels) are declared once per op in Python, molora_ops/ops/ (``_registry.define``); C++ only
// registers implementations, as torchao does. The CUDA kernels register themselves from their
// launcher files (csrc/cuda/*.cu, MOLORA_CUDA_LIBRARY_IMPL). Semantics: docs/OPS.md.
#include <torch/library.h>

#include "ops.h"
#include "registration.h"

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
  m.impl("sgmv_expand_backward", &molora::sgmv_expand_backward_cpu);
  m.impl("stacked_gated_lora", &molora::stacked_gated_lora_cpu);
  m.impl("stacked_gated_lora_backward", &molora::stacked_gated_lora_backward_cpu);
  m.impl("fused_moe_lora", &molora::fused_moe_lora_cpu);
  m.impl("routed_moe_lora", &molora::routed_moe_lora_cpu);
  m.impl("rank_topk", &molora::rank_topk_cpu);
  m.impl("rank_sparse_shrink", &molora::rank_sparse_shrink_cpu);
  m.impl("rank_sparse_expand", &molora::rank_sparse_expand_cpu);
  m.impl("id_histogram", &molora::id_histogram_cpu);
  m.impl("rank_scatter", &molora::rank_scatter_cpu);
  m.impl("rank_sparse_weight_grad", &molora::rank_sparse_weight_grad_cpu);
}

REGISTER_EXTENSION(_C)
