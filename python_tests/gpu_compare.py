"""Helpers of the GPU tests (python_tests/test_cuda_kernels_*.py, test_cuda_triton.py) and of
scripts/sanitize_kernels.py: which ops have a CUDA C++ kernel, how to call it, and comparisons that
run on the GPU and treat ties the way the kernels' contract does.

* ``cuda_kernel(name)``: the CUDA C++ kernel of op ``name``: ``torch.ops.molora.<name>``, whose
  CUDA kernel it is (registered from C++). Skips the calling test when the build has none (a CPU
  build).
* ``cpp_cuda_ops()``: the ops with a CUDA C++ launcher, read from ``csrc/cuda/*.cu``
  (``m.impl("<op>", ...)``), so the list cannot drift from the sources.
* ``smem_kernels()``: the ``__global__`` kernels of ``csrc/kernels/*.cuh`` that use shared memory
  (the ones racecheck can say anything about).
* ``topk_tie_mismatch(ids, ref_ids, key)``: rows where two top-k selections differ by more than
  the order of tied keys (``torch.topk`` on CUDA promises no order among ties, so its ids may only
  be compared this way); ``assert_topk_ids`` wraps it for tests.

Nothing here needs a GPU: the comparisons run on whatever device the tensors are on. torch is
imported where needed, so reading the sources (sanitize_kernels.py --print-filter) stays cheap.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["cpp_cuda_ops", "cuda_kernels", "smem_kernels", "cuda_kernel", "resolve_cuda_kernel",
           "topk_tie_mismatch", "assert_topk_ids"]


# --- what the sources say ----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def cpp_cuda_ops(root: str = ROOT) -> Tuple[str, ...]:
    """Ops registered by the CUDA C++ launchers (``m.impl("op", ...)`` in csrc/cuda/*.cu), in
    file order."""
    ops: List[str] = []
    cuda_dir = os.path.join(root, "csrc", "cuda")
    for fname in sorted(os.listdir(cuda_dir)) if os.path.isdir(cuda_dir) else []:
        if fname.endswith(".cu"):
            with open(os.path.join(cuda_dir, fname)) as f:
                ops += [m for m in re.findall(r'\bm\.impl\(\s*"(\w+)"', f.read()) if m not in ops]
    return tuple(ops)


@functools.lru_cache(maxsize=None)
def cuda_kernels(root: str = ROOT) -> Tuple[Tuple[str, bool], ...]:
    """(name, uses shared memory) of every ``__global__`` kernel in csrc/kernels/*.cuh; a kernel's
    body runs to the next ``__global__`` and uses shared memory when it declares ``__shared__``
    or ``MOLORA_DYNAMIC_SMEM``."""
    found: List[Tuple[str, bool]] = []
    kdir = os.path.join(root, "csrc", "kernels")
    for fname in sorted(os.listdir(kdir)) if os.path.isdir(kdir) else []:
        if not fname.endswith(".cuh"):
            continue
        with open(os.path.join(kdir, fname)) as f:
            text = f.read()
        heads = list(re.finditer(r"__global__\s+void\s+(\w+)\s*\(", text))
        for i, m in enumerate(heads):
            body = text[m.end():heads[i + 1].start() if i + 1 < len(heads) else len(text)]
            found.append((m.group(1), bool(re.search(r"__shared__|MOLORA_DYNAMIC_SMEM\(", body))))
    return tuple(found)


def smem_kernels(root: str = ROOT) -> Tuple[str, ...]:
    """Names of the kernels of csrc/kernels/*.cuh that use shared memory (racecheck's subject)."""
    return tuple(name for name, smem in cuda_kernels(root) if smem)


# --- which kernel to call ----------------------------------------------------------------------


def resolve_cuda_kernel(name: str) -> Optional[Tuple[object, str]]:
    """(callable, "molora::op") of op ``name``'s CUDA C++ kernel (registered from C++ as the CUDA
    kernel of ``torch.ops.molora.<op>``), or None when this build has none."""
    import torch
    from molora_ops.backend import has_cuda_kernel
    if not has_cuda_kernel(name):
        return None
    return getattr(torch.ops.molora, name), f"molora::{name}"


def cuda_kernel(name: str):
    """The CUDA C++ kernel of op ``name`` (see resolve_cuda_kernel); skips the test without one."""
    import pytest
    found = resolve_cuda_kernel(name)
    if found is None:
        pytest.skip(f"no CUDA C++ kernel for {name!r} in this build (CPU build of the extension?)")
    return found[0]


# --- tie-aware top-k comparison ----------------------------------------------------------------


def topk_tie_mismatch(ids: torch.Tensor, ref_ids: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Bool [T] on ``ids``' device: rows whose selection differs from ``ref_ids`` by more than the
    order of tied keys.

    ``ids`` / ``ref_ids``: [T, k] integer ids in descending-key order (-1 = no expert, at the same
    slots in both); ``key``: [T, E] the values selected on. A row matches when its ids equal the
    reference's, or when its ids are distinct and in range and the key values at them equal, slot
    by slot, the key values at the reference's ids: then both are the same top-k up to the order
    of equal keys (ids compared as sets inside each group of tied values). Compared on the device.
    """
    import torch
    assert ids.shape == ref_ids.shape and ids.dim() == 2 and key.shape[0] == ids.shape[0], \
        (tuple(ids.shape), tuple(ref_ids.shape), tuple(key.shape))
    dev = ids.device
    ids, ref_ids = ids.long(), ref_ids.to(dev).long()
    key = key.to(dev)
    T, k = ids.shape
    if T == 0 or k == 0:
        return torch.zeros(T, dtype=torch.bool, device=dev)
    E = key.shape[1]
    same = (ids == ref_ids).all(-1)
    valid, ref_valid = ids >= 0, ref_ids >= 0
    in_range = (ids < E).all(-1) & (ids >= -1).all(-1)
    kf = key.double()
    v = torch.where(valid, kf.gather(1, ids.clamp(0, E - 1)), torch.full_like(ids, 0, dtype=kf.dtype))
    rv = torch.where(ref_valid, kf.gather(1, ref_ids.clamp(0, E - 1)),
                     torch.full_like(ref_ids, 0, dtype=kf.dtype))
    values_equal = ((v == rv) | (torch.isnan(v) & torch.isnan(rv))).all(-1)
    s = torch.where(valid, ids, torch.full_like(ids, -1)).sort(-1).values
    distinct = ~((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any(-1) if k > 1 else \
        torch.ones(T, dtype=torch.bool, device=dev)
    tie_ok = (valid == ref_valid).all(-1) & in_range & values_equal & distinct
    return ~(same | tie_ok)


def assert_topk_ids(ids: torch.Tensor, ref_ids: torch.Tensor, key: Optional[torch.Tensor] = None,
                    name: str = "ids", exact: bool = True) -> Dict[str, int]:
    """``exact``: ids must equal ``ref_ids`` (our stable reference: ties go to the lower id, the
    kernels' contract); a failure message says how many differing rows differ only in the order
    of tied keys (needs ``key``). ``exact=False`` (a reference with no tie order, e.g.
    ``torch.topk`` on CUDA): only rows that differ beyond ties fail. Returns the row counts."""
    assert ids.shape == ref_ids.shape, f"{name}: shape {tuple(ids.shape)} vs {tuple(ref_ids.shape)}"
    diff = (ids.long() != ref_ids.to(ids.device).long()).any(-1)
    n_diff = int(diff.sum())
    n_bad = n_diff if key is None else int(topk_tie_mismatch(ids, ref_ids, key).sum())
    counts = {"rows": int(ids.shape[0]), "differ": n_diff, "beyond_ties": n_bad}
    if (exact and n_diff) or n_bad:
        row = int(diff.nonzero()[0])
        detail = "" if key is None else (f"; {n_diff - n_bad} of them only in the order of tied "
                                         f"keys, {n_bad} select different values")
        raise AssertionError(
            f"{name}: {n_diff} of {ids.shape[0]} rows differ from the reference{detail}; e.g. row "
            f"{row}: {ids[row].tolist()} vs {ref_ids[row].tolist()}")
    return counts
