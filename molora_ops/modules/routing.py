"""Routers and gating policies: how a method turns router logits into expert weights.

A *router* maps the layer input to logits ``[T, E]`` (``Router``: PEFT/MoE-PEFT's
``Linear(d_in, E)``, run in fp32). A *gating policy* maps logits to a ``Routing``:

* sparse: ``weights [T, k]`` and ``ids [T, k]`` int32 (-1 = no expert), consumed by
  ``LoRABank.routed`` (grouped dispatch path);
* dense: ``weights [T, E]`` and ``ids = None``, consumed by ``LoRABank.dense``.

Every policy takes logits with any leading dims (``[B, S, E]`` as well as ``[T, E]``) and returns
the ``Routing`` of the flattened tokens (SwitchTop1 then counts its capacity per ``S``).
``probs`` / ``logits`` ride along for the aux losses (``modules.losses``). Every policy is a small
``nn.Module`` whose forward is one router op of ``molora_ops`` (plus, for a few, plain torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = [
    "Routing", "Router", "TopK", "TopKSoftmax", "TopP", "SigmoidTopK", "DenseSoftmax",
    "SwitchTop1", "EqualWeightTopK", "StaticGate", "StraightThroughTopK",
]


@dataclass
class Routing:
    """The output of a gating policy for T tokens.

    weights: [T, k] (sparse) or [T, E] (dense), fp32 (fp64 for fp64 logits).
    ids: [T, k] int32 with -1 for "no expert", or None when ``weights`` is a dense gate.
    logits: [T, E] router logits (None for router-free policies). probs: [T, E] softmax/sigmoid
    probabilities when the policy computed them (for load-balancing losses).
    """

    weights: torch.Tensor
    ids: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    probs: Optional[torch.Tensor] = None

    @property
    def dense(self) -> bool:
        return self.ids is None

    def to_dense(self, num_experts: int) -> torch.Tensor:
        """The gate as [T, E] (sparse weights scattered, 0 elsewhere)."""
        if self.ids is None:
            return self.weights
        T = self.weights.shape[0]
        keep = self.ids >= 0
        gate = self.weights.new_zeros(T, num_experts + 1)
        idx = torch.where(keep, self.ids.long(), num_experts)
        gate = gate.scatter_add(1, idx, torch.where(keep, self.weights, 0))
        return gate[:, :num_experts]


class _RouterLinear(nn.Linear):
    """The router's fp32 ``nn.Linear`` whose ``reset_parameters`` applies the router's init, so
    resetting modules in any order (``model.apply`` visits children first, a ``for m in
    model.modules()`` loop parents first) gives the router's init, not nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init: str,
                 init_range: float, device=None):
        # set before nn.Linear.__init__, which calls reset_parameters
        self.init_mode, self.init_range = init, init_range
        super().__init__(in_features, out_features, bias=bias, dtype=torch.float32,
                         device=device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Linear's init first even for "normal": the same random stream as before this class
        # existed, so seeded models keep their values.
        super().reset_parameters()
        if self.init_mode == "normal":  # MixLoRA: N(0, init_range), zero bias
            nn.init.normal_(self.weight, 0.0, self.init_range)
            if self.bias is not None:
                nn.init.zeros_(self.bias)


class Router(nn.Module):
    """``logits = x W_g^T (+ b)`` in fp32 (MoE-PEFT casts the router and its input to fp32).

    Args:
        in_features: d_in. num_experts: E. bias: LLaVA-MoLE's router has one, the others don't.
        init: ``"normal"`` (MixLoRA: N(0, init_range), ``init_range = 0.02``) or ``"kaiming"``
            (nn.Linear default: MoLA, LoRAMoE, HydraLoRA, DynMoLE).
        jitter: MixLoRA's multiplicative input jitter ``x *= U(1-eps, 1+eps)`` in training.
    """

    def __init__(self, in_features: int, num_experts: int, bias: bool = False,
                 init: str = "kaiming", init_range: float = 0.02, jitter: float = 0.0,
                 device=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"Router: num_experts must be >= 1, got {num_experts}")
        if init not in ("normal", "kaiming"):
            raise ValueError(f"Router: init must be 'normal' or 'kaiming', got {init!r}")
        self.linear = _RouterLinear(in_features, num_experts, bias, init, init_range, device)
        self.jitter = jitter

    @property
    def num_experts(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_in] any float dtype -> logits [T, E] fp32 (fp64 stays fp64)."""
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return F.linear(x, self.linear.weight.to(x.dtype),
                        None if self.linear.bias is None else self.linear.bias.to(x.dtype))


def _tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., E] as [T, E]: a policy takes any leading dims (a [B, S, E] router output)
    and returns the ``Routing`` of the flattened tokens, as the ops need 2-D operands."""
    return logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])


