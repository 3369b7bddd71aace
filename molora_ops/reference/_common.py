"""Tiny helpers shared by the pure-PyTorch reference ops.

The checks of the op contract (metadata and values) live in ``molora_ops._checks``.
"""

from __future__ import annotations

import math

import torch

from .._checks import opmath_dtype  # noqa: F401  (one definition)

__all__ = ["opmath_dtype", "topk_ids", "tsallis_entropy_parts"]


def topk_ids(key: torch.Tensor, k: int) -> torch.Tensor:
    """int64 ids of the k largest entries of ``key`` along the last dim, sorted by descending key,
    ties broken toward the lower id (a stable descending sort keeps the lower index first)."""
    _, order = torch.sort(key.detach(), dim=-1, descending=True, stable=True)
    return order[..., :k]


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

