"""Sequence-level routing (molora_ops/modules/sequence.py) vs plain loops in torch.

* MiLoRA (arXiv 2410.18035, no public code): the loop follows the paper's description as written in
  METHODS.md 2.9 / the module docstring: masked-mean prompt pooling -> Linear(d, M) -> softmax ->
  top-k over the M LoRA modules of a layer (renormalised) -> each module's delta x its sequence's
  gate; routing computed once per prompt and reused for every decode step.
* Poly (microsoft/mttl ``PolytroponSelector.forward`` + ``SkilledLoRA.forward_linear_``): the
  loop holds mttl's own parameter layout (``lora_a [Q, K, d_in/Q, r]``, ``lora_b [Q, K, r,
  d_out/Q]``) and runs its einsum / reshape / bmm forward verbatim.
fp32 on CPU, random non-zero adapters.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from molora_ops.modules.sequence import MiLoRAAdapters, MiLoRALinear, MiLoRARouter, PolyLinear

TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# MiLoRA
# --------------------------------------------------------------------------------------------

def milora_bases(d, f):
    """The 7 LoRA'd linears of a Llama layer (q, k, v, o, gate, up, down), tiny."""
    shapes = dict(q_proj=(d, d), k_proj=(d, d // 2), v_proj=(d, d // 2), o_proj=(d, d),
                  gate_proj=(d, f), up_proj=(d, f), down_proj=(f, d))
    return {name: nn.Linear(i, o) for name, (i, o) in shapes.items()}


def milora_gates_loop(h, mask, W_r, k, renormalize=True):
    """Per sequence: masked mean -> logits -> softmax -> top-k -> (renorm) -> dense gates."""
    B, S, _ = h.shape
    rows = []
    for b in range(B):
        keep = [s for s in range(S) if mask is None or mask[b, s] != 0]
        u = sum(h[b, s] for s in keep) / max(len(keep), 1)
        p = torch.softmax(W_r @ u, dim=-1)
        vals, idx = torch.topk(p, k)
        if renormalize:
            vals = vals / vals.sum()
        rows.append(torch.zeros_like(p).index_put((idx,), vals))
    return torch.stack(rows)


def milora_linear_loop(x, gates_m, W0, b0, A, B, scaling):
    """Per sequence b: W0 x_b + gate_b * scaling * B A x_b."""
    return torch.stack([F.linear(x[b], W0, b0) + gates_m[b] * scaling * (x[b] @ A.T @ B.T)
                        for b in range(x.shape[0])])


def make_milora(d=16, f=24, k=2, r=8, alpha=16.0, renormalize=True):
    layer = MiLoRAAdapters(d, milora_bases(d, f), k, r, alpha, renormalize=renormalize,
                           init="gaussian")
    # a larger router scale makes the top-k selection differ across sequences
    with torch.no_grad():
        layer.router.router.linear.weight.mul_(8.0)
    return layer


def padding_mask(lengths, S):
    return (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("k,renormalize,lengths", [
    (2, True, [6, 3, 1]),      # top-2 of 7 modules, renormalised, right-padded prompts
    (3, False, [6, 6, 6]),     # top-3, kept probabilities as they are, no padding
    (7, True, [4, 6, 2]),      # every module selected
])
def test_milora_prefill_matches_loop_forward_and_backward(k, renormalize, lengths):
    d, S = 16, 6
    layer = make_milora(d, k=k, renormalize=renormalize)
    h = torch.randn(len(lengths), S, d, requires_grad=True)
    mask = padding_mask(lengths, S)
    gates = layer.route(h, mask)

    W_r = layer.router.router.linear.weight.detach().clone().requires_grad_()
    h2 = h.detach().clone().requires_grad_()
    gates_ref = milora_gates_loop(h2, mask, W_r, k, renormalize)
    torch.testing.assert_close(gates, gates_ref, **TOL)
    assert ((gates > 0).sum(1) == k).all()

    loss, loss_ref, leaves = 0.0, 0.0, []
    for name, mod in layer.adapters.items():
        x = torch.randn(len(lengths), S, mod.in_features, requires_grad=True)
        A, B = (t.detach().clone().requires_grad_() for t in mod.bank.expert(0))
        x2 = x.detach().clone().requires_grad_()
        y = layer[name](x)
        y_ref = milora_linear_loop(x2, gates_ref[:, mod.index], mod.base.weight, mod.base.bias,
                                   A, B, float(mod.bank.scales[0]))
        torch.testing.assert_close(y, y_ref, **TOL)
        gy = torch.randn_like(y)
        loss = loss + (y * gy).sum()
        loss_ref = loss_ref + (y_ref * gy).sum()
        leaves.append(((x, mod.bank.A, mod.bank.B), (x2, A, B)))
    loss.backward()
    loss_ref.backward()
    for ours, ref in leaves:
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, **TOL)
    torch.testing.assert_close(h.grad, h2.grad, **TOL)
    torch.testing.assert_close(layer.router.router.linear.weight.grad, W_r.grad, **TOL)
    assert all(m.base.weight.grad is None and not m.base.weight.requires_grad
               for m in layer.adapters.values())


def test_milora_decode_reuses_prompt_routing():
    d, S, lengths = 16, 5, [5, 2, 4, 1]
    layer = make_milora(d, k=2).eval()
    calls = []
    layer.router.router.register_forward_hook(lambda *a: calls.append(1))
    prompt = torch.randn(4, S, d)
    mask = padding_mask(lengths, S)
    with torch.no_grad():
        gates = layer.route(prompt, mask)
        assert len(calls) == 1
        W_r = layer.router.router.linear.weight
        gates_ref = milora_gates_loop(prompt, mask, W_r, 2)
        torch.testing.assert_close(gates, gates_ref, **TOL)
        for step in range(3):
            # a decode step: the layer input of one new token, S = 1 (and the flat [B, d] form)
            new_h = torch.randn(4, 1, d)
            assert layer.route(new_h) is gates  # cached, not recomputed
            for name, mod in layer.adapters.items():
                x = torch.randn(4, 1, mod.in_features)
                A, B = mod.bank.expert(0)
                y_ref = milora_linear_loop(x, gates_ref[:, mod.index], mod.base.weight,
                                           mod.base.bias, A, B, float(mod.bank.scales[0]))
                torch.testing.assert_close(layer[name](x), y_ref, **TOL)
                torch.testing.assert_close(layer[name](x[:, 0]), y_ref[:, 0], **TOL)
        assert len(calls) == 1
        layer.reset()
        layer.route(prompt[:2], mask[:2])
        assert len(calls) == 2 and layer.router.gates.shape == (2, 7)


def test_milora_unselected_sequences_are_skipped():
    """Tokens of sequences that did not pick a module get id -1 (no grouped work) and output
    exactly W0 x; they contribute no gradient to the module's LoRA factors."""
    d, S = 16, 3
    layer = make_milora(d, k=1)
    gates = layer.route(torch.randn(5, S, d))
    counts = layer.router.selected.sum(0)
    mod = next(m for m in layer.adapters.values() if 0 < int(counts[m.index]) < 5)
    sel = layer.router.selected[:, mod.index]
    x = torch.randn(5, S, mod.in_features)
    y, routing = mod(x, return_routing=True)
    ids = routing.ids.reshape(5, S)
    assert torch.equal(ids == 0, sel[:, None].expand(5, S))
    assert torch.equal(y[~sel], F.linear(x[~sel], mod.base.weight, mod.base.bias))
    y[~sel].sum().backward()
    assert mod.bank.A.grad.abs().max() == 0 and mod.bank.B.grad.abs().max() == 0
    # an explicit gate works without a router (and a module without a routing raises)
    lone = MiLoRALinear(nn.Linear(8, 6), 4, 8.0, init="gaussian")
    with pytest.raises(ValueError, match="route the prompt first"):
        lone(torch.randn(2, 3, 8))
    g = torch.tensor([0.0, 0.7])
    xl = torch.randn(2, 3, 8)
    A, B = lone.bank.expert(0)
    torch.testing.assert_close(lone(xl, g), milora_linear_loop(
        xl, g, lone.base.weight, lone.base.bias, A, B, 2.0), **TOL)
    assert gates.shape == (5, 7)


def test_milora_state_dict_round_trip():
    layer = make_milora(k=3).eval()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = MiLoRAAdapters(16, milora_bases(16, 24), 3, 8, 16.0).eval()
    fresh.load_state_dict(torch.load(buf))
    h, x = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    layer.route(h)
    fresh.route(h)
    torch.testing.assert_close(fresh.router.gates, layer.router.gates, rtol=0, atol=0)
    for name in ("q_proj", "down_proj"):
        xi = x if name != "down_proj" else torch.randn(2, 4, 24)
        torch.testing.assert_close(fresh[name](xi), layer[name](xi), rtol=0, atol=0)


def test_milora_router_validates():
    with pytest.raises(ValueError):
        MiLoRARouter(8, 7, 0)
    r = MiLoRARouter(8, 7, 2).eval()
    r(torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="reset"):
        r(torch.randn(2, 1, 8))


# --------------------------------------------------------------------------------------------
# Poly
# --------------------------------------------------------------------------------------------

def mttl_poly_loop(x, task_ids, module_logits, lora_a, lora_b, W0, b0, scaling, mode, training,
                   temperature=1.0):
    """mttl PolytroponSelector.forward + SkilledLoRA.forward_linear_ (its parameter layout)."""
    Q, K, _, r = lora_a.shape
    z = module_logits[task_ids].view(-1, Q, K)
    if training and mode == "relaxed_bernoulli":
        z = RelaxedBernoulli(temperature=temperature, logits=z).rsample()
    elif mode == "straight_through":
        z = torch.sigmoid(z)
        z = z + (torch.round(z) - z).detach()
    else:
        z = torch.sigmoid(z)
    w = z / (z.sum(dim=-1, keepdim=True) + 1e-12)
    bs, d_in, d_out = x.shape[0], x.shape[-1], W0.shape[0]
    A = torch.einsum("bqs,qsdr->bqdr", (w, lora_a))
    B = torch.einsum("bqs,qsrd->bqrd", (w, lora_b))
    A = A.reshape(bs, d_in, r)
    B = B.transpose(1, 2).reshape(bs, r, d_out)
    return F.linear(x, W0, b0) + x.bmm(A).bmm(B) * scaling, w


def make_poly(d_in, d_out, n_tasks, K, r, alpha, Q, mode, **kw):
    """A PolyLinear whose skills are loaded, chunk by chunk, from random mttl-layout factors."""
    layer = PolyLinear(nn.Linear(d_in, d_out), n_tasks, K, r, alpha, Q, mode, **kw)
    lora_a = torch.randn(Q, K, d_in // Q, r) * 0.3
    lora_b = torch.randn(Q, K, r, d_out // Q) * 0.3
    ci, co = d_in // Q, d_out // Q
    with torch.no_grad():
        layer.module_logits.normal_(0.0, 1.5)
        for q in range(Q):
            for k in range(K):
                A_k, B_k = layer.bank.expert(k)
                A_k[:, q * ci:(q + 1) * ci] = lora_a[q, k].T
                B_k[q * co:(q + 1) * co, :] = lora_b[q, k].T
    return layer, lora_a, lora_b


def bank_grads_as_mttl(layer, Q):
    """bank.A.grad / bank.B.grad read back in mttl's layout, chunk by chunk."""
    K, r = layer.n_skills, layer.r
    ci, co = layer.in_features // Q, layer.out_features // Q
    ga = torch.empty(Q, K, ci, r)
    gb = torch.empty(Q, K, r, co)
    for q in range(Q):
        for k in range(K):
            r0, r1 = layer.bank.ranks_slice(k)
            ga[q, k] = layer.bank.A.grad[r0:r1, q * ci:(q + 1) * ci].T
            gb[q, k] = layer.bank.B.grad[q * co:(q + 1) * co, r0:r1].T
    return ga, gb


POLY_CASES = {
    # mttl LoRA defaults (lora_rank=4, lora_alpha=16), 8 skills, eval sigmoid
    "K8-r4-sigmoid": dict(K=8, Q=1, r=4, alpha=16.0, mode="sigmoid", training=False),
    # multi-head routing: 4 splits, relaxed Bernoulli (eval = sigmoid)
    "K8-Q4-relaxed-eval": dict(K=8, Q=4, r=4, alpha=16.0, mode="relaxed_bernoulli",
                               training=False),
    # E not a power of two, 2 splits, relaxed Bernoulli in training (same RNG draws)
    "K3-Q2-relaxed-train": dict(K=3, Q=2, r=5, alpha=10.0, mode="relaxed_bernoulli",
                                training=True),
    # straight-through: rounding in eval too, as mttl
    "K5-Q2-st-eval": dict(K=5, Q=2, r=3, alpha=6.0, mode="straight_through", training=False),
    "K5-st-train": dict(K=5, Q=1, r=3, alpha=6.0, mode="straight_through", training=True),
}


@pytest.mark.parametrize("case", list(POLY_CASES))
def test_poly_matches_mttl_loop_forward_and_backward(case):
    c = POLY_CASES[case]
    d_in, d_out, n_tasks, S = 24, 16, 5, 4
    layer, lora_a, lora_b = make_poly(d_in, d_out, n_tasks, c["K"], c["r"], c["alpha"], c["Q"],
                                      c["mode"])
    layer.train(c["training"])
    task_ids = torch.tensor([3, 0, 3, 4])
    x = torch.randn(4, S, d_in, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x, task_ids)

    x2 = x.detach().clone().requires_grad_()
    logits = layer.module_logits.detach().clone().requires_grad_()
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    torch.manual_seed(11)
    y_ref, w_ref = mttl_poly_loop(x2, task_ids, logits, lora_a, lora_b, layer.base.weight,
                                  layer.base.bias, c["alpha"] / c["r"], c["mode"], c["training"])
    torch.testing.assert_close(y, y_ref, **TOL)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(layer.module_logits.grad, logits.grad, **TOL)
    ga, gb = bank_grads_as_mttl(layer, c["Q"])
    torch.testing.assert_close(ga, lora_a.grad, **TOL)
    torch.testing.assert_close(gb, lora_b.grad, **TOL)
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


def test_poly_relaxed_bernoulli_weights_in_training():
    layer, _, _ = make_poly(8, 8, 4, 6, 2, 4.0, 2, "relaxed_bernoulli")
    ids = torch.tensor([0, 1, 2, 3, 1])
    layer.train()
    w1, w2 = layer.mixing_weights(ids), layer.mixing_weights(ids)
    assert w1.shape == (5, 2, 6)
    assert ((w1 > 0) & (w1 < 1)).all()
    torch.testing.assert_close(w1.sum(-1), torch.ones(5, 2), **TOL)
    assert (w1 - w2).abs().max() > 1e-3  # sampled
    w1.pow(2).sum().backward()
    g = layer.module_logits.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # eval: deterministic sigmoid weights, normalised over skills
    layer.eval()
    w = layer.mixing_weights(ids)
    s = torch.sigmoid(layer.module_logits[ids].view(5, 2, 6))
    torch.testing.assert_close(w, s / s.sum(-1, keepdim=True), **TOL)
    torch.testing.assert_close(layer.mixing_weights(ids), w, rtol=0, atol=0)


def test_poly_straight_through_eval_flag_and_factor_mixture():
    layer, lora_a, lora_b = make_poly(12, 8, 3, 4, 3, 6.0, 1, "straight_through")
    ids = torch.tensor([2, 0, 1])
    x = torch.randn(3, 5, 12)
    layer.eval()
    w_hard = layer.mixing_weights(ids)
    assert set(torch.unique(w_hard * (w_hard > 0).sum(-1, keepdim=True)).tolist()) <= {0.0, 1.0}
    layer.straight_through_eval = False
    s = torch.sigmoid(layer.module_logits[ids].view(3, 1, 4))
    torch.testing.assert_close(layer.mixing_weights(ids), s / s.sum(-1, keepdim=True), **TOL)
    # the merge mixes factors: (sum w B)(sum w A) != sum w B A
    y = layer(x, ids) - layer.base(x)
    w = layer.mixing_weights(ids)[:, 0]
    out_mix = torch.stack([sum(w[b, k] * (x[b] @ lora_a[0, k] @ lora_b[0, k]) for k in range(4))
                           for b in range(3)]) * 2.0
    assert (y - out_mix).abs().max() > 1e-3
    # task_delta_weight is the merged update of one task
    for b in range(3):
        torch.testing.assert_close(x[b] @ layer.task_delta_weight(int(ids[b])).T, y[b], **TOL)


def test_poly_task_repeat_flat_input_and_state_dict_round_trip():
    layer, _, _ = make_poly(16, 12, 4, 3, 4, 8.0, 2, "relaxed_bernoulli")
    layer.eval()
    x = torch.randn(6, 16)
    ids = torch.tensor([1, 3])
    # mttl repeats the task ids when the batch is a multiple of them (beam search)
    torch.testing.assert_close(layer(x, ids), layer(x.unsqueeze(1), ids.repeat_interleave(3))
                               .squeeze(1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="task id"):
        layer(x, torch.tensor([4, 0]))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = PolyLinear(nn.Linear(16, 12), 4, 3, 4, 8.0, 2, "relaxed_bernoulli").eval()
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x, ids), layer(x, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="n_splits"):
        PolyLinear(nn.Linear(16, 12), 4, 3, 4, 8.0, 5)
