// CPU launchers of the grouped low-rank matmuls (sgmv_*) and the dense stacked gated form.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../kernels/dispatch_cpu.h"
#include "../kernels/sgmv_cpu.h"
#include "../common/router_checks.h"
#include "../ops.h"
#include "cpu_utils.h"
#include "sgmv_isa.h"

#ifdef MOLORA_HAVE_AVX2_KERNELS
namespace molora::cpu::avx2 {
bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
}  // namespace molora::cpu::avx2
namespace molora::cpu::avx512 {
bool available() {
#ifdef MOLORA_HAVE_AVX512_KERNELS
  static const bool ok = [] {
    const char* isa = std::getenv("MOLORA_CPU_ISA");
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           !(isa != nullptr && std::string(isa) == "avx2");
  }();
  return ok;
#else
  return false;
#endif
}
}  // namespace molora::cpu::avx512
#endif

namespace molora {
namespace {

// The expand switches from token-owned rows to expert-major column blocks (B reused across the
// rows of an expert) from this batch size on. NOTE: untuned (the crossover lies between T = 16,
// where the token-owned kernel wins, and 1024).
constexpr int64_t kExpandColsMinTokens = 128;
// Up to this batch size the expand is the dense form on BLAS (expand_rows_dense).
// NOTE: untuned (T=16, E=8, r=16, n=1376: 177 -> ~60 us; the transposed copy of B dominated).
constexpr int64_t kExpandDenseMaxTokens = 32;
// From this much work (rows x columns) the weight gradient runs per expert on BLAS.
// NOTE: untuned (the row-blocked kernel reduced T=1024 rows at a third of the BLAS rate).
constexpr int64_t kWeightGradBlasMinWork = int64_t(1) << 16;
// ... and from this expert rank: the gather copies every routed row of x once, which a rank-8
// GEMM (M = 8) does not earn back. NOTE: E=64 k=8 r=8 T=1024 d=1024: 7.8 ms per call on BLAS,
// the row-blocked kernel reads each row twice instead; E=8 r=16: BLAS faster (2-core CPU,
// 2026-12-03).
constexpr int64_t kWeightGradBlasMinRank = 16;
// Column blocks a thread prepares and writes back together (8 x 16 fp32 = 512 B of a row).
// NOTE: untuned.
constexpr int64_t kExpandGroup = 8;

// Below this many rows in every expert the shrink reads the bank where it lies (the portable
// kernel) instead of packing it: a decode step's pack copies r x d floats per expert to use them
// once or twice. NOTE: T = 1, d_in = 4096, E = 8, k = 2, r = 16, 2 threads, 2-core Xeon,
// 2026-12-04: 266 us packing the whole bank, 72 us packing only the 2 experts with rows, 32 us
// unpacked; T = 16 (~4 rows an expert) and T = 1024 timed the same as before. NOTE: untuned (4).
constexpr int64_t kShrinkPackRows = 4;

struct GroupedArgs {
  at::Tensor rank_offsets, order, pos, expert_offsets, weights, scales;
  int64_t num_experts, max_rank;

