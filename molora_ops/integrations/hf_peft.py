"""PEFT integration: expert banks from saved PEFT LoRA adapters, and fused PEFT X-LoRA.

Two entry points for a user coming from PEFT:

* **From saved adapters** (what X-LoRA, MoLE and LoRA Soups start from): ``read_peft_adapter``
  reads one adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or
  ``adapter_model.bin``) offline; ``load_peft_adapters`` stacks N of them into one ``LoRABank`` per
  adapted linear (expert n = adapter n; ragged ranks, per-adapter alpha / rsLoRA / rank_pattern /
  alpha_pattern; a module an adapter does not target is a rank-0 expert of that bank);
  ``apply_peft_adapters`` puts one of our layers (``LoRASoupsCAT``, ``MoLE``, ``XLoRALinear`` or any
  class built as ``cls(base, ranks, **kw)`` with a ``.bank``) in place of every adapted linear of a
  transformers model; ``apply_xlora_from_adapters`` builds the whole X-LoRA model
  (``XLoRAModel``) from the adapters and an ``XLoraConfig`` (or its fields as keywords): logits
  equal to PEFT's X-LoRA over the same adapters, ``generate`` with a KV cache,
  ``save_pretrained`` / ``XLoRAModel.from_pretrained`` (``save_xlora`` / ``load_xlora``), PEFT
  classifier weights loaded as PEFT names them (``XLoRAClassifier.load_peft_state_dict``).
* **The ``lora`` method in PEFT's format**: ``export_peft_lora`` writes a model converted by
  ``apply_molora(model, MoLoRAConfig("lora", ...))`` as a PEFT adapter directory;
  ``import_peft_lora`` converts a base model from one.
* **An existing PEFT X-LoRA model**: ``accelerate_xlora(peft_model)`` swaps the per-adapter Python
  loop of every ``XLoraLinearLayer`` for one fused ``stacked_gated_lora`` call (the same outputs and
  gradients, PEFT's parameters and classifier untouched); ``restore_xlora`` undoes it.

Nothing here downloads anything: adapters are read from local directories only (snapshot a Hub
adapter first). Unsupported adapter kinds raise before any work: DoRA, other LoRA variants
(aLoRA, Arrow, BD-LoRA, KaSA, MonteCLoRA, VeLoRA, QALoRA), ``lora_bias``, ``bias != "none"``,
``modules_to_save``, ``trainable_token_indices``, ``target_parameters``, ``layer_replication``,
Megatron, embedding / convolution LoRA, inits that modify the base weights (PiSSA, CorDA, OLoRA,
LoftQ, LoRA-GA, unless saved converted), and non-LoRA PEFT types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from .. import ops
from ..functional import moe_lora_linear
from ..modules.bank import LoRABank
from ..modules.methods import LoRASoupsCAT
from ..modules.xlora import XLoRAClassifier, XLoRALinear, XLoRAModel

__all__ = [
    "PeftLoRAAdapter", "read_peft_adapter", "load_peft_adapters", "apply_peft_adapters",
    "apply_xlora_from_adapters", "save_xlora", "load_xlora", "accelerate_xlora", "restore_xlora",
    "export_peft_lora", "import_peft_lora",
]

AdapterLike = Union[str, os.PathLike, "PeftLoRAAdapter"]
AdaptersArg = Union[Sequence[AdapterLike], Mapping[str, AdapterLike]]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

# LoraConfig fields whose non-default value changes the forward (or the saved tensors) in a way a
# plain stacked LoRA cannot represent. The LoRA-variant fields are also read from peft's own
# ``is_lora_variant`` field metadata when peft is installed (future variants are caught too).
_VARIANT_FIELDS = ("use_dora", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                   "kasa_config", "monteclora_config", "velora_config", "use_qalora")
_UNSUPPORTED_FIELDS = ("lora_bias", "modules_to_save", "trainable_token_indices",
                       "target_parameters", "layer_replication", "megatron_config")
# inits after which the saved adapter only works with modified base weights (PEFT resets
# init_lora_weights to True when the adapter is saved converted to a plain LoRA)
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


# --------------------------------------------------------------------------------------------
# Reading adapters
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PeftLoRAAdapter:
    """One saved PEFT LoRA adapter, validated.

    Attributes:
        name: the adapter's name (the directory name unless given).
        path: the directory it was read from.
        config: ``adapter_config.json`` as a dict.
        modules: ``{module_name: (lora_A [r, d_in], lora_B [d_out, r], scaling)}`` with
            ``module_name`` relative to the model the adapter was trained on (e.g.
            ``"model.layers.0.self_attn.q_proj"`` for a ``*ForCausalLM``) and ``scaling`` PEFT's
            ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA; alpha and r per module from
            ``alpha_pattern`` / ``rank_pattern``). Tensors as saved (dtype, on ``device``).
        lora_dropout: the adapter's LoRA dropout probability.
    """

    name: str
    path: str
    config: Dict[str, Any]
    modules: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]
    lora_dropout: float = 0.0

    def rank(self, module: str) -> int:
        """r of ``module`` (0 when this adapter does not target it)."""
        return int(self.modules[module][0].shape[0]) if module in self.modules else 0


def _variant_fields() -> List[str]:
    names = list(_VARIANT_FIELDS)
    try:  # peft's own list of LoRA variants (fields tagged is_lora_variant), when installed
        from peft import LoraConfig
        names += [f.name for f in dataclasses.fields(LoraConfig)
                  if f.metadata.get("is_lora_variant") and f.name not in names]
    except Exception:  # noqa: BLE001 - peft missing or changed: the static list still applies
        pass
    return names


def _pattern_value(patterns: Optional[Mapping[str, Any]], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (``peft.utils.other.get_pattern_key``): the
    first key K (in insertion order) with ``re.match(rf"(.*\\.)?({K})$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(cfg: Mapping[str, Any], where: str) -> None:
    """Raises for every adapter kind a stacked plain-LoRA bank cannot represent."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only plain LoRA "
                         f"adapters (peft_type 'LORA') can be loaded as experts")
    problems = []
    for name in _variant_fields():
        if cfg.get(name):
            what = "DoRA" if name == "use_dora" else "a LoRA variant"
            problems.append(f"{name}={cfg[name]!r} ({what})")
    for name in _UNSUPPORTED_FIELDS:
        if cfg.get(name):
            problems.append(f"{name}={cfg[name]!r}")
    if cfg.get("bias", "none") not in ("none", None):
        problems.append(f"bias={cfg['bias']!r} (the adapter changes base biases)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        problems.append(f"init_lora_weights={init!r} (the adapter only works with the modified "
                        f"base weights; save it with path_initial_model_for_weight_conversion)")
    if problems:
        raise NotImplementedError(f"{where}: unsupported adapter: " + "; ".join(problems))


def _load_state_dict(path: str, device) -> Dict[str, torch.Tensor]:
    st = os.path.join(path, WEIGHTS_NAMES[0])
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st, device=str(device))
    return torch.load(os.path.join(path, WEIGHTS_NAMES[1]), map_location=device,
                      weights_only=True)


