"""Every check of every op, in one module.

* Metadata checks (shapes, dtypes, devices, options): read no tensor data, so they also run on
  fake tensors. The fake kernels run them (``torch.compile`` reports bad input at trace time), and
  so do the Python-served kernels (Triton launchers, the reference).
* Value checks (index ranges, offsets): they read the data. Where they run is the value-check
  mode (``set_value_checks``, env ``MOLORA_CHECK_VALUES``; docs/OPS.md "Value checks"):

  - ``"auto"`` (default): on the host for CPU tensors in eager mode (free there, clear errors);
    on the device for CUDA tensors, as ``torch._assert_async`` (no host synchronisation; a bad
    value stops the stream with a device-side assert, as PyTorch's own index kernels do) and so
    also while ``torch.compile`` traces;
  - ``"host"``: on the host everywhere (each check synchronises; clear ValueError / IndexError
    messages with the offending values, for debugging);
  - ``"device"``: as on CUDA, for every device (tests of the GPU path on CPU tensors).

  On CUDA the device checks of one Triton-served op call are gathered (``one_launch``) and run
  as one Triton kernel (``molora_ops/triton/checks.py``) and one ``torch._assert_async``, not as
  the 3-5 tiny kernels each condition costs as a torch composite (~30 a grouped matmul).

  The C++ CUDA launchers follow the same switch (their kernels assert on the device;
  ``MOLORA_CHECK_VALUES=1`` adds the host checks); the C++ CPU launchers always check on the host.

The C++ launchers make the same checks with the same exception classes: ValueError (shapes,
options), TypeError (dtypes), IndexError (values).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / routing dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fail(exc, op, msg):
    raise exc(f"molora.{op}: {msg}")


# What the rows and columns of the ops' 2-D operands are (for the error message).
_LAYOUTS = {"x": "[T, d_in]", "logits": "[T, E]", "ids": "[T, k]", "gate": "[T, E]",
            "grad_y": "[T, d_out]", "y_perm": "[P, d]"}


def dim_message(name: str, shape, n: int) -> str:
    """``name must be n-D ...``; a 2-D operand given with extra leading dims (a [B, S, d]
    activation, say) gets the reshape that flattens them (the ops take the tokens as rows)."""
    layout = f" {_LAYOUTS[name]}" if n == 2 and name in _LAYOUTS else ""
    msg = f"{name} must be {n}-D{layout}, got shape {tuple(shape)}"
    if n == 2 and len(shape) > 2:
        msg += f"; flatten the leading dims: {name}.reshape(-1, {name}.shape[-1])"
    return msg


def dim(op, name, t, n):
    if t.dim() != n:
        _fail(ValueError, op, dim_message(name, t.shape, n))


def size(op, name, t, d, expected):
    if t.shape[d] != expected:
        _fail(ValueError, op, f"{name}.shape[{d}] must be {expected}, got shape {tuple(t.shape)}")


def floating(op, name, t):
    if not t.dtype.is_floating_point:
        _fail(TypeError, op, f"{name} must be a floating tensor, got {t.dtype}")


def index(op, name, t):
    if t.dtype not in _INDEX_DTYPES:
        _fail(TypeError, op, f"{name} must be int32 or int64, got {t.dtype}")


def same_dtype(op, name, t, ref_name, ref):
    if t.dtype != ref.dtype:
        _fail(TypeError, op, f"{name} dtype {t.dtype} must match {ref_name} dtype {ref.dtype}")


def device(op, name, t, ref):
    if t.device != ref.device:
        _fail(ValueError, op, f"{name} is on {t.device} but the first input is on {ref.device}")


def value(op, cond, msg):
    if not cond:
        _fail(ValueError, op, msg)


# --- per-family checks ---------------------------------------------------------------------------

def logits(op, lg):
    floating(op, "logits", lg)
    dim(op, "logits", lg, 2)
    value(op, lg.shape[1] >= 1, "logits must have at least one expert column")
    return lg.shape[1]


def topk_k(op, k, n, what="E"):
    value(op, 1 <= k <= n, f"k must be in [1, {what}] = [1, {n}], got {k}")


def vector(op, name, t, n, ref):
    """An optional float vector of length n (selection bias, per-expert scales)."""
    if t is None:
        return
    floating(op, name, t)
    device(op, name, t, ref)
    value(op, t.dim() == 1 and t.shape[0] == n, f"{name} must have shape ({n},), got {tuple(t.shape)}")


def route_grad(op, grad_weights, weights, ids, lg):
    logits(op, lg)
    floating(op, "grad_weights", grad_weights)
    floating(op, "weights", weights)
    index(op, "ids", ids)
    dim(op, "ids", ids, 2)
    size(op, "ids", ids, 0, lg.shape[0])
    value(op, weights.shape == ids.shape and grad_weights.shape == ids.shape,
          "grad_weights, weights and ids must share one shape (T, k)")
    for name, t in (("grad_weights", grad_weights), ("weights", weights), ("ids", ids)):
        device(op, name, t, lg)


def dispatch_meta(op, order, pos, expert_offsets, ref, num_tokens=None):
    for name, t, n in (("order", order, 1), ("pos", pos, 2), ("expert_offsets", expert_offsets, 1)):
        index(op, name, t)
        dim(op, name, t, n)
        device(op, name, t, ref)
    value(op, expert_offsets.shape[0] >= 2, "expert_offsets must have E+1 >= 2 entries")
    if num_tokens is not None:
        size(op, "pos", pos, 0, num_tokens)
    value(op, order.shape[0] >= pos.numel(),
          f"order has {order.shape[0]} rows but pos has {pos.numel()} pairs")
    return expert_offsets.shape[0] - 1


def pair_weights(op, weights, pos, ref):
    if weights is None:
        return
    floating(op, "weights", weights)
    device(op, "weights", weights, ref)
    value(op, weights.shape == pos.shape,
          f"weights must have shape {tuple(pos.shape)} (T, k), got {tuple(weights.shape)}")


def base(op, b, rows, cols, ref):
    if b is None:
        return
    same_dtype(op, "base", b, "the data", ref)
    device(op, "base", b, ref)
    value(op, b.dim() == 2 and tuple(b.shape) == (rows, cols),
          f"base must have shape ({rows}, {cols}), got {tuple(b.shape)}")


def bank(op, name, t, data_name, data):
    dim(op, name, t, 2)
    same_dtype(op, name, t, data_name, data)
    device(op, name, t, data)


def lora_banks(op, x, A, B):
    """x [T, d_in] float, A [R, d_in] and B [d_out, R] with its dtype and device."""
    floating(op, "x", x)
    dim(op, "x", x, 2)
    bank(op, "A", A, "x", x)
    bank(op, "B", B, "x", x)
    size(op, "A", A, 1, x.shape[1])
    size(op, "A", A, 0, B.shape[1])


def rank_offsets(op, ro, num_experts, ref):
    index(op, "rank_offsets", ro)
    dim(op, "rank_offsets", ro, 1)
    device(op, "rank_offsets", ro, ref)
    value(op, ro.shape[0] == num_experts + 1,
          f"rank_offsets must have E+1 = {num_experts + 1} entries, got {ro.shape[0]}")


def grouped(op, data, num_tokens, ro, order, pos, expert_offsets, weights, scales):
    """Checks shared by sgmv_shrink / sgmv_expand / sgmv_weight_grad; returns E."""
    E = dispatch_meta(op, order, pos, expert_offsets, data, num_tokens)
    rank_offsets(op, ro, E, data)
    pair_weights(op, weights, pos, data)
    vector(op, "scales", scales, E, data)
    return E


def gated(op, x, A, B, gate, ro, scales, shared_a):
    floating(op, "x", x)
    dim(op, "x", x, 2)
    bank(op, "A", A, "x", x)
    bank(op, "B", B, "x", x)
    floating(op, "gate", gate)
    dim(op, "gate", gate, 2)
    device(op, "gate", gate, x)
    size(op, "A", A, 1, x.shape[1])
    size(op, "gate", gate, 0, x.shape[0])
    E, R = gate.shape[1], B.shape[1]
    value(op, E >= 1, "gate must have at least one expert column")
    rank_offsets(op, ro, E, x)
    vector(op, "scales", scales, E, x)
    if shared_a:
        value(op, R == E * A.shape[0],
              f"with shared_a, B must have E * r = {E * A.shape[0]} columns (r = A.shape[0]), got {R}")
    else:
        size(op, "A", A, 0, R)


def rank_ids(op, ids, T, ref):
    index(op, "ids", ids)
    dim(op, "ids", ids, 2)
    size(op, "ids", ids, 0, T)
    device(op, "ids", ids, ref)


# --- value checks (read tensor data; where they run: the value-check mode) -----------------------

VALUE_CHECK_MODES = ("auto", "host", "device")


def _mode_from_env() -> str:
    v = os.environ.get("MOLORA_CHECK_VALUES", "").strip().lower()
    if v in ("", "0", "auto", "false", "off", "no"):
        return "auto"
    if v in ("1", "host", "true", "on", "yes"):
        return "host"
    if v == "device":
        return "device"
    raise ValueError(f"MOLORA_CHECK_VALUES must be one of 0/auto, 1/host or device, got {v!r}")


_VALUE_MODE = [_mode_from_env()]
_MODE_LISTENERS: list = []  # native modules that mirror the mode (molora_ops._C, _C_emu)


def value_checks() -> str:
    """The value-check mode in force: "auto", "host" or "device" (module docstring)."""
    return _VALUE_MODE[0]


def set_value_checks(mode) -> None:
    """Sets the value-check mode for the process: ``True`` / ``"host"`` (host checks with clear
    errors everywhere, each one a host synchronisation on CUDA), ``False`` / ``"auto"`` (the
    default: host on CPU, device-side asserts on CUDA) or ``"device"``."""
    if mode is True:
        mode = "host"
    elif mode is False or mode is None:
        mode = "auto"
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"molora_ops.set_value_checks: mode must be one of {VALUE_CHECK_MODES} "
                         f"or a bool, got {mode!r}")
    _VALUE_MODE[0] = mode
    for listener in _MODE_LISTENERS:
        listener(mode == "host")


def add_native_module(module) -> None:
    """Makes ``module.set_value_checks(host: bool)`` (molora_ops._C, _C_emu) follow the mode."""
    _MODE_LISTENERS.append(module.set_value_checks)
    module.set_value_checks(_VALUE_MODE[0] == "host")


@contextlib.contextmanager
def use_value_checks(mode):
    """``with use_value_checks("host"): ...`` (tests, debugging)."""
    saved = _VALUE_MODE[0]
    set_value_checks(mode)
    try:
        yield
    finally:
        set_value_checks(saved)


def on_host(ref: torch.Tensor) -> bool:
    """Whether a value check of data on ``ref``'s device runs on the host now."""
    mode = _VALUE_MODE[0]
    if mode != "auto":
        return mode == "host"
    return ref.device.type == "cpu" and not torch.compiler.is_compiling()


