"""Multi-tenant serving: many MoE-LoRA / LoRA adapters in one model, one batch, per-row adapters.

``MultiAdapterModel(model)`` wraps a Hugging Face causal LM (Llama / Mistral / Qwen2-style decoder
layers, as ``apply_molora``) once; ``add_adapter(name, source)`` loads an adapter saved by
``save_molora`` (a directory) or taken from a model converted by ``apply_molora`` /
``load_molora``; a forward or ``generate`` call names one adapter per batch row::

    served = MultiAdapterModel(base_model)
    served.add_adapter("math", "adapters/math_mixlora")      # a MixLoRA fine-tune
    served.add_adapter("code", "adapters/code_mola")         # a MoLA fine-tune
    served.add_adapter("chat", "adapters/chat_lora")         # a plain LoRA
    out = served.generate(ids, attention_mask=mask, max_new_tokens=16,
                          adapter_names=["math", "chat", "code", None])   # None: base model

How a batch runs (per adapted module, ONE dispatch for every adapter of the batch):

* every adapter's experts of one module live in ONE stacked ragged bank (``LoRABank``): the
  global expert id of expert e of adapter a is ``offset[a] + e``; a plain LoRA adapter is a
  one-expert bank with weight 1;
* the routers of all adapters of the module are stacked (``[N * E_max, d_in]``, fp32) and run
  as one matmul on every row; each token keeps the logits of its own adapter (a gather by the
  per-row adapter id, a device tensor: no host read), the padded experts masked to -inf; the
  gating policy of each adapter (top-k with its k and renormalisation, dense softmax, top-k
  then softmax, static weights) is applied row-wise with ``torch.where``;
* the (token, global expert) pairs go through one ``dispatch`` + ``sgmv_shrink`` +
  ``sgmv_expand``. MixLoRA's MoE-FFN (experts = the shared frozen FFN with LoRAs on W1/W3/W2,
  ``MoELoRAFFN``) runs in the same MLP pass as the linear methods of the other rows: the gate
  and up banks of all adapters are one bank (one dispatch), each token has K FFN slots (K = the
  largest MixLoRA k; a linear-method row uses slot 0 with weight 1), W2 runs once on the
  weighted sum, the down banks are one more dispatch.

Supported (exactly: equal to running the request alone with its adapter, up to fp rounding):
plain LoRA, MoLA, MixLoRA (``routing="topk"``), LoRAMoE, HydraLoRA, LoRA Soups (CAT), and any
``MoLoRALinear`` method with an fp32 ``Router`` and a ``TopK``, ``DenseSoftmax`` or
``TopKSoftmax`` policy (MoELoRA, FlexMoRE, MeteoRA). Rejected at ``add_adapter`` (ValueError,
before anything changes): MixLoRA dynamic / switch, LLaVA-MoLE, SMoRA and the other rank-wise
methods, DynMoLE, ReMix, LoRA-Mixer, MoLE, CoMoL, merged layers, banks of another dtype than the
adapters already loaded. Serving is inference: dropout and router jitter are not applied, and
the adapter weights are copied (frozen) into the stacked banks.

Adding or removing an adapter re-stacks the banks and routers (copies of the adapters' tensors;
no model rebuild): the model's modules are installed once, by the constructor, and stay.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .modules.bank import Dispatched, LoRABank
from .modules.ffn import ACTIVATIONS, MoELoRAFFN
from .modules.layers import LoRALinear, MoLoRALinear
from .modules.methods import LoRASoupsCAT, MixLoRA, MoELoRA
from .modules.routing import DenseSoftmax, Router, StaticGate, TopK, TopKSoftmax

__all__ = ["MultiAdapterModel", "MultiTenantLinear", "MultiTenantFFN", "BASE_ADAPTER"]

BASE_ADAPTER = "__base__"
"""Row name (as ``None``) for "no adapter": the row runs the base model (PEFT's name)."""

# policy kinds of one adapter at one module
_FIXED, _TOPK, _DENSE, _TOPK_SOFTMAX, _EXTERNAL = range(5)


@dataclass
class _Policy:
    """How one adapter turns a token into (expert ids, weights) at one module.

    kind: _FIXED (weights ``fixed`` [E], no router: plain LoRA, LoRA Soups), _TOPK (softmax ->
    top-k -> renormalise if ``renorm``), _DENSE (softmax(z / temperature) over every expert),
    _TOPK_SOFTMAX (top-k of z -> softmax(z_top / temperature)), _EXTERNAL (the experts are routed
    by the enclosing MoE-FFN: the module's own routing gives no pair). width: pairs per token.
    """

    kind: int
    num_experts: int
    width: int
    renorm: bool = True
    temperature: float = 1.0
    fixed: Optional[torch.Tensor] = None          # [E] fp32
    router_w: Optional[torch.Tensor] = None       # [E, d_in] fp32
    router_b: Optional[torch.Tensor] = None       # [E] fp32


@dataclass
class _Entry:
    """One adapter's experts at one bank site: the bank tensors and the routing policy."""

    A: torch.Tensor          # [R, d_in] (a shared HydraLoRA A is repeated per expert)
    B: torch.Tensor          # [d_out, R]
    ranks: List[int]
    scales: List[float]
    policy: _Policy


def _where_local(slot_map: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token local slot (-1: the token's adapter has nothing here) from global adapter ids."""
    return torch.where(tokens >= 0, slot_map[tokens.clamp_min(0)], -1)


class _RouterTable(nn.Module):
    """The routing policies of N adapters at one module, run row-wise without host reads.

    ``route(x [T, d], loc [T])`` -> ``(ids [T, W] int64 local expert ids, -1 = none;
    weights [T, W] fp32 (fp64 for fp64 x))``, W = the widest policy; loc is each token's local
    adapter slot (-1: no pair).
    """

    def __init__(self, policies: Sequence[_Policy], in_features: int, device):
        super().__init__()
        N = len(policies)
        self.width = max([p.width for p in policies] + [1])
        self.e_max = max([p.num_experts for p in policies] + [1])
        W, E = self.width, self.e_max
        fixed = torch.zeros(max(N, 1), W)
        for i, p in enumerate(policies):
            if p.kind == _FIXED:
                fixed[i, :p.width] = p.fixed.float()
        routed = [i for i, p in enumerate(policies) if p.router_w is not None]
        slot = [-1] * N
        rw = torch.zeros(max(len(routed), 1) * E, in_features, device=device)
        rb = torch.zeros(max(len(routed), 1) * E, device=device)
        for j, i in enumerate(routed):
            p = policies[i]
            slot[i] = j
            rw[j * E:j * E + p.num_experts] = p.router_w.float()
            if p.router_b is not None:
                rb[j * E:j * E + p.num_experts] = p.router_b.float()
        kinds = [p.kind for p in policies]
        self.kinds_present = frozenset(kinds)
        self.has_router = bool(routed)
        self.k_topk = max([p.width for p in policies if p.kind == _TOPK] + [1])
        self.k_topk_softmax = max([p.width for p in policies if p.kind == _TOPK_SOFTMAX] + [1])

        def buf(name, value, dtype):
            self.register_buffer(name, torch.tensor(value, dtype=dtype, device=device)
                                 if not isinstance(value, torch.Tensor)
                                 else value.to(device=device, dtype=dtype), persistent=False)

        pad = [0] if N == 0 else []
        buf("kind", kinds + pad, torch.int64)
        buf("width_of", [p.width for p in policies] + pad, torch.int64)
        buf("experts_of", [p.num_experts for p in policies] + pad, torch.int64)
        buf("renorm", [p.renorm for p in policies] + [False] * len(pad), torch.bool)
        buf("temperature", [p.temperature for p in policies] + [1.0] * len(pad), torch.float32)
        buf("router_slot", slot + pad, torch.int64)
        buf("fixed", fixed, torch.float32)
        buf("router_w", rw, torch.float32)
        buf("router_b", rb, torch.float32)

    def route(self, x: torch.Tensor, loc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        T, W = x.shape[0], self.width
        opm = torch.float64 if x.dtype == torch.float64 else torch.float32
        l = loc.clamp_min(0)
        col = torch.arange(W, device=x.device)
        width = self.width_of[l]                                            # [T]
        ids = col.expand(T, W)
        w = self.fixed[l].to(opm)
        if self.has_router:
            E = self.e_max
            R = self.router_w.shape[0] // E
            # One matmul for every adapter's router; each token keeps its adapter's E_max logits.
            z = F.linear(x.to(opm), self.router_w.to(opm), self.router_b.to(opm)).view(T, R, E)
            rs = self.router_slot[l].clamp_min(0)
            z = z.gather(1, rs.view(T, 1, 1).expand(T, 1, E)).squeeze(1)      # [T, E]
            ecol = torch.arange(E, device=x.device)
            z = z.masked_fill(ecol >= self.experts_of[l].unsqueeze(1), float("-inf"))
            kind = self.kind[l].unsqueeze(1)
            if _TOPK in self.kinds_present:
                k = self.k_topk
                wt, it = ops.softmax_topk(z, k, False)                           # p of the top k
                keep = torch.arange(k, device=x.device) < width.unsqueeze(1)
                wt = torch.where(keep, wt.to(opm), 0)
                wt = torch.where(self.renorm[l].unsqueeze(1),
                                 wt / wt.sum(-1, keepdim=True).clamp_min(1e-30), wt)
                ids = torch.where(kind == _TOPK, _pad(it.long(), W, -1), ids)
                w = torch.where(kind == _TOPK, _pad(wt, W, 0), w)
            if _DENSE in self.kinds_present:
                p = torch.softmax(z / self.temperature[l].to(opm).unsqueeze(1), dim=-1)
                ids = torch.where(kind == _DENSE, _pad(ecol.expand(T, E), W, -1), ids)
                w = torch.where(kind == _DENSE, _pad(p, W, 0), w)
            if _TOPK_SOFTMAX in self.kinds_present:
                k = self.k_topk_softmax
                _, it = ops.topk_softmax(z, k, 1.0)                              # top-k ids of z
                v = z.gather(1, it.long())
                keep = torch.arange(k, device=x.device) < width.unsqueeze(1)
                v = v.masked_fill(~keep, float("-inf"))
                ws = torch.softmax(v / self.temperature[l].to(opm).unsqueeze(1), dim=-1)
                ids = torch.where(kind == _TOPK_SOFTMAX, _pad(it.long(), W, -1), ids)
                w = torch.where(kind == _TOPK_SOFTMAX, _pad(ws, W, 0), w)
        keep = (loc >= 0).unsqueeze(1) & (col < width.unsqueeze(1))
        ids = torch.where(keep, ids, -1)
        return ids, torch.where(ids >= 0, w, 0)


def _pad(t: torch.Tensor, width: int, value) -> torch.Tensor:
    """t [T, w] -> [T, width]: padded with value, or its first ``width`` columns."""
    if t.shape[1] < width:
        return F.pad(t, (0, width - t.shape[1]), value=value)
    return t[:, :width]


class _BankSite(nn.Module):
    """The stacked bank of every adapter at one ``d_in -> d_out`` module + their routers.

    Global expert id of expert e of the adapter in local slot n = ``offsets[n] + e``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.entries: Dict[str, _Entry] = {}
        self.names: List[str] = []
        self.bank: Optional[LoRABank] = None
        self.table: Optional[_RouterTable] = None
        self.register_buffer("offsets", torch.zeros(1, dtype=torch.int64), persistent=False)
        self.register_buffer("slot_map", torch.full((1,), -1, dtype=torch.int64),
                             persistent=False)

    @property
    def total_experts(self) -> int:
        return 0 if self.bank is None else self.bank.num_experts

    def offset_of(self, name: str) -> int:
        i = self.names.index(name)
        return sum(len(self.entries[n].ranks) for n in self.names[:i])

    def rebuild(self, registry: Sequence[str], device, dtype) -> None:
        """Re-stacks the bank and the routers (after an adapter was added or removed) and maps
        the model's adapter ids (``registry`` order) to local slots."""
        self.names = [n for n in registry if n in self.entries]
        entries = [self.entries[n] for n in self.names]
        if not entries:
            self.bank, self.table = None, None
        else:
            ranks = [r for e in entries for r in e.ranks]
            bank = LoRABank(self.in_features, self.out_features, ranks, alpha=1.0,
                            scales=[s for e in entries for s in e.scales], dtype=dtype,
                            device=device)
            with torch.no_grad():
                bank.A.copy_(torch.cat([e.A.to(device, dtype) for e in entries]))
                bank.B.copy_(torch.cat([e.B.to(device, dtype) for e in entries], dim=1))
            self.bank = bank.requires_grad_(False)
            self.table = _RouterTable([e.policy for e in entries], self.in_features, device)
        counts = [len(e.ranks) for e in entries]
        offsets = [sum(counts[:i]) for i in range(len(counts))] or [0]
        self.offsets = torch.tensor(offsets, dtype=torch.int64, device=device)
        slot = [self.names.index(n) if n in self.names else -1 for n in registry] or [-1]
        self.slot_map = torch.tensor(slot, dtype=torch.int64, device=device)

    def route(self, x: torch.Tensor, loc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Global expert ids [T, W] int32 (-1 none) and weights [T, W] of the tokens' own
        adapters' routings (``_EXTERNAL`` adapters give no pair)."""
        ids, w = self.table.route(x, loc)
        glob = ids + self.offsets[loc.clamp_min(0)].unsqueeze(1)
        return torch.where(ids >= 0, glob, -1).to(torch.int32), w


class _RowAdapters:
    """The per-row adapter ids of the current call (a device tensor [B] int64, -1 = base),
    shared by every wrapper of one ``MultiAdapterModel``."""

    def __init__(self):
        self.rows: Optional[torch.Tensor] = None

    def tokens(self, x: torch.Tensor, who: str) -> Optional[torch.Tensor]:
        """Global adapter id of every token of x [B, ..., d] (flattened), or None."""
        rows = self.rows
        if rows is None:
            return None
        if x.dim() < 2 or x.shape[0] != rows.shape[0]:
            raise ValueError(f"{who}: the batch has {rows.shape[0]} adapter names but the "
                             f"module input has shape {tuple(x.shape)} (batch first expected; "
                             f"beam search and num_return_sequences > 1 reorder rows and are "
                             f"not supported)")
        per_row = x.numel() // (x.shape[0] * x.shape[-1]) if x.numel() else 0
        return rows.unsqueeze(1).expand(rows.shape[0], per_row).reshape(-1)


class MultiTenantLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the adapters of every tenant at that linear.

    ``forward(x [B, ..., d_in]) -> [B, ..., d_out]``: ``base(x)`` plus, for each row, its
    adapter's routed LoRA experts, all rows through one dispatch of the stacked bank."""

    def __init__(self, base: nn.Linear, state: _RowAdapters, name: str):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.site = _BankSite(base.in_features, base.out_features)
        self.__dict__["_state"] = state
        self.target_name = name

    # read-only views of the base linear (HF code reads e.g. ``q_proj.weight.dtype``)
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        site = self.site
        tokens = None if site.bank is None else self._state.tokens(x, self.target_name)
        if tokens is None:
            return self.base(x)
        lead, d_in = x.shape[:-1], self.in_features
        bank = site.bank
        x2 = x.reshape(-1, d_in)
        ids, w = site.route(x2, _where_local(site.slot_map, tokens))
        base = self.base(x2.to(self.base.weight.dtype)).to(bank.B.dtype)
        y = bank.routed(x2.to(bank.B.dtype), w, ids, base)
        return y.to(x.dtype).reshape(*lead, self.out_features)


class MultiTenantFFN(nn.Module):
    """A frozen gated MLP ``down(act(gate x) * up x)`` plus every tenant's adapters on it:
    MixLoRA MoE-FFNs and the linear methods' adapters of gate_proj / up_proj / down_proj.

    ``forward(x [B, ..., d]) -> [B, ..., d]``. Each token has K FFN slots (K = the largest k of
    the MixLoRA adapters here, else 1): a MixLoRA row's slot j is its j-th routed expert with
    its routing weight; any other row uses slot 0 with weight 1, where its gate / up / down
    adapters (if any) add their routed LoRA experts. Gate and up run as one bank (one dispatch),
    W2 once per token on the weighted sum of the slots, the down banks as one more dispatch.
    """

    def __init__(self, mlp: nn.Module, state: _RowAdapters, name: str):
        super().__init__()
        self.base_mlp = mlp.requires_grad_(False)
        d, d_ff = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        self.gate_site, self.up_site = _BankSite(d, d_ff), _BankSite(d, d_ff)
        self.down_site = _BankSite(d_ff, d)
        self.mix: Dict[str, _Policy] = {}
        self.mix_names: List[str] = []
        self.mix_table: Optional[_RouterTable] = None
        self.gu_bank: Optional[LoRABank] = None
        self.act_name: Optional[str] = None
        self.slots = 1
        for n in ("mix_slot_map", "mix_off_g", "mix_off_u", "mix_off_d"):
            self.register_buffer(n, torch.full((1,), -1, dtype=torch.int64), persistent=False)
        self.__dict__["_state"] = state
        self.target_name = name

    @property
    def sites(self) -> Dict[str, _BankSite]:
        return {"gate_proj": self.gate_site, "up_proj": self.up_site,
                "down_proj": self.down_site}

    def rebuild(self, registry: Sequence[str], device, dtype) -> None:
        for site in self.sites.values():
            site.rebuild(registry, device, dtype)
        self.mix_names = [n for n in registry if n in self.mix]
        pol = [self.mix[n] for n in self.mix_names]
        self.mix_table = _RouterTable(pol, self.gate_site.in_features, device) if pol else None
        self.slots = max([p.width for p in pol] + [1])
        slot = [self.mix_names.index(n) if n in self.mix_names else -1 for n in registry] or [-1]
        self.mix_slot_map = torch.tensor(slot, dtype=torch.int64, device=device)
        for buf, site in (("mix_off_g", self.gate_site), ("mix_off_u", self.up_site),
                          ("mix_off_d", self.down_site)):
            offs = [site.offset_of(n) for n in self.mix_names] or [0]
            setattr(self, buf, torch.tensor(offs, dtype=torch.int64, device=device))
        # gate and up experts in one bank: up's global ids follow gate's
        g, u = self.gate_site.bank, self.up_site.bank
        parts = [b for b in (g, u) if b is not None]
        if not parts:
            self.gu_bank = None
            return
        ranks = [r for b in parts for r in b.ranks]
        bank = LoRABank(self.gate_site.in_features, self.gate_site.out_features, ranks,
                        alpha=1.0, scales=torch.cat([b.scales for b in parts]).tolist(),
                        dtype=dtype, device=device)
        with torch.no_grad():
            bank.A.copy_(torch.cat([b.A for b in parts]))
            bank.B.copy_(torch.cat([b.B for b in parts], dim=1))
        self.gu_bank = bank.requires_grad_(False)

    @property
    def has_adapters(self) -> bool:
        return any(s.bank is not None for s in self.sites.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self._state.tokens(x, self.target_name) if self.has_adapters else None
        if tokens is None:
            return self.base_mlp(x)
        mlp = self.base_mlp
        lead, d = x.shape[:-1], x.shape[-1]
        d_ff = mlp.gate_proj.out_features
        dtype = next(s.bank for s in self.sites.values() if s.bank is not None).B.dtype
        x2 = x.reshape(-1, d).to(dtype)
        T, K, dev = x2.shape[0], self.slots, x2.device
        act = ACTIVATIONS[self.act_name]

        # MixLoRA rows: K routed experts per token (local ids, -1 past the adapter's k); the
        # other rows: slot 0 with weight 1
        slot0 = (torch.arange(K, device=dev) == 0).expand(T, K)
        ffn_w = slot0.to(torch.float64 if dtype == torch.float64 else torch.float32)
        m_ids = ml = mix_w = None
        is_mix = torch.zeros(T, dtype=torch.bool, device=dev)
        if self.mix_table is not None:
            m_loc = _where_local(self.mix_slot_map, tokens)
            is_mix = m_loc >= 0
            m_ids, mix_w = self.mix_table.route(x2, m_loc)                         # [T, K]
            ml = m_loc.clamp_min(0).unsqueeze(1)
            ffn_w = torch.where(is_mix.unsqueeze(1), mix_w, ffn_w)

        g0 = _base(mlp.gate_proj, x2)
        u0 = _base(mlp.up_proj, x2)
        if self.gu_bank is None:
            g = g0.unsqueeze(1).expand(T, K, d_ff)
            u = u0.unsqueeze(1).expand(T, K, d_ff)
        else:
            n_gate = self.gate_site.total_experts
            parts = []
            for site, off, shift in ((self.gate_site, "mix_off_g", 0),
                                     (self.up_site, "mix_off_u", n_gate)):
                parts.append(self._slot_ids(site, x2, tokens, is_mix, m_ids, ml,
                                            getattr(self, off), shift, None, K))
            Wgu = max(p[0].shape[-1] for p in parts)
            ids = torch.stack([_pad3(p[0], Wgu, -1) for p in parts], 2)        # [T, K, 2, W]
            w = torch.stack([_pad3(p[1], Wgu, 0) for p in parts], 2)
            base = torch.stack([g0, u0], 1).unsqueeze(1).expand(T, K, 2, d_ff)
            bank = self.gu_bank
            route = Dispatched(ids.reshape(T, -1), bank.num_experts)
            h = ops.sgmv_shrink(x2, bank.A, bank.rank_offsets, route.order, route.pos,
                                route.expert_offsets, None, None, max_rank=bank.max_rank)
            # one output row per (token, slot, projection): the pos rows regrouped by Wgu
            gu = ops.sgmv_expand(h, bank.B, bank.rank_offsets, route.order,
                                 route.pos.reshape(T * K * 2, Wgu), route.expert_offsets,
                                 w.reshape(T * K * 2, Wgu), bank.scales,
                                 base.reshape(T * K * 2, d_ff))
            g, u = gu.view(T, K, 2, d_ff).unbind(2)
        a = act(g) * u                                                          # [T, K, d_ff]
        wa = ffn_w.to(a.dtype)
        # W2 is linear and frozen: once per token on the weighted sum of the slots (MoELoRAFFN)
        y = _base(mlp.down_proj, (wa.unsqueeze(-1) * a).sum(1))
        if mlp.down_proj.bias is not None:
            y = y + (wa.sum(1, keepdim=True) - 1) * mlp.down_proj.bias.to(y.dtype)
        down = self.down_site.bank
        if down is not None:
            ids, w = self._slot_ids(self.down_site, a[:, 0], tokens, is_mix, m_ids, ml,
                                    self.mix_off_d, 0, mix_w, K)
            Wd = ids.shape[-1]
            route = Dispatched(ids.reshape(T * K, Wd), down.num_experts)
            h = ops.sgmv_shrink(a.reshape(T * K, d_ff), down.A, down.rank_offsets, route.order,
                                route.pos, route.expert_offsets, None, None,
                                max_rank=down.max_rank)
            y = ops.sgmv_expand(h, down.B, down.rank_offsets, route.order,
                                route.pos.reshape(T, K * Wd), route.expert_offsets,
                                w.reshape(T, K * Wd), down.scales, y)
        return y.to(x.dtype).reshape(*lead, d)

    def _slot_ids(self, site: _BankSite, xin, tokens, is_mix, m_ids, ml, mix_off, shift,
                  mix_w, K):
        """ids / weights [T, K, W] of one projection: linear-method rows route in slot 0 with
        the site's policies; MixLoRA rows put expert m_ids[t, j] in slot j (weight mix_w, or 1
        for gate / up whose per-slot outputs are not weighted)."""
        T = xin.shape[0]
        if site.bank is not None:
            ids, w = site.route(xin, _where_local(site.slot_map, tokens))       # [T, W]
        else:
            ids = torch.full((T, 1), -1, dtype=torch.int32, device=xin.device)
            w = torch.zeros(T, 1, device=xin.device)
        ids = torch.where(ids >= 0, ids + shift, -1)
        W = ids.shape[1]
        lin_ids = torch.cat([ids.unsqueeze(1), ids.new_full((T, K - 1, W), -1)], 1)
        lin_w = torch.cat([w.unsqueeze(1), w.new_zeros(T, K - 1, W)], 1)
        if m_ids is None:
            return lin_ids, lin_w
        glob = torch.where(m_ids >= 0, m_ids + mix_off[ml] + shift, -1).to(torch.int32)
        mw = torch.ones_like(w[:, :1]).expand(T, K) if mix_w is None else mix_w.to(w.dtype)
        mix_ids = _pad3(glob.unsqueeze(-1), W, -1)
        mix_w3 = _pad3(torch.where(m_ids >= 0, mw, 0).unsqueeze(-1), W, 0)
        sel = is_mix.view(T, 1, 1)
        return torch.where(sel, mix_ids, lin_ids), torch.where(sel, mix_w3, lin_w)


def _pad3(t: torch.Tensor, width: int, value) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[-1]), value=value) if t.shape[-1] < width else t


def _base(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # the frozen base runs in its own dtype; the banks may be in another one
    return proj(x.to(proj.weight.dtype)).to(x.dtype)


# --- turning a method module into site entries (load time) ----------------------------------


def _reject(where: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"MultiAdapterModel.add_adapter: {where} is a {type(module).__name__}, "
                      f"which multi-tenant serving cannot run exactly: {why}")


def _bank_tensors(bank: LoRABank) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[float]]:
    A = bank.A.repeat(bank.num_experts, 1) if bank.shared_a else bank.A
    return (A.detach(), bank.B.detach(), list(bank.ranks),
            [float(s) for s in bank.scales.tolist()])


def _router_policy(where: str, m: nn.Module, router, gating, E: int) -> _Policy:
    if not isinstance(router, Router) or not isinstance(router.linear, nn.Linear):
        raise _reject(where, m, f"its router is a {type(router).__name__}, not a Router")
    rw = router.linear.weight.detach()
    rb = None if router.linear.bias is None else router.linear.bias.detach()
    if type(gating) is TopK:
        return _Policy(_TOPK, E, gating.k, renorm=gating.renormalize, router_w=rw, router_b=rb)
    if type(gating) is DenseSoftmax:
        return _Policy(_DENSE, E, E, temperature=gating.temperature, router_w=rw, router_b=rb)
    if type(gating) is TopKSoftmax:
        return _Policy(_TOPK_SOFTMAX, E, gating.k, temperature=gating.temperature,
                       router_w=rw, router_b=rb)
    raise _reject(where, m, f"its gating policy {type(gating).__name__} is not one of TopK, "
                            f"DenseSoftmax, TopKSoftmax (top-p, switch capacity, sampled, "
                            f"sigmoid and straight-through policies are not served)")


def _linear_entry(where: str, m: nn.Module) -> _Entry:
    """The site entry of a linear method's module (the module of a ``MoLoRALayer``)."""
    if not isinstance(m, MoLoRALinear):
        raise _reject(where, m, "only bank-based linear methods (MoLoRALinear: LoRA, MoLA, "
                                "LoRAMoE, HydraLoRA, LoRA Soups, ...) are served; rank-wise "
                                "(SMoRA, FlyLoRA, MoRA) and CoMoL layers are not")
    A, B, ranks, scales = _bank_tensors(m.bank)
    E = m.bank.num_experts
    if isinstance(m, LoRALinear) and type(m).forward is LoRALinear.forward:
        pol = _Policy(_FIXED, 1, 1, fixed=torch.ones(1))
    elif type(m) is LoRASoupsCAT:
        if m.merged:
            raise _reject(where, m, "it is merged into its base weight; unmerge() it first")
        if type(m.gating) is not StaticGate:
            raise _reject(where, m, f"its gate is a {type(m.gating).__name__}")
        pol = _Policy(_FIXED, E, E, fixed=m.gating.alpha.detach().float().cpu())
    elif type(m).forward in (MoLoRALinear.forward, MoELoRA.forward) and \
            type(m).route is MoLoRALinear.route and type(m).adapters is MoLoRALinear.adapters:
        pol = _router_policy(where, m, m.router, m.gating, E)
    else:
        raise _reject(where, m, "its forward differs from MoLoRALinear's (output-conditioned "
                                "gates, sequence routing)")
    return _Entry(A, B, ranks, scales, pol)


def _mixlora_entries(where: str, m: nn.Module) -> Tuple[_Policy, Dict[str, _Entry], str]:
    """The MoE-FFN policy and the gate / up / down entries of a MixLoRA module."""
    if type(m) is not MixLoRA:
        raise _reject(where, m, "of the MoE-FFN methods only MixLoRA (top-k routing) is served")
    if m.routing_mode != "topk" or type(m.gating) is not TopK:
        raise _reject(where, m, f"routing={m.routing_mode!r}: only MixLoRA's top-k routing is "
                                f"served (dynamic top-p and switch capacity are not)")
    E = m.num_experts
    pol = _router_policy(where, m, m.router, m.gating, E)
    entries = {}
    for proj, bank in (("gate_proj", m.gate_lora), ("up_proj", m.up_lora),
                       ("down_proj", m.down_lora)):
        A, B, ranks, scales = _bank_tensors(bank)
        entries[proj] = _Entry(A, B, ranks, scales, _Policy(_EXTERNAL, E, 0))
    return pol, entries, m.act_name


# --- the model ----------------------------------------------------------------------------------


class MultiAdapterModel(nn.Module):
    """A causal LM serving many adapters at once, one adapter per batch row.

    Args:
        model: a transformers causal LM (or any module with Llama-style decoder layers), NOT
            converted by ``apply_molora``. It is modified in place: every gated ``mlp`` of a
            decoder layer becomes a ``MultiTenantFFN`` and every other ``nn.Linear`` of a
            decoder layer a ``MultiTenantLinear`` (with no adapter loaded they run the base
            module only; the outputs are the base model's).

    ``forward(*args, adapter_names=None, **kwargs)`` and ``generate(...)`` call the model with
    ``adapter_names`` (one entry per batch row: an adapter name, or ``None`` / ``"__base__"``
    for the base model; ``None`` for the whole list: every row runs the base model). The rows
    must stay in order (greedy or sampled decoding, one sequence per row).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from .integrations import hf_transformers as hf
        if not isinstance(model, nn.Module):
            raise TypeError(f"MultiAdapterModel: model must be an nn.Module, got "
                            f"{type(model).__name__}")
        if getattr(model, "molora_config", None) is not None or any(
                isinstance(m, (hf.MoLoRALayer, MultiTenantLinear, MultiTenantFFN))
                for m in model.modules()):
            raise ValueError("MultiAdapterModel: pass the base model, not one converted by "
                             "apply_molora or already served (adapters are added with "
                             "add_adapter)")
        lists = hf._decoder_layer_lists(model)
        if not lists:
            raise ValueError(f"MultiAdapterModel: found no decoder layers in "
                             f"{type(model).__name__}")
        state = _RowAdapters()
        # name (as apply_molora / save_molora name the module) -> (wrapper, projection or None)
        targets: Dict[str, Tuple[nn.Module, Optional[str], int]] = {}
        installs = []
        seen = set()
        for list_name, layers in lists:
            for i, layer in enumerate(layers):
                prefix = f"{list_name}.{i}" if list_name else str(i)
                mlp = getattr(layer, "mlp", None)
                ffn = None
                if mlp is not None and hf._is_gated_mlp(mlp) and id(mlp) not in seen:
                    seen.add(id(mlp))
                    ffn = MultiTenantFFN(mlp, state, f"{prefix}.mlp")
                    installs.append((layer, "mlp", ffn))
                    targets[f"{prefix}.mlp"] = (ffn, None, i)
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        seen.add(id(getattr(mlp, proj)))
                        targets[f"{prefix}.mlp.{proj}"] = (ffn, proj, i)
                for sub_name, sub in layer.named_modules():
                    if not isinstance(sub, nn.Linear) or id(sub) in seen:
                        continue
                    seen.add(id(sub))
                    name = f"{prefix}.{sub_name}"
                    parent = layer.get_submodule(sub_name.rsplit(".", 1)[0]) \
                        if "." in sub_name else layer
                    wrapper = MultiTenantLinear(sub, state, name)
                    installs.append((parent, sub_name.rsplit(".", 1)[-1], wrapper))
                    targets[name] = (wrapper, None, i)
        model.requires_grad_(False)
        for parent, attr, wrapper in installs:
            setattr(parent, attr, wrapper)
        self.model = model
        self.num_layers = max(len(layers) for _, layers in lists)
        self.__dict__["_state"] = state
        self.__dict__["_targets"] = targets
        self._adapters: List[str] = []
        self._adapter_info: Dict[str, dict] = {}

    # -- adapters ---------------------------------------------------------------------------

    @property
    def adapter_names(self) -> Tuple[str, ...]:
        """The loaded adapters, in load order."""
        return tuple(self._adapters)

    def _wrappers(self) -> List[nn.Module]:
        out, seen = [], set()
        for w, _, _ in self._targets.values():
            if id(w) not in seen:
                seen.add(id(w))
                out.append(w)
        return out

    def _modules_of(self, source) -> Tuple[dict, Dict[str, Tuple[str, nn.Module]]]:
        """(config dict, {module name: (kind, method module)}) of an adapter source."""
        from .integrations import hf_transformers as hf
        if isinstance(source, (str, os.PathLike)):
            return self._modules_from_directory(os.fspath(source))
        if isinstance(source, nn.Module):
            if getattr(source, "molora_config", None) is None:
                raise ValueError("MultiAdapterModel.add_adapter: the model source must be "
                                 "converted by apply_molora / load_molora")
            layers = hf._molora_layers(source)
            merged = [n for n, m in layers if m.merged]
            if merged:
                raise ValueError(f"MultiAdapterModel.add_adapter: {merged[0]} is merged into "
                                 f"its base weight; unmerge_molora() the source first")
            return (source.molora_config.to_dict(),
                    {n: (m.kind, m.molora) for n, m in layers})
        raise TypeError(f"MultiAdapterModel.add_adapter: source must be a directory written by "
                        f"save_molora or a model converted by apply_molora, got "
                        f"{type(source).__name__}")

    def _modules_from_directory(self, directory: str):
        """Builds the saved adapter's method modules around this model's base modules (they
        reference the frozen base, they do not copy it) and loads the saved tensors."""
        from safetensors.torch import load_file

        from .integrations import hf_transformers as hf
        config_path = os.path.join(directory, hf.CONFIG_NAME)
        weights_path = os.path.join(directory, hf.WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"MultiAdapterModel.add_adapter: {path} not found")
        with open(config_path) as f:
            meta = json.load(f)
        if meta.get("format_version") != hf._FORMAT_VERSION:
            raise ValueError(f"MultiAdapterModel.add_adapter: {config_path} has format_version "
                             f"{meta.get('format_version')!r}, this version reads "
                             f"{hf._FORMAT_VERSION}")
        config = hf.MoLoRAConfig.from_dict(meta["config"])
        epl = hf._experts_per_layer(config, self.num_layers)
        tensors = load_file(weights_path)
        modules = {}
        for name, fp in meta["modules"].items():
            if name not in self._targets:
                raise ValueError(f"MultiAdapterModel.add_adapter: {directory} adapts {name}, "
                                 f"which this model does not have")
            wrapper, proj, layer_index = self._targets[name]
            if fp["kind"] == "mlp":
                if proj is not None or not isinstance(wrapper, MultiTenantFFN):
                    raise ValueError(f"MultiAdapterModel.add_adapter: {name} is not a gated MLP")
                base = wrapper.base_mlp
                have = (base.gate_proj.in_features, base.gate_proj.out_features)
            else:
                base = (getattr(wrapper.base_mlp, proj) if proj is not None else wrapper.base)
                have = (base.in_features, base.out_features)
            if have != (fp["in_features"], fp["out_features"]):
                raise ValueError(f"MultiAdapterModel.add_adapter: {name} is {have[0]}->{have[1]} "
                                 f"here but {fp['in_features']}->{fp['out_features']} in "
                                 f"{directory}")
            target = hf._Target(name, None, name.rsplit(".", 1)[-1], base, layer_index,
                                fp["kind"], have[0], have[1])
            layer = hf._build(target, config, epl)
            state = layer.molora.state_dict(keep_vars=True)
            keys = list(layer.adapter_state_dict())
            missing = [f"{name}.{k}" for k in keys if f"{name}.{k}" not in tensors]
            bad = [f"{name}.{k}" for k in keys if f"{name}.{k}" in tensors
                   and tensors[f"{name}.{k}"].shape != state[k].shape]
            if missing or bad:
                raise ValueError(f"MultiAdapterModel.add_adapter: {weights_path} does not fit: "
                                 f"missing {missing[:3]}, wrong shape {bad[:3]}")
            with torch.no_grad():
                for k in keys:
                    state[k].copy_(tensors[f"{name}.{k}"])
            modules[name] = (fp["kind"], layer.molora.eval())
        return config.to_dict(), modules

    @torch.no_grad()
    def add_adapter(self, name: str, source) -> None:
        """Loads an adapter under ``name`` from ``source``: a directory written by
        ``save_molora`` or a model converted by ``apply_molora`` / ``load_molora`` (its adapter
        tensors are copied; its base weights are not used: this model's base is).

        Every check (unknown or unsupported method, a module this model lacks, shapes, dtype)
        raises ValueError / TypeError before anything changes."""
        if not isinstance(name, str) or not name or name == BASE_ADAPTER:
            raise ValueError(f"MultiAdapterModel.add_adapter: name must be a non-empty string "
                             f"other than {BASE_ADAPTER!r}, got {name!r}")
        if name in self._adapters:
            raise ValueError(f"MultiAdapterModel.add_adapter: an adapter named {name!r} is "
                             f"already loaded (remove_adapter it first)")
        config, modules = self._modules_of(source)
        plan = []   # (wrapper, projection or None, kind, payload)
        dtypes = set()
        for mod_name, (kind, m) in modules.items():
            if mod_name not in self._targets:
                raise ValueError(f"MultiAdapterModel.add_adapter: the adapter adapts {mod_name}, "
                                 f"which this model does not have")
            wrapper, proj, _ = self._targets[mod_name]
            if kind == "mlp":
                if not isinstance(m, MoELoRAFFN):
                    raise _reject(mod_name, m, "not an MoE-FFN")
                pol, entries, act = _mixlora_entries(mod_name, m)
                if wrapper.act_name not in (None, act):
                    raise ValueError(f"MultiAdapterModel.add_adapter: {mod_name} uses act "
                                     f"{act!r}, the served MLP {wrapper.act_name!r}")
                d = wrapper.base_mlp.gate_proj
                if m.gate_proj.weight.shape != d.weight.shape:
                    raise ValueError(f"MultiAdapterModel.add_adapter: {mod_name} has another "
                                     f"shape than this model's MLP")
                plan.append((wrapper, None, "mlp", (pol, entries, act)))
                dtypes.update(e.B.dtype for e in entries.values())
            else:
                entry = _linear_entry(mod_name, m)
                site = wrapper.sites[proj] if proj is not None else wrapper.site
                if (entry.A.shape[1], entry.B.shape[0]) != (site.in_features,
                                                           site.out_features):
                    raise ValueError(f"MultiAdapterModel.add_adapter: {mod_name} is "
                                     f"{entry.A.shape[1]}->{entry.B.shape[0]}, this model's "
                                     f"{site.in_features}->{site.out_features}")
                act = None
                if proj is not None and wrapper.act_name is None:
                    from .integrations import hf_transformers as hf
                    act = hf._activation_name(wrapper.base_mlp, wrapper.target_name)
                plan.append((wrapper, proj, "linear", (entry, act)))
                dtypes.add(entry.B.dtype)
        if not plan:
            raise ValueError("MultiAdapterModel.add_adapter: the source has no adapted module")
        have = self._bank_dtype()
        if len(dtypes | ({have} if have is not None else set())) != 1:
            raise ValueError(f"MultiAdapterModel.add_adapter: adapter banks of one model must "
                             f"share one dtype; got {sorted(map(str, dtypes))}"
                             + (f", loaded adapters use {have}" if have is not None else ""))
        dtype = next(iter(dtypes))
        device = next(self.model.parameters()).device
        for wrapper, proj, kind, payload in plan:
            if kind == "mlp":
                pol, entries, act = payload
                wrapper.mix[name] = pol
                wrapper.act_name = act
                for p, e in entries.items():
                    wrapper.sites[p].entries[name] = e
            elif proj is not None:
                entry, act = payload
                wrapper.act_name = wrapper.act_name or act
                wrapper.sites[proj].entries[name] = entry
            else:
                wrapper.site.entries[name] = payload[0]
        self._adapters.append(name)
        self._adapter_info[name] = {"config": config, "modules": sorted(modules)}
        self._rebuild(device, dtype)

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Unloads adapter ``name`` (its experts leave the stacked banks; modules stay)."""
        if name not in self._adapters:
            raise ValueError(f"MultiAdapterModel.remove_adapter: no adapter named {name!r} "
                             f"(loaded: {list(self._adapters)})")
        for w in self._wrappers():
            sites = w.sites.values() if isinstance(w, MultiTenantFFN) else [w.site]
            for s in sites:
                s.entries.pop(name, None)
            if isinstance(w, MultiTenantFFN):
                w.mix.pop(name, None)
        self._adapters.remove(name)
        del self._adapter_info[name]
        self._rebuild(next(self.model.parameters()).device, self._bank_dtype())

    def adapter_config(self, name: str) -> dict:
        """The ``MoLoRAConfig`` dict of a loaded adapter."""
        return dict(self._adapter_info[name]["config"])

    def _bank_dtype(self) -> Optional[torch.dtype]:
        for w in self._wrappers():
            sites = w.sites.values() if isinstance(w, MultiTenantFFN) else [w.site]
            for s in sites:
                for e in s.entries.values():
                    return e.B.dtype
        return None

    def _rebuild(self, device, dtype) -> None:
        for w in self._wrappers():
            if isinstance(w, MultiTenantFFN):
                w.rebuild(self._adapters, device, dtype)
            else:
                w.site.rebuild(self._adapters, device, dtype)

    # -- calls ------------------------------------------------------------------------------

    def _row_ids(self, adapter_names) -> Optional[torch.Tensor]:
        if adapter_names is None:
            return None
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"MultiAdapterModel: adapter_names must be a list with one name per "
                            f"batch row, got {type(adapter_names).__name__}")
        ids = []
        for n in adapter_names:
            if n is None or n == BASE_ADAPTER:
                ids.append(-1)
            elif n in self._adapters:
                ids.append(self._adapters.index(n))
            else:
                raise ValueError(f"MultiAdapterModel: unknown adapter {n!r} (loaded: "
                                 f"{list(self._adapters)}; None or {BASE_ADAPTER!r} for the "
                                 f"base model)")
        device = next(self.model.parameters()).device
        # a host -> device copy of the names' ids, once per call (no device -> host read)
        return torch.tensor(ids, dtype=torch.int64, device=device)

    @contextlib.contextmanager
    def using(self, adapter_names: Optional[Sequence[Optional[str]]]) -> Iterator[None]:
        """Within the block, calls of the wrapped model run row b with ``adapter_names[b]``."""
        state = self._state
        if state.rows is not None:
            raise RuntimeError("MultiAdapterModel: calls with adapter_names do not nest")
        state.rows = self._row_ids(adapter_names)
        try:
            yield
        finally:
            state.rows = None

    def forward(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None,
                **kwargs):
        with self.using(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None,
                 **kwargs):
        """``model.generate`` (KV cache) with row b decoded under ``adapter_names[b]``."""
        with self.using(adapter_names):
            return self.model.generate(*args, **kwargs)