def read_peft_adapter(path: Union[str, os.PathLike], name: Optional[str] = None, *,
                      device: Union[str, torch.device] = "cpu") -> PeftLoRAAdapter:
    """Reads and validates one saved PEFT LoRA adapter directory (local only, no download).

    Args:
        path: a directory written by ``PeftModel.save_pretrained`` (``adapter_config.json`` and
            ``adapter_model.safetensors`` or ``adapter_model.bin``).
        name: the adapter's name (default: the directory name).
        device: where the tensors are loaded.

    Raises FileNotFoundError (missing files), NotImplementedError (unsupported adapter kinds: see
    the module docstring), ValueError (malformed or inconsistent tensors). The config is checked
    before the weights are read.
    """
    path = os.fspath(path)
    where = f"PEFT adapter {path!r}"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: not a local directory (adapters are read from disk only;"
                                f" download a Hub adapter first, e.g. with snapshot_download)")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{where}: no {CONFIG_NAME}")
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHTS_NAMES):
        raise FileNotFoundError(f"{where}: no {' or '.join(WEIGHTS_NAMES)}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    _check_config(cfg, where)

    state = _load_state_dict(path, device)
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    bad: List[str] = []
    for key, t in state.items():
        k = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        m = _KEY.match(k)
        if m is None:
            bad.append(key)
            continue
        parts.setdefault(m["module"], {})[m["which"]] = t
    if bad:
        kinds = {"lora_embedding_": "embedding LoRA", "lora_magnitude_vector": "DoRA",
                 "lora_B.bias": "lora_bias", "lora_": "an unknown LoRA tensor",
                 "base_layer.": "saved base weights"}
        key, why = next(((b, v) for k, v in kinds.items() for b in bad if k in b),
                        (bad[0], "not a LoRA A/B weight"))
        raise NotImplementedError(f"{where}: unsupported tensor {key!r} ({why}); "
                                  f"{len(bad)} unsupported key(s)")
    if not parts:
        raise ValueError(f"{where}: the state dict holds no lora_A / lora_B weights")

    rslora = bool(cfg.get("use_rslora", False))
    modules: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: module {module!r} has lora_{''.join(ab)} only")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise NotImplementedError(f"{where}: module {module!r} has lora_A {tuple(A.shape)} / "
                                      f"lora_B {tuple(B.shape)}: convolution LoRA is not supported"
                                      f" (only Linear / Conv1D targets)")
        r = int(A.shape[0])
        if B.shape[1] != r or r < 1:
            raise ValueError(f"{where}: module {module!r}: lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)} disagree on the rank")
        r_cfg = int(_pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", r)))
        if r_cfg != r:
            raise ValueError(f"{where}: module {module!r} has rank {r} but the config (r / "
                             f"rank_pattern) says {r_cfg}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[module] = (A, B, scale)
    return PeftLoRAAdapter(name or os.path.basename(os.path.normpath(path)), path, cfg, modules,
                           float(cfg.get("lora_dropout", 0.0) or 0.0))


def _read_all(adapters: AdaptersArg, device) -> List[PeftLoRAAdapter]:
    if isinstance(adapters, (str, os.PathLike, PeftLoRAAdapter)):
        raise TypeError("adapters must be a list (or a {name: path} dict) of adapters, got one "
                        "adapter")
    items = list(adapters.items()) if isinstance(adapters, Mapping) else [(None, a)
                                                                          for a in adapters]
    if not items:
        raise ValueError("no adapters given")
    out = []
    for name, a in items:
        if isinstance(a, PeftLoRAAdapter):
            out.append(dataclasses.replace(a, name=name) if name is not None else a)
        else:
            out.append(read_peft_adapter(a, name, device=device))
    return out


def _default_dtype(adapters: Sequence[PeftLoRAAdapter]) -> torch.dtype:
    """PEFT's ``autocast_adapter_dtype``: fp16 / bf16 adapters are computed in fp32."""
    dtype = None
    for ad in adapters:
        for A, B, _ in ad.modules.values():
            for t in (A, B):
                d = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
                dtype = d if dtype is None else torch.promote_types(dtype, d)
    return dtype or torch.float32


def load_peft_adapters(adapters: AdaptersArg, *, dtype: Optional[torch.dtype] = None,
                       device: Union[str, torch.device, None] = None,
                       trainable: bool = False) -> Dict[str, LoRABank]:
    """Stacks N saved PEFT LoRA adapters into one ``LoRABank`` per adapted linear.

    Args:
        adapters: adapter directories (or ``PeftLoRAAdapter``s), a list or a ``{name: path}``
            dict; expert n of every bank is adapter n.
        dtype: the banks' dtype (default: PEFT's ``autocast_adapter_dtype`` rule: fp16 / bf16
            adapters become fp32, other dtypes are kept).
        device: the banks' device (default: cpu).
        trainable: False (default) freezes the banks (pre-trained experts, as X-LoRA, MoLE and
            LoRA Soups use them).

    Returns:
        ``{module_name: LoRABank}`` in the adapters' module order. Bank of a module: ``A [R,
        d_in]``, ``B [d_out, R]`` with ``R = sum_n r_n`` (ragged), ``scales[n]`` = adapter n's
        PEFT scaling there; ``r_n = 0`` (and scale 0) when adapter n does not target the module.
        ``bank.dense(x, gate)`` with ``gate = ones`` equals PEFT with all N adapters active;
        ``gate = one_hot(n)`` equals adapter n alone.
    """
    ads = _read_all(adapters, "cpu")
    dtype = dtype or _default_dtype(ads)
    names: List[str] = []
    for ad in ads:
        names += [m for m in ad.modules if m not in names]
    banks: Dict[str, LoRABank] = {}
    for module in names:
        shapes = {(int(A.shape[1]), int(B.shape[0])) for ad in ads if module in ad.modules
                  for A, B, _ in [ad.modules[module]]}
        if len(shapes) != 1:
            raise ValueError(f"load_peft_adapters: the adapters disagree on the shape of "
                             f"{module!r} (d_in, d_out): {sorted(shapes)}")
        (d_in, d_out), = shapes
        ranks = [ad.rank(module) for ad in ads]
        scales = [ad.modules[module][2] if module in ad.modules else 0.0 for ad in ads]
        bank = LoRABank(d_in, d_out, ranks, len(ranks), scales=scales, init="lora", dtype=dtype,
                        device=device)
        for n, ad in enumerate(ads):
            if module in ad.modules:
                A, B, _ = ad.modules[module]
                bank.load_expert(n, A.to(dtype), B.to(dtype))
        bank.requires_grad_(trainable)
        banks[module] = bank
    return banks


# --------------------------------------------------------------------------------------------
# Attaching our layers to a transformers model
# --------------------------------------------------------------------------------------------


def _as_linear(module: nn.Module, name: str) -> nn.Linear:
    """The module as an ``nn.Linear`` (transformers' ``Conv1D``, PEFT's ``fan_in_fan_out``
    targets, becomes a Linear whose weight is a transposed VIEW of the Conv1D weight: no copy,
    and merges write through)."""
    if isinstance(module, nn.Linear):
        if not module.weight.is_floating_point():
            raise NotImplementedError(f"module {name!r} is a quantized {type(module).__name__} "
                                      f"(weight dtype {module.weight.dtype}): not supported")
        return module
    if type(module).__name__ == "Conv1D" and module.weight.dim() == 2:
        w = module.weight                                          # [d_in, d_out]
        lin = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.detach().t(), requires_grad=w.requires_grad)
        if module.bias is not None:
            lin.bias = module.bias
        return lin
    raise NotImplementedError(f"module {name!r} is a {type(module).__name__}: only nn.Linear and "
                              f"transformers Conv1D targets are supported (no embedding / conv)")


def _resolve_targets(model: nn.Module, banks: Mapping[str, LoRABank]):
    """[(parent, child_name, base Linear, bank)] for every bank, checked before any change."""
    out = []
    for name, bank in banks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapters target {name!r}, which {type(model).__name__} does not "
                             f"have: pass the model the adapters were trained on (the one given "
                             f"to get_peft_model, e.g. the *ForCausalLM)") from None
        base = _as_linear(module, name)
        if (base.in_features, base.out_features) != (bank.in_features, bank.out_features):
            raise ValueError(f"module {name!r} is {base.in_features}->{base.out_features} but the "
                             f"adapters are {bank.in_features}->{bank.out_features}")
        parent_name, _, child = name.rpartition(".")
        out.append((model.get_submodule(parent_name) if parent_name else model, child, base,
                    bank))
    return out