# --- device checks of one op call in one launch ----------------------------------------------------

_NONE = 2**62  # an absent bound (molora_ops.triton.checks.UNBOUNDED)
# Every device-side assert of this module goes through this name (tests record the conditions
# here; patching torch._assert_async itself would confuse torch.compile's view of torch).
_assert_async = torch._assert_async
# torch's CUDA _assert_async refuses a message of 255 characters or more (a RuntimeError, "Message
# length must be smaller than 255", before anything is checked); on CPU any length passes. The
# gathered message of one call lists every condition and can be longer: it then names the
# operands checked (_Gathered.run), and any message is cut to fit as a last resort.
ASSERT_MESSAGE_MAX = 254


def _device_assert(cond: torch.Tensor, msg: str) -> None:
    if len(msg) > ASSERT_MESSAGE_MAX:
        msg = msg[:ASSERT_MESSAGE_MAX - 4] + " ..."
    _assert_async(cond, msg)


# Run the gathered checks of CPU tensors through the kernel too (tests: Triton's interpreter).
_KERNEL_ON_CPU = [False]


class _Gathered:
    """The device checks of one op call: index sequences and ranges by tensor (a tensor checked
    twice gets the intersection of the bounds), with the message of each condition."""

    def __init__(self, op: str):
        self.op = op
        self.seqs: Dict[int, list] = {}    # id(t) -> [t, first_lo, first_hi, step_lo, ...]
        self.ranges: Dict[int, list] = {}  # id(t) -> [t, lo, hi]
        self.what: List[str] = []

    def add(self, table: Dict[int, list], t: torch.Tensor, bounds: Tuple[int, ...],
            what: str) -> None:
        cur = table.get(id(t))
        if cur is None:
            table[id(t)] = [t, *bounds]
        else:  # [lo, hi] pairs: the tighter of each
            for i, b in enumerate(bounds):
                cur[1 + i] = max(cur[1 + i], b) if i % 2 == 0 else min(cur[1 + i], b)
        if what not in self.what:
            self.what.append(what)

    def run(self) -> None:
        if not (self.seqs or self.ranges):
            return
        from .triton.checks import MAX_RANGES, MAX_SEQUENCES, values_ok
        seqs = [tuple(v) for v in self.seqs.values()]
        rngs = [tuple(v) for v in self.ranges.values()]
        msg = f"molora.{self.op}: " + "; ".join(self.what)
        if len(msg) > ASSERT_MESSAGE_MAX:  # each condition's operand (its first word) instead
            names = ", ".join(dict.fromkeys(w.split(" ", 1)[0] for w in self.what))
            msg = (f"molora.{self.op}: invalid values in one of {names} "
                   "(molora_ops.use_value_checks('host') names it)")
        while seqs or rngs:  # MAX_SEQUENCES + MAX_RANGES tensors a launch
            ok = values_ok(seqs[:MAX_SEQUENCES], rngs[:MAX_RANGES])
            _device_assert(ok if ok.numel() == 1 else ok.all(), msg)
            seqs, rngs = seqs[MAX_SEQUENCES:], rngs[MAX_RANGES:]


