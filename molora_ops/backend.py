"""The backend switch: which implementation serves ``torch.ops.molora.*`` on CUDA tensors.

Backends: ``"cuda"`` (hand-written CUDA C++ in the native extension: ``torch.ops.molora_cuda.*``),
``"triton"`` (the kernels in ``molora_ops.triton``), ``"reference"`` (the pure-PyTorch oracle of
``molora_ops.reference``, on the GPU) and ``"auto"`` (the default: CUDA C++ where the op has a
kernel, else Triton, else the reference; float64 always goes to the reference, the kernels do not
take it). ``"triton"`` runs the ops that have no Triton kernel as ``"auto"`` would; ``"cuda"``
raises for an op without a CUDA C++ kernel instead of falling back.

Choose it with the environment variable ``MOLORA_BACKEND`` (read at import), for the process with
``set_backend(name)``, or for a block of code with the context manager ``use_backend(name)``
(a ``ContextVar``: per thread / task). ``python -m molora_ops.info`` reports it per op.

How it is wired: every op gets one Python CUDA implementation (``torch.library.impl(...,
"CUDA")``) that picks at call time. The CUDA C++ kernels are registered by the extension under
their own namespace ``molora_cuda`` (same schemas, ``csrc/schemas.h``), so the public op keeps one
CUDA kernel and every backend stays selectable; they run their own argument checks (shared with the
CPU launchers). For Triton and the reference the switch runs the op's checks first. Fake kernels
and autograd are registered once per op (``ops/``), so every backend is differentiable and compiles
the same way. Without a GPU, ``cuda_impl(op)`` can be called directly on CPU tensors (Triton runs
in its interpreter with ``TRITON_INTERPRET=1``; the CUDA C++ kernels run in the emulation module
``molora_ops._C_emu`` via ``use_cuda_kernels_from``): that is how the CPU tests cover this path.
"""

from __future__ import annotations

import contextlib
import functools
import contextvars
import importlib
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import reference
from ._extension import has_extension
from .reference import _common
from .ops import ALL_OPS

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "choose", "resolve", "cuda_impl",
           "has_triton", "has_cuda_kernel", "use_cuda_kernels_from", "TRITON_OPS", "SWITCHED_OPS"]

BACKENDS = ("auto", "triton", "cuda", "reference")

# op -> Triton module (launcher of the same name inside it)
TRITON_OPS: Dict[str, str] = {
    "sgmv_shrink": "sgmv", "sgmv_expand": "sgmv", "sgmv_weight_grad": "sgmv", "pair_dot": "sgmv",
    "stacked_gated_lora": "gated", "stacked_gated_lora_backward": "gated",
    "rank_sparse_shrink": "masked", "rank_sparse_expand": "masked", "rank_scatter": "masked",
    "rank_sparse_weight_grad": "masked",
}


# (``reference.dispatch`` is the re-exported function, so the family modules are imported by path)
_ref_dispatch = importlib.import_module("molora_ops.reference.dispatch")
_ref_sgmv = importlib.import_module("molora_ops.reference.sgmv")


def _ids_check(op: str, ids_at: int, bound: Callable) -> Callable:
    return lambda *a: _common.check_ids_in_range("ids", op, a[ids_at], -1, bound(a))


# Value-range checks that read the data, run before a Triton kernel (no kernel may index out of
# bounds): the reference's own checks, which the C++ launchers mirror for the CPU.
_VALUE_CHECKS: Dict[str, Callable] = {
    "sgmv_shrink": lambda *a: _ref_sgmv._check_dispatched("sgmv_shrink", a[1].shape[0], *a[2:6],
                                                          a[8]),
    "sgmv_expand": lambda *a: _ref_sgmv._check_dispatched("sgmv_expand", a[1].shape[1], *a[2:6],
                                                          a[0].shape[1]),
    "sgmv_weight_grad": lambda *a: _ref_sgmv._check_dispatched("sgmv_weight_grad", a[8], *a[2:6],
                                                               a[1].shape[1]),
    "pair_dot": _ref_dispatch._check_pair_dot,
    "stacked_gated_lora": lambda *a: _ref_sgmv._check_stacked("stacked_gated_lora", a[1], a[2],
                                                              a[4], a[7]),
    "stacked_gated_lora_backward": lambda *a: _ref_sgmv._check_stacked(
        "stacked_gated_lora_backward", a[2], a[3], a[5], a[7]),
    "rank_sparse_shrink": _ids_check("rank_sparse_shrink", 2, lambda a: a[1].shape[0]),
    "rank_sparse_expand": _ids_check("rank_sparse_expand", 1, lambda a: a[2].shape[1]),
    "rank_scatter": _ids_check("rank_scatter", 1, lambda a: a[2]),
    "rank_sparse_weight_grad": _ids_check("rank_sparse_weight_grad", 2, lambda a: a[3]),
}


def _meta_check(name: str) -> Callable:
    """The op layer's metadata check ``ops/<family>.py :: _check_<name>``."""
    for module in ("router", "dispatch", "sgmv", "masked"):
        fn = getattr(importlib.import_module(f"molora_ops.ops.{module}"), f"_check_{name}", None)
        if fn is not None:
            return fn
    raise KeyError(name)


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"molora_ops backend must be one of {BACKENDS}, got {name!r} "
                         "(from MOLORA_BACKEND, set_backend or use_backend)")
    return name


_DEFAULT = [os.environ.get("MOLORA_BACKEND", "auto").strip().lower() or "auto"]
_CURRENT: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("molora_backend",
                                                                          default=None)


