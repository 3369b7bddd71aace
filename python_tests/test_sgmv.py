"""Family 3: sgmv_shrink, sgmv_expand, stacked_gated_lora (forward + backward vs reference, every
CPU dtype, ragged / rank-0 / rank-1 / rank-17 banks, dispatch padding, dropped ids, E=64), plus an
end-to-end MoE-LoRA pipeline."""
import math

import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import (compare_with_reference, dtype_params, make_ids, max_rank_of, noncontig,
                   ragged_rank_offsets, rank_offsets_from_ranks, routing_weights, tie_free_logits, uniform_rank_offsets)

# (name, T, E, k, ids kind, block_size, ranks, d_in, d_out, weights kind, scales, extra max_rank)
SGMV_CASES = [
    ("r1", 17, 7, 2, "router", 1, ("u", 1), 24, 20, "f32", True, 0),
    ("r17", 11, 7, 2, "router", 1, ("u", 17), 24, 20, None, True, 0),
    ("ragged", 23, 7, 3, "router", 1, ("rag", 9), 24, 20, "f32", True, 3),
    ("ragged-bs4", 23, 7, 3, "router", 4, ("rag", 9), 24, 20, "data", False, 0),
    ("ragged-3zero-k=E", 10, 6, 6, "router", 2, ("rag3", 5), 16, 12, "f32", True, 0),
    ("T0", 0, 7, 2, "router", 1, ("rag", 6), 16, 16, "f32", True, 0),
    ("T0-bs4", 0, 7, 2, "router", 4, ("rag", 6), 16, 16, None, None, 2),
    ("T1", 1, 7, 2, "router", 1, ("u", 4), 16, 16, "f32", True, 1),
    ("E64", 40, 64, 4, "router", 1, ("rag", 6), 16, 12, "f32", True, 0),
    ("E64-bs8", 40, 64, 4, "router", 8, ("rag", 6), 16, 12, None, True, 0),
    ("empty-expert", 20, 7, 2, "exclude", 1, ("rag", 5), 16, 16, "f32", True, 0),
    ("one-expert", 16, 7, 1, "one", 4, ("u", 8), 16, 16, "f32", True, 0),
    ("k=E", 6, 4, 4, "router", 1, ("rag", 5), 16, 16, "f32", None, 0),
    ("topp-drop", 20, 8, 8, "topp", 2, ("rag", 7), 16, 16, "f32", True, 0),
    ("random-drop", 18, 7, 3, "drop", 1, ("u", 3), 16, 16, "data", True, 0),
    ("wide", 9, 5, 2, "router", 1, ("u", 16), 64, 48, "f32", True, 0),
]
SGMV_IDS = [c[0] for c in SGMV_CASES]


def _rank_offsets(spec, E):
    kind, r = spec
    if kind == "u":
        return uniform_rank_offsets(E, r)
    return ragged_rank_offsets(E, r, zeros={"rag": 1, "rag3": 3}[kind])


def _sgmv_setup(case, dtype):
    _, T, E, k, kind, bs, rspec, d_in, d_out, wk, use_s, extra = case
    ids = make_ids(kind, T, E, k)
    order, pos, eo = ref.dispatch(ids, E, bs)
    ro = _rank_offsets(rspec, E)
    R = int(ro[-1])
    mr = max_rank_of(ro) + extra
    w = None if wk is None else routing_weights(ids, torch.float32 if wk == "f32" else dtype)
    s = (torch.rand(E, dtype=torch.float64) + 0.5).float() if use_s else None
    return dict(T=T, E=E, k=k, ids=ids, order=order, pos=pos, eo=eo, ro=ro, R=R, mr=mr, w=w, s=s,
                d_in=d_in, d_out=d_out)


def test_uniform_rank_offsets():
    for E, r in [(1, 1), (7, 17), (64, 4), (3, 0)]:
        ro = molora_ops.uniform_rank_offsets(E, r)
        assert ro.dtype == torch.int32 and ro.device.type == "cpu"
        assert torch.equal(ro, uniform_rank_offsets(E, r))
    ro = molora_ops.uniform_rank_offsets(5, 2, device="cpu")
    assert ro.tolist() == [0, 2, 4, 6, 8, 10]


@dtype_params()
@pytest.mark.parametrize("case", SGMV_CASES, ids=SGMV_IDS)
def test_sgmv_shrink(dtype, case):
    c = _sgmv_setup(case, dtype)
    x = torch.randn(c["T"], c["d_in"], dtype=torch.float64).to(dtype)
    A = (torch.randn(c["R"], c["d_in"], dtype=torch.float64) / math.sqrt(c["d_in"])).to(dtype)
    args = [x, A, c["ro"], c["order"], c["pos"], c["eo"], c["w"], c["s"]]
    diff = [0, 1] if c["w"] is None else [0, 1, 6]
    (h,), _ = compare_with_reference("sgmv_shrink", args, {"max_rank": c["mr"]}, diff=diff)
    assert h.shape == (c["order"].numel(), c["mr"]) and h.dtype == dtype
    # zero for padding rows and for columns a >= r_e
    assert (h[c["order"] < 0] == 0).all()
    ranks = (c["ro"][1:] - c["ro"][:-1]).long()
    for e in range(c["E"]):
        rows = h[int(c["eo"][e]):int(c["eo"][e + 1])]
        assert (rows[:, int(ranks[e]):] == 0).all()


