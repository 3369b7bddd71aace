"""Router / dispatch / gather / combine: the CUDA C++ kernels against plain-PyTorch baselines.

    python -m bench.router_dispatch_gpu --out DIR            # GPU: T=16384, E in {8,60,64,256},
                                                             # k in {2,8}, d=4096, bf16
    python -m bench.router_dispatch_gpu --quick --out DIR    # smoke run (tiny sizes; CPU works)
    python -m bench.router_dispatch_gpu --quick --emulate --out DIR   # CPU: the CUDA kernels in
                                                             # emulation (torch.ops.molora_emu)

Rows (one per bench x E x k x implementation):
  router   `molora` = the softmax_topk kernel (logits, k, renormalize=True);
           `torch` = softmax (fp32) + topk + renormalise.
  dispatch `molora` = the dispatch kernel (ids, E, 1);
           `torch_sort` = stable argsort of the flattened ids + bincount + cumsum + inverse
           permutation (the MegaBlocks-style sort dispatch, in PyTorch).
  gather   `molora` = the gather_rows kernel (x, order, pos, None);
           `index_select` = x.index_select(0, order // k).
  combine  `molora` = the combine_rows kernel (y_perm, order, pos, weights);
           `index_add` = fp32 zeros.index_add_(0, token of each row, w * y_perm) -> bf16.
`molora` on a GPU is the CUDA C++ kernel: torch.ops.molora.<op> on CUDA tensors (registered from
C++ as the op's CUDA kernel). On a CPU run it is
torch.ops.molora (the C++ CPU kernels), or with --emulate the CUDA kernels' CPU emulation.

Correctness of every `molora` row (its `ok`): the router's ids must equal our stable reference's
(molora_ops.reference: ties go to the lower id, the kernels' contract), and match torch.topk's up
to the order of tied logits: CUDA topk promises no order among ties, and with bf16 logits 0.4-34%
of the rows have ties in their top k, so its ids are compared as sets inside each group of equal
values, never position by position (the number of such rows is the row's `tie_rows`).
Output poisoning (MOLORA_POISON_OUTPUTS=1, a test aid that NaN-fills outputs before each kernel)
must be off for timings: the run records it in meta.poison_outputs and warns when it is on.

Timing: bench/timing.py (CUDA events around every call after warm-up, input sets rotated so their
bytes exceed 2x L2; torch.utils.benchmark on CPU); the median is reported. Achieved GB/s comes
from the benchmark's one byte model of compulsory traffic (bench/models.py, as the main bench and
molora_ops.plan count it: every input read once, a tensor read through the dispatch layout once
per routed pair, every output written once), the same for every implementation of a bench, so
GB/s compares like with like and against the measured copy ceiling. Writes DIR/router_dispatch.json (and with
--plot DIR/router_dispatch.png), prints a one-line `summary:` and a short table last.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import models, report, timing

BENCHES = ("router", "dispatch", "gather", "combine")


# --- bytes: the benchmark's one byte model (bench/models.py), forward costs -----------------------


def _fwd_bytes(op: str, T: int, E: int, k: int, d: int = 0, elem_bytes: int = 2,
               weighted: bool = True) -> int:
    return models.cost(op, models.Dims(T, d, d, E, k, 0, elem=elem_bytes, weighted=weighted),
                       "fwd").bytes


def router_bytes(T: int, E: int, k: int, logit_bytes: int = 2) -> int:
    """softmax_topk: logits [T, E] read; weights [T, k] fp32 + ids [T, k] int32 written."""
    return _fwd_bytes("softmax_topk", T, E, k, elem_bytes=logit_bytes)


def dispatch_bytes(T: int, k: int, E: int) -> int:
    """dispatch: ids [T, k] read; order [P] + pos [T, k] + expert_offsets [E+1] written."""
    return _fwd_bytes("dispatch", T, E, k)


def gather_bytes(T: int, k: int, d: int, elem_bytes: int = 2, weighted: bool = False) -> int:
    """gather_rows: P = T*k rows of x read through order, order read, x_perm [P, d] written
    (+ weights when weighted; the bench gathers unweighted)."""
    return _fwd_bytes("gather_rows", T, 0, k, d, elem_bytes, weighted)


def combine_bytes(T: int, k: int, d: int, elem_bytes: int = 2, weighted: bool = True) -> int:
    """combine_rows: y_perm [P, d] + pos [T, k] (+ weights [T, k] fp32) read, y [T, d] written."""
    return _fwd_bytes("combine_rows", T, 0, k, d, elem_bytes, weighted)


def gb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


# --- arguments ---------------------------------------------------------------------------------


def _ints(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _benches(text: str) -> List[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in BENCHES]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown bench {bad or text!r}; choose from {BENCHES}")
    return vals


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.router_dispatch_gpu",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--tokens", "-T", type=int, default=None, help="T (default 16384; quick 256)")
    ap.add_argument("--experts", type=_ints, default=None, help="E list (default 8,60,64,256)")
    ap.add_argument("--topk", type=_ints, default=None, help="k list (default 2,8)")
    ap.add_argument("--hidden", type=int, default=None, help="d of gather/combine (default 4096)")
    ap.add_argument("--benches", type=_benches, default=list(BENCHES),
                    help=f"subset of {','.join(BENCHES)}")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per row (default 0.2 GPU, 0.02 quick)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and budget (smoke run)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the copy-bandwidth ceiling")
    ap.add_argument("--emulate", action="store_true",
                    help="CPU: `molora` = the CUDA kernels' CPU emulation (torch.ops.molora_emu)")
    ap.add_argument("--plot", action="store_true", help="also write DIR/router_dispatch.png")
    args = ap.parse_args(argv)
    q = args.quick
    args.tokens = args.tokens or (256 if q else 16384)
    args.experts = args.experts or ([8, 60] if q else [8, 60, 64, 256])
    args.topk = args.topk or ([2] if q else [2, 8])
    args.hidden = args.hidden or (64 if q else 4096)
    args.budget = args.budget if args.budget is not None else (0.02 if q else 0.2)
    if args.tokens < 1 or args.hidden < 1 or args.budget <= 0:
        ap.error("--tokens, --hidden and --budget must be positive")
    if args.emulate:
        if args.device not in ("auto", "cpu"):
            ap.error("--emulate runs on the CPU (--device cpu)")
        args.device = "cpu"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# --- implementations ---------------------------------------------------------------------------


def _ours(name: str, device: torch.device, emulate: bool = False) -> Optional[Callable]:
    """Our kernel of op `name` (None when this build has none): on a GPU torch.ops.molora.<name>
    when its CUDA kernel is the CUDA C++ one; on CPU torch.ops.molora, or (emulate)
    torch.ops.molora_emu."""
    import molora_ops
    if device.type == "cuda":
        return getattr(torch.ops.molora, name) if molora_ops.backend.has_cuda_kernel(name) else None
    if emulate:
        from molora_ops._emu import has_emu_kernel, load_emu
        load_emu()
        return getattr(torch.ops.molora_emu, name) if has_emu_kernel(name) else None
    if not molora_ops.has_extension():
        return None
    return getattr(torch.ops.molora, name)


def tie_mismatch(ids: torch.Tensor, ref_ids: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Bool [T]: rows where top-k ids [T, k] (descending key) differ from ref_ids by more than the
    order of tied keys: a row matches when the ids are distinct and the key values at them equal,
    slot by slot, the key values at ref_ids (ids compared as sets inside each group of equal
    values). Runs on the tensors' device."""
    ids, ref_ids = ids.long(), ref_ids.long().to(ids.device)
    if ids.numel() == 0:
        return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    kf = key.to(ids.device).double()
    E = kf.shape[-1]
    in_range = ((ids >= 0) & (ids < E)).all(-1)
    values_equal = (kf.gather(1, ids.clamp(0, E - 1)) == kf.gather(1, ref_ids.clamp(0, E - 1))).all(-1)
    s = ids.sort(-1).values
    distinct = ~(s[:, 1:] == s[:, :-1]).any(-1)
    return ~((ids == ref_ids).all(-1) | (in_range & values_equal & distinct))


