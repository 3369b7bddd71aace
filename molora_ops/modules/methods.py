"""The published MoE-LoRA methods, each a thin definition over the core.

Token-routed methods are ``MoLoRALinear`` (frozen base + ``LoRABank`` + ``Router`` + a gating
policy) with the method's router, policy, hyperparameters and aux loss; FFN-level methods are
``MoELoRAFFN``; rank-wise methods (each rank an expert) use the rank ops through
``RankwiseLoRALinear``. Defaults are the published hyperparameters (METHODS.md); ``aux_loss``
returns the method's auxiliary loss WITH its published coefficient (0 where the method has none),
so a training loop adds ``sum(m.aux_loss(r) for ...)`` to the task loss.

Shapes: x [..., d_in] -> y [..., d_out]; ``Routing`` tensors are over the flattened tokens T.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import losses
from .bank import Dispatched, LoRABank
from .ffn import MoELoRAFFN
from .layers import MoLoRALinear, base_dtype, check_last_dim, frozen_linear
from .routing import (DenseSoftmax, EqualWeightTopK, Router, Routing, StaticGate,
                      StraightThroughTopK, SwitchTop1, TopK, TopKSoftmax, TopP)

__all__ = [
    "MixLoRA", "LLaVAMoLE", "MoLA", "mola_experts_per_layer", "LoRAMoE", "HydraLoRA", "DynMoLE",
    "MeteoRA", "FlexMoRE", "MoELoRA", "LoRAMixer", "ReMix", "LoRASoupsCAT", "MoLE", "CoMoL",
    "RankwiseLoRALinear", "SMoRA", "FlyLoRA", "MoRA",
]


def _bank(base: nn.Linear, ranks, num_experts, alpha, **kw) -> LoRABank:
    kw.setdefault("dtype", base_dtype(base))
    return LoRABank(base.in_features, base.out_features, ranks, num_experts, alpha,
                    device=base.weight.device, **kw)


# --- MoE-FFN methods ----------------------------------------------------------------------------


class MixLoRA(MoELoRAFFN):
    """MixLoRA (Li et al., arXiv 2404.15159): a sparse MoE of 8 LoRA experts inside the frozen
    FFN; attention projections get plain ``LoRALinear`` (not built here).

    ``p = softmax(x W_g^T)`` (fp32, W_g ~ N(0, 0.02), no bias; optional jitter);
    ``(w, e) = top-k(p)``, ``w /= sum w``; ``y = sum_j w_j FFN_{e_j}(x)`` with the shared-base
    expert FFN of ``MoELoRAFFN`` (W1 x, W3 x once per token; W2 once per token on the weighted
    activations). Matches MoE-PEFT ``MixtralSparseMoe.forward`` / ``_mixlora_forward``.

    ``routing``: ``"topk"`` (default), ``"dynamic"`` (MixLoRA-dynamic: top-p over the sorted
    probs up to and including the expert crossing top_p, as MoE-PEFT ``_dynamic_top_p``; at
    least 1 expert, weights not renormalised) or ``"switch"`` (top-1 with an expert
    capacity per sequence, weight = top-1 prob; a token over capacity outputs ``p * x`` as in
    MoE-PEFT ``SwitchSparseMoe``, or 0 with ``switch_dropped="zero"`` (the Switch paper: only the
    residual passes); its aux loss recomputes the argmax (dropped tokens count, as MoE-PEFT's
    ``SwitchRouterLoss``) and adds the router z-loss). MoE-PEFT's switch block returns its
    INPUT unchanged in inference mode (a bug we do not reproduce).

    ``aux_loss_form`` (what ``aux_loss`` does with an ``attention_mask``):

    * ``"masked"`` (DEFAULT, ours): padded tokens are excluded from every mean of every routing
      mode's loss. For ``"topk"`` this is MoE-PEFT's loss; for ``"dynamic"`` and ``"switch"`` it
      is NOT: MoE-PEFT's ``DynamicRouterLoss`` / ``SwitchRouterLoss`` take the mask and ignore
      it, so on a padded batch the two forms differ (on an unpadded batch they are equal).
    * ``"moe_peft"``: MoE-PEFT's exact losses: ``"topk"`` masks padding (as
      ``_mixtral_load_balancing_loss_func``), ``"dynamic"`` and ``"switch"`` ignore the mask
      (padded tokens count in f, P and the z-loss).
    Defaults: E=8, k=2, r=16, alpha=32, dropout 0.05 (MoE-PEFT ``templates/mixlora.json``),
    router_init_range 0.02, aux coefficient 0.01 (README examples; the code default is 0.001).
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear,
                 num_experts: int = 8, k: int = 2, r: int = 16, alpha: float = 32.0,
                 dropout: float = 0.05, *, routing: str = "topk", top_p: float = 0.8,
                 expert_capacity: Optional[int] = None, jitter_noise: float = 0.0,
                 router_init_range: float = 0.02, aux_coef: float = 0.01,
                 z_loss_coef: float = 0.001, act: str = "silu", ffn_dropout: float = 0.0,
                 switch_dropped: str = "input", aux_loss_form: str = "masked", **bank_kw):
        gating = {"topk": lambda: TopK(k, True),
                  "dynamic": lambda: TopP(top_p, 1, include_crossing=True),
                  "switch": lambda: SwitchTop1(expert_capacity)}
        if routing not in gating:
            raise ValueError(f"MixLoRA: routing must be one of {sorted(gating)}, got {routing!r}")
        if switch_dropped not in ("input", "zero"):
            raise ValueError(f"MixLoRA: switch_dropped must be 'input' or 'zero', got "
                             f"{switch_dropped!r}")
        if aux_loss_form not in ("masked", "moe_peft"):
            raise ValueError(f"MixLoRA: aux_loss_form must be 'masked' (padding excluded, the "
                             f"default) or 'moe_peft' (MoE-PEFT's exact losses), got "
                             f"{aux_loss_form!r}")
        router = Router(gate_proj.in_features, num_experts, init="normal",
                        init_range=router_init_range, jitter=jitter_noise,
                        device=gate_proj.weight.device)
        super().__init__(gate_proj, up_proj, down_proj, num_experts, r, alpha, dropout,
                         router=router, gating=gating[routing](), act=act,
                         output_dropout=ffn_dropout if routing == "switch" else 0.0,
                         dropped_passthrough=routing == "switch" and switch_dropped == "input",
                         **bank_kw)
        self.routing_mode, self.aux_coef, self.z_loss_coef = routing, aux_coef, z_loss_coef
        self.aux_loss_form = aux_loss_form

    def aux_loss(self, routing: Routing, attention_mask=None) -> torch.Tensor:
        """The routing mode's aux loss WITH its coefficients, a 0-d fp32 tensor.

        routing: this module's ``Routing`` over T tokens (probs / logits [T, E], ids [T, k]);
        attention_mask: [T] or [B, S] (nonzero = real token) or None.
        ``"topk"`` / ``"dynamic"``: ``aux_coef * E * sum_{j,e} f[j, e] P[e]`` (Mixtral form; a
        dynamic token's unused slots are -1 and count for no expert, as MoE-PEFT's
        ``_dynamic_load_balancing_loss_func``). ``"switch"``: ``aux_coef * E^2 mean_e(f_e P_e)``
        (f from the argmax, capacity-dropped tokens included, as ``SwitchRouterLoss``) ``+
        z_loss_coef * mean_t logsumexp(z_t)^2``. Padding: see ``aux_loss_form`` (class doc).
        """
        if self.aux_loss_form == "moe_peft" and self.routing_mode != "topk":
            attention_mask = None  # MoE-PEFT's dynamic / switch losses ignore the mask
        if self.routing_mode == "switch":
            # MoE-PEFT's SwitchRouterLoss re-takes the argmax: capacity-dropped tokens count too.
            return (self.aux_coef * losses.switch_load_balancing_loss(
                routing.probs, routing.probs.argmax(-1), self.num_experts, attention_mask)
                + self.z_loss_coef * losses.router_z_loss(routing.logits, attention_mask))
        return self.aux_coef * losses.mixtral_load_balancing_loss(
            routing.probs, routing.ids, self.num_experts, attention_mask)


