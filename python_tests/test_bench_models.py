"""Tests of the benchmark suite (bench/): the byte / FLOP models against hand-derived counts and
against the reference's matmuls, the statistics helper, the routing generators, the correctness
comparison, and a tiny end-to-end run (`python -m bench --quick`) whose JSON and plots are checked.
"""

import importlib.util
import contextlib
import json
import math
import os
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # import bench

from bench import models  # noqa: E402
from bench.cases import SPECS  # noqa: E402
from bench.models import Cost, Dims, cost  # noqa: E402
from bench.runner import compare  # noqa: E402
from bench.shapes import (Case, expert_probs, preset_cases, router_bias,  # noqa: E402
                          routing_ids)
from bench.timing import (Budget, Ceilings, Stats, fastest_ceilings, interleaved,  # noqa: E402
                          quantile, time_cpu_interleaved)

# The shape every hand count below uses: T=4 tokens, d_in=8, d_out=6, E=3 experts, k=2, r=2,
# fp32 (4-byte) data, 2 of the 3 experts active. So P = T*k = 8 pairs, R = E*r = 6.
D = Dims(T=4, d_in=8, d_out=6, E=3, k=2, r=2, elem=4, active=2)


def test_dims():
    assert (D.P, D.R, D.E_act) == (8, 6, 2)
    assert Dims(4, 8, 6, 3, 2, 2).E_act == 3  # active=None: every expert


# SMoRA-style rank ops: R = 16 rank-1 experts, k = 2 kept per token, 5 distinct columns used.
DR = Dims(T=4, d_in=8, d_out=6, E=16, k=2, r=1, elem=4, active=5)

# (op, mode, dims, FLOPs, bytes), each derived by hand in the comment above it.
HAND_COUNTS = [
    # sgmv_shrink fwd: FLOPs 2*P*r*d_in = 2*8*2*8 = 256. Bytes: x rows through order P*d_in*4 =
    # 256 + active A 2*r*d_in*4 = 128 + order P*4 = 32 + rank and expert offsets 2*(E+1)*4 = 32
    # + h P*r*4 = 64 = 512.
    ("sgmv_shrink", "fwd", D, 256, 512),
    # sgmv_shrink bwd: FLOPs 4*P*r*d_in = 512. Bytes: gh 64 + active A 128 + x rows 256 + order 32
    # + pos T*k*4 = 32 + offsets 32 + dx T*d_in*4 = 128 + dA written whole R*d_in*4 = 192 = 864.
    ("sgmv_shrink", "bwd", D, 512, 864),
    ("sgmv_shrink", "fwd+bwd", D, 768, 1376),  # the sum of the two above
    # sgmv_expand fwd: FLOPs 2*P*r*d_out = 2*8*2*6 = 192. Bytes: h 64 + active B 2*r*d_out*4 = 96
    # + pos 32 + offsets 32 + weights P*4 = 32 + scales E*4 = 12 + base T*d_out*4 = 96 + y 96 = 460.
    ("sgmv_expand", "fwd", D, 192, 460),
    # sgmv_expand bwd: FLOPs 4*P*r*d_out = 384. Bytes: gy rows through pos P*d_out*4 = 192 + h 64
    # + active B 96 + order 32 + pos 32 + offsets 32 + weights 32 + scales 12 + dh 64
    # + dB R*d_out*4 = 144 + dw 32 = 732.
    ("sgmv_expand", "bwd", D, 384, 732),
    # softmax_topk fwd: FLOPs 4*T*E + 2*T*k = 48 + 16. Bytes: logits T*E*4 = 48 + weights and ids
    # T*k*(4 + 4) = 64.
    ("softmax_topk", "fwd", D, 64, 112),
    # softmax_topk bwd: FLOPs 4*T*k = 32. Bytes: grad_w, w, ids T*k*12 = 96 + dlogits 48.
    ("softmax_topk", "bwd", D, 32, 144),
    # dispatch: no FLOPs. Bytes: ids 32 + order 32 + pos 32 + expert_offsets (E+1)*4 = 16.
    ("dispatch", "fwd", D, 0, 112),
    # gather_rows fwd: FLOPs P*d_in = 64. Bytes: x rows 256 + order 32 + weights 32 + x_perm 256.
    ("gather_rows", "fwd", D, 64, 576),
    # combine_rows fwd: FLOPs 2*P*d_out = 96. Bytes: y_perm 192 + pos 32 + weights 32 + y 96.
    ("combine_rows", "fwd", D, 96, 352),
    # stacked_gated_lora fwd: FLOPs 2*T*R*(d_in + d_out) = 2*4*6*14 = 672. Bytes: x 128
    # + A R*d_in*4 = 192 + B 144 + gate T*E*4 = 48 + rank_offsets 16 + scales 12 + base 96 + y 96.
    ("stacked_gated_lora", "fwd", D, 672, 732),
    # linear (the frozen base), either way: FLOPs 2*T*d_in*d_out = 384; (x 32 + W0 48 + y 24)*4.
    ("linear", "fwd", D, 384, 416),
    ("linear", "bwd", D, 384, 416),
    # moe_lora fwd: FLOPs base + router 2*T*d_in*(d_out + E) = 576 + shrink and expand
    # 2*P*r*(d_in + d_out) = 448. Bytes: x 128 + W0 192 + Wg E*d_in*4 = 96 + bg 12
    # + active A and B 2*r*(d_in + d_out)*4 = 224 + y 96 = 748.
    ("moe_lora", "fwd", D, 1024, 748),
    # rank_topk, both ways: no FLOPs; h (or dh) T*R*4 = 256 + values 32 + ids 32.
    ("rank_topk", "fwd", DR, 0, 320),
    ("rank_topk", "bwd", DR, 0, 320),
    # rank_sparse_expand fwd: FLOPs 2*T*k*d_out = 96. Bytes: values, ids, weights T*k*12 = 96
    # + the 5 used columns of B 5*d_out*4 = 120 + base 96 + y 96.
    ("rank_sparse_expand", "fwd", DR, 96, 408),
]