def check_router(w: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, k: int):
    """(ok, note, tie_rows) of softmax_topk(logits, k, True)'s (w, ids): ids equal to our stable
    reference's (ties -> lower id) and to torch.topk's up to tie order; weights close to the
    reference's."""
    from molora_ops import reference as ref
    w_ref, ids_ref = ref.softmax_topk(logits, k, True)
    _, ids_torch = torch_router(logits, k)
    tie_rows = int((ids_torch != ids_ref).any(-1).sum())  # where topk's order is unspecified
    n_ref = int((ids.long() != ids_ref.long()).any(-1).sum())
    n_torch = int(tie_mismatch(ids, ids_torch, logits).sum())
    w_ok = bool(torch.allclose(w.float(), w_ref.float(), rtol=1e-5, atol=1e-6))
    ok = n_ref == 0 and n_torch == 0 and w_ok
    note = "" if ok else (f"{n_ref} rows differ from the stable reference, {n_torch} from "
                          f"torch.topk beyond ties; weights {'ok' if w_ok else 'differ'}")
    return ok, note, tie_rows


def torch_router(logits: torch.Tensor, k: int):
    p = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids.to(torch.int32)


def torch_sort_dispatch(ids: torch.Tensor, E: int):
    """order [P], pos [T, k], expert_offsets [E+1] (int32) by a stable sort (no -1 ids here)."""
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.long, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=ids.device)
    return order.to(torch.int32), pos.view(ids.shape).to(torch.int32), offsets.to(torch.int32)


