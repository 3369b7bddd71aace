// CPU launchers of the rank-wise masked activation ops and the id histogram.
#include <vector>

#include "../common/masked_checks.h"
#include "../kernels/dispatch_cpu.h"
#include "../kernels/masked_cpu.h"
#include "../ops.h"
#include "cpu_utils.h"
#include "sgmv_isa.h"

namespace molora {
namespace {

// ids [T, k] of ranks in [-1, num_ranks): checked and returned as contiguous int32.
at::Tensor checked_rank_ids_i32(const char* op, const at::Tensor& ids, int64_t T,
                                int64_t num_ranks, const at::Tensor& ref) {
  check_rank_ids(op, ids, T, num_ranks, ref);
  return cpu::as_i32(ids);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rank_topk_cpu(const at::Tensor& h_in, int64_t k,
                                                 const std::optional<at::Tensor>& scores,
                                                 const std::optional<at::Tensor>& bias,
                                                 bool use_abs) {
  const char* op = "rank_topk";
  check_rank_topk_args(op, h_in, k, scores, bias);
  const int64_t T = h_in.size(0), R = h_in.size(1);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor sc = opmath_or_undefined(scores, opmath_dtype(h.scalar_type()));
  const at::Tensor b = opmath_or_undefined(bias, opmath_dtype(h.scalar_type()));
  at::Tensor values = at::empty({T, k}, h.options());
  at::Tensor ids = at::empty({T, k}, h.options().dtype(at::kInt));
  MOLORA_DISPATCH_FLOATING(h.scalar_type(), "molora_rank_topk", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* scp = cpu::ptr_or_null<acc_t>(sc);
    at::parallel_for(0, T, cpu::grain_for(R * 8), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> key(R);
      std::vector<int32_t> scratch(R);
      for (int64_t t = t0; t < t1; ++t)
        kernels::rank_topk_row(h.data_ptr<scalar_t>() + t * R, scp ? scp + t * R : nullptr,
                               cpu::ptr_or_null<acc_t>(b), R, k, use_abs, key.data(),
                               scratch.data(), values.data_ptr<scalar_t>() + t * k,
                               ids.data_ptr<int32_t>() + t * k);
    });
  });
  return {values, ids};
}

at::Tensor rank_sparse_shrink_cpu(const at::Tensor& x_in, const at::Tensor& A_in,
                                  const at::Tensor& ids_in) {
  const char* op = "rank_sparse_shrink";
  check_float(op, "x", x_in);
  check_dim(op, "x", x_in, 2);
  check_bank(op, "A", A_in, "x", x_in);
  check_size(op, "A", A_in, 1, x_in.size(1));
  const at::Tensor ids = checked_rank_ids_i32(op, ids_in, x_in.size(0), A_in.size(0), x_in);
  // (The expand's backward passes B^T, a transposed view: turned round cache-blocked, where
  // A_in.contiguous() would make a strided copy.)
  const at::Tensor x = x_in.contiguous(), A = cpu::transposed(A_in.t());
  const int64_t T = x.size(0), d = x.size(1), k = ids.size(1);
  at::Tensor h = at::empty({T, k}, x.options());
  MOLORA_DISPATCH_FLOATING(x.scalar_type(), "molora_rank_sparse_shrink", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, T, cpu::grain_for(d * k), [&](int64_t t0, int64_t t1) {
      MOLORA_AVX2_OR_FALL_THROUGH(cpu::avx2::rank_sparse_shrink_range(
          x.data_ptr<float>(), A.data_ptr<float>(), ids.data_ptr<int32_t>(), k, d, t0, t1,
          h.data_ptr<float>()))
      kernels::rank_sparse_shrink_range<scalar_t, acc_t>(x.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                                                         ids.data_ptr<int32_t>(), k, d, t0, t1,
                                                         h.data_ptr<scalar_t>());
    });
  });
  return h;
}

at::Tensor rank_sparse_expand_cpu(const at::Tensor& values_in, const at::Tensor& ids_in,
                                  const at::Tensor& B, const std::optional<at::Tensor>& weights,
                                  double scale, const std::optional<at::Tensor>& base) {
  const char* op = "rank_sparse_expand";
  check_float(op, "values", values_in);
  check_dim(op, "values", values_in, 2);
  check_bank(op, "B", B, "values", values_in);
  const int64_t T = values_in.size(0), n = B.size(0);
  const at::Tensor ids = checked_rank_ids_i32(op, ids_in, T, B.size(1), values_in);
  MOLORA_CHECK_VALUE(ids.sizes() == values_in.sizes(), op, ": ids must have the shape of values ",
                     values_in.sizes(), ", got ", ids.sizes());
  check_pair_weights(op, weights, ids, values_in);
  check_base(op, base, T, n, values_in);
  const at::Tensor values = values_in.contiguous(), Bt = cpu::transposed(B);
  const at::Tensor w = opmath_or_undefined(weights, opmath_dtype(values.scalar_type()));
  const at::Tensor base_c = base.has_value() ? base->contiguous() : at::Tensor();
  const int64_t k = ids.size(1);
  at::Tensor y = at::empty({T, n}, values.options());
  MOLORA_DISPATCH_FLOATING(values.scalar_type(), "molora_rank_sparse_expand", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, T, cpu::grain_for(n * k), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(n);
      MOLORA_AVX2_OR_FALL_THROUGH(cpu::avx2::rank_sparse_expand_range(
          values.data_ptr<float>(), ids.data_ptr<int32_t>(), Bt.data_ptr<float>(),
          cpu::ptr_or_null<float>(w), static_cast<float>(scale), cpu::ptr_or_null<float>(base_c),
          k, n, t0, t1, reinterpret_cast<float*>(acc.data()), y.data_ptr<float>()))
      kernels::rank_sparse_expand_range(values.data_ptr<scalar_t>(), ids.data_ptr<int32_t>(),
                                        Bt.data_ptr<scalar_t>(), cpu::ptr_or_null<acc_t>(w),
                                        static_cast<acc_t>(scale), cpu::ptr_or_null<scalar_t>(base_c),
                                        k, n, t0, t1, acc.data(), y.data_ptr<scalar_t>());
    });
  });
  return y;
}

