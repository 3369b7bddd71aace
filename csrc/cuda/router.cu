// CUDA launchers of the router family: softmax_topk, topk_softmax, sigmoid_topk, softmax_topp and
// the logits gradients softmax_route_backward / sigmoid_topk_backward. Kernels:
// csrc/kernels/router.cuh (one warp per token row; see its header for the register layout).
// The pattern of every launcher file: checks shared with the CPU launchers
// (csrc/common/router_checks.h), device guard, outputs via cuda::new_output, dtype dispatch
// (fp32/fp16/bf16 logits; fp64 goes to the reference through cuda::call_reference),
// MOLORA_LAUNCH on the current stream, launch check. The same source compiles for the GPU (nvcc)
// and for the CPU emulation module (csrc/emu/): see csrc/cuda/launch.h.
//
// Launch choice (all ops): 128 threads = 4 warps = 4 token rows per block; grid = min(ceil(T / 4),
// 16 blocks per SM), rows grid-strided (16 x 128 = an SM's 2048 threads; where registers allow
// fewer resident blocks the extra blocks just queue). Small blocks keep the tail of a grid-stride
// sweep short. NOTE: ptxas -v (sm_90, nvcc 13.0, no spills anywhere): 36-67 registers per thread
// for E <= 256 (NPL <= 8; ~7-9 resident blocks = 28-36 warps per SM), 64-98 for E <= 512, 95-154
// for E <= 1024 (~3-4 blocks per SM; those rows are 4-16x longer, so the loads in flight per SM
// stay comparable). NOTE: untuned (occupancy and runtime). Register bucket NPL (values per lane) =
// smallest of {1, 2, 4, 8, 16, 32} with 32 * NPL >= E; E > 1024 takes the NPL = 0 kernels (row
// re-read from L1/L2 on every pass, no register cap on E). 16-byte vector loads
// (VEC = min(16 / sizeof(T), NPL) elements) when the logits have unit column stride, E and the row
// stride are multiples of VEC and the base pointer is aligned; else coalesced scalar loads with
// arbitrary strides (no copy of non-contiguous logits). NOTE: untuned; the choices follow from
// bytes and instruction counts, see router.cuh.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/router_checks.h"
#include "../kernels/router.cuh"
#include "launch.h"

