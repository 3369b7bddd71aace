"""Determinism: the same inputs twice give bitwise-equal outputs and gradients, on the C++ CPU
kernels, on the GPU path run on CPU tensors (the CUDA C++ kernels in emulation and the Triton
launchers in the interpreter) and on the reference, with the allocator handed back memory full of
garbage (NaN bit patterns) between the runs, so an output element that a kernel forgets to write,
or a read of uninitialised workspace, shows up as a difference."""

import pytest
import torch

import molora_ops as mo

from utils import backend_context, backends_present


_backends = backends_present


_ctx = backend_context


def _dirty_allocator():
    """Allocates and frees blocks of many sizes filled with 0xFF bytes (a NaN in every float
    dtype, -1 in every int dtype), so the next torch.empty calls get garbage rather than zeros."""
    keep = []
    for n in (64, 256, 1024, 4096, 16384, 65536, 1 << 18, 1 << 20):
        for _ in range(4):
            keep.append(torch.empty(n, dtype=torch.uint8).fill_(0xFF))
    del keep


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, d_in, d_out, E, k = 37, 19, 23, 5, 2
    ranks = torch.tensor([3, 0, 17, 5, 1])
    ro = torch.cat([torch.zeros(1, dtype=torch.int64), ranks.cumsum(0)]).int()
    R = int(ro[-1])
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(T=T, E=E, k=k, ro=ro, R=R, x=r(T, d_in), A=r(R, d_in), B=r(d_out, R),
                logits=r(T, E), gate=torch.rand(T, E, generator=g), base=r(T, d_out),
                gy=r(T, d_out), scales=torch.rand(E, generator=g) + 0.5)


def _run(inp):
    """Every family forward and backward; returns every output and gradient."""
    leaves = {n: inp[n].clone().requires_grad_() for n in ("x", "A", "B", "logits", "gate", "base")}
    x, A, B, lg, gate, base = (leaves[n] for n in ("x", "A", "B", "logits", "gate", "base"))
    E, k, ro = inp["E"], inp["k"], inp["ro"]
    max_rank = int((ro[1:] - ro[:-1]).max())
    w, ids = mo.softmax_topk(lg, k, True)
    order, pos, eo = mo.dispatch(ids, E, 4)
    h = mo.sgmv_shrink(x, A, ro, order, pos, eo, None, None, max_rank=max_rank)
    y1 = mo.sgmv_expand(h, B, ro, order, pos, eo, w, inp["scales"], base)
    xp = mo.gather_rows(x, order, pos, w)
    y2 = mo.combine_rows(xp, order, pos, w)
    y3 = mo.stacked_gated_lora(x, A, B, gate, ro, inp["scales"], None)
    hv, rid = mo.rank_topk(x @ A.t(), 3, None, None, True)
    y4 = mo.rank_sparse_expand(mo.rank_sparse_shrink(x, A, rid), rid, B, None, 0.5, None)
    sw, sids = mo.sigmoid_topk(lg, k, None, True, False, 1.0)
    tw, tids = mo.topk_softmax(lg, k, 0.7)
    pw, pids = mo.softmax_topp(lg, 0.6, 1, 0.9, 1.1, 1e-5)
    hist = mo.id_histogram(rid, inp["R"])
    loss = ((y1 + y3 + y4) * inp["gy"]).sum() + (y2 * x).sum() + (sw * sw).sum() + \
        (hv * hv).sum() + (tw * tw).sum() + (pw * pw).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [w, ids, order, pos, eo, h, y1, xp, y2, y3, hv, rid, y4, sw, sids, tw, tids, pw, pids,
            hist, *grads]


def _bits(t):
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.is_floating_point() else t


def _bitwise_equal(a, b):
    """Equal bit patterns (NaN payloads and the sign of zero included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("which", _backends())
def test_same_inputs_bitwise_equal(which, dtype):
    if which == "reference" and dtype == torch.float16:
        pytest.skip("the reference is the float oracle; f16 is covered on the kernels")
    inp = _inputs(dtype)
    with _ctx(which):
        first = _run(inp)
        _dirty_allocator()
        second = _run(inp)
    for i, (a, b) in enumerate(zip(first, second)):
        assert _bitwise_equal(a, b), f"{which}: result {i} differs between two identical runs"


@pytest.mark.parametrize("which", [b for b in _backends() if b != "reference"])
def test_independent_of_thread_count(which):
    """No result depends on the thread count (docs/OPS.md "Determinism"): the CPU kernels split
    work by token / row / chunk and never reduce across threads; the emulated CUDA kernels run a
    grid fixed by the shapes whatever the host threads."""
    inp = _inputs(torch.float32, seed=1)
    saved = torch.get_num_threads()
    try:
        with _ctx(which):
            torch.set_num_threads(1)
            one = _run(inp)
            _dirty_allocator()
            torch.set_num_threads(max(2, saved))
            many = _run(inp)
    finally:
        torch.set_num_threads(saved)
    for i, (a, b) in enumerate(zip(one, many)):
        assert _bitwise_equal(a, b), f"{which}: result {i} depends on the thread count"


@pytest.mark.needs_ext
def test_wide_expand_backward_and_routed_layer_independent_of_thread_count():
    """At widths where the CPU's one-pass expand backward splits the output gradient's columns
    into ranges (a part of u each, summed afterwards; d_out = 300 here), u, d w and the layer's
    gradients are still the same bits with 1 and 2 threads: the ranges follow d_out, not the
    threads."""
    g = torch.Generator().manual_seed(3)
    T, d_in, n, E, k, r = 96, 40, 300, 4, 2, 16
    x, A = torch.randn(T, d_in, generator=g), torch.randn(E * r, d_in, generator=g)
    B, W = torch.randn(n, E * r, generator=g), torch.randn(n, d_in, generator=g)
    Wr, gy = torch.randn(E, d_in, generator=g), torch.randn(T, n, generator=g)
    ro = torch.arange(E + 1, dtype=torch.int32) * r

    def run():
        w, ids = mo.softmax_topk(torch.randn(T, E, generator=torch.Generator().manual_seed(4)),
                                 k, True)
        order, pos, eo = mo.dispatch(ids, E, 1)
        h = torch.randn(T * k, r, generator=torch.Generator().manual_seed(5))
        outs = list(mo.sgmv_expand_backward(gy, h, B, ro, order, pos, eo, w, None))
        leaves = [t.clone().requires_grad_() for t in (x, Wr, A, B)]
        y = mo.routed_moe_lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], ro, k,
                                      weight=W, algo="grouped").y
        return outs + [y] + list(torch.autograd.grad(y, leaves, gy))

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        _dirty_allocator()
        torch.set_num_threads(max(2, saved))
        many = run()
    finally:
        torch.set_num_threads(saved)
    for i, (a, b) in enumerate(zip(one, many)):
        assert _bitwise_equal(a, b), f"result {i} depends on the thread count"