@pytest.mark.parametrize("op, mode, dims, flops, nbytes", HAND_COUNTS,
                         ids=[f"{c[0]}-{c[1]}" for c in HAND_COUNTS])
def test_hand_counts(op, mode, dims, flops, nbytes):
    assert cost(op, dims, mode) == Cost(flops, nbytes)


def test_cost_arithmetic_and_coverage():
    assert Cost(1, 2) + Cost(3, 4) == Cost(4, 6)
    assert Cost(10, 4).intensity == 2.5 and Cost(0, 0).intensity == 0.0
    for name in models.MODELS:  # fwd+bwd is the sum, everything non-negative
        assert cost(name, D, "fwd+bwd") == cost(name, D, "fwd") + cost(name, D, "bwd")
        assert min(cost(name, D, "fwd").flops, cost(name, D, "fwd").bytes) >= 0
    assert set(SPECS) <= set(models.MODELS)  # every benchmarked op has a model


@pytest.mark.parametrize("op", ["sgmv_shrink", "sgmv_expand", "stacked_gated_lora", "moe_lora"])
def test_flops_match_reference_matmuls(op):
    """The model's forward FLOPs are exactly the matmul FLOPs the reference runs (torch's counter,
    uniform ranks, no padding)."""
    case = Case(T=16, d_in=32, d_out=24, E=4, k=2, r=4, op=op)
    problem = SPECS[op].make(case, torch.device("cpu"), torch.float32, 0)
    import molora_ops.reference as ref
    with FlopCounterMode(display=False) as counter:
        SPECS[op].run(ref, problem.inputs)
    assert counter.get_total_flops() == cost(op, problem.dims, "fwd").flops


def test_quantile_and_stats():
    # sorted [1, 2, 3, 4, 5]: position q*(n-1) -> p20 at 0.8 -> 1.8, median 3, p80 at 3.2 -> 4.2
    s = Stats.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.n, s.min, s.max) == (3.0, 5, 1.0, 5.0)
    assert s.p20 == pytest.approx(1.8) and s.p80 == pytest.approx(4.2)
    # even n: median interpolates (2.5); p20 at 0.6 -> 1.6; p80 at 2.4 -> 3.4
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile([4, 3, 2, 1], 0.2) == pytest.approx(1.6)
    assert quantile([1, 2, 3, 4], 0.8) == pytest.approx(3.4)
    assert Stats.of([7.0]) == Stats(7.0, 7.0, 7.0, 1, 7.0, 7.0)
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_fastest_ceilings_takes_each_rate_from_the_faster_measurement():
    """The run's start and end each measure both ceilings; a slow spell in either keeps neither of
    its rates: copy from one, matmul from the other, each with its own samples."""
    def ceil(copy_s, mm_s, n):
        return Ceilings(copy_bytes=2_000, copy_gb_per_s=2_000 / copy_s / 1e9, matmul_n=n,
                        matmul_dtype="float32", matmul_gflop_per_s=2 * n ** 3 / mm_s / 1e9,
                        copy_time=Stats.of([copy_s, 2 * copy_s]), matmul_time=Stats.of([mm_s]))

    start, end = ceil(1e-6, 3e-3, 96), ceil(2e-6, 1e-4, 64)  # start: faster copy; end: matmul
    for got in (fastest_ceilings(start, end), fastest_ceilings(end, start)):
        assert got.copy_gb_per_s == start.copy_gb_per_s and got.copy_time == start.copy_time
        assert got.matmul_gflop_per_s == end.matmul_gflop_per_s
        assert (got.matmul_n, got.matmul_time) == (64, end.matmul_time)


