"""Reference rank-wise masked activation ops (docs/OPS.md, Family 4) and their gradient ops.

Rank ids index rows of ``A [R, d_in]`` / columns of ``B [d_out, R]``; -1 = no rank.
Accumulation in opmath; data outputs in the data dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _checks
from ._common import opmath_dtype, topk_ids

__all__ = [
    "rank_topk",
    "rank_sparse_shrink",
    "rank_sparse_expand",
    "id_histogram",
    "rank_scatter",
    "rank_sparse_weight_grad",
]


def rank_topk(
    h: torch.Tensor,
    k: int,
    scores: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    use_abs: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """h [T,R], scores [T,R] or None, bias [R] or None -> values [T,k] (dtype h), ids [T,k] int32.

    key = (scores if given else h) + bias (opmath), then abs if use_abs; ids = top-k of key;
    values = h[t, ids].  FlyLoRA: key = h + d; SMoRA: scores = router sigmoid scores.  Gradient: h.
    """
    src = h if scores is None else scores
    key = src.detach().to(opmath_dtype(src.dtype))
    if bias is not None:
        key = key + bias.detach().to(key.dtype)
    if use_abs:
        key = key.abs()
    ids = topk_ids(key, k)
    return h.gather(-1, ids), ids.to(torch.int32)


def rank_sparse_shrink(x: torch.Tensor, A: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [T,d_in], A [R,d_in], ids [T,k] -> h [T,k] (dtype x).

    h[t,j] = dot(A[ids[t,j]], x[t]), 0 where ids == -1 (SMoRA gathered rows).  Gradient: x, A.
    """
    _checks.ids_in_range("rank_sparse_shrink", "ids", ids, -1, A.shape[0])
    op = opmath_dtype(x.dtype)
    T, k = ids.shape
    h = torch.zeros(T, k, dtype=op, device=x.device)
    t, j = (ids >= 0).nonzero(as_tuple=True)
    r = ids[t, j].long()
    h[t, j] = (A.to(op)[r] * x.to(op)[t]).sum(-1)
    return h.to(x.dtype)


def rank_sparse_expand(
    values: torch.Tensor,
    ids: torch.Tensor,
    B: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """values [T,k], ids [T,k], B [d_out,R], weights [T,k] or None, base [T,d_out] or None
    -> y [T,d_out] (dtype values).

    y[t] = base[t] + scale * sum_j w[t,j] * values[t,j] * B[:, ids[t,j]] (ids == -1 skipped).
    Gradient: values, B, weights, base.
    """
    _checks.ids_in_range("rank_sparse_expand", "ids", ids, -1, B.shape[1])
    op = opmath_dtype(values.dtype)
    T, k = ids.shape
    vf, Bf = values.to(op), B.to(op)
    y = torch.zeros(T, B.shape[0], dtype=op, device=values.device)
    for j in range(k):
        t = (ids[:, j] >= 0).nonzero().flatten()
        coef = vf[t, j]
        if weights is not None:
            coef = coef * weights[t, j].to(op)
        y = y.index_add(0, t, coef[:, None] * Bf.index_select(1, ids[t, j].long()).T)
    y = scale * y
    if base is not None:
        y = base.to(op) + y
    return y.to(values.dtype)


def id_histogram(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """ids [...] int in [-1, num_bins) -> counts [num_bins] int32: counts[b] = #(ids == b),
    -1 ignored.

    Rank usage for aux-free bias updates, or tokens per expert.
    """
    _checks.ids_in_range("id_histogram", "ids", ids, -1, num_bins)
    flat = ids.reshape(-1).long()
    return torch.bincount(flat[flat >= 0], minlength=num_bins).to(torch.int32)


def rank_scatter(src: torch.Tensor, ids: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """src [T,k], ids [T,k] -> out [T,num_ranks] (dtype src), out[t, ids[t,j]] += src[t,j].

    ids == -1 skipped.  d h of rank_topk = rank_scatter(grad_values, ids, R).
    """
    _checks.ids_in_range("rank_scatter", "ids", ids, -1, num_ranks)
    op = opmath_dtype(src.dtype)
    T, k = ids.shape
    out = torch.zeros(T, num_ranks, dtype=op, device=src.device)
    t, j = (ids >= 0).nonzero(as_tuple=True)
    out.index_put_((t, ids[t, j].long()), src[t, j].to(op), accumulate=True)
    return out.to(src.dtype)


def rank_sparse_weight_grad(
    x: torch.Tensor, g: torch.Tensor, ids: torch.Tensor, num_ranks: int
) -> torch.Tensor:
    """x [T,d], g [T,k], ids [T,k] -> G [num_ranks, d] (dtype x), G[ids[t,j]] += g[t,j] * x[t].

    ids == -1 skipped.  dA of rank_sparse_shrink = rank_sparse_weight_grad(x, grad_h, ids, R);
    dB of rank_sparse_expand = rank_sparse_weight_grad(grad_y, scale * w * values, ids, R).T.
    """
    _checks.ids_in_range("rank_sparse_weight_grad", "ids", ids, -1, num_ranks)
    op = opmath_dtype(x.dtype)
    G = torch.zeros(num_ranks, x.shape[1], dtype=op, device=x.device)
    t, j = (ids >= 0).nonzero(as_tuple=True)
    G.index_add_(0, ids[t, j].long(), g[t, j].to(op)[:, None] * x.to(op)[t])
    return G.to(x.dtype)
