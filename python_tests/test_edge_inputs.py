"""Edge inputs of the op contract (docs/OPS.md "Non-finite values", "Errors"): NaN / +-inf keys in
every selection op, dispatch row counts that overflow int64 or int32, int64 index ranges beyond
int32, size checks that must not touch the data, and fp32 data with fp64 routing operands on the
Triton launchers. Every backend present runs: the C++ CPU kernels (torch.ops.molora on CPU
tensors), the reference, the CUDA C++ kernels in CPU emulation (torch.ops.molora_emu) and the
Triton launchers (interpreter on CPU tensors).

Huge sizes are never allocated: expanded views (stride 0: a huge numel over a one-element
storage) and meta tensors carry the shapes."""
import math
import os

import pytest
import torch

import molora_ops as mo
from molora_ops import backend, reference as ref
from molora_ops._emu import has_emu_kernel, load_emu
from molora_ops.ops import OPS
from molora_ops.ops._registry import has_triton
from utils import assert_close_fa, need_ext

NAN, INF = float("nan"), float("inf")
BIG = 2**31 + 8  # an index range one int32 cannot address


def _emu():
    try:
        load_emu()
    except ImportError:
        if os.environ.get("MOLORA_REQUIRE_EMU", "0") not in ("", "0"):
            raise  # CI's developer build has it: its absence is a failure, not a skip
        return None
    return torch.ops.molora_emu


def _emu_op(name):
    emu = _emu()
    if emu is None or not has_emu_kernel(name):
        return None
    return getattr(emu, name)


# the schema's remaining arguments, at the wrappers' defaults
_SEL_DEFAULTS = {
    "softmax_topk": (True,),
    "topk_softmax": (1.0,),
    "sigmoid_topk": (None, True, False, 1.0),
    "rank_topk": (None, None, False),
    "softmax_topp": (1, 1.0, 1.1, 1e-5),
}


def _selection_backends(name):
    """(label, fn(x, k_or_top_p)) for every backend that serves the selection op ``name`` here."""
    fns = [("reference", getattr(ref, name))]
    if OPS[name].native_kernels:
        fns.append(("cpu", OPS[name].op))
    e = _emu_op(name)
    if e is not None:
        fns.append(("emu", e))
    rest = _SEL_DEFAULTS[name]
    return [(label, (lambda f: lambda x, k: f(x, k, *rest))(f)) for label, f in fns]


# --- 1. NaN and +-inf keys: NaN ranks largest (torch.topk / torch.sort), ties -> lower id ---------

NAN_ROWS = [
    [1.0, NAN, 3.0, 2.0],          # NaN early: must not block the later keys
    [0.0, 1.0, 3.0, NAN],          # NaN last: must still enter the top-k
    [NAN, 2.0, NAN, -1.0],         # two NaNs tie: lower id first
    [INF, 1.0, -INF, INF],         # +inf ties, -inf last
    [-INF, -INF, -INF, -INF],      # all -inf: a stable order, NaN weights (0/0)
    [NAN, NAN, NAN, NAN],
]


def _expected_ids(row, k):
    """torch's order: stable descending sort, NaN largest."""
    return torch.sort(torch.tensor(row, dtype=torch.float64), descending=True, stable=True)[1][:k]


def _same(a, b):
    """NaN exactly where the other has NaN, +-inf equal, finite values within a few fp32 ulps
    (exp / division rounding differs between backends; the rule is where non-finite goes)."""
    a, b = a.double(), b.double()
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    fin = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(a[~fin & ~a.isnan()], b[~fin & ~b.isnan()]):
        return False
    return bool(((a[fin] - b[fin]).abs() <= 4 * 2**-23 * b[fin].abs().clamp_min(1)).all())


@pytest.mark.parametrize("name", ["softmax_topk", "topk_softmax", "sigmoid_topk", "rank_topk"])
@pytest.mark.parametrize("row", NAN_ROWS, ids=[f"row{i}" for i in range(len(NAN_ROWS))])
def test_nonfinite_keys_rank_like_torch_sort(name, row):
    k = 2
    x = torch.tensor([row])
    expect = _expected_ids(row, k)
    results = {}
    for label, fn in _selection_backends(name):
        a, ids = fn(x, k)
        assert ids.tolist()[0] == expect.tolist(), f"{label}: ids {ids.tolist()} for {row}"
        results[label] = a
    base = results["reference"]
    for label, a in results.items():
        assert _same(a, base), f"{label}: {a.tolist()} vs reference {base.tolist()}"