def torch_combine(y_perm: torch.Tensor, token_of_row: torch.Tensor, w_perm: torch.Tensor, T: int):
    y = torch.zeros(T, y_perm.shape[1], dtype=torch.float32, device=y_perm.device)
    y.index_add_(0, token_of_row, y_perm.float() * w_perm[:, None])
    return y.to(y_perm.dtype)


# --- one run -----------------------------------------------------------------------------------


def _n_sets(set_bytes: int, device: torch.device, cap: int) -> int:
    l2 = timing.l2_bytes(device)
    if device.type != "cuda" or not l2:
        return 1
    return max(1, min(cap, math.ceil(2 * l2 / max(set_bytes, 1))))


def _routing(T: int, E: int, k: int, device, dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where used: no host copy
    logits = torch.randn(T, E, generator=g, device=device).to(dtype)
    w, ids = torch_router(logits, k)
    return logits, w, ids


def _row(bench, impl, T, E, k, d, nbytes, stats, ok, note="", tie_rows=None):
    return {"tie_rows": tie_rows, "bench": bench, "impl": impl, "T": T, "E": E, "k": k, "d": d, "bytes": nbytes,
            "median_s": stats.median if stats else None, "p20_s": stats.p20 if stats else None,
            "p80_s": stats.p80 if stats else None, "n": stats.n if stats else 0,
            "gb_per_s": gb_per_s(nbytes, stats.median) if stats else None, "ok": ok,
            "note": note}


def _time(fns, device, budget):
    return timing.time_calls(fns, device, timing.Budget(budget, 5, 2000))


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    eb = torch.finfo(dtype).bits // 8
    T, d = args.tokens, args.hidden
    rows: List[dict] = []
    skipped: List[dict] = []

    def add(bench, impl, E, k, nbytes, fns, ok, note="", tie_rows=None):
        stats = _time(fns, device, args.budget)
        rows.append(_row(bench, impl, T, E, k, d if bench in ("gather", "combine") else None,
                         nbytes, stats, ok, note, tie_rows))
        print(f"  {bench:8s} E={E:<4d} k={k} {impl:12s} {stats.median * 1e6:9.1f} us",
              file=sys.stderr, flush=True)

    for E in args.experts:
        for k in args.topk:
            if k > E:
                skipped.append({"E": E, "k": k, "reason": "k > E"})
                continue
            if "router" in args.benches:
                n = _n_sets(router_bytes(T, E, k, eb), device, 256)
                sets = [_routing(T, E, k, device, dtype, s)[0] for s in range(n)]
                ours = _ours("softmax_topk", device, args.emulate)
                if ours is None:
                    skipped.append({"bench": "router", "impl": "molora", "E": E, "k": k,
                                    "reason": "softmax_topk kernel not built"})
                else:
                    w, ids = ours(sets[0], k, True)
                    ok, note, ties = check_router(w, ids, sets[0], k)
                    add("router", "molora", E, k, router_bytes(T, E, k, eb),
                        [lambda x=x: ours(x, k, True) for x in sets], ok, note, ties)
                add("router", "torch", E, k, router_bytes(T, E, k, eb),
                    [lambda x=x: torch_router(x, k) for x in sets], True)
            if not set(args.benches) & {"dispatch", "gather", "combine"}:
                continue
            n = _n_sets(dispatch_bytes(T, k, E), device, 256)
            id_sets = [_routing(T, E, k, device, dtype, 100 + s)[2] for s in range(n)]
            ids = id_sets[0]
            base_meta = torch_sort_dispatch(ids, E)
            ours_dispatch = _ours("dispatch", device, args.emulate)
            meta = base_meta
            if "dispatch" in args.benches:
                if ours_dispatch is None:
                    skipped.append({"bench": "dispatch", "impl": "molora", "E": E, "k": k,
                                    "reason": "dispatch kernel not built"})
                else:
                    got = ours_dispatch(ids, E, 1)
                    ok = all(bool(torch.equal(a, b)) for a, b in zip(got, base_meta))
                    add("dispatch", "molora", E, k, dispatch_bytes(T, k, E),
                        [lambda i=i: ours_dispatch(i, E, 1) for i in id_sets], ok)
                add("dispatch", "torch_sort", E, k, dispatch_bytes(T, k, E),
                    [lambda i=i: torch_sort_dispatch(i, E) for i in id_sets], True)
            order, pos, _ = meta
            token_of_row = (order.long() // k)
            if "gather" in args.benches:
                nb = gather_bytes(T, k, d, eb)
                n = _n_sets(nb, device, 16)
                xs = [torch.randn(T, d, device=device, dtype=dtype) for _ in range(n)]
                want = xs[0].index_select(0, token_of_row)
                ours = _ours("gather_rows", device, args.emulate)
                if ours is None:
                    skipped.append({"bench": "gather", "impl": "molora", "E": E, "k": k,
                                    "reason": "gather_rows kernel not built"})
                else:
                    ok = bool(torch.equal(ours(xs[0], order, pos, None), want))
                    add("gather", "molora", E, k, nb,
                        [lambda x=x: ours(x, order, pos, None) for x in xs], ok)
                add("gather", "index_select", E, k, nb,
                    [lambda x=x: x.index_select(0, token_of_row) for x in xs], True)
                del xs, want
            if "combine" in args.benches:
                nb = combine_bytes(T, k, d, eb, True)
                n = _n_sets(nb, device, 16)
                ys = [torch.randn(T * k, d, device=device, dtype=dtype) for _ in range(n)]
                weights = _routing(T, E, k, device, dtype, 7)[1]
                w_perm = weights.reshape(-1)[order.long()]
                want = torch_combine(ys[0], token_of_row, w_perm, T)
                ours = _ours("combine_rows", device, args.emulate)
                if ours is None:
                    skipped.append({"bench": "combine", "impl": "molora", "E": E, "k": k,
                                    "reason": "combine_rows kernel not built"})
                else:
                    got = ours(ys[0], order, pos, weights)
                    # both accumulate in fp32: they differ by the summation order and one rounding
                    ok = bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))
                    add("combine", "molora", E, k, nb,
                        [lambda y=y: ours(y, order, pos, weights) for y in ys], ok)
                add("combine", "index_add", E, k, nb,
                    [lambda y=y: torch_combine(y, token_of_row, w_perm, T) for y in ys], True)
                del ys
    ceiling = None
    if not args.no_ceiling:
        c = timing.measure_ceilings(device, dtype, quick=args.quick or device.type != "cuda")
        ceiling = c.copy_gb_per_s
    for r in rows:
        r["pct_copy"] = (100 * r["gb_per_s"] / ceiling) if ceiling and r["gb_per_s"] else None
    _speedups(rows)
    meta = report.metadata(device, timing.device_name(device), dtype, "router_dispatch_gpu",
                           list(sys.argv))
    meta["poison_outputs"] = poison_outputs()
    meta["molora_impl"] = ("torch.ops.molora_emu (CPU emulation)" if args.emulate else
                           "CUDA C++ kernels" if device.type == "cuda" else "torch.ops.molora (CPU)")
    return {"schema": "molora_ops.bench.router_dispatch/1", "meta": meta,
            "copy_gb_per_s": ceiling, "rows": rows, "skipped": skipped,
            "failures": [r for r in rows if not r["ok"]]}


