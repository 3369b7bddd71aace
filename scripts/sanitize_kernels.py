#!/usr/bin/env python
"""Call every CUDA C++ kernel (torch.ops.molora_cuda.*) a few times at small-to-moderate sizes, for
compute-sanitizer (memcheck: out-of-bounds / misaligned accesses, racecheck: shared-memory races):

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/sanitize_kernels.py

The sanitizer slows kernels down ~100x, so sizes stay small; they still cover ragged edges (T not
a multiple of the rows per block, E / R not powers of two, k up to 16). Every op of the test
samples (python_tests/utils.py op_samples) runs in fp32 and bf16, plus a few larger per-op cases.
Ops without a CUDA C++ kernel in this build are listed as skipped. Exit status 1 if a call raised.
Set PYTORCH_NO_CUDA_MEMORY_CACHING=1 (scripts/gpu_validate.sh does) so memcheck sees the real
allocation bounds instead of the caching allocator's larger blocks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python_tests"))

import molora_ops  # noqa: E402,F401  (loads the extension)
from molora_ops import reference as ref  # noqa: E402
from utils import ALL_OPS, op_samples  # noqa: E402


# (namespace, dispatch key, device): the CUDA kernels, or (--emulate) their CPU emulation, which
# checks this script itself on a machine without a GPU.
TARGET = {"ns": "molora_cuda", "key": "CUDA", "device": "cuda"}


def has_kernel(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{TARGET['ns']}::{name}",
                                                              TARGET["key"])
    except RuntimeError:
        return False


def to_cuda(a, dtype=None):
    if isinstance(a, torch.Tensor):
        t = a.detach().to(TARGET["device"])
        if dtype is not None and t.is_floating_point() and t.dtype == torch.float32:
            t = t.to(dtype)
        return t
    if isinstance(a, (list, tuple)):
        return type(a)(to_cuda(x, dtype) for x in a)
    return a


def extra_cases(name: str):
    """Moderate sizes per op (beyond the tiny samples): (id, args)."""
    dev = TARGET["device"]
    out = []
    if name in ("softmax_topk", "topk_softmax", "sigmoid_topk"):
        for T, E, k in [(1000, 60, 8), (257, 1024, 16), (33, 257, 4)]:
            x = torch.randn(T, E, device=dev, dtype=torch.bfloat16)
            if name == "softmax_topk":
                out.append((f"T{T}-E{E}-k{k}", (x, k, True)))
            elif name == "topk_softmax":
                out.append((f"T{T}-E{E}-k{k}", (x, k, 1.0)))
            else:
                out.append((f"T{T}-E{E}-k{k}",
                            (x, k, torch.rand(E, device=dev), True, False, 1.0)))
    elif name == "dispatch":
        for T, E, k, bs in [(1000, 60, 8, 1), (999, 4096, 2, 16), (300, 7, 2, 64)]:
            ids = torch.randint(-1, E, (T, k), device=dev, dtype=torch.int32)
            out.append((f"T{T}-E{E}-k{k}-bs{bs}", (ids, E, bs)))
    elif name in ("gather_rows", "combine_rows"):
        T, E, k, d = 500, 60, 8, 136  # d not a multiple of 8 bf16: the unvectorised tail
        ids = torch.randint(-1, E, (T, k), device=dev, dtype=torch.int32)
        order, pos, _ = ref.dispatch(ids, E, 4)
        w = torch.rand(T, k, device=dev)
        rows = T if name == "gather_rows" else order.numel()
        x = torch.randn(rows, d, device=dev, dtype=torch.bfloat16)
        out.append(("T500-d136", (x, order, pos, w)))
    elif name == "rank_topk":
        for T, r, k in [(1000, 64, 8), (333, 100, 16), (65, 1024, 8), (9, 2000, 8), (40, 32, 32)]:
            h = torch.randn(T, r, device=dev, dtype=torch.bfloat16)
            out.append((f"T{T}-r{r}-k{k}", (h, k, torch.rand(T, r, device=dev),
                                            torch.randn(r, device=dev), True)))
        hh = torch.randn(64, 300, device=dev).t()  # non-contiguous
        out.append(("noncontig", (hh, 8, None, None, False)))
    elif name == "id_histogram":
        for n, bins in [(100_000, 64), (50_000, 1024), (20_000, 3000), (20_000, 20_000)]:
            out.append((f"n{n}-bins{bins}",
                        (torch.randint(-1, bins, (n,), device=dev, dtype=torch.int32), bins)))
    elif name == "rank_scatter":
        for T, r, k in [(1000, 64, 8), (100, 100, 40)]:
            ids = torch.randint(-1, r, (T, k), device=dev, dtype=torch.int32)
            out.append((f"T{T}-r{r}-k{k}",
                        (torch.randn(T, k, device=dev, dtype=torch.bfloat16), ids, r)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="", help="comma-separated subset (default: every op)")
    ap.add_argument("--emulate", action="store_true",
                    help="run the CPU emulation (torch.ops.molora_emu) instead: checks the script")
    args = ap.parse_args(argv)
    if args.emulate:
        from molora_ops._emu import load_emu
        load_emu()
        TARGET.update(ns="molora_emu", key="CPU", device="cpu")
    elif not torch.cuda.is_available():
        print("sanitize_kernels: no CUDA device", file=sys.stderr)
        return 2
    names = [n for n in (args.ops.split(",") if args.ops else ALL_OPS) if n]
    torch.manual_seed(0)
    failed, ran, skipped = [], 0, []
    t0 = time.time()
    for name in names:
        if not has_kernel(name):
            skipped.append(name)
            continue
        op = getattr(getattr(torch.ops, TARGET["ns"]), name)
        calls = []
        for dtype in (None, torch.bfloat16):
            for sid, a, kw in op_samples(name):
                calls.append((f"{sid}-{'bf16' if dtype else 'f32'}", to_cuda(a, dtype),
                              to_cuda(kw, dtype)))
        calls += [(cid, a, {}) for cid, a in extra_cases(name)]
        for cid, a, kw in calls:
            try:
                op(*a, **kw)
                if TARGET["device"] == "cuda":
                    torch.cuda.synchronize()
                ran += 1
            except Exception as exc:  # noqa: BLE001
                # a dtype the kernel rejects (bf16 where the op needs fp32 metadata) is a checked
                # error, not a sanitizer finding: report but only count device-side failures
                msg = str(exc).split("\n")[0]
                if isinstance(exc, (TypeError, ValueError, IndexError)):
                    print(f"  {name}[{cid}]: rejected ({type(exc).__name__}: {msg[:120]})")
                    continue
                failed.append(f"{name}[{cid}]")
                print(f"  {name}[{cid}]: FAILED {type(exc).__name__}: {msg}")
                traceback.print_exc(limit=2)
        print(f"{name}: {len(calls)} calls")
    print(f"sanitize_kernels: {ran} calls ok, {len(failed)} failed, skipped (no CUDA kernel): "
          f"{','.join(skipped) or '-'}; {time.time() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
