"""The shared-base MoE-FFN of MixLoRA and LLaVA-MoLE.

Expert e is the frozen base FFN with its own LoRAs on the gate (W1), up (W3) and down (W2)
projections. Per routed pair (t, e) with weight w:

    g = W1 x_t + s B1_e A1_e drop(x_t),   u = W3 x_t + s B3_e A3_e drop(x_t)
    a = act(g) * u
    y_t += w * (W2 a + s B2_e A2_e drop(a))

The reference code (MixLoRA ``_llama_forward``, MoE-PEFT ``_mixlora_forward``) already computes
``W1 x`` and ``W3 x`` once for all tokens; it still runs ``W2`` once per (token, expert) pair. Here,
because ``W2`` is frozen and linear, ``sum_j w_j W2 a_j = W2 (sum_j w_j a_j)``: ``W2`` runs ONCE per
token on the weighted sum of the pairs' activations, k times fewer base FLOPs in the down
projection. The LoRA deltas run as grouped ops on one dispatch layout shared by the three banks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bank import Dispatched, LoRABank
from .layers import base_dtype, base_forward, check_last_dim, frozen_linear
from .routing import Router, Routing, SwitchTop1, TopK

__all__ = ["MoELoRAFFN", "ACTIVATIONS"]

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
               "relu": F.relu}


class MoELoRAFFN(nn.Module):
    """Gated FFN (``W2 (act(W1 x) * W3 x)``, Llama/Mistral/Qwen2 MLP) with LoRA experts.

    Args:
        gate_proj, up_proj, down_proj: the frozen base ``nn.Linear`` W1 [d_ff, d], W3 [d_ff, d],
            W2 [d, d_ff] (frozen in place).
        num_experts, r, alpha, dropout: the LoRA experts (one bank per projection, s = alpha/r).
        router: ``Router`` [d -> E] (MixLoRA: N(0, 0.02), no bias; LLaVA-MoLE: with bias).
        gating: sparse policy (``TopK(2)`` MixLoRA, ``TopP`` MixLoRA-dynamic, ``SwitchTop1``
            MixLoRA-switch / LLaVA-MoLE) or dense (``DenseSoftmax``: LLaVA-MoLE's ``dense_moe``,
            where each projection adds ``sum_e p_e LoRA_e`` instead of mixing expert outputs).
        act: "silu" (Llama), "gelu", "gelu_tanh", "relu".
        output_dropout: MixLoRA-switch's FFN dropout on the routed output (0 elsewhere).
        dropped_passthrough: a token whose every slot was dropped (over capacity) outputs
            ``max_e p_e * x`` instead of 0 (MoE-PEFT ``SwitchSparseMoe`` starts its output as a
            copy of the input and scales it by the top-1 probability).
        bank_dtype: dtype of the LoRA banks (default: the base's; fp32 matches MoE-PEFT).

    ``forward(x, return_routing=False)``: x [..., d] -> y [..., d].
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear,
                 num_experts: int, r: int, alpha: float, dropout: float = 0.0, *,
                 router: Optional[nn.Module] = None, gating: Optional[nn.Module] = None,
                 act: str = "silu", output_dropout: float = 0.0,
                 dropped_passthrough: bool = False, rslora: bool = False, init: str = "lora",
                 bank_dtype=None):
        super().__init__()
        d, d_ff = gate_proj.in_features, gate_proj.out_features
        if (up_proj.in_features, up_proj.out_features) != (d, d_ff) or \
                (down_proj.in_features, down_proj.out_features) != (d_ff, d):
            raise ValueError(f"MoELoRAFFN: gate/up must be {d}->{d_ff} and down {d_ff}->{d}")
        if act not in ACTIVATIONS:
            raise ValueError(f"MoELoRAFFN: act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.gate_proj, self.up_proj = frozen_linear(gate_proj), frozen_linear(up_proj)
        self.down_proj = frozen_linear(down_proj)
        device = gate_proj.weight.device
        dtype = bank_dtype or base_dtype(gate_proj)
        bank = dict(num_experts=num_experts, alpha=alpha, rslora=rslora, init=init, dtype=dtype,
                    device=device)
        self.gate_lora = LoRABank(d, d_ff, r, **bank)
        self.up_lora = LoRABank(d, d_ff, r, **bank)
        self.down_lora = LoRABank(d_ff, d, r, **bank)
        self.router = router if router is not None else Router(d, num_experts, init="normal",
                                                               device=device)
        self.gating = gating if gating is not None else TopK(2)
        self.act_name = act
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_dropout = nn.Dropout(output_dropout) if output_dropout > 0 else nn.Identity()
        self.dropped_passthrough = dropped_passthrough

    @property
    def num_experts(self) -> int:
        return self.gate_lora.num_experts

    def forward(self, x: torch.Tensor, routing: Optional[Routing] = None,
                return_routing: bool = False):
        d = self.gate_proj.in_features
        check_last_dim(self, x, d)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d)
        if routing is None:
            logits = self.router(x2)
            # Switch capacity is counted per sequence (dim -2 of x [..., S, d]), as MoE-PEFT.
            routing = (self.gating(logits, x.shape[-2] if x.dim() > 2 else None)
                       if isinstance(self.gating, SwitchTop1) else self.gating(logits))
        dtype = self.gate_lora.B.dtype
        if routing.ids is None:
            y = self._dense(x2.to(dtype), routing.weights)
        else:
            y = self._routed(x2.to(dtype), routing)
            if self.dropped_passthrough:
                dropped = (routing.ids < 0).all(-1, keepdim=True)
                p_top = routing.probs.max(-1, keepdim=True).values
                y = y + torch.where(dropped, p_top, 0).to(dtype) * x2.to(dtype)
        y = self.output_dropout(y).to(x.dtype).reshape(*lead, d)
        return (y, routing) if return_routing else y

    def _routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        act = ACTIVATIONS[self.act_name]
        T, k = routing.ids.shape
        d_ff = self.gate_proj.out_features
        route = Dispatched(routing.ids, self.num_experts)
        xd = self.lora_dropout(x)
        # W1 x and W3 x once per token, broadcast to the token's k pairs as the expand's base.
        g0 = self._base(self.gate_proj, x).unsqueeze(1).expand(T, k, d_ff)
        u0 = self._base(self.up_proj, x).unsqueeze(1).expand(T, k, d_ff)
        g = self.gate_lora.routed_per_slot(xd, route, g0)
        u = self.up_lora.routed_per_slot(xd, route, u0)
        a = act(g) * u                                                    # [T, k, d_ff]
        w = torch.where(routing.ids >= 0, routing.weights, 0).to(a.dtype)
        # W2 is linear and frozen: one W2 on sum_j w_j a_j instead of one per pair. The pairs'
        # bias terms sum to (sum_j w_j) b, not b, for top-p / switch weights and dropped tokens.
        y = self._base(self.down_proj, (w.unsqueeze(-1) * a).sum(1))
        if self.down_proj.bias is not None:
            y = y + (w.sum(1, keepdim=True) - 1) * self.down_proj.bias.to(y.dtype)
        ad = self.lora_dropout(a).reshape(T * k, d_ff)
        return self.down_lora.routed(ad, routing.weights, route, y, x_by_pair=True)

    def _dense(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.act_name]
        xd = self.lora_dropout(x)
        g = self.gate_lora.dense(xd, gate, self._base(self.gate_proj, x))
        u = self.up_lora.dense(xd, gate, self._base(self.up_proj, x))
        a = act(g) * u
        return self.down_lora.dense(self.lora_dropout(a), gate, self._base(self.down_proj, a))

    def _base(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        # The frozen base runs in its own dtype (bf16, say); the banks may be fp32 (MoE-PEFT). A
        # quantized projection (bitsandbytes) is CALLED, never read: its weight holds codes.
        return base_forward(proj, x)
