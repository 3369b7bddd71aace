"""Hugging Face ``kernels`` integration: molora's fused MoE-LoRA forward as hub-style layers.

The ``kernels`` convention (``kernels.use_kernel_forward_from_hub`` / ``kernelize``): model code
marks a layer class with a name and keeps a plain PyTorch reference ``forward``; a kernel
repository provides, under ``<kernel>.layers.<Name>``, a pure layer class (no ``__init__``, no
members but ``forward`` and the ``has_backward`` / ``can_torch_compile`` flags) whose ``forward``
``kernelize`` binds to every instance of the marked class. The kernel forward reads the host
module's attributes, so host and kernel share an attribute contract.

Here:

* Host contract (attributes of the marked module), E experts of rank r on a ``d_in -> d_out``
  linear::

      base_layer   nn.Module [..., d_in] -> [..., d_out], or None (adapter-only)
      lora_A       tensor [E, r, d_in]    (expert e's PEFT lora_A.weight at [e])
      lora_B       tensor [E, d_out, r]   (expert e's PEFT lora_B.weight at [e])
      scaling      float or tensor [E]    (alpha / r per expert)
      lora_dropout nn.Module or None      (one mask on the adapter input, shared by the experts)

* Two marked reference hosts, to use as they are or copy into model code:
  ``GatedLoRALinear`` (``forward(x [..., d_in], gate [..., E])``: dense soft gates, X-LoRA /
  LoRAMoE / LoRA Soups style) and ``TopKLoRALinear`` (``forward(x, routing_weights [..., k],
  selected_experts [..., k] int, -1 = none)``: sparse top-k routing). Both compute
  ``y = base(x) + sum_e g_e * scaling_e * B_e A_e drop(x)`` with a loop over the experts.
* The kernel layers, ``layers.MoloraGatedLoRALinear`` and ``layers.MoloraTopKLoRALinear``: the
  same math through ``stacked_gated_lora`` (dense) and ``functional.moe_lora_linear``
  (top-k). Differentiable (``has_backward = True``) and traceable by
  ``torch.compile`` (``can_torch_compile = True``; the ops have fake kernels).
* ``kernel_layer_mapping()`` for ``kernels.use_kernel_mapping``; by default it uses
  ``MoloraLayerRepository`` (in-process: ``load()`` returns the class from this module, no files,
  no network); ``kernel_layer_mapping(local_repo=path)`` writes a local kernel directory
  (``write_local_kernel_repo``) and maps to ``kernels.LocalLayerRepository`` instead.

Example::

    from kernels import Mode, kernelize, use_kernel_mapping
    from molora_ops.integrations.hf_kernels import GatedLoRALinear, kernel_layer_mapping

    layer = GatedLoRALinear(nn.Linear(1024, 1024), num_experts=8, r=16, alpha=32)
    with use_kernel_mapping(kernel_layer_mapping()):
        kernelize(model_holding_layer, mode=Mode.INFERENCE, device="cuda")

Tested with kernels 0.17.2 (``LocalLayerRepository`` reads the variant directory's
``metadata.json``, whose format belongs to that package).
"""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..functional import moe_lora_linear

__all__ = [
    "GATED_LAYER_NAME", "TOPK_LAYER_NAME", "GatedLoRALinear", "TopKLoRALinear", "layers",
    "MoloraLayerRepository", "kernel_layer_mapping", "write_local_kernel_repo",
]

GATED_LAYER_NAME = "MoloraGatedLoRALinear"
TOPK_LAYER_NAME = "MoloraTopKLoRALinear"

try:
    from kernels import use_kernel_forward_from_hub as _mark
except ImportError:  # the hosts still work (reference forward) without the kernels package
    def _mark(layer_name: str):
        def decorator(cls):
            cls.kernel_layer_name = layer_name
            return cls
        return decorator


# --------------------------------------------------------------------------------------------
# The host contract
# --------------------------------------------------------------------------------------------


