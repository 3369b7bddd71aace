"""The CUDA kernels of the masked family (csrc/cuda/masked.cu: rank_topk, id_histogram,
rank_scatter), run on the CPU by the emulation module (torch.ops.molora_emu, every CUDA thread a
host thread), against molora_ops.reference.

rank_topk's key is computed exactly as the reference does it (fp32 src + fp32 bias, then abs), and
the selection order is total (key desc, id asc; NaN first, -0 == +0), so ids and values are compared
EXACTLY on random inputs, ties included. rank_scatter without duplicate ids is exact too (one term
per output element); with duplicates the fp32 sum order may differ from index_put_'s: fp32 atol.
"""
import os

import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from emu_utils import (DT_IDS, KERNEL_DTYPES, assert_float64_runs_the_reference,
                       raises_on_both_paths, require_emu)
from utils import drop_ids, noncontig


EMU = require_emu()  # torch.ops.molora_emu (skips the module only when _C_emu is not built)

# rank counts: one lane, not a multiple of 32, exactly one warp, SMoRA, >1 register per lane
# ragged, the largest register path (32 keys per lane); k in {1, 8, R}
RK = sorted({(r, k) for r in (1, 7, 32, 64, 100, 1024) for k in (1, 8, r) if k <= r})
# (name, scores, bias, use_abs); scores: None, "same" (h's dtype), "f32"
MODES = [
    ("plain", None, False, False),
    ("bias", None, True, False),          # FlyLoRA: key = h + d
    ("abs", None, False, True),
    ("abs-bias", None, True, True),
    ("scores-f32-bias", "f32", True, False),  # SMoRA: router scores + balancing bias
    ("scores-same-abs", "same", False, True),
]


def _rand(T, R, dtype, scale=1.0):
    return (torch.randn(T, R, dtype=torch.float64) * scale).to(dtype)


def _inputs(T, R, dtype, mode):
    _, sk, use_bias, use_abs = mode
    h = _rand(T, R, dtype)
    scores = None
    if sk == "same":
        scores = _rand(T, R, dtype)
    elif sk == "f32":
        scores = torch.rand(T, R, dtype=torch.float64).float()  # sigmoid-like scores in (0, 1)
    bias = (torch.randn(R, dtype=torch.float64) * 0.3).float() if use_bias else None
    return h, scores, bias, use_abs


def _same_bits(a, b):
    view = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))


def _check_topk(h, k, scores, bias, use_abs):
    vals, ids = EMU.rank_topk(h, k, scores, bias, use_abs)
    v_ref, i_ref = ref.rank_topk(h, k, scores, bias, use_abs)
    assert ids.dtype == torch.int32 and vals.dtype == h.dtype
    assert ids.shape == (h.shape[0], k) and vals.shape == (h.shape[0], k)
    assert torch.equal(ids, i_ref), (ids, i_ref)
    assert _same_bits(vals, v_ref)  # values are gathered, never recomputed (NaN included)
    return vals, ids


def _rk_params():
    out = []
    for r, k in RK:
        for m in (MODES if k <= 8 else MODES[1::2]):  # long rounds: fewer modes
            out.append(pytest.param(r, k, m, id=f"r{r}-k{k}-{m[0]}"))
    return out


@pytest.mark.parametrize("r,k,mode", _rk_params())
def test_rank_topk_f32(r, k, mode):
    # ragged against 8 rows per block and the grid-stride; k = R = 1024 (1024 rounds per row) is
    # slow in emulation: fewer rows there
    T = 37 if k <= 8 else 9
    h, scores, bias, use_abs = _inputs(T, r, torch.float32, mode)
    _call(h, k, scores, bias, use_abs)


