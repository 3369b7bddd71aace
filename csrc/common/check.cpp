#include "check.h"

#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

namespace molora {

namespace {
std::atomic<bool>& host_value_checks_flag() {
  static std::atomic<bool> flag{[] {
    const char* v = std::getenv("MOLORA_CHECK_VALUES");
    if (v == nullptr) return false;
    for (const char* on : {"1", "host", "true", "on", "yes"})
      if (std::strcmp(v, on) == 0) return true;
    return false;
  }()};
  return flag;
}
}  // namespace

bool host_value_checks() { return host_value_checks_flag().load(std::memory_order_relaxed); }

void set_host_value_checks(bool enabled) {
  host_value_checks_flag().store(enabled, std::memory_order_relaxed);
}

namespace {
// min and max of a contiguous CPU index tensor in one loop: no TensorIterator, no output tensors
// (at::aminmax costs ~7 us even on a few hundred ids, every CPU call of an op with ids).
template <typename T>
std::pair<int64_t, int64_t> min_max(const T* p, int64_t n) {
  T mn = p[0], mx = p[0];
  for (int64_t i = 1; i < n; ++i) {
    mn = p[i] < mn ? p[i] : mn;
    mx = p[i] > mx ? p[i] : mx;
  }
  return {static_cast<int64_t>(mn), static_cast<int64_t>(mx)};
}

// The values of a short index tensor (rank / expert offsets) as int64, read where they lie when
// the tensor is a contiguous CPU int32 / int64 one: a .to(kCPU, kLong) copy cost ~6.5 us a call,
// twice in every CPU call of a grouped op (~80 us of a T=1024 training step, 2-core Xeon).
std::vector<int64_t> index_values(const at::Tensor& t) {
  if (t.is_cpu() && t.is_contiguous() && t.scalar_type() == at::kInt) {
    const int32_t* p = t.const_data_ptr<int32_t>();
    return std::vector<int64_t>(p, p + t.numel());
  }
  if (t.is_cpu() && t.is_contiguous() && t.scalar_type() == at::kLong) {
    const int64_t* p = t.const_data_ptr<int64_t>();
    return std::vector<int64_t>(p, p + t.numel());
  }
  const auto c = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}
}  // namespace

void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t lo,
                       int64_t hi) {
  if (t.numel() == 0) return;
  check_index_bound(op, name, hi);
  int64_t mn, mx;
  if (t.is_cpu() && t.is_contiguous() && t.scalar_type() == at::kInt) {
    std::tie(mn, mx) = min_max(t.const_data_ptr<int32_t>(), t.numel());
  } else if (t.is_cpu() && t.is_contiguous() && t.scalar_type() == at::kLong) {
    std::tie(mn, mx) = min_max(t.const_data_ptr<int64_t>(), t.numel());
  } else {
    const auto mm = at::aminmax(t);
    mn = std::get<0>(mm).item<int64_t>();
    mx = std::get<1>(mm).item<int64_t>();
  }
  MOLORA_CHECK_INDEX(mn >= lo && mx < hi, op, ": ", name, " has values outside [", lo, ", ", hi,
                     ") (min ", mn, ", max ", mx, ")");
}

int64_t check_rank_offsets(const char* op, const at::Tensor& rank_offsets, int64_t num_experts,
                           int64_t total_rank) {
  check_index(op, "rank_offsets", rank_offsets);
  check_dim(op, "rank_offsets", rank_offsets, 1);
  MOLORA_CHECK_VALUE(rank_offsets.size(0) == num_experts + 1, op, ": rank_offsets must have E+1 = ",
                     num_experts + 1, " entries, got ", rank_offsets.size(0));
  // A bank row index must fit the int32 rank offsets the kernels read (see check_index_range).
  MOLORA_CHECK_VALUE(total_rank <= INT32_MAX, op, ": the bank's total rank R = ", total_rank,
                     " exceeds the int32 indices of the kernels (2^31 - 1)");
  const std::vector<int64_t> ro = index_values(rank_offsets);
  const int64_t* p = ro.data();
  int64_t max_rank = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    MOLORA_CHECK_VALUE(p[e + 1] >= p[e], op, ": rank_offsets must be non-decreasing (expert ", e,
                       " has negative rank ", p[e + 1] - p[e], ")");
    max_rank = std::max(max_rank, p[e + 1] - p[e]);
  }
  // Order as in the reference: a negative rank (ValueError) is reported before bad end points.
  MOLORA_CHECK_INDEX(p[0] == 0, op, ": rank_offsets has values outside [0, R]: rank_offsets[0] ",
                     "must be 0, got ", p[0]);
  if (total_rank >= 0) {
    MOLORA_CHECK_VALUE(p[num_experts] == total_rank, op, ": rank_offsets[-1] = ", p[num_experts],
                       " must equal the bank's total rank R = ", total_rank,
                       " (A.shape[0] / B.shape[1])");
  }
  return max_rank;
}

