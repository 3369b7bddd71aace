// C++ autograd kernels of the selection ops whose backward is one small kernel, and of the
// pipeline op routed_moe_lora (its backward a sequence of the ops' kernels). The autograd
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

// A gradient marked first-order only, as the Python formulas' (molora_ops/ops/_registry.py,
// once_differentiable; the same message): when a double backward is being recorded
// (create_graph=True) it comes back attached to an error node, so differentiating it again raises
// instead of silently giving a zero second derivative (the backward ops have no autograd of
// their own).
at::Tensor first_order(at::Tensor grad, bool recording) {
  if (!recording || !grad.defined()) return grad;
  auto error = std::make_shared<torch::autograd::DelayedError>(
      "molora: trying to differentiate twice a function that was marked with "
      "@once_differentiable (the ops' gradients are first-order only)",
      1);
  at::Tensor alias = grad.detach();
  alias.set_requires_grad(true);
  return error->apply({alias})[0];
}

// Whether an op's call must go through its autograd Function: grad mode is on and an input
// requires a gradient, or an input carries a forward-mode tangent (Function::apply then raises
// that the op has no jvp). Otherwise the kernel is called straight below autograd, as ATen's own
// autograd kernels do: no node, no saved tensors, no output wrapping. NOTE: under no_grad, the
// T=1024 llama up routed_moe_lora call (2-core Xeon, 2026-12-05): from its CPU kernel's return
// to Function::apply's about 80 us right after other implementations' GEMMs (cold code); the
// call around an empty kernel body 9.8 -> 3.1 us hot.
inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && requires_grad(*t);
}
inline bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}
inline bool has_tangent(const std::optional<at::Tensor>& t) {
  return t.has_value() && has_tangent(*t);
}
template <typename... Ts>
bool needs_autograd(const Ts&... inputs) {
  return (at::GradMode::is_enabled() && (... || requires_grad(inputs))) ||
         (... || has_tangent(inputs));
}

// The backward op, below autograd, its gradient marked first-order only (first_order).
template <typename Signature, typename... Args>
at::Tensor call_backward_op(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  const bool recording = at::GradMode::is_enabled();
  at::Tensor grad;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    at::NoGradGuard no_grad;
    grad = op.call(std::forward<Args>(args)...);
  }
  return first_order(grad, recording);
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
  static const c10::TypedOperatorHandle<TopkSig>& op() {
    static const auto handle = op_handle<TopkSig>("molora::softmax_topk");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k,
                               bool renormalize) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [weights, ids] = op().call(logits, k, renormalize);
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
  static const c10::TypedOperatorHandle<RankTopkSig>& op() {
    static const auto handle = op_handle<RankTopkSig>("molora::rank_topk");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, int64_t k,
                               const std::optional<at::Tensor>& scores,
                               const std::optional<at::Tensor>& bias, bool use_abs) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [values, ids] = op().call(h, k, scores, bias, use_abs);
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

using Opt = std::optional<at::Tensor>;
using RoutedSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, int64_t, bool, int64_t);
using ExpandBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const Opt&, const Opt&);
using ExpandSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&,
                             const Opt&, const Opt&);
using WeightGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const Opt&, const Opt&, int64_t, bool);

Opt optional_of(const at::Tensor& t) { return t.defined() ? Opt(t) : Opt(); }

