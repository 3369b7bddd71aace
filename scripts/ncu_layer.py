"""Achieved DRAM traffic of the MoE-LoRA linear's forward, per formulation, against its plan
(molora_ops.plan) at the shape `python -m bench --plan` prints (T=4096, 4096 -> 4096, E=8, k=2,
r=16, bf16, base given). Two modes:

    ncu --clock-control none --profile-from-start off --csv --print-units base \\
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \\
        --log-file layer_ncu.csv python3 scripts/ncu_layer.py --run --order layer_ncu.order
    python3 scripts/ncu_layer.py --report layer_ncu.csv --order layer_ncu.order [--json out.json]

``--run`` (CUDA) warms every formulation up, then runs one forward of each, and of the base linear
alone, inside a profiler window (cudaProfilerStart / Stop: ncu profiles only those launches), each
on a stream of its own; it writes the order of the windows to ``--order``. ``--report`` groups
ncu's kernels by stream, in the order the streams first appear, and prints per formulation the
DRAM bytes read and written against the planned and the minimum bytes, and the kernels' time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIB = 1 << 20
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum")
BASE = "base_linear"


def _shape():
    from bench.plan import H200_SHAPE
    return H200_SHAPE


def run(order_path: str, device: str = "cuda", shape=None) -> None:
    """The profiled program. ``device="cpu"`` (with a small ``shape``) runs the same calls
    without profiler windows or streams: a test of everything but ncu."""
    import torch
    import torch.nn.functional as F

    import molora_ops
    from molora_ops import plan

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ncu_layer --run needs a CUDA device")
    s, dev, dt = shape or _shape(), torch.device(device), torch.bfloat16
    cuda = dev.type == "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * std).to(dt)

    r = s.R // s.E
    x, base = rnd(s.T, s.d_in), rnd(s.T, s.d_out)
    A, B = rnd(s.R, s.d_in, std=s.d_in ** -0.5), rnd(s.d_out, s.R, std=r ** -0.5)
    W = rnd(s.d_out, s.d_in, std=s.d_in ** -0.5)
    ro = molora_ops.uniform_rank_offsets(s.E, r, dev)
    scales = torch.full((s.E,), 2.0, device=dev)
    w, ids = molora_ops.softmax_topk(rnd(s.T, s.E), s.k, True)

    calls = {BASE: lambda: F.linear(x, W)}
    for algo in plan.ALGOS:
        def call(algo=algo):
            return molora_ops.moe_lora_linear(x, A, B, ro, w, ids, scales, base=base, algo=algo,
                                              max_rank=r)
        try:
            call()
        except Exception as exc:  # fused needs Triton: the others run regardless
            print(f"ncu_layer: {algo} does not run here: {exc}".splitlines()[0])
            continue
        calls[algo] = call
    for fn in calls.values():  # warm-up: Triton compiles, cuBLAS handles, allocator pools
        for _ in range(3):
            fn()
    order = []
    if cuda:
        torch.cuda.synchronize()
    for name, fn in calls.items():
        if cuda:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                torch.cuda.profiler.start()
                fn()
                torch.cuda.profiler.stop()
            stream.synchronize()
        else:
            fn()
        order.append(name)
    with open(order_path, "w") as f:
        f.write(" ".join(order) + "\n")
    print("ncu_layer: profiled " + " ".join(order))


def _number(text: str) -> float:
    return float(text.replace(",", "").strip() or "nan")


def read_kernels(csv_path: str) -> List[dict]:
    """ncu's --csv rows (one per kernel and metric) as kernels: id, stream, name, metrics."""
    with open(csv_path) as f:
        lines = [ln for ln in f if ln.startswith('"')]  # drop ==PROF== and the program's lines
    kernels: Dict[str, dict] = {}
    for row in csv.DictReader(lines):
        k = kernels.setdefault(row["ID"], {"id": int(row["ID"]), "stream": row["Stream"],
                                           "name": row["Kernel Name"], "metrics": {}})
        unit = row.get("Metric Unit", "")
        value = _number(row["Metric Value"])
        scale = {"kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "usecond": 1e3, "msecond": 1e6}.get(
            unit.lower(), 1.0)  # --print-units base gives byte / nsecond; anything else converted
        k["metrics"][row["Metric Name"]] = value * scale
    return sorted(kernels.values(), key=lambda k: k["id"])


def report(csv_path: str, order_path: str, json_path: str = "") -> dict:
    from molora_ops import plan

    s = _shape()
    with open(order_path) as f:
        order = f.read().split()
    kernels = read_kernels(csv_path)
    streams: List[str] = []
    for k in kernels:
        if k["stream"] not in streams:
            streams.append(k["stream"])
    if len(streams) != len(order):
        raise SystemExit(f"ncu_layer: {len(streams)} streams in {csv_path}, {len(order)} windows "
                         f"in {order_path} ({' '.join(order)})")
    minimum = plan.minimum_bytes(s)
    out = {"shape": s.__dict__, "minimum_fwd_bytes": minimum, "rows": {}}
    for name, stream in zip(order, streams):
        ks = [k for k in kernels if k["stream"] == stream]
        read = sum(k["metrics"].get(METRICS[0], 0.0) for k in ks)
        write = sum(k["metrics"].get(METRICS[1], 0.0) for k in ks)
        ns = sum(k["metrics"].get(METRICS[2], 0.0) for k in ks)
        launches = plan.base_launches(s) if name == BASE else plan.launches(name, s)
        planned = sum(l.bytes for l in launches)
        out["rows"][name] = {"kernels": [k["name"][:80] for k in ks], "dram_read": read,
                             "dram_write": write, "kernel_us": ns / 1e3, "planned_bytes": planned,
                             "x_planned": (read + write) / planned,
                             "x_minimum": (read + write) / minimum}
    base_us = out["rows"].get(BASE, {}).get("kernel_us")
    print(f"ncu_layer: DRAM bytes of one forward, T={s.T} {s.d_in}->{s.d_out} E={s.E} k={s.k} "
          f"R={s.R} bf16 (minimum {minimum / MIB:.1f} MiB: read x + base, write y, banks)")
    print(f"  {'':12s} {'launches':>8s} {'read MiB':>9s} {'write MiB':>9s} {'x plan':>7s} "
          f"{'x min':>6s} {'kernel us':>9s} {'x base':>7s}")
    for name, r in out["rows"].items():
        xb = "-"
        if base_us and name != BASE:
            r["x_base_kernels"] = (r["kernel_us"] + base_us) / base_us
            xb = f"{r['x_base_kernels']:.3f}"
        print(f"  {name:12s} {len(r['kernels']):8d} {r['dram_read'] / MIB:9.1f} "
              f"{r['dram_write'] / MIB:9.1f} {r['x_planned']:7.2f} {r['x_minimum']:6.2f} "
              f"{r['kernel_us']:9.1f} {xb:>7s}")
    print("  (x base: the base linear's kernels plus the formulation's, over the base linear's; "
          "with a base given the formulation adds the delta to it)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="the program ncu profiles (CUDA)")
    p.add_argument("--report", metavar="CSV", help="ncu's --csv log of a --run")
    p.add_argument("--order", required=True, help="file of the profiled windows' order")
    p.add_argument("--json", default="", help="--report: also write the numbers here")
    a = p.parse_args(argv)
    if a.run == bool(a.report):
        p.error("give exactly one of --run and --report")
    if a.run:
        run(a.order)
    else:
        report(a.report, a.order, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