void check_dispatch_meta(const char* op, const at::Tensor& order, const at::Tensor& pos,
                         const at::Tensor& expert_offsets, int64_t num_tokens) {
  check_index(op, "order", order);
  check_index(op, "pos", pos);
  check_index(op, "expert_offsets", expert_offsets);
  check_dim(op, "order", order, 1);
  check_dim(op, "pos", pos, 2);
  check_dim(op, "expert_offsets", expert_offsets, 1);
  MOLORA_CHECK_VALUE(expert_offsets.size(0) >= 2, op,
                     ": expert_offsets must have E+1 >= 2 entries, got ", expert_offsets.size(0));
  if (num_tokens >= 0) check_size(op, "pos", pos, 0, num_tokens);
  check_device(op, "order", order, pos);
  check_device(op, "expert_offsets", expert_offsets, pos);
  const int64_t P = order.size(0);
  MOLORA_CHECK_VALUE(P >= pos.numel(), op, ": order has ", P, " rows but pos has ", pos.numel(),
                     " pairs");
  check_index_range(op, "order", order, -1, pos.numel());
  check_index_range(op, "pos", pos, -1, P);
  const std::vector<int64_t> eo = index_values(expert_offsets);
  const int64_t* p = eo.data();
  const int64_t E = static_cast<int64_t>(eo.size()) - 1;
  MOLORA_CHECK_INDEX(p[0] == 0, op, ": expert_offsets[0] must be 0, got ", p[0]);
  for (int64_t e = 0; e < E; ++e)
    MOLORA_CHECK_INDEX(p[e + 1] >= p[e], op, ": expert_offsets must be non-decreasing");
  MOLORA_CHECK_INDEX(p[E] <= P, op, ": expert_offsets[-1] = ", p[E], " exceeds the ", P,
                     " rows of order");
}

void check_pair_weights(const char* op, const std::optional<at::Tensor>& weights,
                        const at::Tensor& pos, const at::Tensor& ref) {
  if (!weights.has_value()) return;
  check_float(op, "weights", *weights);
  check_device(op, "weights", *weights, ref);
  MOLORA_CHECK_VALUE(weights->sizes() == pos.sizes(), op, ": weights must have shape ",
                     pos.sizes(), " (T, k), got ", weights->sizes());
}

void check_scales(const char* op, const std::optional<at::Tensor>& scales, int64_t num_experts,
                  const at::Tensor& ref) {
  if (!scales.has_value()) return;
  check_float(op, "scales", *scales);
  check_device(op, "scales", *scales, ref);
  MOLORA_CHECK_VALUE(scales->dim() == 1 && scales->size(0) == num_experts, op,
                     ": scales must have shape (", num_experts, "), got ", scales->sizes());
}

void check_base(const char* op, const std::optional<at::Tensor>& base, int64_t rows, int64_t cols,
                const at::Tensor& ref) {
  if (!base.has_value()) return;
  check_same_dtype(op, "base", *base, "the data", ref);
  check_device(op, "base", *base, ref);
  MOLORA_CHECK_VALUE(base->dim() == 2 && base->size(0) == rows && base->size(1) == cols, op,
                     ": base must have shape (", rows, ", ", cols, "), got ", base->sizes());
}

}  // namespace molora
