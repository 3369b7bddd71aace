"""Shape, dtype and device checks of every op, on metadata only (they also run on fake tensors).

Used by the fake (meta) kernels, so ``torch.compile`` reports bad input at trace time, and by the
reference fallback path. The C++ entry points make the same checks (plus value-range checks) with
the same exception classes: ValueError (shapes, options), TypeError (dtypes), IndexError (values).
"""

from __future__ import annotations

import torch

from .reference._common import opmath_dtype  # noqa: F401  (one definition)

_INDEX_DTYPES = (torch.int32, torch.int64)




def _fail(exc, op, msg):
    raise exc(f"molora.{op}: {msg}")


def dim(op, name, t, n):
    if t.dim() != n:
        _fail(ValueError, op, f"{name} must be {n}-D, got shape {tuple(t.shape)}")


def size(op, name, t, d, expected):
    if t.shape[d] != expected:
        _fail(ValueError, op, f"{name}.shape[{d}] must be {expected}, got shape {tuple(t.shape)}")


def floating(op, name, t):
    if not t.dtype.is_floating_point:
        _fail(TypeError, op, f"{name} must be a floating tensor, got {t.dtype}")


def index(op, name, t):
    if t.dtype not in _INDEX_DTYPES:
        _fail(TypeError, op, f"{name} must be int32 or int64, got {t.dtype}")


def same_dtype(op, name, t, ref_name, ref):
    if t.dtype != ref.dtype:
        _fail(TypeError, op, f"{name} dtype {t.dtype} must match {ref_name} dtype {ref.dtype}")


def device(op, name, t, ref):
    if t.device != ref.device:
        _fail(ValueError, op, f"{name} is on {t.device} but the first input is on {ref.device}")


def value(op, cond, msg):
    if not cond:
        _fail(ValueError, op, msg)


# --- per-family checks ---------------------------------------------------------------------------

def logits(op, lg):
    floating(op, "logits", lg)
    dim(op, "logits", lg, 2)
    value(op, lg.shape[1] >= 1, "logits must have at least one expert column")
    return lg.shape[1]


def topk_k(op, k, n, what="E"):
    value(op, 1 <= k <= n, f"k must be in [1, {what}] = [1, {n}], got {k}")


def vector(op, name, t, n, ref):
    """An optional float vector of length n (selection bias, per-expert scales)."""
    if t is None:
        return
    floating(op, name, t)
    device(op, name, t, ref)
    value(op, t.dim() == 1 and t.shape[0] == n, f"{name} must have shape ({n},), got {tuple(t.shape)}")


def route_grad(op, grad_weights, weights, ids, lg):
    logits(op, lg)
    floating(op, "grad_weights", grad_weights)
    floating(op, "weights", weights)
    index(op, "ids", ids)
    dim(op, "ids", ids, 2)
    size(op, "ids", ids, 0, lg.shape[0])
    value(op, weights.shape == ids.shape and grad_weights.shape == ids.shape,
          "grad_weights, weights and ids must share one shape (T, k)")
    for name, t in (("grad_weights", grad_weights), ("weights", weights), ("ids", ids)):
        device(op, name, t, lg)


def dispatch_meta(op, order, pos, expert_offsets, ref, num_tokens=None):
    for name, t, n in (("order", order, 1), ("pos", pos, 2), ("expert_offsets", expert_offsets, 1)):
        index(op, name, t)
        dim(op, name, t, n)
        device(op, name, t, ref)
    value(op, expert_offsets.shape[0] >= 2, "expert_offsets must have E+1 >= 2 entries")
    if num_tokens is not None:
        size(op, "pos", pos, 0, num_tokens)
    value(op, order.shape[0] >= pos.numel(),
          f"order has {order.shape[0]} rows but pos has {pos.numel()} pairs")
    return expert_offsets.shape[0] - 1


def pair_weights(op, weights, pos, ref):
    if weights is None:
        return
    floating(op, "weights", weights)
    device(op, "weights", weights, ref)
    value(op, weights.shape == pos.shape,
          f"weights must have shape {tuple(pos.shape)} (T, k), got {tuple(weights.shape)}")


def base(op, b, rows, cols, ref):
    if b is None:
        return
    same_dtype(op, "base", b, "the data", ref)
    device(op, "base", b, ref)
    value(op, b.dim() == 2 and tuple(b.shape) == (rows, cols),
          f"base must have shape ({rows}, {cols}), got {tuple(b.shape)}")


def bank(op, name, t, data_name, data):
    dim(op, name, t, 2)
    same_dtype(op, name, t, data_name, data)
    device(op, name, t, data)


def rank_offsets(op, ro, num_experts, ref):
    index(op, "rank_offsets", ro)
    dim(op, "rank_offsets", ro, 1)
    device(op, "rank_offsets", ro, ref)
    value(op, ro.shape[0] == num_experts + 1,
          f"rank_offsets must have E+1 = {num_experts + 1} entries, got {ro.shape[0]}")


def grouped(op, data, num_tokens, ro, order, pos, expert_offsets, weights, scales):
    """Checks shared by sgmv_shrink / sgmv_expand / sgmv_weight_grad; returns E."""
    E = dispatch_meta(op, order, pos, expert_offsets, data, num_tokens)
    rank_offsets(op, ro, E, data)
    pair_weights(op, weights, pos, data)
    vector(op, "scales", scales, E, data)
    return E


def gated(op, x, A, B, gate, ro, scales, shared_a):
    floating(op, "x", x)
    dim(op, "x", x, 2)
    bank(op, "A", A, "x", x)
    bank(op, "B", B, "x", x)
    floating(op, "gate", gate)
    dim(op, "gate", gate, 2)
    device(op, "gate", gate, x)
    size(op, "A", A, 1, x.shape[1])
    size(op, "gate", gate, 0, x.shape[0])
    E, R = gate.shape[1], B.shape[1]
    value(op, E >= 1, "gate must have at least one expert column")
    rank_offsets(op, ro, E, x)
    vector(op, "scales", scales, E, x)
    if shared_a:
        value(op, R == E * A.shape[0],
              f"with shared_a, B must have E * r = {E * A.shape[0]} columns (r = A.shape[0]), got {R}")
    else:
        size(op, "A", A, 0, R)


def rank_ids(op, ids, T, ref):
    index(op, "ids", ids)
    dim(op, "ids", ids, 2)
    size(op, "ids", ids, 0, T)
    device(op, "ids", ids, ref)
