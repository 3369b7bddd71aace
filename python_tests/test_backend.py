"""The backends of torch.ops.molora (molora_ops.backend): bound at registration, re-bound by
set_backend / use_backend / MOLORA_BACKEND and restored after; and, on CPU tensors, the GPU path
itself (backend.gpu_path_on_cpu: the CUDA C++ kernels in emulation, the Triton kernels in Triton's
interpreter) against the reference: every sample of every Triton op, and whole forward + backward
passes of method layers (so autograd runs the GPU backward kernels too)."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import molora_ops
from molora_ops import backend
from utils import compare_with_reference, need_ext, op_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_and_context_manager():
    assert backend.get_backend() == "auto"
    with molora_ops.use_backend("reference"):
        assert backend.get_backend() == "reference"
        with molora_ops.use_backend("triton"):
            assert backend.get_backend() == "triton"
        assert backend.get_backend() == "reference"
    assert backend.get_backend() == "auto"
    molora_ops.set_backend("reference")
    try:
        assert backend.get_backend() == "reference"
        with molora_ops.use_backend("triton"):  # the block wins over the process default
            assert backend.get_backend() == "triton"
    finally:
        molora_ops.set_backend("auto")


def test_bad_backend_names_raise():
    with pytest.raises(ValueError, match="backend must be one of"):
        molora_ops.set_backend("tensorrt")
    with pytest.raises(ValueError, match="backend must be one of"):
        with molora_ops.use_backend("cudnn"):
            pass
    assert backend.get_backend() == "auto"


def _printed_in_fresh_process(expr: str, **env) -> str:
    """The last line ``print(<expr>)`` writes in a new interpreter with ``env`` set."""
    out = subprocess.run([sys.executable, "-c", f"import molora_ops; print({expr})"],
                         env=dict(os.environ, **env), cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("value,expected", [("triton", "triton"), (" Reference ", "reference"),
                                            ("", "auto")])
def test_env_variable(value, expected):
    assert _printed_in_fresh_process("molora_ops.get_backend()", MOLORA_BACKEND=value) == expected


def test_serving_rules():
    from molora_ops.ops import OPS
    for name in molora_ops.ALL_OPS:
        auto = backend.serving(name)
        if backend.has_cuda_kernel(name):
            assert auto == "cuda"
        else:
            assert auto == ("triton" if OPS[name].triton and backend.has_triton() else "reference")
        with molora_ops.use_backend("reference"):
            assert backend.serving(name) == "reference"
        with molora_ops.use_backend("cuda"):
            assert backend.serving(name) == ("cuda" if backend.has_cuda_kernel(name) else "none")


def test_every_op_has_a_cuda_kernel():
    """Every op has a CUDA kernel: the C++ one where the build has it, else the Python-registered
    Triton launcher / reference (bound once; no per-call backend lookup)."""
    for name in molora_ops.ALL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"molora::{name}", "CUDA"), name


def _dump(name):
    return torch._C._dispatch_dump(f"molora::{name}")


def test_cpu_kernels_registered_from_cpp():
    """With the extension, the CPU kernel of every op is the C++ one, registered directly."""
    need_ext()
    for name in molora_ops.ALL_OPS:
        line = [ln for ln in _dump(name).splitlines() if ln.startswith("CPU:")]
        assert line and "torch_bindings.cpp" in line[0], (name, line)


@pytest.mark.parametrize("name", ["reference", "triton", "cuda"])
def test_use_backend_restores_the_registrations(name):
    before = {op: _dump(op) for op in molora_ops.ALL_OPS}
    with molora_ops.use_backend(name):
        during = {op: _dump(op) for op in molora_ops.ALL_OPS}
    assert {op: _dump(op) for op in molora_ops.ALL_OPS} == before
    assert during != before  # the block did re-bind kernels


@pytest.mark.parametrize("name", ["reference", "triton", "cuda"])
def test_backend_override_is_allowed_under_the_older_torch(monkeypatch, name):
    """torch 2.11 (the GPU machine's) refuses Library.impl over a kernel registered from Python
    (an op without a CUDA C++ kernel has the lazy GPU entry) unless allow_override=True is
    passed; torch 2.13 allows it by default. set_backend must work under either: run it with
    2.11's default in force."""
    if name == "triton" and not backend.has_triton():
        pytest.skip("triton is not installed")
    real = torch.library.Library.impl
    calls = []

    def strict(self, op_name, fn, dispatch_key="", *, with_keyset=False, allow_override=False):
        calls.append(allow_override)
        return real(self, op_name, fn, dispatch_key, with_keyset=with_keyset,
                    allow_override=allow_override)

    monkeypatch.setattr(torch.library.Library, "impl", strict)
    torch.library._impls.add("molora/sgmv_shrink/CUDA")  # as the lazy GPU entry leaves it
    with molora_ops.use_backend(name):
        assert molora_ops.get_backend() == name
    assert calls and all(calls)


def test_cuda_op_test_knows_every_op():
    """test_cuda.py casts each op's data arguments to bf16 from its DATA_ARGS table: an op
    missing there fails only on a GPU machine (fused_moe_lora once did), so check it here."""
    from test_cuda import DATA_ARGS
    assert set(DATA_ARGS) == set(molora_ops.ALL_OPS)


def test_use_backend_reference_serves_cpu_unchanged():
    """The override is the CUDA key's only: CPU tensors keep their kernels under any backend."""
    x = torch.randn(5, 6)
    want = molora_ops.softmax_topk(x, 2)
    with molora_ops.use_backend("reference"):
        got = molora_ops.softmax_topk(x, 2)
    torch.testing.assert_close(got, want)


def test_info_reports_the_backends():
    from molora_ops.info import op_backends
    table = op_backends()
    assert set(table) == set(molora_ops.ALL_OPS)
    if backend.has_triton() and not backend.has_cuda_kernel("sgmv_shrink"):
        assert table["sgmv_shrink"]["CUDA"] == "Triton"
    with molora_ops.use_backend("reference"):
        assert op_backends()["sgmv_expand"]["CUDA"] == "reference (PyTorch)"
    with molora_ops.use_backend("cuda"):
        assert op_backends()["sgmv_expand"]["CUDA"].startswith("none")


def test_value_check_modes():
    assert molora_ops.value_checks() == "auto"
    ids = torch.tensor([[0, 5]])
    with pytest.raises(IndexError, match="outside"):  # CPU eager: host check, clear error
        molora_ops.reference.id_histogram(ids, 3)
    with molora_ops.use_value_checks("device"), pytest.raises(RuntimeError, match="outside"):
        molora_ops.reference.id_histogram(ids, 3)  # the device form (torch._assert_async)
    with pytest.raises(ValueError, match="mode must be"):
        molora_ops.set_value_checks("sometimes")
    assert molora_ops.value_checks() == "auto"


@pytest.mark.parametrize("value,expected", [("1", "host"), ("", "auto"), ("device", "device")])
def test_value_check_env_variable(value, expected):
    assert _printed_in_fresh_process("molora_ops.value_checks()",
                                     MOLORA_CHECK_VALUES=value) == expected


# --- the switched implementation, run on CPU tensors (Triton in its interpreter) ----------------

triton_only = pytest.mark.skipif(not backend.has_triton(), reason="triton is not installed")


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("chosen", ["triton", "reference"])
@pytest.mark.parametrize("name", sorted(backend.TRITON_OPS))
def test_python_kernels_match_reference(name, chosen):
    """The Python-served CUDA kernels of an op (Triton entry, reference entry), called directly."""
    from molora_ops.ops import OPS
    impl = OPS[name].triton_entry() if chosen == "triton" else OPS[name].reference_entry
    for _sid, args, kwargs in op_samples(name):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        ours = impl
        if name == "sgmv_shrink":  # the schema passes max_rank positionally
            ours = lambda *a, max_rank: impl(*a, max_rank)  # noqa: E731
        compare_with_reference(name, args, kwargs, ours_fn=ours)


@pytest.mark.triton
@triton_only
def test_triton_entry_checks_before_any_kernel():
    """Bad metadata and out-of-range values raise the op's errors on the Triton path: in host
    mode (and for CPU tensors in auto mode) as IndexError, in the device form (what CUDA tensors
    get by default) as the device assert's RuntimeError, before the kernel."""
    from molora_ops.ops import OPS
    impl = OPS["rank_sparse_expand"].triton_entry()
    values, B = torch.randn(4, 2), torch.randn(5, 6)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 6]], dtype=torch.int32)  # 6 >= R = 6
    with molora_ops.use_value_checks("host"), pytest.raises(IndexError, match="rank_sparse_expand"):
        impl(values, ids, B, None, 1.0, None)
    with molora_ops.use_value_checks("device"), pytest.raises(RuntimeError,
                                                             match="rank_sparse_expand.*outside"):
        impl(values, ids, B, None, 1.0, None)
    with pytest.raises(ValueError, match="rank_sparse_expand"):
        impl(values, ids[:3], B, None, 1.0, None)


