// CUDA launchers of the rank-wise masked-activation family: rank_topk, id_histogram, rank_scatter.
// The pattern of every launcher file: checks (shared with the CPU launchers), device guard,
// outputs via cuda::new_output, dtype dispatch, MOLORA_LAUNCH on the current stream, launch check;
// framework-free kernels in csrc/kernels/. The same source compiles for the GPU (nvcc) and for the
// CPU emulation module (csrc/emu/): see csrc/cuda/launch.h.
#include <algorithm>
#include <climits>

#include "../common/masked_checks.h"
#include "../kernels/masked.cuh"
#include "launch.h"

namespace molora {
namespace {

// Warps of 32 lanes, one token row per warp: 8 rows per block; enough blocks to fill every SM
// (2048 threads each), rows grid-strided beyond that.
constexpr int kRowThreads = 256;

int64_t row_blocks(int64_t rows, const at::Tensor& t) {
  const int64_t rows_per_block = kRowThreads / kernels::kWarpSize;
  const int64_t need = (rows + rows_per_block - 1) / rows_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(need, int64_t{8} * cuda::multiprocessor_count(t)));
}

template <typename scalar_t, typename src_t>
void launch_rank_topk(const at::Tensor& h, const at::Tensor& src, const float* bias, int64_t k,
                      bool use_abs, at::Tensor& values, at::Tensor& ids) {
  const int64_t T = h.size(0), R = h.size(1);
  // NOTE: keys per lane in registers up to R = 1024 (32 per lane); the power-of-two NPL grid
  // bounds the instantiations (7 per dtype pair) and at most doubles the (predicated-off) slots.
  const int64_t npl = (R + kernels::kWarpSize - 1) / kernels::kWarpSize;
  auto* kernel = &kernels::rank_topk_kernel<scalar_t, src_t, 0>;
  if (npl <= 1) kernel = &kernels::rank_topk_kernel<scalar_t, src_t, 1>;
  else if (npl <= 2) kernel = &kernels::rank_topk_kernel<scalar_t, src_t, 2>;
  else if (npl <= 4) kernel = &kernels::rank_topk_kernel<scalar_t, src_t, 4>;
  else if (npl <= 8) kernel = &kernels::rank_topk_kernel<scalar_t, src_t, 8>;
  else if (npl <= 16) kernel = &kernels::rank_topk_kernel<scalar_t, src_t, 16>;
  else if (npl <= 32) kernel = &kernels::rank_topk_kernel<scalar_t, src_t, 32>;
  MOLORA_LAUNCH(row_blocks(T, h), kRowThreads, 0, cuda::current_stream(), kernel,
                h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), src.data_ptr<src_t>(),
                src.stride(0), src.stride(1), bias, T, static_cast<int32_t>(R),
                static_cast<int32_t>(k), use_abs, values.data_ptr<scalar_t>(),
                ids.data_ptr<int32_t>());
  cuda::check_launch();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rank_topk_cuda(const at::Tensor& h, int64_t k,
                                                  const std::optional<at::Tensor>& scores,
                                                  const std::optional<at::Tensor>& bias,
                                                  bool use_abs) {
  const char* op = "rank_topk";
  if (h.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(rank_topk_cuda)>(op, h, k, scores, bias, use_abs);
  check_rank_topk_args(op, h, k, scores, bias);
  cuda::check_kernel_input(op, "h", h);
  const int64_t T = h.size(0), R = h.size(1);
  MOLORA_CHECK_VALUE(R < INT32_MAX, op, ": R must be < 2^31, got ", R);
  const cuda::DeviceGuard guard(h);
  at::Tensor values = cuda::new_output({T, k}, h.options());
  at::Tensor ids = cuda::new_output({T, k}, h.options().dtype(at::kInt));
  if (T == 0) return {values, ids};
  // h and scores are read through their strides (no copy of a non-contiguous input); the bias is
  // tiny: fp32, contiguous. Scores of another dtype than h (or float64) are read as fp32 (one
  // conversion pass; the key is fp32 either way).
  const at::Tensor b = opmath_or_undefined(bias, at::kFloat);
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  cuda::dispatch_kernel_dtype(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (!scores.has_value()) {
      launch_rank_topk<scalar_t, scalar_t>(h, h, bp, k, use_abs, values, ids);
    } else if (scores->scalar_type() == h.scalar_type()) {
      launch_rank_topk<scalar_t, scalar_t>(h, *scores, bp, k, use_abs, values, ids);
    } else {
      launch_rank_topk<scalar_t, float>(h, scores->to(at::kFloat), bp, k, use_abs, values, ids);
    }
  });
  return {values, ids};
}

at::Tensor id_histogram_cuda(const at::Tensor& ids_in, int64_t num_bins) {
  const char* op = "id_histogram";
  check_id_histogram_args(op, ids_in, num_bins);
  cuda::check_on_device(op, "ids", ids_in);
  MOLORA_CHECK_VALUE(num_bins <= INT32_MAX, op, ": num_bins must be < 2^31, got ", num_bins);
  const cuda::DeviceGuard guard(ids_in);
  // An out-of-range id must stop the op, not be dropped: the kernel asserts on the device; the
  // host check (a synchronisation) only in the opt-in host mode.
  if (cuda::host_value_checks()) check_index_range(op, "ids", ids_in, -1, num_bins);
  const at::Tensor ids = ids_in.contiguous();
  // Counts accumulate by atomics: they must start at zero (not a poisoned new_output).
  at::Tensor counts = at::zeros({num_bins}, ids.options().dtype(at::kInt));
  const int64_t n = ids.numel();
  if (n == 0) return counts;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 1024);
  // Per-warp private sub-histograms while they fit in 32 KiB (8 copies up to 1024 bins: rank
  // usage), fewer copies for more bins, global atomics beyond 12 Ki bins (48 KiB, the default
  // dynamic shared-memory limit).
  constexpr int64_t kSmemBins = 12 * 1024;
  const int64_t copies =
      num_bins > kSmemBins ? 0 : std::max<int64_t>(1, std::min<int64_t>(8, 8 * 1024 / num_bins));
  const size_t smem = static_cast<size_t>(copies * num_bins) * sizeof(int32_t);
  const cuda::Stream stream = cuda::current_stream();
  if (ids.scalar_type() == at::kInt) {
    MOLORA_LAUNCH(blocks, kThreads, smem, stream, kernels::id_histogram_kernel<int32_t>,
                  ids.data_ptr<int32_t>(), n, static_cast<int32_t>(num_bins),
                  static_cast<int32_t>(copies), counts.data_ptr<int32_t>());
  } else {
    MOLORA_LAUNCH(blocks, kThreads, smem, stream, kernels::id_histogram_kernel<int64_t>,
                  ids.data_ptr<int64_t>(), n, static_cast<int32_t>(num_bins),
                  static_cast<int32_t>(copies), counts.data_ptr<int32_t>());
  }
  cuda::check_launch();
  return counts;
}

