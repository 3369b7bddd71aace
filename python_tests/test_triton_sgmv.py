"""Triton kernels of Family 3 (molora_ops.triton.sgmv) against the reference ops: sgmv_shrink
(incl. split-K), sgmv_expand (k == 1 direct write and k > 1 per-row buffer + combine), the fused
small-rank shrink->expand, sgmv_weight_grad and pair_dot, plus the autograd formulas of shrink and
expand composed from these launchers. Without a GPU they run in Triton's interpreter on CPU
tensors (fp32 / fp16 only: the interpreter cannot run bf16 dots), so the shapes stay small.
Every kernel is compiled for sm_90 and sm_80 (bf16 included) by test_triton_compile.py."""
import pytest
import torch

from molora_ops import reference as ref
from utils import (DTYPE_IDS, assert_close_fa, make_ids, max_rank_of, noncontig,
                   ragged_rank_offsets, rank_offsets_from_ranks, routing_weights,
                   uniform_rank_offsets)

pytest.importorskip("triton")
from molora_ops.triton import sgmv as ts  # noqa: E402  (after the importorskip)

pytestmark = pytest.mark.triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])

# (name, T, E, k, ids kind, block_size, ranks, d_in, d_out, weights, scales, base, extra max_rank)
# ranks: ("u", r) uniform, ("rag", r) ragged up to r with one rank-0 expert, ("rag3", r) three.
CASES = [
    ("T0-bs4", 0, 3, 2, "router", 4, ("rag", 17), 37, 50, True, True, True, 0),
    ("T1", 1, 4, 2, "router", 1, ("rag", 17), 37, 50, True, False, True, 0),
    ("empty-experts", 24, 7, 2, "exclude", 1, ("rag", 17), 37, 50, True, True, False, 0),
    ("one-expert-k1-bs4", 20, 7, 1, "one", 4, ("u", 16), 37, 50, False, True, True, 0),
    ("E1-k1", 16, 1, 1, "router", 1, ("u", 17), 37, 50, True, True, True, 0),
    ("E7-k1-drop", 30, 7, 1, "drop", 1, ("rag", 17), 50, 37, True, True, True, 0),
    ("E7-k3-drop-bs4", 30, 7, 3, "drop", 4, ("rag3", 17), 37, 50, True, True, True, 2),
    ("k2-plain", 33, 5, 2, "router", 1, ("rag", 17), 64, 16, False, False, False, 0),
    # ranks above the 64-wide rank tile (ts.MAX_BLOCK_R): two and three rank tiles, the last one
    # partial; ragged banks mix experts that fit one tile with ones that span several
    ("ranks-over-64", 12, 3, 2, "router", 2, ("rag", 130), 20, 24, True, True, True, 0),
    ("rank-80-uniform", 20, 3, 2, "router", 1, ("u", 80), 40, 24, True, True, True, 0),
    ("ranks-80-ragged-k1", 24, 5, 1, "drop", 2, ("rag3", 80), 33, 20, True, True, False, 0),
    # several d_in chunks / d_out tiles, 16-row padding blocks; 64-row tiles, several per expert
    ("E8-bs16-wide", 48, 8, 2, "drop", 16, ("rag", 17), 130, 100, True, True, True, 0),
    ("E2-big-tiles", 64, 2, 2, "router", 1, ("u", 24), 40, 33, True, True, True, 0),
]
cases = pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])


def _rank_offsets(spec, E):
    kind, r = spec
    if kind == "u":
        return uniform_rank_offsets(E, r)
    return ragged_rank_offsets(E, r, zeros={"rag": 1, "rag3": 3}[kind])


