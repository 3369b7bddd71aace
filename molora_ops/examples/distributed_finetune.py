"""Fine-tune MoE-LoRA adapters on a frozen base with torch.distributed (DDP or FSDP2) on 2 CPU
ranks, and check the ranks against one process that takes the same steps::

    python -m molora_ops.examples.distributed_finetune [--method mixlora|mola|smora]
        [--engine ddp|fsdp2] [--checkpointing] [--steps N] [--world-size W]

What it shows (docs/DISTRIBUTED.md):

* a tiny config-built Llama (no download) converted in place by ``apply_molora``; the base is
  frozen, the adapters and routers train;
* ``ddp``: ``DistributedDataParallel(model, broadcast_buffers=False)``: every rank holds the
  whole model; buffers are NOT broadcast from rank 0, so the ranks stay identical only because
  the routing statistics are reduced (``molora_ops.distributed``);
* ``fsdp2``: ``fully_shard`` on every decoder layer and on the root, over a 1-D CPU mesh: the
  frozen base AND the adapters are sharded; buffers (SMoRA's ``rank_bias``) are replicated;
* ``--checkpointing``: HF's non-reentrant activation checkpointing of the decoder layers;
* gloo on the loopback (a ``file://`` rendezvous in a temporary directory), ranks spawned with
  ``torch.multiprocessing``; each rank trains on its shard of the global batch.

The single-process reference (the same initial weights, the same data, the same SGD steps) runs
the GLOBAL batch in one forward for methods without an aux loss (SMoRA), and the global batch as
one micro-batch per rank (gradient accumulation, each loss / W) for MixLoRA and MoLA: their
load-balancing losses are products of means over the tokens of one forward, so the mean of the
per-rank losses that DDP / FSDP optimise is not the loss of the global batch in one forward;
it IS the accumulated one. The task loss (a mean over equal-sized shards) is the same either way.
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: fall back to a plain loop
    tqdm = None

# Tiny, so that 2 CPU ranks take a few seconds; several experts / ranks per layer, dropout off
# (a dropout mask would differ between one process and two).
VOCAB, HIDDEN, D_FF, LAYERS, SEQ = 64, 32, 48, 2, 12
METHODS = {
    "mixlora": dict(num_experts=4, top_k=2, rank=4, alpha=8.0, attention_rank=2, dropout=0.0),
    "mola": dict(top_k=2, rank=4, alpha=8.0, dropout=0.0, experts_per_layer=[3, 4]),
    # a large bias rate: a wrong count moves the bias by 1e-2, far above the test's tolerance
    "smora": dict(rank=8, top_k=3, alpha=6.0, dropout=0.0, method_kwargs={"bias_rate": 1e-2}),
}
ENGINES = ("ddp", "fsdp2")
LR = 0.5
GLOBAL_BATCH = 4


def build_model(method: str, seed: int = 0, checkpointing: bool = False):
    """The converted tiny Llama in train mode, adapters randomised (B != 0) from ``seed``."""
    import transformers
    from molora_ops.integrations.hf_transformers import MoLoRAConfig, apply_molora

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=D_FF, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
        use_cache=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    apply_molora(model, MoLoRAConfig(method, **METHODS[method]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA starts with B = 0: make every adapter (and router) matter
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    if checkpointing:
        kw = {"use_reentrant": False}  # reentrant checkpointing drops the aux losses' gradient
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model.train()


def make_batches(steps: int, global_batch: int = GLOBAL_BATCH,
                 seed: int = 123) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (global_batch, SEQ), generator=g) for _ in range(steps)]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole value (FSDP2 parameters are sharded DTensors)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.clone()


def adapter_state(model) -> Dict[str, torch.Tensor]:
    """Trainable parameters and every buffer of the molora modules, full values."""
    out = {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: _full(b) for n, b in model.named_buffers() if ".molora." in n})
    return out


def _shard_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss (mean next-token cross-entropy) of one shard, from its logits."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1))


def _has_aux(method: str) -> bool:
    return method in ("mixlora", "mola")


def reference(method: str, steps: int = 3, world: int = 2, checkpointing: bool = False,
              seed: int = 0) -> dict:
    """One process, no process group: the steps W ranks take together (module doc).
    -> {"loss": [step][rank], "aux": [step][rank] or None, "state": adapter_state}."""
    from molora_ops.integrations.hf_transformers import molora_aux_loss

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError("reference() must run outside a process group")
    model = build_model(method, seed, checkpointing)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, auxes = [], []
    for batch in make_batches(steps, world * (GLOBAL_BATCH // 2)):
        shards = batch.chunk(world)
        opt.zero_grad(set_to_none=True)
        if _has_aux(method):
            step_l, step_a = [], []
            for s in shards:
                out = model(input_ids=s, labels=s)
                (out.loss / world).backward()
                step_l.append(out.loss.item())
                step_a.append(molora_aux_loss(model).item())
            auxes.append(step_a)
        else:
            out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            step_l = [_shard_loss(lg, s).item() for lg, s in
                      zip(out.logits.detach().chunk(world), shards)]
        losses.append(step_l)
        opt.step()
    return {"loss": losses, "aux": auxes if _has_aux(method) else None,
            "state": adapter_state(model)}


def _wrap(model, engine: str, world: int):
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # No buffer broadcast from rank 0 before each forward: the buffers stay equal because
        # their statistics are reduced, not because rank 0 overwrites them (and the broadcast
        # is a collective per step that the reduction makes unnecessary).
        if "forward_sync_buffers" in inspect.signature(DDP).parameters:
            return DDP(model, forward_sync_buffers=False)
        return DDP(model, broadcast_buffers=False)
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"unknown engine {engine!r}, expected one of {ENGINES}")


def train_rank(method: str, engine: str, rank: int, world: int, steps: int = 3,
               checkpointing: bool = False, seed: int = 0, progress: bool = False) -> dict:
    """This rank's part of the run (a default process group must be initialised).
    -> {"loss": [step], "aux": [step] or None, "state": adapter_state (full values)}."""
    from molora_ops.integrations.hf_transformers import molora_aux_loss

    model = build_model(method, seed, checkpointing)
    wrapped = _wrap(model, engine, world)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, auxes = [], []
    batches = make_batches(steps, world * (GLOBAL_BATCH // 2))
    it = batches
    if progress and rank == 0 and tqdm is not None:
        it = tqdm(batches, desc=f"{method}/{engine}{' +ckpt' if checkpointing else ''}",
                  unit="step")
    for batch in it:
        shard = batch.chunk(world)[rank]
        opt.zero_grad(set_to_none=True)
        out = wrapped(input_ids=shard, labels=shard)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if _has_aux(method):
            auxes.append(molora_aux_loss(model).item())
        if it is not batches:
            it.set_postfix(loss=f"{losses[-1]:.4f}")
    return {"loss": losses, "aux": auxes if _has_aux(method) else None,
            "state": adapter_state(model)}


# (method, engine, checkpointing) or (method, engine, checkpointing, sync_statistics)
Case = Tuple


def _worker(rank: int, world: int, init_file: str, out_dir: str, cases: Sequence[Case],
            steps: int, progress: bool, sync: bool, references: bool) -> None:
    import torch.distributed as dist
    from molora_ops import distributed as mdist

    torch.set_num_threads(1)  # the ranks share the cores; more threads only oversubscribe them
    mdist.set_sync_statistics(sync)
    results = {}
    if references:
        # The single-process references, before any process group exists (so nothing is
        # reduced), split over the ranks' already warm processes.
        wanted = sorted({(c[0], c[2]) for c in cases})
        for method, ckpt in wanted[rank::world]:
            results[("reference", method, ckpt)] = reference(method, steps, world, ckpt)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for case in cases:
            method, engine, ckpt = case[:3]
            t0 = time.perf_counter()
            with mdist.use_sync_statistics(case[3] if len(case) > 3 else sync):
                results[case] = train_rank(method, engine, rank, world, steps, ckpt,
                                           progress=progress)
            results[case]["seconds"] = time.perf_counter() - t0
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(cases: Sequence[Case], steps: int = 3, world: int = 2,
                    progress: bool = False, sync: bool = True, references: bool = True
                    ) -> Tuple[List[Dict[Case, dict]], Dict[Tuple[str, bool], dict]]:
    """Spawn ``world`` gloo ranks on this host (``file://`` rendezvous, loopback only) that run
    ``cases`` one after the other -> (one {case: train_rank result} per rank,
    {(method, checkpointing): reference result} when ``references``)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_worker, args=(world, init_file, tmp, list(cases), steps, progress, sync,
                                references), nprocs=world, join=True)
        loaded = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    refs = {(k[1], k[2]): v for res in loaded for k, v in res.items() if k[0] == "reference"}
    ranks = [{k: v for k, v in res.items() if k[0] != "reference"} for res in loaded]
    return ranks, refs


