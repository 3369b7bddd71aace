"""The CUDA kernels of the router family (csrc/cuda/router.cu + csrc/kernels/router.cuh:
softmax_topk, topk_softmax, sigmoid_topk, softmax_topp, softmax_route_backward,
sigmoid_topk_backward), run on the CPU by the emulation module (torch.ops.molora_emu, every CUDA
thread a host thread), against molora_ops.reference.

ids are compared EXACTLY (tie-free inputs with margins, and crafted exact ties that must go to the
lower id); float outputs follow the flash-attention rule (utils.assert_close_fa: ours vs the fp64
reference within 2x the fp32/low-precision reference's own error + a dtype floor).
Emulation is slow (every shuffle is a barrier of 32 host threads, ~1-2 ms): a row costs about
8 barriers per selected expert, so row counts are small, and long selections (k = E, top-p rows that
keep every expert) use 1-2 rows. Shapes cover every register bucket of the kernels (E <= 32, 64,
128, 256, 512, 1024 and the E > 1024 fallback), the 16-byte-vector and scalar load paths, k > 32
(several 32-pick chunks), ragged row counts vs the 4 rows per block and the grid-stride loop.
"""

import pytest
import torch

import molora_ops  # noqa: F401  (registers torch.ops.molora for the error-message comparison)
from molora_ops import reference as ref
from emu_utils import (DT_IDS, KERNEL_DTYPES, assert_float64_runs_the_reference,
                       raises_on_both_paths, require_emu)
from utils import assert_close_fa, assert_index_equal, drop_ids, noncontig, normalised_entropy, \
    resample_rows, tie_free_logits, topp_logits, well_separated


EMU = require_emu()  # torch.ops.molora_emu (skips the module only when _C_emu is not built)


def _hi(args):
    """The float64 upcast of every float tensor argument (the ref_hi run of the FA rule)."""
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _check(name, args, check_hi_ids=True):
    """EMU.<name>(*args) vs the reference: ids exactly, weights by the FA rule."""
    w, ids = getattr(EMU, name)(*args)
    w_lo, ids_lo = getattr(ref, name)(*args)
    w_hi, ids_hi = getattr(ref, name)(*_hi(args))
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    if check_hi_ids:  # test-data sanity: the fp64 reference routes identically (tie margins)
        assert torch.equal(ids_lo, ids_hi), "test inputs too close to a tie"
    assert_index_equal(ids, ids_lo, name=f"{name} ids")
    if check_hi_ids:
        assert_close_fa(w, w_lo, w_hi, name=f"{name} weights")
    else:  # exact ties: the fp64 run may order differently, compare with the fp32 reference
        torch.testing.assert_close(w, w_lo, atol=2e-6, rtol=2e-6)
    return w, ids


# ------------------------------------------------------------------ top-k routers

# (name, op, extra args after k): every mode / flag of the three top-k ops
def _bias(E, kind):
    if kind is None:
        return None
    if kind == "pos":
        return (torch.rand(E, dtype=torch.float64) * 0.3 + 0.05).float()
    return (torch.randn(E, dtype=torch.float64) * 0.2).float()


TOPK_MODES = [
    ("softmax-renorm", "softmax_topk", dict(renormalize=True)),
    ("softmax-plain", "softmax_topk", dict(renormalize=False)),
    ("topk-softmax-t1", "topk_softmax", dict(temperature=1.0)),
    ("topk-softmax-t0.7", "topk_softmax", dict(temperature=0.7)),
    ("sigmoid-plain", "sigmoid_topk", dict(bias=None, normalize=True, biw=False, scale=1.0)),
    ("sigmoid-deepseek", "sigmoid_topk", dict(bias="f32", normalize=True, biw=False, scale=2.5)),
    ("sigmoid-smora", "sigmoid_topk", dict(bias="pos", normalize=True, biw=True, scale=None)),
    ("sigmoid-nonorm-biw", "sigmoid_topk", dict(bias="pos", normalize=False, biw=True, scale=0.5)),
    ("sigmoid-nonorm", "sigmoid_topk", dict(bias="f32", normalize=False, biw=False, scale=1.0)),
]
MODE_IDS = [m[0] for m in TOPK_MODES]


