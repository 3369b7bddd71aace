// CUDA launchers of the dispatch family: dispatch, gather_rows, combine_rows, pair_dot.
// Pattern of every launcher file (csrc/cuda/masked.cu): checks shared with the CPU launchers
// (csrc/common/dispatch_checks.h), device guard, outputs via cuda::new_output, dtype dispatch,
// MOLORA_LAUNCH on the current stream, launch check; kernels in csrc/kernels/dispatch.cuh. The
// same source compiles for the GPU (nvcc) and for the CPU emulation module (csrc/emu/).
//
// Autograd (molora_ops/ops/dispatch.py): the backward of gather_rows is combine_rows (+ pair_dot
// for the weights), the backward of combine_rows is gather_rows (+ pair_dot): all three have a
// kernel here, so the backward stays on these kernels too.
//
// Host synchronisation: none. The kernels' MOLORA_DEVICE_ASSERTs stop a bad index (a trap: the
// CUDA context is lost, as for any device-side assert); the host checks of index VALUES
// (check_index_range: aminmax + .item(), a synchronisation) run only in the opt-in host mode
// (cuda::host_value_checks()). Output sizes depend on shapes only, so dispatch can be captured
// and replayed with new ids.
#include <algorithm>
#include <climits>

#include "../common/dispatch_checks.h"
#include "../kernels/dispatch.cuh"
#include "launch.h"

