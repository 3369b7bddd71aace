"""torch.autograd.gradcheck in float64 through the wrappers, for every differentiable forward op,
covering routing weights / gate / base inputs, ragged and rank-0 banks, dropped (-1) ids and
dispatch padding. Sizes are tiny: T <= 6, d <= 5, E <= 4."""
import pytest
import torch
from torch.autograd import gradcheck

import molora_ops
from molora_ops import reference as ref
from utils import (distinct_ids, drop_ids, make_ids, max_rank_of, rank_offsets_from_ranks,
                   resample_rows, tie_free_logits, uniform_rank_offsets, well_separated)

F64 = torch.float64


def leaf(*shape, low=None):
    t = torch.randn(*shape, dtype=F64) if low is None else torch.rand(*shape, dtype=F64) + low
    return t.requires_grad_(True)


def gc(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------ routers

@pytest.mark.parametrize("T,E,k", [(6, 4, 2), (5, 4, 4), (3, 1, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck_softmax_topk(T, E, k, renormalize):
    logits = tie_free_logits(T, E, F64).requires_grad_(True)
    gc(lambda l: molora_ops.softmax_topk(l, k, renormalize)[0], (logits,))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("T,E,k", [(6, 4, 2), (5, 4, 4)])
def test_gradcheck_topk_softmax(T, E, k, temperature):
    logits = tie_free_logits(T, E, F64).requires_grad_(True)
    gc(lambda l: molora_ops.topk_softmax(l, k, temperature)[0], (logits,))


@pytest.mark.parametrize("setting", [(None, True, False, 1.0), ("bias", True, True, 2.0),
                                     ("bias", False, False, 2.5), ("bias", False, True, 1.0)],
                         ids=["plain", "smora", "nonorm", "nonorm-biw"])
def test_gradcheck_sigmoid_topk(setting):
    T, E, k = 6, 4, 2
    bk, normalize, biw, scale = setting
    bias = (torch.rand(E, dtype=F64) * 0.3 + 0.05) if bk else None
    key = lambda l: torch.sigmoid(l) + (0 if bias is None else bias)
    logits = resample_rows(lambda n: tie_free_logits(n, E, F64), lambda l: well_separated(key(l), k, 1e-3), T)
    logits.requires_grad_(True)
    gc(lambda l: molora_ops.sigmoid_topk(l, k, bias, normalize, biw, scale)[0], (logits,))


@pytest.mark.parametrize("setting", [(0.5, 1, 1.0, 1.1), (0.7, 2, 1.0, 1.0), (0.5, 1, 0.7, 1.1)],
                         ids=["p0.5", "mink2", "entropy"])
def test_gradcheck_softmax_topp(setting):
    T, E = 6, 4
    top_p, min_k, thr, q = setting

    def ok(l):
        c = torch.softmax(l, -1).sort(-1, descending=True).values.cumsum(-1)
        return ((c - top_p).abs() > 1e-3).all(-1)

    logits = resample_rows(lambda n: tie_free_logits(n, E, F64, row_scale=(0.2, 2.0)), ok, T)
    logits.requires_grad_(True)
    gc(lambda l: molora_ops.softmax_topp(l, top_p, min_k, thr, q, 1e-5)[0], (logits,))


# ------------------------------------------------------------------ gather / combine

@pytest.mark.parametrize("kind,bs", [("drop", 1), ("exclude", 2), ("router", 1)])
def test_gradcheck_gather_rows(kind, bs):
    T, E, k, d = 6, 4, 2, 5
    ids = make_ids(kind, T, E, k)
    order, pos, _ = molora_ops.dispatch(ids, E, bs)
    gc(lambda x, w: molora_ops.gather_rows(x, order, pos, w), (leaf(T, d), leaf(T, k, low=0.2)))
    gc(lambda x: molora_ops.gather_rows(x, order, pos, None), (leaf(T, d),))


@pytest.mark.parametrize("kind,bs", [("drop", 1), ("exclude", 2), ("router", 1)])
def test_gradcheck_combine_rows(kind, bs):
    T, E, k, d = 6, 4, 2, 5
    ids = make_ids(kind, T, E, k)
    order, pos, _ = molora_ops.dispatch(ids, E, bs)
    P = order.numel()
    gc(lambda y, w: molora_ops.combine_rows(y, order, pos, w), (leaf(P, d), leaf(T, k, low=0.2)))
    gc(lambda y: molora_ops.combine_rows(y, order, pos, None), (leaf(P, d),))


# ------------------------------------------------------------------ sgmv

SGMV_GC = [("ragged-drop", [2, 0, 3, 1], "drop", 1), ("ragged-bs2", [1, 3, 0, 2], "router", 2),
           ("uniform-empty-expert", [2, 2, 2, 2], "exclude", 1)]


@pytest.mark.parametrize("ranks,kind,bs", [c[1:] for c in SGMV_GC], ids=[c[0] for c in SGMV_GC])
@pytest.mark.parametrize("with_scales", [True, False])
def test_gradcheck_sgmv_shrink(ranks, kind, bs, with_scales):
    T, E, k, d = 6, 4, 2, 5
    ro = rank_offsets_from_ranks(ranks)
    R, mr = int(ro[-1]), max_rank_of(ro) + 1
    ids = make_ids(kind, T, E, k)
    order, pos, eo = molora_ops.dispatch(ids, E, bs)
    s = torch.rand(E, dtype=F64) + 0.5 if with_scales else None
    gc(lambda x, A, w: molora_ops.sgmv_shrink(x, A, ro, order, pos, eo, w, s, max_rank=mr),
       (leaf(T, d), leaf(R, d), leaf(T, k, low=0.2)))


@pytest.mark.parametrize("ranks,kind,bs", [c[1:] for c in SGMV_GC], ids=[c[0] for c in SGMV_GC])
@pytest.mark.parametrize("with_scales", [True, False])
def test_gradcheck_sgmv_expand(ranks, kind, bs, with_scales):
    T, E, k, d = 6, 4, 2, 5
    ro = rank_offsets_from_ranks(ranks)
    R, mr = int(ro[-1]), max_rank_of(ro)
    ids = make_ids(kind, T, E, k)
    order, pos, eo = molora_ops.dispatch(ids, E, bs)
    s = torch.rand(E, dtype=F64) + 0.5 if with_scales else None
    gc(lambda h, B, w, base: molora_ops.sgmv_expand(h, B, ro, order, pos, eo, w, s, base),
       (leaf(order.numel(), mr), leaf(d, R), leaf(T, k, low=0.2), leaf(T, d)))
    gc(lambda h, B: molora_ops.sgmv_expand(h, B, ro, order, pos, eo, None, s, None),
       (leaf(order.numel(), mr), leaf(d, R)))


@pytest.mark.parametrize("variant", ["ragged", "ragged-nobase-noscale", "shared-a"])
def test_gradcheck_stacked_gated_lora(variant):
    T, E, d_in, d_out = 5, 4, 5, 4
    shared = variant == "shared-a"
    ro = uniform_rank_offsets(E, 2) if shared else rank_offsets_from_ranks([2, 0, 3, 1])
    R = int(ro[-1])
    s = None if variant == "ragged-nobase-noscale" else torch.rand(E, dtype=F64) + 0.5
    A = leaf(2 if shared else R, d_in)
    if variant == "ragged-nobase-noscale":
        gc(lambda x, A_, B, g: molora_ops.stacked_gated_lora(x, A_, B, g, ro, s, None, shared),
           (leaf(T, d_in), A, leaf(d_out, R), leaf(T, E)))
    else:
        gc(lambda x, A_, B, g, base: molora_ops.stacked_gated_lora(x, A_, B, g, ro, s, base, shared),
           (leaf(T, d_in), A, leaf(d_out, R), leaf(T, E), leaf(T, d_out)))


@pytest.mark.parametrize("kind", ["drop", "one"])
@pytest.mark.parametrize("with_scales", [True, False])
def test_gradcheck_fused_moe_lora(kind, with_scales):
    T, E, k, d_in, d_out = 5, 4, 2, 5, 4
    ids = make_ids(kind, T, E, k)
    ro = rank_offsets_from_ranks([2, 0, 3, 1])
    R = int(ro[-1])
    s = torch.rand(E, dtype=F64) + 0.5 if with_scales else None
    gc(lambda x, A, B, w, base: molora_ops.fused_moe_lora(x, A, B, ro, w, ids, s, base),
       (leaf(T, d_in), leaf(R, d_in), leaf(d_out, R), leaf(T, k), leaf(T, d_out)))


# ------------------------------------------------------------------ masked

@pytest.mark.parametrize("variant", ["plain", "bias-abs", "scores"])
def test_gradcheck_rank_topk(variant):
    T, R, k = 6, 5, 2
    bias = torch.rand(R, dtype=F64) * 0.5 if variant != "plain" else None
    use_abs = variant == "bias-abs"
    if variant == "scores":
        scores = tie_free_logits(T, R, F64)
        h = leaf(T, R)
    else:
        scores = None
        key = lambda v: ((v + (0 if bias is None else bias)).abs() if use_abs else v + (0 if bias is None else bias))
        h = resample_rows(lambda n: tie_free_logits(n, R, F64), lambda v: well_separated(key(v), k, 1e-3), T)
        h.requires_grad_(True)
    gc(lambda hh: molora_ops.rank_topk(hh, k, scores, bias, use_abs)[0], (h,))


@pytest.mark.parametrize("kind", ["drop", "dups"])
def test_gradcheck_rank_sparse_shrink(kind):
    T, R, k, d = 6, 5, 3, 4
    ids = drop_ids(distinct_ids(T, R, k), 0.3) if kind == "drop" else torch.randint(-1, 2, (T, k), dtype=torch.int32)
    gc(lambda x, A: molora_ops.rank_sparse_shrink(x, A, ids), (leaf(T, d), leaf(R, d)))


@pytest.mark.parametrize("kind", ["drop", "dups"])
def test_gradcheck_rank_sparse_expand(kind):
    T, R, k, d = 6, 5, 3, 4
    ids = drop_ids(distinct_ids(T, R, k), 0.3) if kind == "drop" else torch.randint(-1, 2, (T, k), dtype=torch.int32)
    gc(lambda v, B, w, base: molora_ops.rank_sparse_expand(v, ids, B, w, 1.5, base),
       (leaf(T, k), leaf(d, R), leaf(T, k, low=0.2), leaf(T, d)))
    gc(lambda v, B: molora_ops.rank_sparse_expand(v, ids, B, None, 0.5, None), (leaf(T, k), leaf(d, R)))


# ------------------------------------------------------------------ end to end

def test_gradcheck_moe_lora_pipeline():
    T, E, k, d = 6, 4, 2, 4
    ro = rank_offsets_from_ranks([2, 1, 0, 3])
    R, mr = int(ro[-1]), max_rank_of(ro)
    s = torch.rand(E, dtype=F64) + 0.5

    def f(logits, x, A, B, base):
        w, ids = molora_ops.softmax_topk(logits, k, True)
        order, pos, eo = molora_ops.dispatch(ids, E, 2)
        h = molora_ops.sgmv_shrink(x, A, ro, order, pos, eo, None, s, max_rank=mr)
        return molora_ops.sgmv_expand(h, B, ro, order, pos, eo, w, None, base)

    gc(f, (tie_free_logits(T, E, F64).requires_grad_(True), leaf(T, d), leaf(R, d), leaf(d, R), leaf(T, d)))
