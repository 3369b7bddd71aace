// Argument checks shared by every launcher. They raise the Python exception classes of the op
// contract (docs/OPS.md): ValueError for shapes/options, TypeError for dtypes, IndexError for
// index values, so a direct torch.ops.molora call fails as clearly as the Python wrapper.
#pragma once

#include <ATen/ATen.h>

#include <climits>

#include <optional>
#include <string>

namespace molora {

#define MOLORA_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, "molora.", __VA_ARGS__)
#define MOLORA_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, "molora.", __VA_ARGS__)
#define MOLORA_CHECK_INDEX(cond, ...) TORCH_CHECK_INDEX(cond, "molora.", __VA_ARGS__)

// The opt-in host value-check mode (docs/OPS.md "Value checks"): env MOLORA_CHECK_VALUES=1 at
// load, molora_ops.set_value_checks(True) later. The CPU launchers check values always; the CUDA
// launchers only in this mode (cuda::host_value_checks()), their kernels assert on the device.
bool host_value_checks();
void set_host_value_checks(bool enabled);

// The layout of the ops' 2-D operands, for the error message ("" for the others).
inline const char* dim_layout(const char* name) {
  static const char* const layouts[][2] = {
      {"x", " [T, d_in]"}, {"logits", " [T, E]"}, {"ids", " [T, k]"},
      {"gate", " [T, E]"},  {"grad_y", " [T, d_out]"}, {"y_perm", " [P, d]"}};
  for (const auto& entry : layouts) {
    if (std::string(entry[0]) == name) return entry[1];
  }
  return "";
}

// A 2-D operand given with extra leading dims (a [B, S, d] activation) gets the reshape that
// flattens them in the message: the ops take the tokens as rows.
inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  if (t.dim() == dim) return;
  const bool flatten = dim == 2 && t.dim() > 2;
  const std::string hint = flatten ? std::string("; flatten the leading dims: ") + name +
                                         ".reshape(-1, " + name + ".shape[-1])"
                                   : std::string();
  MOLORA_CHECK_VALUE(false, op, ": ", name, " must be ", dim, "-D",
                     dim == 2 ? dim_layout(name) : "", ", got shape ", t.sizes(), hint);
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d,
                       int64_t expected) {
  MOLORA_CHECK_VALUE(t.size(d) == expected, op, ": ", name, ".shape[", d, "] must be ", expected,
                     ", got shape ", t.sizes());
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  MOLORA_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                    " must be a floating tensor, got ", t.scalar_type());
}

inline void check_index(const char* op, const char* name, const at::Tensor& t) {
  MOLORA_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                    " must be int32 or int64, got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  MOLORA_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " dtype ",
                    t.scalar_type(), " must match ", ref_name, " dtype ", ref.scalar_type());
}

inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& ref) {
  MOLORA_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                     " but the first input is on ", ref.device());
}

// A 2-D weight bank (A [R, d_in] or B [d_out, R]) with the data's dtype and device.
inline void check_bank(const char* op, const char* name, const at::Tensor& bank,
                       const char* data_name, const at::Tensor& data) {
  check_dim(op, name, bank, 2);
  check_same_dtype(op, name, bank, data_name, data);
  check_device(op, name, bank, data);
}

// x [T, d_in] float, A [R, d_in] and B [d_out, R] with its dtype and device.
inline void check_lora_banks(const char* op, const at::Tensor& x, const at::Tensor& A,
                             const at::Tensor& B) {
  check_float(op, "x", x);
  check_dim(op, "x", x, 2);
  check_bank(op, "A", A, "x", x);
  check_bank(op, "B", B, "x", x);
  check_size(op, "A", A, 1, x.size(1));
  check_size(op, "A", A, 0, B.size(1));
}

// A vector [n] with the data's dtype and device (a bias).
inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n,
                         const at::Tensor& data) {
  check_dim(op, name, t, 1);
  check_same_dtype(op, name, t, "x", data);
  check_device(op, name, t, data);
  check_size(op, name, t, 0, n);
}

// The kernels take index values as int32 (the layouts are int32 by contract): an index range
// [.., hi) whose largest valid value does not fit would wrap on narrowing (a valid id turning
// into -1). Shape-only, so it runs in every value-check mode, before any data is read.
inline void check_index_bound(const char* op, const char* name, int64_t hi) {
  MOLORA_CHECK_VALUE(hi - 1 <= INT32_MAX, op, ": ", name, " indexes a range of ", hi,
                     " entries, more than the int32 indices of the kernels address (2^31)");
}

// Index values must lie in [lo, hi). Reads the data, so launchers call it before any kernel.
void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t lo,
                       int64_t hi);

// rank_offsets [E+1]: starts at 0, non-decreasing (no negative rank). Returns the largest rank.
int64_t check_rank_offsets(const char* op, const at::Tensor& rank_offsets, int64_t num_experts,
                           int64_t total_rank);

// Dispatch metadata (order [P], pos [T,k], expert_offsets [E+1]) as produced by molora.dispatch.
void check_dispatch_meta(const char* op, const at::Tensor& order, const at::Tensor& pos,
                         const at::Tensor& expert_offsets, int64_t num_tokens);

// An optional per-pair routing-weight tensor [T, k]: float, same device, right shape.
void check_pair_weights(const char* op, const std::optional<at::Tensor>& weights,
                        const at::Tensor& pos, const at::Tensor& ref);

// Optional per-expert scales [E].
void check_scales(const char* op, const std::optional<at::Tensor>& scales, int64_t num_experts,
                  const at::Tensor& ref);

// Optional base output [T, n] with the data dtype.
void check_base(const char* op, const std::optional<at::Tensor>& base, int64_t rows,
                int64_t cols, const at::Tensor& ref);

// The accumulation ("opmath") dtype: double for double inputs, float otherwise.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// An optional float tensor, contiguous and converted to opmath, or an undefined tensor.
inline at::Tensor opmath_or_undefined(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value()) return at::Tensor();
  return t->to(dtype).contiguous();
}

}  // namespace molora
