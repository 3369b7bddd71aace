"""GPU tests of the masked family's CUDA kernels (csrc/cuda/masked.cu) at realistic sizes:
the CUDA C++ kernels of {rank_topk, id_histogram, rank_scatter} (gpu_compare.cuda_kernel) against
molora_ops.reference on the GPU (compared there; rank_topk's ids against the stable reference:
ties go to the lower rank, and a failure says which rows differ only in tie order), outputs
poisoned (MOLORA_POISON_OUTPUTS=1: NaN / INT32_MIN, so an element a kernel forgets to write cannot
pass). Skipped without CUDA. The logic at small sizes (ties, NaN, every mode, errors)
is covered on the CPU by test_cuda_emulated_masked.py; these check the real hardware (warp
shuffles, grid-stride over many SMs, shared-memory atomics, large T)."""
import os

# launch.h caches the variable at the first launch: set it before anything can call a kernel
os.environ.setdefault("MOLORA_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import molora_ops  # noqa: E402

from molora_ops import reference as ref  # noqa: E402
from gpu_compare import assert_topk_ids, cuda_kernel  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f16", "bf16"]


_kernel = cuda_kernel


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _check_topk(h, k, scores, bias, use_abs):
    vals, ids = _kernel("rank_topk")(h, k, scores, bias, use_abs)
    torch.cuda.synchronize()
    v_ref, i_ref = ref.rank_topk(h, k, scores, bias, use_abs)
    assert vals.is_cuda and ids.is_cuda and ids.dtype == torch.int32 and vals.dtype == h.dtype
    key = (h if scores is None else scores).float()  # the reference's key (tie diagnosis)
    if bias is not None:
        key = key + bias.float()
    assert_topk_ids(ids, i_ref, key.abs() if use_abs else key, name="rank_topk ids")
    assert torch.equal(_bits(vals), _bits(v_ref))
    return vals, ids


# SMoRA (r=64, k=8, sigmoid router scores + balancing bias), FlyLoRA (r=32, k=8, key = h + d,
# |.| variant), ranks not a multiple of 32, the largest register path, the global-memory path
CASES = [
    ("smora", 64, 8, "scores", True, False),
    ("flylora", 32, 8, None, True, False),
    ("flylora-abs", 32, 8, None, True, True),
    ("r100-k16", 100, 16, None, True, False),
    ("r1024-k8", 1024, 8, None, True, True),
    ("r7-k7", 7, 7, None, False, False),
    ("r2048-k8", 2048, 8, None, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rank_topk_realistic(dtype, case):
    _, r, k, sk, use_bias, use_abs = case
    T = 16384 if r <= 1024 else 2048
    h = torch.randn(T, r, device="cuda").to(dtype)
    scores = torch.rand(T, r, device="cuda") if sk == "scores" else None
    bias = torch.randn(r, device="cuda") * 0.3 if use_bias else None
    _check_topk(h, k, scores, bias, use_abs)


def test_rank_topk_many_tokens_and_ties():
    # 2M tokens (far more rows than warps in the grid: the grid-stride), bf16 with ties everywhere
    T, r, k = 1 << 21, 64, 8
    h = torch.randint(-4, 5, (T, r), device="cuda").to(torch.bfloat16)
    _check_topk(h, k, None, None, False)
    h2 = torch.randn(T // 8, r, device="cuda", dtype=torch.bfloat16)
    _check_topk(h2, k, h2, torch.randn(r, device="cuda"), True)


def test_rank_topk_noncontiguous_and_k_eq_r():
    T, r = 4096, 64
    buf = torch.randn(r, T, device="cuda", dtype=torch.float16)
    _check_topk(buf.t(), 8, None, None, False)  # column stride T
    wide = torch.randn(T, 2 * r, device="cuda")
    _check_topk(wide[:, ::2], 8, wide[:, 1::2], None, True)
    _check_topk(torch.randn(512, r, device="cuda"), r, None, None, False)
    _check_topk(torch.randn(1, r, device="cuda"), 8, None, None, False)
    _check_topk(torch.randn(0, r, device="cuda"), 8, None, None, False)


def test_rank_topk_errors_cuda():
    op = _kernel("rank_topk")
    h = torch.randn(8, 16, device="cuda")
    with pytest.raises(TypeError):
        op(h.int(), 2, None, None, False)  # not floating (fp64 runs the reference)
    with pytest.raises(ValueError):
        op(h, 2, torch.rand(8, 16), None, False)  # mixed devices
    with pytest.raises(ValueError):
        op(h, 17, None, None, False)


@pytest.mark.parametrize("r,k", [(64, 8), (32, 8), (1024, 8), (20000, 4)], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_id_histogram_rank_usage(r, k, index_dtype):
    T = 1 << 20 if r <= 1024 else 4096
    if r <= 1024:
        _, ids = _kernel("rank_topk")(torch.randn(T, r, device="cuda", dtype=torch.bfloat16), k,
                                      None, torch.randn(r, device="cuda"), False)
    else:
        ids = torch.randint(0, r, (T, k), device="cuda", dtype=torch.int32)
    ids = ids.to(index_dtype)
    ids[torch.rand(T, k, device="cuda") < 0.1] = -1
    got = _kernel("id_histogram")(ids, r)
    assert torch.equal(got, ref.id_histogram(ids, r))
    hot = torch.full((T, k), r - 1, device="cuda", dtype=index_dtype)  # one contended counter
    assert torch.equal(_kernel("id_histogram")(hot, r), ref.id_histogram(hot, r))
    # out of range: IndexError in the opt-in host mode (by default a device-side assert, which
    # ends the process's CUDA context)
    with molora_ops.use_value_checks("host"), pytest.raises(IndexError):
        _kernel("id_histogram")(ids.clamp(min=0) + r, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("r,k", [(64, 8), (32, 8), (1024, 8), (100, 40)], ids=str)
def test_rank_scatter_realistic(dtype, r, k):
    T = 16384
    _, ids = _kernel("rank_topk")(torch.randn(T, r, device="cuda"), k, None, None, False)
    ids[torch.rand(T, k, device="cuda") < 0.2] = -1
    src = torch.randn(T, k, device="cuda").to(dtype)
    out = _kernel("rank_scatter")(src, ids, r)
    assert torch.equal(_bits(out), _bits(ref.rank_scatter(src, ids, r)))  # distinct ids: exact
    dup = torch.randint(-1, r, (T, k), device="cuda")
    out = _kernel("rank_scatter")(src, dup, r)
    torch.testing.assert_close(out.float(), ref.rank_scatter(src, dup, r).float(),
                               rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_rank_topk_backward_through_public_op():
    # the public op's autograd (rank_scatter) on CUDA, whichever backend serves it
    import molora_ops
    h = torch.randn(4096, 64, device="cuda", requires_grad=True)
    vals, ids = molora_ops.rank_topk(h, 8, None, torch.randn(64, device="cuda"), False)
    g = torch.randn_like(vals)
    (gh,) = torch.autograd.grad(vals, h, g)
    assert torch.equal(gh, ref.rank_scatter(g, ids, 64))
