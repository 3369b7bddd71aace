"""Benchmark cases: model shapes, the presets (`full` GPU grid, `cpu`, `tiny`) and routing.

A ``Case`` is one problem size of one op. Sizes come from real 7B models (hidden d, FFN d_ff),
decode (T = 1..64) and prefill / training (T = 512..16384) token counts, and the MoE-LoRA
settings of the methods (E experts, top-k, LoRA rank r). Routing is ``uniform`` (every expert
equally likely) or ``zipf`` (expert e drawn with probability proportional to (e+1)^-ZIPF_ALPHA,
the skew of a router that has collapsed onto a few experts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable, List

import torch

from .models import Shape

# (hidden d, FFN d_ff) of the dense 7B models whose FFNs MixLoRA-style methods adapt.
# Qwen2.5-7B's hidden size is 3584 (28 heads x 128), not 4096.
MODELS = {
    "llama2-7b": (4096, 11008),
    "mistral-7b": (4096, 14336),
    "qwen2.5-7b": (3584, 18944),
}
DECODE_T = (1, 16, 64)
PREFILL_T = (512, 4096, 16384)
EXPERTS = (4, 8, 16, 64)
TOP_K = (1, 2, 8)
RANKS = (8, 16, 64)
ROUTINGS = ("uniform", "zipf")
ZIPF_ALPHA = 1.2
DEFAULT_MOE = dict(E=8, k=2, r=16)  # MixLoRA's defaults

# Op-level benchmarks (one per op family); `moe_lora` is the composed MoE-LoRA linear layer.
OPS = ("softmax_topk", "dispatch", "gather_rows", "combine_rows", "sgmv_shrink", "sgmv_expand",
       "stacked_gated_lora", "rank_topk", "rank_sparse_expand", "moe_lora")
# Rank-wise ops (SMoRA: 64 rank-1 experts, 8 active): E = ranks, r = 1, k = ranks kept.
SMORA = dict(E=64, k=8, r=1)
XLORA = dict(E=9, k=9, r=16)  # X-LoRA: dense gates over 9 adapters (k unused by dense ops)


@dataclass(frozen=True)
class Case(Shape):
    """One problem size (the Shape fields, positional) of one op."""

    op: str = ""
    routing: str = "uniform"
    tag: str = ""  # where the shape comes from, e.g. "llama2-7b.up"

    @property
    def label(self) -> str:
        tag = f"{self.tag} " if self.tag else ""
        return (f"{tag}T={self.T} {self.d_in}->{self.d_out} E={self.E} k={self.k} r={self.r} "
                f"{self.routing}")

    def asdict(self) -> dict:
        return asdict(self)


# --- routing ----------------------------------------------------------------------------------


def expert_probs(E: int, routing: str, alpha: float = ZIPF_ALPHA) -> torch.Tensor:
    """Probability of each expert [E] (fp64): uniform, or Zipf p_e ~ (e+1)^-alpha (expert 0 the
    most popular)."""
    if routing == "uniform":
        return torch.full((E,), 1.0 / E, dtype=torch.float64)
    if routing == "zipf":
        p = torch.arange(1, E + 1, dtype=torch.float64) ** -alpha
        return p / p.sum()
    raise ValueError(f"unknown routing {routing!r} (expected one of {ROUTINGS})")


def routing_ids(T: int, E: int, k: int, routing: str, generator: torch.Generator) -> torch.Tensor:
    """ids [T, k] int32 (CPU): k distinct experts per token drawn without replacement from
    ``expert_probs``; every row is a valid top-k, so the counts sum to exactly T*k."""
    if not 1 <= k <= E:
        raise ValueError(f"need 1 <= k <= E, got k={k}, E={E}")
    probs = expert_probs(E, routing).expand(T, E)
    return torch.multinomial(probs, k, replacement=False, generator=generator).to(torch.int32)


def router_bias(E: int, routing: str) -> torch.Tensor:
    """A per-expert router logit bias [E] (fp64) that skews a softmax router like ``routing``:
    log p_e, centred (zeros for uniform)."""
    logp = expert_probs(E, routing).log()
    return logp - logp.mean()


# --- presets ----------------------------------------------------------------------------------


def _dedupe(cases: Iterable[Case]) -> List[Case]:
    seen, out = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _op_cases(T_values, d_in, d_out, moe=DEFAULT_MOE, tag="", routings=("uniform",)):
    """One case per op and T: the routed ops at `moe`, rank ops at SMoRA's, dense at X-LoRA's."""
    for T in T_values:
        for routing in routings:
            base = Case(T, d_in, d_out, routing=routing, tag=tag, **moe)
            for op in OPS:
                if op == "moe_lora":
                    continue
                if op == "rank_sparse_expand":
                    yield replace(base, op=op, **SMORA)
                elif op == "rank_topk":  # selects on random h: routing plays no part
                    yield replace(base, op=op, routing="uniform", **SMORA)
                elif op == "stacked_gated_lora":  # dense gates: no routing either
                    yield replace(base, op=op, routing="uniform", **XLORA)
                else:
                    yield replace(base, op=op)


def _full() -> List[Case]:
    cases = []
    d, d_ff = MODELS["llama2-7b"]
    # Every op at decode and prefill on Llama-2-7B's FFN up-projection; SGMV / dispatch with the
    # big MoE settings and skewed routing too.
    cases += _op_cases((64, 4096), d, d_ff, tag="llama2-7b.up", routings=ROUTINGS)
    for op in ("dispatch", "sgmv_shrink", "sgmv_expand"):
        for T in (64, 4096):
            cases.append(Case(T, d, d_ff, 64, 8, 64, op=op, tag="llama2-7b.up"))
    # The composed layer on each model's up-projection over decode + prefill, both routings.
    for name, (d, d_ff) in MODELS.items():
        for T in DECODE_T + PREFILL_T:
            for routing in ROUTINGS:
                cases.append(Case(T, d, d_ff, op="moe_lora", routing=routing, tag=f"{name}.up",
                                  **DEFAULT_MOE))
    d, d_ff = MODELS["llama2-7b"]
    for T in (16, 4096):
        cases.append(Case(T, d_ff, d, op="moe_lora", tag="llama2-7b.down", **DEFAULT_MOE))
        # One-at-a-time sweeps around (E=8, k=2, r=16) on a d x d projection.
        sweep = Case(T, d, d, op="moe_lora", tag="llama2-7b.q", **DEFAULT_MOE)
        cases += [replace(sweep, E=E) for E in EXPERTS]
        cases += [replace(sweep, E=16, k=k) for k in TOP_K]
        cases += [replace(sweep, r=r) for r in RANKS]
        cases += [replace(sweep, E=64, k=8, routing=rt) for rt in ROUTINGS]
    return _dedupe(cases)


def _cpu() -> List[Case]:
    # d scaled down 4x / 8x from Llama-2-7B (4096 -> 1024 / 512, d_ff 11008 -> 1376).
    cases = list(_op_cases((256,), 1024, 1024, tag="d1024"))
    cases += [Case(1024, 1024, 1024, op=op, routing="zipf", tag="d1024", **DEFAULT_MOE)
              for op in ("sgmv_shrink", "sgmv_expand")]
    for T in (16, 1024):
        for routing in ROUTINGS:
            cases.append(Case(T, 512, 1376, op="moe_lora", routing=routing, tag="llama2-7b/8.up",
                              **DEFAULT_MOE))
    cases.append(Case(1024, 1024, 1024, 64, 8, 8, op="moe_lora", tag="d1024"))
    return _dedupe(cases)


def _tiny() -> List[Case]:
    cases = list(_op_cases((8,), 64, 96, moe=dict(E=4, k=2, r=8), tag="tiny"))
    cases = [replace(c, E=16, k=4) if c.op.startswith("rank_") else
             replace(c, E=4, k=4, r=8) if c.op == "stacked_gated_lora" else c for c in cases]
    cases += [Case(T, 64, 96, 4, 2, 8, op="moe_lora", routing=rt, tag="tiny")
              for T in (1, 32) for rt in ROUTINGS]
    return _dedupe(cases)


def _layer() -> List[Case]:
    # The MoE-LoRA linear alone at the shape of `python -m bench --plan` (T=4096, 4096 -> 4096,
    # E=8, k=2, r=16) with both routings, and at Llama-2-7B's up projection: the layer against
    # the base linear, the per-expert loop and torch._grouped_mm in a minute on a GPU.
    d, d_ff = MODELS["llama2-7b"]
    cases = [Case(4096, d, d, op="moe_lora", routing=rt, tag="plan", **DEFAULT_MOE)
             for rt in ROUTINGS]
    cases.append(Case(4096, d, d_ff, op="moe_lora", tag="llama2-7b.up", **DEFAULT_MOE))
    return cases


PRESETS = {"full": _full, "cpu": _cpu, "tiny": _tiny, "layer": _layer}


def preset_cases(name: str, ops: Iterable[str] | None = None) -> List[Case]:
    """The cases of a preset, optionally only those of the given ops (in preset order)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (expected one of {sorted(PRESETS)})")
    cases = PRESETS[name]()
    if ops is not None:
        keep = set(ops)
        cases = [c for c in cases if c.op in keep]
    return cases


def auto_preset(device: torch.device) -> str:
    """`full` on a GPU, `cpu` otherwise."""
    return "full" if device.type == "cuda" else "cpu"
