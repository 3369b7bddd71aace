"""Outputs of a run: the stdout table, the JSON file (every number plus the run's metadata) and
the PNG plots (speed-up bars, roofline)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

SCHEMA = "molora_ops.bench/1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or (triton without a driver) broken on import
        return "not installed"


def metadata(device: torch.device, device_name: str, dtype: torch.dtype, preset: str,
             argv: List[str], malloc: Optional[str] = None) -> dict:
    import molora_ops
    status = _git("status", "--porcelain")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "preset": preset,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "molora_ops": molora_ops.__version__,
        "extension": molora_ops.has_extension(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "argv": argv,
        "malloc": malloc,  # "retain" / "default" (bench/timing.retain_freed_memory), None: not set
    }


def _finite(obj):
    """JSON without NaN / inf (strict parsers reject them): such floats become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_finite(results), f, indent=1, allow_nan=False)
        f.write("\n")


# --- table ------------------------------------------------------------------------------------


def flop_unit(device_type: str):
    """(label, GFLOP/s per unit): TFLOP/s on a GPU, GFLOP/s on CPU."""
    return ("TFLOP/s", 1e3) if device_type == "cuda" else ("GFLOP/s", 1.0)


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _pct(v) -> str:
    return ("-" if v is None else f"{v:.0f}%").rjust(5)


def _times(v, width: int) -> str:
    return ("-" if v is None else f"{v:.2f}x").rjust(width)


