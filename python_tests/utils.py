"""Shared helpers for the molora_ops test suite.

* ``assert_close_fa``: the one tolerance rule for every float output (flash-attention style).
* ``compare_with_reference``: runs ``molora_ops.<op>`` and ``molora_ops.reference.<op>`` on the
  same inputs, forward and backward, and checks index outputs exactly and float outputs / grads
  with ``assert_close_fa``.
* Input builders: tie-free logits, routing (``make_routing``), crafted id tensors, ragged
  ``rank_offsets``, non-contiguous views.
"""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

import molora_ops
from molora_ops import reference as ref

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}

# the op lists come from the op declarations (molora_ops/ops/<family>.py)
from molora_ops.ops import ALL_OPS, BACKWARD_OPS, FORWARD_OPS, TRITON_OPS  # noqa: E402,F401


def dtype_params(dtypes=FLOAT_DTYPES):
    return pytest.mark.parametrize("dtype", dtypes, ids=[DTYPE_IDS[d] for d in dtypes])


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def require_ext_enabled() -> bool:
    """A missing extension fails the run, unless it was turned off on purpose (MOLORA_DISABLE_EXT=1,
    a reference-only run), where the tests that need torch.ops.molora skip."""
    return os.environ.get("MOLORA_DISABLE_EXT", "0") in ("", "0")


def need_ext():
    """Fail (skip under MOLORA_DISABLE_EXT=1) when the native extension is absent."""
    if molora_ops.has_extension():
        return
    msg = "molora_ops native extension (_C) is not loaded: torch.ops.molora is unavailable"
    if require_ext_enabled():
        pytest.fail(msg + "; build it (scripts/setup.sh) or set MOLORA_DISABLE_EXT=1")
    pytest.skip(msg)


def torch_op(name: str):
    need_ext()
    return getattr(torch.ops.molora, name).default


# --------------------------------------------------------------------------------------------
# Tolerance rule
# --------------------------------------------------------------------------------------------

# floor, relative to max(1, max|reference|), keyed by the dtype of the checked output
_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-3,
    torch.float16: 1e-3,
}


def cuda_kernel(name: str):
    """``torch.ops.molora.<name>`` when its CUDA kernel is the CUDA C++ one (registered from C++:
    what a CUDA tensor runs); skips the test when this build has none (a CPU build)."""
    from molora_ops import backend
    if not backend.has_cuda_kernel(name):
        pytest.skip(f"molora.{name} has no CUDA C++ kernel in this build (a CPU build?)")
    return getattr(torch.ops.molora, name)


def assert_close_fa(actual, ref_lowp, ref_hi, name="output", factor=2.0, floor=None):
    """Flash-attention rule.

    ``ref_hi`` is the reference run in float64 (on the float64 upcast of the very same inputs),
    ``ref_lowp`` is the reference run in the same precision as ``actual``. Requires
    ``max|actual - ref_hi| <= factor * max|ref_lowp - ref_hi| + floor * max(1, max|ref_hi|)``.
    Also checks shape, dtype (vs ref_lowp) and that ``actual`` is finite where ``ref_hi`` is.
    """
    assert isinstance(actual, torch.Tensor), f"{name}: expected a tensor, got {type(actual)}"
    assert actual.shape == ref_lowp.shape == ref_hi.shape, (
        f"{name}: shape {tuple(actual.shape)} vs reference {tuple(ref_lowp.shape)} / {tuple(ref_hi.shape)}")
    assert actual.dtype == ref_lowp.dtype, f"{name}: dtype {actual.dtype} vs reference {ref_lowp.dtype}"
    assert actual.device == ref_lowp.device, f"{name}: device {actual.device} vs {ref_lowp.device}"
    if actual.numel() == 0:
        return
    # compared where `actual` lives: a GPU result is checked on the GPU in float64 (same IEEE
    # results as on the CPU; only scalars come back), a CPU one on the CPU
    dev = actual.device if actual.device.type == "cuda" else torch.device("cpu")
    a = actual.detach().to(dev, torch.float64)
    lo = ref_lowp.detach().to(dev, torch.float64)
    hi = ref_hi.detach().to(dev, torch.float64)
    finite = torch.isfinite(hi)
    assert torch.equal(torch.isfinite(a), finite), f"{name}: non-finite values where the reference is finite"
    a, lo, hi = a[finite], lo[finite], hi[finite]
    if a.numel() == 0:
        return
    scale = max(1.0, hi.abs().max().item())
    if floor is None:
        floor = _FLOOR[actual.dtype]
    err = (a - hi).abs()
    ref_err = (lo - hi).abs().max().item()
    tol = factor * ref_err + floor * scale
    worst = err.max().item()
    assert worst <= tol, (
        f"{name} ({actual.dtype}): max|ours - ref_f64| = {worst:.3e} > tol {tol:.3e} "
        f"(= {factor} * max|ref_lowp - ref_f64| {ref_err:.3e} + {floor:g} * {scale:.3g}); "
        f"{int((err > tol).sum())} of {err.numel()} elements off; worst at flat index {int(err.argmax())}: "
        f"ours {a[err.argmax()].item():.6g}, ref {hi[err.argmax()].item():.6g}")


