"""Autocast (docs/OPS.md "Autocast", docs/MODULES.md "Dtypes and autocast").

The rule, written out here independently of the registration (molora_ops/ops/_registry.py):
under ``torch.autocast(device, dtype)`` the operands of an op's matmuls (``AUTOCAST_ARGS``) are
cast to the autocast dtype when they are fp32 / fp16 / bf16, every other argument keeps its dtype,
and the op runs with autocast off. So every op under autocast must give exactly what it gives on
explicitly cast inputs with autocast off; without a rule the C++ kernels' internal ``at::mm``
would be autocast behind their back (``stacked_gated_lora`` raised
``"molora_gate_rank_blocks" not implemented for 'BFloat16'``), and fp32 inputs would come out in
fp32. Modules run the adapters in the bank's dtype (the autocast dtype under autocast) and return
the input's dtype; every method layer and an ``apply_molora`` Llama trains a step under bf16
autocast.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import molora_ops as mo
from molora_ops.ops import OPS
from utils import ALL_OPS, BACKWARD_OPS, op_samples

# The matmul operands of each op (cast to the autocast dtype); every other op casts nothing.
AUTOCAST_ARGS = {
    "sgmv_shrink": ("x", "A"),
    "sgmv_expand": ("h", "B", "base"),
    "sgmv_weight_grad": ("x", "h"),
    "stacked_gated_lora": ("x", "A", "B", "base"),
    "fused_moe_lora": ("x", "A", "B", "base"),
    "stacked_gated_lora_backward": ("grad_y", "x", "A", "B"),
    "sgmv_expand_backward": ("grad_y", "h", "B"),
    "rank_sparse_shrink": ("x", "A"),
    "rank_sparse_expand": ("values", "B", "base"),
    "rank_sparse_weight_grad": ("x", "g"),
}
CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
DT_IDS = ["bf16", "fp16"]


def _arg_names(name):
    return [a.name for a in OPS[name].op._schema.arguments]


def _cast_per_rule(name, args, dtype):
    """The inputs the rule hands to the op: AUTOCAST_ARGS cast to ``dtype`` (differentiably)."""
    names = _arg_names(name)
    out = list(args)
    for arg in AUTOCAST_ARGS.get(name, ()):
        i = names.index(arg)
        if isinstance(out[i], torch.Tensor) and out[i].dtype in CAST_DTYPES:
            out[i] = out[i].to(dtype)
    return out


def _leaves(args):
    """Fresh copies of the sample's tensors (leaves keep requires_grad)."""
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
            else a for a in args]


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_every_op_has_cpu_and_cuda_autocast_kernels():
    assert set(AUTOCAST_ARGS) <= set(ALL_OPS)
    for name in ALL_OPS:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"molora::{name}", key), (name, key)
        # the declaration carries the same rule as this file
        assert OPS[name].autocast == AUTOCAST_ARGS.get(name, ()), name


PARAMS = [(n, i) for n in ALL_OPS for i in range(len(op_samples(n)))]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name,idx", PARAMS, ids=[f"{n}-{i}" for n, i in PARAMS])
def test_op_under_cpu_autocast_equals_explicit_cast(name, idx, dtype):
    sid, args, kwargs = op_samples(name)[idx]
    op = OPS[name].op
    a1, a2 = _leaves(args), _leaves(args)
    with torch.autocast("cpu", dtype=dtype):
        got = _as_list(op(*a1, **kwargs))
    with torch.autocast("cpu", enabled=False):
        exp = _as_list(op(*_cast_per_rule(name, a2, dtype), **kwargs))
    assert len(got) == len(exp)
    for g, e in zip(got, exp):
        assert g.dtype == e.dtype, (sid, g.dtype, e.dtype)
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)
    if name in AUTOCAST_ARGS and args[0].dtype in CAST_DTYPES:
        assert got[0].dtype == dtype, f"{name}: fp32 operands must run in the autocast dtype"

    # gradients flow back through the casts to the original (fp32) leaves
    if name in BACKWARD_OPS or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return
    diff = [i for i, g in enumerate(got) if g.dtype.is_floating_point and g.requires_grad]
    gys = [torch.randn(got[i].shape, dtype=torch.float32).to(got[i].dtype) for i in diff]
    wrt1 = [a for a in a1 if isinstance(a, torch.Tensor) and a.requires_grad]
    wrt2 = [a for a in a2 if isinstance(a, torch.Tensor) and a.requires_grad]
    g1 = torch.autograd.grad([got[i] for i in diff], wrt1, gys, allow_unused=True)
    g2 = torch.autograd.grad([exp[i] for i in diff], wrt2, gys, allow_unused=True)
    for leaf, x, y in zip(wrt1, g1, g2):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == leaf.dtype
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def _gated_inputs(T=9, d_in=24, d_out=20, E=4, r=3, dtype=torch.float32):
    x = torch.randn(T, d_in, dtype=dtype, requires_grad=True)
    A = (torch.randn(E * r, d_in) * 0.3).requires_grad_()
    B = (torch.randn(d_out, E * r) * 0.3).requires_grad_()
    gate = torch.softmax(torch.randn(T, E), -1).requires_grad_()
    return x, A, B, gate, mo.uniform_rank_offsets(E, r)