def apply_peft_adapters(model: nn.Module, adapters: AdaptersArg,
                        layer_cls: Type[nn.Module] = LoRASoupsCAT, *,
                        dtype: Optional[torch.dtype] = None, freeze_adapters: bool = True,
                        **layer_kwargs: Any) -> Dict[str, nn.Module]:
    """Replaces every linear the adapters target by ``layer_cls(base, ranks, **layer_kwargs)``
    holding the N adapters as its experts (in place; returns ``{module_name: layer}``).

    Args:
        model: the base transformers model the adapters were trained on (module names as in the
            adapters, e.g. a ``LlamaForCausalLM``).
        adapters: as in ``load_peft_adapters``.
        layer_cls: any class built as ``layer_cls(base: nn.Linear, ranks: list[int], **kw)``
            with a ``.bank`` (``LoRABank``): ``LoRASoupsCAT`` (default; static learned weight per
            adapter), ``MoLE`` (gate on the experts' outputs), ``XLoRALinear`` (see
            ``apply_xlora_from_adapters``), ``LoRAMoE``-style classes with ragged-rank banks.
        dtype: the banks' dtype (default: as ``load_peft_adapters``).
        freeze_adapters: True (default) freezes the loaded experts; the base linears are frozen
            by the layers themselves; the rest of the model is left as it is.
        layer_kwargs: passed to ``layer_cls`` (e.g. ``dropout=``, ``temperature=``).

    The base of a ``Conv1D`` target (GPT-2 style, PEFT ``fan_in_fan_out=True``) becomes an
    ``nn.Linear`` whose weight is a transposed view of the Conv1D weight (shared storage).
    """
    banks = load_peft_adapters(adapters, dtype=dtype)
    targets = _resolve_targets(model, banks)
    layers: Dict[str, nn.Module] = {}
    built = []
    for (parent, child, base, bank), name in zip(targets, banks):
        layer = layer_cls(base, list(bank.ranks), dtype=bank.A.dtype, **layer_kwargs)
        if not isinstance(getattr(layer, "bank", None), LoRABank):
            raise TypeError(f"apply_peft_adapters: {layer_cls.__name__} has no LoRABank .bank")
        layer.bank.load_state_dict(bank.state_dict())
        layer.bank.requires_grad_(not freeze_adapters)
        built.append((parent, child, layer))
        layers[name] = layer
    for parent, child, layer in built:  # swap only once every layer is built
        setattr(parent, child, layer)
    return layers


# PEFT XLoraConfig fields (and defaults) that apply_xlora_from_adapters reads
_XLORA_FIELDS = dict(hidden_size=None, enable_softmax=True, enable_softmax_topk=False,
                     layerwise_scalings=False, xlora_depth=1, xlora_size=2048,
                     xlora_dropout_p=0.2, use_trainable_adapters=False, softmax_temperature=1.0,
                     top_k_lora=None, scaling_pass_value=0.0, global_scaling_weight=1.0)


