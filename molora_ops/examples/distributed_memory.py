"""Per-GPU memory and adapter communication of MixLoRA on a Llama base under FSDP2 / DDP, computed
from the model sizes (the numbers of docs/DISTRIBUTED.md; python_tests/test_distributed.py checks
that the doc holds this script's output)::

    python -m molora_ops.examples.distributed_memory [--markdown]

The model (docs/DISTRIBUTED.md "Memory" and "Communication" give the derivation):

* base (frozen, bf16, 2 B/param): embeddings ``V d`` + LM head ``V d`` (untied) + final norm ``d``
  + per layer ``2 d^2 + 2 d d_kv`` (q, o; k, v) + ``3 d f`` (gate, up, down) + ``2 d`` (norms);
* MixLoRA adapters (fp32 trained with AdamW: param + grad + 2 moments = 16 B/param), per layer
  ``E * 3 r (d + f)`` (E experts, each a LoRA on gate, up, down) + ``r (6 d + 2 d_kv)`` (a LoRA on
  each of q, k, v, o) + ``d E`` (the router);
* FSDP2 with ``fully_shard`` on every decoder layer and on the root: every parameter and its
  gradient / optimizer state is sharded 1/N; the root group (embeddings, final norm, LM head) stays
  all-gathered from the forward to the end of the backward (FSDP2 does not reshard the root after
  the forward); at most two decoder layers are all-gathered at once (the current one and the
  prefetched next one) plus one layer's unsharded adapter gradients before their reduce-scatter.
  Activations are not included (they depend on the tokens per GPU; with activation checkpointing
  they are ``L d`` bf16 values per token plus one layer's recomputation).
* communication from the adapters per GPU and step (ring collectives move ``(N-1)/N`` of the
  buffer per GPU): FSDP2 all-gathers the fp32 adapter shards in the forward and again in the
  backward and reduce-scatters their fp32 gradients: ``3 (N-1)/N 4 P_ad`` bytes; DDP all-reduces
  the gradients: ``2 (N-1)/N 4 P_ad``. The MoE itself moves no token between GPUs (every expert is
  on every GPU after the all-gather), and MixLoRA has no statistic to reduce: per token the
  adapters add 0 bytes; per step the bytes above, i.e. ``bytes / tokens per step per GPU`` per
  token. (SMoRA adds one int64 ``[r]`` all-reduce per adapted linear and forward.)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List

GIB = 2 ** 30


@dataclass(frozen=True)
class Base:
    name: str
    vocab: int
    d: int
    f: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def d_kv(self) -> int:
        return self.d // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        d, f, dkv = self.d, self.f, self.d_kv
        return 2 * d * d + 2 * d * dkv + 3 * d * f + 2 * d

    @property
    def root_params(self) -> int:
        return 2 * self.vocab * self.d + self.d

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params


# Llama-2 7B and 70B (their HF config.json values)
LLAMA2_7B = Base("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32)
LLAMA2_70B = Base("Llama-2-70B", 32000, 8192, 28672, 80, 64, 8)
BASES = (LLAMA2_7B, LLAMA2_70B)
GPUS = (8, 64)

E, R = 8, 16                 # MixLoRA, all projections
BASE_BYTES = 2               # bf16 frozen base
ADAPTER_PARAM_BYTES = 4      # fp32 adapters
ADAPTER_STATE_BYTES = 16     # fp32 param + grad + AdamW exp_avg + exp_avg_sq
TOKENS_PER_GPU = 4 * 4096    # for the per-token figure: 4 sequences of 4096 per GPU and step


def adapter_layer_params(b: Base, e: int = E, r: int = R) -> int:
    return e * 3 * r * (b.d + b.f) + r * (6 * b.d + 2 * b.d_kv) + b.d * e


def estimate(b: Base, n: int, e: int = E, r: int = R) -> Dict[str, float]:
    p_ad_layer = adapter_layer_params(b, e, r)
    p_ad = b.layers * p_ad_layer
    sharded = (BASE_BYTES * b.params + ADAPTER_STATE_BYTES * p_ad) / n
    root = BASE_BYTES * b.root_params
    layer_gathered = BASE_BYTES * b.layer_params + ADAPTER_PARAM_BYTES * p_ad_layer
    transient = root + 2 * layer_gathered + ADAPTER_PARAM_BYTES * p_ad_layer
    fsdp_comm = 3 * (n - 1) / n * ADAPTER_PARAM_BYTES * p_ad
    ddp_comm = 2 * (n - 1) / n * ADAPTER_PARAM_BYTES * p_ad
    return {
        "base_params": b.params, "adapter_params": p_ad,
        "sharded_gib": sharded / GIB, "transient_gib": transient / GIB,
        "total_gib": (sharded + transient) / GIB,
        "fsdp_comm_gib": fsdp_comm / GIB, "ddp_comm_gib": ddp_comm / GIB,
        "fsdp_comm_per_token": fsdp_comm / TOKENS_PER_GPU,
    }


def rows() -> List[Dict]:
    return [dict(base=b.name, gpus=n, **estimate(b, n)) for b in BASES for n in GPUS]


def markdown() -> str:
    """The doc's table (docs/DISTRIBUTED.md holds it verbatim)."""
    out = ["| base | params (base / MixLoRA) | GPUs | sharded state | gathered (transient) "
           "| per GPU, without activations | adapter comm per step: FSDP2 (DDP) "
           "| per token (4x4096 tokens/GPU) |",
           "|---|---|---|---|---|---|---|---|"]
    for x in rows():
        out.append(
            f"| {x['base']} | {x['base_params'] / 1e9:.2f} B / {x['adapter_params'] / 1e6:.1f} M "
            f"| {x['gpus']} | {x['sharded_gib']:.2f} GiB | {x['transient_gib']:.2f} GiB "
            f"| {x['total_gib']:.2f} GiB | {x['fsdp_comm_gib']:.2f} GiB "
            f"({x['ddp_comm_gib']:.2f} GiB) | {x['fsdp_comm_per_token'] / 1e3:.1f} kB |")
    return "\n".join(out)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.parse_args(argv)
    text = markdown()
    print(text)
    return text


if __name__ == "__main__":
    main()
