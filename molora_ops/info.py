"""``python -m molora_ops.info``: versions, and which backend serves each op on each device."""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import __version__
from . import backend
from ._extension import extension_error, has_extension
from ._checks import value_checks
from .ops import ALL_OPS, BACKWARD_OPS, OPS


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # not installed, or broken without a GPU driver
        return "not installed"
    return triton.__version__


_NAMES = {"cuda": "CUDA C++", "triton": "Triton", "reference": "reference (PyTorch)",
          "none": "none (raises)"}


def op_backends() -> dict[str, dict[str, str]]:
    """For every op: the implementation that runs for CPU and for CUDA tensors (bound when
    molora_ops was imported; ``use_backend`` / ``set_backend`` re-bind the CUDA ones)."""
    return {name: {"CPU": "C++" if "CPU" in OPS[name].native_kernels else _NAMES["reference"],
                   "CUDA": _NAMES[backend.serving(name)]}
            for name in ALL_OPS}


def main() -> None:
    print(f"molora_ops {__version__}")
    print(f"python     {platform.python_version()} ({platform.machine()})")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton     {_triton_version()}")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"CUDA       available: {cuda}; device: {device}")
    print(f"extension  {'molora_ops._C loaded' if has_extension() else 'NOT loaded: ' + str(extension_error())}")
    emu = importlib.util.find_spec(f"{__package__}._C_emu") is not None
    print(f"test-only  molora_ops._C_emu (CPU emulation of the CUDA kernels): "
          f"{'present (developer build)' if emu else 'absent'}")
    print(f"backend    {backend.get_backend()} (MOLORA_BACKEND / molora_ops.set_backend / use_backend; "
          f"one of {', '.join(backend.BACKENDS)})")
    print(f"values     {value_checks()} (MOLORA_CHECK_VALUES / molora_ops.set_value_checks; "
          "docs/OPS.md \"Value checks\")")
    par = [ln.strip() for ln in torch.__config__.parallel_info().splitlines()
               if "parallel backend" in ln]
    print(f"threads    {torch.get_num_threads()} ({par[0] if par else 'unknown backend'})")
    print()
    print(f"{'op':40s} {'CPU':22s} {'CUDA':22s}")
    for name, row in op_backends().items():
        kind = " (backward)" if name in BACKWARD_OPS else ""
        print(f"{name + kind:40s} {row['CPU']:22s} {row['CUDA']:22s}")
    print("\nfloat64 runs on the reference on CUDA (the kernels take fp16/bf16/fp32).")


if __name__ == "__main__":
    main()