def table(results: dict) -> str:
    unit, per = flop_unit(results["meta"]["device_type"])
    c = results["ceilings"]
    lines = [
        f"molora_ops benchmark: {results['meta']['device']}, {results['meta']['dtype']}, "
        f"preset {results['meta']['preset']}, torch {results['meta']['torch']}",
        f"ceilings (measured): copy {c['copy_gb_per_s']:.1f} GB/s, matmul "
        f"{c['matmul_gflop_per_s'] / per:.2f} {unit} ({c['matmul_dtype']} {c['matmul_n']}^3)",
        "times: median [p20-p80] in us; %BW / %MM: of the measured copy bandwidth / matmul rate; "
        "speed-ups: time of loop (reference) / time; x base: time / time of the base linear; "
        "[algo]: the formulation moe_lora_linear's algo=\"auto\" ran",
    ]
    head = (f"  {'impl':18s} {'mode':8s} {'median':>10s} {'p20-p80':>19s} {'GB/s':>8s} {'%BW':>5s} "
            f"{unit:>8s} {'%MM':>5s} {'vs loop':>8s} {'vs ref':>7s} {'x base':>7s} {'rel err':>8s} "
            f"check")
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in results["rows"]:
        groups[(r["op"], r["label"])].append(r)
    for rows in groups.values():
        r0 = rows[0]
        lines += ["", f"== {r0['op']}: {r0['label']}  (active experts {r0['active_experts']}, "
                  f"{r0['input_sets']} input set{'s' if r0['input_sets'] > 1 else ''})", head]
        for r in rows:
            chk = r["check"]
            status = "ok" if chk.get("ok") else "FAIL " + (chk.get("error") or
                                                            f"worst {chk.get('worst')}")
            t = r.get("time")
            name = r["impl"] + (f" [{r['algo']}]" if r.get("algo") else "")
            if t is None:
                lines.append(f"  {name:18s} {r['mode']:8s} {'-':>10s} {'':19s} {status}")
                continue
            flops = None if r.get("gflop_per_s") is None else r["gflop_per_s"] / per
            spread = f"{t['p20'] * 1e6:.1f}-{t['p80'] * 1e6:.1f}"
            lines.append(
                f"  {name:18s} {r['mode']:8s} {t['median'] * 1e6:10.1f} {spread:>19s} "
                f"{r['gb_per_s']:8.2f} {_pct(r['pct_copy_bw'])} {_fmt(flops, '8.3f'):>8s} "
                f"{_pct(r['pct_matmul'])} {_times(r.get('speedup_vs_loop'), 8)} "
                f"{_times(r.get('speedup_vs_reference'), 7)} {_times(r.get('x_base'), 7)} "
                f"{chk.get('rel_err', 0.0):8.1e} {status}")
    if results.get("overhead"):  # the per-call overhead section (bench/overhead.py)
        from .overhead import table as overhead_table
        lines += ["", overhead_table(results["overhead"])]
    if results["skipped"]:
        lines += ["", "not run:"]
        seen = set()
        for s in results["skipped"]:
            key = (s["impl"], s["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"  {s['impl']}: {s['reason']}")
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def speedup_bars(results: dict) -> Tuple[List[dict], str]:
    """The bars of the speed-up plot: every timed row but its case's baseline, with ``speedup``
    over the per-expert loop for the cases that have one (the layers) and over the reference for
    the rest (the single ops, labelled "(vs ref)"); and the plot's name for the baselines."""
    rows = [r for r in results["rows"] if r.get("time")]
    with_loop = {(r["op"], r["label"]) for r in rows if r.get("speedup_vs_loop") is not None}

    def baseline(r):
        return "loop" if (r["op"], r["label"]) in with_loop else "reference"

    bars = [{**r, "speedup": r.get(f"speedup_vs_{baseline(r)}"),
             "label": f"{r['op']}: {r['label']}" + ("" if baseline(r) == "loop" else " (vs ref)")}
            for r in rows if r["impl"] != baseline(r)]
    bases = {baseline(r) for r in rows}
    name = ("the loop (layers) / the reference (single ops)" if len(bases) == 2
            else "the loop" if bases == {"loop"} else "the reference")
    return [b for b in bars if b["speedup"] is not None], name


def speedup_plot(results: dict, path: str) -> str:
    """Horizontal bars per case and mode (``speedup_bars``): speed-up of each implementation over
    the per-expert loop for the layer cases and over the reference for the single ops."""
    rows, base = speedup_bars(results)
    key = "speedup"
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rows)] or ["fwd"]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    height = max(2.5, 0.3 * len(labels) * max(1, len(impls)) / 2 + 1.5)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes) + 3, height), sharey=True,
                             squeeze=False)
    bar = 0.8 / max(1, len(impls))
    for ax, mode in zip(axes[0], modes):
        for j, impl in enumerate(impls):
            vals = {r["label"]: r[key] for r in rows if r["mode"] == mode and r["impl"] == impl}
            ys = [i + j * bar for i, lab in enumerate(labels) if lab in vals]
            ax.barh(ys, [vals[lab] for lab in labels if lab in vals], height=bar, label=impl)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(mode)
        ax.set_xlabel("speed-up (x)")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0][0].set_yticks([i + bar * (len(impls) - 1) / 2 for i in range(len(labels))])
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(impls), fontsize=8,
               bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(f"molora_ops speed-up over {base}: {results['meta']['device']}, "
                 f"{results['meta']['dtype']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def roofline_plot(results: dict, path: str) -> str:
    """Achieved FLOP/s against arithmetic intensity (model FLOPs / model bytes) of every row with
    FLOPs, under the measured bandwidth and matmul ceilings."""
    unit, per = flop_unit(results["meta"]["device_type"])
    c = results["ceilings"]
    bw, peak = c["copy_gb_per_s"], c["matmul_gflop_per_s"] / per  # GB/s, unit
    rows = [r for r in results["rows"] if r.get("time") and r.get("gflop_per_s")]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 6))
    ridge = peak * per / bw
    xs = [r["intensity"] for r in rows] or [ridge]
    lo, hi = min(xs + [ridge]) / 4, max(xs + [ridge]) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(peak, bw * x / per) for x in grid], "k-", lw=1.5,
            label=f"ceiling: {bw:.0f} GB/s copy, {peak:.3g} {unit} matmul")
    ax.axvline(ridge, color="k", ls=":", lw=0.8)
    ops = list(dict.fromkeys(r["op"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    # colours name ops, marker shapes name implementations (outlined in black in the legend)
    tab = plt.get_cmap("tab20")
    colors = [tab(i) for i in range(0, 20, 2) if i != 14] + [tab(i) for i in range(1, 20, 2)]
    markers = "osD^v<>Pph*"
    for r in rows:
        ax.scatter(r["intensity"], r["gflop_per_s"] / per, s=22, alpha=0.8,
                   color=colors[ops.index(r["op"]) % len(colors)],
                   marker=markers[impls.index(r["impl"]) % len(markers)])
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colors[i % len(colors)], marker="o", ls="", label=op)
               for i, op in enumerate(ops)]
    handles += [Line2D([], [], color="k", mfc="none", marker=markers[i % len(markers)], ls="",
                       label=impl) for i, impl in enumerate(impls)]
    first = ax.legend(loc="upper left", fontsize=8)
    ax.add_artist(first)
    ax.legend(handles=handles, loc="lower right", fontsize=7, ncol=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (model FLOP / model byte)")
    ax.set_ylabel(f"achieved {unit}")
    ax.set_title(f"roofline: {results['meta']['device']}, {results['meta']['dtype']} "
                 f"(ridge {ridge:.1f} FLOP/B)", fontsize=10)
    ax.grid(which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
