// CPU launchers of dispatch, gather_rows, combine_rows and pair_dot.
#include <climits>
#include <vector>

#include "../common/dispatch_checks.h"
#include "../kernels/dispatch_cpu.h"
#include "../ops.h"
#include "cpu_utils.h"

namespace molora {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cpu(const at::Tensor& ids,
                                                            int64_t num_experts,
                                                            int64_t block_size) {
  const int64_t P = check_dispatch_args("dispatch", ids, num_experts, block_size);
  const at::Tensor id = cpu::as_i32(ids);
  const int64_t n_pairs = id.numel(), E = num_experts;
  const auto opts = id.options();
  at::Tensor order = at::full({P}, -1, opts);
  at::Tensor pos = at::empty_like(id);
  at::Tensor offsets = at::empty({E + 1}, opts);

  // Chunked two-pass scatter: per-chunk histograms in parallel, a serial scan over
  // (expert, chunk) to give every chunk its first row per expert, then a parallel scatter. Chunks
  // are visited in pair order, so the result is stable and independent of the thread count.
  const int64_t chunk = std::max<int64_t>(4096, (n_pairs + 63) / 64);
  const int64_t n_chunks = std::max<int64_t>(1, (n_pairs + chunk - 1) / chunk);
  std::vector<int32_t> cursor(n_chunks * E, 0);
  const int32_t* idp = id.data_ptr<int32_t>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      kernels::count_ids(idp, c * chunk, std::min(n_pairs, (c + 1) * chunk), cursor.data() + c * E);
  });
  int32_t* off = offsets.data_ptr<int32_t>();
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    off[e] = static_cast<int32_t>(row);
    int64_t count = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int32_t n = cursor[c * E + e];
      cursor[c * E + e] = static_cast<int32_t>(row + count);
      count += n;
    }
    row += (count + block_size - 1) / block_size * block_size;
  }
  off[E] = static_cast<int32_t>(row);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      kernels::scatter_pairs(idp, c * chunk, std::min(n_pairs, (c + 1) * chunk),
                             cursor.data() + c * E, order.data_ptr<int32_t>(),
                             pos.data_ptr<int32_t>());
  });
  return {order, pos, offsets};
}

namespace {
// Checks shared by gather_rows / combine_rows; returns the weights as contiguous opmath.
at::Tensor check_rows_op(const char* op, const at::Tensor& data, const at::Tensor& order,
                         const at::Tensor& pos, const std::optional<at::Tensor>& weights,
                         int64_t data_rows, const char* data_name) {
  check_rows_args(op, data, order, pos, weights, data_rows, data_name);
  return opmath_or_undefined(weights, opmath_dtype(data.scalar_type()));
}
}  // namespace

at::Tensor gather_rows_cpu(const at::Tensor& x_in, const at::Tensor& order, const at::Tensor& pos,
                           const std::optional<at::Tensor>& weights) {
  const at::Tensor w = check_rows_op("gather_rows", x_in, order, pos, weights, pos.size(0), "x");
  const at::Tensor x = x_in.contiguous(), ord = cpu::as_i32(order);
  const int64_t P = ord.size(0), d = x.size(1), k = pos.size(1);
  at::Tensor out = at::empty({P, d}, x.options());
  MOLORA_DISPATCH_FLOATING(x.scalar_type(), "molora_gather_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, P, cpu::grain_for(d), [&](int64_t i0, int64_t i1) {
      kernels::gather_rows_range(x.data_ptr<scalar_t>(), ord.data_ptr<int32_t>(),
                                 cpu::ptr_or_null<acc_t>(w), k, d, i0, i1, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

at::Tensor combine_rows_cpu(const at::Tensor& y_in, const at::Tensor& order, const at::Tensor& pos,
                            const std::optional<at::Tensor>& weights) {
  const at::Tensor w = check_rows_op("combine_rows", y_in, order, pos, weights, order.size(0), "y_perm");
  const at::Tensor y_perm = y_in.contiguous(), ps = cpu::as_i32(pos);
  const int64_t T = ps.size(0), k = ps.size(1), d = y_perm.size(1);
  at::Tensor out = at::empty({T, d}, y_perm.options());
  MOLORA_DISPATCH_FLOATING(y_perm.scalar_type(), "molora_combine_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, T, cpu::grain_for(d * k), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(d);
      kernels::combine_rows_range(y_perm.data_ptr<scalar_t>(), ps.data_ptr<int32_t>(),
                                  cpu::ptr_or_null<acc_t>(w), k, d, t0, t1, acc.data(),
                                  out.data_ptr<scalar_t>());
    });
  });
  return out;
}

at::Tensor pair_dot_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& pos,
                        bool a_by_token) {
  check_pair_dot_args("pair_dot", a_in, b_in, pos, a_by_token);
  const int64_t T = pos.size(0), k = pos.size(1), d = a_in.size(1);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), ps = cpu::as_i32(pos);
  at::Tensor out = at::empty({T, k}, a.options().dtype(opmath_dtype(a.scalar_type())));
  MOLORA_DISPATCH_FLOATING(a.scalar_type(), "molora_pair_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, T, cpu::grain_for(d * k), [&](int64_t t0, int64_t t1) {
      kernels::pair_dot_range(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                              ps.data_ptr<int32_t>(), k, d, a_by_token, t0, t1,
                              out.data_ptr<acc_t>());
    });
  });
  return out;
}

}  // namespace molora