def assert_index_equal(actual, expected, name="index output"):
    assert actual.dtype == torch.int32, f"{name}: dtype {actual.dtype}, expected torch.int32"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    # compared on `actual`'s device (a GPU result stays on the GPU; only the verdict comes back)
    exp = expected.detach().to(device=actual.device, dtype=torch.int32)
    if not torch.equal(actual, exp):
        where = (actual != exp).nonzero()
        raise AssertionError(
            f"{name} differs from the reference at {where.shape[0]} of {actual.numel()} elements "
            f"(first {where[:5].tolist()}):\nours={actual}\nref ={expected}")


# --------------------------------------------------------------------------------------------
# Generic op-vs-reference comparison (forward + backward)
# --------------------------------------------------------------------------------------------

def _as_tuple(out):
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)


def _prep(args, kwargs, diff, cast_float=None, device=None):
    """Detach inputs (keeping strides), optionally upcast floats / move to ``device``, mark ``diff``
    ones as leaves."""
    leaves = []

    def one(key, a):
        if not isinstance(a, torch.Tensor):
            return a
        b = a.detach()
        if cast_float is not None and b.is_floating_point():
            b = b.to(cast_float)
        if device is not None:
            b = b.to(device)
        if key in diff:
            b = b.detach().requires_grad_(True)
            leaves.append((key, b))
        return b

    new_args = [one(i, a) for i, a in enumerate(args)]
    new_kwargs = {k: one(k, v) for k, v in kwargs.items()}
    order = {k: n for n, k in enumerate(list(range(len(args))) + list(kwargs))}
    leaves.sort(key=lambda kv: order[kv[0]])
    return new_args, new_kwargs, leaves


def _grads(outs, leaves, gouts):
    pairs = [(o, g) for o, g in zip(outs, gouts) if g is not None]
    if not leaves or not pairs:
        return []
    gs = torch.autograd.grad([o for o, _ in pairs], [l for _, l in leaves], [g for _, g in pairs],
                             allow_unused=True)
    return [torch.zeros_like(l) if g is None else g for g, (_, l) in zip(gs, leaves)]


