"""Drop-in MoE-LoRA for Hugging Face ``transformers`` causal LMs.

One call turns a (frozen) causal LM into a MoE-LoRA model by method name::

    from molora_ops.integrations.hf_transformers import MoLoRAConfig, apply_molora

    model = apply_molora(model, MoLoRAConfig("mixlora", num_experts=8, top_k=2, rank=16))
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss includes the aux loss
    out.loss.backward()                                           # grads: adapters + routers only

What is replaced (found by module name, so any Llama / Mistral / Qwen2-style decoder works):

* decoder layers are the elements of an ``nn.ModuleList`` whose elements have an ``mlp`` or a
  ``self_attn`` child (``model.model.layers`` in Llama, Mistral, Qwen2, ...);
* ``"mixlora"``: each decoder layer's ``mlp`` (an ``nn.Linear`` ``gate_proj`` / ``up_proj`` /
  ``down_proj`` and an ``act_fn``, computing ``down(act(gate(x)) * up(x))``) becomes a
  ``molora_ops.modules.MixLoRA`` (router + LoRA experts on the frozen projections), and the
  attention linears named in ``target_modules`` (default q/k/v/o_proj) a plain ``LoRALinear``;
* the linear methods (``"mola"``, ``"smora"``, ``"hydralora"``, ``"loramoe"``, ``"lora_soups"``,
  ``"lora"``): every ``nn.Linear`` of a decoder layer whose attribute name is in
  ``target_modules`` becomes the method's layer around it.

Each replaced module is a ``MoLoRALayer`` holding the method's module (``.molora``); it is called
exactly as the module it replaced (``x [..., d_in] -> y [..., d_out]``). Everything else is frozen
(``requires_grad=False``); only the LoRA A/B's, routers and static gates train.

Aux losses (MixLoRA's Mixtral load balance, MoLA's balance loss): a forward pre-hook and an
always-called forward hook on the top-level model collect the routing of every MoE-LoRA layer
(with its decoder-layer index) during one top-level forward and reduce them to ONE 0-d fp32
tensor ``aux`` (see ``MoLoRAConfig.aux_loss_reduction``; MoLA: one loss per decoder layer over
the rows of all that layer's MoLA modules, as the MoLA authors). The hook then sets
``outputs["aux_loss"] = aux`` (differentiable) and, when the model computed a loss (labels
given), ``outputs["loss"] = loss + aux``. ``molora_aux_loss(model)`` returns a DETACHED copy of
the last forward's ``aux`` (for logging). The routings are dropped when the top-level forward returns, so no graph outlives the
step; a layer called outside a top-level forward (e.g. ``model.model(...)`` directly, or the
recomputation of gradient checkpointing) records nothing.

Merging (``merge_molora`` / ``unmerge_molora``) folds static adapters (``LoRALinear``,
``LoRASoupsCAT``) into the base weights; routed layers depend on the input and cannot be merged.
``save_molora`` / ``load_molora`` write and read the config JSON plus the adapter / router tensors
only (safetensors), never the base weights; the converted model's ``save_pretrained`` writes the
same (so ``transformers.Trainer`` checkpoints are adapter-only and resume: ``_save_pretrained``).

PEFT-shaped: ``MoLoRAConfig`` takes PEFT's ``r`` / ``lora_alpha`` / ``lora_dropout`` and
``target_modules="all-linear"``; ``print_trainable_parameters``, ``disable_adapter``,
``merge_and_unload`` and ``unload`` exist as functions and as calls on the converted model.
Quantized bitsandbytes bases (``Linear4bit`` / ``Linear8bitLt``) are called, never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..modules import (HydraLoRA, LoRALinear, LoRAMoE, LoRASoupsCAT, MixLoRA, MoLA, SMoRA,
                       mola_experts_per_layer)
from ..modules.ffn import ACTIVATIONS
from ..modules.layers import base_dtype, is_quantized
from ..modules.routing import Routing

__all__ = [
    "MoLoRAConfig", "MoLoRALayer", "apply_molora", "molora_aux_loss", "merge_molora",
    "unmerge_molora", "save_molora", "load_molora", "METHOD_NAMES", "CONFIG_NAME",
    "WEIGHTS_NAME", "ALL_LINEAR", "get_nb_trainable_parameters", "print_trainable_parameters",
    "disable_adapter", "merge_and_unload", "unload",
]

CONFIG_NAME = "molora_config.json"
WEIGHTS_NAME = "molora_adapter.safetensors"
# PEFT's name for "every nn.Linear except the output layer" (here: every nn.Linear of the decoder
# layers, which never include lm_head)
ALL_LINEAR = "all-linear"
# what Trainer's resume reads (see _save_pretrained); the shard it names is WEIGHTS_NAME
_RESUME_INDEX_NAME = "model.safetensors.index.json"
_FORMAT_VERSION = 1

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_ALL_LINEARS = _ATTENTION + ("gate_proj", "up_proj", "down_proj")
_FFN = ("gate_proj", "up_proj", "down_proj")


# --- the methods --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Method:
    """How one method name maps onto modules of ``molora_ops.modules``.

    kind: ``"mlp"`` (the MLP becomes an MoE-FFN; ``target_modules`` get plain LoRA) or
    ``"linear"`` (each targeted linear becomes ``cls(base, **kw)``). fields: config field ->
    constructor argument. defaults: constructor arguments the class itself has no default for.
    aux: whether the layers have a router aux loss the integration collects.
    """

    cls: type
    kind: str
    targets: Tuple[str, ...]
    fields: Dict[str, str]
    defaults: Dict[str, Any] = dataclasses.field(default_factory=dict)
    required: Tuple[str, ...] = ()
    aux: bool = False
    reserved: Tuple[str, ...] = ("base",)


_METHODS: Dict[str, _Method] = {
    # MoE-FFN + plain LoRA on attention (Li et al. 2404.15159; MoE-PEFT insertion)
    "mixlora": _Method(MixLoRA, "mlp", _ATTENTION,
                       dict(num_experts="num_experts", top_k="k", rank="r", alpha="alpha",
                            dropout="dropout", aux_loss_coef="aux_coef"),
                       aux=True, reserved=("gate_proj", "up_proj", "down_proj", "act")),
    # routed LoRA experts on all 7 linears, experts per layer 2/4/6/8 by default (MoLA-triangle)
    "mola": _Method(MoLA, "linear", _ALL_LINEARS,
                    dict(num_experts="num_experts", top_k="k", rank="r", alpha="alpha",
                         dropout="dropout", aux_loss_coef="balance_coef"), aux=True),
    # each rank an expert, all linears (the multidomain config's `lora_target: all`)
    "smora": _Method(SMoRA, "linear", _ALL_LINEARS,
                     dict(rank="r", top_k="k", alpha="alpha", dropout="dropout")),
    # shared A, N dense heads on the FFN projections (HydraLoRA fine-tuning.sh)
    "hydralora": _Method(HydraLoRA, "linear", _FFN,
                         dict(num_experts="num_heads", rank="r", alpha="alpha",
                              dropout="dropout")),
    # dense soft routing on the FFN projections; its LBC needs task labels (off, as released)
    "loramoe": _Method(LoRAMoE, "linear", _FFN,
                       dict(num_experts="num_experts", rank="r", alpha="alpha",
                            dropout="dropout")),
    # static learned weight per adapter; mergeable
    "lora_soups": _Method(LoRASoupsCAT, "linear", _ALL_LINEARS,
                          dict(num_experts="num_adapters", rank="ranks", alpha="alpha",
                               dropout="dropout"), required=("num_experts", "rank")),
    # plain LoRA (one expert); PEFT's LoraConfig defaults r=8, lora_alpha=8, dropout 0
    "lora": _Method(LoRALinear, "linear", _ALL_LINEARS,
                    dict(rank="r", alpha="alpha", dropout="dropout"),
                    defaults=dict(r=8, alpha=8.0, dropout=0.0)),
}

METHOD_NAMES = tuple(_METHODS)
# aux-loss reductions each method accepts (the first is its default)
_AUX_REDUCTIONS = {"mixlora": ("pooled", "sum"), "mola": ("per_layer", "per_module")}


def _class_default(cls: type, name: str) -> Any:
    return inspect.signature(cls).parameters[name].default


# --- the config ---------------------------------------------------------------------------------


@dataclass
class MoLoRAConfig:
    """What ``apply_molora`` builds. ``None`` means the method's published default (the
    defaults of its class in ``molora_ops.modules``; ``docs/MODULES.md``).

    Args:
        method: one of ``METHOD_NAMES``: ``"mixlora"``, ``"mola"``, ``"smora"``,
            ``"hydralora"``, ``"loramoe"``, ``"lora_soups"``, ``"lora"`` (the default, so a
            PEFT ``LoraConfig(r=8, lora_alpha=16, ...)`` call reads the same).
        num_experts: E (HydraLoRA: heads; LoRA Soups: adapters; required for ``lora_soups``).
            Not for ``smora`` (every rank is an expert) or ``lora``.
        top_k: experts per token (mixlora, mola) or ranks per token (smora).
        rank: LoRA rank per expert (smora: the total rank, i.e. the number of rank experts).
        alpha: LoRA alpha (scale alpha / rank; smora: alpha / top_k).
        dropout: LoRA dropout on the adapter input.
        target_modules: attribute names of the ``nn.Linear`` s to adapt inside each decoder
            layer (every name must match at least one), or ``"all-linear"`` (PEFT's: every
            ``nn.Linear`` of the decoder layers, so never ``lm_head``; for mixlora every one
            outside the MLP). mixlora: the linears that get PLAIN LoRA
            (default q/k/v/o_proj; ``()`` for none), the ``mlp`` is always replaced. Defaults:
            mola / smora / lora_soups / lora all 7 projections, hydralora / loramoe
            gate/up/down_proj.
        attention_rank, attention_alpha: mixlora only, rank / alpha of the plain LoRA on
            ``target_modules`` (default: ``rank`` / ``alpha``, else MixLoRA's 16 / 32).
        experts_per_layer: mola only, E of each decoder layer (length = number of layers);
            default when ``num_experts`` is also None: MoLA-triangle
            ``mola_experts_per_layer(num_layers)`` (2/4/6/8 over four blocks of layers).
        aux_loss_coef: the router aux-loss coefficient (mixlora: Mixtral load balance, default
            0.01; mola: balance loss, default 0.001). Only for methods with an aux loss.
        aux_loss_reduction: how the layers' aux losses become one number. mixlora:
            ``"pooled"`` (default, as HF Mixtral / MoE-PEFT): the routings of ALL layers
            concatenated along the tokens, then one loss; ``"sum"``: the sum over decoder layers
            of each layer's loss. mola: ``"per_layer"`` (default, as the MoLA authors): per
            decoder layer, the router rows of all its MoLA modules concatenated along the tokens
            and ONE loss, summed over layers; ``"per_module"``: one loss per adapted linear,
            summed (NOT the authors' loss: about n_modules times larger).
        method_kwargs: further keyword arguments of the method's class (JSON-serialisable), e.g.
            ``{"routing": "dynamic", "top_p": 0.8}`` for MixLoRA or ``{"rank_partition": 2}``
            for SMoRA. Names the fields above already set are refused.
        r, lora_alpha, lora_dropout: PEFT's names of ``rank``, ``alpha``, ``dropout`` (either
            name may be given, both only with equal values); folded into ours on construction.
        task_type: accepted for PEFT configs: None or ``"CAUSAL_LM"`` (no effect).
        bias: PEFT's bias mode: only ``"none"`` (the base biases stay frozen).
    """

    method: str = "lora"
    num_experts: Optional[int] = None
    top_k: Optional[int] = None
    rank: Optional[int] = None
    alpha: Optional[float] = None
    dropout: Optional[float] = None
    target_modules: Optional[Sequence[str]] = None
    attention_rank: Optional[int] = None
    attention_alpha: Optional[float] = None
    experts_per_layer: Optional[Sequence[int]] = None
    aux_loss_coef: Optional[float] = None
    aux_loss_reduction: Optional[str] = None
    method_kwargs: Dict[str, Any] = field(default_factory=dict)
    # PEFT LoraConfig names (folded into the fields above by __post_init__)
    r: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = None
    task_type: Optional[str] = None
    bias: str = "none"

    def _fold_peft_names(self) -> None:
        """PEFT's names -> ours; refuses a PEFT field we cannot honour."""
        for peft_name, name in (("r", "rank"), ("lora_alpha", "alpha"),
                                ("lora_dropout", "dropout")):
            v = getattr(self, peft_name)
            if v is None:
                continue
            mine = getattr(self, name)
            if mine is not None and mine != v:
                raise ValueError(f"MoLoRAConfig: {peft_name}={v!r} and {name}={mine!r} disagree "
                                 f"(PEFT's name and ours for the same field)")
            setattr(self, name, v)
            setattr(self, peft_name, None)
        task = getattr(self.task_type, "value", self.task_type)   # peft.TaskType is a str enum
        if task not in (None, "CAUSAL_LM"):
            raise ValueError(f"MoLoRAConfig: task_type must be None or 'CAUSAL_LM' (decoder "
                             f"LMs), got {self.task_type!r}")
        self.task_type = task
        if self.bias != "none":
            raise ValueError(f"MoLoRAConfig: bias must be 'none' (training base biases is not "
                             f"supported), got {self.bias!r}")

    def __post_init__(self):
        self._fold_peft_names()
        if not isinstance(self.method, str) or self.method not in _METHODS:
            raise ValueError(f"MoLoRAConfig: unknown method {self.method!r}; choose one of "
                             f"{list(METHOD_NAMES)}")
        spec = _METHODS[self.method]
        for name in ("num_experts", "top_k", "rank", "attention_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"MoLoRAConfig: {name} must be an int >= 1, got {v!r}")
        for name in ("alpha", "attention_alpha"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not v > 0):
                raise ValueError(f"MoLoRAConfig: {name} must be a number > 0, got {v!r}")
        if self.dropout is not None and not (isinstance(self.dropout, (int, float))
                                             and 0 <= self.dropout < 1):
            raise ValueError(f"MoLoRAConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if self.aux_loss_coef is not None and not (
                isinstance(self.aux_loss_coef, (int, float)) and self.aux_loss_coef >= 0):
            raise ValueError(f"MoLoRAConfig: aux_loss_coef must be a number >= 0, got "
                             f"{self.aux_loss_coef!r}")
        if self.target_modules is not None and self.target_modules != ALL_LINEAR:
            if isinstance(self.target_modules, str) or not all(
                    isinstance(t, str) and t for t in self.target_modules):
                raise TypeError(f"MoLoRAConfig: target_modules must be a list of module names "
                                f"or {ALL_LINEAR!r}, got {self.target_modules!r}")
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules and spec.kind == "linear":
                raise ValueError(f"MoLoRAConfig: method {self.method!r} needs at least one "
                                 f"target module")
        if self.experts_per_layer is not None:
            if isinstance(self.experts_per_layer, (str, int)) or not all(
                    isinstance(e, int) and not isinstance(e, bool) and e >= 1
                    for e in self.experts_per_layer) or not self.experts_per_layer:
                raise ValueError(f"MoLoRAConfig: experts_per_layer must be a non-empty list of "
                                 f"ints >= 1, got {self.experts_per_layer!r}")
            self.experts_per_layer = tuple(self.experts_per_layer)
        if not isinstance(self.method_kwargs, dict):
            raise TypeError(f"MoLoRAConfig: method_kwargs must be a dict, got "
                            f"{type(self.method_kwargs).__name__}")
        try:
            json.dumps(self.method_kwargs)
        except (TypeError, ValueError) as e:
            raise TypeError(f"MoLoRAConfig: method_kwargs must be JSON-serialisable "
                            f"({e})") from None

        # fields that do not apply to the method are refused rather than silently ignored
        applicable = set(spec.fields) | {"target_modules", "method_kwargs", "task_type", "bias"}
        if self.method == "mixlora":
            applicable |= {"attention_rank", "attention_alpha", "aux_loss_reduction"}
        if self.method == "mola":
            applicable |= {"experts_per_layer", "aux_loss_reduction"}
        for f in dataclasses.fields(self):
            if f.name != "method" and f.name not in applicable and \
                    getattr(self, f.name) not in (None, {}):
                raise ValueError(f"MoLoRAConfig: {f.name} does not apply to method "
                                 f"{self.method!r}")
        for name in spec.required:
            if getattr(self, name) is None:
                raise ValueError(f"MoLoRAConfig: method {self.method!r} needs {name}")
        if self.num_experts is not None and self.experts_per_layer is not None:
            raise ValueError("MoLoRAConfig: give num_experts or experts_per_layer, not both")
        smallest_e = self.num_experts or (min(self.experts_per_layer)
                                          if self.experts_per_layer else None)
        if self.method in ("mixlora", "mola") and None not in (self.top_k, smallest_e) and \
                self.top_k > smallest_e:
            raise ValueError(f"MoLoRAConfig: top_k={self.top_k} > num_experts={smallest_e}")
        if self.method == "smora" and self.top_k is not None and self.rank is not None and \
                self.top_k > self.rank:
            raise ValueError(f"MoLoRAConfig: smora needs top_k <= rank, got top_k={self.top_k}, "
                             f"rank={self.rank}")
        if self.aux_loss_reduction is not None:
            allowed = _AUX_REDUCTIONS.get(self.method, ())
            if self.aux_loss_reduction not in allowed:
                hint = (" ('sum' is ambiguous for mola: 'per_layer' is MoLA's loss, "
                        "'per_module' the old per-linear sum)"
                        if self.method == "mola" and self.aux_loss_reduction == "sum" else "")
                raise ValueError(f"MoLoRAConfig: aux_loss_reduction for {self.method!r} must be "
                                 f"one of {list(allowed)}, got {self.aux_loss_reduction!r}{hint}")
        reserved = set(spec.fields.values()) | set(spec.reserved)
        clash = sorted(reserved & set(self.method_kwargs))
        if clash:
            raise ValueError(f"MoLoRAConfig: method_kwargs {clash} are set by the config "
                             f"fields or by apply_molora itself")

    @property
    def resolved_aux_loss_reduction(self) -> Optional[str]:
        """The reduction in effect (None for a method without an aux loss)."""
        if not _METHODS[self.method].aux:
            return None
        return self.aux_loss_reduction or _AUX_REDUCTIONS[self.method][0]

    @property
    def resolved_target_modules(self) -> Tuple[str, ...]:
        """The attribute names targeted (``("all-linear",)`` for PEFT's all-linear)."""
        if self.target_modules == ALL_LINEAR:
            return (ALL_LINEAR,)
        return (self.target_modules if self.target_modules is not None
                else _METHODS[self.method].targets)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict (tuples as lists); ``from_dict`` inverts it."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MoLoRAConfig":
        if not isinstance(d, dict):
            raise TypeError(f"MoLoRAConfig.from_dict: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MoLoRAConfig.from_dict: unknown keys {unknown}")
        return cls(**d)


# --- the replaced modules -----------------------------------------------------------------------


class MoLoRALayer(nn.Module):
    """One module of the converted model: the method's module (``.molora``) standing where the
    original HF module was, called the same way (``x [..., d_in] -> y [..., d_out]``, x's dtype).

    Attributes: ``molora`` (e.g. ``MixLoRA``, ``MoLA``, ``LoRALinear``), ``kind`` (``"mlp"`` or
    ``"linear"``), ``layer_index`` (index of its decoder layer), ``merged``. During a top-level
    forward of the converted model, a layer with an aux loss records its ``Routing`` for the
    model's hook (and nothing outside one).
    """

    def __init__(self, molora: nn.Module, kind: str, layer_index: int, base_keys: Sequence[str],
                 with_aux_loss: bool):
        super().__init__()
        self.molora = molora
        self.kind = kind
        self.layer_index = layer_index
        self.with_aux_loss = with_aux_loss
        self.merged = False
        # state-dict keys (relative to ``molora``) of the ORIGINAL module's tensors: never saved
        self._base_keys = frozenset(base_keys)
        self._collector: Optional[_AuxLossCollector] = None
        # a checkpoint written by save_molora keys a tensor "<layer name>.<key in molora>": let
        # model.load_state_dict (Trainer's resume) take those keys too
        self.register_load_state_dict_pre_hook(_accept_adapter_keys)

    # disable_adapter() sets this; unload() / the disabled forward call the module replaced (set
    # by apply_molora, held in a tuple so it is not registered twice as a submodule)
    _disabled = False
    _original_module: Tuple[nn.Module, ...] = ()

    # Read-only views of the frozen base linear: HF code of some versions reads
    # ``self.q_proj.weight.dtype`` (e.g. flash-attention's input cast).
    @property
    def weight(self) -> torch.Tensor:
        return self._base_linear().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self._base_linear().bias

    @property
    def in_features(self) -> int:
        return self._base_linear().in_features

    @property
    def out_features(self) -> int:
        return self._base_linear().out_features

    def _base_linear(self) -> nn.Linear:
        base = getattr(self.molora, "base", None)
        if self.kind != "linear" or not isinstance(base, nn.Linear):
            raise AttributeError(f"{type(self.molora).__name__} (kind {self.kind!r}) has no "
                                 f"single base linear")
        return base

    @property
    def mergeable(self) -> bool:
        return isinstance(self.molora, (LoRALinear, LoRASoupsCAT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled:                  # disable_adapter(): exactly the original module
            return self._original_module[0](x)
        if self.merged and isinstance(self.molora, LoRALinear):
            return self.molora.base(x)      # W0 + s B A already in the weight
        collector = self._collector
        if self.with_aux_loss and collector is not None and collector.records is not None:
            y, routing = self.molora(x, return_routing=True)
            collector.records.append((self.molora, routing, self.layer_index))
            return y
        return self.molora(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (LoRALinear, LoRASoupsCAT only)."""
        if not self.mergeable:
            raise ValueError(f"{type(self.molora).__name__} is input-dependent (routed) and "
                             f"cannot be merged into the base weight")
        if self.merged:
            return
        if is_quantized(self.molora.base):
            raise ValueError(f"the base {type(self.molora.base).__name__} is quantized; the "
                             f"adapter cannot be merged into its integer weight")
        if isinstance(self.molora, LoRASoupsCAT):
            self.molora.merge()
        else:
            base = self.molora.base
            base.weight += self.molora.bank.delta_weight().to(base.weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (subtracts the same update; exact up to rounding in the base dtype)."""
        if not self.merged:
            return
        if isinstance(self.molora, LoRASoupsCAT):
            self.molora.unmerge()
        else:
            base = self.molora.base
            base.weight -= self.molora.bank.delta_weight().to(base.weight)
        self.merged = False

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """The adapter / router / gate tensors (keys relative to ``molora``), base excluded."""
        return {k: v for k, v in self.molora.state_dict().items() if k not in self._base_keys}

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, layer_index={self.layer_index}, merged={self.merged}"


def _accept_adapter_keys(module: "MoLoRALayer", state_dict: Dict[str, Any], prefix: str,
                         *args: Any) -> None:
    """Load pre-hook: ``<prefix><key>`` (save_molora's naming, the ``molora.`` level left out)
    -> ``<prefix>molora.<key>`` for the adapter keys, so a save_molora checkpoint loads with
    ``model.load_state_dict(tensors, strict=False)``."""
    adapter_keys = {k for k in module.molora.state_dict(keep_vars=True)
                    if k not in module._base_keys}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest in adapter_keys:
            state_dict[f"{prefix}molora.{rest}"] = state_dict.pop(key)


# --- aux losses -----------------------------------------------------------------------------------


class _AuxLossCollector:
    """Routings of the MoE-LoRA layers during one top-level forward (``records`` is None outside
    one: (method module, Routing, decoder-layer index) in call order), plus the reduction and the
    last forward's detached aux loss."""

    def __init__(self, reduction: Optional[str]):
        self.reduction = reduction
        self.records: Optional[List[Tuple[nn.Module, Routing, int]]] = None
        self.attention_mask: Optional[torch.Tensor] = None
        self.labels_given = False
        self.last_aux_loss: Optional[torch.Tensor] = None


_SIGNATURES: Dict[type, inspect.Signature] = {}


def _bound_argument(model: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """The value of forward argument ``name`` in this call (None when absent)."""
    if name in kwargs:
        return kwargs[name]
    if not args:  # keyword-only call (HF Trainer): no signature to bind (nor to trace)
        return None
    sig = _SIGNATURES.get(type(model))
    if sig is None:
        sig = _SIGNATURES[type(model)] = inspect.signature(model.forward)
    try:
        return sig.bind_partial(*args).arguments.get(name)
    except TypeError:
        return None


def _open_forward(model: nn.Module, args: tuple, kwargs: dict) -> None:
    collector: _AuxLossCollector = model._molora_collector
    collector.records = []
    mask = _bound_argument(model, args, kwargs, "attention_mask")
    collector.attention_mask = mask if isinstance(mask, torch.Tensor) else None
    collector.labels_given = _bound_argument(model, args, kwargs, "labels") is not None


def _close_forward(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    collector: _AuxLossCollector = model._molora_collector
    records, collector.records = collector.records, None
    mask, collector.attention_mask = collector.attention_mask, None
    collector.last_aux_loss = None
    if output is None or not records:   # the forward raised, or no layer with an aux loss ran
        return None
    aux = _reduce_aux_losses(records, collector.reduction, mask)
    collector.last_aux_loss = aux.detach()
    return _attach_aux_loss(output, aux, collector.labels_given)


def _token_mask(attention_mask: Optional[torch.Tensor], num_tokens: int
                ) -> Optional[torch.Tensor]:
    """The [B, S] padding mask of the tokens one layer saw (T = B * S rows), or None.

    With a KV cache the mask covers the cached positions too; the current tokens are its LAST S
    columns (HF convention). A mask of another form (4-D, custom) is ignored."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[0] == 0:
        return None
    B = attention_mask.shape[0]
    if num_tokens % B or num_tokens // B > attention_mask.shape[1]:
        return None
    return attention_mask[:, attention_mask.shape[1] - num_tokens // B:]


def _cat_routings(routings: List[Routing]) -> Routing:
    """Routings concatenated along the tokens (a field absent in any of them stays None)."""
    def cat(name):
        parts = [getattr(r, name) for r in routings]
        return None if any(t is None for t in parts) else torch.cat(parts)

    return Routing(cat("weights"), cat("ids"), cat("logits"), cat("probs"))


def _reduce_aux_losses(records: List[Tuple[nn.Module, Routing, int]], reduction: str,
                       attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One 0-d fp32 tensor from every recorded (layer, Routing, layer index); coefficients
    included. A concatenation of n modules' routings gets the [B, S] mask of ONE module (the
    losses repeat it per module); every grouping is on Python metadata (no host read)."""
    def mask_for(routing: Routing) -> Optional[torch.Tensor]:
        return _token_mask(attention_mask, routing.weights.shape[0])

    if reduction == "pooled":
        # HF Mixtral / MoE-PEFT: all layers' tokens concatenated, then one load-balance loss.
        # Every layer is a MixLoRA of the same config.
        routings = [r for _, r, _ in records]
        return records[0][0].aux_loss(_cat_routings(routings),
                                      attention_mask=mask_for(routings[0]))
    if reduction == "per_layer":
        # MoLA: per decoder layer, the rows of all its modules concatenated (the authors'
        # ``torch.cat(router_logits, dim=0)``), one loss each, summed over layers.
        groups: Dict[int, List[Tuple[nn.Module, Routing]]] = {}
        for layer, routing, index in records:
            groups.setdefault(index, []).append((layer, routing))
        total = None
        for index, group in groups.items():
            widths = {r.probs.shape[-1] for _, r in group}
            if len(widths) != 1:
                raise ValueError(f"aux loss: the MoE-LoRA modules of decoder layer {index} have "
                                 f"different expert counts {sorted(widths)}; use "
                                 f"aux_loss_reduction='per_module'")
            routings = [r for _, r in group]
            loss = group[0][0].aux_loss(_cat_routings(routings),
                                        attention_mask=mask_for(routings[0]))
            total = loss if total is None else total + loss
        return total
    # "sum" (mixlora: one MixLoRA per layer) / "per_module": every module's own loss, summed
    total = None
    for layer, routing, _ in records:
        loss = layer.aux_loss(routing, attention_mask=mask_for(routing))
        total = loss if total is None else total + loss
    return total


def _attach_aux_loss(output: Any, aux: torch.Tensor, labels_given: bool) -> Any:
    """outputs["aux_loss"] = aux (+ an aux_loss the base model already returned) and
    outputs["loss"] += aux when a loss was computed. Tuples (return_dict=False): the loss (first
    element when labels were given) gets aux added; aux itself is only in the getter."""
    if hasattr(output, "keys") and hasattr(output, "__setitem__"):     # transformers ModelOutput
        loss = getattr(output, "loss", None)
        if loss is not None:
            output["loss"] = loss + aux.to(loss.dtype)
        previous = getattr(output, "aux_loss", None)
        output["aux_loss"] = aux if previous is None else previous + aux.to(previous.dtype)
        return output
    if isinstance(output, tuple) and labels_given and output and \
            isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
        return (output[0] + aux.to(output[0].dtype),) + output[1:]
    return output


def molora_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The aux loss of the model's last top-level forward, DETACHED (0-d fp32), or None (no
    forward yet, or a method without an aux loss). Backpropagate ``outputs.aux_loss`` instead."""
    collector = _collector_of(model)
    return collector.last_aux_loss


# --- conversion ---------------------------------------------------------------------------------


@dataclass
class _Target:
    name: str                 # qualified name in the model ("model.layers.0.mlp")
    parent: nn.Module
    attr: str
    module: nn.Module
    layer_index: int
    kind: str                 # "mlp" (MoE-FFN) or "linear"
    in_features: int
    out_features: int


def _decoder_layer_lists(model: nn.Module) -> List[Tuple[str, nn.ModuleList]]:
    """Every ``nn.ModuleList`` whose elements all have an ``mlp`` or ``self_attn`` child."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                hasattr(layer, "mlp") or hasattr(layer, "self_attn") for layer in module):
            found.append((name, module))
    return found


def _is_gated_mlp(mlp: nn.Module) -> bool:
    return all(isinstance(getattr(mlp, p, None), nn.Linear) for p in _FFN) and \
        callable(getattr(mlp, "act_fn", None))


def _plan(model: nn.Module, config: MoLoRAConfig) -> Tuple[List[_Target], int]:
    """The modules to replace (in model order) and the number of decoder layers. Touches
    nothing; raises ValueError when the model does not fit the config."""
    spec = _METHODS[config.method]
    if any(isinstance(m, MoLoRALayer) for m in model.modules()):
        raise ValueError("apply_molora: the model already has MoE-LoRA layers")
    lists = _decoder_layer_lists(model)
    if not lists:
        raise ValueError(f"apply_molora: found no decoder layers in {type(model).__name__} (an "
                         f"nn.ModuleList of layers with an `mlp` or `self_attn` child)")
    all_linear = config.target_modules == ALL_LINEAR
    targets_wanted = set() if all_linear else set(config.resolved_target_modules)
    targets: List[_Target] = []
    matched, seen = set(), set()
    num_layers = 0
    for list_name, layers in lists:
        num_layers = max(num_layers, len(layers))
        for i, layer in enumerate(layers):
            prefix = f"{list_name}.{i}" if list_name else str(i)
            if spec.kind == "mlp":
                mlp = getattr(layer, "mlp", None)
                if mlp is None or isinstance(mlp, MoLoRALayer) or id(mlp) in seen:
                    continue
                if not _is_gated_mlp(mlp):
                    raise ValueError(
                        f"apply_molora: {prefix}.mlp ({type(mlp).__name__}) is not a gated MLP "
                        f"with nn.Linear gate_proj / up_proj / down_proj and an act_fn, which "
                        f"{config.method!r} needs")
                seen.add(id(mlp))
                for p in _FFN:
                    _check_quantized(getattr(mlp, p), f"{prefix}.mlp.{p}")
                targets.append(_Target(f"{prefix}.mlp", layer, "mlp", mlp, i, "mlp",
                                       mlp.gate_proj.in_features, mlp.gate_proj.out_features))
            for sub_name, sub in layer.named_modules():
                attr = sub_name.rsplit(".", 1)[-1]
                if all_linear and isinstance(sub, nn.Linear) and id(sub) not in seen and \
                        sub_name and not (spec.kind == "mlp" and sub_name.startswith("mlp.")):
                    targets_wanted.add(attr)
                if attr not in targets_wanted or id(sub) in seen or not sub_name:
                    continue
                if spec.kind == "mlp" and sub_name.startswith("mlp."):
                    raise ValueError(f"apply_molora: {config.method!r} replaces the whole mlp; "
                                     f"target_modules must not name its {attr}")
                if not isinstance(sub, nn.Linear):
                    raise ValueError(f"apply_molora: {prefix}.{sub_name} is a "
                                     f"{type(sub).__name__}; only nn.Linear can be targeted")
                _check_quantized(sub, f"{prefix}.{sub_name}")
                parent = layer.get_submodule(sub_name.rsplit(".", 1)[0]) if "." in sub_name \
                    else layer
                seen.add(id(sub))
                matched.add(attr)
                targets.append(_Target(f"{prefix}.{sub_name}", parent, attr, sub, i, "linear",
                                       sub.in_features, sub.out_features))
    if not targets:
        raise ValueError(f"apply_molora: no module of {type(model).__name__} matches method "
                         f"{config.method!r} (target_modules={sorted(targets_wanted)})")
    missing = sorted(targets_wanted - matched)
    if missing:
        raise ValueError(f"apply_molora: target_modules {missing} match no nn.Linear in the "
                         f"decoder layers of {type(model).__name__}")
    if spec.kind == "mlp" and not any(t.kind == "mlp" for t in targets):
        raise ValueError(f"apply_molora: {config.method!r} found no decoder-layer `mlp`")
    return targets, num_layers


def _check_quantized(linear: nn.Module, where: str) -> None:
    """A quantized base must be a bitsandbytes layer (``Linear4bit`` / ``Linear8bitLt``, which
    are called, never read); other integer-weight linears are refused before any change."""
    if is_quantized(linear) and not type(linear).__module__.startswith("bitsandbytes"):
        raise ValueError(f"apply_molora: {where} ({type(linear).__name__}) has a "
                         f"{linear.weight.dtype} weight; of quantized bases only bitsandbytes "
                         f"Linear4bit / Linear8bitLt are supported")


def _activation_name(mlp: nn.Module, where: str) -> str:
    """The name in ``ACTIVATIONS`` of the function ``mlp.act_fn`` computes, found numerically
    (no dependence on transformers' activation class names), checked on the whole MLP."""
    w = mlp.gate_proj.weight
    if w.device.type == "meta":
        raise ValueError(f"apply_molora: {where} is on the meta device; load the weights first")
    dtype = base_dtype(mlp.gate_proj)     # a quantized projection computes in its compute dtype
    grid = torch.linspace(-6.0, 6.0, 241, device=w.device)
    with torch.no_grad():
        ref = mlp.act_fn(grid)
        name = next((n for n, fn in ACTIVATIONS.items()
                     if torch.allclose(fn(grid), ref, rtol=1e-5, atol=1e-6)), None)
        if name is None:
            raise ValueError(f"apply_molora: {where}.act_fn ({type(mlp.act_fn).__name__}) is not "
                             f"one of {sorted(ACTIVATIONS)}")
        # the MLP must compute down(act(gate x) * up x): same modules, so equal up to rounding
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, mlp.gate_proj.in_features, generator=gen).to(w.device, dtype)
        got = mlp(x).float()
        want = mlp.down_proj(ACTIVATIONS[name](mlp.gate_proj(x)) * mlp.up_proj(x)).float()
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
        if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()) + 1e-6):
            raise ValueError(f"apply_molora: {where} ({type(mlp).__name__}) does not compute "
                             f"down_proj(act_fn(gate_proj(x)) * up_proj(x))")
    return name


def _method_kwargs(config: MoLoRAConfig, layer_index: int,
                   experts_per_layer: Optional[Sequence[int]]) -> Dict[str, Any]:
    spec = _METHODS[config.method]
    kw = dict(spec.defaults)
    for cfg_name, arg in spec.fields.items():
        v = getattr(config, cfg_name)
        if v is not None:
            kw[arg] = float(v) if cfg_name in ("alpha", "dropout", "aux_loss_coef") else v
    if experts_per_layer is not None:
        kw["num_experts"] = experts_per_layer[layer_index]
    kw.update(config.method_kwargs)
    return kw


def _base_state_keys(new: nn.Module, old: nn.Module) -> List[str]:
    """Keys of ``new.state_dict()`` that are tensors of the original module ``old``, or that a
    submodule of ``old`` writes itself (a bitsandbytes layer adds its quantization state, e.g.
    ``weight.absmax``, as extra keys that are no parameter or buffer)."""
    old_ids = {id(t) for t in old.parameters()} | {id(t) for t in old.buffers()}
    old_modules = {id(m) for m in old.modules()}
    prefixes = tuple(f"{n}." for n, m in new.named_modules() if n and id(m) in old_modules)
    return [k for k, t in new.state_dict(keep_vars=True).items()
            if id(t) in old_ids or k.startswith(prefixes)]


def _build(target: _Target, config: MoLoRAConfig,
           experts_per_layer: Optional[Sequence[int]]) -> MoLoRALayer:
    spec = _METHODS[config.method]
    if target.kind == "mlp":
        mlp = target.module
        act = _activation_name(mlp, target.name)
        kw = _method_kwargs(config, target.layer_index, None)
        molora = spec.cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, act=act, **kw)
        return MoLoRALayer(molora, "mlp", target.layer_index, _base_state_keys(molora, mlp),
                           spec.aux)
    if spec.kind == "mlp":   # mixlora's plain LoRA on the attention linears
        r = config.attention_rank or config.rank or _class_default(MixLoRA, "r")
        alpha = config.attention_alpha or config.alpha or _class_default(MixLoRA, "alpha")
        dropout = config.dropout if config.dropout is not None else \
            _class_default(MixLoRA, "dropout")
        molora = LoRALinear(target.module, r, float(alpha), float(dropout))
        return MoLoRALayer(molora, "linear", target.layer_index,
                           _base_state_keys(molora, target.module), False)
    kw = _method_kwargs(config, target.layer_index, experts_per_layer)
    molora = spec.cls(target.module, **kw)
    return MoLoRALayer(molora, "linear", target.layer_index,
                       _base_state_keys(molora, target.module), spec.aux)


def _experts_per_layer(config: MoLoRAConfig, num_layers: int) -> Optional[Tuple[int, ...]]:
    if config.method != "mola" or config.num_experts is not None:
        return None
    epl = config.experts_per_layer
    if epl is None:
        epl = tuple(mola_experts_per_layer(num_layers))
    if len(epl) != num_layers:
        raise ValueError(f"apply_molora: experts_per_layer has {len(epl)} entries for a model "
                         f"with {num_layers} decoder layers")
    k = config.top_k if config.top_k is not None else _class_default(MoLA, "k")
    if k > min(epl):
        raise ValueError(f"apply_molora: top_k={k} > the fewest experts per layer ({min(epl)})")
    return tuple(epl)


def apply_molora(model: nn.Module, config: MoLoRAConfig) -> nn.Module:
    """Converts ``model`` IN PLACE into a MoE-LoRA model and returns it.

    Args:
        model: a transformers causal LM (or any ``nn.Module`` with Llama-style decoder layers:
            an ``nn.ModuleList`` of layers with ``mlp`` / ``self_attn`` children).
        config: a ``MoLoRAConfig`` (or its ``to_dict()``).

    Freezes every existing parameter; the new adapter / router / gate parameters are trainable,
    created on the base weights' device and dtype (routers fp32). Sets ``model.molora_config``
    and installs the aux-loss hooks (module docstring). Errors (ValueError / TypeError) are raised
    before the model is modified: unknown method, no matching module, a non-gated MLP for
    mixlora, an already converted model, bad ``method_kwargs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_molora: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(config, dict):
        config = MoLoRAConfig.from_dict(config)
    if not isinstance(config, MoLoRAConfig):
        raise TypeError(f"apply_molora: config must be a MoLoRAConfig, got "
                        f"{type(config).__name__}")
    if getattr(model, "molora_config", None) is not None:
        raise ValueError("apply_molora: the model is already converted (model.molora_config "
                         "is set)")
    targets, num_layers = _plan(model, config)
    experts_per_layer = _experts_per_layer(config, num_layers)

    # Build every replacement before installing any, so a failure leaves the model as it was
    # (the method classes freeze the base linears they wrap: restore those flags on failure).
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    try:
        replacements = []
        for target in targets:
            try:
                replacements.append(_build(target, config, experts_per_layer))
            except TypeError as e:
                raise TypeError(f"apply_molora: building {config.method!r} for {target.name} "
                                f"failed (check method_kwargs={config.method_kwargs}): {e}") from e
    except BaseException:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise

    model.requires_grad_(False)   # the replacements are not in the model yet: they stay trainable
    collector = _AuxLossCollector(config.resolved_aux_loss_reduction)
    for target, layer in zip(targets, replacements):
        layer._collector = collector
        layer._original_module = (target.module,)
        setattr(target.parent, target.attr, layer)
    model._molora_collector = collector
    model._molora_hooks = (
        model.register_forward_pre_hook(_open_forward, with_kwargs=True),
        model.register_forward_hook(_close_forward, with_kwargs=True, always_call=True),
    )
    model.molora_config = config
    _install_peft_api(model)
    return model


# --- helpers on a converted model ---------------------------------------------------------------


def _collector_of(model: nn.Module) -> _AuxLossCollector:
    collector = getattr(model, "_molora_collector", None)
    if collector is None:
        raise ValueError(f"{type(model).__name__} is not a MoE-LoRA model (call apply_molora "
                         f"first)")
    return collector


def _molora_layers(model: nn.Module) -> List[Tuple[str, MoLoRALayer]]:
    _collector_of(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLoRALayer)]


def merge_molora(model: nn.Module, skip_routed: bool = False) -> nn.Module:
    """Folds every static adapter (plain ``LoRALinear``, ``LoRASoupsCAT``) into its base weight:
    ``W0 <- W0 + sum_i g_i s_i B_i A_i``; the merged layers then run the base linear only.

    Routed layers (MixLoRA's FFN, MoLA, SMoRA, HydraLoRA, LoRAMoE) depend on the input and cannot
    be merged: ValueError, unless ``skip_routed=True`` (then only the static ones are merged,
    e.g. MixLoRA's attention LoRAs). In place; returns the model. Merging twice is a no-op.
    """
    layers = _molora_layers(model)
    routed = [n for n, m in layers if not m.mergeable]
    if routed and not skip_routed:
        raise ValueError(f"merge_molora: {len(routed)} layers are routed "
                         f"({type(dict(layers)[routed[0]].molora).__name__} at {routed[0]}, ...) "
                         f"and cannot be merged into the base weights; pass skip_routed=True to "
                         f"merge only the static LoRAs")
    quantized = [n for n, m in layers if m.mergeable and is_quantized(m.molora.base)]
    if quantized:
        raise ValueError(f"merge_molora: the base of {quantized[0]} (and {len(quantized) - 1} "
                         f"more) is quantized; the update cannot be merged into an integer "
                         f"weight")
    for _, m in layers:
        if m.mergeable:
            m.merge()
    return model


def unmerge_molora(model: nn.Module) -> nn.Module:
    """Undoes ``merge_molora`` (in place; returns the model)."""
    for _, m in _molora_layers(model):
        m.unmerge()
    return model


# --- the PEFT-shaped API ------------------------------------------------------------------------


def get_nb_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameter counts (PEFT's ``get_nb_trainable_parameters``). A
    bitsandbytes 4-bit weight counts its logical elements (2 per stored byte), as PEFT does."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if n and type(p).__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints ``trainable params: T || all params: N || trainable%: P`` (PEFT's line)."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside, every replaced module runs the ORIGINAL module it replaced (the
    base linear / the base MLP), so the model's outputs equal the base model's, and no aux loss
    is added. Merged layers must be unmerged first (ValueError)."""
    layers = _molora_layers(model)
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"disable_adapter: {len(merged)} layers are merged ({merged[0]}, ...); "
                         f"call unmerge_molora(model) first")
    for _, m in layers:
        m._disabled = True
    try:
        yield model
    finally:
        for _, m in layers:
            m._disabled = False


def _restore(model: nn.Module, layers: List[Tuple[str, MoLoRALayer]], merged: bool) -> None:
    for name, m in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, m.molora.base if merged else m._original_module[0])
    for h in model._molora_hooks:
        h.remove()
    for attr in ("_molora_hooks", "_molora_collector", "molora_config", *_PEFT_API):
        model.__dict__.pop(attr, None)
    flag = model.__dict__.pop("_molora_peft_flag", None)
    if flag is not None:
        if flag[0] is None:
            model.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            model._hf_peft_config_loaded = flag[0]
    keys = model.__dict__.pop("_molora_keys_to_ignore_on_save", None)
    if keys is not None:
        if keys[0] is None:
            model.__dict__.pop("_keys_to_ignore_on_save", None)
        else:
            model._keys_to_ignore_on_save = keys[0]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges every adapter into its base weight and puts the (merged) base modules back: the
    result is the plain base model class with updated weights, no MoE-LoRA layer left. Only for
    mergeable methods (``lora``, ``lora_soups``; PEFT's call of the same name); a routed layer
    (input-dependent) or a quantized base raises ValueError before anything changes."""
    layers = _molora_layers(model)
    routed = [n for n, m in layers if not m.mergeable]
    if routed:
        raise ValueError(f"merge_and_unload: {len(routed)} layers are routed "
                         f"({type(dict(layers)[routed[0]].molora).__name__} at {routed[0]}, "
                         f"...): their update depends on the input and cannot be merged; "
                         f"use unload() to remove the adapters instead")
    quantized = [n for n, m in layers if is_quantized(m.molora.base)]
    if quantized:
        raise ValueError(f"merge_and_unload: the base of {quantized[0]} (and "
                         f"{len(quantized) - 1} more) is quantized; the update cannot be merged "
                         f"into an integer weight")
    for _, m in layers:
        m.merge()
    _restore(model, layers, merged=True)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Removes every MoE-LoRA layer and puts the original modules back (unmerging first), giving
    the base model as it was (its parameters stay frozen); works for every method."""
    layers = _molora_layers(model)
    for _, m in layers:
        m.unmerge()
    _restore(model, layers, merged=False)
    return model


def _save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike],
                     is_main_process: bool = True, state_dict: Optional[Dict[str, Any]] = None,
                     **kwargs: Any) -> None:
    """The converted model's ``save_pretrained`` (what ``Trainer.save_model`` and every
    ``checkpoint-N`` call): the adapters only, as ``save_molora``, never the base weights.

    Also writes ``model.safetensors.index.json`` mapping the adapter keys to
    ``molora_adapter.safetensors``: Trainer's ``resume_from_checkpoint`` reads that index and
    loads the adapters with ``model.load_state_dict(..., strict=False)``. No ``config.json`` and
    no full weight file is written, and the index has no ``metadata`` entry, so
    ``from_pretrained`` on the folder raises instead of random-initialising the base.
    ``state_dict`` (Trainer passes a gathered one under FSDP / DeepSpeed) supplies the tensors
    when given. Other keyword arguments of ``PreTrainedModel.save_pretrained`` are ignored."""
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for a MoE-LoRA "
                         "model; save, then upload the folder with huggingface_hub")
    if not is_main_process:
        return
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_pretrained: {save_directory} is a file, not a directory")
    save_molora(model, save_directory, state_dict=state_dict)
    weight_map = {f"{name}.molora.{key}": WEIGHTS_NAME
                  for name, m in _molora_layers(model) for key in m.adapter_state_dict()}
    index = {"molora_ops": "adapter-only checkpoint: the base weights are NOT in this folder; "
                           "load it with molora_ops.integrations.hf_transformers.load_molora("
                           "base_model, folder)",
             "weight_map": weight_map}
    with open(os.path.join(save_directory, _RESUME_INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


_PEFT_API = ("save_pretrained", "print_trainable_parameters", "get_nb_trainable_parameters",
             "disable_adapter", "merge_and_unload", "unload")


def _install_peft_api(model: nn.Module) -> None:
    """Binds the PEFT-shaped calls on the converted model instance (``model.disable_adapter()``,
    ``model.merge_and_unload()``, ...) and its adapter-only ``save_pretrained``; ``unload`` /
    ``merge_and_unload`` remove them again."""
    funcs = dict(save_pretrained=_save_pretrained,
                 print_trainable_parameters=print_trainable_parameters,
                 get_nb_trainable_parameters=get_nb_trainable_parameters,
                 disable_adapter=disable_adapter, merge_and_unload=merge_and_unload,
                 unload=unload)
    for name in _PEFT_API:
        # a partial, not a bound method: it pickles (torch.save of the whole model) and
        # deep-copies onto the copy (a bound method pickles as getattr by its function's name)
        model.__dict__[name] = functools.partial(funcs[name], model)
    # Trainer's resume warns about missing keys unless they are exactly _keys_to_ignore_on_save:
    # the base keys are missing from an adapter checkpoint by design.
    adapter = {f"{n}.molora.{k}" for n, m in _molora_layers(model)
               for k in m.adapter_state_dict()}
    model.__dict__["_molora_keys_to_ignore_on_save"] = (
        model.__dict__.get("_keys_to_ignore_on_save"),)
    model._keys_to_ignore_on_save = [k for k in model.state_dict(keep_vars=True)
                                     if k not in adapter]
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers' Trainer refuses a model loaded quantized (QLoRA) unless adapters are
        # attached, which it reads from this flag of its PEFT integration
        model.__dict__["_molora_peft_flag"] = (model.__dict__.get("_hf_peft_config_loaded"),)
        model._hf_peft_config_loaded = True


# --- save / load --------------------------------------------------------------------------------


def _fingerprint(targets) -> Dict[str, Dict[str, Any]]:
    return {t.name: {"kind": t.kind, "in_features": t.in_features,
                     "out_features": t.out_features} for t in targets}


def _layer_fingerprint(name: str, m: MoLoRALayer) -> Dict[str, Any]:
    if m.kind == "mlp":
        d_in, d_out = m.molora.gate_proj.in_features, m.molora.gate_proj.out_features
    else:
        d_in, d_out = m.in_features, m.out_features
    return {"kind": m.kind, "in_features": d_in, "out_features": d_out}


def save_molora(model: nn.Module, directory: str,
                state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Writes ``directory/molora_config.json`` (the config, the replaced modules' names and
    shapes, the base ``model_type``) and ``directory/molora_adapter.safetensors`` (every adapter /
    router / static-gate tensor and the adapter buffers, keys ``<module name>.<key in the
    method's module>``; the base weights are NOT saved). Merged layers are saved as their
    adapters (a loaded model starts unmerged). ``state_dict``: the model's full state dict to
    take the tensors from (keys ``<module name>.molora.<key>``, e.g. gathered by Trainer under
    FSDP); default the modules' own tensors."""
    from safetensors.torch import save_file

    layers = _molora_layers(model)
    tensors: Dict[str, torch.Tensor] = {}
    for name, m in layers:
        for key, t in m.adapter_state_dict().items():
            if state_dict is not None:
                t = state_dict.get(f"{name}.molora.{key}", t)
            tensors[f"{name}.{key}"] = t.detach().to("cpu").contiguous().clone()
    meta = {
        "format_version": _FORMAT_VERSION,
        "config": model.molora_config.to_dict(),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "modules": {name: _layer_fingerprint(name, m) for name, m in layers},
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME),
              metadata={"format": "pt", "molora_format_version": str(_FORMAT_VERSION)})


def load_molora(model: nn.Module, directory: str) -> nn.Module:
    """Applies the saved config to ``model`` (a fresh, unconverted base model) and loads the
    saved adapter tensors; returns the model (in place).

    Raises (before touching the model) FileNotFoundError for a missing file and ValueError when
    the model does not match what was saved: other module names or shapes (layer count, hidden
    size, intermediate size, ...), or an already converted model. A different
    ``config.model_type`` with matching modules only warns."""
    from safetensors.torch import load_file

    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_molora: {path} not found")
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"load_molora: {config_path} has format_version "
                         f"{meta.get('format_version')!r}, this version reads {_FORMAT_VERSION}")
    config = MoLoRAConfig.from_dict(meta["config"])
    if getattr(model, "molora_config", None) is not None:
        raise ValueError("load_molora: the model is already converted; pass a fresh base model")
    targets, _ = _plan(model, config)
    on_meta = [t.name for t in targets if any(p.is_meta for p in t.module.parameters())]
    if on_meta:   # the adapters would be created on meta too and the loaded values dropped
        raise ValueError(f"load_molora: {on_meta[0]} is on the meta device; materialise the base "
                         f"model (load its weights) before loading adapters")
    have, saved = _fingerprint(targets), meta["modules"]
    if have != saved:
        diff = [f"{n}: saved {saved.get(n)}, model {have.get(n)}"
                for n in sorted(set(have) | set(saved)) if have.get(n) != saved.get(n)]
        raise ValueError(f"load_molora: the model does not match the saved adapters "
                         f"({len(diff)} modules differ): " + "; ".join(diff[:4])
                         + (" ..." if len(diff) > 4 else ""))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if meta.get("model_type") not in (None, model_type):
        warnings.warn(f"load_molora: adapters saved from a {meta['model_type']!r} model, loading "
                      f"into {model_type!r} (the modules match)")
    tensors = load_file(weights_path)

    apply_molora(model, config)
    expected: Dict[str, torch.Tensor] = {}
    for name, m in _molora_layers(model):
        state = m.molora.state_dict(keep_vars=True)
        for key in m.adapter_state_dict():
            expected[f"{name}.{key}"] = state[key]
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(f"load_molora: {weights_path} does not fit the converted model: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]}")
    with torch.no_grad():
        for key, dst in expected.items():
            dst.copy_(tensors[key])
    return model
