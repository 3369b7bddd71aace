"""GPU tests of the router family's CUDA kernels (csrc/cuda/router.cu) at realistic sizes:
the CUDA C++ kernels of {softmax_topk, topk_softmax, sigmoid_topk, softmax_topp,
softmax_route_backward, sigmoid_topk_backward} (gpu_compare.cuda_kernel) against
molora_ops.reference run on the GPU, outputs poisoned (MOLORA_POISON_OUTPUTS=1: NaN / INT32_MIN, so
an element a kernel forgets to write cannot pass), every comparison on the GPU. Ids are compared
with the stable reference (ties go to the lower id, the kernels' contract), never with torch.topk,
whose order among ties is unspecified; a failure says how many rows differ only in tie order.
Skipped without CUDA. The logic at small sizes (every mode, ties, E up to 1100, k > 32, -1
ids, errors) is covered on the CPU by test_cuda_emulated_router.py; these check the real hardware
(warp shuffles, vector loads, grid-stride over many SMs, T = 16384 and int64 offsets)."""
import math
import os

# launch.h caches the variable at the first launch: set it before anything can call a kernel
os.environ.setdefault("MOLORA_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from molora_ops import reference as ref  # noqa: E402
from gpu_compare import assert_topk_ids, cuda_kernel  # noqa: E402
from utils import assert_close_fa  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f16", "bf16"]
T_BIG = 16384
ES = [8, 60, 64, 256, 1024]
KS = [2, 8]


_kernel = cuda_kernel


def _logits(T, E, dtype, scale=2.0):
    g = torch.Generator(device="cuda").manual_seed(T * 7919 + E)
    return (torch.randn(T, E, device="cuda", dtype=torch.float64, generator=g) * scale).to(dtype)


def _hi(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _selection_key(name, args):
    """What the op selects its ids on (fp32), for the tie diagnosis of a failure."""
    lg = args[0].float()
    if name == "sigmoid_topk":
        bias = args[2]
        return torch.sigmoid(lg) + (bias.float() if bias is not None else 0.0)
    return lg


def _check(name, args, ids_vs_hi=False):
    w, ids = _kernel(name)(*args)
    torch.cuda.synchronize()
    w_lo, ids_lo = getattr(ref, name)(*args)
    w_hi, ids_hi = getattr(ref, name)(*_hi(args))
    assert w.is_cuda and ids.is_cuda and w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == w_lo.shape and ids.shape == ids_lo.shape
    assert_topk_ids(ids, ids_lo, _selection_key(name, args), name=f"{name} ids")
    if ids_vs_hi:
        # the fp64 reference routes identically (true for selection on the logits: exact compares)
        assert torch.equal(ids_lo, ids_hi)
    assert_close_fa(w, w_lo, w_hi, name=f"{name} weights")
    return w, ids


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("E", ES)
@pytest.mark.parametrize("k", KS)
def test_softmax_topk_gpu(dtype, E, k):
    lg = _logits(T_BIG, E, dtype)
    _check("softmax_topk", [lg, k, True], ids_vs_hi=True)
    _check("softmax_topk", [lg, k, False], ids_vs_hi=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("E", ES)
@pytest.mark.parametrize("k", KS)
def test_topk_softmax_gpu(dtype, E, k):
    lg = _logits(T_BIG, E, dtype)
    _check("topk_softmax", [lg, k, 0.7], ids_vs_hi=True)


def _separated_sigmoid_logits(T, E, k, dtype, bias, margin=1e-5):
    """Logits whose top k+1 keys sigmoid(l) + bias are > margin apart (fp32 sigmoid rounding on the
    GPU may differ from torch's by an ulp; exact ties would still be fine, near ties are not)."""
    lg = _logits(T, E, dtype)
    for _ in range(100):
        key = torch.sigmoid(lg.double()) + bias.double()
        s = key.sort(-1, descending=True).values
        n = min(k, E - 1)  # k = E: only the order of all E matters
        bad = ((s[:, :n] - s[:, 1:n + 1]) <= margin).any(-1)
        if not bad.any():
            return lg
        lg[bad] = _logits(int(bad.sum()), E, dtype, scale=2.0 + torch.rand(1).item())
    raise RuntimeError("could not build separated inputs")


SIGMOID = [("plain", None, True, False, 1.0), ("deepseek", "bias", True, False, 2.5),
           ("smora", "bias", True, True, 8.0), ("nonorm-biw", "bias", False, True, 0.5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("E", ES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("setting", SIGMOID, ids=[s[0] for s in SIGMOID])
def test_sigmoid_topk_gpu(dtype, E, k, setting):
    _, bias_kind, normalize, biw, scale = setting
    if bias_kind is None:
        lg, bias = _logits(T_BIG, E, dtype), None
        _check("sigmoid_topk", [lg, k, bias, normalize, biw, scale], ids_vs_hi=True)
    else:
        bias = torch.rand(E, device="cuda") * 0.3
        lg = _separated_sigmoid_logits(T_BIG, E, k, dtype, bias)
        _check("sigmoid_topk", [lg, k, bias, normalize, biw, scale])


def _topp_logits(T, E, dtype, top_p, thr, q, eps=1e-5):
    """Half flat rows (high entropy), half peaked ones, resampled away from the cumsum / threshold
    edges (the kernel's cumsum accumulates in double, the GPU reference's in fp32)."""
    g = torch.Generator(device="cuda").manual_seed(E)

    def make(n):
        v = torch.randn(n, E, device="cuda", dtype=torch.float64, generator=g)
        flat = torch.rand(n, 1, device="cuda", generator=g) < 0.5
        f = torch.where(flat, 0.05 + 0.2 * torch.rand(n, 1, device="cuda", generator=g),
                        0.6 + 2.0 * torch.rand(n, 1, device="cuda", generator=g))
        return v * f

    def ok(l):
        p = torch.softmax(l, -1)
        ps = p.sort(-1, descending=True).values
        good = ((ps.cumsum(-1) - top_p).abs() > 1e-4).all(-1)
        if q > 0 and thr < 1:
            pe = p + eps
            if q == 1.0:
                H = -(pe * pe.log()).sum(-1) / math.log(E)
            else:
                H = (1 - (pe ** q).sum(-1)) / (q - 1) / ((1 - E ** (1 - q)) / (q - 1))
            good &= (H - thr).abs() > 1e-3
        return good

    x = make(T)
    for _ in range(200):
        good = ok(x.to(dtype).double())
        if good.all():
            return x.to(dtype)
        bad = (~good).nonzero().flatten()
        x[bad] = make(bad.numel())
    raise RuntimeError("could not build top-p inputs")


TOPP = [("p0.5", 0.5, 1, 1.0, 1.1), ("p0.8-mink2", 0.8, 2, 1.0, 1.1),
        ("entropy-tsallis", 0.5, 1, 0.85, 1.1), ("entropy-shannon", 0.6, 1, 0.85, 1.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("E", ES)
@pytest.mark.parametrize("setting", TOPP, ids=[s[0] for s in TOPP])
def test_softmax_topp_gpu(dtype, E, setting):
    # half the rows flat: with the entropy gate they broadcast (the bitonic-sort path)
    _, top_p, min_k, thr, q = setting
    lg = _topp_logits(T_BIG, E, dtype, top_p, thr, q)
    w, ids = _check("softmax_topp", [lg, top_p, min_k, thr, q, 1e-5])
    kept = ids >= 0
    n = kept.sum(-1)
    assert torch.equal(kept, torch.arange(E, device="cuda")[None, :] < n[:, None])
    assert (w[~kept] == 0).all() and (n >= min_k).all()


def test_softmax_topp_gpu_large_E_fallback():
    # E > 1024: no register cache, broadcast rows by selection rounds
    lg = _topp_logits(64, 1500, torch.bfloat16, 0.5, 0.85, 1.1)
    _check("softmax_topp", [lg, 0.5, 1, 0.85, 1.1, 1e-5])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("E", ES)
@pytest.mark.parametrize("k", KS)
def test_route_backward_gpu(dtype, E, k):
    lg = _logits(T_BIG, E, dtype)
    g = torch.randn(T_BIG, k, device="cuda")
    for renorm in (True, False):
        w, ids = ref.softmax_topk(lg, k, renorm)
        args = [g, w, ids, lg, renorm, 1.0 if renorm else 0.5]
        out = _kernel("softmax_route_backward")(*args)
        assert out.dtype == dtype and out.is_contiguous()
        assert_close_fa(out, ref.softmax_route_backward(*args),
                        ref.softmax_route_backward(*_hi(args)), name="softmax_route_backward")
    bias = torch.rand(E, device="cuda") * 0.3
    for normalize, biw, scale in ((True, True, 4.0), (True, False, 2.5), (False, True, 0.5)):
        w, ids = ref.sigmoid_topk(lg, k, bias, normalize, biw, scale)
        args = [g, w, ids, lg, bias, normalize, biw, scale]
        out = _kernel("sigmoid_topk_backward")(*args)
        assert out.dtype == dtype
        assert_close_fa(out, ref.sigmoid_topk_backward(*args),
                        ref.sigmoid_topk_backward(*_hi(args)), name="sigmoid_topk_backward")


def test_route_backward_gpu_dropped_ids():
    lg = _topp_logits(T_BIG, 60, torch.bfloat16, 0.6, 1.0, 1.1)
    w, ids = ref.softmax_topp(lg, 0.6)
    g = torch.randn_like(w)
    args = [g, w, ids, lg, False, 1.0]
    assert_close_fa(_kernel("softmax_route_backward")(*args), ref.softmax_route_backward(*args),
                    ref.softmax_route_backward(*_hi(args)), name="softmax_route_backward topp")


def test_router_gpu_noncontiguous():
    base = _logits(T_BIG, 64, torch.bfloat16)
    for lg in (base.t().contiguous().t(), torch.cat([base, base[:, :8]], 1)[:, 1:65]):
        assert not lg.is_contiguous()
        _check("softmax_topk", [lg, 8, False], ids_vs_hi=True)
        _check("topk_softmax", [lg, 8, 1.3], ids_vs_hi=True)


def test_router_gpu_large_E_fallback():
    # E > 1024: the kernels without the register cache
    lg = _logits(1024, 2048, torch.bfloat16)
    _check("softmax_topk", [lg, 8, False], ids_vs_hi=True)
    _check("topk_softmax", [lg, 16, 1.0], ids_vs_hi=True)
    g = torch.randn(1024, 8, device="cuda")
    w, ids = ref.softmax_topk(lg, 8, False)
    args = [g, w, ids, lg, False, 1.0]
    assert_close_fa(_kernel("softmax_route_backward")(*args), ref.softmax_route_backward(*args),
                    ref.softmax_route_backward(*_hi(args)), name="softmax_route_backward E2048")


def test_router_gpu_int64_offsets():
    # T * E > 2^31 elements: row offsets need int64 (checked on slices at both ends)
    E = 1024
    T = (1 << 31) // E + 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * (1 << 30):
        pytest.skip("needs ~12 GiB of free GPU memory")
    lg = torch.empty(T, E, device="cuda", dtype=torch.bfloat16).normal_()
    w, ids = _kernel("softmax_topk")(lg, 2, True)
    torch.cuda.synchronize()
    for sl in (slice(0, 512), slice(T - 4096, T)):
        w_ref, ids_ref = ref.softmax_topk(lg[sl], 2, True)
        assert_topk_ids(ids[sl], ids_ref, lg[sl].float(), name="softmax_topk ids (int64 offsets)")
        torch.testing.assert_close(w[sl], w_ref, atol=1e-6, rtol=1e-5)
    del lg, w, ids
    torch.cuda.empty_cache()


def test_router_gpu_graph_capture():
    # no host synchronisation: the forward and the backward (its ids range check is skipped while
    # capturing) can be captured in a CUDA graph and replayed
    lg = _logits(4096, 64, torch.bfloat16)
    g = torch.randn(4096, 8, device="cuda")
    fwd, bwd = _kernel("softmax_topk"), _kernel("softmax_route_backward")
    w0, ids0 = fwd(lg, 8, True)
    bwd(g, w0, ids0, lg, True, 1.0)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph):
            w, ids = fwd(lg, 8, True)
            dl = bwd(g, w, ids, lg, True, 1.0)
    torch.cuda.current_stream().wait_stream(s)
    lg.copy_(_logits(4096, 64, torch.bfloat16, scale=3.0))
    graph.replay()
    torch.cuda.synchronize()
    w_ref, ids_ref = ref.softmax_topk(lg, 8, True)
    assert_topk_ids(ids, ids_ref, lg.float(), name="softmax_topk ids (graph replay)")
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dl.float(), ref.softmax_route_backward(g, w_ref, ids_ref, lg, True, 1.0).float(),
                               atol=2e-2, rtol=2e-2)
