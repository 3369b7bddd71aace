"""The 7 public backward ops: vs the reference backward functions (compare_with_reference) AND vs
torch.autograd of the forward references (float64 autograd as the high-precision oracle, the
reference backward op in the same low precision as the error baseline)."""
import math

import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import (assert_close_fa, compare_with_reference, distinct_ids, drop_ids, dtype_params,
                   make_ids, max_rank_of, noncontig, opmath, ragged_rank_offsets, resample_rows,
                   routing_weights, tie_free_logits, uniform_rank_offsets, well_separated)


def autograd_f64(fn, inputs, wrt, grad_out):
    """Gradient of fn(*inputs)[0-th float output] w.r.t. inputs[wrt...] in float64."""
    ins = [t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
           for t in inputs]
    leaves = [ins[i].requires_grad_(True) for i in wrt]
    out = fn(*ins)
    if isinstance(out, (tuple, list)):
        out = out[0]
    gs = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True)
    return [torch.zeros_like(l) if g is None else g for g, l in zip(gs, leaves)]


# ------------------------------------------------------------------ softmax_route_backward

ROUTE_SHAPES = [(13, 7, 3), (0, 8, 2), (1, 8, 2), (24, 64, 6), (5, 7, 7), (4, 1, 1)]
ROUTE_SHAPE_IDS = [f"T{T}-E{E}-k{k}" for T, E, k in ROUTE_SHAPES]
# (name, forward, renormalized, scale)
ROUTE_FWD = [
    ("softmax_topk-renorm", lambda l, k: ref.softmax_topk(l, k, True), True, 1.0),
    ("softmax_topk-plain", lambda l, k: ref.softmax_topk(l, k, False), False, 1.0),
    ("topk_softmax-t0.7", lambda l, k: ref.topk_softmax(l, k, 0.7), True, 1 / 0.7),
    ("topk_softmax-t2", lambda l, k: ref.topk_softmax(l, k, 2.0), True, 0.5),
    ("softmax_topp", lambda l, k: ref.softmax_topp(l, 0.6, 1, 1.0, 1.1, 1e-5), False, 1.0),
]


def _topp_safe_logits(T, E, dtype):
    def ok(l):
        c = torch.softmax(l.double(), -1).sort(-1, descending=True).values.cumsum(-1)
        return ((c - 0.6).abs() > 1e-4).all(-1)
    return resample_rows(lambda n: tie_free_logits(n, E, dtype), ok, T)


@dtype_params()
@pytest.mark.parametrize("T,E,k", ROUTE_SHAPES, ids=ROUTE_SHAPE_IDS)
@pytest.mark.parametrize("fwd", ROUTE_FWD, ids=[f[0] for f in ROUTE_FWD])
def test_softmax_route_backward(dtype, T, E, k, fwd):
    name, f, renorm, scale = fwd
    logits = _topp_safe_logits(T, E, dtype) if name == "softmax_topp" else tie_free_logits(T, E, dtype)
    w, ids = f(logits, k)
    w = w.detach()
    g = torch.randn(w.shape, dtype=w.dtype)
    (dl,), (dl_lo,) = compare_with_reference("softmax_route_backward", [g, w, ids, logits, renorm, scale])
    assert dl.shape == logits.shape and dl.dtype == logits.dtype
    (dl_hi,) = autograd_f64(f, [logits, k], [0], g)
    assert_close_fa(dl, dl_lo, dl_hi, name="softmax_route_backward vs autograd")


@dtype_params([torch.float32, torch.float64])
def test_softmax_route_backward_arbitrary_scale(dtype):
    T, E, k = 9, 6, 3
    logits = tie_free_logits(T, E, dtype)
    for renorm in (True, False):
        w, ids = ref.softmax_topk(logits, k, renorm)
        g = torch.randn(w.shape, dtype=w.dtype)
        (d1,), _ = compare_with_reference("softmax_route_backward", [g, w, ids, logits, renorm, 3.0])
        d0 = molora_ops.softmax_route_backward(g, w, ids, logits, renorm, 1.0)
        torch.testing.assert_close(d1, 3.0 * d0)


