"""Reference dispatch / gather / combine (docs/OPS.md, Family 2) and ``pair_dot``.

Dispatch metadata ``(order, pos, expert_offsets)``: row i of the expert-ordered layout holds the
flat pair ``p = order[i] = t*k + j`` (-1 = padding row); ``pos[t, j]`` is the row of pair (t, j)
(-1 = dropped).  Data is computed in opmath and returned in the data dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _checks
from ._common import opmath_dtype

__all__ = ["dispatch", "gather_rows", "combine_rows", "pair_dot"]


def dispatch(
    ids: torch.Tensor, num_experts: int, block_size: int = 1
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T,k] int in [-1, E) -> order [P], pos [T,k], expert_offsets [E+1] (all int32).

    Pairs grouped by expert, ascending flat pair index p = t*k + j within an expert; each expert's
    segment padded with -1 rows to a multiple of block_size; P = T*k if block_size == 1 else
    T*k + E*(block_size-1).  Multi-tenant serving: ids = adapter_of_token[:, None].
    """
    T, k = ids.shape
    E = num_experts
    _checks.ids_in_range("dispatch", "ids", ids, -1, E)
    dev = ids.device
    flat = ids.reshape(-1).long()  # flat[p], p = t*k + j
    P = T * k if block_size == 1 else T * k + E * (block_size - 1)

    order = torch.full((P,), -1, dtype=torch.int64, device=dev)
    pos = torch.full((T * k,), -1, dtype=torch.int64, device=dev)
    expert_offsets = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    for e in range(E):
        pairs = (flat == e).nonzero().flatten()  # ascending p
        start = int(expert_offsets[e])
        n = pairs.numel()
        rows = torch.arange(start, start + n, device=dev)
        order[rows] = pairs
        pos[pairs] = rows
        padded = -(-n // block_size) * block_size  # n rounded up to a multiple of block_size
        expert_offsets[e + 1] = start + padded
    return (
        order.to(torch.int32),
        pos.reshape(T, k).to(torch.int32),
        expert_offsets.to(torch.int32),
    )


def _gather(
    x: torch.Tensor, order: torch.Tensor, k: int, w: Optional[torch.Tensor]
) -> torch.Tensor:
    """x_perm[i] = w[p] * x[p // k] with p = order[i] (w = 1 if None), 0 where p == -1.
    No casting: x and w are already in the compute dtype."""
    rows = (order >= 0).nonzero().flatten()
    p = order[rows].long()
    vals = x.index_select(0, p // k)
    if w is not None:
        vals = vals * w.reshape(-1)[p][:, None]
    return x.new_zeros(order.numel(), x.shape[1]).index_copy(0, rows, vals)


def _combine(y_perm: torch.Tensor, pos: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """y[t] = sum_j w[t,j] * y_perm[pos[t,j]] over j with pos[t,j] >= 0 (w = 1 if None).
    No casting: y_perm and w are already in the compute dtype."""
    T, k = pos.shape
    y = y_perm.new_zeros(T, y_perm.shape[1])
    for j in range(k):
        t = (pos[:, j] >= 0).nonzero().flatten()
        vals = y_perm.index_select(0, pos[t, j].long())
        if w is not None:
            vals = vals * w[t, j][:, None]
        y = y.index_add(0, t, vals)
    return y


def gather_rows(
    x: torch.Tensor,
    order: torch.Tensor,
    pos: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [T,d], weights [T,k] or None -> x_perm [P,d] (dtype x).

    x_perm[i] = w[p] * x[p // k] with p = order[i] (w = 1 if None), 0 for p == -1.
    Gradient: x, weights.
    """
    T, k = pos.shape
    _checks.order_pos_values("gather_rows", order, pos, order.numel())
    op = opmath_dtype(x.dtype)
    w = None if weights is None else weights.to(op)
    return _gather(x.to(op), order, k, w).to(x.dtype)


def combine_rows(
    y_perm: torch.Tensor,
    order: torch.Tensor,
    pos: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y_perm [P,d], weights [T,k] or None -> y [T,d] (dtype y_perm).

    y[t] = sum_j w[t,j] * y_perm[pos[t,j]] over j with pos[t,j] >= 0.  Gradient: y_perm, weights.
    """
    _checks.order_pos_values("combine_rows", order, pos, y_perm.shape[0])
    op = opmath_dtype(y_perm.dtype)
    w = None if weights is None else weights.to(op)
    return _combine(y_perm.to(op), pos, w).to(y_perm.dtype)


def pair_dot(
    a: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, a_by_token: bool
) -> torch.Tensor:
    """a [T,d] (a_by_token) or [P,d], b [P,d], pos [T,k] -> out [T,k] opmath.

    out[t,j] = dot(a[t if a_by_token else pos[t,j]], b[pos[t,j]]), 0 where pos == -1.
    Routing-weight gradients of gather_rows / combine_rows / sgmv_shrink / sgmv_expand.
    """
    _checks.pair_dot_values("pair_dot", a, b, pos, a_by_token)
    op = opmath_dtype(torch.promote_types(a.dtype, b.dtype))
    T, k = pos.shape
    out = torch.zeros(T, k, dtype=op, device=b.device)
    t, j = (pos >= 0).nonzero(as_tuple=True)
    i = pos[t, j].long()
    a_rows = a[t] if a_by_token else a[i]
    out[t, j] = (a_rows.to(op) * b[i].to(op)).sum(-1)
    return out
