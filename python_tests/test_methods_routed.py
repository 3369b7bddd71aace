"""Loop equivalence of the token-routed MoE-LoRA methods of ``molora_ops.modules`` (issue 5).

Every method's forward output and the gradients of its input and of EVERY trainable parameter
are compared, in fp32 on the CPU with the method's published hyperparameters, against a plain
per-expert loop written here from the paper and the authors' reference code (the MoE-PEFT
pattern: per expert ``tok, slot = nonzero(ids == e)``, ``index_add`` of the weighted expert
outputs; dense methods: a sum over the experts). The loops use plain torch only: no
``molora_ops`` op and no module internals, just the module's parameters (expert e's
``A_e`` / ``B_e`` are the ``bank.expert(e)`` views, the router is ``router.linear``), and the
LoRA scaling is recomputed from the published alpha / r. Aux losses are recomputed from the
published formulas, and every state dict round-trips into a freshly built module.

Banks are built with ``init="gaussian"`` (non-zero B: PEFT's B = 0 would make every adapter
vanish and these tests vacuous); the parity helper also fails when a gradient that must flow
is zero in the loop.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from molora_ops.modules import (DynMoLE, FlexMoRE, HydraLoRA, LLaVAMoLE, LoRABank, LoRALinear,
                                LoRAMoE, MeteoRA, MixLoRA, MoLA, MoLoRALinear, Router, Routing,
                                TopK, mola_experts_per_layer)

TOL = 1e-5          # fp32: relative to the magnitude of the expected tensor
D, DFF = 16, 40     # MoE-FFN hidden / intermediate sizes
DIN, DOUT = 24, 20  # linear methods (d_in != d_out catches transposes)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (OpenMP waits dominate them on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- comparison helpers ------------------------------------------------------------------------


def assert_close(actual, expected, tol=TOL, what="output"):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-3),
                               msg=lambda m: f"{what}: {m}")


def trainable(module):
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def check_parity(run, ref, inputs, params, tol=TOL, no_grad=()):
    """``run(*inputs)`` vs ``ref(*inputs)``: the outputs, then the gradients (for one random
    upstream gradient) of every input that requires grad and of every ``(name, param)``.

    A name in ``no_grad`` must get no (or an all-zero) gradient from both; every other must get a
    non-zero one from the loop, so the comparison cannot pass vacuously. Returns the output."""
    y, y_ref = run(*inputs), ref(*inputs)
    assert_close(y, y_ref, tol)
    named = [(f"input{i}", t) for i, t in enumerate(inputs)
             if torch.is_tensor(t) and t.requires_grad] + list(params)
    g = torch.randn_like(y_ref)
    wrt = [t for _, t in named]
    got = torch.autograd.grad(y, wrt, g, allow_unused=True)
    exp = torch.autograd.grad(y_ref, wrt, g, allow_unused=True)
    for (name, t), a, b in zip(named, got, exp):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        if name in no_grad:
            assert not a.any() and not b.any(), f"{name} must receive no gradient"
        else:
            assert b.any(), f"{name}: the loop's gradient is zero (vacuous comparison)"
        assert_close(a, b, tol, f"grad of {name}")
    return y


def check_module(module, ref, x, tol=TOL, no_grad=()):
    """``module(x)`` vs ``ref(x)`` forward and backward (x and every trainable parameter)."""
    return check_parity(module, ref, (x.requires_grad_(),), trainable(module), tol, no_grad)


def round_trip(module):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


# --- the reference loops (plain torch) ---------------------------------------------------------


def linear(base, x):
    bias = None if base.bias is None else base.bias.to(x.dtype)
    return F.linear(x, base.weight.to(x.dtype), bias)


def lora(x, A, B, s):
    """PEFT's LoRA delta ``s * B A x``: x [n, d_in], A [r, d_in], B [d_out, r]."""
    return s * F.linear(F.linear(x, A), B)


def bank_expert(bank, scales):
    """Expert e of a bank as a function of its tokens, with the given (published) scalings."""
    return lambda e, h: lora(h, *bank.expert(e), scales[e])


def sparse_combine(x, w, ids, E, expert, out):
    """``out[t] += sum_j w[t, j] expert(e, x[t])`` with e = ids[t, j] (-1: nothing), per expert:
    ``tok, slot = nonzero(ids == e)`` then ``index_add`` (MoE-PEFT / MoLA / MeteoRA loops)."""
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        out = out.index_add(0, tok, w[tok, slot, None] * expert(e, x[tok]))
    return out


def dense_combine(x, gate, E, expert, out):
    """``out += sum_e gate[:, e] expert(e, x)`` (LoRAMoE / DynMoLE / LLaVA-MoLE dense)."""
    for e in range(E):
        out = out + gate[:, e:e + 1] * expert(e, x)
    return out


def router_logits(router, h):
    lin = router.linear
    return F.linear(h.float(), lin.weight, lin.bias)


def ref_topk(logits, k):
    """MoE-PEFT ``MixtralSparseMoe`` / MoLA ``Linear_MoE``: softmax (fp32) -> top-k -> w / sum w."""
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def ref_dynamic_top_p(logits, top_p):
    """MoE-PEFT ``mixlora/model.py :: _dynamic_top_p`` (temperature 0): sorted probs, the prefix
    up to AND including the first expert whose cumulative probability exceeds top_p."""
    p = torch.softmax(logits, -1)
    sorted_p, sorted_ids = torch.sort(p, dim=-1, descending=True)
    mask = sorted_p.cumsum(-1) > top_p
    threshold = F.one_hot(mask.long().argmax(-1), p.shape[-1]).bool()
    mask = mask & ~threshold
    return sorted_p.masked_fill(mask, 0.0), sorted_ids.masked_fill(mask, -1)


