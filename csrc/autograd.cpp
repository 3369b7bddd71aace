// C++ autograd kernels of the selection ops whose backward is one small kernel. The autograd
// engine then runs a C++ node for their backward instead of a Python one: for these ops the node
// was most of the backward's time (rank_topk at T=256: a 9 us rank_scatter under ~80 us of Python
// node; the reference's gather backward has a C++ node and was 1.5x faster). The formulas are the
// Python ones beside each op's declaration (molora_ops/ops/router.py, masked.py), which serve a
// build without this extension; _registry.define skips them when this file registered the op.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

namespace molora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The backward op, below autograd: these formulas are first-order only, as the Python ones
// (molora_ops/ops/_registry.py, once_differentiable; the same message). When a double backward
// is being recorded (create_graph=True), the gradient comes back attached to an error node:
// differentiating it again raises instead of silently giving a zero second derivative (the
// backward ops have no autograd of their own).
template <typename Signature, typename... Args>
at::Tensor call_backward_op(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  const bool recording = at::GradMode::is_enabled();
  at::Tensor grad;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    at::NoGradGuard no_grad;
    grad = op.call(std::forward<Args>(args)...);
  }
  if (!recording || !grad.defined()) return grad;
  auto error = std::make_shared<torch::autograd::DelayedError>(
      "molora: trying to differentiate twice a function that was marked with "
      "@once_differentiable (the ops' gradients are first-order only)",
      1);
  at::Tensor alias = grad.detach();
  alias.set_requires_grad(true);
  return error->apply({alias})[0];
}

using TopkSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, bool);
using RouteBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, bool, double);
using RankTopkSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                       const std::optional<at::Tensor>&,
                                                       const std::optional<at::Tensor>&, bool);
using RankScatterSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t);

// kNoIdsGradient: the ids output has no gradient, and with materialized gradients the engine
// would fill a zero [T, k] tensor for it on every backward (aten::zeros, ~12 us of rank_topk's
// ~40 us backward at T=256 on the CPU, where the reference's gather node made none).
// Unmaterialized, an undefined gradient of the first output means there is nothing to compute.

// softmax_topk: d logits = softmax_route_backward(grad w, w, ids, logits, renormalize, 1).
struct SoftmaxTopk : public torch::autograd::Function<SoftmaxTopk> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k,
                               bool renormalize) {
    static const auto op = op_handle<TopkSig>("molora::softmax_topk");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [weights, ids] = op.call(logits, k, renormalize);
    ctx->save_for_backward({logits, weights, ids});
    ctx->saved_data["renormalize"] = renormalize;
    ctx->mark_non_differentiable({ids});
    ctx->set_materialize_grads(false);  // see kNoIdsGradient
    return {weights, ids};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<RouteBackwardSig>("molora::softmax_route_backward");
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad = call_backward_op(op, grads[0], saved[1], saved[2], saved[0],
                                       ctx->saved_data["renormalize"].toBool(), 1.0);
    return {grad, at::Tensor(), at::Tensor()};
  }
};

// rank_topk: d h = rank_scatter(grad values, ids, R); scores and bias only select.
struct RankTopk : public torch::autograd::Function<RankTopk> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, int64_t k,
                               const std::optional<at::Tensor>& scores,
                               const std::optional<at::Tensor>& bias, bool use_abs) {
    static const auto op = op_handle<RankTopkSig>("molora::rank_topk");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [values, ids] = op.call(h, k, scores, bias, use_abs);
    ctx->save_for_backward({ids});
    ctx->saved_data["num_ranks"] = h.size(1);
    ctx->mark_non_differentiable({ids});
    ctx->set_materialize_grads(false);  // see kNoIdsGradient
    return {values, ids};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<RankScatterSig>("molora::rank_scatter");
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                                     at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad = call_backward_op(op, grads[0], saved[0],
                                       ctx->saved_data["num_ranks"].toInt());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> softmax_topk_autograd(const at::Tensor& logits, int64_t k,
                                                         bool renormalize) {
  auto out = SoftmaxTopk::apply(logits, k, renormalize);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> rank_topk_autograd(const at::Tensor& h, int64_t k,
                                                      const std::optional<at::Tensor>& scores,
                                                      const std::optional<at::Tensor>& bias,
                                                      bool use_abs) {
  auto out = RankTopk::apply(h, k, scores, bias, use_abs);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace molora

TORCH_LIBRARY_IMPL(molora, Autograd, m) {
  m.impl("softmax_topk", &molora::softmax_topk_autograd);
  m.impl("rank_topk", &molora::rank_topk_autograd);
}