  kernels::GroupedMeta meta() const {
    return {order.data_ptr<int32_t>(), expert_offsets.data_ptr<int32_t>(),
            rank_offsets.data_ptr<int32_t>(), num_experts, pos.size(1), order.size(0)};
  }
};

// A token-major float operand [T, *] and the dispatched rows h [P, *] of its dtype and device (the
// weight gradient's x, the expand's backward's grad_y).
void check_rows_and_h(const char* op, const char* name, const at::Tensor& data,
                      const at::Tensor& h) {
  check_float(op, name, data);
  check_dim(op, name, data, 2);
  check_dim(op, "h", h, 2);
  check_same_dtype(op, "h", h, name, data);
  check_device(op, "h", h, data);
}

// Validates the bank / dispatch / routing-weight arguments every grouped op shares and returns
// them as contiguous int32 / opmath tensors. `data` is the token-major input ([T, *]), `bank_rows`
// the bank's total rank R. Returns the largest expert rank in max_rank.
GroupedArgs check_grouped(const char* op, const at::Tensor& data, int64_t num_tokens,
                          const at::Tensor& rank_offsets, int64_t bank_rows,
                          const at::Tensor& order, const at::Tensor& pos,
                          const at::Tensor& expert_offsets,
                          const std::optional<at::Tensor>& weights,
                          const std::optional<at::Tensor>& scales) {
  check_dispatch_meta(op, order, pos, expert_offsets, num_tokens);
  check_device(op, "order", order, data);
  check_device(op, "rank_offsets", rank_offsets, data);
  const int64_t E = expert_offsets.size(0) - 1;
  const int64_t max_rank = check_rank_offsets(op, rank_offsets, E, bank_rows);
  check_pair_weights(op, weights, pos, data);
  check_scales(op, scales, E, data);
  const auto acc = opmath_dtype(data.scalar_type());
  return {cpu::as_i32(rank_offsets), cpu::as_i32(order), cpu::as_i32(pos),
          cpu::as_i32(expert_offsets), opmath_or_undefined(weights, acc),
          opmath_or_undefined(scales, acc), E, max_rank};
}

// Every dispatched row's token (int32 [P], -1 on padding) and coefficient-scaled h row
// (opmath [P, max_rank]: c_i * h[i], 0 on padding), computed once for the kernels that visit rows
// many times (the expand's column blocks) or hand them to BLAS (the weight gradient).
std::pair<at::Tensor, at::Tensor> prepare_rows(const at::Tensor& h, const GroupedArgs& g,
                                               int64_t max_rank) {
  const int64_t P = g.order.size(0);
  const auto acc = opmath_dtype(h.scalar_type());
  at::Tensor row_token = at::empty({P}, g.order.options());
  at::Tensor hs = at::empty({P, max_rank}, h.options().dtype(acc));  // (every row written)
  MOLORA_DISPATCH_FLOATING(h.scalar_type(), "molora_prepare_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto meta = g.meta();
    at::parallel_for(0, P, cpu::grain_for(max_rank), [&](int64_t i0, int64_t i1) {
      kernels::expand_rows_prepare(h.data_ptr<scalar_t>(), meta,
                                   cpu::ptr_or_null<acc_t>(g.weights),
                                   cpu::ptr_or_null<acc_t>(g.scales), max_rank, i0, i1,
                                   row_token.data_ptr<int32_t>(), hs.data_ptr<acc_t>());
    });
  });
  return {row_token, hs};
}

// One column block of the expert-major expand (AVX2 copy for fp32 where the CPU has it).
template <typename scalar_t, typename acc_t>
void expand_cols(const int32_t* row_token, const acc_t* hs, const at::Tensor& Bt,
                 const kernels::GroupedMeta& meta, int64_t n, int64_t max_rank, int64_t n0,
                 int64_t nb, acc_t* acc) {
  MOLORA_AVX2_OR_FALL_THROUGH(cpu::avx2::sgmv_expand_cols(
      row_token, reinterpret_cast<const float*>(hs), Bt.data_ptr<float>(), meta, n, max_rank, n0,
      nb, reinterpret_cast<float*>(acc)))
  kernels::sgmv_expand_cols(row_token, hs, Bt.data_ptr<scalar_t>(), meta, n, max_rank, n0, nb,
                            acc);
}

// sgmv_expand_backward splits gy's columns between the threads only where each gets this many
// 4-column steps. NOTE: untuned.
constexpr int64_t kExpandGradsMinSteps = 16;
// ... and at most this many ranges, whatever the thread count (the parts of u are summed in
// range order: a count that followed the threads made u and d w depend on them). NOTE: 4 ranges
// ran the op at T=1024 E=8 k=2 r=16 n=1376 in 0.89-0.95 ms against 0.84-0.85 for 2 (2 threads,
// 2-core Xeon, 2026-12-05); untuned on more cores, where 2 ranges leave the rest idle.
constexpr int64_t kExpandGradsRanges = 2;

#ifdef MOLORA_HAVE_AVX2_KERNELS
// Tokens per tile of the fp32 register-tiled expand, in tiles of about equal size: where about 10
// slots per expert fit in kExpandStreamTokens tokens, that many tokens (a tile's rows then few
// enough for the hardware's stream prefetch to follow each along its columns: an output out of
// cache is written at memory speed), else about 48 slots per expert (the 6-row micro-tiles
// mostly full). NOTE: standalone kernel, 1 thread, T=1024 n=1376 E=8 k=2 r=16: 128 tokens (32
// slots per expert) 1.72-1.76 ms, 192 1.58-1.64, 256 1.61-1.66; E=64 k=8 r=8 n=1024: 256 and 384
// on par (3.3-3.4 ms). 2-core x86 CPU machine, 2026-12-04. NOTE: y out of cache (its block last
// written long ago: each line's first store a read for ownership from memory) took the op's
// expand at that shape (2 threads) from 0.54 ms to 1.1-1.4 ms in 171-token tiles, 1.42 ms in
// 64-token tiles, 0.79-0.80 ms in tiles of 28-48 tokens (0.59-0.65 ms hot). Paired runs of the
// whole suite, 171-token tiles against 40: the T=1024 llama up layer forward 1.26x / 1.29x
// against 1.26x / 1.27x the base linear, forward+backward 1.38x / 1.37x against 1.31x / 1.30x;
// E=64 k=8 r=8 in 40-token tiles (5 slots per expert) 2-5% slower (2-core Xeon, 2026-12-05).
constexpr int64_t kExpandStreamTokens = 40;
// The pair-grouped top-2 expand: at most this many experts (its counting sort's (E + 1) * E
// keys), and at least this many tokens a group on average. NOTE: untuned.
constexpr int64_t kPairMaxExperts = 64, kPairMinTokensPerGroup = 8;

int64_t expand_tile_tokens(int64_t T, int64_t E, int64_t k) {
  const int64_t kk = std::max<int64_t>(k, 1);
  const int64_t want = 10 * E <= kExpandStreamTokens * kk
                           ? kExpandStreamTokens
                           : std::clamp<int64_t>(48 * E / kk, 16, 512);
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t per_thread = std::max<int64_t>(
      1, (T + threads * want / 2) / (threads * want));  // round(T / (threads * want))
  const int64_t tiles = threads * per_thread;
  return std::max<int64_t>(1, (T + tiles - 1) / tiles);
}

// Top-2 tokens grouped by their pair of live experts (kernels::avx2::expand_pair_groups): a
// counting sort on the pair, stable in token order. A slot is live where its expert is set and
// has rank > 0; a token's live experts go in ascending id (a repeated expert: slot 0 first), the
// order in which the token tiles add them, so both paths give the same bits.
struct PairGroups {
  std::vector<int32_t> tok, p1, p2, off, expert, dead;
  int64_t live = 0;
  int64_t groups() const { return static_cast<int64_t>(off.size()) - 1; }
};

PairGroups pair_groups(const int32_t* slot_expert, const int32_t* rank_offsets, int64_t T,
                       int64_t E) {
  const auto live_expert = [&](int64_t p) {
    const int32_t e = slot_expert[p];
    return e >= 0 && rank_offsets[e + 1] > rank_offsets[e] ? e : -1;
  };
  // key = (first + 1) * E + second: first in [-1, E) (-1: one live expert), second in [0, E)
  const int64_t keys = (E + 1) * E;
  std::vector<int32_t> count(keys + 1, 0), key(T);
  // slot 0's expert first unless slot 1's is the lower, or slot 0 is not live
  std::vector<uint8_t> swap(T);
  PairGroups pg;
  for (int64_t t = 0; t < T; ++t) {
    const int32_t u0 = live_expert(2 * t), u1 = live_expert(2 * t + 1);
    const int32_t lo = std::min(u0, u1), hi = std::max(u0, u1);
    swap[t] = u0 < 0 || (u1 >= 0 && u1 < u0);
    key[t] = hi < 0 ? -1 : static_cast<int32_t>((lo + 1) * E + hi);
    if (key[t] < 0)
      pg.dead.push_back(static_cast<int32_t>(t));
    else
      ++count[key[t] + 1];
  }
  pg.live = T - static_cast<int64_t>(pg.dead.size());
  pg.off.push_back(0);
  for (int64_t q = 0; q < keys; ++q) {
    if (count[q + 1] > 0) {
      pg.off.push_back(pg.off.back() + count[q + 1]);
      const int64_t lo = q / E - 1, hi = q % E;
      pg.expert.push_back(static_cast<int32_t>(lo >= 0 ? lo : hi));
      pg.expert.push_back(static_cast<int32_t>(lo >= 0 ? hi : -1));
    }
    count[q + 1] += count[q];  // count[q]: the first place of key q
  }
  pg.tok.resize(pg.live);
  pg.p1.resize(pg.live);
  pg.p2.resize(pg.live);
  for (int64_t t = 0; t < T; ++t) {
    if (key[t] < 0) continue;
    const int32_t s = count[key[t]]++;
    pg.tok[s] = static_cast<int32_t>(t);
    pg.p1[s] = static_cast<int32_t>(2 * t + swap[t]);
    pg.p2[s] = static_cast<int32_t>(2 * t + 1 - swap[t]);
  }
  return pg;
}

// y = base + the expand, fp32 on AVX2: slots prepared in token order (expert, scaled h) and
// bucketed per token tile, then token tiles over panels of columns (csrc/kernels/sgmv_avx2_cpu.h).
// Where B^T [R, n] is row-major already (the backward's d x reads A^T) the tiles are split between
// the threads and read the bank in place. Otherwise the columns are: each thread transposes its
// panels of the bank into its own buffer and runs every token tile over each. NOTE: the op,
// T=1024 E=8 k=2 r=16, 2 threads, 2-core Xeon with AVX-512, medians of interleaved runs,
// 2026-12-05: n=1376 0.65-0.69 -> 0.57-0.60 ms and E=64 k=8 r=8 n=1024 1.49-1.64 -> 1.31-1.37
// against the whole bank transposed first into one shared B^T (a new tensor each call) and token
// tiles split between the threads; in place, split by columns ran n=512 at 0.24-0.25 ms against
// 0.19-0.20 by token tiles. NOTE: top-2 routing over few pairs of experts takes the pair groups
// instead (expand_pair_groups below). A first tuple-grouped expand (h packed per tile, each
// thread's bank chunks packed per tuple) lost its kernel's gain to that preparation: the op
// 0.68 ms against 0.67; the pair groups read h and a chunk-major B^T in place. With streaming
// stores (y written once, its lines never read for ownership; the frozen GEMM then reads y from
// memory) the T=1024 layer forward ran at 1.355-1.368x the base linear against 1.279-1.286x, timed
// as the bench suite does (2 threads, 2-core Xeon with AVX-512, 2026-12-05).
void expand_token_tiles(const at::Tensor& h, const at::Tensor& B, const GroupedArgs& g,
                        const at::Tensor& base, at::Tensor& y) {
  const auto meta = g.meta();
  const int64_t T = g.pos.size(0), k = meta.top_k, E = g.num_experts, n = B.size(0);
  const int64_t R = B.size(1), max_rank = h.size(1);
  at::Tensor slot_expert = at::empty({T * k}, g.order.options());
  at::Tensor hs = at::empty({T * k, max_rank}, h.options());
  const int64_t tile = expand_tile_tokens(T, E, k), n_tiles = (T + tile - 1) / tile;
  const int32_t* ro = g.rank_offsets.data_ptr<int32_t>();
  const bool zmm = cpu::avx512::available();
  const float* base_p = cpu::ptr_or_null<float>(base);
  const float* B_p = B.data_ptr<float>();
  // B^T [R, n] is row-major where B is column-major: read it where it lies.
  const bool in_place = B.stride(0) == 1 && B.stride(1) >= n;
  // (the AVX-512 kernels' chunk: the pair groups' B^T is laid out in it)
  constexpr int64_t kCols = cpu::avx512::kChunkCols;
  const int64_t chunks = (n + kCols - 1) / kCols;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  // Top-2 routing with few pairs of experts: the tokens grouped by their pair, each y row
  // written once (kernels::avx2::expand_pair_groups). The slots are prepared first; where the
  // pairs are many (few tokens a group, short tiles) the token tiles below take over. NOTE: the
  // op at T=1024 n=1376 E=8 k=2 r=16 (hot, 2 threads, three alternating pairs of builds):
  // 495-503 us against 601-610 for the token tiles; routed_moe_lora's expand timed as the bench
  // suite does, 642 us against 759 (medians of 172 calls); E=64 k=8 r=8 (token tiles) on par.
  // 2-core Xeon with AVX-512, 2026-12-05.
  // (B^T read in place, the backward's d x, keeps the token tiles: there the pair groups, the
  // sorted tokens split between the threads, ran on par, 190-191 us against 187-198 at n=512,
  // and 219-221 with the columns split. T=1024 E=8 k=2 r=16, hot, 2 threads, 2-core Xeon with
  // AVX-512, 2026-12-05.)
  const bool pairs = zmm && k == 2 && E <= kPairMaxExperts && !in_place;
  if (pairs) {
    at::parallel_for(0, n_tiles, 1, [&](int64_t i0, int64_t i1) {
      const int64_t p0 = i0 * tile * k, p1 = std::min(T, i1 * tile) * k;
      kernels::expand_slots_prepare(h.data_ptr<float>(), meta, g.pos.data_ptr<int32_t>(),
                                    cpu::ptr_or_null<float>(g.weights),
                                    cpu::ptr_or_null<float>(g.scales), max_rank, p0, p1,
                                    slot_expert.data_ptr<int32_t>(), hs.data_ptr<float>());
    });
    PairGroups pg = pair_groups(slot_expert.data_ptr<int32_t>(), ro, T, E);
    if (pg.live >= kPairMinTokensPerGroup * pg.groups()) {
      const int64_t n_dead = static_cast<int64_t>(pg.dead.size());
      at::parallel_for(0, chunks, (chunks + threads - 1) / threads, [&](int64_t c0, int64_t c1) {
        const int64_t col0 = c0 * kCols, col1 = std::min(n, c1 * kCols);
        float* const y_p = y.data_ptr<float>();
        for (int64_t i = 0; i < n_dead; ++i) {  // rows no expert writes: base, or zeros
          const int64_t t = pg.dead[i];
          if (base_p != nullptr)
            std::copy(base_p + t * n + col0, base_p + t * n + col1, y_p + t * n + col0);
          else
            std::fill(y_p + t * n + col0, y_p + t * n + col1, 0.0f);
        }
        // this thread's columns of B^T, chunk-major: [chunk][R][32]
        std::unique_ptr<float[]> bt(new float[R * (c1 - c0) * kCols]);
        for (int64_t n0 = col0; n0 < col1; n0 += kCols)
          cpu::avx2::transpose_rows(B_p + n0 * B.stride(0), B.stride(0), B.stride(1), kCols, R,
                                    0, std::min(kCols, col1 - n0), bt.get() + (n0 - col0) * R);
        cpu::avx512::expand_pair_groups(hs.data_ptr<float>(), max_rank, pg.tok.data(),
                                        pg.p1.data(), pg.p2.data(), pg.off.data(),
                                        pg.expert.data(), pg.groups(), ro, bt.get(), kCols,
                                        R * kCols, base_p, n, col0, col1, y_p);
      });
      return;
    }
  }
  std::vector<int32_t> slots(2 * tile * k * n_tiles), bucket((E + 1) * n_tiles);
  std::vector<uint8_t> touched(tile * n_tiles);
  // Each tile's slots prepared and bucketed in one pass (one parallel region less per call).
  at::parallel_for(0, n_tiles, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t0 = i * tile, t1 = std::min(T, t0 + tile);
      if (!pairs)
        kernels::expand_slots_prepare(h.data_ptr<float>(), meta, g.pos.data_ptr<int32_t>(),
                                      cpu::ptr_or_null<float>(g.weights),
                                      cpu::ptr_or_null<float>(g.scales), max_rank, t0 * k,
                                      t1 * k, slot_expert.data_ptr<int32_t>(),
                                      hs.data_ptr<float>());
      kernels::expand_tile_slots(slot_expert.data_ptr<int32_t>(), ro, E, k, base.defined(), t0,
                                 t1, &slots[2 * tile * k * i], &bucket[(E + 1) * i],
                                 &touched[tile * i]);
    }
  });
  // Columns per panel: the tile's accumulators of a panel (256 KiB) stay in L2 while the experts
  // pass over them, in whole chunks of the AVX-512 copy's 32 columns (two of the AVX2 copy's
  // 16). NOTE: 128, 256 and 512 KiB panels and whole rows within 5% of each other at T=1024
  // n=1376 E=8 k=2 r=16, n=512 and E=64 k=8 r=8 n=1024 (2 threads, 2-core Xeon with 2 MiB of L2
  // a core, 2026-12-05); with the accumulators in a separate buffer, 256 KiB had beaten 128.
  constexpr int64_t kPanelFloats = 65536;
  const int64_t panel = std::max<int64_t>(kCols, (kPanelFloats / tile) / kCols * kCols);
  const auto panel_fn = zmm ? cpu::avx512::expand_tile_panel : cpu::avx2::expand_tile_panel;
  // Token tiles [i0, i1) over columns [col0, col1), panel by panel.
  const auto run = [&](int64_t i0, int64_t i1, int64_t col0, int64_t col1) {
    // (uninitialised: every panel overwrites what it reads)
    std::unique_ptr<float[]> bt(in_place ? nullptr : new float[R * std::min(panel, col1 - col0)]);
    // (the AVX2 copy's accumulators; the AVX-512 one accumulates in y)
    std::vector<float> acc(zmm ? 0 : tile * std::min(panel, (col1 - col0 + kCols - 1) / kCols *
                                                              kCols));
    for (int64_t n0 = col0; n0 < col1; n0 += panel) {
      const int64_t n1 = std::min(col1, n0 + panel);
      const float* bank = B_p + n0;
      int64_t ldb = B.stride(1);
      if (!in_place) {
        cpu::avx2::transpose_rows(B_p + n0 * B.stride(0), B.stride(0), B.stride(1), n1 - n0, R,
                                  0, n1 - n0, bt.get());
        bank = bt.get();
        ldb = n1 - n0;
      }
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t0 = i * tile, t1 = std::min(T, t0 + tile);
        float* const y_p = y.data_ptr<float>();
        panel_fn(hs.data_ptr<float>(), &slots[2 * tile * k * i], &bucket[(E + 1) * i],
                 &touched[tile * i], ro, E, max_rank, bank, ldb, n, n0, n1, base_p, t0, t1,
                 i + 1 < i1 ? y_p + t1 * n + n0 : nullptr, std::min(T, t1 + tile) - t1,
                 acc.data(), y_p);
      }
    }
  };
  if (!in_place) {
    at::parallel_for(0, chunks, (chunks + threads - 1) / threads, [&](int64_t c0, int64_t c1) {
      run(0, n_tiles, c0 * kCols, std::min(n, c1 * kCols));
    });
  } else {
    at::parallel_for(0, n_tiles, 1, [&](int64_t i0, int64_t i1) { run(i0, i1, 0, n); });
  }
}
#endif

}  // namespace

