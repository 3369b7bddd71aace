"""Runs one case: input sets, the correctness check of every implementation against the
reference (before any timing), then the timing of each implementation in each mode.

Modes: ``fwd`` (forward under no_grad), ``bwd`` (autograd.grad of a retained forward graph: the
backward alone), ``fwd+bwd`` (a training step of the op). Ops with nothing to differentiate run
``fwd`` only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from molora_ops import reference

from .cases import Impl, OpSpec, Problem
from .models import MODES, cost
from .shapes import Case
from .timing import Budget, Ceilings, cuda_graph, time_calls, time_cpu_interleaved

# Largest error, relative to the largest magnitude of the reference tensor, an implementation may
# have (index outputs must match exactly). fp32 leaves room for accumulation order over d = 16k.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    budget: Budget
    ceilings: Ceilings
    modes: Tuple[str, ...] = MODES
    cuda_graph: bool = False
    l2_bytes: Optional[int] = None
    max_sets: int = 32


# --- calling an implementation --------------------------------------------------------------


def _tensors(out) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _float(out) -> List[torch.Tensor]:
    return [t for t in _tensors(out) if t.is_floating_point()]


def _with_leaves(inputs: Dict[str, Any], names: Sequence[str]):
    """(inputs with fresh requires_grad copies of `names`, [those leaves])."""
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
    return {**inputs, **leaves}, list(leaves.values())


def _grad_outputs(outs: Sequence[torch.Tensor], seed: int) -> List[torch.Tensor]:
    """Fixed random output gradients (the same for every implementation of a case and set)."""
    gens = [torch.Generator(device=o.device).manual_seed(seed * 131 + j) for j, o in
            enumerate(outs)]
    return [torch.randn(o.shape, generator=g, device=o.device).to(o.dtype)
            for g, o in zip(gens, outs)]


def _grad(outs, leaves, seed, retain=False):
    grads = torch.autograd.grad(outs, leaves, _grad_outputs(outs, seed), retain_graph=retain,
                                allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _forward(fn, inputs):
    with torch.no_grad():
        return fn(inputs)


def evaluate(fn: Callable, inputs: Dict[str, Any], grads: Sequence[str], seed: int
             ) -> Dict[str, torch.Tensor]:
    """Named results of one implementation: out0.. (forward, no grad) and, when `grads`, grad:<x>
    of a forward + backward with fixed output gradients."""
    res = {f"out{j}": t.detach() for j, t in enumerate(_tensors(_forward(fn, inputs)))}
    if grads:
        inp, leaves = _with_leaves(inputs, grads)
        for name, g in zip(grads, _grad(_float(fn(inp)), leaves, seed)):
            res[f"grad:{name}"] = g
    return res


def compare(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], dtype: torch.dtype
            ) -> dict:
    """Worst error over the named tensors: float tensors by max |got - want| / max |want|, index
    tensors by the number of mismatched elements (must be 0)."""
    tol = TOLERANCE[dtype]
    worst = {"max_abs_err": 0.0, "rel_err": 0.0, "tol": tol, "ok": True, "worst": None,
             "mismatched_indices": 0}
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape:
            shape = None if g is None else tuple(g.shape)
            return {**worst, "ok": False, "worst": name,
                    "error": f"{name}: shape {shape}, expected {tuple(w.shape)}"}
        if not w.is_floating_point():
            bad = int((g.long() != w.long()).sum())
            worst["mismatched_indices"] += bad
            if bad:
                worst.update(ok=False, worst=name)
            continue
        diff = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        scale = w.double().abs().max().item() if w.numel() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        if not math.isfinite(diff) or not math.isfinite(rel):
            rel = math.inf
        if rel >= worst["rel_err"]:
            worst.update(max_abs_err=diff, rel_err=rel, worst=name)
        if not rel <= tol:
            worst["ok"] = False
    return worst


# --- timing callables -----------------------------------------------------------------------


def calls(impl: Impl, grads: Sequence[str], problems: Sequence[Problem], mode: str
          ) -> List[Callable[[], Any]]:
    """One callable per input set that runs `impl` in `mode`."""
    fns = []
    for s, p in enumerate(problems):
        if mode == "fwd":
            fns.append(partial(_forward, impl.fn, p.inputs))
            continue
        inp, leaves = _with_leaves(p.inputs, grads)
        outs = _float(impl.fn(inp))
        # The output gradients are made here, outside the timed call: a CPU randn of the
        # T=1024 layer's [1024, 1376] took 6-9 ms, more than the base linear's forward+backward.
        g = _grad_outputs(outs, s)
        if mode == "bwd":
            fns.append(partial(torch.autograd.grad, outs, leaves, g, retain_graph=True,
                               allow_unused=True))
        else:
            del outs
            fns.append(partial(_training_step, impl.fn, inp, leaves, g))
    return fns


def _training_step(fn, inputs, leaves, grad_outputs):
    """fwd+bwd: the forward and the backward of `leaves` with fixed output gradients."""
    return torch.autograd.grad(_float(fn(inputs)), leaves, grad_outputs, allow_unused=True)


def _graphed(fns, cfg: Config):
    """The calls as CUDA-graph replays when asked for and capturable: (fns, note)."""
    if not cfg.cuda_graph or cfg.device.type != "cuda":
        return fns, None
    try:
        return [cuda_graph(f) for f in fns], "cuda-graph"
    except Exception as exc:  # host syncs / CPU work in the call: time it eagerly
        return fns, f"eager (graph capture failed: {type(exc).__name__})"


def rates(row: dict, ceilings: Ceilings) -> None:
    """The row's GB/s and GFLOP/s, and their percentages of the measured ceilings."""
    t = row["time"]["median"]
    row["gb_per_s"] = row["bytes"] / t / 1e9
    row["gflop_per_s"] = row["flops"] / t / 1e9 if row["flops"] else None
    row["pct_copy_bw"] = 100 * row["gb_per_s"] / ceilings.copy_gb_per_s
    row["pct_matmul"] = (100 * row["gflop_per_s"] / ceilings.matmul_gflop_per_s
                         if row["flops"] else None)