@dtype_params()
@pytest.mark.parametrize("case", SGMV_CASES, ids=SGMV_IDS)
@pytest.mark.parametrize("with_base", [False, True], ids=["nobase", "base"])
def test_sgmv_expand(dtype, case, with_base):
    c = _sgmv_setup(case, dtype)
    P = c["order"].numel()
    h = torch.randn(P, c["mr"], dtype=torch.float64).to(dtype)  # garbage beyond r_e / in padding rows too
    B = (torch.randn(c["d_out"], c["R"], dtype=torch.float64) / math.sqrt(max(c["mr"], 1))).to(dtype)
    base = torch.randn(c["T"], c["d_out"], dtype=torch.float64).to(dtype) if with_base else None
    args = [h, B, c["ro"], c["order"], c["pos"], c["eo"], c["w"], c["s"], base]
    diff = [0, 1] + ([] if c["w"] is None else [6]) + ([8] if with_base else [])
    (y,), _ = compare_with_reference("sgmv_expand", args, diff=diff)
    assert y.shape == (c["T"], c["d_out"]) and y.dtype == dtype
    if with_base:
        assert y.data_ptr() != base.data_ptr() or y.numel() == 0, "must return a new tensor"


@pytest.mark.parametrize("layout", ["transpose", "slice"])
@dtype_params([torch.float32, torch.bfloat16])
def test_sgmv_noncontiguous(layout, dtype):
    case = ("nc", 19, 6, 2, "drop", 2, ("rag", 5), 12, 10, "f32", True, 1)
    c = _sgmv_setup(case, dtype)
    x = noncontig(torch.randn(c["T"], c["d_in"], dtype=torch.float64).to(dtype), layout)
    A = noncontig(torch.randn(c["R"], c["d_in"], dtype=torch.float64).to(dtype), layout)
    w = noncontig(c["w"], layout)
    ro, order, pos, eo = (noncontig(c["ro"]), noncontig(c["order"]), noncontig(c["pos"], layout),
                          noncontig(c["eo"]))
    s = noncontig(c["s"])
    for t in (x, A, w, pos):
        assert not t.is_contiguous()
    (h,), _ = compare_with_reference("sgmv_shrink", [x, A, ro, order, pos, eo, w, s],
                                     {"max_rank": c["mr"]}, diff=[0, 1, 6])
    h_c = molora_ops.sgmv_shrink(x.contiguous(), A.contiguous(), c["ro"], c["order"], c["pos"], c["eo"],
                                 w.contiguous(), c["s"], max_rank=c["mr"])
    torch.testing.assert_close(h, h_c)

    hh = noncontig(torch.randn(c["order"].numel(), c["mr"], dtype=torch.float64).to(dtype), layout)
    B = noncontig(torch.randn(c["d_out"], c["R"], dtype=torch.float64).to(dtype), layout)
    base = noncontig(torch.randn(c["T"], c["d_out"], dtype=torch.float64).to(dtype), layout)
    for t in (hh, B, base):
        assert not t.is_contiguous()
    (y,), _ = compare_with_reference("sgmv_expand", [hh, B, ro, order, pos, eo, w, s, base],
                                     diff=[0, 1, 6, 8])
    y_c = molora_ops.sgmv_expand(hh.contiguous(), B.contiguous(), c["ro"], c["order"], c["pos"], c["eo"],
                                 w.contiguous(), c["s"], base.contiguous())
    torch.testing.assert_close(y, y_c)


def test_sgmv_int64_metadata():
    case = ("i64", 14, 5, 2, "router", 2, ("rag", 4), 8, 8, "f32", True, 0)
    c = _sgmv_setup(case, torch.float32)
    x = torch.randn(c["T"], c["d_in"])
    A = torch.randn(c["R"], c["d_in"])
    meta64 = [c["ro"].long(), c["order"].long(), c["pos"].long(), c["eo"].long()]
    compare_with_reference("sgmv_shrink", [x, A, *meta64, c["w"], c["s"]], {"max_rank": c["mr"]},
                           diff=[0, 1, 6])
    h = torch.randn(c["order"].numel(), c["mr"])
    B = torch.randn(c["d_out"], c["R"])
    compare_with_reference("sgmv_expand", [h, B, *meta64, c["w"], c["s"], None], diff=[0, 1, 6])


