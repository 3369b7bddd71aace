"""``python -m bench --plan``: the planned traffic of the MoE-LoRA linear (molora_ops.plan, the one
byte model of every launch) at the H200 shape of docs/DESIGN.md's traffic model, against the
minimum traffic and the base linear's GEMM. Also printed by every ``python -m bench`` run.

The shape: T = 4096 tokens, d_in = d_out = 4096, E = 8 experts of rank 16 (R = 128), top-2, bf16.
Ceilings: the H200's measured 4.3 TB/s copy and 788 TFLOP/s bf16 matmul (molora_ops.plan).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from molora_ops import plan

H200_SHAPE = plan.Layer(T=4096, d_in=4096, d_out=4096, E=8, k=2, R=128, max_rank=16, elem=2)
MIB = 1 << 20


def summary(shape: plan.Layer = H200_SHAPE, c: Optional[plan.Ceilings] = None,
            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per formulation: bytes (fwd, bwd), modeled us, and the ratios the targets are stated in;
    ``chosen`` is what ``algo="auto"`` picks for a training step."""
    c = c or plan._KNOWN["H200"]
    base_f = plan.modeled_time(plan.base_launches(shape), c, dtype)
    base_b = plan.modeled_time(plan.base_launches(shape, True), c, dtype)
    out = {"shape": shape, "ceilings": c, "base_fwd_us": base_f * 1e6, "base_bwd_us": base_b * 1e6,
           "min_fwd_bytes": plan.minimum_bytes(shape), "min_bwd_bytes": plan.minimum_bytes(shape, True),
           "chosen": plan.choose(shape, "cpu", dtype, True, c=c), "algos": {}}
    for algo in plan.ALGOS:
        fwd, bwd = plan.launches(algo, shape), plan.launches(algo, shape, True)
        t_f, t_b = plan.modeled_time(fwd, c, dtype), plan.modeled_time(bwd, c, dtype)
        out["algos"][algo] = {
            "fwd": fwd, "bwd": bwd,
            "fwd_bytes": sum(l.bytes for l in fwd), "bwd_bytes": sum(l.bytes for l in bwd),
            "fwd_us": t_f * 1e6, "bwd_us": t_b * 1e6,
            "x_min_fwd": sum(l.bytes for l in fwd) / out["min_fwd_bytes"],
            "x_base_fwd": (base_f + t_f) / base_f,
            "x_base_fwd_bwd": (base_f + t_f + base_b + t_b) / (base_f + base_b),
        }
    return out


def table(s: Optional[dict] = None) -> str:
    s = s or summary()
    sh, c = s["shape"], s["ceilings"]
    lines = [f"planned traffic (molora_ops.plan): MoE-LoRA linear T={sh.T} d_in={sh.d_in} "
             f"d_out={sh.d_out} E={sh.E} k={sh.k} R={sh.R} ({sh.elem}-byte data) on {c.name} "
             f"ceilings ({c.bandwidth / 1e12:.1f} TB/s, "
             f"{c.peak(torch.bfloat16) / 1e12:.0f} TFLOP/s bf16, {c.launch * 1e6:.0f} us/launch)",
             f"  minimum: fwd {s['min_fwd_bytes'] / MIB:.1f} MiB (read x + base, write y, banks), "
             f"bwd {s['min_bwd_bytes'] / MIB:.1f} MiB; base GEMM fwd {s['base_fwd_us']:.1f} us, "
             f"bwd {s['base_bwd_us']:.1f} us"]
    for algo, a in s["algos"].items():
        mark = "  <- auto" if algo == s["chosen"] else ""
        lines.append(f"  {algo:8s} fwd {a['fwd_bytes'] / MIB:7.1f} MiB = {a['x_min_fwd']:.2f}x min, "
                     f"bwd {a['bwd_bytes'] / MIB:7.1f} MiB; modeled layer / base GEMM: fwd "
                     f"{a['x_base_fwd']:.3f}x, fwd+bwd {a['x_base_fwd_bwd']:.3f}x{mark}")
    lines.append("  launches of the chosen formulation (read / write MiB, GFLOP):")
    for phase in ("fwd", "bwd"):
        for l in s["algos"][s["chosen"]][phase]:
            lines.append(f"    {phase} {l.name:40s} {l.read / MIB:8.2f} {l.write / MIB:8.2f} "
                         f"{l.flops / 1e9:8.2f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