_GATHER = threading.local()


@contextlib.contextmanager
def one_launch(op: str):
    """``with one_launch(op): <value checks>``: the device checks made inside on CUDA tensors (in
    eager mode) run at the end as one kernel and one ``torch._assert_async`` whose message lists
    every condition checked (the host mode names the one that failed). Host checks, CPU tensors
    and traced code are unaffected. Used around the value checks of every Triton-served op."""
    outer: Optional[_Gathered] = getattr(_GATHER, "current", None)
    gathered = _Gathered(op)
    _GATHER.current = gathered
    try:
        yield
    finally:
        _GATHER.current = outer
    gathered.run()


def _gathered(t: torch.Tensor) -> Optional[_Gathered]:
    """The open gathering that takes a device check of ``t``, or None (check it now)."""
    g = getattr(_GATHER, "current", None)
    if g is None or torch.compiler.is_compiling():
        return None
    if t.device.type == "cuda" or (_KERNEL_ON_CPU[0] and t.device.type == "cpu"):
        return g
    return None


def _sequence_on_device(op: str, t: torch.Tensor, what: str, composite,
                        first=(-_NONE, _NONE), step=(-_NONE, _NONE), last=(-_NONE, _NONE)) -> None:
    """Device check of the index sequence ``t``: gathered when a gathering is open, else
    ``composite()`` (a 0-d bool) asserted now."""
    g = _gathered(t)
    if g is not None:
        g.add(g.seqs, t, (*first, *step, *last), what)
    else:
        _device_assert(composite(), f"molora.{op}: {what}")


