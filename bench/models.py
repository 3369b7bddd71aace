"""Byte and FLOP models, one per op: the work every implementation of the op must do.

FLOPs count 2 per multiply-add of the matmuls (routing / scaling arithmetic of the matmul ops is
left out: it is under 1/r of the total); routing and data-movement ops count their elementwise
arithmetic as written in each model. Bytes are compulsory traffic: each input read once, each
output written once, in the tensors' dtypes. Conventions shared by every model:

* data elements take ``elem`` bytes (the run's dtype), index tensors 4 (int32), routing weights
  and scales 4 (fp32);
* a tensor read through ``order`` / ``pos`` (x in a shrink, grad y in an expand backward, y_perm in
  a combine) costs one row per dispatched pair: P = T*k rows, not T;
* LoRA factors are read only for active experts (``active`` = experts with >= 1 routed pair;
  for the rank-wise ops, distinct rank columns used), but their gradients are written whole;
* composite layers count only their inputs, parameters and outputs (the floor of a fully fused
  layer); routing intermediates, h and the base output are not counted;
* backward models count the gradients each op's contract lists (docs/OPS.md), with the minimal
  FLOPs (a forward intermediate recomputed only when the backward needs it and it is not an input).

``fwd+bwd`` is the sum of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

IDX = 4  # int32 index element
WGT = 4  # fp32 routing weight / scale element

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    """T tokens, d_in -> d_out, E experts, top-k, rank r per expert. P = T*k dispatched pairs,
    R = E*r total rank."""

    T: int
    d_in: int
    d_out: int
    E: int
    k: int
    r: int

    @property
    def P(self) -> int:
        return self.T * self.k

    @property
    def R(self) -> int:
        return self.E * self.r


@dataclass(frozen=True)
class Dims(Shape):
    """The sizes a model needs: the shape, the data element size, the active experts."""

    elem: int = 4
    active: Optional[int] = None  # active experts (rank ops: distinct columns); None = all
    weighted: bool = True  # gather / combine: routing weights read (False: gather_rows(..., None))

    @property
    def E_act(self) -> int:
        return self.E if self.active is None else self.active


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    @property
    def intensity(self) -> float:
        """FLOP per byte (0 for pure data movement)."""
        return self.flops / self.bytes if self.bytes else 0.0


Model = Callable[[Dims], Dict[str, Cost]]
MODELS: Dict[str, Model] = {}


def model(fn: Model) -> Model:
    MODELS[fn.__name__] = fn
    return fn


def cost(op: str, dims: Dims, mode: str) -> Cost:
    """Cost of `op` at `dims` for a mode in MODES."""
    both = MODELS[op](dims)
    if mode == "fwd+bwd":
        return both["fwd"] + both["bwd"]
    return both[mode]


@model
def softmax_topk(d: Dims) -> Dict[str, Cost]:
    """logits [T,E] -> weights [T,k] fp32, ids [T,k].
    fwd: 4 FLOPs per logit (max, subtract, exp, sum) + 2 per kept weight (divide, renormalise).
    bwd (renormalised softmax over the kept logits): dlogits[t, ids_j] = w_j (g_j - sum_l g_l w_l),
    4 FLOPs per kept weight; reads grad_w, w, ids, writes dlogits [T,E]."""
    T, E, k, b = d.T, d.E, d.k, d.elem
    fwd = Cost(4 * T * E + 2 * T * k, T * E * b + T * k * (WGT + IDX))
    bwd = Cost(4 * T * k, T * k * (2 * WGT + IDX) + T * E * b)
    return {"fwd": fwd, "bwd": bwd}


@model
def dispatch(d: Dims) -> Dict[str, Cost]:
    """ids [T,k] -> order [P], pos [T,k], expert_offsets [E+1]; integer only, no backward."""
    fwd = Cost(0, d.T * d.k * IDX + d.P * IDX + d.T * d.k * IDX + (d.E + 1) * IDX)
    return {"fwd": fwd, "bwd": Cost(0, 0)}


@model
def gather_rows(d: Dims) -> Dict[str, Cost]:
    """x [T,d_in], weights [T,k] -> x_perm [P,d_in] = w * x[order // k].
    fwd: 1 multiply per element; reads P rows of x, order, weights; writes x_perm.
    bwd: dx[t] = sum_j w gx_perm[pos[t,j]] and dw[p] = dot(x[t], gx_perm[i]): 4 FLOPs per element;
    reads gx_perm, P rows of x, pos, weights; writes dx, dw."""
    P, T, n, b = d.P, d.T, d.d_in, d.elem
    w = P * WGT if d.weighted else 0
    fwd = Cost(P * n if d.weighted else 0, P * n * b + P * IDX + w + P * n * b)
    bwd = Cost(4 * P * n, P * n * b + P * n * b + T * d.k * IDX + P * WGT + T * n * b + P * WGT)
    return {"fwd": fwd, "bwd": bwd}


@model
def combine_rows(d: Dims) -> Dict[str, Cost]:
    """y_perm [P,d_out], weights [T,k] -> y [T,d_out] = sum_j w y_perm[pos[t,j]].
    fwd: 2 FLOPs per pair element; reads y_perm, pos, weights; writes y.
    bwd: dy_perm[i] = w gy[t] (1 FLOP) and dw = dot(gy[t], y_perm[i]) (2 FLOPs); reads P rows of gy,
    y_perm, order, weights; writes dy_perm, dw."""
    P, T, n, b = d.P, d.T, d.d_out, d.elem
    w = P * WGT if d.weighted else 0
    fwd = Cost(2 * P * n, P * n * b + T * d.k * IDX + w + T * n * b)
    bwd = Cost(3 * P * n, P * n * b + P * n * b + P * IDX + P * WGT + P * n * b + P * WGT)
    return {"fwd": fwd, "bwd": bwd}


@model
def sgmv_shrink(d: Dims) -> Dict[str, Cost]:
    """x [T,d_in], A [R,d_in] -> h [P,r] (no weights / scales, as in the layer).
    fwd: 2*P*r*d_in; reads P rows of x, active A_e, order, rank and expert offsets; writes h.
    bwd: dx = sum_j A_e^T gh and dA = gh^T x per expert: 4*P*r*d_in; reads gh, active A_e, P rows
    of x, order, pos, offsets; writes dx [T,d_in] and all of dA [R,d_in]."""
    P, T, n, r, b = d.P, d.T, d.d_in, d.r, d.elem
    offsets = 2 * (d.E + 1) * IDX
    fwd = Cost(2 * P * r * n, P * n * b + d.E_act * r * n * b + P * IDX + offsets + P * r * b)
    bwd = Cost(4 * P * r * n, P * r * b + d.E_act * r * n * b + P * n * b + P * IDX
               + T * d.k * IDX + offsets + T * n * b + d.R * n * b)
    return {"fwd": fwd, "bwd": bwd}


@model
def sgmv_expand(d: Dims) -> Dict[str, Cost]:
    """h [P,r], B [d_out,R], weights [T,k], scales [E], base [T,d_out] -> y [T,d_out].
    fwd: 2*P*r*d_out; reads h, active B_e, pos, offsets, weights, scales, base; writes y.
    bwd: u = B_e^T gy per row (dh = c u, dw = dot(h, u)) and dB = gy^T (c h): 4*P*r*d_out; reads P
    rows of gy, h, active B_e, order, pos, offsets, weights, scales; writes dh, all of dB, dw."""
    P, T, n, r, b = d.P, d.T, d.d_out, d.r, d.elem
    offsets = 2 * (d.E + 1) * IDX
    fwd = Cost(2 * P * r * n, P * r * b + d.E_act * r * n * b + T * d.k * IDX + offsets
               + P * WGT + d.E * WGT + T * n * b + T * n * b)
    bwd = Cost(4 * P * r * n, P * n * b + P * r * b + d.E_act * r * n * b + P * IDX
               + T * d.k * IDX + offsets + P * WGT + d.E * WGT
               + P * r * b + d.R * n * b + P * WGT)
    return {"fwd": fwd, "bwd": bwd}


@model
def stacked_gated_lora(d: Dims) -> Dict[str, Cost]:
    """x [T,d_in], A [R,d_in], B [d_out,R], gate [T,E] (data dtype), scales, base -> y [T,d_out],
    dense over all E experts: fwd 2*T*R*(d_in + d_out).
    bwd: u = x A_e^T (recomputed), z = gy B_e, dx = (g z) A_e, dA = (g z)^T x, dB = gy^T (g u):
    2*T*R*(3*d_in + 2*d_out); reads gy, x, A, B, gate, offsets, scales; writes dx, dA, dB, dgate."""
    T, R, di, do, E, b = d.T, d.R, d.d_in, d.d_out, d.E, d.elem
    small = (E + 1) * IDX + E * WGT
    fwd = Cost(2 * T * R * (di + do), T * di * b + R * di * b + do * R * b + T * E * b + small
               + T * do * b + T * do * b)
    bwd = Cost(2 * T * R * (3 * di + 2 * do), T * do * b + T * di * b + R * di * b + do * R * b
               + T * E * b + small + T * di * b + R * di * b + do * R * b + T * E * b)
    return {"fwd": fwd, "bwd": bwd}


@model
def rank_topk(d: Dims) -> Dict[str, Cost]:
    """h [T,R] -> values [T,k], ids [T,k] (comparisons only: 0 FLOPs).
    bwd: dh = scatter of grad values (reads them and ids, writes dh [T,R])."""
    T, R, k, b = d.T, d.R, d.k, d.elem
    fwd = Cost(0, T * R * b + T * k * b + T * k * IDX)
    bwd = Cost(0, T * k * b + T * k * IDX + T * R * b)
    return {"fwd": fwd, "bwd": bwd}


@model
def rank_sparse_expand(d: Dims) -> Dict[str, Cost]:
    """values [T,k], ids [T,k], B [d_out,R], weights [T,k], base -> y [T,d_out]; reads only the
    `active` distinct columns of B. fwd 2*T*k*d_out.
    bwd: dvalues (dot of gy with a column) and dB (rank-1 update per kept id): 4*T*k*d_out; reads
    gy, values, ids, weights, active columns; writes dvalues, all of dB, dweights."""
    T, k, n, b = d.T, d.k, d.d_out, d.elem
    cols = d.E_act * n * b
    per_slot = T * k * (b + IDX + WGT)
    fwd = Cost(2 * T * k * n, per_slot + cols + T * n * b + T * n * b)
    bwd = Cost(4 * T * k * n, T * n * b + per_slot + cols + T * k * b + n * d.R * b + T * k * WGT)
    return {"fwd": fwd, "bwd": bwd}


@model
def linear(d: Dims) -> Dict[str, Cost]:
    """The frozen base layer y = x W0^T, W0 [d_out,d_in]: 2*T*d_in*d_out each way; backward is dx
    only (W0 frozen)."""
    T, di, do, b = d.T, d.d_in, d.d_out, d.elem
    one = Cost(2 * T * di * do, (T * di + do * di + T * do) * b)
    return {"fwd": one, "bwd": one}


@model
def moe_lora(d: Dims) -> Dict[str, Cost]:
    """The MoE-LoRA linear layer y = x W0^T + sum_j w_j s_e B_e A_e x over the top-k experts of
    softmax(x Wg^T + bg): base + router + shrink + expand.
    fwd: 2*T*d_in*(d_out + E) + 2*P*r*(d_in + d_out); reads x, W0, Wg, bg, active A_e / B_e;
    writes y. bwd (dx, dWg, dA, dB; W0 frozen): 2*T*d_in*d_out + 4*T*d_in*E + 4*P*r*(d_in + d_out);
    reads gy, x, W0, Wg, active A_e / B_e; writes dx, dWg, all of dA and dB."""
    T, P, di, do, E, r, b = d.T, d.P, d.d_in, d.d_out, d.E, d.r, d.elem
    lora = d.E_act * r * (di + do) * b
    fwd = Cost(2 * T * di * (do + E) + 2 * P * r * (di + do),
               T * di * b + do * di * b + E * di * b + E * b + lora + T * do * b)
    bwd = Cost(2 * T * di * do + 4 * T * di * E + 4 * P * r * (di + do),
               T * do * b + T * di * b + do * di * b + E * di * b + lora
               + T * di * b + E * di * b + d.R * (di + do) * b)
    return {"fwd": fwd, "bwd": bwd}
