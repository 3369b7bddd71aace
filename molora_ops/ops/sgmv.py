"""Family 3, grouped low-rank matmuls (SGMV-style) over a stacked LoRA bank, and the dense
stacked gated form for soft routing.

Bank layout: ``A [R, d_in]`` (expert e's rows ``rank_offsets[e]:rank_offsets[e+1]``, PEFT's
``lora_A.weight`` stacked), ``B [d_out, R]`` (the same columns, PEFT's ``lora_B.weight``),
``rank_offsets [E+1]`` int32 (ragged ranks need no padded weights), ``scales [E]`` per-expert
LoRA scaling (constant). Row i of the dispatched layout holds pair ``p = order[i]`` of token
``p // k`` for expert e, with coefficient ``c_i = weights.flatten()[p] * scales[e]``.
"""

from __future__ import annotations

import torch

from .. import _checks, reference
from ._registry import call, define, native, opmath

# --- checks + fakes ------------------------------------------------------------------------------


def _check_sgmv_shrink(x, A, rank_offsets, order, pos, expert_offsets, weights, scales, max_rank):
    op = "sgmv_shrink"
    _checks.floating(op, "x", x)
    _checks.dim(op, "x", x, 2)
    _checks.bank(op, "A", A, "x", x)
    _checks.size(op, "A", A, 1, x.shape[1])
    _checks.grouped(op, x, x.shape[0], rank_offsets, order, pos, expert_offsets, weights, scales)
    _checks.value(op, max_rank >= 0, f"max_rank must be >= 0, got {max_rank}")


def _check_sgmv_expand(h, B, rank_offsets, order, pos, expert_offsets, weights, scales, base):
    op = "sgmv_expand"
    _checks.floating(op, "h", h)
    _checks.dim(op, "h", h, 2)
    _checks.bank(op, "B", B, "h", h)
    _checks.grouped(op, h, None, rank_offsets, order, pos, expert_offsets, weights, scales)
    _checks.size(op, "h", h, 0, order.shape[0])
    _checks.base(op, base, pos.shape[0], B.shape[0], h)


def _check_routed_moe_lora(x, router_weight, router_bias, A, B, rank_offsets, scales, base,
                           weight, bias, top_k, renormalize, max_rank):
    op = "routed_moe_lora"
    _checks.lora_banks(op, x, A, B)
    _checks.value(op, rank_offsets.dim() == 1 and rank_offsets.shape[0] >= 2,
                  f"rank_offsets must be [E+1] with E >= 1, got shape {tuple(rank_offsets.shape)}")
    E = rank_offsets.shape[0] - 1
    _checks.rank_offsets(op, rank_offsets, E, x)
    _checks.bank(op, "router_weight", router_weight, "x", x)
    _checks.size(op, "router_weight", router_weight, 0, E)
    _checks.size(op, "router_weight", router_weight, 1, x.shape[1])
    for name, t, n in (("router_bias", router_bias, E), ("bias", bias, B.shape[0])):
        if t is not None:
            _checks.same_dtype(op, name, t, "x", x)
            _checks.vector(op, name, t, n, x)
    _checks.value(op, base is None or weight is None,
                  "pass the frozen layer as base (its output) or weight, not both")
    if weight is not None:
        _checks.bank(op, "weight", weight, "x", x)
        _checks.size(op, "weight", weight, 0, B.shape[0])
        _checks.size(op, "weight", weight, 1, x.shape[1])
    _checks.vector(op, "scales", scales, E, x)
    _checks.base(op, base, x.shape[0], B.shape[0], x)
    _checks.topk_k(op, top_k, E)
    _checks.value(op, max_rank >= 0, f"max_rank must be >= 0, got {max_rank}")


def _rows_and_h(op, name, data, h):
    """A token-major float operand [T, *] and the dispatched rows h [P, *] of its dtype and
    device (the weight gradient's x, the expand's backward's grad_y)."""
    _checks.floating(op, name, data)
    _checks.dim(op, name, data, 2)
    _checks.dim(op, "h", h, 2)
    _checks.same_dtype(op, "h", h, name, data)
    _checks.device(op, "h", h, data)


def _check_sgmv_weight_grad(x, h, rank_offsets, order, pos, expert_offsets, weights, scales,
                            total_rank, transposed=False):
    op = "sgmv_weight_grad"
    _rows_and_h(op, "x", x, h)
    _checks.value(op, total_rank >= 0, f"total_rank must be >= 0, got {total_rank}")
    _checks.grouped(op, x, x.shape[0], rank_offsets, order, pos, expert_offsets, weights, scales)
    _checks.size(op, "h", h, 0, order.shape[0])