def compare_with_reference(name, args, kwargs=None, diff=(), ours_fn=None, ref_fn=None,
                           check_hi_index=True, factor=2.0, device=None):
    """Run ``molora_ops.<name>`` (or ``ours_fn``) and the reference on ``args``/``kwargs``.

    ``diff`` holds positional indices / kwarg names of inputs to differentiate. Index outputs must
    match the reference exactly, float outputs and all gradients follow ``assert_close_fa``.
    A random upstream gradient is used for every float output of the reference that requires grad.
    Inputs must not be modified. With ``device`` (e.g. "cuda") our op runs on copies of the inputs
    on that device (outputs must live there), the reference on CPU.
    Returns (ours_outputs, ref_lowp_outputs), all on CPU.
    """
    kwargs = dict(kwargs or {})
    diff = set(diff)
    ours_fn = ours_fn or getattr(molora_ops, name)
    ref_fn = ref_fn or getattr(ref, name)

    snapshot = [a.clone() for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]

    o_args, o_kwargs, o_leaves = _prep(args, kwargs, diff, device=device)
    l_args, l_kwargs, l_leaves = _prep(args, kwargs, diff)
    h_args, h_kwargs, h_leaves = _prep(args, kwargs, diff, cast_float=torch.float64)

    ours = _as_tuple(ours_fn(*o_args, **o_kwargs))
    if device is not None:
        for o in ours:
            assert o.device.type == torch.device(device).type, f"{name}: output on {o.device}, expected {device}"
    ours_dev = ours
    ours = tuple(o.cpu() for o in ours)
    lo = _as_tuple(ref_fn(*l_args, **l_kwargs))
    hi = _as_tuple(ref_fn(*h_args, **h_kwargs))

    after = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    for before, now in zip(snapshot, after):
        assert torch.equal(before, now), f"{name} modified one of its inputs"

    assert len(ours) == len(lo), f"{name}: {len(ours)} outputs, reference has {len(lo)}"
    for i, (o, l, h) in enumerate(zip(ours, lo, hi)):
        if l.is_floating_point():
            assert_close_fa(o, l, h, name=f"{name} output {i}", factor=factor)
        else:
            if check_hi_index:
                # test-data sanity: the float64 reference must route identically (tie margins)
                assert torch.equal(l, h), f"{name} output {i}: test inputs too close to a tie (f64 vs low-precision reference)"
            assert_index_equal(o, l, name=f"{name} output {i}")

    if diff:
        gouts = []
        for o, l in zip(ours, lo):
            if l.is_floating_point() and l.requires_grad:
                assert o.requires_grad, f"{name}: output does not require grad although its inputs do"
                gouts.append(torch.randn(l.shape, dtype=l.dtype))
            else:
                gouts.append(None)
        g_o = _grads(ours_dev, o_leaves, [None if g is None else g.to(ours_dev[0].device) for g in gouts])
        g_o = [g.cpu() for g in g_o]
        g_l = _grads(lo, l_leaves, gouts)
        g_h = _grads(hi, h_leaves, [None if g is None else g.double() for g in gouts])
        for (key, _), a, l, h in zip(o_leaves, g_o, g_l, g_h):
            assert_close_fa(a, l, h, name=f"{name} grad[{key}]", factor=factor)
    return ours, lo


# --------------------------------------------------------------------------------------------
# Input builders
# --------------------------------------------------------------------------------------------

def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def tie_free_logits(T, E, dtype=torch.float32, scale=2.0, row_scale=None):
    """[T, E] logits whose entries in every row are pairwise well separated (also after rounding to
    bf16/fp16): a random permutation of an evenly spaced grid plus < 0.4 grid-step of noise, so
    there is no exact or near tie. ``row_scale=(lo, hi)`` multiplies every row by a random factor
    (rows of very different entropy)."""
    perm = torch.argsort(torch.rand(T, E), dim=1).double()
    noise = torch.rand(T, E, dtype=torch.float64) * 0.4
    v = (perm + noise - (E - 1) / 2) / max(E - 1, 1) * 2 * scale
    if row_scale is not None:
        v = v * torch.empty(T, 1, dtype=torch.float64).uniform_(*row_scale)
    return v.to(dtype)


