"""Reference grouped low-rank matmuls (docs/OPS.md, Family 3) and their weight-gradient ops.

Expert e's factors are ``A[ro_e : ro_e + r_e]`` ([r_e, d_in]) and ``B[:, ro_e : ro_e + r_e]``
([d_out, r_e]) with ``ro = rank_offsets``.  Row i of the dispatched layout belongs to the expert e
with ``expert_offsets[e] <= i < expert_offsets[e+1]``, holds pair ``p = order[i]`` of token
``t = p // k`` (k = pos.shape[1]) and has coefficient ``c_i = w[p] * s_e`` (each factor 1 when
None).
Accumulation in opmath; data outputs in the data dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _checks
from ._common import opmath_dtype
from .dispatch import _combine, _gather, dispatch, pair_dot
from .router import softmax_topk

__all__ = [
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_weight_grad",
    "sgmv_expand_backward",
    "stacked_gated_lora",
    "stacked_gated_lora_backward",
    "pair_gate",
    "fused_moe_lora",
    "moe_lora_linear",
    "routed_moe_lora_linear",
    "routed_moe_lora",
]


def _seg_sizes(offsets: list, end: Optional[int] = None) -> list:
    """Lengths offsets[e+1] - offsets[e], plus the tail end - offsets[-1] if end is given."""
    sizes = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    return sizes if end is None else sizes + [end - offsets[-1]]


def _scales(scales: Optional[torch.Tensor], E: int, op: torch.dtype) -> list:
    """Per-expert s_e as opmath 0-d tensors (None = 1 when scales is None); never differentiated."""
    if scales is None:
        return [None] * E
    s = scales.detach().to(op)
    return [s[e] for e in range(E)]


def sgmv_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    rank_offsets: torch.Tensor,
    order: torch.Tensor,
    pos: torch.Tensor,
    expert_offsets: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    scales: Optional[torch.Tensor] = None,
    *,
    max_rank: int,
) -> torch.Tensor:
    """x [T,d_in], A [R,d_in] -> h [P, max_rank] (dtype x).

    h[i, a] = c_i * dot(A[ro_e + a], x[t]) for a < r_e; 0 for a >= r_e and for padding rows.
    Gradient: x, A, weights.
    """
    op_name = "sgmv_shrink"
    _checks.dispatched_values(op_name, A.shape[0], rank_offsets, order, pos, expert_offsets, max_rank)
    k = pos.shape[1]
    P = order.numel()
    op = opmath_dtype(x.dtype)
    ro = rank_offsets.tolist()
    eo = expert_offsets.tolist()
    E = len(ro) - 1
    s = _scales(scales, E, op)
    w = None if weights is None else weights.to(op)

    # xw[i] = w[p] * x[p // k] (0 on padding rows); then h[i, :r_e] = s_e * A_e @ xw[i].
    xw = _gather(x.to(op), order, k, w)
    x_seg = xw.split(_seg_sizes(eo, P))  # rows of expert 0..E-1, then the rows past eo[E]
    A_e = A.to(op).split(_seg_sizes(ro))
    blocks = []
    for e in range(E):
        he = x_seg[e] @ A_e[e].T  # [n_e, r_e]
        if s[e] is not None:
            he = he * s[e]
        blocks.append(F.pad(he, (0, max_rank - he.shape[1])))  # zero rank columns >= r_e
    blocks.append(xw.new_zeros(P - eo[E], max_rank))  # rows past expert_offsets[E]
    h = torch.cat(blocks)
    return h.to(x.dtype)


def sgmv_expand(
    h: torch.Tensor,
    B: torch.Tensor,
    rank_offsets: torch.Tensor,
    order: torch.Tensor,
    pos: torch.Tensor,
    expert_offsets: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    scales: Optional[torch.Tensor] = None,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """h [P, max_rank], B [d_out,R], base [T,d_out] or None -> y [T,d_out] (dtype h).

    y[t] = base[t] + sum_j c_i * B[:, ro_e : ro_e + r_e] @ h[i, :r_e] with i = pos[t, j].
    Gradient: h, B, weights, base.
    """
    op_name = "sgmv_expand"
    _checks.dispatched_values(op_name, B.shape[1], rank_offsets, order, pos, expert_offsets, h.shape[1])
    P = order.numel()
    op = opmath_dtype(h.dtype)
    ro = rank_offsets.tolist()
    eo = expert_offsets.tolist()
    E = len(ro) - 1
    s = _scales(scales, E, op)
    w = None if weights is None else weights.to(op)

    # rows[i] = s_e * B_e @ h[i, :r_e] (0 past expert_offsets[E]);
    # then y[t] = sum_j w[t,j] * rows[pos[t,j]].
    h_seg = h.to(op).split(_seg_sizes(eo, P))  # rows of expert 0..E-1, then the rows past eo[E]
    B_e = B.to(op).split(_seg_sizes(ro), dim=1)
    blocks = []
    for e in range(E):
        re = h_seg[e][:, : B_e[e].shape[1]] @ B_e[e].T  # [n_e, d_out]
        if s[e] is not None:
            re = re * s[e]
        blocks.append(re)
    blocks.append(h_seg[E].new_zeros(P - eo[E], B.shape[0]))  # rows past expert_offsets[E]
    rows = torch.cat(blocks)
    y = _combine(rows, pos, w)
    if base is not None:
        y = base.to(op) + y
    return y.to(h.dtype)


def sgmv_weight_grad(
    x: torch.Tensor,
    h: torch.Tensor,
    rank_offsets: torch.Tensor,
    order: torch.Tensor,
    pos: torch.Tensor,
    expert_offsets: torch.Tensor,
    weights: Optional[torch.Tensor],
    scales: Optional[torch.Tensor],
    total_rank: int,
    transposed: bool = False,
) -> torch.Tensor:
    """x [T,d], h [P, max_rank] -> G [R, d] (dtype x); with transposed, G^T [d, R] contiguous.

    G[ro_e + a] = sum_{i in e} c_i * h[i, a] * x[t_i]  (a < r_e; padding rows skipped).
    dA of sgmv_shrink = sgmv_weight_grad(x, grad_h, ...); dB of sgmv_expand =
    sgmv_weight_grad(grad_y, h, ..., transposed=True).
    """
    op_name = "sgmv_weight_grad"
    _checks.dispatched_values(op_name, total_rank, rank_offsets, order, pos, expert_offsets, h.shape[1])
    k = pos.shape[1]
    op = opmath_dtype(x.dtype)
    ro = rank_offsets.tolist()
    eo = expert_offsets.tolist()
    E = len(ro) - 1
    xf, hf = x.to(op), h.to(op)
    G = torch.zeros(total_rank, x.shape[1], dtype=op, device=x.device)
    for e in range(E):
        lo, hi, r0, r1 = eo[e], eo[e + 1], ro[e], ro[e + 1]
        i = lo + (order[lo:hi] >= 0).nonzero().flatten()  # non-padding rows of expert e
        p = order[i].long()
        t = p // k
        c = torch.ones(i.numel(), dtype=op, device=x.device)
        if weights is not None:
            c = c * weights.reshape(-1)[p].to(op)
        if scales is not None:
            c = c * scales[e].to(op)
        G[r0:r1] = (c[:, None] * hf[i, : r1 - r0]).T @ xf[t]
    G = G.to(x.dtype)
    return G.t().contiguous() if transposed else G


def sgmv_expand_backward(
    grad_y: torch.Tensor,
    h: torch.Tensor,
    B: torch.Tensor,
    rank_offsets: torch.Tensor,
    order: torch.Tensor,
    pos: torch.Tensor,
    expert_offsets: torch.Tensor,
    weights: Optional[torch.Tensor],
    scales: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dB, u, d w) of ``y = sgmv_expand(h, B, ...)``: dB [d_out, R] (grad_y's dtype) =
    ``sgmv_weight_grad(grad_y, h, ..., transposed=True)``; u [P, max_rank] opmath =
    ``s_e B_e^T grad_y[t_i]`` per row (unweighted; dh_i = w_i u_i), 0 beyond r_e and on padding
    rows; d w [T, k] opmath = ``pair_dot(h, u, pos, False)`` (d w_i = dot(h_i, u_i))."""
    acc = opmath_dtype(grad_y.dtype)
    u = sgmv_shrink(grad_y.to(acc), B.to(acc).t(), rank_offsets, order, pos, expert_offsets, None,
                    scales, max_rank=h.shape[1])
    dB = sgmv_weight_grad(grad_y, h, rank_offsets, order, pos, expert_offsets, weights, scales,
                          B.shape[1], True)
    return dB, u, pair_dot(h.to(acc), u, pos, False)


