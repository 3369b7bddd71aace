"""Meta-device init (the FSDP2 / accelerate big-model path) for every method layer.

Build under ``torch.device("meta")``, ``to_empty(device="cpu")`` (parameters and buffers then hold
uninitialised memory), reset (``molora_ops.modules.reset_parameters`` or a plain
``for m in model.modules(): m.reset_parameters()`` loop): every buffer must equal the one of a
layer built normally, and with the normally built layer's parameters copied in, the outputs must
be equal and the gradients finite.
"""

import pytest
import torch
from torch import nn

from molora_ops.modules import (CoMoL, DynMoLE, FlexMoRE, FlyLoRA, HydraLoRA, LLaVAMoLE,
                                LoRALinear, LoRAMixer, LoRAMoE, LoRASoupsCAT, MeteoRA, MixLoRA,
                                MiLoRALinear, MoELoRA, MoLA, MoLE, MoRA, PolyLinear, ReMix,
                                SMoRA, XLoRALinear, reset_parameters)
from molora_ops.modules import methods as methods_module

D, DFF, DOUT = 16, 24, 12


def ffn(bias=False):
    return nn.Linear(D, DFF, bias=bias), nn.Linear(D, DFF, bias=bias), nn.Linear(DFF, D, bias=bias)


def lin():
    return nn.Linear(D, DOUT)


BUILDERS = {
    "MixLoRA": lambda: MixLoRA(*ffn(), num_experts=4, k=2, r=4, dropout=0.0, init="gaussian"),
    "MixLoRA-switch": lambda: MixLoRA(*ffn(True), num_experts=4, r=4, dropout=0.0,
                                      routing="switch", init="gaussian"),
    "LLaVAMoLE": lambda: LLaVAMoLE(*ffn(), num_experts=3, r=4, dropout=0.0, init="gaussian"),
    "MoLA": lambda: MoLA(lin(), 4, k=2, r=4, dropout=0.0, init="gaussian"),
    "LoRAMoE": lambda: LoRAMoE(lin(), 3, r=4, dropout=0.0, init="gaussian"),
    "HydraLoRA": lambda: HydraLoRA(lin(), 3, r=4, dropout=0.0, init="gaussian"),
    "DynMoLE": lambda: DynMoLE(lin(), 4, r=4, dropout=0.0, init="gaussian"),
    "MeteoRA": lambda: MeteoRA(lin(), 4, r=4, k=2, scales=[0.5, 1.0, 1.5, 2.0], init="gaussian"),
    "FlexMoRE": lambda: FlexMoRE(lin(), [1, 2, 4], k=2, init="gaussian"),
    "MoELoRA": lambda: MoELoRA(lin(), 4, 2, 4, dropout=0.0, init="gaussian"),
    "LoRAMixer": lambda: LoRAMixer(lin(), 4, 2, 4, dropout=0.0, init="gaussian"),
    "ReMix": lambda: ReMix(lin(), 4, 2, 4, dropout=0.0, init="gaussian"),
    "LoRASoupsCAT": lambda: LoRASoupsCAT(lin(), [2, 4], init="gaussian"),
    "MoLE": lambda: MoLE(lin(), [2, 3], init="gaussian"),
    "CoMoL": lambda: CoMoL(lin(), 4, 4, dropout=0.0, k=2, init="gaussian"),
    "SMoRA": lambda: SMoRA(lin(), r=8, k=2, dropout=0.0, init="gaussian"),
    "FlyLoRA": lambda: FlyLoRA(lin(), r=8, k=2),
    "MoRA": lambda: MoRA(lin(), r=8, k=2, init="gaussian"),
    "LoRALinear": lambda: LoRALinear(lin(), 4, 8.0, init="gaussian"),
    "PolyLinear": lambda: PolyLinear(lin(), 3, 2, 4, 8.0, init="gaussian"),
    "MiLoRALinear": lambda: MiLoRALinear(lin(), 4, 8.0, init="gaussian"),
    "XLoRALinear": lambda: XLoRALinear(lin(), [2, 3], [4.0, 9.0], trainable_adapters=True,
                                       init="gaussian"),
}