def well_separated(key, k, margin):
    """Bool [T]: in each row, the k+1 largest values of ``key`` are pairwise > margin apart."""
    if key.shape[-1] <= 1 or key.shape[0] == 0:
        return torch.ones(key.shape[0], dtype=torch.bool)
    s = key.double().sort(dim=-1, descending=True).values
    gaps = s[:, :-1] - s[:, 1:]
    return (gaps[:, :k] > margin).all(dim=-1)


def resample_rows(make, ok, T, tries=500):
    """``make(n)`` -> [n, ...] tensor; resample rows until ``ok(x)`` (bool [T]) holds everywhere."""
    x = make(T)
    for _ in range(tries):
        good = ok(x)
        if bool(good.all()):
            return x
        bad = (~good).nonzero().flatten()
        x[bad] = make(bad.numel())
    raise RuntimeError("could not build well-separated test inputs")



def normalised_entropy(logits, q, eps):
    """Normalised Tsallis entropy (Shannon for q == 1) of softmax(logits) + eps, in float64: the
    quantity softmax_topp compares with entropy_threshold, written independently as an oracle."""
    p = torch.softmax(logits.double(), -1) + eps
    E = logits.shape[-1]
    if E == 1:
        return torch.zeros(logits.shape[0], dtype=torch.float64)
    if q == 1.0:
        return -(p * p.log()).sum(-1) / math.log(E)
    return (1 - (p ** q).sum(-1)) / (q - 1) / ((1 - E ** (1 - q)) / (q - 1))


def topp_logits(T, E, dtype, top_p, thr, q, eps=1e-5, flat_frac=0.5):
    """[T, E] logits for softmax_topp: a fraction ``flat_frac`` of flat (high-entropy) rows, the
    rest peaked; resampled away from the top_p cumsum and the entropy-threshold edges."""
    def ok(l):
        p = torch.softmax(l.double(), -1).sort(-1, descending=True).values
        good = ((p.cumsum(-1) - top_p).abs() > 1e-4).all(-1)
        if q > 0 and thr < 1:
            good &= (normalised_entropy(l, q, eps) - thr).abs() > 1e-3
        return good

    def make(n):
        v = tie_free_logits(n, E, torch.float64, scale=2.5)
        flat = torch.rand(n, 1) < flat_frac
        f = torch.where(flat, torch.empty(n, 1).uniform_(0.02, 0.2), torch.empty(n, 1).uniform_(0.6, 2.0))
        return (v * f.double()).to(dtype)

    return resample_rows(make, ok, T)

def make_routing(T, E, k, dtype=torch.float32, renormalize=True):
    """Realistic top-k routing: (logits, weights [T,k] opmath, ids [T,k] int32) from the reference
    softmax_topk on tie-free random logits."""
    logits = tie_free_logits(T, E, dtype)
    weights, ids = ref.softmax_topk(logits, k, renormalize)
    return logits, weights.detach(), ids


def distinct_ids(T, E, k, exclude=()):
    """[T, k] int32, each row k distinct random experts in [0, E) avoiding ``exclude``."""
    key = torch.rand(T, E)
    for e in exclude:
        key[:, e] += 10.0
    ids = torch.argsort(key, dim=1)[:, :k]
    return ids.to(torch.int32)


def drop_ids(ids, prob=0.3, suffix=False):
    """Set random entries to -1 (anywhere, or as a ragged suffix per row)."""
    ids = ids.clone()
    T, k = ids.shape
    if suffix:
        keep = torch.randint(0, k + 1, (T, 1))
        mask = torch.arange(k)[None, :] >= keep
    else:
        mask = torch.rand(T, k) < prob
    ids[mask] = -1
    return ids


def topp_routing(T, E, dtype=torch.float32, top_p=0.6):
    """ids/weights [T, E] with -1 / 0 padding, from the reference softmax_topp."""
    logits = tie_free_logits(T, E, dtype, row_scale=(0.3, 2.0))
    weights, ids = ref.softmax_topp(logits, top_p)
    return logits, weights.detach(), ids