# ------------------------------------------------------------------ sigmoid_topk_backward

SIGMOID_BWD = [
    ("plain", False, True, False, 1.0),
    ("deepseek", True, True, False, 2.5),
    ("smora", True, True, True, None),
    ("nonorm", True, False, False, 1.0),
    ("nonorm-biw", True, False, True, 0.5),
]


@dtype_params()
@pytest.mark.parametrize("T,E,k", ROUTE_SHAPES, ids=ROUTE_SHAPE_IDS)
@pytest.mark.parametrize("setting", SIGMOID_BWD, ids=[s[0] for s in SIGMOID_BWD])
def test_sigmoid_topk_backward(dtype, T, E, k, setting):
    _, use_bias, normalize, biw, scale = setting
    scale = float(k) if scale is None else scale
    bias = (torch.rand(E, dtype=torch.float64) * 0.3 + 0.05).float() if use_bias else None

    def key(l):
        s = torch.sigmoid(l.double())
        return s if bias is None else s + bias.double()

    logits = resample_rows(lambda n: tie_free_logits(n, E, dtype), lambda l: well_separated(key(l), k, 1e-4), T)
    f = lambda l, kk: ref.sigmoid_topk(l, kk, bias, normalize, biw, scale)
    w, ids = f(logits, k)
    w = w.detach()
    g = torch.randn(w.shape, dtype=w.dtype)
    (dl,), (dl_lo,) = compare_with_reference(
        "sigmoid_topk_backward", [g, w, ids, logits, bias, normalize, biw, scale])
    assert dl.shape == logits.shape and dl.dtype == logits.dtype
    f64 = lambda l, kk: ref.sigmoid_topk(l, kk, None if bias is None else bias.double(), normalize, biw, scale)
    (dl_hi,) = autograd_f64(f64, [logits, k], [0], g)
    assert_close_fa(dl, dl_lo, dl_hi, name="sigmoid_topk_backward vs autograd")


@pytest.mark.parametrize("setting", SIGMOID_BWD, ids=[s[0] for s in SIGMOID_BWD])
def test_sigmoid_topk_backward_dropped_slots(setting):
    """ids of -1 (dropped slots) contribute nothing, as in the reference; the C++ kernel skips
    them (the CUDA kernel does too: test_cuda_emulated_router.py)."""
    _, use_bias, normalize, biw, scale = setting
    T, E, k = 9, 7, 3
    scale = float(k) if scale is None else scale
    bias = torch.rand(E) * 0.3 + 0.05 if use_bias else None
    logits = torch.randn(T, E)
    w, ids = ref.sigmoid_topk(logits, k, bias, normalize, biw, scale)
    ids = ids.clone()
    ids[::2, -1] = -1
    ids[1, :] = -1  # a row with every slot dropped
    g = torch.randn(w.shape)
    ours = molora_ops.sigmoid_topk_backward(g, w, ids, logits, bias, normalize, biw, scale)
    expect = ref.sigmoid_topk_backward(g, w, ids, logits, bias, normalize, biw, scale)
    torch.testing.assert_close(ours, expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[1], torch.zeros(E))
    assert ours.abs().sum() > 0


# ------------------------------------------------------------------ pair_dot

# (name, T, E, k, ids kind, block_size)
PAIR_CASES = [
    ("router", 23, 7, 2, "router", 1),
    ("bs4-drop", 19, 6, 3, "drop", 4),
    ("T0", 0, 5, 2, "router", 1),
    ("T1", 1, 5, 2, "router", 2),
    ("E64", 30, 64, 4, "router", 1),
    ("topp", 16, 8, 8, "topp", 1),
    ("empty-expert", 15, 7, 2, "exclude", 1),
]
PAIR_IDS = [c[0] for c in PAIR_CASES]


def _meta(case):
    _, T, E, k, kind, bs = case
    ids = make_ids(kind, T, E, k)
    order, pos, eo = ref.dispatch(ids, E, bs)
    return T, E, k, ids, order, pos, eo