def max_diffs(rank_result: dict, ref: dict, rank: int) -> Dict[str, float]:
    """Largest absolute differences of one rank's run from the reference's."""
    d = {"loss": max(abs(a - b[rank]) for a, b in zip(rank_result["loss"], ref["loss"]))}
    if ref["aux"] is not None:
        d["aux"] = max(abs(a - b[rank]) for a, b in zip(rank_result["aux"], ref["aux"]))
    state = rank_result["state"]
    if set(state) != set(ref["state"]):
        raise AssertionError(f"state keys differ: {sorted(set(state) ^ set(ref['state']))}")
    params = [(state[k] - v).abs().max().item() for k, v in ref["state"].items()
              if "rank_bias" not in k]
    buffers = [(state[k] - v).abs().max().item() for k, v in ref["state"].items()
               if "rank_bias" in k]
    d["params"] = max(params)
    if buffers:
        d["buffers"] = max(buffers)
    return d


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=sorted(METHODS), default="mixlora")
    ap.add_argument("--engine", choices=ENGINES, default="fsdp2")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--world-size", type=int, default=2)
    args = ap.parse_args(argv)
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        raise SystemExit("torch.distributed with the gloo backend is needed")
    case = (args.method, args.engine, args.checkpointing)
    t0 = time.perf_counter()
    ranks, refs = run_distributed([case], args.steps, args.world_size, progress=True)
    ref = refs[(args.method, args.checkpointing)]
    print(f"{args.world_size} ranks, {args.engine}, {args.method}"
          f"{', activation checkpointing' if args.checkpointing else ''}: "
          f"{time.perf_counter() - t0:.1f} s")
    diffs = []
    for r, res in enumerate(ranks):
        d = max_diffs(res[case], ref, r)
        diffs.append(d)
        print(f"rank {r}: losses {[round(v, 4) for v in res[case]['loss']]}; max |diff| vs one "
              f"process: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
    return {"ranks": ranks, "reference": ref, "diffs": diffs}


if __name__ == "__main__":
    main()