def _check_sgmv_expand_backward(grad_y, h, B, rank_offsets, order, pos, expert_offsets, weights,
                                scales):
    op = "sgmv_expand_backward"
    _rows_and_h(op, "grad_y", grad_y, h)
    _checks.bank(op, "B", B, "grad_y", grad_y)
    _checks.size(op, "B", B, 0, grad_y.shape[1])
    _checks.grouped(op, grad_y, grad_y.shape[0], rank_offsets, order, pos, expert_offsets, weights,
                    scales)
    _checks.size(op, "h", h, 0, order.shape[0])


def _check_stacked_gated_lora(x, A, B, gate, rank_offsets, scales, base, shared_a):
    _checks.gated("stacked_gated_lora", x, A, B, gate, rank_offsets, scales, shared_a)
    _checks.base("stacked_gated_lora", base, x.shape[0], B.shape[0], x)


def _check_stacked_gated_lora_backward(grad_y, x, A, B, gate, rank_offsets, scales, shared_a):
    op = "stacked_gated_lora_backward"
    _checks.gated(op, x, A, B, gate, rank_offsets, scales, shared_a)
    _checks.floating(op, "grad_y", grad_y)
    _checks.device(op, "grad_y", grad_y, x)
    _checks.value(op, tuple(grad_y.shape) == (x.shape[0], B.shape[0]),
                  f"grad_y must have shape ({x.shape[0]}, {B.shape[0]}), got {tuple(grad_y.shape)}")


def _check_fused_moe_lora(x, A, B, rank_offsets, weights, ids, scales, base):
    op = "fused_moe_lora"
    _checks.lora_banks(op, x, A, B)
    _checks.index(op, "ids", ids)
    _checks.dim(op, "ids", ids, 2)
    _checks.size(op, "ids", ids, 0, x.shape[0])
    _checks.device(op, "ids", ids, x)
    _checks.pair_weights(op, weights, ids, x)
    E = rank_offsets.shape[0] - 1 if rank_offsets.dim() == 1 else 0
    _checks.value(op, E >= 1, f"rank_offsets must be [E+1] with E >= 1, got shape "
                              f"{tuple(rank_offsets.shape)}")
    _checks.rank_offsets(op, rank_offsets, E, x)
    _checks.vector(op, "scales", scales, E, x)
    _checks.base(op, base, x.shape[0], B.shape[0], x)


def _fake_sgmv_shrink(x, A, rank_offsets, order, pos, expert_offsets, weights, scales, max_rank):
    return x.new_empty((order.shape[0], max_rank))


def _fake_sgmv_expand(h, B, rank_offsets, order, pos, expert_offsets, weights, scales, base):
    return h.new_empty((pos.shape[0], B.shape[0]))


def _fake_routed_moe_lora(x, router_weight, router_bias, A, B, rank_offsets, scales, base,
                          weight, bias, top_k, renormalize, max_rank):
    T, E = x.shape[0], router_weight.shape[0]
    i32 = dict(dtype=torch.int32)
    return (x.new_empty((T, B.shape[0])), x.new_empty((T, E)),
            x.new_empty((T, top_k), dtype=_checks.opmath_dtype(x.dtype)),
            x.new_empty((T, top_k), **i32), x.new_empty((T * top_k, max_rank)),
            x.new_empty((T * top_k,), **i32), x.new_empty((T, top_k), **i32),
            x.new_empty((E + 1,), **i32))


def _fake_sgmv_weight_grad(x, h, rank_offsets, order, pos, expert_offsets, weights, scales,
                           total_rank, transposed=False):
    return x.new_empty((x.shape[1], total_rank) if transposed else (total_rank, x.shape[1]))


def _fake_sgmv_expand_backward(grad_y, h, B, rank_offsets, order, pos, expert_offsets, weights,
                               scales):
    opmath_dtype = _checks.opmath_dtype(grad_y.dtype)
    return (grad_y.new_empty((B.shape[0], B.shape[1])),
            grad_y.new_empty((order.shape[0], h.shape[1]), dtype=opmath_dtype),
            grad_y.new_empty(tuple(pos.shape), dtype=opmath_dtype))


