"""Helpers of the tests that run the CUDA kernels in CPU emulation (torch.ops.molora_emu).

The emulation library (molora_ops._C_emu, or a scripts/build_emu.py build named by MOLORA_EMU_LIB)
compiles csrc/cuda/*.cu with the host compiler (csrc/emu/cuda_emu.h). See molora_ops/_emu.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from molora_ops._emu import has_emu_kernel, load_emu

__all__ = ["require_emu", "has_emu_kernel", "emu_op", "KERNEL_DTYPES", "DT_IDS"]

# the dtypes the CUDA kernels are instantiated for (float64 goes to the reference)
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def require_emu():
    """Load the emulation library and return ``torch.ops.molora_emu``.

    Skips the calling test module when molora_ops._C_emu is not built (a user build: no
    MOLORA_DEV_BUILD / MOLORA_BUILD_EMU, or a pure-Python install), unless MOLORA_REQUIRE_EMU=1 (then it fails). A MOLORA_EMU_LIB that cannot
    be loaded is always an error: somebody asked for that library.
    """
    try:
        load_emu()
    except ImportError as exc:
        if os.environ.get("MOLORA_EMU_LIB", "").strip() or os.environ.get("MOLORA_REQUIRE_EMU", "0") not in ("", "0"):
            raise
        pytest.skip(f"CUDA emulation module not built: {exc}", allow_module_level=True)
    return torch.ops.molora_emu


def emu_op(name: str):
    """``torch.ops.molora_emu.<name>``; skips the test when the loaded library has no kernel for it
    (its launcher file is not written yet, or not part of this scripts/build_emu.py build)."""
    require_emu()
    if not has_emu_kernel(name):
        pytest.skip(f"no molora_emu kernel for {name!r} in the loaded emulation library "
                    "(its csrc/cuda launcher is missing or not compiled into this build)")
    return getattr(torch.ops.molora_emu, name)


def raises_on_both_paths(fn, exc, match=None):
    """The GPU path's two value-check modes on a bad input: the opt-in host mode raises ``exc``
    (the CPU launchers' class and message; returned), and the default mode either stops the kernel
    with its device assert or (an argument no kernel of the op reads) runs, but never raises a
    host error, i.e. reads no data on the host. Non-value errors (shapes, dtypes) raise the same
    in both modes."""
    import molora_ops
    with molora_ops.use_value_checks("host"), pytest.raises(exc, match=match) as info:
        fn()
    if exc is IndexError:
        try:
            fn()
        except RuntimeError as err:
            assert "device-side assert" in str(err) and not isinstance(err, IndexError), err
    else:
        with pytest.raises(exc, match=match):
            fn()
    return info.value


def assert_float64_runs_the_reference(fn, reference_fn):
    """float64 data on a CUDA launcher: handed to the op's reference (molora_ref), bit-equal."""
    got, want = fn(), reference_fn()
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
