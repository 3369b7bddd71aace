// Router kernels for one token row: softmax/sigmoid + stable top-k (+ renormalise) and their
// logits gradients. Framework-free: raw pointers, sizes, opmath accumulation type acc_t.
#pragma once

#include <cmath>
#include <cstdint>

#include "topk_cpu.h"

namespace molora::kernels {

// key[e] = logits[e] (as acc_t); returns the row max, NaN when the row holds a NaN (so the softmax
// of that row is NaN, as torch.softmax gives, rather than finite weights that ignore it).
template <typename scalar_t, typename acc_t>
inline acc_t load_row(const scalar_t* logits, int64_t E, acc_t* key) {
  acc_t m = -INFINITY;
  for (int64_t e = 0; e < E; ++e) {
    key[e] = static_cast<acc_t>(logits[e]);
    m = (key[e] > m || key[e] != key[e]) ? key[e] : m;
  }
  return m;
}

template <typename acc_t>
inline acc_t sum_exp(const acc_t* key, int64_t E, acc_t m) {
  acc_t s = 0;
  for (int64_t e = 0; e < E; ++e) s += std::exp(key[e] - m);
  return s;
}

// softmax -> top-k (-> renormalise). Selection on the logits (softmax is monotone).
template <typename scalar_t, typename acc_t>
void softmax_topk_row(const scalar_t* logits, int64_t E, int64_t k, bool renormalize, acc_t* key,
                      int32_t* scratch, acc_t* weights, int32_t* ids) {
  const acc_t m = load_row(logits, E, key);
  stable_topk_desc(key, E, k, ids, scratch);
  acc_t denom = renormalize ? 0 : sum_exp(key, E, m);
  for (int64_t j = 0; j < k; ++j) {
    weights[j] = std::exp(key[ids[j]] - m);
    if (renormalize) denom += weights[j];
  }
  for (int64_t j = 0; j < k; ++j) weights[j] /= denom;
}

// top-k on logits -> softmax(selected / temperature).
template <typename scalar_t, typename acc_t>
void topk_softmax_row(const scalar_t* logits, int64_t E, int64_t k, acc_t inv_temperature,
                      acc_t* key, int32_t* scratch, acc_t* weights, int32_t* ids) {
  load_row(logits, E, key);
  stable_topk_desc(key, E, k, ids, scratch);
  const acc_t m = key[ids[0]];
  acc_t denom = 0;
  for (int64_t j = 0; j < k; ++j) {
    weights[j] = std::exp((key[ids[j]] - m) * inv_temperature);
    denom += weights[j];
  }
  for (int64_t j = 0; j < k; ++j) weights[j] /= denom;
}

template <typename acc_t>
inline acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

// sigmoid (+ selection bias) -> top-k -> optional normalise, times scale. Without a bias the
// selection runs on the logits (sigmoid is monotone) so ids do not depend on exp rounding.
template <typename scalar_t, typename acc_t>
void sigmoid_topk_row(const scalar_t* logits, const acc_t* bias, int64_t E, int64_t k,
                      bool normalize, bool bias_in_weights, acc_t scale, acc_t* key,
                      int32_t* scratch, acc_t* weights, int32_t* ids) {
  load_row(logits, E, key);
  if (bias != nullptr) {
    for (int64_t e = 0; e < E; ++e) key[e] = sigmoid(key[e]) + bias[e];
  }
  stable_topk_desc(key, E, k, ids, scratch);
  acc_t total = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t e = ids[j];
    const acc_t s = sigmoid(static_cast<acc_t>(logits[e]));
    weights[j] = (bias != nullptr && bias_in_weights) ? s + bias[e] : s;
    total += weights[j];
  }
  const acc_t factor = normalize ? scale / total : scale;
  for (int64_t j = 0; j < k; ++j) weights[j] *= factor;
}

// Normalised Tsallis entropy of p + eps (Shannon / log E for q == 1; 0 when E == 1).
template <typename acc_t>
inline acc_t normalized_tsallis(const acc_t* p, int64_t E, acc_t q, acc_t eps) {
  if (E <= 1) return 0;
  acc_t h = 0;
  if (q == acc_t(1)) {
    for (int64_t e = 0; e < E; ++e) h -= (p[e] + eps) * std::log(p[e] + eps);
    return h / std::log(static_cast<acc_t>(E));
  }
  for (int64_t e = 0; e < E; ++e) h += std::pow(p[e] + eps, q);
  const acc_t max_h = (acc_t(1) - std::pow(static_cast<acc_t>(E), acc_t(1) - q)) / (q - acc_t(1));
  return (acc_t(1) - h) / (q - acc_t(1)) / max_h;
}

