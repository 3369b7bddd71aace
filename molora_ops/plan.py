"""The byte and FLOP plan of the MoE-LoRA linear: every kernel launch of each formulation with
the bytes it reads and writes and the FLOPs it does, and the cost model that picks one.

One model serves two readers: ``molora_ops.functional.moe_lora_linear(algo="auto")`` picks the
formulation with the least modeled time on the input's device, and ``python -m bench --plan``
prints the plan of a shape against the minimum traffic and the base linear's GEMM.

Conventions (as bench/models.py): data elements take ``elem`` bytes, index tensors 4 (int32),
routing weights, scales and the fp32 intermediates 4; a tensor read through the dispatch layout
(x in a shrink, grad y in the backward) costs one row per routed pair (P = T*k rows); the LoRA
banks are read once per launch (they are small, and L2-resident between the tiles that re-read
them). A launch's modeled time is ``max(bytes / bandwidth, flops / peak) + launch overhead``:
the roofline of one launch at the device's ceilings.

Formulations (``moe_lora_linear``'s ``algo``), forward:

* ``grouped``: dispatch -> sgmv_shrink (x rows gathered on load, k reads of x) -> sgmv_expand
  (token-owned for k > 1: base read and y written once). FLOPs ``2*P*r*(d_in + d_out)``.
* ``dense``: the routing as a gate [T, E] -> ``stacked_gated_lora``: ``h = x A^T`` over every bank
  column ([T, R] fp32, gated in the epilogue), then ``y = base + h B^T``. x read once, but
  ``2*T*R*(d_in + d_out)`` FLOPs: E/k times the grouped work.
* ``fused``: ``fused_moe_lora``: the dense form in one launch with h on chip (x, base and y cross
  memory once: the minimum). Triton on CUDA, total rank R <= 128.

The minimum traffic of ``y = base + delta`` is reading x and base and writing y (plus the banks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Launch", "Layer", "Ceilings", "ALGOS", "launches", "minimum_bytes", "base_launches",
           "modeled_time", "ceilings", "choose", "choose_for", "set_ceilings",
           "FUSED_MAX_TOTAL_RANK"]

IDX = 4    # int32 index element
F32 = 4    # fp32 routing weight / scale / intermediate element

ALGOS = ("grouped", "dense", "fused")

# The fused kernel's register bound on the bank's total rank (molora_ops/triton/sgmv.py).
FUSED_MAX_TOTAL_RANK = 128


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what it reads and writes (bytes) and its FLOPs (2 per multiply-add).
    ``ops``: the calls it takes (a torch composite runs one per op), each at the launch cost."""

    name: str
    read: int
    write: int
    flops: int
    ops: int = 1

    @property
    def bytes(self) -> int:
        return self.read + self.write


@dataclass(frozen=True)
class Layer:
    """The shape of one MoE-LoRA linear call: T tokens, d_in -> d_out, E experts with total rank R
    (largest expert rank ``max_rank``), top-k routing, ``elem`` bytes per data element."""

    T: int
    d_in: int
    d_out: int
    E: int
    k: int
    R: int
    max_rank: int
    elem: int = 2
    base: bool = True

    @property
    def P(self) -> int:
        return self.T * self.k

    @property
    def r(self) -> float:
        """The average expert rank: the grouped FLOPs follow the ranks the pairs use."""
        return self.R / max(self.E, 1)


def _banks(s: Layer) -> Tuple[int, int]:
    return s.R * s.d_in * s.elem, s.d_out * s.R * s.elem


def _grouped_fwd(s: Layer) -> List[Launch]:
    A, B = _banks(s)
    P, b, mr = s.P, s.elem, s.max_rank
    base = s.T * s.d_out * b if s.base else 0
    return [
        Launch("dispatch", s.P * IDX, 2 * P * IDX + (s.E + 1) * IDX, 0),
        Launch("sgmv_shrink", P * s.d_in * b + A + P * IDX, P * mr * b,
               int(2 * P * s.r * s.d_in)),
        Launch("sgmv_expand", P * mr * b + B + 2 * P * IDX + P * F32 + base, s.T * s.d_out * b,
               int(2 * P * s.r * s.d_out)),
    ]


