// Router kernels on the GPU: softmax / sigmoid + top-k (+ renormalise / temperature / selection
// bias / scale), the DynMoLE top-p mode with min_k and the Tsallis-entropy broadcast, and the two
// logits-gradient kernels. Contract: molora_ops/reference/router.py (weights fp32, ids int32,
// descending, ties toward the lower id).
// Framework-free device code: raw pointers and sizes (csrc/kernels/cuda_compat.cuh lists what a
// kernel may use). Launchers: csrc/cuda/router.cu.
//
// Common layout of every kernel: ONE WARP PER TOKEN ROW, rows grid-strided over the warps of the
// grid (int64 row index and offsets: T * E may exceed 2^31).
//   NPL ("values per lane") > 0: the row's E <= 32 * NPL values live in NPL registers per lane
//   (fully unrolled loops, so the arrays stay in registers); the launcher picks the smallest of
//   NPL in {1, 2, 4, 8, 16, 32}, i.e. E <= 32, 64, 128, 256, 512, 1024.
//   VEC > 1 (NPL > 0 only): register i of lane l holds column
//       (i / VEC) * 32 * VEC + l * VEC + i % VEC,
//   so each lane loads VEC consecutive elements with one vector load (16 bytes for VEC = 16 /
//   sizeof(T); the launcher checks alignment, unit column stride and E % VEC == 0). VEC == 1:
//   column i * 32 + l (coalesced scalar loads, any strides).
//   NPL == 0: any E (the large-E fallback). Nothing is held in registers; every pass re-reads
//   the row from global memory (L1/L2-resident after the first pass). Correct, slower.
// The row is read once from DRAM in every mode: the max / sum / entropy reductions and the
// selection rounds all run on registers (NPL > 0).
#pragma once

#include <cmath>

#include "cuda_compat.cuh"
#include "warp_select.cuh"