def _topk_inputs(T, E, k, dtype, mode):
    _, op, kw = mode
    if op == "softmax_topk":
        return op, [tie_free_logits(T, E, dtype), k, kw["renormalize"]]
    if op == "topk_softmax":
        return op, [tie_free_logits(T, E, dtype), k, kw["temperature"]]
    bias = _bias(E, kw["bias"])
    scale = float(k) if kw["scale"] is None else kw["scale"]

    if bias is None:  # selection on the logits (exact, ties included: bf16 E = 1024 has some)
        return op, [tie_free_logits(T, E, dtype), k, bias, kw["normalize"], kw["biw"], scale]

    def key(l):
        s = torch.sigmoid(l.double())
        return s if bias is None else s + bias.double()

    # sigmoid + bias keys: margins between the k+1 largest so fp32 rounding cannot reorder them
    logits = resample_rows(lambda n: tie_free_logits(n, E, dtype),
                           lambda l: well_separated(key(l), k, 1e-4), T)
    return op, [logits, k, bias, kw["normalize"], kw["biw"], scale]


# (E, k, T): one lane / E = 1, odd E, exact warp, VEC-able 60 (bf16 2-wide), 64, 257 (NPL = 16),
# 1024 (NPL = 32), 1100 (the E > 1024 fallback); k in {1, 2, 8, 16}; T ragged vs 4 rows per block
TOPK_SHAPES = [(1, 1, 3), (2, 2, 5), (7, 3, 6), (32, 8, 5), (60, 16, 4), (64, 8, 5), (100, 2, 5),
               (257, 16, 2), (1024, 16, 2), (1100, 3, 2)]


@pytest.mark.parametrize("E,k,T", TOPK_SHAPES, ids=[f"E{E}-k{k}-T{T}" for E, k, T in TOPK_SHAPES])
@pytest.mark.parametrize("mode", TOPK_MODES, ids=MODE_IDS)
def test_topk_routers_f32(E, k, T, mode):
    op, args = _topk_inputs(T, E, k, torch.float32, mode)
    _check(op, args)


