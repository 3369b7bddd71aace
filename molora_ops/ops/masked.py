"""Family 4, rank-wise masked activation (SMoRA, FlyLoRA, MoRA): top-k over the ranks of each
token, gathered-row shrink, expand from the kept columns only, and the rank-usage histogram."""

from __future__ import annotations

import torch

from .. import _checks, reference
from ._registry import call, define, native, opmath

# --- checks + fakes ------------------------------------------------------------------------------


def _check_rank_topk(h, k, scores, bias, use_abs):
    op = "rank_topk"
    _checks.floating(op, "h", h)
    _checks.dim(op, "h", h, 2)
    _checks.topk_k(op, k, h.shape[1], what="R")
    if scores is not None:
        _checks.floating(op, "scores", scores)
        _checks.device(op, "scores", scores, h)
        _checks.value(op, scores.shape == h.shape,
                      f"scores must have the shape of h {tuple(h.shape)}, got {tuple(scores.shape)}")
    _checks.vector(op, "bias", bias, h.shape[1], h)


def _check_rank_sparse_shrink(x, A, ids):
    op = "rank_sparse_shrink"
    _checks.floating(op, "x", x)
    _checks.dim(op, "x", x, 2)
    _checks.bank(op, "A", A, "x", x)
    _checks.size(op, "A", A, 1, x.shape[1])
    _checks.rank_ids(op, ids, x.shape[0], x)


def _check_rank_sparse_expand(values, ids, B, weights, scale, base):
    op = "rank_sparse_expand"
    _checks.floating(op, "values", values)
    _checks.dim(op, "values", values, 2)
    _checks.bank(op, "B", B, "values", values)
    _checks.rank_ids(op, ids, values.shape[0], values)
    _checks.value(op, ids.shape == values.shape,
                  f"ids must have the shape of values {tuple(values.shape)}, got {tuple(ids.shape)}")
    _checks.pair_weights(op, weights, ids, values)
    _checks.base(op, base, values.shape[0], B.shape[0], values)


def _check_id_histogram(ids, num_bins):
    _checks.index("id_histogram", "ids", ids)
    _checks.value("id_histogram", num_bins >= 1, f"num_bins must be >= 1, got {num_bins}")


def _check_rank_scatter(src, ids, num_ranks):
    op = "rank_scatter"
    _checks.floating(op, "src", src)
    _checks.dim(op, "src", src, 2)
    _checks.value(op, num_ranks >= 1, f"num_ranks must be >= 1, got {num_ranks}")
    _checks.rank_ids(op, ids, src.shape[0], src)
    _checks.value(op, ids.shape == src.shape,
                  f"ids must have the shape of src {tuple(src.shape)}, got {tuple(ids.shape)}")


def _check_rank_sparse_weight_grad(x, g, ids, num_ranks):
    op = "rank_sparse_weight_grad"
    _checks.floating(op, "x", x)
    _checks.dim(op, "x", x, 2)
    _checks.floating(op, "g", g)
    _checks.dim(op, "g", g, 2)
    _checks.device(op, "g", g, x)
    _checks.value(op, num_ranks >= 1, f"num_ranks must be >= 1, got {num_ranks}")
    _checks.size(op, "g", g, 0, x.shape[0])
    _checks.rank_ids(op, ids, x.shape[0], x)
    _checks.value(op, ids.shape == g.shape,
                  f"ids must have the shape of g {tuple(g.shape)}, got {tuple(ids.shape)}")


def _fake_rank_topk(h, k, scores, bias, use_abs):
    return h.new_empty((h.shape[0], k)), h.new_empty((h.shape[0], k), dtype=torch.int32)


def _fake_rank_sparse_shrink(x, A, ids):
    return x.new_empty(ids.shape)


def _fake_rank_sparse_expand(values, ids, B, weights, scale, base):
    return values.new_empty((values.shape[0], B.shape[0]))


def _fake_id_histogram(ids, num_bins):
    return ids.new_empty((num_bins,), dtype=torch.int32)


def _fake_rank_scatter(src, ids, num_ranks):
    return src.new_empty((src.shape[0], num_ranks))