def test_stacked_gated_lora_fp32_inputs_under_autocast():
    """The issue's failure: all-fp32 inputs under CPU bf16 autocast (the C++ kernel's internal mm
    was autocast and the bf16 result hit an fp32-only kernel)."""
    x, A, B, gate, ro = _gated_inputs()
    base = torch.randn(x.shape[0], B.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mo.stacked_gated_lora(x, A, B, gate, ro, None, base)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for t in (x, A, B, gate):
        assert t.grad is not None and t.grad.dtype == torch.float32 and t.grad.isfinite().all()
    # close to the fp32 result (bf16 operands, fp32 accumulation)
    y32 = mo.stacked_gated_lora(x.detach(), A.detach(), B.detach(), gate.detach(), ro, None, base)
    torch.testing.assert_close(y.float(), y32, rtol=3e-2, atol=3e-2 * y32.abs().max().item())


def test_mixed_dtypes_under_autocast():
    """A bf16 activation (the output of an autocast matmul) meets fp32 LoRA weights: the rule casts
    the weights too (outside autocast the op raises: the operands must share a dtype)."""
    x, A, B, gate, ro = _gated_inputs()
    xb = x.detach().bfloat16()
    with pytest.raises(TypeError, match="dtype"):
        mo.stacked_gated_lora(xb, A, B, gate, ro)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mo.stacked_gated_lora(xb, A, B, gate, ro)
    exp = mo.stacked_gated_lora(xb, A.bfloat16(), B.bfloat16(), gate, ro)
    torch.testing.assert_close(y, exp, rtol=0, atol=0)

    # float64 is never cast (as torch's autocast): fp64 with fp64 runs in fp64
    x64, A64, B64 = (t.detach().double() for t in (x, A, B))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = mo.stacked_gated_lora(x64, A64, B64, gate.detach(), ro)
    assert y64.dtype == torch.float64


def test_backward_inside_autocast_and_grouped_path():
    """Backward called inside the autocast region (the backward ops get the rule too)."""
    T, d_in, d_out, E, k, r = 11, 16, 12, 4, 2, 3
    x = torch.randn(T, d_in, requires_grad=True)
    A = (torch.randn(E * r, d_in) * 0.3).requires_grad_()
    B = (torch.randn(d_out, E * r) * 0.3).requires_grad_()
    logits = torch.randn(T, E, requires_grad=True)
    ro = mo.uniform_rank_offsets(E, r)
    scales = torch.rand(E) + 0.5

    def run(x, A, B, logits):
        w, ids = mo.softmax_topk(logits, k)
        meta = (ro, *mo.dispatch(ids, E))
        h = mo.sgmv_shrink(x, A, *meta, max_rank=r)
        return mo.sgmv_expand(h, B, *meta, w, scales)

    leaves = [x, A, B, logits]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(*leaves)
        assert y.dtype == torch.bfloat16
        got = torch.autograd.grad(y.float().square().sum(), leaves)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    y2 = run(copies[0].bfloat16(), copies[1].bfloat16(), copies[2].bfloat16(), copies[3])
    exp = torch.autograd.grad(y2.float().square().sum(), copies)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    for g, e, leaf in zip(got, exp, leaves):
        assert g.dtype == leaf.dtype
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_compiled_under_autocast_equals_eager(dynamo_reset):
    """torch.compile traces the rule (its Python-dispatcher form) inside an autocast region."""
    x, A, B, gate, ro = _gated_inputs()
    base = torch.randn(x.shape[0], B.shape[0])

    def f(x, A, B):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mo.stacked_gated_lora(x, A, B, gate.detach(), ro, None, base)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, A, B)
    gy = torch.randn(y.shape).bfloat16()
    got = torch.autograd.grad(y, (x, A, B), gy)
    e = f(x, A, B)
    exp = torch.autograd.grad(e, (x, A, B), gy)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, e, rtol=0, atol=0)
    for g, h in zip(got, exp):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, h, rtol=0, atol=0)


