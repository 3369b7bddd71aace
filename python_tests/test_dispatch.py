"""Family 2: dispatch (exact, vs reference and vs the contract's invariants), gather_rows and
combine_rows (forward + backward vs reference in every CPU dtype)."""
import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import (check_dispatch_invariants, compare_with_reference, dtype_params, make_ids,
                   noncontig, routing_weights, assert_index_equal)

# (name, T, E, k, ids kind, block_size)
DISPATCH_CASES = [
    ("router", 37, 8, 2, "router", 1),
    ("router-bs4", 37, 8, 2, "router", 4),
    ("T0", 0, 8, 2, "router", 1),
    ("T0-bs4", 0, 8, 2, "router", 4),
    ("T1", 1, 7, 3, "router", 1),
    ("T1-bs3", 1, 7, 3, "router", 3),
    ("empty-expert", 20, 7, 2, "exclude", 1),
    ("empty-expert-bs3", 20, 7, 2, "exclude", 3),
    ("one-expert-k1", 15, 7, 1, "one", 1),
    ("one-expert-k1-bs4", 15, 7, 1, "one", 4),
    ("one-expert-k2-drop", 15, 7, 2, "one", 1),
    ("E64", 50, 64, 6, "router", 1),
    ("E64-bs8", 50, 64, 6, "router", 8),
    ("k=E", 9, 7, 7, "router", 1),
    ("topp-drop", 30, 8, 8, "topp", 1),
    ("topp-drop-bs4", 30, 8, 8, "topp", 4),
    ("random-drop-bs2", 25, 7, 3, "drop", 2),
    ("E1", 5, 1, 1, "router", 1),
    ("E1-bs16", 5, 1, 1, "router", 16),
]
CASE_IDS = [c[0] for c in DISPATCH_CASES]