def _fake_rank_sparse_weight_grad(x, g, ids, num_ranks):
    return x.new_empty((num_ranks, x.shape[1]))


# --- autograd ------------------------------------------------------------------------------------


def _save_rank_topk(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.num_ranks = inputs[0].shape[1]


def _rank_topk_backward(ctx, grad_values, _grad_ids):
    (ids,) = ctx.saved_tensors
    return native("rank_scatter")(grad_values, ids, ctx.num_ranks), None, None, None, None


def _save_sparse_shrink(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rank_sparse_shrink_backward(ctx, grad_h):
    x, A, ids = ctx.saved_tensors
    grad_x = grad_A = None
    if ctx.needs_input_grad[0]:
        grad_x = native("rank_sparse_expand")(grad_h, ids, A.t(), None, 1.0, None)
    if ctx.needs_input_grad[1]:
        grad_A = native("rank_sparse_weight_grad")(x, grad_h, ids, A.shape[0])
    return grad_x, grad_A, None


def _save_sparse_expand(ctx, inputs, output):
    values, ids, B, weights, scale, _base = inputs
    ctx.save_for_backward(values, ids, B, weights)
    ctx.scale = scale


def _rank_sparse_expand_backward(ctx, grad_y):
    values, ids, B, weights = ctx.saved_tensors
    acc = _checks.opmath_dtype(values.dtype)
    w = weights.to(acc) if weights is not None else None
    grad_v = grad_B = grad_w = None
    # u[t, j] = dot(B[:, ids[t, j]], dy[t]), the shared factor of the values / weights grads, in
    # opmath (rounding u to bf16 first costs ~1e-2 on those grads).
    grad_y_acc, B_acc = opmath(grad_y, B)
    u = native("rank_sparse_shrink")(grad_y_acc, B_acc.t(), ids) * ctx.scale
    if ctx.needs_input_grad[0]:
        grad_v = (u if w is None else u * w).to(values.dtype)
    if weights is not None and ctx.needs_input_grad[3]:
        grad_w = (u * values.to(acc)).to(weights.dtype)
    if ctx.needs_input_grad[2]:
        coef = values.to(acc) * ctx.scale
        if w is not None:
            coef = coef * w
        grad_B = native("rank_sparse_weight_grad")(grad_y, coef, ids, B.shape[1]).t()
    grad_base = grad_y if ctx.needs_input_grad[5] else None
    return grad_v, None, grad_B, grad_w, None, grad_base


def _ids_values(op, ids_at, bound):
    """The value check of an op whose ``args[ids_at]`` are rank ids in [-1, bound(args))."""
    return lambda *args: _checks.ids_in_range(op, "ids", args[ids_at], -1, bound(args))


define("rank_topk(Tensor h, int k, Tensor? scores, Tensor? bias, bool use_abs) -> "
       "(Tensor values, Tensor ids)",
       check=_check_rank_topk, fake=_fake_rank_topk, reference=reference.rank_topk,
       backward=_rank_topk_backward, setup_context=_save_rank_topk)
define("rank_sparse_shrink(Tensor x, Tensor A, Tensor ids) -> Tensor",
       values=_ids_values("rank_sparse_shrink", 2, lambda a: a[1].shape[0]),
       check=_check_rank_sparse_shrink, fake=_fake_rank_sparse_shrink,
       reference=reference.rank_sparse_shrink, triton="masked:rank_sparse_shrink",
       backward=_rank_sparse_shrink_backward, setup_context=_save_sparse_shrink,
       autocast=("x", "A"))
define("rank_sparse_expand(Tensor values, Tensor ids, Tensor B, Tensor? weights, "
       "float scale, Tensor? base) -> Tensor",
       values=_ids_values("rank_sparse_expand", 1, lambda a: a[2].shape[1]),
       check=_check_rank_sparse_expand, fake=_fake_rank_sparse_expand,
       reference=reference.rank_sparse_expand, triton="masked:rank_sparse_expand",
       backward=_rank_sparse_expand_backward, setup_context=_save_sparse_expand,
       autocast=("values", "B", "base"))
define("id_histogram(Tensor ids, int num_bins) -> Tensor",
       check=_check_id_histogram, fake=_fake_id_histogram, reference=reference.id_histogram)
define("rank_scatter(Tensor src, Tensor ids, int num_ranks) -> Tensor",
       values=_ids_values("rank_scatter", 1, lambda a: a[2]),
       check=_check_rank_scatter, fake=_fake_rank_scatter,
       reference=reference.rank_scatter, triton="masked:rank_scatter", kind="backward")
define("rank_sparse_weight_grad(Tensor x, Tensor g, Tensor ids, int num_ranks) -> Tensor",
       values=_ids_values("rank_sparse_weight_grad", 2, lambda a: a[3]),
       check=_check_rank_sparse_weight_grad, fake=_fake_rank_sparse_weight_grad,
       reference=reference.rank_sparse_weight_grad,
       triton="masked:rank_sparse_weight_grad", kind="backward",
       autocast=("x", "g"))


# --- wrappers ------------------------------------------------------------------------------------


def rank_topk(h: torch.Tensor, k: int, scores: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, use_abs: bool = False):
    """Keeps the top-k ranks of every token.

    key = ``(scores if given else h) + bias``, then ``abs`` if ``use_abs``; ids = top-k of the key
    (descending, ties toward the lower rank). FlyLoRA: ``rank_topk(h, k, bias=d)`` (|.| in its
    minimal code: ``use_abs=True``); SMoRA: ``scores`` = router scores.

    Args: h [T, R] float; k in [1, R]; scores [T, R] any float dtype, or None; bias [R] float or None.
    Returns: values [T, k] = h[t, ids] (h's dtype; differentiable w.r.t. h), ids [T, k] int32.
    """
    return call("rank_topk", h, k, scores, bias, use_abs)


def rank_sparse_shrink(x: torch.Tensor, A: torch.Tensor, ids: torch.Tensor):
    """Gathered-row shrink ``h[t, j] = dot(A[ids[t, j]], x[t])`` (0 where ids == -1).

    Args: x [T, d_in] float; A [R, d_in] x's dtype; ids [T, k] int in [-1, R).
    Returns: h [T, k] with x's dtype. Differentiable w.r.t. x and A.
    """
    return call("rank_sparse_shrink", x, A, ids)


def rank_sparse_expand(values: torch.Tensor, ids: torch.Tensor, B: torch.Tensor,
                       weights: torch.Tensor | None = None, scale: float = 1.0,
                       base: torch.Tensor | None = None):
    """Kept-column expand ``y[t] = base[t] + scale * sum_j w[t,j] * values[t,j] * B[:, ids[t,j]]``.

    Reads only the k kept columns of B per token. Args: values [T, k] float; ids [T, k] int in
    [-1, R); B [d_out, R] values' dtype; weights [T, k] float or None; base [T, d_out] or None.
    Returns: y [T, d_out]. Differentiable w.r.t. values, B, weights and base.
    """
    return call("rank_sparse_expand", values, ids, B, weights, scale, base)


def id_histogram(ids: torch.Tensor, num_bins: int):
    """``counts[b] = #(ids == b)`` over any-shaped int ids in [-1, num_bins) (-1 ignored).

    Rank usage for the aux-loss-free bias update (SMoRA, FlyLoRA) or tokens per expert.
    Returns counts [num_bins] int32.
    """
    return call("id_histogram", ids, num_bins)


def rank_scatter(src: torch.Tensor, ids: torch.Tensor, num_ranks: int):
    """``out [T, R]``, ``out[t, ids[t, j]] += src[t, j]``: the h-gradient of ``rank_topk``."""
    return call("rank_scatter", src, ids, num_ranks)


def rank_sparse_weight_grad(x: torch.Tensor, g: torch.Tensor, ids: torch.Tensor, num_ranks: int):
    """``G [R, d]``, ``G[ids[t, j]] += g[t, j] * x[t]``: dA of ``rank_sparse_shrink`` and dB^T of
    ``rank_sparse_expand``."""
    return call("rank_sparse_weight_grad", x, g, ids, num_ranks)