// routed_moe_lora: the formula of molora_ops/ops/sgmv.py (_routed_moe_lora_backward), here so
// that the backward runs no Python: dB, u and d w in one pass over grad y (sgmv_expand_backward; u
// unweighted, the A-side kernels apply the weights), the router's d logits from d w
// (softmax_route_backward), then x's gradients in one buffer: the adapter's (expand of u over
// A^T), the router's (d logits Wr) and the frozen layer's (grad y W), its GEMM last. NOTE: the
// Python formula behind an autograd.Function around the op ran the T=1024 llama up training step
// in 11.43-11.59 ms against 11.04-11.13 here, 1.36x against 1.31x the base linear's (2 threads,
// 2-core Xeon, 2026-12-05).
struct RoutedMoeLora : public torch::autograd::Function<RoutedMoeLora> {
  static const c10::TypedOperatorHandle<RoutedSig>& op() {
    static const auto handle = op_handle<RoutedSig>("molora::routed_moe_lora");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& router_weight, const Opt& router_bias,
                               const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& rank_offsets, const Opt& scales, const Opt& base,
                               const Opt& weight, const Opt& bias, int64_t top_k,
                               bool renormalize, int64_t max_rank) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, logits, weights, ids, h, order, pos, eo] =
        op().call(x, router_weight, router_bias, A, B, rank_offsets, scales, base, weight, bias,
                top_k, renormalize, max_rank);
    ctx->save_for_backward({x, router_weight, A, B, rank_offsets, scales.value_or(at::Tensor()),
                            weight.value_or(at::Tensor()), logits, weights, ids, h, order, pos,
                            eo});
    ctx->saved_data["renormalize"] = renormalize;
    // Which optional inputs were given: an absent one has no edge, so the gradient edges of the
    // later inputs shift (needs_input_grad counts edges, the returned list counts arguments).
    const bool given[] = {true, true, router_bias.has_value(), true, true, true,
                          scales.has_value(), base.has_value(), weight.has_value(),
                          bias.has_value()};
    int64_t given_mask = 0;
    for (int i = 0; i < 10; ++i) given_mask |= int64_t{given[i]} << i;
    ctx->saved_data["given"] = given_mask;
    ctx->mark_non_differentiable({ids, h, order, pos, eo});
    ctx->set_materialize_grads(false);  // no zero fills for the outputs nothing reads
    return {y, logits, weights, ids, h, order, pos, eo};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto expand_backward =
        op_handle<ExpandBackwardSig>("molora::sgmv_expand_backward");
    static const auto route_backward =
        op_handle<RouteBackwardSig>("molora::softmax_route_backward");
    static const auto expand = op_handle<ExpandSig>("molora::sgmv_expand");
    static const auto weight_grad = op_handle<WeightGradSig>("molora::sgmv_weight_grad");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &Wr = saved[1], &A = saved[2], &B = saved[3], &ro = saved[4];
    const Opt scales = optional_of(saved[5]), weight = optional_of(saved[6]);
    const at::Tensor &logits = saved[7], &weights = saved[8], &ids = saved[9], &h = saved[10];
    const at::Tensor &order = saved[11], &pos = saved[12], &eo = saved[13];
    const int64_t given = ctx->saved_data["given"].toInt();
    const auto need = [&](int arg) {
      if (((given >> arg) & 1) == 0) return false;
      size_t edge = 0;
      for (int i = 0; i < arg; ++i) edge += (given >> i) & 1;
      return ctx->needs_input_grad(edge);
    };
    const bool need_x = need(0), need_Wr = need(1), need_br = need(2), need_A = need(3);
    const bool need_B = need(4), need_base = need(7), need_W = need(8), need_bias = need(9);
    const bool need_route = need_x || need_Wr || need_br;
    at::Tensor grad_y = grads[0];
    if (!grad_y.defined()) grad_y = at::zeros({x.size(0), B.size(0)}, x.options());

    at::Tensor grad_x, grad_Wr, grad_br, grad_A, grad_B, grad_base, grad_W, grad_bias;
    const bool recording = at::GradMode::is_enabled();  // a double backward being recorded
    {  // the gradients below autograd, with no graph recorded
      at::AutoDispatchBelowADInplaceOrView below;
      at::NoGradGuard no_grad;
      at::Tensor grad_h, grad_route;
      if (need_B || need_x || need_A || need_route) {
        auto [dB, u, dw] = expand_backward.call(grad_y, h, B, ro, order, pos, eo, weights, scales);
        if (need_B) grad_B = dB;
        grad_h = u.to(h.scalar_type());
        if (need_route) {
          at::Tensor grad_w = dw.to(weights.scalar_type());
          if (grads[2].defined()) grad_w = grad_w.add(grads[2].to(grad_w.scalar_type()));
          grad_route = route_backward.call(grad_w, weights, ids, logits,
                                           ctx->saved_data["renormalize"].toBool(), 1.0);
          if (grads[1].defined())
            grad_route = grad_route.add(grads[1].to(grad_route.scalar_type()));
        }
      }
      if (need_x) {
        grad_x = expand.call(grad_h, A.t(), ro, order, pos, eo, weights, std::nullopt,
                             std::nullopt);
        grad_x.addmm_(grad_route.to(grad_x.scalar_type()), Wr.to(grad_x.scalar_type()));
      }
      if (need_A)
        grad_A = weight_grad.call(x, grad_h, ro, order, pos, eo, weights, std::nullopt, A.size(0),
                                  false);
      if (need_Wr) grad_Wr = grad_route.t().mm(x.to(grad_route.scalar_type())).to(Wr.scalar_type());
      if (need_br) grad_br = grad_route.sum(0).to(Wr.scalar_type());
      if (weight.has_value()) {
        if (need_x)
          grad_x.addmm_(grad_y.to(grad_x.scalar_type()), weight->to(grad_x.scalar_type()));
        if (need_W) grad_W = grad_y.t().mm(x.to(grad_y.scalar_type())).to(weight->scalar_type());
        if (need_bias) grad_bias = grad_y.sum(0).to(weight->scalar_type());
      } else if (need_bias) {
        grad_bias = grad_y.sum(0);
      }
      if (need_base) grad_base = grad_y;
    }
    const auto mark = [&](const at::Tensor& g) { return first_order(g, recording); };
    return {mark(grad_x), mark(grad_Wr), mark(grad_br), mark(grad_A), mark(grad_B), at::Tensor(),
            at::Tensor(), mark(grad_base), mark(grad_W), mark(grad_bias), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
routed_moe_lora_autograd(const at::Tensor& x, const at::Tensor& router_weight,
                         const Opt& router_bias, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& rank_offsets, const Opt& scales, const Opt& base,
                         const Opt& weight, const Opt& bias, int64_t top_k, bool renormalize,
                         int64_t max_rank) {
  if (!needs_autograd(x, router_weight, router_bias, A, B, rank_offsets, scales, base, weight,
                      bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return RoutedMoeLora::op().call(x, router_weight, router_bias, A, B, rank_offsets, scales,
                                    base, weight, bias, top_k, renormalize, max_rank);
  }
  auto out = RoutedMoeLora::apply(x, router_weight, router_bias, A, B, rank_offsets, scales, base,
                                  weight, bias, top_k, renormalize, max_rank);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]};
}

std::tuple<at::Tensor, at::Tensor> softmax_topk_autograd(const at::Tensor& logits, int64_t k,
                                                         bool renormalize) {
  if (!needs_autograd(logits)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return SoftmaxTopk::op().call(logits, k, renormalize);
  }
  auto out = SoftmaxTopk::apply(logits, k, renormalize);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> rank_topk_autograd(const at::Tensor& h, int64_t k,
                                                      const std::optional<at::Tensor>& scores,
                                                      const std::optional<at::Tensor>& bias,
                                                      bool use_abs) {
  if (!needs_autograd(h, scores, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return RankTopk::op().call(h, k, scores, bias, use_abs);
  }
  auto out = RankTopk::apply(h, k, scores, bias, use_abs);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace molora

TORCH_LIBRARY_IMPL(molora, Autograd, m) {
  m.impl("softmax_topk", &molora::softmax_topk_autograd);
  m.impl("rank_topk", &molora::rank_topk_autograd);
  m.impl("routed_moe_lora", &molora::routed_moe_lora_autograd);
}