def _speedups(rows: List[dict]) -> None:
    """speedup of each row over the torch baseline of its (bench, E, k) (>1: faster)."""
    base: Dict[tuple, float] = {}
    for r in rows:
        if r["impl"] != "molora" and r["median_s"]:
            base[(r["bench"], r["E"], r["k"])] = r["median_s"]
    for r in rows:
        b = base.get((r["bench"], r["E"], r["k"]))
        r["speedup_vs_torch"] = b / r["median_s"] if b and r["median_s"] else None


def table(results: dict) -> str:
    lines = [f"{'bench':8s} {'E':>4s} {'k':>2s} {'impl':12s} {'median us':>10s} {'GB/s':>8s} "
             f"{'%copy':>6s} {'x torch':>8s} {'ok':>3s}"]
    for r in results["rows"]:
        pct = f"{r['pct_copy']:.0f}" if r.get("pct_copy") else "-"
        sp = f"{r['speedup_vs_torch']:.2f}" if r.get("speedup_vs_torch") else "-"
        lines.append(f"{r['bench']:8s} {r['E']:4d} {r['k']:2d} {r['impl']:12s} "
                     f"{r['median_s'] * 1e6:10.1f} {r['gb_per_s']:8.1f} {pct:>6s} {sp:>8s} "
                     f"{'yes' if r['ok'] else 'NO':>3s}")
    for s in results["skipped"]:
        lines.append(f"skipped: {s}")
    cp = results.get("copy_gb_per_s")
    lines.append(f"device: {results['meta']['device']}; T={results['rows'][0]['T'] if results['rows'] else '-'}"
                 f"; copy ceiling {cp:.0f} GB/s" if cp else f"device: {results['meta']['device']}")
    return "\n".join(lines)