def _verify(op: str, ref: torch.Tensor, exc, ok: Callable[[], torch.Tensor],
            detail: Callable[[], str], what: str, sequence: Optional[dict] = None) -> None:
    """Raises ``exc(detail())`` on the host when ``ok()`` is False (host mode), else asserts
    ``ok()`` on the device without synchronising (message: ``what``). ``sequence``: the same
    condition as bounds of the index sequence ``ref`` (``first`` / ``step`` / ``last`` of
    ``_sequence_on_device``), so an open gathering takes it instead."""
    if on_host(ref):
        if not bool(ok()):
            _fail(exc, op, detail())
    elif sequence is not None:
        _sequence_on_device(op, ref, f"{what} ({exc.__name__})", ok, **sequence)
    else:
        _device_assert(ok(), f"molora.{op}: {what} ({exc.__name__})")


def ids_in_range(op: str, name: str, ids: torch.Tensor, lo: int, hi: int) -> None:
    """IndexError unless every value of ``ids`` lies in ``[lo, hi)``; ValueError (from the shape
    alone, in every mode) when ``hi - 1`` does not fit the int32 indices the kernels take."""
    if ids.numel() == 0:
        return
    index_bound(op, name, hi)
    if on_host(ids):
        mn, mx = int(ids.min()), int(ids.max())
        if mn < lo or mx >= hi:
            _fail(IndexError, op, f"{name} has values outside [{lo}, {hi}) (min {mn}, max {mx})")
        return
    what = f"{name} has values outside [{lo}, {hi}) (IndexError)"
    g = _gathered(ids)
    if g is not None:
        g.add(g.ranges, ids, (lo, hi - 1), what)
    else:
        _device_assert(((ids >= lo) & (ids < hi)).all(), f"molora.{op}: {what}")


