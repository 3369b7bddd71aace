"""Host-side helpers shared by the Triton launchers (``sgmv.py``, ``gated.py``, ``masked.py``)."""

from __future__ import annotations

from typing import Optional

import torch
import triton

__all__ = ["reject_float64", "index32", "pow2_clamp", "dot_block", "MIN_DOT_BLOCK"]

# The smallest tile dimension a tl.dot accepts (the tensor-core minimum).
MIN_DOT_BLOCK = 16


def reject_float64(data: torch.Tensor, *operands: Optional[torch.Tensor]) -> None:
    """The kernels take fp16/bf16/fp32 data; float64 data goes to the reference backend.

    ``data`` (the op's first tensor) decides. The other operands are either data of its dtype
    (banks, ``base``: the metadata checks require that) or routing operands (weights, gate,
    scales), which the contract lets have any float dtype and which the kernels load as fp32: a
    float64 gate next to fp32 data is valid input, not a reason to refuse the launch. Listing them
    here keeps the call sites self-describing; ``None`` entries are absent optional operands."""
    del operands
    if data.dtype == torch.float64:
        raise TypeError("molora triton: float64 is not supported for the data; use the reference "
                        "backend")


def index32(t: torch.Tensor) -> torch.Tensor:
    """Index tensors enter the kernels as contiguous int32 (the op contract accepts int64 and any
    strides); no copy when ``t`` already is one."""
    return t.to(torch.int32).contiguous()


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    """The next power of two >= n (n < 1 counts as 1), clamped to [lo, hi] (lo, hi powers of
    two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def dot_block(n: int, hi: int) -> int:
    """A tile dimension that enters a tl.dot: the next power of two >= n in [MIN_DOT_BLOCK, hi],
    so a small dimension (a LoRA rank, a decode batch) is not padded to the full tile."""
    return pow2_clamp(n, MIN_DOT_BLOCK, hi)