at::Tensor sgmv_shrink_cpu(const at::Tensor& x_in, const at::Tensor& A_in,
                           const at::Tensor& rank_offsets, const at::Tensor& order,
                           const at::Tensor& pos, const at::Tensor& expert_offsets,
                           const std::optional<at::Tensor>& weights,
                           const std::optional<at::Tensor>& scales, int64_t max_rank) {
  const char* op = "sgmv_shrink";
  check_float(op, "x", x_in);
  check_dim(op, "x", x_in, 2);
  check_bank(op, "A", A_in, "x", x_in);
  check_size(op, "A", A_in, 1, x_in.size(1));
  const GroupedArgs g = check_grouped(op, x_in, x_in.size(0), rank_offsets, A_in.size(0), order,
                                      pos, expert_offsets, weights, scales);
  MOLORA_CHECK_VALUE(max_rank >= g.max_rank, op, ": max_rank = ", max_rank,
                     " is smaller than the largest expert rank ", g.max_rank);
  const at::Tensor x = x_in.contiguous();
  const int64_t P = g.order.size(0), d = x.size(1);
  at::Tensor h = at::empty({P, max_rank}, x.options());
  const int64_t grain = cpu::grain_for(d * std::max<int64_t>(1, g.max_rank));
#ifdef MOLORA_HAVE_AVX2_KERNELS
  int64_t most_rows = 0;  // the largest expert's dispatched rows
  const int32_t* eo = g.expert_offsets.data_ptr<int32_t>();
  for (int64_t e = 0; e < g.num_experts; ++e)
    most_rows = std::max<int64_t>(most_rows, eo[e + 1] - eo[e]);
  // (A strided bank, e.g. the backward's B^T view, is packed anyway: the portable kernel would
  // first copy all of it contiguous.)
  const bool pack = most_rows >= kShrinkPackRows || !A_in.is_contiguous();
  if (x.scalar_type() == at::kFloat && cpu::avx2::available() && pack) {
    // The register-tiled kernel reads the bank packed per expert (16-rank panels, about R * d
    // floats, a few hundred KB), straight from A or from the transposed view the backward's
    // u = shrink(grad_y, B^T) passes: no separate transpose.
    // Only the experts that have rows are packed: a decode step (T = 1, k = 2) reads 2 of the E
    // slices instead of copying the whole bank.
    const int64_t E = g.num_experts;
    const int32_t* ro = g.rank_offsets.data_ptr<int32_t>();
    const auto meta = g.meta();
    const bool zmm = cpu::avx512::available();
    const auto packed_size = zmm ? cpu::avx512::shrink_packed_size : cpu::avx2::shrink_packed_size;
    const auto pack_fn = zmm ? cpu::avx512::pack_shrink_bank : cpu::avx2::pack_shrink_bank;
    std::vector<int64_t> pack_offsets(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r_e = eo[e + 1] > eo[e] ? ro[e + 1] - ro[e] : 0;  // no rows: nothing packed
      pack_offsets[e + 1] = pack_offsets[e] + packed_size(r_e, d);
    }
    at::Tensor packed = at::empty({pack_offsets[E]}, x.options());
    const float* bank = A_in.data_ptr<float>();
    at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e)
        if (pack_offsets[e + 1] > pack_offsets[e])
          pack_fn(bank, A_in.stride(0), A_in.stride(1), d, ro[e], ro[e + 1] - ro[e],
                  packed.data_ptr<float>() + pack_offsets[e]);
    });
    // NOTE: the AVX-512 copy (12-row zmm tiles then; since 2026-12-05 6-row tiles, wide chunks in
    // column pairs: shrink_tile_zmm_pairs) against the AVX2 one,
    // T=1024 E=8 k=2 r=16:
    // h (d=512) 0.21-0.33 -> 0.17 ms, the backward's u (d=1376) 0.64-0.73 -> 0.50-0.55 ms; E=64
    // k=8 r=8 d=1024: 1.01 -> 0.87 ms. Min of alternating runs, 2 threads, 2-core Xeon, 2026-12-04.
    // NOTE: the rows split between the threads by ranges of x's rows (each thread its tokens'
    // rows of every expert, so x is read where the router's thread left it) instead of ranges of
    // dispatched rows: the T=1024 llama up layer forward on par, 1.2435x / 1.2453x against
    // 1.2436x / 1.2422x the base linear (paired runs as in routed_moe_lora_cpu's NOTE, 2-core
    // Xeon, 2026-12-06).
    const auto rows_fn = zmm ? cpu::avx512::shrink_rows : cpu::avx2::shrink_rows;
    at::parallel_for(0, P, grain, [&](int64_t i0, int64_t i1) {
      rows_fn(x.data_ptr<float>(), packed.data_ptr<float>(), pack_offsets.data(), meta,
              cpu::ptr_or_null<float>(g.weights), cpu::ptr_or_null<float>(g.scales), d, max_rank,
              i0, i1, h.data_ptr<float>());
    });
    return h;
  }