def index_bound(op: str, name: str, hi: int) -> None:
    """ValueError when an index range ``[.., hi)`` has values beyond int32: the kernels narrow
    index tensors to int32 (the layouts are int32 by contract), so a valid id >= 2^31 would wrap
    negative and read as -1. Shape-only: runs before any data is read or narrowed."""
    if hi - 1 > 2**31 - 1:
        _fail(ValueError, op, f"{name} indexes a range of {hi} entries, more than the int32 "
                              "indices of the kernels address (2^31)")


def rank_offsets_values(op: str, rank_offsets: torch.Tensor, total_rank: int,
                        name: str = "rank_offsets") -> None:
    """``rank_offsets [E+1]`` must be non-decreasing (else ValueError: negative rank), start at 0
    (else IndexError) and end at the bank's ``total_rank`` (else ValueError; also when R does not
    fit int32, from the shape alone)."""
    ro = rank_offsets
    if ro.numel() == 0:
        return
    if total_rank > 2**31 - 1:
        _fail(ValueError, op, f"the bank's total rank R = {total_rank} exceeds the int32 indices "
                              "of the kernels (2^31 - 1)")
    if not on_host(ro):
        _sequence_on_device(
            op, ro, f"{name} must be non-decreasing, start at 0 and end at the bank's total "
                    f"rank R = {total_rank}",
            lambda: (ro[1:] >= ro[:-1]).all() & (ro[0] == 0) & (ro[-1] == total_rank),
            first=(0, 0), step=(0, _NONE), last=(total_rank, total_rank))
        return
    ro = ro.long()
    if ro.numel() > 1 and bool((ro[1:] < ro[:-1]).any()):
        _fail(ValueError, op, f"{name} must be non-decreasing (negative rank): {ro.tolist()}")
    if int(ro[0]) != 0:
        _fail(IndexError, op, f"{name} has values outside [0, R]: {name}[0] must be 0, "
                              f"got {int(ro[0])}")
    if int(ro[-1]) != total_rank:
        _fail(ValueError, op, f"{name}[-1] = {int(ro[-1])} must equal the bank's total rank "
                              f"R = {total_rank} (A.shape[0] / B.shape[1])")


