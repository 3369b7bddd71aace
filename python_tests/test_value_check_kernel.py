"""The gathered device-side value checks (molora_ops._checks.one_launch, the Triton kernel of
molora_ops/triton/checks.py) against the torch composites they replace: the same inputs are
accepted and rejected, with one check kernel and one torch._assert_async per op call instead of
~30 tiny kernels. On CUDA tensors where a GPU is present, else on CPU tensors in Triton's
interpreter. The verdicts are read by recording what reaches molora_ops._checks._assert_async
(a failed device assert would end the CUDA context)."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from molora_ops import _checks
from molora_ops import reference as ref
from molora_ops.triton import checks as tc

from utils import make_ids, ragged_rank_offsets

pytestmark = pytest.mark.triton  # (scripts/gpu_validate.sh's triton step runs it on the GPU)

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# views and metadata: no kernel on a GPU
_NO_KERNEL = {"aten.slice.Tensor", "aten.select.int", "aten.view.default", "aten.reshape.default",
              "aten._unsafe_view.default", "aten.alias.default", "aten.detach.default",
              "aten.expand.default", "aten.t.default", "aten.unsqueeze.default"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in _NO_KERNEL:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _asserts(gathered: bool):
    """Device mode, the gathered kernel path (on CPU tensors too: the interpreter) or the torch
    composites; yields the list of (condition, message) of every device assert (read
    them after the block: reading is not part of what is counted)."""
    seen = []
    saved_assert, saved_cpu = _checks._assert_async, _checks._KERNEL_ON_CPU[0]

    def record(cond, msg=""):
        # torch's CUDA _assert_async refuses longer messages (CPU tensors take any): hold every
        # message to it here, where the tests may run on CPU
        assert len(msg) < 255, f"a {len(msg)}-character device assert message: {msg}"
        seen.append((cond, msg))
    _checks._assert_async = record
    _checks._KERNEL_ON_CPU[0] = gathered
    try:
        with _checks.use_value_checks("device"):
            yield seen
    finally:
        _checks._assert_async, _checks._KERNEL_ON_CPU[0] = saved_assert, saved_cpu


def _rejects(fn, gathered: bool) -> bool:
    """Whether the device checks made in fn() fail: through one_launch (gathered) or as the
    composites."""
    with _asserts(gathered) as seen:
        with _checks.one_launch("op") if gathered else contextlib.nullcontext():
            fn()
    assert seen, "no device check ran"
    return not all(bool(cond.all()) for cond, _ in seen)


def _dispatched(T=37, E=7, k=3, seed=0):
    torch.manual_seed(seed)
    ids = make_ids("drop", T, E, k)
    order, pos, eo = ref.dispatch(ids, E, 4)
    ro = ragged_rank_offsets(E, 17)
    return tuple(t.to(DEV) for t in (ro, order, pos, eo))


def _mutations(ro, order, pos, eo):
    """(name, ro, order, pos, eo) with one value made invalid each, and the valid set."""
    R, P = int(ro[-1]), order.numel()
    out = [("valid", ro, order, pos, eo)]

    def put(t, i, v):
        t = t.clone()
        t.view(-1)[i] = v
        return t
    out += [("ro first", put(ro, 0, 1), order, pos, eo),
            ("ro decreasing", put(ro, 3, int(ro[2]) - 1), order, pos, eo),
            ("ro last", put(ro, -1, R + 1), order, pos, eo),
            ("ro step over max_rank", put(ro, 2, int(ro[1]) + 40), order, pos, eo),
            ("max_rank too small", ro, order, pos, eo),  # (the case's max_rank is one short)
            ("eo first", ro, order, pos, put(eo, 0, 1)),
            ("eo decreasing", ro, order, pos, put(eo, 4, int(eo[3]) - 1)),
            ("eo last past P", ro, order, pos, put(eo, -1, P + 1)),
            ("order low", ro, put(order, 5, -2), pos, eo),
            ("order high", ro, put(order, P - 1, pos.numel()), pos, eo),
            ("pos low", ro, order, put(pos, 0, -2), eo),
            ("pos high", ro, order, put(pos, pos.numel() - 1, P), eo)]
    return out


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_dispatched_values_accept_and_reject_as_the_composite(index_dtype):
    ro, order, pos, eo = _dispatched()
    max_rank = int((ro[1:] - ro[:-1]).max())
    for name, r, o, p, e in _mutations(ro, order, pos, eo):
        r, o, p, e = (t.to(index_dtype) for t in (r, o, p, e))
        mr = max_rank - 1 if name == "max_rank too small" else max_rank

        def fn():
            _checks.dispatched_values("sgmv_shrink", int(ro[-1]), r, o, p, e, mr)
        composite, kernel = _rejects(fn, False), _rejects(fn, True)
        assert kernel == composite == (name != "valid"), (name, composite, kernel)


def test_fused_stacked_and_pair_dot_values_as_the_composite():
    E, r, T, k = 5, 4, 9, 2
    ro = (torch.arange(E + 1, dtype=torch.int32) * r).to(DEV)
    A, B = torch.empty(r, 8, device=DEV), torch.empty(8, E * r, device=DEV)
    ids = torch.randint(-1, E, (T, k), dtype=torch.int32, device=DEV)
    bad_ro = ro.clone()
    bad_ro[2] += 1  # still non-decreasing, ends at R: only arange(E+1) * r fails
    cases = [
        ("fused", lambda ro, ids: (_checks.rank_offsets_values("f", ro, E * r),
                                   _checks.ids_in_range("f", "ids", ids, -1, E))),
        ("shared_a", lambda ro, ids: _checks.stacked_values("s", A, B, ro, True)),
        ("stacked", lambda ro, ids: _checks.stacked_values(
            "s", torch.empty(E * r, 8, device=DEV), B, ro, False)),
        ("pair_dot", lambda ro, ids: _checks.pair_dot_values(
            "p", torch.empty(T, 3, device=DEV), torch.empty(E, 3, device=DEV), ids, True)),
    ]
    for name, fn in cases:
        for label, ro_i, ids_i in (("valid", ro, ids), ("ro", bad_ro, ids),
                                   ("ids high", ro, ids.clone().fill_(E)),
                                   ("ids low", ro, ids.clone().fill_(-2))):
            composite = _rejects(lambda: fn(ro_i, ids_i), False)
            kernel = _rejects(lambda: fn(ro_i, ids_i), True)
            assert kernel == composite, (name, label, composite, kernel)
        assert not _rejects(lambda: fn(ro, ids), True), name
        if name in ("fused", "pair_dot"):
            assert _rejects(lambda: fn(ro, ids.clone().fill_(E)), True), name
        if name == "shared_a":
            assert _rejects(lambda: fn(bad_ro, ids), True)


def test_one_kernel_and_one_assert_per_op_call(monkeypatch):
    """The gathered checks of a grouped matmul: one launch of the check kernel, then only the
    output allocation and torch._assert_async, where the composites dispatch ~30 kernels."""
    ro, order, pos, eo = _dispatched()
    args = ("sgmv_shrink", int(ro[-1]), ro, order, pos, eo, int((ro[1:] - ro[:-1]).max()))
    with _asserts(False), _Ops() as composite:
        _checks.dispatched_values(*args)
    launches = []

    class _Stub:  # stands for the compiled kernel: records the launch, writes "all ok"
        def __getitem__(self, grid):
            def launch(ok, *rest, **meta):
                launches.append(grid)
                ok.fill_(True)
            return launch
    monkeypatch.setattr(tc, "_values_ok_kernel", _Stub())
    with _asserts(True) as seen, _Ops() as gathered:
        with _checks.one_launch("sgmv_shrink"):
            _checks.dispatched_values(*args)
    kernels = [op for op in gathered.ops if op not in ("aten.empty.memory_format",
                                                       "aten.fill_.Scalar")]
    assert launches == [(1,)] and kernels == [] and len(seen) == 1, (launches, gathered.ops)
    assert bool(seen[0][0].all())
    assert len(composite.ops) >= 25, composite.ops


def test_large_inputs_take_several_programs():
    """Past PER_PROGRAM elements the grid grows; a violation in any program's chunk, and a
    sequence step across two chunks, is found."""
    n = tc.PER_PROGRAM + 3000
    programs, chunk = tc.grid(n)
    assert programs == 2 and chunk < n <= 2 * chunk
    v = torch.randint(0, 50, (n,), dtype=torch.int32, device=DEV)
    seq = torch.arange(n, dtype=torch.int64, device=DEV) * 2
    for where in (0, chunk - 1, chunk, n - 1):
        ok = tc.values_ok([], [(v, 0, 49)])
        assert ok.numel() == 2 and bool(ok.all())
        bad = v.clone()
        bad[where] = 50
        assert not bool(tc.values_ok([], [(bad, 0, 49)]).all()), where
    none = tc.UNBOUNDED
    assert bool(tc.values_ok([(seq, 0, 0, 2, 2, -none, none)], []).all())
    for where in (1, chunk - 1, chunk, n - 1):
        bad = seq.clone()
        bad[where:] += 1  # only the step into `where` breaks (the one across chunks at `chunk`)
        assert not bool(tc.values_ok([(bad, 0, 0, 2, 2, -none, none)], []).all()), where


def test_more_tensors_than_slots_and_empty_ones():
    """Three ranges take two launches; empty tensors and non-contiguous ones are checked as
    their values."""
    a = torch.randint(0, 4, (6, 5), device=DEV).t()
    b = torch.randint(0, 4, (7,), device=DEV)
    empty = torch.empty(0, dtype=torch.int64, device=DEV)

    def fn(c):
        for name, t in (("a", a), ("b", b), ("c", c), ("empty", empty)):
            _checks.ids_in_range("op", name, t, 0, 4)
    assert not _rejects(lambda: fn(torch.randint(0, 4, (3,), device=DEV)), True)
    assert _rejects(lambda: fn(torch.tensor([0, 4, 1], device=DEV)), True)
    assert bool(tc.values_ok([(empty, 0, 0, 0, 0, 0, 0)], [(empty, 0, 0)]).all())
    with pytest.raises(ValueError, match="at most"):
        tc.values_ok([], [(b, 0, 4)] * (tc.MAX_RANGES + 1))


def test_host_mode_and_traced_code_are_unaffected():
    """one_launch gathers only device checks: the host mode still raises the named error at once."""
    ids = torch.tensor([[0, 9]], dtype=torch.int32, device=DEV)
    with _checks.use_value_checks("host"), pytest.raises(IndexError, match="outside"):
        with _checks.one_launch("op"):
            _checks.ids_in_range("op", "ids", ids, -1, 4)


def test_a_triton_served_op_gathers_its_checks():
    """Through the op (the Triton entry of molora_ops.ops; on CPU tensors the GPU path's
    emulation): valid metadata passes, and a bad order reaches one assert whose message lists
    every condition of the op."""
    import molora_ops
    ro, order, pos, eo = _dispatched()
    mr = int((ro[1:] - ro[:-1]).max())
    x = torch.randn(37, 16, device=DEV)
    A = torch.randn(int(ro[-1]), 16, device=DEV)
    bad = order.clone()
    bad[0] = pos.numel()
    gpu_path = molora_ops.backend.gpu_path_on_cpu("triton") if DEV == "cpu" else \
        contextlib.nullcontext()
    with gpu_path, _asserts(True) as seen:
        h = molora_ops.sgmv_shrink(x, A, ro, order, pos, eo, max_rank=mr)
        molora_ops.sgmv_shrink(x, A, ro, bad, pos, eo, max_rank=mr)
    torch.testing.assert_close(h, ref.sgmv_shrink(x, A, ro, order, pos, eo, max_rank=mr))
    assert [bool(cond.all()) for cond, _ in seen] == [True, False], seen
    # (every condition's operand: the conditions in full would pass CUDA's 254 characters)
    assert seen[1][1] == ("molora.sgmv_shrink: invalid values in one of rank_offsets, max_rank, "
                          "expert_offsets, order, pos (molora_ops.use_value_checks('host') "
                          "names it)"), seen[1][1]


def test_gathered_message_fits_the_cuda_assert():
    """One op call's gathered message names every condition it checks while that fits torch's
    CUDA _assert_async (fewer than 255 characters), else the operands checked; the real assert
    accepts it (on the GPU where there is one). A message that is still too long is cut."""
    ro, order, pos, eo = _dispatched()
    max_rank = int((ro[1:] - ro[:-1]).max())
    ids = torch.randint(-1, 7, (9, 2), device=DEV)
    cases = {  # op: its checks, and whether their messages in full fit
        "fused_moe_lora": (lambda op: (_checks.rank_offsets_values(op, ro, int(ro[-1])),
                                       _checks.ids_in_range(op, "ids", ids, -1, 7)), True),
        "sgmv_weight_grad": (lambda op: _checks.dispatched_values(
            op, int(ro[-1]), ro, order, pos, eo, max_rank), False)}
    for op, (fn, fits) in cases.items():
        with _asserts(False) as composites:
            fn(op)
        full = f"molora.{op}: " + "; ".join(dict.fromkeys(m.split(": ", 1)[1]
                                                         for _, m in composites))
        assert (len(full) <= _checks.ASSERT_MESSAGE_MAX) == fits, full
        with _asserts(True) as seen:
            with _checks.one_launch(op):
                fn(op)
        (cond, msg), = seen
        assert bool(cond.all())
        assert msg == full if fits else msg == (
            f"molora.{op}: invalid values in one of rank_offsets, max_rank, expert_offsets, "
            "order, pos (molora_ops.use_value_checks('host') names it)"), msg
        with _checks.use_value_checks("device"), _checks.one_launch(op):
            fn(op)  # the real torch._assert_async (on CUDA: its message-length check)
    with _asserts(True) as seen:
        _checks._device_assert(torch.ones((), dtype=torch.bool), "m" * 300)
    assert seen[0][1] == "m" * 250 + " ..."
