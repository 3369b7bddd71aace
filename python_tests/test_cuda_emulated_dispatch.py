"""The CUDA kernels of the dispatch family (csrc/cuda/dispatch.cu: dispatch, gather_rows,
combine_rows, pair_dot), run on the CPU by the emulation module (torch.ops.molora_emu, every CUDA
thread a host thread; outputs are always poisoned there), against molora_ops.reference.

dispatch is compared EXACTLY (order, pos, expert_offsets), over the kernel's ragged edges: one and
several chunks (the emulation reports 4 SMs: chunks of 256 pairs from ~2k pairs up), shared-memory
and global-memory expert counters (E > 12 Ki), padding block sizes 1/16/64, -1 ids, empty experts.
gather_rows and combine_rows without weights are exact too (a copy; an fp32 sum in slot order, as
the reference); with weights, and pair_dot (an fp32 dot in another summation order), follow the
flash-attention rule of utils.assert_close_fa against the float64 reference. Both 16-byte
vectorised and scalar paths are exercised (d a multiple of 16 bytes or not, sliced / transposed x).
"""
import pytest
import torch

from molora_ops import reference as ref
from emu_utils import (DT_IDS, KERNEL_DTYPES, assert_float64_runs_the_reference, emu_op,
                       raises_on_both_paths, require_emu)
from utils import assert_close_fa, check_dispatch_invariants, make_routing, noncontig


EMU = require_emu()  # torch.ops.molora_emu (skips the module only when _C_emu is not built)


_need = emu_op


# ------------------------------------------------------------------------------------- dispatch

