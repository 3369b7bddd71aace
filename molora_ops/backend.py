"""Which implementation serves ``torch.ops.molora.*`` on CUDA tensors, bound at registration.

By default (``"auto"``) every op's CUDA kernel is fixed when molora_ops is imported: the CUDA C++
kernel of the native extension where it has one (registered from C++, ``csrc/cuda/*.cu``: no
Python on the way), else the op's Triton launcher (registered from Python, bound on first use),
else the reference. float64 runs on the reference (the kernels take fp16/bf16/fp32). Nothing is
looked up per call.

``"triton"``, ``"reference"`` and ``"cuda"`` re-register the CUDA kernels of the ops: ``"triton"``
puts the Triton launcher in front of the ops that have one, ``"reference"`` the pure-PyTorch
oracle in front of every op, ``"cuda"`` keeps the CUDA C++ kernels and makes the ops without one
raise instead of falling back. Choose with ``MOLORA_BACKEND`` (read once, at import),
``set_backend(name)`` (process-wide) or ``with use_backend(name):`` (a test / benchmark tool: the
override is one ``torch.library`` registration per op, removed at the end of the block, so the
default path costs nothing). ``python -m molora_ops.info`` reports what serves each op.

Test hook: ``gpu_path_on_cpu()`` makes CPU tensors take exactly the path CUDA tensors take (the
CUDA C++ kernels in their CPU emulation ``molora_ops._C_emu``, the Triton launchers in Triton's
interpreter, device-side value checks): how the CPU tests cover the GPU path.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, Optional

import torch

from . import _checks
from .ops import ALL_OPS, OPS, TRITON_OPS
from .ops._registry import gpu_entry, has_triton

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "serving", "has_triton",
           "has_cuda_kernel", "gpu_path_on_cpu", "TRITON_OPS"]

BACKENDS = ("auto", "triton", "cuda", "reference")

_CURRENT = ["auto"]
_OVERRIDE: list = []  # the torch.library.Library holding the current override (none for "auto")


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"molora_ops backend must be one of {BACKENDS}, got {name!r} "
                         "(from MOLORA_BACKEND, set_backend or use_backend)")
    return name


def has_cuda_kernel(name: str) -> bool:
    """True when op ``name`` has a hand-written CUDA C++ kernel in the loaded extension."""
    return "CUDA" in OPS[name].native_kernels


def _no_cuda_kernel(name: str) -> Callable:
    def raise_(*args):
        raise NotImplementedError(f"molora.{name}: no CUDA C++ kernel (in this build); use the "
                                  "'auto', 'triton' or 'reference' backend (MOLORA_BACKEND / "
                                  "set_backend / use_backend)")
    return raise_


def _override_kernel(name: str, backend: str) -> Optional[Callable]:
    """The CUDA kernel that ``backend`` puts in front of op ``name`` (None: keep the default)."""
    opdef = OPS[name]
    if backend == "reference":
        return opdef.reference_entry
    if backend == "triton" and opdef.triton is not None:
        if not has_triton():
            raise RuntimeError("molora_ops: the 'triton' backend needs the triton package")
        return opdef.triton_entry()
    if backend == "cuda" and not has_cuda_kernel(name):
        return _no_cuda_kernel(name)
    return None


def _register_over(dispatch_key: str, kernels: Dict[str, Callable]):
    """One Library that puts ``kernels`` in front of the registered ones for ``dispatch_key``;
    ``_destroy()`` on it restores them."""
    lib = torch.library.Library("molora", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": intended
        warnings.simplefilter("ignore")
        for name, fn in kernels.items():
            # allow_override: torch 2.11 refuses to put a kernel in front of one registered from
            # Python (an op without a CUDA C++ kernel has the lazy GPU entry) unless told
            lib.impl(name, fn, dispatch_key, allow_override=True)
    return lib


def get_backend() -> str:
    """The backend in force: ``set_backend`` / ``use_backend`` / ``MOLORA_BACKEND``."""
    return _CURRENT[0]


def set_backend(name: str) -> None:
    """Binds the CUDA kernels of every op to backend ``name`` for the whole process."""
    _validate(name)
    kernels = {}
    for op in ALL_OPS:
        fn = _override_kernel(op, name)
        if fn is not None:
            kernels[op] = fn
    while _OVERRIDE:
        _OVERRIDE.pop()._destroy()
    if kernels:
        _OVERRIDE.append(_register_over("CUDA", kernels))
    _CURRENT[0] = name


@contextlib.contextmanager
def use_backend(name: str):
    """``with molora_ops.use_backend("triton"): ...`` runs the block's ops on that backend (for
    the whole process while the block runs: a test and benchmark tool, not a per-thread switch).
    A switch binds the CUDA kernels of every op anew (~0.4 ms of host time); inside a block of the
    same backend nothing is switched."""
    saved = get_backend()
    if saved == name:  # (a valid name: the one in force)
        yield
        return
    set_backend(name)
    try:
        yield
    finally:
        set_backend(saved)


def serving(name: str) -> str:
    """What serves op ``name`` on CUDA tensors now: "cuda", "triton", "reference" or "none"."""
    backend = get_backend()
    if backend == "reference":
        return "reference"
    if backend == "triton" and OPS[name].triton is not None:
        return "triton"
    if has_cuda_kernel(name):
        return "cuda"
    if backend == "cuda":
        return "none"
    return "triton" if OPS[name].triton is not None and has_triton() else "reference"


@contextlib.contextmanager
def gpu_path_on_cpu(backend: str = "auto"):
    """Test hook: while active, ``torch.ops.molora.*`` on CPU tensors runs what CUDA tensors run
    under ``backend``: the CUDA C++ kernels in CPU emulation (``torch.ops.molora_emu``), the
    Triton launchers (interpreter: set ``TRITON_INTERPRET=1`` before triton is imported), the
    reference where neither serves the op, and value checks in the device form."""
    from ._emu import has_emu_kernel, load_emu
    load_emu()
    kernels = {}
    for name in ALL_OPS:
        over = _override_kernel(name, backend)
        if over is not None and backend != "cuda":
            kernels[name] = over
        elif has_emu_kernel(name):
            kernels[name] = _emu_kernel(name)
        elif backend == "cuda":
            kernels[name] = _no_cuda_kernel(name)
        else:
            kernels[name] = gpu_entry(OPS[name])
    lib = _register_over("CPU", kernels)
    try:
        with _checks.use_value_checks("device"):
            yield
    finally:
        lib._destroy()


def _emu_kernel(name: str) -> Callable:
    op = getattr(torch.ops.molora_emu, name).default

    def kernel(*args):
        return op(*args)

    kernel.__name__ = f"{name}_emu"
    return kernel


_env = os.environ.get("MOLORA_BACKEND", "").strip().lower()
if _env and _env != "auto":
    set_backend(_env)
