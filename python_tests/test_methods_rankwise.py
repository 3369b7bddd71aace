"""Loop-equivalence tests of the rank-wise and special-gate MoE-LoRA methods (issue 5).

Every method of ``molora_ops.modules`` covered here (SMoRA, FlyLoRA, MoRA, MoELoRA, LoRA-Mixer, ReMix,
LoRA Soups CAT, MoLE, CoMoL) is compared, forward and backward, with a plain per-token / per-expert loop
written here from the paper and the authors' reference code (METHODS.md), in plain torch: no
``molora_ops`` op and no module internal is called by a loop; it only reads the module's parameters and
buffers (snapshotted before the forward). Each loop runs in fp32 and in fp64 and the module's y, x.grad
and every trainable parameter's grad follow the project's tolerance rule (``assert_close_fa``); a
parameter the loop does not use must get no gradient, a frozen one none at all.

Inputs are fresh seeded randoms; banks are built with ``init="gaussian"`` (or B filled at random) so
the adapters do not vanish; selection biases are random and non-zero. Shapes are ragged (d_in=24,
d_out=20, T=1, leading dims [B, S, d], odd E and ranks), hyperparameters the published ones plus a
ragged variant. Also: state_dict round trips into a module built from another seed, bad inputs, and
constructor errors.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from molora_ops.modules import (CoMoL, FlyLoRA, LoRAMixer, LoRASoupsCAT, MoELoRA, MoLE, MoRA, ReMix,
                                SMoRA)
from utils import assert_close_fa

D_IN, D_OUT = 24, 20
F32, F64 = torch.float32, torch.float64
SHAPES = [(1, D_IN), (17, D_IN), (2, 5, D_IN)]
SHAPE_IDS = ["T1", "T17", "B2S5"]


# --------------------------------------------------------------------------------------------
# Module builders (published hyperparameters first, then a ragged variant)
# --------------------------------------------------------------------------------------------

def _base():
    return nn.Linear(D_IN, D_OUT, bias=True)


def _randomize_(m: nn.Module) -> nn.Module:
    """Make every state entry the tests rely on random and non-trivial (B != 0, bias != 0, ...)."""
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name == "rank_bias":
                b.copy_(0.05 * torch.randn_like(b))
        for name, p in m.named_parameters():
            if name == "lora.B" and isinstance(m, FlyLoRA):
                p.normal_()                       # FlyLoRA's B starts at 0 (init is fixed to "lora")
            elif name in ("norm.weight", "gating.alpha"):
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
            elif name == "norm.bias":
                p.normal_(0.0, 0.3)
    return m


CASES = {
    # name: (class, kwargs)
    "smora": (SMoRA, dict(r=64, k=8, alpha=16.0, dropout=0.0, init="gaussian")),
    "smora_p2": (SMoRA, dict(r=64, k=8, alpha=16.0, dropout=0.0, rank_partition=2, init="gaussian")),
    "smora_ragged": (SMoRA, dict(r=12, k=5, alpha=7.0, dropout=0.0, rank_partition=3,
                                 init="gaussian")),
    "flylora": (FlyLoRA, dict(r=32, k=8, alpha=64.0)),
    "flylora_abs_grad": (FlyLoRA, dict(r=12, k=5, alpha=24.0, use_abs=True, block_input_grad=False)),
    "mora": (MoRA, dict(r=16, k=4, alpha=16.0, init="gaussian")),
    "mora_ragged": (MoRA, dict(r=10, k=3, alpha=5.0, temperature=0.7, init="gaussian")),
    "moelora": (MoELoRA, dict(num_experts=8, k=2, r=8, alpha=16.0, dropout=0.0, init="gaussian")),
    "moelora_ragged": (MoELoRA, dict(num_experts=5, k=3, r=3, alpha=4.0, dropout=0.0,
                                     init="gaussian")),
    "loramixer": (LoRAMixer, dict(num_experts=4, k=2, r=8, alpha=16.0, dropout=0.0,
                                  init="gaussian")),
    "loramixer_ragged": (LoRAMixer, dict(num_experts=5, k=3, r=5, alpha=3.0, dropout=0.0,
                                         init="gaussian")),
    "remix": (ReMix, dict(num_experts=8, k=2, r=8, alpha=16.0, dropout=0.0, init="gaussian")),
    "remix_ragged": (ReMix, dict(num_experts=5, k=3, r=3, alpha=4.0, dropout=0.0, temperature=0.6,
                                 init="gaussian")),
    "soups": (LoRASoupsCAT, dict(ranks=[8, 8, 8], alpha=16.0, init="gaussian")),
    "soups_ragged": (LoRASoupsCAT, dict(ranks=[3, 5, 7, 1, 2], alpha=6.0, init="gaussian")),
    "mole": (MoLE, dict(ranks=8, num_experts=3, alpha=16.0, init="gaussian")),
    "mole_ragged": (MoLE, dict(ranks=[3, 5, 2, 7, 1], alpha=5.0, temperature=0.5, init="gaussian")),
    "comol": (CoMoL, dict(num_experts=4, r=8, alpha=16.0, dropout=0.0, init="gaussian")),
    "comol_top2": (CoMoL, dict(num_experts=4, r=8, alpha=16.0, dropout=0.0, k=2, init="gaussian")),
    "comol_ragged": (CoMoL, dict(num_experts=5, r=6, alpha=9.0, dropout=0.0, k=3, init="gaussian")),
}


def build(name: str, seed=None, **overrides) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    cls, kw = CASES[name]
    return _randomize_(cls(_base(), **{**kw, **overrides})).eval()


# --------------------------------------------------------------------------------------------
# The loops (plain torch on the snapshotted state P: name -> tensor)
# --------------------------------------------------------------------------------------------

def _base_out(x, P):
    return F.linear(x, P["base.weight"], P["base.bias"])


def _topk(key, k):
    return torch.topk(key, k, dim=-1, sorted=True)


def _rank_loop(base, vals, gates, idx, B, scale):
    """``y[t] = base[t] + scale * sum_j gates[t,j] * vals[t,j] * B[:, idx[t,j]]`` token by token."""
    rows = []
    for t in range(base.shape[0]):
        acc = torch.zeros_like(base[t])
        for j in range(idx.shape[1]):
            acc = acc + gates[t, j] * vals[t, j] * B[:, idx[t, j]]
        rows.append(acc)
    return base + scale * torch.stack(rows)


def smora_select(xd, P, k, part):
    """srmole ``SRMoLELinear.forward``: sigmoid router, repeat_interleave, + bias, top-k, v/sum*k."""
    g = torch.sigmoid(xd @ P["router.linear.weight"].T).repeat_interleave(part, dim=-1)
    v, idx = _topk(g + P["rank_bias"].to(g.dtype), k)
    return v / v.sum(-1, keepdim=True) * k, idx


def smora_loop(x, P, *, k, alpha, rank_partition=1, mask=None, **_):
    xd = x if mask is None else x * mask.to(x.dtype)
    gate, idx = smora_select(xd, P, k, rank_partition)
    vals = torch.stack([torch.stack([P["lora.A"][i] @ xd[t] for i in idx[t]])
                        for t in range(x.shape[0])])
    return _rank_loop(_base_out(x, P), vals, gate, idx, P["lora.B"], alpha / k)


def fly_select(h, P, k, use_abs):
    key = h.detach() + P["rank_bias"].to(h.dtype)
    return _topk(key.abs() if use_abs else key, k).indices


def flylora_loop(x, P, *, r, k, alpha, use_abs=False, block_input_grad=True, **_):
    h = x @ P["lora.A"].T
    if block_input_grad:
        h = h.detach()
    idx = fly_select(h, P, k, use_abs)
    vals = h.gather(1, idx)
    return _rank_loop(_base_out(x, P), vals, torch.ones_like(vals), idx, P["lora.B"], alpha / r)


def mora_loop(x, P, *, r, k, alpha, temperature=1.0, **_):
    h = x @ P["lora.A"].T
    v, idx = _topk(h, k)
    g = torch.softmax(v / temperature, dim=-1)
    return _rank_loop(_base_out(x, P), v, g, idx, P["lora.B"], alpha / r)


def _ranks(kw):
    r = kw["ranks"] if "ranks" in kw else kw["r"]
    if isinstance(r, int):
        return [r] * (kw.get("num_experts") or kw.get("num_adapters"))
    return list(r)


def expert_out(x, P, ranks, alpha, e, prefix="bank"):
    """``(alpha / r_e) B_e A_e x`` of expert e (rows / columns r0:r1 of the stacked bank)."""
    r0 = sum(ranks[:e])
    A_e = P[f"{prefix}.A"][r0:r0 + ranks[e]]
    B_e = P[f"{prefix}.B"][:, r0:r0 + ranks[e]]
    return (alpha / ranks[e]) * ((x @ A_e.T) @ B_e.T)


def _routed_loop(x, P, ranks, alpha, w, idx):
    """Per slot outputs o [T, k, d_out] and ``y = W0 x + sum_j w_j o_j``."""
    o = torch.stack([torch.stack([expert_out(x[t], P, ranks, alpha, int(e)) for e in idx[t]])
                     for t in range(x.shape[0])])
    return _base_out(x, P) + (w.unsqueeze(-1) * o).sum(1), o


def _softmax_topk_renorm(x, P, k):
    p = torch.softmax(x @ P["router.linear.weight"].T, dim=-1)
    v, idx = _topk(p, k)
    return v / v.sum(-1, keepdim=True), v, idx


def moelora_loop(x, P, *, k, alpha, **kw):
    w, _, idx = _softmax_topk_renorm(x, P, k)
    return _routed_loop(x, P, _ranks(kw), alpha, w, idx)


def loramixer_loop(x, P, *, k, alpha, **kw):
    w_hard, p_sel, idx = _softmax_topk_renorm(x, P, k)
    w = w_hard + p_sel - p_sel.detach()
    return _routed_loop(x, P, _ranks(kw), alpha, w, idx)[0]


def remix_loop(x, P, *, k, alpha, temperature=1.0, sample_seed=None, **kw):
    z = (x @ P["router.linear.weight"].T).float() / temperature
    if sample_seed is not None:  # Gumbel-top-k: top-k of z + Gumbel(0, 1) noise (one U per logit)
        torch.manual_seed(sample_seed)
        z = z - torch.log(-torch.log(torch.rand(z.shape, dtype=F32)))
    idx = _topk(z.detach(), k).indices
    w = torch.full(idx.shape, 1.0 / k, dtype=x.dtype)
    return _routed_loop(x, P, _ranks(kw), alpha, w, idx)[0]


def soups_loop(x, P, *, alpha, **kw):
    ranks = _ranks(kw)
    y = _base_out(x, P)
    for e in range(len(ranks)):
        y = y + P["gating.alpha"][e] * expert_out(x, P, ranks, alpha, e)
    return y


def mole_loop(x, P, *, alpha, temperature=1.0, **kw):
    ranks = _ranks(kw)
    outs = [expert_out(x, P, ranks, alpha, e) for e in range(len(ranks))]
    cat = torch.cat(outs, dim=-1)                                          # [T, N * d_out]
    mu = cat.mean(-1, keepdim=True)
    var = ((cat - mu) ** 2).mean(-1, keepdim=True)
    normed = (cat - mu) / torch.sqrt(var + 1e-5) * P["norm.weight"] + P["norm.bias"]
    G = torch.softmax((normed @ P["gate.weight"].T) / temperature, dim=-1)
    y = _base_out(x, P)
    for e, o in enumerate(outs):
        y = y + G[:, e:e + 1] * o
    return y


def comol_loop(x, P, *, num_experts, r, alpha, k=None, **_):
    A, B, cores = P["lora.A"], P["lora.B"], P["cores"]
    h = x @ A.T                                                            # [T, r]
    p = torch.softmax(h @ P["router.linear.weight"].T, dim=-1)
    if k is None:
        w, idx = p, torch.arange(num_experts).expand(x.shape[0], -1)
    else:
        v, idx = _topk(p, k)
        w = v / v.sum(-1, keepdim=True)
    rows = []
    for t in range(x.shape[0]):
        u = torch.zeros_like(h[t])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            u = u + w[t, j] * (cores[e * r:(e + 1) * r] @ h[t])
        rows.append(u)
    return _base_out(x, P) + (alpha / r) * (torch.stack(rows) @ B.T)


LOOPS = {SMoRA: smora_loop, FlyLoRA: flylora_loop, MoRA: mora_loop, MoELoRA: moelora_loop,
         LoRAMixer: loramixer_loop, ReMix: remix_loop, LoRASoupsCAT: soups_loop, MoLE: mole_loop,
         CoMoL: comol_loop}


def loop_for(name, **extra):
    cls, kw = CASES[name]
    return lambda x, P: LOOPS[cls](x, P, **{**kw, **extra})


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------

def snapshot(m: nn.Module) -> dict:
    state = {n: p.detach().clone() for n, p in m.named_parameters()}
    state.update({n: b.detach().clone() for n, b in m.named_buffers()})
    return state


def _as_tuple(out):
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def run_loop(loop, x, state, trainable, dtype, gouts):
    """Loop on copies of x and of the state in ``dtype``; returns (outs, x.grad, {name: grad})."""
    P = {n: (t.to(dtype, copy=True) if t.is_floating_point() else t.clone()).requires_grad_(
        n in trainable) for n, t in state.items()}
    xr = x.detach().to(dtype).requires_grad_(True)
    outs = _as_tuple(loop(xr.reshape(-1, x.shape[-1]), P))[:len(gouts)]
    outs = (outs[0].reshape(*x.shape[:-1], -1),) + outs[1:]
    torch.autograd.backward(outs, [g.to(dtype) for g in gouts])
    return outs, xr.grad, {n: P[n].grad for n in trainable}


def check_vs_loop(m, loop, x, fwd=None):
    """Module forward + backward (random upstream grads) against the loop in fp32 and fp64.

    Returns the state snapshotted before the module's forward."""
    m.zero_grad(set_to_none=True)
    state = snapshot(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    xm = x.detach().clone().requires_grad_(True)
    outs = _as_tuple(fwd(m, xm) if fwd is not None else m(xm))
    gouts = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, gouts)
    lo = run_loop(loop, x, state, trainable, F32, gouts)
    hi = run_loop(loop, x, state, trainable, F64, gouts)
    assert len(outs) == len(lo[0])
    for i, (o, l, h) in enumerate(zip(outs, lo[0], hi[0])):
        assert_close_fa(o.detach(), l.detach(), h.detach(), name=f"output {i}")
    assert_close_fa(xm.grad, lo[1], hi[1], name="x.grad")
    for n, p in m.named_parameters():
        if n not in trainable:
            assert p.grad is None, f"frozen {n} got a gradient"
        elif lo[2][n] is None:
            assert p.grad is None or not p.grad.any(), f"{n} gets a gradient the loop does not give"
        else:
            assert p.grad is not None, f"{n} got no gradient"
            assert_close_fa(p.grad, lo[2][n], hi[2][n], name=f"{n}.grad")
    return state