def test_every_method_class_is_covered():
    classes = {type(b()).__name__ for b in BUILDERS.values()}
    missing = [n for n in methods_module.__all__
               if isinstance(getattr(methods_module, n), type) and n not in classes
               and n != "RankwiseLoRALinear"]   # abstract core of SMoRA / FlyLoRA / MoRA
    assert not missing


def forward(m, x):
    if isinstance(m, PolyLinear):
        return m(x, torch.tensor([2, 0]))
    if isinstance(m, MiLoRALinear):
        return m(x, torch.tensor([0.3, 0.9]))
    return m(x)


def meta_built(name, order):
    with torch.device("meta"):
        m = BUILDERS[name]()
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    with torch.no_grad():   # garbage that cannot pass for a valid buffer by chance
        for b in m.buffers():
            b.fill_(-7 if not b.is_floating_point() else float("nan"))
    if order == "helper":
        assert reset_parameters(m) is m
    else:                   # FSDP2 docs' loop: parents before children
        for mod in m.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    return m


@pytest.mark.parametrize("order", ["helper", "modules_loop"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_meta_to_empty_reset_matches_normal_build(name, order):
    torch.manual_seed(0)
    ref = BUILDERS[name]()
    m = meta_built(name, order)

    ref_buffers = dict(ref.named_buffers())
    for key, b in m.named_buffers():
        assert b.device.type == "cpu"
        assert torch.equal(b, ref_buffers[key]), key
    # every parameter got a finite init, trainable flags as in the normal build
    for (key, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.isfinite(p).all(), key
        assert p.requires_grad == q.requires_grad, key

    with torch.no_grad():
        for key, p in m.named_parameters():
            p.copy_(ref.get_parameter(key))
    m.eval()
    ref.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, m_in(ref), generator=g)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y = forward(ref, x1), forward(m, x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    w = torch.randn(y.shape, generator=g)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    # (LLaVA-MoLE's sparse router gets no task gradient, as released: None on both sides)
    grads = {k: p.grad for k, p in m.named_parameters() if p.requires_grad}
    assert any(gr is not None for gr in grads.values())
    for k, gr in grads.items():
        ref_grad = ref.get_parameter(k).grad
        assert (gr is None) == (ref_grad is None), k
        if gr is not None:
            assert torch.isfinite(gr).all(), k
            torch.testing.assert_close(gr, ref_grad, rtol=0, atol=0)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)


def m_in(m):
    return D


def test_router_keeps_its_normal_init_in_any_reset_order():
    """MixLoRA's router is N(0, 0.02), not nn.Linear's kaiming U(+-1/sqrt(d)) (std ~0.14 here):
    a parents-first loop must not leave the kaiming init of the router's Linear."""
    for order in ("helper", "modules_loop"):
        torch.manual_seed(3)
        m = meta_built("MixLoRA", order)
        w = m.router.linear.weight
        assert 0.005 < float(w.detach().std()) < 0.05


def test_flylora_reset_restores_the_sparse_frozen_a():
    for order in ("helper", "modules_loop"):
        m = meta_built("FlyLoRA", order)
        A = m.A
        r, d_in = A.shape
        nnz = d_in // (r // m.k)
        assert not A.requires_grad
        assert ((A != 0).sum(1) == nnz).all()


def test_normal_build_unchanged_by_reset():
    """Resetting a normally built layer's buffers gives the same buffers (constants)."""
    torch.manual_seed(0)
    m = BUILDERS["MeteoRA"]()
    before = {k: b.clone() for k, b in m.named_buffers()}
    reset_parameters(m)
    for k, b in m.named_buffers():
        assert torch.equal(b, before[k])
    assert torch.equal(m.bank.scales, torch.tensor([0.5, 1.0, 1.5, 2.0]))