#endif
  const at::Tensor A = A_in.contiguous();
  MOLORA_DISPATCH_FLOATING(x.scalar_type(), "molora_sgmv_shrink", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto meta = g.meta();
    at::parallel_for(0, P, grain, [&](int64_t i0, int64_t i1) {
      kernels::sgmv_shrink_range(x.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), meta,
                                 cpu::ptr_or_null<acc_t>(g.weights), cpu::ptr_or_null<acc_t>(g.scales),
                                 d, max_rank, i0, i1, h.data_ptr<scalar_t>());
    });
  });
  return h;
}

namespace {
// sgmv_expand into `out` where it is defined ([T, n], h's dtype, contiguous; routed_moe_lora's y,
// allocated before its other buffers), else into a new tensor; returns what it wrote.
at::Tensor expand_cpu(const at::Tensor& h_in, const at::Tensor& B_in,
                      const at::Tensor& rank_offsets, const at::Tensor& order,
                      const at::Tensor& pos, const at::Tensor& expert_offsets,
                      const std::optional<at::Tensor>& weights,
                      const std::optional<at::Tensor>& scales,
                      const std::optional<at::Tensor>& base, at::Tensor out) {
  const char* op = "sgmv_expand";
  check_float(op, "h", h_in);
  check_dim(op, "h", h_in, 2);
  check_bank(op, "B", B_in, "h", h_in);
  const GroupedArgs g = check_grouped(op, h_in, -1, rank_offsets, B_in.size(1), order, pos,
                                      expert_offsets, weights, scales);
  MOLORA_CHECK_VALUE(h_in.size(0) == g.order.size(0), op, ": h must have one row per row of order (",
                     g.order.size(0), "), got shape ", h_in.sizes());
  MOLORA_CHECK_VALUE(h_in.size(1) >= g.max_rank, op, ": h has ", h_in.size(1),
                     " columns, fewer than the largest expert rank ", g.max_rank);
  const int64_t T = g.pos.size(0), n = B_in.size(0), max_rank = h_in.size(1);
  check_base(op, base, T, n, h_in);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor base_c = base.has_value() ? base->contiguous() : at::Tensor();
  if (T <= kExpandDenseMaxTokens) {
    const auto acc = opmath_dtype(h.scalar_type());
    const int64_t R = B_in.size(1);
    at::Tensor hd = at::zeros({T, R}, h.options().dtype(acc));
    MOLORA_DISPATCH_FLOATING(h.scalar_type(), "molora_sgmv_expand_dense", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      kernels::expand_rows_dense(h.data_ptr<scalar_t>(), g.meta(), g.pos.data_ptr<int32_t>(),
                                 cpu::ptr_or_null<acc_t>(g.weights),
                                 cpu::ptr_or_null<acc_t>(g.scales), max_rank, R, 0, T,
                                 hd.data_ptr<acc_t>());
    });
    const at::Tensor Bt_acc = B_in.to(acc).t();
    // (an fp32 / fp64 `out` takes the GEMM's result itself: no second [T, n] buffer and copy)
    at::Tensor y = out.defined() && out.scalar_type() == acc
                       ? out
                       : at::empty({T, n}, h.options().dtype(acc));
    if (base_c.defined())
      at::addmm_out(y, base_c.to(acc), hd, Bt_acc);
    else
      at::mm_out(y, hd, Bt_acc);
    if (!out.defined()) return y.to(h.scalar_type());
    return y.is_same(out) ? out : out.copy_(y);
  }
  at::Tensor y = out.defined() ? out : at::empty({T, n}, h.options());
#ifdef MOLORA_HAVE_AVX2_KERNELS
  if (h.scalar_type() == at::kFloat && cpu::avx2::available()) {
    expand_token_tiles(h, B_in, g, base_c, y);
    return y;
  }
#endif
  const at::Tensor Bt = cpu::transposed(B_in);
  MOLORA_DISPATCH_FLOATING(h.scalar_type(), "molora_sgmv_expand", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto meta = g.meta();
    if (T >= kExpandColsMinTokens) {
      // Rows prepared once (token, scaled h), then column blocks, each owned by one thread:
      // [T, nb] opmath rows of the block.
      const auto prepared = prepare_rows(h, g, max_rank);
      const int32_t* row_token = prepared.first.data_ptr<int32_t>();
      const acc_t* hs = prepared.second.data_ptr<acc_t>();
      // A thread takes kExpandGroup neighbouring blocks at once, so the base rows it reads and
      // the y rows it writes are 512 contiguous bytes, not one line every n columns.
      constexpr int64_t kCols = kernels::kExpandCols, kGroup = kExpandGroup;
      const int64_t n_blocks = (n + kCols - 1) / kCols;
      const int64_t n_groups = (n_blocks + kGroup - 1) / kGroup;
      const scalar_t* base_p = cpu::ptr_or_null<scalar_t>(base_c);
      scalar_t* yp = y.data_ptr<scalar_t>();
      at::parallel_for(0, n_groups, 1, [&](int64_t g0, int64_t g1) {
        std::vector<acc_t> acc(kGroup * T * kCols);
        for (int64_t grp = g0; grp < g1; ++grp) {
          // block b of the group: columns [n0 + 16 b, ...), rows at acc + b * T * 16 (the last
          // block of the last group may be narrower; it is the group's last block)
          const int64_t n0 = grp * kGroup * kCols, n1 = std::min(n, n0 + kGroup * kCols);
          const int64_t nblk = (n1 - n0 + kCols - 1) / kCols;
          kernels::group_rows_load(base_p, T, n, n0, n1, acc.data());
          for (int64_t b = 0; b < nblk; ++b) {
            const int64_t c0 = n0 + b * kCols, nb = std::min(kCols, n1 - c0);
            expand_cols<scalar_t, acc_t>(row_token, hs, Bt, meta, n, max_rank, c0, nb,
                                         acc.data() + b * T * kCols);
          }
          kernels::group_rows_store(acc.data(), T, n, n0, n1, yp);
        }
      });
      return;
    }
    at::parallel_for(0, T, cpu::grain_for(n * meta.top_k * std::max<int64_t>(1, g.max_rank)), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(n);
      MOLORA_AVX2_OR_FALL_THROUGH(cpu::avx2::sgmv_expand_range(
          h.data_ptr<float>(), Bt.data_ptr<float>(), meta, g.pos.data_ptr<int32_t>(),
          cpu::ptr_or_null<float>(g.weights), cpu::ptr_or_null<float>(g.scales),
          cpu::ptr_or_null<float>(base_c), n, max_rank, t0, t1,
          reinterpret_cast<float*>(acc.data()), y.data_ptr<float>()))
      kernels::sgmv_expand_range(h.data_ptr<scalar_t>(), Bt.data_ptr<scalar_t>(), meta,
                                 g.pos.data_ptr<int32_t>(), cpu::ptr_or_null<acc_t>(g.weights),
                                 cpu::ptr_or_null<acc_t>(g.scales), cpu::ptr_or_null<scalar_t>(base_c),
                                 n, max_rank, t0, t1, acc.data(), y.data_ptr<scalar_t>());
    });
  });
  return y;
}
}  // namespace

