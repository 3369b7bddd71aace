"""torch.compile(fullgraph=True) of the method modules: output, input gradient and every parameter
gradient match eager, for one method of each data path (grouped top-k, shared-base MoE-FFN, dense
stacked gated, ragged top-p, rank-wise sigmoid top-k, rank-wise top-k with a frozen A); and a
training step that adds the method's aux loss (its value checks traced as device asserts, no
data-dependent shape) compiles to one graph with the same loss, gradients and buffer updates."""
import pytest
import torch
import torch._dynamo
from torch import nn

from molora_ops.modules import methods as M
from molora_ops.modules import sequence as Q
from molora_ops.modules import xlora as X

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


# --- a training step with the method's aux loss: one graph, same values as eager ----------------

B, S = 2, 5
_MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def _plain(m, y, r):
    return 0


def _masked_aux(m, y, r):
    return m.aux_loss(r, attention_mask=_MASK)


# name -> (build, aux(module, y, routing)); forward on x [B, S, D], loss = weighted sum + aux
AUX_CASES = {
    "MixLoRA": (lambda: M.MixLoRA(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), 4, r=4,
                                  dropout=0.0, init="gaussian"), _masked_aux),
    "MixLoRA-switch": (lambda: M.MixLoRA(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), 4, r=4,
                                         dropout=0.0, init="gaussian", routing="switch",
                                         expert_capacity=3), _masked_aux),
    "MixLoRA-dynamic": (lambda: M.MixLoRA(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), 4, r=4,
                                          dropout=0.0, init="gaussian", routing="dynamic"),
                        _masked_aux),
    "LLaVAMoLE": (lambda: M.LLaVAMoLE(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), r=4,
                                      dropout=0.0, init="gaussian"),
                  lambda m, y, r: m.aux_loss(r, (B, S), attention_mask=_MASK)),
    "MoLA": (lambda: M.MoLA(_lin(D, D), 5, init="gaussian", dropout=0.0),
             lambda m, y, r: m.aux_loss(r)),
    "DynMoLE": (lambda: M.DynMoLE(_lin(D, D), 4, r=4, dropout=0.0, init="gaussian"),
                _masked_aux),
    "LoRAMoE-lbc": (lambda: M.LoRAMoE(_lin(D, D), 4, dropout=0.0, init="gaussian",
                                      lbc_weight=0.1, lbc_alpha=0.1),
                    lambda m, y, r: m.aux_loss(r, torch.tensor([1, 0]), (B, S), _MASK)),
    "MeteoRA": (lambda: M.MeteoRA(_lin(D, D), 6, init="gaussian"),
                lambda m, y, r: m.aux_loss(
                    r, torch.tensor([[0, 1, -100, 5, 2], [3, -100, 4, 4, 0]]), (B, S))),
    "LoRAMixer": (lambda: M.LoRAMixer(_lin(D, D), dropout=0.0, init="gaussian"), _masked_aux),
    "MoELoRA-contrastive": (lambda: M.MoELoRA(_lin(D, D), 4, dropout=0.0, init="gaussian"),
                            None),
    "SMoRA-train": (lambda: M.SMoRA(_lin(D, D), r=16, k=4, dropout=0.0, init="gaussian",
                                    bias_rate=0.05), _plain),
    "XLoRA-topk-softmax": (lambda: X.XLoRALinear(_lin(D, D), [2, 4, 3], 8.0, init="gaussian",
                                                 top_k_lora=2, enable_softmax_topk=True,
                                                 trainable_adapters=True), None),
    "Poly-straight_through": (lambda: Q.PolyLinear(_lin(D, D), 3, 4, 4, 8.0, init="gaussian",
                                                   routing="straight_through"), None),
}


def _aux_step(name, module):
    """The compiled unit: forward + aux loss -> a scalar (weights make every output count)."""
    _, aux = AUX_CASES[name]
    w = torch.linspace(0.5, 1.5, B * S * D).reshape(B, S, D)

    def step(x):
        if name == "MoELoRA-contrastive":
            y, r, o = module(x, return_routing=True, return_expert_outputs=True)
            return (y * w).sum() + module.aux_loss(r, o, attention_mask=_MASK)
        if name.startswith("XLoRA"):
            return (module(x, torch.softmax(x[..., :3] * 2, -1)) * w).sum()
        if name.startswith("Poly"):
            return (module(x, torch.tensor([0, 2])) * w).sum()
        y, r = module(x, return_routing=True)
        return (y * w).sum() + aux(module, y, r)

    return step


def _run_step(module, fn, x, buffers):
    module.load_state_dict(buffers, strict=False)  # same starting buffers (SMoRA's bias)
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    loss = fn(xi)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), xi.grad, grads, {n: b.clone() for n, b in module.named_buffers()}


def _check_aux_step(name, backend):
    module = AUX_CASES[name][0]().train()
    x = torch.randn(B, S, D)
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    step = _aux_step(name, module)
    eager = _run_step(module, step, x, buffers)
    compiled = _run_step(module, torch.compile(step, backend=backend, fullgraph=True), x, buffers)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-5)
    assert compiled[2].keys() == eager[2].keys() and eager[2], "no parameter received a gradient"
    for n in eager[2]:
        torch.testing.assert_close(compiled[2][n], eager[2][n], rtol=1e-4, atol=1e-5, msg=n)
    for n in eager[3]:  # in-place buffer updates (aux-loss-free bias) happen once, as in eager
        torch.testing.assert_close(compiled[3][n], eager[3][n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("name", sorted(AUX_CASES))
def test_training_step_with_aux_loss_compiles_fullgraph(name):
    _check_aux_step(name, "aot_eager")


@pytest.mark.slow
def test_training_step_with_aux_loss_compiles_fullgraph_inductor():
    _check_aux_step("MixLoRA", "inductor")
