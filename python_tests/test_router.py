"""Family 1 (routers): softmax_topk, topk_softmax, sigmoid_topk, softmax_topp vs the reference,
forward and backward, every CPU dtype, edge shapes, non-contiguous logits, exact ties."""

import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import (FLOAT_DTYPES, compare_with_reference, dtype_params, noncontig, normalised_entropy,
                   opmath, resample_rows, tie_free_logits, topp_logits, well_separated)

# (T, E, k): T=0, T=1, odd E, E=64, k=E, E=1, k=1
SHAPES = [(0, 8, 2), (1, 8, 2), (13, 7, 3), (24, 64, 6), (5, 7, 7), (4, 1, 1), (9, 5, 1)]
SHAPE_IDS = [f"T{T}-E{E}-k{k}" for T, E, k in SHAPES]


def _check_topk_outputs(w, ids, T, E, k, dtype):
    assert w.shape == (T, k) and ids.shape == (T, k)
    assert w.dtype == opmath(dtype), f"weights must have the opmath dtype, got {w.dtype}"
    assert ids.dtype == torch.int32
    if T:
        assert int(ids.min()) >= 0 and int(ids.max()) < E
        # k distinct experts per row
        assert all(len(set(r)) == k for r in ids.tolist())


# ------------------------------------------------------------------ softmax_topk

