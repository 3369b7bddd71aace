"""Any leading dims: the modules take ``[B, S, d]`` (and more dims) as well as ``[T, d]``, equal to
the flattened 2-D run; the 2-D ops reject ``[B, S, d]`` with a message that gives the reshape,
on the native (C++) path and on the reference-served path."""

import re

import pytest
import torch
from torch import nn

import molora_ops
from molora_ops.modules import layers as L
from molora_ops.modules import methods as M
from molora_ops.modules import routing as R
from molora_ops.ops._registry import OPS

D, D_FF = 16, 24


def _lin(a, b):
    return nn.Linear(a, b)


MODULES = {
    "LoRALinear": lambda: L.LoRALinear(_lin(D, D), 4, 8.0),
    "MixLoRA": lambda: M.MixLoRA(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), num_experts=4,
                                 r=4),
    "MixLoRA-dynamic": lambda: M.MixLoRA(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D),
                                         num_experts=4, r=4, routing="dynamic"),
    "LLaVAMoLE": lambda: M.LLaVAMoLE(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), r=4),
    "LLaVAMoLE-dense": lambda: M.LLaVAMoLE(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), r=4,
                                           dense=True),
    "MoLA": lambda: M.MoLA(_lin(D, D), 4),
    "LoRAMoE": lambda: M.LoRAMoE(_lin(D, D)),
    "HydraLoRA": lambda: M.HydraLoRA(_lin(D, D)),
    "DynMoLE": lambda: M.DynMoLE(_lin(D, D)),
    "MeteoRA": lambda: M.MeteoRA(_lin(D, D), num_experts=4),
    "FlexMoRE": lambda: M.FlexMoRE(_lin(D, D), [1, 2, 4]),
    "MoELoRA": lambda: M.MoELoRA(_lin(D, D)),
    "LoRAMixer": lambda: M.LoRAMixer(_lin(D, D)),
    "ReMix": lambda: M.ReMix(_lin(D, D)),
    "LoRASoupsCAT": lambda: M.LoRASoupsCAT(_lin(D, D), [2, 4]),
    "MoLE": lambda: M.MoLE(_lin(D, D), [2, 4]),
    "CoMoL": lambda: M.CoMoL(_lin(D, D)),
    "SMoRA": lambda: M.SMoRA(_lin(D, D), r=8, k=2),
    "FlyLoRA": lambda: M.FlyLoRA(_lin(D, D), r=8, k=2, update_bias_in_eval=False),
    "MoRA": lambda: M.MoRA(_lin(D, D), r=8, k=2),
}


def _build(name):
    torch.manual_seed(0)
    m = MODULES[name]().eval()
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname.endswith("B"):      # LoRA init leaves B = 0: make every adapter count
                p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("shape", [(2, 3), (2, 2, 3), (1, 6)])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_any_leading_dims_equals_flattened(name, shape):
    m = _build(name)
    x = torch.randn(*shape, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, routing = m(x, return_routing=True)
        y2, routing2 = m(x.reshape(-1, D), return_routing=True)
    assert y.shape == (*shape, D)
    torch.testing.assert_close(y.reshape(-1, D), y2, rtol=0, atol=1e-6)
    # the adapters contribute (a dropped adapter path would pass the comparison too)
    base = m.base if hasattr(m, "base") else None
    if isinstance(base, nn.Linear):
        assert (y2 - base(x.reshape(-1, D))).abs().max() > 1e-4
    if routing is not None:
        assert routing.weights.shape[0] == x.numel() // D
        torch.testing.assert_close(routing.weights, routing2.weights)


def test_moelora_expert_outputs_any_leading_dims():
    m = _build("MoELoRA")
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        y, o = m(x, return_expert_outputs=True)
        y2, o2 = m(x.reshape(6, D), return_expert_outputs=True)
    torch.testing.assert_close(y.reshape(6, D), y2)
    torch.testing.assert_close(o, o2)
    with pytest.raises(ValueError, match=f"last dim {D}"):
        m(torch.randn(2, 3, D + 1), return_expert_outputs=True)


@pytest.mark.parametrize("policy", [
    R.TopK(2), R.TopKSoftmax(2, 0.5), R.TopP(0.6, 1), R.TopP(0.7, 1, include_crossing=True),
    R.SigmoidTopK(2, 5), R.DenseSoftmax(0.8), R.EqualWeightTopK(2).eval(),
    R.StraightThroughTopK(2), R.SwitchTop1(), R.SwitchTop1(capacity=2)],
    ids=lambda p: repr(p).replace("\n", ""))
def test_gating_policies_take_any_leading_dims(policy):
    z = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(2))
    r3 = policy(z)
    # SwitchTop1's capacity counts per sequence: the 3-D logits are 2 sequences of 4
    r2 = policy(z.reshape(8, 5), 4) if isinstance(policy, R.SwitchTop1) else \
        policy(z.reshape(8, 5))
    torch.testing.assert_close(r3.weights, r2.weights)
    if r2.ids is not None:
        assert torch.equal(r3.ids, r2.ids)


