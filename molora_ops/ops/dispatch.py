"""Family 2, token dispatch: routing ids -> expert-ordered layout (order, pos, expert_offsets), the
row gather into that layout and the weighted combine back to tokens."""

from __future__ import annotations

import torch

from .. import _checks, reference
from ._registry import call, define, native

# --- checks + fakes ------------------------------------------------------------------------------


def _check_dispatch(ids, num_experts, block_size):
    op = "dispatch"
    _checks.index(op, "ids", ids)
    _checks.dim(op, "ids", ids, 2)
    _checks.value(op, num_experts >= 1, f"num_experts must be >= 1, got {num_experts}")
    _checks.value(op, block_size >= 1, f"block_size must be >= 1, got {block_size}")
    _checks.value(op, num_experts <= 2**31 - 2, f"num_experts must be < 2^31 - 1, got {num_experts}")
    rows = ids.numel() + (num_experts * (block_size - 1) if block_size > 1 else 0)
    _checks.value(op, rows <= 2**31 - 1,
                  f"T*k + E*(block_size-1) = {rows} dispatched rows do not fit the int32 layout")


def _check_rows(op, data, data_name, data_rows, order, pos, weights):
    _checks.floating(op, data_name, data)
    _checks.dim(op, data_name, data, 2)
    for name, t, n in (("order", order, 1), ("pos", pos, 2)):
        _checks.index(op, name, t)
        _checks.dim(op, name, t, n)
        _checks.device(op, name, t, data)
    _checks.size(op, data_name, data, 0, data_rows(order, pos))
    _checks.pair_weights(op, weights, pos, data)


def _check_gather_rows(x, order, pos, weights):
    _check_rows("gather_rows", x, "x", lambda o, p: p.shape[0], order, pos, weights)


def _check_combine_rows(y_perm, order, pos, weights):
    _check_rows("combine_rows", y_perm, "y_perm", lambda o, p: o.shape[0], order, pos, weights)


def _check_pair_dot(a, b, pos, a_by_token):
    op = "pair_dot"
    _checks.floating(op, "a", a)
    _checks.same_dtype(op, "b", b, "a", a)
    _checks.dim(op, "a", a, 2)
    _checks.dim(op, "b", b, 2)
    _checks.index(op, "pos", pos)
    _checks.dim(op, "pos", pos, 2)
    _checks.device(op, "b", b, a)
    _checks.device(op, "pos", pos, a)
    _checks.size(op, "b", b, 1, a.shape[1])
    _checks.size(op, "a", a, 0, pos.shape[0] if a_by_token else b.shape[0])


def _fake_dispatch(ids, num_experts, block_size):
    n_pairs = ids.numel()
    P = n_pairs if block_size == 1 else n_pairs + num_experts * (block_size - 1)
    return (ids.new_empty((P,), dtype=torch.int32), ids.new_empty(ids.shape, dtype=torch.int32),
            ids.new_empty((num_experts + 1,), dtype=torch.int32))


def _fake_gather_rows(x, order, pos, weights):
    return x.new_empty((order.shape[0], x.shape[1]))


def _fake_combine_rows(y_perm, order, pos, weights):
    return y_perm.new_empty((pos.shape[0], y_perm.shape[1]))


def _fake_pair_dot(a, b, pos, a_by_token):
    return a.new_empty(pos.shape, dtype=_checks.opmath_dtype(a.dtype))


# --- autograd ------------------------------------------------------------------------------------
# gather and combine are each other's transpose; the routing-weight gradient is a per-pair dot.


def _save_rows(ctx, inputs, output):
    data, order, pos, weights = inputs
    ctx.save_for_backward(data, order, pos, weights)


def _gather_rows_backward(ctx, grad_x_perm):
    x, order, pos, weights = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = native("combine_rows")(grad_x_perm, order, pos, weights)
    if weights is not None and ctx.needs_input_grad[3]:
        grad_w = native("pair_dot")(x, grad_x_perm.to(x.dtype), pos, True).to(weights.dtype)
    return grad_x, None, None, grad_w


