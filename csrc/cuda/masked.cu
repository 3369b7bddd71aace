// CUDA launcher of molora::id_histogram (the first CUDA kernel; the other ops follow the same
// pattern: checks here, framework-free kernel in csrc/kernels/, current stream, launch check).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "../common/check.h"
#include "../kernels/histogram.cuh"

namespace molora {

at::Tensor id_histogram_cuda(const at::Tensor& ids_in, int64_t num_bins) {
  const char* op = "id_histogram";
  check_index(op, "ids", ids_in);
  MOLORA_CHECK_VALUE(num_bins >= 1 && num_bins <= INT32_MAX, op,
                     ": num_bins must be in [1, 2^31), got ", num_bins);
  // NOTE: the range check synchronises (aminmax + item); an out-of-range id must raise, not be
  // dropped silently.
  check_index_range(op, "ids", ids_in, -1, num_bins);
  const c10::cuda::CUDAGuard guard(ids_in.device());
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor counts = at::zeros({num_bins}, ids.options().dtype(at::kInt));
  const int64_t n = ids.numel();
  if (n == 0) return counts;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 1024);
  const bool use_shared = num_bins <= 12 * 1024;  // 48 KiB of int32 counters
  const size_t smem = use_shared ? static_cast<size_t>(num_bins) * sizeof(int32_t) : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (ids.scalar_type() == at::kInt) {
    kernels::id_histogram_kernel<int32_t><<<blocks, kThreads, smem, stream>>>(
        ids.data_ptr<int32_t>(), n, static_cast<int32_t>(num_bins), use_shared,
        counts.data_ptr<int32_t>());
  } else {
    kernels::id_histogram_kernel<int64_t><<<blocks, kThreads, smem, stream>>>(
        ids.data_ptr<int64_t>(), n, static_cast<int32_t>(num_bins), use_shared,
        counts.data_ptr<int32_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

}  // namespace molora

TORCH_LIBRARY_IMPL(molora, CUDA, m) { m.impl("id_histogram", &molora::id_histogram_cuda); }