def apply_xlora_from_adapters(model: nn.Module, adapters: Optional[AdaptersArg] = None, *,
                              config: Any = None, dropout: Optional[float] = None,
                              per_token_softmax_topk: bool = True,
                              dtype: Optional[torch.dtype] = None,
                              **xlora_fields: Any) -> XLoRAModel:
    """X-LoRA over saved PEFT LoRA adapters with the fused layers: every adapted linear becomes an
    ``XLoRALinear`` and the model is wrapped in ``XLoRAModel`` (two-pass forward + classifier).

    Args:
        model: the base transformers model (a ``*ForCausalLM`` or similar whose forward accepts
            ``output_hidden_states=True``); modified in place and frozen.
        adapters: as in ``load_peft_adapters``; default ``config.adapters``.
        config: a PEFT ``XLoraConfig`` (or any object with its fields); its fields are the
            defaults of the keywords below.
        dropout: the LoRA dropout of the fused layers (one p for all adapters; default: the
            adapters' common ``lora_dropout``, an error if they differ).
        per_token_softmax_topk: ``enable_softmax_topk`` normalises per token (PEFT >= 0.21
            does; older PEFT and the original repo softmaxed all tokens' nonzero entries at once:
            pass False for that).
        dtype: the banks' dtype (default: as ``load_peft_adapters``).
        xlora_fields: ``XLoraConfig`` fields, same names and defaults as PEFT: hidden_size
            (default ``model.config.hidden_size``), enable_softmax, enable_softmax_topk,
            layerwise_scalings (False), xlora_depth (1), xlora_size (2048), xlora_dropout_p (0.2),
            use_trainable_adapters (False), softmax_temperature (1.0), top_k_lora (None),
            scaling_pass_value (0.0), global_scaling_weight (1.0).

    Returns: ``XLoRAModel``; ``out = xmodel(input_ids=...)`` runs the adapters-off scaling pass,
    the classifier (``xmodel.classifier``, trainable) and the real pass; the scalings [B, S, L, N]
    are in ``xmodel.last_scalings``. ``xmodel.generate(...)`` generates with a KV cache (both
    passes cached); ``xmodel.save_pretrained(dir)`` / ``XLoRAModel.from_pretrained(base, dir)``.
    Module l of the scalings is the l-th adapted linear in ``model.modules()`` order, as PEFT
    numbers them, and the classifier's layers are laid out and named as PEFT's, so a PEFT X-LoRA
    classifier's weights load as they are: ``xmodel.classifier.load_state_dict(peft_model.
    base_model.internal_xlora_classifier.state_dict())``, or
    ``xmodel.classifier.load_peft_state_dict(peft_model)`` (prefixed keys of a whole PEFT model).
    With the same adapters, classifier weights and config the logits equal PEFT's X-LoRA.
    """
    unknown = set(xlora_fields) - set(_XLORA_FIELDS)
    if unknown:
        raise TypeError(f"apply_xlora_from_adapters: unknown XLoraConfig field(s) "
                        f"{sorted(unknown)}")
    f = {k: getattr(config, k, v) if config is not None else v for k, v in _XLORA_FIELDS.items()}
    f.update(xlora_fields)
    if adapters is None:
        adapters = getattr(config, "adapters", None)
        if not adapters:
            raise ValueError("apply_xlora_from_adapters: no adapters (pass adapters= or a config "
                             "with .adapters)")
    if f["hidden_size"] is None:
        f["hidden_size"] = getattr(getattr(model, "config", None), "hidden_size", None)
        if f["hidden_size"] is None:
            raise ValueError("apply_xlora_from_adapters: pass hidden_size= (the model has no "
                             "config.hidden_size)")
    ads = _read_all(adapters, "cpu")
    if dropout is None:
        ps = sorted({ad.lora_dropout for ad in ads})
        if len(ps) > 1:
            raise ValueError(f"apply_xlora_from_adapters: the adapters have different lora_dropout "
                             f"{ps}; the fused layer draws one mask for all: pass dropout=")
        dropout = ps[0]
    layers = apply_peft_adapters(
        model, ads, XLoRALinear, dtype=dtype, freeze_adapters=not f["use_trainable_adapters"],
        dropout=dropout, top_k_lora=f["top_k_lora"], enable_softmax_topk=f["enable_softmax_topk"],
        per_token_softmax_topk=per_token_softmax_topk,
        global_scaling_weight=f["global_scaling_weight"],
        trainable_adapters=f["use_trainable_adapters"])
    p = next(model.parameters())
    classifier = XLoRAClassifier(
        f["hidden_size"], len(ads), len(layers), depth=f["xlora_depth"], hidden=f["xlora_size"],
        dropout=f["xlora_dropout_p"], layerwise_scalings=f["layerwise_scalings"],
        enable_softmax=f["enable_softmax"], softmax_temperature=f["softmax_temperature"],
        dtype=p.dtype, device=p.device)
    xmodel = XLoRAModel(model, classifier, scaling_pass_value=f["scaling_pass_value"],
                        scaling_pass_kwargs={"output_hidden_states": True, "return_dict": True},
                        freeze_model=True)
    if f["use_trainable_adapters"]:
        for layer in layers.values():
            layer.bank.requires_grad_(True)
    xmodel.adapter_names = [ad.name for ad in ads]
    xmodel.adapter_configs = {ad.name: dict(ad.config) for ad in ads}
    return xmodel


# --------------------------------------------------------------------------------------------
# Saving / loading our X-LoRA model
# --------------------------------------------------------------------------------------------

XLORA_CONFIG_NAME = "xlora_config.json"
XLORA_CLASSIFIER_NAME = "xlora_classifier.safetensors"
XLORA_ADAPTERS_DIR = "adapters"
_XLORA_FORMAT_VERSION = 1


def _xlora_modules(xmodel: XLoRAModel) -> List[Tuple[str, XLoRALinear]]:
    return [(n, m) for n, m in xmodel.model.named_modules() if isinstance(m, XLoRALinear)]


def _common(layers: Sequence[XLoRALinear], what: str, get) -> Any:
    values = {repr(get(m)) for m in layers}
    if len(values) != 1:
        raise ValueError(f"save_xlora: the X-LoRA layers differ in {what} ({sorted(values)}); "
                         f"the saved format holds one value")
    return get(layers[0])


