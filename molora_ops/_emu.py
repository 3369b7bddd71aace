"""Loader of the CPU emulation of the CUDA kernels (test-only; not imported by ``import molora_ops``).

The emulation library compiles the CUDA kernels + launchers (csrc/cuda/*.cu) with the host compiler
(csrc/emu/cuda_emu.h: every CUDA thread is a host thread) and registers them as
``torch.ops.molora_emu.<op>`` taking CPU tensors. Two builds exist:

* ``molora_ops._C_emu``: every launcher file, built with the package by developer / CI builds
  only (CMake target ``_C_emu``; ``MOLORA_DEV_BUILD=1`` or ``MOLORA_BUILD_EMU=1``, as
  scripts/setup.sh does; a user install never has it);
* a library built by ``scripts/build_emu.py --source csrc/cuda/<family>.cu --build-dir DIR`` from
  some launcher files only; point ``MOLORA_EMU_LIB`` at the printed path to use it instead.

Only one of them may be loaded into a process (both register the ``molora_emu`` op library).
The schemas of ``molora_emu`` are those of ``torch.ops.molora`` (declared in ``molora_ops/ops/``),
defined here after the library is loaded; the module's host value-check flag follows
``molora_ops.set_value_checks`` as ``molora_ops._C``'s does.
"""
from __future__ import annotations

import os
import threading

import torch

from molora_ops import _checks

_lock = threading.Lock()
_loaded: str | None = None


def load_emu() -> str:
    """Load the emulation library once; returns what was loaded (a path or the module name).

    ``MOLORA_EMU_LIB`` (a .so from scripts/build_emu.py) wins over ``molora_ops._C_emu``.
    Raises ImportError when neither is available. Idempotent.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        lib = os.environ.get("MOLORA_EMU_LIB", "").strip()
        if lib:
            if not os.path.isfile(lib):
                raise ImportError(f"MOLORA_EMU_LIB={lib!r}: no such file (build it with scripts/build_emu.py)")
            torch.ops.load_library(lib)
            _loaded = os.path.abspath(lib)
            _define_schemas()
            return _loaded
        try:
            import molora_ops._C_emu  # noqa: F401  (static initialisers register torch.ops.molora_emu)
        except ImportError as exc:
            raise ImportError(
                "molora_ops._C_emu (CPU emulation of the CUDA kernels, test-only) is not built: a "
                "user install does not have it; build the package as developers do "
                "(scripts/setup.sh, or MOLORA_DEV_BUILD=1 pip install --no-build-isolation -e .), or "
                "build some launcher files with scripts/build_emu.py and set MOLORA_EMU_LIB to the "
                "printed path "
                f"({exc})"
            ) from exc
        _loaded = "molora_ops._C_emu"
        _define_schemas()
        from molora_ops import _C_emu
        _checks.add_native_module(_C_emu)
        return _loaded


_EMU_LIB: list = []


def _define_schemas() -> None:
    from molora_ops.ops import OPS
    lib = torch.library.Library("molora_emu", "FRAGMENT")
    for opdef in OPS.values():
        lib.define(opdef.schema)
    _EMU_LIB.append(lib)  # kept alive: the definitions go with the Library object


def has_emu_kernel(name: str) -> bool:
    """Whether the loaded emulation library has a kernel for op ``name`` (call load_emu() first)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"molora_emu::{name}", "CPU")