def get_backend() -> str:
    """The backend in force here: the innermost ``use_backend``, else ``set_backend`` / the env."""
    return _validate(_CURRENT.get() or _DEFAULT[0])


def set_backend(name: str) -> None:
    """Sets the process-wide default backend (``use_backend`` blocks still take precedence)."""
    _DEFAULT[0] = _validate(name)


@contextlib.contextmanager
def use_backend(name: str):
    """``with molora_ops.use_backend("triton"): ...`` runs the block's ops on that backend."""
    token = _CURRENT.set(_validate(name))
    try:
        yield
    finally:
        _CURRENT.reset(token)


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when triton imports (a GPU, or ``TRITON_INTERPRET=1`` for CPU tensors, runs it).
    Cached: ``choose`` asks on every op call, and a failed import is not cached by Python."""
    try:
        importlib.import_module("triton")
    except Exception:  # not installed, or broken without a GPU driver
        return False
    return True


# (namespace, dispatch key) of the CUDA C++ kernels: torch.ops.molora_cuda on CUDA tensors. The
# tests point it at the CPU emulation of the same kernels (torch.ops.molora_emu, "CPU").
_CUDA_KERNELS = ["molora_cuda", "CUDA"]


def has_cuda_kernel(name: str) -> bool:
    """True when op ``name`` has a hand-written CUDA C++ kernel (``torch.ops.molora_cuda``)."""
    namespace, key = _CUDA_KERNELS
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", key)
    except RuntimeError:  # namespace not registered (CPU build of the extension)
        return False


@contextlib.contextmanager
def use_cuda_kernels_from(namespace: str, dispatch_key: str):
    """Test hook: take the "CUDA C++" kernels from ``torch.ops.<namespace>`` registered for
    ``dispatch_key`` (``("molora_emu", "CPU")``: the CPU emulation module ``molora_ops._C_emu``)."""
    saved = list(_CUDA_KERNELS)
    _CUDA_KERNELS[:] = [namespace, dispatch_key]
    try:
        yield
    finally:
        _CUDA_KERNELS[:] = saved


def _cuda_kernel(name: str) -> Callable:
    return getattr(getattr(torch.ops, _CUDA_KERNELS[0]), name)


def _triton_launcher(name: str) -> Callable:
    module = importlib.import_module(f"molora_ops.triton.{TRITON_OPS[name]}")
    return getattr(module, name)


def _reference_fn(name: str) -> Callable:
    fn = getattr(reference, name)
    if name == "sgmv_shrink":  # max_rank is keyword-only in the reference
        return lambda *a: fn(*a[:-1], max_rank=a[-1])
    return fn


def _has_float64(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args)


def choose(name: str, args=(), backend: Optional[str] = None) -> str:
    """The backend ("cuda", "triton" or "reference") that runs op ``name`` on ``args`` under
    ``backend`` (default: ``get_backend()``); raises when the requested one cannot."""
    backend = _validate(backend or get_backend())
    if name not in ALL_OPS:
        raise ValueError(f"molora_ops.backend: unknown op {name!r}")
    if backend == "reference":
        return "reference"
    if backend == "cuda":
        if not has_cuda_kernel(name):
            raise NotImplementedError(f"molora.{name}: no CUDA C++ kernel (in this build); use the "
                                      "'auto', 'triton' or 'reference' backend (MOLORA_BACKEND / "
                                      "use_backend)")
        return "cuda"  # float64 raises TypeError in the kernel's launcher
    if backend == "triton" and name in TRITON_OPS:
        if not has_triton():
            raise RuntimeError(f"molora.{name}: the 'triton' backend needs the triton package")
        if _has_float64(args):
            raise TypeError(f"molora.{name}: the Triton kernels take fp16/bf16/fp32, not float64; "
                            "use the 'reference' (or 'auto') backend")
        return "triton"
    # "auto", or "triton" for an op without a Triton kernel
    if _has_float64(args):
        return "reference"
    if has_cuda_kernel(name):
        return "cuda"
    if name in TRITON_OPS and has_triton():
        return "triton"
    return "reference"


def resolve(name: str, args=(), backend: Optional[str] = None) -> Tuple[str, Callable]:
    """(backend name, function) that runs op ``name`` on ``args`` (CUDA tensors, or CPU tensors
    under the Triton interpreter)."""
    chosen = choose(name, args, backend)
    if chosen == "cuda":
        return chosen, _cuda_kernel(name)
    return chosen, (_triton_launcher(name) if chosen == "triton" else _reference_fn(name))


def cuda_impl(name: str) -> Callable:
    """The function registered as ``molora::<name>``'s CUDA kernel: checks, then the backend."""
    meta_check = _meta_check(name)

    def impl(*args):
        chosen, fn = resolve(name, args)
        if chosen != "cuda":  # the CUDA C++ launchers run the same checks themselves
            meta_check(*args)
            if chosen == "triton":
                _VALUE_CHECKS[name](*args)
        return fn(*args)

    impl.__name__ = f"{name}_cuda_switch"
    return impl


SWITCHED_OPS: List[str] = []  # the ops whose CUDA kernel is the switch (filled at import)


def _register() -> None:
    if not has_extension():
        return
    for name in ALL_OPS:
        qualname = f"molora::{name}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"):
            continue  # not expected: the C++ kernels register under molora_cuda, not here
        torch.library.impl(qualname, "CUDA")(cuda_impl(name))
        SWITCHED_OPS.append(name)


_register()