# --------------------------------------------------------------------------------------------
# Forward / backward vs the loop, every method, every shape
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_loop(name, shape):
    m = build(name)
    check_vs_loop(m, loop_for(name), torch.randn(shape))


@pytest.mark.parametrize("name", ["smora", "smora_p2", "flylora", "flylora_abs_grad", "moelora",
                                  "loramixer", "mole", "comol_top2"])
def test_matches_loop_in_train_mode(name):
    """Training mode (no dropout here) computes the same function; biases move afterwards."""
    check_vs_loop(build(name).train(), loop_for(name), torch.randn(9, D_IN))


# --------------------------------------------------------------------------------------------
# SMoRA
# --------------------------------------------------------------------------------------------

def expected_bias(before, idx, r, rate):
    c = torch.bincount(idx.flatten(), minlength=r).float()
    return before + rate * torch.sign(c.mean() - c)


@pytest.mark.parametrize("name", ["smora", "smora_p2"])
def test_smora_bias_update(name):
    """``b += 1e-5 sign(mean(c) - c)`` (c = rank histogram of the selected ids) in train, not in eval,
    the update AFTER the selection (srmole ``SRMoLELinear.forward``)."""
    _, kw = CASES[name]
    m = build(name)
    assert m.rank_bias.requires_grad is False and m.rank_bias.abs().min() > 0
    x = torch.randn(32, D_IN)
    before = m.rank_bias.clone()
    with torch.no_grad():
        m.eval()(x)
    assert torch.equal(m.rank_bias, before), "SMoRA updated its bias in eval"
    m.train()
    state = check_vs_loop(m, loop_for(name), x)
    _, idx = smora_select(x, state, kw["k"], kw.get("rank_partition", 1))
    want = expected_bias(before, idx, kw["r"], 1e-5)
    assert not torch.equal(want, before)
    assert torch.equal(m.rank_bias, want)


