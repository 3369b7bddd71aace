"""Bench row: multi-tenant serving, a mixed batch of N adapters in one forward (CPU)::

    python -m bench.serving [--adapters 1 4 16] [--batch 16] [--seq 32] [--hidden 256]

Two comparisons per N (each batch row names one of the N adapters, round robin):

* plain LoRA (rank 8 on q/k/v/o/gate/up/down): ``molora_ops.serving.MultiAdapterModel`` (one
  dispatch per module for every adapter of the batch) against PEFT's mixed-batch path,
  ``PeftModel(ids, adapter_names=[...])`` with the same adapter weights (PEFT runs each adapter's
  rows as a sub-batch, in a loop over the adapters of the batch, in every LoRA layer). The
  logits of both are compared (``max_abs_diff_vs_peft``).
* MoE-LoRA (the adapters alternate MoLA and MixLoRA): the mixed batch against the per-adapter
  loop, one ``apply_molora`` model per adapter run on that adapter's rows (what serving them
  without a multi-tenant path costs).

Prefill forward only, ``torch.no_grad``; the time is the best of ``repeats`` calls (the least
disturbed one on a shared machine); ``--threads`` sets torch's CPU threads (default: torch's).
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional, Sequence

import torch

VOCAB = 512


def _tiny_llama(hidden: int, layers: int, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512, pad_token_id=0,
        attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).float().eval()


@torch.no_grad()
def _randomize(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if ".router." in name else 0.02))
    return model.eval()


def _best_ms(fn, repeats: int, warmup: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def _peft_from(converted: Dict[str, torch.nn.Module], hidden: int, layers: int, rank: int):
    """A PeftModel holding the same LoRA weights as our converted plain-LoRA models."""
    from peft import LoraConfig, get_peft_model
    from molora_ops.integrations.hf_transformers import MoLoRALayer

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = None
    for name, ours in converted.items():
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(_tiny_llama(hidden, layers), cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        mods = dict(peft_model.base_model.model.named_modules())
        with torch.no_grad():
            for mod_name, m in ours.named_modules():
                if isinstance(m, MoLoRALayer):
                    layer = mods[mod_name]
                    layer.lora_A[name].weight.copy_(m.molora.bank.A)
                    layer.lora_B[name].weight.copy_(m.molora.bank.B)
    return peft_model.eval()


def run(adapter_counts: Sequence[int] = (1, 4, 16), batch: int = 16, seq: int = 32,
        hidden: int = 256, layers: int = 2, rank: int = 8, repeats: int = 5,
        warmup: int = 1, threads: Optional[int] = None) -> List[dict]:
    """Times the rows and prints the table; returns one dict per N."""
    if threads is not None:
        torch.set_num_threads(threads)
    from molora_ops.integrations.hf_transformers import MoLoRAConfig, apply_molora
    from molora_ops.serving import MultiAdapterModel

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    results = []
    for n in adapter_counts:
        rows = [f"a{b % n}" for b in range(batch)]
        # plain LoRA: ours vs PEFT adapter_names
        lora = {f"a{i}": _randomize(apply_molora(_tiny_llama(hidden, layers), MoLoRAConfig(
            "lora", rank=rank, alpha=float(2 * rank))), seed=i + 1) for i in range(n)}
        served = MultiAdapterModel(_tiny_llama(hidden, layers)).eval()
        for name, m in lora.items():
            served.add_adapter(name, m)
        peft_model = _peft_from(lora, hidden, layers, rank)
        with torch.no_grad():
            diff = (served(ids, adapter_names=rows).logits
                    - peft_model(input_ids=ids, adapter_names=rows).logits).abs().max().item()
        ours_ms = _best_ms(lambda: served(ids, adapter_names=rows), repeats, warmup)
        peft_ms = _best_ms(lambda: peft_model(input_ids=ids, adapter_names=rows), repeats,
                             warmup)

        # MoE-LoRA (MoLA / MixLoRA alternating): mixed batch vs the per-adapter loop
        moe_cfgs = [MoLoRAConfig("mola", num_experts=4, top_k=2, rank=rank, alpha=2.0 * rank),
                    MoLoRAConfig("mixlora", num_experts=4, top_k=2, rank=rank,
                                 alpha=2.0 * rank)]
        moe = {f"a{i}": _randomize(apply_molora(_tiny_llama(hidden, layers), moe_cfgs[i % 2]),
                                   seed=100 + i) for i in range(n)}
        served = MultiAdapterModel(_tiny_llama(hidden, layers)).eval()
        for name, m in moe.items():
            served.add_adapter(name, m)
        groups = {name: [b for b, r in enumerate(rows) if r == name] for name in moe}

        def loop():
            for name, idx in groups.items():
                if idx:
                    moe[name](ids[idx])

        moe_ms = _best_ms(lambda: served(ids, adapter_names=rows), repeats, warmup)
        loop_ms = _best_ms(loop, repeats, warmup)
        results.append(dict(adapters=n, molora_ms=ours_ms, peft_ms=peft_ms,
                            max_abs_diff_vs_peft=diff, moe_mixed_ms=moe_ms, moe_loop_ms=loop_ms))
    _print(results, batch, seq, hidden, layers, rank)
    return results


def _print(results: List[dict], batch, seq, hidden, layers, rank) -> None:
    print(f"multi-tenant serving, CPU prefill, batch {batch} x {seq} tokens, Llama hidden "
          f"{hidden}, {layers} layers, rank {rank}, {torch.get_num_threads()} threads; best of "
          f"the repeats, ms")
    head = (f"{'adapters':>8} | {'LoRA: molora':>12} {'PEFT names':>10} {'speedup':>7} "
            f"{'|diff|':>8} | {'MoE: mixed':>10} {'per-adapter loop':>16} {'speedup':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['adapters']:>8} | {r['molora_ms']:>12.2f} {r['peft_ms']:>10.2f} "
              f"{r['peft_ms'] / r['molora_ms']:>7.2f} {r['max_abs_diff_vs_peft']:>8.1e} | "
              f"{r['moe_mixed_ms']:>10.2f} {r['moe_loop_ms']:>16.2f} "
              f"{r['moe_loop_ms'] / r['moe_mixed_ms']:>7.2f}")


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description="multi-tenant serving bench (CPU)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    return run(a.adapters, a.batch, a.seq, a.hidden, a.layers, a.rank, a.repeats,
               threads=a.threads)


if __name__ == "__main__":
    main()
