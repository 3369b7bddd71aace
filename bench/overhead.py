"""``python -m bench.overhead [--json PATH]``: the per-call overhead of the molora ops at decode
size (T = 1 token), i.e. the time from the Python call to the C++ CPU kernel.

Each op is called four ways on the same CPU fp32 inputs:

* ``wrapper``:      ``molora_ops.<op>(...)``, the typed wrapper;
* ``op``:           ``torch.ops.molora.<op>.default(...)``, the dispatcher entry (for an op
                    with an autograd formula, its Python autograd kernel runs first);
* ``op_inference``: ``op`` under ``torch.inference_mode()`` (entered outside the timed loop);
* ``direct``:       ``torch.ops.molora.<op>.default.redispatch(DispatchKeySet(CPU), ...)``: the
                    CPU kernel with every dispatcher layer above it skipped (the baseline).

Per variant: a warm-up, then ``repeats`` blocks of ``calls`` back-to-back calls timed with
``time.perf_counter_ns`` (variants interleaved block by block, in a rotating order, so drift hits
all of them alike; garbage collection off; 1 torch thread). A block's time / ``calls`` is one
sample; rows report the median and p20 / p80 of the samples. ``overhead`` = median(variant) -
median(direct), in microseconds; the target is at most ``TARGET_US`` (5 us) for the entry
points a user calls, ``wrapper`` and ``op_inference``, judged on thread CPU time (below). The raw
``op`` call with autograd enabled runs torch.library's Python autograd kernel (the wrappers skip
it when no gradient can flow); it is reported, not judged.
The same blocks are also timed in thread CPU time (``time.thread_time_ns``: ``cpu_*`` fields),
which time spent descheduled by other processes on the cores does not inflate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # `python bench/overhead.py`: make `bench` importable as a package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

from .timing import interleaved

SCHEMA = "molora_ops.bench.overhead/1"
TARGET_US = 5.0
JUDGED = ("wrapper", "op_inference")  # the variants the target applies to
OPS = ("softmax_topk", "dispatch", "gather_rows", "sgmv_shrink", "rank_topk")
VARIANTS = ("wrapper", "op", "op_inference", "direct")
CALLS = {
    "wrapper": "molora_ops.{op}(...)",
    "op": "torch.ops.molora.{op}.default(...)",
    "op_inference": "torch.ops.molora.{op}.default(...) under torch.inference_mode()",
    "direct": "torch.ops.molora.{op}.default.redispatch("
              "torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), ...)",
}
# T = 1 token; E experts, top-k, LoRA rank r, hidden d, rank-wise R ranks with k kept
E, K, R_LORA, D, R_RANKS, K_RANKS = 8, 2, 16, 4096, 64, 8
SHAPES = {
    "softmax_topk": f"T=1 E={E} k={K}",
    "dispatch": f"T=1 E={E} k={K}",
    "gather_rows": f"T=1 k={K} d={D}",
    "sgmv_shrink": f"T=1 E={E} k={K} r={R_LORA} d_in={D}",
    "rank_topk": f"T=1 R={R_RANKS} k={K_RANKS}",
}
DEFAULTS = dict(repeats=20, calls=2000, warmup=500)  # the CLI
SECTION = dict(repeats=10, calls=300, warmup=100)  # the section of `python -m bench` (~3 s)
QUICK = dict(repeats=3, calls=50, warmup=10)  # `python -m bench --quick`


def problems(seed: int = 0) -> Dict[str, Tuple[tuple, dict, tuple]]:
    """Per op: (wrapper args, wrapper kwargs, op args) on CPU fp32 at T = 1. The routing inputs
    come from the ops themselves (softmax_topk -> dispatch), as in a decode step."""
    import molora_ops

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, E, generator=g)
    weights, ids = molora_ops.softmax_topk(logits, K, True)
    order, pos, expert_offsets = molora_ops.dispatch(ids, E, 1)
    x = torch.randn(1, D, generator=g)
    A = torch.randn(E * R_LORA, D, generator=g) * D ** -0.5
    rank_offsets = torch.arange(E + 1, dtype=torch.int32) * R_LORA
    h = torch.randn(1, R_RANKS, generator=g)
    shrink = (x, A, rank_offsets, order, pos, expert_offsets, weights, None)
    return {
        "softmax_topk": ((logits, K, True), {}, (logits, K, True)),
        "dispatch": ((ids, E, 1), {}, (ids, E, 1)),
        "gather_rows": ((x, order, pos, weights), {}, (x, order, pos, weights)),
        "sgmv_shrink": (shrink, {"max_rank": R_LORA}, shrink + (R_LORA,)),
        "rank_topk": ((h, K_RANKS, None, None, False), {}, (h, K_RANKS, None, None, False)),
    }


def _variants(op: str, wargs: tuple, wkwargs: dict, args: tuple
              ) -> Dict[str, Tuple[Callable, tuple, dict, bool]]:
    """variant -> (fn, args, kwargs, under inference_mode)."""
    import molora_ops

    overload = getattr(torch.ops.molora, op).default
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return {
        "wrapper": (getattr(molora_ops, op), wargs, wkwargs, False),
        "op": (overload, args, {}, False),
        "op_inference": (overload, args, {}, True),
        "direct": (overload.redispatch, (cpu,) + args, {}, False),
    }


def _same(a, b) -> bool:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def _block(fn: Callable, args: tuple, kwargs: dict, calls: int, inference: bool
           ) -> Tuple[float, float]:
    """(wall, thread CPU) nanoseconds per call of ``calls`` back-to-back calls."""
    with torch.inference_mode() if inference else contextlib.nullcontext():
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        for _ in range(calls):
            fn(*args, **kwargs)
        c1, t1 = time.thread_time_ns(), time.perf_counter_ns()
    return (t1 - t0) / calls, (c1 - c0) / calls


def _stats_us(samples_ns: List[float]) -> dict:
    from .timing import Stats

    s = Stats.of([v * 1e-3 for v in samples_ns])
    return {"median_us": s.median, "p20_us": s.p20, "p80_us": s.p80, "min_us": s.min,
            "max_us": s.max, "n": s.n}


def measure(repeats: int = DEFAULTS["repeats"], calls: int = DEFAULTS["calls"],
            warmup: int = DEFAULTS["warmup"], ops: Tuple[str, ...] = OPS, threads: int = 1,
            progress: Optional[Callable[[str], None]] = None) -> dict:
    """Times every op x variant (module docstring); returns the result dict (``rows``: one per
    op x variant; ``summary``: per op, the overhead of each variant over ``direct``). Leaves
    torch's thread count and the garbage collector as it found them."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    rows, summary = [], []
    try:
        probs = problems()
        for op in ops:
            if progress:
                progress(op)
            variants = _variants(op, *probs[op])
            outs = {}
            for name, (fn, args, kwargs, inference) in variants.items():
                with torch.inference_mode() if inference else contextlib.nullcontext():
                    outs[name] = fn(*args, **kwargs)
                if warmup:
                    _block(fn, args, kwargs, warmup, inference)
            names = list(variants)
            timed = interleaved([partial(_block, *variants[name][:3], calls, variants[name][3])
                                 for name in names], repeats)
            samples = {name: [wall for wall, _ in timed[i]] for i, name in enumerate(names)}
            cpu = {name: [thread for _, thread in timed[i]] for i, name in enumerate(names)}
            stats = {name: _stats_us(samples[name]) for name in names}
            cpu_stats = {name: _stats_us(cpu[name]) for name in names}
            base, cpu_base = stats["direct"]["median_us"], cpu_stats["direct"]["median_us"]
            overhead = {name: stats[name]["median_us"] - base for name in names if name != "direct"}
            cpu_overhead = {name: cpu_stats[name]["median_us"] - cpu_base
                            for name in names if name != "direct"}
            for name in names:
                rows.append({"op": op, "shape": SHAPES[op], "variant": name,
                             "call": CALLS[name].format(op=op), "time_us": stats[name],
                             "overhead_us": overhead.get(name), "cpu_time_us": cpu_stats[name],
                             "cpu_overhead_us": cpu_overhead.get(name),
                             "same_outputs_as_direct": _same(outs[name], outs["direct"])})
            judged = [n for n in JUDGED if n in cpu_overhead]
            worst = max(cpu_overhead[n] for n in judged)
            summary.append({"op": op, "shape": SHAPES[op], "direct_us": base,
                            "overhead_us": overhead, "max_overhead_us": worst,
                            "meets_target": worst <= TARGET_US, "cpu_direct_us": cpu_base,
                            "cpu_overhead_us": cpu_overhead,
                            "cpu_max_overhead_us": max(cpu_overhead.values())})
    finally:
        torch.set_num_threads(threads_before)
    return {
        "schema": SCHEMA,
        "config": {"device": "cpu", "dtype": "float32", "tokens": 1, "repeats": repeats,
                   "calls": calls, "warmup": warmup, "threads": threads, "target_us": TARGET_US,
                   "timer": "time.perf_counter_ns (cpu_*: time.thread_time_ns)",
                   "variants": {v: CALLS[v] for v in VARIANTS}},
        "rows": rows,
        "summary": summary,
        "meets_target": all(s["meets_target"] for s in summary),
        "elapsed_s": time.perf_counter() - start,
    }