def test_smora_router_sees_dropped_input():
    """The router and A both read drop(x) (one mask); the base reads x."""
    m = build("smora", dropout=0.05).train()
    x = torch.randn(2, 7, D_IN)
    torch.manual_seed(1234)
    mask = F.dropout(torch.ones(14, D_IN), 0.05, training=True)
    assert (mask == 0).any()

    def fwd(mod, inp):
        torch.manual_seed(1234)
        return mod(inp)

    check_vs_loop(m, loop_for("smora", mask=mask), x, fwd)


# --------------------------------------------------------------------------------------------
# FlyLoRA
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flylora", "flylora_abs_grad"])
def test_flylora_sparse_frozen_a(name):
    """A is frozen with exactly ``d_in // (r // k)`` non-zeros per row (PEFT fork
    ``reset_lora_parameters("sparse")``; = d_in // (r/k) for the published r=32, k=8) ~ N(0, 1/r^2)."""
    _, kw = CASES[name]
    m = build(name)
    r, k = kw["r"], kw["k"]
    assert m.A.requires_grad is False and m.B.requires_grad is True
    nnz = (m.A != 0).sum(1)
    assert torch.equal(nnz, torch.full((r,), D_IN // (r // k)))
    if (r, k) == (32, 8):
        assert D_IN // (r / k) == D_IN // (r // k)
    assert len({tuple(row.nonzero().flatten().tolist()) for row in m.A}) > 1  # random supports
    std = m.A[m.A != 0].std().item()
    assert 0.5 / r < std < 2.0 / r


def test_flylora_input_gradient_only_through_base():
    """block_input_grad=True (default): x.grad = W0^T gy exactly as if there were no adapter."""
    m = build("flylora")
    x = torch.randn(6, D_IN, requires_grad=True)
    gy = torch.randn(6, D_OUT)
    m(x).backward(gy)
    torch.testing.assert_close(x.grad, gy @ m.base.weight, rtol=1e-6, atol=1e-6)
    assert m.B.grad is not None and m.B.grad.any()
    # without the block, the adapter adds its own input gradient (loop-checked in test_matches_loop)
    m2 = build("flylora", block_input_grad=False)
    x2 = x.detach().clone().requires_grad_(True)
    m2(x2).backward(gy)
    assert (x2.grad - gy @ m2.base.weight).abs().max() > 1e-3


@pytest.mark.parametrize("in_eval", [True, False], ids=["update_in_eval", "train_only"])
def test_flylora_bias_update(in_eval):
    """``d += 1e-3 sign(mean(c) - c)`` after the selection, on every forward (eval included, the PEFT
    fork's behaviour) by default; only in training with update_bias_in_eval=False."""
    _, kw = CASES["flylora"]
    m = build("flylora", update_bias_in_eval=in_eval)
    x = torch.randn(3, 5, D_IN)
    for mode in ("eval", "train"):
        getattr(m, mode)()
        before = m.rank_bias.clone()
        state = check_vs_loop(m, loop_for("flylora"), x)
        if mode == "eval" and not in_eval:
            assert torch.equal(m.rank_bias, before)
            continue
        idx = fly_select(x.reshape(-1, D_IN) @ state["lora.A"].T, state, kw["k"], False)
        want = expected_bias(before, idx, kw["r"], 1e-3)
        assert not torch.equal(want, before)
        assert torch.equal(m.rank_bias, want)


# --------------------------------------------------------------------------------------------
# MoELoRA, LoRA-Mixer, ReMix
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["moelora", "moelora_ragged"])
def test_moelora_expert_outputs(name):
    """``forward(x, return_expert_outputs=True)`` -> (y, o [T, k, d_out]) with o the loop's per-slot
    ``s_e B_e A_e x``; y equal to the plain forward; aux loss (balance + contrastive) differentiable."""
    _, kw = CASES[name]
    m = build(name)
    x = torch.randn(2, 6, D_IN)
    check_vs_loop(m, loop_for(name), x, lambda mod, inp: mod(inp, return_expert_outputs=True))
    y, routing, o = m(x, return_routing=True, return_expert_outputs=True)
    assert o.shape == (12, kw["k"], D_OUT)
    torch.testing.assert_close(y, m(x), rtol=0, atol=1e-6)
    m.zero_grad()
    loss = m.aux_loss(routing, o)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    for p in (m.router.linear.weight, m.bank.A, m.bank.B):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any()
    assert m.aux_loss(routing).requires_grad  # balance term alone still differentiable


def test_loramixer_straight_through_policy():
    """Forward weights = top-k renormalised softmax; d logits = the loop's gradient of
    ``w_hard + p_sel - p_sel.detach()`` (the documented additive straight-through form)."""
    m = build("loramixer_ragged")
    k = CASES["loramixer_ragged"][1]["k"]
    logits = torch.randn(7, 5, requires_grad=True)
    routing = m.gating(logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    p = torch.softmax(ref_logits, -1)
    v, idx = _topk(p, k)
    w_hard = v / v.sum(-1, keepdim=True)
    w_ref = w_hard + v - v.detach()
    assert torch.equal(routing.ids.long(), idx)
    torch.testing.assert_close(routing.weights, w_hard.detach(), rtol=1e-6, atol=1e-7)
    gw = torch.randn(7, k)
    routing.weights.backward(gw)
    w_ref.backward(gw, retain_graph=True)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
    # the straight-through term does change the gradient (vs the plain renormalised top-k)
    plain = torch.autograd.grad((w_hard * gw).sum(), ref_logits)[0]
    assert (plain - ref_logits.grad).abs().max() > 1e-3


def test_remix_train_samples_gumbel_top_k():
    """Training forward = Gumbel-top-k sample of softmax(z / T) (one U(0,1) per logit from the global
    RNG), equal weights 1/k; same loop as eval with the sampled ids."""
    name = "remix_ragged"
    m = build(name).train()
    x = torch.randn(3, 4, D_IN)

    def fwd(mod, inp):
        torch.manual_seed(99)
        return mod(inp)

    check_vs_loop(m, loop_for(name, sample_seed=99), x, fwd)
    # the sample differs from the eval top-k for at least one token (it is a sample)
    torch.manual_seed(99)
    _, r_train = m(x, return_routing=True)
    _, r_eval = m.eval()(x, return_routing=True)
    assert not torch.equal(r_train.ids, r_eval.ids)
    assert torch.equal(r_eval.weights, torch.full_like(r_eval.weights, 1 / 3))


def test_remix_sampling_statistics():
    """Seeded generator: distinct in-range ids per token, reproducible; empirical inclusion frequency
    of every expert within 5 sigma of the exact Plackett-Luce inclusion probability (k=2), the top
    expert's above the bottom one's."""
    gating = build("remix").gating.train()
    E, k, N = 8, 2, 4000
    z = torch.randn(E) * 1.5
    logits = z.expand(N, E).contiguous()
    r1 = gating(logits, generator=torch.Generator().manual_seed(5))
    r2 = gating(logits, generator=torch.Generator().manual_seed(5))
    ids = r1.ids.long()
    assert torch.equal(r1.ids, r2.ids)
    assert ids.shape == (N, k) and ids.min() >= 0 and ids.max() < E
    assert (ids[:, 0] != ids[:, 1]).all()
    assert torch.equal(r1.weights, torch.full((N, k), 0.5))
    freq = torch.bincount(ids.flatten(), minlength=E).double() / N
    p = torch.softmax(z.double(), 0)
    incl = torch.stack([p[e] + sum(p[j] * p[e] / (1 - p[j]) for j in range(E) if j != e)
                        for e in range(E)])
    sigma = torch.sqrt(incl * (1 - incl) / N)
    assert ((freq - incl).abs() <= 5 * sigma + 1e-12).all(), (freq, incl)
    assert freq[z.argmax()] > freq[z.argmin()]


def test_remix_log_prob_plackett_luce():
    """log P(i1, i2) = log p_i1 + log(p_i2 / (1 - p_i1)), p = softmax(z / T); gradient too."""
    gating = build("remix_ragged").gating  # temperature 0.6
    z = torch.randn(11, 5, requires_grad=True)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(11)]).to(torch.int32)
    lp = gating.log_prob(z, ids)
    zr = z.detach().clone().requires_grad_(True)
    p = torch.softmax(zr / 0.6, -1)
    t = torch.arange(11)
    i1, i2 = ids[:, 0].long(), ids[:, 1].long()
    want = torch.log(p[t, i1]) + torch.log(p[t, i2] / (1 - p[t, i1]))
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(11)
    lp.backward(g)
    want.backward(g)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# LoRA Soups CAT, MoLE, CoMoL specifics
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["soups", "soups_ragged"])
def test_soups_merge_unmerge(name):
    m = build(name)
    x = torch.randn(2, 3, D_IN)
    w0 = m.base.weight.detach().clone()
    with torch.no_grad():
        y = m(x)
        m.merge()
        m.merge()                      # idempotent
        assert m.merged and not torch.equal(m.base.weight, w0)
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=str(D_IN)):
            m(torch.randn(3, D_IN + 1))  # the merged path checks its input too
        m.unmerge()
        m.unmerge()
    assert not m.merged
    torch.testing.assert_close(m.base.weight, w0, rtol=0, atol=1e-6)
    assert m.base.weight.requires_grad is False
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mole", "mole_ragged"])
def test_mole_adapters_frozen(name):
    m = build(name)
    assert all(not p.requires_grad for p in m.bank.parameters())
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable == ["gate.weight", "norm.bias", "norm.weight"]