def _host_bank(host: nn.Module):
    """Reads the contract: (A3 [E, r, d_in], B3 [E, d_out, r], scales [E] fp32)."""
    try:
        A3, B3 = host.lora_A, host.lora_B
        scaling = host.scaling
    except AttributeError as e:
        raise AttributeError(f"{type(host).__name__} does not follow the molora kernel layer "
                             f"contract (base_layer, lora_A [E, r, d_in], lora_B [E, d_out, r], "
                             f"scaling, lora_dropout): {e}") from None
    if A3.dim() != 3 or B3.dim() != 3 or A3.shape[0] != B3.shape[0] or A3.shape[1] != B3.shape[2]:
        raise ValueError(f"{type(host).__name__}: lora_A must be [E, r, d_in] and lora_B "
                         f"[E, d_out, r], got {tuple(A3.shape)} and {tuple(B3.shape)}")
    E = A3.shape[0]
    if isinstance(scaling, torch.Tensor):
        scales = scaling.to(device=A3.device, dtype=torch.float32).reshape(-1).expand(E)
    else:
        scales = torch.full((E,), float(scaling), dtype=torch.float32, device=A3.device)
    return A3, B3, scales


def _prepare(host: nn.Module, x: torch.Tensor):
    """Flattened input, dropped adapter input, base output and the stacked bank layout."""
    A3, B3, scales = _host_bank(host)
    E, r, d_in = A3.shape
    d_out = B3.shape[1]
    if x.shape[-1:] != (d_in,):
        raise ValueError(f"{type(host).__name__}: x must have last dim {d_in}, got "
                         f"{tuple(x.shape)}")
    x2 = x.reshape(-1, d_in)
    drop = getattr(host, "lora_dropout", None)
    xd = (drop(x2) if drop is not None else x2).to(A3.dtype)
    base_layer = getattr(host, "base_layer", None)
    base = None if base_layer is None else base_layer(x2).to(A3.dtype)
    A = A3.reshape(E * r, d_in)                                   # a view: rows e*r:(e+1)*r
    B = B3.permute(1, 0, 2).reshape(d_out, E * r)                 # one [d_out, E*r] copy
    ro = ops.uniform_rank_offsets(E, r, device=A3.device)
    return x2, xd, base, A, B, ro, scales, E, r


def _gated_forward(host: nn.Module, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    x2, xd, base, A, B, ro, scales, E, r = _prepare(host, x)
    if gate.shape[-1:] != (E,) or gate.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{type(host).__name__}: gate must have shape {tuple(x.shape[:-1])} + "
                         f"({E},), got {tuple(gate.shape)}")
    y = ops.stacked_gated_lora(xd, A, B, gate.reshape(-1, E).to(A.dtype), ro, scales, base)
    return y.to(x.dtype).reshape(*x.shape[:-1], B.shape[0])


def _topk_forward(host: nn.Module, x: torch.Tensor, routing_weights: torch.Tensor,
                  selected_experts: torch.Tensor) -> torch.Tensor:
    x2, xd, base, A, B, ro, scales, E, r = _prepare(host, x)
    k = selected_experts.shape[-1] if selected_experts.dim() else 0
    if (selected_experts.shape[:-1] != x.shape[:-1]
            or routing_weights.shape != selected_experts.shape):
        raise ValueError(f"{type(host).__name__}: routing_weights and selected_experts must "
                         f"have shape {tuple(x.shape[:-1])} + (k,), got "
                         f"{tuple(routing_weights.shape)} and {tuple(selected_experts.shape)}")
    y = moe_lora_linear(xd, A, B, ro, routing_weights.reshape(-1, k).to(A.dtype),
                        selected_experts.reshape(-1, k), scales, base=base, max_rank=r)
    return y.to(x.dtype).reshape(*x.shape[:-1], B.shape[0])


# --------------------------------------------------------------------------------------------
# The kernel layers (pure: kernels' _validate_layer allows forward + the two flags only)
# --------------------------------------------------------------------------------------------


class MoloraGatedLoRALinear(nn.Module):
    """Kernel layer: ``y = base_layer(x) + sum_e gate[..., e] * scaling_e * B_e A_e drop(x)``
    through ``stacked_gated_lora`` (one GEMM to the E*r stacked ranks, the gate broadcast per
    rank block, one GEMM out). x [..., d_in] (any float dtype; the adapters run in lora_A's
    dtype), gate [..., E] -> [..., d_out] in x's dtype. Host contract: see the module docstring.
    """

    has_backward = True
    can_torch_compile = True

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return _gated_forward(self, x, gate)