@dtype_params()
@pytest.mark.parametrize("case", PAIR_CASES, ids=PAIR_IDS)
@pytest.mark.parametrize("a_by_token", [True, False], ids=["by-token", "by-row"])
def test_pair_dot(dtype, case, a_by_token):
    T, E, k, ids, order, pos, eo = _meta(case)
    d = 12
    P = order.numel()
    a = torch.randn(T if a_by_token else P, d, dtype=torch.float64).to(dtype)
    b = torch.randn(P, d, dtype=torch.float64).to(dtype)
    (out,), _ = compare_with_reference("pair_dot", [a, b, pos, a_by_token])
    assert out.shape == (T, k) and out.dtype == opmath(dtype)
    assert (out[pos < 0] == 0).all()


@dtype_params()
@pytest.mark.parametrize("case", PAIR_CASES, ids=PAIR_IDS)
@pytest.mark.parametrize("which", ["gather_rows", "combine_rows"])
def test_pair_dot_is_routing_weight_grad_of_rows(dtype, case, which):
    T, E, k, ids, order, pos, eo = _meta(case)
    d, P = 10, order.numel()
    w = routing_weights(ids, torch.float32 if dtype != torch.float64 else dtype)
    if which == "gather_rows":
        x = torch.randn(T, d, dtype=torch.float64).to(dtype)
        g = torch.randn(P, d, dtype=torch.float64).to(dtype)
        args = [x, g, pos, True]
        fwd = lambda xx, ww: ref.gather_rows(xx, order, pos, ww)
        data = x
    else:
        yp = torch.randn(P, d, dtype=torch.float64).to(dtype)
        g = torch.randn(T, d, dtype=torch.float64).to(dtype)
        args = [g, yp, pos, True]
        fwd = lambda yy, ww: ref.combine_rows(yy, order, pos, ww)
        data = yp
    (dw,), (dw_lo,) = compare_with_reference("pair_dot", args)
    (dw_hi,) = autograd_f64(fwd, [data, w], [1], g)
    assert_close_fa(dw, dw_lo, dw_hi, name=f"pair_dot vs autograd of {which} (weights)")


@dtype_params()
@pytest.mark.parametrize("case", PAIR_CASES, ids=PAIR_IDS)
def test_pair_dot_is_routing_weight_grad_of_sgmv_shrink(dtype, case):
    T, E, k, ids, order, pos, eo = _meta(case)
    d = 10
    ro = ragged_rank_offsets(E, 5)
    R, mr = int(ro[-1]), max_rank_of(ro)
    x = torch.randn(T, d, dtype=torch.float64).to(dtype)
    A = torch.randn(R, d, dtype=torch.float64).to(dtype)
    s = (torch.rand(E) + 0.5)
    w = routing_weights(ids, opmath(dtype))
    g_h = torch.randn(order.numel(), mr, dtype=torch.float64).to(dtype)
    h0 = ref.sgmv_shrink(x, A, ro, order, pos, eo, None, s, max_rank=mr)  # unweighted rows
    (dw,), (dw_lo,) = compare_with_reference("pair_dot", [g_h, h0, pos, False])
    fwd = lambda xx, ww: ref.sgmv_shrink(xx, A.double(), ro, order, pos, eo, ww, s.double(), max_rank=mr)
    (dw_hi,) = autograd_f64(fwd, [x, w], [1], g_h)
    assert_close_fa(dw, dw_lo, dw_hi, name="pair_dot vs autograd of sgmv_shrink (weights)")


# ------------------------------------------------------------------ sgmv_weight_grad

# (name, T, E, k, ids kind, block_size, ranks, weights, scales)
SWG_CASES = [
    ("ragged", 23, 7, 2, "router", 1, ("rag", 6), True, True),
    ("ragged-bs4-drop", 19, 6, 3, "drop", 4, ("rag", 5), True, False),
    ("r1", 13, 5, 2, "router", 1, ("u", 1), False, True),
    ("r17", 9, 4, 2, "router", 2, ("u", 17), True, True),
    ("T0", 0, 5, 2, "router", 1, ("rag", 4), True, True),
    ("T1", 1, 5, 2, "router", 1, ("rag", 4), True, True),
    ("E64", 30, 64, 4, "router", 1, ("rag", 4), True, True),
    ("empty-expert", 15, 7, 2, "exclude", 1, ("rag", 4), None, True),
    ("topp", 16, 8, 8, "topp", 2, ("rag", 4), True, None),
]
SWG_IDS = [c[0] for c in SWG_CASES]