def test_nan_issue_examples():
    need_ext()
    vals, ids = mo.rank_topk(torch.tensor([[1.0, NAN, 3.0, 2.0]]), 2)
    assert ids.tolist() == [[1, 2]]
    assert math.isnan(vals[0, 0]) and vals[0, 1] == 3.0
    w, ids = mo.softmax_topk(torch.tensor([[0.0, 1.0, 3.0, NAN]]), 2)
    assert ids.tolist() == [[3, 2]]
    assert w.isnan().all(), "a NaN logit makes the softmax row NaN, as torch.softmax does"


@pytest.mark.parametrize("E,k", [(24, 17), (40, 33)])  # k > 16: the sort branch of the CPU kernel
def test_nan_large_k_sort_branch(E, k):
    x = torch.randn(3, E)
    x[0, 5] = NAN
    x[1, E - 1] = NAN
    x[1, 0] = NAN
    x[2, 7] = INF
    for name in ("softmax_topk", "topk_softmax", "sigmoid_topk", "rank_topk"):
        for label, fn in _selection_backends(name):
            _, ids = fn(x, k)
            for t in range(3):
                assert ids[t].tolist() == _expected_ids(x[t].tolist(), k).tolist(), (name, label, t)


def test_nan_softmax_topp():
    x = torch.tensor([[0.0, 1.0, NAN, 2.0], [1.0, 2.0, 3.0, 4.0]])
    outs = {label: fn(x, 0.9) for label, fn in _selection_backends("softmax_topp")}
    r_w, r_ids = outs["reference"]
    assert r_ids[0, 0] == 2  # NaN first
    for label, (w, ids) in outs.items():
        assert torch.equal(ids, r_ids), label
        assert _same(w, r_w), label


def test_nan_router_backward_propagates():
    """A NaN logit: the router weights of that row are NaN and so is its logits gradient where the
    backward formula (docs/OPS.md) reads a NaN; renormalized, the unselected logits get exactly 0
    (the formula never touches them). Other rows are unaffected. Every backend agrees with the
    reference backward op."""
    x = torch.tensor([[0.0, NAN, 1.0, 2.0], [0.5, 1.0, 1.5, 2.0]], requires_grad=True)
    for renorm in (True, False):
        w, ids = mo.softmax_topk(x, 2, renorm)
        gw = 1 + 2 * w.detach()
        (g,) = torch.autograd.grad(w, x, gw)
        assert not g[1].isnan().any()
        assert g[0, 1].isnan()
        expect = ref.softmax_route_backward(gw, w.detach(), ids, x.detach(), renorm, 1.0)
        assert _same(g, expect)
        if renorm:
            assert g[0, 0] == 0 and g[0, 2] == 0
        emu = _emu_op("softmax_route_backward")
        if emu is not None:
            assert _same(emu(gw, w.detach(), ids, x.detach(), renorm, 1.0), expect)


# --- 2. dispatch: E*(block_size-1) overflows int64 / the int32 layout -----------------------------

def _dispatch_backends():
    out = [("reference", OPS["dispatch"].reference_entry)]
    if OPS["dispatch"].native_kernels:
        out.append(("cpu", OPS["dispatch"].op))
    e = _emu_op("dispatch")
    if e is not None:
        out.append(("emu", e))
    out.append(("fake", lambda ids, E, bs: OPS["dispatch"].op(ids.to("meta"), E, bs)))
    return out


@pytest.mark.parametrize("block_size", [2**62 + 1, 2**62, 2**63 - 1, 2**31, 2**29 + 1])
def test_dispatch_huge_block_size_is_value_error(block_size):
    ids = (torch.arange(5) % 4).view(5, 1)
    for label, fn in _dispatch_backends():
        with pytest.raises(ValueError, match="int32 layout"):
            fn(ids, 4, block_size)
            pytest.fail(f"{label}: no error")