def _emu_or_skip():
    from emu_utils import require_emu
    require_emu()


@pytest.fixture
def triton_as_cpu_kernels():
    """CPU tensors take the GPU path of backend "triton" for one test (the Triton kernels for the
    ops that have one, the emulated CUDA C++ kernels for the others); the C++ CPU kernels come
    back afterwards."""
    need_ext()
    _emu_or_skip()
    with backend.gpu_path_on_cpu("triton"):
        yield


def _layer_outputs(module, x, call=None):
    """(y, x.grad, parameter grads) of ``call`` (default: the module itself, e.g. its compiled
    wrapper) with the module's parameters."""
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = (module if call is None else call)(xi)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), xi.grad, grads


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("method", ["MoLA", "LoRAMoE", "HydraLoRA", "DynMoLE", "SMoRA", "MixLoRA"])
def test_methods_forward_backward_through_triton(method, request):
    """A whole method layer, forward and backward, with the Triton kernels serving the ops
    (shrink, expand, weight grads, routing-weight grads, gated fwd/bwd, rank-sparse) vs the same
    layer on the C++ CPU kernels."""
    from molora_ops.modules import methods as M
    d, d_ff = 24, 40
    lin = lambda a, b: nn.Linear(a, b, bias=False)  # noqa: E731
    make = {
        "MoLA": lambda: M.MoLA(lin(d, d), 5, r=6, dropout=0.0, init="gaussian"),
        "LoRAMoE": lambda: M.LoRAMoE(lin(d, d), 5, r=3, dropout=0.0, init="gaussian"),
        "HydraLoRA": lambda: M.HydraLoRA(lin(d, d), 3, r=5, dropout=0.0, init="gaussian"),
        "DynMoLE": lambda: M.DynMoLE(lin(d, d), dropout=0.0, init="gaussian"),
        "SMoRA": lambda: M.SMoRA(lin(d, d), r=16, k=4, dropout=0.0, init="gaussian"),
        "MixLoRA": lambda: M.MixLoRA(lin(d, d_ff), lin(d, d_ff), lin(d_ff, d), num_experts=5, r=6,
                                     dropout=0.0, init="gaussian"),
    }[method]
    module = make().eval()
    x = torch.randn(2, 7, d)
    y_c, gx_c, gp_c = _layer_outputs(module, x)  # C++ CPU kernels
    request.getfixturevalue("triton_as_cpu_kernels")
    y_t, gx_t, gp_t = _layer_outputs(module, x)  # Triton kernels (interpreter)
    torch.testing.assert_close(y_t, y_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_t, gx_c, rtol=1e-4, atol=1e-5)
    assert gp_t.keys() == gp_c.keys() and gp_c
    for n in gp_c:
        torch.testing.assert_close(gp_t[n], gp_c[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("name", sorted(backend.TRITON_OPS))
def test_opcheck_with_triton_kernels(name, triton_as_cpu_kernels):
    """torch.library.opcheck (schema, autograd registration, fake tensor, aot_dispatch_dynamic)
    with the Triton kernels serving the op (the op_samples include the ragged cases)."""
    op = getattr(torch.ops.molora, name).default
    for _sid, args, kwargs in op_samples(name):
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("method", ["MoLA", "HydraLoRA", "SMoRA"])
def test_compiled_method_with_triton_kernels(method, triton_as_cpu_kernels, dynamo_reset):
    """torch.compile(fullgraph=True) of a method layer whose ops run the Triton kernels: output
    and every gradient equal eager."""
    from molora_ops.modules import methods as M
    d = 24
    make = {"MoLA": lambda: M.MoLA(nn.Linear(d, d, bias=False), 5, r=6, dropout=0.0,
                                   init="gaussian"),
            "HydraLoRA": lambda: M.HydraLoRA(nn.Linear(d, d, bias=False), 3, r=5, dropout=0.0,
                                             init="gaussian"),
            "SMoRA": lambda: M.SMoRA(nn.Linear(d, d, bias=False), r=16, k=4, dropout=0.0,
                                     init="gaussian")}[method]
    module = make().eval()
    x = torch.randn(2, 5, d)
    y_e, gx_e, gp_e = _layer_outputs(module, x)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    y_c, gx_c, gp_c = _layer_outputs(module, x, compiled)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-6)
    for n in gp_e:
        torch.testing.assert_close(gp_c[n], gp_e[n], rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------------
# The CUDA C++ kernels behind the switch, in CPU emulation (torch.ops.molora_emu, csrc/emu/):
# "auto" on a GPU runs them for the router / dispatch / gather / combine / rank-top-k ops and the
# Triton kernels for the rest; these tests run exactly that combination on CPU tensors.
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def gpu_kernels_as_cpu_kernels():
    """CPU tensors take exactly the GPU path of backend "auto" for one test (the emulated CUDA C++
    kernels, the Triton kernels, device-side value checks); the C++ CPU kernels come back after."""
    need_ext()
    _emu_or_skip()
    with backend.gpu_path_on_cpu("auto"):
        yield


def _emu_kernel_ops():
    from molora_ops._emu import has_emu_kernel
    return [n for n in molora_ops.ops.ALL_OPS if has_emu_kernel(n)]


def test_gpu_path_runs_the_cuda_kernels(gpu_kernels_as_cpu_kernels):
    """On the GPU path: the C++ launcher serves the op (its checks raise in C++); float64 goes
    from the launcher to the reference (molora_ref); nothing is left overridden afterwards."""
    ops = _emu_kernel_ops()
    assert {"softmax_topk", "dispatch", "id_histogram", "rank_topk"} <= set(ops)
    x32, x64 = torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)
    w, ids = torch.ops.molora.softmax_topk(x32, 2, True)
    w_e, ids_e = torch.ops.molora_emu.softmax_topk(x32, 2, True)
    assert torch.equal(w, w_e) and torch.equal(ids, ids_e)
    w64, ids64 = torch.ops.molora.softmax_topk(x64, 2, True)
    w_r, ids_r = molora_ops.reference.softmax_topk(x64, 2, True)
    assert w64.dtype == torch.float64 and torch.equal(w64, w_r) and torch.equal(ids64, ids_r.int())
    with pytest.raises(ValueError, match="k must be"):
        torch.ops.molora.softmax_topk(x32, 5, True)  # checked in C++ (k > E)


def test_gpu_path_cuda_backend_matches_reference():
    """Every op with a CUDA C++ kernel, on the GPU path of backend "cuda", on its samples; the
    ops without one raise NotImplementedError there (no silent fallback)."""
    need_ext()
    _emu_or_skip()
    ops = _emu_kernel_ops()
    with backend.gpu_path_on_cpu("cuda"):
        for name in molora_ops.ops.ALL_OPS:
            for sid, args, kwargs in op_samples(name):
                if name not in ops:
                    with pytest.raises(NotImplementedError, match="no CUDA C"):
                        getattr(torch.ops.molora, name)(*args, *kwargs.values())
                    break
                try:
                    compare_with_reference(name, args, kwargs)
                except AssertionError as exc:
                    raise AssertionError(f"{name} sample {sid!r}: {exc}") from exc


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("method", ["MoLA", "DynMoLE", "SMoRA", "MixLoRA", "MeteoRA"])
def test_methods_forward_backward_through_gpu_kernels(method, request):
    """A whole method layer, forward and backward, on what "auto" runs on a GPU (CUDA C++ router,
    dispatch, gather/combine, rank top-k in emulation; Triton for the matmuls) vs the C++ CPU
    kernels."""
    from molora_ops.modules import methods as M
    d, d_ff = 24, 40
    lin = lambda a, b: nn.Linear(a, b, bias=False)  # noqa: E731
    make = {
        "MoLA": lambda: M.MoLA(lin(d, d), 5, r=6, dropout=0.0, init="gaussian"),
        "DynMoLE": lambda: M.DynMoLE(lin(d, d), dropout=0.0, init="gaussian"),
        "SMoRA": lambda: M.SMoRA(lin(d, d), r=16, k=4, dropout=0.0, init="gaussian"),
        "MixLoRA": lambda: M.MixLoRA(lin(d, d_ff), lin(d, d_ff), lin(d_ff, d), num_experts=5, r=6,
                                     dropout=0.0, init="gaussian"),
        "MeteoRA": lambda: M.MeteoRA(lin(d, d), 7, dropout=0.0, init="gaussian"),
    }[method]
    module = make().eval()
    x = torch.randn(2, 7, d)
    y_c, gx_c, gp_c = _layer_outputs(module, x)  # C++ CPU kernels
    request.getfixturevalue("gpu_kernels_as_cpu_kernels")
    y_g, gx_g, gp_g = _layer_outputs(module, x)  # CUDA C++ (emulated) + Triton (interpreter)
    torch.testing.assert_close(y_g, y_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_g, gx_c, rtol=1e-4, atol=1e-5)
    assert gp_g.keys() == gp_c.keys() and gp_c
    for n in gp_c:
        torch.testing.assert_close(gp_g[n], gp_c[n], rtol=1e-4, atol=1e-5, msg=n)


def test_opcheck_with_cuda_kernels(gpu_kernels_as_cpu_kernels):
    """torch.library.opcheck with the (emulated) CUDA C++ kernels serving the ops."""
    for name in _emu_kernel_ops():
        op = getattr(torch.ops.molora, name).default
        for _sid, args, kwargs in op_samples(name):
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
                continue
            torch.library.opcheck(op, args, kwargs)


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("method", ["MoLA", "DynMoLE", "SMoRA"])
def test_compiled_method_with_cuda_kernels(method, gpu_kernels_as_cpu_kernels, dynamo_reset):
    """torch.compile(fullgraph=True) of a method layer whose ops run what "auto" runs on a GPU
    (CUDA C++ router / dispatch / gather / rank top-k in emulation, Triton matmuls): output and
    every gradient equal eager."""
    from molora_ops.modules import methods as M
    d = 24
    make = {"MoLA": lambda: M.MoLA(nn.Linear(d, d, bias=False), 5, r=6, dropout=0.0,
                                   init="gaussian"),
            "DynMoLE": lambda: M.DynMoLE(nn.Linear(d, d, bias=False), dropout=0.0,
                                         init="gaussian"),
            "SMoRA": lambda: M.SMoRA(nn.Linear(d, d, bias=False), r=16, k=4, dropout=0.0,
                                     init="gaussian")}[method]
    module = make().eval()
    x = torch.randn(2, 5, d)
    y_e, gx_e, gp_e = _layer_outputs(module, x)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    y_c, gx_c, gp_c = _layer_outputs(module, x, compiled)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-6)
    assert gp_e
    for n in gp_e:
        torch.testing.assert_close(gp_c[n], gp_e[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gpu_path_value_checks_device_by_default_host_on_request(gpu_kernels_as_cpu_kernels):
    """An out-of-range id on the GPU path: the kernel's device assert stops it by default (no host
    read); the opt-in host mode raises the clear IndexError before any kernel runs. Both for a
    CUDA C++ op (gather_rows, id_histogram) and a Triton-served one (rank_sparse_expand)."""
    ids = torch.tensor([[0, 1], [2, 9]])
    order, pos, _ = molora_ops.dispatch(torch.tensor([[0, 1], [1, 0]]), 2)
    bad_order = order.clone()
    bad_order[1] = 7  # >= T*k = 4
    x = torch.randn(2, 3)
    cases = [lambda: torch.ops.molora.id_histogram(ids, 4),
             lambda: torch.ops.molora.gather_rows(x, bad_order, pos, None),
             lambda: torch.ops.molora.rank_sparse_expand(torch.randn(2, 2), ids, torch.randn(3, 4),
                                                         None, 1.0, None)]
    for case in cases:
        with pytest.raises(RuntimeError) as info:  # device assert (emulated) / _assert_async
            case()
        assert not isinstance(info.value, IndexError)
        with molora_ops.use_value_checks("host"), pytest.raises(IndexError, match="outside"):
            case()