def test_static_gate_counts_tokens_of_any_leading_dims():
    g = R.StaticGate(3)
    assert g(torch.randn(2, 5, D)).weights.shape == (10, 3)
    assert g(torch.randn(7, D)).weights.shape == (7, 3)


# --- the 2-D ops: the error names the reshape ---------------------------------------------------


def _cases():
    x = torch.randn(2, 3, D)
    ids = torch.zeros(2, 3, 2, dtype=torch.int32)
    order, pos, eo = molora_ops.dispatch(torch.zeros(6, 2, dtype=torch.int32), 4)
    ro = molora_ops.uniform_rank_offsets(4, 2)
    A, B = torch.randn(8, D), torch.randn(D, 8)
    return {
        "softmax_topk": ("logits", (x, 2, True)),
        "topk_softmax": ("logits", (x, 2, 1.0)),
        "sigmoid_topk": ("logits", (x, 2, None, True, True, 1.0)),
        "softmax_topp": ("logits", (x, 0.5, 1, 1.0, 1.1, 1e-5)),
        "dispatch": ("ids", (ids, 4, 1)),
        "gather_rows": ("x", (x, order, pos, None)),
        "sgmv_shrink": ("x", (x, A, ro, order, pos, eo, None, None, 2)),
        "stacked_gated_lora": ("x", (x, A, B, torch.rand(6, 4), ro, None, None, False)),
        "rank_sparse_shrink": ("x", (x, A, torch.zeros(6, 2, dtype=torch.int32))),
    }


def _expected(name, shape):
    return (rf"molora\.\w+: {name} must be 2-D.*got shape [\(\[]{shape[0]}, {shape[1]}, "
            rf"{shape[2]}[\)\]]; flatten the leading dims: "
            + re.escape(f"{name}.reshape(-1, {name}.shape[-1])"))


@pytest.mark.parametrize("op", sorted(_cases()))
@pytest.mark.parametrize("path", ["native", "reference"])
def test_2d_ops_suggest_the_reshape(op, path):
    if path == "native" and not molora_ops.has_extension():
        pytest.skip("native extension not built")
    name, args = _cases()[op]
    shape = tuple(args[0].shape)
    if path == "native":
        fn = getattr(torch.ops.molora, op)          # the C++ CPU launcher's own checks
    else:
        fn = OPS[op].reference_entry                 # the Python checks, then the reference
    with pytest.raises(ValueError, match=_expected(name, shape)):
        fn(*args)


def test_wrapper_error_names_the_layout():
    with pytest.raises(ValueError, match=re.escape("logits must be 2-D [T, E], got shape")):
        OPS["softmax_topk"].reference_entry(torch.randn(2, 3, 4), 2, True)
    # a wrong number of dims that is not "too many leading dims" gets no reshape hint
    with pytest.raises(ValueError, match=r"must be 2-D \[T, E\], got shape \(4,\)$"):
        OPS["softmax_topk"].reference_entry(torch.randn(4), 2, True)