def test_interleaved_rounds_shuffle_and_keep_order():
    """`interleaved` runs every block once per round, in an order that changes from round to
    round (seeded: the same every run), with the garbage collector off inside and restored after;
    results come back per block in round order."""
    import gc

    log = []

    def block(name):
        def run():
            log.append((name, gc.isenabled()))
            return len(log)
        return run

    gc.enable()
    out = interleaved([block("a"), block("b"), block("c")], 12)
    assert gc.isenabled()
    assert not any(on for _, on in log)
    names = [n for n, _ in log]
    rounds = [names[i:i + 3] for i in range(0, 36, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 2  # not one fixed order
    assert {r[0] for r in rounds} == {"a", "b", "c"}  # every block runs first sometimes
    for i, name in enumerate("abc"):
        assert out[i] == [pos + 1 for pos, n in enumerate(names) if n == name]
    log.clear()
    interleaved([block("a"), block("b"), block("c")], 12)
    assert [n for n, _ in log] == names


def test_time_cpu_interleaved_blocks():
    """Each fn gets max(rounds, min_samples) samples from blocks sized to the budget (a fn 1000x
    faster runs about 1000x more calls per block), and the blocks of the fns interleave: no fn's
    calls all come before another's (12 rounds of 2 blocks switch at least 12 times)."""
    calls = []

    def fn(name, reps):
        def run():
            calls.append(name)
            sum(range(reps))
        return run

    fast, slow = fn("fast", 10), fn("slow", 10_000)
    stats = time_cpu_interleaved([fast, slow], Budget(0.05, 12), rounds=3)
    assert [s.n for s in stats] == [12, 12]
    assert all(0 < s.min <= s.median <= s.max for s in stats)

    def runs(seq):
        return [seq[0]] + [b for a, b in zip(seq, seq[1:]) if a != b]

    # warm-ups (fast, then slow), then 12 rounds of one block each: the blocks alternate
    assert len(runs(calls)) >= 2 + 12
    assert calls.count("fast") > 20 * calls.count("slow")


_RETAIN_PROBE = """
import ctypes, ctypes.util, resource, sys
sys.path.insert(0, sys.argv[1])
from bench import timing
mode = timing.retain_freed_memory() if sys.argv[2] == "retain" else "default"
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(3):  # 40 MiB: past the 32 MiB up to which glibc's own settings adapt
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(40 << 20)
    ctypes.memset(p, 1, 40 << 20)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(mode, min(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retain_freed_memory_reuses_pages():
    """After `retain_freed_memory` (the bench's --malloc retain, glibc) a freed 40 MiB block is
    reused: filling it again takes no page faults. With glibc's own settings it is a fresh
    mapping every time (10k faults per fill), so the probe tells the two apart."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for mode in ("retain", "default"):
        words = subprocess.run([sys.executable, "-c", _RETAIN_PROBE, root, mode], check=True,
                               capture_output=True, text=True).stdout.split()
        out[mode] = (words[0], int(words[1]))
    if out["retain"][0] != "retain":
        pytest.skip("the C library is not glibc")
    assert out["retain"][1] < 100, out
    assert out["default"][1] > 5000, out


@pytest.mark.parametrize("routing", ["uniform", "zipf"])
def test_routing_ids(routing):
    T, E, k = 2000, 8, 2
    ids = routing_ids(T, E, k, routing, torch.Generator().manual_seed(0))
    assert ids.shape == (T, k) and ids.dtype == torch.int32
    assert bool((ids[:, 0] != ids[:, 1]).all())  # k distinct experts per token
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    assert int(counts.sum()) == T * k  # exact: every token routes k pairs
    if routing == "zipf":  # skewed toward expert 0: the most popular, far above the least
        assert int(counts.argmax()) == 0 and counts[0] > 3 * counts[-1]
    else:
        assert counts.max() < 1.25 * counts.min()


def test_expert_probs_and_bias():
    p = expert_probs(8, "zipf")
    assert float(p.sum()) == pytest.approx(1.0)
    assert bool((p[1:] < p[:-1]).all())  # decreasing
    assert float(p[0] / p[1]) == pytest.approx(2 ** 1.2)  # (e+1)^-alpha, alpha = 1.2
    assert bool((router_bias(8, "uniform") == 0).all())
    assert bool((router_bias(8, "zipf").diff() < 0).all())
    with pytest.raises(ValueError):
        routing_ids(4, 2, 3, "uniform", torch.Generator())
    with pytest.raises(ValueError):
        expert_probs(4, "pareto")


def test_compare():
    want = {"out0": torch.tensor([1.0, -2.0]), "out1": torch.tensor([3, 4], dtype=torch.int32)}
    same = compare(dict(want), want, torch.float32)
    assert same["ok"] and same["rel_err"] == 0.0 and same["mismatched_indices"] == 0
    off = compare({"out0": torch.tensor([1.0, -2.01]), "out1": want["out1"]}, want, torch.float32)
    assert not off["ok"] and off["worst"] == "out0"
    assert off["rel_err"] == pytest.approx(0.005, rel=1e-3)  # 0.01 / max|want| = 0.01 / 2
    assert compare({"out0": torch.tensor([1.0, -2.01]), "out1": want["out1"]}, want,
                   torch.bfloat16)["ok"]  # within bf16's 3e-2
    ids = compare({"out0": want["out0"], "out1": torch.tensor([3, 5], dtype=torch.int32)}, want,
                  torch.float32)
    assert not ids["ok"] and ids["mismatched_indices"] == 1


def test_presets():
    for name in ("tiny", "cpu", "full"):
        cases = preset_cases(name)
        assert cases and len(set(cases)) == len(cases)
        assert all(1 <= c.k <= c.E for c in cases)
        assert {c.op for c in cases} == set(SPECS)  # every op in every preset
    full = preset_cases("full")
    assert {c.T for c in full} >= {1, 64, 512, 16384}
    assert {c.E for c in full} >= {4, 8, 16, 64} and {c.k for c in full} >= {1, 2, 8}
    assert {c.r for c in full} >= {8, 16, 64} and {c.routing for c in full} == {"uniform", "zipf"}


def test_busy_cores_from_proc_stat(monkeypatch, capsys):
    """The suite's "busy machine" test counts what other work used of the cores between two
    /proc/stat readings (steal counted, idle and iowait not), not the load average, which stays
    high for a minute after the README command's own build has finished."""
    from bench import run

    before = "cpu  100 0 50 1000 10 0 0 0 0 0"
    # 200 jiffies in all: 150 busy (user 90, system 40, steal 20), 50 idle + iowait
    after = "cpu  190 0 90 1040 20 0 0 20 0 0"
    assert run.busy_cores(before, after, 2) == pytest.approx(2 * 150 / 200)
    assert run.busy_cores(before, before, 2) is None  # no time passed
    assert run.busy_cores("cpu  x", after, 2) is None
    monkeypatch.setattr(run, "_busy_now", lambda cores: 1.6)
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    assert run._default_threads(False, torch.device("cpu")) == 1
    assert "1.6 of 2 cores in use by other work" in capsys.readouterr().out
    monkeypatch.setattr(run, "_busy_now", lambda cores: 0.2)
    monkeypatch.setattr(run.os, "getloadavg", lambda: (1.9, 1.9, 1.9))  # a build just finished
    assert run._default_threads(False, torch.device("cpu")) is None
    monkeypatch.setattr(run, "_busy_now", lambda cores: None)  # no /proc/stat: the load average
    assert run._default_threads(False, torch.device("cpu")) == 1
    assert run._default_threads(True, torch.device("cpu")) == 1  # --quick


def test_method_layers_optional():
    """The method-layer section never breaks the suite: specs for what molora_ops.modules has,
    a note for each method it lacks."""
    from bench.bench_layers import METHODS, method_cases, method_specs

    specs, notes = method_specs()
    assert len(specs) + len(notes) >= len(METHODS) or any("not importable" in n for n in notes)
    assert {c.op for c in method_cases("cpu")} == {m.name for m in METHODS}


@pytest.fixture
def one_thread():
    """Tiny shapes on 1 torch thread: OpenMP threads sharing a busy machine stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_method_baselines_match_modules(one_thread):
    """The per-expert loops (MoE-PEFT MixLoRA, PEFT X-LoRA, srmole SMoRA) compute the module's
    forward on its own weights, and every method row (module, loop, base) passes the suite's check
    (forward and gradients against its float64 oracle) on the tiny shapes."""
    from bench.bench_layers import method_cases, method_specs
    from bench.runner import check_impl

    specs, _ = method_specs()
    cpu = torch.device("cpu")
    for case in method_cases("tiny"):
        if case.op not in specs:  # molora_ops.modules lacks it: test_method_layers_optional
            continue
        spec = specs[case.op]
        problem = spec.make(case, cpu, torch.float32, 0)
        impls = {i.name: i for i in spec.impls(cpu, torch.float32)[0]}
        assert set(impls) == {"module", "loop", "base"}
        with torch.no_grad():
            want = impls["module"].fn(problem.inputs)
            torch.testing.assert_close(impls["loop"].fn(problem.inputs), want,
                                       rtol=1e-5, atol=1e-5)
            assert not torch.allclose(impls["base"].fn(problem.inputs), want)  # adapters act
        oracles: dict = {}
        for impl in impls.values():
            assert check_impl(spec, impl, problem, torch.float32, True, oracles)["ok"], impl.name


def _finite_number(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_quick_run_end_to_end(tmp_path):
    """`python -m bench --quick` on the tiny preset: exit 0, JSON schema, checks, plots."""
    from bench.run import main

    # the core ops only: the method layers come from molora_ops.modules (tested there)
    ops = ",".join(SPECS)
    assert main(["--quick", "--out", str(tmp_path), "--no-progress", "--ops", ops]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["schema"] == "molora_ops.bench/1"
    for key in ("date", "device", "device_type", "dtype", "torch", "triton", "python",
                "git_commit", "preset", "threads", "malloc"):
        assert key in res["meta"], key
    assert res["meta"]["preset"] == "tiny"
    assert res["meta"]["malloc"] in ("retain", "default")  # CPU run: --malloc retain, glibc or not
    assert res["ceilings"]["copy_gb_per_s"] > 0 and res["ceilings"]["matmul_gflop_per_s"] > 0
    assert res["backends"]["reference"]["available"]
    rows = res["rows"]
    assert {r["op"] for r in rows} == set(SPECS)
    assert not res["failures"]
    for r in rows:
        chk = r["check"]
        assert chk["ok"] is True, r
        for key in ("max_abs_err", "rel_err", "tol"):
            assert _finite_number(chk[key]), (key, r)
        t = r["time"]
        assert 0 < t["p20"] <= t["median"] <= t["p80"], r
        assert _finite_number(r["gb_per_s"]) and r["bytes"] > 0
        assert r["mode"] in ("fwd", "bwd", "fwd+bwd")
    layer = [r for r in rows if r["op"] == "moe_lora"]
    assert {r["impl"] for r in layer} >= {"reference", "loop", "bmm", "base"}
    assert all(_finite_number(r["speedup_vs_loop"]) and _finite_number(r["x_base"])
               for r in layer)
    if importlib.util.find_spec("matplotlib") is not None:  # setup.sh installs it
        for name in ("speedup.png", "roofline.png"):
            data = (tmp_path / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "moe_lora" in (tmp_path / "table.txt").read_text()


def test_speedup_plot_shows_single_ops_against_the_reference():
    """The speed-up plot's bars: layer cases over their loop, single ops over their reference
    (without the baseline's own 1.0x bar); a row without a speed-up is left out."""
    from bench import report

    def row(op, label, impl, mode="fwd", **kw):
        return {"op": op, "label": label, "impl": impl, "mode": mode, "time": {"median": 1.0}, **kw}

    res = {"rows": [row("moe_lora", "L", "loop", speedup_vs_loop=1.0),
                    row("moe_lora", "L", "native", speedup_vs_loop=2.5, speedup_vs_reference=9.0),
                    row("moe_lora", "L", "reference", speedup_vs_loop=0.5),
                    row("sgmv_shrink", "S", "reference", speedup_vs_reference=1.0),
                    row("sgmv_shrink", "S", "native", "bwd", speedup_vs_reference=1.7),
                    row("dispatch", "D", "native")]}
    bars, name = report.speedup_bars(res)
    got = {(b["label"], b["impl"], b["mode"]): b["speedup"] for b in bars}
    assert got == {("moe_lora: L", "native", "fwd"): 2.5, ("moe_lora: L", "reference", "fwd"): 0.5,
                   ("sgmv_shrink: S (vs ref)", "native", "bwd"): 1.7}
    assert name == "the loop (layers) / the reference (single ops)"
    assert report.speedup_bars({"rows": res["rows"][3:5]})[1] == "the reference"


def test_backend_rows_switch_once_per_implementation():
    """A backend switch binds every op's CUDA kernels anew (~0.4 ms of host time): the runner
    enters an implementation's scope once around its check and timing, and the per-call switch
    inside it is then free (molora_ops.use_backend of the backend in force does nothing). Every
    call of a scoped implementation runs inside its scope, the interleaved CPU timing too."""
    import molora_ops
    from molora_ops import backend
    from bench import backends, runner
    from bench.cases import Impl, OpSpec, Problem
    from bench.models import Dims

    binds = []
    saved = backend.set_backend
    backend.set_backend = lambda name: (binds.append(name), saved(name))
    try:
        with molora_ops.use_backend("reference"):
            with molora_ops.use_backend("reference"):  # the one in force: no second bind
                pass
            assert backend.get_backend() == "reference"
        assert binds == ["reference", "auto"], binds
        ns = backends._Switched(molora_ops, "reference")
        binds.clear()
        with ns.scope():
            for _ in range(3):
                ns.get_backend()  # each call through the namespace: inside the scope, no bind
        assert binds == ["reference", "auto"], binds
    finally:
        backend.set_backend = saved
    with pytest.raises(ValueError):
        with molora_ops.use_backend("no-such-backend"):
            pass

    state = {"inside": False, "entries": 0, "calls": 0, "outside": 0}

    @contextlib.contextmanager
    def scope():
        state["entries"] += 1
        state["inside"] = True
        try:
            yield
        finally:
            state["inside"] = False

    def fn(inputs):
        state["calls"] += 1
        state["outside"] += not state["inside"]
        return inputs["x"] * 2

    spec = OpSpec("scoped", lambda case, dev, dt, seed: Problem(
        {"x": torch.randn(4, 3)}, Dims(T=4, d_in=3, d_out=3, E=1, k=1, r=1, elem=4)),
        lambda ns, i: i["x"] * 2, use_backends=False,
        baselines=lambda dev, dt: [Impl("scoped", "baseline", fn, model="linear",
                                        oracle=lambda i: i["x"] * 2, scope=scope)])
    case = Case(4, 3, 3, 1, 1, 1, op="scoped")
    ceilings = types.SimpleNamespace(copy_gb_per_s=1.0, matmul_gflop_per_s=1.0)
    cfg = runner.Config(torch.device("cpu"), torch.float32, Budget(0.001, 2, 4), ceilings,
                        ("fwd",))
    rows, skipped = runner.run_case(spec, case, cfg)
    assert not skipped and rows and rows[0]["check"]["ok"], (rows, skipped)
    assert state["calls"] > 2 and state["outside"] == 0, state


def test_timed_training_step_draws_no_random_gradients(monkeypatch):
    """The fwd+bwd (and bwd) callables take output gradients made before timing: a CPU randn of
    the T=1024 layer's output took 6-9 ms, more than the base linear's own forward+backward, and
    would sit in every row of the mode. Their gradients equal those of `evaluate` (same seed)."""
    from bench import runner
    from bench.cases import Impl
    from bench.models import Dims
    from bench.cases import Problem

    W = torch.randn(5, 3, dtype=torch.float64)
    impl = Impl("lin", "baseline", lambda i: i["x"] @ W.t(), model="linear")
    problem = Problem({"x": torch.randn(4, 3, dtype=torch.float64)},
                      Dims(T=4, d_in=3, d_out=5, E=1, k=1, r=1, elem=8))
    want = runner.evaluate(impl.fn, problem.inputs, ("x",), 0)["grad:x"]
    for mode in ("fwd+bwd", "bwd"):
        fn = runner.calls(impl, ("x",), [problem], mode)[0]
        drawn = []
        real = torch.randn
        monkeypatch.setattr(torch, "randn", lambda *a, **kw: (drawn.append(a), real(*a, **kw))[1])
        try:
            got = fn()
        finally:
            monkeypatch.setattr(torch, "randn", real)
        assert drawn == [], (mode, drawn)
        torch.testing.assert_close(got[0], want, rtol=0, atol=0)