namespace molora {
namespace dispatch_launch {
namespace {

template <typename F>
void dispatch_index_dtype(at::ScalarType s, F&& f) {
  if (s == at::kInt) f(int32_t{});
  else f(int64_t{});  // check_index ran before: int32 or int64
}

constexpr int kThreads = 256;  // 8 warps; every kernel of this file
constexpr int64_t kWarpsPerBlock = kThreads / kernels::kWarpSize;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row kernels (one warp per row): enough blocks for a few waves on every SM, rows grid-strided
// beyond that. NOTE: untuned.
int64_t row_blocks(int64_t rows, const at::Tensor& t) {
  return std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(rows, kWarpsPerBlock), int64_t{32} * cuda::multiprocessor_count(t)));
}

// The 16-byte path needs 16-byte aligned base pointers and row strides, contiguous columns and a
// whole number of vectors per row (the contiguous [rows, d] outputs then stay aligned too).
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
bool rows_vectorisable(const at::Tensor& t) {
  constexpr int64_t vec = kVec<scalar_t>;
  const int64_t d = t.size(1);
  if (d % vec != 0) return false;
  if (d > 1 && t.stride(1) != 1) return false;
  if (t.size(0) > 1 && t.stride(0) % vec != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Column stride of a 2-D tensor's rows as read by the kernels (any value for d == 1 is fine).
int64_t col_stride(const at::Tensor& t) { return t.size(1) > 1 ? t.stride(1) : 1; }

// Experts whose counters fit in shared memory without the opt-in: the 48 KiB default limit holds
// the static shared memory of the kernel (pass 3: 128 bytes) plus the dynamic part, E int32 here
// (47 KiB at most). More experts keep their counters in the workspace in global memory.
constexpr int64_t kSmemExperts = 47 * 1024 / 4;

}  // namespace

// The ops (registered below). In this named namespace because the emulation module compiles every
// launcher file into one translation unit (csrc/emu/emu_bindings.cpp): helper names must not clash.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cuda(const at::Tensor& ids,
                                                             int64_t num_experts,
                                                             int64_t block_size) {
  const char* op = "dispatch";
  check_index(op, "ids", ids);  // (repeated by check_dispatch_args; a dtype error comes first)
  cuda::check_on_device(op, "ids", ids);
  const cuda::DeviceGuard guard(ids);
  const int64_t P =
      check_dispatch_args(op, ids, num_experts, block_size, cuda::host_value_checks());
  MOLORA_CHECK_VALUE(num_experts <= INT32_MAX - 1, op, ": num_experts must be < 2^31 - 1, got ",
                     num_experts);
  const int64_t T = ids.size(0), k = ids.size(1), n = T * k, E = num_experts;
  const at::TensorOptions opts = ids.options().dtype(at::kInt);
  at::Tensor order = cuda::new_output({P}, opts);
  at::Tensor pos = cuda::new_output({T, k}, opts);
  at::Tensor offsets = cuda::new_output({E + 1}, opts);
  if (n == 0) {  // no pairs: every row (E*(block_size-1) of them) is padding
    order.fill_(-1);
    offsets.zero_();
    return {order, pos, offsets};
  }
  // Chunks of pairs, one block each: about two blocks per SM, but at least kThreads pairs and at
  // least E/4 pairs per chunk, so the per-block work over the E experts (clear, flush and scan E
  // counters) stays below ~4x the pair work, and the workspace E * n_chunks <= 4n + E int32.
  // NOTE: untuned.
  const int64_t sms = cuda::multiprocessor_count(ids);
  int64_t chunk = std::max<int64_t>({ceil_div(n, 2 * sms), E / 4, int64_t{kThreads}});
  chunk = ceil_div(chunk, kThreads) * kThreads;
  const int64_t n_chunks = ceil_div(n, chunk);
  // Workspace (no memset: pass 1 writes every count).
  at::Tensor counts = at::empty({E * n_chunks}, opts);
  at::Tensor totals = at::empty({E}, opts);
  const bool smem_counters = E <= kSmemExperts;
  const size_t smem = smem_counters ? static_cast<size_t>(E) * sizeof(int32_t) : 0;
  const bool contiguous = ids.is_contiguous();
  // Pass 2 gives each expert `seg` lanes (a power of two <= 32, >= n_chunks when possible): a warp
  // scans 32 / seg experts, so few chunks (small T) do not leave lanes idle.
  int32_t seg = 1;
  while (seg < kernels::kWarpSize && seg < n_chunks) seg *= 2;
  const cuda::Stream stream = cuda::current_stream();
  dispatch_index_dtype(ids.scalar_type(), [&](auto itag) {
    using index_t = decltype(itag);
    const index_t* idp = ids.data_ptr<index_t>();
    MOLORA_LAUNCH(n_chunks, kThreads, smem, stream, kernels::dispatch_count_kernel<index_t>, idp,
                  ids.stride(0), ids.stride(1), contiguous, static_cast<int32_t>(k), n,
                  static_cast<int32_t>(E), chunk, static_cast<int32_t>(n_chunks), smem_counters,
                  counts.data_ptr<int32_t>());
    cuda::check_launch();
    MOLORA_LAUNCH(ceil_div(E, kWarpsPerBlock * (kernels::kWarpSize / seg)), kThreads, 0, stream,
                  kernels::dispatch_chunk_scan_kernel, counts.data_ptr<int32_t>(),
                  static_cast<int32_t>(n_chunks), static_cast<int32_t>(E), seg,
                  totals.data_ptr<int32_t>());
    cuda::check_launch();
    MOLORA_LAUNCH(n_chunks, kThreads, smem, stream, kernels::dispatch_scatter_kernel<index_t>,
                  idp, ids.stride(0), ids.stride(1), contiguous, static_cast<int32_t>(k), n,
                  static_cast<int32_t>(E), chunk, static_cast<int32_t>(n_chunks),
                  static_cast<int32_t>(block_size), P, smem_counters, counts.data_ptr<int32_t>(),
                  static_cast<const int32_t*>(totals.data_ptr<int32_t>()),
                  order.data_ptr<int32_t>(), pos.data_ptr<int32_t>(),
                  offsets.data_ptr<int32_t>());
    cuda::check_launch();
  });
  return {order, pos, offsets};
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& order, const at::Tensor& pos,
                            const std::optional<at::Tensor>& weights) {
  const char* op = "gather_rows";
  if (x.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(gather_rows_cuda)>(op, x, order, pos, weights);
  check_float(op, "x", x);
  cuda::check_on_device(op, "x", x);
  const cuda::DeviceGuard guard(x);
  check_rows_args(op, x, order, pos, weights, pos.size(0), "x", cuda::host_value_checks());
  cuda::check_kernel_dtype(op, "x", x);
  const int64_t T = pos.size(0), k = pos.size(1), P = order.size(0), d = x.size(1);
  MOLORA_CHECK_VALUE(k <= INT32_MAX, op, ": k must be < 2^31, got ", k);
  at::Tensor out = cuda::new_output({P, d}, x.options());
  if (P == 0 || d == 0) return out;
  const at::Tensor w = opmath_or_undefined(weights, at::kFloat);  // [T, k] fp32 contiguous
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  cuda::dispatch_kernel_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_index_dtype(order.scalar_type(), [&](auto itag) {
      using index_t = decltype(itag);
      auto* kernel = rows_vectorisable<scalar_t>(x)
                         ? &kernels::gather_rows_kernel<scalar_t, index_t, kVec<scalar_t>>
                         : &kernels::gather_rows_kernel<scalar_t, index_t, 1>;
      MOLORA_LAUNCH(row_blocks(P, x), kThreads, 0, cuda::current_stream(), kernel,
                    x.data_ptr<scalar_t>(), x.stride(0), col_stride(x),
                    order.data_ptr<index_t>(), order.stride(0), wp, static_cast<int32_t>(k),
                    T * k, P, d, out.data_ptr<scalar_t>());
    });
  });
  cuda::check_launch();
  return out;
}