def _swg_setup(case, dtype):
    _, T, E, k, kind, bs, (rk, r), use_w, use_s = case
    ids = make_ids(kind, T, E, k)
    order, pos, eo = ref.dispatch(ids, E, bs)
    ro = uniform_rank_offsets(E, r) if rk == "u" else ragged_rank_offsets(E, r)
    w = routing_weights(ids, torch.float32) if use_w else None
    s = (torch.rand(E) + 0.5) if use_s else None
    return T, ids, order, pos, eo, ro, int(ro[-1]), max_rank_of(ro), w, s


@dtype_params()
@pytest.mark.parametrize("case", SWG_CASES, ids=SWG_IDS)
def test_sgmv_weight_grad_is_dA(dtype, case):
    T, ids, order, pos, eo, ro, R, mr, w, s = _swg_setup(case, dtype)
    d = 12
    x = torch.randn(T, d, dtype=torch.float64).to(dtype)
    A = torch.randn(R, d, dtype=torch.float64).to(dtype)
    g_h = torch.randn(order.numel(), mr, dtype=torch.float64).to(dtype)
    (G,), (G_lo,) = compare_with_reference("sgmv_weight_grad", [x, g_h, ro, order, pos, eo, w, s, R])
    assert G.shape == (R, d) and G.dtype == dtype
    w64 = None if w is None else w.double()
    s64 = None if s is None else s.double()
    fwd = lambda xx, AA: ref.sgmv_shrink(xx, AA, ro, order, pos, eo, w64, s64, max_rank=mr)
    (dA_hi,) = autograd_f64(fwd, [x, A], [1], g_h)
    assert_close_fa(G, G_lo, dA_hi, name="sgmv_weight_grad vs autograd dA of sgmv_shrink")


@dtype_params()
@pytest.mark.parametrize("transposed", [False, True], ids=["G", "G^T"])
@pytest.mark.parametrize("case", SWG_CASES, ids=SWG_IDS)
def test_sgmv_weight_grad_is_dB_transposed(dtype, case, transposed):
    """dB of sgmv_expand: G^T, either as the transposed view of G [R, d_out] or written in B's
    layout (transposed=True: a contiguous [d_out, R], what the expand's backward returns)."""
    T, ids, order, pos, eo, ro, R, mr, w, s = _swg_setup(case, dtype)
    d_out = 9
    h = torch.randn(order.numel(), mr, dtype=torch.float64).to(dtype)
    B = torch.randn(d_out, R, dtype=torch.float64).to(dtype)
    g_y = torch.randn(T, d_out, dtype=torch.float64).to(dtype)
    (G,), (G_lo,) = compare_with_reference("sgmv_weight_grad",
                                           [g_y, h, ro, order, pos, eo, w, s, R, transposed])
    if transposed:
        assert G.shape == (d_out, R) and G.is_contiguous()
    else:
        assert G.shape == (R, d_out)
        G, G_lo = G.t(), G_lo.t()
    w64 = None if w is None else w.double()
    s64 = None if s is None else s.double()
    fwd = lambda hh, BB: ref.sgmv_expand(hh, BB, ro, order, pos, eo, w64, s64, None)
    (dB_hi,) = autograd_f64(fwd, [h, B], [1], g_y)
    assert_close_fa(G, G_lo, dB_hi, name="sgmv_weight_grad vs autograd dB of sgmv_expand")


# ------------------------------------------------------------------ sgmv_expand_backward