def _grouped_bwd(s: Layer) -> List[Launch]:
    A, B = _banks(s)
    P, b, mr = s.P, s.elem, s.max_rank
    gy_rows = P * s.d_out * b
    x_rows = P * s.d_in * b
    return [
        # u = B^T gy per row, unweighted, fp32: d routing weights = <h, u>, and dh = w * u
        Launch("sgmv_shrink(gy, B^T)", gy_rows + B + P * IDX, P * mr * F32,
               int(2 * P * s.r * s.d_out)),
        Launch("pair_dot(h, u)", P * mr * (b + F32) + P * IDX, P * F32, 2 * P * mr),
        Launch("dh = w * u", P * mr * F32 + P * (F32 + IDX), P * mr * b, P * mr),
        Launch("sgmv_weight_grad(gy, h, transposed) = dB", gy_rows + P * mr * b + P * (IDX + F32), B,
               int(2 * P * s.r * s.d_out)),
        Launch("sgmv_expand(dh, A^T) = dx", P * mr * b + A + 2 * P * IDX, s.T * s.d_in * b,
               int(2 * P * s.r * s.d_in)),
        Launch("sgmv_weight_grad(x, dh) = dA", x_rows + P * mr * b + P * IDX, A,
               int(2 * P * s.r * s.d_in)),
    ]


def _gate(s: Layer, backward: bool = False) -> Launch:
    # The routing as a dense gate is a torch composite (reference.pair_gate): forward, the ids'
    # range check (2 ops) and 6 ops that build the gate; backward, autograd's gather and where.
    # NOTE: as one launch the model picked the dense form for a T=16 forward on the CPU, where the
    # grouped one ran 345 against 391 us (the check and the gate: 12 + 29 us; llama up shape, E=8,
    # k=2, r=16, 2-core Xeon, 2026-12-05).
    return Launch("pair_gate", s.P * (IDX + F32), s.T * s.E * F32, s.P, ops=2 if backward else 8)


def _dense_fwd(s: Layer) -> List[Launch]:
    A, B = _banks(s)
    T, b = s.T, s.elem
    base = T * s.d_out * b if s.base else 0
    h = T * s.R * F32
    return [
        _gate(s),
        Launch("stacked_gated_lora: h = x A^T, gated", T * s.d_in * b + A + T * s.E * F32, h,
               2 * T * s.R * s.d_in),
        Launch("stacked_gated_lora: y = base + h B^T", h + B + base, T * s.d_out * b,
               2 * T * s.R * s.d_out),
    ]


def _dense_bwd(s: Layer) -> List[Launch]:
    A, B = _banks(s)
    T, b = s.T, s.elem
    x, gy, h = T * s.d_in * b, T * s.d_out * b, T * s.R * F32
    return [
        _gate(s, backward=True),
        Launch("u = x A^T", x + A, h, 2 * T * s.R * s.d_in),
        Launch("z = gy B", gy + B, h, 2 * T * s.R * s.d_out),
        Launch("gate backward: dh, h_g, dgate", 2 * h + T * s.E * F32, 2 * h + T * s.E * F32,
               4 * T * s.R),
        Launch("dx = dh A", h + A, x, 2 * T * s.R * s.d_in),
        Launch("dA = dh^T x", h + x, A, 2 * T * s.R * s.d_in),
        Launch("dB = gy^T h_g", gy + h, B, 2 * T * s.R * s.d_out),
        Launch("d weights = dgate[ids]", T * s.E * F32 + s.P * IDX, s.P * F32, 0),
    ]