at::Tensor rank_scatter_cuda(const at::Tensor& src, const at::Tensor& ids, int64_t num_ranks) {
  const char* op = "rank_scatter";
  if (src.scalar_type() == at::kDouble)
    return cuda::call_reference<decltype(rank_scatter_cuda)>(op, src, ids, num_ranks);
  check_float(op, "src", src);
  cuda::check_on_device(op, "src", src);
  const cuda::DeviceGuard guard(src);
  check_rank_scatter_args(op, src, ids, num_ranks, cuda::host_value_checks());
  cuda::check_kernel_input(op, "src", src);
  MOLORA_CHECK_VALUE(num_ranks < INT32_MAX && src.size(1) < INT32_MAX, op,
                     ": num_ranks and k must be < 2^31");
  const int64_t T = src.size(0), k = src.size(1);
  at::Tensor out = cuda::new_output({T, num_ranks}, src.options());
  if (T == 0) return out;
  cuda::dispatch_kernel_dtype(src.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto run = [&](auto itag) {
      using index_t = decltype(itag);
      auto* kernel = &kernels::rank_scatter_kernel<scalar_t, index_t>;
      MOLORA_LAUNCH(row_blocks(T, src), kRowThreads, 0, cuda::current_stream(), kernel,
                    src.data_ptr<scalar_t>(),
                    src.stride(0), src.stride(1), ids.data_ptr<index_t>(), ids.stride(0),
                    ids.stride(1), T, static_cast<int32_t>(k), static_cast<int32_t>(num_ranks),
                    out.data_ptr<scalar_t>());
    };
    if (ids.scalar_type() == at::kInt) run(int32_t{});
    else run(int64_t{});
  });
  cuda::check_launch();
  return out;
}

}  // namespace molora

MOLORA_CUDA_LIBRARY_IMPL(m) {
  m.impl("rank_topk", &molora::rank_topk_cuda);
  m.impl("id_histogram", &molora::id_histogram_cuda);
  m.impl("rank_scatter", &molora::rank_scatter_cuda);
}
