// CPU launchers of the router ops: argument checks, dtype dispatch, one token row per iteration.
#include <vector>

#include "../common/router_checks.h"
#include "../kernels/router_cpu.h"
#include "../ops.h"
#include "cpu_utils.h"
#include "sgmv_isa.h"

namespace molora {
namespace {

// Argument checks: csrc/common/router_checks.h (shared with the CUDA launchers).
int64_t check_logits(const char* op, const at::Tensor& logits) {
  return check_router_logits(op, logits);
}

void check_k(const char* op, int64_t k, int64_t E) { check_router_k(op, k, E); }

// Runs row_fn(logits_row, key_scratch, scratch_ids, weights_row, ids_row) for every token and
// returns (weights [T, width] opmath, ids [T, width] int32). key_scratch holds 2*E values.
template <typename RowFn>
std::tuple<at::Tensor, at::Tensor> route_rows(const at::Tensor& logits_in, int64_t width,
                                              RowFn row_fn) {
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor weights = at::empty({T, width}, logits.options().dtype(opmath_dtype(logits.scalar_type())));
  at::Tensor ids = at::empty({T, width}, logits.options().dtype(at::kInt));
  MOLORA_DISPATCH_FLOATING(logits.scalar_type(), "molora_router", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = logits.data_ptr<scalar_t>();
    acc_t* w = weights.data_ptr<acc_t>();
    int32_t* id = ids.data_ptr<int32_t>();
    at::parallel_for(0, T, cpu::grain_for(E * 8), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> key(2 * E);
      std::vector<int32_t> scratch(E);
      for (int64_t t = t0; t < t1; ++t)
        row_fn(src + t * E, key.data(), scratch.data(), w + t * width, id + t * width);
    });
  });
  return {weights, ids};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softmax_topk_cpu(const at::Tensor& logits, int64_t k,
                                                    bool renormalize) {
  const int64_t E = check_logits("softmax_topk", logits);
  check_k("softmax_topk", k, E);
  return route_rows(logits, k, [&](const auto* row, auto* key, int32_t* scratch, auto* w, int32_t* id) {
    kernels::softmax_topk_row(row, E, k, renormalize, key, scratch, w, id);
  });
}

// routed_moe_lora's router: logits = x router_weight^T + router_bias, then softmax_topk. fp32 with
// AVX-512 takes both in one pass over x's rows (the linear, cpu::avx512::router_logits_rows, then
// each row's top-k while it is in cache; its NOTE has the measurement); elsewhere ATen's linear,
// then softmax_topk_cpu. The caller has checked the shapes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_topk_linear_cpu(
    const at::Tensor& x, const at::Tensor& router_weight,
    const std::optional<at::Tensor>& router_bias, int64_t k, bool renormalize) {
#ifdef MOLORA_HAVE_AVX512_KERNELS
  if (x.scalar_type() == at::kFloat && cpu::avx512::available()) {
    const at::Tensor xc = x.contiguous(), W = router_weight.contiguous();
    const at::Tensor b = router_bias.has_value() ? router_bias->contiguous() : at::Tensor();
    const int64_t T = xc.size(0), d = xc.size(1), E = W.size(0);
    at::Tensor logits = at::empty({T, E}, xc.options());
    at::Tensor weights = at::empty({T, k}, xc.options());
    at::Tensor ids = at::empty({T, k}, xc.options().dtype(at::kInt));
    const float *xp = xc.data_ptr<float>(), *wp = W.data_ptr<float>();
    const float* bp = cpu::ptr_or_null<float>(b);
    float *lp = logits.data_ptr<float>(), *wt = weights.data_ptr<float>();
    int32_t* id = ids.data_ptr<int32_t>();
    at::parallel_for(0, T, cpu::grain_for(d * E), [&](int64_t t0, int64_t t1) {
      std::vector<float> key(2 * E);
      std::vector<int32_t> scratch(E);
      cpu::avx512::router_logits_rows(xp, wp, bp, d, E, t0, t1, lp);
      for (int64_t t = t0; t < t1; ++t)
        kernels::softmax_topk_row(lp + t * E, E, k, renormalize, key.data(), scratch.data(),
                                  wt + t * k, id + t * k);
    });
    return {logits, weights, ids};
  }
#endif
  const at::Tensor logits = router_bias.has_value() ? at::addmm(*router_bias, x, router_weight.t())
                                                    : at::mm(x, router_weight.t());
  auto [weights, ids] = softmax_topk_cpu(logits, k, renormalize);
  return {logits, weights, ids};
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_cpu(const at::Tensor& logits, int64_t k,
                                                    double temperature) {
  const int64_t E = check_logits("topk_softmax", logits);
  check_k("topk_softmax", k, E);
  check_topk_softmax_temperature(temperature);
  return route_rows(logits, k, [&](const auto* row, auto* key, int32_t* scratch, auto* w, int32_t* id) {
    using acc_t = std::remove_pointer_t<decltype(key)>;
    kernels::topk_softmax_row(row, E, k, static_cast<acc_t>(1.0 / temperature), key, scratch, w, id);
  });
}

namespace {
at::Tensor check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t n,
                      const at::Tensor& ref) {
  return check_router_bias(op, bias, n, ref);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> sigmoid_topk_cpu(const at::Tensor& logits, int64_t k,
                                                    const std::optional<at::Tensor>& bias,
                                                    bool normalize, bool bias_in_weights,
                                                    double scale) {
  const int64_t E = check_logits("sigmoid_topk", logits);
  check_k("sigmoid_topk", k, E);
  const at::Tensor b = check_bias("sigmoid_topk", bias, E, logits);
  return route_rows(logits, k, [&](const auto* row, auto* key, int32_t* scratch, auto* w, int32_t* id) {
    using acc_t = std::remove_pointer_t<decltype(key)>;
    kernels::sigmoid_topk_row(row, cpu::ptr_or_null<acc_t>(b), E, k, normalize, bias_in_weights,
                              static_cast<acc_t>(scale), key, scratch, w, id);
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_topp_cpu(const at::Tensor& logits, double top_p,
                                                    int64_t min_k, double entropy_threshold,
                                                    double q, double eps) {
  const int64_t E = check_logits("softmax_topp", logits);
  check_softmax_topp_args(E, top_p, min_k, eps);
  return route_rows(logits, E, [&](const auto* row, auto* key, int32_t* scratch, auto* w, int32_t* id) {
    using acc_t = std::remove_pointer_t<decltype(key)>;
    kernels::softmax_topp_row(row, E, static_cast<acc_t>(top_p), min_k,
                              static_cast<acc_t>(entropy_threshold), static_cast<acc_t>(q),
                              static_cast<acc_t>(eps), key, key + E, scratch, w, id);
  });
}

namespace {
// Shared checks of the two router backward ops; returns E.
int64_t check_route_grad(const char* op, const at::Tensor& grad_weights, const at::Tensor& weights,
                         const at::Tensor& ids, const at::Tensor& logits) {
  const int64_t E = check_route_grad_args(op, grad_weights, weights, ids, logits);
  check_index_range(op, "ids", ids, -1, E);
  return E;
}

// Runs row_fn(grad_w_row, w_row, ids_row, logits_row, scratch, dlogits_row) per token.
template <typename RowFn>
at::Tensor route_backward_rows(const at::Tensor& grad_weights, const at::Tensor& weights,
                               const at::Tensor& ids, const at::Tensor& logits_in, RowFn row_fn) {
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  const auto acc_dtype = opmath_dtype(logits.scalar_type());
  const at::Tensor g = grad_weights.to(acc_dtype).contiguous();
  const at::Tensor w = weights.to(acc_dtype).contiguous();
  const at::Tensor id = cpu::as_i32(ids);
  at::Tensor dlogits = at::empty({T, E}, logits.options().dtype(acc_dtype));
  MOLORA_DISPATCH_FLOATING(logits.scalar_type(), "molora_router_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, T, cpu::grain_for(E * 8), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> scratch(std::max(E, k));
      for (int64_t t = t0; t < t1; ++t)
        row_fn(g.data_ptr<acc_t>() + t * k, w.data_ptr<acc_t>() + t * k,
               id.data_ptr<int32_t>() + t * k, logits.data_ptr<scalar_t>() + t * E,
               scratch.data(), dlogits.data_ptr<acc_t>() + t * E);
    });
  });
  return dlogits.to(logits.scalar_type());
}
}  // namespace

at::Tensor softmax_route_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& weights,
                                      const at::Tensor& ids, const at::Tensor& logits,
                                      bool renormalized, double scale) {
  const int64_t E = check_route_grad("softmax_route_backward", grad_weights, weights, ids, logits);
  const int64_t k = ids.size(1);
  return route_backward_rows(grad_weights, weights, ids, logits,
      [&](const auto* g, const auto* w, const int32_t* id, const auto* row, auto* key, auto* out) {
        using acc_t = std::remove_pointer_t<decltype(key)>;
        kernels::softmax_route_backward_row(g, w, id, row, E, k, renormalized,
                                            static_cast<acc_t>(scale), key, out);
      });
}

at::Tensor sigmoid_topk_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& weights,
                                     const at::Tensor& ids, const at::Tensor& logits,
                                     const std::optional<at::Tensor>& bias, bool normalize,
                                     bool bias_in_weights, double scale) {
  const int64_t E = check_route_grad("sigmoid_topk_backward", grad_weights, weights, ids, logits);
  check_index_range("sigmoid_topk_backward", "ids", ids, -1, E);  // -1: dropped, as the reference
  const at::Tensor b = check_bias("sigmoid_topk_backward", bias, E, logits);
  const int64_t k = ids.size(1);
  return route_backward_rows(grad_weights, weights, ids, logits,
      [&](const auto* g, const auto*, const int32_t* id, const auto* row, auto* v, auto* out) {
        using acc_t = std::remove_pointer_t<decltype(v)>;
        kernels::sigmoid_topk_backward_row(g, id, row, cpu::ptr_or_null<acc_t>(b), E, k, normalize,
                                           bias_in_weights, static_cast<acc_t>(scale), v, out);
      });
}

}  // namespace molora
