"""Family 4: rank_topk, rank_sparse_shrink, rank_sparse_expand, id_histogram (forward + backward vs
reference, every CPU dtype, edge shapes, -1 ids, non-contiguous inputs, ties)."""
import math

import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import (assert_index_equal, compare_with_reference, distinct_ids, drop_ids, dtype_params,
                   noncontig, resample_rows, tie_free_logits, well_separated)

# (name, T, R, k, scores kind, bias, use_abs)
TOPK_CASES = [
    ("plain", 13, 17, 4, None, False, False),
    ("bias-flylora", 13, 32, 8, None, True, False),
    ("abs", 11, 17, 5, None, False, True),
    ("abs-bias", 11, 17, 5, None, True, True),
    ("scores-smora", 9, 16, 4, "f32", True, False),
    ("scores-data-abs", 9, 16, 4, "data", False, True),
    ("T0", 0, 8, 2, None, True, False),
    ("T1", 1, 8, 3, None, False, False),
    ("k=R", 6, 7, 7, None, True, True),
    ("R64", 20, 64, 16, None, True, False),
    ("R1", 5, 1, 1, None, False, False),
]


def _rank_topk_inputs(case, dtype):
    _, T, R, k, sk, use_bias, use_abs = case
    bias = (torch.randn(R, dtype=torch.float64) * 0.3).float() if use_bias else None

    def key(v):
        kv = v.double() + (0 if bias is None else bias.double())
        return kv.abs() if use_abs else kv

    gen_dtype = dtype if sk in (None, "data") else torch.float32
    keyed = resample_rows(lambda n: tie_free_logits(n, R, gen_dtype, scale=2.0),
                          lambda v: well_separated(key(v), k, 1e-4), T)
    if sk is None:
        h, scores = keyed, None
    else:
        h, scores = torch.randn(T, R, dtype=torch.float64).to(dtype), keyed
    return h, k, scores, bias, use_abs