class MoloraTopKLoRALinear(nn.Module):
    """Kernel layer: ``y = base_layer(x) + sum_j w[..., j] * scaling_e * B_e A_e drop(x)`` over
    ``e = selected_experts[..., j]`` (-1 = no expert), through ``functional.moe_lora_linear``
    (grouped dispatch -> ``sgmv_shrink`` -> ``sgmv_expand``, which computes only the selected
    experts' rows, or the dense / fused form where the cost model picks it). x [..., d_in],
    routing_weights [..., k] float, selected_experts [..., k] int32/int64 -> [..., d_out].
    """

    has_backward = True
    can_torch_compile = True

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor,
                selected_experts: torch.Tensor) -> torch.Tensor:
        return _topk_forward(self, x, routing_weights, selected_experts)


#: what a kernel repository exposes as ``<kernel>.layers``
layers = types.SimpleNamespace(**{GATED_LAYER_NAME: MoloraGatedLoRALinear,
                                  TOPK_LAYER_NAME: MoloraTopKLoRALinear})


# --------------------------------------------------------------------------------------------
# Reference hosts (model side)
# --------------------------------------------------------------------------------------------


class _LoRAExpertsHost(nn.Module):
    """E LoRA experts of one linear, stored in the host contract's layout."""

    def __init__(self, base_layer: Optional[nn.Module], num_experts: int, r: int,
                 alpha: float = 16.0, dropout: float = 0.0, *,
                 in_features: Optional[int] = None, out_features: Optional[int] = None,
                 init: str = "lora", dtype=None, device=None):
        super().__init__()
        if base_layer is not None:
            in_features = base_layer.in_features if in_features is None else in_features
            out_features = base_layer.out_features if out_features is None else out_features
            base_layer.requires_grad_(False)
            dtype = dtype or base_layer.weight.dtype
            device = device or base_layer.weight.device
        if in_features is None or out_features is None:
            raise ValueError(f"{type(self).__name__}: pass in_features / out_features without a "
                             f"base_layer")
        if num_experts < 1 or r < 1:
            raise ValueError(f"{type(self).__name__}: need num_experts >= 1 and r >= 1")
        if init not in ("lora", "gaussian"):
            raise ValueError(f"{type(self).__name__}: init must be 'lora' or 'gaussian'")
        self.base_layer = base_layer
        f = dict(dtype=dtype, device=device)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, **f))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, r, **f))
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():  # PEFT's init per expert: A kaiming-uniform, B zeros (or random)
            for e in range(num_experts):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
                if init == "gaussian":
                    nn.init.kaiming_uniform_(self.lora_B[e], a=math.sqrt(5))
                else:
                    nn.init.zeros_(self.lora_B[e])

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def _expert(self, xd: torch.Tensor, e: int) -> torch.Tensor:
        s = self.scaling[e] if isinstance(self.scaling, torch.Tensor) else self.scaling
        return s * F.linear(F.linear(xd, self.lora_A[e]), self.lora_B[e])

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_layer is None:
            return x.new_zeros(*x.shape[:-1], self.lora_B.shape[1]).to(self.lora_A.dtype)
        return self.base_layer(x).to(self.lora_A.dtype)


@_mark(GATED_LAYER_NAME)
class GatedLoRALinear(_LoRAExpertsHost):
    """Reference host: ``y = base_layer(x) + sum_e gate[..., e] * scaling * B_e A_e drop(x)``,
    a loop over the E experts. ``kernelize`` swaps in ``layers.MoloraGatedLoRALinear``.

    Args: base_layer (``nn.Linear`` d_in -> d_out, frozen; or None with in_features /
    out_features), num_experts E, r, alpha (scaling = alpha / r), dropout (one mask shared by
    the experts), init ("lora": B = 0; "gaussian": random B). ``forward(x [..., d_in],
    gate [..., E]) -> [..., d_out]``.
    """

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xd = self.lora_dropout(x).to(self.lora_A.dtype)
        y = self._base(x)
        for e in range(self.num_experts):
            y = y + gate[..., e:e + 1].to(y.dtype) * self._expert(xd, e)
        return y.to(x.dtype)