def _softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) in opmath (fp32; fp64 stays fp64)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.softmax(z if temperature == 1.0 else z / temperature, dim=-1)


class TopK(nn.Module):
    """softmax -> top-k (-> renormalize): MixLoRA, MoLA, MoELoRA, FlexMoRE, MeteoRA (original
    path), Mixtral. ``k == 1`` without renormalize is LLaVA-MoLE's weighted top-1."""

    def __init__(self, k: int, renormalize: bool = True):
        super().__init__()
        self.k, self.renormalize = k, renormalize

    def forward(self, logits: torch.Tensor) -> Routing:
        logits = _tokens(logits)
        w, ids = ops.softmax_topk(logits, self.k, self.renormalize)
        return Routing(w, ids, logits, _softmax(logits))

    def extra_repr(self) -> str:
        return f"k={self.k}, renormalize={self.renormalize}"


class TopKSoftmax(nn.Module):
    """top-k on the logits -> softmax over the k (/ temperature): MeteoRA's accelerated path,
    Uni-MoE, Mistral. With k == 1 every weight is 1."""

    def __init__(self, k: int, temperature: float = 1.0):
        super().__init__()
        self.k, self.temperature = k, temperature

    def forward(self, logits: torch.Tensor) -> Routing:
        logits = _tokens(logits)
        w, ids = ops.topk_softmax(logits, self.k, self.temperature)
        return Routing(w, ids, logits, _softmax(logits))

    def extra_repr(self) -> str:
        return f"k={self.k}, temperature={self.temperature}"


class TopP(nn.Module):
    """DynMoLE: softmax -> top-p with at least ``min_k`` experts; every expert when the
    normalised Tsallis entropy exceeds ``entropy_threshold``; weights NOT renormalised.
    DynMoLE keeps the sorted experts with ``cumsum <= top_p`` (``_dynamic_routing``).
    ``include_crossing=True`` is MixLoRA-dynamic (MoE-PEFT ``_dynamic_top_p``, nucleus style):
    the prefix up to AND including the expert whose cumulative probability first exceeds
    ``top_p`` (plain torch; no entropy broadcast), ``TopP(top_p, 1, include_crossing=True)``.
    Ragged k: ``ids [T, E]`` padded with -1 (weight 0)."""

    def __init__(self, top_p: float, min_k: int = 1, entropy_threshold: float = 1.0,
                 q: float = 1.1, eps: float = 1e-5, include_crossing: bool = False):
        super().__init__()
        self.top_p, self.min_k = top_p, min_k
        self.entropy_threshold, self.q, self.eps = entropy_threshold, q, eps
        self.include_crossing = include_crossing

    def forward(self, logits: torch.Tensor) -> Routing:
        logits = _tokens(logits)
        if self.include_crossing:
            p = _softmax(logits)
            sp, ids = torch.sort(p, dim=-1, descending=True, stable=True)
            over = sp.detach().cumsum(-1) > self.top_p
            keep = torch.cat([torch.ones_like(over[:, :1]), ~over[:, :-1]], dim=1)
            keep[:, :self.min_k] = True
            return Routing(torch.where(keep, sp, 0), torch.where(keep, ids, -1).to(torch.int32),
                           logits, p)
        w, ids = ops.softmax_topp(logits, self.top_p, self.min_k, self.entropy_threshold,
                                  self.q, self.eps)
        return Routing(w, ids, logits, _softmax(logits))

    def extra_repr(self) -> str:
        return (f"top_p={self.top_p}, min_k={self.min_k}, "
                f"entropy_threshold={self.entropy_threshold}, q={self.q}")