def _combine_rows_backward(ctx, grad_y):
    y_perm, order, pos, weights = ctx.saved_tensors
    grad_y_perm = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_y_perm = native("gather_rows")(grad_y, order, pos, weights)
    if weights is not None and ctx.needs_input_grad[3]:
        grad_w = native("pair_dot")(grad_y.to(y_perm.dtype), y_perm, pos, True).to(weights.dtype)
    return grad_y_perm, None, None, grad_w


def _pair_dot_values(a, b, pos, a_by_token):
    _checks.pair_dot_values("pair_dot", a, b, pos, a_by_token)


define("dispatch(Tensor ids, int num_experts, int block_size) -> "
       "(Tensor order, Tensor pos, Tensor expert_offsets)",
       check=_check_dispatch, fake=_fake_dispatch, reference=reference.dispatch)
define("gather_rows(Tensor x, Tensor order, Tensor pos, Tensor? weights) -> Tensor",
       check=_check_gather_rows, fake=_fake_gather_rows, reference=reference.gather_rows,
       backward=_gather_rows_backward, setup_context=_save_rows)
define("combine_rows(Tensor y_perm, Tensor order, Tensor pos, Tensor? weights) -> Tensor",
       check=_check_combine_rows, fake=_fake_combine_rows, reference=reference.combine_rows,
       backward=_combine_rows_backward, setup_context=_save_rows)
define("pair_dot(Tensor a, Tensor b, Tensor pos, bool a_by_token) -> Tensor",
       check=_check_pair_dot, fake=_fake_pair_dot, reference=reference.pair_dot,
       values=_pair_dot_values, triton="sgmv:pair_dot", kind="backward")


# --- wrappers ------------------------------------------------------------------------------------


def dispatch(ids: torch.Tensor, num_experts: int, block_size: int = 1):
    """Groups the (token, slot) pairs by expert: histogram + exclusive scan + stable scatter.

    Args:
        ids: [T, k] int32/int64 expert ids in [-1, E); -1 drops the pair (ragged k). For
            multi-tenant serving pass the adapter id of each token as ``ids[:, None]``.
        num_experts: E.
        block_size: pad every expert's segment to a multiple of this (tile consumers).
    Returns:
        order [P] int32: flat pair index ``t*k + j`` per row of the expert-ordered layout
            (-1 = padding), P = T*k (+ E*(block_size-1) when padding);
        pos [T, k] int32: the row of each pair (-1 when dropped);
        expert_offsets [E+1] int32: segment starts. All sizes are fixed (no host sync needed).
    """
    return call("dispatch", ids, num_experts, block_size)


def gather_rows(x: torch.Tensor, order: torch.Tensor, pos: torch.Tensor,
                weights: torch.Tensor | None = None):
    """``x_perm[i] = w[p] * x[p // k]`` with ``p = order[i]`` (0 on padding rows).

    Args: x [T, d] float; (order, pos) from ``dispatch``; weights [T, k] float or None.
    Returns: x_perm [P, d] with x's dtype. Differentiable w.r.t. x and weights.
    """
    return call("gather_rows", x, order, pos, weights)


def combine_rows(y_perm: torch.Tensor, order: torch.Tensor, pos: torch.Tensor,
                 weights: torch.Tensor | None = None):
    """``y[t] = sum_j w[t, j] * y_perm[pos[t, j]]`` over the kept slots (token-owned, deterministic).

    Args: y_perm [P, d] float; (order, pos) from ``dispatch``; weights [T, k] float or None.
    Returns: y [T, d] with y_perm's dtype. Differentiable w.r.t. y_perm and weights.
    """
    return call("combine_rows", y_perm, order, pos,
                weights)


def pair_dot(a: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, a_by_token: bool):
    """``out[t, j] = dot(a[t if a_by_token else pos[t, j]], b[pos[t, j]])`` (0 where pos == -1).

    The routing-weight gradient of gather/combine/expand. Returns [T, k] in fp32 (fp64 for fp64).
    """
    return call("pair_dot", a, b, pos, a_by_token)



