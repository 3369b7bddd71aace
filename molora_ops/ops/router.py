"""Family 1, router ops: logits [T, E] -> routing weights [T, k] (fp32 math) and expert ids [T, k]
(int32, descending, ties toward the lower id), differentiable w.r.t. the logits."""

from __future__ import annotations

import torch

from .. import _checks, reference
from ._registry import call, define, native

# --- checks + fakes ------------------------------------------------------------------------------


def _route_outputs(lg, width):
    T = lg.shape[0]
    return (lg.new_empty((T, width), dtype=_checks.opmath_dtype(lg.dtype)),
            lg.new_empty((T, width), dtype=torch.int32))


def _check_softmax_topk(logits, k, renormalize):
    _checks.topk_k("softmax_topk", k, _checks.logits("softmax_topk", logits))


def _check_topk_softmax(logits, k, temperature):
    _checks.topk_k("topk_softmax", k, _checks.logits("topk_softmax", logits))
    _checks.value("topk_softmax", temperature > 0, f"temperature must be > 0, got {temperature}")


def _check_sigmoid_topk(logits, k, bias, normalize, bias_in_weights, scale):
    E = _checks.logits("sigmoid_topk", logits)
    _checks.topk_k("sigmoid_topk", k, E)
    _checks.vector("sigmoid_topk", "bias", bias, E, logits)