@_mark(TOPK_LAYER_NAME)
class TopKLoRALinear(_LoRAExpertsHost):
    """Reference host: ``y = base_layer(x) + sum_j w[..., j] * scaling * B_e A_e drop(x)`` over
    ``e = selected_experts[..., j]`` (-1 = none), a loop over the E experts (every expert runs
    on every token, masked). ``kernelize`` swaps in ``layers.MoloraTopKLoRALinear``.
    ``forward(x [..., d_in], routing_weights [..., k], selected_experts [..., k]) -> [..., d_out]``.
    """

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor,
                selected_experts: torch.Tensor) -> torch.Tensor:
        xd = self.lora_dropout(x).to(self.lora_A.dtype)
        y = self._base(x)
        for e in range(self.num_experts):
            w = (routing_weights * (selected_experts == e)).sum(-1, keepdim=True)
            y = y + w.to(y.dtype) * self._expert(xd, e)
        return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Repositories and the mapping
# --------------------------------------------------------------------------------------------


class MoloraLayerRepository:
    """A ``kernels`` repository (``RepositoryProtocol``: ``load()`` returning the layer class)
    served from this installed package: no files, no network, no hub cache."""

    def __init__(self, layer_name: str):
        if not hasattr(layers, layer_name):
            raise ValueError(f"MoloraLayerRepository: no layer {layer_name!r}; available: "
                             f"{sorted(vars(layers))}")
        self.layer_name = layer_name

    def load(self):
        return getattr(layers, self.layer_name)

    def __eq__(self, other) -> bool:
        return isinstance(other, MoloraLayerRepository) and other.layer_name == self.layer_name

    def __hash__(self) -> int:
        return hash(("molora_ops", self.layer_name))

    def __str__(self) -> str:
        return f"molora_ops.integrations.hf_kernels (layer `{self.layer_name}`)"

    __repr__ = __str__


def write_local_kernel_repo(path: Union[str, os.PathLike], backend: str = "cpu") -> Path:
    """Writes a local ``kernels`` repository at ``path`` whose ``layers`` are this module's
    (for ``kernels.LocalLayerRepository(repo_path=path, layer_name=...)``): an ``__init__.py``
    that imports them from the installed molora_ops and the variant's ``metadata.json`` (format
    of kernels 0.17). ``backend`` is recorded in the metadata ("cpu" / "cuda"; the layers
    themselves run on any device molora_ops supports). Returns the path."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    meta = {"name": "molora-ops-layers", "id": "_molora_ops_layers", "version": 1,
            "license": "Apache-2.0", "python-depends": [], "backend": {"type": backend}}
    (p / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (p / "__init__.py").write_text(
        '"""molora_ops fused MoE-LoRA layers as a local kernels repository."""\n'
        "from molora_ops.integrations.hf_kernels import layers  # noqa: F401\n")
    return p


def kernel_layer_mapping(devices: Sequence[str] = ("cpu", "cuda"),
                         local_repo: Union[str, os.PathLike, None] = None) -> dict:
    """``{layer_name: {device: repository}}`` for ``kernels.use_kernel_mapping`` /
    ``register_kernel_mapping``, for both layer names (``GATED_LAYER_NAME``,
    ``TOPK_LAYER_NAME``) on every device in ``devices``.

    ``local_repo=None``: ``MoloraLayerRepository`` (in-process). A path: writes
    ``write_local_kernel_repo(local_repo)`` and maps to ``kernels.LocalLayerRepository``.
    The repositories are registered for every mode (``Mode.FALLBACK``); the layers support
    ``Mode.TRAINING`` and ``Mode.TORCH_COMPILE``.
    """
    names = (GATED_LAYER_NAME, TOPK_LAYER_NAME)
    if local_repo is None:
        return {n: {d: MoloraLayerRepository(n) for d in devices} for n in names}
    try:
        from kernels import LocalLayerRepository
    except ImportError as e:
        raise ImportError(f"kernel_layer_mapping(local_repo=...) needs the kernels package: {e}"
                          ) from e
    path = write_local_kernel_repo(local_repo)
    return {n: {d: LocalLayerRepository(repo_path=path, layer_name=n) for d in devices}
            for n in names}
