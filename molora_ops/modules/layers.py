"""The core layer every token- or sequence-routed method is built from.

``MoLoRALinear`` = a frozen base linear + a ``LoRABank`` + (optionally) a ``Router`` + a gating
policy (``routing.py``):

    y = base(x) + sum_e g_e(x) s_e B_e A_e drop(x)

with ``g`` sparse (top-k, top-p, switch, sampled: grouped dispatch path) or dense (softmax, static,
external scalings: stacked gated path). The method classes in ``methods.py`` only choose the router,
the policy, the hyperparameters and the aux loss.

Dtypes: the bank may be kept in fp32 while the base runs in bf16/fp16 (MoE-PEFT computes every
LoRA in fp32); the input is cast to the bank's dtype for the adapters and the sum is returned in
the input's dtype. Any leading dims: x [..., d_in] -> y [..., d_out].
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .bank import LoRABank
from .routing import Routing

__all__ = ["MoLoRALinear", "LoRALinear", "frozen_linear", "check_last_dim", "is_quantized",
           "base_dtype", "base_forward"]


def check_last_dim(module: nn.Module, x: torch.Tensor, in_features: int) -> None:
    """x [..., d_in] or ValueError (a bare reshape would silently regroup a wrong last dim)."""
    if tuple(x.shape[-1:]) != (in_features,):
        raise ValueError(f"{type(module).__name__}: x must have last dim {in_features}, got shape "
                         f"{tuple(x.shape)}")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear (its ``weight`` holds integer codes: bitsandbytes
    ``Linear4bit`` packs nf4/fp4 into uint8, ``Linear8bitLt`` stores int8 rows)."""
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and not w.dtype.is_floating_point


def base_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a base linear computes in, which the adapters default to.

    A float weight's own dtype; for a quantized base its ``compute_dtype`` (bitsandbytes
    ``Linear4bit``) when set, else fp32 (PEFT keeps QLoRA adapters in fp32 too)."""
    w = module.weight
    if w.dtype.is_floating_point:
        return w.dtype
    cd = getattr(module, "compute_dtype", None)
    return cd if isinstance(cd, torch.dtype) and cd.is_floating_point else torch.float32


def base_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` returned in x's dtype. A float base runs in its weight's dtype (bf16, say);
    a quantized base is called on x as is (bitsandbytes casts to its compute dtype itself, and
    casting x to the integer weight dtype would destroy it)."""
    if is_quantized(module):
        return module(x).to(x.dtype)
    return module(x.to(module.weight.dtype)).to(x.dtype)


def frozen_linear(base: Union[nn.Linear, int, Sequence[int]], bias: bool = False, dtype=None,
                  device=None) -> nn.Linear:
    """The base layer: an existing ``nn.Linear`` (frozen in place) or a new random one from
    ``(in_features, out_features)``."""
    if not isinstance(base, nn.Module):
        d_in, d_out = base
        base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype, device=device)
    base.requires_grad_(False)
    return base


class MoLoRALinear(nn.Module):
    """Frozen linear + mixture of LoRA experts.

    Args:
        base: the frozen ``nn.Linear`` (``W0``; its parameters get ``requires_grad=False``), or
            None for an adapter-only layer (returns the delta).
        bank: the experts (``LoRABank``).
        router: maps the (dropped, if ``route_on_dropped``) input [T, d_in] to logits [T, E], or
            None when routing always comes from outside (X-LoRA scalings, MiLoRA, Poly).
        gating: maps the router's output to a ``Routing`` (a policy from ``routing.py``).
        dropout: LoRA dropout on the adapter input (one mask shared by the experts).
        route_on_dropped: the router sees the dropped input (SMoRA does; most don't).

    ``forward(x, routing=None, return_routing=False)``: x [..., d_in] -> y [..., d_out]; pass a
    ``Routing`` (over the flattened tokens) to skip the router (sequence-level routing reuse);
    ``return_routing=True`` also returns the ``Routing`` for the aux losses.
    """

    def __init__(self, base: Optional[nn.Linear], bank: LoRABank,
                 router: Optional[nn.Module] = None, gating: Optional[Callable] = None,
                 dropout: float = 0.0, route_on_dropped: bool = False):
        super().__init__()
        if base is not None and (base.in_features, base.out_features) != (bank.in_features,
                                                                           bank.out_features):
            raise ValueError(f"{type(self).__name__}: base is {base.in_features}->"
                             f"{base.out_features} but the bank is {bank.in_features}->"
                             f"{bank.out_features}")
        self.base = None if base is None else frozen_linear(base)
        self.bank = bank
        self.router = router
        self.gating = gating
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.route_on_dropped = route_on_dropped

    @property
    def in_features(self) -> int:
        return self.bank.in_features

    @property
    def out_features(self) -> int:
        return self.bank.out_features

    @property
    def num_experts(self) -> int:
        return self.bank.num_experts

    def route(self, x: torch.Tensor, x_dropped: Optional[torch.Tensor] = None) -> Routing:
        """Routing of the flattened tokens x [T, d_in]."""
        if self.router is None or self.gating is None:
            raise ValueError(f"{type(self).__name__} has no router: pass routing= to forward")
        src = x_dropped if (self.route_on_dropped and x_dropped is not None) else x
        return self.gating(self.router(src))

    def adapters(self, x: torch.Tensor, routing: Routing,
                 base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``base + sum_e g_e s_e B_e A_e x`` for flattened, already-dropped x [T, d_in]."""
        if routing.ids is None:
            return self.bank.dense(x, routing.weights, base)
        return self.bank.routed(x, routing.weights, routing.ids, base)

    def forward(self, x: torch.Tensor, routing: Optional[Routing] = None,
                return_routing: bool = False):
        check_last_dim(self, x, self.in_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        bank_dtype = self.bank.B.dtype
        xd = self.lora_dropout(x2).to(bank_dtype)
        if routing is None:
            routing = self.route(x2, xd)
        base = None
        if self.base is not None:  # the frozen base runs in its own dtype (bf16, say)
            base = base_forward(self.base, x2).to(bank_dtype)
        y = self.adapters(xd, routing, base).to(x.dtype).reshape(*lead, self.out_features)
        return (y, routing) if return_routing else y

    @torch.no_grad()
    def merged_weight(self, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W0 + sum_e gate_e s_e B_e A_e`` [d_out, d_in] for a static gate [E] (default 1)."""
        if self.base is None:
            raise ValueError(f"{type(self).__name__}: no base layer to merge into")
        if is_quantized(self.base):
            raise ValueError(f"{type(self).__name__}: the base {type(self.base).__name__} is "
                             f"quantized; the update cannot be merged into its integer weight")
        return self.base.weight + self.bank.delta_weight(gate).to(self.base.weight.dtype)


class LoRALinear(MoLoRALinear):
    """Plain LoRA (one expert, weight 1): MixLoRA's / LLaVA-MoLE's attention projections.

    ``y = W0 x + (alpha / r) B A drop(x)`` through the same bank (E = 1)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, *,
                 rslora: bool = False, init: str = "lora", dtype=None):
        bank = LoRABank(base.in_features, base.out_features, r, 1, alpha, rslora=rslora,
                        init=init, dtype=dtype or base_dtype(base), device=base.weight.device)
        super().__init__(base, bank, None, None, dropout)

    def forward(self, x: torch.Tensor, routing: Optional[Routing] = None,
                return_routing: bool = False):
        if routing is None:
            T = x.numel() // x.shape[-1] if x.shape[-1] else 0
            ones = self.bank.scales.new_ones(T, 1)
            routing = Routing(ones, None)
        return super().forward(x, routing, return_routing)