def _ids(kind, T, E, k, gen):
    """Routing ids [T, k] int32 of a few shapes of load."""
    if kind == "uniform":  # random experts (repeats within a row allowed), ~25% dropped
        ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
        ids[torch.rand(T, k, generator=gen) < 0.25] = -1
    elif kind == "router":  # distinct experts per row from a softmax router (no drops)
        ids = make_routing(T, E, k)[2] if k <= E else torch.randint(0, E, (T, k), generator=gen)
    elif kind == "one":  # every pair on one expert
        ids = torch.full((T, k), E // 2, dtype=torch.int32)
    elif kind == "few":  # many empty experts: only 3 experts used, some drops
        used = torch.tensor([0, E // 3, E - 1], dtype=torch.int32)
        ids = used[torch.randint(0, 3, (T, k), generator=gen)]
        ids[torch.rand(T, k, generator=gen) < 0.1] = -1
    elif kind == "skewed":  # a hot expert (half the pairs) + uniform rest
        ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
        ids[torch.rand(T, k, generator=gen) < 0.5] = E - 1
    elif kind == "dropped":  # all pairs dropped
        ids = torch.full((T, k), -1, dtype=torch.int32)
    else:
        raise ValueError(kind)
    return ids.to(torch.int32)


def _check_dispatch(ids, E, bs):
    order, pos, eo = _need("dispatch")(ids, E, bs)
    r = ref.dispatch(ids, E, bs)
    for name, a, b in zip(("order", "pos", "expert_offsets"), (order, pos, eo), r):
        assert a.dtype == torch.int32 and a.shape == b.shape, (name, a.dtype, a.shape, b.shape)
        if not torch.equal(a, b):
            bad = (a != b).nonzero().flatten()[:10]
            raise AssertionError(f"dispatch {name} differs at {bad.tolist()}: ours {a.flatten()[bad].tolist()}"
                                 f" ref {b.flatten()[bad].tolist()}")
    check_dispatch_invariants(ids, E, bs, order, pos, eo)
    return order, pos, eo


# (T, E, k, kind, block sizes): E in {1, 7, 64, 257, 4096}; T in {0, 1, small, several chunks}
DISPATCH_CASES = [
    (0, 7, 2, "uniform", (1, 16)),
    (1, 1, 1, "uniform", (1, 16, 64)),
    (1, 7, 3, "uniform", (1, 16)),
    (5, 1, 1, "one", (1, 64)),
    (37, 7, 2, "router", (1, 16, 64)),
    (37, 7, 2, "one", (1, 16)),
    (37, 7, 2, "dropped", (1, 16)),
    (50, 64, 8, "few", (1, 16, 64)),
    (64, 64, 8, "router", (1, 16)),
    (33, 257, 16, "uniform", (1, 16, 64)),
    (40, 4096, 8, "uniform", (1, 16, 64)),
    (40, 4096, 2, "few", (1, 16)),
    # several chunks (2k+ pairs in emulation): stability across chunks and tiles
    (300, 7, 8, "uniform", (1, 16)),
    (300, 64, 8, "skewed", (1, 64)),
    (257, 257, 8, "few", (16,)),
    (300, 7, 8, "one", (1, 16)),
    (300, 64, 8, "dropped", (1, 64)),
]


@pytest.mark.parametrize("case", DISPATCH_CASES,
                         ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}" for c in DISPATCH_CASES])
def test_dispatch_exact(case):
    T, E, k, kind, block_sizes = case
    gen = torch.Generator().manual_seed(T * 1000 + E + k)
    ids = _ids(kind, T, E, k, gen)
    snapshot = ids.clone()
    for bs in block_sizes:
        _check_dispatch(ids, E, bs)
    assert torch.equal(ids, snapshot)


def test_dispatch_global_memory_counters():
    # E > 12032: the per-expert counters live in the global workspace, not in shared memory; 3
    # chunks of 3072 pairs (chunk >= E / 4)
    T, E, k = 1100, 12289, 8
    gen = torch.Generator().manual_seed(7)
    ids = _ids("uniform", T, E, k, gen)
    ids[:, 0] = E - 1  # a hot expert across all chunks
    _check_dispatch(ids, E, 1)
    _check_dispatch(ids[:40], E, 16)
    # the largest E with shared-memory counters (47 KiB of dynamic shared memory)
    E = 12032
    _check_dispatch(torch.where(ids[:60] >= E, E - 1, ids[:60]), E, 4)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("layout", ["contig", "transpose", "slice"])
def test_dispatch_index_dtype_and_layout(index_dtype, layout):
    gen = torch.Generator().manual_seed(3)
    for T, E, k in ((23, 7, 3), (300, 64, 8)):  # one chunk, several chunks
        ids = _ids("uniform", T, E, k, gen).to(index_dtype)
        if layout != "contig":
            ids = noncontig(ids, layout)
            assert not ids.is_contiguous()
        for bs in (1, 16):
            _check_dispatch(ids, E, bs)


def test_dispatch_hand_example():
    ids = torch.tensor([[2, 0], [0, -1], [2, 1]], dtype=torch.int32)
    order, pos, eo = _need("dispatch")(ids, 3, 2)
    assert eo.tolist() == [0, 2, 4, 6]
    assert order.tolist() == [1, 2, 5, -1, 0, 4, -1, -1, -1]
    assert pos.tolist() == [[4, 0], [1, -1], [5, 2]]


def test_dispatch_int64_ids_beyond_int32_are_rejected():
    ids = torch.tensor([[0, 2 ** 33]], dtype=torch.int64)
    raises_on_both_paths(lambda: _need("dispatch")(ids, 4, 1), IndexError)


# ------------------------------------------------------------------- gather / combine / pair_dot

def _routing(T, E, k, bs, gen, drop=0.25):
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    ids[torch.rand(T, k, generator=gen) < drop] = -1
    order, pos, eo = ref.dispatch(ids, E, bs)
    return ids, order, pos


def _data(rows, d, dtype, layout, gen):
    """[rows, d] of ``dtype``: "contig"; "wide": a column slice [:, :d] of a wider buffer (row
    stride != d, still 16-byte aligned when d is); "offset": columns [1, d+1) of a wider buffer
    (base pointer not 16-byte aligned: scalar path); "transpose": column stride != 1."""
    base = torch.randn(rows, d + 8, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "contig":
        return base[:, :d].contiguous()
    if layout == "wide":
        return base[:, :d]
    if layout == "offset":
        return base[:, 1:d + 1]
    if layout == "transpose":
        return noncontig(base[:, :d].contiguous(), "transpose")
    raise ValueError(layout)


def _weights(ids, kind, dtype, gen):
    if kind is None:
        return None
    w = torch.rand(ids.shape, generator=gen, dtype=torch.float64) + 0.25  # nonzero at -1 slots too
    return w.to(torch.float32 if kind == "f32" else dtype)


def _ref_pair(fn, args):
    """(reference in the inputs' precision, reference in float64) of fn(*args)."""
    lo = fn(*args)
    hi = fn(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    return lo, hi


# (T, E, k, bs, d): k = 1 / 2 / 8 / 16; d = 64 (16-byte rows in every dtype), 12 (fp32 only),
# 13 (no dtype), 40 (fp16/bf16 rows of 80 bytes: 16-byte multiple), 300 (ragged last warp tile),
# 520 (two column passes of the warp, every lane busy, in every dtype)
ROW_CASES = [
    (9, 4, 1, 1, 64),
    (17, 7, 2, 16, 12),
    (11, 5, 8, 1, 13),
    (6, 3, 16, 4, 40),
    (21, 64, 16, 64, 300),
    (5, 4, 2, 1, 520),
    (0, 4, 2, 16, 16),
    (1, 3, 2, 1, 8),
]
ROW_IDS = [f"T{c[0]}-k{c[2]}-bs{c[3]}-d{c[4]}" for c in ROW_CASES]


@pytest.mark.parametrize("weights", [None, "f32", "data"], ids=["now", "w32", "wdata"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_gather_rows(case, dtype, weights):
    T, E, k, bs, d = case
    gen = torch.Generator().manual_seed(11 * T + k + d)
    ids, order, pos = _routing(T, E, k, bs, gen)
    w = _weights(ids, weights, dtype, gen)
    x = _data(T, d, dtype, "contig", gen)
    out = _need("gather_rows")(x, order, pos, w)
    expect = ref.gather_rows(x, order, pos, w)
    assert out.dtype == dtype and out.shape == (order.numel(), d)
    # a copy, or one fp32 product rounded to the data dtype, as the reference: bit-exact
    assert torch.equal(out, expect)
    assert (out[order < 0] == 0).all() and not out.isnan().any()


@pytest.mark.parametrize("weights", [None, "f32", "data"], ids=["now", "w32", "wdata"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_combine_rows(case, dtype, weights):
    T, E, k, bs, d = case
    gen = torch.Generator().manual_seed(13 * T + k + d)
    ids, order, pos = _routing(T, E, k, bs, gen)
    w = _weights(ids, weights, dtype, gen)
    y_perm = _data(order.numel(), d, dtype, "contig", gen)  # padding rows hold garbage too
    out = _need("combine_rows")(y_perm, order, pos, w)
    assert out.dtype == dtype and out.shape == (T, d)
    if w is None:  # fp32 sum in slot order, as the reference: bit-exact
        assert torch.equal(out, ref.combine_rows(y_perm, order, pos, None))
    else:
        lo, hi = _ref_pair(ref.combine_rows, (y_perm, order, pos, w))
        assert_close_fa(out, lo, hi, name="combine_rows")


@pytest.mark.parametrize("a_by_token", [True, False], ids=["by_token", "by_row"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_pair_dot(case, dtype, a_by_token):
    T, E, k, bs, d = case
    gen = torch.Generator().manual_seed(17 * T + k + d)
    ids, order, pos = _routing(T, E, k, bs, gen)
    P = order.numel()
    a = _data(T if a_by_token else P, d, dtype, "contig", gen)
    b = _data(P, d, dtype, "contig", gen)
    out = _need("pair_dot")(a, b, pos, a_by_token)
    assert out.dtype == torch.float32 and out.shape == (T, k)
    assert (out[pos < 0] == 0).all()
    lo, hi = _ref_pair(ref.pair_dot, (a, b, pos, a_by_token))
    assert_close_fa(out, lo, hi, name="pair_dot")


@pytest.mark.parametrize("layout", ["wide", "offset", "transpose"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
def test_rows_layouts_and_index_dtypes(layout, dtype):
    # "wide": vectorised path with row stride != d; "offset" / "transpose": scalar path. Index
    # tensors int64 and non-contiguous (sliced order, transposed pos).
    T, E, k, bs, d = 19, 6, 3, 4, 32
    gen = torch.Generator().manual_seed(5)
    ids, order, pos = _routing(T, E, k, bs, gen)
    w = _weights(ids, "f32", dtype, gen)
    P = order.numel()
    x = _data(T, d, dtype, layout, gen)
    y_perm = _data(P, d, dtype, layout, gen)
    a = _data(T, d, dtype, layout, gen)
    for o, p in ((order, pos), (order.long(), pos.long()),
                 (noncontig(order, "slice"), noncontig(pos, "transpose")),
                 (noncontig(order.long(), "slice"), noncontig(pos.long(), "slice"))):
        assert torch.equal(_need("gather_rows")(x, o, p, w), ref.gather_rows(x, order, pos, w))
        assert torch.equal(_need("combine_rows")(y_perm, o, p, None),
                           ref.combine_rows(y_perm, order, pos, None))
        lo, hi = _ref_pair(ref.combine_rows, (y_perm, order, pos, w))
        assert_close_fa(_need("combine_rows")(y_perm, o, p, w), lo, hi, name="combine_rows")
        lo, hi = _ref_pair(ref.pair_dot, (a, y_perm, pos, True))
        assert_close_fa(_need("pair_dot")(a, y_perm, p, True), lo, hi, name="pair_dot")
    # weights non-contiguous and of another dtype than the data
    wn = noncontig(w.to(torch.bfloat16), "transpose")
    assert torch.equal(_need("gather_rows")(x, order, pos, wn), ref.gather_rows(x, order, pos, wn))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=[DT_IDS[d] for d in KERNEL_DTYPES])
def test_backward_formulas_on_kernels(dtype):
    """The autograd of gather_rows / combine_rows (molora_ops/ops/dispatch.py) uses combine_rows,
    gather_rows and pair_dot only: composed from the emulated kernels they give the reference's
    autograd gradients."""
    T, E, k, bs, d = 13, 5, 3, 4, 24
    gen = torch.Generator().manual_seed(9)
    ids, order, pos = _routing(T, E, k, bs, gen)
    P = order.numel()
    w = _weights(ids, "f32", dtype, gen)

    def ref_grads(fn, data, g, dt):
        data = data.detach().to(dt).requires_grad_(True)
        ww = w.detach().to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_(True)
        out = fn(data, order, pos, ww)
        return torch.autograd.grad(out, (data, ww), g.to(dt))

    # gather_rows: grad_x = combine_rows(g, w), grad_w = pair_dot(x, g, by token)
    x = _data(T, d, dtype, "contig", gen)
    g = _data(P, d, dtype, "contig", gen)
    gx, gw = _need("combine_rows")(g, order, pos, w), _need("pair_dot")(x, g, pos, True)
    lo = ref_grads(ref.gather_rows, x, g, dtype)
    hi = ref_grads(ref.gather_rows, x, g, torch.float64)
    assert_close_fa(gx, lo[0], hi[0], name="gather grad_x")
    assert_close_fa(gw, lo[1], hi[1], name="gather grad_w")
    # combine_rows: grad_y_perm = gather_rows(g, w), grad_w = pair_dot(g, y_perm, by token)
    y_perm = _data(P, d, dtype, "contig", gen)
    g = _data(T, d, dtype, "contig", gen)
    gy, gw = _need("gather_rows")(g, order, pos, w), _need("pair_dot")(g, y_perm, pos, True)
    lo = ref_grads(ref.combine_rows, y_perm, g, dtype)
    hi = ref_grads(ref.combine_rows, y_perm, g, torch.float64)
    assert_close_fa(gy, lo[0], hi[0], name="combine grad_y_perm")
    assert_close_fa(gw, lo[1], hi[1], name="combine grad_w")


# ------------------------------------------------------------------------------------------ errors

def _valid(op):
    gen = torch.Generator().manual_seed(1)
    T, E, k, d = 6, 5, 2, 8
    ids, order, pos = _routing(T, E, k, 2, gen)
    w = _weights(ids, "f32", torch.float32, gen)
    P = order.numel()
    if op == "dispatch":
        return dict(ids=ids, num_experts=E, block_size=2)
    if op == "gather_rows":
        return dict(x=torch.randn(T, d), order=order, pos=pos, weights=w)
    if op == "combine_rows":
        return dict(y_perm=torch.randn(P, d), order=order, pos=pos, weights=w)
    if op == "pair_dot":
        return dict(a=torch.randn(T, d), b=torch.randn(P, d), pos=pos, a_by_token=True)
    raise KeyError(op)


def _set(t, v):
    t = t.clone()
    t.view(-1)[1] = v
    return t


ERROR_CASES = [
    ("dispatch", "ids-float", {"ids": lambda t: t.float()}, TypeError),
    ("dispatch", "ids-1d", {"ids": lambda t: t.flatten()}, ValueError),
    ("dispatch", "ids>=E", {"ids": lambda t: _set(t, 5)}, IndexError),
    ("dispatch", "ids<-1", {"ids": lambda t: _set(t, -2)}, IndexError),
    ("dispatch", "block_size0", {"block_size": 0}, ValueError),
    ("dispatch", "num_experts0", {"num_experts": 0}, ValueError),
    ("dispatch", "rows>int32", {"block_size": 2 ** 30}, ValueError),
    ("gather_rows", "x-int", {"x": lambda t: t.int()}, TypeError),
    ("gather_rows", "x-1d", {"x": lambda t: t.flatten()}, ValueError),
    ("gather_rows", "x-rows", {"x": lambda t: torch.cat([t, t[:1]])}, ValueError),
    ("gather_rows", "order-float", {"order": lambda t: t.float()}, TypeError),
    ("gather_rows", "order-range", {"order": lambda t: _set(t, 10 ** 4)}, IndexError),
    ("gather_rows", "pos-range", {"pos": lambda t: _set(t, -2)}, IndexError),
    ("gather_rows", "weights-shape", {"weights": lambda t: t[:, :1]}, ValueError),
    ("gather_rows", "weights-int", {"weights": lambda t: t.int()}, TypeError),
    ("combine_rows", "y_perm-rows", {"y_perm": lambda t: t[1:]}, ValueError),
    ("combine_rows", "pos-2d", {"pos": lambda t: t.flatten()}, ValueError),
    ("combine_rows", "pos-range", {"pos": lambda t: _set(t, 10 ** 4)}, IndexError),
    ("combine_rows", "order-range", {"order": lambda t: _set(t, -3)}, IndexError),
    ("pair_dot", "b-cols", {"b": lambda t: t[:, 1:]}, ValueError),
    ("pair_dot", "a-rows", {"a": lambda t: t[1:]}, ValueError),
    ("pair_dot", "a-rows-by-row", {"a_by_token": False}, ValueError),
    ("pair_dot", "pos-range", {"pos": lambda t: _set(t, 10 ** 4)}, IndexError),
    ("pair_dot", "pos-float", {"pos": lambda t: t.float()}, TypeError),
    ("pair_dot", "b-dtype", {"b": lambda t: t.half()}, TypeError),
]


def _mutate(op, changes):
    args = _valid(op)
    for key, change in changes.items():
        args[key] = change(args[key]) if callable(change) else change
    return list(args.values())


@pytest.mark.parametrize("case", ERROR_CASES, ids=[f"{c[0]}-{c[1]}" for c in ERROR_CASES])
def test_errors_match_cpu(case):
    """Same exception class as the public op (Python checks of the contract), and the CPU op's
    exact message (the checks are shared: csrc/common/dispatch_checks.h)."""
    import molora_ops
    op, _, changes, exc = case
    args = _mutate(op, changes)
    ours = raises_on_both_paths(lambda: _need(op)(*args), exc)
    assert op in str(ours)
    with pytest.raises(exc):
        getattr(molora_ops, op)(*args)
    if molora_ops.has_extension():
        with pytest.raises(exc) as cpu:
            getattr(torch.ops.molora, op)(*args)
        assert str(ours) == str(cpu.value)


@pytest.mark.parametrize("op", ["gather_rows", "combine_rows", "pair_dot"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_non_kernel_dtypes(op, dtype):
    """int data: TypeError; float64 data: the launcher hands it to the reference."""
    args = _valid(op)
    key = next(iter(args))
    args[key] = args[key].to(dtype)
    if op == "pair_dot":
        args["b"] = args["b"].to(dtype)
    if dtype == torch.float64:
        assert_float64_runs_the_reference(lambda: _need(op)(*args.values()),
                                          lambda: getattr(ref, op)(*args.values()))
        return
    with pytest.raises(TypeError, match=op):
        _need(op)(*args.values())
