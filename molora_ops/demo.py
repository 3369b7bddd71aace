"""``python -m molora_ops.demo``: a MoE-LoRA linear layer (MixLoRA-style top-2 routing over 8 LoRA
experts on a frozen base weight) forward + backward through the fused ops, checked against the
pure-PyTorch reference ops and a per-expert Python loop (the PEFT / MoE-PEFT formulation), with the
max error of the output and of every gradient, and the time of each path."""

from __future__ import annotations

import argparse
import time

import torch

import molora_ops
from molora_ops import reference


def moe_lora_linear(ops, x, W0, Wg, A, B, rank_offsets, scales, k, max_rank):
    """y = x W0^T + sum_{j<k} w_j s_e B_e A_e x over the top-k experts of softmax(x Wg^T), through
    ``ops`` (molora_ops: the routed entry ``routed_moe_lora_linear``, the router and the one
    MoE-LoRA linear entry ``moe_lora_linear`` behind it; or molora_ops.reference)."""
    return ops.routed_moe_lora_linear(x, Wg, A, B, rank_offsets, k, scales, weight=W0,
                                      max_rank=max_rank)[0]


def per_expert_loop(x, W0, Wg, A, B, rank_offsets, scales, k, max_rank):
    """The loop the fused ops replace: one masked matmul pair per expert."""
    probs = torch.softmax(x @ Wg.t(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    y = x @ W0.t()
    for e in range(Wg.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        r0, r1 = int(rank_offsets[e]), int(rank_offsets[e + 1])
        delta = (x[tok] @ A[r0:r1].t()) @ B[:, r0:r1].t() * scales[e]
        y = y.index_add(0, tok, delta * weights[tok, slot, None])
    return y


def run_path(fn, params, inputs, grad_out, repeats):
    """Forward + backward `repeats` times; returns (output, grads, median seconds)."""
    times = []
    for _ in range(repeats):
        leaves = [p.detach().clone().requires_grad_(True) for p in params]
        start = time.perf_counter()
        y = fn(*leaves, *inputs)
        grads = torch.autograd.grad(y, leaves, grad_out)
        times.append(time.perf_counter() - start)
    times.sort()
    return y.detach(), grads, times[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    T, d, E, k, r = args.tokens, args.dim, args.experts, args.top_k, args.rank
    x = torch.randn(T, d)
    W0 = torch.randn(d, d) / d ** 0.5
    Wg = torch.randn(E, d) / d ** 0.5
    A = torch.randn(E * r, d) / d ** 0.5
    B = torch.randn(d, E * r) / r ** 0.5
    rank_offsets = molora_ops.uniform_rank_offsets(E, r)
    scales = torch.full((E,), 32.0 / r)  # MixLoRA: alpha=32, r=16
    grad_out = torch.randn(T, d)
    params = [x, Wg, A, B]
    names = ["dx", "dWg", "dA", "dB"]
    consts = (W0, rank_offsets, scales, k, r)

    def fused(x, Wg, A, B, W0, ro, s, k, mr):
        return moe_lora_linear(molora_ops, x, W0, Wg, A, B, ro, s, k, mr)

    def ref(x, Wg, A, B, W0, ro, s, k, mr):
        return moe_lora_linear(reference, x, W0, Wg, A, B, ro, s, k, mr)

    def loop(x, Wg, A, B, W0, ro, s, k, mr):
        return per_expert_loop(x, W0, Wg, A, B, ro, s, k, mr)

    def fused64(x, Wg, A, B, W0, ro, s, k, mr):
        return fused(x.double(), Wg.double(), A.double(), B.double(), W0.double(), ro, s.double(),
                     k, mr)

    print(f"MoE-LoRA linear: T={T} d_in=d_out={d} E={E} k={k} r={r} fp32, forward+backward, "
          f"median of {args.repeats} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    backend = "C++ CPU kernels" if molora_ops.has_extension() else "reference (no extension!)"
    results = {}
    for label, fn in (("molora_ops", fused), ("reference ops", ref), ("per-expert loop", loop)):
        results[label] = run_path(fn, params, consts, grad_out, args.repeats)

    y64, g64, _ = run_path(fused64, params, consts, grad_out.double(), 1)
    print(f"\n{'path':18s} {'time (ms)':>10s} {'max|y - y64|':>14s} " +
          " ".join(f"{'max|' + n + '|err':>12s}" for n in names))
    for label, (y, grads, sec) in results.items():
        errs = [(g.double() - g_ref).abs().max().item() for g, g_ref in zip(grads, g64)]
        print(f"{label:18s} {sec * 1e3:10.2f} {(y.double() - y64).abs().max().item():14.2e} " +
              " ".join(f"{e:12.2e}" for e in errs))
    fused_sec = results["molora_ops"][2]
    print(f"\nbackend: {backend}; y64 = molora_ops in float64 (cross-checked by the reference path).")
    print(f"speed-up over the per-expert loop: {results['per-expert loop'][2] / fused_sec:.2f}x; "
          f"over the reference ops: {results['reference ops'][2] / fused_sec:.2f}x")
    y_ref = results["reference ops"][0]
    max_err = (results["molora_ops"][0] - y_ref).abs().max().item()
    assert max_err < 1e-3, f"molora_ops and the reference disagree: {max_err}"


if __name__ == "__main__":
    main()