at::Tensor sgmv_expand_cpu(const at::Tensor& h, const at::Tensor& B,
                           const at::Tensor& rank_offsets, const at::Tensor& order,
                           const at::Tensor& pos, const at::Tensor& expert_offsets,
                           const std::optional<at::Tensor>& weights,
                           const std::optional<at::Tensor>& scales,
                           const std::optional<at::Tensor>& base) {
  return expand_cpu(h, B, rank_offsets, order, pos, expert_offsets, weights, scales, base,
                    at::Tensor());
}

at::Tensor sgmv_weight_grad_cpu(const at::Tensor& x_in, const at::Tensor& h_in,
                                const at::Tensor& rank_offsets, const at::Tensor& order,
                                const at::Tensor& pos, const at::Tensor& expert_offsets,
                                const std::optional<at::Tensor>& weights,
                                const std::optional<at::Tensor>& scales, int64_t total_rank,
                                bool transposed) {
  const char* op = "sgmv_weight_grad";
  check_rows_and_h(op, "x", x_in, h_in);
  MOLORA_CHECK_VALUE(total_rank >= 0, op, ": total_rank must be >= 0, got ", total_rank);
  const GroupedArgs g = check_grouped(op, x_in, x_in.size(0), rank_offsets, total_rank, order, pos,
                                      expert_offsets, weights, scales);
  MOLORA_CHECK_VALUE(h_in.size(0) == g.order.size(0) && h_in.size(1) >= g.max_rank, op,
                     ": h must have shape (P=", g.order.size(0), ", >= ", g.max_rank, "), got ",
                     h_in.sizes());
  const at::Tensor x = x_in.contiguous(), h = h_in.contiguous();
  const int64_t d = x.size(1), max_rank = h.size(1), P = g.order.size(0);
#ifdef MOLORA_HAVE_AVX2_KERNELS
  if (x.scalar_type() == at::kFloat && cpu::avx2::available()) {
    // Register-tiled per expert, x rows read in place (no gather, unlike the BLAS path below).
    // NOTE: T=1024 E=8 k=2 r=16: dB (d=1376) 0.9-1.4 ms, dA (d=512) 0.4-0.45 ms, where the BLAS
    // path ran 2.16 / 0.92 ms; E=64 k=8 r=8 d=1024: 1.5-2.3 ms, the row-blocked portable kernel
    // 3.6 ms. Min of alternating runs, 2 threads, 2-core x86 CPU machine, 2026-12-04.
    // NOTE: the AVX-512 copy (32-column chunks, 8-rank tiles) against the AVX2 one, T=1024 E=8
    // k=2 r=16: dB (d=1376) 1.03-1.37 -> 0.65 ms, dA (d=512) 0.45-0.50 -> 0.21-0.26 ms; E=64 k=8
    // r=8 d=1024: 1.60 -> 1.14 ms. Min of alternating runs, 2 threads, 2-core Xeon, 2026-12-04.
    const auto prepared = prepare_rows(h, g, max_rank);
    at::Tensor G = transposed ? at::empty({d, total_rank}, x.options())
                              : at::empty({total_rank, d}, x.options());
    const bool zmm = cpu::avx512::available();
    const auto chunks_fn = zmm ? cpu::avx512::weight_grad_chunks : cpu::avx2::weight_grad_chunks;
    const int64_t width = zmm ? cpu::avx512::kChunkCols : kernels::kExpandCols;
    const int64_t chunks = (d + width - 1) / width;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      const auto run = [&](float* out, int64_t ldg, int64_t g_col0) {
        chunks_fn(x.data_ptr<float>(), prepared.second.data_ptr<float>(),
                  prepared.first.data_ptr<int32_t>(), g.expert_offsets.data_ptr<int32_t>(),
                  g.rank_offsets.data_ptr<int32_t>(), g.num_experts, max_rank, d, c0, c1, out,
                  ldg, g_col0);
      };
      if (!transposed) {
        run(G.data_ptr<float>(), d, 0);
        return;
      }
      // G^T: the thread's columns of G in a window (while it is in cache), then turned round into
      // their rows of G^T. NOTE: T=1024 E=8 k=2 r=16, d_out=1376: G 0.60-0.65 ms, G^T this way
      // 0.64-0.68, G then copied into B's layout 0.77-0.82 (what autograd's accumulation did with
      // the transposed view: .backward() took 0.18 ms more per 7.3 ms training step than
      // autograd.grad). Medians, interleaved, 2 threads, 2-core Xeon with AVX-512, 2026-12-05.
      const int64_t col0 = c0 * width, cols = std::min(d, c1 * width) - col0;
      // (not zero-filled: the kernel writes every rank of every column, experts without rows too)
      const std::unique_ptr<float[]> window(new float[total_rank * cols]);
      run(window.get(), cols, col0);
      cpu::avx2::transpose_rows(window.get(), cols, 1, total_rank, cols, 0, total_rank,
                                G.data_ptr<float>() + col0 * total_rank);
    });
    return G;
  }