LOWP_SHAPES = [(7, 3, 6), (60, 16, 4), (64, 8, 5), (1024, 8, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("E,k,T", LOWP_SHAPES, ids=[f"E{E}-k{k}-T{T}" for E, k, T in LOWP_SHAPES])
@pytest.mark.parametrize("mode", TOPK_MODES, ids=MODE_IDS)
def test_topk_routers_low_precision(dtype, E, k, T, mode):
    op, args = _topk_inputs(T, E, k, dtype, mode)
    _check(op, args)


# k = E and k > 32: several 32-pick chunks, the raw-then-fixed-up weights of the earlier chunks
@pytest.mark.parametrize("E,k,T", [(5, 5, 3), (33, 33, 1), (64, 64, 1), (40, 40, 2)],
                         ids=["E5-k5", "E33-k33", "E64-k64", "E40-k40"])
@pytest.mark.parametrize("mode", [TOPK_MODES[0], TOPK_MODES[1], TOPK_MODES[3], TOPK_MODES[6]],
                         ids=[MODE_IDS[0], MODE_IDS[1], MODE_IDS[3], MODE_IDS[6]])
def test_topk_routers_k_equals_E(E, k, T, mode):
    op, args = _topk_inputs(T, E, k, torch.float32, mode)
    w, ids = _check(op, args)
    assert sorted(ids[0].tolist()) == list(range(E))


def test_topk_router_large_k_large_E():
    # k = 300 > 32 on the register path (E = 700, NPL = 32) and k = E on the fallback (E = 1030)
    op, args = _topk_inputs(1, 700, 300, torch.bfloat16, TOPK_MODES[0])
    _check(op, args)
    op, args = _topk_inputs(1, 1030, 1030, torch.float32, TOPK_MODES[3])
    _check(op, args)


@pytest.mark.parametrize("T", [0, 1])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
def test_topk_routers_tiny_T(T, dtype):
    for mode in (TOPK_MODES[0], TOPK_MODES[3], TOPK_MODES[6]):
        op, args = _topk_inputs(T, 9, 4, dtype, mode)
        w, ids = _check(op, args)
        assert w.shape == (T, 4) and ids.shape == (T, 4)


def test_topk_router_grid_stride():
    # 300 rows > 64 blocks (emulated SM count 4 x 16) x 4 rows: warps loop over several rows
    logits = tie_free_logits(300, 5, torch.float32)
    _check("softmax_topk", [logits, 1, False])


def _relayout(base, layout):
    if layout in ("transpose", "slice"):
        return noncontig(base, layout)
    # rows inside a wider buffer: 8 columns in (16-byte aligned for bf16, row stride 72: the vector
    # path with a row stride != E) or 1 column in (misaligned: the scalar path)
    off = 8 if layout == "offset-aligned" else 1
    T, E = base.shape
    buf = torch.randn(T, E + 8, dtype=torch.float64).to(base.dtype)
    out = buf[:, off:off + E]
    out.copy_(base)
    return out


@pytest.mark.parametrize("layout", ["transpose", "slice", "offset-aligned", "offset-misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_topk_routers_noncontiguous(layout, dtype):
    T, E, k = 6, 64, 5
    for mode in (TOPK_MODES[1], TOPK_MODES[3], TOPK_MODES[5]):
        op, args = _topk_inputs(T, E, k, dtype, mode)
        base = args[0]
        args[0] = _relayout(base, layout)
        assert not args[0].is_contiguous()
        w, ids = _check(op, args)
        args[0] = base.contiguous()
        w2, ids2 = getattr(EMU, op)(*args)
        # the vector and the strided-scalar paths map columns to lanes differently: same ids,
        # softmax sums in another order
        assert torch.equal(ids, ids2)
        torch.testing.assert_close(w, w2, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ ties: lower id first

@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
@pytest.mark.parametrize("name", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
def test_router_ties_lower_id_first(name, dtype):
    # integer logits in [0, 3): exact repeats within a row, within one lane (columns c, c + 32) and
    # across lanes; E = 70 spans three registers per lane
    for T, E, k in [(8, 9, 4), (4, 70, 12)]:
        logits = torch.randint(0, 3, (T, E)).to(dtype)
        if E == 9:
            logits[0] = torch.tensor([1, 2, 2, 0, 2, 1, 1, 0, 2], dtype=dtype)
        logits[-1] = 1  # a fully tied row: ids 0..k-1
        args = {"softmax_topk": [logits, k, True], "topk_softmax": [logits, k, 0.8],
                "sigmoid_topk": [logits, k, None, True, False, 1.0]}[name]
        w, ids = _check(name, args, check_hi_ids=False)
        expect = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(ids.long(), expect)
        assert ids[-1].tolist() == list(range(k))
        if E == 9:
            assert ids[0].tolist() == [1, 2, 4, 8]


def test_sigmoid_topk_bias_ties_lower_id_first():
    # equal keys s + bias made by the bias: logits all equal, bias with repeats (E = 40: two lanes
    # and two registers hold equal keys)
    E, k = 8, 5
    logits = torch.zeros(3, E)
    bias = torch.tensor([0.0, 0.5, 0.25, 0.5, 0.0, 0.25, 0.5, 0.0])
    w, ids = _check("sigmoid_topk", [logits, k, bias, True, False, 1.0], check_hi_ids=False)
    assert ids.tolist() == [[1, 3, 6, 2, 5]] * 3
    bias = torch.tensor([0.0, 0.5, 0.25] * 13 + [0.5])
    logits = torch.zeros(2, 40)
    w, ids = _check("sigmoid_topk", [logits, 10, bias, True, True, 3.0], check_hi_ids=False)
    assert ids[0].tolist() == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]


def test_router_ties_signed_zero():
    # -0.0 == +0.0 (torch.sort): the lower id first whatever the sign bit
    logits = torch.tensor([[0.0, -0.0, -1.0, -0.0, 0.0]])
    w, ids = _check("softmax_topk", [logits, 4, False], check_hi_ids=False)
    assert ids.tolist() == [[0, 1, 3, 4]]


# ------------------------------------------------------------------ softmax_topp

# (name, top_p, min_k, entropy_threshold, q)
TOPP_SETTINGS = [
    ("p0.5", 0.5, 1, 1.0, 1.1),
    ("p0.8-mink2", 0.8, 2, 1.0, 1.1),
    ("entropy-tsallis", 0.5, 1, 0.85, 1.1),
    ("entropy-shannon", 0.6, 1, 0.85, 1.0),
    ("entropy-q0.5", 0.4, 1, 0.9, 0.5),
    ("entropy-q0-off", 0.5, 1, 0.3, 0.0),
    ("p0.05-only-mink", 0.05, 3, 1.0, 1.1),
]


def _check_topp(logits, top_p, min_k, thr, q, eps=1e-5):
    w, ids = _check("softmax_topp", [logits, top_p, min_k, thr, q, eps])
    T, E = logits.shape
    assert w.shape == (T, E) and ids.shape == (T, E)
    kept = ids >= 0
    n_kept = kept.sum(-1)
    assert torch.equal(kept, torch.arange(E)[None, :] < n_kept[:, None])  # a prefix, then -1
    assert (w[~kept] == 0).all()
    return w, ids, n_kept


# E: one expert, two, odd, one warp exactly, NPL = 2 / 16, the E > 1024 fallback
TOPP_SHAPES = [(1, 2), (2, 4), (7, 8), (32, 4), (64, 6), (257, 2), (1100, 2)]


@pytest.mark.parametrize("E,T", TOPP_SHAPES, ids=[f"E{E}-T{T}" for E, T in TOPP_SHAPES])
@pytest.mark.parametrize("setting", TOPP_SETTINGS, ids=[s[0] for s in TOPP_SETTINGS])
def test_softmax_topp_f32(E, T, setting):
    _, top_p, min_k, thr, q = setting
    flat = 0.0 if E > 1000 else 0.5  # no 1100-round broadcast rows in emulation
    logits = topp_logits(T, E, torch.float32, top_p, thr, q, flat_frac=flat)
    _check_topp(logits, top_p, min(min_k, E), thr, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("E,T", [(7, 8), (64, 6)], ids=["E7", "E64"])
@pytest.mark.parametrize("setting", [TOPP_SETTINGS[1], TOPP_SETTINGS[2], TOPP_SETTINGS[3]],
                         ids=["p0.8-mink2", "entropy-tsallis", "entropy-shannon"])
def test_softmax_topp_low_precision(dtype, E, T, setting):
    _, top_p, min_k, thr, q = setting
    logits = topp_logits(T, E, dtype, top_p, thr, q)
    _check_topp(logits, top_p, min_k, thr, q)


def test_softmax_topp_entropy_broadcast():
    # both branches in one batch: high-entropy rows keep every expert (sorted), peaked rows not
    E, T, thr, q = 16, 12, 0.85, 1.1
    logits = topp_logits(T, E, torch.float32, 0.5, thr, q)
    H = normalised_entropy(logits, q, 1e-5)
    high = H > thr
    assert high.any() and (~high).any()
    _, ids, n_kept = _check_topp(logits, 0.5, 1, thr, q)
    assert (n_kept[high] == E).all() and (n_kept[~high] < E).all()
    # a threshold below every row's entropy: the gate fires for every row
    assert (H > 0.05).all()
    _, _, n_kept = _check_topp(logits, 0.5, 1, 0.05, q)
    assert (n_kept == E).all()
    # a large eps (p + eps is no distribution: H < 0): the gate never fires, as in the reference
    _, _, n_kept = _check_topp(logits, 0.5, 1, thr, q, eps=0.5)
    assert (n_kept < E).all()


def test_softmax_topp_large_E_broadcast():
    # E = 1024 (NPL = 32): a flat row broadcasts (1024 selection rounds), a peaked one stops early
    logits = topp_logits(2, 1024, torch.float32, 0.5, 0.85, 1.1)
    logits[0] *= 0.01
    logits[1] = tie_free_logits(1, 1024, torch.float32, scale=20.0)
    _, _, n_kept = _check_topp(logits, 0.5, 1, 0.85, 1.1)
    assert n_kept[0] == 1024 and n_kept[1] < 1024


@pytest.mark.parametrize("E", [5, 40])
def test_softmax_topp_min_k_all(E):
    # min_k = E keeps every expert: the whole sorted order (k > 32 chunks for E = 40)
    logits = tie_free_logits(3, E, torch.float32)
    _, ids, n_kept = _check_topp(logits, 0.3, E, 1.0, 1.1)
    assert (n_kept == E).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_softmax_topp_ties_lower_id_first(dtype):
    T, E = 6, 9
    logits = torch.randint(0, 3, (T, E)).to(dtype)
    w, ids = _check("softmax_topp", [logits, 0.5, E, 1.0, 1.1, 1e-5], check_hi_ids=False)
    expect = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices
    assert torch.equal(ids.long(), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("E", [9, 70, 300])
def test_softmax_topp_broadcast_ties_lower_id_first(dtype, E):
    # entropy_threshold < 0 <= H: every row broadcasts, i.e. is fully sorted (the kernels' bitonic
    # sort in shared memory, E padded to a power of two); integer logits: exact ties everywhere
    T = 5 if E < 300 else 2
    logits = torch.randint(0, 3, (T, E)).to(dtype)
    logits[-1] = 1  # a fully tied row: ids 0..E-1
    w, ids = _check("softmax_topp", [logits, 0.5, 1, -0.5, 1.1, 1e-5], check_hi_ids=False)
    expect = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices
    assert torch.equal(ids.long(), expect)
    assert ids[-1].tolist() == list(range(E))


@pytest.mark.parametrize("T", [0, 1])
def test_softmax_topp_tiny_T(T):
    logits = topp_logits(T, 8, torch.float32, 0.5, 0.85, 1.1) if T else torch.randn(0, 8)
    w, ids = _check("softmax_topp", [logits, 0.5, 1, 0.85, 1.1, 1e-5])
    assert w.shape == (T, 8)


@pytest.mark.parametrize("layout", ["transpose", "slice"])
def test_softmax_topp_noncontiguous(layout):
    base = topp_logits(7, 16, torch.bfloat16, 0.5, 0.9, 1.1)
    logits = noncontig(base, layout)
    w, ids, _ = _check_topp(logits, 0.5, 1, 0.9, 1.1)
    w2, ids2 = EMU.softmax_topp(base.contiguous(), 0.5, 1, 0.9, 1.1, 1e-5)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(w, w2, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ backward kernels

def _assert_grad(ours, name, args, bwd_args_hi):
    lo = getattr(ref, name)(*args)
    hi = getattr(ref, name)(*bwd_args_hi)
    assert ours.dtype == args[3].dtype and ours.shape == args[3].shape and ours.is_contiguous()
    assert_close_fa(ours, lo, hi, name=f"{name}")


def _route_grad_case(name, T, E, k, dtype, renorm_or_setting, drop=False):
    """(args of the backward op) from a reference forward on tie-free logits."""
    logits = tie_free_logits(T, E, dtype)
    g = torch.randn(T, k, dtype=torch.float64).float()
    if name == "softmax_route_backward":
        renormalized, scale = renorm_or_setting
        w, ids = ref.softmax_topk(logits, k, renormalized)
        if drop:
            ids = drop_ids(ids, 0.3)
        return [g, w, ids, logits, renormalized, scale]
    bias_kind, normalize, biw, scale = renorm_or_setting
    bias = _bias(E, bias_kind)
    w, ids = ref.sigmoid_topk(logits, k, bias, normalize, biw, scale)
    if drop:
        ids = drop_ids(ids, 0.3)
    return [g, w, ids, logits, bias, normalize, biw, scale]


def _run_grad(name, args):
    out = getattr(EMU, name)(*args)
    # ref_hi: the same routing (weights, ids) with float64 logits/grads
    hi = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    _assert_grad(out, name, args, hi)
    return out


BWD_SHAPES = [(1, 1, 3), (7, 3, 6), (60, 8, 4), (64, 16, 3), (257, 16, 2), (1024, 8, 1),
              (1100, 3, 2), (40, 40, 2)]
SOFTMAX_BWD = [(True, 1.0), (True, 1 / 0.7), (False, 1.0), (False, 0.5)]
SIGMOID_BWD = [(None, True, False, 1.0), ("f32", True, False, 2.5), ("pos", True, True, 4.0),
               ("pos", False, True, 0.5), ("f32", False, False, 1.0), ("pos", True, True, 0.0)]


@pytest.mark.parametrize("E,k,T", BWD_SHAPES, ids=[f"E{E}-k{k}-T{T}" for E, k, T in BWD_SHAPES])
@pytest.mark.parametrize("setting", SOFTMAX_BWD, ids=["renorm", "renorm-temp", "plain", "plain-s0.5"])
def test_softmax_route_backward_f32(E, k, T, setting):
    _run_grad("softmax_route_backward", _route_grad_case("softmax_route_backward", T, E, k,
                                                         torch.float32, setting))


@pytest.mark.parametrize("E,k,T", BWD_SHAPES, ids=[f"E{E}-k{k}-T{T}" for E, k, T in BWD_SHAPES])
@pytest.mark.parametrize("setting", SIGMOID_BWD,
                         ids=["plain", "deepseek", "smora", "nonorm-biw", "nonorm", "scale0"])
def test_sigmoid_topk_backward_f32(E, k, T, setting):
    _run_grad("sigmoid_topk_backward", _route_grad_case("sigmoid_topk_backward", T, E, k,
                                                        torch.float32, setting))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("E,k,T", [(7, 3, 6), (64, 8, 5), (1024, 8, 1)], ids=["E7", "E64", "E1024"])
def test_route_backward_low_precision(dtype, E, k, T):
    for setting in SOFTMAX_BWD[::2]:
        _run_grad("softmax_route_backward",
                  _route_grad_case("softmax_route_backward", T, E, k, dtype, setting))
    for setting in SIGMOID_BWD[1:3]:
        _run_grad("sigmoid_topk_backward",
                  _route_grad_case("sigmoid_topk_backward", T, E, k, dtype, setting))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_route_backward_dropped_ids(dtype):
    # ids of -1 (softmax_topp's padding, dropped pairs): no gradient, and not part of the sums
    for setting in SOFTMAX_BWD:
        _run_grad("softmax_route_backward",
                  _route_grad_case("softmax_route_backward", 9, 12, 5, dtype, setting, drop=True))
    for setting in SIGMOID_BWD:
        _run_grad("sigmoid_topk_backward",
                  _route_grad_case("sigmoid_topk_backward", 9, 12, 5, dtype, setting, drop=True))
    # softmax_topp's own output (-1 / 0 padded, width E)
    logits = topp_logits(6, 10, dtype, 0.5, 1.0, 1.1)
    w, ids = ref.softmax_topp(logits, 0.5, 1, 1.0, 1.1, 1e-5)
    assert (ids == -1).any()
    g = torch.randn(6, 10)
    _run_grad("softmax_route_backward", [g, w, ids, logits, False, 1.0])


def test_route_backward_duplicate_ids_and_int64():
    # duplicate ids in a row add up (scatter_add); int64 ids accepted
    T, E, k = 5, 9, 6
    logits = tie_free_logits(T, E)
    ids = torch.randint(0, 3, (T, k))  # many duplicates, int64
    g, w = torch.randn(T, k), torch.rand(T, k)
    for renorm in (True, False):
        args = [g, w, ids, logits, renorm, 0.8]
        out = EMU.softmax_route_backward(*args)
        torch.testing.assert_close(out, ref.softmax_route_backward(*args), atol=1e-6, rtol=1e-5)
    args = [g, w, ids, logits, _bias(E, "pos"), True, True, 2.0]
    torch.testing.assert_close(EMU.sigmoid_topk_backward(*args), ref.sigmoid_topk_backward(*args),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["transpose", "slice"])
def test_route_backward_noncontiguous(layout):
    T, E, k = 6, 64, 4
    for name, setting in (("softmax_route_backward", (False, 1.0)),
                          ("sigmoid_topk_backward", ("f32", True, False, 1.0))):
        args = _route_grad_case(name, T, E, k, torch.bfloat16, setting)
        base = args[3]
        args[3] = noncontig(base, layout)
        args[0] = noncontig(args[0], "transpose" if layout == "transpose" else "slice")
        out = _run_grad(name, args)
        args[3] = base.contiguous()
        assert torch.equal(out, getattr(EMU, name)(*args))


def test_route_backward_matches_autograd():
    # the kernels' gradient == autograd through the reference forward (fp64 logits reference)
    T, E, k = 7, 20, 4
    logits = tie_free_logits(T, E)
    g = torch.randn(T, k)
    for renorm in (True, False):
        l64 = logits.double().requires_grad_(True)
        w64, ids = ref.softmax_topk(l64, k, renorm)
        (dl,) = torch.autograd.grad(w64, l64, g.double())
        w, ids32 = ref.softmax_topk(logits, k, renorm)
        ours = EMU.softmax_route_backward(g, w, ids32, logits, renorm, 1.0)
        torch.testing.assert_close(ours.double(), dl, atol=2e-6, rtol=1e-5)
    bias = _bias(E, "pos")
    l64 = logits.double().requires_grad_(True)
    w64, ids = ref.sigmoid_topk(l64, k, bias.double(), True, True, 3.0)
    (dl,) = torch.autograd.grad(w64, l64, g.double())
    w, ids32 = ref.sigmoid_topk(logits, k, bias, True, True, 3.0)
    ours = EMU.sigmoid_topk_backward(g, w, ids32, logits, bias, True, True, 3.0)
    torch.testing.assert_close(ours.double(), dl, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["softmax_route_backward", "sigmoid_topk_backward"])
def test_route_backward_T0(name):
    args = _route_grad_case(name, 0, 6, 2, torch.float32,
                            (True, 1.0) if name == "softmax_route_backward" else (None, True, False, 1.0))
    out = getattr(EMU, name)(*args)
    assert out.shape == (0, 6) and out.dtype == torch.float32


# ------------------------------------------------------------------ errors

def _err_cases():
    lg = tie_free_logits(4, 6)
    w, ids = ref.softmax_topk(lg, 2)
    g = torch.randn(4, 2)
    bad_ids = ids.clone()
    bad_ids[1, 0] = 6
    neg_ids = ids.clone()
    neg_ids[0, 1] = -2
    return [
        ("softmax_topk", [lg.double(), 2, True], TypeError),
        ("topk_softmax", [lg.double(), 2, 1.0], TypeError),
        ("sigmoid_topk", [lg.double(), 2, None, True, False, 1.0], TypeError),
        ("softmax_topp", [lg.double(), 0.5, 1, 1.0, 1.1, 1e-5], TypeError),
        ("softmax_route_backward", [g, w, ids, lg.double(), True, 1.0], TypeError),
        ("sigmoid_topk_backward", [g, w, ids, lg.double(), None, True, False, 1.0], TypeError),
        ("softmax_topk", [lg.to(torch.int32), 2, True], TypeError),
        ("softmax_topk", [lg, 0, True], ValueError),
        ("softmax_topk", [lg, 7, True], ValueError),
        ("softmax_topk", [lg[0], 2, True], ValueError),
        ("topk_softmax", [lg, 2, 0.0], ValueError),
        ("sigmoid_topk", [lg, 2, torch.rand(5), True, False, 1.0], ValueError),
        ("sigmoid_topk", [lg, 2, torch.arange(6), True, False, 1.0], TypeError),
        ("softmax_topp", [lg, 0.0, 1, 1.0, 1.1, 1e-5], ValueError),
        ("softmax_topp", [lg, 1.5, 1, 1.0, 1.1, 1e-5], ValueError),
        ("softmax_topp", [lg, 0.5, 7, 1.0, 1.1, 1e-5], ValueError),
        ("softmax_topp", [lg, 0.5, 1, 1.0, 1.1, -1.0], ValueError),
        ("softmax_route_backward", [g, w, bad_ids, lg, True, 1.0], IndexError),
        ("softmax_route_backward", [g, w, neg_ids, lg, True, 1.0], IndexError),
        ("softmax_route_backward", [g, w, ids.float(), lg, True, 1.0], TypeError),
        ("softmax_route_backward", [g[:, :1], w, ids, lg, True, 1.0], ValueError),
        ("softmax_route_backward", [g, w, ids, lg[:3], True, 1.0], ValueError),
        ("sigmoid_topk_backward", [g, w, bad_ids, lg, None, True, False, 1.0], IndexError),
        ("sigmoid_topk_backward", [g, w, ids, lg, torch.rand(7), True, False, 1.0], ValueError),
        ("sigmoid_topk_backward", [g.int(), w, ids, lg, None, True, False, 1.0], TypeError),
    ]


@pytest.mark.parametrize("case", range(len(_err_cases())))
def test_router_errors(case):
    name, args, exc = _err_cases()[case]
    if args[3 if "backward" in name else 0].dtype == torch.float64:
        # fp64 logits never reach a kernel: the launcher hands them to the reference
        assert exc is TypeError
        assert_float64_runs_the_reference(lambda: getattr(EMU, name)(*args),
                                          lambda: getattr(ref, name)(*args))
        return
    err = raises_on_both_paths(lambda: getattr(EMU, name)(*args), exc, match=f"molora.{name}")
    # the same class and message as the CPU launcher (shared csrc/common/router_checks.h)
    if molora_ops.has_extension():
        with pytest.raises(exc) as cpu_info:
            getattr(torch.ops.molora, name)(*args)
        assert str(cpu_info.value) == str(err)


def test_sigmoid_topk_backward_accepts_dropped_ids():
    # the reference accepts -1 ids (no gradient); the CUDA kernel follows it
    lg = tie_free_logits(4, 6)
    w, ids = ref.sigmoid_topk(lg, 2)
    ids = ids.clone()
    ids[2, 1] = -1
    g = torch.randn(4, 2)
    out = EMU.sigmoid_topk_backward(g, w, ids, lg, None, True, False, 1.0)
    torch.testing.assert_close(out, ref.sigmoid_topk_backward(g, w, ids, lg, None, True, False, 1.0))