namespace molora {
namespace {

constexpr int kThreads = 128;
constexpr int kRowsPerBlock = kThreads / kernels::kWarpSize;

int64_t grid_for(int64_t T, const at::Tensor& ref) {
  const int64_t blocks = (T + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t cap = static_cast<int64_t>(cuda::multiprocessor_count(ref)) * 16;
  return std::max<int64_t>(1, std::min(blocks, cap));
}

// f(std::integral_constant<int, NPL>{}) with the register bucket of E (0 = the large-E kernels).
template <typename F>
void dispatch_npl(int64_t E, F&& f) {
  if (E <= 32) {
    f(std::integral_constant<int, 1>{});
  } else if (E <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (E <= 128) {
    f(std::integral_constant<int, 4>{});
  } else if (E <= 256) {
    f(std::integral_constant<int, 8>{});
  } else if (E <= 512) {
    f(std::integral_constant<int, 16>{});
  } else if (E <= 1024) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

template <typename scalar_t, int NPL>
constexpr int max_vec() {
  constexpr int v = 16 / static_cast<int>(sizeof(scalar_t));
  return NPL <= 0 ? 1 : (NPL < v ? NPL : v);
}

// Whether the logits rows can be read with VEC-element vector loads.
bool vec_loads_ok(const at::Tensor& logits, int vec) {
  if (vec <= 1) return false;
  const int64_t T = logits.size(0), E = logits.size(1);
  if (E % vec != 0) return false;
  if (E > 1 && logits.stride(1) != 1) return false;
  if (T > 1 && logits.stride(0) % vec != 0) return false;
  const auto addr = reinterpret_cast<uintptr_t>(logits.data_ptr());
  return addr % (static_cast<uintptr_t>(vec) * logits.element_size()) == 0;
}

// f(scalar_t tag, NPL, VEC) for the logits' dtype / bucket / vector width. `vec_ok(vec)` says
// whether VEC-wide access is allowed for this call.
template <typename scalar_t, typename VecOk, typename F>
void dispatch_bucket(int64_t E, VecOk& vec_ok, F& f) {
  dispatch_npl(E, [&](auto npl) {
    constexpr int V = max_vec<scalar_t, decltype(npl)::value>();
    if (V > 1 && vec_ok(V)) {
      f(scalar_t{}, npl, std::integral_constant<int, V>{});
    } else {
      f(scalar_t{}, npl, std::integral_constant<int, 1>{});
    }
  });
}

template <typename VecOk, typename F>
void dispatch_router(const char* op, const at::Tensor& logits, VecOk vec_ok, F&& f) {
  const int64_t E = logits.size(1);
  switch (logits.scalar_type()) {
    case at::kFloat:
      dispatch_bucket<float>(E, vec_ok, f);
      break;
    case at::kHalf:
      dispatch_bucket<c10::Half>(E, vec_ok, f);
      break;
    case at::kBFloat16:
      dispatch_bucket<c10::BFloat16>(E, vec_ok, f);
      break;
    default:  // unreachable after check_kernel_tensor
      MOLORA_CHECK_TYPE(false, op, ": unsupported logits dtype ", logits.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> launch_route_topk(const char* op, const at::Tensor& logits,
                                                     const kernels::RouteTopkParams& prm) {
  const int64_t T = logits.size(0), E = logits.size(1), k = prm.k;
  at::Tensor weights = cuda::new_output({T, k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = cuda::new_output({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids};
  const cuda::DeviceGuard guard(logits);
  const cuda::Stream stream = cuda::current_stream();
  const int64_t grid = grid_for(T, logits);
  dispatch_router(op, logits, [&](int v) { return vec_loads_ok(logits, v); },
                  [&](auto tag, auto npl, auto vec) {
    using scalar_t = decltype(tag);
    auto* kern = &kernels::route_topk_kernel<scalar_t, decltype(npl)::value, decltype(vec)::value>;
    MOLORA_LAUNCH(grid, kThreads, 0, stream, kern, logits.const_data_ptr<scalar_t>(),
                  logits.stride(0), logits.stride(1), T, static_cast<int32_t>(E), prm,
                  weights.data_ptr<float>(), ids.data_ptr<int32_t>());
  });
  cuda::check_launch();
  return {weights, ids};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softmax_topk_cuda(const at::Tensor& logits, int64_t k,
                                                     bool renormalize) {
  const char* op = "softmax_topk";
  if (logits.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(softmax_topk_cuda)>(op, logits, k, renormalize);
  const int64_t E = check_router_logits(op, logits);
  check_router_k(op, k, E);
  cuda::check_kernel_input(op, "logits", logits);
  kernels::RouteTopkParams prm{};
  prm.mode = kernels::kRouteSoftmaxTopk;
  prm.k = static_cast<int32_t>(k);
  prm.renormalize = renormalize;
  return launch_route_topk(op, logits, prm);
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_cuda(const at::Tensor& logits, int64_t k,
                                                     double temperature) {
  const char* op = "topk_softmax";
  if (logits.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(topk_softmax_cuda)>(op, logits, k, temperature);
  const int64_t E = check_router_logits(op, logits);
  check_router_k(op, k, E);
  check_topk_softmax_temperature(temperature);
  cuda::check_kernel_input(op, "logits", logits);
  kernels::RouteTopkParams prm{};
  prm.mode = kernels::kRouteTopkSoftmax;
  prm.k = static_cast<int32_t>(k);
  // The reference divides the fp32 logits by the Python float: an fp32 division by float(temp).
  prm.temperature = static_cast<float>(temperature);
  return launch_route_topk(op, logits, prm);
}

std::tuple<at::Tensor, at::Tensor> sigmoid_topk_cuda(const at::Tensor& logits, int64_t k,
                                                     const std::optional<at::Tensor>& bias,
                                                     bool normalize, bool bias_in_weights,
                                                     double scale) {
  const char* op = "sigmoid_topk";
  if (logits.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(sigmoid_topk_cuda)>(op, logits, k, bias, normalize, bias_in_weights, scale);
  const int64_t E = check_router_logits(op, logits);
  check_router_k(op, k, E);
  const at::Tensor b = check_router_bias(op, bias, E, logits);  // fp32, contiguous
  cuda::check_kernel_input(op, "logits", logits);
  kernels::RouteTopkParams prm{};
  prm.mode = kernels::kRouteSigmoidTopk;
  prm.k = static_cast<int32_t>(k);
  prm.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
  prm.normalize = normalize;
  prm.bias_in_weights = bias_in_weights;
  prm.scale = static_cast<float>(scale);
  return launch_route_topk(op, logits, prm);
}

std::tuple<at::Tensor, at::Tensor> softmax_topp_cuda(const at::Tensor& logits, double top_p,
                                                     int64_t min_k, double entropy_threshold,
                                                     double q, double eps) {
  const char* op = "softmax_topp";
  if (logits.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(softmax_topp_cuda)>(op, logits, top_p, min_k, entropy_threshold, q, eps);
  const int64_t E = check_router_logits(op, logits);
  check_softmax_topp_args(E, top_p, min_k, eps);
  cuda::check_kernel_input(op, "logits", logits);
  const int64_t T = logits.size(0);
  at::Tensor weights = cuda::new_output({T, E}, logits.options().dtype(at::kFloat));
  at::Tensor ids = cuda::new_output({T, E}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids};

  // Scalars as the reference evaluates them: the gate condition in Python floats (double), the
  // tensor arithmetic in fp32 with the Python scalars cast to float (H / H_max, (1 - sum) / (q-1),
  // pe ** q, H > threshold, cumsum <= top_p).
  kernels::RouteToppParams prm{};
  prm.top_p = static_cast<float>(top_p);
  prm.min_k = static_cast<int32_t>(min_k);
  // E == 1: the reference's H is 0 (so 0 > threshold could hold), but min_k >= 1 = E keeps the
  // only expert anyway: the gate cannot change the output.
  prm.entropy_gate = q > 0 && entropy_threshold < 1 && E > 1;
  prm.shannon = q == 1.0;
  prm.q = static_cast<float>(q);
  prm.q_minus_1 = static_cast<float>(q - 1.0);
  prm.h_max = static_cast<float>(q == 1.0 ? std::log(static_cast<double>(E))
                                          : (1.0 - std::pow(static_cast<double>(E), 1.0 - q)) /
                                                (q - 1.0));
  prm.eps = static_cast<float>(eps);
  prm.threshold = static_cast<float>(entropy_threshold);

  const cuda::DeviceGuard guard(logits);
  const cuda::Stream stream = cuda::current_stream();
  const int64_t grid = grid_for(T, logits);
  // Rows that broadcast are sorted in shared memory (router.cuh): e_pad 64-bit words per warp
  // (E <= 1024: at most 32 KiB per block, under the default 48 KiB limit).
  int32_t e_pad = 1;
  while (E <= 1024 && e_pad < E) e_pad <<= 1;  // unused by the E > 1024 kernels
  dispatch_router(op, logits, [&](int v) { return vec_loads_ok(logits, v); },
                  [&](auto tag, auto npl, auto vec) {
    using scalar_t = decltype(tag);
    constexpr int NPL = decltype(npl)::value;
    auto* kern = &kernels::route_topp_kernel<scalar_t, NPL, decltype(vec)::value>;
    const size_t smem =
        NPL > 0 ? static_cast<size_t>(kRowsPerBlock) * static_cast<size_t>(e_pad) * 8 : 0;
    MOLORA_LAUNCH(grid, kThreads, smem, stream, kern, logits.const_data_ptr<scalar_t>(),
                  logits.stride(0), logits.stride(1), T, static_cast<int32_t>(E), e_pad, prm,
                  weights.data_ptr<float>(), ids.data_ptr<int32_t>());
  });
  cuda::check_launch();
  return {weights, ids};
}

namespace {

// Shared part of the backward launchers: checks (the ids' range on the host only in the opt-in
// host mode; the kernels assert it on the device), the [T, k] inputs as contiguous fp32 / int32
// (no copy when they already are: the forward's outputs).
struct RouteGradInputs {
  int64_t E;
  at::Tensor g, w, ids;
};

RouteGradInputs prepare_route_grad(const char* op, const at::Tensor& grad_weights,
                                   const at::Tensor& weights, const at::Tensor& ids,
                                   const at::Tensor& logits, bool need_weights) {
  RouteGradInputs in;
  in.E = check_route_grad_args(op, grad_weights, weights, ids, logits);
  cuda::check_kernel_input(op, "logits", logits);
  const cuda::DeviceGuard guard(logits);
  if (cuda::host_value_checks()) check_index_range(op, "ids", ids, -1, in.E);
  in.g = grad_weights.to(at::kFloat).contiguous();
  if (need_weights) in.w = weights.to(at::kFloat).contiguous();
  in.ids = ids.to(at::kInt).contiguous();
  return in;
}

}  // namespace

at::Tensor softmax_route_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& weights,
                                       const at::Tensor& ids, const at::Tensor& logits,
                                       bool renormalized, double scale) {
  const char* op = "softmax_route_backward";
  if (logits.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(softmax_route_backward_cuda)>(op, grad_weights, weights, ids, logits, renormalized, scale);
  const RouteGradInputs in = prepare_route_grad(op, grad_weights, weights, ids, logits, true);
  const int64_t T = logits.size(0), E = in.E, k = ids.size(1);
  at::Tensor out = cuda::new_output({T, E}, logits.options());
  if (T == 0) return out;
  const cuda::DeviceGuard guard(logits);
  const cuda::Stream stream = cuda::current_stream();
  const int64_t grid = grid_for(T, logits);
  // VEC covers both the logits loads (plain mode only) and the output row stores (the fresh
  // contiguous output is aligned when E % VEC == 0).
  auto vec_ok = [&](int v) {
    return E % v == 0 && (renormalized || vec_loads_ok(logits, v));
  };
  dispatch_router(op, logits, vec_ok, [&](auto tag, auto npl, auto vec) {
    using scalar_t = decltype(tag);
    auto* kern = &kernels::softmax_route_backward_kernel<scalar_t, decltype(npl)::value,
                                                         decltype(vec)::value>;
    MOLORA_LAUNCH(grid, kThreads, 0, stream, kern, in.g.const_data_ptr<float>(),
                  in.w.const_data_ptr<float>(), in.ids.const_data_ptr<int32_t>(),
                  static_cast<int32_t>(k), logits.const_data_ptr<scalar_t>(), logits.stride(0),
                  logits.stride(1), T, static_cast<int32_t>(E), renormalized,
                  static_cast<float>(scale), out.data_ptr<scalar_t>());
  });
  cuda::check_launch();
  return out;
}

at::Tensor sigmoid_topk_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& weights,
                                      const at::Tensor& ids, const at::Tensor& logits,
                                      const std::optional<at::Tensor>& bias, bool normalize,
                                      bool bias_in_weights, double scale) {
  const char* op = "sigmoid_topk_backward";
  if (logits.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(sigmoid_topk_backward_cuda)>(op, grad_weights, weights, ids, logits, bias, normalize, bias_in_weights, scale);
  // ids of -1 contribute nothing, as in the reference and the CPU kernel.
  const RouteGradInputs in = prepare_route_grad(op, grad_weights, weights, ids, logits, false);
  const at::Tensor b = check_router_bias(op, bias, in.E, logits);
  const int64_t T = logits.size(0), E = in.E, k = ids.size(1);
  at::Tensor out = cuda::new_output({T, E}, logits.options());
  if (T == 0) return out;
  const cuda::DeviceGuard guard(logits);
  const cuda::Stream stream = cuda::current_stream();
  const int64_t grid = grid_for(T, logits);
  auto vec_ok = [&](int v) { return E % v == 0; };  // logits only gathered; output aligned rows
  dispatch_router(op, logits, vec_ok, [&](auto tag, auto npl, auto vec) {
    using scalar_t = decltype(tag);
    auto* kern = &kernels::sigmoid_topk_backward_kernel<scalar_t, decltype(npl)::value,
                                                        decltype(vec)::value>;
    MOLORA_LAUNCH(grid, kThreads, 0, stream, kern, in.g.const_data_ptr<float>(),
                  in.ids.const_data_ptr<int32_t>(), static_cast<int32_t>(k),
                  logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                  b.defined() ? b.const_data_ptr<float>() : nullptr, T, static_cast<int32_t>(E),
                  normalize, bias_in_weights, static_cast<float>(scale),
                  out.data_ptr<scalar_t>());
  });
  cuda::check_launch();
  return out;
}

}  // namespace molora

MOLORA_CUDA_LIBRARY_IMPL(m) {
  m.impl("softmax_topk", &molora::softmax_topk_cuda);
  m.impl("topk_softmax", &molora::topk_softmax_cuda);
  m.impl("sigmoid_topk", &molora::sigmoid_topk_cuda);
  m.impl("softmax_topp", &molora::softmax_topp_cuda);
  m.impl("softmax_route_backward", &molora::softmax_route_backward_cuda);
  m.impl("sigmoid_topk_backward", &molora::sigmoid_topk_backward_cuda);
}
