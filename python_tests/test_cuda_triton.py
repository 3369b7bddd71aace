"""GPU tests of the Triton backend at model sizes (skipped without CUDA): bf16 / fp16 / fp32, up to
T=8192 and d=4096, forward and backward through torch.ops.molora with the backend switch on
"triton", against the reference ops run on the GPU in the same dtype and in float64 (the
flash-attention error rule), compared on the GPU (copying the ~1.3 G elements of these outputs and
gradients to the host cost more than the kernels). The small-shape edge cases of every op run in
test_cuda.py."""
import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import assert_close_fa, ragged_rank_offsets, uniform_rank_offsets

pytestmark = [pytest.mark.cuda, pytest.mark.triton,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
LAYERS = [  # T, d_in, d_out, E, k, ranks ("u16": uniform 16, "ragged": ragged up to 17)
    (8192, 4096, 4096, 8, 2, "u16"),
    (4096, 4096, 11008, 8, 2, "u16"),
    (1, 4096, 4096, 8, 2, "u16"),
    (37, 1000, 777, 7, 3, "ragged"),
    (2048, 4096, 4096, 64, 8, "u16"),
]


def _run(fn, inputs, dtype, grad_seed=0):
    """fn(*inputs) on copies cast to dtype (floats) with grads -> (out, grads)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t
              for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(grad_seed),
                    device="cuda", dtype=torch.float64).to(out.dtype)
    diff = [t for t in leaves if t.is_floating_point()]
    grads = torch.autograd.grad(out, diff, g)
    return out, grads


def _compare(ours_fn, ref_fn, inputs, dtype, name):
    ours, g_ours = _run(ours_fn, inputs, dtype)
    lo, g_lo = _run(ref_fn, inputs, dtype)
    hi, g_hi = _run(ref_fn, inputs, torch.float64)
    assert ours.device.type == "cuda"
    assert_close_fa(ours.float(), lo.float(), hi, name=f"{name} output")  # on the GPU
    for i, (a, l, h) in enumerate(zip(g_ours, g_lo, g_hi)):
        assert_close_fa(a.float(), l.float(), h, name=f"{name} grad {i}")


def _moe_lora(ops):
    def layer(x, A, B, base, logits, ro, E, k, max_rank, scales):
        w, ids = ops.softmax_topk(logits, k, True)
        order, pos, eo = ops.dispatch(ids, E, 1)
        h = ops.sgmv_shrink(x, A, ro, order, pos, eo, None, None, max_rank=max_rank)
        return ops.sgmv_expand(h, B, ro, order, pos, eo, w, scales, base)
    return layer


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("T,d_in,d_out,E,k,ranks", LAYERS)
def test_grouped_moe_lora_layer(T, d_in, d_out, E, k, ranks, dtype):
    dt = DTYPES[dtype]
    ro = (uniform_rank_offsets(E, 16) if ranks == "u16" else ragged_rank_offsets(E, 17)).cuda()
    R, max_rank = int(ro[-1]), int((ro[1:] - ro[:-1]).max())
    dev = dict(device="cuda")
    x, base = torch.randn(T, d_in, **dev), torch.randn(T, d_out, **dev)
    A, B = torch.randn(R, d_in, **dev) / d_in ** 0.5, torch.randn(d_out, R, **dev) / 4
    logits = torch.randn(T, E, **dev) * 3  # fixed routing: the router runs in fp32 either way
    scales = torch.rand(E, **dev) + 0.5
    args = (E, k, max_rank, scales)

    def ours(x, A, B, base):
        with molora_ops.use_backend("triton"):
            return _moe_lora(molora_ops)(x, A, B, base, logits, ro, *args)

    def oracle(x, A, B, base):
        return _moe_lora(ref)(x, A, B, base, logits, ro, *args)

    _compare(ours, oracle, (x, A, B, base), dt, f"moe-lora T={T} d={d_in}->{d_out} E={E} k={k}")


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("shared_a", [False, True], ids=["stacked", "shared_a"])
def test_stacked_gated_lora_model_size(dtype, shared_a):
    T, d, E, r = 8192, 4096, 9, 16
    dev = dict(device="cuda")
    ro = uniform_rank_offsets(E, r).cuda()
    x, base = torch.randn(T, d, **dev), torch.randn(T, d, **dev)
    A = torch.randn(r if shared_a else E * r, d, **dev) / d ** 0.5
    B = torch.randn(d, E * r, **dev) / 4
    gate = torch.softmax(torch.randn(T, E, **dev), -1)
    scales = torch.rand(E, **dev) + 0.5

    def ours(x, A, B, gate, base):
        with molora_ops.use_backend("triton"):
            return molora_ops.stacked_gated_lora(x, A, B, gate, ro, scales, base, shared_a)

    def oracle(x, A, B, gate, base):
        return ref.stacked_gated_lora(x, A, B, gate, ro, scales, base, shared_a)

    _compare(ours, oracle, (x, A, B, gate, base), DTYPES[dtype], "stacked_gated_lora")


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_rank_sparse_smora_size(dtype):
    T, d, R, k = 8192, 4096, 64, 8
    dev = dict(device="cuda")
    x, base = torch.randn(T, d, **dev), torch.randn(T, d, **dev)
    A, B = torch.randn(R, d, **dev) / d ** 0.5, torch.randn(d, R, **dev) / 4
    ids = torch.rand(T, R, **dev).argsort(-1)[:, :k].to(torch.int32)
    w = torch.rand(T, k, **dev) + 0.1

    def ours(x, A, B, w, base):
        with molora_ops.use_backend("triton"):
            h = molora_ops.rank_sparse_shrink(x, A, ids)
            return molora_ops.rank_sparse_expand(h, ids, B, w, 2.0, base)

    def oracle(x, A, B, w, base):
        return ref.rank_sparse_expand(ref.rank_sparse_shrink(x, A, ids), ids, B, w, 2.0, base)

    _compare(ours, oracle, (x, A, B, w, base), DTYPES[dtype], "rank_sparse (SMoRA size)")


def test_backends_agree_and_reference_is_selectable():
    T, d, E, k = 512, 256, 6, 2
    dev = dict(device="cuda")
    ro = ragged_rank_offsets(E, 9).cuda()
    R, max_rank = int(ro[-1]), int((ro[1:] - ro[:-1]).max())
    x, A = torch.randn(T, d, **dev), torch.randn(R, d, **dev)
    w, ids = molora_ops.softmax_topk(torch.randn(T, E, **dev), k)
    meta = (ro, *molora_ops.dispatch(ids, E))
    outs = {}
    for name in ("triton", "reference"):
        with molora_ops.use_backend(name):
            outs[name] = molora_ops.sgmv_shrink(x, A, *meta, w, None, max_rank=max_rank)
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-4)
    with molora_ops.use_backend("cuda"), pytest.raises(NotImplementedError):
        molora_ops.sgmv_shrink(x, A, *meta, w, None, max_rank=max_rank)


def test_bank_routed_formulations_agree():
    """LoRABank.routed on CUDA: the cost model picks the fused kernel for this small bank (R = 45,
    bf16/fp32 memory-bound), and every formulation (grouped, dense, fused) gives the same output
    and gradients."""
    from molora_ops.functional import pick_algo
    from molora_ops.modules import LoRABank
    bank = LoRABank(512, 384, [8, 16, 0, 5, 16], alpha=16.0, init="gaussian", device="cuda")
    x = torch.randn(300, 512, device="cuda")
    w, ids = molora_ops.softmax_topk(torch.randn(300, 5, device="cuda"), 2)
    base = torch.randn(300, 384, device="cuda")
    assert pick_algo(x, bank.A, bank.B, 5, 2, bank.max_rank, backward=False) == "fused"
    outs = {}
    for algo in ("grouped", "dense", "fused"):
        bank.zero_grad(set_to_none=True)
        y = bank.routed(x, w, ids, base, algo=algo)
        y.backward(torch.ones_like(y))
        outs[algo] = (y.detach(), bank.A.grad.clone(), bank.B.grad.clone())
    for algo in ("dense", "fused"):
        for got, want in zip(outs[algo], outs["grouped"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