def _call(h, k, scores, bias, use_abs):
    return _check_topk(h, k, scores, bias, use_abs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("r,k", [(7, 1), (64, 8), (100, 8), (1024, 8), (32, 32)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("mode", [MODES[1], MODES[3], MODES[4], MODES[5]], ids=lambda m: m[0])
def test_rank_topk_low_precision(dtype, r, k, mode):
    # bf16/fp16 data has many exact ties among 100+ values: they must go to the lower id.
    h, scores, bias, use_abs = _inputs(29, r, dtype, mode)
    _call(h, k, scores, bias, use_abs)


@pytest.mark.parametrize("T", [0, 1])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
def test_rank_topk_tiny_T(T, dtype):
    h, scores, bias, use_abs = _inputs(T, 64, dtype, MODES[4])
    _call(h, 8, scores, bias, use_abs)
    _call(_rand(T, 5, dtype), 5, None, None, False)


def test_rank_topk_large_R_generic_path():
    # R > 1024: keys are re-read from global memory instead of registers (NPL = 0 kernel)
    for r, k in [(1025, 8), (2000, 1), (1100, 1100)]:
        T = 3 if k < 1000 else 2
        h, scores, bias, use_abs = _inputs(T, r, torch.float32, MODES[1])
        _call(h, k, scores, bias, use_abs)
    h, scores, bias, use_abs = _inputs(5, 1500, torch.bfloat16, MODES[5])
    _call(h, 16, scores, bias, use_abs)


@pytest.mark.parametrize("use_abs", [False, True])
@pytest.mark.parametrize("r", [10, 64, 100, 1300])
def test_rank_topk_ties_lower_id(r, use_abs):
    # integer keys in [-3, 3]: every row is full of exact ties (across lanes and within a lane)
    T = 21
    h = torch.randint(-3, 4, (T, r)).float()
    h[0] = 2.0  # one row entirely tied: ids must be 0..k-1
    k = min(8, r)
    _, ids = _call(h, k, None, None, use_abs)
    assert ids[0].tolist() == list(range(k))
    _call(h[:9], min(r, 40), None, None, use_abs)
    # a bias that creates the ties: key = h + bias with h = -bias on some columns
    bias = torch.randint(-2, 3, (r,)).float()
    _call(h, k, None, bias, use_abs)


def test_rank_topk_special_values():
    # torch.sort (the reference) puts NaN first (NaNs tied among themselves), -0.0 == +0.0, and
    # +-inf at the ends; the kernel maps keys to an order-preserving integer with those rules.
    r = 40
    h = _rand(6, r, torch.float32)
    h[0, [3, 35]] = float("nan")
    h[1, [0, 5, 33]] = 0.0
    h[1, [2, 34]] = -0.0
    h[1, 6:] = -1.0
    h[2, [1, 9]] = float("inf")
    h[2, [4, 39]] = float("-inf")
    h[3, :] = float("-inf")
    h[4, :] = -0.0
    h[4, ::3] = 0.0
    for use_abs in (False, True):
        for k in (1, 4, r):
            _call(h, k, None, None, use_abs)
    bias = torch.zeros(r)
    bias[::2] = -0.0
    _call(h, 6, None, bias, False)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
def test_rank_topk_noncontiguous(dtype):
    T, r, k = 19, 64, 8
    h, scores, bias, _ = _inputs(T, r, dtype, MODES[4])
    hs, ss = _rand(T, r, dtype), _rand(T, r, dtype)
    cases = [
        (noncontig(h, "slice"), None, noncontig(bias, "slice"), False),
        (noncontig(h, "transpose"), noncontig(scores, "transpose"), bias, True),
        (hs, noncontig(ss, "slice"), None, False),
        (h[::2], scores[::2], bias, False),  # row stride 2R
        (noncontig(h, "transpose")[3:], None, None, True),  # storage offset + column stride T
    ]
    for hh, sc, b, use_abs in cases:
        _call(hh, k, sc, b, use_abs)


def test_rank_topk_other_score_and_bias_dtypes():
    T, r = 17, 64
    h = _rand(T, r, torch.bfloat16)
    # scores of another float dtype than h (read as fp32), bias of any float dtype (fp32 add)
    _call(h, 8, _rand(T, r, torch.float16), _rand(1, r, torch.bfloat16)[0], False)
    _call(h, 8, _rand(T, r, torch.float32), _rand(1, r, torch.float16)[0], True)
    _call(h.float(), 8, _rand(T, r, torch.bfloat16), None, False)


def test_rank_topk_outputs_fully_written():
    # the emulation poisons outputs (NaN / INT32_MIN): nothing may survive, for k not a multiple
    # of 32 (partial flush), k a multiple of 32 (flush on the last round) and k > 32 (two flushes)
    for r, k in [(100, 33), (64, 64), (100, 31), (1024, 70)]:
        h = _rand(11, r, torch.float32)
        vals, ids = EMU.rank_topk(h, k, None, None, False)
        assert not torch.isnan(vals).any() and int(ids.min()) >= 0
        _call(h, k, None, None, False)


def _ref_error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def _same_error(ours, theirs):
    e_ours, e_ref = _ref_error(ours), _ref_error(theirs)
    assert e_ref is not None, "the reference / CPU op did not raise"
    assert e_ours is not None, f"the kernel did not raise ({type(e_ref).__name__} expected)"
    assert type(e_ours) is type(e_ref), (e_ours, e_ref)
    return e_ours, e_ref


def test_rank_topk_errors():
    h = _rand(4, 8, torch.float32)
    cpu = torch.ops.molora.rank_topk
    for args in [
        (h[0], 2, None, None, False),                       # 1-D h
        (h.int(), 2, None, None, False),                    # int h
        (h, 0, None, None, False),                          # k = 0
        (h, 9, None, None, False),                          # k > R
        (h, 2, _rand(4, 9, torch.float32), None, False),    # scores shape
        (h, 2, h.int(), None, False),                       # scores dtype
        (h, 2, None, torch.randn(9), False),                # bias shape
        (h, 2, None, torch.randn(2, 8), False),             # bias 2-D
        (h, 2, None, torch.ones(8, dtype=torch.int32), False),  # bias dtype
    ]:
        e_ours, e_cpu = _same_error(lambda: EMU.rank_topk(*args), lambda: cpu(*args))
        assert str(e_ours).split("\n")[0] == str(e_cpu).split("\n")[0]
    # float64 is not a CUDA kernel dtype: the launcher hands it to the reference
    assert_float64_runs_the_reference(lambda: EMU.rank_topk(h.double(), 2, None, None, False),
                                      lambda: ref.rank_topk(h.double(), 2, None, None, False))


# ------------------------------------------------------------------------------------------------
# id_histogram on rank ids
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r,k", [(1, 1), (7, 3), (64, 8), (100, 8), (1024, 8), (32, 32)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_id_histogram_rank_ids(r, k, index_dtype):
    T = 150
    h = _rand(T, r, torch.float32)
    bias = (torch.randn(r) * 0.3)
    _, ids = EMU.rank_topk(h, k, None, bias, False)
    for kind in ("full", "drop", "suffix"):
        x = ids if kind == "full" else drop_ids(ids, 0.3, suffix=kind == "suffix")
        x = x.to(index_dtype)
        got = EMU.id_histogram(x, r)
        assert got.dtype == torch.int32
        assert torch.equal(got, ref.id_histogram(x, r))
    # all tokens on one rank (the contended counter), with -1s
    one = torch.full((T, k), r - 1, dtype=index_dtype)
    one[::3, 0] = -1
    assert torch.equal(EMU.id_histogram(one, r), ref.id_histogram(one, r))


@pytest.mark.parametrize("num_bins", [1, 5, 2048, 5000, 12 * 1024, 12 * 1024 + 1, 20000])
def test_id_histogram_bins(num_bins):
    # private copies: 8 (<= 1024 bins), fewer above, one at 12 Ki, global atomics beyond
    n = 3000
    ids = torch.randint(-1, num_bins, (n,), dtype=torch.int64)
    ids[:50] = num_bins - 1
    assert torch.equal(EMU.id_histogram(ids, num_bins), ref.id_histogram(ids, num_bins))
    assert torch.equal(EMU.id_histogram(ids.int(), num_bins), ref.id_histogram(ids, num_bins))


def test_id_histogram_shapes():
    ids = torch.randint(-1, 64, (9, 5, 8), dtype=torch.int32)
    assert torch.equal(EMU.id_histogram(ids, 64), ref.id_histogram(ids, 64))
    nc = noncontig(torch.randint(-1, 64, (40, 8), dtype=torch.int32), "transpose")
    assert torch.equal(EMU.id_histogram(nc, 64), ref.id_histogram(nc, 64))
    empty = torch.empty(0, 8, dtype=torch.int64)
    assert torch.equal(EMU.id_histogram(empty, 64), torch.zeros(64, dtype=torch.int32))
    all_dropped = torch.full((20, 8), -1, dtype=torch.int32)
    assert torch.equal(EMU.id_histogram(all_dropped, 7), torch.zeros(7, dtype=torch.int32))
    big = torch.randint(-1, 64, (70000,), dtype=torch.int32)  # more ids than threads in the grid
    assert torch.equal(EMU.id_histogram(big, 64), ref.id_histogram(big, 64))


def test_id_histogram_errors():
    cpu = torch.ops.molora.id_histogram
    ids = torch.randint(0, 8, (10, 2), dtype=torch.int32)
    for args in [(ids, 0), (ids, -3), (ids.float(), 8), (ids + 8, 8), (ids - 2, 8)]:
        with molora_ops.use_value_checks("host"):  # the clear errors; default: device asserts
            e_ours, e_cpu = _same_error(lambda: EMU.id_histogram(*args), lambda: cpu(*args))
        assert str(e_ours).split("\n")[0] == str(e_cpu).split("\n")[0]
        raises_on_both_paths(lambda: EMU.id_histogram(*args), type(e_cpu))
    with pytest.raises(IndexError):
        ref.id_histogram(ids + 8, 8)


# ------------------------------------------------------------------------------------------------
# rank_scatter (the h-gradient of rank_topk)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
@pytest.mark.parametrize("r,k", [(1, 1), (7, 7), (64, 8), (100, 8), (100, 40), (1024, 8)],
                         ids=lambda v: str(v))
def test_rank_scatter(dtype, r, k):
    T = 37 if r * k <= 800 else 9
    _, ids = EMU.rank_topk(_rand(T, r, torch.float32), k, None, None, False)
    src = _rand(T, k, dtype)
    for x in (ids, drop_ids(ids, 0.3), drop_ids(ids, suffix=True).long()):
        out = EMU.rank_scatter(src, x, r)
        assert out.dtype == dtype and out.shape == (T, r)
        assert torch.equal(out, ref.rank_scatter(src, x, r))  # distinct ids: exact


def test_rank_scatter_duplicates_noncontig_T0():
    T, r, k = 23, 50, 40  # k > 32: two chunks of (id, value) pairs per row
    ids = torch.randint(-1, r, (T, k), dtype=torch.int32)
    src = _rand(T, k, torch.float32)
    out = EMU.rank_scatter(src, ids, r)
    torch.testing.assert_close(out, ref.rank_scatter(src, ids, r), rtol=0, atol=1e-5)
    out = EMU.rank_scatter(noncontig(src, "transpose"), noncontig(ids, "slice"), r)
    torch.testing.assert_close(out, ref.rank_scatter(src, ids, r), rtol=0, atol=1e-5)
    empty = EMU.rank_scatter(src[:0], ids[:0], r)
    assert empty.shape == (0, r)
    zero_k = EMU.rank_scatter(src[:, :0], ids[:, :0], r)
    assert torch.equal(zero_k, torch.zeros(T, r))


def test_rank_scatter_errors():
    cpu = torch.ops.molora.rank_scatter
    src = _rand(4, 3, torch.float32)
    ids = torch.randint(0, 8, (4, 3), dtype=torch.int32)
    for args in [(src, ids, 0), (src.int(), ids, 8), (src, ids.float(), 8), (src, ids + 8, 8),
                 (src, ids[:, :2], 8), (src, ids[:3], 8), (src[0], ids, 8)]:
        with molora_ops.use_value_checks("host"):  # the clear errors; default: device asserts
            e_ours, e_cpu = _same_error(lambda: EMU.rank_scatter(*args), lambda: cpu(*args))
        assert str(e_ours).split("\n")[0] == str(e_cpu).split("\n")[0]
        raises_on_both_paths(lambda: EMU.rank_scatter(*args), type(e_cpu))
    assert_float64_runs_the_reference(lambda: EMU.rank_scatter(src.double(), ids, 8),
                                      lambda: ref.rank_scatter(src.double(), ids, 8))