def _fake_fused_moe_lora(x, A, B, rank_offsets, weights, ids, scales, base):
    return x.new_empty((x.shape[0], B.shape[0]))


def _fake_stacked_gated_lora(x, A, B, gate, rank_offsets, scales, base, shared_a):
    return x.new_empty((x.shape[0], B.shape[0]))


def _fake_stacked_gated_lora_backward(grad_y, x, A, B, gate, rank_offsets, scales, shared_a):
    return (x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            gate.new_empty(gate.shape))


# --- autograd ------------------------------------------------------------------------------------
# shrink and expand are each other's transpose over the same dispatch metadata:
#   shrink  h = c * A_e x      ->  dx = expand(dh, A^T),  dA = weight_grad(x, dh)
#   expand  y += c * B_e h     ->  dh = shrink(dy, B^T),  dB = weight_grad(dy, h)^T
# (dB comes out of weight_grad with transposed=True: written in B's layout [d_out, R], where a
# transposed view would be copied into that layout by autograd's gradient accumulation.)
# and the routing-weight gradient is a per-row dot with the unweighted counterpart.


def _save_grouped(ctx, inputs, output):
    data, bank, rank_offsets, order, pos, expert_offsets, weights, scales, _last = inputs
    ctx.save_for_backward(data, bank, rank_offsets, order, pos, expert_offsets, weights, scales)


def shrink_grads(grad_h, x, A, meta, weights, scales, need_x, need_A, need_w):
    """(dx, dA, d weights) of ``h = sgmv_shrink(x, A, *meta, weights, scales)``, each None where
    not needed. ``moe_lora_linear``'s grouped node calls it too (molora_ops.functional)."""
    grad_x = grad_A = grad_w = None
    if need_x:
        grad_x = native("sgmv_expand")(grad_h, A.t(), *meta, weights, scales, None)
    if need_A:
        grad_A = native("sgmv_weight_grad")(x, grad_h, *meta, weights, scales, A.shape[0])
    if weights is not None and need_w:
        # In opmath: a bf16 h_unweighted would round before the dot (~1e-2 error on dw).
        x_acc, A_acc, grad_h_acc = opmath(x, A, grad_h)
        h_unweighted = native("sgmv_shrink")(x_acc, A_acc, *meta, None, scales, grad_h.shape[1])
        grad_w = native("pair_dot")(grad_h_acc, h_unweighted, meta[2], False).to(weights.dtype)
    return grad_x, grad_A, grad_w


def expand_grads(grad_y, h, B, meta, weights, scales, need_h, need_B, need_w,
                 unweighted_h=False):
    """(dh, dB, d weights) of ``y = sgmv_expand(h, B, *meta, weights, scales, base)``, each None
    where not needed (d base is grad_y itself). ``moe_lora_linear``'s grouped node calls it too,
    with ``unweighted_h``: dh then comes back without the routing weights (u = s B^T dy) and the
    node hands the weights to the A-side kernels, whose per-slot coefficient applies them: no
    [P, r] weighting pass of small ops (0.15-0.23 ms of a T=1024 training step, 2-core Xeon,
    2026-12-04)."""
    order = meta[1]
    max_rank = h.shape[1]
    grad_h = grad_B = grad_w = None
    need_w = weights is not None and need_w
    # u = B^T dy per row, unweighted, in opmath: the routing-weight gradient is dot(h_i, u_i).
    need_u = need_w or (need_h and unweighted_h and weights is not None)
    u = u_grad_w = None
    if need_B and (need_u or need_h):  # dB, u and d w in one op (one pass over grad_y on the CPU)
        grad_B, u, u_grad_w = native("sgmv_expand_backward")(grad_y, h, B, *meta, weights, scales)
    elif need_u:
        grad_y_acc, B_acc = opmath(grad_y, B)
        u = native("sgmv_shrink")(grad_y_acc, B_acc.t(), *meta, None, scales, max_rank)
    if need_h:
        if u is None:  # one shrink, weighted where there are weights
            grad_h = native("sgmv_shrink")(grad_y, B.t(), *meta, weights, scales, max_rank)
        elif unweighted_h or weights is None:
            grad_h = u
        else:  # dh_i = w_i u_i: the same shrink, weighted; no second pass over grad y
            grad_h = u * _row_weights(weights, order, u.dtype)[:, None]
        grad_h = grad_h.to(h.dtype)
    if need_B and grad_B is None:
        grad_B = native("sgmv_weight_grad")(grad_y, h, *meta, weights, scales, B.shape[1], True)
    if need_w:
        if u_grad_w is None:
            u_grad_w = native("pair_dot")(h.to(u.dtype), u, meta[2], False)
        grad_w = u_grad_w.to(weights.dtype)
    return grad_h, grad_B, grad_w


