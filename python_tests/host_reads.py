"""Counting host reads of tensor data (test helper).

On a GPU every Python-level read of tensor data (``.item()``, ``if t:``, ``int(t)``, a boolean-mask
gather whose size depends on the data, ...) waits for the stream: a host synchronisation, and a
graph break under ``torch.compile``. ``count_host_reads()`` patches the torch entry points that
read data and records each call made while it is active, with its call site, so a test can assert
that a forward / backward / aux loss makes none (docs/DESIGN.md "The GPU hot path")::

    with count_host_reads() as reads:
        loss = layer.aux_loss(routing); loss.backward()
    assert not reads.under("molora_ops/modules/"), reads.report()

It counts reads that go through Python (the patched functions); a read made inside C++ (a native
op reading its own input) is invisible here. The data is read on CPU tensors too, so the count
is the same on any device: what is counted is a read that WOULD synchronise on a GPU (``.cpu()``
of a CPU tensor counts; ``.to("cpu")`` / ``copy_`` into a CPU tensor count only from another
device, as on CPU they are plain copies).

Counted: ``Tensor.item / tolist / numpy / cpu``, ``__bool__ / __int__ / __float__ / __complex__ /
__index__`` (``if t``, ``int(t)``, ``range(t)``, ``t.any()`` used as a bool), ``__format__`` /
``__repr__`` (printing), ``Tensor.to`` / ``Tensor.copy_`` to the CPU from another device,
``nonzero`` / ``argwhere`` (``torch.`` and ``Tensor.``; ``torch.nonzero_static`` is not counted),
one-argument ``torch.where``, ``unique`` / ``unique_consecutive``, ``masked_select``,
``__getitem__`` / ``__setitem__`` with a bool tensor index, ``repeat_interleave`` with tensor
repeats and no ``output_size``, ``torch.equal`` / ``allclose`` / ``is_nonzero`` (Python bools).
A read made inside another counted call (``Tensor.unique`` -> ``torch.unique``, ``repr`` ->
``item``) counts once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from typing import Callable, Iterator, List, Optional

import torch

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def _package_root() -> str:
    import molora_ops
    return os.path.dirname(os.path.dirname(os.path.abspath(molora_ops.__file__))) + os.sep


_PKG_PARENT = _package_root()
_PKG_DIR = _PKG_PARENT + "molora_ops" + os.sep


_TORCH = "<torch>"


@dataclasses.dataclass(frozen=True)
class HostRead:
    """One counted read. ``site``: ``path:line (function)`` of the innermost frame outside torch
    (the code that asked for the data); ``path``: that file, relative to the repository root
    (``molora_ops/modules/losses.py``) when it is in the package, else absolute. ``chain``: the
    frames from the site outwards (same format, ``"<torch>"`` for a run of torch frames, at most
    16 entries), to tell which module or op led there."""

    kind: str
    path: str
    line: int
    function: str
    chain: tuple = ()

    @property
    def site(self) -> str:
        return f"{self.path}:{self.line} ({self.function})"

    @property
    def via(self) -> tuple:
        """The package frames further out than the site (innermost first, at most 4)."""
        return tuple(e for e in self.chain[1:] if e.startswith("molora_ops/"))[:4]

    def in_package(self, *prefixes: str) -> bool:
        """Whether the site lies under one of ``prefixes`` (e.g. ``"molora_ops/modules/"``)."""
        return any(self.path.startswith(p) for p in prefixes)

    def made_by(self, prefixes, boundaries=()) -> bool:
        """Whether code under ``prefixes`` made the read: at the site, or in a helper it calls
        directly. Walking out from the site, the first frame under ``prefixes`` decides, unless
        torch frames (an op dispatch, autograd), a file outside the package, or a frame under
        ``boundaries`` (an op's public wrapper) come first."""
        for entry in self.chain:
            if entry.startswith(tuple(prefixes)):
                return True
            if entry == _TORCH or not entry.startswith("molora_ops/") or \
                    entry.startswith(tuple(boundaries)):
                return False
        return False


class HostReads:
    """The reads recorded by one ``count_host_reads()`` block."""

    def __init__(self):
        self.records: List[HostRead] = []

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[HostRead]:
        return iter(self.records)

    def kinds(self) -> List[str]:
        return [r.kind for r in self.records]

    def made_by(self, prefixes, boundaries=()) -> List[HostRead]:
        """The reads made by code under ``prefixes`` (``HostRead.made_by``)."""
        return [r for r in self.records if r.made_by(prefixes, boundaries)]

    def under(self, *prefixes: str) -> List[HostRead]:
        """The reads whose site is under one of ``prefixes`` (paths relative to the repository)."""
        return [r for r in self.records if r.in_package(*prefixes)]

    def report(self, records: Optional[List[HostRead]] = None) -> str:
        """One line per distinct (kind, site, package frames leading there), with its count."""
        records = self.records if records is None else records
        counts: dict = {}
        for r in records:
            counts[(r.kind, r.site, r.via)] = counts.get((r.kind, r.site, r.via), 0) + 1
        lines = [f"{len(records)} host read(s):"]
        for (kind, site, via), n in counts.items():
            lines.append(f"  {n} x {kind} at {site}" + (f"  <- {' <- '.join(via)}" if via else ""))
        return "\n".join(lines)


# The active block's records are global: autograd runs a CUDA backward on its own device thread.
# The nesting guard is per thread.
_ACTIVE: List[Optional[HostReads]] = [None]
_state = threading.local()


def _active() -> Optional[HostReads]:
    return _ACTIVE[0]


def _rel(filename: str) -> str:
    f = os.path.abspath(filename)
    return f[len(_PKG_PARENT):] if f.startswith(_PKG_DIR) else f


def _record(kind: str) -> None:
    reads = _active()
    if reads is None:
        return
    frame = sys._getframe(2)  # skip _record and the wrapper
    chain: list = []
    site = None
    while frame is not None and len(chain) < 16:
        fn = os.path.abspath(frame.f_code.co_filename)
        if fn.startswith(_TORCH_DIR):
            if chain and chain[-1] != _TORCH:
                chain.append(_TORCH)
        elif fn != _THIS_FILE:
            if site is None:
                site = (_rel(fn), frame.f_lineno, frame.f_code.co_name)
            chain.append(f"{_rel(fn)}:{frame.f_lineno} ({frame.f_code.co_name})")
        frame = frame.f_back
    if site is None:
        site = (_TORCH, 0, "?")
    reads.records.append(HostRead(kind, *site, chain=tuple(chain)))


def _guarded(orig: Callable, kind: str, when: Optional[Callable] = None,
             after: Optional[Callable] = None) -> Callable:
    """``orig`` wrapped to record one read of ``kind`` (when ``when(*args, **kwargs)`` or, after
    the call, ``after(result, *args, **kwargs)``); a call nested in a counted one is not counted."""

    def wrapper(*args, **kwargs):
        if _active() is None or getattr(_state, "depth", 0):
            return orig(*args, **kwargs)
        counted = when is None and after is None or (when is not None and when(*args, **kwargs))
        if counted:
            _record(kind)
        _state.depth = 1
        try:
            out = orig(*args, **kwargs)
        finally:
            _state.depth = 0
        if after is not None and not counted and after(out, *args, **kwargs):
            _record(kind)
        return out

    wrapper.__name__ = getattr(orig, "__name__", kind)
    wrapper.__qualname__ = getattr(orig, "__qualname__", kind)
    wrapper.__doc__ = getattr(orig, "__doc__", None)
    wrapper.__wrapped__ = orig
    return wrapper


def _is_cpu(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _bool_index(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _getitem_bool(self, index, *rest) -> bool:
    return _bool_index(index)


def _tensor_repeats(*args, **kwargs) -> bool:
    """``repeat_interleave`` reads its repeats when they are a tensor and no ``output_size`` (a
    keyword) is given: ``torch.repeat_interleave(repeats)``, ``(input, repeats_tensor)``,
    ``t.repeat_interleave(repeats_tensor)``. Int repeats are static."""
    if kwargs.get("output_size") is not None:
        return False
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    if repeats is None:  # the one-argument form: the input is the repeats
        return True
    return isinstance(repeats, torch.Tensor)


def _one_arg_where(*args, **kwargs) -> bool:
    return len(args) + len(kwargs) == 1


def _to_cpu_from_other(out, self, *args, **kwargs) -> bool:
    return _is_cpu(out) and isinstance(self, torch.Tensor) and not _is_cpu(self)


def _copy_to_cpu_from_other(out, self, src, *args, **kwargs) -> bool:
    return _is_cpu(self) and isinstance(src, torch.Tensor) and not _is_cpu(src)


# (owner, attribute, kind, when, after)
def _patches():
    T = torch.Tensor
    p = []
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__",
                 "__complex__", "__index__", "__format__", "__repr__"):
        p.append((T, name, name, None, None))
    p += [
        (T, "to", "to(cpu)", None, _to_cpu_from_other),
        (T, "copy_", "copy_(cpu <- device)", None, _copy_to_cpu_from_other),
        (T, "nonzero", "nonzero", None, None),
        (torch, "nonzero", "nonzero", None, None),
        (T, "argwhere", "argwhere", None, None),
        (torch, "argwhere", "argwhere", None, None),
        (torch, "where", "where(cond)", _one_arg_where, None),
        (T, "unique", "unique", None, None),
        (torch, "unique", "unique", None, None),
        (T, "unique_consecutive", "unique_consecutive", None, None),
        (torch, "unique_consecutive", "unique_consecutive", None, None),
        (T, "masked_select", "masked_select", None, None),
        (torch, "masked_select", "masked_select", None, None),
        (T, "__getitem__", "x[bool mask]", _getitem_bool, None),
        (T, "__setitem__", "x[bool mask] =", _getitem_bool, None),
        (T, "repeat_interleave", "repeat_interleave(tensor repeats)", _tensor_repeats, None),
        (torch, "repeat_interleave", "repeat_interleave(tensor repeats)", _tensor_repeats, None),
        (T, "equal", "equal", None, None),
        (torch, "equal", "equal", None, None),
        (T, "allclose", "allclose", None, None),
        (torch, "allclose", "allclose", None, None),
        (torch, "is_nonzero", "is_nonzero", None, None),
    ]
    return p


_MISSING = object()


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Records every Python-level host read of tensor data made while active (in any thread:
    autograd's device threads too); yields the ``HostReads``. The patches are process-wide and
    removed on exit; blocks do not nest."""
    if _active() is not None:
        raise RuntimeError("count_host_reads() blocks do not nest")
    reads = HostReads()
    saved = []
    try:
        for owner, name, kind, when, after in _patches():
            own = owner.__dict__.get(name, _MISSING)
            saved.append((owner, name, own))
            setattr(owner, name, _guarded(getattr(owner, name), kind, when, after))
        _ACTIVE[0] = reads
        yield reads
    finally:
        _ACTIVE[0] = None
        for owner, name, own in reversed(saved):
            if own is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
