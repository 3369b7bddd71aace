"""The package works without its native extension (a pure-Python install): every op is still
declared (torch.ops.molora), the reference serves CPU tensors and the Triton launchers / reference
serve CUDA tensors, and a single warning says so. Run in a subprocess so the extension state of
this process is untouched."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import molora_ops
        import molora_ops.ops  # a second import must not warn again
    import torch
    assert not molora_ops.has_extension()
    assert "MOLORA_DISABLE_EXT" in molora_ops.extension_error()
    notes = [w for w in caught if "native extension not loaded" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    torch.manual_seed(0)
    logits = torch.randn(9, 5)
    w, ids = molora_ops.softmax_topk(logits, 2)
    w_ref, ids_ref = molora_ops.reference.softmax_topk(logits, 2)
    assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref)
    order, pos, offsets = molora_ops.dispatch(ids, 5)
    x = torch.randn(9, 4, requires_grad=True)
    y = molora_ops.combine_rows(molora_ops.gather_rows(x, order, pos), order, pos, w)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(9, 4) * w.sum(1, keepdim=True))
    try:
        molora_ops.dispatch(ids, 1)
    except IndexError as exc:
        assert "molora.dispatch" in str(exc)
    else:
        raise AssertionError("out-of-range ids were accepted on the reference path")
    for name in molora_ops.ALL_OPS:  # every op declared, with Python kernels for CPU and CUDA
        dump = torch._C._dispatch_dump(f"molora::{name}")
        cpu = [ln for ln in dump.splitlines() if ln.startswith("CPU:")][0]
        cuda = [ln for ln in dump.splitlines() if ln.startswith("CUDA:")][0]
        assert "_registry.py" in cpu and "_registry.py" in cuda, dump
        assert not molora_ops.backend.has_cuda_kernel(name)
    from molora_ops import backend
    want = "triton" if backend.has_triton() else "reference"
    assert backend.serving("sgmv_shrink") == want and backend.serving("dispatch") == "reference"
    x = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.molora.softmax_topk.default, (x, 2, True))
    print("reference path ok")
""")


def test_reference_path_without_extension():
    env = dict(os.environ, MOLORA_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "reference path ok" in out.stdout


ROUTED_SCRIPT = textwrap.dedent("""
    import torch
    import molora_ops
    from molora_ops import reference as ref
    assert not molora_ops.has_extension()
    g = torch.Generator().manual_seed(0)
    T, d_in, d_out, E, k = 9, 8, 6, 4, 2
    ro = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)
    leaves = dict(x=torch.randn(T, d_in, generator=g, dtype=torch.float64),
                  Wr=torch.randn(E, d_in, generator=g, dtype=torch.float64),
                  br=torch.randn(E, generator=g, dtype=torch.float64),
                  A=torch.randn(10, d_in, generator=g, dtype=torch.float64),
                  B=torch.randn(d_out, 10, generator=g, dtype=torch.float64),
                  W=torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
                  b=torch.randn(d_out, generator=g, dtype=torch.float64))
    s = torch.rand(E, generator=g, dtype=torch.float64) + 0.5
    grads = []
    for fn in (molora_ops.routed_moe_lora_linear, ref.routed_moe_lora_linear):
        ts = {n: v.clone().requires_grad_() for n, v in leaves.items()}
        y, logits, w, ids = fn(ts["x"], ts["Wr"], ts["A"], ts["B"], ro, k, s,
                               router_bias=ts["br"], weight=ts["W"], bias=ts["b"],
                               algo="grouped")
        loss = y.square().sum() + logits.sin().sum() + (w * 1.5).sum()
        grads.append(torch.autograd.grad(loss, list(ts.values())))
    for n, a, b in zip(leaves, *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=n)
    print("routed python formula ok")
""")


def test_routed_python_formula_without_extension():
    """Op routed_moe_lora's Python formula (the one a pure-Python build runs; the extension's C++
    autograd kernel replaces it): routed_moe_lora_linear's gradients equal the definition's."""
    env = dict(os.environ, MOLORA_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", ROUTED_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "routed python formula ok" in out.stdout
