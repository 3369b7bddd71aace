"""``python -m molora_ops.info``: versions, and which backend serves each op on each device."""

from __future__ import annotations

import platform

import torch

from . import __version__
from . import backend
from ._extension import extension_error, has_extension
from .ops import ALL_OPS, BACKWARD_OPS


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # not installed, or broken without a GPU driver
        return "not installed"
    return triton.__version__


def _switched(name: str) -> str:
    """What the backend switch runs for op ``name`` on CUDA tensors now."""
    try:
        chosen = backend.choose(name)
        return {"cuda": "CUDA C++", "triton": "Triton"}.get(chosen, chosen) + " (switch)"
    except (NotImplementedError, RuntimeError) as exc:  # the requested backend cannot run it
        return f"none: {type(exc).__name__}"


def op_backends() -> dict[str, dict[str, str]]:
    """For every op: the implementation that runs for CPU and for CUDA tensors."""
    table = {}
    for name in ALL_OPS:
        row = {}
        for key in ("CPU", "CUDA"):
            if not has_extension():
                row[key] = "reference (PyTorch)"
                continue
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"molora::{name}", key)
            if key == "CUDA" and name in backend.SWITCHED_OPS:
                row[key] = _switched(name)
            else:
                row[key] = ("C++" if key == "CPU" else "CUDA C++") if has else "-"
        table[name] = row
    return table


def main() -> None:
    print(f"molora_ops {__version__}")
    print(f"python     {platform.python_version()} ({platform.machine()})")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton     {_triton_version()}")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"CUDA       available: {cuda}; device: {device}")
    print(f"extension  {'molora_ops._C loaded' if has_extension() else 'NOT loaded: ' + str(extension_error())}")
    print(f"backend    {backend.get_backend()} (MOLORA_BACKEND / molora_ops.set_backend / use_backend; "
          f"one of {', '.join(backend.BACKENDS)})")
    par = [ln.strip() for ln in torch.__config__.parallel_info().splitlines()
               if "parallel backend" in ln]
    print(f"threads    {torch.get_num_threads()} ({par[0] if par else 'unknown backend'})")
    print()
    print(f"{'op':40s} {'CPU':22s} {'CUDA':22s}")
    for name, row in op_backends().items():
        kind = " (backward)" if name in BACKWARD_OPS else ""
        print(f"{name + kind:40s} {row['CPU']:22s} {row['CUDA']:22s}")
    if has_extension():
        print("\n'-': no native kernel for that device yet; calling the op there raises "
              "NotImplementedError (it never falls back silently). '(switch)': the backend switch "
              "picks the implementation at call time.")


if __name__ == "__main__":
    main()