class SigmoidTopK(nn.Module):
    """sigmoid -> + selection bias -> top-k -> normalize x scale (SMoRA; DeepSeek-V3 with
    ``bias_in_weights=False``). The bias is a non-trainable buffer [E] updated aux-loss-free by
    the caller with ``losses.aux_free_bias_update_(self.bias, routing.ids, E, u)``, which sums
    the counts over the ranks under torch.distributed (docs/DISTRIBUTED.md)."""

    def __init__(self, k: int, num_experts: int, normalize: bool = True,
                 bias_in_weights: bool = True, scale: Optional[float] = None, device=None):
        super().__init__()
        self.k, self.normalize, self.bias_in_weights = k, normalize, bias_in_weights
        self.scale = float(k) if scale is None else float(scale)
        self.register_buffer("bias", torch.zeros(num_experts, device=device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zeroes the selection bias (its initial value; meta-device init)."""
        self.bias.zero_()

    def forward(self, logits: torch.Tensor) -> Routing:
        logits = _tokens(logits)
        w, ids = ops.sigmoid_topk(logits, self.k, self.bias, self.normalize,
                                  self.bias_in_weights, self.scale)
        return Routing(w, ids, logits, torch.sigmoid(logits.float()))

    def extra_repr(self) -> str:
        return (f"k={self.k}, normalize={self.normalize}, bias_in_weights={self.bias_in_weights},"
                f" scale={self.scale}")


class DenseSoftmax(nn.Module):
    """softmax(logits / temperature) over all experts, dense gate [T, E]: LoRAMoE, HydraLoRA,
    LLaVA-MoLE (dense_moe), X-LoRA scalings."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, logits: torch.Tensor) -> Routing:
        logits = _tokens(logits)
        p = _softmax(logits, self.temperature)
        return Routing(p, None, logits, p)


class SwitchTop1(nn.Module):
    """MixLoRA-switch / Switch Transformer: top-1 of softmax with an expert capacity.

    A token keeps its top-1 expert only while fewer than ``capacity`` earlier tokens (in token
    order) of its sequence chose it; the rest are dropped (id -1, weight 0: the residual passes
    alone). The weight is the top-1 probability (not renormalised). ``capacity=None`` keeps every
    token; ``capacity_factor`` sets ``capacity = ceil(capacity_factor * S / E)``.
    ``forward(logits, group_size=None)``: the T tokens are consecutive sequences of
    ``group_size`` tokens (S; None: one sequence), each with its own capacity (MoE-PEFT
    ``SwitchSparseMoe`` / HF Switch count over the sequence dim of [B, S, E]).
    ``weighted=False`` gives weight 1 (LLaVA-MoLE's sparse path, which does not multiply by p).
    """

    def __init__(self, capacity: Optional[int] = None, capacity_factor: Optional[float] = None,
                 weighted: bool = True):
        super().__init__()
        if capacity is not None and capacity_factor is not None:
            raise ValueError("SwitchTop1: give capacity or capacity_factor, not both")
        self.capacity, self.capacity_factor, self.weighted = capacity, capacity_factor, weighted

    def forward(self, logits: torch.Tensor, group_size: Optional[int] = None) -> Routing:
        if logits.dim() > 2:  # [..., S, E]: the sequences are the dim before the experts
            group_size = logits.shape[-2] if group_size is None else group_size
            logits = _tokens(logits)
        w, ids = ops.softmax_topk(logits, 1, False)
        if not self.weighted:
            w = torch.ones_like(w)
        cap = self.capacity
        T, E = logits.shape
        S = group_size or max(T, 1)
        if self.capacity_factor is not None:
            cap = math.ceil(self.capacity_factor * S / E)
        if cap is not None:
            one_hot = F.one_hot(ids[:, 0].long(), E)
            seen = one_hot.reshape(-1, S, E).cumsum(1).reshape(T, E)
            rank_in_expert = (seen * one_hot).sum(1, keepdim=True)  # 1-based, per sequence
            keep = rank_in_expert <= cap
            ids = torch.where(keep, ids, -1)
            w = torch.where(keep, w, 0)
        return Routing(w, ids, logits, _softmax(logits))


class EqualWeightTopK(nn.Module):
    """ReMix: k experts with fixed equal weights ``1/k``; in training they are SAMPLED without
    replacement from softmax(logits / temperature) (Gumbel-top-k), deterministic top-k at eval.

    ``log_prob(logits, ids)`` gives the Plackett-Luce log-probability of the sampled ordered set,
    the score function of ReMix's REINFORCE leave-one-out estimator (``losses`` has the RLOO loss).
    """

    def __init__(self, k: int, temperature: float = 1.0, weight: Optional[float] = None):
        super().__init__()
        self.k, self.temperature = k, temperature
        self.weight = 1.0 / k if weight is None else weight

    def forward(self, logits: torch.Tensor, generator: Optional[torch.Generator] = None
                ) -> Routing:
        logits = _tokens(logits)
        z = logits.float() / self.temperature
        if self.training:
            u = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            key = z - torch.log(-torch.log(u.clamp_min(1e-20)))
        else:
            key = z
        # ops.topk_softmax selects on its input with ties to the lower id; only the ids are used.
        _, ids = ops.topk_softmax(key.detach(), self.k, 1.0)
        w = torch.full(ids.shape, self.weight, dtype=z.dtype, device=z.device)
        return Routing(w, ids, logits, torch.softmax(z, -1))

    def log_prob(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """log P(ids in this order) under sampling without replacement: [T]."""
        logits, ids = _tokens(logits), _tokens(ids)
        z = logits.float() / self.temperature
        logp = z.new_zeros(z.shape[0])
        mask = torch.zeros_like(z, dtype=torch.bool)
        for j in range(ids.shape[1]):
            zj = z.masked_fill(mask, float("-inf"))
            logp = logp + zj.gather(1, ids[:, j:j + 1].long()).squeeze(1) - zj.logsumexp(1)
            mask = mask.scatter(1, ids[:, j:j + 1].long(), True)
        return logp


class StaticGate(nn.Module):
    """LoRA Soups (CAT): one learned, input-independent weight per expert, broadcast to every
    token (dense gate [T, E]); init 1 (the concatenation of the adapters)."""

    def __init__(self, num_experts: int, init: float = 1.0, device=None):
        super().__init__()
        self.init = float(init)
        self.alpha = nn.Parameter(torch.full((num_experts,), self.init, device=device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.alpha.fill_(self.init)

    def forward(self, x: torch.Tensor) -> Routing:
        """x [..., d_in] (only its token count is used) -> a dense gate [T, E]."""
        T = x.numel() // x.shape[-1] if x.dim() > 1 and x.shape[-1] else x.shape[0]
        gate = self.alpha.float().expand(T, -1)
        return Routing(gate, None, None, None)


class StraightThroughTopK(nn.Module):
    """LoRA-Mixer's hard-soft routing: the forward uses the hard top-k of softmax(z) with
    renormalized weights; the backward also passes the straight-through gradient of the soft
    probabilities (``w_hard + p_k - p_k.detach()``), so every selected expert's probability
    receives the gradient of its weight. [paper/abstract: no public code]"""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, logits: torch.Tensor) -> Routing:
        logits = _tokens(logits)
        w, ids = ops.softmax_topk(logits, self.k, True)
        p = _softmax(logits)
        p_sel = p.gather(1, ids.long())
        return Routing(w + p_sel - p_sel.detach(), ids, logits, p)