def _sgmv_shrink_backward(ctx, grad_h):
    x, A, ro, order, pos, eo, weights, scales = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_A, grad_w = shrink_grads(grad_h, x, A, (ro, order, pos, eo), weights, scales,
                                          need[0], need[1], need[6])
    return grad_x, grad_A, None, None, None, None, grad_w, None, None


def _sgmv_expand_backward(ctx, grad_y):
    h, B, ro, order, pos, eo, weights, scales = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_h, grad_B, grad_w = expand_grads(grad_y, h, B, (ro, order, pos, eo), weights, scales,
                                          need[0], need[1], need[6])
    grad_base = grad_y if need[8] else None
    return grad_h, grad_B, None, None, None, None, grad_w, None, grad_base


def frozen_grads(grad_y, grad_x, x, weight, need_x, need_W, need_bias):
    """(grad_x, d weight, d bias) of the frozen layer ``x weight^T + bias`` folded into a
    grouped formula: its d x accumulates into the adapter's grad_x (beta = 1), the GEMM last
    (grad_x None: a new one). Nothing where weight is None."""
    grad_W = grad_bias = None
    if weight is not None:
        if need_x:
            grad_x = (grad_y.mm(weight) if grad_x is None
                      else grad_x.addmm_(grad_y.to(grad_x.dtype), weight.to(grad_x.dtype)))
        if need_W:
            grad_W = grad_y.t().mm(x.to(grad_y.dtype)).to(weight.dtype)
        if need_bias:
            grad_bias = grad_y.sum(0).to(weight.dtype)
    return grad_x, grad_W, grad_bias


def _save_routed(ctx, inputs, output):
    x, router_weight, _rb, A, B, ro, scales, _base, weight, _bias, _k, renormalize, _r = inputs
    _y, logits, weights, ids, h, order, pos, eo = output
    ctx.save_for_backward(x, router_weight, A, B, ro, scales, weight, logits, weights, ids, h,
                          order, pos, eo)
    ctx.mark_non_differentiable(ids, h, order, pos, eo)
    ctx.renormalize = renormalize


def _routed_moe_lora_backward(ctx, grad_y, grad_logits, grad_weights, *_grad_rest):
    """routed_moe_lora's backward: the grouped formulas in order, the router's inside: dB, u and
    d w in one pass over grad_y (u unweighted: the A-side kernels apply the weights), the router's
    logits gradient from d w, then x's three gradients in one buffer: the adapter's (expand of u
    over A^T), the router's (d logits Wr, beta = 1) and the frozen layer's, whose GEMM runs last;
    the router's small GEMMs run before it, while the caches hold the backward's data. The
    extension runs the same formula in C++ (csrc/autograd.cpp); this one serves the pure-Python
    build."""
    x, Wr, A, B, ro, scales, weight, logits, weights, ids, h, *dispatched = ctx.saved_tensors
    meta = (ro, *dispatched)
    need = ctx.needs_input_grad
    need_route = need[0] or need[1] or need[2]
    grad_h, grad_B, grad_w = expand_grads(grad_y, h, B, meta, weights, scales, need[0] or need[3],
                                          need[4], need_route, unweighted_h=True)
    grad_route = None
    if need_route:
        if grad_weights is not None:
            grad_w = grad_w + grad_weights.to(grad_w.dtype)
        grad_route = native("softmax_route_backward")(grad_w.to(weights.dtype), weights, ids,
                                                      logits, ctx.renormalize, 1.0)
        if grad_logits is not None:
            grad_route = grad_route + grad_logits.to(grad_route.dtype)
    grad_x = grad_A = None
    if grad_h is not None:
        grad_x, grad_A, _ = shrink_grads(grad_h, x, A, meta, weights, None, need[0], need[3],
                                         False)
    grad_Wr = grad_br = None
    if need[0]:
        g, w = grad_route.to(x.dtype), Wr.to(x.dtype)
        grad_x = g.mm(w) if grad_x is None else grad_x.addmm_(g.to(grad_x.dtype),
                                                              w.to(grad_x.dtype))
    if need[1]:
        grad_Wr = grad_route.t().mm(x.to(grad_route.dtype)).to(Wr.dtype)
    if need[2]:
        grad_br = grad_route.sum(0).to(Wr.dtype)
    grad_x, grad_W, grad_bias = frozen_grads(grad_y, grad_x, x, weight, need[0], need[8], need[9])
    if need[9] and weight is None:  # the bias on its own (with base, or no frozen layer)
        grad_bias = grad_y.sum(0)
    grad_base = grad_y if need[7] else None
    return (grad_x, grad_Wr, grad_br, grad_A, grad_B, None, None, grad_base, grad_W, grad_bias,
            None, None, None)