def test_reference_kernels_follow_the_rule_without_the_extension():
    """MOLORA_DISABLE_EXT=1: the Python reference serves the CPU kernels; its matmuls must not be
    autocast either (same result as the explicitly cast call)."""
    code = (
        "import torch, warnings; warnings.simplefilter('ignore')\n"
        "import molora_ops as mo\n"
        "assert not mo.has_extension()\n"
        "torch.manual_seed(0)\n"
        "x=torch.randn(7,12); A=torch.randn(6,12); B=torch.randn(10,6)\n"
        "g=torch.softmax(torch.randn(7,3),-1); ro=mo.uniform_rank_offsets(3,2)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    y=mo.stacked_gated_lora(x,A,B,g,ro)\n"
        "e=mo.stacked_gated_lora(x.bfloat16(),A.bfloat16(),B.bfloat16(),g,ro)\n"
        "assert y.dtype==torch.bfloat16 and torch.equal(y,e), (y.dtype, (y.float()-e.float()).abs().max())\n"
        "print('ok')\n")
    env = dict(os.environ, MOLORA_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", sorted(AUTOCAST_ARGS) + ["softmax_topk", "gather_rows"])
def test_op_under_cuda_autocast_equals_explicit_cast(name, dtype):
    for sid, args, kwargs in op_samples(name):
        args = [a.detach().cuda() if isinstance(a, torch.Tensor) else a for a in args]
        op = OPS[name].op
        with torch.autocast("cuda", dtype=dtype):
            got = _as_list(op(*args, **kwargs))
        exp = _as_list(op(*_cast_per_rule(name, args, dtype), **kwargs))
        for g, e in zip(got, exp):
            assert g.dtype == e.dtype, (sid, g.dtype, e.dtype)
            torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)


# --- modules: every method layer trains a step under bf16 autocast ------------------------------

D_IN, D_OUT, D_FF = 24, 20, 40


def _lin(i=D_IN, o=D_OUT):
    return nn.Linear(i, o, bias=True)


def _ffn_linears():
    return _lin(D_IN, D_FF), _lin(D_IN, D_FF), _lin(D_FF, D_IN)


def _layers():
    from molora_ops import modules as M
    g = dict(init="gaussian")
    return {
        "mixlora": lambda: M.MixLoRA(*_ffn_linears(), num_experts=4, k=2, r=4, alpha=8.0, **g),
        "mixlora_dynamic": lambda: M.MixLoRA(*_ffn_linears(), num_experts=4, k=2, r=4,
                                             alpha=8.0, routing="dynamic", **g),
        "mixlora_switch": lambda: M.MixLoRA(*_ffn_linears(), num_experts=4, k=2, r=4,
                                            alpha=8.0, routing="switch", **g),
        "llava_mole": lambda: M.LLaVAMoLE(*_ffn_linears(), num_experts=3, r=4, alpha=8.0, **g),
        "mola": lambda: M.MoLA(_lin(), num_experts=4, k=2, r=4, **g),
        "loramoe": lambda: M.LoRAMoE(_lin(), num_experts=3, r=4, **g),
        "hydralora": lambda: M.HydraLoRA(_lin(), num_heads=3, r=4, **g),
        "dynmole": lambda: M.DynMoLE(_lin(), num_experts=4, r=4, **g),
        "meteora": lambda: M.MeteoRA(_lin(), num_experts=4, r=4, **g),
        "flexmore": lambda: M.FlexMoRE(_lin(), ranks=[2, 5, 3], **g),
        "moelora": lambda: M.MoELoRA(_lin(), num_experts=4, k=2, r=4, **g),
        "loramixer": lambda: M.LoRAMixer(_lin(), num_experts=4, k=2, r=4, **g),
        "remix": lambda: M.ReMix(_lin(), num_experts=4, k=2, r=4, **g),
        "soups": lambda: M.LoRASoupsCAT(_lin(), ranks=[3, 5], **g),
        "mole": lambda: M.MoLE(_lin(), ranks=[3, 4, 2], **g),
        "comol": lambda: M.CoMoL(_lin(), num_experts=4, r=4, k=2, **g),
        "smora": lambda: M.SMoRA(_lin(), r=16, k=4, **g),
        "flylora": lambda: M.FlyLoRA(_lin(), r=16, k=4),
        "mora": lambda: M.MoRA(_lin(), r=8, k=3, **g),
        "lora": lambda: M.LoRALinear(_lin(), r=4, alpha=8.0, **g),
        "xlora": lambda: M.XLoRALinear(_lin(), ranks=[3, 4, 2], trainable_adapters=True, **g),
        "milora": lambda: M.MiLoRAAdapters(D_IN, {"q": _lin(), "v": _lin()}, k=1, r=4,
                                           alpha=8.0, **g),
        "poly": lambda: M.PolyLinear(_lin(), n_tasks=3, n_skills=4, r=4, alpha=8.0, n_splits=2,
                                     **g),
    }


LAYERS = sorted(_layers())