def ref_switch(logits, capacity):
    """MoE-PEFT ``SwitchSparseMoe.route`` on one sequence: top-1 of softmax, a token overflows
    when its expert already took ``capacity`` earlier tokens; weight = top-1 prob (-1: dropped)."""
    p = torch.softmax(logits, -1)
    top1 = p.argmax(-1)
    one_hot = F.one_hot(top1, p.shape[-1])
    kept = (one_hot * (one_hot.cumsum(0) <= capacity)).any(-1)
    return p.max(-1, keepdim=True).values, torch.where(kept, top1, -1)[:, None]


def tsallis(p, q, eps=1e-5):
    """DynMoLE ``moe_utils.py :: tsallis_entropy`` (normalised, of p + eps)."""
    E = p.shape[-1]
    return ((1 - ((p + eps) ** q).sum(-1)) / (q - 1)) / ((1 - E ** (1 - q)) / (q - 1))


def ref_dynmole_routing(logits, threshold=0.9, q=1.1, keep_top_k=2, top_p=0.75):
    """DynMoLE ``dynmole/model.py :: _dynamic_routing``: dense weights p * keep (no renorm), H."""
    p = torch.softmax(logits, -1)
    sorted_p, sorted_ids = torch.sort(p, dim=-1, descending=True)
    mask = (sorted_p.cumsum(-1) <= top_p).to(p.dtype)
    mask[..., :keep_top_k] = 1
    final = torch.zeros_like(p).scatter(-1, sorted_ids, mask)
    H = tsallis(p, q)
    if q > 0 and threshold < 1:
        final[H > threshold] = 1
    return p * final, H


def ref_topk_softmax(logits, k, temperature):
    """MeteoRA ``MoELinear.forward`` accelerated path: top-k logits -> softmax(v / T); k=1: 1."""
    v, ids = torch.topk(logits, k, dim=-1)
    return (torch.ones_like(v) if k == 1 else torch.softmax(v / temperature, -1)), ids


def ffn_expert(m, e, h, s, act=F.silu):
    """MoE-PEFT ``_lora_forward`` of expert e: the FULL FFN with expert e's LoRAs on W1/W3/W2,
    ``W2 a + s B2 A2 a`` with ``a = act(W1 h + s B1 A1 h) * (W3 h + s B3 A3 h)`` (W2 per pair)."""
    def proj(base, bank, inp):
        return linear(base, inp) + lora(inp, *bank.expert(e), s)
    a = act(proj(m.gate_proj, m.gate_lora, h)) * proj(m.up_proj, m.up_lora, h)
    return proj(m.down_proj, m.down_lora, a)


def mixlora_loop(m, route, s):
    """MoE-PEFT ``MixtralSparseMoe.forward`` (per-(token, expert) full FFNs, index_add)."""
    def ref(x):
        h = x.reshape(-1, x.shape[-1]).float()
        w, ids = route(router_logits(m.router, h))
        y = sparse_combine(h, w, ids, m.num_experts, lambda e, t: ffn_expert(m, e, t, s),
                           h.new_zeros(h.shape))
        return y.reshape(x.shape)
    return ref


def llava_loop(m, dense, s):
    """LLaVA-MoLE ``moe.py :: LoRA_MOE_LM.forward``: each projection adds ``sum_e p_e LoRA_e``
    (dense) or the argmax expert's LoRA, NOT weighted by p (``forward_lora_moe_sparse``)."""
    def ref(x):
        h = x.reshape(-1, x.shape[-1])
        p = torch.softmax(router_logits(m.router, h), -1)
        top1 = p.argmax(-1, keepdim=True)
        E = m.num_experts

        def moe_proj(base, bank, inp):
            expert = bank_expert(bank, [s] * E)
            if dense:
                return dense_combine(inp, p, E, expert, linear(base, inp))
            return sparse_combine(inp, torch.ones_like(p[:, :1]), top1, E, expert,
                                  linear(base, inp))
        a = F.silu(moe_proj(m.gate_proj, m.gate_lora, h)) * moe_proj(m.up_proj, m.up_lora, h)
        return moe_proj(m.down_proj, m.down_lora, a).reshape(x.shape)
    return ref


def routed_linear_loop(m, route, scales, dense=False, with_base=True):
    """``y = W0 x + sum_j w_j s_e B_e A_e x`` per expert (MoLA ``Linear_MoE``, MeteoRA
    ``_accelerated_forward_inner_loop``) or ``sum_e g_e ...`` (LoRAMoE, DynMoLE)."""
    def ref(x):
        h = x.reshape(-1, x.shape[-1])
        bank = m.bank
        out = linear(m.base, h) if with_base else h.new_zeros(h.shape[0], bank.out_features)
        expert = bank_expert(bank, scales)
        r = route(router_logits(m.router, h))
        if dense:
            y = dense_combine(h, r, bank.num_experts, expert, out)
        else:
            y = sparse_combine(h, r[0], r[1], bank.num_experts, expert, out)
        return y.reshape(*x.shape[:-1], bank.out_features)
    return ref


# --- builders ----------------------------------------------------------------------------------


