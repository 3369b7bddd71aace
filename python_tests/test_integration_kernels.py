"""molora_ops.integrations.hf_kernels with the installed Hugging Face ``kernels`` package.

``kernelize`` under ``use_kernel_mapping(kernel_layer_mapping())`` must bind molora's fused
forward to the marked reference hosts (``GatedLoRALinear``, ``TopKLoRALinear``), through the
in-process repository and through a ``LocalLayerRepository`` directory, with outputs and
gradients equal to the hosts' own loops. CPU, fp32, random non-zero experts, no network.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

kernels = pytest.importorskip("kernels")

from kernels import Mode, kernelize, use_kernel_mapping  # noqa: E402

from molora_ops.integrations.hf_kernels import (GATED_LAYER_NAME, TOPK_LAYER_NAME,  # noqa: E402
                                                GatedLoRALinear, MoloraLayerRepository,
                                                TopKLoRALinear, kernel_layer_mapping, layers)

TOL = dict(rtol=1e-5, atol=1e-5)
D_IN, D_OUT, E, R = 24, 20, 5, 4


class Block(nn.Module):
    """A model holding both hosts: a router picks the top-2 experts of the sparse layer."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D_IN, E)
        self.dense = GatedLoRALinear(nn.Linear(D_IN, D_IN), E, R, alpha=8.0, init="gaussian")
        self.sparse = TopKLoRALinear(nn.Linear(D_IN, D_OUT), E, R, alpha=8.0, init="gaussian")

    def forward(self, x):
        p = torch.softmax(self.router(x), -1)
        h = self.dense(x, p)
        w, ids = torch.topk(p, 2, dim=-1)
        ids = torch.where(w > 0.3, ids, torch.full_like(ids, -1))      # some dropped slots
        return self.sparse(torch.relu(h), w / w.sum(-1, keepdim=True), ids)


def block(seed=0):
    torch.manual_seed(seed)
    return Block()


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 6, D_IN, generator=g)


def bound(module):
    return getattr(module.forward, "__func__", None)


def run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("repo", ["in_process", "local_dir"])
def test_kernelize_swaps_in_the_fused_forward_and_matches(repo, tmp_path):
    ref_model, model = block(), block()
    x = data()
    y_ref, gx_ref, g_ref = run(ref_model, x)
    assert y_ref.abs().max() > 0 and any(n.endswith("lora_B") for n in g_ref)
    mapping = kernel_layer_mapping(local_repo=tmp_path / "repo" if repo == "local_dir" else None)
    with use_kernel_mapping(mapping, inherit_mapping=False):
        assert kernelize(model, mode=Mode.TRAINING, device="cpu") is model
    fused_gated = getattr(layers, GATED_LAYER_NAME).forward
    fused_topk = getattr(layers, TOPK_LAYER_NAME).forward
    assert bound(model.dense) is fused_gated and bound(model.sparse) is fused_topk
    y, gx, g = run(model, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    assert sorted(g) == sorted(g_ref)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], **TOL)
    # the base linears are frozen by the hosts; the experts train
    assert not any(".base_layer." in n for n in g)


def test_outside_the_mapping_the_reference_forward_stays(tmp_path):
    model = block()
    with use_kernel_mapping({}, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    assert bound(model.dense) is GatedLoRALinear.forward


def test_dropout_is_one_shared_mask_like_the_reference():
    torch.manual_seed(0)
    ref = GatedLoRALinear(nn.Linear(D_IN, D_OUT), E, R, alpha=8.0, dropout=0.3, init="gaussian")
    fused = GatedLoRALinear(nn.Linear(D_IN, D_OUT), E, R, alpha=8.0, dropout=0.3)
    fused.load_state_dict(ref.state_dict())
    with use_kernel_mapping(kernel_layer_mapping(), inherit_mapping=False):
        kernelize(fused, mode=Mode.TRAINING, device="cpu")
    x, gate = data(), torch.rand(3, 6, E)
    torch.manual_seed(5)
    y_ref = ref(x, gate)
    torch.manual_seed(5)
    torch.testing.assert_close(fused(x, gate), y_ref, **TOL)
    ref.eval()
    fused.eval()
    torch.testing.assert_close(fused(x, gate), ref(x, gate), **TOL)


def test_torch_compile_of_the_kernelized_model():
    ref_model, model = block(), block()
    with use_kernel_mapping(kernel_layer_mapping(), inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE | Mode.TORCH_COMPILE, device="cpu")
    assert bound(model.dense) is getattr(layers, GATED_LAYER_NAME).forward
    compiled = torch.compile(model, backend="aot_eager")
    x = data(3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref_model(x), **TOL)


def test_kernel_layers_are_pure_and_flagged():
    for name in (GATED_LAYER_NAME, TOPK_LAYER_NAME):
        cls = getattr(layers, name)
        assert cls.__init__ is nn.Module.__init__
        assert cls.has_backward and cls.can_torch_compile
        extra = {n for n in dir(cls)} - {n for n in dir(nn.Module)}
        assert extra <= {"has_backward", "can_torch_compile"}
        assert MoloraLayerRepository(name).load() is cls
    assert MoloraLayerRepository(GATED_LAYER_NAME) == MoloraLayerRepository(GATED_LAYER_NAME)
    with pytest.raises(ValueError, match="no layer"):
        MoloraLayerRepository("Nope")


def test_host_contract_errors_are_clear():
    class Bad(nn.Module):
        kernel_layer_name = GATED_LAYER_NAME

        def forward(self, x, gate):
            return x

    bad = Bad()
    with use_kernel_mapping(kernel_layer_mapping(), inherit_mapping=False):
        kernelize(bad, mode=Mode.INFERENCE, device="cpu")
    with pytest.raises(AttributeError, match="contract"):
        bad(torch.randn(2, D_IN), torch.rand(2, E))
    host = GatedLoRALinear(nn.Linear(D_IN, D_OUT), E, R)
    with use_kernel_mapping(kernel_layer_mapping(), inherit_mapping=False):
        kernelize(host, mode=Mode.INFERENCE, device="cpu")
    with pytest.raises(ValueError, match="gate must have shape"):
        host(torch.randn(2, D_IN), torch.rand(2, E + 1))
    with pytest.raises(ValueError, match="last dim"):
        host(torch.randn(2, D_IN + 1), torch.rand(2, E))


def test_adapter_only_host_and_per_expert_scaling():
    torch.manual_seed(0)
    ref = GatedLoRALinear(None, E, R, in_features=D_IN, out_features=D_OUT, init="gaussian")
    ref.scaling = torch.linspace(0.5, 2.0, E)
    fused = GatedLoRALinear(None, E, R, in_features=D_IN, out_features=D_OUT)
    fused.load_state_dict(ref.state_dict())
    fused.scaling = ref.scaling
    with use_kernel_mapping(kernel_layer_mapping(("cpu",)), inherit_mapping=False):
        kernelize(fused, mode=Mode.INFERENCE, device="cpu")
    x, gate = data(), torch.rand(3, 6, E)
    torch.testing.assert_close(fused(x, gate), ref(x, gate), **TOL)