def table(results: dict) -> str:
    """The section: one line per op, median us per call of each variant, then the overheads."""
    c = results["config"]
    lines = [
        f"per-call overhead (CPU, {c['dtype']}, T={c['tokens']}, {c['threads']} thread): median us "
        f"per call over {c['repeats']} x {c['calls']} calls; overhead = variant - direct "
        f"(target <= {c['target_us']:g} us)",
        "  wrapper = molora_ops.<op>, op = torch.ops.molora.<op>.default, +inf = op under "
        "inference_mode, direct = .redispatch(DispatchKeySet(CPU)); cpu: the same overheads in "
        "thread CPU time (time.thread_time_ns: robust to other processes on the cores)",
        f"  {'op':13s} {'shape':27s} {'wrapper':>7s} {'op':>7s} {'op+inf':>7s} {'direct':>7s}"
        f" | overhead: {'wrapper':>7s} {'op':>7s} {'op+inf':>7s} | cpu: {'wrapper':>7s} "
        f"{'op':>7s} {'op+inf':>7s}  target",
    ]
    med = {(r["op"], r["variant"]): r["time_us"]["median_us"] for r in results["rows"]}
    for s in results["summary"]:
        op, o = s["op"], s["overhead_us"]
        times = " ".join(f"{med[(op, v)]:7.2f}" for v in VARIANTS)
        ovh = " ".join(f"{o[v]:7.2f}" for v in VARIANTS[:-1])
        cpu = " ".join(f"{s['cpu_overhead_us'][v]:7.2f}" for v in VARIANTS[:-1])
        lines.append(f"  {op:13s} {s['shape']:27s} {times} | {'':9s} {ovh} | {'':4s} {cpu}  "
                     f"{'ok' if s['meets_target'] else 'OVER'}")
    mismatched = [f"{r['op']}/{r['variant']}" for r in results["rows"]
                  if not r["same_outputs_as_direct"]]
    if mismatched:
        lines.append(f"  outputs differ from the direct call: {', '.join(mismatched)}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the results (and run metadata) here")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                   help="timed blocks per variant (samples)")
    p.add_argument("--calls", type=int, default=DEFAULTS["calls"], help="calls per block")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"],
                   help="untimed calls per variant first")
    p.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing")
    a = p.parse_args(argv)
    a.ops = tuple(o.strip() for o in a.ops.split(",") if o.strip())
    if not a.ops or set(a.ops) - set(OPS):
        p.error(f"--ops: expected a comma-separated subset of {','.join(OPS)}")
    if min(a.repeats, a.calls) < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--repeats, --calls and --threads must be >= 1, --warmup >= 0")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from . import report
    from .timing import device_name

    results = measure(args.repeats, args.calls, args.warmup, args.ops, args.threads)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # the metadata records the timing's thread count
    try:
        results["meta"] = report.metadata(torch.device("cpu"), device_name(torch.device("cpu")),
                                          torch.float32, "overhead",
                                          sys.argv[1:] if argv is None else list(argv))
    finally:
        torch.set_num_threads(threads_before)
    print(f"molora_ops per-call overhead: {results['meta']['device']}, torch "
          f"{results['meta']['torch']}, molora_ops from "
          f"{os.path.dirname(__import__('molora_ops').__file__)}")
    print(table(results))
    print(f"{'all' if results['meets_target'] else 'NOT all'} ops within {TARGET_US:g} us of the "
          f"direct kernel call ({results['elapsed_s']:.0f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        report.write_json(results, args.json)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
