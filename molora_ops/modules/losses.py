"""Auxiliary losses of the MoE-LoRA methods, as plain differentiable PyTorch functions.

Method math: ``/work/shared/docs/METHODS.md`` (section given in each docstring). Every function

* computes in fp32 (inputs are cast with ``.float()``; float64 inputs stay float64) and returns a
  0-d tensor (``tsallis_entropy``: one value per row) that is differentiable w.r.t. its float inputs;
* applies NO loss coefficient unless its docstring says so (callers multiply): the exceptions are
  ``dynmole_loss``, ``meteora_gate_loss`` and ``lora_mixer_rsl_loss``, whose coefficients are part of
  the published loss and have the published values as defaults;
* validates its inputs: ``TypeError`` for a wrong type / dtype, ``ValueError`` for a wrong shape or
  option, ``IndexError`` for expert ids out of range (the op contract's classes, docs/OPS.md); the
  message starts with ``molora.losses.<function>:`` and names the argument. Checks of VALUES (id
  ranges, task types) follow the value-check mode (``molora_ops.set_value_checks``): on the host
  for CPU tensors in eager mode, else a device-side assert naming the class, so that no loss
  synchronises with the device or breaks a compiled graph.

Conventions shared by the routing losses:

* ``probs`` are the full router probabilities ``softmax(z)`` ``[T, E]`` (leading dims, e.g.
  ``[B, S, E]``, are flattened row-major into T). Where a list / tuple of per-layer tensors is
  accepted, the layers are concatenated along the tokens (the HF-Mixtral / MoE-PEFT convention), and
  ``ids`` must then be a list of the same length (or one tensor holding all the rows).
* ``ids`` ``[T, k]`` int32/int64 are the selected experts; ``-1`` marks a dropped slot (counted for
  no expert, as ``molora_ops.id_histogram``).
* ``attention_mask`` (optional; bool or 0/1, nonzero = real token) has one entry per token of one
  layer, ``[T]`` or ``[B, S]`` flattened row-major; with several layers it is repeated for each
  (a single tensor of ``L * B * S`` rows with a ``[B, S]`` mask is read the same way, as HF Mixtral
  does). Masked tokens are excluded from every mean; a mean over no token is 0 (not NaN).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import _checks, distributed, ops
from ..reference._common import tsallis_entropy_parts

__all__ = [
    "mixtral_load_balancing_loss",
    "switch_load_balancing_loss",
    "router_z_loss",
    "tsallis_entropy",
    "dynmole_loss",
    "mola_balance_loss",
    "mola_balance_loss_per_module",
    "llava_mole_balance_loss",
    "loramoe_lbc_loss",
    "mole_gate_balance_loss",
    "meteora_gate_loss",
    "moelora_contrastive_loss",
    "lora_mixer_rsl_loss",
    "expert_counts",
    "aux_free_bias_update_",
]

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]

_INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

def _op(fn: str) -> str:
    return f"molora.losses.{fn}"


def _fail(exc, fn: str, msg: str):
    raise exc(f"{_op(fn)}: {msg}")


def _ids_in_range(fn: str, name: str, ids: torch.Tensor, lo: int, hi: int) -> None:
    """IndexError unless every value of ``ids`` lies in ``[lo, hi)``: a host check on CPU in eager
    mode, a device-side assert otherwise (an aux loss runs every layer every step: a host read
    here would synchronise the stream and break a compiled graph)."""
    _checks.ids_in_range(f"losses.{fn}", name, ids, lo, hi)


def _opmath(x: torch.Tensor) -> torch.Tensor:
    """fp32 copy of a floating tensor (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _tensor(fn: str, name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, fn, f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _float(fn: str, name: str, x, ndim: Optional[int] = None, min_dim: int = 1) -> torch.Tensor:
    """Checked opmath (fp32 / fp64) view of a floating tensor with ``ndim`` (or >= ``min_dim``) dims."""
    _tensor(fn, name, x)
    if not x.dtype.is_floating_point:
        _fail(TypeError, fn, f"{name} must be a floating tensor, got {x.dtype}")
    if (ndim is not None and x.dim() != ndim) or x.dim() < min_dim:
        want = f"{ndim}-D" if ndim is not None else f"at least {min_dim}-D"
        _fail(ValueError, fn, f"{name} must be {want}, got shape {tuple(x.shape)}")
    return _opmath(x)


def _index(fn: str, name: str, x) -> torch.Tensor:
    _tensor(fn, name, x)
    if x.dtype not in _INDEX_DTYPES:
        _fail(TypeError, fn, f"{name} must be int32 or int64, got {x.dtype}")
    return x


def _same_device(fn: str, name: str, x: torch.Tensor, ref: torch.Tensor):
    if x.device != ref.device:
        _fail(ValueError, fn, f"{name} is on {x.device} but the first input is on {ref.device}")


def _num_experts(fn: str, num_experts, E: int) -> int:
    if num_experts is None:
        return E
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        _fail(TypeError, fn, f"num_experts must be an int or None, got {type(num_experts).__name__}")
    if num_experts != E:
        _fail(ValueError, fn, f"num_experts={num_experts} but probs has {E} expert columns")
    return E


def _rows(fn: str, name: str, x: TensorOrList, index: bool = False,
          width: Optional[int] = None) -> Tuple[torch.Tensor, Optional[List[int]]]:
    """A tensor ``[..., C]`` or a list of them -> (``[T, C]``: leading dims flattened, layers
    concatenated; rows per layer, or None for a single tensor)."""
    is_list = isinstance(x, (list, tuple))
    parts = list(x) if is_list else [x]
    if is_list and not parts:
        _fail(ValueError, fn, f"{name} is an empty list")
    out = []
    for i, t in enumerate(parts):
        nm = f"{name}[{i}]" if is_list else name
        t = _index(fn, nm, t) if index else _float(fn, nm, t)
        if t.dim() < 2:
            _fail(ValueError, fn, f"{nm} must be at least 2-D [..., C], got shape {tuple(t.shape)}")
        if width is not None and t.shape[-1] != width:
            _fail(ValueError, fn, f"{nm} must have {width} columns, got shape {tuple(t.shape)}")
        width = t.shape[-1]
        out.append(t.reshape(-1, width))
    return (torch.cat(out) if len(out) > 1 else out[0]), ([o.shape[0] for o in out] if is_list else None)


def _keep(fn: str, attention_mask, T: int, layer_rows: Optional[List[int]], device) -> Optional[torch.Tensor]:
    """bool ``[T]`` (True = real token) from a per-layer token mask, repeated per layer; None = all."""
    if attention_mask is None:
        return None
    _tensor(fn, "attention_mask", attention_mask)
    if attention_mask.dtype.is_complex:
        _fail(TypeError, fn, f"attention_mask must be bool or 0/1, got {attention_mask.dtype}")
    m = attention_mask.reshape(-1).to(device) != 0
    M = m.numel()
    if layer_rows is not None:
        ok = all([r == M for r in layer_rows])  # a list: torch.compile traces no generator
    else:
        ok = M == T or (M > 0 and T % M == 0)
    if not ok:
        _fail(ValueError, fn, f"attention_mask has {M} tokens (shape {tuple(attention_mask.shape)}) "
                              f"but the inputs have {T} token rows"
                              + (f" in layers of {layer_rows} rows" if layer_rows is not None else ""))
    return m if M == T else m.repeat(T // M)


def _layers_bse(fn: str, name: str, x: TensorOrList) -> Tuple[List[torch.Tensor], bool]:
    """A [B, S, E] float tensor or a non-empty list of equal-shaped ones -> (opmath tensors, is_list)."""
    is_list = isinstance(x, (list, tuple))
    parts = list(x) if is_list else [x]
    if not parts:
        _fail(ValueError, fn, f"{name} is an empty list")
    out = [_float(fn, f"{name}[{i}]" if is_list else name, t, ndim=3) for i, t in enumerate(parts)]
    for i, t in enumerate(out):
        if t.shape != out[0].shape:
            _fail(ValueError, fn, f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(out[0].shape)}")
    return out, is_list


def _index_shaped(fn: str, name: str, x, shape, ref: torch.Tensor) -> torch.Tensor:
    """An int32/int64 tensor of exactly ``shape`` on ``ref``'s device."""
    _index(fn, name, x)
    if tuple(x.shape) != tuple(shape):
        _fail(ValueError, fn, f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    _same_device(fn, name, x, ref)
    return x


def _bs_keep(fn: str, attention_mask, B: int, S: int, device) -> Optional[torch.Tensor]:
    """bool [B, S] (True = real token) from an optional [B, S] mask; None = every position."""
    if attention_mask is None:
        return None
    _tensor(fn, "attention_mask", attention_mask)
    if tuple(attention_mask.shape) != (B, S):
        _fail(ValueError, fn, f"attention_mask must have shape {(B, S)}, got {tuple(attention_mask.shape)}")
    return attention_mask.to(device) != 0


def _top1_column(ids, probs):
    """Top-1 ids given one per token (``[T]`` / ``probs.shape[:-1]``) -> ``[..., 1]``."""
    if isinstance(ids, (list, tuple)):
        pl = probs if isinstance(probs, (list, tuple)) and len(probs) == len(ids) else [None] * len(ids)
        return [_top1_column(i, p) for i, p in zip(ids, pl)]
    if isinstance(ids, torch.Tensor) and (ids.dim() == 1 or (
            isinstance(probs, torch.Tensor) and tuple(ids.shape) == tuple(probs.shape[:-1]))):
        return ids.unsqueeze(-1)
    return ids


def _routing_inputs(fn: str, probs: TensorOrList, ids: TensorOrList, num_experts, attention_mask,
                    top1: bool = False):
    """Checked (p [T, E] opmath, ids [T, k], keep [T] or None) of a probs/ids loss."""
    p, layer_rows = _rows(fn, "probs", probs)
    if top1:
        ids = _top1_column(ids, probs)
    idx, _ = _rows(fn, "ids", ids, index=True, width=1 if top1 else None)
    if idx.shape[0] != p.shape[0]:
        _fail(ValueError, fn, f"ids has {idx.shape[0]} token rows but probs has {p.shape[0]}")
    _same_device(fn, "ids", idx, p)
    E = _num_experts(fn, num_experts, p.shape[1])
    _ids_in_range(fn, "ids", idx, -1, E)
    return p, idx, _keep(fn, attention_mask, p.shape[0], layer_rows, p.device)


# --------------------------------------------------------------------------------------------
# Shared math
# --------------------------------------------------------------------------------------------

def _masked_mean(x: torch.Tensor, keep: Optional[torch.Tensor], dims=0) -> torch.Tensor:
    """Mean of ``x`` over ``dims`` counting only positions where ``keep`` (bool, shaped like the
    leading dims of x; None = all): ``sum(x * keep) / max(#kept, 1)``, so an empty mean is 0."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if keep is None:
        n = math.prod([x.shape[d] for d in dims])  # a list: torch.compile traces no generator
        return x.sum(dims) / max(n, 1)
    w = keep.to(x.dtype).reshape(tuple(keep.shape) + (1,) * (x.dim() - keep.dim())).expand(x.shape)
    return (x * w).sum(dims) / w.sum(dims).clamp_min(1)


def _fraction_per_expert(ids: torch.Tensor, num_experts: int, keep: Optional[torch.Tensor], dims,
                         dtype: torch.dtype) -> torch.Tensor:
    """``f[..., e]`` = masked mean over ``dims`` of ``1[ids == e]`` (an id of -1 is no expert)."""
    one_hot = (ids.unsqueeze(-1) == torch.arange(num_experts, device=ids.device)).to(dtype)
    return _masked_mean(one_hot, keep, dims)


def _balance(f: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Switch / Mixtral form ``E * sum(f * P)`` (f broadcasts against P [E])."""
    return P.shape[-1] * (f * P).sum()


def _mixtral_form(p: torch.Tensor, ids: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    f = _fraction_per_expert(ids, p.shape[1], keep, 0, p.dtype)  # [k, E]
    return _balance(f, _masked_mean(p, keep, 0))


# --------------------------------------------------------------------------------------------
# Load-balancing losses
# --------------------------------------------------------------------------------------------

def mixtral_load_balancing_loss(probs: TensorOrList, ids: TensorOrList, num_experts: Optional[int] = None,
                                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mixtral / MixLoRA load-balancing loss (METHODS.md 2.1), coefficient NOT applied.

    probs [T, E] float (full softmax probabilities; or a list of per-layer tensors, concatenated
    along the tokens), ids [T, k] int32/int64 (-1 = dropped slot, counted for no expert),
    num_experts (None = E; must equal probs.shape[-1]), attention_mask [T] / [B, S] (see module doc).

    ``f[j, e] = mean_t 1[ids[t, j] == e]`` ([k, E]), ``P[e] = mean_t probs[t, e]``,
    ``L = E * sum_{j, e} f[j, e] * P[e]`` (means over unmasked tokens). Uniform routing gives k.
    Reproduces HF ``transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func`` and
    MoE-PEFT ``moe_peft/adapters/mixlora/model.py :: _mixtral_load_balancing_loss_func`` (which take
    logits and re-run softmax / top-k; here the router's probs and ids are passed in), padding
    masked as they do. MoE-PEFT's ``mixlora-dynamic`` loss (``_dynamic_load_balancing_loss_func``)
    is this form with ids [T, E] (-1 for a token's unused slots) but WITHOUT the mask (its
    ``DynamicRouterLoss`` ignores it): pass ``attention_mask=None`` for its value. Multiply by
    the coefficient (MixLoRA: 0.001 in code, 0.01 in the README). Returns a 0-d fp32 (fp64)
    tensor, differentiable w.r.t. probs.
    """
    fn = "mixtral_load_balancing_loss"
    p, idx, keep = _routing_inputs(fn, probs, ids, num_experts, attention_mask)
    return _mixtral_form(p, idx, keep)


def switch_load_balancing_loss(probs: TensorOrList, ids: TensorOrList, num_experts: Optional[int] = None,
                               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (top-1; METHODS.md 2.1 ``mixlora-switch``), no coefficient.

    probs [T, E] float (or a list of per-layer tensors), ids [T] or [T, 1] int (-1 = dropped token,
    e.g. over capacity), attention_mask as in the module doc.

    ``f_e = mean_t 1[id_t == e]``, ``P_e = mean_t probs[t, e]``, ``L = E^2 * mean_e(f_e * P_e)``
    (= ``E * sum_e f_e P_e``, the Mixtral form with k = 1): Switch Transformer eq. (4)-(6).
    Without ``attention_mask`` it equals MoE-PEFT ``mixlora/model.py ::
    _switch_load_balancing_loss_func`` (``SwitchRouterLoss``). MoE-PEFT takes the mask and
    IGNORES it (padded tokens count); here a given mask excludes padded tokens from f and P,
    so on a padded batch the two differ: pass ``attention_mask=None`` for MoE-PEFT's value
    (``MixLoRA(aux_loss_form="moe_peft")`` does). Returns a 0-d fp32 (fp64) tensor.
    """
    fn = "switch_load_balancing_loss"
    p, idx, keep = _routing_inputs(fn, probs, ids, num_experts, attention_mask, top1=True)
    return _mixtral_form(p, idx, keep)


def router_z_loss(logits: TensorOrList, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Router z-loss (ST-MoE; MoE-PEFT ``mixlora-switch``, METHODS.md 2.1), no coefficient.

    logits [T, E] float router logits (or a list of per-layer tensors), attention_mask as in the
    module doc. ``L = mean_t logsumexp(logits[t])^2`` (mean over unmasked tokens). Without
    ``attention_mask`` it equals MoE-PEFT ``mixlora/model.py :: _switch_router_z_loss_func``,
    which averages over every token, padding included (its ``SwitchRouterLoss`` ignores the
    mask). Returns a 0-d fp32 (fp64) tensor.
    """
    fn = "router_z_loss"
    z, layer_rows = _rows(fn, "logits", logits)
    keep = _keep(fn, attention_mask, z.shape[0], layer_rows, z.device)
    return _masked_mean(torch.logsumexp(z, dim=-1) ** 2, keep, 0)


def _mola_layer(fn: str, probs: TensorOrList, ids: TensorOrList, num_experts) -> torch.Tensor:
    """MoLA's balance loss of ONE decoder layer: the rows of all its modules concatenated."""
    pl = list(probs) if isinstance(probs, (list, tuple)) else [probs]
    if isinstance(probs, (list, tuple)):
        widths = [p.shape[-1] for p in pl if isinstance(p, torch.Tensor) and p.dim() >= 1]
        if len(set(widths)) > 1:
            _fail(ValueError, fn, f"the modules of one decoder layer must share E, got expert "
                                  f"counts {widths}; for several decoder layers pass one list "
                                  f"per layer ([[layer 0 modules], [layer 1 modules], ...])")
    p, idx, _ = _routing_inputs(fn, probs, ids, num_experts, None)
    # f_e = count_e / (number of routed (row, slot) pairs): MoLA divides by the total count
    f = _fraction_per_expert(idx, p.shape[1], idx >= 0, (0, 1), p.dtype)
    return _balance(f, _masked_mean(p, None, 0))


def _pair_lists(fn: str, probs, ids):
    is_list = isinstance(probs, (list, tuple))
    if is_list != isinstance(ids, (list, tuple)) or (is_list and (len(probs) != len(ids)
                                                                  or not len(probs))):
        _fail(ValueError, fn, "probs and ids must both be tensors or non-empty lists of the "
                              "same length")
    return is_list


def mola_balance_loss(probs, ids, num_experts: Optional[int] = None) -> torch.Tensor:
    """MoLA load-balancing loss as the authors compute it (METHODS.md 2.2): ONE loss per decoder
    layer, coefficient NOT applied (MoLA uses 0.001). Padding is not masked (as MoLA).

    Inputs, three forms:

    * ``probs [T, E]`` float, ``ids [T, k]`` int: the routing rows of one decoder layer (already
      concatenated over its modules);
    * lists ``[probs_m]``, ``[ids_m]`` (one ``[T_m, E]`` / ``[T_m, k]`` per MoLA module of ONE
      decoder layer; all share E and k): the rows are concatenated along the tokens (MoLA's
      decoder layer does ``torch.cat(router_logits, dim=0)``) and ONE loss is computed;
    * lists of such lists (one inner list per decoder layer, each layer its own E_l): the sum
      over layers of the per-layer losses.

    Per layer, over the concatenated rows: ``f_e = count_e / sum_e count_e`` (the share of all
    routed (row, slot) pairs that went to expert e; ``-1`` slots count for none),
    ``P_e = mean over rows of probs[:, e]``, ``L_l = E_l * sum_e f_e P_e``; ``L = sum_l L_l``.
    Reproduces ``GCYZSL/MoLA: src/mola_modeling_llama_hacked.py :: load_balancing_loss_func``
    fed by the decoder layer's concatenation. num_experts, if given, must match every layer.
    ``mola_balance_loss_per_module`` is the per-module form (about n_modules times larger).
    Returns a 0-d fp32 (fp64) tensor, differentiable w.r.t. probs.
    """
    fn = "mola_balance_loss"
    if not _pair_lists(fn, probs, ids) or not isinstance(probs[0], (list, tuple)):
        return _mola_layer(fn, probs, ids, num_experts)
    total = None
    for l, (p_l, i_l) in enumerate(zip(probs, ids)):
        if not isinstance(p_l, (list, tuple)) or not isinstance(i_l, (list, tuple)):
            _fail(ValueError, fn, f"probs[{l}] / ids[{l}] must be lists (one per module of "
                                  f"decoder layer {l}) like probs[0]")
        _pair_lists(fn, p_l, i_l)
        loss = _mola_layer(fn, p_l, i_l, num_experts)
        total = loss if total is None else total + loss
    return total


def mola_balance_loss_per_module(probs: TensorOrList, ids: TensorOrList,
                                 num_experts: Optional[int] = None) -> torch.Tensor:
    """MoLA's balance formula applied to EACH module separately and summed: NOT the authors'
    loss (``mola_balance_loss`` concatenates a decoder layer's modules first). Kept for
    comparison and for old runs; with all 7 projections it is about 7-8x the authors' value.

    probs [T, E] float and ids [T, k] int, or lists with one entry per module (each its own E):
    ``sum_m E_m * sum_e f_{m,e} P_{m,e}`` with ``f`` and ``P`` as in ``mola_balance_loss``
    computed over module m's rows only. No coefficient. Returns a 0-d fp32 (fp64) tensor.
    """
    fn = "mola_balance_loss_per_module"
    is_list = _pair_lists(fn, probs, ids)
    pl, il = (list(probs), list(ids)) if is_list else ([probs], [ids])
    total = None
    for p_m, i_m in zip(pl, il):
        loss = _mola_layer(fn, p_m, i_m, num_experts)
        total = loss if total is None else total + loss
    return total


def dynmole_loss(probs: TensorOrList, weights: TensorOrList, entropy_coef: float = 0.01,
                 balance_coef: float = 0.001, q: float = 1.1,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DynMoLE auxiliary loss (METHODS.md 2.8), coefficients APPLIED (defaults = published values).

    probs [T, E] float (full softmax), weights [T, E] float = the masked, un-renormalised
    probabilities (``softmax_topp`` weights scattered back to [T, E]: kept experts hold p, others 0);
    lists of per-layer tensors are concatenated along the tokens.

    ``L = entropy_coef * mean_t H_q(p_t) + balance_coef * E * sum_e f_e P_e`` with H_q the
    normalised Tsallis entropy of ``tsallis_entropy`` (eps 1e-5), ``f_e = mean_t weights[t, e]``
    (masked probabilities, not counts), ``P_e = mean_t probs[t, e]``. Reproduces DynMoLE
    ``moe_peft/adapters/dynmole/model.py :: _dynamic_load_balancing_loss_func`` (lambda_dyn 0.01,
    lambda_aux 0.001, q 1.1). Difference: with an attention_mask the reference averages H over all
    tokens (padding included); here padding is excluded from every mean. Returns a 0-d tensor.
    """
    fn = "dynmole_loss"
    p, layer_rows = _rows(fn, "probs", probs)
    w, _ = _rows(fn, "weights", weights, width=p.shape[1])
    if w.shape[0] != p.shape[0]:
        _fail(ValueError, fn, f"weights has {w.shape[0]} token rows but probs has {p.shape[0]}")
    _same_device(fn, "weights", w, p)
    keep = _keep(fn, attention_mask, p.shape[0], layer_rows, p.device)
    H = tsallis_entropy(p, q=q, normalize=True)
    return (entropy_coef * _masked_mean(H, keep, 0)
            + balance_coef * _balance(_masked_mean(w, keep, 0), _masked_mean(p, keep, 0)))


def llava_mole_balance_loss(probs: TensorOrList, ids: TensorOrList,
                            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LLaVA-MoLE expert-balancing loss (METHODS.md 2.13), coefficient NOT applied (paper: 0.05).

    probs [B, S, E] float (or a list of per-layer [B, S, E], concatenated along S), ids [B, S] int
    top-1 expert per token (a list of per-layer [B, S] with list probs; -1 = no expert),
    attention_mask [B, S] (applied to every layer).

    Per sample b, over its (layers x valid tokens): ``sum_e mean(p_e) * mean(onehot_e)``; then the
    mean over the batch. No factor E (Switch form without xE). Reproduces ``forwchen/LLaVA-MoLE:
    model.py :: MLLM_LLaVA_MoLE.forward`` (``llm_mlp_expert_balancing_loss / batch_size``); a sample
    without valid tokens contributes 0 (the reference gives NaN). Returns a 0-d tensor.
    """
    fn = "llava_mole_balance_loss"
    is_list = isinstance(probs, (list, tuple))
    if isinstance(ids, (list, tuple)) != is_list:
        _fail(ValueError, fn, "ids must be a list exactly when probs is a list (one [B, S] per layer)")
    ps, _ = _layers_bse(fn, "probs", probs)
    il = list(ids) if is_list else [ids]
    if len(ps) != len(il):
        _fail(ValueError, fn, f"probs has {len(ps)} layers but ids has {len(il)}")
    B, S, E = ps[0].shape
    il = [_index_shaped(fn, f"ids[{i}]" if is_list else "ids", y, (B, S), ps[0]) for i, y in enumerate(il)]
    p = torch.cat(ps, dim=1)  # [B, L*S, E]
    idx = torch.cat(il, dim=1)  # [B, L*S]
    _ids_in_range(fn, "ids", idx, -1, E)
    keep = _bs_keep(fn, attention_mask, B, S, p.device)
    keep = None if keep is None else keep.repeat(1, len(ps))
    P = _masked_mean(p, keep, 1)  # [B, E]
    f = _fraction_per_expert(idx, E, keep, 1, p.dtype)  # [B, E]
    return (P * f).sum(-1).mean()


def loramoe_lbc_loss(probs: torch.Tensor, task_types: torch.Tensor, delta: float = 0.1,
                     attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LoRAMoE localized balancing constraint (METHODS.md 2.4), coefficient beta NOT applied.

    probs [B, S, E] float (E even: experts e < E/2 are "type 1", e >= E/2 "type 0"), task_types [B]
    int with values in {0, 1} (the sample's type: 1 = world knowledge in the paper), delta the
    importance-scaling blc_alpha, attention_mask [B, S] (None = every position, as the reference).

    ``Q[b, e] = sum_s probs[b, s, e]``, ``I[b, e] = 1 + delta`` if type(e) == task_types[b] else
    ``1 - delta``; ``L = CV^2(vec(Q * I)) = Var / (Mean^2 + 1e-10)`` with the unbiased variance over
    all B*E entries. Reproduces ``Ablustrund/LoRAMoE: peft/tuners/lora.py :: Linear.forward``
    (``blcls``) and ``Linear.cv_squared``. Returns a 0-d tensor.
    """
    fn = "loramoe_lbc_loss"
    p = _float(fn, "probs", probs, ndim=3)
    B, S, E = p.shape
    if E % 2:
        _fail(ValueError, fn, f"the number of experts must be even (two halves), got E = {E}")
    tt = _index_shaped(fn, "task_types", task_types, (B,), p)
    if tt.numel():
        _checks._verify(f"losses.{fn}", tt, ValueError, lambda: ((tt == 0) | (tt == 1)).all(),
                        lambda: f"task_types values must be 0 or 1, got {sorted(set(tt.tolist()))}",
                        "task_types values must be 0 or 1")
    keep = _bs_keep(fn, attention_mask, B, S, p.device)
    if keep is not None:
        p = p * keep.unsqueeze(-1).to(p.dtype)
    Q = p.sum(1)  # [B, E]
    expert_type = (torch.arange(E, device=p.device) < E // 2).long()  # 1 for the first half
    I = torch.where(expert_type[None, :] == tt[:, None].long(), 1.0 + delta, 1.0 - delta).to(p.dtype)
    x = (Q * I).flatten()
    if x.numel() <= 1:
        return x.sum() * 0
    return x.var() / (x.mean() ** 2 + 1e-10)


def mole_gate_balance_loss(gates: torch.Tensor) -> torch.Tensor:
    """MoLE (Wu et al., ICLR'24) gating-balance loss (METHODS.md 3.1), no coefficient.

    gates [..., N] float gate values (softmax over the N LoRA experts; leading dims are tokens).
    ``q_i = mean over tokens of gates[..., i]``, ``L = -log prod_i q_i = -sum_i log q_i``.
    [paper] form (``yushuiwx/MoLE`` has no code). Returns a 0-d tensor.
    """
    fn = "mole_gate_balance_loss"
    g = _float(fn, "gates", gates, min_dim=1)
    if g.shape[-1] < 1 or g.numel() == 0:
        _fail(ValueError, fn, f"gates must hold at least one token and one expert, got shape {tuple(g.shape)}")
    q = _masked_mean(g.reshape(-1, g.shape[-1]), None, 0)
    return -q.log().sum()


def meteora_gate_loss(gate_logits: TensorOrList, task_labels: torch.Tensor, coef: float = 50.0,
                      ignore_index: int = -100) -> torch.Tensor:
    """MeteoRA supervised gate loss (METHODS.md 3.3), coefficient APPLIED (MeteoRA hard-codes 50).

    gate_logits [B, S, E] float (or a list, one per LoRA-MoE module, all [B, S, E]); task_labels
    [B, S] int task id of each token (ignore_index = no label). Positions are shifted like a causal
    LM: ``gate_logits[:, :-1]`` is scored against ``task_labels[:, 1:]``.

    ``L = coef * CE``, CE the mean cross-entropy over every (module, unignored position): the modules'
    shifted logits are concatenated and scored in one ``cross_entropy`` as MeteoRA does, which equals
    the MEAN of the per-module CEs (every module sees the same labels). Reproduces ``NJUDeepEngine/meteora:
    base_model/llama/modeling_llama_meteor.py :: lora_gate_loss_func`` (x ``moe_aux_loss_coef = 50``
    in ``LlamaMeteorForCausalLM.forward``; an older revision summed the per-module CEs with coef
    0.001). No unignored position gives 0. Returns a 0-d tensor.
    """
    fn = "meteora_gate_loss"
    zs, _ = _layers_bse(fn, "gate_logits", gate_logits)
    B, S, E = zs[0].shape
    y = _index_shaped(fn, "task_labels", task_labels, (B, S), zs[0])[:, 1:].reshape(-1).long()
    valid = y != ignore_index
    # Ignored positions are checked as label 0 (in range): no boolean-mask gather, whose output
    # size is data-dependent. The host check keeps the exact min / max of the real labels.
    labels = y[valid] if _checks.on_host(y) else torch.where(valid, y, 0)
    _ids_in_range(fn, "task_labels", labels, 0, E)
    z = torch.cat([t[:, :-1].reshape(-1, E) for t in zs])
    y = y.repeat(len(zs))
    ce_sum = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="sum")
    return coef * ce_sum / (valid.sum() * len(zs)).clamp_min(1)


def moelora_contrastive_loss(expert_outputs: torch.Tensor, ids: torch.Tensor,
                             temperature: float = 0.07) -> torch.Tensor:
    """MoELoRA expert contrastive loss (METHODS.md 2.11), no coefficient.

    expert_outputs [T, k, d] float: the output of the expert in slot (t, j) (pre-combine), ids
    [T, k] int (-1 = dropped slot, its row is ignored). Over the N valid rows: ``z = normalize(row)``,
    ``sim = z z^T / temperature``, self-similarity excluded; for each anchor i with at least one
    positive (another row of the same expert):
    ``l_i = -mean_{p: id_p = id_i, p != i} log softmax_{j != i}(sim[i, j])[p]``; ``L = mean_i l_i``
    (0 when no anchor has a positive). Outputs of the same expert are positives, of other experts
    negatives. The paper's exact formula is UNVERIFIED (no code is public): this is the supervised
    contrastive (SupCon, Khosla et al. 2020, L_out) form of the InfoNCE loss it describes.
    Returns a 0-d tensor.
    """
    fn = "moelora_contrastive_loss"
    x = _float(fn, "expert_outputs", expert_outputs, ndim=3)
    idx = _index_shaped(fn, "ids", ids, x.shape[:2], x)
    if not temperature > 0:
        _fail(ValueError, fn, f"temperature must be > 0, got {temperature}")
    _checks._verify(f"losses.{fn}", idx, IndexError, lambda: (idx >= -1).all(),
                    lambda: "ids has values below -1", "ids has values below -1")
    # Every T*k row takes part, the dropped ones masked out of every pair (no boolean-mask
    # gather, whose size is data-dependent): a dropped row is neither an anchor nor in any
    # denominator. The finite fill keeps a row without any valid partner NaN-free (its
    # logsumexp stays finite and it has no positive); exp(fill - max) is exactly 0 elsewhere.
    valid = (idx >= 0).reshape(-1)
    z = F.normalize(x.reshape(-1, x.shape[-1]), dim=-1)
    lab = idx.reshape(-1)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    pair = valid[:, None] & valid[None, :] & ~eye
    sim = (z @ z.t() / temperature).masked_fill(~pair, torch.finfo(z.dtype).min)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (lab[:, None] == lab[None, :]) & pair
    n_pos = pos.sum(1)
    anchor = n_pos > 0
    mean_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos.clamp_min(1)
    return _masked_mean(-mean_log_prob, anchor, 0)


def lora_mixer_rsl_loss(probs: TensorOrList, ids: TensorOrList, entropy_coef: float = 0.01,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LoRA-Mixer routing specialization loss (METHODS.md 3.11), [paper/abstract] form.

    probs [T, E] float, ids [T, k] int (-1 dropped), attention_mask as in the module doc.
    ``L = mixtral_load_balancing_loss(probs, ids) + entropy_coef * mean_t H(p_t)``,
    ``H(p) = -sum_e (p_e + 1e-5) log(p_e + 1e-5)`` (un-normalised Shannon entropy, the q = 1 case of
    ``tsallis_entropy``): global load balance plus input-aware entropy shaping (minimising H makes
    each token's routing decisive). The paper's code is a placeholder (``hustcselwb/LoRA-Mixer``):
    the exact form and the coefficient are UNVERIFIED; entropy_coef (applied) defaults to 0.01.
    Returns a 0-d tensor.
    """
    fn = "lora_mixer_rsl_loss"
    p, idx, keep = _routing_inputs(fn, probs, ids, None, attention_mask)
    H = tsallis_entropy(p, q=1.0, normalize=False)
    return _mixtral_form(p, idx, keep) + entropy_coef * _masked_mean(H, keep, 0)


# --------------------------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------------------------

def tsallis_entropy(probs: torch.Tensor, q: float = 1.1, normalize: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """Tsallis_q entropy of each row of ``probs`` (DynMoLE, METHODS.md 2.8).

    probs [..., E] float -> H [...] (fp32; fp64 for fp64 input), reducing the last dim.
    With ``pe = probs + eps``: ``H = (1 - sum_e pe^q) / (q - 1)``, divided by its maximum
    ``(1 - E^(1-q)) / (q - 1)`` when normalize; q == 1: Shannon ``H = -sum_e pe log pe``
    normalised by ``log E``; E == 1: H = 0. The same formula (and order of operations) as the
    entropy gate of ``molora_ops.softmax_topp`` (``molora_ops/reference/router.py``), and as
    DynMoLE ``moe_peft/common/moe_utils.py :: tsallis_entropy`` (whose q == 1 branch also uses
    ``pe``, not ``p``, in front of the log). Differentiable w.r.t. probs.
    """
    fn = "tsallis_entropy"
    p = _float(fn, "probs", probs, min_dim=1)
    if p.shape[-1] < 1:
        _fail(ValueError, fn, f"probs must have at least one expert column, got shape {tuple(p.shape)}")
    if not q > 0:
        _fail(ValueError, fn, f"q must be > 0, got {q}")
    if not eps >= 0:
        _fail(ValueError, fn, f"eps must be >= 0, got {eps}")
    H, H_max = tsallis_entropy_parts(p, q, eps)
    if p.shape[-1] == 1:
        return H * 0
    return H / H_max if normalize else H


# --------------------------------------------------------------------------------------------
# Aux-loss-free balancing (SMoRA, FlyLoRA; DeepSeek-V3 style)
# --------------------------------------------------------------------------------------------

def expert_counts(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """counts [num_bins] int32: ``counts[b] = #(ids == b)`` over any-shaped ids (-1 ignored).

    Tokens per expert (or activations per rank); ``molora_ops.id_histogram``.
    """
    fn = "expert_counts"
    _index(fn, "ids", ids)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int):
        _fail(TypeError, fn, f"num_bins must be an int, got {type(num_bins).__name__}")
    return ops.id_histogram(ids, num_bins)


@torch.no_grad()
def aux_free_bias_update_(bias: torch.Tensor, ids: torch.Tensor, num_bins: int, rate: float,
                          sync: Optional[bool] = None, group=None) -> torch.Tensor:
    """In-place aux-loss-free bias update; returns ``bias``.

    bias [num_bins] float (the selection bias, not trained by gradient), ids [...] int routed ids
    (-1 ignored), rate the update speed u (SMoRA 1e-5, FlyLoRA 1e-3).
    ``c = id_histogram(ids, num_bins)``; ``bias += rate * sign(mean(c) - c)``: an over-used expert's
    bias goes down by rate, an under-used one's up, an exactly average one stays (the sign is
    evaluated exactly, as ``sign(sum(c) - num_bins * c)`` in integers). Reproduces SMoRA
    ``srmole/layer.py :: SRMoLELinear.forward`` and FlyLoRA ``lora/layer.py :: Linear.forward``
    (DeepSeek-V3 style). Runs under no_grad.

    Under ``torch.distributed`` (a default group initialised) ``c`` is first summed over ``group``
    (None = the default group) with one ``all_reduce``, so that every rank applies the update of
    the global batch and the replicas stay identical (``molora_ops.distributed``). ``sync``:
    True / False forces it on / off; None follows ``molora_ops.distributed.sync_statistics()``.
    Every rank must then call this the same number of times in the same order (as any collective).
    """
    fn = "aux_free_bias_update_"
    _tensor(fn, "bias", bias)
    if not bias.dtype.is_floating_point:
        _fail(TypeError, fn, f"bias must be a floating tensor, got {bias.dtype}")
    if tuple(bias.shape) != (num_bins,):
        _fail(ValueError, fn, f"bias must have shape ({num_bins},), got {tuple(bias.shape)}")
    _same_device(fn, "ids", _index(fn, "ids", ids), bias)
    c = expert_counts(ids, num_bins).long()
    # The ranks' shards partition the global batch: their summed counts are its counts.
    distributed.all_reduce_counts_(c, sync, group)
    step = torch.sign(c.sum() - num_bins * c).to(bias.dtype)
    return bias.add_(step, alpha=rate)
