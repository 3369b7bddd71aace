"""The device-side value checks of one op call in one launch (``molora_ops._checks``).

Launcher: ``values_ok(sequences, ranges) -> ok`` (bool ``[G]``, True where program g found no
violation; ``ok.all()`` is the verdict, ``ok`` itself when G == 1), for at most
``MAX_SEQUENCES`` index sequences and ``MAX_RANGES`` index tensors:

* a sequence ``s`` [n] (rank_offsets, expert_offsets): ``s[0]`` in ``[first_lo, first_hi]``,
  every step ``s[i+1] - s[i]`` in ``[step_lo, step_hi]``, ``s[n-1]`` in ``[last_lo, last_hi]``;
* a range ``v`` (ids, order, pos; any shape): every value in ``[lo, hi]``.

Bounds are inclusive int64 (``UNBOUNDED`` where there is none). The composite these replace costs
3-5 tiny kernels per condition: ~30 per grouped matmul (sgmv_shrink / expand / weight grad check
rank_offsets, max_rank, expert_offsets, order and pos), each one a launch and its host-side
dispatch. Here the op's checks are one launch (plus ``.all()`` for more than one program) and
``torch._assert_async``. Every program checks its chunk of each tensor and both end points of each
sequence, so no output needs zeroing first.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["values_ok", "grid", "MAX_SEQUENCES", "MAX_RANGES", "UNBOUNDED"]

MAX_SEQUENCES = 2
MAX_RANGES = 2
UNBOUNDED = 2**62  # a bound no int32 / int64 index of ours reaches
BLOCK = 1024
# Elements of the longest tensor one program checks before the grid grows (at most MAX_PROGRAMS):
# up to 64 Ki indices stay one program and one launch. NOTE: untuned.
PER_PROGRAM = 64 * BLOCK
MAX_PROGRAMS = 128


@triton.jit
def _sequence_bad(s, n, first_lo, first_hi, step_lo, step_hi, last_lo, last_hi, start, chunk,
                  BLOCK: tl.constexpr):
    """Violations in steps [start, start + chunk) of s [n], plus its two end points."""
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    stop = tl.minimum(start + chunk, n - 1)  # step i joins s[i] and s[i + 1]
    for i0 in range(start, stop, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < stop
        a = tl.load(s + i, mask=m, other=0).to(tl.int64)
        b = tl.load(s + i + 1, mask=m, other=0).to(tl.int64)
        d = b - a
        bad += (m & ((d < step_lo) | (d > step_hi))).to(tl.int32)
    has = n > 0
    first = tl.load(s, mask=has, other=0).to(tl.int64)
    last = tl.load(s + tl.maximum(n - 1, 0), mask=has, other=0).to(tl.int64)
    ends = has & ((first < first_lo) | (first > first_hi) | (last < last_lo) | (last > last_hi))
    return tl.sum(bad, axis=0) + ends.to(tl.int32)


@triton.jit
def _range_bad(v, n, lo, hi, start, chunk, BLOCK: tl.constexpr):
    """Values of v [n] (flat) in [start, start + chunk) outside [lo, hi]."""
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    stop = tl.minimum(start + chunk, n)
    for i0 in range(start, stop, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < stop
        x = tl.load(v + i, mask=m, other=0).to(tl.int64)
        bad += (m & ((x < lo) | (x > hi))).to(tl.int32)
    return tl.sum(bad, axis=0)


# Sizes and bounds change with every batch: not specialised (Triton would otherwise compile a
# variant per combination of "== 1" / "divisible by 16" of the 21 integer arguments).
_INT_ARGS = ["chunk"] + [f"{t}_{b}" for t in ("s0", "s1") for b in
                         ("n", "f_lo", "f_hi", "d_lo", "d_hi", "l_lo", "l_hi")] + \
            [f"{t}_{b}" for t in ("r0", "r1") for b in ("n", "lo", "hi")]


@triton.jit(do_not_specialize=_INT_ARGS)
def _values_ok_kernel(ok, chunk,
                      s0, s0_n, s0_f_lo, s0_f_hi, s0_d_lo, s0_d_hi, s0_l_lo, s0_l_hi,
                      s1, s1_n, s1_f_lo, s1_f_hi, s1_d_lo, s1_d_hi, s1_l_lo, s1_l_hi,
                      r0, r0_n, r0_lo, r0_hi, r1, r1_n, r1_lo, r1_hi,
                      BLOCK: tl.constexpr):
    """grid (G,): program g checks elements [g * chunk, (g + 1) * chunk) of every tensor (an
    absent slot has n = 0) and writes ok[g]."""
    start = tl.program_id(0) * chunk
    bad = _sequence_bad(s0, s0_n, s0_f_lo, s0_f_hi, s0_d_lo, s0_d_hi, s0_l_lo, s0_l_hi, start,
                        chunk, BLOCK)
    bad += _sequence_bad(s1, s1_n, s1_f_lo, s1_f_hi, s1_d_lo, s1_d_hi, s1_l_lo, s1_l_hi, start,
                         chunk, BLOCK)
    bad += _range_bad(r0, r0_n, r0_lo, r0_hi, start, chunk, BLOCK)
    bad += _range_bad(r1, r1_n, r1_lo, r1_hi, start, chunk, BLOCK)
    tl.store(ok + tl.program_id(0), bad == 0)


# (tensor, first_lo, first_hi, step_lo, step_hi, last_lo, last_hi) / (tensor, lo, hi)
SequenceSpec = Tuple[torch.Tensor, int, int, int, int, int, int]
RangeSpec = Tuple[torch.Tensor, int, int]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The values as one contiguous run (a copy only for a non-contiguous tensor)."""
    return t.reshape(-1).contiguous()