at::Tensor id_histogram_cpu(const at::Tensor& ids_in, int64_t num_bins) {
  const char* op = "id_histogram";
  check_id_histogram_args(op, ids_in, num_bins);
  check_index_range(op, "ids", ids_in, -1, num_bins);
  const at::Tensor ids = cpu::as_i32(ids_in).view(-1);
  const int64_t n = ids.numel();
  // Per-chunk histograms in parallel, summed in chunk order (the same count_ids pass dispatch uses).
  const int64_t chunk = std::max<int64_t>(4096, (n + 63) / 64);
  const int64_t n_chunks = std::max<int64_t>(1, (n + chunk - 1) / chunk);
  std::vector<int32_t> partial(n_chunks * num_bins, 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      kernels::count_ids(ids.data_ptr<int32_t>(), c * chunk, std::min(n, (c + 1) * chunk),
                         partial.data() + c * num_bins);
  });
  at::Tensor counts = at::zeros({num_bins}, ids.options());
  int32_t* out = counts.data_ptr<int32_t>();
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int64_t b = 0; b < num_bins; ++b) out[b] += partial[c * num_bins + b];
  return counts;
}

at::Tensor rank_scatter_cpu(const at::Tensor& src_in, const at::Tensor& ids_in, int64_t num_ranks) {
  const char* op = "rank_scatter";
  check_rank_scatter_args(op, src_in, ids_in, num_ranks);
  const at::Tensor ids = cpu::as_i32(ids_in);
  const at::Tensor src = src_in.contiguous();
  const int64_t T = src.size(0), k = src.size(1);
  at::Tensor out = at::empty({T, num_ranks}, src.options());  // every row written by the kernel
  MOLORA_DISPATCH_FLOATING(src.scalar_type(), "molora_rank_scatter", [&] {
    at::parallel_for(0, T, cpu::grain_for(k), [&](int64_t t0, int64_t t1) {
      kernels::rank_scatter_range(src.data_ptr<scalar_t>(), ids.data_ptr<int32_t>(), k, num_ranks,
                                  t0, t1, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

at::Tensor rank_sparse_weight_grad_cpu(const at::Tensor& x_in, const at::Tensor& g_in,
                                       const at::Tensor& ids_in, int64_t num_ranks) {
  const char* op = "rank_sparse_weight_grad";
  check_float(op, "x", x_in);
  check_dim(op, "x", x_in, 2);
  check_float(op, "g", g_in);
  check_dim(op, "g", g_in, 2);
  check_device(op, "g", g_in, x_in);
  MOLORA_CHECK_VALUE(num_ranks >= 1, op, ": num_ranks must be >= 1, got ", num_ranks);
  check_size(op, "g", g_in, 0, x_in.size(0));
  const at::Tensor ids = checked_rank_ids_i32(op, ids_in, x_in.size(0), num_ranks, x_in);
  MOLORA_CHECK_VALUE(ids.sizes() == g_in.sizes(), op, ": ids must have the shape of g ",
                     g_in.sizes(), ", got ", ids.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor coef = g_in.to(opmath_dtype(x.scalar_type())).contiguous();
  // Group the (token, slot) pairs by rank with the dispatch kernel, so each bank row is summed by
  // one thread in pair order.
  const auto grouped = dispatch_cpu(ids, num_ranks, 1);
  const at::Tensor& order = std::get<0>(grouped);
  const at::Tensor& offsets = std::get<2>(grouped);
  const int64_t d = x.size(1), k = ids.size(1);
  at::Tensor G = at::empty({num_ranks, d}, x.options());
  MOLORA_DISPATCH_FLOATING(x.scalar_type(), "molora_rank_sparse_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, num_ranks, 1, [&](int64_t g0, int64_t g1) {
      std::vector<acc_t> acc(d);
      MOLORA_AVX2_OR_FALL_THROUGH(cpu::avx2::rank_sparse_weight_grad_range(
          x.data_ptr<float>(), coef.data_ptr<float>(), order.data_ptr<int32_t>(),
          offsets.data_ptr<int32_t>(), k, d, g0, g1, reinterpret_cast<float*>(acc.data()),
          G.data_ptr<float>()))
      kernels::rank_sparse_weight_grad_range(x.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(),
                                             order.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                                             k, d, g0, g1, acc.data(), G.data_ptr<scalar_t>());
    });
  });
  return G;
}

}  // namespace molora