def poison_outputs() -> bool:
    """Whether MOLORA_POISON_OUTPUTS asks the kernels to NaN-fill their outputs first (tests only:
    it adds a fill per output to every timed call)."""
    import os
    v = os.environ.get("MOLORA_POISON_OUTPUTS", "").strip()
    return bool(v) and v != "0"


def summary_line(results: dict) -> str:
    """One line: rows, failures, skips, tie rows, and the molora/torch speed-up range per bench."""
    rows = results["rows"]
    ours = [r for r in rows if r["impl"] == "molora"]
    parts = [f"{len(rows)} rows ({len(ours)} molora), {len(results['failures'])} failures, "
             f"{len(results['skipped'])} skipped"]
    ties = sum(r.get("tie_rows") or 0 for r in ours)
    if any(r.get("tie_rows") is not None for r in ours):
        parts.append(f"{ties} router rows with top-k ties (compared tie-aware)")
    for b in BENCHES:
        sp = [r["speedup_vs_torch"] for r in ours if r["bench"] == b and r.get("speedup_vs_torch")]
        pc = [r["pct_copy"] for r in ours if r["bench"] == b and r.get("pct_copy")]
        if sp:
            parts.append(f"{b} x{min(sp):.2f}-{max(sp):.2f}" + (f" ({max(pc):.0f}% copy)" if pc else ""))
    if results["meta"].get("poison_outputs"):
        parts.append("WARNING: outputs poisoned (MOLORA_POISON_OUTPUTS=1), timings inflated")
    return "summary: " + "; ".join(parts)


def plot(results: dict, path: str) -> str:
    """GB/s of every row, one panel per bench (x: E/k, bars: implementations), with the measured
    copy ceiling as a line."""
    plt = report._plt()
    benches = [b for b in BENCHES if any(r["bench"] == b for r in results["rows"])] or ["router"]
    fig, axes = plt.subplots(1, len(benches), figsize=(4.2 * len(benches), 3.4), squeeze=False)
    cp = results.get("copy_gb_per_s")
    for ax, b in zip(axes[0], benches):
        rows = [r for r in results["rows"] if r["bench"] == b and r.get("gb_per_s")]
        cases = list(dict.fromkeys((r["E"], r["k"]) for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            vals = {(r["E"], r["k"]): r["gb_per_s"] for r in rows if r["impl"] == impl}
            xs = [i + j * width for i, c in enumerate(cases) if c in vals]
            ax.bar(xs, [vals[c] for c in cases if c in vals], width=width, label=impl)
        if cp:
            ax.axhline(cp, color="k", lw=0.8, ls="--", label="copy ceiling")
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"E{e}/k{k}" for e, k in cases], fontsize=7, rotation=45)
        ax.set_title(b)
        ax.set_ylabel("GB/s (byte model)")
        ax.legend(fontsize=7)
    fig.suptitle(f"router/dispatch kernels: {results['meta']['device']}, {results['meta']['dtype']}, "
                 f"T={results['rows'][0]['T'] if results['rows'] else '-'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    import os
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if poison_outputs():
        print("router_dispatch_gpu: WARNING MOLORA_POISON_OUTPUTS is on: every kernel NaN-fills "
              "its outputs first, timings are inflated (set MOLORA_POISON_OUTPUTS=0)",
              file=sys.stderr)
    torch.manual_seed(0)
    results = run(args)
    path = os.path.join(args.out, "router_dispatch.json")
    report.write_json(results, path)
    text = table(results)
    with open(os.path.join(args.out, "router_dispatch_table.txt"), "w") as f:
        f.write(text + "\n")
    print(f"wrote {path}")
    if args.plot:
        try:
            print(f"wrote {plot(results, os.path.join(args.out, 'router_dispatch.png'))}")
        except Exception as exc:  # noqa: BLE001  (a plot is optional: matplotlib missing, say)
            print(f"router_dispatch_gpu: no plot ({type(exc).__name__}: {exc})", file=sys.stderr)
    print(summary_line(results))
    print(text)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
