"""Tiny helpers shared by the pure-PyTorch reference ops.

The ``check_*`` functions raise the op contract's errors for *data-dependent* problems only
(values of index / offset tensors, ``max_rank``).  Shape, dtype and device checks live elsewhere.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "opmath_dtype",
    "topk_ids",
    "check_ids_in_range",
    "check_rank_offsets",
    "check_max_rank",
    "check_expert_offsets",
]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / routing dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_ids(key: torch.Tensor, k: int) -> torch.Tensor:
    """int64 ids of the k largest entries of ``key`` along the last dim, sorted by descending key,
    ties broken toward the lower id (a stable descending sort keeps the lower index first)."""
    _, order = torch.sort(key.detach(), dim=-1, descending=True, stable=True)
    return order[..., :k]


def _op_name(op: str) -> str:
    return op if op.startswith("molora.") else f"molora.{op}"


def check_ids_in_range(name: str, op: str, ids: torch.Tensor, lo: int, hi: int) -> None:
    """IndexError unless every value of ``ids`` lies in ``[lo, hi)``.

    Message: ``molora.<op>: <name> has values outside [lo, hi)``.
    """
    if ids.numel() == 0:
        return
    mn, mx = int(ids.min()), int(ids.max())
    if mn < lo or mx >= hi:
        raise IndexError(
            f"{_op_name(op)}: {name} has values outside [{lo}, {hi}) (min {mn}, max {mx})"
        )


def check_rank_offsets(
    op: str, rank_offsets: torch.Tensor, total_rank: int, name: str = "rank_offsets"
) -> None:
    """``rank_offsets [E+1]`` must be non-decreasing (else ValueError: negative rank), start at 0
    (else IndexError: offsets out of range) and end at the bank's ``total_rank`` (else ValueError:
    the bank's shape disagrees)."""
    ro = rank_offsets.long()
    if ro.numel() > 1 and bool((ro[1:] < ro[:-1]).any()):
        raise ValueError(
            f"{_op_name(op)}: {name} must be non-decreasing (negative rank): {ro.tolist()}"
        )
    if ro.numel() > 0 and int(ro[0]) != 0:
        raise IndexError(
            f"{_op_name(op)}: {name} has values outside [0, R]: {name}[0] must be 0, "
            f"got {int(ro[0])}"
        )
    if ro.numel() > 0 and int(ro[-1]) != total_rank:
        raise ValueError(
            f"{_op_name(op)}: {name}[-1] = {int(ro[-1])} must equal the bank's total rank "
            f"R = {total_rank} (A.shape[0] / B.shape[1])"
        )


def check_max_rank(op: str, rank_offsets: torch.Tensor, max_rank: int) -> None:
    """ValueError if ``max_rank`` is smaller than the largest per-expert rank."""
    ro = rank_offsets.long()
    largest = int((ro[1:] - ro[:-1]).max()) if ro.numel() > 1 else 0
    if max_rank < largest:
        raise ValueError(
            f"{_op_name(op)}: max_rank ({max_rank}) is smaller than the largest expert rank "
            f"({largest})"
        )


def check_expert_offsets(
    op: str, expert_offsets: torch.Tensor, num_rows: int, name: str = "expert_offsets"
) -> None:
    """IndexError unless ``expert_offsets [E+1]`` starts at 0, is non-decreasing and ends at or
    before ``num_rows`` (= P, the dispatched row count)."""
    eo = expert_offsets.long()
    if eo.numel() == 0:
        return
    bad_order = eo.numel() > 1 and bool((eo[1:] < eo[:-1]).any())
    if int(eo[0]) != 0 or bad_order or int(eo[-1]) > num_rows:
        raise IndexError(
            f"{_op_name(op)}: {name} has values outside [0, {num_rows}] or is not a "
            f"non-decreasing sequence starting at 0: {eo.tolist()}"
        )


def tsallis_entropy_parts(probs: torch.Tensor, q: float, eps: float):
    """(Tsallis_q entropy of ``probs + eps`` along the last dim, its maximum over E experts):
    ``(1 - sum pe^q) / (q - 1)`` and ``(1 - E^(1-q)) / (q - 1)``; Shannon ``-sum pe log pe`` and
    ``log E`` when q == 1 (DynMoLE ``moe_utils.tsallis_entropy``). Shared by ``softmax_topp``'s
    entropy gate and ``modules.losses.tsallis_entropy`` so the two can never disagree."""
    pe = probs + eps
    E = pe.shape[-1]
    if q == 1:
        return -(pe * pe.log()).sum(-1), math.log(E)
    return (1.0 - (pe**q).sum(-1)) / (q - 1), (1.0 - E ** (1.0 - q)) / (q - 1)