def _dispatch_ref_check(ids, E, bs):
    ours = molora_ops.dispatch(ids, E, bs)
    r = ref.dispatch(ids, E, bs)
    assert len(ours) == 3
    for name, a, b in zip(("order", "pos", "expert_offsets"), ours, r):
        assert_index_equal(a, b, name=f"dispatch {name}")
    check_dispatch_invariants(ids, E, bs, *ours)
    return ours


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=CASE_IDS)
def test_dispatch(case):
    _, T, E, k, kind, bs = case
    ids = make_ids(kind, T, E, k)
    if kind == "exclude":
        assert not (ids == 0).any()
    snapshot = ids.clone()
    order, pos, eo = _dispatch_ref_check(ids, E, bs)
    assert torch.equal(ids, snapshot)
    counts = torch.bincount(ids[ids >= 0].long(), minlength=E) if T else torch.zeros(E, dtype=torch.long)
    seg = (eo[1:] - eo[:-1]).long()
    assert torch.equal(seg, (counts + bs - 1) // bs * bs)
    if kind == "exclude":
        assert seg[0] == 0 and seg[E // 2] == 0
    if kind == "one":
        assert int(seg[E // 2]) == seg.sum()


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["contig", "transpose", "slice"])
@pytest.mark.parametrize("bs", [1, 4])
def test_dispatch_index_dtype_and_layout(index_dtype, layout, bs):
    T, E, k = 23, 7, 3
    ids = make_ids("drop", T, E, k).to(index_dtype)
    if layout != "contig":
        ids = noncontig(ids, layout)
        assert not ids.is_contiguous()
    order, pos, eo = _dispatch_ref_check(ids, E, bs)
    expect = molora_ops.dispatch(ids.contiguous().to(torch.int32), E, bs)
    for a, b in zip((order, pos, eo), expect):
        assert torch.equal(a, b)


def test_dispatch_default_block_size():
    ids = make_ids("router", 12, 6, 2)
    a = molora_ops.dispatch(ids, 6)
    b = molora_ops.dispatch(ids, 6, 1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[0].numel() == 24


def test_dispatch_multi_tenant():
    # serving: ids = adapter_of_token[:, None], k = 1
    adapter = torch.randint(0, 5, (40,), dtype=torch.int32)
    order, pos, eo = _dispatch_ref_check(adapter[:, None], 5, 1)
    assert torch.equal(order.long().sort().values, torch.arange(40))


def test_dispatch_hand_example():
    ids = torch.tensor([[2, 0], [0, -1], [2, 1]], dtype=torch.int32)
    order, pos, eo = molora_ops.dispatch(ids, 3, 2)
    # expert 0: pairs 1, 2 ; expert 1: pair 5 (+1 pad) ; expert 2: pairs 0, 4
    assert eo.tolist() == [0, 2, 4, 6]
    assert order.tolist() == [1, 2, 5, -1, 0, 4, -1, -1, -1]  # P = T*k + E*(bs-1) = 9
    assert pos.tolist() == [[4, 0], [1, -1], [5, 2]]


# ------------------------------------------------------------------ gather_rows / combine_rows

# (name, T, E, k, ids kind, block_size, d)
ROW_CASES = [
    ("router", 37, 8, 2, "router", 1, 24),
    ("router-bs4", 37, 8, 2, "router", 4, 24),
    ("T0", 0, 8, 2, "router", 1, 16),
    ("T1", 1, 7, 3, "router", 2, 16),
    ("empty-expert", 20, 7, 2, "exclude", 1, 16),
    ("one-expert", 15, 7, 2, "one", 4, 16),
    ("E64", 50, 64, 6, "router", 1, 32),
    ("k=E", 9, 7, 7, "router", 1, 16),
    ("topp-drop", 30, 8, 8, "topp", 1, 20),
    ("random-drop", 25, 7, 3, "drop", 2, 20),
]
ROW_IDS = [c[0] for c in ROW_CASES]


def _routing(case, weights_kind, dtype):
    _, T, E, k, kind, bs, d = case
    ids = make_ids(kind, T, E, k)
    order, pos, eo = ref.dispatch(ids, E, bs)
    if weights_kind is None:
        w = None
    else:
        w = routing_weights(ids, torch.float32 if weights_kind == "f32" else dtype)
    return T, k, d, ids, order, pos, eo, w


@dtype_params()
@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
@pytest.mark.parametrize("weights_kind", [None, "f32", "data"], ids=["now", "w32", "wdata"])
def test_gather_rows(dtype, case, weights_kind):
    T, k, d, ids, order, pos, eo, w = _routing(case, weights_kind, dtype)
    x = torch.randn(T, d, dtype=torch.float64).to(dtype)
    diff = [0] if w is None else [0, 3]
    (xp,), _ = compare_with_reference("gather_rows", [x, order, pos, w], diff=diff)
    assert xp.shape == (order.numel(), d) and xp.dtype == dtype
    assert (xp[order < 0] == 0).all(), "padding rows must be zero"


@dtype_params()
@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
@pytest.mark.parametrize("weights_kind", [None, "f32", "data"], ids=["now", "w32", "wdata"])
def test_combine_rows(dtype, case, weights_kind):
    T, k, d, ids, order, pos, eo, w = _routing(case, weights_kind, dtype)
    y_perm = torch.randn(order.numel(), d, dtype=torch.float64).to(dtype)  # garbage in padding rows too
    diff = [0] if w is None else [0, 3]
    (y,), _ = compare_with_reference("combine_rows", [y_perm, order, pos, w], diff=diff)
    assert y.shape == (T, d) and y.dtype == dtype


@pytest.mark.parametrize("name", ["gather_rows", "combine_rows"])
@pytest.mark.parametrize("layout", ["transpose", "slice"])
@dtype_params([torch.float32, torch.bfloat16])
def test_rows_noncontiguous(name, layout, dtype):
    case = ("nc", 21, 7, 3, "drop", 2, 12)
    T, k, d, ids, order, pos, eo, w = _routing(case, "f32", dtype)
    rows = T if name == "gather_rows" else order.numel()
    data = noncontig(torch.randn(rows, d, dtype=torch.float64).to(dtype), layout)
    w = noncontig(w, layout)
    pos_nc = noncontig(pos, layout)
    order_nc = noncontig(order, "slice")
    assert not data.is_contiguous() and not w.is_contiguous() and not pos_nc.is_contiguous()
    ours, _ = compare_with_reference(name, [data, order_nc, pos_nc, w], diff=[0, 3])
    contig = getattr(molora_ops, name)(data.contiguous(), order, pos, w.contiguous())
    torch.testing.assert_close(ours[0], contig)


@pytest.mark.parametrize("name", ["gather_rows", "combine_rows"])
def test_rows_int64_metadata(name):
    case = ("i64", 17, 6, 2, "drop", 3, 8)
    T, k, d, ids, order, pos, eo, w = _routing(case, "f32", torch.float32)
    rows = T if name == "gather_rows" else order.numel()
    data = torch.randn(rows, d)
    a = getattr(molora_ops, name)(data, order.long(), pos.long(), w)
    b = getattr(molora_ops, name)(data, order, pos, w)
    torch.testing.assert_close(a, b)
    compare_with_reference(name, [data, order.long(), pos.long(), w], diff=[0, 3])


def test_gather_combine_roundtrip():
    # combine(gather(x)) with unit weights and k slots all routed == k * x
    T, E, k, d = 19, 5, 3, 8
    ids = make_ids("router", T, E, k)
    order, pos, _ = molora_ops.dispatch(ids, E, 4)
    x = torch.randn(T, d, dtype=torch.float64)
    y = molora_ops.combine_rows(molora_ops.gather_rows(x, order, pos), order, pos)
    torch.testing.assert_close(y, k * x)