def ffn_bases(bias=False, dtype=None):
    return (nn.Linear(D, DFF, bias=bias, dtype=dtype), nn.Linear(D, DFF, bias=bias, dtype=dtype),
            nn.Linear(DFF, D, bias=bias, dtype=dtype))


def make_mixlora(bias=False, **kw):
    kw.setdefault("init", "gaussian")
    return MixLoRA(*ffn_bases(bias), **kw)


def make_llava(**kw):
    return LLaVAMoLE(*ffn_bases(), init="gaussian", **kw)


def make_linear(cls, *args, bias=True, **kw):
    kw.setdefault("init", "gaussian")
    return cls(nn.Linear(DIN, DOUT, bias=bias), *args, **kw)


def steer(router, x, e, margin=3.0, strength=8.0):
    """Makes expert e every token's top-1: x gets a shared unit direction u (its u-component set
    to ``margin``) that router row e reads with ``strength``."""
    u = F.normalize(torch.randn(x.shape[-1]), dim=0)
    with torch.no_grad():
        router.linear.weight[e] += strength * u
    return x - (x @ u)[..., None] * u + margin * u


def sharpen(router, factor):
    with torch.no_grad():
        router.linear.weight.mul_(factor)


# --- 1. MixLoRA: the shared-base MoE-FFN --------------------------------------------------------

MIXLORA_CASES = {"T40": (40,), "T1": (1,), "T3_empty_experts": (3,), "batched": (2, 5),
                 "one_expert": (24,), "biased_bases": (17,)}


@pytest.mark.parametrize("case", list(MIXLORA_CASES))
@pytest.mark.parametrize("mode", ["eval", "train_dropout0"])
def test_mixlora_shared_base_moe_ffn_equals_per_token_expert_formulation(mode, case):
    """PROVES the shared-base MoE-FFN (W1 x, W3 x once per token; W2 once per token on the
    weighted sum of the pairs' activations; grouped LoRA deltas) equals the per-(token, expert)
    formulation of MoE-PEFT ``MixtralSparseMoe.forward``: every routed pair runs the FULL expert
    FFN ``W2 a + s B2 A2 a``, ``a = silu(W1 x + s B1 A1 x) * (W3 x + s B3 A3 x)``, and the
    outputs are ``index_add``-ed with the renormalised top-2 weights of softmax(fp32).
    Published hyperparameters E=8, k=2, r=16, alpha=32 (s=2); forward and every gradient."""
    if mode == "eval":
        m = make_mixlora(bias=case == "biased_bases").eval()  # dropout 0.05, inactive in eval
    else:
        m = make_mixlora(bias=case == "biased_bases", dropout=0.0).train()
    assert (m.num_experts, m.gating.k, m.gate_lora.ranks[0]) == (8, 2, 16)
    x = torch.randn(*MIXLORA_CASES[case], D)
    if case == "one_expert":
        x = steer(m.router, x, 5)
        assert (ref_topk(router_logits(m.router, x), 2)[1][:, 0] == 5).all()
    if case == "T3_empty_experts":  # 6 routed pairs for 8 experts: some expert gets no token
        assert len(ref_topk(router_logits(m.router, x), 2)[1].unique()) < 8
    check_module(m, mixlora_loop(m, lambda z: ref_topk(z, 2), 32 / 16), x)


@pytest.mark.parametrize("router_scale,bias", [(1.0, False), (60.0, True)])
def test_mixlora_dynamic_matches_moe_peft_dynamic_top_p(router_scale, bias):
    """MixLoRA-dynamic: MoE-PEFT ``_dynamic_top_p`` (sorted probs kept up to and including the one
    crossing top_p = 0.8, at least 1, NOT renormalised), per-(token, expert) full FFNs. With
    biased bases each pair adds w_j b2 (sum_j w_j != 1 here)."""
    m = make_mixlora(bias, routing="dynamic", dropout=0.0)
    sharpen(m.router, router_scale)
    x = torch.randn(40, D)
    _, ids = ref_dynamic_top_p(router_logits(m.router, x), 0.8)
    n = (ids >= 0).sum(-1)
    if router_scale > 1:  # both single-expert rows and rows with several experts
        assert (n == 1).any() and (n > 1).any()
    check_module(m, mixlora_loop(m, lambda z: ref_dynamic_top_p(z, 0.8), 2.0), x)


@pytest.mark.parametrize("dropped_mode", ["input", "zero"])
@pytest.mark.parametrize("shape,bias", [((24,), False), ((3, 8), True)],
                         ids=["one_sequence", "batched_biased"])
def test_mixlora_switch_capacity_drops_tokens(shape, bias, dropped_mode):
    """MixLoRA-switch: top-1 weighted by its probability, tokens over the expert capacity (1, per
    sequence of x [B, S, d], as MoE-PEFT ``SwitchSparseMoe``) dropped. A dropped token outputs
    ``p_top1 * x`` (MoE-PEFT: ``next_states`` starts as a copy of the input, then
    ``router_probs * next_states``), or 0 with ``switch_dropped="zero"``."""
    m = make_mixlora(bias, routing="switch", expert_capacity=1, jitter_noise=0.01,
                     dropout=0.0, switch_dropped=dropped_mode).eval()  # jitter: training only
    sharpen(m.router, 30.0)
    x = torch.randn(*shape, D)
    seqs = x.reshape(-1, shape[-1], D)  # one row per sequence
    dropped = torch.cat([ref_switch(router_logits(m.router, s), 1)[1][:, 0] < 0 for s in seqs])
    assert dropped.any() and (~dropped).any()
    routed = mixlora_loop(m, lambda z: ref_switch(z, 1), 2.0)

    def per_seq(s):
        p_top, ids = ref_switch(router_logits(m.router, s), 1)
        passthrough = p_top * s * (ids < 0) if dropped_mode == "input" else 0
        return routed(s) + passthrough

    y = check_module(m, lambda x: torch.stack([per_seq(s) for s in x.reshape(seqs.shape)])
                     .reshape(x.shape), x)
    if dropped_mode == "zero":
        assert not y.reshape(-1, D)[dropped].any()
    else:
        assert y.reshape(-1, D)[dropped].abs().min() > 0