def test_dispatch_largest_fitting_block_size_still_runs():
    # T*k + E*(bs-1) == 2^31 - 1 exactly fits; only the fake (no allocation) can run it here.
    ids = torch.zeros(1, 1, dtype=torch.int64, device="meta")
    bs = (2**31 - 1 - 1) // 1 + 1
    order, pos, eo = OPS["dispatch"].op(ids, 1, bs)
    assert order.shape == (2**31 - 1,)


# --- 4. dispatch: the size check comes before any read of the ids ---------------------------------

def test_dispatch_size_check_reads_no_data():
    """ids [2^31, 1] as an expanded view of ONE element (out of range, 99 >= E): the size check
    must answer with ValueError from the shape; reading the values first would take an aminmax
    over 2^31 elements and answer IndexError."""
    ids = torch.full((1, 1), 99, dtype=torch.int64).expand(2**31, 1)
    for label, fn in _dispatch_backends():
        with pytest.raises(ValueError, match="int32 layout"):
            fn(ids, 4, 1)
            pytest.fail(f"{label}: no error")


# --- 3. int64 index ranges beyond int32 ---------------------------------------------------------

def _big_bank(d=2):
    """A [BIG, d]: an expanded view of one row (BIG rows, 8 bytes of storage)."""
    return torch.ones(1, d).expand(BIG, d)


def test_rank_ids_beyond_int32_rejected_cpu():
    """id 2^31 + 3 is valid for a bank of 2^31 + 8 rows; narrowed to int32 it wraps negative and
    reads as -1 (h = 0). The kernels take int32 ids, so the shape is rejected up front."""
    need_ext()
    x = torch.ones(1, 2)
    ids = torch.tensor([[2**31 + 3, 0]], dtype=torch.int64)
    with pytest.raises(ValueError, match="int32"):
        mo.rank_sparse_shrink(x, _big_bank(), ids)
    vals = torch.ones(1, 2)
    with pytest.raises(ValueError, match="int32"):
        mo.rank_sparse_expand(vals, ids, _big_bank().t(), None, 1.0, None)


def test_rank_ids_beyond_int32_reference_same_rule():
    """One rule on every backend: the reference (which could index with int64) rejects the same
    shapes, so a model that runs on one backend runs on all."""
    x = torch.ones(1, 2)
    ids = torch.tensor([[2**31 + 3, -1]], dtype=torch.int64)
    with pytest.raises(ValueError, match="int32"):
        OPS["rank_sparse_shrink"].reference_entry(x, _big_bank(), ids)


@pytest.mark.triton
def test_rank_ids_beyond_int32_rejected_triton():
    if not has_triton():
        pytest.skip("triton is not installed")
    x = torch.ones(1, 2)
    ids = torch.tensor([[2**31 + 3, 0]], dtype=torch.int64)
    with pytest.raises(ValueError, match="int32"):
        OPS["rank_sparse_shrink"].triton_entry()(x, _big_bank(), ids)


@pytest.mark.parametrize("where", ["cpu", "emu"])
def test_rank_ranges_beyond_int32_rejected_without_reading_values(where):
    """rank_scatter / id_histogram into 2^31 + 8 ranks and rank_topk over 2^31 + 8 columns: the
    CUDA launchers skip the value read by default (device asserts), so the bound is a shape check
    that runs in every mode, before the [T, num_ranks] output is allocated."""
    ids = torch.tensor([[2**31 + 3]], dtype=torch.int64)
    h = torch.zeros(1, 1).expand(1, BIG)
    calls = {"rank_scatter": (torch.ones(1, 1), ids, BIG), "id_histogram": (ids, BIG),
             "rank_topk": (h, 1, None, None, False)}
    ran = 0
    for name, args in calls.items():
        if where == "cpu":
            if not OPS[name].native_kernels:
                continue
            fn = OPS[name].op
        else:
            fn = _emu_op(name)
            if fn is None:
                continue
        with pytest.raises(ValueError, match="int32"):
            fn(*args)
        ran += 1
    if not ran:
        pytest.skip(f"no {where} kernels here")