at::Tensor combine_rows_cuda(const at::Tensor& y_perm, const at::Tensor& order,
                             const at::Tensor& pos, const std::optional<at::Tensor>& weights) {
  const char* op = "combine_rows";
  if (y_perm.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(combine_rows_cuda)>(op, y_perm, order, pos, weights);
  check_float(op, "y_perm", y_perm);
  cuda::check_on_device(op, "y_perm", y_perm);
  const cuda::DeviceGuard guard(y_perm);
  check_rows_args(op, y_perm, order, pos, weights, order.size(0), "y_perm",
                  cuda::host_value_checks());
  cuda::check_kernel_dtype(op, "y_perm", y_perm);
  const int64_t T = pos.size(0), k = pos.size(1), P = order.size(0), d = y_perm.size(1);
  MOLORA_CHECK_VALUE(k <= INT32_MAX && P <= INT32_MAX, op, ": k and P must be < 2^31");
  at::Tensor out = cuda::new_output({T, d}, y_perm.options());
  if (T == 0 || d == 0) return out;
  const at::Tensor w = opmath_or_undefined(weights, at::kFloat);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  cuda::dispatch_kernel_dtype(y_perm.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_index_dtype(pos.scalar_type(), [&](auto itag) {
      using index_t = decltype(itag);
      auto* kernel = rows_vectorisable<scalar_t>(y_perm)
                         ? &kernels::combine_rows_kernel<scalar_t, index_t, kVec<scalar_t>>
                         : &kernels::combine_rows_kernel<scalar_t, index_t, 1>;
      MOLORA_LAUNCH(row_blocks(T, y_perm), kThreads, 0, cuda::current_stream(), kernel,
                    y_perm.data_ptr<scalar_t>(), y_perm.stride(0), col_stride(y_perm),
                    pos.data_ptr<index_t>(), pos.stride(0), pos.stride(1), wp,
                    static_cast<int32_t>(k), T, P, d, out.data_ptr<scalar_t>());
    });
  });
  cuda::check_launch();
  return out;
}

at::Tensor pair_dot_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& pos,
                         bool a_by_token) {
  const char* op = "pair_dot";
  if (a.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(pair_dot_cuda)>(op, a, b, pos, a_by_token);
  check_float(op, "a", a);
  cuda::check_on_device(op, "a", a);
  const cuda::DeviceGuard guard(a);
  check_pair_dot_args(op, a, b, pos, a_by_token, cuda::host_value_checks());
  cuda::check_kernel_dtype(op, "a", a);
  const int64_t T = pos.size(0), k = pos.size(1), d = a.size(1);
  MOLORA_CHECK_VALUE(k <= INT32_MAX, op, ": k must be < 2^31, got ", k);
  // fp32 (the reference's opmath of fp32/fp16/bf16), every element written (0 for dropped pairs)
  at::Tensor out = cuda::new_output({T, k}, a.options().dtype(at::kFloat));
  if (T * k == 0) return out;
  if (d == 0) return out.zero_();
  cuda::dispatch_kernel_dtype(a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_index_dtype(pos.scalar_type(), [&](auto itag) {
      using index_t = decltype(itag);
      const bool vec = rows_vectorisable<scalar_t>(a) && rows_vectorisable<scalar_t>(b);
      auto* kernel = vec ? &kernels::pair_dot_kernel<scalar_t, index_t, kVec<scalar_t>>
                         : &kernels::pair_dot_kernel<scalar_t, index_t, 1>;
      MOLORA_LAUNCH(row_blocks(T * k, a), kThreads, 0, cuda::current_stream(), kernel,
                    a.data_ptr<scalar_t>(), a.stride(0), col_stride(a), b.data_ptr<scalar_t>(),
                    b.stride(0), col_stride(b), pos.data_ptr<index_t>(), pos.stride(0),
                    pos.stride(1), a_by_token, static_cast<int32_t>(k), T, a.size(0), b.size(0),
                    d, out.data_ptr<float>());
    });
  });
  cuda::check_launch();
  return out;
}

}  // namespace dispatch_launch
}  // namespace molora

MOLORA_CUDA_LIBRARY_IMPL(m) {
  m.impl("dispatch", &molora::dispatch_launch::dispatch_cuda);
  m.impl("gather_rows", &molora::dispatch_launch::gather_rows_cuda);
  m.impl("combine_rows", &molora::dispatch_launch::combine_rows_cuda);
  m.impl("pair_dot", &molora::dispatch_launch::pair_dot_cuda);
}