@dtype_params()
@pytest.mark.parametrize("case", SWG_CASES, ids=SWG_IDS)
def test_sgmv_expand_backward_is_dB_and_u(dtype, case):
    """(dB, u, d w) against autograd of the expand: dB is B's gradient; u is h's gradient without
    the routing weights (autograd of the expand with weights None: dh = s_e B_e^T dy); d w the
    routing weights' gradient (with weights 1 where the case has none)."""
    T, ids, order, pos, eo, ro, R, mr, w, s = _swg_setup(case, dtype)
    d_out = 37  # 9 four-column steps and a tail
    h = torch.randn(order.numel(), mr, dtype=torch.float64).to(dtype)
    B = torch.randn(d_out, R, dtype=torch.float64).to(dtype)
    g_y = torch.randn(T, d_out, dtype=torch.float64).to(dtype)
    (dB, u, dw), (dB_lo, u_lo, dw_lo) = compare_with_reference(
        "sgmv_expand_backward", [g_y, h, B, ro, order, pos, eo, w, s])
    assert dB.shape == (d_out, R) and dB.dtype == dtype and dB.is_contiguous()
    opmath = torch.promote_types(dtype, torch.float32)
    assert u.shape == (order.numel(), mr) and u.dtype == opmath
    assert dw.shape == tuple(pos.shape) and dw.dtype == opmath
    w64 = None if w is None else w.double()
    s64 = None if s is None else s.double()
    (dB_hi,) = autograd_f64(lambda hh, BB: ref.sgmv_expand(hh, BB, ro, order, pos, eo, w64, s64, None),
                            [h, B], [1], g_y)
    (u_hi,) = autograd_f64(lambda hh, BB: ref.sgmv_expand(hh, BB, ro, order, pos, eo, None, s64, None),
                           [h, B], [0], g_y)
    w_one = torch.ones(pos.shape, dtype=torch.float64) if w is None else w
    (dw_hi,) = autograd_f64(lambda ww: ref.sgmv_expand(h.double(), B.double(), ro, order, pos, eo, ww,
                                                       s64, None), [w_one], [0], g_y)
    assert_close_fa(dB, dB_lo, dB_hi, name="sgmv_expand_backward dB vs autograd")
    assert_close_fa(u, u_lo, u_hi, name="sgmv_expand_backward u vs autograd")
    assert_close_fa(dw, dw_lo, dw_hi, name="sgmv_expand_backward d w vs autograd")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(300, 1376, (16,) * 8, 2), (97, 203, (16, 0, 15, 32, 16, 14), 2),
                                   (23, 37, (16, 15), 1), (64, 256, (8,) * 64, 8)],
                         ids=["llama-up", "ragged", "narrow", "E64-r8"])
def test_sgmv_expand_backward_threads_and_layouts(threads, shape):
    """The CPU path at sizes that split gy's columns between threads, against the reference: the
    fp32 one-pass kernel where the CPU has AVX-512 and the ranks fill its 16-rank slices (two
    slices of an expert, slices of 15 and 14 ranks masked, a rank-0 expert, one column range),
    the two ops' kernels for E=64 r=8; dropped slots, a non-contiguous grad_y, repeats equal."""
    T, n, ranks, k = shape
    E = len(ranks)
    ro = torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()], dtype=torch.int32)
    R, mr = int(ro[-1]), max(ranks)
    ids = distinct_ids(T, E, k)
    ids[::7, 0] = -1
    order, pos, eo = molora_ops.dispatch(ids, E, 1)
    g_y = torch.randn(n, T).t()  # non-contiguous
    h, B = torch.randn(order.numel(), mr), torch.randn(n, R)
    w, s = torch.rand(T, k), torch.rand(E) + 0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dB, u, dw = molora_ops.sgmv_expand_backward(g_y, h, B, ro, order, pos, eo, w, s)
        dB2, u2, dw2 = molora_ops.sgmv_expand_backward(g_y, h, B, ro, order, pos, eo, w, s)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(dB, dB2) and torch.equal(u, u2) and torch.equal(dw, dw2)
    dB_lo, u_lo, dw_lo = ref.sgmv_expand_backward(g_y, h, B, ro, order, pos, eo, w, s)
    dB_hi, u_hi, dw_hi = ref.sgmv_expand_backward(g_y.double(), h.double(), B.double(), ro, order,
                                                  pos, eo, w.double(), s.double())
    assert_close_fa(dB, dB_lo, dB_hi, name="sgmv_expand_backward dB")
    assert_close_fa(u, u_lo, u_hi, name="sgmv_expand_backward u")
    assert_close_fa(dw, dw_lo, dw_hi, name="sgmv_expand_backward d w")
    assert torch.all(dw[pos < 0] == 0)
    for e in range(E):  # lanes past an expert's rank stay 0 (all of a rank-0 expert's)
        assert torch.all(u[int(eo[e]):int(eo[e + 1]), ranks[e]:] == 0)