def test_mixlora_bf16_base_fp32_banks_close_to_fp32_loop():
    """bf16 frozen base + fp32 banks (MoE-PEFT keeps LoRA in fp32): runs forward and backward and
    is close to the fp32 loop at bf16 tolerance."""
    m = MixLoRA(*ffn_bases(dtype=torch.bfloat16), dropout=0.0, init="gaussian",
                bank_dtype=torch.float32)
    assert m.gate_lora.A.dtype == torch.float32 and m.gate_proj.weight.dtype == torch.bfloat16
    x = torch.randn(20, D).bfloat16().requires_grad_()
    y = m(x)
    assert y.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    y_ref = mixlora_loop(m, lambda z: ref_topk(z, 2), 2.0)(x32)
    assert_close(y.float(), y_ref, 3e-2)
    g = torch.randn_like(y_ref)
    named = [("x", x)] + trainable(m)
    got = torch.autograd.grad(y, [p for _, p in named], g.bfloat16())
    exp = torch.autograd.grad(y_ref, [x32] + [p for _, p in named[1:]], g)
    for (name, p), a, b in zip(named, got, exp):
        assert a.dtype == p.dtype == (torch.bfloat16 if name == "x" else torch.float32), name
        assert_close(a.float(), b, 5e-2, f"grad of {name}")


# --- 2. LLaVA-MoLE ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["T33", "T1", "one_expert", "batched"])
@pytest.mark.parametrize("mode", ["sparse", "dense", "weighted"])
def test_llava_mole_matches_reference(mode, case):
    """LLaVA-MoLE (E=3, r=32, alpha=64): sparse top-1 NOT weighted by p (the router with bias gets
    no gradient from the output), dense (each projection adds sum_e p_e LoRA_e), or the
    ``weighted`` variant (the top-1 expert's FFN output times its p)."""
    m = make_llava(dense=mode == "dense", weighted=mode == "weighted").eval()
    assert m.router.linear.bias is not None and m.num_experts == 3
    shape = {"T33": (33,), "T1": (1,), "one_expert": (12,), "batched": (2, 7)}[case]
    x = torch.randn(*shape, D)
    if case == "one_expert":
        x = steer(m.router, x, 1)
    if mode == "weighted":
        ref = mixlora_loop(m, lambda z: torch.softmax(z, -1).max(-1, keepdim=True), 64 / 32)
    else:
        ref = llava_loop(m, mode == "dense", 64 / 32)
    no_grad = ("router.linear.weight", "router.linear.bias") if mode == "sparse" else ()
    check_module(m, ref, x, no_grad=no_grad)


# --- 3. MoLA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("E,one_expert", [(2, False), (5, False), (6, False), (8, False),
                                          (6, True)])
def test_mola_matches_linear_moe(E, one_expert):
    """MoLA (r=8, alpha=16, k=2): softmax -> top-2 -> renormalise, per-expert index_add
    (``mola_lora_hacked.py :: Linear_MoE.forward``); x with leading dims [B, S, d]."""
    m = make_linear(MoLA, E).eval()
    x = torch.randn(3, 5, DIN)
    if one_expert:
        x = steer(m.router, x, 4)
        assert (ref_topk(router_logits(m.router, x.reshape(-1, DIN)), 2)[1][:, 0] == 4).all()
    check_module(m, routed_linear_loop(m, lambda z: ref_topk(z, 2), [16 / 8] * E), x)