@dtype_params()
@pytest.mark.parametrize("case", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_rank_topk(dtype, case):
    h, k, scores, bias, use_abs = _rank_topk_inputs(case, dtype)
    (vals, ids), _ = compare_with_reference("rank_topk", [h, k, scores, bias, use_abs], diff=[0])
    T, R = h.shape
    assert vals.shape == (T, k) and vals.dtype == dtype and ids.dtype == torch.int32
    if T:
        assert torch.equal(vals, h.gather(1, ids.long()))  # values are h itself, not the key
        key = (scores if scores is not None else h).double() + (0 if bias is None else bias.double())
        key = key.abs() if use_abs else key
        expect = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(ids.long(), expect)


def test_rank_topk_defaults():
    h = tie_free_logits(5, 9)
    a = molora_ops.rank_topk(h, 3)
    b = molora_ops.rank_topk(h, 3, None, None, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@dtype_params([torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_abs", [False, True])
def test_rank_topk_ties_lower_id_first(dtype, use_abs):
    h = torch.randint(-2, 3, (12, 10)).to(dtype)
    h[0] = torch.tensor([1, -2, 2, 0, 2, -2, 1, 0, 1, 2], dtype=dtype)
    vals, ids = molora_ops.rank_topk(h, 4, None, None, use_abs)
    key = h.float().abs() if use_abs else h.float()
    expect = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :4]
    assert ids[0].tolist() == ([1, 2, 4, 5] if use_abs else [2, 4, 9, 0])
    assert torch.equal(ids.long(), expect)
    v_ref, ids_ref = ref.rank_topk(h, 4, None, None, use_abs)
    assert torch.equal(ids, ids_ref) and torch.equal(vals, v_ref)


@pytest.mark.parametrize("layout", ["transpose", "slice"])
@dtype_params([torch.float32, torch.bfloat16])
def test_rank_topk_noncontiguous(layout, dtype):
    h, k, scores, bias, use_abs = _rank_topk_inputs(("nc", 9, 16, 4, "f32", True, False), dtype)
    h_nc, s_nc, b_nc = noncontig(h, layout), noncontig(scores, layout), noncontig(bias)
    ours, _ = compare_with_reference("rank_topk", [h_nc, k, s_nc, b_nc, use_abs], diff=[0])
    c = molora_ops.rank_topk(h, k, scores, bias, use_abs)
    assert torch.equal(ours[0], c[0]) and torch.equal(ours[1], c[1])


# ------------------------------------------------------------------ rank_sparse_shrink / expand

# (name, T, R, k, d, ids kind)
SPARSE_CASES = [
    ("topk", 13, 17, 4, 24, "topk"),
    ("drop", 13, 17, 4, 24, "drop"),
    ("T0", 0, 8, 2, 8, "topk"),
    ("T1", 1, 8, 3, 8, "topk"),
    ("R64", 20, 64, 16, 16, "topk"),
    ("k=R", 6, 7, 7, 8, "topk"),
    ("R1", 5, 1, 1, 8, "topk"),
    ("all-dropped", 4, 8, 3, 8, "alldrop"),
    ("repeated-ids", 7, 9, 4, 8, "dups"),
    # d = 75: the fp32 AVX2 kernels' 32- and 8-column vector steps and their scalar tails; 20 kept
    # ranks: the expand's rows in two passes (16 + 4) and the shrink's dots in three groups of <= 8;
    # 32 pairs per rank: the weight gradient's rows in two passes
    ("wide-k20", 9, 40, 20, 75, "topk"),
    ("wide-k20-drop", 13, 40, 20, 75, "drop"),
    ("wide-32-per-rank", 40, 5, 4, 75, "topk"),
]


def _sparse_ids(T, R, k, kind):
    if kind == "topk":
        return ref.rank_topk(tie_free_logits(T, R), k, None, None, False)[1]
    if kind == "drop":
        return drop_ids(distinct_ids(T, R, k), 0.35)
    if kind == "alldrop":
        return torch.full((T, k), -1, dtype=torch.int32)
    if kind == "dups":
        return torch.randint(0, 3, (T, k), dtype=torch.int32)
    raise ValueError(kind)


@dtype_params()
@pytest.mark.parametrize("case", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_rank_sparse_shrink(dtype, case):
    _, T, R, k, d, kind = case
    ids = _sparse_ids(T, R, k, kind)
    x = torch.randn(T, d, dtype=torch.float64).to(dtype)
    A = (torch.randn(R, d, dtype=torch.float64) / math.sqrt(d)).to(dtype)
    (h,), _ = compare_with_reference("rank_sparse_shrink", [x, A, ids], diff=[0, 1])
    assert h.shape == (T, k) and h.dtype == dtype
    assert (h[ids < 0] == 0).all()


@dtype_params()
@pytest.mark.parametrize("case", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
@pytest.mark.parametrize("opts", [("f32", 1.0, True), (None, 0.5, False), ("data", 2.0, True)],
                         ids=["w32-base", "now-nobase", "wdata-base"])
def test_rank_sparse_expand(dtype, case, opts):
    _, T, R, k, d, kind = case
    wk, scale, with_base = opts
    ids = _sparse_ids(T, R, k, kind)
    values = torch.randn(T, k, dtype=torch.float64).to(dtype)
    B = torch.randn(d, R, dtype=torch.float64).to(dtype)
    w = None if wk is None else (torch.rand(T, k, dtype=torch.float64) + 0.25).to(
        torch.float32 if wk == "f32" else dtype)
    base = torch.randn(T, d, dtype=torch.float64).to(dtype) if with_base else None
    diff = [0, 2] + ([3] if w is not None else []) + ([5] if with_base else [])
    (y,), _ = compare_with_reference("rank_sparse_expand", [values, ids, B, w, scale, base], diff=diff)
    assert y.shape == (T, d) and y.dtype == dtype


@pytest.mark.parametrize("layout", ["transpose", "slice"])
@dtype_params([torch.float32, torch.bfloat16])
def test_rank_sparse_noncontiguous(layout, dtype):
    T, R, k, d = 11, 12, 4, 10
    ids = _sparse_ids(T, R, k, "drop")
    ids_nc = noncontig(ids, layout)
    x = noncontig(torch.randn(T, d, dtype=torch.float64).to(dtype), layout)
    A = noncontig(torch.randn(R, d, dtype=torch.float64).to(dtype), layout)
    (h,), _ = compare_with_reference("rank_sparse_shrink", [x, A, ids_nc], diff=[0, 1])
    torch.testing.assert_close(h, molora_ops.rank_sparse_shrink(x.contiguous(), A.contiguous(), ids))
    values = noncontig(torch.randn(T, k, dtype=torch.float64).to(dtype), layout)
    B = noncontig(torch.randn(d, R, dtype=torch.float64).to(dtype), layout)
    w = noncontig(torch.rand(T, k) + 0.25, layout)
    base = noncontig(torch.randn(T, d, dtype=torch.float64).to(dtype), layout)
    (y,), _ = compare_with_reference("rank_sparse_expand", [values, ids_nc, B, w, 1.5, base],
                                     diff=[0, 2, 3, 5])
    y_c = molora_ops.rank_sparse_expand(values.contiguous(), ids, B.contiguous(), w.contiguous(), 1.5,
                                        base.contiguous())
    torch.testing.assert_close(y, y_c)


def test_rank_sparse_int64_ids():
    T, R, k, d = 9, 10, 3, 6
    ids = _sparse_ids(T, R, k, "drop")
    x, A, B = torch.randn(T, d), torch.randn(R, d), torch.randn(d, R)
    compare_with_reference("rank_sparse_shrink", [x, A, ids.long()], diff=[0, 1])
    compare_with_reference("rank_sparse_expand", [torch.randn(T, k), ids.long(), B, None, 1.0, None],
                           diff=[0, 2])


def test_rank_sparse_expand_defaults():
    T, R, k, d = 5, 6, 2, 4
    ids = _sparse_ids(T, R, k, "topk")
    v, B = torch.randn(T, k), torch.randn(d, R)
    a = molora_ops.rank_sparse_expand(v, ids, B)
    b = molora_ops.rank_sparse_expand(v, ids, B, None, 1.0, None)
    assert torch.equal(a, b)


def test_smora_pipeline_matches_dense():
    # rank_topk -> rank_sparse_shrink -> rank_sparse_expand equals the dense masked LoRA
    T, R, k, d_in, d_out = 10, 16, 5, 12, 8
    x = torch.randn(T, d_in, dtype=torch.float64)
    A = torch.randn(R, d_in, dtype=torch.float64)
    B = torch.randn(d_out, R, dtype=torch.float64)
    h_full = x @ A.t()
    vals, ids = molora_ops.rank_topk(h_full, k)
    h = molora_ops.rank_sparse_shrink(x, A, ids)
    torch.testing.assert_close(h, vals)
    y = molora_ops.rank_sparse_expand(h, ids, B, None, 2.0, None)
    mask = torch.zeros(T, R, dtype=torch.float64).scatter_(1, ids.long(), 1.0)
    torch.testing.assert_close(y, 2.0 * (h_full * mask) @ B.t())


# ------------------------------------------------------------------ id_histogram

# (name, shape, num_bins, kind)
HIST_CASES = [
    ("2d", (37, 3), 8, "drop"),
    ("1d", (50,), 7, "plain"),
    ("3d", (4, 5, 6), 64, "drop"),
    ("empty", (0, 3), 5, "plain"),
    ("all-dropped", (6, 2), 4, "alldrop"),
    ("one-bin", (9, 2), 1, "drop"),
    ("scalar-ish", (1,), 3, "plain"),
    ("topp-ids", (30, 8), 8, "topp"),
]


def _hist_ids(shape, nb, kind):
    if kind == "topp":
        from utils import topp_routing
        return topp_routing(shape[0], shape[1])[2]
    ids = torch.randint(0, nb, shape, dtype=torch.int32)
    if kind == "drop":
        ids[torch.rand(shape) < 0.3] = -1
    if kind == "alldrop":
        ids.fill_(-1)
    return ids


@pytest.mark.parametrize("case", HIST_CASES, ids=[c[0] for c in HIST_CASES])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_id_histogram(case, index_dtype):
    _, shape, nb, kind = case
    ids = _hist_ids(shape, nb, kind).to(index_dtype)
    snapshot = ids.clone()
    counts = molora_ops.id_histogram(ids, nb)
    assert torch.equal(ids, snapshot)
    assert_index_equal(counts, ref.id_histogram(ids, nb), "id_histogram")
    flat = ids.flatten().long()
    expect = torch.bincount(flat[flat >= 0], minlength=nb)
    assert torch.equal(counts.long(), expect)


@pytest.mark.parametrize("layout", ["transpose", "slice"])
def test_id_histogram_noncontiguous(layout):
    ids = _hist_ids((21, 4), 9, "drop")
    nc = noncontig(ids, layout)
    assert not nc.is_contiguous()
    counts = molora_ops.id_histogram(nc, 9)
    assert torch.equal(counts, molora_ops.id_histogram(ids, 9))
    assert_index_equal(counts, ref.id_histogram(ids, 9), "id_histogram")