# ------------------------------------------------------------------ stacked_gated_lora_backward

# (name, T, E, ranks, shared_a, scales)
SGLB_CASES = [
    ("ragged", 13, 5, ("rag", 6), False, True),
    ("r1", 9, 4, ("u", 1), False, False),
    ("r17", 6, 3, ("u", 17), False, True),
    ("shared-a", 11, 4, ("u", 6), True, True),
    ("T0", 0, 4, ("rag", 5), False, True),
    ("T1", 1, 6, ("rag", 5), False, True),
    ("E64", 8, 64, ("rag", 3), False, True),
]


@dtype_params()
@pytest.mark.parametrize("case", SGLB_CASES, ids=[c[0] for c in SGLB_CASES])
@pytest.mark.parametrize("gate_kind", ["f32", "data"])
def test_stacked_gated_lora_backward(dtype, case, gate_kind):
    _, T, E, (rk, r), shared, use_s = case
    d_in, d_out = 12, 10
    ro = uniform_rank_offsets(E, r) if rk == "u" else ragged_rank_offsets(E, r)
    R = int(ro[-1])
    x = torch.randn(T, d_in, dtype=torch.float64).to(dtype)
    A = (torch.randn(r if shared else R, d_in, dtype=torch.float64) / math.sqrt(d_in)).to(dtype)
    B = torch.randn(d_out, R, dtype=torch.float64).to(dtype)
    gate = torch.randn(T, E, dtype=torch.float64).to(torch.float32 if gate_kind == "f32" else dtype)
    s = (torch.rand(E) + 0.5) if use_s else None
    g_y = torch.randn(T, d_out, dtype=torch.float64).to(dtype)
    outs, lo = compare_with_reference("stacked_gated_lora_backward", [g_y, x, A, B, gate, ro, s, shared])
    assert len(outs) == 4
    for o, t in zip(outs, (x, A, B, gate)):
        assert o.shape == t.shape and o.dtype == t.dtype
    s64 = None if s is None else s.double()
    fwd = lambda xx, AA, BB, gg: ref.stacked_gated_lora(xx, AA, BB, gg, ro, s64, None, shared)
    hi = autograd_f64(fwd, [x, A, B, gate], [0, 1, 2, 3], g_y)
    for nm, o, l, h in zip(("dx", "dA", "dB", "dgate"), outs, lo, hi):
        assert_close_fa(o, l, h, name=f"stacked_gated_lora_backward {nm} vs autograd")


# ------------------------------------------------------------------ rank_scatter

RS_CASES = [("topk", 13, 17, 4), ("T0", 0, 8, 2), ("T1", 1, 8, 3), ("R64", 20, 64, 16), ("k=R", 6, 7, 7)]


@dtype_params()
@pytest.mark.parametrize("case", RS_CASES, ids=[c[0] for c in RS_CASES])
def test_rank_scatter_is_grad_of_rank_topk(dtype, case):
    _, T, R, k = case
    h = tie_free_logits(T, R, dtype)
    _, ids = ref.rank_topk(h, k, None, None, False)
    g = torch.randn(T, k, dtype=torch.float64).to(dtype)
    (out,), (lo,) = compare_with_reference("rank_scatter", [g, ids, R])
    assert out.shape == (T, R) and out.dtype == dtype
    (hi,) = autograd_f64(lambda hh: ref.rank_topk(hh, k, None, None, False), [h], [0], g)
    assert_close_fa(out, lo, hi, name="rank_scatter vs autograd of rank_topk")


