"""``python -m bench`` (or ``python bench/run.py``): the molora_ops benchmark suite on whatever
device is present, sized to it (the `full` grid on a GPU, the small `cpu` preset otherwise).

Measures the device's copy bandwidth and matmul rate, then for every case checks each
implementation against the reference and times it (forward, backward, forward+backward), then the
ops' per-call overhead at T=1 on CPU (bench/overhead.py); writes
table.txt, results.json, speedup.png and roofline.png to --out and prints where they went.
Exit status 1 when any implementation failed its check.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable as a package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch

from . import overhead, plan, report, timing
from .backends import describe
from .bench_layers import method_cases, method_specs
from .cases import SPECS
from .models import MODES
from .runner import Config, rates, run_case
from .shapes import PRESETS, auto_preset, preset_cases
from .timing import Budget, device_name, fastest_ceilings, l2_bytes, measure_ceilings

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
# Seconds of measurement per row (GPU: after a warm-up of a quarter of that), minimum samples.
# cpu: 40 interleaved rounds, so the layer rows (one 10-50 ms call per block) get 40 samples: with
# 10, two rows of the same computation (auto and grouped) differed by 23% in one run, with 20 by up
# to 12% (2-core CPU machine). NOTE: untuned beyond that.
BUDGETS = {"full": Budget(0.1, 10, 1000), "cpu": Budget(0.2, 40), "tiny": Budget(0.05, 5),
           "layer": Budget(0.1, 10, 1000)}
QUICK = Budget(0.005, 3, 50)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="case grid (auto: full on a GPU, cpu otherwise; tiny with --quick; "
                        "layer: the MoE-LoRA linear alone at the plan's shape)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: tiny shapes (unless --preset is given), short timing")
    p.add_argument("--ops", default=None,
                   help="comma-separated ops to run (default: all); 'layers' = the method layers")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default bench/out)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="data dtype (auto: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of measurement per row (default: per preset)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="GPU: time forward rows as CUDA-graph replays where capturable")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, but 1 with --quick, whose tiny ops "
                        "only lose to threading overhead, and 1 on a busy machine)")
    p.add_argument("--malloc", default="retain", choices=["retain", "default"],
                   help="CPU on glibc: 'retain' (default) keeps freed memory in the heap for "
                        "reuse, as jemalloc / tcmalloc do; 'default' leaves glibc's settings "
                        "(bench/timing.py: retain_freed_memory)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the per-call overhead section (bench/overhead.py, CPU, T=1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plan", action="store_true",
                   help="print only the planned traffic of the MoE-LoRA linear (bench/plan.py)")
    return p.parse_args(argv)


def busy_cores(before: str, after: str, cores: int) -> Optional[float]:
    """Cores' worth of CPU time spent between two readings of /proc/stat's first line ("cpu  user
    nice system idle iowait irq softirq steal ..."): everything but idle and iowait, the
    hypervisor's steal included. None where the readings cannot be read or no time passed."""
    try:
        a, b = ([int(v) for v in line.split()[1:9]] for line in (before, after))
    except ValueError:
        return None
    if len(a) < 5 or len(a) != len(b):
        return None
    total = sum(b) - sum(a)
    idle = (b[3] + b[4]) - (a[3] + a[4])
    return None if total <= 0 else cores * (total - idle) / total


def _busy_now(cores: int, seconds: float = 0.5) -> Optional[float]:
    """busy_cores over the next `seconds` (this process sleeps meanwhile, so it is other work);
    None without /proc/stat."""
    def first_line():
        with open("/proc/stat") as f:
            return f.readline()
    try:
        before = first_line()
        time.sleep(seconds)
        return busy_cores(before, first_line(), cores)
    except OSError:
        return None


def _default_threads(quick: bool, device: torch.device) -> Optional[int]:
    """None (torch's default) unless --quick or the machine is busy: with other processes on the
    cores, OpenMP's threads wait on each other and CPU times swing 10-100x. 1 thread then. Busy:
    other work used more than half the cores over half a second (/proc/stat), or, without it, the
    load average is above half the cores. NOTE: the load average is a minute's decaying mean: right
    after `scripts/setup.sh`'s build had finished (the README's first command) it read 1.8 on 2
    cores and the run went to 1 thread; a moment after a 60 s load of both cores stopped it read
    1.5 where /proc/stat showed 0.0 cores in use (2-core Xeon, 2026-12-05)."""
    if quick:
        return 1
    cores = os.cpu_count() or 1
    if device.type != "cpu" or cores == 1:
        return None
    busy = _busy_now(cores)
    if busy is not None:
        what = f"{busy:.1f} of {cores} cores in use by other work over 0.5 s"
    else:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        what = f"load average {busy:.1f} on {cores} cores"
    if busy > 0.5 * cores:
        print(f"note: the machine is busy ({what}): timing with 1 thread (pass --threads N to "
              "override); CPU timings will be noisy")
        return 1
    return None


class _Plain:
    """A stand-in for tqdm when it is not installed: one line per case."""

    def __init__(self, items, disable):
        self.items, self.disable = list(items), disable

    def __iter__(self):
        for i, item in enumerate(self.items):
            if not self.disable:
                print(f"[{i + 1}/{len(self.items)}] {item.op} {item.label}", flush=True)
            yield item

    def set_postfix_str(self, *args, **kwargs):
        pass

    def write(self, line):
        print(line, flush=True)


def _progress(cases, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Plain(cases, disable)
    return tqdm(cases, desc="bench", unit="case", disable=disable, dynamic_ncols=True)


def _select(args, preset: str):
    """(cases, specs, notes) of the run."""
    specs, notes = dict(SPECS), []
    layer_specs, layer_notes = method_specs()
    notes += layer_notes
    specs.update(layer_specs)
    cases = preset_cases(preset) + [c for c in method_cases(preset) if c.op in layer_specs]
    if args.ops:
        wanted = set()
        for name in args.ops.split(","):
            name = name.strip()
            if name == "layers":
                wanted.update(layer_specs)
            elif name in specs:
                wanted.add(name)
            else:
                raise SystemExit(f"--ops: unknown op {name!r}; known: "
                                 f"{', '.join(sorted(specs))}, layers")
        cases = [c for c in cases if c.op in wanted]
    return cases, specs, notes


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the suite; returns the exit status (1 when a correctness check failed). Leaves torch's
    thread count as it found it."""
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    try:
        return _run(args, sys.argv[1:] if argv is None else list(argv))
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, argv: List[str]) -> int:
    if args.plan:
        print(plan.table())
        return 0
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    malloc = (timing.retain_freed_memory() if device.type == "cpu" and args.malloc == "retain"
              else "default")
    threads = args.threads or _default_threads(args.quick, device)
    if threads:
        torch.set_num_threads(threads)
    preset = args.preset if args.preset != "auto" else ("tiny" if args.quick
                                                        else auto_preset(device))
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    if not modes or set(args.modes.split(",")) - set(MODES):
        raise SystemExit(f"--modes: expected a comma-separated subset of {','.join(MODES)}")
    budget = QUICK if args.quick else BUDGETS[preset]
    if args.budget:
        budget = Budget(args.budget, budget.min_samples, budget.max_reps)
    cases, specs, notes = _select(args, preset)
    os.makedirs(args.out, exist_ok=True)
    name = device_name(device)

    print(f"molora_ops bench: {name}, {str(dtype).replace('torch.', '')}, preset {preset}, "
          f"{len(cases)} cases, modes {','.join(modes)}"
          + (", freed memory retained (--malloc)" if malloc == "retain" else ""))
    for note in notes:
        print(f"note: {note}")
    start = time.perf_counter()
    ceilings = measure_ceilings(device, dtype, quick=args.quick)
    print(f"measured ceilings: copy {ceilings.copy_gb_per_s:.1f} GB/s, matmul "
          f"{ceilings.matmul_gflop_per_s:.1f} GFLOP/s ({ceilings.matmul_dtype})")
    cfg = Config(device, dtype, budget, ceilings, modes, args.cuda_graph, l2_bytes(device))

    rows, skipped = [], []
    bar = _progress(cases, args.no_progress)
    for case in bar:
        bar.set_postfix_str(f"{case.op} T={case.T}", refresh=False)
        case_rows, case_skipped = run_case(specs[case.op], case, cfg)
        rows += case_rows
        skipped += case_skipped
        for r in case_rows:
            if not r["check"].get("ok"):
                bar.write(f"FAIL {r['impl']} {r['mode']} {r['op']} {r['label']}: "
                          f"{r['check'].get('error') or r['check']}")
    # The ceilings again at the end, the faster of each kept (timing.fastest_ceilings): the rows'
    # percentages then do not hang on one second at the start.
    ceilings = fastest_ceilings(ceilings, measure_ceilings(device, dtype, quick=args.quick))
    for r in rows:
        rates(r, ceilings)
    failures = [{k: r[k] for k in ("op", "label", "impl", "mode", "check")}
                for r in rows if not r["check"].get("ok")]
    ov = None
    if not args.no_overhead:  # per-call overhead at T=1 on CPU, a few seconds (bench/overhead.py)
        print("per-call overhead (CPU, T=1)...", flush=True)
        try:
            ov = overhead.measure(**(overhead.QUICK if args.quick else overhead.SECTION))
        except Exception as exc:  # a missing op or overload: the rest of the run stands
            print(f"note: no per-call overhead section ({type(exc).__name__}: {exc})")

    results = {
        "schema": report.SCHEMA,
        "meta": report.metadata(device, name, dtype, preset, argv, malloc),
        "config": {"budget": dataclasses.asdict(budget),
                   "modes": list(modes), "cuda_graph": args.cuda_graph,
                   "l2_bytes": cfg.l2_bytes, "notes": notes},
        "ceilings": ceilings.asdict(),
        "backends": describe(device),
        "rows": rows,
        "skipped": skipped,
        "failures": failures,
        "overhead": ov,
        "elapsed_s": None,
    }
    text = report.table(results) + "\n\n" + plan.table()
    print("\n" + text)
    paths = {"table": os.path.join(args.out, "table.txt"),
             "json": os.path.join(args.out, "results.json")}
    if not args.no_plots:
        try:
            paths["speedup plot"] = report.speedup_plot(results,
                                                        os.path.join(args.out, "speedup.png"))
            paths["roofline plot"] = report.roofline_plot(results,
                                                          os.path.join(args.out, "roofline.png"))
        except ImportError as exc:  # matplotlib missing (pip install -e .[bench])
            print(f"note: no plots ({exc}); the table and JSON have every number")
    results["elapsed_s"] = time.perf_counter() - start
    with open(paths["table"], "w") as f:
        f.write(text + "\n")
    report.write_json(results, paths["json"])
    print()
    for what, path in paths.items():
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
        print(f"{what + ':':15s} {shown}")
    print(f"{len(rows)} rows in {results['elapsed_s']:.0f} s; "
          + (f"{len(failures)} FAILED correctness checks" if failures else "all checks passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