def test_mola_experts_per_layer():
    assert mola_experts_per_layer(32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    # uneven: 10 layers in 4 blocks of sizes 2, 2, 3, 3 (earlier blocks take the shorter share)
    assert mola_experts_per_layer(10) == [2, 2, 4, 4, 6, 6, 6, 8, 8, 8]
    assert mola_experts_per_layer(6, groups=(1, 3, 5)) == [1, 1, 3, 3, 5, 5]


# --- 4. LoRAMoE and HydraLoRA ------------------------------------------------------------------


def test_loramoe_dense_softmax():
    """LoRAMoE (E=8, r=4, alpha=32): ``W0 x + sum_e softmax(x W_g^T)_e s B_e A_e x``."""
    m = make_linear(LoRAMoE).eval()
    assert m.num_experts == 8
    check_module(m, routed_linear_loop(m, lambda z: torch.softmax(z, -1), [32 / 4] * 8,
                                       dense=True), torch.randn(2, 9, DIN))


def test_hydralora_shared_a():
    """HydraLoRA (N=4, r=4, alpha=32): one shared A, ``h = A x``, ``W0 x + s sum_i p_i B_i h``."""
    m = make_linear(HydraLoRA).eval()
    N, r, s = 4, 4, 32 / 4
    assert tuple(m.bank.A.shape) == (r, DIN) and tuple(m.bank.B.shape) == (DOUT, N * r)

    def ref(x):
        hx = x.reshape(-1, DIN)
        h = F.linear(hx, m.bank.A)
        p = torch.softmax(router_logits(m.router, hx), -1)
        y = linear(m.base, hx)
        for i in range(N):
            y = y + s * p[:, i:i + 1] * F.linear(h, m.bank.B[:, i * r:(i + 1) * r])
        return y.reshape(*x.shape[:-1], DOUT)
    check_module(m, ref, torch.randn(13, DIN))


# --- 5. DynMoLE --------------------------------------------------------------------------------


def test_dynmole_top_p_min_k_entropy_broadcast():
    """DynMoLE (E=6, r=24, alpha=48, q=1.1, threshold 0.9, top_p 0.75, keep_top_k 2): weights
    p * keep, not renormalised; rows whose normalised Tsallis entropy exceeds 0.9 keep all."""
    m = make_linear(DynMoLE).eval()
    x = torch.randn(40, DIN) * torch.linspace(0.05, 8.0, 40)[:, None]  # flat ... peaked rows
    w, H = ref_dynmole_routing(router_logits(m.router, x))
    kept = (w > 0).sum(-1)
    assert (H > 0.9).any() and (H <= 0.9).any()
    assert (kept[H > 0.9] == 6).all() and (kept[H <= 0.9] < 6).any()
    check_module(m, routed_linear_loop(m, lambda z: ref_dynmole_routing(z)[0], [48 / 24] * 6,
                                       dense=True), x)


# --- 6. MeteoRA --------------------------------------------------------------------------------


@pytest.mark.parametrize("k,temperature,original_path",
                         [(2, 1.0, False), (2, 15.0, False), (1, 1.0, False), (2, 1.0, True)])
def test_meteora(k, temperature, original_path):
    """MeteoRA (28 adapters, r=8, per-adapter scalings): top-k logits -> softmax(v / T) (k=1:
    weight 1) or, ``original_path``, softmax -> top-k -> renormalise."""
    scales = (torch.rand(28) * 3 + 0.5).tolist()
    m = make_linear(MeteoRA, k=k, temperature=temperature, scales=scales,
                    original_path=original_path).eval()
    route = ((lambda z: ref_topk(z, k)) if original_path
             else (lambda z: ref_topk_softmax(z, k, temperature)))
    no_grad = ("router.linear.weight",) if k == 1 else ()
    check_module(m, routed_linear_loop(m, route, scales), torch.randn(30, DIN), no_grad=no_grad)


# --- 7. FlexMoRE -------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_flexmore_ragged_ranks(rslora):
    """FlexMoRE: ragged ranks [1, 4, 0, 7, 16] (the rank-0 expert adds nothing but still takes
    its share of the renormalised top-2 weight), alpha 16 (alpha / r or alpha / sqrt(r))."""
    ranks = [1, 4, 0, 7, 16]
    m = make_linear(FlexMoRE, ranks, rslora=rslora).eval()
    x = torch.randn(36, DIN)
    assert (ref_topk(router_logits(m.router, x), 2)[1] == 2).any()  # the rank-0 expert is used
    scales = [0.0 if r == 0 else 16 / (math.sqrt(r) if rslora else r) for r in ranks]
    check_module(m, routed_linear_loop(m, lambda z: ref_topk(z, 2), scales), x)


# --- 8. the core -------------------------------------------------------------------------------

RAGGED = [3, 0, 5, 2, 8]  # E = 5, one rank-0 expert


def ragged_bank(shared_a=False):
    ranks = [4] * 5 if shared_a else RAGGED
    return LoRABank(DIN, DOUT, ranks, alpha=8.0, shared_a=shared_a, init="gaussian")


def bank_scales(bank):
    return [0.0 if r == 0 else 8.0 / r for r in bank.ranks]


def sparse_route(T, k, E, unused=4):
    """ids [T, k] (distinct per row, expert ``unused`` never, about 1 in 5 slots -1) and
    positive weights [T, k] requiring grad."""
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])
    ids = torch.where(ids >= unused, ids + 1, ids)
    ids = torch.where(torch.rand(T, k) < 0.2, -1, ids).int()
    return torch.rand(T, k).add(0.1).requires_grad_(), ids


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("T", [1, 19])
def test_bank_routed_and_per_slot(T, with_base):
    bank = ragged_bank()
    E, k = bank.num_experts, 3
    w, ids = sparse_route(T, k, E)
    x = torch.randn(T, DIN, requires_grad=True)
    expert = bank_expert(bank, bank_scales(bank))
    base = torch.randn(T, DOUT, requires_grad=True) if with_base else None
    base2 = torch.randn(T, k, DOUT, requires_grad=True) if with_base else None

    def ref_routed(x, w, base):
        return sparse_combine(x, w, ids, E, expert, torch.zeros(T, DOUT) if base is None else base)

    def ref_per_slot(x, base):
        out = torch.zeros(T, k, DOUT) if base is None else base
        for e in range(E):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            out = out.index_put((tok, slot), out[tok, slot] + expert(e, x[tok]))
        return out
    params = trainable(bank)
    check_parity(lambda x, w, b: bank.routed(x, w, ids, b), ref_routed, (x, w, base), params)
    check_parity(lambda x, b: bank.routed_per_slot(x, ids, b), ref_per_slot, (x, base2), params)