def test_sgmv_shrink_max_rank_is_keyword_only():
    c = _sgmv_setup(("kw", 4, 3, 1, "router", 1, ("u", 2), 4, 4, None, None, 0), torch.float32)
    x, A = torch.randn(4, 4), torch.randn(c["R"], 4)
    with pytest.raises(TypeError):
        molora_ops.sgmv_shrink(x, A, c["ro"], c["order"], c["pos"], c["eo"], None, None, 2)
    h = molora_ops.sgmv_shrink(x, A, c["ro"], c["order"], c["pos"], c["eo"], max_rank=2)
    h2 = molora_ops.sgmv_shrink(x, A, c["ro"], c["order"], c["pos"], c["eo"], None, None, max_rank=2)
    assert torch.equal(h, h2)


# ------------------------------------------------------------------ stacked_gated_lora

# (name, T, E, ranks, shared_a, d_in, d_out, scales, base, gate kind)
SGL_CASES = [
    ("ragged", 13, 5, ("rag", 6), False, 24, 20, True, True, "f32"),
    ("ragged-3zero", 9, 6, ("rag3", 4), False, 16, 12, True, False, "data"),
    ("r1", 9, 4, ("u", 1), False, 16, 12, False, True, "data"),
    ("r17", 7, 3, ("u", 17), False, 24, 20, True, True, "f32"),
    ("shared-a", 11, 4, ("u", 6), True, 16, 12, True, True, "f32"),
    ("shared-a-r1", 8, 5, ("u", 1), True, 16, 12, None, False, "data"),
    ("T0", 0, 4, ("rag", 5), False, 16, 12, True, True, "f32"),
    ("T1", 1, 7, ("rag", 5), False, 16, 12, True, True, "f32"),
    ("E64", 10, 64, ("rag", 3), False, 16, 12, True, True, "f32"),
    ("E1", 6, 1, ("u", 4), False, 8, 8, True, True, "f32"),
]
SGL_IDS = [c[0] for c in SGL_CASES]


def _sgl_setup(case, dtype):
    _, T, E, rspec, shared, d_in, d_out, use_s, use_base, gk = case
    ro = _rank_offsets(rspec, E)
    R = int(ro[-1])
    rA = rspec[1] if shared else R
    x = torch.randn(T, d_in, dtype=torch.float64).to(dtype)
    A = (torch.randn(rA, d_in, dtype=torch.float64) / math.sqrt(d_in)).to(dtype)
    B = torch.randn(d_out, R, dtype=torch.float64).to(dtype)
    gate = (torch.randn(T, E, dtype=torch.float64) * 0.7).to(torch.float32 if gk == "f32" else dtype)
    s = (torch.rand(E, dtype=torch.float64) + 0.5).float() if use_s else None
    base = torch.randn(T, d_out, dtype=torch.float64).to(dtype) if use_base else None
    return x, A, B, gate, ro, s, base, shared


@dtype_params()
@pytest.mark.parametrize("case", SGL_CASES, ids=SGL_IDS)
def test_stacked_gated_lora(dtype, case):
    x, A, B, gate, ro, s, base, shared = _sgl_setup(case, dtype)
    args = [x, A, B, gate, ro, s, base, shared]
    diff = [0, 1, 2, 3] + ([6] if base is not None else [])
    (y,), _ = compare_with_reference("stacked_gated_lora", args, diff=diff)
    assert y.shape == (x.shape[0], B.shape[0]) and y.dtype == dtype


@pytest.mark.parametrize("layout", ["transpose", "slice"])
@dtype_params([torch.float32, torch.bfloat16])
def test_stacked_gated_lora_noncontiguous(layout, dtype):
    x, A, B, gate, ro, s, base, shared = _sgl_setup(("nc", 11, 5, ("rag", 4), False, 12, 10, True, True, "f32"),
                                                    dtype)
    nc = [noncontig(t, layout) for t in (x, A, B, gate)]
    base_nc = noncontig(base, layout)
    (y,), _ = compare_with_reference("stacked_gated_lora", [*nc, noncontig(ro), s, base_nc, False],
                                     diff=[0, 1, 2, 3, 6])
    y_c = molora_ops.stacked_gated_lora(x, A, B, gate, ro, s, base, False)
    torch.testing.assert_close(y, y_c)


def test_stacked_gated_lora_defaults():
    x, A, B, gate, ro, s, base, shared = _sgl_setup(("d", 5, 3, ("u", 2), False, 6, 4, None, None, "f32"),
                                                    torch.float32)
    a = molora_ops.stacked_gated_lora(x, A, B, gate, ro)
    b = molora_ops.stacked_gated_lora(x, A, B, gate, ro, None, None, False)
    assert torch.equal(a, b)


