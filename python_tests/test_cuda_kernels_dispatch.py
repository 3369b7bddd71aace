"""GPU tests of the dispatch family's CUDA kernels (csrc/cuda/dispatch.cu) at realistic sizes:
the CUDA C++ kernels of {dispatch, gather_rows, combine_rows, pair_dot} (gpu_compare.cuda_kernel)
against molora_ops.reference (float comparisons on the GPU; the dispatch reference loops over the
experts, so it and its int32 comparison run on the CPU), outputs poisoned (MOLORA_POISON_OUTPUTS=1: NaN / INT32_MIN, so an element a kernel forgets to write
cannot pass). Skipped without CUDA. The logic at small sizes (every edge, both vector paths,
errors) is covered on the CPU by test_cuda_emulated_dispatch.py; these check the real hardware
(many chunks over many SMs, shared-memory atomics, 16-byte vector accesses, CUDA-graph capture)."""
import os

# launch.h caches the variable at the first launch: set it before anything can call a kernel
os.environ.setdefault("MOLORA_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import molora_ops  # noqa: E402

from molora_ops import reference as ref  # noqa: E402
from gpu_compare import cuda_kernel  # noqa: E402
from utils import assert_close_fa  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f16", "bf16"]


_kernel = cuda_kernel


def _router_ids(T, E, k, gen, drop=0.0, hot=0.0):
    """[T, k] int32 on the GPU: k distinct experts per token from skewed random logits (some
    experts much more popular), optionally a hot expert and dropped (-1) slots. (torch.topk only
    makes input data here: any tie order gives valid ids.)"""
    popularity = torch.randn(E, generator=gen, device="cuda") * 2.0
    logits = torch.randn(T, E, generator=gen, device="cuda") + popularity
    ids = logits.topk(k, dim=1).indices.to(torch.int32)
    if hot > 0:
        ids[:, 0] = torch.where(torch.rand(T, generator=gen, device="cuda") < hot,
                                torch.full_like(ids[:, 0], E - 1), ids[:, 0])
    if drop > 0:
        ids[torch.rand(T, k, generator=gen, device="cuda") < drop] = -1
    return ids


def _check_dispatch(ids, E, bs):
    order, pos, eo = _kernel("dispatch")(ids, E, bs)
    torch.cuda.synchronize()
    r = ref.dispatch(ids.cpu(), E, bs)  # the reference loops over the experts: cheaper on the CPU
    for name, a, b in zip(("order", "pos", "expert_offsets"), (order, pos, eo), r):
        assert a.is_cuda and a.dtype == torch.int32 and a.shape == b.shape, name
        a = a.cpu()
        assert torch.equal(a, b), (name, (a != b).nonzero().flatten()[:10])
    return order, pos, eo


@pytest.mark.parametrize("bs", [1, 64])
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("E", [8, 64, 256, 4096])
def test_dispatch_realistic(E, k, bs):
    gen = torch.Generator(device="cuda").manual_seed(E * 10 + k)
    T = 16384
    k = min(k, E)
    _check_dispatch(_router_ids(T, E, k, gen), E, bs)
    _check_dispatch(_router_ids(T, E, k, gen, drop=0.3, hot=0.5), E, bs)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_dispatch_edges(index_dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    T, E, k = 16384, 64, 8
    ids = _router_ids(T, E, k, gen, drop=0.2).to(index_dtype)
    _check_dispatch(ids, E, 16)
    _check_dispatch(ids.t().contiguous().t(), E, 16)  # non-contiguous
    _check_dispatch(torch.full((T, k), 5, dtype=index_dtype, device="cuda"), E, 64)  # one expert
    _check_dispatch(torch.full((T, k), -1, dtype=index_dtype, device="cuda"), E, 64)  # all dropped
    _check_dispatch(ids[:1], E, 64)  # T = 1
    _check_dispatch(ids[:0], E, 64)  # T = 0
    # the most experts with shared-memory counters (47 KiB of them: 12032), and beyond (global-memory
    # counters)
    for E in (12032, 12033, 20000):
        _check_dispatch(torch.randint(-1, E, (4096, 4), device="cuda", dtype=index_dtype), E, 1)


def test_dispatch_cuda_graph_replay():
    """dispatch + gather_rows + combine_rows captured in a CUDA graph (no host sync inside: the
    value checks are skipped while capturing), replayed with new ids: right result each time."""
    dispatch, gather, combine = _kernel("dispatch"), _kernel("gather_rows"), _kernel("combine_rows")
    gen = torch.Generator(device="cuda").manual_seed(2)
    T, E, k, d, bs = 4096, 64, 4, 256, 16
    static_ids = _router_ids(T, E, k, gen)
    x = torch.randn(T, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, k, generator=gen, device="cuda")

    def step():
        order, pos, eo = dispatch(static_ids, E, bs)
        xp = gather(x, order, pos, None)
        y = combine(xp, order, pos, w)
        return order, pos, eo, y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for i in range(3):
        new_ids = _router_ids(T, E, k, gen, drop=0.1 * i, hot=0.3 * i)
        static_ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        r = ref.dispatch(new_ids.cpu(), E, bs)
        for a, b in zip(outs[:3], r):
            assert torch.equal(a.cpu(), b)
        order, pos = r[0].cuda(), r[1].cuda()
        lo = ref.combine_rows(ref.gather_rows(x, order, pos, None), order, pos, w)
        hi = ref.combine_rows(ref.gather_rows(x.double(), order, pos, None), order, pos, w.double())
        assert_close_fa(outs[3], lo, hi, name="graph combine")


def _routing(T, E, k, bs, gen, drop=0.2):
    ids = _router_ids(T, E, k, gen, drop=drop)
    order, pos, eo = _kernel("dispatch")(ids, E, bs)
    return ids, order, pos


@pytest.mark.parametrize("weighted", [False, True], ids=["now", "w"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_gather_combine_realistic(dtype, weighted):
    gen = torch.Generator(device="cuda").manual_seed(3)
    T, E, k, bs, d = 16384, 64, 2, 64, 4096
    ids, order, pos = _routing(T, E, k, bs, gen)
    w = torch.rand(T, k, generator=gen, device="cuda") + 0.25 if weighted else None
    x = torch.randn(T, d, generator=gen, device="cuda").to(dtype)
    xp = _kernel("gather_rows")(x, order, pos, w)
    torch.cuda.synchronize()
    assert torch.equal(xp, ref.gather_rows(x, order, pos, w))  # exact (copy / one fp32 product)
    del x
    y_perm = torch.randn(order.numel(), d, generator=gen, device="cuda").to(dtype)
    y = _kernel("combine_rows")(y_perm, order, pos, w)
    torch.cuda.synchronize()
    lo = ref.combine_rows(y_perm, order, pos, w)
    if w is None:
        assert torch.equal(y, lo)  # fp32 sum in slot order, as the reference
    else:
        hi = ref.combine_rows(y_perm.double(), order, pos, w.double())
        assert_close_fa(y, lo, hi, name="combine_rows")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_rows_k16_and_misaligned(dtype):
    gen = torch.Generator(device="cuda").manual_seed(4)
    T, E, k, bs = 2048, 64, 16, 16
    ids, order, pos = _routing(T, E, k, bs, gen)
    w = torch.rand(T, k, generator=gen, device="cuda") + 0.25
    for d, layout in ((1000, "offset"), (1001, "contig"), (1024, "transpose"), (1024, "wide")):
        base = torch.randn(order.numel(), d + 8, generator=gen, device="cuda").to(dtype)
        if layout == "offset":
            data = base[:, 1:d + 1]
        elif layout == "contig":
            data = base[:, :d].contiguous()
        elif layout == "wide":
            data = base[:, :d]
        else:
            data = base[:, :d].t().contiguous().t()
        x = data[:T]
        assert torch.equal(_kernel("gather_rows")(x, order, pos, w), ref.gather_rows(x, order, pos, w))
        lo = ref.combine_rows(data, order, pos, w)
        hi = ref.combine_rows(data.double(), order, pos, w.double())
        assert_close_fa(_kernel("combine_rows")(data, order, pos, w), lo, hi, name=f"combine {layout}")
        lo = ref.pair_dot(x, data, pos, True)
        hi = ref.pair_dot(x.double(), data.double(), pos, True)
        assert_close_fa(_kernel("pair_dot")(x, data, pos, True), lo, hi, name=f"pair_dot {layout}")


@pytest.mark.parametrize("a_by_token", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_pair_dot_realistic(dtype, a_by_token):
    gen = torch.Generator(device="cuda").manual_seed(5)
    T, E, k, bs, d = 16384, 64, 8, 1, 1024
    ids, order, pos = _routing(T, E, k, bs, gen)
    P = order.numel()
    a = torch.randn(T if a_by_token else P, d, generator=gen, device="cuda").to(dtype)
    b = torch.randn(P, d, generator=gen, device="cuda").to(dtype)
    out = _kernel("pair_dot")(a, b, pos, a_by_token)
    torch.cuda.synchronize()
    assert out.dtype == torch.float32 and (out[pos < 0] == 0).all()
    lo = ref.pair_dot(a, b, pos, a_by_token)
    hi = ref.pair_dot(a.double(), b.double(), pos, a_by_token)
    assert_close_fa(out, lo, hi, name="pair_dot")


def test_errors_cuda():
    gen = torch.Generator(device="cuda").manual_seed(6)
    ids, order, pos = _routing(64, 8, 2, 4, gen)
    x = torch.randn(64, 32, device="cuda")
    with pytest.raises(TypeError):
        _kernel("gather_rows")(x.int(), order, pos, None)  # not floating (fp64 runs the reference)
    # Ids out of range: a clear IndexError in the opt-in host mode. By default the kernel asserts
    # on the device, which ends the process's CUDA context (every later test here would fail).
    with molora_ops.use_value_checks("host"), pytest.raises(IndexError):
        _kernel("dispatch")(torch.full((4, 2), 9, dtype=torch.int32, device="cuda"), 8, 1)
    with pytest.raises(ValueError):  # mixed devices
        _kernel("combine_rows")(torch.randn(order.numel(), 32, device="cuda"), order.cpu(), pos, None)