@dtype_params()
@pytest.mark.parametrize("kind", ["drop", "dups", "alldrop"])
def test_rank_scatter_dropped_and_repeated_ids(dtype, kind):
    T, R, k = 11, 9, 4
    if kind == "drop":
        ids = drop_ids(distinct_ids(T, R, k), 0.4)
    elif kind == "dups":
        ids = torch.randint(-1, 3, (T, k), dtype=torch.int32)
    else:
        ids = torch.full((T, k), -1, dtype=torch.int32)
    src = torch.randn(T, k, dtype=torch.float64).to(dtype)
    (out,), (lo,) = compare_with_reference("rank_scatter", [src, ids, R])
    # independent oracle: += with -1 ignored, in float64
    hi = torch.zeros(T, R, dtype=torch.float64)
    valid = ids >= 0
    hi.index_put_((torch.arange(T)[:, None].expand(T, k)[valid], ids.long()[valid]), src.double()[valid],
                  accumulate=True)
    assert_close_fa(out, lo, hi, name="rank_scatter vs index_put")


# ------------------------------------------------------------------ rank_sparse_weight_grad

RSW_CASES = [("topk", 13, 17, 4, "topk"), ("drop", 13, 17, 4, "drop"), ("T0", 0, 8, 2, "topk"),
             ("T1", 1, 8, 3, "topk"), ("R64", 20, 64, 16, "topk"), ("dups", 9, 6, 4, "dups")]


def _rs_ids(T, R, k, kind):
    if kind == "topk":
        return ref.rank_topk(tie_free_logits(T, R), k, None, None, False)[1]
    if kind == "drop":
        return drop_ids(distinct_ids(T, R, k), 0.35)
    return torch.randint(-1, 3, (T, k), dtype=torch.int32)


@dtype_params()
@pytest.mark.parametrize("case", RSW_CASES, ids=[c[0] for c in RSW_CASES])
def test_rank_sparse_weight_grad_is_dA(dtype, case):
    _, T, R, k, kind = case
    d = 10
    ids = _rs_ids(T, R, k, kind)
    x = torch.randn(T, d, dtype=torch.float64).to(dtype)
    A = torch.randn(R, d, dtype=torch.float64).to(dtype)
    g = torch.randn(T, k, dtype=torch.float64).to(dtype)
    (G,), (G_lo,) = compare_with_reference("rank_sparse_weight_grad", [x, g, ids, R])
    assert G.shape == (R, d) and G.dtype == dtype
    (dA_hi,) = autograd_f64(lambda xx, AA: ref.rank_sparse_shrink(xx, AA, ids), [x, A], [1], g)
    assert_close_fa(G, G_lo, dA_hi, name="rank_sparse_weight_grad vs autograd dA of rank_sparse_shrink")


@dtype_params()
@pytest.mark.parametrize("case", RSW_CASES, ids=[c[0] for c in RSW_CASES])
def test_rank_sparse_weight_grad_is_dB_transposed(dtype, case):
    _, T, R, k, kind = case
    d_out, scale = 7, 1.5
    ids = _rs_ids(T, R, k, kind)
    v = torch.randn(T, k, dtype=torch.float64).to(dtype)
    w = torch.rand(T, k, dtype=torch.float64).to(dtype) + 0.25
    B = torch.randn(d_out, R, dtype=torch.float64).to(dtype)
    g_y = torch.randn(T, d_out, dtype=torch.float64).to(dtype)
    c = (scale * w.double() * v.double()).to(dtype)
    (G,), (G_lo,) = compare_with_reference("rank_sparse_weight_grad", [g_y, c, ids, R])
    fwd = lambda vv, BB, ww: ref.rank_sparse_expand(vv, ids, BB, ww, scale, None)
    (dB_hi,) = autograd_f64(fwd, [v, B, w], [1], g_y)
    assert_close_fa(G.t(), G_lo.t(), dB_hi, name="rank_sparse_weight_grad vs autograd dB of rank_sparse_expand")