def _setup(case):
    """Routing, dispatch metadata and bank layout of a case (data tensors are made per test)."""
    _, T, E, k, kind, bs, rspec, d_in, d_out, use_w, use_s, use_base, extra = case
    ids = make_ids(kind, T, E, k)
    order, pos, eo = ref.dispatch(ids, E, bs)
    ro = _rank_offsets(rspec, E)
    return dict(T=T, E=E, k=k, ids=ids, order=order, pos=pos, eo=eo, ro=ro, R=int(ro[-1]),
                mr=max_rank_of(ro) + extra, d_in=d_in, d_out=d_out,
                w=routing_weights(ids) if use_w else None,
                s=(torch.rand(E) + 0.5) if use_s else None, use_base=use_base)


def _meta(c):
    return c["ro"], c["order"], c["pos"], c["eo"]


def _dev(t):
    return t.to(DEV) if isinstance(t, torch.Tensor) else t


def _f64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _check(name, ours, ref_fn, *args, **kwargs):
    """ours vs the reference run on the same inputs (low precision) and on their float64 upcast."""
    lo = ref_fn(*args, **kwargs)
    hi = ref_fn(*[_f64(a) for a in args], **kwargs)
    assert_close_fa(ours.cpu(), lo, hi, name=name)


def _run(fn, *args, **kwargs):
    """The launcher on DEV copies of the inputs (the CPU interpreter, or the GPU)."""
    return fn(*[_dev(a) for a in args], **kwargs)


