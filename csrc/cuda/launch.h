// Host-side portability layer of the CUDA launchers (csrc/cuda/*.cu): device guard, current
// stream, launch check, graph-capture query, output allocation. With MOLORA_CUDA_EMULATION the
// same launcher source compiles with the host compiler into molora_ops._C_emu (CPU tensors,
// kernels emulated; see csrc/kernels/cuda_compat.cuh) and registers under torch.ops.molora_emu.
//
// Every launcher file ends with
//     MOLORA_CUDA_LIBRARY_IMPL(m) { m.impl("op_name", &molora::op_name_cuda); ... }
// which registers the kernels as THE CUDA kernel of torch.ops.molora.<op> in a CUDA build (the
// schemas are declared in Python, molora_ops/ops/; the dispatcher calls the launcher directly),
// or as torch.ops.molora_emu.<op> (CPU key) in the emulation module.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include <cstdlib>
#include <limits>

#include "../common/check.h"
#include "../kernels/cuda_compat.cuh"

#if !defined(MOLORA_CUDA_EMULATION)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace molora::cuda {

#if defined(MOLORA_CUDA_EMULATION)
using Stream = ::molora::emu::Stream;
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
inline Stream current_stream() { return Stream{}; }
inline int multiprocessor_count(const at::Tensor&) { return 4; }  // small grids in emulation
inline bool stream_capturing() { return false; }
// Throws (c10::Error) if a MOLORA_DEVICE_ASSERT fired or the launch configuration was invalid.
inline void check_launch() { ::molora::emu::check_last_launch(); }
template <typename Kernel>
inline void set_max_dynamic_smem(Kernel kernel, int bytes) {
  ::molora::emu::set_max_dynamic_smem(kernel, bytes);
}
#define MOLORA_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(molora_emu, CPU, m)
#else
using Stream = cudaStream_t;
struct DeviceGuard {
  c10::cuda::CUDAGuard guard;
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
};
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
// SM count of t's device, cached per device.
inline int multiprocessor_count(const at::Tensor& t) {
  static int cached[64] = {0};
  const int dev = t.get_device();
  if (dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cached[dev] = n;
  }
  return cached[dev];
}
// True while the current stream is capturing a CUDA graph (host value checks are skipped then:
// a synchronisation is illegal during capture).
inline bool stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(current_stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}
inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
template <typename Kernel>
inline void set_max_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}
// MOLORA_POISON_OUTPUTS=1 (the GPU tests set it): outputs start as NaN / a sentinel, so an element
// a kernel forgot to write cannot pass as a plausible value.
inline bool poison_outputs_env() {
  static const bool on = [] {
    const char* v = std::getenv("MOLORA_POISON_OUTPUTS");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}
#define MOLORA_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(molora, CUDA, m)
#endif

// Whether a launcher checks index VALUES on the host (aminmax + item: a synchronisation) before
// its kernels: only in the opt-in host mode (MOLORA_CHECK_VALUES=1 /
// molora_ops.set_value_checks(True)) and never during graph capture. By default the kernels'
// MOLORA_DEVICE_ASSERTs check the same ranges on the device, with no host synchronisation.
// Call it after the DeviceGuard (the capture query reads the current device's stream).
inline bool host_value_checks() { return ::molora::host_value_checks() && !stream_capturing(); }

// float64 data: the kernels are instantiated for fp16/bf16/fp32; the op's pure-PyTorch reference
// serves it (op molora_ref::<op>, the same schema, registered by molora_ops/ops/_registry.py).
// Fn is the launcher's own function type, so the call is checked against the schema.
template <typename Fn, typename... Args>
decltype(auto) call_reference(const char* op, Args&&... args) {
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(
      (std::string("molora_ref::") + op).c_str(), "");
  return handle.typed<Fn>().call(std::forward<Args>(args)...);
}

inline bool poison_outputs() {
#if defined(MOLORA_CUDA_EMULATION)
  return true;  // always in emulation: fresh CPU memory is often zero
#else
  return poison_outputs_env();
#endif
}

// An output tensor every element of which the kernels write: uninitialised (at::empty), or
// poisoned (NaN for floats, INT32_MIN / INT64_MIN for indices) in the tests.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!poison_outputs()) return at::empty(sizes, options);
  if (at::isFloatingType(options.dtype().toScalarType()))
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::full(sizes, options.dtype().toScalarType() == at::kLong
                             ? std::numeric_limits<int64_t>::min()
                             : static_cast<int64_t>(std::numeric_limits<int32_t>::min()),
                  options);
}

// An input of a CUDA kernel: a CUDA tensor (any tensor in emulation, where all are CPU tensors).
inline void check_on_device(const char* op, const char* name, const at::Tensor& t) {
#if !defined(MOLORA_CUDA_EMULATION)
  MOLORA_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernel, got ",
                     t.device());
#else
  (void)op;
  (void)name;
  (void)t;
#endif
}

// The floating dtypes the kernels are instantiated for. float64 is not one: the launchers hand it
// to the reference first (call_reference), so this only fires for other dtypes.
inline void check_kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  MOLORA_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                    " must be float32, float16 or bfloat16 for the CUDA kernel, got ", s,
                    " (float64 runs on the reference)");
}

// Both checks: a float input of a CUDA kernel.
inline void check_kernel_input(const char* op, const char* name, const at::Tensor& t) {
  check_on_device(op, name, t);
  check_kernel_dtype(op, name, t);
}

// f(scalar_t{}) for a kernel dtype (check_kernel_dtype ran before).
template <typename F>
void dispatch_kernel_dtype(at::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "molora: unexpected dtype ", s, " for a CUDA kernel");
  }
}

}  // namespace molora::cuda