def test_comol_dense_gate_sums_to_one():
    m = build("comol")
    _, routing = m(torch.randn(5, D_IN), return_routing=True)
    assert routing.ids is None and routing.weights.shape == (5, 4)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(5))


# --------------------------------------------------------------------------------------------
# Every class: state_dict round trip, bad input, constructor errors
# --------------------------------------------------------------------------------------------

ROUNDTRIP = ["smora_p2", "flylora", "mora", "moelora", "loramixer", "remix", "soups_ragged",
             "mole_ragged", "comol_top2"]


@pytest.mark.parametrize("name", ROUNDTRIP)
def test_state_dict_round_trip(name):
    src = build(name, seed=11)
    x = torch.randn(4, 3, D_IN)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    dst = build(name, seed=12)
    with torch.no_grad():  # on copies: FlyLoRA's eval forward moves its bias
        assert not torch.equal(copy.deepcopy(dst)(x), copy.deepcopy(src)(x))
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    for (n, a), (n2, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert n == n2 and torch.equal(a, b), n
    if hasattr(src, "rank_bias"):
        assert src.rank_bias.abs().min() > 0 and "rank_bias" in src.state_dict()
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
        assert torch.equal(dst(x), src(x))      # buffers updated alike (FlyLoRA updates in eval)


@pytest.mark.parametrize("bad", [(5, D_IN + 1), (4, D_IN // 2), (D_IN,)],
                         ids=["wide", "half", "vector_ok"])
@pytest.mark.parametrize("name", ROUNDTRIP)
def test_bad_input_raises(name, bad):
    m = build(name)
    if len(bad) == 1:  # a single vector of the right size is a valid [d_in] input
        assert m(torch.randn(bad)).shape == (D_OUT,)
        return
    with pytest.raises(ValueError, match=str(D_IN)):
        m(torch.randn(bad))


@pytest.mark.parametrize("cls, kw", [
    (SMoRA, dict(r=64, k=65)), (SMoRA, dict(r=64, k=0)), (SMoRA, dict(r=64, k=8, rank_partition=3)),
    (SMoRA, dict(r=10, k=2, rank_partition=4)), (FlyLoRA, dict(r=32, k=33)), (FlyLoRA, dict(r=8, k=0)),
    (MoRA, dict(r=16, k=17)), (MoRA, dict(r=4, k=-1)),
], ids=lambda v: getattr(v, "__name__", None) or "-".join(f"{k}{x}" for k, x in v.items()))
def test_constructor_errors(cls, kw):
    with pytest.raises(ValueError):
        cls(_base(), **kw)


@pytest.mark.parametrize("cls, kw", [(SMoRA, dict(r=6, k=6, rank_partition=2, init="gaussian")),
                                     (FlyLoRA, dict(r=6, k=6)), (MoRA, dict(r=5, k=5))],
                         ids=["smora", "flylora", "mora"])
def test_rankwise_k_equals_r(cls, kw):
    """k = r (every rank active) is valid: a plain LoRA with per-rank gates."""
    m = _randomize_(cls(_base(), **kw)).eval()
    loop = lambda x, P: LOOPS[cls](x, P, **{"alpha": m.lora.alpha, **kw})  # noqa: E731
    check_vs_loop(m, loop, torch.randn(3, D_IN))