def _fused_fwd(s: Layer) -> List[Launch]:
    A, B = _banks(s)
    T, b = s.T, s.elem
    base = T * s.d_out * b if s.base else 0
    return [Launch("fused_moe_lora", T * s.d_in * b + A + B + s.P * (IDX + F32) + base,
                   T * s.d_out * b, 2 * T * s.R * (s.d_in + s.d_out))]


_PLANS = {"grouped": (_grouped_fwd, _grouped_bwd), "dense": (_dense_fwd, _dense_bwd),
          "fused": (_fused_fwd, _dense_bwd)}


def launches(algo: str, s: Layer, backward: bool = False) -> List[Launch]:
    """The launches of one formulation: its forward, or with ``backward`` its backward (every
    gradient: x, both banks, the routing weights; d base is grad y itself, no launch)."""
    if algo not in _PLANS:
        raise ValueError(f"molora_ops.plan: algo must be one of {ALGOS}, got {algo!r}")
    return _PLANS[algo][1 if backward else 0](s)


def minimum_bytes(s: Layer, backward: bool = False) -> int:
    """The least traffic any formulation must move: forward reads x (and base) and writes y;
    backward reads grad y and x and writes dx; both touch the banks (and their gradients) once."""
    A, B = _banks(s)
    b = s.elem
    if backward:
        return (s.T * s.d_out + 2 * s.T * s.d_in) * b + 2 * (A + B)
    return (s.T * s.d_in + (2 if s.base else 1) * s.T * s.d_out) * b + A + B


def base_launches(s: Layer, backward: bool = False) -> List[Launch]:
    """The frozen base linear ``x W^T`` (backward: ``dx = gy W``; W is frozen)."""
    b = s.elem
    W = s.d_in * s.d_out * b
    if backward:
        return [Launch("base: dx = gy W", s.T * s.d_out * b + W, s.T * s.d_in * b,
                       2 * s.T * s.d_in * s.d_out)]
    return [Launch("base: x W^T", s.T * s.d_in * b + W, s.T * s.d_out * b,
                   2 * s.T * s.d_in * s.d_out)]


# --- ceilings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ceilings:
    """A device's measured ceilings: memory bandwidth (bytes/s, read + write), matmul FLOP/s per
    data dtype, and the fixed cost of one launch (seconds)."""

    name: str
    bandwidth: float
    flops: Dict[torch.dtype, float]
    launch: float

    def peak(self, dtype: torch.dtype) -> float:
        return self.flops.get(dtype, min(self.flops.values()))


# Measured on the machines named (device-to-device copy, 8192^3 matmul on random data): H200,
# 2026-10-28 / 2026-11-04: 4.3 TB/s and 769-798 TFLOP/s bf16. fp32 (ieee, FMAs) from the
# datasheet's 67 TFLOP/s. NOTE: untuned: the 2 us launch cost (a CUDA-graph-free launch).
_KNOWN: Dict[str, Ceilings] = {
    "H200": Ceilings("NVIDIA H200", 4.3e12,
                     {torch.bfloat16: 788e12, torch.float16: 788e12, torch.float32: 67e12}, 2e-6),
}
_MEASURED: Dict[str, Ceilings] = {}


def set_ceilings(device: torch.device, c: Ceilings) -> None:
    """Use ``c`` for ``device`` (e.g. ceilings measured with ``measure_ceilings``)."""
    _MEASURED[_key(torch.device(device))] = c
    _CHOICES.clear()