# --- one case ---------------------------------------------------------------------------------


def input_sets(spec: OpSpec, case: Case, cfg: Config) -> List[Problem]:
    """Set 0, plus (GPU) as many more as it takes for their compulsory bytes to exceed 2x L2."""
    first = spec.make(case, cfg.device, cfg.dtype, 0)
    n = 1
    if cfg.device.type == "cuda" and cfg.l2_bytes:
        per_set = max(cost(spec.name, first.dims, "fwd").bytes, 1)
        n = max(1, min(cfg.max_sets, math.ceil(2 * cfg.l2_bytes / per_set)))
    return [first] + [spec.make(case, cfg.device, cfg.dtype, s) for s in range(1, n)]


def grads_of(spec: OpSpec, impl: Impl, problem: Problem) -> Tuple[str, ...]:
    """The inputs an implementation differentiates (its own, the problem's, or the op's)."""
    if impl.grads is not None:
        return tuple(impl.grads)
    return tuple(problem.grads or spec.grads)


def check_impl(spec: OpSpec, impl: Impl, problem: Problem, dtype: torch.dtype, with_grads: bool,
               oracles: Optional[dict] = None) -> dict:
    """`compare` of the implementation against its oracle (the reference backend, or the impl's
    own) on `problem`: the forward outputs and, `with_grads`, the input gradients. Raises what the
    implementation raises; `oracles` caches the oracle's results across implementations."""
    grads = grads_of(spec, impl, problem) if with_grads else ()
    oracle = impl.oracle or partial(spec.run, reference)
    key = (oracle if impl.oracle else "reference", grads)
    cache = {} if oracles is None else oracles
    if key not in cache:
        cache[key] = evaluate(oracle, problem.inputs, grads, 0)
    return compare(evaluate(impl.fn, problem.inputs, grads, 0), cache[key], dtype)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _scoped(fn: Callable[[], object], scope) -> Callable[[], object]:
    if scope is None:
        return fn

    def call():
        with scope():
            return fn()
    return call