def _row_weights(weights, order, dtype):
    """w[order[i]] per dispatched row i, 0 on padding rows (order -1)."""
    w = weights.reshape(-1).to(dtype)
    return torch.where(order >= 0, w[order.clamp(min=0).long()], 0)


def _save_gated(ctx, inputs, output):
    x, A, B, gate, rank_offsets, scales, _base, shared_a = inputs
    ctx.save_for_backward(x, A, B, gate, rank_offsets, scales)
    ctx.shared_a = shared_a


def _stacked_gated_lora_backward(ctx, grad_y):
    x, A, B, gate, ro, scales = ctx.saved_tensors
    grad_x, grad_A, grad_B, grad_gate = native("stacked_gated_lora_backward")(
        grad_y, x, A, B, gate, ro, scales, ctx.shared_a)
    grad_base = grad_y if ctx.needs_input_grad[6] else None
    return grad_x, grad_A, grad_B, grad_gate, None, None, grad_base, None


def _save_fused(ctx, inputs, output):
    x, A, B, ro, weights, ids, scales, _base = inputs
    ctx.save_for_backward(x, A, B, ro, weights, ids, scales)


def _fused_moe_lora_backward(ctx, grad_y):
    # The dense form's backward: the gate is rebuilt from (weights, ids) (T*k values), and
    # d weights[t, j] = dgate[t, ids[t, j]].
    x, A, B, ro, weights, ids, scales = ctx.saved_tensors
    gate = reference.pair_gate(weights, ids, ro.shape[0] - 1, _checks.opmath_dtype(x.dtype))
    grad_x, grad_A, grad_B, grad_gate = native("stacked_gated_lora_backward")(
        grad_y, x, A, B, gate, ro, scales, False)
    grad_w = None
    if weights is not None and ctx.needs_input_grad[4]:
        picked = grad_gate.gather(1, ids.clamp(min=0).long())
        grad_w = torch.where(ids >= 0, picked, 0).to(weights.dtype)
    grad_base = grad_y if ctx.needs_input_grad[7] else None
    return grad_x, grad_A, grad_B, None, grad_w, None, None, grad_base


def _fused_moe_lora_values(x, A, B, ro, weights, ids, scales, base):
    _checks.rank_offsets_values("fused_moe_lora", ro, A.shape[0])
    _checks.ids_in_range("fused_moe_lora", "ids", ids, -1, ro.shape[0] - 1)


def _sgmv_shrink_values(x, A, ro, order, pos, eo, weights, scales, max_rank):
    _checks.dispatched_values("sgmv_shrink", A.shape[0], ro, order, pos, eo, max_rank)


def _sgmv_expand_values(h, B, ro, order, pos, eo, weights, scales, base):
    _checks.dispatched_values("sgmv_expand", B.shape[1], ro, order, pos, eo, h.shape[1])


def _sgmv_weight_grad_values(x, h, ro, order, pos, eo, weights, scales, total_rank,
                             transposed=False):
    _checks.dispatched_values("sgmv_weight_grad", total_rank, ro, order, pos, eo, h.shape[1])


def _sgmv_expand_backward_values(grad_y, h, B, ro, order, pos, eo, weights, scales):
    _checks.dispatched_values("sgmv_expand_backward", B.shape[1], ro, order, pos, eo, h.shape[1])


def _stacked_gated_lora_values(x, A, B, gate, ro, scales, base, shared_a):
    _checks.stacked_values("stacked_gated_lora", A, B, ro, shared_a)


def _stacked_gated_lora_backward_values(grad_y, x, A, B, gate, ro, scales, shared_a):
    _checks.stacked_values("stacked_gated_lora_backward", A, B, ro, shared_a)