class LLaVAMoLE(MoELoRAFFN):
    """LLaVA-MoLE (Chen et al., arXiv 2401.16160): one router per MLP (``Linear(d, E)`` WITH
    bias), LoRA experts on gate/up/down.

    Sparse (the paper, default): ``e* = argmax softmax(x W_g^T + b)`` and the expert's FFN output
    is NOT multiplied by p (faithful to ``moe.py :: LoRA_MOE_LM.forward``: the straight-through
    ``expert_choice`` is computed but unused, so the router learns only from the balance loss).
    ``weighted=True`` multiplies the expert output by its p (a Switch-style variant, not the
    authors' code). ``dense=True`` (the released inference config): each projection adds
    ``sum_e p_e LoRA_e``. Defaults: E=3, r=32, alpha=64, dropout 0.05 (the released inference
    args; its checkpoint name says r16/a32, an inconsistency of the release), balance coefficient
    0.05 (the HydraLoRA MLLM script).
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear,
                 num_experts: int = 3, r: int = 32, alpha: float = 64.0, dropout: float = 0.05,
                 *, dense: bool = False, weighted: bool = False, balance_coef: float = 0.05,
                 act: str = "silu", **bank_kw):
        router = Router(gate_proj.in_features, num_experts, bias=True,
                        device=gate_proj.weight.device)
        gating = DenseSoftmax() if dense else SwitchTop1(weighted=weighted)
        super().__init__(gate_proj, up_proj, down_proj, num_experts, r, alpha, dropout,
                         router=router, gating=gating, act=act, **bank_kw)
        self.balance_coef = balance_coef

    def aux_loss(self, routing: Routing, batch_shape=None, attention_mask=None) -> torch.Tensor:
        """``coef * mean_b sum_e mean(p_e) mean(onehot_e)`` (per sample; ``batch_shape`` (B, S)
        of the flattened tokens, default one sample)."""
        probs = routing.probs
        ids = probs.argmax(-1) if routing.ids is None else routing.ids[:, 0]
        B, S = batch_shape if batch_shape is not None else (1, probs.shape[0])
        return self.balance_coef * losses.llava_mole_balance_loss(
            probs.reshape(B, S, -1), ids.reshape(B, S), attention_mask)


# --- token-routed linear methods --------------------------------------------------------------


class _RoutedLinear(MoLoRALinear):
    """A MoLoRALinear built from a base linear and the method's router + policy."""

    def __init__(self, base: nn.Linear, ranks, num_experts: int, alpha: float, dropout: float,
                 gating: nn.Module, *, router_bias: bool = False, router_init: str = "kaiming",
                 bank_kw: Optional[dict] = None):
        bank = _bank(base, ranks, num_experts, alpha, **(bank_kw or {}))
        router = Router(base.in_features, bank.num_experts, bias=router_bias, init=router_init,
                        device=base.weight.device)
        super().__init__(base, bank, router, gating, dropout)

    def aux_loss(self, routing: Routing, attention_mask=None) -> torch.Tensor:
        """No auxiliary loss (0)."""
        return routing.weights.new_zeros(())