#endif
  if (P * d >= kWeightGradBlasMinWork && g.max_rank >= kWeightGradBlasMinRank) {
    // Per expert, G_e = (c h_e)^T X_e on BLAS with X_e the expert's x rows gathered (one
    // index_select): the long reduction over the expert's rows is what GEMMs are fast at.
    const auto prepared = prepare_rows(h, g, max_rank);
    const at::Tensor tokens = prepared.first.clamp_min(0).to(at::kLong);  // padding: hs row is 0
    const at::Tensor& hs = prepared.second;
    const at::Tensor xa = x.to(hs.scalar_type());
    at::Tensor Ga = at::zeros({total_rank, d}, hs.options());
    const int32_t* eo = g.expert_offsets.data_ptr<int32_t>();
    const int32_t* ro = g.rank_offsets.data_ptr<int32_t>();
    for (int64_t e = 0; e < g.num_experts; ++e) {
      const int64_t r0 = ro[e], r = ro[e + 1] - r0, s0 = eo[e], n_e = eo[e + 1] - eo[e];
      if (r == 0 || n_e == 0) continue;
      at::Tensor Ge = Ga.narrow(0, r0, r);
      at::mm_out(Ge, hs.narrow(0, s0, n_e).narrow(1, 0, r).t(),
                 xa.index_select(0, tokens.narrow(0, s0, n_e)));
    }
    const at::Tensor G = Ga.to(x.scalar_type());
    return transposed ? cpu::transposed(G) : G;
  }
  at::Tensor G = at::empty({total_rank, d}, x.options());
  MOLORA_DISPATCH_FLOATING(x.scalar_type(), "molora_sgmv_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto meta = g.meta();
    at::parallel_for(0, total_rank, kernels::kBankBlock, [&](int64_t g0, int64_t g1) {
      std::vector<acc_t> acc(kernels::kBankBlock * d);
      MOLORA_AVX2_OR_FALL_THROUGH(cpu::avx2::sgmv_weight_grad_range(
          x.data_ptr<float>(), h.data_ptr<float>(), meta, cpu::ptr_or_null<float>(g.weights),
          cpu::ptr_or_null<float>(g.scales), d, max_rank, g0, g1,
          reinterpret_cast<float*>(acc.data()), G.data_ptr<float>()))
      kernels::sgmv_weight_grad_range(x.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), meta,
                                      cpu::ptr_or_null<acc_t>(g.weights), cpu::ptr_or_null<acc_t>(g.scales),
                                      d, max_rank, g0, g1, acc.data(), G.data_ptr<scalar_t>());
    });
  });
  return transposed ? cpu::transposed(G) : G;
}

namespace {

// Checks of the dense stacked gated form; returns rank_offsets as int32 and the per-column expert.
std::pair<at::Tensor, at::Tensor> check_gated(const char* op, const at::Tensor& x,
                                              const at::Tensor& A, const at::Tensor& B,
                                              const at::Tensor& gate,
                                              const at::Tensor& rank_offsets,
                                              const std::optional<at::Tensor>& scales,
                                              bool shared_a) {
  check_float(op, "x", x);
  check_dim(op, "x", x, 2);
  check_bank(op, "A", A, "x", x);
  check_bank(op, "B", B, "x", x);
  check_float(op, "gate", gate);
  check_dim(op, "gate", gate, 2);
  check_device(op, "gate", gate, x);
  check_device(op, "rank_offsets", rank_offsets, x);
  check_size(op, "A", A, 1, x.size(1));
  check_size(op, "gate", gate, 0, x.size(0));
  const int64_t E = gate.size(1), R = B.size(1);
  MOLORA_CHECK_VALUE(E >= 1, op, ": gate must have at least one expert column");
  check_rank_offsets(op, rank_offsets, E, R);
  check_scales(op, scales, E, x);
  const at::Tensor ro = cpu::as_i32(rank_offsets);
  if (shared_a) {
    const int64_t r = A.size(0);
    MOLORA_CHECK_VALUE(R == E * r, op, ": with shared_a, B must have E * r = ", E * r,
                       " columns (r = A.shape[0]), got ", R);
    const at::Tensor uniform = at::arange(E + 1, ro.options()) * r;
    MOLORA_CHECK_VALUE(at::equal(ro, uniform), op,
                       ": with shared_a, rank_offsets must be arange(E + 1) * r");
  } else {
    check_size(op, "A", A, 0, R);
  }
  at::Tensor col_expert = at::empty({R}, ro.options());
  const int32_t* rp = ro.data_ptr<int32_t>();
  int32_t* cp = col_expert.data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t c = rp[e]; c < rp[e + 1]; ++c) cp[c] = static_cast<int32_t>(e);
  return {ro, col_expert};
}

// out[t, c] = gate[t, e(c)] * s_e * h[t, c] (all opmath, contiguous).
at::Tensor gate_rank_blocks(const at::Tensor& h, const at::Tensor& gate, const at::Tensor& scales,
                            const at::Tensor& col_expert) {
  const int64_t T = h.size(0), R = h.size(1), E = gate.size(1);
  at::Tensor out = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "molora_gate_rank_blocks", [&] {
    at::parallel_for(0, T, cpu::grain_for(R), [&](int64_t t0, int64_t t1) {
      kernels::gate_rank_blocks_range(h.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
                                      cpu::ptr_or_null<scalar_t>(scales),
                                      col_expert.data_ptr<int32_t>(), E, R, t0, t1,
                                      out.data_ptr<scalar_t>());
    });
  });
  return out;
}

// The bank-column activations h = x A_e^T for every expert ([T, R], opmath), A shared or not.
at::Tensor gated_rank_activations(const at::Tensor& xa, const at::Tensor& Aa, int64_t E,
                                  bool shared_a) {
  at::Tensor h = xa.mm(Aa.t());
  return shared_a ? h.repeat({1, E}).contiguous() : h.contiguous();
}

}  // namespace