define("sgmv_shrink(Tensor x, Tensor A, Tensor rank_offsets, Tensor order, Tensor pos, "
       "Tensor expert_offsets, Tensor? weights, Tensor? scales, int max_rank) -> Tensor",
       check=_check_sgmv_shrink, fake=_fake_sgmv_shrink,
       reference=lambda *a: reference.sgmv_shrink(*a[:-1], max_rank=a[-1]),
       values=_sgmv_shrink_values, triton="sgmv:sgmv_shrink",
       backward=_sgmv_shrink_backward, setup_context=_save_grouped,
       autocast=("x", "A"))
define("sgmv_expand(Tensor h, Tensor B, Tensor rank_offsets, Tensor order, Tensor pos, "
       "Tensor expert_offsets, Tensor? weights, Tensor? scales, Tensor? base) -> Tensor",
       check=_check_sgmv_expand, fake=_fake_sgmv_expand, reference=reference.sgmv_expand,
       values=_sgmv_expand_values, triton="sgmv:sgmv_expand",
       backward=_sgmv_expand_backward, setup_context=_save_grouped,
       autocast=("h", "B", "base"))
define("sgmv_weight_grad(Tensor x, Tensor h, Tensor rank_offsets, Tensor order, Tensor pos, "
       "Tensor expert_offsets, Tensor? weights, Tensor? scales, int total_rank, "
       "bool transposed=False) -> Tensor",
       check=_check_sgmv_weight_grad, fake=_fake_sgmv_weight_grad,
       reference=reference.sgmv_weight_grad, values=_sgmv_weight_grad_values,
       triton="sgmv:sgmv_weight_grad", kind="backward", autocast=("x", "h"))
define("sgmv_expand_backward(Tensor grad_y, Tensor h, Tensor B, Tensor rank_offsets, Tensor order, "
       "Tensor pos, Tensor expert_offsets, Tensor? weights, Tensor? scales) -> "
       "(Tensor grad_B, Tensor u, Tensor grad_w)",
       check=_check_sgmv_expand_backward, fake=_fake_sgmv_expand_backward,
       reference=reference.sgmv_expand_backward, values=_sgmv_expand_backward_values,
       triton="sgmv:sgmv_expand_backward", kind="backward", autocast=("grad_y", "h", "B"))
define("stacked_gated_lora(Tensor x, Tensor A, Tensor B, Tensor gate, Tensor rank_offsets, "
       "Tensor? scales, Tensor? base, bool shared_a) -> Tensor",
       check=_check_stacked_gated_lora, fake=_fake_stacked_gated_lora,
       reference=reference.stacked_gated_lora, values=_stacked_gated_lora_values,
       triton="gated:stacked_gated_lora",
       backward=_stacked_gated_lora_backward, setup_context=_save_gated,
       autocast=("x", "A", "B", "base"))
define("fused_moe_lora(Tensor x, Tensor A, Tensor B, Tensor rank_offsets, Tensor? weights, "
       "Tensor ids, Tensor? scales, Tensor? base) -> Tensor",
       check=_check_fused_moe_lora, fake=_fake_fused_moe_lora, reference=reference.fused_moe_lora,
       values=_fused_moe_lora_values, triton="sgmv:fused_moe_lora",
       backward=_fused_moe_lora_backward, setup_context=_save_fused,
       autocast=("x", "A", "B", "base"))
define("routed_moe_lora(Tensor x, Tensor router_weight, Tensor? router_bias, Tensor A, Tensor B, "
       "Tensor rank_offsets, Tensor? scales, Tensor? base, Tensor? weight, Tensor? bias, "
       "int top_k, bool renormalize, int max_rank) -> (Tensor y, Tensor logits, Tensor weights, "
       "Tensor ids, Tensor h, Tensor order, Tensor pos, Tensor expert_offsets)",
       check=_check_routed_moe_lora, fake=_fake_routed_moe_lora,
       reference=reference.routed_moe_lora, backward=_routed_moe_lora_backward,
       setup_context=_save_routed, kind="pipeline")
define("stacked_gated_lora_backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor gate, "
       "Tensor rank_offsets, Tensor? scales, bool shared_a) -> "
       "(Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_gate)",
       check=_check_stacked_gated_lora_backward, fake=_fake_stacked_gated_lora_backward,
       reference=reference.stacked_gated_lora_backward,
       values=_stacked_gated_lora_backward_values, triton="gated:stacked_gated_lora_backward",
       kind="backward", autocast=("grad_y", "x", "A", "B"))


# --- wrappers ------------------------------------------------------------------------------------