def save_xlora(xmodel: XLoRAModel, directory: Union[str, os.PathLike]) -> None:
    """Writes an ``XLoRAModel`` (``apply_xlora_from_adapters``'s, or any whose X-LoRA modules
    live in a model with named submodules) to ``directory``:

    * ``xlora_config.json``: the adapter names (in expert order), the classifier's constructor
      arguments, the layers' settings (top_k_lora, enable_softmax_topk, per_token_softmax_topk,
      global_scaling_weight, LoRA dropout, trainable adapters), scaling_pass_value, the banks'
      dtype; all read from the live modules (so later changes are saved);
    * ``xlora_classifier.safetensors``: the classifier, keys as PEFT names them
      (``layers.0.weight``, ...);
    * ``adapters/<name>/``: each adapter as a PEFT LoRA adapter (``adapter_config.json`` +
      ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``) holding
      the CURRENT bank tensors (trained ones with ``use_trainable_adapters``); the config is the
      adapter's original one when known, else one with per-module ``rank_pattern`` /
      ``alpha_pattern`` (alpha = scale * r). Readable by ``read_peft_adapter`` and PEFT.

    The base model's weights are not saved. ``load_xlora`` reads it back.
    """
    from safetensors.torch import save_file

    if not isinstance(xmodel, XLoRAModel):
        raise TypeError(f"save_xlora: expected an XLoRAModel, got {type(xmodel).__name__}")
    mods = _xlora_modules(xmodel)
    layers = [m for _, m in mods]
    N = xmodel.classifier.num_adapters
    names = list(xmodel.adapter_names or [str(i) for i in range(N)])
    if len(names) != N or len(set(names)) != N or not all(
            isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
        raise ValueError(f"save_xlora: adapter_names {names!r} must be {N} distinct non-empty "
                         f"names usable as directory names")
    settings = dict(
        top_k_lora=_common(layers, "top_k_lora", lambda m: m.top_k_lora),
        enable_softmax_topk=_common(layers, "enable_softmax_topk", lambda m: m.enable_softmax_topk),
        per_token_softmax_topk=_common(layers, "per_token_softmax_topk",
                                       lambda m: m.per_token_softmax_topk),
        global_scaling_weight=_common(layers, "global_scaling_weight",
                                      lambda m: m.global_scaling_weight),
        dropout=_common(layers, "dropout", lambda m: float(getattr(m.lora_dropout, "p", 0.0))),
        trainable_adapters=_common(layers, "trainable adapters",
                                   lambda m: bool(m.bank.A.requires_grad)),
    )
    dtype = _common(layers, "dtype", lambda m: m.bank.A.dtype)
    meta = {"format_version": _XLORA_FORMAT_VERSION, "adapters": names,
            "classifier": xmodel.classifier.config_dict(), "layers": settings,
            "scaling_pass_value": xmodel.scaling_pass_value,
            "dtype": str(dtype).replace("torch.", ""),
            "modules": [n for n, _ in mods]}
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for i, name in enumerate(names):
        tensors: Dict[str, torch.Tensor] = {}
        rank_pattern: Dict[str, int] = {}
        alpha_pattern: Dict[str, float] = {}
        for mod, layer in mods:
            r = layer.bank.ranks[i]
            if r == 0:
                continue
            A, B = layer.bank.expert(i)
            tensors[f"base_model.model.{mod}.lora_A.weight"] = A.detach().cpu().contiguous().clone()
            tensors[f"base_model.model.{mod}.lora_B.weight"] = B.detach().cpu().contiguous().clone()
            rank_pattern[mod] = int(r)
            alpha_pattern[mod] = float(layer.bank.scales[i]) * r
        cfg = (xmodel.adapter_configs or {}).get(name)
        if cfg is None:
            cfg = {"peft_type": "LORA", "r": max(rank_pattern.values(), default=1),
                   "lora_alpha": 8, "target_modules": sorted(rank_pattern),
                   "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                   "use_rslora": False, "lora_dropout": settings["dropout"], "bias": "none",
                   "init_lora_weights": True}
        sub = os.path.join(directory, XLORA_ADAPTERS_DIR, name)
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, CONFIG_NAME), "w") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(sub, WEIGHTS_NAMES[0]), metadata={"format": "pt"})
    save_file({k: v.detach().cpu().contiguous().clone()
               for k, v in xmodel.classifier.state_dict().items()},
              os.path.join(directory, XLORA_CLASSIFIER_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, XLORA_CONFIG_NAME), "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)


def load_xlora(model: nn.Module, directory: Union[str, os.PathLike], *,
               dtype: Optional[torch.dtype] = None) -> XLoRAModel:
    """Rebuilds what ``save_xlora`` wrote on ``model`` (the fresh base model the X-LoRA model was
    built on; modified in place as ``apply_xlora_from_adapters`` does) and returns the
    ``XLoRAModel`` with the saved classifier, adapters and settings. dtype: the banks' dtype
    (default: the saved one). FileNotFoundError / ValueError (format, adapters that do not fit
    the classifier) before the model is touched."""
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, XLORA_CONFIG_NAME)
    clf_path = os.path.join(directory, XLORA_CLASSIFIER_NAME)
    for path in (cfg_path, clf_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_xlora: {path} not found (a directory written by "
                                    f"XLoRAModel.save_pretrained / save_xlora)")
    with open(cfg_path) as fh:
        meta = json.load(fh)
    if meta.get("format_version") != _XLORA_FORMAT_VERSION:
        raise ValueError(f"load_xlora: {cfg_path} has format_version "
                         f"{meta.get('format_version')!r}, this version reads "
                         f"{_XLORA_FORMAT_VERSION}")
    c, L = meta["classifier"], meta["layers"]
    adapters = {n: os.path.join(directory, XLORA_ADAPTERS_DIR, n) for n in meta["adapters"]}
    ads = _read_all(adapters, "cpu")
    modules = set()
    for ad in ads:
        modules |= set(ad.modules)
    if len(modules) != c["num_layers"] or len(ads) != c["num_adapters"]:
        raise ValueError(f"load_xlora: the saved adapters adapt {len(modules)} modules with "
                         f"{len(ads)} adapters but the classifier was saved for "
                         f"{c['num_layers']} modules and {c['num_adapters']} adapters")
    hidden = getattr(getattr(model, "config", None), "hidden_size", c["hidden_size"])
    if hidden != c["hidden_size"]:
        raise ValueError(f"load_xlora: the classifier was saved for hidden_size "
                         f"{c['hidden_size']} but the model has {hidden}")
    clf_state = load_file(clf_path)
    # keys and shapes checked on a meta-device twin before the model is touched
    XLoRAClassifier(**c, device="meta").load_peft_state_dict(clf_state)
    xm = apply_xlora_from_adapters(
        model, ads, dropout=L["dropout"], per_token_softmax_topk=L["per_token_softmax_topk"],
        dtype=dtype or getattr(torch, meta["dtype"]), hidden_size=c["hidden_size"],
        enable_softmax=c["enable_softmax"], enable_softmax_topk=L["enable_softmax_topk"],
        layerwise_scalings=c["layerwise_scalings"], xlora_depth=c["depth"],
        xlora_size=c["hidden"], xlora_dropout_p=c["dropout"],
        use_trainable_adapters=L["trainable_adapters"],
        softmax_temperature=c["softmax_temperature"], top_k_lora=L["top_k_lora"],
        scaling_pass_value=meta["scaling_pass_value"],
        global_scaling_weight=L["global_scaling_weight"])
    if not c["relu_and_dropout"] or not c["bias"]:  # not PEFT's layout: rebuild it as saved
        p = xm.classifier.last.weight
        xm.classifier = XLoRAClassifier(**c, dtype=p.dtype, device=p.device)
    xm.classifier.load_peft_state_dict(clf_state)
    return xm


# --------------------------------------------------------------------------------------------
# Accelerating an existing PEFT X-LoRA model
# --------------------------------------------------------------------------------------------


def _peft_xlora_classes():
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.xlora.layer import XLoraLayer, XLoraLinearLayer
    except ImportError as e:  # pragma: no cover - depends on the installed peft
        raise ImportError(f"accelerate_xlora needs peft with X-LoRA (peft.tuners.xlora, peft >= "
                          f"0.12): {e}") from e
    missing = [a for a in ("get_maybe_topk_scalings",) if not hasattr(XLoraLayer, a)]
    if missing:
        import peft
        raise RuntimeError(f"accelerate_xlora: peft {peft.__version__}'s XLoraLayer has no "
                           f"{missing}; this version of peft's X-LoRA is not supported")
    return XLoraLayer, XLoraLinearLayer, LoraLinear


class _DummyTracker:
    """Remembers the scaling pass's dummy scalings (``make_dummy_scalings``) of one PEFT X-LoRA
    classifier, so the fused layers know when the scalings are the all-zero dummy."""

    def __init__(self, classifier: nn.Module):
        self.classifier = classifier
        self.original = classifier.__dict__.get("make_dummy_scalings")
        self.bound = classifier.make_dummy_scalings
        self.last: Optional[weakref.ref] = None
        self.last_value: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        t = self.bound(*args, **kwargs)
        self.last = weakref.ref(t)
        self.last_value = getattr(self.classifier, "override_scaling_pass_value", None)
        return t

    def is_zero_dummy(self, scalings: torch.Tensor) -> bool:
        return (self.last is not None and self.last() is scalings
                and isinstance(self.last_value, (int, float)) and self.last_value == 0)

    def install(self) -> None:
        self.classifier.make_dummy_scalings = self

    def uninstall(self) -> None:
        if self.classifier.__dict__.get("make_dummy_scalings") is self:
            if self.original is None:
                del self.classifier.make_dummy_scalings
            else:
                self.classifier.make_dummy_scalings = self.original


def _dropout_active(drop: nn.Module) -> bool:
    if isinstance(drop, nn.Identity):
        return False
    if isinstance(drop, nn.Dropout):
        return drop.training and drop.p > 0
    return drop.training  # an unknown module: run it per adapter, as PEFT does


class FusedXLoraLinear:
    """The fused forward of one PEFT X-LoRA ``lora.Linear`` (installed by ``accelerate_xlora`` as
    the module's ``forward``, like PEFT installs ``XLoraLinearLayer.forward``).

    Same computation as PEFT's ``XLoraLinearLayer.forward`` (peft/tuners/xlora/layer.py), with
    the loop over adapters replaced by one ``stacked_gated_lora``::

        y [B, S, d_out] = base_layer(x) + sum_n g * sigma_n * s_n * B_n A_n drop_n(x)

    x [B, S, d_in]; ``sigma = xlayer.get_maybe_topk_scalings(scalings)`` [B, S, N] (PEFT's own
    top-k / softmax-top-k, whichever version), ``g = config.global_scaling_weight`` (1 and
    sigma = 1 when called without scalings), ``s_n = target.scaling[name_n]``, n over
    ``target.active_adapters`` (an adapter this module lacks is a rank-0 expert), LoRA in the
    adapters' dtype, the result in x's dtype. Everything is read live at each call (config,
    active adapters, scalings, merged / disabled state); the stacked ``A [R, d_in]`` / ``B
    [d_out, R]`` are cached and rebuilt when a weight changes (version counter, storage, dtype,
    device), and rebuilt differentiably (torch.cat) when an adapter weight requires grad
    (``use_trainable_adapters=True``): gradients reach PEFT's own parameters.

    Dropout: in eval (or with p = 0) one dense op. In training with active LoRA dropout each
    adapter gets its own mask, drawn by PEFT's dropout modules in PEFT's order on the same shape
    (so the RNG stream matches PEFT's loop), and the N dropped copies go through the grouped
    (sgmv) ops. The all-zero dummy scalings of the scaling pass (``scaling_pass_value=0``) add
    exactly 0, so that pass runs the base layer only (PEFT still draws dropout masks there).
    Anything else unusual (x not [B, S, d_in] with [B, S, N] scalings, adapters of mixed dtype
    or device, more active adapters than scalings) runs PEFT's original forward (counted in
    ``fallback_calls``).
    """

    def __init__(self, xlayer: Any, tracker: Optional[_DummyTracker]):
        self.xlayer = xlayer
        self.original_forward = xlayer.forward
        self.tracker = tracker
        self.fallback_calls = 0
        self._cache_key: Any = None
        self._cache: Any = None

    # -- the stacked bank --------------------------------------------------------------------

    def _bank(self, names: Sequence[str]):
        """(A [R, d_in], B [d_out, R], rank_offsets [N+1] int32, scales [N] fp32, present ids,
        max rank), or None (no adapter here, or mixed dtype / device: fall back)."""
        t = self.xlayer.target
        present = [i for i, n in enumerate(names) if n in t.lora_A]
        ws = [(t.lora_A[names[i]].weight, t.lora_B[names[i]].weight) for i in present]
        if not ws:
            return None
        A0 = ws[0][0]
        if any(w.dtype != A0.dtype or w.device != A0.device for pair in ws for w in pair):
            return None
        scales = tuple(float(t.scaling[names[i]]) if i in present else 0.0
                       for i in range(len(names)))
        need_grad = torch.is_grad_enabled() and any(w.requires_grad for pair in ws for w in pair)
        key = (tuple(names), scales, A0.dtype, A0.device,
               tuple((id(w), w._version, w.data_ptr()) for pair in ws for w in pair))
        if not need_grad and key == self._cache_key:
            return self._cache
        ranks = [0] * len(names)
        for i, (a, _) in zip(present, ws):
            ranks[i] = int(a.shape[0])
        offs = torch.tensor([0] + ranks, dtype=torch.int64).cumsum(0).to(torch.int32)
        with torch.set_grad_enabled(need_grad):
            A = torch.cat([a for a, _ in ws], 0)
            B = torch.cat([b for _, b in ws], 1)
        if not need_grad:
            A, B = A.detach(), B.detach()
        out = (A, B, offs.to(A0.device), torch.tensor(scales, dtype=torch.float32,
                                                       device=A0.device), present, max(ranks))
        if not need_grad:
            self._cache_key, self._cache = key, out
        return out

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, scalings: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        xl = self.xlayer
        target = xl.target
        previous_dtype = x.dtype
        if getattr(xl, "adapters_disabled", False):
            return target.base_layer(x, *args, **kwargs).to(previous_dtype)
        if target.merged or (scalings is not None and self.tracker is not None
                             and self.tracker.is_zero_dummy(scalings)):
            return target.base_layer(x, *args, **kwargs).to(previous_dtype)
        names = list(target.active_adapters)
        N = len(names)
        if scalings is not None and (x.dim() != 3 or scalings.dim() != 4
                                     or tuple(scalings.shape[:2]) != tuple(x.shape[:2])
                                     or scalings.shape[-1] < N):
            self.fallback_calls += 1
            return self.original_forward(x, *args, scalings=scalings, **kwargs)
        bank = self._bank(names) if N else None
        if N and bank is None and any(n in target.lora_A for n in names):
            self.fallback_calls += 1
            return self.original_forward(x, *args, scalings=scalings, **kwargs)
        if scalings is not None:
            sigma = xl.get_maybe_topk_scalings(scalings)                     # [B, S, N']
        result = target.base_layer(x, *args, **kwargs)
        if bank is None:  # no active adapter in this module
            return result.to(previous_dtype)
        A, B, offs, scales, present, max_rank = bank
        d_in = A.shape[1]
        xa = x.to(A.dtype)
        T = x.numel() // d_in if d_in else 0
        if scalings is not None:
            gate = sigma[..., :N].reshape(T, N).to(A.dtype)
            g = xl.config.global_scaling_weight
            if g != 1:
                gate = gate * g
        else:
            gate = A.new_ones(T, N)
        drops = [target.lora_dropout[names[i]] for i in present]
        base = result.reshape(T, -1) if result.dtype == A.dtype else None
        if any(_dropout_active(d) for d in drops):
            # one dropped copy of x per adapter (PEFT's masks, in PEFT's order) -> grouped ops
            xd = torch.stack([d(xa) for d in drops], dim=-2).reshape(T * len(present), d_in)
            ids = torch.tensor(present, dtype=torch.int32, device=x.device).expand(T, -1)
            y = moe_lora_linear(xd.reshape(T, len(present), d_in), A, B, offs,
                                gate[:, present].contiguous(), ids, scales, base=base,
                                max_rank=max_rank, x_per_slot=True)
        else:
            y = ops.stacked_gated_lora(xa.reshape(T, d_in), A, B, gate, offs, scales, base)
        if base is None:
            y = result + y.reshape(result.shape).to(result.dtype)
        return y.reshape(result.shape).to(previous_dtype)


def _find_xlora_model(model: nn.Module):
    try:
        from peft.tuners.xlora.model import XLoraModel
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"accelerate_xlora needs peft with X-LoRA: {e}") from e
    found = [m for m in model.modules() if isinstance(m, XLoraModel)]
    if not found:
        raise ValueError(f"accelerate_xlora: {type(model).__name__} holds no PEFT XLoraModel; pass "
                         f"the model returned by get_peft_model(base, XLoraConfig(...))")
    return found[0]


