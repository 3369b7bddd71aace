"""pytest-benchmark entry points for the per-op microbenchmarks:

    .venv/bin/python -m pytest bench/ --benchmark-only            # all ops, every implementation
    .venv/bin/python -m pytest bench/ --benchmark-only -k sgmv    # one family

One benchmark per (op, implementation, mode) on the first case of each op in the device's preset
(`MOLORA_BENCH_PRESET` overrides: full / cpu / tiny). Each checks the implementation against the
reference first, then times host wall-clock per call with the device synchronised inside the timed
function (launch overhead included: the suite's CUDA-event timings in `python -m bench` are the
kernel-level numbers). Model GB/s and FLOP/s land in each benchmark's extra_info.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from bench.cases import SPECS  # noqa: E402
from bench.models import cost  # noqa: E402
from bench.runner import calls, check_impl, grads_of  # noqa: E402
from bench.shapes import auto_preset, preset_cases  # noqa: E402
from bench.timing import sync  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
PRESET = os.environ.get("MOLORA_BENCH_PRESET") or auto_preset(DEVICE)
ROUNDS = 100 if DEVICE.type == "cuda" else 20


def _params():
    first = {}
    for case in preset_cases(PRESET):
        first.setdefault(case.op, case)
    params = []
    for op, case in first.items():
        spec = SPECS[op]
        impls, _ = spec.impls(DEVICE, DTYPE)
        for impl in impls:
            for mode in ("fwd", "fwd+bwd") if spec.grads else ("fwd",):
                params.append(pytest.param(case, impl.name, mode,
                                           id=f"{op}-{impl.name}-{mode}-T{case.T}"))
    return params


@pytest.mark.parametrize("case, impl_name, mode", _params())
def test_op(benchmark, case, impl_name, mode):
    spec = SPECS[case.op]
    impl = next(i for i in spec.impls(DEVICE, DTYPE)[0] if i.name == impl_name)
    problem = spec.make(case, DEVICE, DTYPE, 0)
    check = check_impl(spec, impl, problem, DTYPE, with_grads=mode != "fwd")
    assert check["ok"], f"{impl_name} disagrees with the reference: {check}"
    fn = calls(impl, grads_of(spec, impl, problem), [problem], mode)[0]

    def timed():
        fn()
        sync(DEVICE)

    c = cost(impl.model or case.op, problem.dims, mode)
    benchmark.group = f"{case.op} {mode} {case.label}"
    benchmark.extra_info.update(label=case.label, impl=impl_name, mode=mode, flops=c.flops,
                                bytes=c.bytes, rel_err=check["rel_err"], device=str(DEVICE))
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info.update(gb_per_s=c.bytes / median / 1e9,
                                    gflop_per_s=c.flops / median / 1e9)