def uniform_rank_offsets(num_experts: int, rank: int, device=None) -> torch.Tensor:
    """``rank_offsets`` [E+1] int32 of a bank where every expert has rank ``rank``."""
    return torch.arange(num_experts + 1, dtype=torch.int32, device=device) * rank


def sgmv_shrink(x, A, rank_offsets, order, pos, expert_offsets, weights=None, scales=None, *,
                max_rank: int):
    """Grouped shrink ``h[i, :r_e] = c_i * A_e @ x[t_i]`` (x read through ``order``, no permuted copy).

    Args:
        x: [T, d_in] float. A: [R, d_in], x's dtype. rank_offsets: [E+1] int.
        order, pos, expert_offsets: from ``dispatch``. weights: [T, k] float or None.
        scales: [E] float or None. max_rank: columns of h, >= every expert rank.
    Returns:
        h [P, max_rank] with x's dtype (fp32 accumulation); columns >= r_e and padding rows are 0.
        Differentiable w.r.t. x, A and weights.
    """
    args = (x, A, rank_offsets, order, pos, expert_offsets, weights, scales, max_rank)
    return call("sgmv_shrink", *args)


def sgmv_expand(h, B, rank_offsets, order, pos, expert_offsets, weights=None, scales=None,
                base=None):
    """Grouped expand ``y[t] = base[t] + sum_j c_i * B_e @ h[i, :r_e]`` with ``i = pos[t, j]``.

    Args:
        h: [P, max_rank] float. B: [d_out, R], h's dtype. rank_offsets, order, pos,
        expert_offsets, weights, scales: as in ``sgmv_shrink``. base: [T, d_out] or None.
    Returns:
        y [T, d_out] with h's dtype: a new tensor ``base + delta`` (token-owned accumulation, so
        several experts writing one token are summed deterministically). Differentiable w.r.t.
        h, B, weights and base.
    """
    return call("sgmv_expand", h, B, rank_offsets,
                order, pos, expert_offsets, weights, scales, base)


def sgmv_weight_grad(x, h, rank_offsets, order, pos, expert_offsets, weights, scales,
                     total_rank: int, transposed: bool = False):
    """Grouped ``X^T Y``: ``G[ro_e + a] = sum_{rows i of e} c_i * h[i, a] * x[t_i]``, G [R, d].

    dA of ``sgmv_shrink`` (x = input, h = grad of h) and dB^T of ``sgmv_expand`` (x = grad of y).

    Args:
        x: [T, d] float. h: [P, max_rank], x's dtype. rank_offsets, order, pos, expert_offsets,
        weights, scales: as in ``sgmv_shrink``. total_rank: R, rows of G.
        transposed: return G^T [d, R] (contiguous: dB in the layout of the expand's bank B)
            instead of G [R, d].
    Returns:
        G [R, d] (or G^T [d, R]) with x's dtype, fp32 accumulation. Not differentiable.
    """
    return call("sgmv_weight_grad", x, h, rank_offsets, order, pos, expert_offsets, weights,
                scales, total_rank, transposed)


def sgmv_expand_backward(grad_y, h, B, rank_offsets, order, pos, expert_offsets, weights=None,
                         scales=None):
    """The expand's backward products at once:
    ``grad_B = sgmv_weight_grad(grad_y, h, ..., weights, scales, R, transposed=True)``,
    ``u = sgmv_shrink(grad_y, B^T, ..., scales)`` without the routing weights (dh_i = w_i u_i)
    and the routing weights' gradient ``grad_w = pair_dot(h, u, pos, False)`` (d w_i =
    dot(h_i, u_i)).

    On the CPU, fp32 with AVX-512, one pass over grad_y computes grad_B and u (it reads each
    dispatched row of grad_y once instead of twice) and grad_w comes from u while it is in cache;
    elsewhere the ops' kernels run in turn.

    Args:
        grad_y: [T, d_out] float. h: [P, max_rank], grad_y's dtype (the expand's input).
        B: [d_out, R], grad_y's dtype and device. rank_offsets, order, pos, expert_offsets,
        weights, scales: as in ``sgmv_expand``.
    Returns:
        grad_B [d_out, R] in grad_y's dtype; u [P, max_rank] in opmath (fp32 for fp16/bf16/fp32,
        fp64 for fp64), 0 beyond r_e and on padding rows; grad_w [T, k] in opmath, 0 where pos is
        -1 (computed whether or not weights are given). Not differentiable.
    """
    return call("sgmv_expand_backward", grad_y, h, B, rank_offsets, order, pos, expert_offsets,
                weights, scales)


