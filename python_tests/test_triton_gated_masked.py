"""Triton launchers of the dense stacked gated LoRA op (``molora_ops.triton.gated``) and of the
rank-masked ops (``molora_ops.triton.masked``) against the reference ops, forward and backward ops,
on small ragged shapes. Without a GPU they run in Triton's interpreter on CPU tensors (conftest
sets TRITON_INTERPRET=1 first); fp32 and fp16 (the interpreter cannot run bf16 dots). Every float
output follows the flash-attention rule against a float64 reference run."""
import pytest
import torch

pytest.importorskip("triton")

from molora_ops import reference as ref  # noqa: E402
from utils import (DTYPE_IDS, assert_close_fa, compare_with_reference, distinct_ids,  # noqa: E402
                   drop_ids, noncontig, ragged_rank_offsets, randn, rank_offsets_from_ranks,
                   uniform_rank_offsets)

gated = pytest.importorskip("molora_ops.triton.gated")
masked = pytest.importorskip("molora_ops.triton.masked")

pytestmark = [
    pytest.mark.triton,
    # emitted by triton's interpreter for runtime-bounded loops (numpy 1.25+), not by the kernels
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

DTYPES = [torch.float32, torch.float16]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _other_float(dtype):
    """A float dtype other than ``dtype`` (gate / weights of a different dtype than the data)."""
    return torch.float16 if dtype == torch.float32 else torch.float32


def _maybe_nc(t, nc, kind="slice"):
    return noncontig(t, kind) if nc and t is not None else t


def _compare(name, ours, args):
    """Launcher ``ours`` vs ``reference.<name>`` on ``args`` (on DEVICE; reference on CPU)."""
    compare_with_reference(name, args, ours_fn=ours, ref_fn=getattr(ref, name), device=DEVICE)


# --------------------------------------------------------------------------------------------
# stacked_gated_lora and its backward
# --------------------------------------------------------------------------------------------

# id: (T, d_in, d_out, E, ranks, shared_a, scales, base, gate of another dtype, non-contiguous)
# ranks: "ragged" = ragged_rank_offsets(E, 17) (a rank-0 and a rank-17 expert), an int = uniform,
# a list = explicit per-expert ranks.
GATED_CASES = {
    "ragged-E7": (37, 50, 37, 7, "ragged", False, True, True, False, False),
    "ragged-E7-plain-gate-dtype": (21, 37, 50, 7, "ragged", False, False, False, True, False),
    "E1-T1": (1, 37, 50, 1, 17, False, True, True, False, False),
    "T0": (0, 37, 50, 3, "ragged", False, True, True, False, False),
    "all-ranks-0": (5, 37, 50, 2, [0, 0], False, True, True, False, False),
    "shared-E7": (37, 50, 37, 7, 5, True, True, True, True, False),
    "shared-E1-T1": (1, 50, 37, 1, 17, True, False, False, False, False),
    "noncontig-ragged": (64, 64, 50, 4, [16, 0, 3, 17], False, True, True, False, True),
    "noncontig-shared": (40, 50, 64, 3, 16, True, True, True, True, True),
    # several tiles on every grid axis and several steps of every K loop (matmul tiles <= 64 x 128,
    # BLOCK_K <= 64, 32 tokens x 64 rank columns in the gate backward)
    "multi-tile": (100, 150, 200, 5, 17, False, True, True, False, False),
    # more experts than one expert window of the gate backward (GATE_BACKWARD_BLOCK_E = 16): three
    # windows, the last one partial; with an expert-less window (experts 16..31 of rank 0)
    "ragged-E37": (40, 33, 29, 37, "ragged", False, True, True, False, False),
    "E37-empty-window": (21, 24, 40, 37, [2] * 16 + [0] * 16 + [5] * 5, False, True, True, True,
                         False),
    "shared-E37": (33, 40, 24, 37, 3, True, True, False, False, False),
    # decode: one output tile and a long K, so the shrinks x A^T take the split-K path
    "decode-split-k": (1, 1100, 37, 3, [8, 0, 9], False, True, True, True, False),
}


def _gated_inputs(case, dtype):
    T, d_in, d_out, E, ranks, shared, has_scales, has_base, other_gate, nc = GATED_CASES[case]
    if ranks == "ragged":
        ro = ragged_rank_offsets(E, 17)
    elif isinstance(ranks, int):
        ro = uniform_rank_offsets(E, ranks)
    else:
        ro = rank_offsets_from_ranks(ranks)
    R = int(ro[-1])
    r = R // E if shared else R
    gate_dtype = _other_float(dtype) if other_gate else dtype
    x, A, B = randn(T, d_in, dtype=dtype), randn(r, d_in, dtype=dtype), randn(d_out, R, dtype=dtype)
    gate = randn(T, E, dtype=gate_dtype)
    grad_y = randn(T, d_out, dtype=dtype)
    scales = (torch.rand(E) + 0.5) if has_scales else None
    base = randn(T, d_out, dtype=dtype) if has_base else None
    x, base, grad_y, B = (_maybe_nc(t, nc) for t in (x, base, grad_y, B))
    gate, A = _maybe_nc(gate, nc, "transpose"), _maybe_nc(A, nc, "transpose")
    return x, A, B, gate, ro, scales, base, shared, grad_y


@dtypes
@pytest.mark.parametrize("op", ["stacked_gated_lora", "stacked_gated_lora_backward"])
@pytest.mark.parametrize("case", list(GATED_CASES))
def test_stacked_gated_lora(case, op, dtype):
    x, A, B, gate, ro, scales, base, shared, grad_y = _gated_inputs(case, dtype)
    if op == "stacked_gated_lora":
        args = (x, A, B, gate, ro, scales, base, shared)
    else:  # the backward op: (dx, dA, dB, dgate)
        args = (grad_y, x, A, B, gate, ro, scales, shared)
    _compare(op, getattr(gated, op), args)


@dtypes
@pytest.mark.parametrize("split_k", [1, 3])
def test_matmul_split_k_gate_base_epilogue(split_k, dtype):
    """The shared matmul with every epilogue at once (gate x scale by rank group, n_rep copies,
    base) and a forced split-K (K = 150: 3 splits of BLOCK_K = 64, the last one ragged)."""
    M, K, N, E = 37, 150, 20, 3
    a, b = noncontig(randn(M, K, dtype=dtype)), noncontig(randn(N, K, dtype=dtype), "transpose").t()
    gate, scales = randn(M, E), torch.rand(E) + 0.5
    group = gated.expert_of_rank(uniform_rank_offsets(E, N), E * N)
    base = randn(M, E * N, dtype=dtype)
    out = torch.empty(M, E * N, dtype=dtype)
    args = [t.to(DEVICE) for t in (a, b, out, base, gate, scales, group)]
    ours = gated.matmul(*args[:3], base=args[3], gate=args[4], scales=args[5], group=args[6],
                        n_rep=E, split_k=split_k).cpu()

    def reference(dt):
        g = group.long()
        coef = gate.to(dt)[:, g] * scales.to(dt)[g]
        return base.to(dt) + coef * (a.to(dt) @ b.to(dt)).repeat(1, E)

    assert_close_fa(ours, reference(torch.float32).to(dtype), reference(torch.float64), "matmul")


def test_gate_backward_expert_window_fixed():
    """The gate backward's dgate tile does not grow with E (a tile as wide as E spills)."""
    widths = {gated.gate_backward_config(64, E)["BLOCK_E"] for E in (1, 16, 37, 256, 4096)}
    assert widths == {gated.GATE_BACKWARD_BLOCK_E}
    assert GATED_CASES["ragged-E37"][3] > gated.GATE_BACKWARD_BLOCK_E


def test_expert_of_rank_empty_experts_int64():
    ro = torch.tensor([0, 0, 3, 3, 3, 4, 6, 6], dtype=torch.int64)
    got = gated.expert_of_rank(ro.to(DEVICE), 6)
    assert got.dtype == torch.int32
    assert got.cpu().tolist() == [1, 1, 1, 4, 5, 5]


# --------------------------------------------------------------------------------------------
# Family 4: rank_sparse_shrink / rank_sparse_expand / rank_scatter / rank_sparse_weight_grad
# --------------------------------------------------------------------------------------------

# id: (T, d, R, k, ids kind, non-contiguous, int64 ids)
# ids kinds: "drop" = distinct ids with random -1, "full" = k == R (every rank kept),
# "dup" = random ids with repeats and -1 (accumulation into one rank).
MASKED_CASES = {
    "drop": (37, 50, 20, 5, "drop", False, False),
    "k-eq-R": (21, 37, 17, 17, "full", False, True),
    "T1-k1": (1, 37, 9, 1, "drop", False, False),
    "T0": (0, 37, 9, 3, "drop", False, False),
    "dup": (64, 64, 7, 4, "dup", False, False),
    "noncontig": (40, 50, 33, 6, "drop", True, True),
    "multi-tile": (100, 150, 40, 20, "drop", False, False),
}


def _masked_inputs(case, dtype, d_other=None):
    """(T, d, R, ids, nc); d_other overrides d (the output width of an expand)."""
    T, d, R, k, kind, nc, int64 = MASKED_CASES[case]
    if kind == "dup":
        ids = drop_ids(torch.randint(0, R, (T, k), dtype=torch.int32), 0.3)
    else:
        ids = distinct_ids(T, R, k)
        ids = drop_ids(ids, 0.3) if kind == "drop" else ids
    if nc:
        ids = noncontig(ids, "transpose")
    if int64:
        ids = ids.to(torch.int64)
    return T, d if d_other is None else d_other, R, ids, nc


@dtypes
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_rank_sparse_shrink(case, dtype):
    T, d, R, ids, nc = _masked_inputs(case, dtype)
    x = _maybe_nc(randn(T, d, dtype=dtype), nc)
    A = _maybe_nc(randn(R, d, dtype=dtype), nc, "transpose")  # as A = B.t() in the expand backward
    _compare("rank_sparse_shrink", masked.rank_sparse_shrink, (x, A, ids))


@dtypes
@pytest.mark.parametrize("with_w_base", [True, False], ids=["w-base", "plain"])
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_rank_sparse_expand(case, with_w_base, dtype):
    T, d_out, R, ids, nc = _masked_inputs(case, dtype, 200 if case == "multi-tile" else 50)
    k = ids.shape[1]
    values = _maybe_nc(randn(T, k, dtype=dtype), nc)
    B = _maybe_nc(randn(d_out, R, dtype=dtype), nc, "transpose")  # as A.t() in the shrink backward
    weights = base = None
    if with_w_base:  # weights in another float dtype than values
        weights = _maybe_nc(torch.rand(T, k).to(_other_float(dtype)) + 0.25, nc)
        base = _maybe_nc(randn(T, d_out, dtype=dtype), nc)
    scale = 1.5 if with_w_base else 1.0
    _compare("rank_sparse_expand", masked.rank_sparse_expand,
             (values, ids, B, weights, scale, base))


@dtypes
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_rank_scatter(case, dtype):
    T, _, R, ids, nc = _masked_inputs(case, dtype)
    src = _maybe_nc(randn(T, ids.shape[1], dtype=dtype), nc)
    _compare("rank_scatter", masked.rank_scatter, (src, ids, R))


@dtypes
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_rank_sparse_weight_grad(case, dtype):
    T, d, R, ids, nc = _masked_inputs(case, dtype)
    x = _maybe_nc(randn(T, d, dtype=dtype), nc)
    g = _maybe_nc(randn(T, ids.shape[1], dtype=dtype), nc)
    _compare("rank_sparse_weight_grad", masked.rank_sparse_weight_grad, (x, g, ids, R))


def test_rank_sparse_weight_grad_opmath_g():
    """g in fp32 with fp16 x (the expand backward passes scale * w * values in opmath)."""
    T, d, R, ids, _ = _masked_inputs("drop", torch.float16)
    x, g = randn(T, d, dtype=torch.float16), randn(T, ids.shape[1])
    _compare("rank_sparse_weight_grad", masked.rank_sparse_weight_grad, (x, g, ids, R))


# --------------------------------------------------------------------------------------------
# float64 is refused (the reference backend takes it)
# --------------------------------------------------------------------------------------------

def _f64_calls():
    x, A, B, gate = torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 2), torch.randn(3, 1)
    ro, ids = torch.tensor([0, 2], dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int32)
    d = torch.float64
    return {
        "stacked_gated_lora": lambda: gated.stacked_gated_lora(x.to(d), A.to(d), B.to(d), gate, ro,
                                                               None, None, False),
        # (an fp64 gate with fp32 data is valid input: test_edge_inputs.py runs it)
        "rank_sparse_shrink": lambda: masked.rank_sparse_shrink(x.to(d), A.to(d), ids),
        "rank_sparse_expand": lambda: masked.rank_sparse_expand(torch.randn(3, 1, dtype=d), ids,
                                                                B.to(d), None, 1.0, None),
        "rank_scatter": lambda: masked.rank_scatter(torch.randn(3, 1, dtype=d), ids, 2),
        "rank_sparse_weight_grad": lambda: masked.rank_sparse_weight_grad(
            x.to(d), torch.randn(3, 1), ids, 2),
    }


@pytest.mark.parametrize("call", list(_f64_calls()))
def test_float64_rejected(call):
    with pytest.raises(TypeError, match="float64 is not supported"):
        _f64_calls()[call]()