def _check_xlora_adapter_names(xmodel: nn.Module) -> None:
    """ValueError when PEFT's X-LoRA model cannot run its own adapters: PEFT loads adapter i of
    ``XLoraConfig.adapters`` under the name ``str(i)`` but then activates the config's KEYS, so
    any key other than "0", "1", ... names no loaded adapter (PEFT's own forward fails with a
    KeyError, and a fused layer would silently add nothing)."""
    cfg = getattr(xmodel, "xlora_config", None)
    names = [str(k) for k in (getattr(cfg, "adapters", None) or {})]
    lora_model = xmodel.__dict__.get("_modules", {}).get("lora_model")
    loaded = sorted(getattr(lora_model, "peft_config", {}) or {})
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise ValueError(f"accelerate_xlora: the XLoraConfig names its adapters {names} but PEFT "
                         f"loaded them as {[n for n in loaded if n.isdigit()]} (PEFT's XLoraModel "
                         f"stores adapter i under the name str(i) and activates the config's "
                         f"keys), so {unknown} name no adapter and PEFT itself cannot run this "
                         f"model (KeyError in disable_adapter_layers). Build it with adapters="
                         f"{{'0': path_0, '1': path_1, ...}}, or use apply_xlora_from_adapters "
                         f"(any names)")