// (dB, u) of y = sgmv_expand(h, B, ...) for the grouped backward: dB = sgmv_weight_grad(gy, h,
// ..., transposed), u = sgmv_shrink(gy, B^T, ..., no weights, scales) in opmath. fp32 with AVX-512
// and a row-major bank: both in one pass over gy (kernels::avx2::expand_grads_cols), the columns
// split into ranges between the threads, each range summing its own part of u (added in range
// order; the ranges follow n, not the threads); otherwise the two ops' own kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sgmv_expand_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& h_in, const at::Tensor& B,
    const at::Tensor& rank_offsets, const at::Tensor& order, const at::Tensor& pos,
    const at::Tensor& expert_offsets, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& scales) {
  const char* op = "sgmv_expand_backward";
  check_rows_and_h(op, "grad_y", grad_y, h_in);
  check_bank(op, "B", B, "grad_y", grad_y);
  check_size(op, "B", B, 0, grad_y.size(1));
  const GroupedArgs g = check_grouped(op, grad_y, grad_y.size(0), rank_offsets, B.size(1), order,
                                      pos, expert_offsets, weights, scales);
  MOLORA_CHECK_VALUE(h_in.size(0) == g.order.size(0) && h_in.size(1) >= g.max_rank, op,
                     ": h must have shape (P=", g.order.size(0), ", >= ", g.max_rank, "), got ",
                     h_in.sizes());
  const int64_t n = grad_y.size(1), R = B.size(1), max_rank = h_in.size(1), P = g.order.size(0);
#ifdef MOLORA_HAVE_AVX2_KERNELS
  // The one-pass kernel runs 16-rank slices: it pays off only where the experts' ranks fill them.
  // NOTE: T=1024, 2 threads, 2-core Xeon with AVX-512, 2026-12-05: E=8 k=2 r=16 n=1376 1.07-1.08
  // ms against 1.27-1.32 for the two kernels (1.23-1.32 against 1.45-1.49 right after a GEMM);
  // E=64 k=8 r=8 n=1024 (half of each slice) 3.6 ms against 2.6. The 90% cut is untuned between.
  int64_t slice_lanes = 0;
  const int32_t* ro = g.rank_offsets.data_ptr<int32_t>();
  for (int64_t e = 0; e < g.num_experts; ++e) slice_lanes += (ro[e + 1] - ro[e] + 15) / 16 * 16;
  if (grad_y.scalar_type() == at::kFloat && cpu::avx512::available() && B.stride(1) == 1 &&
      n > 0 && 10 * R >= 9 * slice_lanes) {
    const at::Tensor gy = grad_y.contiguous(), h = h_in.contiguous();
    const auto prepared = prepare_rows(h, g, max_rank);
    at::Tensor dB = at::empty({n, R}, gy.options());
    // Column ranges of whole 4-column steps, split between the threads (u's parts summed
    // afterwards). Their count depends on n alone, so the sum's order does not depend on the
    // thread count.
    const int64_t steps = (n + 3) / 4;
    const int64_t ranges = std::max<int64_t>(
        1, std::min<int64_t>(kExpandGradsRanges, steps / kExpandGradsMinSteps));
    // Range 0's part of u is u itself: each range zero-fills its own part in its thread (the
    // kernel leaves the lanes past an expert's rank alone) and the other parts are added to u in
    // order afterwards. NOTE: against at::zeros of every part and their sum(0) (the op, T=1024
    // E=8 k=2 r=16 n=1376, medians, 2-core Xeon, 2026-12-05): 1.03-1.04 -> 0.98-1.01 ms, right
    // after a GEMM 1.15-1.19 -> 1.05 ms; T=16 74 -> 59 us after a GEMM. Same bits.
    at::Tensor u = at::empty({P, max_rank}, gy.options());
    at::Tensor others = at::empty({ranges - 1, P, max_rank}, gy.options());
    const auto part = [&](int64_t q) {
      return q == 0 ? u.data_ptr<float>() : others.data_ptr<float>() + (q - 1) * P * max_rank;
    };
    const std::vector<float> zero_row(n, 0.0f);
    at::parallel_for(0, ranges, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        std::fill_n(part(q), P * max_rank, 0.0f);
        cpu::avx512::expand_grads_cols(
            gy.data_ptr<float>(), n, prepared.first.data_ptr<int32_t>(),
            prepared.second.data_ptr<float>(), max_rank, B.data_ptr<float>(), B.stride(0),
            g.expert_offsets.data_ptr<int32_t>(), g.rank_offsets.data_ptr<int32_t>(),
            cpu::ptr_or_null<float>(g.scales), g.num_experts, std::min(n, steps * q / ranges * 4),
            std::min(n, steps * (q + 1) / ranges * 4), zero_row.data(), part(q),
            dB.data_ptr<float>());
      }
    });
    float* const u_p = u.data_ptr<float>();
    for (int64_t q = 1; q < ranges; ++q) {
      const float* const o = part(q);
      for (int64_t i = 0; i < P * max_rank; ++i) u_p[i] += o[i];
    }
    // d w from u while it is in cache. NOTE: against pair_dot's own call after the op (2048 rows
    // of 16): that call and its Python ran 0.1 ms of a T=1024 training step right after the GEMMs
    // (2-core Xeon, 2026-12-05).
    const int64_t T = g.pos.size(0), k = g.pos.size(1);
    at::Tensor grad_w = at::empty({T, k}, gy.options());
    kernels::pair_dot_range(h.data_ptr<float>(), u_p, g.pos.data_ptr<int32_t>(), k, max_rank,
                            false, 0, T, grad_w.data_ptr<float>());
    return {dB, u, grad_w};
  }
#endif
  const auto acc = opmath_dtype(grad_y.scalar_type());
  at::Tensor u = sgmv_shrink_cpu(grad_y.to(acc), B.to(acc).t(), rank_offsets, order, pos,
                                 expert_offsets, std::nullopt, scales, max_rank);
  at::Tensor dB = sgmv_weight_grad_cpu(grad_y, h_in, rank_offsets, order, pos, expert_offsets,
                                       weights, scales, R, true);
  at::Tensor grad_w = pair_dot_cpu(h_in.to(acc), u, pos, false);
  return {dB, u, grad_w};
}

at::Tensor stacked_gated_lora_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                  const at::Tensor& gate, const at::Tensor& rank_offsets,
                                  const std::optional<at::Tensor>& scales,
                                  const std::optional<at::Tensor>& base, bool shared_a) {
  const char* op = "stacked_gated_lora";
  const at::Tensor col_expert =
      check_gated(op, x, A, B, gate, rank_offsets, scales, shared_a).second;
  check_base(op, base, x.size(0), B.size(0), x);
  // NOTE: the two GEMMs run in opmath through ATen's BLAS so bf16/fp16 inputs see one rounding
  // (at the output), like the reference; a CPU bf16 GEMM would round h as well.
  const auto acc = opmath_dtype(x.scalar_type());
  const at::Tensor h = gated_rank_activations(x.to(acc), A.to(acc), gate.size(1), shared_a);
  const at::Tensor hg = gate_rank_blocks(h, gate.to(acc).contiguous(),
                                         opmath_or_undefined(scales, acc), col_expert);
  at::Tensor y = hg.mm(B.to(acc).t());
  if (base.has_value()) y.add_(*base);
  return y.to(x.scalar_type());
}