def _key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def ceilings(device) -> Ceilings:
    """The ceilings of ``device``: set or measured before, a known GPU by name, else measured now
    (CPU, or an unknown GPU: ``measure_ceilings``, once per process; a few ms)."""
    device = torch.device(device)
    key = _key(device)
    if key in _MEASURED:
        return _MEASURED[key]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for tag, c in _KNOWN.items():
            if tag in name:
                _MEASURED[key] = c
                return c
    c = measure_ceilings(device)
    _MEASURED[key] = c
    return c


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(device, n_copy: int = 1 << 23, n_mm: int = 512) -> Ceilings:
    """Bandwidth from a copy of ``n_copy`` fp32 elements, FLOP/s from an ``n_mm``-cube fp32 matmul
    (and bf16 on a GPU), best of 5 after a warm-up. Host synchronising: call it outside hot
    paths."""
    device = torch.device(device)
    src = torch.empty(n_copy, device=device).uniform_()
    dst = torch.empty_like(src)

    def best(fn, reps=5):
        fn()
        _sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    bw = 2 * src.numel() * 4 / best(lambda: dst.copy_(src))
    a = torch.randn(n_mm, n_mm, device=device)
    flops = {torch.float32: 2 * n_mm ** 3 / best(lambda: a @ a)}
    if device.type == "cuda":
        b = a.to(torch.bfloat16)
        flops[torch.bfloat16] = 2 * n_mm ** 3 / best(lambda: b @ b)
    else:
        # The CPU kernels compute bf16 / fp16 in fp32 (opmath); a bf16 CPU matmul would take
        # seconds to time and model nothing they run.
        flops[torch.bfloat16] = flops[torch.float32]
    flops[torch.float16] = flops[torch.bfloat16]
    flops[torch.float64] = flops[torch.float32] / 2
    # NOTE: untuned: the per-op cost on a CPU is the wrapper's few microseconds (bench.overhead).
    launch = 5e-6 if device.type == "cpu" else 2e-6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Ceilings(name, bw, flops, launch)


def modeled_time(plan: Sequence[Launch], c: Ceilings, dtype: torch.dtype) -> float:
    """Seconds: each launch at its roofline, plus its launch cost per call."""
    peak = c.peak(dtype)
    return sum(max(l.bytes / c.bandwidth, l.flops / peak) + c.launch * l.ops for l in plan)


def choose(s: Layer, device, dtype: torch.dtype, backward: bool,
           allowed: Sequence[str] = ALGOS, c: Optional[Ceilings] = None) -> str:
    """The formulation in ``allowed`` with the least modeled time (forward, plus backward when
    gradients will be taken) at ``device``'s ceilings."""
    memo = None
    if c is None:
        # The choice at the device's own ceilings is remembered (cleared by set_ceilings): modeling
        # every launch of every formulation took 66 us of Python per call, 2-3% of the layer's
        # forward + backward at T=16 on the 2-core CPU machine (14 us with the memo).
        memo = (s, _key(torch.device(device)), dtype, bool(backward), tuple(allowed))
        if memo in _CHOICES:
            return _CHOICES[memo]
        c = ceilings(device)

    def cost(algo):
        t = modeled_time(launches(algo, s), c, dtype)
        return t + (modeled_time(launches(algo, s, True), c, dtype) if backward else 0.0)

    algo = min(allowed, key=cost)
    if memo is not None:
        _CHOICES[memo] = algo
    return algo


_CHOICES: Dict[tuple, str] = {}


def choose_for(T: int, d_in: int, d_out: int, E: int, k: int, R: int, max_rank: int, elem: int,
               has_base: bool, device: str, dtype: torch.dtype, backward: bool,
               allowed: Tuple[str, ...]) -> str:
    """``choose`` at the device's own ceilings for ``Layer(T, ..., has_base)``, remembered by
    these plain arguments: a repeated call builds no Layer or device object (the layer's hot
    path: ~90 us of Python right after a GEMM, T=1024 on the 2-core CPU machine, against a dict
    lookup)."""
    key = ("for", T, d_in, d_out, E, k, R, max_rank, elem, has_base, device, dtype, backward,
           allowed)
    algo = _CHOICES.get(key)
    if algo is None:  # (choose's own memo skipped: the ceilings are passed)
        device = torch.device(device)
        algo = choose(Layer(T, d_in, d_out, E, k, R, max_rank, elem, has_base), device, dtype,
                      backward, allowed, c=ceilings(device))
        _CHOICES[key] = algo
    return algo