def stacked_gated_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gate: torch.Tensor,
    rank_offsets: torch.Tensor,
    scales: Optional[torch.Tensor] = None,
    base: Optional[torch.Tensor] = None,
    shared_a: bool = False,
) -> torch.Tensor:
    """x [T,d_in], A [R,d_in] ([r,d_in] if shared_a), B [d_out,R], gate [T,E]
    -> y [T,d_out] (dtype x).

    y[t] = base[t] + sum_e gate[t,e] * s_e * B_e @ (A_e @ x[t]); shared_a (HydraLoRA): A_e = A.
    Dense soft routing (X-LoRA, LoRAMoE, HydraLoRA, MoLE, LoRA Soups).
    Gradient: x, A, B, gate, base.
    """
    _checks.stacked_values("stacked_gated_lora", A, B, rank_offsets, shared_a)
    op = opmath_dtype(x.dtype)
    ro = rank_offsets.tolist()
    E = len(ro) - 1
    s = _scales(scales, E, op)
    xf = x.to(op)
    A_e = [A.to(op)] * E if shared_a else A.to(op).split(_seg_sizes(ro))
    B_e = B.to(op).split(_seg_sizes(ro), dim=1)
    gate_e = gate.to(op).unbind(1)
    y = torch.zeros(x.shape[0], B.shape[0], dtype=op, device=x.device)
    for e in range(E):
        g_e = gate_e[e] if s[e] is None else gate_e[e] * s[e]
        y = y + g_e[:, None] * ((xf @ A_e[e].T) @ B_e[e].T)
    if base is not None:
        y = base.to(op) + y
    return y.to(x.dtype)


