"""Serve several MoE-LoRA and LoRA fine-tunes of one base model in ONE batch, one adapter per row::

    python -m molora_ops.examples.multi_tenant_serving [--workdir DIR]

What it shows (a tiny random Llama from ``transformers``, on the CPU, in a few seconds):

1. three fine-tunes of the same base, each saved by ``save_molora``: a MixLoRA (MoE-FFN, 4
   experts, top-2), a MoLA (routed LoRA experts on every projection, 2 then 4 experts per layer)
   and a plain LoRA (rank 8). Training is replaced by random adapter weights here;
2. ``MultiAdapterModel(base)`` loads all three with ``add_adapter`` (the modules are installed
   once; each load only grows the stacked banks);
3. one ``generate`` call (KV cache) on a batch whose rows name different adapters (``None``:
   the base model), and a check that every row equals the request run alone through
   ``load_molora`` with its adapter;
4. ``remove_adapter`` shrinks the banks; the other adapters keep serving.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Optional

import torch


def tiny_llama(seed: int = 0):
    """A random 2-layer Llama (hidden 64), fp32, eval mode: the stand-in for a pre-trained LM."""
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).float().eval()


@torch.no_grad()
def fake_finetune(model, seed: int):
    """Random non-zero adapter weights and routers (a real run trains them)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if ".router." in name else 0.05))
    return model.eval()


def main(workdir: Optional[str] = None) -> dict:
    from molora_ops.integrations.hf_transformers import (MoLoRAConfig, apply_molora,
                                                         load_molora, save_molora)
    from molora_ops.serving import MultiAdapterModel

    workdir = workdir or tempfile.mkdtemp(prefix="molora_serving_")
    configs = {
        "math-mixlora": MoLoRAConfig("mixlora", num_experts=4, top_k=2, rank=4, alpha=8.0),
        "code-mola": MoLoRAConfig("mola", experts_per_layer=[2, 4], top_k=2, rank=4, alpha=8.0),
        "chat-lora": MoLoRAConfig("lora", rank=8, alpha=16.0),
    }
    # 1. the fine-tunes, saved as adapters only (no base weights)
    for i, (name, cfg) in enumerate(configs.items()):
        save_molora(fake_finetune(apply_molora(tiny_llama(), cfg), seed=i + 1),
                    os.path.join(workdir, name))

    # 2. one served model, three adapters
    served = MultiAdapterModel(tiny_llama())
    for name in configs:
        served.add_adapter(name, os.path.join(workdir, name))

    # 3. one batch, one adapter per row (None: the base model), prefill + KV-cache decode
    rows = ["code-mola", "chat-lora", None, "math-mixlora", "code-mola"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (len(rows), 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                  # a left-padded row
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)
    with torch.no_grad():
        out = served.generate(ids, attention_mask=mask, adapter_names=rows, **gen)
        worst = 0.0
        for b, name in enumerate(rows):
            alone = tiny_llama() if name is None else \
                load_molora(tiny_llama(), os.path.join(workdir, name)).eval()
            ref = alone.generate(ids[b:b + 1], attention_mask=mask[b:b + 1], **gen)
            assert torch.equal(out.sequences[b], ref.sequences[0]), name
            worst = max(worst, max((a[b] - r[0]).abs().max().item()
                                   for a, r in zip(out.logits, ref.logits)))
    print(f"{len(rows)} rows, {len(configs)} adapters, one batch: every row's tokens and logits "
          f"are equal to each request alone (max |diff| {worst:.2e})")

    # 4. unload one; the others keep serving, the modules stay
    served.remove_adapter("math-mixlora")
    with torch.no_grad():
        served(ids[:2], attention_mask=mask[:2], adapter_names=["code-mola", "chat-lora"])
    print(f"after remove_adapter: {served.adapter_names}")
    return {"max_abs_diff": worst, "sequences": out.sequences, "adapters": served.adapter_names}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the adapters are saved")
    main(parser.parse_args().workdir)