def test_rank_offsets_beyond_int32_rejected():
    """A grouped bank of R = 2^31 + 8 rows: rank_offsets (int64) would wrap on narrowing."""
    need_ext()
    x = torch.ones(1, 2)
    ro = torch.tensor([0, BIG], dtype=torch.int64)
    order, pos, eo = mo.dispatch(torch.zeros(1, 1, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="int32"):
        mo.sgmv_shrink(x, _big_bank(), ro, order, pos, eo, max_rank=BIG)
    with pytest.raises(ValueError, match="int32"):
        OPS["sgmv_shrink"].reference_entry(x, _big_bank(), ro, order, pos, eo, None, None, BIG)


# --- 5. Triton: fp32 data with fp64 routing weights / gate / scales -------------------------------

def _triton_or_skip():
    if not has_triton():
        pytest.skip("triton is not installed")


def _close(ours, lo, hi, name):
    # the flash-attention rule plus a few fp32 ulps (the kernels sum in another order)
    assert_close_fa(ours.double(), lo.double(), hi.double(), name=name, floor=8 * 2**-23)


@pytest.mark.triton
def test_triton_gated_fp64_gate_and_scales():
    _triton_or_skip()
    T, d_in, d_out, E, r = 5, 8, 7, 3, 2
    x, A, B = torch.randn(T, d_in), torch.randn(E * r, d_in), torch.randn(d_out, E * r)
    gate, scales = torch.rand(T, E, dtype=torch.float64), torch.rand(E, dtype=torch.float64)
    ro = torch.arange(E + 1, dtype=torch.int32) * r
    # The launcher itself: it used to raise TypeError on the fp64 gate.
    y = OPS["stacked_gated_lora"].triton_entry()(x, A, B, gate, ro, scales, None, False)
    lo = ref.stacked_gated_lora(x, A, B, gate.float(), ro, scales.float(), None, False)
    hi = ref.stacked_gated_lora(x.double(), A.double(), B.double(), gate, ro, scales, None, False)
    assert y.dtype == torch.float32
    _close(y, lo, hi, "stacked_gated_lora")
    gy = torch.randn(T, d_out)
    dx, dA, dB, dgate = OPS["stacked_gated_lora_backward"].triton_entry()(
        gy, x, A, B, gate, ro, scales, False)
    assert dgate.dtype == torch.float64  # the gradient has the gate's dtype
    rl = ref.stacked_gated_lora_backward(gy, x, A, B, gate.float(), ro, scales.float(), False)
    rh = ref.stacked_gated_lora_backward(gy.double(), x.double(), A.double(), B.double(), gate, ro,
                                         scales, False)
    for name, a, l, h in zip(("dx", "dA", "dB", "dgate"), (dx, dA, dB, dgate), rl, rh):
        _close(a, l, h, name)
    # Through the dispatcher on the GPU path, forward and backward ("auto" and "triton").
    for which in ("triton", "auto"):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, gate)]
        with backend.gpu_path_on_cpu(which):
            out = mo.stacked_gated_lora(leaves[0], leaves[1], leaves[2], leaves[3], ro, scales)
            grads = torch.autograd.grad(out, leaves, gy)
        _close(out, lo, hi, f"{which} y")
        assert grads[3].dtype == torch.float64
        for name, a, l, h in zip(("dx", "dA", "dB", "dgate"), grads, rl, rh):
            _close(a, l, h, f"{which} {name}")


@pytest.mark.triton
def test_triton_sgmv_and_sparse_fp64_weights():
    _triton_or_skip()
    T, d, E, k, r = 6, 8, 3, 2, 4
    x, A, Bk = torch.randn(T, d), torch.randn(E * r, d), torch.randn(5, E * r)
    ro = torch.arange(E + 1, dtype=torch.int32) * r
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    w, scales = torch.rand(T, k, dtype=torch.float64), torch.rand(E, dtype=torch.float64)
    order, pos, eo = ref.dispatch(ids, E, 1)
    h = OPS["sgmv_shrink"].triton_entry()(x, A, ro, order, pos, eo, w, scales, r)
    lo = ref.sgmv_shrink(x, A, ro, order, pos, eo, w.float(), scales.float(), max_rank=r)
    hi = ref.sgmv_shrink(x.double(), A.double(), ro, order, pos, eo, w, scales, max_rank=r)
    _close(h, lo, hi, "sgmv_shrink")
    y = OPS["sgmv_expand"].triton_entry()(lo, Bk, ro, order, pos, eo, w, scales, None)
    ylo = ref.sgmv_expand(lo, Bk, ro, order, pos, eo, w.float(), scales.float(), None)
    yhi = ref.sgmv_expand(lo.double(), Bk.double(), ro, order, pos, eo, w, scales, None)
    _close(y, ylo, yhi, "sgmv_expand")
    vals, rid = torch.randn(T, k), torch.randint(0, E * r, (T, k), dtype=torch.int32)
    y = OPS["rank_sparse_expand"].triton_entry()(vals, rid, Bk, w, 0.5, None)
    ylo = ref.rank_sparse_expand(vals, rid, Bk, w.float(), 0.5, None)
    yhi = ref.rank_sparse_expand(vals.double(), rid, Bk.double(), w, 0.5, None)
    _close(y, ylo, yhi, "rank_sparse_expand")


