"""Loading of the native extension ``molora_ops._C``.

Importing ``_C`` runs the static ``TORCH_LIBRARY_IMPL(molora, ...)`` registrations: the C++ CPU
kernels, and in a CUDA build the CUDA kernels, of ``torch.ops.molora.*`` (whose schemas are
declared in Python, ``molora_ops/ops/``). When it is missing or fails to load (or
``MOLORA_DISABLE_EXT=1``), the package still imports: the reference serves every op on CPU, and
the Triton kernels (or the reference) on CUDA; a single warning says so.
"""

from __future__ import annotations

import os
import warnings

_EXT_ERROR: str | None = None

if os.environ.get("MOLORA_DISABLE_EXT", "0") not in ("", "0"):
    _EXT_ERROR = "disabled by MOLORA_DISABLE_EXT"
else:
    try:
        from . import _C  # registers the C++ kernels of torch.ops.molora
    except Exception as exc:  # ImportError, or an OSError from a broken build
        _EXT_ERROR = f"{type(exc).__name__}: {exc}"
    else:
        from ._checks import add_native_module
        add_native_module(_C)

if _EXT_ERROR is not None:
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None and "MOLORA_DISABLE_EXT" not in _EXT_ERROR:
        # A pure-Python install: a plain `pip install .` builds in pip's isolated environment,
        # which has no torch to compile against.
        _EXT_ERROR = ("molora_ops was installed without it (pure-Python install; a plain "
                      "`pip install .` builds without torch)")
    warnings.warn(
        f"molora_ops: native extension not loaded ({_EXT_ERROR}); the ops run the pure-PyTorch "
        "reference on CPU and the Triton kernels (or the reference) on CUDA. For the native "
        "kernels install with `pip install --no-build-isolation .` in the torch environment.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_extension() -> bool:
    """True when ``molora_ops._C`` is loaded and ``torch.ops.molora`` exists."""
    return _EXT_ERROR is None


def extension_error() -> str | None:
    """Why the extension is not loaded (None when it is)."""
    return _EXT_ERROR
