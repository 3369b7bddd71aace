"""The GPU hot path on a real device (docs/DESIGN.md "The GPU hot path (rules)"): the C++ CUDA
kernels are the ops' CUDA kernels (registered from C++), a whole layer step (forward, aux loss,
backward) makes no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``), and a
layer captures in a CUDA graph and replays to the eager result. The CPU-side proof of the same
(every Python read counted on the emulated GPU path) is test_gpu_path_sync_free.py."""
import pytest
import torch
from torch import nn

import molora_ops
from molora_ops import backend
from molora_ops.modules import methods as M

pytestmark = pytest.mark.cuda

D, D_FF = 64, 96
METHODS = ["MoLA", "MixLoRA", "SMoRA", "LoRAMoE", "HydraLoRA"]


def _make(method):
    lin = lambda a, b: nn.Linear(a, b, bias=False)  # noqa: E731
    return {
        "MoLA": lambda: M.MoLA(lin(D, D), 6, r=8, dropout=0.0, init="gaussian"),
        "MixLoRA": lambda: M.MixLoRA(lin(D, D_FF), lin(D, D_FF), lin(D_FF, D), num_experts=6,
                                     r=8, dropout=0.0, init="gaussian"),
        "SMoRA": lambda: M.SMoRA(lin(D, D), r=32, k=4, dropout=0.0, init="gaussian"),
        "LoRAMoE": lambda: M.LoRAMoE(lin(D, D), 5, r=4, dropout=0.0, init="gaussian"),
        "HydraLoRA": lambda: M.HydraLoRA(lin(D, D), 3, r=6, dropout=0.0, init="gaussian"),
    }[method]().cuda()


def _step(module, x):
    xi = x.clone().requires_grad_()
    y, routing = module(xi, return_routing=True)
    loss = (y.float() ** 2).mean()
    if hasattr(module, "aux_loss"):
        loss = loss + module.aux_loss(routing)
    loss.backward()
    return y


def test_cuda_cpp_kernels_are_registered_directly():
    ops = [n for n in molora_ops.ALL_OPS if backend.has_cuda_kernel(n)]
    if not ops:
        pytest.skip("this build has no CUDA C++ kernels")
    for name in ops:
        line = [ln for ln in torch._C._dispatch_dump(f"molora::{name}").splitlines()
                if ln.startswith("CUDA:")]
        assert line and "csrc/cuda/" in line[0], (name, line)  # the launcher, no Python


@pytest.mark.parametrize("method", METHODS)
def test_layer_step_has_no_host_sync(method):
    module = _make(method).train()
    x = torch.randn(4, 33, D, device="cuda")
    _step(module, x)  # warm-up: Triton compiles, caches, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(module, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("method", METHODS)
def test_layer_forward_graph_capture_replays_eager(method):
    module = _make(method).eval()
    static_x = torch.randn(4, 33, D, device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                module(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = module(static_x)
        for _ in range(2):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_y, module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["MoLA", "MixLoRA", "SMoRA"])
def test_layer_forward_backward_graphed_matches_eager(method):
    module = _make(method).eval()
    x = torch.randn(4, 33, D, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(module, (x,))
    for _ in range(2):
        xin = torch.randn_like(x).requires_grad_()
        module.zero_grad(set_to_none=True)
        y = graphed(xin)
        y.float().pow(2).mean().backward()
        got = (y.detach().clone(), xin.grad.clone(),
               {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
        module.zero_grad(set_to_none=True)
        xe = xin.detach().clone().requires_grad_()
        ye = module(xe)
        ye.float().pow(2).mean().backward()
        torch.testing.assert_close(got[0], ye.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], xe.grad, rtol=1e-4, atol=1e-5)
        for n, g in got[2].items():
            torch.testing.assert_close(g, dict(module.named_parameters())[n].grad, rtol=1e-4,
                                       atol=1e-5, msg=n)