def stacked_gated_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gate: torch.Tensor,
    rank_offsets: torch.Tensor,
    scales: Optional[torch.Tensor],
    shared_a: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T,d_in], dA like A, dB [d_out,R], dgate [T,E]), each in its input's dtype.

    With u_e = x @ A_e^T [T,r_e], z_e = grad_y @ B_e [T,r_e], g_e = gate[:, e] * s_e:
    dx = sum_e (g_e * z_e) @ A_e;  dA_e = (g_e * z_e)^T @ x (summed over e if shared_a);
    dB_e = grad_y^T @ (g_e * u_e);  dgate[:, e] = s_e * sum(z_e * u_e, -1).
    (The gradient w.r.t. base is grad_y.)
    """
    _checks.stacked_values("stacked_gated_lora_backward", A, B, rank_offsets, shared_a)
    op = opmath_dtype(x.dtype)
    ro = rank_offsets.tolist()
    E = len(ro) - 1
    s = _scales(scales, E, op)
    gyf, xf, Af, Bf, gf = grad_y.to(op), x.to(op), A.to(op), B.to(op), gate.to(op)
    dx = torch.zeros_like(xf)
    dA = torch.zeros_like(Af)
    dB = torch.zeros_like(Bf)
    dgate = torch.zeros_like(gf)
    for e in range(E):
        r0, r1 = ro[e], ro[e + 1]
        A_e = Af if shared_a else Af[r0:r1]
        B_e = Bf[:, r0:r1]
        s_e = 1.0 if s[e] is None else s[e]
        g_e = (gf[:, e] * s_e)[:, None]
        u_e = xf @ A_e.T
        z_e = gyf @ B_e
        dx += (g_e * z_e) @ A_e
        if shared_a:
            dA += (g_e * z_e).T @ xf
        else:
            dA[r0:r1] = (g_e * z_e).T @ xf
        dB[:, r0:r1] = gyf.T @ (g_e * u_e)
        dgate[:, e] = s_e * (z_e * u_e).sum(-1)
    return dx.to(x.dtype), dA.to(A.dtype), dB.to(B.dtype), dgate.to(gate.dtype)


def pair_gate(weights: Optional[torch.Tensor], ids: torch.Tensor, num_experts: int,
              dtype: torch.dtype) -> torch.Tensor:
    """The top-k routing as a dense gate [T, E] (dtype): ``g[t, e] = sum_j w[t, j] [ids[t, j] == e]``
    (w = 1 when None; slots with id -1 add nothing). Differentiable w.r.t. weights (the gradient
    of ``w[t, j]`` is ``dg[t, ids[t, j]]``). ids must lie in [-1, E)."""
    valid = ids >= 0
    w = torch.ones(ids.shape, dtype=dtype, device=ids.device) if weights is None else \
        weights.to(dtype)
    gate = torch.zeros(ids.shape[0], num_experts, dtype=dtype, device=ids.device)
    return gate.scatter_add(1, ids.clamp(min=0).long(), torch.where(valid, w, 0))


def fused_moe_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    rank_offsets: torch.Tensor,
    weights: Optional[torch.Tensor],
    ids: torch.Tensor,
    scales: Optional[torch.Tensor] = None,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [T,d_in], A [R,d_in], B [d_out,R], weights [T,k] or None, ids [T,k] -> y [T,d_out].

    y[t] = base[t] + sum_j w[t,j] * s_e * B_e @ (A_e @ x[t]) with e = ids[t,j] (-1: none): the
    top-k MoE-LoRA linear in the dense form, ``stacked_gated_lora`` of ``pair_gate``.
    Gradient: x, A, B, weights, base.
    """
    _checks.rank_offsets_values("fused_moe_lora", rank_offsets, A.shape[0])
    _checks.ids_in_range("fused_moe_lora", "ids", ids, -1, rank_offsets.shape[0] - 1)
    gate = pair_gate(weights, ids, rank_offsets.shape[0] - 1, opmath_dtype(x.dtype))
    return stacked_gated_lora(x, A, B, gate, rank_offsets, scales, base, False)