// DynMoLE top-p with a minimum count and a Tsallis-entropy broadcast. Outputs E columns sorted by
// probability; unkept columns are id -1 / weight 0. `p` and `key` are E-long scratch rows.
template <typename scalar_t, typename acc_t>
void softmax_topp_row(const scalar_t* logits, int64_t E, acc_t top_p, int64_t min_k,
                      acc_t entropy_threshold, acc_t q, acc_t eps, acc_t* key, acc_t* p,
                      int32_t* scratch, acc_t* weights, int32_t* ids) {
  const acc_t m = load_row(logits, E, key);
  const acc_t s = sum_exp(key, E, m);
  for (int64_t e = 0; e < E; ++e) p[e] = std::exp(key[e] - m) / s;
  stable_topk_desc(key, E, E, ids, scratch);
  const bool broadcast = q > 0 && entropy_threshold < 1 &&
                         normalized_tsallis(p, E, q, eps) > entropy_threshold;
  acc_t cumsum = 0;
  for (int64_t j = 0; j < E; ++j) {
    const acc_t pj = p[ids[j]];
    cumsum += pj;
    if (broadcast || j < min_k || cumsum <= top_p) {
      weights[j] = pj;
    } else {
      weights[j] = 0;
      ids[j] = -1;
    }
  }
}

// d logits of a softmax router row. renormalized: weights are a softmax over the selected
// logits (times `scale` = 1/temperature); else weights are plain softmax probabilities of all E.
template <typename scalar_t, typename acc_t>
void softmax_route_backward_row(const acc_t* grad_w, const acc_t* w, const int32_t* ids,
                                const scalar_t* logits, int64_t E, int64_t k, bool renormalized,
                                acc_t scale, acc_t* key, acc_t* dlogits) {
  acc_t dot = 0;
  for (int64_t j = 0; j < k; ++j)
    if (ids[j] >= 0) dot += grad_w[j] * w[j];
  for (int64_t e = 0; e < E; ++e) dlogits[e] = 0;
  if (renormalized) {
    for (int64_t j = 0; j < k; ++j)
      if (ids[j] >= 0) dlogits[ids[j]] += scale * w[j] * (grad_w[j] - dot);
    return;
  }
  const acc_t m = load_row(logits, E, key);
  const acc_t s = sum_exp(key, E, m);
  for (int64_t j = 0; j < k; ++j)
    if (ids[j] >= 0) dlogits[ids[j]] += grad_w[j];
  for (int64_t e = 0; e < E; ++e) dlogits[e] = scale * std::exp(key[e] - m) / s * (dlogits[e] - dot);
}

// d logits of sigmoid_topk_row. Uses sum_j g_j v_j / S rather than dividing by `scale`, so
// scale == 0 stays finite.
template <typename scalar_t, typename acc_t>
void sigmoid_topk_backward_row(const acc_t* grad_w, const int32_t* ids, const scalar_t* logits,
                               const acc_t* bias, int64_t E, int64_t k, bool normalize,
                               bool bias_in_weights, acc_t scale, acc_t* v, acc_t* dlogits) {
  for (int64_t e = 0; e < E; ++e) dlogits[e] = 0;
  acc_t total = 0, gv = 0;
  for (int64_t j = 0; j < k; ++j) {  // id -1 (a dropped slot) contributes nothing
    const int32_t e = ids[j];
    if (e < 0) {
      v[j] = 0;
      continue;
    }
    const acc_t s = sigmoid(static_cast<acc_t>(logits[e]));
    v[j] = (bias != nullptr && bias_in_weights) ? s + bias[e] : s;
    total += v[j];
    gv += grad_w[j] * v[j];
  }
  for (int64_t j = 0; j < k; ++j) {
    const int32_t e = ids[j];
    if (e < 0) continue;
    const acc_t s = sigmoid(static_cast<acc_t>(logits[e]));
    const acc_t dv = normalize ? scale / total * (grad_w[j] - gv / total) : scale * grad_w[j];
    dlogits[e] += dv * s * (acc_t(1) - s);
  }
}

}  // namespace molora::kernels