def max_rank_values(op: str, rank_offsets: torch.Tensor, max_rank: int) -> None:
    """ValueError if ``max_rank`` is smaller than the largest per-expert rank."""
    if rank_offsets.numel() < 2:
        return
    ranks = lambda: rank_offsets[1:].long() - rank_offsets[:-1].long()  # noqa: E731
    _verify(op, rank_offsets, ValueError, lambda: ranks().max() <= max_rank,
            lambda: f"max_rank ({max_rank}) is smaller than the largest expert rank "
                    f"({int(ranks().max())})",
            f"max_rank ({max_rank}) is smaller than the largest expert rank",
            sequence=dict(step=(-_NONE, max_rank)))


def expert_offsets_values(op: str, expert_offsets: torch.Tensor, num_rows: int,
                          name: str = "expert_offsets") -> None:
    """IndexError unless ``expert_offsets [E+1]`` starts at 0, is non-decreasing and ends at or
    before ``num_rows`` (= P, the dispatched row count)."""
    eo = expert_offsets
    if eo.numel() == 0:
        return
    _verify(op, eo, IndexError,
            lambda: (eo[1:] >= eo[:-1]).all() & (eo[0] == 0) & (eo[-1] <= num_rows),
            lambda: f"{name} has values outside [0, {num_rows}] or is not a non-decreasing "
                    f"sequence starting at 0: {eo.tolist()}",
            f"{name} has values outside [0, {num_rows}] or is not a non-decreasing sequence "
            "starting at 0",
            sequence=dict(first=(0, 0), step=(0, _NONE), last=(-_NONE, num_rows)))


def order_pos_values(op: str, order: torch.Tensor, pos: torch.Tensor, num_rows: int) -> None:
    """order values in [-1, T*k), pos values in [-1, num_rows)."""
    ids_in_range(op, "order", order, -1, pos.numel())
    ids_in_range(op, "pos", pos, -1, num_rows)


def dispatched_values(op: str, total_rank: int, rank_offsets, order, pos, expert_offsets,
                      max_rank: int) -> None:
    """Value checks of the grouped matmuls (sgmv_shrink / sgmv_expand / sgmv_weight_grad)."""
    rank_offsets_values(op, rank_offsets, total_rank)
    max_rank_values(op, rank_offsets, max_rank)
    expert_offsets_values(op, expert_offsets, order.numel())
    order_pos_values(op, order, pos, order.numel())


def pair_dot_values(op: str, a, b, pos, a_by_token: bool) -> None:
    ids_in_range(op, "pos", pos, -1, b.shape[0])
    if not a_by_token:
        ids_in_range(op, "pos", pos, -1, a.shape[0])


def stacked_values(op: str, A, B, rank_offsets, shared_a: bool) -> None:
    """rank_offsets of the stacked bank; with shared_a (HydraLoRA) exactly ``arange(E+1) * r``."""
    rank_offsets_values(op, rank_offsets, B.shape[1])
    if not shared_a:
        rank_offsets_values(op, rank_offsets, A.shape[0])
        return
    E, r = rank_offsets.numel() - 1, A.shape[0]
    expected = lambda: torch.arange(E + 1, device=rank_offsets.device) * r  # noqa: E731
    _verify(op, rank_offsets, ValueError, lambda: (rank_offsets.long() == expected()).all(),
            lambda: f"with shared_a, rank_offsets must be arange(E+1) * r (r = A.shape[0] = {r}), "
                    f"got {rank_offsets.tolist()}",
            f"with shared_a, rank_offsets must be arange(E+1) * r (r = A.shape[0] = {r})",
            sequence=dict(first=(0, 0), step=(r, r), last=(E * r, E * r)))