namespace molora::kernels {
namespace router {

// Selection order, ordered keys and warp reductions: warp_select.cuh.

// torch's sigmoid: 1 / (1 + exp(-x)) in fp32.
__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// Column held in register i of `lane` (see the header comment).
template <int VEC>
__device__ __forceinline__ int32_t col_of(int i, int lane) {
  return (i / VEC) * (kWarpSize * VEC) + lane * VEC + (i % VEC);
}

// Loads the row into x[NPL] (fp32); columns >= E get -inf (callers mask them explicitly too).
template <typename scalar_t, int NPL, int VEC>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ row, int64_t col_stride,
                                         int32_t E, int lane, float (&x)[NPL]) {
  if constexpr (VEC > 1) {
#pragma unroll
    for (int g = 0; g < NPL / VEC; ++g) {
      const int32_t c0 = g * (kWarpSize * VEC) + lane * VEC;
      if (c0 < E) {  // E % VEC == 0: a vector is entirely in or entirely out
        const Vec<scalar_t, VEC> v = *reinterpret_cast<const Vec<scalar_t, VEC>*>(row + c0);
#pragma unroll
        for (int u = 0; u < VEC; ++u) x[g * VEC + u] = static_cast<float>(v.v[u]);
      } else {
#pragma unroll
        for (int u = 0; u < VEC; ++u) x[g * VEC + u] = -INFINITY;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int32_t c = i * kWarpSize + lane;
      x[i] = c < E ? static_cast<float>(row[c * col_stride]) : -INFINITY;
    }
  }
}

// Row max and sum of exp(x - max) (the softmax statistics), warp-uniform.
template <typename scalar_t, int NPL, int VEC>
__device__ __forceinline__ void softmax_stats(const scalar_t* __restrict__ row, int64_t col_stride,
                                              int32_t E, int lane,
                                              const float (&x)[NPL > 0 ? NPL : 1],
                                              float& m, float& s) {
  float mx = -INFINITY;
  if constexpr (NPL > 0) {
#pragma unroll
    for (int i = 0; i < NPL; ++i)
      if (col_of<VEC>(i, lane) < E) mx = fmaxf(mx, x[i]);
  } else {
    for (int32_t c = lane; c < E; c += kWarpSize)
      mx = fmaxf(mx, static_cast<float>(row[c * col_stride]));
  }
  m = warp_max_f(mx);
  float sum = 0.0f;
  if constexpr (NPL > 0) {
#pragma unroll
    for (int i = 0; i < NPL; ++i)
      if (col_of<VEC>(i, lane) < E) sum += expf(x[i] - m);
  } else {
    for (int32_t c = lane; c < E; c += kWarpSize)
      sum += expf(static_cast<float>(row[c * col_stride]) - m);
  }
  s = warp_sum_f(sum);
}

// One warp's running selection: each lane caches its best remaining candidate (largest key, lowest
// id) and the raw fp32 logit of that column. Round: warp max of the cached keys (5 shuffles); the
// lanes holding that key found by a ballot: one lane (the usual case) -> it is the source; several
// (a tie across lanes) -> warp min of their ids (5 shuffles), the lower id wins as in the
// reference. The source lane broadcasts id and value (2 shuffles) and alone rescans its columns
// for the best candidate after the winner.
struct Pick {
  int32_t id;
  float val;
};

template <int NPL, int VEC, typename KeyFn, typename ValFn>
struct Selector {
  uint32_t best_key = kNoKey;
  int32_t best_id = kNoId;
  float best_val = 0.0f;
  int32_t E;
  int lane;
  KeyFn key_of;  // (register i, column c) -> ordered key   (NPL == 0: register index ignored)
  ValFn val_of;  // (register i, column c) -> fp32 logit

  __device__ __forceinline__ Selector(int32_t e, int l, KeyFn kf, ValFn vf)
      : E(e), lane(l), key_of(kf), val_of(vf) {}

  __device__ __forceinline__ void rescan(uint32_t lim_key, int32_t lim_id) {
    best_key = kNoKey;
    best_id = kNoId;
    if constexpr (NPL > 0) {
      // VEC > 1: registers are not in ascending column order across groups, but within this lane
      // columns increase with i (group stride 32 * VEC > VEC), so the strict '>' of an ascending
      // scan keeps this lane's lowest id among equal keys.
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int32_t c = col_of<VEC>(i, lane);
        const uint32_t kc = key_of(i, c);
        if (c < E && kc > best_key && after(kc, c, lim_key, lim_id)) {
          best_key = kc;
          best_id = c;
          best_val = val_of(i, c);
        }
      }
    } else {
      for (int32_t c = lane; c < E; c += kWarpSize) {
        const uint32_t kc = key_of(0, c);
        if (kc > best_key && after(kc, c, lim_key, lim_id)) {
          best_key = kc;
          best_id = c;
          best_val = val_of(0, c);
        }
      }
    }
  }

  __device__ __forceinline__ void start() { rescan(0xffffffffu, -1); }

  // Next pick (warp-uniform result). Every lane of the warp must call it.
  __device__ __forceinline__ Pick next() {
    const uint32_t win_key = warp_max_u32(best_key);
    const unsigned holders = __ballot_sync(kFullMask, best_key == win_key);
    int src;
    if (__popc(holders) == 1) {  // warp-uniform branch
      src = __ffs(static_cast<int>(holders)) - 1;
    } else {
      const int32_t win_id = warp_min_i32(best_key == win_key ? best_id : kNoId);
      const unsigned at = __ballot_sync(kFullMask, best_key == win_key && best_id == win_id);
      src = __ffs(static_cast<int>(at)) - 1;
    }
    Pick p;
    p.id = __shfl_sync(kFullMask, best_id, src);
    p.val = __shfl_sync(kFullMask, best_val, src);
    MOLORA_DEVICE_ASSERT(win_key != kNoKey && p.id >= 0 && p.id < E,
                         "router: ran out of candidates (k > E?)");
    if (lane == src) rescan(win_key, p.id);
    return p;
  }
};

template <int NPL, int VEC, typename KeyFn, typename ValFn>
__device__ __forceinline__ Selector<NPL, VEC, KeyFn, ValFn> make_selector(int32_t E, int lane,
                                                                         KeyFn kf, ValFn vf) {
  return Selector<NPL, VEC, KeyFn, ValFn>(E, lane, kf, vf);
}

}  // namespace router