// routed_moe_lora: the router's logits (BLAS), softmax_topk, dispatch, sgmv_shrink, sgmv_expand
// and the frozen GEMM (BLAS, accumulating into y: beta = 1) in one call, so no Python runs
// between the kernels. NOTE: the same kernels called one by one from Python ran the T=1024 llama
// up layer forward at 1.32-1.33x the base linear, in one call 1.25-1.26x, timed as the bench suite
// does (one call after another implementation's; 2 threads, 2-core Xeon, 2026-12-05): right after
// an implementation's GEMM every Python step between the kernels runs from cold caches.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
routed_moe_lora_cpu(const at::Tensor& x, const at::Tensor& router_weight,
                    const std::optional<at::Tensor>& router_bias, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& rank_offsets,
                    const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& base,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                    int64_t top_k, bool renormalize, int64_t max_rank) {
  const char* op = "routed_moe_lora";
  check_lora_banks(op, x, A, B);
  MOLORA_CHECK_VALUE(rank_offsets.dim() == 1 && rank_offsets.size(0) >= 2, op,
                     ": rank_offsets must be [E+1] with E >= 1, got shape ", rank_offsets.sizes());
  const int64_t E = rank_offsets.size(0) - 1, d_out = B.size(0);
  check_bank(op, "router_weight", router_weight, "x", x);
  check_size(op, "router_weight", router_weight, 0, E);
  check_size(op, "router_weight", router_weight, 1, x.size(1));
  check_router_k(op, top_k, E);
  if (router_bias.has_value()) check_vector(op, "router_bias", *router_bias, E, x);
  MOLORA_CHECK_VALUE(!(base.has_value() && weight.has_value()), op,
                     ": pass the frozen layer as base (its output) or weight, not both");
  if (weight.has_value()) {
    check_bank(op, "weight", *weight, "x", x);
    check_size(op, "weight", *weight, 0, d_out);
    check_size(op, "weight", *weight, 1, x.size(1));
  }
  if (bias.has_value()) check_vector(op, "bias", *bias, d_out, x);
  // y [T, d_out] before any other buffer of the call: the output of the layer that ran before
  // has just been freed, and malloc hands y that block, still in cache, where the op's smaller
  // buffers would otherwise split it first and y take a block of any age (y's first touch, the
  // expand, then stalls on its lines). NOTE: allocated just before the expand, y took one of 3-5
  // blocks in turn in 7 of 8 processes, and the expand ran 0.84-1.16 ms right after a base
  // linear; allocated first, one block in 6 of 6, 0.52-0.58 ms (T=1024 llama up shape, 2 threads,
  // 2-core Xeon, 2026-12-05). In the full benchmark suite (a heap of many sizes) about half its
  // calls still meet a y out of cache: expand_tile_tokens sizes the tiles for that.
  at::Tensor y = at::empty({x.size(0), d_out}, x.options());
  // x made contiguous once for the router, the shrink and the frozen GEMM (each would copy a
  // strided x again).
  const at::Tensor xc = x.contiguous();
  auto [logits, weights, ids] =
      softmax_topk_linear_cpu(xc, router_weight, router_bias, top_k, renormalize);
  auto [order, pos, expert_offsets] = dispatch_cpu(ids, E, 1);
  at::Tensor h = sgmv_shrink_cpu(xc, A, rank_offsets, order, pos, expert_offsets, std::nullopt,
                                 std::nullopt, max_rank);
  expand_cpu(h, B, rank_offsets, order, pos, expert_offsets, weights, scales, base, y);
  // NOTE: the frozen GEMM stays one BLAS call after the expand. The T=1024 llama up forward, timed
  // as the bench suite does (2 threads, 2-core Xeon with AVX-512, 2026-12-05), in the ratio to the
  // base linear against this order's in the same runs: the GEMM in row blocks of the expand's
  // token tiles with each block's expand right before or after it, the weight packed once a call
  // for MKL's sgemm_compute (blocks of 128-342 rows then cost the GEMM 0-2%, where ATen's mm per
  // block cost 5-14%): 1.36-1.41x against 1.29-1.31x with the blocks on both threads, 1.41-1.46x
  // against 1.28-1.38x with each thread its own blocks (MKL's output is mostly out of cache by
  // the time the expand reads it, and the expand over whole rows ran 30-50% slower than over
  // columns); the GEMM first (beta = 0), then the expand adding into y: 1.30-1.32x against
  // 1.28-1.29x, measured again later that day 1.31-1.36x against 1.28-1.29x, and with the
  // pair-grouped expand (2026-12-06) in a paired run (the base linear, this order, the GEMM
  // first and the per-expert loop in turn, one call each, 600 rounds) 1.244-1.252x against
  // 1.234-1.238x: a beta = 1 GEMM reads y (about 0.1 ms more than beta = 0 here), but the
  // expand's read of a y the GEMM has left in L3 costs more. The
  // backward's d x the same way (frozen GEMM first, the adapter's expand added in place): on par.
  // Our own AVX-512 GEMM (12 x 32 micro-tile, x's rows through one pointer per three rows, W
  // packed per call into 32-column panels, each thread its own columns) with each token tile's
  // expand right after the tile's GEMM block: 1.43-1.48x against 1.28-1.31x (three runs, panel or
  // micro-tile outer), hot 6.0-6.6 ms against 5.1-5.9; K in blocks of 128 or 256: 6.5-7.2 against
  // 5.6-5.9 (same machine, 2026-12-05). The packing cost 0.13-0.37 ms a call, the GEMM ran 5-10%
  // behind MKL's, and the expand cost as much with its block in cache (0.6 ms) as in its own pass.
  // With the router's accumulators in registers: y allocated first and its lines prefetched for
  // writing during the router (each thread its expand columns, a share after every 8 rows),
  // 1.32-1.35x (their first panel) and 1.38-1.44x (all of them) against 1.27-1.30x.
  // In blocks of 128 or 256 rows x 344 columns (each thread its row blocks; per block the
  // expand, then MKL's cblas_sgemm_compute with x's block and W's panel packed by
  // cblas_sgemm_pack, beta = 1, while the block is in L2): the GEMM part alone 4.92-5.07 ms
  // against one addmm's 4.46, with the expand 5.48-5.67 against 5.15 (MKL's packed buffer is
  // 7.9 MB for each 128 x 344 x 512 operand; 2 threads, 2-core Xeon, 2026-12-05). As two
  // column halves, the expand's, one a thread (ATen addmm into y's half; MKL then runs single-
  // threaded in the region): 1.299-1.308x against 1.254-1.260x (5 implementations in shuffled
  // rounds, one call each, 20 s a run, 2026-12-06).
  if (weight.has_value()) y.addmm_(xc, weight->t());
  if (bias.has_value()) y.add_(*bias);
  return {y, logits, weights, ids, h, order, pos, expert_offsets};
}

// The top-k routing as the dense form: the CPU has no on-chip h to keep, so "fused" here is the
// gate [T, E] (opmath) and the BLAS stacked gated form over it.
at::Tensor fused_moe_lora_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& rank_offsets,
                              const std::optional<at::Tensor>& weights, const at::Tensor& ids,
                              const std::optional<at::Tensor>& scales,
                              const std::optional<at::Tensor>& base) {
  const char* op = "fused_moe_lora";
  check_lora_banks(op, x, A, B);
  check_index(op, "ids", ids);
  check_dim(op, "ids", ids, 2);
  check_size(op, "ids", ids, 0, x.size(0));
  check_device(op, "ids", ids, x);
  check_pair_weights(op, weights, ids, x);
  MOLORA_CHECK_VALUE(rank_offsets.dim() == 1 && rank_offsets.size(0) >= 2, op,
                     ": rank_offsets must be [E+1] with E >= 1, got shape ", rank_offsets.sizes());
  const int64_t E = rank_offsets.size(0) - 1, T = x.size(0), k = ids.size(1);
  check_device(op, "rank_offsets", rank_offsets, x);
  check_rank_offsets(op, rank_offsets, E, A.size(0));
  check_scales(op, scales, E, x);
  check_base(op, base, T, B.size(0), x);
  check_index_range(op, "ids", ids, -1, E);
  const auto acc = opmath_dtype(x.scalar_type());
  const at::Tensor id32 = cpu::as_i32(ids);
  const at::Tensor w = opmath_or_undefined(weights, acc);
  at::Tensor gate = at::zeros({T, E}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "molora_pair_gate", [&] {
    const int32_t* ip = id32.data_ptr<int32_t>();
    const scalar_t* wp = cpu::ptr_or_null<scalar_t>(w);
    scalar_t* gp = gate.data_ptr<scalar_t>();
    for (int64_t p = 0; p < T * k; ++p)
      if (ip[p] >= 0) gp[(p / k) * E + ip[p]] += wp != nullptr ? wp[p] : scalar_t(1);
  });
  return stacked_gated_lora_cpu(x, A, B, gate, rank_offsets, scales, base, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stacked_gated_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& gate, const at::Tensor& rank_offsets,
    const std::optional<at::Tensor>& scales, bool shared_a) {
  const char* op = "stacked_gated_lora_backward";
  const auto checked = check_gated(op, x, A, B, gate, rank_offsets, scales, shared_a);
  const at::Tensor &ro = checked.first, &col_expert = checked.second;
  check_float(op, "grad_y", grad_y);
  check_device(op, "grad_y", grad_y, x);
  MOLORA_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == B.size(0),
                     op, ": grad_y must have shape (", x.size(0), ", ", B.size(0), "), got ",
                     grad_y.sizes());
  const auto acc = opmath_dtype(x.scalar_type());
  const int64_t T = x.size(0), E = gate.size(1), R = B.size(1);
  const at::Tensor xa = x.to(acc), Aa = A.to(acc), Ba = B.to(acc), dy = grad_y.to(acc);
  const at::Tensor ga = gate.to(acc).contiguous(), sa = opmath_or_undefined(scales, acc);
  const at::Tensor h = gated_rank_activations(xa, Aa, E, shared_a);
  const at::Tensor dhg = dy.mm(Ba).contiguous();                 // d(gated activations) [T, R]
  const at::Tensor grad_B = dy.t().mm(gate_rank_blocks(h, ga, sa, col_expert));
  at::Tensor dh = gate_rank_blocks(dhg, ga, sa, col_expert);     // d(raw activations)  [T, R]
  at::Tensor grad_gate = at::empty({T, E}, ga.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "molora_gate_grad", [&] {
    at::parallel_for(0, T, cpu::grain_for(R), [&](int64_t t0, int64_t t1) {
      kernels::gate_grad_range(dhg.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                               cpu::ptr_or_null<scalar_t>(sa), ro.data_ptr<int32_t>(), E, R, t0,
                               t1, grad_gate.data_ptr<scalar_t>());
    });
  });
  if (shared_a) dh = dh.view({T, E, A.size(0)}).sum(1);
  return {dh.mm(Aa).to(x.scalar_type()), dh.t().mm(xa).to(A.scalar_type()),
          grad_B.to(B.scalar_type()), grad_gate.to(gate.scalar_type())};
}

}  // namespace molora