def accelerate_xlora(model: nn.Module) -> nn.Module:
    """Runs a PEFT X-LoRA model's adapters through molora's fused ops, in place.

    Args:
        model: the ``PeftModel`` from ``get_peft_model(base, XLoraConfig(...))`` /
            ``PeftModel.from_pretrained`` (or its ``XLoraModel``).

    Every ``lora.Linear`` whose forward PEFT replaced by ``XLoraLinearLayer.forward`` gets a
    ``FusedXLoraLinear`` forward instead (see its docstring for the exact semantics). PEFT's
    modules, parameters, classifier, hooks, config setters (``set_topk_lora``,
    ``set_global_scaling_weight``, ``set_scaling_pass_value``), saving and ``generate`` are
    untouched and keep working. X-LoRA embedding / Conv2d layers keep PEFT's loop (a warning
    says so). Checks everything first and raises before any change for what it cannot serve:
    DoRA and ``lora_bias`` adapters, and adapter names PEFT's X-LoRA cannot run (an
    ``XLoraConfig.adapters`` key other than "0", "1", ...: PEFT loads adapter i as ``str(i)``).
    Idempotent. Returns ``model``; ``restore_xlora(model)`` puts PEFT's forwards back.
    """
    XLoraLayer, XLoraLinearLayer, LoraLinear = _peft_xlora_classes()
    xmodel = _find_xlora_model(model)
    _check_xlora_adapter_names(xmodel)
    todo, others = [], 0
    for name, m in xmodel.named_modules():
        owner = getattr(m.__dict__.get("forward"), "__self__", None)
        if isinstance(owner, XLoraLinearLayer) and isinstance(m, LoraLinear):
            for adapter in m.lora_A:
                if m.use_dora.get(adapter, False):
                    raise ValueError(f"accelerate_xlora: {name} adapter {adapter!r} uses DoRA, "
                                     f"which PEFT's X-LoRA does not support either")
                if not isinstance(m.lora_A[adapter], nn.Linear) or not isinstance(
                        m.lora_B[adapter], nn.Linear) or m.lora_A[adapter].bias is not None:
                    raise NotImplementedError(f"accelerate_xlora: {name} adapter {adapter!r} is "
                                              f"not a plain Linear LoRA")
                if m.lora_B[adapter].bias is not None:
                    raise NotImplementedError(f"accelerate_xlora: {name} adapter {adapter!r} has "
                                              f"lora_bias=True: not supported by the fused op")
            todo.append((m, owner))
        elif isinstance(owner, XLoraLayer):
            others += 1
    already = sum(isinstance(getattr(m.__dict__.get("forward"), "__self__", None),
                             FusedXLoraLinear) for m in xmodel.modules())
    if not todo and not already:
        raise ValueError("accelerate_xlora: no X-LoRA linear layer found")
    if others:
        warnings.warn(f"accelerate_xlora: {others} X-LoRA embedding / conv layer(s) keep PEFT's "
                      f"per-adapter loop (only linear layers are fused)")
    classifier = getattr(xmodel, "internal_xlora_classifier", None)
    tracker = None
    if classifier is not None and hasattr(classifier, "make_dummy_scalings"):
        current = classifier.__dict__.get("make_dummy_scalings")
        if isinstance(current, _DummyTracker):
            tracker = current
        else:
            tracker = _DummyTracker(classifier)
            tracker.install()
    for m, owner in todo:
        m.forward = FusedXLoraLinear(owner, tracker).forward
    return model


