"""torch.compile(fullgraph=True): forward + backward of every differentiable forward op matches
eager (backends aot_eager and inductor, two input sizes so the second call recompiles with dynamic shapes), the
forward of dispatch / id_histogram, and one end-to-end MoE-LoRA forward+backward with the default
inductor backend."""
import math

import pytest
import torch
import torch._dynamo

import molora_ops
from molora_ops import reference as ref
from utils import (distinct_ids, drop_ids, make_ids, max_rank_of, ragged_rank_offsets,
                   rank_offsets_from_ranks, tie_free_logits, uniform_rank_offsets)

pytestmark = pytest.mark.needs_ext

# Measured on the 2-core dev box with a cold inductor cache: all per-op inductor compiles together
# take ~30 s, so every op is checked with both aot_eager and the default inductor backend.
BACKENDS = ["aot_eager", "inductor"]


@pytest.fixture(autouse=True)
def _reset_dynamo(dynamo_reset):
    yield


def _tolerances(t):
    return dict(rtol=1e-5, atol=1e-6) if t.dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)


def check_compiled(fn, inputs, backend="aot_eager"):
    """fn(*inputs) -> tensor or tuple. Inputs that require grad are differentiated."""
    compiled = torch.compile(fn, backend=backend, fullgraph=True)

    def run(f):
        ins = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
               for t in inputs]
        out = f(*ins)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return ins, outs

    e_in, e_out = run(fn)
    c_in, c_out = run(compiled)
    assert len(e_out) == len(c_out)
    for e, c in zip(e_out, c_out):
        assert e.shape == c.shape and e.dtype == c.dtype
        if e.is_floating_point():
            torch.testing.assert_close(c, e, **_tolerances(e))
        else:
            assert torch.equal(c, e)
    leaves_e = [t for t in e_in if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves_c = [t for t in c_in if isinstance(t, torch.Tensor) and t.requires_grad]
    if leaves_e:
        float_idx = [i for i, e in enumerate(e_out) if e.is_floating_point() and e.requires_grad]
        assert float_idx
        gs = [torch.randn_like(e_out[i]) for i in float_idx]
        ge = torch.autograd.grad([e_out[i] for i in float_idx], leaves_e, gs, allow_unused=True)
        gc = torch.autograd.grad([c_out[i] for i in float_idx], leaves_c, gs, allow_unused=True)
        for a, b, l in zip(gc, ge, leaves_e):
            a = torch.zeros_like(l) if a is None else a
            b = torch.zeros_like(l) if b is None else b
            torch.testing.assert_close(a, b, **_tolerances(b))
    return c_out


def rg(t):
    return t.detach().requires_grad_(True)


def _case(name, T, dtype=torch.float32):
    """(fn, inputs) for one op at token count T (ragged / dropped-id flavoured)."""
    E, k, d = 5, 2, 8
    if name == "softmax_topk":
        return (lambda l: molora_ops.softmax_topk(l, k, True)), [rg(tie_free_logits(T, E, dtype))]
    if name == "topk_softmax":
        return (lambda l: molora_ops.topk_softmax(l, k, 0.7)), [rg(tie_free_logits(T, E, dtype))]
    if name == "sigmoid_topk":
        bias = torch.rand(E) * 0.1
        return (lambda l, b: molora_ops.sigmoid_topk(l, k, b, True, True, 2.0)), \
            [rg(tie_free_logits(T, E, dtype)), bias]
    if name == "softmax_topp":
        return (lambda l: molora_ops.softmax_topp(l, 0.55, 1, 0.9, 1.1, 1e-5)), \
            [rg(tie_free_logits(T, E, dtype, row_scale=(0.2, 2.0)))]
    ids = drop_ids(distinct_ids(T, E, k), 0.3)
    order, pos, eo = ref.dispatch(ids, E, 2)
    w = rg(torch.rand(T, k) + 0.25)
    ro = rank_offsets_from_ranks([3, 0, 2, 4, 1])
    R, mr = int(ro[-1]), max_rank_of(ro)
    s = torch.rand(E) + 0.5
    x = rg(torch.randn(T, d, dtype=torch.float64).to(dtype))
    if name == "gather_rows":
        return (lambda x_, o, p, w_: molora_ops.gather_rows(x_, o, p, w_)), [x, order, pos, w]
    if name == "combine_rows":
        yp = rg(torch.randn(order.numel(), d).to(dtype))
        return (lambda y_, o, p, w_: molora_ops.combine_rows(y_, o, p, w_)), [yp, order, pos, w]
    if name == "sgmv_shrink":
        A = rg(torch.randn(R, d).to(dtype))
        return (lambda x_, A_, r_, o, p, e, w_, s_: molora_ops.sgmv_shrink(x_, A_, r_, o, p, e, w_, s_, max_rank=mr)), \
            [x, A, ro, order, pos, eo, w, s]
    if name == "sgmv_expand":
        h = rg(torch.randn(order.numel(), mr).to(dtype))
        B = rg(torch.randn(d, R).to(dtype))
        base = rg(torch.randn(T, d).to(dtype))
        return (lambda h_, B_, r_, o, p, e, w_, s_, b_: molora_ops.sgmv_expand(h_, B_, r_, o, p, e, w_, s_, b_)), \
            [h, B, ro, order, pos, eo, w, s, base]
    if name == "stacked_gated_lora":
        A = rg(torch.randn(R, d).to(dtype))
        B = rg(torch.randn(d, R).to(dtype))
        gate = rg(torch.randn(T, E))
        base = rg(torch.randn(T, d).to(dtype))
        return (lambda x_, A_, B_, g_, r_, s_, b_: molora_ops.stacked_gated_lora(x_, A_, B_, g_, r_, s_, b_, False)), \
            [x, A, B, gate, ro, s, base]
    if name == "fused_moe_lora":
        A = rg(torch.randn(R, d).to(dtype))
        B = rg(torch.randn(d, R).to(dtype))
        base = rg(torch.randn(T, d).to(dtype))
        return (lambda x_, A_, B_, r_, w_, i_, s_, b_: molora_ops.fused_moe_lora(
            x_, A_, B_, r_, w_, i_, s_, b_)), [x, A, B, ro, w, ids, s, base]
    if name == "stacked_gated_lora_shared":
        ro_s = uniform_rank_offsets(E, 3)
        A = rg(torch.randn(3, d).to(dtype))
        B = rg(torch.randn(d, 3 * E).to(dtype))
        gate = rg(torch.randn(T, E))
        return (lambda x_, A_, B_, g_, r_: molora_ops.stacked_gated_lora(x_, A_, B_, g_, r_, None, None, True)), \
            [x, A, B, gate, ro_s]
    Rk = 9
    rids = drop_ids(distinct_ids(T, Rk, 3), 0.3)
    if name == "rank_topk":
        return (lambda h_, sc, b_: molora_ops.rank_topk(h_, 3, sc, b_, False)), \
            [rg(torch.randn(T, Rk).to(dtype)), tie_free_logits(T, Rk), torch.rand(Rk) * 0.01]
    if name == "rank_sparse_shrink":
        return (lambda x_, A_, i_: molora_ops.rank_sparse_shrink(x_, A_, i_)), \
            [x, rg(torch.randn(Rk, d).to(dtype)), rids]
    if name == "rank_sparse_expand":
        return (lambda v_, i_, B_, w_, b_: molora_ops.rank_sparse_expand(v_, i_, B_, w_, 1.5, b_)), \
            [rg(torch.randn(T, 3).to(dtype)), rids, rg(torch.randn(d, Rk).to(dtype)), rg(torch.rand(T, 3)),
             rg(torch.randn(T, d).to(dtype))]
    if name == "dispatch":
        return (lambda i_: molora_ops.dispatch(i_, E, 4)), [ids]
    if name == "id_histogram":
        return (lambda i_: molora_ops.id_histogram(i_, E)), [ids]
    raise KeyError(name)


COMPILE_OPS = ["softmax_topk", "topk_softmax", "sigmoid_topk", "softmax_topp", "gather_rows", "combine_rows",
               "sgmv_shrink", "sgmv_expand", "stacked_gated_lora", "stacked_gated_lora_shared",
               "fused_moe_lora", "rank_topk",
               "rank_sparse_shrink", "rank_sparse_expand", "dispatch", "id_histogram"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", COMPILE_OPS)
def test_compile_matches_eager(name, backend):
    # second size: dynamo recompiles with dynamic shapes (exercises the fake impls with SymInts)
    for T in (7, 12):
        fn, inputs = _case(name, T)
        check_compiled(fn, inputs, backend)


@pytest.mark.parametrize("name", ["sgmv_shrink", "sgmv_expand", "stacked_gated_lora", "softmax_topk"])
def test_compile_bf16(name):
    fn, inputs = _case(name, 9, torch.bfloat16)
    check_compiled(fn, inputs, "aot_eager")


def moe_lora_layer(logits, x, A, B, base, ro, scales, k, E, mr):
    w, ids = molora_ops.softmax_topk(logits, k, True)
    order, pos, eo = molora_ops.dispatch(ids, E, 4)
    h = molora_ops.sgmv_shrink(x, A, ro, order, pos, eo, None, scales, max_rank=mr)
    return molora_ops.sgmv_expand(h, B, ro, order, pos, eo, w, None, base)


@pytest.mark.slow
def test_compile_inductor_moe_lora_end_to_end():
    T, E, k, d_in, d_out = 16, 6, 2, 16, 12
    ro = ragged_rank_offsets(E, 4)
    R, mr = int(ro[-1]), max_rank_of(ro)
    scales = torch.rand(E) + 0.5
    inputs = [rg(tie_free_logits(T, E)), rg(torch.randn(T, d_in)), rg(torch.randn(R, d_in) / math.sqrt(d_in)),
              rg(torch.randn(d_out, R)), rg(torch.randn(T, d_out))]
    fn = lambda l, x, A, B, b: moe_lora_layer(l, x, A, B, b, ro, scales, k, E, mr)
    c_out = check_compiled(fn, inputs, backend="inductor")
    # and it equals the reference pipeline
    x, A, B, base = (t.detach() for t in inputs[1:])
    w, ids = ref.softmax_topk(inputs[0].detach(), k, True)
    order, pos, eo = ref.dispatch(ids, E, 4)
    h = ref.sgmv_shrink(x, A, ro, order, pos, eo, None, scales, max_rank=mr)
    y = ref.sgmv_expand(h, B, ro, order, pos, eo, w, None, base)
    torch.testing.assert_close(c_out[0].detach(), y, rtol=1e-5, atol=1e-5)