class MoLA(_RoutedLinear):
    """MoLA (Gao et al., arXiv 2402.08562): every projection has its own router and E_l LoRA
    experts, E_l growing with depth (``mola_experts_per_layer``).

    ``p = softmax(x W_g^T)`` (fp32, kaiming, no bias); ``(w, e) = top-k(p)``, ``w /= sum w``;
    ``y = W0 x + sum_j w_j (alpha/r) B_{e_j} A_{e_j} drop(x)`` (``mola_lora_hacked.py ::
    Linear_MoE.forward``). Defaults r=8, alpha=16, dropout 0.05, k=2; optional balance loss
    (``obalance``) with coefficient 0.001, ONE per decoder layer over all its MoLA modules'
    router rows (``layer_routing``; ``losses.mola_balance_loss``), padding not masked.
    """

    def __init__(self, base: nn.Linear, num_experts: int, k: int = 2, r: int = 8,
                 alpha: float = 16.0, dropout: float = 0.05, *, balance_coef: float = 0.001,
                 **bank_kw):
        super().__init__(base, r, num_experts, alpha, dropout, TopK(k, True), bank_kw=bank_kw)
        self.balance_coef = balance_coef

    def aux_loss(self, routing: Routing, attention_mask=None) -> torch.Tensor:
        """``balance_coef * E * sum_e f_e P_e`` over the rows of ``routing`` (padding not
        masked, as MoLA: ``attention_mask`` is accepted and ignored).

        MoLA's loss is ONE term per decoder layer over the rows of ALL that layer's MoLA
        modules: pass ``layer_routing`` of their routings (what ``apply_molora`` does); on one
        module's routing alone this is the per-module term
        (``losses.mola_balance_loss_per_module``).
        """
        return self.balance_coef * losses.mola_balance_loss(routing.probs, routing.ids,
                                                            self.num_experts)

    @staticmethod
    def layer_routing(routings: Sequence[Routing]) -> Routing:
        """The routings of one decoder layer's MoLA modules concatenated along the tokens
        (MoLA's decoder layer ``torch.cat(router_logits, dim=0)``): weights / ids [sum T_m, k],
        logits / probs [sum T_m, E]. ``aux_loss`` of it is MoLA's per-layer balance loss."""
        if not routings:
            raise ValueError("MoLA.layer_routing: no routing given")
        widths = {r.probs.shape[-1] for r in routings}
        if len(widths) != 1:
            raise ValueError(f"MoLA.layer_routing: the modules of one decoder layer must share "
                             f"E, got {sorted(widths)}")

        def cat(name):
            parts = [getattr(r, name) for r in routings]
            return None if any(t is None for t in parts) else torch.cat(parts)

        return Routing(cat("weights"), cat("ids"), cat("logits"), cat("probs"))