def make_ids(kind, T, E, k):
    """Crafted routing ids [T, k] int32 for the edge cases."""
    if kind == "router":
        return make_routing(T, E, k)[2]
    if kind == "exclude":  # experts 0 and E//2 get no tokens
        return distinct_ids(T, E, k, exclude=(0, E // 2))
    if kind == "one":  # every token's first slot on one expert, other slots dropped
        ids = torch.full((T, k), -1, dtype=torch.int32)
        ids[:, 0] = E // 2 if E > 1 else 0
        return ids
    if kind == "drop":
        return drop_ids(distinct_ids(T, E, k), prob=0.35)
    if kind == "topp":
        assert k == E
        return topp_routing(T, E)[2]
    raise ValueError(kind)


def routing_weights(ids, dtype=torch.float32):
    """Random positive routing weights [T,k]; nonzero also at -1 slots (they must be ignored)."""
    return (torch.rand(ids.shape, dtype=torch.float64) + 0.25).to(dtype)


def ragged_rank_offsets(E, max_r, zeros=1):
    """[E+1] int32 rank offsets with ranks in [1, max_r], ``zeros`` rank-0 experts, max == max_r."""
    ranks = torch.randint(1, max_r + 1, (E,))
    perm = torch.randperm(E)
    ranks[perm[0]] = max_r
    for i in range(1, min(zeros + 1, E)):
        ranks[perm[i]] = 0
    return rank_offsets_from_ranks(ranks)


def rank_offsets_from_ranks(ranks):
    ro = torch.zeros(len(ranks) + 1, dtype=torch.int64)
    ro[1:] = torch.cumsum(torch.as_tensor(ranks, dtype=torch.int64), 0)
    return ro.to(torch.int32)


def uniform_rank_offsets(E, r):
    return (torch.arange(E + 1, dtype=torch.int64) * r).to(torch.int32)


def max_rank_of(ro):
    return int((ro[1:] - ro[:-1]).max()) if ro.numel() > 1 else 0


def noncontig(t, kind="slice"):
    """A non-contiguous view holding the same values as ``t`` (other storage slots are garbage).

    kind "slice": every other element of the last dim of a wider buffer; "transpose": a transposed
    view of a buffer laid out the other way (2-D only)."""
    t = t.detach()
    if kind == "transpose" and t.dim() == 2:
        buf = torch.randn(t.shape[1], t.shape[0], dtype=torch.float64).to(t.dtype) if t.is_floating_point() \
            else torch.randint(-5, 5, (t.shape[1], t.shape[0]), dtype=t.dtype)
        buf.copy_(t.t())
        out = buf.t()
    else:
        shape = list(t.shape)
        shape[-1] = shape[-1] * 2 if t.dim() else 1
        if t.is_floating_point():
            buf = torch.randn(shape, dtype=torch.float64).to(t.dtype)
        else:
            buf = torch.randint(-100, 100, shape, dtype=t.dtype)
        out = buf[..., ::2]
        out.copy_(t)
    assert torch.equal(out, t)
    if t.numel() > 1 and t.dim() >= 1 and max(t.shape) > 1:
        assert not out.is_contiguous() or kind == "transpose"
    return out


def as_index_dtype(t, dtype):
    return t.to(dtype)


def check_dispatch_invariants(ids, E, block_size, order, pos, eo):
    """Independent check of the dispatch contract (does not use the reference)."""
    ids = ids.to(torch.int64)
    T, k = ids.shape
    P = T * k if block_size == 1 else T * k + E * (block_size - 1)
    assert order.shape == (P,) and pos.shape == (T, k) and eo.shape == (E + 1,)
    assert order.dtype == pos.dtype == eo.dtype == torch.int32
    order, pos, eo = order.long(), pos.long(), eo.long()
    assert eo[0] == 0
    flat = ids.flatten()
    for e in range(E):
        seg = order[eo[e]:eo[e + 1]]
        pairs = (flat == e).nonzero().flatten()
        n = pairs.numel()
        assert int(eo[e + 1] - eo[e]) == (-(-n // block_size)) * block_size
        assert torch.equal(seg[:n], pairs), f"expert {e}: pairs not stable-ascending"
        assert (seg[n:] == -1).all()
    assert (order[eo[E]:] == -1).all()
    valid = flat >= 0
    pflat = pos.flatten()
    assert (pflat[~valid] == -1).all()
    if valid.any():
        assert torch.equal(order[pflat[valid]], valid.nonzero().flatten())


# --------------------------------------------------------------------------------------------
# Small per-op samples (opcheck, CUDA): list of (sample id, positional args, kwargs)
# --------------------------------------------------------------------------------------------

def _rg(t):
    return t.detach().clone().requires_grad_(True)


def _routing(T=6, E=5, k=2, bs=2, kind="drop"):
    ids = make_ids(kind, T, E, k)
    order, pos, eo = ref.dispatch(ids, E, bs)
    return ids, order, pos, eo


def _ragged_bank(E=5, r=3):
    ro = ragged_rank_offsets(E, r, zeros=1)
    return ro, int(ro[-1]), max_rank_of(ro)


def op_samples(name):
    """List of (sample id, args, kwargs)."""
    T, E, k, d = 6, 5, 2, 4
    out = []
    if name == "softmax_topk":
        out.append(("basic", (_rg(tie_free_logits(T, E)), k, True), {}))
        out.append(("plain-bf16", (_rg(tie_free_logits(T, E, torch.bfloat16)), 3, False), {}))
        out.append(("T0-k=E", (_rg(tie_free_logits(0, E)), E, True), {}))
    elif name == "topk_softmax":
        out.append(("basic", (_rg(tie_free_logits(T, E)), k, 0.7), {}))
        out.append(("T0-k=E", (_rg(tie_free_logits(0, E)), E, 1.0), {}))
    elif name == "sigmoid_topk":
        out.append(("nobias", (_rg(tie_free_logits(T, E)), k, None, True, False, 1.0), {}))
        out.append(("bias-biw", (_rg(tie_free_logits(T, E)), k, torch.rand(E) * 0.1, True, True, 2.0), {}))
        out.append(("T0", (_rg(tie_free_logits(0, E)), k, torch.rand(E), False, False, 1.0), {}))
    elif name == "softmax_topp":
        out.append(("ragged", (_rg(tie_free_logits(T, E, row_scale=(0.2, 2.0))), 0.55, 1, 1.0, 1.1, 1e-5), {}))
        out.append(("entropy", (_rg(tie_free_logits(T, E, row_scale=(0.1, 2.0))), 0.55, 2, 0.8, 1.0, 1e-5), {}))
    elif name == "dispatch":
        ids = make_ids("exclude", T, E, k)
        ids[0, 1] = -1
        out.append(("drop-empty-bs1", (ids, E, 1), {}))
        out.append(("drop-empty-bs4", (ids, E, 4), {}))
        out.append(("int64", (make_ids("router", T, E, k).long(), E, 2), {}))
    elif name in ("gather_rows", "combine_rows"):
        ids, order, pos, eo = _routing()
        rows = T if name == "gather_rows" else order.numel()
        out.append(("weighted-drop", (_rg(torch.randn(rows, d)), order, pos, _rg(routing_weights(ids))), {}))
        out.append(("noweights", (_rg(torch.randn(rows, d)), order, pos, None), {}))
    elif name == "sgmv_shrink":
        ids, order, pos, eo = _routing()
        ro, R, mr = _ragged_bank(E)
        out.append(("ragged", (_rg(torch.randn(T, d)), _rg(torch.randn(R, d)), ro, order, pos, eo,
                               _rg(routing_weights(ids)), torch.rand(E) + 0.5), {"max_rank": mr + 1}))
        out.append(("plain", (_rg(torch.randn(T, d)), _rg(torch.randn(R, d)), ro, order, pos, eo, None, None),
                    {"max_rank": mr}))
    elif name == "sgmv_expand":
        ids, order, pos, eo = _routing()
        ro, R, mr = _ragged_bank(E)
        out.append(("ragged-base", (_rg(torch.randn(order.numel(), mr)), _rg(torch.randn(d, R)), ro, order, pos,
                                    eo, _rg(routing_weights(ids)), torch.rand(E) + 0.5, _rg(torch.randn(T, d))), {}))
        out.append(("plain", (_rg(torch.randn(order.numel(), mr + 1)), _rg(torch.randn(d, R)), ro, order, pos, eo,
                              None, None, None), {}))
    elif name == "stacked_gated_lora":
        ro, R, _ = _ragged_bank(E)
        out.append(("ragged-base", (_rg(torch.randn(T, d)), _rg(torch.randn(R, d)), _rg(torch.randn(d, R)),
                                    _rg(torch.randn(T, E)), ro, torch.rand(E) + 0.5, _rg(torch.randn(T, d)), False), {}))
        ro_s = uniform_rank_offsets(E, 2)
        out.append(("shared-a", (_rg(torch.randn(T, d)), _rg(torch.randn(2, d)), _rg(torch.randn(d, 2 * E)),
                                 _rg(torch.randn(T, E)), ro_s, None, None, True), {}))
    elif name == "fused_moe_lora":
        ids = make_ids("drop", T, E, k)
        ro, R, _ = _ragged_bank(E)
        out.append(("ragged-base", (_rg(torch.randn(T, d)), _rg(torch.randn(R, d)), _rg(torch.randn(d, R)), ro,
                                    _rg(routing_weights(ids)), ids, torch.rand(E) + 0.5, _rg(torch.randn(T, d))),
                    {}))
        out.append(("plain-int64", (_rg(torch.randn(T, d)), _rg(torch.randn(R, d)), _rg(torch.randn(d, R)), ro,
                                    None, make_ids("one", T, E, k).long(), None, None), {}))
    elif name == "rank_topk":
        R = 9
        out.append(("scores-bias", (_rg(torch.randn(T, R)), 3, tie_free_logits(T, R), torch.rand(R) * 0.01, False), {}))
        out.append(("abs", (_rg(tie_free_logits(T, R)), 4, None, None, True), {}))
    elif name == "rank_sparse_shrink":
        R = 9
        ids = drop_ids(distinct_ids(T, R, 3), 0.4)
        out.append(("drop", (_rg(torch.randn(T, d)), _rg(torch.randn(R, d)), ids), {}))
    elif name == "rank_sparse_expand":
        R = 9
        ids = drop_ids(distinct_ids(T, R, 3), 0.4)
        out.append(("drop-w-base", (_rg(torch.randn(T, 3)), ids, _rg(torch.randn(d, R)), _rg(torch.rand(T, 3)), 1.5,
                                    _rg(torch.randn(T, d))), {}))
        out.append(("plain", (_rg(torch.randn(T, 3)), ids, _rg(torch.randn(d, R)), None, 1.0, None), {}))
    elif name == "id_histogram":
        ids = torch.randint(-1, 7, (T, 3), dtype=torch.int32)
        out.append(("drop", (ids, 7), {}))
        out.append(("3d-int64", (torch.randint(-1, 4, (2, 3, 4)), 4), {}))
    elif name == "softmax_route_backward":
        logits = tie_free_logits(T, E)
        w, ids = ref.softmax_topk(logits, k, True)
        out.append(("renorm", (torch.randn(T, k), w.detach(), ids, logits, True, 1.0), {}))
        w, ids = ref.softmax_topp(logits, 0.55)
        out.append(("topp-drop", (torch.randn(T, E), w.detach(), ids, logits, False, 1.0), {}))
    elif name == "sigmoid_topk_backward":
        logits, bias = tie_free_logits(T, E), torch.rand(E) * 0.1
        w, ids = ref.sigmoid_topk(logits, k, bias, True, True, 2.0)
        out.append(("bias", (torch.randn(T, k), w.detach(), ids, logits, bias, True, True, 2.0), {}))
        w, ids = ref.sigmoid_topk(logits, k, None, False, False, 1.0)
        out.append(("nobias", (torch.randn(T, k), w.detach(), ids, logits, None, False, False, 1.0), {}))
    elif name == "pair_dot":
        ids, order, pos, eo = _routing()
        out.append(("by-token-drop", (torch.randn(T, d), torch.randn(order.numel(), d), pos, True), {}))
        out.append(("by-row-drop", (torch.randn(order.numel(), d), torch.randn(order.numel(), d), pos, False), {}))
    elif name == "sgmv_weight_grad":
        ids, order, pos, eo = _routing()
        ro, R, mr = _ragged_bank(E)
        out.append(("ragged", (torch.randn(T, d), torch.randn(order.numel(), mr), ro, order, pos, eo,
                               routing_weights(ids), torch.rand(E) + 0.5, R), {}))
        out.append(("ragged-transposed", (torch.randn(T, d), torch.randn(order.numel(), mr), ro, order,
                                          pos, eo, None, torch.rand(E) + 0.5, R, True), {}))
    elif name == "sgmv_expand_backward":
        ids, order, pos, eo = _routing()
        ro, R, mr = _ragged_bank(E)
        out.append(("ragged", (torch.randn(T, d), torch.randn(order.numel(), mr), torch.randn(d, R), ro,
                               order, pos, eo, routing_weights(ids), torch.rand(E) + 0.5), {}))
        out.append(("plain-wide-h", (torch.randn(T, 37), torch.randn(order.numel(), mr + 1),
                                     torch.randn(37, R), ro, order, pos, eo, None, None), {}))
    elif name == "stacked_gated_lora_backward":
        ro, R, _ = _ragged_bank(E)
        out.append(("ragged", (torch.randn(T, d), torch.randn(T, d), torch.randn(R, d), torch.randn(d, R),
                               torch.randn(T, E), ro, torch.rand(E) + 0.5, False), {}))
        ro_s = uniform_rank_offsets(E, 2)
        out.append(("shared-a", (torch.randn(T, d), torch.randn(T, d), torch.randn(2, d), torch.randn(d, 2 * E),
                                 torch.randn(T, E), ro_s, None, True), {}))
    elif name == "rank_scatter":
        ids = drop_ids(distinct_ids(T, 9, 3), 0.4)
        out.append(("drop", (torch.randn(T, 3), ids, 9), {}))
    elif name == "rank_sparse_weight_grad":
        ids = drop_ids(distinct_ids(T, 9, 3), 0.4)
        out.append(("drop", (torch.randn(T, d), torch.randn(T, 3), ids, 9), {}))
    else:
        raise KeyError(name)
    return out


# --------------------------------------------------------------------------------------------
# The backends present here, as contexts that make CPU tensors take them
# --------------------------------------------------------------------------------------------

def backends_present():
    """"cpu" (the C++ CPU kernels, when built), "gpu" (the GPU path on CPU tensors: emulated CUDA
    C++ kernels + Triton's interpreter, when both are there) and "reference"."""
    from molora_ops.ops import OPS
    from molora_ops.ops._registry import has_triton
    out = []
    if OPS["dispatch"].native_kernels:
        out.append("cpu")
    try:
        from molora_ops._emu import load_emu
        load_emu()
        if has_triton():
            out.append("gpu")
    except ImportError:
        pass
    out.append("reference")
    return out


def backend_context(name):
    """The context in which CPU tensors run backend ``name`` of ``backends_present()``."""
    import contextlib
    from molora_ops import backend
    if name == "cpu":
        return contextlib.nullcontext()
    return backend.gpu_path_on_cpu("auto" if name == "gpu" else "reference")