def routed_moe_lora(x, router_weight, router_bias, A, B, rank_offsets, scales, base, weight, bias,
                    top_k: int, renormalize: bool, max_rank: int):
    """The MoE-LoRA linear behind a softmax-top-k router, as one op (a pipeline of the ops above;
    ``molora_ops.functional.routed_moe_lora_linear`` is the entry to call):

        logits = x router_weight^T + router_bias
        weights, ids = softmax_topk(logits, top_k, renormalize)
        order, pos, expert_offsets = dispatch(ids, E, 1)
        h = sgmv_shrink(x, A, rank_offsets, order, pos, expert_offsets, max_rank=max_rank)
        y = sgmv_expand(h, B, ..., weights, scales, base) + x weight^T + bias

    Args:
        x: [T, d_in] float. router_weight: [E, d_in], router_bias: [E] or None, x's dtype.
        A: [R, d_in], B: [d_out, R], x's dtype. rank_offsets: [E+1] int. scales: [E] or None.
        base: [T, d_out] or None; weight: [d_out, d_in] or None (not both); bias: [d_out] or None.
        top_k: 1 <= top_k <= E. max_rank: columns of h, >= every expert rank.
    Returns:
        (y [T, d_out] x's dtype, logits [T, E] x's dtype, weights [T, top_k] opmath, ids
        [T, top_k] int32, h [P, max_rank], order [P], pos [T, top_k], expert_offsets [E+1] int32
        with P = T * top_k): the intermediates are what the backward reads. Differentiable
        w.r.t. x, router_weight, router_bias, A, B, base, weight and bias through y, logits and
        weights. Kernels: C++ on the CPU (the kernels called in turn, no Python between them);
        the reference composite elsewhere.
    """
    return call("routed_moe_lora", x, router_weight, router_bias, A, B, rank_offsets, scales,
                base, weight, bias, top_k, renormalize, max_rank)


def stacked_gated_lora(x, A, B, gate, rank_offsets, scales=None, base=None, shared_a=False):
    """Dense soft-routed LoRA: ``y[t] = base[t] + sum_e gate[t, e] * s_e * B_e @ (A_e @ x[t])``.

    X-LoRA, LoRAMoE, MoLE, LoRA Soups (gate [T, E] from any router); ``shared_a=True`` is
    HydraLoRA (one ``A [r, d_in]`` for every expert, ``rank_offsets = arange(E+1) * r``).

    Args: x [T, d_in]; A [R, d_in] (or [r, d_in]); B [d_out, R]; gate [T, E] float;
        rank_offsets [E+1]; scales [E] or None; base [T, d_out] or None.
    Returns: y [T, d_out] with x's dtype. Differentiable w.r.t. x, A, B, gate and base.
    """
    return call("stacked_gated_lora", x,
                A, B, gate, rank_offsets, scales, base, shared_a)


def stacked_gated_lora_backward(grad_y, x, A, B, gate, rank_offsets, scales, shared_a: bool):
    """(dx, dA, dB, dgate) of ``stacked_gated_lora``, each with its input's dtype."""
    return call("stacked_gated_lora_backward", grad_y, x, A, B, gate, rank_offsets,
                scales, shared_a)


def fused_moe_lora(x, A, B, rank_offsets, weights, ids, scales=None, base=None):
    """Top-k MoE-LoRA linear in one launch (the dense form, h on chip; no dispatch):
    ``y[t] = base[t] + sum_j w[t, j] s_e B_e A_e x[t]`` over ``e = ids[t, j]`` (-1: no expert).

    Args: x [T, d_in]; A [R, d_in]; B [d_out, R] (x's dtype); rank_offsets [E+1] int;
        weights [T, k] float or None (1); ids [T, k] int in [-1, E); scales [E] or None;
        base [T, d_out] or None.
    Returns: y [T, d_out] with x's dtype. Differentiable w.r.t. x, A, B, weights and base (the
    backward is ``stacked_gated_lora_backward`` of the gate the routing spells).
    Kernels: Triton on CUDA (total rank R <= 128: the bank's h tile lives in registers; larger
    banks raise), the dense form through ATen elsewhere. ``molora_ops.functional.moe_lora_linear``
    picks it (``algo="fused"``) where it is the cheapest formulation.
    """
    return call("fused_moe_lora", x, A, B, rank_offsets, weights, ids, scales, base)