// ------------------------------------------------------------------------------------------------
// softmax_topk / topk_softmax / sigmoid_topk
// ------------------------------------------------------------------------------------------------

enum RouteMode : int32_t { kRouteSoftmaxTopk = 0, kRouteTopkSoftmax = 1, kRouteSigmoidTopk = 2 };

struct RouteTopkParams {
  int32_t mode;          // RouteMode
  int32_t k;             // 1 <= k <= E
  bool renormalize;      // softmax_topk
  float temperature;     // topk_softmax (> 0)
  const float* bias;     // sigmoid_topk: selection bias [E] (fp32) or nullptr
  bool normalize;        // sigmoid_topk
  bool bias_in_weights;  // sigmoid_topk
  float scale;           // sigmoid_topk
};

// Per row (one warp, see the file header): load the row (once), softmax max/sum only for
// softmax_topk(renormalize=False) (the renormalised weights only need the top-1 logit as the
// shift), then k selection rounds (router::Selector: ~7-12 shuffles + one lane's NPL-long rescan
// each). The selection key: the logit (softmax modes, sigmoid without bias: sigmoid is monotone,
// as the reference) or sigmoid(logit) + bias[e] in fp32 (sigmoid with bias). Round j's id and
// numerator are parked in lane j % 32; every 32 rounds and at the end the warp writes 32 (weight,
// id) pairs with coalesced stores. The normaliser (sum over the picks, accumulated warp-uniformly
// in round order) is known only after the last round: for k > 32 the earlier chunks are written
// raw and fixed up by the lanes that wrote them (own writes, no sync needed).
// Weight formulas mirror the reference's operation order:
//   softmax_topk, renormalize: (e_j = exp(l_j - l_0)) / sum e    [== p_j / sum p, p's S cancels]
//   softmax_topk, plain:       exp(l_j - m) / S
//   topk_softmax:              e_j = exp(l_j / temp - l_0 / temp), e_j / sum e
//   sigmoid_topk:              v_j = s_j (+ bias if bias_in_weights),
//                              (scale * v_j) / sum v  or  scale * v_j
// Cost per row: E * sizeof(T) bytes read, k * 8 bytes written; k rounds of shuffles.
// NOTE: untuned. For E = 64, k = 8 (bf16) the row is 128 bytes and ~80 shuffles: the
// shuffle rounds, not DRAM, should bound it at large T (vLLM's topk_softmax has the same
// k-rounds-of-argmax structure).
template <typename scalar_t, int NPL, int VEC>
__global__ void route_topk_kernel(const scalar_t* __restrict__ logits, int64_t row_stride,
                                  int64_t col_stride, int64_t T, int32_t E, RouteTopkParams prm,
                                  float* __restrict__ weights, int32_t* __restrict__ ids) {
  constexpr int N = NPL > 0 ? NPL : 1;
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  const int32_t k = prm.k;
  const bool biased = prm.mode == kRouteSigmoidTopk && prm.bias != nullptr;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
       t < T; t += warp_stride) {
    const scalar_t* row = logits + t * row_stride;
    float x[N];
    uint32_t key[N];
    if constexpr (NPL > 0) {
      router::load_row<scalar_t, NPL, VEC>(row, col_stride, E, lane, x);
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int32_t c = router::col_of<VEC>(i, lane);
        key[i] = c < E ? ordered_key(biased ? router::sigmoid_f(x[i]) + prm.bias[c] : x[i])
                       : kNoKey;
      }
    }
    float m = 0.0f, s = 1.0f;
    if (prm.mode == kRouteSoftmaxTopk && !prm.renormalize)
      router::softmax_stats<scalar_t, NPL, VEC>(row, col_stride, E, lane, x, m, s);

    auto key_of = [&](int i, int32_t c) -> uint32_t {
      if constexpr (NPL > 0) {
        return key[i];
      } else {
        const float v = static_cast<float>(row[c * col_stride]);
        return ordered_key(biased ? router::sigmoid_f(v) + prm.bias[c] : v);
      }
    };
    auto val_of = [&](int i, int32_t c) -> float {
      if constexpr (NPL > 0) {
        return x[i];
      } else {
        return static_cast<float>(row[c * col_stride]);
      }
    };
    auto sel = router::make_selector<NPL, VEC>(E, lane, key_of, val_of);
    sel.start();

    float* wrow = weights + t * k;
    int32_t* irow = ids + t * k;
    float total = 0.0f;  // normaliser, warp-uniform
    float shift = 0.0f;  // l_0 (softmax_topk renormalize) or l_0 / temperature (topk_softmax)
    float parked_num = 0.0f;
    int32_t parked_id = 0;
    for (int32_t j = 0; j < k; ++j) {
      const router::Pick p = sel.next();
      float num;
      if (prm.mode == kRouteSoftmaxTopk) {
        if (prm.renormalize) {
          if (j == 0) shift = p.val;
          num = expf(p.val - shift);
          total += num;
        } else {
          num = expf(p.val - m) / s;
        }
      } else if (prm.mode == kRouteTopkSoftmax) {
        const float xs = p.val / prm.temperature;
        if (j == 0) shift = xs;
        num = expf(xs - shift);
        total += num;
      } else {
        const float sg = router::sigmoid_f(p.val);
        const float v = (biased && prm.bias_in_weights) ? sg + prm.bias[p.id] : sg;
        num = prm.scale * v;
        total += v;
      }
      const int slot = j & (kWarpSize - 1);
      if (slot == lane) {
        parked_num = num;
        parked_id = p.id;
      }
      if (slot == kWarpSize - 1) {  // a full chunk: written raw, fixed up below
        const int32_t base = j - slot;
        irow[base + lane] = parked_id;
        wrow[base + lane] = parked_num;
      }
    }
    // Final weight from a numerator (warp-uniform `total`).
    const bool divide = prm.mode == kRouteTopkSoftmax ||
                        (prm.mode == kRouteSoftmaxTopk && prm.renormalize) ||
                        (prm.mode == kRouteSigmoidTopk && prm.normalize);
    auto finish = [&](float num) { return divide ? num / total : num; };
    const int32_t full = k & ~(kWarpSize - 1);  // rounds already written raw
    if (lane < k - full) {
      irow[full + lane] = parked_id;
      wrow[full + lane] = finish(parked_num);
    }
    if (divide) {
      for (int32_t j = lane; j < full; j += kWarpSize) wrow[j] = finish(wrow[j]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// softmax_topp (DynMoLE)
// ------------------------------------------------------------------------------------------------

struct RouteToppParams {
  float top_p;            // (0, 1], compared in fp32 as the reference's `cumsum <= top_p`
  int32_t min_k;          // [1, E]
  bool entropy_gate;      // q > 0 && entropy_threshold < 1 && E > 1 (host-evaluated in double)
  bool shannon;           // q == 1
  float q;                // Tsallis q (fp32, as the reference's pe ** q)
  float q_minus_1;        // float(q - 1)
  float h_max;            // float((1 - E^(1-q)) / (q - 1)) or float(log E)
  float eps;              // float(eps)
  float threshold;        // float(entropy_threshold)
};

// Per row (one warp): load the row once; softmax max/sum (p_e = exp(l_e - m) / S, recomputed
// bitwise-identically wherever needed instead of kept in registers); the normalised Tsallis
// entropy of p + eps (warp sums) decides the broadcast (every expert kept). Then selection rounds
// in descending p (on the logits, ties -> lower id) with a running cumsum: round j is kept iff
// broadcast || j < min_k || cumsum_j <= top_p. cumsum of p >= 0 is non-decreasing, so the kept set
// is a prefix and the rounds stop at the first unkept one (no full sort unless the row
// broadcasts); the remaining columns are written as id -1 / weight 0 with coalesced stores.
// NOTE: cumsum accumulates in double, cast to fp32 before the compare: the CPU reference's
// torch.cumsum accumulates fp32 in double (at::acc_type<float, /*is_cuda=*/false>).
// A broadcasting row keeps all E experts in sorted order: NPL > 0 sorts it instead (E selection
// rounds would cost E * ~10 shuffles): the warp writes (ordered key << 32 | ~id) composites of its
// row into its own slice of dynamic shared memory (e_pad = next power of two >= E 64-bit words,
// padded with 0 = below every composite) and runs a bitonic sort, descending (composites are
// unique, so the order is total: key desc, id asc = the stable sort's), log2(e_pad) *
// (log2(e_pad) + 1) / 2 steps of e_pad / 64 compare-exchanges per lane, one __syncwarp each.
// NOTE: untuned. For E = 1024 that is 55 steps x 16 compare-exchanges per lane against
// ~1024 x 10 shuffles for the selection rounds; for E = 64, 21 steps x 1 against ~640 shuffles.
// The launcher passes e_pad and warps_per_block * e_pad * 8 bytes of dynamic shared memory for
// NPL > 0 (E = 1024: 32 KiB per 4-warp block); NPL == 0 (E > 1024) broadcasts by selection.
template <typename scalar_t, int NPL, int VEC>
__global__ void route_topp_kernel(const scalar_t* __restrict__ logits, int64_t row_stride,
                                  int64_t col_stride, int64_t T, int32_t E, int32_t e_pad,
                                  RouteToppParams prm, float* __restrict__ weights,
                                  int32_t* __restrict__ ids) {
  MOLORA_DYNAMIC_SMEM(uint64_t, sort_smem);
  constexpr int N = NPL > 0 ? NPL : 1;
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
       t < T; t += warp_stride) {
    const scalar_t* row = logits + t * row_stride;
    float x[N];
    if constexpr (NPL > 0) router::load_row<scalar_t, NPL, VEC>(row, col_stride, E, lane, x);
    float m, s;
    router::softmax_stats<scalar_t, NPL, VEC>(row, col_stride, E, lane, x, m, s);

    bool broadcast = false;
    if (prm.entropy_gate) {
      float h = 0.0f;
      auto add = [&](float l) {
        const float pe = expf(l - m) / s + prm.eps;
        h += prm.shannon ? pe * logf(pe) : powf(pe, prm.q);
      };
      if constexpr (NPL > 0) {
#pragma unroll
        for (int i = 0; i < NPL; ++i)
          if (router::col_of<VEC>(i, lane) < E) add(x[i]);
      } else {
        for (int32_t c = lane; c < E; c += kWarpSize) add(static_cast<float>(row[c * col_stride]));
      }
      h = warp_sum_f(h);
      const float H = prm.shannon ? (-h) / prm.h_max : ((1.0f - h) / prm.q_minus_1) / prm.h_max;
      broadcast = H > prm.threshold;  // warp-uniform (butterfly sums)
    }

    float* wrow = weights + t * E;
    int32_t* irow = ids + t * E;
    if constexpr (NPL > 0) {
      if (broadcast) {  // every expert kept, sorted: bitonic sort in this warp's smem slice
        uint64_t* sm = sort_smem + static_cast<int64_t>(threadIdx.x / kWarpSize) * e_pad;
#pragma unroll
        for (int i = 0; i < NPL; ++i) {
          const int32_t c = router::col_of<VEC>(i, lane);
          if (c < e_pad)
            sm[c] = c < E ? (static_cast<uint64_t>(ordered_key(x[i])) << 32) |
                                static_cast<uint64_t>(0xffffffffu - static_cast<uint32_t>(c))
                          : uint64_t{0};
        }
        __syncwarp();
        for (int32_t size = 2; size <= e_pad; size <<= 1) {
          for (int32_t stride = size >> 1; stride > 0; stride >>= 1) {
            for (int32_t i = lane; i < e_pad / 2; i += kWarpSize) {
              const int32_t lo = 2 * i - (i & (stride - 1));
              const int32_t hi = lo + stride;
              const uint64_t a = sm[lo], b = sm[hi];
              const bool desc = (lo & size) == 0;  // the last merge (size = e_pad): all desc
              if (desc ? a < b : a > b) {
                sm[lo] = b;
                sm[hi] = a;
              }
            }
            __syncwarp();
          }
        }
        for (int32_t j = lane; j < E; j += kWarpSize) {
          const int32_t id = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(sm[j]));
          // the same fp32 conversion as the register copy: the same p bit for bit
          irow[j] = id;
          wrow[j] = expf(static_cast<float>(row[id * col_stride]) - m) / s;
        }
        __syncwarp();  // the slice is rewritten by this warp's next row
        continue;
      }
    }

    auto key_of = [&](int i, int32_t c) -> uint32_t {
      if constexpr (NPL > 0) {
        return ordered_key(x[i]);
      } else {
        return ordered_key(static_cast<float>(row[c * col_stride]));
      }
    };
    auto val_of = [&](int i, int32_t c) -> float {
      if constexpr (NPL > 0) {
        return x[i];
      } else {
        return static_cast<float>(row[c * col_stride]);
      }
    };
    auto sel = router::make_selector<NPL, VEC>(E, lane, key_of, val_of);
    sel.start();

    double cumsum = 0.0;
    float parked_p = 0.0f;
    int32_t parked_id = 0;
    int32_t kept = 0;
    for (int32_t j = 0; j < E; ++j) {
      const router::Pick pk = sel.next();
      const float p = expf(pk.val - m) / s;
      cumsum += static_cast<double>(p);
      if (!(broadcast || j < prm.min_k || static_cast<float>(cumsum) <= prm.top_p)) break;
      kept = j + 1;
      const int slot = j & (kWarpSize - 1);
      if (slot == lane) {
        parked_p = p;
        parked_id = pk.id;
      }
      if (slot == kWarpSize - 1) {
        const int32_t base = j - slot;
        irow[base + lane] = parked_id;
        wrow[base + lane] = parked_p;
      }
    }
    const int32_t full = kept & ~(kWarpSize - 1);
    if (lane < kept - full) {
      irow[full + lane] = parked_id;
      wrow[full + lane] = parked_p;
    }
    for (int32_t j = kept + lane; j < E; j += kWarpSize) {
      irow[j] = -1;
      wrow[j] = 0.0f;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward kernels (logits gradients)
// ------------------------------------------------------------------------------------------------

// Accumulates the row's per-pair contributions into the columns: acc[i] (column col_of(i, lane))
// += val_j for every pair j with id_j == column, in ascending j (the reference's scatter_add order
// on duplicate ids). pair(j0 + lane) -> (id, val) is evaluated by the lane owning pair j (lanes
// load 32 pairs at a time), then broadcast by 2 shuffles per pair; the owning lane of the column
// adds (NPL predicated adds per pair). Ids of -1 contribute nothing.
// Cost: k * (2 shuffles + NPL adds) per lane. NOTE: untuned; for E <= 256 (NPL <= 8) it
// is small next to the E-wide row write, for E = 1024, k = 16 ~550 instructions per row.
template <int NPL, int VEC, typename PairFn>
__device__ __forceinline__ void scatter_pairs(int32_t k, int lane, PairFn pair, float (&acc)[NPL]) {
  for (int32_t j0 = 0; j0 < k; j0 += kWarpSize) {
    int32_t my_id = -1;
    float my_val = 0.0f;
    if (j0 + lane < k) pair(j0 + lane, my_id, my_val);
    const int32_t n = k - j0 < kWarpSize ? k - j0 : kWarpSize;
    for (int32_t src = 0; src < n; ++src) {  // warp-uniform trip count
      const int32_t id = __shfl_sync(kFullMask, my_id, src);
      const float v = __shfl_sync(kFullMask, my_val, src);
#pragma unroll
      for (int i = 0; i < NPL; ++i)
        if (router::col_of<VEC>(i, lane) == id) acc[i] += v;
    }
  }
}

// Generic (NPL == 0) variant: the value of column c (one column per lane, a 32-column chunk).
template <typename PairFn>
__device__ __forceinline__ float scatter_pairs_col(int32_t k, int lane, int32_t c, PairFn pair) {
  float acc = 0.0f;
  for (int32_t j0 = 0; j0 < k; j0 += kWarpSize) {
    int32_t my_id = -1;
    float my_val = 0.0f;
    if (j0 + lane < k) pair(j0 + lane, my_id, my_val);
    const int32_t n = k - j0 < kWarpSize ? k - j0 : kWarpSize;
    for (int32_t src = 0; src < n; ++src) {
      const int32_t id = __shfl_sync(kFullMask, my_id, src);
      const float v = __shfl_sync(kFullMask, my_val, src);
      if (id == c) acc += v;
    }
  }
  return acc;
}

// Writes out[c] for the row: value(i, c, acc) per register (NPL > 0, vector stores for VEC > 1).
template <typename scalar_t, int NPL, int VEC, typename ValueFn>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ orow, int32_t E, int lane,
                                          ValueFn value) {
  if constexpr (VEC > 1) {
#pragma unroll
    for (int g = 0; g < NPL / VEC; ++g) {
      const int32_t c0 = g * (kWarpSize * VEC) + lane * VEC;
      if (c0 < E) {
        Vec<scalar_t, VEC> v;
#pragma unroll
        for (int u = 0; u < VEC; ++u) v.v[u] = static_cast<scalar_t>(value(g * VEC + u, c0 + u));
        *reinterpret_cast<Vec<scalar_t, VEC>*>(orow + c0) = v;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int32_t c = i * kWarpSize + lane;
      if (c < E) orow[c] = static_cast<scalar_t>(value(i, c));
    }
  }
}

// softmax_route_backward. g, w: [T, k] fp32 contiguous; ids [T, k] int32 contiguous (-1 = not
// selected); out [T, E] contiguous, dtype of the logits (every element written).
//   gw = sum_j g~_j w_j, g~ = g where id >= 0 else 0 (as the reference: 0 * w, NaN-propagating).
//   renormalized: out[e] = sum_{j: id_j = e} (scale * w_j) * (g_j - gw)      (no logits read)
//   else:         out[e] = (scale * p_e) * (G_e - gw), G_e = sum_{j: id_j = e} g_j, p = softmax
// One warp per row: pairs in registers 32 at a time (pass 1: gw by a warp sum; pass 2: scatter into
// the lanes' column registers), the row (plain mode) loaded once, one coalesced row write.
template <typename scalar_t, int NPL, int VEC>
__global__ void softmax_route_backward_kernel(
    const float* __restrict__ grad_w, const float* __restrict__ w, const int32_t* __restrict__ ids,
    int32_t k, const scalar_t* __restrict__ logits, int64_t row_stride, int64_t col_stride,
    int64_t T, int32_t E, bool renormalized, float scale, scalar_t* __restrict__ out) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
       t < T; t += warp_stride) {
    const float* grow = grad_w + t * k;
    const float* wrow = w + t * k;
    const int32_t* irow = ids + t * k;
    float part = 0.0f;
    for (int32_t j = lane; j < k; j += kWarpSize) {
      const int32_t id = irow[j];
      MOLORA_DEVICE_ASSERT(id >= -1 && id < E, "softmax_route_backward: id outside [-1, E)");
      part += (id >= 0 ? grow[j] : 0.0f) * wrow[j];
    }
    const float gw = warp_sum_f(part);
    auto pair = [&](int32_t j, int32_t& id, float& v) {
      id = irow[j];
      if (id < 0) return;
      v = renormalized ? (scale * wrow[j]) * (grow[j] - gw) : grow[j];
    };
    const scalar_t* row = logits + t * row_stride;
    scalar_t* orow = out + t * static_cast<int64_t>(E);
    if constexpr (NPL > 0) {
      float acc[NPL];
#pragma unroll
      for (int i = 0; i < NPL; ++i) acc[i] = 0.0f;
      scatter_pairs<NPL, VEC>(k, lane, pair, acc);
      if (renormalized) {
        store_row<scalar_t, NPL, VEC>(orow, E, lane, [&](int i, int32_t) { return acc[i]; });
      } else {
        float x[NPL];
        router::load_row<scalar_t, NPL, VEC>(row, col_stride, E, lane, x);
        float m, s;
        router::softmax_stats<scalar_t, NPL, VEC>(row, col_stride, E, lane, x, m, s);
        store_row<scalar_t, NPL, VEC>(orow, E, lane, [&](int i, int32_t) {
          return (scale * (expf(x[i] - m) / s)) * (acc[i] - gw);
        });
      }
    } else {
      float m = 0.0f, s = 1.0f;
      float unused[1] = {0.0f};
      if (!renormalized)
        router::softmax_stats<scalar_t, 0, 1>(row, col_stride, E, lane, unused, m, s);
      for (int32_t c0 = 0; c0 < E; c0 += kWarpSize) {  // warp-uniform
        const int32_t c = c0 + lane;
        const float a = scatter_pairs_col(k, lane, c, pair);
        if (c < E) {
          const float v = renormalized
                              ? a
                              : (scale * (expf(static_cast<float>(row[c * col_stride]) - m) / s)) *
                                    (a - gw);
          orow[c] = static_cast<scalar_t>(v);
        }
      }
    }
  }
}

// sigmoid_topk_backward. g [T, k] fp32, ids [T, k] int32 (-1 = not selected, contributes 0),
// bias [E] fp32 or nullptr; out [T, E] contiguous, dtype of the logits.
//   s_j = sigmoid(logit[id_j]) (gathered), v_j = s_j (+ bias[id_j] if bias_in_weights and bias),
//   S = sum v, gv = sum g v (valid pairs);
//   dv_j = (scale / S) * (g_j - gv / S) if normalize else scale * g_j;
//   out[e] = sum_{j: id_j = e} (dv_j * s_j) * (1 - s_j), 0 elsewhere.
// One warp per row: the k logits gathered (L2/L1 hits), two warp sums, one coalesced row write;
// the full row of logits is never read.
template <typename scalar_t, int NPL, int VEC>
__global__ void sigmoid_topk_backward_kernel(
    const float* __restrict__ grad_w, const int32_t* __restrict__ ids, int32_t k,
    const scalar_t* __restrict__ logits, int64_t row_stride, int64_t col_stride,
    const float* __restrict__ bias, int64_t T, int32_t E, bool normalize, bool bias_in_weights,
    float scale, scalar_t* __restrict__ out) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  const bool add_bias = normalize && bias_in_weights && bias != nullptr;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
       t < T; t += warp_stride) {
    const float* grow = grad_w + t * k;
    const int32_t* irow = ids + t * k;
    const scalar_t* row = logits + t * row_stride;
    float S = 0.0f, gv = 0.0f;
    if (normalize) {
      float ps = 0.0f, pg = 0.0f;
      for (int32_t j = lane; j < k; j += kWarpSize) {
        const int32_t id = irow[j];
        MOLORA_DEVICE_ASSERT(id >= -1 && id < E, "sigmoid_topk_backward: id outside [-1, E)");
        if (id < 0) continue;
        const float sg = router::sigmoid_f(static_cast<float>(row[id * col_stride]));
        const float v = add_bias ? sg + bias[id] : sg;
        ps += v;
        pg += grow[j] * v;
      }
      S = warp_sum_f(ps);
      gv = warp_sum_f(pg);
    }
    auto pair = [&](int32_t j, int32_t& id, float& d) {
      id = irow[j];
      MOLORA_DEVICE_ASSERT(id >= -1 && id < E, "sigmoid_topk_backward: id outside [-1, E)");
      if (id < 0) return;
      const float sg = router::sigmoid_f(static_cast<float>(row[id * col_stride]));
      const float g = grow[j];
      const float dv = normalize ? (scale / S) * (g - gv / S) : scale * g;
      d = (dv * sg) * (1.0f - sg);
    };
    scalar_t* orow = out + t * static_cast<int64_t>(E);
    if constexpr (NPL > 0) {
      float acc[NPL];
#pragma unroll
      for (int i = 0; i < NPL; ++i) acc[i] = 0.0f;
      scatter_pairs<NPL, VEC>(k, lane, pair, acc);
      store_row<scalar_t, NPL, VEC>(orow, E, lane, [&](int i, int32_t) { return acc[i]; });
    } else {
      for (int32_t c0 = 0; c0 < E; c0 += kWarpSize) {
        const int32_t c = c0 + lane;
        const float a = scatter_pairs_col(k, lane, c, pair);
        if (c < E) orow[c] = static_cast<scalar_t>(a);
      }
    }
  }
}

}  // namespace molora::kernels