@dtype_params()
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "plain"])
def test_softmax_topk(dtype, T, E, k, renormalize):
    logits = tie_free_logits(T, E, dtype)
    (w, ids), _ = compare_with_reference("softmax_topk", [logits, k, renormalize], diff=[0])
    _check_topk_outputs(w, ids, T, E, k, dtype)
    if T and renormalize:
        torch.testing.assert_close(w.sum(-1).double(), torch.ones(T, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
    if T:  # ids are the k largest logits, in descending order (independent of the reference)
        expect = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(ids.long(), expect)


def test_softmax_topk_defaults():
    logits = tie_free_logits(6, 5)
    w, ids = molora_ops.softmax_topk(logits, 2)
    w2, ids2 = molora_ops.softmax_topk(logits, 2, True)
    assert torch.equal(ids, ids2) and torch.equal(w, w2)
    torch.testing.assert_close(w.sum(-1), torch.ones(6))


# ------------------------------------------------------------------ topk_softmax

@dtype_params()
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_topk_softmax(dtype, T, E, k, temperature):
    logits = tie_free_logits(T, E, dtype)
    (w, ids), _ = compare_with_reference("topk_softmax", [logits, k, temperature], diff=[0])
    _check_topk_outputs(w, ids, T, E, k, dtype)
    if T:
        torch.testing.assert_close(w.sum(-1).double(), torch.ones(T, dtype=torch.float64),
                                   atol=1e-5, rtol=0)


def test_topk_softmax_defaults():
    logits = tie_free_logits(6, 5)
    a = molora_ops.topk_softmax(logits, 3)
    b = molora_ops.topk_softmax(logits, 3, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------ sigmoid_topk

# (name, bias kind, normalize, bias_in_weights, scale); scale None -> k (SMoRA)
SIGMOID_SETTINGS = [
    ("plain", None, True, False, 1.0),
    ("deepseek", "f32", True, False, 2.5),
    ("smora", "pos", True, True, None),
    ("nonorm", "f32", False, False, 1.0),
    ("nonorm_biw", "pos", False, True, 0.5),
    ("bias_data_dtype", "data", True, False, 1.0),
]


def _sigmoid_inputs(T, E, k, dtype, bias_kind):
    if bias_kind is None:
        bias = None
    elif bias_kind == "pos":
        bias = torch.rand(E, dtype=torch.float64).mul(0.3).add(0.05).float()
    elif bias_kind == "f32":
        bias = torch.randn(E, dtype=torch.float64).mul(0.2).float()
    else:
        bias = torch.randn(E, dtype=torch.float64).mul(0.2).to(dtype)

    def key(l):
        s = torch.sigmoid(l.double())
        return s if bias is None else s + bias.double()

    logits = resample_rows(lambda n: tie_free_logits(n, E, dtype),
                           lambda l: well_separated(key(l), k, 1e-4), T)
    return logits, bias


@dtype_params()
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("setting", SIGMOID_SETTINGS, ids=[s[0] for s in SIGMOID_SETTINGS])
def test_sigmoid_topk(dtype, T, E, k, setting):
    _, bias_kind, normalize, biw, scale = setting
    scale = float(k) if scale is None else scale
    logits, bias = _sigmoid_inputs(T, E, k, dtype, bias_kind)
    (w, ids), _ = compare_with_reference(
        "sigmoid_topk", [logits, k, bias, normalize, biw, scale], diff=[0])
    _check_topk_outputs(w, ids, T, E, k, dtype)
    if T and normalize:
        torch.testing.assert_close(w.sum(-1).double(), torch.full((T,), scale, dtype=torch.float64),
                                   atol=1e-5 * scale, rtol=0)


def test_sigmoid_topk_bias_not_differentiated():
    logits, bias = _sigmoid_inputs(7, 6, 2, torch.float32, "f32")
    bias = bias.clone().requires_grad_(True)
    logits = logits.clone().requires_grad_(True)
    w, _ = molora_ops.sigmoid_topk(logits, 2, bias, True, True, 1.0)
    g_logits, g_bias = torch.autograd.grad(w, [logits, bias], torch.randn_like(w), allow_unused=True)
    assert g_bias is None or torch.count_nonzero(g_bias) == 0
    assert g_logits is not None and torch.count_nonzero(g_logits) > 0


def test_sigmoid_topk_defaults():
    logits = tie_free_logits(6, 5)
    a = molora_ops.sigmoid_topk(logits, 2)
    b = molora_ops.sigmoid_topk(logits, 2, None, True, False, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------ softmax_topp

TOPP_SHAPES = [(0, 8), (1, 8), (13, 7), (24, 64), (4, 1), (6, 2), (16, 5)]
# (name, top_p, min_k, entropy_threshold, q)
TOPP_SETTINGS = [
    ("p0.5", 0.5, 1, 1.0, 1.1),
    ("p0.8-mink2", 0.8, 2, 1.0, 1.1),
    ("entropy-tsallis", 0.5, 1, 0.85, 1.1),
    ("entropy-shannon", 0.6, 1, 0.85, 1.0),
    ("entropy-q0-off", 0.5, 1, 0.3, 0.0),
    ("p0.05-only-mink", 0.05, 3, 1.0, 1.1),
]


@dtype_params()
@pytest.mark.parametrize("T,E", TOPP_SHAPES, ids=[f"T{T}-E{E}" for T, E in TOPP_SHAPES])
@pytest.mark.parametrize("setting", TOPP_SETTINGS, ids=[s[0] for s in TOPP_SETTINGS])
def test_softmax_topp(dtype, T, E, setting):
    _, top_p, min_k, thr, q = setting
    min_k = min(min_k, E)
    eps = 1e-5
    logits = topp_logits(T, E, dtype, top_p, thr, q, eps)
    (w, ids), (w_ref, _) = compare_with_reference(
        "softmax_topp", [logits, top_p, min_k, thr, q, eps], diff=[0])
    assert w.shape == (T, E) and ids.shape == (T, E)
    assert w.dtype == opmath(dtype) and ids.dtype == torch.int32
    if T == 0:
        return
    # independent checks of the contract: kept ones form a prefix, >= min_k kept, padding is -1 / 0
    kept = ids >= 0
    n_kept = kept.sum(-1)
    assert torch.equal(kept, torch.arange(E)[None, :] < n_kept[:, None])
    assert (n_kept >= min_k).all()
    assert (w[~kept] == 0).all()
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(w[kept].double(), p.gather(1, ids.long().clamp(min=0))[kept],
                               atol=2e-3 if dtype in (torch.bfloat16, torch.float16) else 1e-5, rtol=1e-3)
    if q > 0 and thr < 1 and E > 1 and T >= 13:
        H = normalised_entropy(logits, q, eps)
        high = H > thr
        assert high.any() and (~high).any(), "test data must exercise both entropy branches"
        assert (n_kept[high] == E).all()
        assert (n_kept[~high] < E).any()


def test_softmax_topp_defaults():
    logits = topp_logits(9, 6, torch.float32, 0.5, 1.0, 1.1)
    a = molora_ops.softmax_topp(logits, 0.5)
    b = molora_ops.softmax_topp(logits, 0.5, 1, 1.0, 1.1, 1e-5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_softmax_topp_feeds_dispatch():
    logits = topp_logits(20, 8, torch.float32, 0.6, 1.0, 1.1)
    w, ids = molora_ops.softmax_topp(logits, 0.6)
    assert (ids == -1).any(), "need dropped slots"
    order, pos, eo = molora_ops.dispatch(ids, 8)
    r = ref.dispatch(ids, 8, 1)
    for a, b in zip((order, pos, eo), r):
        assert torch.equal(a, b)
    assert torch.equal(pos == -1, ids == -1)


# ------------------------------------------------------------------ non-contiguous logits

def _router_call(name, logits, E):
    k = min(3, E)
    if name == "softmax_topk":
        return [logits, k, True]
    if name == "topk_softmax":
        return [logits, k, 0.8]
    if name == "sigmoid_topk":
        return [logits, k, None, True, False, 1.0]
    return [logits, 0.5, 1, 0.9, 1.1, 1e-5]


@pytest.mark.parametrize("name", ["softmax_topk", "topk_softmax", "sigmoid_topk", "softmax_topp"])
@pytest.mark.parametrize("layout", ["transpose", "slice"])
@dtype_params([torch.float32, torch.bfloat16])
def test_router_noncontiguous(name, layout, dtype):
    T, E = 13, 7
    if name == "softmax_topp":
        base = topp_logits(T, E, dtype, 0.5, 0.9, 1.1)
    elif name == "sigmoid_topk":
        base = _sigmoid_inputs(T, E, 3, dtype, None)[0]
    else:
        base = tie_free_logits(T, E, dtype)
    logits = noncontig(base, layout)
    assert not logits.is_contiguous()
    ours, _ = compare_with_reference(name, _router_call(name, logits, E), diff=[0])
    contig = getattr(molora_ops, name)(*_router_call(name, base.contiguous(), E))
    assert torch.equal(ours[1], contig[1])
    torch.testing.assert_close(ours[0], contig[0])


# ------------------------------------------------------------------ ties: lower id first

def _int_logits(T, E, dtype):
    return torch.randint(0, 3, (T, E)).to(dtype)  # many exact repeats


@dtype_params([torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
def test_router_ties_lower_id_first(name, dtype):
    T, E, k = 16, 9, 4
    logits = _int_logits(T, E, dtype)
    logits[0] = torch.tensor([1, 2, 2, 0, 2, 1, 1, 0, 2], dtype=dtype)
    args = _router_call(name, logits, E)
    args[1] = k
    w, ids = getattr(molora_ops, name)(*args)
    # descending key, ties broken toward the lower id == stable descending sort
    expect = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    assert ids[0].tolist() == [1, 2, 4, 8]
    assert torch.equal(ids.long(), expect)
    w_ref, ids_ref = getattr(ref, name)(*args)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)


@dtype_params([torch.float32, torch.bfloat16])
def test_softmax_topp_ties_lower_id_first(dtype):
    T, E = 16, 9
    logits = _int_logits(T, E, dtype)
    # min_k = E keeps every expert: the whole sorted order is visible
    w, ids = molora_ops.softmax_topp(logits, 0.5, E, 1.0, 1.1, 1e-5)
    expect = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices
    assert torch.equal(ids.long(), expect)
    w_ref, ids_ref = ref.softmax_topp(logits, 0.5, E, 1.0, 1.1, 1e-5)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)


def test_sigmoid_topk_bias_ties_lower_id_first():
    # equal keys s + bias through the bias: logits all equal, bias with repeats
    E, k = 8, 5
    logits = torch.zeros(3, E)
    bias = torch.tensor([0.0, 0.5, 0.25, 0.5, 0.0, 0.25, 0.5, 0.0])
    w, ids = molora_ops.sigmoid_topk(logits, k, bias, True, False, 1.0)
    assert ids.tolist() == [[1, 3, 6, 2, 5]] * 3
    w_ref, ids_ref = ref.sigmoid_topk(logits, k, bias, True, False, 1.0)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)


class _DropFirst(torch.autograd.Function):
    """y = x, with no gradient for the first input (an undefined one reaches its producer)."""

    @staticmethod
    def forward(ctx, a, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return None, g


def test_selection_nodes_take_an_undefined_gradient():
    """softmax_topk's and rank_topk's C++ nodes do not materialize gradients (no zero [T, k]
    tensor for the ids output each backward): reached with an undefined gradient of their values,
    they give none, and a defined one still flows."""
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    w, _ = molora_ops.softmax_topk(logits, 2)
    v, _ = molora_ops.rank_topk(h, 3)
    other = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = _DropFirst.apply(w, other).sum() + _DropFirst.apply(v, other).sum()
    g_logits, g_h, g_other = torch.autograd.grad(out, [logits, h, other], allow_unused=True,
                                                 retain_graph=True)
    assert g_logits is None and g_h is None
    torch.testing.assert_close(g_other, torch.full_like(other, 2.0))
    (g_logits,) = torch.autograd.grad(w[:, 0].sum(), [logits])
    (want,) = torch.autograd.grad(ref.softmax_topk(logits, 2)[0][:, 0].sum(), [logits])
    torch.testing.assert_close(g_logits, want)
