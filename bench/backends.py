"""The registry of molora_ops backends the benchmark times: one entry per backend.

A backend is a namespace of functions with the signatures of the ``molora_ops`` wrappers
(docs/OPS.md). Adding one (a Triton module, a CUDA C++ build exposed separately) is one
``Backend(...)`` line below; its rows then appear on every device it lists, for every op whose
kernels it has. ``load`` raises (ImportError, RuntimeError) when the backend is absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    about: str
    load: Callable[[], Any]
    devices: Tuple[str, ...]
    # True: the namespace serves only ops that have a native (C++) kernel for the device.
    needs_kernels: bool = False


def _reference():
    import molora_ops
    return molora_ops.reference


def _native():
    import molora_ops
    if not molora_ops.has_extension():
        raise ImportError(f"native extension not loaded: {molora_ops.extension_error()}")
    return molora_ops


class _Switched:
    """``molora_ops.<op>`` (torch.ops.molora, autograd included) run under
    ``molora_ops.use_backend(name)``: the CUDA kernels that backend binds."""

    def __init__(self, ops_ns: Any, name: str):
        self._ops, self._name = ops_ns, name

    def scope(self):
        """The backend switch, entered once around all of an implementation's calls (the runner:
        Impl.scope); each call's own switch is then free. A switch per call added ~0.4 ms of host
        time (binding every op's CUDA kernels, and back) to each timed call."""
        return self._ops.use_backend(self._name)

    def __getattr__(self, op: str):
        fn = getattr(self._ops, op)

        def run(*args, **kwargs):
            with self._ops.use_backend(self._name):
                return fn(*args, **kwargs)
        return run


def _switched(name: str):
    def load():
        ops_ns = _native()
        if name == "triton" and not ops_ns.backend.has_triton():
            raise ImportError("triton is not installed")
        if name == "cuda" and not any(map(ops_ns.backend.has_cuda_kernel, ops_ns.ALL_OPS)):
            raise ImportError("this build of molora_ops._C has no CUDA C++ kernels")
        return _Switched(ops_ns, name)
    return load


BACKENDS: Tuple[Backend, ...] = (
    Backend("reference", "pure-PyTorch oracle, molora_ops.reference.<op>", _reference,
            ("cpu", "cuda")),
    Backend("native", "molora_ops.<op> wrappers -> torch.ops.molora (C++ CPU kernels)",
            _native, ("cpu",), needs_kernels=True),
    Backend("triton", "torch.ops.molora with use_backend('triton'): Triton kernels "
            "(reference for ops without one)", _switched("triton"), ("cuda",)),
    Backend("cuda", "torch.ops.molora with use_backend('cuda'): CUDA C++ kernels",
            _switched("cuda"), ("cuda",)),
)


def kernel_key(device: torch.device) -> str:
    return "CUDA" if device.type == "cuda" else "CPU"


def missing_kernels(ops: Sequence[str], device: torch.device) -> list:
    """Ops of `ops` with no native (C++) kernel for the device."""
    from molora_ops.ops import OPS
    key = kernel_key(device)
    return [op for op in ops if key not in OPS[op].native_kernels]


def resolve(backend: Backend, ops: Sequence[str], device: torch.device
            ) -> Tuple[Optional[Any], str]:
    """(namespace, "") when `backend` can run every op of `ops` on the device, else (None, why)."""
    if device.type not in backend.devices:
        return None, f"not built for {device.type}"
    try:
        ns = backend.load()
    except Exception as exc:  # absent backend: ImportError, or a broken build
        return None, f"absent ({type(exc).__name__}: {exc})"
    if backend.needs_kernels or backend.name == "cuda":
        missing = missing_kernels(ops, device)
        if missing:
            return None, f"no {kernel_key(device)} kernel for {', '.join(missing)}"
    return ns, ""


def describe(device: torch.device) -> dict:
    """{backend: {"available": bool, "about": str, "reason": str}} for the JSON header."""
    out = {}
    for b in BACKENDS:
        ns, why = resolve(b, (), device)
        out[b.name] = {"available": ns is not None, "about": b.about, "reason": why}
    return out