def _forward(name, m, x):
    """One forward of the layer on x [2, 5, D_IN] -> (output, aux loss or None)."""
    if name == "milora":
        m.route(x)
        return m["q"](x) + m["v"](x), None
    if name == "poly":
        return m(x, torch.tensor([0, 2])), None
    if name == "xlora":
        s = torch.softmax(torch.randn(*x.shape[:-1], m.num_experts), -1)
        return m(x, s), None
    if callable(getattr(m, "aux_loss", None)):
        y, routing = m(x, return_routing=True)
        return y, m.aux_loss(routing)
    out = m(x)
    return (out[0] if isinstance(out, tuple) else out), None


def _step(name, m, x, autocast):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # same dropout masks / samples / scalings in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, aux = _forward(name, m, x)
    loss = y.float().square().mean()
    if isinstance(aux, torch.Tensor):
        loss = loss + aux.float()
    loss.backward()
    return y, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", LAYERS)
def test_method_layer_trains_a_step_under_bf16_autocast(name):
    torch.manual_seed(0)
    m = _layers()[name]().train()
    x = torch.randn(2, 5, D_IN)
    y32, g32 = _step(name, m, x, autocast=False)
    y, g = _step(name, m, x, autocast=True)
    assert y.dtype == x.dtype, "modules return the input's dtype"
    assert y.shape == y32.shape and y.isfinite().all()
    # the same parameters get gradients as in fp32, finite and not all zero
    assert g.keys() == g32.keys() and g
    for n, grad in g.items():
        assert (grad is None) == (g32[n] is None), n
        if grad is None:
            continue
        assert grad.dtype == torch.float32 and grad.isfinite().all(), n
        if g32[n].abs().max() > 0:
            assert grad.abs().max() > 0, f"{n}: zero gradient under autocast"
    # and a step changes the trainable parameters, finitely
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    torch.optim.SGD([p for p in m.parameters() if p.grad is not None], lr=1e-2).step()
    for n, p in m.named_parameters():
        if n in before:
            assert p.isfinite().all(), n
    # bf16 operands: close to the fp32 output where routing does not flip (dense / fixed ones)
    if name in ("lora", "loramoe", "hydralora", "soups", "xlora", "poly", "milora"):
        scale = y32.abs().max().item()
        torch.testing.assert_close(y, y32, rtol=5e-2, atol=5e-2 * scale)


def test_module_rule_bank_dtype_and_input_dtype():
    """Outside autocast: a bf16 activation meets an fp32 bank (PEFT's fp32 adapters on a bf16
    model): the adapters run in the bank's dtype, the result comes back in the input's dtype."""
    from molora_ops import modules as M
    torch.manual_seed(0)
    base = _lin().bfloat16()
    m = M.HydraLoRA(base, num_heads=3, r=4, init="gaussian", dtype=torch.float32).eval()
    assert m.bank.A.dtype == torch.float32
    x = torch.randn(7, D_IN).bfloat16()
    y = m(x)
    assert y.dtype == torch.bfloat16
    gate = m.gating(m.router(x.float()))  # the router runs on the bank-dtype input
    exp = mo.stacked_gated_lora(x.float(), m.bank.A, m.bank.B, gate.weights, m.bank.rank_offsets,
                                m.bank.scales, base(x).float(), m.bank.shared_a).bfloat16()
    torch.testing.assert_close(y, exp, rtol=1e-2, atol=1e-2)


# --- apply_molora: a tiny Llama trains a step under bf16 autocast -------------------------------

def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).float()


def _method_names():
    try:
        from molora_ops.integrations.hf_transformers import METHOD_NAMES
    except ImportError:
        return []
    return list(METHOD_NAMES)


METHOD_KW = {
    "mixlora": dict(num_experts=4, top_k=2, rank=4, alpha=8.0),
    "mola": dict(top_k=2, rank=4, alpha=8.0),
    "smora": dict(rank=16, top_k=4, alpha=8.0),
    "hydralora": dict(num_experts=3, rank=4, alpha=8.0),
    "loramoe": dict(num_experts=3, rank=4, alpha=8.0),
    "lora_soups": dict(num_experts=2, rank=4, alpha=8.0),
    "lora": dict(rank=4, alpha=8.0),
}


@pytest.mark.parametrize("method", _method_names())
def test_apply_molora_llama_trains_a_step_under_bf16_autocast(method):
    from molora_ops.integrations.hf_transformers import MoLoRAConfig, apply_molora
    torch.manual_seed(0)
    model = apply_molora(_tiny_llama(), MoLoRAConfig(method, **METHOD_KW.get(method, {})))
    with torch.no_grad():  # non-zero B's: every adapter parameter then gets a gradient
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("B"):
                p.normal_(0.0, 0.05)
    model.train()
    ids = torch.randint(3, 128, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.loss.isfinite()
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, missing[:5]
    for n, p in trainable.items():
        assert p.grad.dtype == p.dtype and p.grad.isfinite().all(), n
    assert any(p.grad.abs().max() > 0 for p in trainable.values())
    assert math.isfinite(out.loss.item())
