"""Routing statistics under ``torch.distributed`` (DDP, FSDP2): one switch and one reduction.

Gradients are averaged across ranks by the engines (DDP, FSDP2), but a statistic updated outside
autograd is not: the aux-loss-free selection bias of SMoRA / FlyLoRA (``rank_bias``) and of
``routing.SigmoidTopK`` (``bias``) follow ``b += u * sign(mean(c) - c)`` from the LOCAL expert
counts ``c`` of each rank, so the replicas drift apart and none of them follows the global batch.
``losses.aux_free_bias_update_`` therefore sums ``c`` over the process group (one
``all_reduce`` of an ``int64 [num_bins]`` tensor per update, before the bias moves) whenever a
group is initialised; the summed counts of the ranks' shards are the counts of the global batch,
so every replica applies the single-process global-batch update. No other collective is added.

The switch (see docs/DISTRIBUTED.md):

* ``set_sync_statistics(False)`` / ``use_sync_statistics(False)``: the global default (on);
* ``module.sync_statistics = False`` (a constructor argument of ``SMoRA`` / ``FlyLoRA``;
  ``MoLoRAConfig(..., method_kwargs={"sync_statistics": False})``): per module, overriding the
  default; ``None`` (the default) follows it;
* ``aux_free_bias_update_(..., sync=False)``: per call (``sync=None`` follows the default).

Off, each rank updates from its own counts (the per-rank behaviour of the reference code).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["set_sync_statistics", "sync_statistics", "use_sync_statistics",
           "statistics_sync_active", "all_reduce_counts_"]

_SYNC_STATISTICS = True


def set_sync_statistics(enabled: bool) -> None:
    """Set the global default: reduce routing statistics across the process group (True)."""
    global _SYNC_STATISTICS
    if not isinstance(enabled, bool):
        raise TypeError(f"molora.set_sync_statistics: enabled must be a bool, got "
                        f"{type(enabled).__name__}")
    _SYNC_STATISTICS = enabled


def sync_statistics() -> bool:
    """The global default (True unless set otherwise)."""
    return _SYNC_STATISTICS


@contextlib.contextmanager
def use_sync_statistics(enabled: bool) -> Iterator[None]:
    """Set the global default inside a ``with`` block (restored on exit)."""
    old = _SYNC_STATISTICS
    set_sync_statistics(enabled)
    try:
        yield
    finally:
        set_sync_statistics(old)


def statistics_sync_active(sync: Optional[bool] = None) -> bool:
    """Whether a statistic update reduces across ranks now: the switch (``sync``, else the
    global default) is on AND a default process group is initialised. Pure Python: no tensor
    is read."""
    enabled = _SYNC_STATISTICS if sync is None else bool(sync)
    if not enabled:
        return False
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def all_reduce_counts_(counts: torch.Tensor, sync: Optional[bool] = None,
                       group=None) -> torch.Tensor:
    """Sum ``counts`` over the process group in place when ``statistics_sync_active(sync)``;
    returns ``counts``. Integer counts sum exactly, so the result does not depend on the
    reduction order. No tensor is read on the host (a NCCL all_reduce is enqueued on the
    stream)."""
    if statistics_sync_active(sync):
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=group)
    return counts
