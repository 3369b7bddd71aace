"""The GPU path makes no host read of tensor data (docs/DESIGN.md "The GPU hot path (rules)").

Whole layers (a routed MoE-LoRA linear, the MixLoRA FFN, SMoRA; each with its aux loss) run
forward and backward on exactly the code a GPU runs (``backend.gpu_path_on_cpu``: the CUDA C++
kernels in CPU emulation, the Triton kernels in Triton's interpreter, value checks in their
device form) while ``count_host_reads`` records every Python-level read of tensor data (``item``,
``__bool__``, ``__int__``, ``tolist``, ``.cpu()``, ``nonzero``, bool-mask indexing, ...). No read
may come from molora_ops: not from the modules, the aux losses, the op layer, the checks or the
Triton launchers. (Reads inside Triton's interpreter are the interpreter's own: on a GPU there
is none.) Each case also checks the outputs against the same step on the C++ CPU kernels, so the
path under test really ran.
"""
import pytest
import torch
from torch import nn

import molora_ops
from molora_ops import backend
from molora_ops.modules import methods as M
from utils import need_ext

host_reads = pytest.importorskip("host_reads")

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not backend.has_triton(), reason="triton is not installed")]

D, D_FF = 16, 24


def _lin(a, b):
    return nn.Linear(a, b, bias=False)


def _make(method):
    return {
        "MoLA": lambda: M.MoLA(_lin(D, D), 5, r=6, dropout=0.0, init="gaussian"),
        "MixLoRA": lambda: M.MixLoRA(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), num_experts=5,
                                     r=6, dropout=0.0, init="gaussian"),
        "SMoRA": lambda: M.SMoRA(_lin(D, D), r=16, k=4, dropout=0.0, init="gaussian"),
    }[method]()


def _step(module, x, state):
    """From ``state``: forward + aux loss (SMoRA: its aux-loss-free bias update, in training) +
    backward; returns (y, loss, x.grad, parameter grads, buffers after the step)."""
    module.load_state_dict(state)
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y, routing = module(xi, return_routing=True)
    loss = (y * torch.linspace(0.5, 1.5, y.numel()).reshape(y.shape)).sum()
    if hasattr(module, "aux_loss"):
        loss = loss + module.aux_loss(routing)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    grads.update({f"buffer:{n}": b.clone() for n, b in module.named_buffers()})
    return y.detach(), loss.detach(), xi.grad, grads


@pytest.mark.parametrize("method", ["MoLA", "MixLoRA", "SMoRA"])
def test_layer_step_on_gpu_path_reads_nothing(method):
    need_ext()
    from emu_utils import require_emu
    require_emu()
    module = _make(method).train()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(2, 7, D)
    with host_reads.count_host_reads() as cpu_reads:
        want = _step(module, x, state)  # C++ CPU kernels, host value checks (CPU eager)
    if hasattr(module, "aux_loss"):  # the counter sees this step's checks when they read
        assert cpu_reads.under("molora_ops/"), "the aux loss checked its ids without a read?"
    with backend.gpu_path_on_cpu("auto"):
        _step(module, x, state)  # warm-up: first-call binding of the Triton launchers, caches
        with host_reads.count_host_reads() as reads:
            got = _step(module, x, state)
    ours = reads.under("molora_ops/")
    assert not ours, reads.report(ours)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-5)
    assert got[3].keys() == want[3].keys() and want[3]
    for n in want[3]:
        torch.testing.assert_close(got[3][n], want[3][n], rtol=1e-4, atol=1e-5, msg=n)


def test_counter_sees_host_checks():
    """The counter would catch a host value check (the same op in host mode reads the data)."""
    ids = torch.tensor([[0, 2], [1, -1]])
    with host_reads.count_host_reads() as reads:
        with molora_ops.use_value_checks("host"):
            molora_ops.reference.id_histogram(ids, 3)
    assert reads.under("molora_ops/")
    with host_reads.count_host_reads() as reads:
        with molora_ops.use_value_checks("device"):
            molora_ops.reference.rank_scatter(torch.randn(2, 2), ids, 3)
    assert not reads.under("molora_ops/_checks.py"), reads.report()
