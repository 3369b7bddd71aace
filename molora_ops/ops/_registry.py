"""How every op is wired: the native op when the extension is loaded, else the reference.

Each op module defines, per op, a check function (metadata only), a fake kernel built on it, an
autograd formula, and a typed wrapper; ``register`` attaches the fake and autograd to
``molora::<name>`` once, for every backend.
"""

from __future__ import annotations

import torch

from .._checks import opmath_dtype
from .._extension import has_extension


def native(name: str):
    """The OpOverload ``torch.ops.molora.<name>.default`` (extension required)."""
    return getattr(torch.ops.molora, name).default


def register(name: str, fake, backward=None, setup_context=None) -> None:
    if not has_extension():
        return
    qualname = f"molora::{name}"
    torch.library.register_fake(qualname)(fake)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def call(name: str, check, reference_fn, *args):
    """Runs the native op, or (no extension) the metadata checks and then the reference."""
    if has_extension():
        return native(name)(*args)
    check(*args)
    return reference_fn(*args)


def opmath(*tensors):
    """The tensors in their opmath dtype (fp32 for fp16/bf16; no copy for fp32/fp64)."""
    return tuple(t.to(opmath_dtype(t.dtype)) for t in tensors)
