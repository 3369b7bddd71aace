"""Reference routers (docs/OPS.md, Family 1) and their logits-gradient ops.

All routing math is in opmath (float32, float64 for float64 logits); ``weights`` are opmath,
``ids`` int32, ties toward the lower id.  The forwards are differentiable w.r.t. ``logits`` only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _checks
from ._common import opmath_dtype, topk_ids, tsallis_entropy_parts

__all__ = [
    "softmax_topk",
    "topk_softmax",
    "sigmoid_topk",
    "softmax_topp",
    "softmax_route_backward",
    "sigmoid_topk_backward",
]


def softmax_topk(
    logits: torch.Tensor, k: int, renormalize: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [T,E] -> weights [T,k] opmath, ids [T,k] int32.

    p = softmax(logits); ids = top-k of p (selected on the logits); weights = p[ids] (/ their sum if renormalize).
    MixLoRA / MoLA / Mixtral routing.
    """
    lf = logits.to(opmath_dtype(logits.dtype))
    p = torch.softmax(lf, dim=-1)
    ids = topk_ids(lf, k)  # softmax is monotone: select on the logits, exact ties only
    weights = p.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def topk_softmax(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [T,E] -> weights [T,k] opmath, ids [T,k] int32.

    ids = top-k of logits; weights = softmax(logits[ids] / temperature).  MeteoRA, Uni-MoE.
    """
    lf = logits.to(opmath_dtype(logits.dtype))
    ids = topk_ids(lf, k)
    weights = torch.softmax(lf.gather(-1, ids) / temperature, dim=-1)
    return weights, ids.to(torch.int32)


def sigmoid_topk(
    logits: torch.Tensor,
    k: int,
    bias: Optional[torch.Tensor] = None,
    normalize: bool = True,
    bias_in_weights: bool = False,
    scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [T,E], bias [E] or None -> weights [T,k] opmath, ids [T,k] int32.

    s = sigmoid(logits); ids = top-k of s + bias (bias never differentiated);
    v = (s + bias)[ids] if bias_in_weights (SMoRA) else s[ids] (DeepSeek-V3);
    weights = scale * v / sum(v) if normalize else scale * v.
    """
    op = opmath_dtype(logits.dtype)
    s = torch.sigmoid(logits.to(op))
    b = s.new_zeros(s.shape[-1]) if bias is None else bias.detach().to(op)
    # Without a bias select on the logits (sigmoid is monotone), so ids never hinge on rounding.
    ids = topk_ids(s + b if bias is not None else logits.to(op), k)
    v = (s + b).gather(-1, ids) if bias_in_weights else s.gather(-1, ids)
    weights = scale * v / v.sum(-1, keepdim=True) if normalize else scale * v
    return weights, ids.to(torch.int32)


def softmax_topp(
    logits: torch.Tensor,
    top_p: float,
    min_k: int = 1,
    entropy_threshold: float = 1.0,
    q: float = 1.1,
    eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [T,E] -> weights [T,E] opmath, ids [T,E] int32 (kept prefix, then id -1 / weight 0).

    DynMoLE: experts sorted by descending p; kept = cumsum(sorted p) <= top_p, the first min_k
    always kept; every expert kept when q > 0, entropy_threshold < 1 and the normalised Tsallis
    entropy of p + eps exceeds entropy_threshold.  Weights are not renormalised.
    """
    lf = logits.to(opmath_dtype(logits.dtype))
    p = torch.softmax(lf, dim=-1)
    E = p.shape[-1]
    ids = topk_ids(lf, E)  # all experts, descending p (by logit), ties -> lower id
    sorted_p = p.gather(-1, ids)

    pd = sorted_p.detach()
    keep = pd.cumsum(-1) <= top_p
    keep[:, :min_k] = True

    # Normalised Tsallis_q entropy of p + eps (Shannon / log E when q == 1; 0 when E == 1).
    if E == 1:
        H = torch.zeros_like(p[:, 0])
    else:
        H, H_max = tsallis_entropy_parts(p.detach(), q, eps)
        H = H / H_max
    if q > 0 and entropy_threshold < 1:
        keep = keep | (H > entropy_threshold)[:, None]

    weights = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    ids = torch.where(keep, ids, torch.full_like(ids, -1))
    return weights, ids.to(torch.int32)


def softmax_route_backward(
    grad_weights: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    logits: torch.Tensor,
    renormalized: bool,
    scale: float,
) -> torch.Tensor:
    """d logits [T,E] (dtype of logits) of softmax_topk / topk_softmax / softmax_topp.

    grad_weights, weights [T,k]; ids [T,k] (-1 = not selected; its gradient is ignored).
    renormalized:  dlogits[t, ids_j] = scale * w_j * (g_j - sum_l g_l w_l), 0 elsewhere
                   (softmax_topk(renormalize=True): scale 1; topk_softmax: scale 1/temperature).
    else:          dlogits[t, e] = scale * p_e * (G_e - sum_j g_j w_j), G_e = sum_{ids_j = e} g_j
                   (softmax_topk(renormalize=False), softmax_topp).
    """
    T, E = logits.shape
    _checks.ids_in_range("softmax_route_backward", "ids", ids, -1, E)
    op = opmath_dtype(logits.dtype)
    valid = ids >= 0
    idx = ids.long().clamp(min=0)
    g = torch.where(valid, grad_weights.to(op), 0.0)
    w = weights.to(op)
    gw = (g * w).sum(-1, keepdim=True)  # sum_l g_l w_l
    if renormalized:
        d_sel = torch.where(valid, scale * w * (g - gw), 0.0)
        dlogits = torch.zeros(T, E, dtype=op, device=logits.device).scatter_add_(-1, idx, d_sel)
    else:
        p = torch.softmax(logits.to(op), dim=-1)
        G = torch.zeros(T, E, dtype=op, device=logits.device).scatter_add_(-1, idx, g)
        dlogits = scale * p * (G - gw)
    return dlogits.to(logits.dtype)


def sigmoid_topk_backward(
    grad_weights: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    normalize: bool,
    bias_in_weights: bool,
    scale: float,
) -> torch.Tensor:
    """d logits [T,E] (dtype of logits) of sigmoid_topk.

    With s = sigmoid(logits)[ids], v = s (+ bias[ids] if bias_in_weights), S = sum v:
    dv_l = scale/S * (g_l - sum_j g_j w_j / scale) if normalize else scale * g_l;
    dlogits[t, ids_l] = dv_l * s_l * (1 - s_l), 0 elsewhere.
    ``sum_j g_j w_j / scale`` is evaluated as ``sum_j g_j v_j / S`` (equal, since
    w = scale * v / S), so that scale == 0 gives 0 rather than 0/0.
    """
    T, E = logits.shape
    _checks.ids_in_range("sigmoid_topk_backward", "ids", ids, -1, E)
    op = opmath_dtype(logits.dtype)
    valid = ids >= 0
    idx = ids.long().clamp(min=0)
    s = torch.where(valid, torch.sigmoid(logits.to(op)).gather(-1, idx), 0.0)
    g = torch.where(valid, grad_weights.to(op), 0.0)
    if normalize:
        v = s
        if bias_in_weights and bias is not None:
            v = torch.where(valid, s + bias.to(op)[idx], 0.0)
        S = v.sum(-1, keepdim=True)
        dv = scale / S * (g - (g * v).sum(-1, keepdim=True) / S)
    else:
        dv = scale * g
    d_sel = torch.where(valid, dv * s * (1 - s), 0.0)
    dlogits = torch.zeros(T, E, dtype=op, device=logits.device).scatter_add_(-1, idx, d_sel)
    return dlogits.to(logits.dtype)