def _check_softmax_topp(logits, top_p, min_k, entropy_threshold, q, eps):
    op = "softmax_topp"
    E = _checks.logits(op, logits)
    _checks.value(op, 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    _checks.value(op, 1 <= min_k <= E, f"min_k must be in [1, E] = [1, {E}], got {min_k}")
    _checks.value(op, eps >= 0, f"eps must be >= 0, got {eps}")


def _check_softmax_route_backward(grad_weights, weights, ids, logits, renormalized, scale):
    _checks.route_grad("softmax_route_backward", grad_weights, weights, ids, logits)


def _check_sigmoid_topk_backward(grad_weights, weights, ids, logits, bias, normalize,
                                 bias_in_weights, scale):
    _checks.route_grad("sigmoid_topk_backward", grad_weights, weights, ids, logits)
    _checks.vector("sigmoid_topk_backward", "bias", bias, logits.shape[1], logits)


def _fake_softmax_topk(logits, k, renormalize):
    return _route_outputs(logits, k)


def _fake_topk_softmax(logits, k, temperature):
    return _route_outputs(logits, k)


def _fake_sigmoid_topk(logits, k, bias, normalize, bias_in_weights, scale):
    return _route_outputs(logits, k)


def _fake_softmax_topp(logits, top_p, min_k, entropy_threshold, q, eps):
    return _route_outputs(logits, logits.shape[1])


def _fake_softmax_route_backward(grad_weights, weights, ids, logits, renormalized, scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_sigmoid_topk_backward(grad_weights, weights, ids, logits, bias, normalize,
                                bias_in_weights, scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# --- autograd ------------------------------------------------------------------------------------
# Every router saves (logits, weights, ids) and hands the logits gradient to a backward op; the
# keep mask / top-k selection is piecewise constant, so only the weights carry gradient.


def _save_route(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0], output[1])
    ctx.options = inputs[1:]


def _softmax_route_grad(renormalized, scale_of):
    def backward(ctx, grad_weights, _grad_ids):
        logits, weights, ids = ctx.saved_tensors
        grad = native("softmax_route_backward")(grad_weights, weights, ids, logits, renormalized,
                                                scale_of(ctx.options))
        return (grad,) + (None,) * len(ctx.options)
    return backward


def _softmax_topk_backward(ctx, grad_weights, _grad_ids):
    logits, weights, ids = ctx.saved_tensors
    renormalize = ctx.options[1]
    grad = native("softmax_route_backward")(grad_weights, weights, ids, logits, renormalize, 1.0)
    return grad, None, None


def _save_sigmoid_route(ctx, inputs, output):
    # The bias goes through save_for_backward too: an in-place update of it between forward and
    # backward (aux-free balancing) then raises autograd's version error instead of silently
    # differentiating through the updated bias.
    ctx.save_for_backward(inputs[0], output[0], output[1], inputs[2])
    ctx.options = inputs[1:2] + inputs[3:]


def _sigmoid_topk_backward(ctx, grad_weights, _grad_ids):
    logits, weights, ids, bias = ctx.saved_tensors
    _k, normalize, bias_in_weights, scale = ctx.options
    grad = native("sigmoid_topk_backward")(grad_weights, weights, ids, logits, bias, normalize,
                                           bias_in_weights, scale)
    return grad, None, None, None, None, None


define("softmax_topk(Tensor logits, int k, bool renormalize) -> (Tensor weights, Tensor ids)",
       check=_check_softmax_topk, fake=_fake_softmax_topk, reference=reference.softmax_topk,
       backward=_softmax_topk_backward, setup_context=_save_route)
define("topk_softmax(Tensor logits, int k, float temperature) -> (Tensor weights, Tensor ids)",
       check=_check_topk_softmax, fake=_fake_topk_softmax, reference=reference.topk_softmax,
       backward=_softmax_route_grad(True, lambda opts: 1.0 / opts[1]), setup_context=_save_route)
define("sigmoid_topk(Tensor logits, int k, Tensor? bias, bool normalize, bool bias_in_weights, "
       "float scale) -> (Tensor weights, Tensor ids)",
       check=_check_sigmoid_topk, fake=_fake_sigmoid_topk, reference=reference.sigmoid_topk,
       backward=_sigmoid_topk_backward, setup_context=_save_sigmoid_route)
define("softmax_topp(Tensor logits, float top_p, int min_k, float entropy_threshold, float q, "
       "float eps) -> (Tensor weights, Tensor ids)",
       check=_check_softmax_topp, fake=_fake_softmax_topp, reference=reference.softmax_topp,
       backward=_softmax_route_grad(False, lambda opts: 1.0), setup_context=_save_route)
define("softmax_route_backward(Tensor grad_weights, Tensor weights, Tensor ids, Tensor logits, "
       "bool renormalized, float scale) -> Tensor",
       check=_check_softmax_route_backward, fake=_fake_softmax_route_backward,
       reference=reference.softmax_route_backward, kind="backward")
define("sigmoid_topk_backward(Tensor grad_weights, Tensor weights, Tensor ids, Tensor logits, "
       "Tensor? bias, bool normalize, bool bias_in_weights, float scale) -> Tensor",
       check=_check_sigmoid_topk_backward, fake=_fake_sigmoid_topk_backward,
       reference=reference.sigmoid_topk_backward, kind="backward")


# --- wrappers ------------------------------------------------------------------------------------


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool = True):
    """softmax -> top-k (-> renormalise): MixLoRA, MoLA, Mixtral routers.

    Args:
        logits: [T, E] float (fp16/bf16/fp32/fp64).
        k: experts per token, 1 <= k <= E.
        renormalize: divide the k probabilities by their sum.
    Returns:
        weights [T, k] float32 (float64 for float64 logits), ids [T, k] int32, sorted by
        descending probability, ties toward the lower id. Differentiable w.r.t. logits.
    """
    return call("softmax_topk", logits, k, renormalize)


def topk_softmax(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """top-k on the logits -> softmax(selected / temperature): MeteoRA, Uni-MoE.

    Args: logits [T, E] float; k in [1, E]; temperature > 0.
    Returns: weights [T, k] fp32 (fp64 for fp64 logits), ids [T, k] int32.
    """
    return call("topk_softmax", logits, k,
                temperature)


def sigmoid_topk(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                 normalize: bool = True, bias_in_weights: bool = False, scale: float = 1.0):
    """sigmoid (+ selection bias) -> top-k -> normalise x scale: SMoRA, DeepSeek-V3 style.

    ``s = sigmoid(logits)``; ids = top-k of ``s + bias``; ``v = (s + bias)[ids]`` if
    ``bias_in_weights`` (SMoRA) else ``s[ids]``; ``weights = scale * v / v.sum()`` if ``normalize``
    else ``scale * v``. SMoRA: ``normalize=True, bias_in_weights=True, scale=k``.

    Args: logits [T, E] float; k in [1, E]; bias [E] float or None (never differentiated).
    Returns: weights [T, k] fp32 (fp64 for fp64 logits), ids [T, k] int32.
    """
    return call("sigmoid_topk", logits, k, bias,
                normalize, bias_in_weights, scale)


def softmax_topp(logits: torch.Tensor, top_p: float, min_k: int = 1,
                 entropy_threshold: float = 1.0, q: float = 1.1, eps: float = 1e-5):
    """Top-p routing with a minimum count and a Tsallis-entropy broadcast (DynMoLE).

    Keeps the most probable experts while their cumulative probability is <= ``top_p``, at least
    ``min_k`` of them, and all E when the normalised Tsallis entropy of ``p + eps`` exceeds
    ``entropy_threshold`` (only when ``q > 0`` and ``entropy_threshold < 1``, as DynMoLE does).
    DynMoLE's published setting: ``top_p=0.75, min_k=2, entropy_threshold=0.9, q=1.1``.

    Args: logits [T, E] float.
    Returns: weights [T, E] fp32 (probabilities, NOT renormalised; 0 where dropped), ids [T, E]
        int32 (-1 where dropped); kept experts form a prefix of each row. Feed ``ids`` to
        ``dispatch`` (ids of -1 are dropped there).
    """
    return call("softmax_topp", logits, top_p, min_k,
                entropy_threshold, q, eps)


def softmax_route_backward(grad_weights, weights, ids, logits, renormalized: bool, scale: float):
    """d logits of the softmax routers (see docs/OPS.md). Returns [T, E] with the logits' dtype."""
    return call("softmax_route_backward", grad_weights, weights, ids, logits,
                renormalized, scale)


def sigmoid_topk_backward(grad_weights, weights, ids, logits, bias, normalize: bool,
                          bias_in_weights: bool, scale: float):
    """d logits of ``sigmoid_topk``. Returns [T, E] with the logits' dtype."""
    return call("sigmoid_topk_backward", grad_weights, weights, ids, logits, bias,
                normalize, bias_in_weights, scale)