def restore_xlora(model: nn.Module) -> nn.Module:
    """Undoes ``accelerate_xlora``: PEFT's ``XLoraLinearLayer.forward`` back on every layer."""
    xmodel = _find_xlora_model(model)
    for m in xmodel.modules():
        owner = getattr(m.__dict__.get("forward"), "__self__", None)
        if isinstance(owner, FusedXLoraLinear):
            m.forward = owner.original_forward
            if owner.tracker is not None:
                owner.tracker.uninstall()
    return model


# --------------------------------------------------------------------------------------------
# The ``lora`` method of hf_transformers in PEFT's saved format
# --------------------------------------------------------------------------------------------

_PEFT_WEIGHTS_NAME = WEIGHTS_NAMES[0]
_PEFT_PREFIX = "base_model.model."


def export_peft_lora(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Writes a model converted by ``apply_molora(model, MoLoRAConfig("lora", ...))`` as a PEFT
    LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
    (``base_model.model.<module>.lora_A.weight`` [r, d_in] / ``lora_B.weight`` [d_out, r]), so
    ``PeftModel.from_pretrained(base_model, directory)`` gives the same outputs.

    ``target_modules`` is written as a regex of the exact module names (PEFT full-matches a
    string), so PEFT adapts exactly the modules we did. Raises ValueError (nothing written) for
    another method, merged layers, or layers whose rank / alpha / rsLoRA differ."""
    from safetensors.torch import save_file

    from .hf_transformers import _molora_layers

    layers = _molora_layers(model)
    config = model.molora_config
    if config.method != "lora":
        raise ValueError(f"export_peft_lora: only the 'lora' method has PEFT's format, the model "
                         f"uses {config.method!r}")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"export_peft_lora: {merged[0]} (and {len(merged) - 1} more) is merged; "
                         f"call unmerge_molora(model) first (PEFT would add the update again)")
    shapes = {(m.molora.bank.total_rank, float(m.molora.bank.alpha), bool(m.molora.bank.rslora))
              for _, m in layers}
    if len(shapes) != 1:
        raise ValueError(f"export_peft_lora: the layers differ in (rank, alpha, rslora): "
                         f"{sorted(shapes)}")
    (r, alpha, rslora), = shapes
    tensors: Dict[str, torch.Tensor] = {}
    for name, m in layers:
        A, B = m.molora.bank.expert(0)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().cpu().contiguous().clone()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().cpu().contiguous().clone()
    base_config = getattr(model, "config", None)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": float(config.dropout or 0.0), "use_rslora": rslora,
        "target_modules": "|".join(re.escape(n) for n, _ in layers),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
        "layers_to_transform": None, "inference_mode": True,
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, _PEFT_WEIGHTS_NAME), metadata={"format": "pt"})


def import_peft_lora(model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
    """Converts ``model`` (the unconverted base the adapter was trained on) with
    ``apply_molora(model, MoLoRAConfig("lora", ...))`` from a saved PEFT LoRA adapter and loads
    its weights: the outputs equal ``PeftModel.from_pretrained(model, directory)``'s. In place;
    returns the model.

    Raises before the model changes: what ``read_peft_adapter`` refuses (DoRA, variants, ...),
    NotImplementedError for per-module ranks / alphas (``rank_pattern`` / ``alpha_pattern``
    with differing values) or ``fan_in_fan_out``, ValueError when the adapter's modules are not
    exactly what ``apply_molora`` would replace (e.g. ``layers_to_transform``, ``lm_head``)."""
    from .hf_transformers import MoLoRAConfig, _molora_layers, _plan, apply_molora

    adapter = read_peft_adapter(directory)
    where = f"import_peft_lora({os.fspath(directory)!r})"
    if adapter.config.get("fan_in_fan_out"):
        raise NotImplementedError(f"{where}: fan_in_fan_out (Conv1D) adapters are not supported")
    ranks = {int(A.shape[0]) for A, _, _ in adapter.modules.values()}
    scales = {s for _, _, s in adapter.modules.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise NotImplementedError(f"{where}: the modules have different ranks {sorted(ranks)} or "
                                  f"scalings {sorted(scales)}; the 'lora' method uses one")
    rslora = bool(adapter.config.get("use_rslora", False))
    r, scale = ranks.pop(), scales.pop()
    alpha = float(adapter.config.get("lora_alpha", 8))
    if (alpha / math.sqrt(r) if rslora else alpha / r) != scale:   # a uniform alpha_pattern
        alpha = scale * (math.sqrt(r) if rslora else r)
    attrs = sorted({name.rsplit(".", 1)[-1] for name in adapter.modules})
    config = MoLoRAConfig("lora", rank=r, alpha=alpha, dropout=adapter.lora_dropout,
                          target_modules=attrs,
                          method_kwargs={"rslora": True} if rslora else {})
    targets, _ = _plan(model, config)
    planned = {t.name for t in targets}
    if planned != set(adapter.modules):
        extra = sorted(set(adapter.modules) - planned)
        lacking = sorted(planned - set(adapter.modules))
        raise ValueError(f"{where}: the adapter's modules are not the ones apply_molora replaces "
                         f"(in the adapter only: {extra[:3]}; would be adapted but the adapter "
                         f"lacks: {lacking[:3]})")
    apply_molora(model, config)
    for name, layer in _molora_layers(model):
        A, B, _ = adapter.modules[name]
        bank = layer.molora.bank
        bank.load_expert(0, A.to(bank.A), B.to(bank.B))
    return model
