"""Timing (CUDA events on a GPU; on CPU torch.utils.benchmark, or blocks of calls interleaved
across the implementations of a case), statistics, and the device's measured ceilings (copy
bandwidth, matmul rate) that every row is compared against."""

from __future__ import annotations

import gc
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Sequence

import torch


def quantile(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between closest ranks (numpy's
    default): position q*(n-1) in the sorted samples."""
    if not samples:
        raise ValueError("quantile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(samples)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Seconds per call: median and the 20th / 80th percentiles over n samples."""

    median: float
    p20: float
    p80: float
    n: int
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        return cls(quantile(samples, 0.5), quantile(samples, 0.2), quantile(samples, 0.8),
                   len(samples), min(samples), max(samples))

    def asdict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    """How long to measure one row: seconds of measurement, minimum samples, and (GPU) how many
    timed calls at most."""

    seconds: float
    min_samples: int = 5
    max_reps: int = 1000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# glibc's mallopt parameters, and the values `retain_freed_memory` gives them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
RETAIN_TRIM_BYTES, RETAIN_MMAP_BYTES = 256 << 20, 64 << 20


def retain_freed_memory() -> str:
    """Makes glibc's malloc keep freed memory for reuse, as jemalloc and tcmalloc do (PyTorch's
    CPU performance guide recommends either): blocks up to 64 MiB come from the heap, not fresh
    mappings, and the heap gives its free top back to the kernel only past 256 MiB. Process-wide
    and for the rest of the process. Returns "retain", or "default" where the C library is not
    glibc (its own policy stands).

    Why: with glibc's own settings a freed tensor often cannot be reused for the next one of the
    same size (torch allocates with posix_memalign, whose request is padded past the freed
    block), so the heap grows, trims its top when the block is freed, and every call faults
    fresh zero-filled pages back in: 1.4 us per 4 KiB page here (a 64 MiB fresh fill 25.5 ms
    against 2.8 ms reused). Whether it happens depends on the heap's layout: in 3 of 4
    processes the T=1024 MoE-LoRA layer took 255-544 faults per call (0.35-0.75 ms on a 7.9 ms
    base linear) and the base linear 0 (0-230 in other processes); with this setting 0 in all.
    So the rows of a run are timed on their kernels, not on where glibc placed their outputs."""
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return "default"
    ok = libc.mallopt(_M_TRIM_THRESHOLD, RETAIN_TRIM_BYTES) == 1
    ok = libc.mallopt(_M_MMAP_THRESHOLD, RETAIN_MMAP_BYTES) == 1 and ok
    return "retain" if ok else "default"


def time_cpu(fn: Callable[[], object], budget: Budget) -> Stats:
    """torch.utils.benchmark's blocked_autorange (blocks of calls sized to amortise timer
    overhead) on all of torch's threads; its per-call block times are the samples. Topped up with
    more blocks when the budget gave fewer than `budget.min_samples`."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=budget.seconds)
    times = list(m.times)
    while len(times) < budget.min_samples:
        times.extend(timer.timeit(m.number_per_run).times)
    return Stats.of(times)


def interleaved(blocks: Sequence[Callable[[], object]], rounds: int, seed: int = 0) -> list:
    """Runs `rounds` rounds of every block, each round in its own order (a shuffle seeded by
    `seed`, the same every run), with Python's garbage collector off (collected first, restored
    after); returns each block's results in round order: results[i][r]. Blocks timed side by side
    this way see a shared machine's slow spells alike, so the ratios between them stay fair, and
    no block always follows the same one. NOTE: in a fixed rotation the layer's auto row, which
    always followed the reference (whose allocations and traffic evict the caches), ran 5-25%
    slower than the grouped row right after it, the same computation (2-core CPU machine)."""
    order = list(range(len(blocks)))
    shuffle = random.Random(seed).shuffle
    results: list = [[] for _ in blocks]
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            shuffle(order)
            for i in order:
                results[i].append(blocks[i]())
    finally:
        if was_enabled:
            gc.enable()
    return results


# Rounds of the interleaved CPU timing (one block of calls per implementation per round).
INTERLEAVED_ROUNDS = 10


def time_cpu_interleaved(fns: Sequence[Callable[[], object]], budget: Budget,
                         rounds: int = INTERLEAVED_ROUNDS) -> list:
    """Stats of each of `fns`, timed side by side (`interleaved`): max(rounds,
    budget.min_samples) rounds of one block of calls per fn (a block lasts about
    budget.seconds / rounds, at least one call; its time per call is a sample). The same work as
    `time_cpu`, but a neighbour loading the memory system for seconds at a time slows every fn
    alike instead of whichever row was being timed then."""
    n_rounds = max(rounds, budget.min_samples)
    block_s = budget.seconds / n_rounds

    def block(fn, n):
        def run():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n
        return run

    blocks = []
    for fn in fns:  # warm-up, and the time of one call (over at least 5 ms)
        fn()
        count, t0 = 0, time.perf_counter()
        while True:
            fn()
            count += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= 5e-3 or count >= 1000:
                break
        blocks.append(block(fn, max(1, round(block_s * count / elapsed))))
    return [Stats.of(x) for x in interleaved(blocks, n_rounds)]


def time_cuda(fns: Sequence[Callable[[], object]], budget: Budget) -> Stats:
    """CUDA events around every call; call i runs on input set i % len(fns) (sets rotated so their
    bytes exceed L2: every call reads cold data). Warm-up: each set twice, then as many calls as
    the estimate says fill a quarter of the budget (at least 3)."""
    for fn in fns:
        fn()
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        fns[i % len(fns)]()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) * 1e-3 / 5, 1e-7)
    for i in range(max(3, int(0.25 * budget.seconds / est))):
        fns[i % len(fns)]()
    reps = int(min(budget.max_reps, max(budget.min_samples, budget.seconds / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return Stats.of([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)])


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured once into a CUDA graph (after a warm-up on a side stream); returns its
    replay. Raises when `fn` cannot be captured (host syncs, CPU work)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_calls(fns: Sequence[Callable[[], object]], device: torch.device, budget: Budget) -> Stats:
    """Times the calls on the device: CUDA events (rotating `fns`) or CPU (the first set only:
    CPU rows are hot-cache)."""
    if device.type == "cuda":
        return time_cuda(fns, budget)
    return time_cpu(fns[0], budget)


# --- device facts and ceilings --------------------------------------------------------------


def l2_bytes(device: torch.device) -> Optional[int]:
    """The GPU's L2 size from its properties (None on CPU or when torch does not report it)."""
    if device.type != "cuda":
        return None
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return int(size) or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         "")
    except OSError:
        pass
    return f"CPU {model or 'unknown'} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class Ceilings:
    """Measured at the start and the end of a run (fastest_ceilings): a large device copy (bytes
    read + written per second) and a big square matmul (2*n^3 FLOPs) in the run's dtype. Rates use
    the fastest sample: a ceiling is what the device reached, and noise (other processes, clocks)
    only ever slows a sample down."""

    copy_bytes: int
    copy_gb_per_s: float
    matmul_n: int
    matmul_dtype: str
    matmul_gflop_per_s: float
    copy_time: Stats
    matmul_time: Stats

    def asdict(self) -> dict:
        return asdict(self)


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool = False) -> Ceilings:
    """Copy: dst.copy_(src) of a buffer far larger than the last-level cache (copy_ into a
    preallocated tensor, i.e. a clone without the allocation: a fresh CPU allocation would time page
    faults). Matmul: n x n @ n x n. GPU: 1 GiB (at least 8x L2) and n = 8192; CPU: 256 MiB and
    n = 1536, each about a second; quick: 32 MiB and n = 256."""
    if device.type == "cuda":
        nbytes = max(1 << 30, 8 * (l2_bytes(device) or 0))
        n = 8192
        budget = Budget(0.5 if quick else 1.0, 10, 200)
    else:
        nbytes = (32 << 20) if quick else (256 << 20)
        n = 256 if quick else 1536
        budget = Budget(0.1 if quick else 1.0, 3 if quick else 5)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = time_calls([lambda: dst.copy_(src)], device, budget)
    del src, dst
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm = time_calls([lambda: torch.mm(a, b)], device, budget)
    return Ceilings(copy_bytes=2 * nbytes, copy_gb_per_s=2 * nbytes / copy.min / 1e9,
                    matmul_n=n, matmul_dtype=str(dtype).replace("torch.", ""),
                    matmul_gflop_per_s=2 * n ** 3 / mm.min / 1e9, copy_time=copy,
                    matmul_time=mm)


def fastest_ceilings(a: Ceilings, b: Ceilings) -> Ceilings:
    """Of two measurements of the same ceilings (one run's start and end), the faster of each rate:
    a ceiling is what the device reached, and a window of about a second can fall entirely in a
    neighbour's busy spell. NOTE: 2-core CPU machine, 2026-12-06: the start's matmul 106 GFLOP/s,
    where the run's base linear then ran at 183 (its rows printed "172%" of the ceiling); the
    machine's previous run had measured 202."""
    copy = a if a.copy_gb_per_s >= b.copy_gb_per_s else b
    mm = a if a.matmul_gflop_per_s >= b.matmul_gflop_per_s else b
    return replace(copy, matmul_n=mm.matmul_n, matmul_dtype=mm.matmul_dtype,
                   matmul_gflop_per_s=mm.matmul_gflop_per_s, matmul_time=mm.matmul_time)