@pytest.mark.parametrize("shared_a", [False, True])
def test_bank_dense_and_per_expert(shared_a):
    bank = ragged_bank(shared_a)
    E, T = bank.num_experts, 14
    x = torch.randn(T, DIN, requires_grad=True)
    gate = torch.rand(T, E).masked_fill(torch.rand(T, E) < 0.3, 0).requires_grad_()
    base = torch.randn(T, DOUT, requires_grad=True)
    expert = bank_expert(bank, bank_scales(bank))
    params = trainable(bank)
    check_parity(bank.dense, lambda x, g, b: dense_combine(x, g, E, expert, b), (x, gate, base),
                 params)
    check_parity(bank.per_expert, lambda x: torch.stack([expert(e, x) for e in range(E)], 1),
                 (x,), params)


def test_routing_to_dense():
    w, ids = sparse_route(11, 3, 6)
    gate = torch.zeros(11, 6)
    for t in range(11):
        for j in range(3):
            if ids[t, j] >= 0:
                gate[t, ids[t, j]] += w[t, j]
    torch.testing.assert_close(Routing(w, ids).to_dense(6), gate, rtol=0, atol=0)
    dense = torch.rand(4, 6)
    assert Routing(dense).to_dense(6) is dense


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_is_peft_lora(rslora):
    """``LoRALinear`` = PEFT ``lora.Linear``: ``W0 x + b + (alpha / r) B A x`` (rsLoRA: alpha /
    sqrt r); PEFT's default init (B = 0) starts as the base layer exactly."""
    base = nn.Linear(DIN, DOUT)
    x = torch.randn(2, 3, DIN)
    assert torch.equal(LoRALinear(base, 8, 16.0)(x), base(x))
    m = LoRALinear(base, 8, 16.0, rslora=rslora, init="gaussian")
    s = 16.0 / (math.sqrt(8) if rslora else 8)
    A, B = m.bank.expert(0)
    check_module(m, lambda x: linear(base, x) + lora(x, A, B, s), x)


def make_molora(with_base=True, E=6, k=2):
    base = nn.Linear(DIN, DOUT) if with_base else None
    bank = LoRABank(DIN, DOUT, 4, E, alpha=8.0, init="gaussian")
    return MoLoRALinear(base, bank, Router(DIN, E), TopK(k))


@pytest.mark.parametrize("with_base", [True, False])
def test_molora_linear_leading_dims_and_adapter_only(with_base):
    """[B, S, d] input through the router + top-2; ``base=None`` returns the delta alone."""
    m = make_molora(with_base)
    ref = routed_linear_loop(m, lambda z: ref_topk(z, 2), [2.0] * 6, with_base=with_base)
    y = check_module(m, ref, torch.randn(2, 7, DIN))
    assert y.shape == (2, 7, DOUT)


def test_molora_linear_external_routing_with_dropped_slots():
    """A given ``Routing`` (ids with -1 = dropped slot) skips the router; the weights get grads."""
    m = make_molora()
    T = 17
    w, ids = sparse_route(T, 3, 6)
    ref = routed_linear_loop(m, lambda z: (w, ids), [2.0] * 6)
    check_parity(lambda x, w: m(x, Routing(w, ids)), lambda x, w: ref(x),
                 (torch.randn(T, DIN, requires_grad=True), w),
                 [(n, p) for n, p in trainable(m) if not n.startswith("router")])


EMPTY_INPUT_BUILDERS = {
    "MoLoRALinear": make_molora,
    "LoRALinear": lambda: LoRALinear(nn.Linear(DIN, DOUT), 4, 8.0, init="gaussian"),
    "LoRAMoE": lambda: make_linear(LoRAMoE),
    "HydraLoRA": lambda: make_linear(HydraLoRA),
    "DynMoLE": lambda: make_linear(DynMoLE),
    "MixLoRA": make_mixlora,
    "LLaVAMoLE-dense": lambda: make_llava(dense=True),
}


@pytest.mark.parametrize("name", list(EMPTY_INPUT_BUILDERS))
def test_empty_input(name):
    """T = 0 tokens: [0, d_in] -> [0, d_out] forward and backward without error."""
    m = EMPTY_INPUT_BUILDERS[name]()
    d_in = m.in_features if hasattr(m, "in_features") else D
    d_out = m.out_features if hasattr(m, "out_features") else D
    x = torch.randn(0, d_in, requires_grad=True)
    y = m(x)
    assert y.shape == (0, d_out)
    y.sum().backward()
    assert x.grad.shape == (0, d_in)


def test_errors():
    m = make_molora()
    with pytest.raises(ValueError):
        m(torch.randn(3, DIN + 1))
    with pytest.raises(ValueError):
        make_mixlora()(torch.randn(3, D + 1))
    with pytest.raises(ValueError):
        m.bank.routed(torch.randn(3, DIN - 1), None, torch.zeros(3, 1, dtype=torch.int32))
    with pytest.raises(ValueError):  # base 24 -> 20 with a bank 24 -> 16
        MoLoRALinear(nn.Linear(DIN, DOUT), LoRABank(DIN, 16, 4, 3), Router(DIN, 3), TopK(2))
    with pytest.raises(ValueError):  # up_proj of the wrong shape
        MixLoRA(nn.Linear(D, DFF), nn.Linear(D, DFF + 1), nn.Linear(DFF, D))
    bad_banks = [dict(ranks=[2, -1]), dict(ranks=[]), dict(ranks=4),
                 dict(ranks=[2, 3], num_experts=3), dict(ranks=[2, 3], shared_a=True),
                 dict(ranks=[2, 2], scales=[1.0]), dict(ranks=[2, 2], init="zeros")]
    for kw in bad_banks:
        with pytest.raises(ValueError):
            LoRABank(DIN, DOUT, **kw)
    with pytest.raises(ValueError):
        make_linear(FlexMoRE, [])
    with pytest.raises(ValueError):
        make_mixlora(routing="top3")