def mola_experts_per_layer(num_layers: int, groups: Sequence[int] = (2, 4, 6, 8)) -> list:
    """Experts per layer, the layers split into ``len(groups)`` equal blocks (MoLA-triangle
    ``2x8, 4x8, 6x8, 8x8`` for 32 layers). Earlier blocks take the remainder's shorter share."""
    n = len(groups)
    sizes = [num_layers // n + (1 if i >= n - num_layers % n else 0) for i in range(n)]
    return [g for g, s in zip(groups, sizes) for _ in range(s)]


class LoRAMoE(_RoutedLinear):
    """LoRAMoE (Dou et al., arXiv 2312.09979): dense soft routing over E LoRA experts.

    ``p = softmax(x W_g^T)`` (fp32, kaiming, no bias); ``y = W0 x + sum_e p_e s B_e A_e drop(x)``
    (``peft/tuners/lora.py :: Linear.forward``), through the stacked gated op.
    Defaults E=8, r=4, alpha=32, dropout 0.05 (release script). The localized balancing
    constraint needs per-sample task types; the shipped script sets ``blc_weight = 0``, so the
    default ``lbc_weight`` is 0 (LBC off) and ``lbc_alpha`` (delta) 0.
    """

    def __init__(self, base: nn.Linear, num_experts: int = 8, r: int = 4, alpha: float = 32.0,
                 dropout: float = 0.05, *, lbc_weight: float = 0.0, lbc_alpha: float = 0.0,
                 **bank_kw):
        super().__init__(base, r, num_experts, alpha, dropout, DenseSoftmax(), bank_kw=bank_kw)
        self.lbc_weight, self.lbc_alpha = lbc_weight, lbc_alpha

    def aux_loss(self, routing: Routing, task_types=None, batch_shape=None,
                 attention_mask=None) -> torch.Tensor:
        """``lbc_weight * CV^2(Q * I)`` over samples (``batch_shape`` (B, S) of the tokens)."""
        if task_types is None or self.lbc_weight == 0:
            return routing.weights.new_zeros(())
        B, S = batch_shape
        return self.lbc_weight * losses.loramoe_lbc_loss(
            routing.probs.reshape(B, S, -1), task_types, self.lbc_alpha, attention_mask)


class HydraLoRA(_RoutedLinear):
    """HydraLoRA (Tian et al., arXiv 2404.19245): one shared A, N heads B_i, dense softmax.

    ``h = A drop(x)`` [T, r] once; ``p = softmax(x W_g^T)``;
    ``y = W0 x + s sum_i p_i B_i h`` (``HydraLoRA/peft/tuners/lora.py :: Linear``) through the
    shared-A stacked gated op. Defaults (``HydraLoRA/fine-tuning.sh``): N=4 heads
    (``lora_b_nums``; the script line has a bash bug, N is meant to come from k-means on the
    data), r=4, alpha=32 (s=8), dropout 0.05; no aux loss.
    """

    def __init__(self, base: nn.Linear, num_heads: int = 4, r: int = 4, alpha: float = 32.0,
                 dropout: float = 0.05, **bank_kw):
        super().__init__(base, r, num_heads, alpha, dropout, DenseSoftmax(),
                         bank_kw=dict(shared_a=True, **bank_kw))


class DynMoLE(_RoutedLinear):
    """DynMoLE (Li et al., arXiv 2504.00661): top-p routing with a minimum k and a Tsallis-entropy
    broadcast, weights NOT renormalised.

    ``p = softmax(x W_g^T)``; keep the sorted prefix with ``cumsum <= top_p`` (at least
    ``keep_top_k``); when ``H_q(p) > entropy_threshold`` keep every expert;
    ``y = W0 x + sum_e w_e s B_e A_e drop(x)`` with ``w = p * keep`` (ragged k: the grouped path
    skips the -1 slots). Aux: ``entropy_coef * mean H + balance_coef * E sum f P``
    (``_dynamic_load_balancing_loss_func``). Defaults (``templates/dynmole.json``): E=6, r=24,
    alpha=48, dropout 0.05, q=1.1, threshold 0.9, top_p 0.75, keep_top_k 2, coefs 0.01 / 0.001.
    Quirk: at HEAD ``_dynamic_routing`` calls ``tsallis_entropy(p=..., a=...)`` while the function
    takes ``(p, q, normalize, eps)``; we implement the function's documented semantics
    (normalised Tsallis entropy with q), the only reading that runs.
    """

    def __init__(self, base: nn.Linear, num_experts: int = 6, r: int = 24, alpha: float = 48.0,
                 dropout: float = 0.05, *, top_p: float = 0.75, keep_top_k: int = 2,
                 entropy_threshold: float = 0.9, q: float = 1.1, eps: float = 1e-5,
                 entropy_coef: float = 0.01, balance_coef: float = 0.001, **bank_kw):
        super().__init__(base, r, num_experts, alpha, dropout,
                         TopP(top_p, keep_top_k, entropy_threshold, q, eps), bank_kw=bank_kw)
        self.q, self.entropy_coef, self.balance_coef = q, entropy_coef, balance_coef

    def aux_loss(self, routing: Routing, attention_mask=None) -> torch.Tensor:
        return losses.dynmole_loss(routing.probs, routing.to_dense(self.num_experts),
                                   self.entropy_coef, self.balance_coef, self.q, attention_mask)


class MeteoRA(_RoutedLinear):
    """MeteoRA (Xu et al., arXiv 2405.13053): many pre-trained task LoRAs (28) behind one gate.

    ``(v, e) = top-k(x W_g^T)``, ``w = softmax(v / T)`` (the accelerated path; k=1 gives w=1);
    ``y = W0 x + sum_j w_j s_{e_j} B_{e_j} A_{e_j} drop(x)`` with per-adapter scalings
    (``MoELoRA/layer.py :: MoELinear.forward``). Aux: supervised gate cross-entropy against
    per-token task labels, coefficient 50 (``lora_gate_loss_func``). ``original_path=True``
    uses softmax -> top-k -> renormalise instead (equal in exact arithmetic).
    """

    def __init__(self, base: nn.Linear, num_experts: int = 28, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, *, k: int = 2, temperature: float = 1.0,
                 scales: Optional[Sequence[float]] = None, gate_loss_coef: float = 50.0,
                 original_path: bool = False, **bank_kw):
        gating = TopK(k, True) if original_path else TopKSoftmax(k, temperature)
        super().__init__(base, r, num_experts, alpha, dropout, gating,
                         bank_kw=dict(scales=scales, **bank_kw))
        self.gate_loss_coef = gate_loss_coef

    def aux_loss(self, routing: Routing, task_labels=None, batch_shape=None) -> torch.Tensor:
        """``coef * CE(gate logits[:, :-1], task_labels[:, 1:])`` (0 without labels)."""
        if task_labels is None:
            return routing.weights.new_zeros(())
        B, S = batch_shape
        return losses.meteora_gate_loss(routing.logits.reshape(B, S, -1), task_labels,
                                        self.gate_loss_coef)


class FlexMoRE(_RoutedLinear):
    """FlexMoRE (Pirchert et al., arXiv 2602.08818): rank-heterogeneous experts (ragged
    ``ranks``, e.g. ``[1, 4, 16, 64]``), softmax -> top-k -> renormalise router, no padding of
    the smaller experts (the grouped ops read each expert's own rank). [paper/abstract: no code]
    """

    def __init__(self, base: nn.Linear, ranks: Sequence[int], k: int = 2, alpha: float = 16.0,
                 dropout: float = 0.0, *, rslora: bool = False, **bank_kw):
        super().__init__(base, list(ranks), None, alpha, dropout, TopK(k, True),
                         bank_kw=dict(rslora=rslora, **bank_kw))


class MoELoRA(_RoutedLinear):
    """MoELoRA (Luo et al., arXiv 2402.12851): top-2 of 8 LoRA experts plus a contrastive loss
    on the per-expert outputs. [paper: no public code]

    ``forward(x, return_expert_outputs=True)`` also returns the un-combined per-slot outputs
    ``o [T, k, d_out]`` (``s_e B_e A_e drop(x)``) the contrastive loss needs; then
    ``y = W0 x + sum_j w_j o_j``. Aux: ``balance_coef * Mixtral LB + contrastive_coef * SupCon``.
    """

    def __init__(self, base: nn.Linear, num_experts: int = 8, k: int = 2, r: int = 8,
                 alpha: float = 16.0, dropout: float = 0.05, *, balance_coef: float = 0.01,
                 contrastive_coef: float = 0.1, temperature: float = 0.07, **bank_kw):
        super().__init__(base, r, num_experts, alpha, dropout, TopK(k, True), bank_kw=bank_kw)
        self.balance_coef, self.contrastive_coef = balance_coef, contrastive_coef
        self.temperature = temperature

    def forward(self, x: torch.Tensor, routing: Optional[Routing] = None,
                return_routing: bool = False, return_expert_outputs: bool = False):
        if not return_expert_outputs:
            return super().forward(x, routing, return_routing)
        check_last_dim(self, x, self.in_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xd = self.lora_dropout(x2).to(self.bank.B.dtype)
        routing = self.route(x2) if routing is None else routing
        o = self.bank.routed_per_slot(xd, routing.ids)                          # [T, k, d_out]
        w = torch.where(routing.ids >= 0, routing.weights, 0).to(o.dtype)
        y = self.base(x2).to(o.dtype) + (w.unsqueeze(-1) * o).sum(1)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return (y, routing, o) if return_routing else (y, o)

    def aux_loss(self, routing: Routing, expert_outputs: Optional[torch.Tensor] = None,
                 attention_mask=None) -> torch.Tensor:
        loss = self.balance_coef * losses.mixtral_load_balancing_loss(
            routing.probs, routing.ids, self.num_experts, attention_mask)
        if expert_outputs is not None:
            loss = loss + self.contrastive_coef * losses.moelora_contrastive_loss(
                expert_outputs, routing.ids, self.temperature)
        return loss


class LoRAMixer(_RoutedLinear):
    """LoRA-Mixer (Li et al., arXiv 2507.00029): LoRA experts on the attention projections with
    hard-soft (straight-through) top-k routing and the routing specialization loss (load balance
    + entropy shaping). [paper/abstract: the code is a placeholder]"""

    def __init__(self, base: nn.Linear, num_experts: int = 4, k: int = 2, r: int = 8,
                 alpha: float = 16.0, dropout: float = 0.05, *, rsl_coef: float = 0.01,
                 entropy_coef: float = 0.1, **bank_kw):
        super().__init__(base, r, num_experts, alpha, dropout, StraightThroughTopK(k),
                         bank_kw=bank_kw)
        self.rsl_coef, self.entropy_coef = rsl_coef, entropy_coef

    def aux_loss(self, routing: Routing, attention_mask=None) -> torch.Tensor:
        return self.rsl_coef * losses.lora_mixer_rsl_loss(
            routing.probs, routing.ids, self.entropy_coef, attention_mask)


class ReMix(_RoutedLinear):
    """ReMix (Qiu et al., arXiv 2603.10160): the k active LoRAs get fixed EQUAL weights; the
    router is a policy: in training k experts are sampled without replacement from
    ``softmax(z / T)`` (Gumbel-top-k), at eval the top-k is taken. The router learns by
    REINFORCE leave-one-out: ``gating.log_prob(routing.logits, routing.ids)`` is the score
    function. [paper/abstract: no public code]"""

    def __init__(self, base: nn.Linear, num_experts: int = 8, k: int = 2, r: int = 8,
                 alpha: float = 16.0, dropout: float = 0.05, *, temperature: float = 1.0,
                 **bank_kw):
        super().__init__(base, r, num_experts, alpha, dropout, EqualWeightTopK(k, temperature),
                         bank_kw=bank_kw)


class LoRASoupsCAT(MoLoRALinear):
    """LoRA Soups, CAT (Prabhakar et al., arXiv 2410.13025): static, input-independent learned
    weights per adapter: ``y = W0 x + sum_i alpha_i s_i B_i A_i x`` (alpha init 1 = the plain
    concatenation). ``merge()`` folds the update into W0 (``forward`` then runs the base only);
    ``unmerge()`` restores it."""

    def __init__(self, base: nn.Linear, ranks, num_adapters: Optional[int] = None,
                 alpha: float = 16.0, dropout: float = 0.0, **bank_kw):
        bank = _bank(base, ranks, num_adapters, alpha, **bank_kw)
        super().__init__(base, bank, None, StaticGate(bank.num_experts, device=bank.A.device),
                         dropout)
        self.merged = False

    def route(self, x, x_dropped=None) -> Routing:
        return self.gating(x)

    def forward(self, x, routing=None, return_routing=False):
        if self.merged:
            check_last_dim(self, x, self.in_features)
            y = self.base(x)
            return (y, None) if return_routing else y
        return super().forward(x, routing, return_routing)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.bank.delta_weight(self.gating.alpha).to(self.base.weight)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.bank.delta_weight(self.gating.alpha).to(self.base.weight)
            self.merged = False


class MoLE(MoLoRALinear):
    """MoLE, "Mixture of LoRA Experts" (Wu, Huang, Wei, ICLR'24; README-only code): frozen
    pre-trained LoRAs with a gate computed FROM THEIR OUTPUTS.

    ``E_i = s_i B_i A_i x`` [T, N, d_out] (all experts, grouped ops);
    ``eps = Flatten(Norm(E_1 (+) ... (+) E_N)) W_e`` with ``Norm`` a LayerNorm over the
    concatenated N*d_out features and ``W_e [N*d_out, N]``; ``G = softmax(eps / tau)``;
    ``y = W0 x + sum_i G_i E_i``. Aux: gate balance ``-sum_i log q_i``, q_i = mean gate.
    [recalled from the paper; Norm's exact form unverified]
    """

    def __init__(self, base: nn.Linear, ranks, num_experts: Optional[int] = None,
                 alpha: float = 16.0, *, temperature: float = 1.0, balance_coef: float = 0.01,
                 **bank_kw):
        bank = _bank(base, ranks, num_experts, alpha, **bank_kw)
        super().__init__(base, bank, None, None, 0.0)
        bank.requires_grad_(False)
        N, d_out = bank.num_experts, bank.out_features
        self.norm = nn.LayerNorm(N * d_out, device=bank.A.device)
        self.gate = nn.Linear(N * d_out, N, bias=False, device=bank.A.device)
        self.temperature, self.balance_coef = temperature, balance_coef

    def forward(self, x, routing=None, return_routing=False):
        check_last_dim(self, x, self.in_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        outs = self.bank.per_expert(x2.to(self.bank.B.dtype))                   # [T, N, d_out]
        eps = self.gate(self.norm(outs.flatten(1).to(self.gate.weight.dtype)))
        G = torch.softmax(eps.float() / self.temperature, dim=-1)
        y = self.base(x2).to(outs.dtype) + (G.to(outs.dtype).unsqueeze(-1) * outs).sum(1)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        routing = Routing(G, None, eps, G)
        return (y, routing) if return_routing else y

    def aux_loss(self, routing: Routing) -> torch.Tensor:
        return self.balance_coef * losses.mole_gate_balance_loss(routing.weights)


class CoMoL(nn.Module):
    """CoMoL (Cao et al., arXiv 2603.00573; no public code): a shared LoRA (A, B) plus E compact
    core experts ``C_e [r, r]`` routed in the low-rank space.

    ``h = A drop(x)`` [T, r]; ``g = policy(h W_g^T)`` (router on h); ``u = sum_e g_e C_e h``
    (core-space merge: grouped shrink over the stacked cores + weighted combine);
    ``y = W0 x + s B u``, s = alpha / r. ``k=None`` merges all cores densely (softmax),
    else top-k -> renormalise. Cores start at the identity plus N(0, 0.02) noise (init
    unverified), so CoMoL starts as the plain LoRA.
    """

    def __init__(self, base: nn.Linear, num_experts: int = 4, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.05, *, k: Optional[int] = None, init: str = "lora"):
        super().__init__()
        self.base = frozen_linear(base)
        dev, dt = base.weight.device, base_dtype(base)
        self.lora = LoRABank(base.in_features, base.out_features, r, 1, alpha, init=init,
                             dtype=dt, device=dev)
        self.cores = nn.Parameter(torch.empty(num_experts * r, r, dtype=dt, device=dev))
        self.register_buffer("core_offsets", torch.empty(num_experts + 1, dtype=torch.int32,
                                                         device=dev))
        self.reset_parameters()
        self.router = Router(r, num_experts, device=dev)
        self.k = k
        self.gating = DenseSoftmax() if k is None else TopK(k, True)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Cores = identity + N(0, 0.02) noise, ``core_offsets`` = [0, r, 2r, ...] (rebuilt: meta
        init). The LoRA bank and the router reset themselves."""
        E_r, r = self.cores.shape
        eye = torch.eye(r, dtype=self.cores.dtype, device=self.cores.device)
        self.cores.copy_(eye.repeat(E_r // r, 1) + 0.02 * torch.randn_like(self.cores))
        self.core_offsets.copy_(torch.arange(E_r // r + 1, dtype=torch.int32) * r)

    @property
    def num_experts(self) -> int:
        return self.core_offsets.numel() - 1

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        check_last_dim(self, x, self.base.in_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.base.in_features)
        A, B = self.lora.expert(0)
        h = F.linear(self.lora_dropout(x2).to(A.dtype), A)                      # [T, r]
        routing = self.gating(self.router(h))
        ids, w = routing.ids, routing.weights
        if ids is None:  # dense merge: every core, weight p_e
            ids = torch.arange(self.num_experts, dtype=torch.int32, device=h.device)
            ids = ids.expand(h.shape[0], -1)
        d = Dispatched(ids, self.num_experts)
        r = A.shape[0]
        hc = ops.sgmv_shrink(h, self.cores, self.core_offsets, d.order, d.pos, d.expert_offsets,
                             None, None, max_rank=r)                            # C_e h per pair
        u = ops.combine_rows(hc, d.order, d.pos, w)                             # [T, r]
        y = self.base(x2).to(u.dtype) + self.lora.scales[0] * F.linear(u, B)
        y = y.to(x.dtype).reshape(*lead, self.base.out_features)
        return (y, routing) if return_routing else y


# --- rank-wise methods (each rank is an expert) -------------------------------------------------


class RankwiseLoRALinear(nn.Module):
    """Shared core of the rank-wise methods: a frozen base + one LoRA ``A [r, d_in]``,
    ``B [d_out, r]`` whose ranks are the experts; a method picks k ranks per token and gives
    each a gate, then ``y = W0 x + scale * sum_j gate_j * value_j * B[:, id_j]`` through
    ``rank_sparse_expand`` (only the k kept columns of B are read). The selection bias (a
    buffer) is updated aux-loss-free from the rank-usage histogram; under ``torch.distributed``
    the histogram is summed over the ranks first (``sync_statistics``: None follows
    ``molora_ops.distributed.sync_statistics()``, True / False forces it; docs/DISTRIBUTED.md)."""

    def __init__(self, base: nn.Linear, r: int, k: int, alpha: float, dropout: float,
                 bias_rate: float, init: str = "lora", sync_statistics: Optional[bool] = None):
        super().__init__()
        if not 1 <= k <= r:
            raise ValueError(f"{type(self).__name__}: need 1 <= k <= r, got k={k}, r={r}")
        self.base = frozen_linear(base)
        self.lora = LoRABank(base.in_features, base.out_features, r, 1, alpha, init=init,
                             dtype=base_dtype(base), device=base.weight.device)
        self.r, self.k, self.bias_rate = r, k, bias_rate
        self.sync_statistics = sync_statistics
        self.register_buffer("rank_bias", torch.zeros(r, device=base.weight.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zeroes the selection bias (its initial value; meta-device init). The bank and the
        router reset themselves."""
        self.rank_bias.zero_()

    @property
    def A(self) -> torch.Tensor:
        return self.lora.A

    @property
    def B(self) -> torch.Tensor:
        return self.lora.B

    def select(self, xd: torch.Tensor):
        """-> (values [T, k], gates [T, k] or None, ids [T, k], scale)."""
        raise NotImplementedError

    def update_bias(self, ids: torch.Tensor) -> None:
        if self.bias_rate > 0:
            losses.aux_free_bias_update_(self.rank_bias, ids, self.r, self.bias_rate,
                                         sync=self.sync_statistics)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        check_last_dim(self, x, self.base.in_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.base.in_features)
        xd = self.lora_dropout(x2).to(self.B.dtype)
        values, gates, ids, scale = self.select(xd)
        base = self.base(x2).to(self.B.dtype)
        y = ops.rank_sparse_expand(values, ids, self.B, gates, scale, base)
        y = y.to(x.dtype).reshape(*lead, self.base.out_features)
        return (y, Routing(values if gates is None else gates, ids)) if return_routing else y


class SMoRA(RankwiseLoRALinear):
    """SMoRA, "Each Rank Could be an Expert" (Zhao et al., arXiv 2501.15103).

    ``g = sigmoid(drop(x) W_g^T)`` repeated ``rank_partition`` times -> [T, r]; key ``g + b``;
    ``(v, idx) = top-k``; gate ``= (g + b)[idx] / sum * k`` (the biased scores ARE the weights);
    ``y = W0 x + (alpha / k) sum_j gate_j B[:, idx_j] (A[idx_j] . drop(x))`` through
    ``rank_sparse_shrink`` / ``rank_sparse_expand`` (``srmole/layer.py :: SRMoLELinear``).
    In training the bias follows ``b += u sign(mean(c) - c)`` (no grad; u = 1e-5), with the
    counts ``c`` summed over the ranks under torch.distributed (``sync_statistics``).
    Defaults r=64, k=8, alpha=16 (multi-domain config), dropout 0.05.
    """

    def __init__(self, base: nn.Linear, r: int = 64, k: int = 8, alpha: float = 16.0,
                 dropout: float = 0.05, *, rank_partition: int = 1, bias_rate: float = 1e-5,
                 init: str = "lora", sync_statistics: Optional[bool] = None):
        super().__init__(base, r, k, alpha, dropout, bias_rate, init, sync_statistics)
        if r % rank_partition:
            raise ValueError(f"SMoRA: r={r} must be a multiple of rank_partition="
                             f"{rank_partition}")
        self.rank_partition = rank_partition
        self.router = Router(base.in_features, r // rank_partition, device=base.weight.device)
        self.scaling = alpha / k

    def select(self, xd):
        logits = self.router(xd)
        if self.rank_partition > 1:  # (a copy of [T, r] for nothing at 1: ~0.1 ms at T=256)
            logits = logits.repeat_interleave(self.rank_partition, dim=-1)
        # The op saves the bias for its backward; the update below mutates the buffer in place,
        # so the op gets a copy (srmole differentiates through the pre-update bias).
        bias = self.rank_bias.clone() if self.training else self.rank_bias
        gates, ids = ops.sigmoid_topk(logits, self.k, bias, True, True, float(self.k))
        if self.training:
            self.update_bias(ids)
        values = ops.rank_sparse_shrink(xd, self.A, ids)
        return values, gates, ids, self.scaling


@torch.no_grad()
def _flylora_sparse_a(A: torch.Tensor, k: int, generator: Optional[torch.Generator] = None
                      ) -> None:
    """FlyLoRA's frozen sparse A [r, d_in] in place: each row ``d_in // (r/k)`` non-zeros
    ~ N(0, 1/r^2) (drawn on the CPU, so a seeded generator gives the same A on any device)."""
    r, d_in = A.shape
    nnz = max(1, d_in // max(1, r // k))
    cols = torch.rand(r, d_in, generator=generator, device="cpu").argsort(1)[:, :nnz]
    dense = torch.zeros(r, d_in, device="cpu")
    dense.scatter_(1, cols, torch.randn(r, nnz, generator=generator, device="cpu") / r)
    A.copy_(dense)


class FlyLoRA(RankwiseLoRALinear):
    """FlyLoRA (Zou et al., arXiv 2510.08396): a FROZEN sparse random A (each row has
    ``d_in // (r/k)`` non-zeros ~ N(0, 1/r^2)), trainable B, router-free rank top-k.

    ``h = A drop(x)`` (under no_grad by default), ``idx = top-k(h + d)`` (signed; |h + d| with
    ``use_abs``, the minimal ``flylora.py``), ``y = W0 x + (alpha/r) B (h * mask(idx))``.
    Faithful defaults (PEFT fork ``lora/layer.py``): ``block_input_grad=True`` (the adapter
    passes no gradient to x: input gradients flow through the base only) and the bias update
    ``d += u sign(mean(c) - c)`` on EVERY forward, eval included (``update_bias_in_eval``).
    Defaults r=32, k=8, alpha=64 (s=2), dropout 0, u=1e-3. Both quirks are on by default because
    they are what produced the published numbers; ``block_input_grad=False`` /
    ``update_bias_in_eval=False`` give the textbook behaviour. (The minimal ``flylora.py`` also
    compares a frequency with raw counts; we follow the PEFT fork's ``sign(mean(c) - c)``.)
    """

    def __init__(self, base: nn.Linear, r: int = 32, k: int = 8, alpha: float = 64.0,
                 dropout: float = 0.0, *, bias_rate: float = 1e-3, use_abs: bool = False,
                 block_input_grad: bool = True, update_bias_in_eval: bool = True,
                 generator: Optional[torch.Generator] = None,
                 sync_statistics: Optional[bool] = None):
        super().__init__(base, r, k, alpha, dropout, bias_rate, init="lora",
                         sync_statistics=sync_statistics)
        self.use_abs, self.block_input_grad = use_abs, block_input_grad
        self.update_bias_in_eval = update_bias_in_eval
        self.scaling = alpha / r
        self.lora.A.requires_grad_(False)
        # the bank's own reset draws this sparse A (meta init, any reset order)
        self.lora.a_init_fn = functools.partial(_flylora_sparse_a, k=k)
        self.reset_sparse_a(generator)

    @torch.no_grad()
    def reset_sparse_a(self, generator: Optional[torch.Generator] = None) -> None:
        _flylora_sparse_a(self.A, self.k, generator)

    def select(self, xd):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.block_input_grad):
            h = F.linear(xd, self.A)
        values, ids = ops.rank_topk(h, self.k, None, self.rank_bias, self.use_abs)
        if self.training or self.update_bias_in_eval:
            self.update_bias(ids)
        return values, None, ids, self.scaling


class MoRA(RankwiseLoRALinear):
    """MoRA, "Little by Little" (Lu et al., arXiv 2506.21035; no public code): r rank-1 experts
    ``(a_i, b_i)`` that self-activate by their score ``a_i . x``: top-k under the activation
    budget k, gates ``softmax(v / tau)`` over the kept scores,
    ``y = W0 x + s sum_j g_j v_j b_{idx_j}`` (A and B trainable). [abstract-level formula]
    """

    def __init__(self, base: nn.Linear, r: int = 16, k: int = 4, alpha: float = 16.0,
                 dropout: float = 0.0, *, temperature: float = 1.0, init: str = "lora"):
        super().__init__(base, r, k, alpha, dropout, 0.0, init)
        self.temperature = temperature
        self.scaling = alpha / r

    def select(self, xd):
        h = F.linear(xd, self.A)
        values, ids = ops.rank_topk(h, self.k)
        gates = torch.softmax(values.float() / self.temperature, dim=-1)
        return values, gates, ids, self.scaling