def _data(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------
# Forward ops, every edge case
# --------------------------------------------------------------------------------------------


@cases
@dtypes
def test_shrink(case, dtype):
    c = _setup(case)
    x, A = _data(c["T"], c["d_in"], dtype=dtype), _data(c["R"], c["d_in"], dtype=dtype)
    args = (x, A, *_meta(c), c["w"], c["s"])
    h = _run(ts.sgmv_shrink, *args, c["mr"])
    _check("sgmv_shrink", h, ref.sgmv_shrink, *args, max_rank=c["mr"])


@cases
@dtypes
def test_expand(case, dtype):
    c = _setup(case)
    P = c["order"].numel()
    # random h everywhere: padding rows, rows past expert_offsets[E] and columns >= r_e are ignored
    h, B = _data(P, c["mr"], dtype=dtype), _data(c["d_out"], c["R"], dtype=dtype)
    base = _data(c["T"], c["d_out"], dtype=dtype) if c["use_base"] else None
    base_before = None if base is None else base.clone()
    args = (h, B, *_meta(c), c["w"], c["s"], base)
    y = _run(ts.sgmv_expand, *args)
    _check("sgmv_expand", y, ref.sgmv_expand, *args)
    if base is not None:
        assert torch.equal(base, base_before), "sgmv_expand modified base"


@cases
@dtypes
def test_fused_moe_lora(case, dtype):
    """The fused dense-form kernel (h on chip, no dispatch) against the reference and the grouped
    composite of the same routing, on every routing case (dropped slots, empty experts, T = 0/1,
    ragged ranks); banks with R > 128 are refused with a clear error."""
    c = _setup(case)
    x, A = _data(c["T"], c["d_in"], dtype=dtype), _data(c["R"], c["d_in"], dtype=dtype)
    B = _data(c["d_out"], c["R"], dtype=dtype)
    base = _data(c["T"], c["d_out"], dtype=dtype) if c["use_base"] else None
    ids, w, s, ro = c["ids"], c["w"], c["s"], c["ro"]
    if c["R"] > ts.FUSED_MAX_TOTAL_RANK:
        with pytest.raises(ValueError, match="total rank"):
            _run(ts.fused_moe_lora, x, A, B, ro, w, ids, s, base)
        return
    fused = _run(ts.fused_moe_lora, x, A, B, ro, w, ids, s, base)
    _check("fused_moe_lora", fused, ref.fused_moe_lora, x, A, B, ro, w, ids, s, base)

    def composite(ops, x, A, B, base, ro, order, pos, eo, w, s):
        h = ops.sgmv_shrink(x, A, ro, order, pos, eo, None, None, max_rank=c["mr"])
        return ops.sgmv_expand(h, B, ro, order, pos, eo, w, s, base)

    _check("fused vs grouped", fused, composite, ref, x, A, B, base, *_meta(c), w, s)


# --------------------------------------------------------------------------------------------
# Split-K shrink
# --------------------------------------------------------------------------------------------


@dtypes
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_shrink_split_k_forced(split_k, dtype):
    c = _setup(("splitk", 13, 7, 2, "drop", 2, ("rag", 17), 200, 8, True, True, False, 1))
    x, A = _data(13, 200, dtype=dtype), _data(c["R"], 200, dtype=dtype)
    args = (x, A, *_meta(c), c["w"], c["s"])
    h = _run(ts.sgmv_shrink, *args, c["mr"], split_k=split_k)
    _check(f"sgmv_shrink split_k={split_k}", h, ref.sgmv_shrink, *args, max_rank=c["mr"])


@pytest.mark.parametrize("split_k", [1, 2])
def test_shrink_split_k_ranks_over_64(split_k):
    """Several rank tiles with split-K: each (rank tile, d_in chunk) program adds its own part."""
    c = _setup(("splitk-r80", 9, 3, 2, "router", 1, ("rag", 80), 96, 8, True, True, False, 0))
    x, A = _data(9, 96, dtype=torch.float32), _data(c["R"], 96, dtype=torch.float32)
    args = (x, A, *_meta(c), c["w"], c["s"])
    h = _run(ts.sgmv_shrink, *args, c["mr"], split_k=split_k)
    _check(f"sgmv_shrink split_k={split_k}", h, ref.sgmv_shrink, *args, max_rank=c["mr"])


@pytest.mark.parametrize("split_k", [1, 3])
def test_fp32_long_reductions_sum_chains(split_k):
    """fp32 shrink and fused kernels reduce d_in in chains of ts.FP32_CHAIN_K columns: d_in = 1000
    is three whole chains and a partial one that ends inside a K tile; split_k = 3 starts the
    chains at each d_in chunk (384, 768: not multiples of the chain). A chain bound off by a tile
    drops or repeats 32-64 columns of every output."""
    d_in = 1000
    chain = ts.FP32_CHAIN_K.value
    assert d_in > 3 * chain and d_in % chain % 64
    c = _setup(("long-k", 21, 5, 2, "drop", 1, ("rag", 17), d_in, 24, True, True, True, 0))
    x, A = _data(21, d_in, dtype=torch.float32), _data(c["R"], d_in, dtype=torch.float32)
    args = (x, A, *_meta(c), c["w"], c["s"])
    h = _run(ts.sgmv_shrink, *args, c["mr"], split_k=split_k)
    _check(f"sgmv_shrink d_in={d_in} split_k={split_k}", h, ref.sgmv_shrink, *args,
           max_rank=c["mr"])
    if split_k == 1:
        B, base = _data(24, c["R"], dtype=torch.float32), _data(21, 24, dtype=torch.float32)
        fused_args = (x, A, B, c["ro"], c["w"], c["ids"], c["s"], base)
        _check(f"fused_moe_lora d_in={d_in}", _run(ts.fused_moe_lora, *fused_args),
               ref.fused_moe_lora, *fused_args)


@dtypes
def test_fused_column_splits(dtype):
    """Programs sharing a token tile's d_out (the fused kernel's second grid axis) write exactly
    the columns of one program: every split count gives the same bits, the last program's range
    ends inside a tile (d_out = 100), and a split count that does not divide the column tiles
    leaves no program without columns."""
    c = _setup(("splits", 70, 5, 2, "drop", 1, ("rag", 17), 40, 100, True, True, True, 0))
    x, A = _data(70, 40, dtype=dtype), _data(c["R"], 40, dtype=dtype)
    B, base = _data(100, c["R"], dtype=dtype), _data(70, 100, dtype=dtype)
    args = (x, A, B, c["ro"], c["w"], c["ids"], c["s"], base)
    one = _run(ts.fused_moe_lora, *args, col_splits=1)
    _check("fused_moe_lora", one, ref.fused_moe_lora, *args)
    for splits in (2, 3, 4, 7):
        assert torch.equal(_run(ts.fused_moe_lora, *args, col_splits=splits), one), splits


def test_fused_column_split_rule(monkeypatch):
    """Column splits fill one wave of SMs when the token tiles alone do not (H200: 132 SMs), never
    more splits than column tiles, and none on CPU."""
    monkeypatch.setattr(ts, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert ts._fused_col_splits(64, 64, cuda) == 2      # T=4096 at 64 tokens a tile
    assert ts._fused_col_splits(1, 64, cuda) == 64      # decode: every column tile its program
    assert ts._fused_col_splits(200, 64, cuda) == 1     # the token tiles fill the SMs
    assert ts._fused_col_splits(64, 1, cuda) == 1
    assert ts._fused_col_splits(4, 64, torch.device("cpu")) == 1
    for tiles in range(1, 140):
        for cols in range(1, 70):
            n = ts._fused_col_splits(tiles, cols, cuda)
            per = -(-cols // n)
            assert 1 <= n <= cols and (n - 1) * per < cols and tiles * n <= max(132, tiles)


def test_rank_tile_capped():
    """Larger ranks take more rank tiles, never a wider one (a 128-wide tile spills)."""
    for max_rank, tile in ((1, 16), (17, 32), (64, 64), (80, 64), (130, 64), (1024, 64)):
        assert ts._blocks(4096, 8, 4096, 4096, max_rank).R == tile


def test_shrink_split_k_rule():
    """Tall-skinny x (few rows, long d_in) picks split-K automatically; many tiles do not."""
    assert ts._split_k(n_tiles=4, d_in=4096, block_k=64) > 1
    assert ts._split_k(n_tiles=4, d_in=64, block_k=64) == 1
    assert ts._split_k(n_tiles=1024, d_in=4096, block_k=64) == 1
    c = _setup(("tall", 3, 2, 2, "router", 1, ("u", 16), 1024, 8, True, True, False, 0))
    x, A = _data(3, 1024, dtype=torch.float32), _data(c["R"], 1024, dtype=torch.float32)
    args = (x, A, *_meta(c), c["w"], c["s"])
    h = _run(ts.sgmv_shrink, *args, c["mr"])  # auto: split-K
    _check("sgmv_shrink auto split-K", h, ref.sgmv_shrink, *args, max_rank=c["mr"])


# --------------------------------------------------------------------------------------------
# Backward ops and the autograd formulas built from the launchers
# --------------------------------------------------------------------------------------------


@cases
@dtypes
def test_weight_grad(case, dtype):
    c = _setup(case)
    P = c["order"].numel()
    x, h = _data(c["T"], c["d_in"], dtype=dtype), _data(P, c["mr"], dtype=dtype)
    args = (x, h, *_meta(c), c["w"], c["s"], c["R"])
    G = _run(ts.sgmv_weight_grad, *args)
    _check("sgmv_weight_grad", G, ref.sgmv_weight_grad, *args)
    Gt = _run(ts.sgmv_weight_grad, *args, True)  # G^T [d, R], stored through swapped strides
    assert Gt.shape == (c["d_in"], c["R"]) and Gt.is_contiguous()
    assert torch.equal(Gt.cpu(), G.cpu().t())


@pytest.mark.parametrize("case", [
    ("one-expert-700-rows", 700, 3, 1, "one", 1, ("u", 16), 24, 8, True, True, False, 0),
    ("two-experts-padded", 600, 2, 2, "router", 16, ("rag", 17), 24, 8, True, True, False, 0),
], ids=["one-expert-700-rows", "two-experts-padded"])
def test_fp32_weight_grad_sums_row_chains(case):
    """The fp32 weight gradient reduces an expert's rows in chains of ts.FP32_CHAIN_K rows: 700
    rows on one expert are two whole chains and a partial one that ends inside a row tile; 16-row
    padding blocks put padding rows inside chains. A chain bound off by a tile drops or repeats
    rows of every output."""
    c = _setup(case)
    chain = ts.FP32_CHAIN_K.value
    assert int((c["eo"][1:] - c["eo"][:-1]).max()) > 2 * chain
    P = c["order"].numel()
    x, h = _data(c["T"], c["d_in"], dtype=torch.float32), _data(P, c["mr"], dtype=torch.float32)
    args = (x, h, *_meta(c), c["w"], c["s"], c["R"])
    _check(f"sgmv_weight_grad {case[0]}", _run(ts.sgmv_weight_grad, *args),
           ref.sgmv_weight_grad, *args)


def test_weight_grad_fp16_coefficients_not_rounded():
    """c_i * h[i] is not rounded to fp16 before the dot (hi + lo split): the result is the fp32
    reference rounded once, so it matches the fp16 reference almost everywhere (a rounded c * h
    makes ~40% of the entries differ by an ulp; the tolerance rule alone cannot see it)."""
    c = _setup(("wg16", 64, 2, 2, "router", 1, ("u", 16), 64, 8, True, True, False, 0))
    P = c["order"].numel()
    x, h = _data(64, 64, dtype=torch.float16), _data(P, c["mr"], dtype=torch.float16)
    args = (x, h, *_meta(c), c["w"], c["s"], c["R"])
    G = _run(ts.sgmv_weight_grad, *args).cpu()
    assert (G != ref.sgmv_weight_grad(*args)).float().mean().item() < 0.05


@dtypes
@pytest.mark.parametrize("a_by_token", [True, False], ids=["by-token", "by-row"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[6]], ids=lambda c: c[0])
def test_pair_dot(case, a_by_token, dtype):
    c = _setup(case)
    P = c["order"].numel()
    a = _data(c["T"] if a_by_token else P, 45, dtype=dtype)
    b = _data(P, 45, dtype=dtype)
    out = _run(ts.pair_dot, a, b, c["pos"], a_by_token)
    _check("pair_dot", out, ref.pair_dot, a, b, c["pos"], a_by_token)


def _grads(fn, inputs, grad_out):
    """Reference gradients by autograd through the reference op."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, grad_out)


def _opmath(*ts_):
    return [t.float() for t in ts_]


@dtypes
@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[6]], ids=lambda c: c[0])
def test_backward_formulas(case, dtype):
    """The autograd formulas of molora_ops.ops.sgmv (shrink and expand are each other's transpose;
    weight grads are grouped X^T Y; routing-weight grads are pair dots), run with these launchers,
    match autograd through the reference ops."""
    c = _setup(case)
    meta, s, mr, R, P = _meta(c), c["s"], c["mr"], c["R"], c["order"].numel()
    w = routing_weights(c["pos"])
    x, A = _data(c["T"], c["d_in"], dtype=dtype), _data(R, c["d_in"], dtype=dtype)
    h, B = _data(P, mr, dtype=dtype), _data(c["d_out"], R, dtype=dtype)
    grad_h, grad_y = _data(P, mr, dtype=dtype), _data(c["T"], c["d_out"], dtype=dtype)
    dx_, dA_, dh_, dB_, dgh, dgy, dw, ds = [_dev(t) for t in (x, A, h, B, grad_h, grad_y, w, s)]
    dmeta = [_dev(t) for t in meta]

    # sgmv_shrink backward: dx = expand(dh, A^T), dA = weight_grad(x, dh), dw = pair_dot(dh, h_unweighted)
    ours = (ts.sgmv_expand(dgh, dA_.t(), *dmeta, dw, ds, None),
            ts.sgmv_weight_grad(dx_, dgh, *dmeta, dw, ds, R),
            ts.pair_dot(dgh.float(), ts.sgmv_shrink(*_opmath(dx_, dA_), *dmeta, None, ds, mr),
                        dmeta[2], False))

    def shrink(x, A, w):
        return ref.sgmv_shrink(x, A, *meta, w, s, max_rank=mr)

    lo = _grads(shrink, (x, A, w), grad_h)
    hi = _grads(shrink, (x.double(), A.double(), w.double()), grad_h.double())
    for name, o, l, hh in zip(("dx", "dA", "dw"), ours, lo, hi):
        assert_close_fa(o.cpu(), l, hh, name=f"shrink {name}")

    # sgmv_expand backward: dh = shrink(dy, B^T), dB = weight_grad(dy, h)^T, dw = pair_dot(h, u)
    u = ts.sgmv_shrink(*_opmath(dgy, dB_.t()), *dmeta, None, ds, mr)
    ours = (ts.sgmv_shrink(dgy, dB_.t(), *dmeta, dw, ds, mr),
            ts.sgmv_weight_grad(dgy, dh_, *dmeta, dw, ds, R).t(),
            ts.pair_dot(dh_.float(), u, dmeta[2], False))

    def expand(h, B, w):
        return ref.sgmv_expand(h, B, *meta, w, s, None)

    lo = _grads(expand, (h, B, w), grad_y)
    hi = _grads(expand, (h.double(), B.double(), w.double()), grad_y.double())
    for name, o, l, hh in zip(("dh", "dB", "dw"), ours, lo, hi):
        assert_close_fa(o.cpu(), l, hh, name=f"expand {name}")


# --------------------------------------------------------------------------------------------
# Layouts and dtypes
# --------------------------------------------------------------------------------------------


@dtypes
def test_noncontiguous_and_int64_inputs(dtype):
    """Strided data (sliced x / h / base, transposed banks) and int64 index tensors."""
    c = _setup(CASES[6])
    meta64 = [t.long() for t in _meta(c)]
    P, T = c["order"].numel(), c["T"]
    x = noncontig(_data(T, c["d_in"], dtype=dtype))
    A = noncontig(_data(c["R"], c["d_in"], dtype=dtype), "transpose")
    h = noncontig(_data(P, c["mr"], dtype=dtype))
    B = noncontig(_data(c["d_out"], c["R"], dtype=dtype), "transpose")
    base = noncontig(_data(T, c["d_out"], dtype=dtype))
    w = noncontig(c["w"])
    _check("shrink", _run(ts.sgmv_shrink, x, A, *meta64, w, c["s"], c["mr"]),
           ref.sgmv_shrink, x, A, *meta64, w, c["s"], max_rank=c["mr"])
    _check("expand", _run(ts.sgmv_expand, h, B, *meta64, w, c["s"], base),
           ref.sgmv_expand, h, B, *meta64, w, c["s"], base)
    _check("weight_grad", _run(ts.sgmv_weight_grad, x, h, *meta64, w, c["s"], c["R"]),
           ref.sgmv_weight_grad, x, h, *meta64, w, c["s"], c["R"])
    b = _data(P, c["d_in"], dtype=dtype)
    _check("pair_dot", _run(ts.pair_dot, x, noncontig(b), meta64[2], True),
           ref.pair_dot, x, b, meta64[2], True)


def test_weights_in_data_dtype_and_uniform_ranks():
    """fp16 routing weights (any float dtype is accepted) and a uniform bank of rank 17."""
    E, T, k = 5, 19, 2
    ids = make_ids("router", T, E, k)
    order, pos, eo = ref.dispatch(ids, E, 1)
    ro = rank_offsets_from_ranks([17] * E)
    R = int(ro[-1])
    x, A = _data(T, 37, dtype=torch.float16), _data(R, 37, dtype=torch.float16)
    w = routing_weights(ids, torch.float16)
    args = (x, A, ro, order, pos, eo, w, None)
    _check("sgmv_shrink", _run(ts.sgmv_shrink, *args, 17), ref.sgmv_shrink, *args, max_rank=17)


def test_float64_rejected():
    c = _setup(CASES[1])
    x, A = _data(1, 37, dtype=torch.float64), _data(c["R"], 37, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 is not supported"):
        _run(ts.sgmv_shrink, x, A, *_meta(c), None, None, c["mr"])
    with pytest.raises(TypeError, match="float64 is not supported"):
        _run(ts.pair_dot, x, x, c["pos"], True)