@pytest.mark.triton
def test_triton_still_refuses_fp64_data():
    _triton_or_skip()
    from molora_ops.triton._utils import reject_float64
    with pytest.raises(TypeError):
        reject_float64(torch.zeros(1, dtype=torch.float64), None)
    reject_float64(torch.zeros(1), torch.zeros(1, dtype=torch.float64), None)


# --- the weight rules of docs/OPS.md "Non-finite values" -----------------------------------------

def test_nonfinite_weight_rules():
    rows = torch.tensor([[0.0, NAN, 1.0, 2.0], [0.0, INF, 1.0, 2.0], [-INF] * 4, [0.0, 1.0, 2.0, 3.0]])
    for name in ("softmax_topk", "topk_softmax"):
        for label, fn in _selection_backends(name):
            w, _ = fn(rows, 2)
            assert w[:3].isnan().all(), (name, label)
            assert torch.isfinite(w[3]).all(), (name, label)
    for label, fn in _selection_backends("sigmoid_topk"):
        w, ids = fn(rows[:1], 2)
        assert w.isnan().all(), label
    # normalize=False: only the NaN slot is NaN
    w, ids = ref.sigmoid_topk(rows[:1], 2, None, False, False, 1.0)
    assert w[0, 0].isnan() and w[0, 1] == torch.sigmoid(torch.tensor(2.0))
    others = [OPS["sigmoid_topk"].op] if OPS["sigmoid_topk"].native_kernels else []
    if _emu_op("sigmoid_topk") is not None:
        others.append(_emu_op("sigmoid_topk"))
    for fn in others:
        assert _same(fn(rows[:1], 2, None, False, False, 1.0)[0], w)
    for label, fn in _selection_backends("softmax_topp"):
        w, ids = fn(rows[:1], 0.9)
        assert ids[0].tolist() == [1, -1, -1, -1], label  # min_k = 1 column kept


def _layer(x, A, B, ids, w, E, r):
    order, pos, eo = mo.dispatch(ids, E, 1)
    ro = torch.arange(E + 1, dtype=torch.int32) * r
    h = mo.sgmv_shrink(x, A, ro, order, pos, eo, None, None, max_rank=r)
    return mo.sgmv_expand(h, B, ro, order, pos, eo, w, None, None)


@pytest.mark.parametrize("path", ["cpu", "emu+triton"])
def test_nonfinite_data_stays_in_its_rows(path):
    """A NaN token row reaches only its own output row; a NaN in the bank rows of an expert that no
    token selects (and in a token whose only pair is dropped) reaches nothing."""
    need_ext()
    T, d, E, k, r = 5, 8, 3, 2, 4
    x, A, B = torch.randn(T, d), torch.randn(E * r, d), torch.randn(6, E * r)
    ids = torch.tensor([[0, 1], [1, -1], [0, -1], [1, 0], [-1, -1]], dtype=torch.int32)
    x[2] = NAN
    x[4] = INF  # dropped entirely
    A[2 * r:] = NAN  # expert 2 is never selected
    w = torch.rand(T, k)
    if path == "cpu":
        y = _layer(x, A, B, ids, w, E, r)
    else:
        if not has_triton():
            pytest.skip("triton is not installed")
        with backend.gpu_path_on_cpu("auto"):
            y = _layer(x, A, B, ids, w, E, r)
    assert y[2].isnan().all()
    assert torch.isfinite(y[[0, 1, 3]]).all()
    assert (y[4] == 0).all()