def grid(longest: int) -> Tuple[int, int]:
    """(programs, chunk): program g checks elements [g * chunk, (g + 1) * chunk) of each tensor."""
    programs = max(1, min(MAX_PROGRAMS, triton.cdiv(longest, PER_PROGRAM)))
    return programs, triton.cdiv(triton.cdiv(max(longest, 1), programs), BLOCK) * BLOCK


def values_ok(sequences: Sequence[SequenceSpec], ranges: Sequence[RangeSpec]) -> torch.Tensor:
    """ok [G] bool on the tensors' device: True where program g found every condition held (module
    docstring). Integer tensors (int32 / int64), all on one device; no host synchronisation."""
    if len(sequences) > MAX_SEQUENCES or len(ranges) > MAX_RANGES:
        raise ValueError(f"values_ok takes at most {MAX_SEQUENCES} sequences and {MAX_RANGES} "
                         f"ranges, got {len(sequences)} and {len(ranges)}")
    seqs = [(_flat(t),) + tuple(int(b) for b in rest) for t, *rest in sequences]
    rngs = [(_flat(t), int(lo), int(hi)) for t, lo, hi in ranges]
    first = (seqs + rngs)[0][0]
    programs, chunk = grid(max([s[0].numel() for s in seqs] + [r[0].numel() for r in rngs]))
    absent_seq = (first, 0, 0, 0, 0, 0, 0, 0)
    absent_rng = (first, 0, 0, 0)
    seq_args = [a for s in seqs for a in (s[0], s[0].numel()) + s[1:]]
    seq_args += list(absent_seq) * (MAX_SEQUENCES - len(seqs))
    rng_args = [a for r in rngs for a in (r[0], r[0].numel(), r[1], r[2])]
    rng_args += list(absent_rng) * (MAX_RANGES - len(rngs))
    ok = torch.empty(programs, dtype=torch.bool, device=first.device)
    _values_ok_kernel[(programs,)](ok, chunk, *seq_args, *rng_args, BLOCK=BLOCK)
    return ok