def test_stacked_gated_lora_matches_sgmv_with_k_equal_E():
    # dense soft routing == sparse routing with every expert selected
    T, E, d = 12, 4, 10
    ro = ragged_rank_offsets(E, 5)
    R = int(ro[-1])
    x, A, B = torch.randn(T, d, dtype=torch.float64), torch.randn(R, d, dtype=torch.float64), \
        torch.randn(d, R, dtype=torch.float64)
    gate = torch.rand(T, E, dtype=torch.float64)
    s = torch.rand(E, dtype=torch.float64)
    ids = torch.arange(E, dtype=torch.int32).repeat(T, 1)
    order, pos, eo = molora_ops.dispatch(ids, E, 1)
    h = molora_ops.sgmv_shrink(x, A, ro, order, pos, eo, None, s, max_rank=max_rank_of(ro))
    y_sparse = molora_ops.sgmv_expand(h, B, ro, order, pos, eo, gate, None, None)
    y_dense = molora_ops.stacked_gated_lora(x, A, B, gate, ro, s, None, False)
    torch.testing.assert_close(y_dense, y_sparse)


# ------------------------------------------------------------------ end-to-end MoE-LoRA

def moe_lora(ops, logits, x, A, B, base, ro, scales, k, E, block_size, max_rank, weights_in_shrink):
    w, ids = ops.softmax_topk(logits, k, True)
    order, pos, eo = ops.dispatch(ids, E, block_size)
    if weights_in_shrink:
        h = ops.sgmv_shrink(x, A, ro, order, pos, eo, w, None, max_rank=max_rank)
        return ops.sgmv_expand(h, B, ro, order, pos, eo, None, scales, base)
    h = ops.sgmv_shrink(x, A, ro, order, pos, eo, None, scales, max_rank=max_rank)
    return ops.sgmv_expand(h, B, ro, order, pos, eo, w, None, base)


@dtype_params()
@pytest.mark.parametrize("weights_in_shrink", [False, True], ids=["w-expand", "w-shrink"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_moe_lora_end_to_end(dtype, weights_in_shrink, block_size):
    T, E, k, d_in, d_out = 29, 7, 2, 32, 24
    ro = ragged_rank_offsets(E, 8)
    R, mr = int(ro[-1]), max_rank_of(ro)
    logits = tie_free_logits(T, E, dtype)
    x = torch.randn(T, d_in, dtype=torch.float64).to(dtype)
    A = (torch.randn(R, d_in, dtype=torch.float64) / math.sqrt(d_in)).to(dtype)
    B = (torch.randn(d_out, R, dtype=torch.float64) / math.sqrt(mr)).to(dtype)
    base = torch.randn(T, d_out, dtype=torch.float64).to(dtype)
    scales = (torch.rand(E, dtype=torch.float64) + 0.5).float()

    def run(ops):
        return lambda lg, xx, AA, BB, bb: moe_lora(ops, lg, xx, AA, BB, bb, ro, scales, k, E, block_size,
                                                   mr, weights_in_shrink)

    compare_with_reference("moe_lora", [logits, x, A, B, base], diff=[0, 1, 2, 3, 4],
                           ours_fn=run(molora_ops), ref_fn=run(ref))


@pytest.fixture
def two_threads():
    """At least two intra-op threads, so the CPU kernels really run in several tasks."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("block_size", [1, 3])
def test_sgmv_many_parallel_chunks(block_size, two_threads):
    """Large enough that at::parallel_for splits expert segments (and the 4-row / 4-bank-row
    blocks of the CPU kernels) across tasks: ragged ranks incl. 0 and 17, dropped pairs, padding."""
    T, d, E, k = 3000, 8, 7, 3
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    ids[ids == 2] = -1
    ids[::7, 0] = -1
    ro = rank_offsets_from_ranks([5, 0, 17, 1, 4, 9, 3])
    R = int(ro[-1])
    order, pos, eo = molora_ops.dispatch(ids, E, block_size)
    x = torch.randn(T, d, dtype=torch.float64)
    A = torch.randn(R, d, dtype=torch.float64)
    B = torch.randn(5, R, dtype=torch.float64)
    w = torch.rand(T, k, dtype=torch.float64)
    s = torch.rand(E, dtype=torch.float64)
    meta = (ro, order, pos, eo)
    h = molora_ops.sgmv_shrink(x, A, *meta, w, s, max_rank=17)
    torch.testing.assert_close(h, ref.sgmv_shrink(x, A, *meta, w, s, max_rank=17))
    torch.testing.assert_close(molora_ops.sgmv_expand(h, B, *meta, w, s),
                               ref.sgmv_expand(h, B, *meta, w, s))
    torch.testing.assert_close(molora_ops.sgmv_weight_grad(x, h, *meta, w, s, R),
                               ref.sgmv_weight_grad(x, h, *meta, w, s, R))
