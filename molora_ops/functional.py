"""Functional entry points above the ops: the MoE-LoRA linear layer in one call.

``moe_lora_linear`` computes ``y = x W^T + bias + sum_j w_j s_e B_e A_e x`` over the top-k experts
of each token with one of three formulations (``molora_ops.plan`` has their launches, bytes and
FLOPs), all with the same forward and backward:

* ``"grouped"``: dispatch -> ``sgmv_shrink`` -> ``sgmv_expand``: only the routed experts' ranks
  (``2*T*k*r*(d_in + d_out)`` FLOPs), x read once per routed pair.
* ``"dense"``: the routing as a gate [T, E] -> ``stacked_gated_lora``: two matmuls over the whole
  bank (``2*T*R*(d_in + d_out)``), x read once. The cheaper one where R is small and the device is
  memory-bound (a GPU at R up to a few hundred).
* ``"fused"``: ``fused_moe_lora``: the dense form in one launch, h on chip (Triton on CUDA, total
  rank <= 128): the minimum traffic.
* ``"auto"`` (default): the least modeled time at the device's ceilings (``plan.choose``), forward
  plus backward when a gradient will be taken.

On the CPU with ``weight=`` the frozen GEMM runs last and accumulates into the adapter's output,
and a grouped call that will be differentiated is one autograd node (``_GroupedNode``) whose
backward calls the ops' own gradient formulas in sequence.

``routed_moe_lora_linear`` is the same layer behind its own softmax-top-k router (logits from a
gate ``router_weight``); on the CPU its grouped formulation is one op, ``routed_moe_lora`` (router,
dispatch, shrink, expand and the frozen GEMM in one C++ call), and one autograd node.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _checks, ops, plan, reference
from .ops import sgmv
from .ops._registry import _any_requires_grad, native, once_differentiable

__all__ = ["moe_lora_linear", "routed_moe_lora_linear", "RoutedOutput", "ALGOS", "pick_algo"]

ALGOS = ("auto",) + plan.ALGOS

_OP = "moe_lora_linear"


def _fail(exc, msg):
    _checks._fail(exc, _OP, msg)


def _needs_grad(*tensors) -> bool:
    """Whether autograd will differentiate a call on these tensors (None entries ignored).
    Eager, torch's C check: the generator over them ran ~15 us of a T=1024 layer call right
    after a GEMM (2-core Xeon, 2026-12-05); dynamo cannot trace the C one."""
    if not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return any(t is not None and t.requires_grad for t in tensors)
    return _any_requires_grad(*tensors)


def _lead_check(name: str, t: torch.Tensor, lead: Tuple[int, ...], last: Optional[int],
                what: str) -> None:
    """t must be [*lead, last] (any last where None). ``what``, the expected shape in words, is
    a template of ``{lead}`` and ``{full}`` (lead + (last,)), formatted only on failure: the
    f-strings formatted on every call ran ~20 us of a T=1024 layer call right after a GEMM."""
    if t.dim() < 1 or tuple(t.shape[:-1]) != lead or (last is not None and t.shape[-1] != last):
        full = lead + (() if last is None else (last,))
        _fail(ValueError, f"{name} must have shape {what.format(lead=lead, full=full)}, got "
                          f"{tuple(t.shape)}")


def _check_bank(x, lora_A, lora_B, rank_offsets, algo) -> Tuple[int, int, int, int]:
    """The checks of x, the LoRA bank and algo that every entry makes: (E, R, d_in, d_out)."""
    if algo not in ALGOS:
        _fail(ValueError, f"algo must be one of {ALGOS}, got {algo!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        _fail(TypeError, "x must be a tensor [..., d_in]")
    if rank_offsets.dim() != 1 or rank_offsets.shape[0] < 2:
        _fail(ValueError, f"rank_offsets must be [E+1] with E >= 1, got shape "
                          f"{tuple(rank_offsets.shape)}")
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        _fail(ValueError, f"lora_A must be [R, d_in] and lora_B [d_out, R], got "
                          f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    return rank_offsets.shape[0] - 1, lora_A.shape[0], x.shape[-1], lora_B.shape[0]


def _check_frozen(base, weight, bias, lead, d_in: int, d_out: int) -> None:
    """The frozen layer's checks: base [*lead, d_out] or weight [d_out, d_in], bias [d_out]."""
    if base is not None and weight is not None:
        _fail(ValueError, "pass the frozen layer as base (its output) or weight, not both")
    if base is not None:
        _lead_check("base", base, lead, d_out, "{full}")
    if weight is not None and tuple(weight.shape) != (d_out, d_in):
        _fail(ValueError, f"weight must have shape ({d_out}, {d_in}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        _fail(ValueError, f"bias must have shape ({d_out},), got {tuple(bias.shape)}")


def _fused_serves(x: torch.Tensor, R: int) -> bool:
    """Whether the fused kernel (Triton) serves this input: CUDA, not float64, R small enough."""
    if not x.is_cuda or x.dtype == torch.float64 or R > plan.FUSED_MAX_TOTAL_RANK:
        return False
    from . import backend
    return backend.serving("fused_moe_lora") == "triton"


def pick_algo(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int,
              top_k: int, max_rank: int, *, has_base: bool = True,
              backward: Optional[bool] = None, allowed: Sequence[str] = plan.ALGOS) -> str:
    """The formulation ``algo="auto"`` runs for these shapes on x's device: the least modeled time
    (``molora_ops.plan``) among the ``allowed`` ones that serve the input (``fused`` needs the
    Triton kernel). ``backward`` defaults to whether autograd will differentiate the call."""
    if backward is None:
        backward = _needs_grad(x, lora_A, lora_B)
    return _pick(x, math.prod(x.shape[:-1]), x.shape[-1], lora_B.shape[0], num_experts, top_k,
                 lora_A.shape[0], max_rank, has_base, bool(backward), allowed)


# plan.ALGOS without "fused", the options where no fused kernel serves (every CPU input)
_UNFUSED = tuple(a for a in plan.ALGOS if a != "fused")


def _pick(x: torch.Tensor, T: int, d_in: int, d_out: int, E: int, k: int, R: int,
          max_rank: int, has_base: bool, backward: bool,
          allowed: Sequence[str] = plan.ALGOS) -> str:
    """pick_algo with the sizes the entries know already."""
    if x.is_cpu:
        options, device = (_UNFUSED if allowed is plan.ALGOS
                           else tuple(a for a in allowed if a != "fused")), "cpu"
    else:
        options = tuple(a for a in allowed if a != "fused" or _fused_serves(x, R))
        device = str(x.device)
    return _choose(T, d_in, d_out, E, k, R, max_rank, x.element_size(), has_base, device,
                   x.dtype, backward, options)


def _constant_when_traced(fn):
    """``torch.compiler.assume_constant_result(fn)`` without its import of torch._dynamo (which
    would add ~1.5 s to ``import molora_ops``): the mark it sets on ``fn`` is this attribute.
    test_functional.py's fullgraph compile of algo="auto" fails if the mechanism changes."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_when_traced
def _choose(T, d_in, d_out, E, k, R, max_rank, elem, has_base, device, dtype, backward,
            options) -> str:
    # A compiled graph takes the choice as a constant made at trace time (shapes are static
    # there; the ceilings are host data), so algo="auto" compiles with fullgraph=True.
    return plan.choose_for(T, d_in, d_out, E, k, R, max_rank, elem, has_base, device, dtype,
                           backward, options)


def moe_lora_linear(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    rank_offsets: torch.Tensor, routing_weights: Optional[torch.Tensor],
                    expert_ids: torch.Tensor, scales: Optional[torch.Tensor] = None, *,
                    base: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, algo: str = "auto",
                    max_rank: Optional[int] = None,
                    dispatched: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                    x_per_slot: bool = False) -> torch.Tensor:
    """MoE-LoRA linear: ``y = base + sum_j w[..., j] * s_e * B_e @ (A_e @ x)`` over the experts
    ``e = expert_ids[..., j]`` (-1: no expert), with ``base = x @ weight^T + bias`` (or given).

    Args:
        x: [..., d_in] float (any leading dims; with ``x_per_slot``: [..., k, d_in], slot j of a
            token reads its own row, the MoE-FFN's per-expert hidden states).
        lora_A: [R, d_in], x's dtype: expert e's ``lora_A.weight`` in rows
            ``rank_offsets[e]:rank_offsets[e+1]``. lora_B: [d_out, R], its ``lora_B.weight``.
        rank_offsets: [E+1] int32/int64, non-decreasing from 0 to R (ragged ranks; 0 allowed).
        routing_weights: [..., k] float (any float dtype) or None (all 1), from any router.
        expert_ids: [..., k] int in [-1, E), from any router (softmax_topk, sigmoid_topk,
            softmax_topp with -1 padding, a switch router with dropped tokens, ...).
        scales: [E] float or None: per-expert LoRA scaling (alpha / r_e).
        base: [..., d_out] x's dtype or None: the frozen layer's output, added to the delta.
        weight: [d_out, d_in] or None: the frozen layer's weight, run here (exclusive with base).
        bias: [d_out] or None: added to the output (with weight: the frozen layer's bias).
        algo: "auto", "grouped", "dense" or "fused" (module docstring).
        max_rank: the largest expert rank (host int; sizes the grouped path's h). Default: read
            from a CPU rank_offsets; on CUDA (or while compiling) the total rank R, so pass it to
            keep h small without a host read.
        dispatched: (order, pos, expert_offsets) of ``ops.dispatch(ids, E, 1)``, to share one
            dispatch between several banks routed alike (grouped only).
    Returns:
        y [..., d_out] with x's dtype. Differentiable w.r.t. x, lora_A, lora_B, routing_weights,
        base, weight and bias by every formulation.
    Raises:
        ValueError / TypeError on bad shapes, dtypes, devices or algo, before any kernel runs;
        ids out of range: IndexError on CPU (host value checks), a device-side assert on CUDA.
    """
    E, R, d_in, d_out = _check_bank(x, lora_A, lora_B, rank_offsets, algo)
    if expert_ids.dim() < 1:
        _fail(ValueError, "expert_ids must be [..., k]")
    k = expert_ids.shape[-1]
    lead = tuple(x.shape[:-2] if x_per_slot else x.shape[:-1])
    if x_per_slot:
        _lead_check("x", x, lead + (k,), d_in, "[..., k, d_in] with x_per_slot")
    _lead_check("expert_ids", expert_ids, lead, k, "x's leading dims {lead} + (k,)")
    if routing_weights is not None:
        _lead_check("routing_weights", routing_weights, lead, k, "{full} like expert_ids")
    _check_frozen(base, weight, bias, lead, d_in, d_out)
    if x_per_slot and algo in ("dense", "fused"):
        _fail(ValueError, f"algo={algo!r} reads one x row per token; x_per_slot needs 'grouped'")

    T = math.prod(lead)
    x2 = _as_shape(x, (T * (k if x_per_slot else 1), d_in))
    ids2 = _as_shape(expert_ids, (T, k))
    w2 = None if routing_weights is None else _as_shape(routing_weights, (T, k))
    # On the CPU the frozen GEMM runs last and accumulates into the adapter's output (beta = 1):
    # its read of that output rides in MKL's compute-bound GEMM, where the expand would otherwise
    # stream base through memory once more. On a GPU the fused / grouped epilogue reads base.
    # NOTE: the other order, the frozen GEMM first and the expand adding into its output in
    # place, ran the layer forward at 1.31-1.34x the base linear against 1.28-1.32x, timed as the
    # bench suite does (one call after another implementation's; T=1024 llama up shape, 2
    # threads, 2-core Xeon, 2026-12-05).
    # NOTE: the frozen GEMM stays on BLAS: our own AVX-512 SGEMM (14 x 32 zmm micro-tile, packed
    # panels), the candidate for an epilogue that adds the expand while y is in registers (no
    # separate y pass: a third of the expand's time), ran x [1024, 512] W^T [512, 1376] in
    # 9.0-10.0 ms at 1 thread (MKL 9.0-9.4) but 4.7-5.6 ms at 2 (MKL 4.1-4.8): the epilogue
    # would buy back less than that (2-core Xeon with AVX-512, 2026-12-04). A second one (8 x 48
    # zmm tiles, b prefetched into L1, columns split between threads in whole zmm; the expand as
    # extra reduction steps of the same tile over a panel's experts, tokens sorted by experts)
    # ran the GEMM alone in 4.9-5.3 ms against MKL's 4.5-4.9 and the fused op in 5.7-5.9 ms
    # against 5.4-5.5 for the expand, then addmm (2 threads, 2026-12-05): not kept.
    # (Under autocast the op's output takes the autocast dtype, which F.linear's output matches.)
    # (x.is_cpu: x.device builds a device object, ~10 us of a T=1024 call right after a GEMM)
    cpu_fp = x.is_cpu and not torch.is_autocast_enabled("cpu")
    fold = weight is not None and not x_per_slot and cpu_fp
    base2 = None if fold else _base(x2 if not x_per_slot else None, base, weight, bias, T, d_out)
    needs_grad = _needs_grad(x, lora_A, lora_B, routing_weights, base, weight, bias)

    if max_rank is None:
        max_rank = _max_rank(rank_offsets, R)
    if algo == "auto":
        algo = "grouped" if x_per_slot or dispatched is not None else _pick(
            x2, T, d_in, d_out, E, k, R, max_rank, base2 is not None or fold, needs_grad)

    if algo == "grouped":
        order, pos, eo = dispatched if dispatched is not None else ops.dispatch(ids2, E, 1)
        # (Under autocast the ops' own nodes record the casts their autocast kernels make.)
        if cpu_fp and needs_grad:
            frozen = (weight, bias) if fold else (None, None)
            y = _GroupedNode.apply(x2, lora_A, lora_B, w2, scales, base2, *frozen, rank_offsets,
                                   order, pos, eo, x_per_slot, max_rank)
            return _as_shape(y, (*lead, d_out))
        h = ops.sgmv_shrink(x2, lora_A, rank_offsets, order, _by_slot(pos, x_per_slot), eo,
                            None, None, max_rank=max_rank)
        y = ops.sgmv_expand(h, lora_B, rank_offsets, order, pos, eo, w2, scales, base2)
    elif algo == "dense":
        _checks.ids_in_range(_OP, "expert_ids", ids2, -1, E)
        gate = reference.pair_gate(w2, ids2, E, _checks.opmath_dtype(x.dtype))
        y = ops.stacked_gated_lora(x2, lora_A, lora_B, gate, rank_offsets, scales, base2, False)
    else:
        y = ops.fused_moe_lora(x2, lora_A, lora_B, rank_offsets, w2, ids2, scales, base2)
    if fold:
        y = _add_frozen(y, x2, weight, bias)
    return _as_shape(y, (*lead, d_out))


class RoutedOutput(NamedTuple):
    """What ``routed_moe_lora_linear`` returns (leading dims ``...`` those of x)."""

    y: torch.Tensor                # [..., d_out], x's dtype
    router_logits: torch.Tensor    # [..., E], x's dtype (for an auxiliary loss: differentiable)
    routing_weights: torch.Tensor  # [..., k] float32 (float64 for float64 x), differentiable
    expert_ids: torch.Tensor       # [..., k] int32


def routed_moe_lora_linear(x: torch.Tensor, router_weight: torch.Tensor, lora_A: torch.Tensor,
                           lora_B: torch.Tensor, rank_offsets: torch.Tensor, top_k: int,
                           scales: Optional[torch.Tensor] = None, *,
                           router_bias: Optional[torch.Tensor] = None, renormalize: bool = True,
                           base: Optional[torch.Tensor] = None,
                           weight: Optional[torch.Tensor] = None,
                           bias: Optional[torch.Tensor] = None, algo: str = "auto",
                           max_rank: Optional[int] = None) -> RoutedOutput:
    """The MoE-LoRA linear behind its own softmax -> top-k router (MoLA's per-layer router,
    MixLoRA's / Mixtral's softmax-top-k):

        router_logits = x @ router_weight^T + router_bias
        routing_weights, expert_ids = ops.softmax_topk(router_logits, top_k, renormalize)
        y = moe_lora_linear(x, lora_A, lora_B, rank_offsets, routing_weights, expert_ids, scales,
                            base=base, weight=weight, bias=bias, algo=algo)

    The same results as those three calls (forward and every gradient, the router's included);
    on the CPU the grouped formulation runs them as one autograd node, so the router's gradient
    and x's three gradients (adapter, router, frozen layer) are taken in one pass.

    Args:
        x: [..., d_in] float. router_weight: [E, d_in], router_bias: [E] or None (the gate).
        lora_A, lora_B, rank_offsets, scales, base, weight, bias, algo, max_rank: as in
            ``moe_lora_linear`` (E experts: rank_offsets is [E+1]).
        top_k: experts per token, 1 <= top_k <= E. renormalize: divide the k probabilities by
            their sum (MixLoRA, Mixtral); False keeps the softmax's values (MoLA).
    Returns:
        RoutedOutput(y [..., d_out], router_logits [..., E], routing_weights [..., k],
        expert_ids [..., k] int32): the logits and weights are differentiable, for a
        load-balancing loss.
    Raises:
        ValueError / TypeError on bad shapes, dtypes, top_k or algo, before any kernel runs.
    """
    E, R, d_in, d_out = _check_bank(x, lora_A, lora_B, rank_offsets, algo)
    if router_weight.dim() != 2 or tuple(router_weight.shape) != (E, d_in):
        _fail(ValueError, f"router_weight must have shape ({E}, {d_in}) (E experts, d_in), got "
                          f"{tuple(router_weight.shape)}")
    if router_bias is not None and tuple(router_bias.shape) != (E,):
        _fail(ValueError, f"router_bias must have shape ({E},), got {tuple(router_bias.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        _fail(ValueError, f"top_k must be an int in [1, {E}], got {top_k!r}")
    lead = tuple(x.shape[:-1])
    _check_frozen(base, weight, bias, lead, d_in, d_out)
    # x [T, d_in] (the common case) passes as it is and its outputs need no reshape. NOTE: this
    # function's Python ran ~100 us of a T=1024 llama up forward right after other
    # implementations' GEMMs (cold code: ~1-3 us a line, 7 us hot), so its CPU path makes as few
    # calls as it can: 20 us less before the op and 20 after (medians of the layer forward timed
    # as the bench suite does, 2-core Xeon, 2026-12-05). Left, timed the same way (2026-12-06):
    # its checks 19 us, the choice of algo 16, RoutedOutput 10; the torch.ops call itself (Python
    # to the C++ kernel and back, 13 arguments) 57 + 44 us even called directly, and about as
    # much with 1 or 4 outputs instead of 8: together about 0.04x of the base linear's time. A
    # CPU path ahead of the checks (none in Python: the op checks every argument; a failing
    # call run again through them for their message; algo="auto" memoised by the shapes) was on
    # par, 1.252-1.258x the base linear against 1.250-1.256x; even no checks, no choice and no
    # wrappers at all gave only 1.238-1.250x (5 implementations in shuffled rounds, one call
    # each, 20 s a run, 2026-12-06): cold, a line costs by the code and data it touches.
    flat = len(lead) == 1
    T = lead[0] if flat else math.prod(lead)
    x2 = x if flat else _as_shape(x, (T, d_in))
    base2 = base if base is None or flat else _as_shape(base, (T, d_out))
    if max_rank is None:
        max_rank = _max_rank(rank_offsets, R)
    cpu_fp = x.is_cpu and not torch.is_autocast_enabled("cpu")
    if cpu_fp and algo == "auto":
        algo = _pick(x, T, d_in, d_out, E, top_k, R, max_rank,
                     base is not None or weight is not None or bias is not None,
                     _needs_grad(x, router_weight, router_bias, lora_A, lora_B, base, weight,
                                 bias))
    if cpu_fp and algo == "grouped":
        # (autograd: the op's C++ kernel, csrc/autograd.cpp; no Python in its backward)
        y, logits, w, ids = ops.routed_moe_lora(x2, router_weight, router_bias, lora_A, lora_B,
                                                rank_offsets, scales, base2, weight, bias, top_k,
                                                renormalize, max_rank)[:4]
    else:
        logits = F.linear(x2, router_weight, router_bias)
        w, ids = ops.softmax_topk(logits, top_k, renormalize)
        y = moe_lora_linear(x2, lora_A, lora_B, rank_offsets, w, ids, scales, base=base2,
                            weight=weight, bias=bias, algo=algo, max_rank=max_rank)
    if flat:
        return RoutedOutput(y, logits, w, ids)
    return RoutedOutput(_as_shape(y, (*lead, d_out)), _as_shape(logits, (*lead, E)),
                        _as_shape(w, (*lead, top_k)), _as_shape(ids, (*lead, top_k)))


class _GroupedNode(torch.autograd.Function):
    """The grouped formulation as one autograd node where a gradient will be taken on the CPU:
    shrink -> expand (-> the frozen GEMM folded in, with weight) forward, and the backward's
    kernels called in sequence (the ops' own formulas, ``ops.sgmv.expand_grads`` /
    ``shrink_grads``), the frozen GEMM's d x accumulating into the adapter's (beta = 1). Two op
    nodes ran ~1 ms more per training step (T=1024 llama up shape, 13.1 against 14.1 ms, 2-core
    Xeon, 2026-12-04): each op's Python autograd kernel, its saved context, and a separate
    d x accumulation."""

    @staticmethod
    def forward(ctx, x2, A, B, w2, scales, base2, weight, bias, ro, order, pos, eo, x_per_slot,
                max_rank):
        h = native("sgmv_shrink")(x2, A, ro, order, _by_slot(pos, x_per_slot), eo, None, None,
                                  max_rank)
        y = native("sgmv_expand")(h, B, ro, order, pos, eo, w2, scales, base2)
        if weight is not None:
            y = _add_frozen(y, x2, weight, bias)
        ctx.save_for_backward(x2, A, B, w2, scales, weight, h, ro, order, pos, eo)
        ctx.x_per_slot = x_per_slot
        return y

    @staticmethod
    @once_differentiable  # first-order only, as every op's formula (ops/_registry.py)
    def backward(ctx, grad_y):
        x2, A, B, w2, scales, weight, h, ro, order, pos, eo = ctx.saved_tensors
        pos_in = _by_slot(pos, ctx.x_per_slot)
        need = ctx.needs_input_grad
        # dh comes back unweighted (u, which d w needs anyway) and the A-side kernels weight it:
        # per slot, as the shrink's rows, with x_per_slot.
        w_later = None if w2 is None else _by_slot(w2, ctx.x_per_slot)
        grad_h, grad_B, grad_w = sgmv.expand_grads(grad_y, h, B, (ro, order, pos, eo), w2, scales,
                                                   need[0] or need[1], need[2], need[3],
                                                   unweighted_h=w_later is not None)
        grad_x = grad_A = None
        if grad_h is not None:
            grad_x, grad_A, _ = sgmv.shrink_grads(grad_h, x2, A, (ro, order, pos_in, eo), w_later,
                                                  None, need[0], need[1], False)
        grad_x, grad_W, grad_bias = sgmv.frozen_grads(grad_y, grad_x, x2, weight, need[0],
                                                      need[6], need[7])
        grad_base = grad_y if need[5] else None
        return (grad_x, grad_A, grad_B, grad_w, None, grad_base, grad_W, grad_bias,
                None, None, None, None, None, None)


def _by_slot(t: torch.Tensor, x_per_slot: bool) -> torch.Tensor:
    """A [T, k] pos / routing weights as the shrink's rows see them: with x_per_slot every slot
    reads its own x row, so [T * k, 1]."""
    return t.reshape(-1, 1) if x_per_slot else t


def _add_frozen(y: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y += x2 weight^T (+ bias), in place: the frozen GEMM accumulating into the adapter's y."""
    y = y.addmm_(x2, weight.t())
    return y if bias is None else y.add_(bias)


def _as_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """t itself where it has the shape already, else its reshape. NOTE: an alias adds a view node
    to the graph, and the gradient it passes on is a view: the autograd engine then sums x's
    gradients (adapter + router) out of place, a [T, d_in] allocation and copy more (0.38 ms of
    a T=1024 training step, 2-core Xeon, 2026-12-04)."""
    return t if tuple(t.shape) == tuple(shape) else t.reshape(shape)


def _base(x2, base, weight, bias, T: int, d_out: int) -> Optional[torch.Tensor]:
    if weight is not None:
        if x2 is None:
            _fail(ValueError, "weight needs one x row per token; with x_per_slot pass base")
        return F.linear(x2, weight, bias)
    if base is not None:
        base2 = _as_shape(base, (T, d_out))
        return base2 if bias is None else base2 + bias
    if bias is not None:
        return bias.expand(T, d_out)
    return None


def _max_rank(rank_offsets: torch.Tensor, R: int) -> int:
    if rank_offsets.device.type != "cpu" or torch.compiler.is_compiling() or R == 0:
        return R
    return int((rank_offsets[1:] - rank_offsets[:-1]).max())
