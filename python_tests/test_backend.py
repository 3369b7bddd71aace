"""The backend switch (molora_ops.backend): selection rules, the env variable, the context manager,
its registration as the CUDA kernel of the ops, and, through Triton's interpreter on CPU tensors,
the switched implementation against the reference: every sample of every Triton op directly,
and whole forward + backward passes with the Triton kernels temporarily installed as the ops' CPU
kernels (so autograd runs the Triton backward kernels too)."""
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


@pytest.mark.parametrize("value,expected", [("triton", "triton"), (" Reference ", "reference"),
                                            ("", "auto")])
def test_env_variable(value, expected):
    code = "import molora_ops; print(molora_ops.get_backend())"
    env = dict(os.environ, MOLORA_BACKEND=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected


def test_choose_rules():
    x32, x64 = torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)
    assert backend.choose("sgmv_shrink", (x32,), "auto") == "triton"
    assert backend.choose("sgmv_shrink", (x64,), "auto") == "reference"  # kernels take no fp64
    assert backend.choose("sgmv_shrink", (x32,), "reference") == "reference"
    assert backend.choose("softmax_topk", (x32,), "triton") == "reference"  # no kernel yet
    with pytest.raises(TypeError, match="float64"):
        backend.choose("sgmv_expand", (x64,), "triton")
    with pytest.raises(NotImplementedError, match="no CUDA C\\+\\+ kernel"):
        backend.choose("sgmv_shrink", (x32,), "cuda")
    with pytest.raises(ValueError, match="unknown op"):
        backend.choose("not_an_op", (x32,), "auto")


def test_registered_as_cuda_kernel_of_every_op():
    need_ext()
    for name in molora_ops.ALL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"molora::{name}", "CUDA"), name


def test_info_reports_the_switch():
    from molora_ops.info import op_backends
    need_ext()
    table = op_backends()
    assert table["sgmv_shrink"]["CUDA"] == "Triton (switch)"
    assert table["softmax_topk"]["CUDA"] == "reference (switch)"
    with molora_ops.use_backend("reference"):
        assert op_backends()["sgmv_expand"]["CUDA"] == "reference (switch)"
    with molora_ops.use_backend("cuda"):
        assert op_backends()["sgmv_expand"]["CUDA"].startswith("none")


# --- the switched implementation, run on CPU tensors (Triton in its interpreter) ----------------

triton_only = pytest.mark.skipif(not backend.has_triton(), reason="triton is not installed")


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("chosen", ["triton", "reference"])
@pytest.mark.parametrize("name", sorted(backend.TRITON_OPS))
def test_switched_impl_matches_reference(name, chosen):
    impl = backend.cuda_impl(name)
    for _sid, args, kwargs in op_samples(name):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        ours = impl
        if name == "sgmv_shrink":  # the schema passes max_rank positionally
            ours = lambda *a, max_rank: impl(*a, max_rank)  # noqa: E731
        with molora_ops.use_backend(chosen):
            compare_with_reference(name, args, kwargs, ours_fn=ours)


@pytest.mark.triton
@triton_only
def test_switched_impl_checks_before_any_kernel():
    """Bad metadata and out-of-range values raise the op's errors on the Triton path."""
    impl = backend.cuda_impl("rank_sparse_expand")
    values, B = torch.randn(4, 2), torch.randn(5, 6)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 6]], dtype=torch.int32)  # 6 >= R = 6
    with molora_ops.use_backend("triton"), pytest.raises(IndexError, match="rank_sparse_expand"):
        impl(values, ids, B, None, 1.0, None)
    with molora_ops.use_backend("triton"), pytest.raises(ValueError, match="rank_sparse_expand"):
        impl(values, ids[:3], B, None, 1.0, None)


@pytest.fixture
def triton_as_cpu_kernels():
    """Installs the switch (backend "triton") as the CPU kernel of every Triton op for one test;
    the C++ CPU kernels come back when the library handle is destroyed."""
    need_ext()
    import warnings
    lib = torch.library.Library("molora", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name in backend.TRITON_OPS:
            lib.impl(name, backend.cuda_impl(name), "CPU")
    try:
        with molora_ops.use_backend("triton"):
            yield
    finally:
        lib._destroy()


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

def _emu_or_skip():
    from emu_utils import require_emu
    require_emu()


@pytest.fixture
def gpu_kernels_as_cpu_kernels():
    """Installs the switch (backend "auto", CUDA C++ kernels taken from the emulation module) as
    the CPU kernel of every op for one test; the C++ CPU kernels come back afterwards."""
    need_ext()
    _emu_or_skip()
    import warnings
    lib = torch.library.Library("molora", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name in molora_ops.ops.ALL_OPS:
            lib.impl(name, backend.cuda_impl(name), "CPU")
    try:
        with backend.use_cuda_kernels_from("molora_emu", "CPU"), molora_ops.use_backend("auto"):
            yield
    finally:
        lib._destroy()


def _emu_kernel_ops():
    return [n for n in molora_ops.ops.ALL_OPS if backend.has_cuda_kernel(n)]


def test_switch_picks_cuda_kernels():
    """With CUDA C++ kernels present: auto -> cuda (fp64 -> reference), cuda -> cuda, reference
    and triton as documented; the switch calls them without its Python checks."""
    need_ext()
    _emu_or_skip()
    x32, x64 = torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)
    with backend.use_cuda_kernels_from("molora_emu", "CPU"):
        ops = _emu_kernel_ops()
        assert "softmax_topk" in ops and "dispatch" in ops and "id_histogram" in ops
        for name in ops:
            assert backend.choose(name, (x32,), "auto") == "cuda"
            assert backend.choose(name, (x32,), "cuda") == "cuda"
            assert backend.choose(name, (x32,), "reference") == "reference"
            assert backend.choose(name, (x64,), "auto") == "reference"
            # ops without a Triton kernel run what "auto" picks under the "triton" backend
            if name not in backend.TRITON_OPS:
                assert backend.choose(name, (x32,), "triton") == "cuda"
        assert backend.resolve("softmax_topk", (x32,), "cuda")[1] is torch.ops.molora_emu.softmax_topk
        with molora_ops.use_backend("cuda"), pytest.raises(TypeError):  # the launcher rejects fp64
            backend.cuda_impl("softmax_topk")(x64, 2, True)
        with molora_ops.use_backend("cuda"), pytest.raises(ValueError, match="k must be"):
            backend.cuda_impl("softmax_topk")(x32, 5, True)  # checked in C++ (k > E)
    assert not backend.has_cuda_kernel("softmax_topk")  # restored: this build has no CUDA


def test_switch_cuda_kernels_match_reference():
    """Every op with a CUDA C++ kernel, through the switch (backend "cuda"), on its samples."""
    need_ext()
    _emu_or_skip()
    with backend.use_cuda_kernels_from("molora_emu", "CPU"), molora_ops.use_backend("cuda"):
        for name in _emu_kernel_ops():
            impl = backend.cuda_impl(name)
            for sid, args, kwargs in op_samples(name):
                if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
                    continue  # fp64 is the reference's (covered above)
                try:
                    compare_with_reference(name, args, kwargs, ours_fn=impl)
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