# --- 9. aux losses (recomputed from the published formulas) ------------------------------------


def check_aux(m, x, expected_fn, *aux_args, **aux_kw):
    """``m.aux_loss`` of the module's routing vs ``expected_fn(logits)`` (plain torch on the
    router logits recomputed from the same router weight): value and router gradient."""
    _, routing = m(x, return_routing=True)
    loss = m.aux_loss(routing, *aux_args, **aux_kw)
    W = m.router.linear.weight
    expected = expected_fn(router_logits(m.router, x.reshape(-1, x.shape[-1])))
    assert_close(loss, expected, what="aux loss")
    assert expected.item() != 0
    g, g_ref = (torch.autograd.grad(v, W, allow_unused=True)[0] for v in (loss, expected))
    assert_close(torch.zeros_like(W) if g is None else g, g_ref, what="aux grad")


def mixtral_balance(p, ids, E):
    """``E * sum_{j, e} f[j, e] P[e]``, f[j, e] = mean_t 1[ids[t, j] == e] (Mixtral / MoE-PEFT)."""
    f = (ids[..., None] == torch.arange(E)).float().mean(0)
    return E * (f * p.mean(0)).sum()


@pytest.mark.parametrize("routing", ["topk", "dynamic", "switch", "topk_masked"])
def test_mixlora_aux_loss(routing):
    m = make_mixlora(routing=routing.split("_")[0], dropout=0.0, expert_capacity=3)
    sharpen(m.router, 30.0)
    x = torch.randn(26, D)
    mask = None
    if routing == "topk_masked":  # padding excluded from every mean (MoE-PEFT's masked form)
        x, mask = x.reshape(2, 13, D), torch.ones(2, 13, dtype=torch.long)
        mask[0, 9:] = 0
        mask[1, 4:] = 0

    def expected(z):
        p = torch.softmax(z, -1)
        if routing == "switch":  # MoE-PEFT SwitchRouterLoss: argmax recomputed, no capacity
            f = F.one_hot(p.argmax(-1), 8).float().mean(0)
            return (0.01 * (f * p.mean(0)).mean() * 8 ** 2
                    + 0.001 * (torch.logsumexp(z, -1) ** 2).mean())
        ids = ref_dynamic_top_p(z, 0.8)[1] if routing == "dynamic" else ref_topk(z, 2)[1]
        if mask is not None:
            keep = mask.reshape(-1).bool()
            p, ids = p[keep], ids[keep]
        return 0.01 * mixtral_balance(p, ids, 8)
    if routing == "switch":
        assert (ref_switch(router_logits(m.router, x), 3)[1] < 0).any()  # some tokens dropped
    check_aux(m, x, expected, attention_mask=mask)


def moe_peft_dynamic_loss(z, top_p, E):
    """MoE-PEFT ``DynamicRouterLoss`` (``_dynamic_load_balancing_loss_func``): softmax, the
    dynamic top-p slots [T, E] (-1 unused), ``tokens_per_expert = mean_t one_hot`` [slot, E],
    ``P = mean_t p``, ``E * sum``; the attention mask it is given is never read."""
    p = torch.softmax(z, -1)
    sel = ref_dynamic_top_p(z, top_p)[1]
    tokens_per_expert = (sel[..., None] == torch.arange(E)).float().mean(0)
    return E * (tokens_per_expert * p.mean(0)[None]).sum()


def moe_peft_switch_loss(z, E, aux_coef, z_coef):
    """MoE-PEFT ``SwitchRouterLoss``: ``z_coef * mean_t logsumexp(z)^2 + aux_coef * E^2 *
    mean_e(mean_t one_hot(argmax p) * mean_t p)``; the attention mask is never read."""
    p = torch.softmax(z, -1)
    z_loss = (torch.logsumexp(z, -1) ** 2).sum() / z.shape[0]
    f = F.one_hot(p.argmax(-1), E).float().mean(0)
    return z_coef * z_loss + aux_coef * (f * p.mean(0)).mean() * E ** 2