def moe_lora_linear(x, lora_A, lora_B, rank_offsets, routing_weights, expert_ids, scales=None, *,
                    base=None, weight=None, bias=None, algo="auto", max_rank=None,
                    dispatched=None, x_per_slot=False):
    """The oracle of ``molora_ops.functional.moe_lora_linear`` (same arguments; ``algo`` and
    ``dispatched`` change nothing here): the reference dispatch -> sgmv_shrink -> sgmv_expand of
    the flattened tokens, with the frozen layer ``x W^T + bias`` (or ``base``) as the base."""
    del algo, dispatched
    k, d_in, d_out = expert_ids.shape[-1], x.shape[-1], lora_B.shape[0]
    lead = expert_ids.shape[:-1]
    T = math.prod(lead)
    ids = expert_ids.reshape(T, k)
    E = rank_offsets.shape[0] - 1
    if max_rank is None:
        ro = rank_offsets.tolist()
        max_rank = max(b - a for a, b in zip(ro[:-1], ro[1:]))
    x2 = x.reshape(T * k if x_per_slot else T, d_in)
    b2 = None if base is None else base.reshape(T, d_out)
    if weight is not None:
        b2 = F.linear(x2, weight, bias)
    elif bias is not None:
        b2 = (bias if b2 is None else b2 + bias).expand(T, d_out)
    order, pos, eo = dispatch(ids, E, 1)
    pos_in = pos.reshape(-1, 1) if x_per_slot else pos
    h = sgmv_shrink(x2, lora_A, rank_offsets, order, pos_in, eo, None, None, max_rank=max_rank)
    w = None if routing_weights is None else routing_weights.reshape(T, k)
    y = sgmv_expand(h, lora_B, rank_offsets, order, pos, eo, w, scales, b2)
    return y.reshape(*lead, d_out)


def routed_moe_lora_linear(x, router_weight, lora_A, lora_B, rank_offsets, top_k, scales=None, *,
                           router_bias=None, renormalize=True, base=None, weight=None, bias=None,
                           algo="auto", max_rank=None):
    """The oracle of ``molora_ops.functional.routed_moe_lora_linear`` (same arguments): the
    router's logits, the reference softmax_topk, then ``moe_lora_linear`` above. Returns the
    tuple (y, router_logits, routing_weights, expert_ids)."""
    lead = x.shape[:-1]
    logits = F.linear(x, router_weight, router_bias)
    w, ids = softmax_topk(logits.reshape(-1, logits.shape[-1]), top_k, renormalize)
    w, ids = w.reshape(*lead, top_k), ids.reshape(*lead, top_k)
    y = moe_lora_linear(x, lora_A, lora_B, rank_offsets, w, ids, scales, base=base, weight=weight,
                        bias=bias, algo=algo, max_rank=max_rank)
    return y, logits, w, ids


def routed_moe_lora(x, router_weight, router_bias, lora_A, lora_B, rank_offsets, scales, base,
                    weight, bias, top_k, renormalize, max_rank):
    """The oracle of op ``routed_moe_lora``: the reference router, dispatch, shrink and expand in
    turn, the frozen layer (``base``, or ``x weight^T``, plus ``bias``) added. Returns (y, logits,
    weights, ids, h, order, pos, expert_offsets)."""
    logits = F.linear(x, router_weight, router_bias)
    w, ids = softmax_topk(logits, top_k, renormalize)
    order, pos, eo = dispatch(ids, rank_offsets.shape[0] - 1, 1)
    h = sgmv_shrink(x, lora_A, rank_offsets, order, pos, eo, None, None, max_rank=max_rank)
    y = sgmv_expand(h, lora_B, rank_offsets, order, pos, eo, w, scales, base)
    if weight is not None:
        y = y + F.linear(x, weight)
    if bias is not None:
        y = y + bias
    return y, logits, w, ids, h, order, pos, eo
