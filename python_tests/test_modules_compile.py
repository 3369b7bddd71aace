"""torch.compile(fullgraph=True) of the method modules: output, input gradient and every parameter
gradient match eager, for one method of each data path (grouped top-k, shared-base MoE-FFN, dense
stacked gated, ragged top-p, rank-wise sigmoid top-k, rank-wise top-k with a frozen A)."""
import pytest
import torch
import torch._dynamo
from torch import nn

from molora_ops.modules import methods as M

D, D_FF = 24, 40


def _lin(a, b):
    return nn.Linear(a, b, bias=False)


CASES = {
    "MoLA": lambda: M.MoLA(_lin(D, D), 5, init="gaussian", dropout=0.0),
    "MixLoRA": lambda: M.MixLoRA(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), dropout=0.0,
                                 init="gaussian"),
    "LoRAMoE": lambda: M.LoRAMoE(_lin(D, D), dropout=0.0, init="gaussian"),
    "HydraLoRA": lambda: M.HydraLoRA(_lin(D, D), dropout=0.0, init="gaussian"),
    "DynMoLE": lambda: M.DynMoLE(_lin(D, D), dropout=0.0, init="gaussian"),
    "SMoRA": lambda: M.SMoRA(_lin(D, D), r=16, k=4, dropout=0.0, init="gaussian"),
    "FlyLoRA": lambda: M.FlyLoRA(_lin(D, D), r=16, k=4, update_bias_in_eval=False),
}


@pytest.fixture(autouse=True)
def _reset_dynamo(dynamo_reset):
    yield


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_method_compiles_fullgraph(name, backend):
    module = CASES[name]().eval()
    if isinstance(module, M.FlyLoRA):
        nn.init.normal_(module.B)  # LoRA init leaves B = 0; make the adapter path count
    x = torch.randn(3, 7, D)

    def run(fn):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(torch.ones_like(y) * 0.5 + torch.arange(y.numel()).reshape(y.shape) * 1e-3)
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return y.detach(), xi.grad, grads

    y_e, gx_e, gp_e = run(module)
    y_c, gx_c, gp_c = run(torch.compile(module, backend=backend, fullgraph=True))
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-5)
    assert gp_c.keys() == gp_e.keys() and gp_e, "no parameter received a gradient"
    for n in gp_e:
        torch.testing.assert_close(gp_c[n], gp_e[n], rtol=1e-4, atol=1e-5, msg=n)