@pytest.mark.parametrize("form", [None, "masked", "moe_peft"])
@pytest.mark.parametrize("routing", ["topk", "dynamic", "switch"])
def test_mixlora_aux_loss_padding_forms(routing, form):
    """A padded batch: ``aux_loss_form="masked"`` (the default) drops padded tokens from every
    mean; ``"moe_peft"`` is MoE-PEFT's exact loss (top-k masked, dynamic / switch NOT masked).
    Both vs formulas written here; on this batch the dynamic / switch forms really differ."""
    kw = {} if form is None else dict(aux_loss_form=form)
    m = make_mixlora(routing=routing, dropout=0.0, expert_capacity=4, **kw)
    assert m.aux_loss_form == (form or "masked")
    sharpen(m.router, 30.0)
    x = torch.randn(2, 13, D)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, 8:] = 0
    mask[1, 3:] = 0
    keep = mask.reshape(-1).bool()
    masked = form != "moe_peft" or routing == "topk"

    def expected(z):
        if masked:
            z = z[keep]
        if routing == "switch":
            return moe_peft_switch_loss(z, 8, 0.01, 0.001)
        if routing == "dynamic":
            return 0.01 * moe_peft_dynamic_loss(z, 0.8, 8)
        return 0.01 * mixtral_balance(torch.softmax(z, -1), ref_topk(z, 2)[1], 8)
    check_aux(m, x, expected, attention_mask=mask)
    if routing != "topk":
        _, r = m(x, return_routing=True)
        other = make_mixlora(routing=routing, dropout=0.0, expert_capacity=4,
                             aux_loss_form="masked" if form == "moe_peft" else "moe_peft")
        other.load_state_dict(m.state_dict())
        gap = (m.aux_loss(r, attention_mask=mask) - other.aux_loss(r, attention_mask=mask)).abs()
        assert gap > 1e-4, "padding changes the loss: the two forms must differ here"
        # without padding the forms agree
        torch.testing.assert_close(m.aux_loss(r), other.aux_loss(r))


def test_mixlora_aux_loss_form_rejects_unknown():
    with pytest.raises(ValueError, match="aux_loss_form"):
        make_mixlora(aux_loss_form="ignore")


@pytest.mark.parametrize("E", [3, 6])
def test_mola_aux_loss(E):
    m = make_linear(MoLA, E)

    def expected(z):  # MoLA load_balancing_loss_func: f_e = count_e / (T k), x 0.001
        p = torch.softmax(z, -1)
        counts = F.one_hot(ref_topk(z, 2)[1].reshape(-1), E).sum(0).float()
        return 0.001 * E * (counts / counts.sum() * p.mean(0)).sum()
    check_aux(m, torch.randn(2, 11, DIN), expected)


def test_dynmole_aux_loss():
    m = make_linear(DynMoLE)
    x = torch.randn(30, DIN) * torch.linspace(0.1, 6.0, 30)[:, None]

    def expected(z):  # _dynamic_load_balancing_loss_func: 0.01 mean H + 0.001 E sum mean(w) mean(p)
        w, H = ref_dynmole_routing(z)
        return 0.01 * H.mean() + 0.001 * 6 * (w.mean(0) * torch.softmax(z, -1).mean(0)).sum()
    check_aux(m, x, expected)


def test_meteora_aux_loss():
    m = make_linear(MeteoRA, num_experts=5)
    B, S = 2, 6
    labels = torch.randint(0, 5, (B, S))
    labels[0, 3] = -100

    def expected(z):  # lora_gate_loss_func x 50: CE of logits[:, :-1] vs labels[:, 1:]
        z = z.reshape(B, S, 5)[:, :-1].reshape(-1, 5)
        return 50 * F.cross_entropy(z, labels[:, 1:].reshape(-1), ignore_index=-100)
    x = torch.randn(B, S, DIN)
    check_aux(m, x, expected, task_labels=labels, batch_shape=(B, S))
    _, routing = m(x, return_routing=True)
    assert m.aux_loss(routing).item() == 0  # no labels: no loss


@pytest.mark.parametrize("dense", [False, True])
def test_llava_mole_aux_loss(dense):
    m = make_llava(dense=dense)
    B, S = 2, 9

    def expected(z):  # model.py: mean_b sum_e mean_s p * mean_s onehot(argmax), x 0.05
        p = torch.softmax(z, -1).reshape(B, S, 3)
        onehot = F.one_hot(p.argmax(-1), 3).float()
        return 0.05 * (p.mean(1) * onehot.mean(1)).sum(-1).mean()
    check_aux(m, torch.randn(B, S, D), expected, batch_shape=(B, S))


# --- 10. state dicts ---------------------------------------------------------------------------

STATE_DICT_BUILDERS = {
    "MixLoRA": make_mixlora,
    "MixLoRA-dynamic": lambda: make_mixlora(routing="dynamic"),
    "MixLoRA-switch": lambda: make_mixlora(routing="switch", expert_capacity=4),
    "LLaVAMoLE": make_llava,
    "LLaVAMoLE-dense": lambda: make_llava(dense=True),
    "MoLA": lambda: make_linear(MoLA, 6),
    "LoRAMoE": lambda: make_linear(LoRAMoE),
    "HydraLoRA": lambda: make_linear(HydraLoRA),
    "DynMoLE": lambda: make_linear(DynMoLE),
    "MeteoRA": lambda: make_linear(MeteoRA, scales=(torch.rand(28) + 1).tolist()),
    "FlexMoRE": lambda: make_linear(FlexMoRE, [1, 4, 0, 7, 16]),
    "LoRALinear": lambda: LoRALinear(nn.Linear(DIN, DOUT), 8, 16.0, init="gaussian"),
    "MoLoRALinear": make_molora,
}


@pytest.mark.parametrize("name", list(STATE_DICT_BUILDERS))
def test_state_dict_round_trip(name):
    """save -> BytesIO -> load into a module built from another seed: identical outputs."""
    build = STATE_DICT_BUILDERS[name]
    torch.manual_seed(1)
    m = build().eval()
    torch.manual_seed(2)
    fresh = build().eval()
    x = torch.randn(2, 11, m.in_features if hasattr(m, "in_features") else D)
    with torch.no_grad():
        y = m(x)
        assert not torch.equal(fresh(x), y)
        fresh.load_state_dict(round_trip(m))
        assert torch.equal(fresh(x), y)
