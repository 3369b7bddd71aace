#!/usr/bin/env python
"""Call every CUDA C++ kernel of molora_ops a few times at small-to-moderate sizes, for
compute-sanitizer (memcheck: out-of-bounds / misaligned accesses; racecheck: shared-memory races).
scripts/gpu_validate.sh runs it as

    compute-sanitizer --tool memcheck  $(python scripts/sanitize_kernels.py --print-filter memcheck) \\
        python scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck $(python scripts/sanitize_kernels.py --print-filter racecheck) \\
        python scripts/sanitize_kernels.py --smem-only

The sanitizer instruments every kernel of the process, torch's included, unless told otherwise:
``--print-filter`` prints one ``--kernel-name kns=<kernel>`` per kernel of csrc/kernels/*.cuh
(memcheck) or per kernel there that uses shared memory (racecheck), read from the sources, so only
ours are instrumented and the rest run at full speed.

Which kernel is called: the ops a csrc/cuda launcher registers (``m.impl("op", ...)``), through
``torch.ops.molora.<op>`` on CUDA tensors (whose CUDA kernel is the C++ one). Ops the build
has no kernel for are listed as skipped. ``--emulate`` runs the same calls through the CPU
emulation ``torch.ops.molora_emu`` instead (no GPU: checks this script; gpu_validate.sh's dry run).

Every op of the test samples (python_tests/utils.py op_samples) runs in fp32 and bf16, plus a few
larger cases per op that cover ragged edges (T not a multiple of the rows per block, E / r not
powers of two, k up to 40, d not a multiple of the vector width); ``--quick`` shrinks those.
The sanitizer slows instrumented kernels ~100x, so sizes stay moderate. Set
PYTORCH_NO_CUDA_MEMORY_CACHING=1 for memcheck (gpu_validate.sh does) so it sees the real
allocation bounds instead of the caching allocator's larger blocks.
Exit status 1 if a call raised anything but an argument check (TypeError / ValueError /
IndexError: a dtype the kernel does not take is a checked rejection, not a finding).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python_tests"))

from gpu_compare import cpp_cuda_ops, cuda_kernels, resolve_cuda_kernel, smem_kernels  # noqa: E402

# The ops whose C++ launchers run the shared-memory kernels (kernel names: csrc/kernels/*.cuh).
# gpu_compare.smem_kernels() reads the kernels from the sources; main() warns, and runs every op,
# when a shared-memory kernel is not listed here.
SMEM_OPS = {
    "dispatch": ("dispatch_count_kernel", "dispatch_scatter_kernel"),
    "id_histogram": ("id_histogram_kernel",),
    "softmax_topp": ("route_topp_kernel",),
}


def kernel_filter(tool: str) -> list:
    """compute-sanitizer arguments that restrict instrumentation to our kernels (``kns``: a
    substring of the kernel's name; several filters select the union)."""
    names = smem_kernels() if tool == "racecheck" else tuple(n for n, _ in cuda_kernels())
    args = []
    for n in names:
        args += ["--kernel-name", f"kns={n}"]
    return args


def smem_ops() -> list:
    """The ops to call for racecheck: those that launch a shared-memory kernel."""
    covered = {k for ks in SMEM_OPS.values() for k in ks}
    missing = [k for k in smem_kernels() if k not in covered]
    if missing:
        print(f"sanitize_kernels: WARNING shared-memory kernels {missing} are not in SMEM_OPS; "
              "running every op", file=sys.stderr)
        return list(cpp_cuda_ops())
    return [op for op in cpp_cuda_ops() if op in SMEM_OPS]


class Target:
    """How the kernels are reached: CUDA (the real kernels) or the CPU emulation."""

    def __init__(self, emulate: bool):
        import torch
        self.emulate = emulate
        self.device = "cpu" if emulate else "cuda"
        if emulate:
            from molora_ops._emu import has_emu_kernel, load_emu
            load_emu()
            self._has_emu = has_emu_kernel
        self.torch = torch

    def kernel(self, name: str):
        if self.emulate:
            return getattr(self.torch.ops.molora_emu, name) if self._has_emu(name) else None
        found = resolve_cuda_kernel(name)
        return None if found is None else found[0]

    def sync(self):
        if not self.emulate:
            self.torch.cuda.synchronize()

    def to(self, a, dtype=None):
        torch = self.torch
        if isinstance(a, torch.Tensor):
            t = a.detach().to(self.device)
            if dtype is not None and t.is_floating_point() and t.dtype == torch.float32:
                t = t.to(dtype)
            return t
        if isinstance(a, (list, tuple)):
            return type(a)(self.to(x, dtype) for x in a)
        if isinstance(a, dict):
            return {k: self.to(v, dtype) for k, v in a.items()}
        return a


def extra_cases(name: str, dev: str, quick: bool):
    """Moderate sizes per op (beyond the tiny samples): list of (id, args). ``quick``: the same
    shapes' edges at a fraction of the size (the emulation runs every CUDA thread on the host)."""
    import torch
    from molora_ops import reference as ref

    def q(full, small):
        return small if quick else full

    out = []
    if name in ("softmax_topk", "topk_softmax", "sigmoid_topk"):
        for T, E, k in q([(1000, 60, 8), (257, 1024, 16), (33, 257, 4)], [(9, 60, 8), (3, 257, 4)]):
            x = torch.randn(T, E, device=dev, dtype=torch.bfloat16)
            if name == "softmax_topk":
                out.append((f"T{T}-E{E}-k{k}", (x, k, True)))
            elif name == "topk_softmax":
                out.append((f"T{T}-E{E}-k{k}", (x, k, 1.0)))
            else:
                out.append((f"T{T}-E{E}-k{k}", (x, k, torch.rand(E, device=dev), True, False, 1.0)))
    elif name == "softmax_topp":
        for T, E in q([(500, 60), (65, 1024), (9, 1500)], [(5, 60), (2, 300)]):
            x = torch.randn(T, E, device=dev, dtype=torch.bfloat16) * 0.2  # flat rows: broadcast
            out.append((f"T{T}-E{E}-entropy", (x, 0.5, 1, 0.85, 1.1, 1e-5)))
            out.append((f"T{T}-E{E}-plain", (x * 10, 0.8, 2, 1.0, 1.1, 1e-5)))
    elif name == "dispatch":
        for T, E, k, bs in q([(1000, 60, 8, 1), (999, 4096, 2, 16), (300, 7, 2, 64), (2000, 13000, 2, 1)],
                             [(12, 60, 8, 1), (9, 300, 2, 16), (5, 7, 2, 64)]):
            ids = torch.randint(-1, E, (T, k), device=dev, dtype=torch.int32)
            out.append((f"T{T}-E{E}-k{k}-bs{bs}", (ids, E, bs)))
    elif name in ("gather_rows", "combine_rows", "pair_dot"):
        T, E, k, d = q((500, 60, 8, 136), (9, 7, 3, 24))  # d not a multiple of 8: the scalar tail
        ids = torch.randint(-1, E, (T, k), device=dev, dtype=torch.int32)
        order, pos, _ = ref.dispatch(ids, E, 4)
        w = torch.rand(T, k, device=dev)
        P = order.numel()
        if name == "pair_dot":
            a = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
            b = torch.randn(P, d, device=dev, dtype=torch.bfloat16)
            out.append((f"T{T}-d{d}-by-token", (a, b, pos, True)))
        else:
            rows = T if name == "gather_rows" else P
            x = torch.randn(rows, d, device=dev, dtype=torch.bfloat16)
            out.append((f"T{T}-d{d}", (x, order, pos, w)))
            out.append((f"T{T}-d{d}-offset", (torch.randn(rows, d + 1, device=dev)[:, 1:], order, pos, None)))
    elif name == "rank_topk":
        for T, r, k in q([(1000, 64, 8), (333, 100, 16), (65, 1024, 8), (9, 2000, 8), (40, 32, 32)],
                         [(9, 64, 8), (3, 100, 16), (2, 1100, 8)]):
            h = torch.randn(T, r, device=dev, dtype=torch.bfloat16)
            out.append((f"T{T}-r{r}-k{k}", (h, k, torch.rand(T, r, device=dev),
                                            torch.randn(r, device=dev), True)))
        hh = torch.randn(q(64, 16), q(300, 6), device=dev).t()  # non-contiguous
        out.append(("noncontig", (hh, 8, None, None, False)))
    elif name == "id_histogram":
        for n, bins in q([(100_000, 64), (50_000, 1024), (20_000, 3000), (20_000, 20_000)],
                         [(500, 64), (300, 3000), (200, 13000)]):
            out.append((f"n{n}-bins{bins}",
                        (torch.randint(-1, bins, (n,), device=dev, dtype=torch.int32), bins)))
    elif name == "rank_scatter":
        for T, r, k in q([(1000, 64, 8), (100, 100, 40)], [(5, 64, 8), (2, 100, 40)]):
            ids = torch.randint(-1, r, (T, k), device=dev, dtype=torch.int32)
            out.append((f"T{T}-r{r}-k{k}", (torch.randn(T, k, device=dev, dtype=torch.bfloat16), ids, r)))
    elif name in ("softmax_route_backward", "sigmoid_topk_backward"):
        T, E, k = q((1000, 60, 8), (6, 60, 8))
        lg = torch.randn(T, E, device=dev, dtype=torch.bfloat16)
        g = torch.randn(T, k, device=dev)
        if name == "softmax_route_backward":
            w, ids = ref.softmax_topk(lg, k, True)
            out.append((f"T{T}-E{E}-k{k}", (g, w, ids, lg, True, 1.0)))
        else:
            bias = torch.rand(E, device=dev) * 0.3
            w, ids = ref.sigmoid_topk(lg, k, bias, True, True, 2.0)
            out.append((f"T{T}-E{E}-k{k}", (g, w, ids, lg, bias, True, True, 2.0)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="", help="comma-separated subset (default: every op with a "
                                               "CUDA C++ launcher)")
    ap.add_argument("--smem-only", action="store_true",
                    help="only the ops that launch shared-memory kernels (racecheck)")
    ap.add_argument("--emulate", action="store_true",
                    help="run the CPU emulation (torch.ops.molora_emu) instead: checks the script")
    ap.add_argument("--quick", action="store_true",
                    help="small extra cases, samples in fp32 only (emulation, smoke)")
    ap.add_argument("--print-filter", choices=("memcheck", "racecheck"),
                    help="print the compute-sanitizer --kernel-name arguments for that tool, exit")
    args = ap.parse_args(argv)
    if args.print_filter:
        print(" ".join(kernel_filter(args.print_filter)))
        return 0

    import torch
    from molora_ops.ops import ALL_OPS
    from utils import op_samples

    if not args.emulate and not torch.cuda.is_available():
        print("sanitize_kernels: no CUDA device (use --emulate for the CPU emulation)", file=sys.stderr)
        return 2
    target = Target(args.emulate)
    cpp = cpp_cuda_ops()
    if args.ops:
        names = [n for n in args.ops.split(",") if n]
    elif args.smem_only:
        names = smem_ops()
    else:
        names = [n for n in ALL_OPS if n in cpp]
    unknown = [n for n in names if n not in ALL_OPS]
    if unknown:
        print(f"sanitize_kernels: unknown ops {unknown}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    failed, ran, rejected, skipped = [], 0, 0, []
    t0 = time.time()
    for name in names:
        op = target.kernel(name)
        if op is None:
            skipped.append(name)
            continue
        calls = []
        for dtype in (None,) if args.quick else (None, torch.bfloat16):
            for sid, a, kw in op_samples(name):
                calls.append((f"{sid}-{'bf16' if dtype else 'f32'}", target.to(a, dtype),
                              target.to(kw, dtype)))
        calls += [(cid, a, {}) for cid, a in extra_cases(name, target.device, args.quick)]
        for cid, a, kw in calls:
            try:
                op(*a, **kw)
                target.sync()
                ran += 1
            except (TypeError, ValueError, IndexError) as exc:
                # an argument the kernel rejects (bf16 where the op needs fp32 metadata) is a
                # checked error, not a sanitizer finding
                rejected += 1
                print(f"  {name}[{cid}]: rejected ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120]})")
            except Exception as exc:  # noqa: BLE001  (a device-side fault surfaces as RuntimeError)
                failed.append(f"{name}[{cid}]")
                print(f"  {name}[{cid}]: FAILED {type(exc).__name__}: {str(exc).splitlines()[0]}")
                traceback.print_exc(limit=2)
        print(f"{name}: {len(calls)} calls")
    where = "molora_emu (CPU emulation)" if args.emulate else "CUDA"
    print(f"sanitize_kernels: {ran} calls ok, {len(failed)} failed, {rejected} rejected; "
          f"{len(names) - len(skipped)} ops on {where}; skipped (no kernel): "
          f"{','.join(skipped) or '-'}; {time.time() - t0:.1f} s")
    if failed:
        print(f"sanitize_kernels: failed calls: {', '.join(failed[:20])}")
    return 1 if failed or ran == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