def run_case(spec: OpSpec, case: Case, cfg: Config) -> Tuple[List[dict], List[dict]]:
    """(rows, skipped) of one case: every available implementation x mode, checked then timed."""
    problems = input_sets(spec, case, cfg)
    p0 = problems[0]
    modes = [m for m in cfg.modes if m == "fwd" or spec.grads]
    impls, skipped = spec.impls(cfg.device, cfg.dtype)
    skipped = [{"op": case.op, "label": case.label, **s} for s in skipped]
    oracles: dict = {}
    rows = []
    cpu_rows: dict = {}  # mode -> [(row, call)]: timed side by side once all are built
    for impl in impls:
        with impl.scope() if impl.scope is not None else contextlib.nullcontext():
            base = {"op": case.op, "label": case.label, "case": case.asdict(), "impl": impl.name,
                    "kind": impl.kind, "model": impl.model or case.op,
                    "active_experts": p0.dims.E_act, "input_sets": len(problems)}
            try:
                check = check_impl(spec, impl, p0, cfg.dtype, any(m != "fwd" for m in modes),
                                   oracles)
            except (NotImplementedError, torch.cuda.OutOfMemoryError) as exc:
                skipped.append({**base, "reason": _reason(exc)})
                continue
            except Exception as exc:
                if impl.optional:
                    skipped.append({**base, "reason": _reason(exc)})
                    continue
                check = {"ok": False, "error": _reason(exc)}
                rows += [{**base, "mode": m, "check": check, "time": None} for m in modes]
                continue
            for mode in modes:
                c = cost(base["model"], p0.dims, mode)
                row = {**base, "mode": mode, "flops": c.flops, "bytes": c.bytes,
                       "intensity": c.intensity, "check": check}
                if spec.describe is not None and impl.kind == "backend" \
                        and impl.name != "reference":
                    row["algo"] = spec.describe(p0.inputs, mode)
                try:
                    fns = calls(impl, grads_of(spec, impl, p0), problems, mode)
                    if cfg.device.type != "cuda":
                        # CPU rows: hot-cache, the first input set; timed below, interleaved
                        # (outside this loop: a scoped implementation enters its scope per call)
                        row["timing"] = "interleaved blocks"
                        cpu_rows.setdefault(mode, []).append((row, _scoped(fns[0], impl.scope)))
                        rows.append(row)
                        continue
                    fns, note = _graphed(fns, cfg) if mode == "fwd" else (fns, None)
                    row["timing"] = note or "cuda-events"
                    row["time"] = time_calls(fns, cfg.device, cfg.budget).asdict()
                    del fns
                except torch.cuda.OutOfMemoryError as exc:
                    skipped.append({**base, "mode": mode, "reason": _reason(exc)})
                    continue
                rates(row, cfg.ceilings)
                rows.append(row)
    # On the CPU every implementation of one mode is timed in the same rounds, so a slow spell of
    # the shared machine does not skew the ratios between them (x base, vs loop, vs reference).
    for entries in cpu_rows.values():
        stats = time_cpu_interleaved([fn for _, fn in entries], cfg.budget)
        for (row, _), st in zip(entries, stats):
            row["time"] = st.asdict()
            rates(row, cfg.ceilings)
    del cpu_rows
    _relative(rows)
    return rows, skipped


def _relative(rows: List[dict]) -> None:
    """Speed-up over the per-expert loop and over the reference, and time over the base linear,
    for the rows of one case (per mode)."""
    by = {(r["impl"], r["mode"]): r["time"]["median"] for r in rows if r.get("time")}
    for r in rows:
        if not r.get("time"):
            continue
        t = r["time"]["median"]
        for key, impl, inverse in (("speedup_vs_loop", "loop", False),
                                   ("speedup_vs_reference", "reference", False),
                                   ("x_base", "base", True)):
            other = by.get((impl, r["mode"]))
            if other is not None:
                r[key] = t / other if inverse else other / t
