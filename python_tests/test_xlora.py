"""X-LoRA (molora_ops/modules/xlora.py) vs plain loops written from PEFT's reference code.

The oracles re-implement, in torch only, ``huggingface/peft src/peft/tuners/xlora``:
``XLoraClassifier.forward`` (MLP -> reshape [B, S, L, N] -> softmax / T),
``XLoraLayer.get_maybe_topk_scalings`` (top-k mask, softmax over the flattened nonzero selection)
and
``XLoraLinearLayer.forward`` (a loop over adapters of ``B_n(A_n(drop(x * s_n))) * scaling_n * g``),
and the two-pass ``XLoraModel._enable_peft_forward_hooks`` (adapters-off pass -> classifier -> pass
with the scalings). fp32 on CPU, random adapters (B != 0), published hyperparameters.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from molora_ops.modules.xlora import XLoRAClassifier, XLoRALinear, XLoRAModel

TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Oracles (torch only, from PEFT)
# --------------------------------------------------------------------------------------------

def peft_topk_scalings(s, top_k=None, softmax_topk=False):
    """PEFT XLoraLayer.get_maybe_topk_scalings, verbatim in spirit (flattened softmax)."""
    s = s.clone()
    if top_k is not None:
        _, idx = torch.topk(s, k=top_k, dim=-1)
        mask = torch.zeros_like(s, dtype=torch.bool)
        mask.scatter_(-1, idx, True)
        s = s * mask.to(s.dtype)
    if softmax_topk:
        nonzero = s != 0
        s[nonzero] = torch.softmax(s[nonzero], dim=-1)
    return s


def per_token_topk_scalings(s, top_k=None):
    """The per-token form: loop over tokens, softmax over each token's nonzero top-k."""
    s = peft_topk_scalings(s, top_k, False)
    flat = s.reshape(-1, s.shape[-1])
    rows = []
    for t in range(flat.shape[0]):
        row, nz = flat[t], flat[t] != 0
        out = torch.zeros_like(row)
        rows.append(out.masked_scatter(nz, torch.softmax(row[nz], dim=-1)))
    return torch.stack(rows).reshape(s.shape)


def peft_linear(x, W0, b0, adapters, scalings=None, g=1.0):
    """XLoraLinearLayer.forward: base + sum_n B_n(A_n(x * s_n)) * scaling_n * g (dropout off).
    adapters: [(A_n [r, d_in], B_n [d_out, r], scaling_n)]; scalings [..., N] already processed."""
    result = F.linear(x, W0, b0)
    for n, (A, B, scaling) in enumerate(adapters):
        if scalings is not None:
            x_mod, w = x * scalings[..., n:n + 1], g
        else:
            x_mod, w = x, 1
        result = result + F.linear(F.linear(x_mod, A), B) * scaling * w
    return result


def peft_classifier(h, clf, L, N, layerwise=True, softmax=True, T=1.0):
    """XLoraClassifier.forward in eval (Linear/ReLU stack, reshape, softmax / T)."""
    for layer in clf.inner:
        if isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight, layer.bias)
        elif isinstance(layer, nn.ReLU):
            h = torch.relu(h)
    logits = F.linear(h, clf.last.weight, clf.last.bias)
    if not layerwise:
        logits = logits.unsqueeze(2).expand(-1, -1, L, -1)
    s = logits.reshape(h.shape[0], h.shape[1], L, N)
    return torch.softmax(s / T, dim=-1) if softmax else s


def assert_fwd_bwd(y, y_ref, grad_pairs):
    """y == y_ref, then one random upstream gradient through both and every (ours, ref) leaf's
    .grad equal; grad_pairs is a callable so the leaves are read after the backward."""
    torch.testing.assert_close(y, y_ref, **TOL)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    for a, b in grad_pairs():
        torch.testing.assert_close(a, b, **TOL)


def adapters_of(layer, detach=False):
    """[(A_n, B_n, scaling_n)] views of an XLoRALinear's bank (leaves copies with detach)."""
    out = []
    for n in range(layer.num_experts):
        A, B = layer.bank.expert(n)
        if detach:
            A, B = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
        out.append((A, B, float(layer.bank.scales[n])))
    return out


def make_layer(d_in, d_out, ranks, alphas=16.0, **kw):
    base = nn.Linear(d_in, d_out)
    return XLoRALinear(base, ranks, alphas, init="gaussian", **kw)


# --------------------------------------------------------------------------------------------
# XLoRALinear
# --------------------------------------------------------------------------------------------

LAYER_CASES = {
    # published: 9 adapters (lamm-mit/x-lora), dense, softmax scalings, g = 1
    "x-lora-9": dict(ranks=[8] * 9, alphas=16.0, shape=(2, 5)),
    # gemma: 4 adapters; ragged ranks with a rank-0 adapter; one token
    "gemma-4-ragged-T1": dict(ranks=[4, 0, 8, 2], alphas=[8.0, 16.0, 16.0, 4.0], shape=(1, 1)),
    # E not a power of two, top-k 2, global scaling weight, flat [T, d] input
    "e5-topk2-g": dict(ranks=[3, 5, 2, 6, 4], alphas=[6.0, 10.0, 4.0, 12.0, 8.0], shape=(7,),
                       top_k_lora=2, global_scaling_weight=1.7),
    # top-k + softmax-topk (PEFT's flattened quirk), rsLoRA scaling
    "e3-softmax-topk": dict(ranks=[4, 4, 4], alphas=8.0, shape=(2, 3), top_k_lora=2,
                            enable_softmax_topk=True, rslora=True),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_matches_peft_loop_forward_and_backward(case):
    cfg = dict(LAYER_CASES[case])
    ranks, alphas, shape = cfg.pop("ranks"), cfg.pop("alphas"), cfg.pop("shape")
    d_in, d_out, N = 24, 20, len(ranks)
    layer = make_layer(d_in, d_out, ranks, alphas, trainable_adapters=True, **cfg)
    x = torch.randn(*shape, d_in, requires_grad=True)
    sc = torch.softmax(torch.randn(*shape, N) * 2, -1).requires_grad_()
    y = layer(x, sc)

    x2, sc2 = x.detach().clone().requires_grad_(), sc.detach().clone().requires_grad_()
    ad = adapters_of(layer, detach=True)
    s = peft_topk_scalings(sc2, cfg.get("top_k_lora"), cfg.get("enable_softmax_topk", False))
    y_ref = peft_linear(x2, layer.base.weight, layer.base.bias, ad, s,
                        cfg.get("global_scaling_weight", 1.0))

    def grads():
        yield from [(x.grad, x2.grad), (sc.grad, sc2.grad)]
        for n, (A, B, _) in enumerate(ad):
            r0, r1 = layer.bank.ranks_slice(n)
            yield from [(layer.bank.A.grad[r0:r1], A.grad), (layer.bank.B.grad[:, r0:r1], B.grad)]
    assert_fwd_bwd(y, y_ref, grads)


def test_softmax_topk_quirk_vs_per_token():
    """PEFT softmaxes the flattened nonzero selection of the whole batch; the flag gives the
    per-token form. They differ on > 1 token; each matches its own loop, forward and backward."""
    d, N = 16, 5
    base = nn.Linear(d, 12)
    kw = dict(top_k_lora=3, enable_softmax_topk=True, init="gaussian")
    quirk = XLoRALinear(base, [4, 2, 6, 3, 5], 8.0, **kw)
    per_tok = XLoRALinear(base, [4, 2, 6, 3, 5], 8.0, per_token_softmax_topk=True, **kw)
    per_tok.load_state_dict(quirk.state_dict())
    x = torch.randn(2, 4, d)
    sc = torch.softmax(torch.randn(2, 4, N), -1)

    ys = {}
    for name, layer, oracle in [("quirk", quirk, lambda s: peft_topk_scalings(s, 3, True)),
                                ("per_token", per_tok, lambda s: per_token_topk_scalings(s, 3))]:
        s1, s2 = sc.clone().requires_grad_(), sc.clone().requires_grad_()
        y = layer(x, s1)
        y_ref = peft_linear(x, base.weight, base.bias, adapters_of(layer), oracle(s2))
        assert_fwd_bwd(y, y_ref, lambda: [(s1.grad, s2.grad)])
        ys[name] = y.detach()
    assert (ys["quirk"] - ys["per_token"]).abs().max() > 1e-3
    # on one token the two forms coincide
    torch.testing.assert_close(quirk(x[:1, :1], sc[:1, :1]), per_tok(x[:1, :1], sc[:1, :1]),
                               **TOL)


def test_no_scalings_is_plain_sum_and_adapters_off_is_base_only(monkeypatch):
    layer = make_layer(12, 10, [4, 3, 5], [8.0, 6.0, 10.0], global_scaling_weight=3.0)
    x = torch.randn(3, 2, 12)
    # PEFT's layer without injected scalings: every adapter at weight 1, no global weight
    y_ref = peft_linear(x, layer.base.weight, layer.base.bias, adapters_of(layer), None)
    torch.testing.assert_close(layer(x), y_ref, **TOL)
    # the per-layer slot is read when no scalings are passed
    sc = torch.softmax(torch.randn(3, 2, 3), -1)
    layer.scalings = sc
    y_ref = peft_linear(x, layer.base.weight, layer.base.bias, adapters_of(layer), sc, 3.0)
    torch.testing.assert_close(layer(x), y_ref, **TOL)
    # adapters off: the base alone, and the bank is never touched
    layer.adapters_off = True
    monkeypatch.setattr(layer.bank, "dense", lambda *a, **k: pytest.fail("bank used"))
    torch.testing.assert_close(layer(x, sc), F.linear(x, layer.base.weight, layer.base.bias))


def test_dropout_is_identity_in_eval_and_scales_one_shared_mask_in_training():
    layer = make_layer(16, 8, [4, 4], 8.0, dropout=0.3)
    x = torch.randn(2, 3, 16)
    sc = torch.softmax(torch.randn(2, 3, 2), -1)
    layer.eval()
    y_ref = peft_linear(x, layer.base.weight, layer.base.bias, adapters_of(layer), sc)
    torch.testing.assert_close(layer(x, sc), y_ref, **TOL)
    layer.train()
    torch.manual_seed(3)
    y = layer(x, sc)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.3, training=True)  # the one mask the fused path draws
    y_ref = F.linear(x, layer.base.weight, layer.base.bias) + peft_linear(
        xd, torch.zeros_like(layer.base.weight), None, adapters_of(layer), sc)
    torch.testing.assert_close(y, y_ref, **TOL)


def test_from_peft_adapters_and_frozen_adapters():
    d_in, d_out = 20, 14
    base = nn.Linear(d_in, d_out)
    peft = [(torch.randn(r, d_in) * 0.3, torch.randn(d_out, r) * 0.3, alpha)
            for r, alpha in [(4, 16.0), (8, 16.0), (2, 4.0)]]
    layer = XLoRALinear.from_peft_adapters(base, peft)
    assert layer.bank.ranks == [4, 8, 2]
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 4, d_in, requires_grad=True)
    sc = torch.softmax(torch.randn(3, 4, 3), -1).requires_grad_()
    y = layer(x, sc)
    ad = [(A, B, alpha / A.shape[0]) for A, B, alpha in peft]
    x2, sc2 = x.detach().clone().requires_grad_(), sc.detach().clone().requires_grad_()
    y_ref = peft_linear(x2, base.weight, base.bias, ad, sc2)
    assert_fwd_bwd(y, y_ref, lambda: [(x.grad, x2.grad), (sc.grad, sc2.grad)])
    assert layer.bank.A.grad is None and layer.bank.B.grad is None
    assert layer.base.weight.grad is None


def test_layer_state_dict_round_trip():
    layer = make_layer(16, 12, [3, 0, 5, 2], [6.0, 1.0, 10.0, 4.0], top_k_lora=2)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = XLoRALinear(nn.Linear(16, 12), [3, 0, 5, 2], 1.0, top_k_lora=2)
    fresh.load_state_dict(torch.load(buf))
    x, sc = torch.randn(2, 5, 16), torch.softmax(torch.randn(2, 5, 4), -1)
    torch.testing.assert_close(fresh(x, sc), layer(x, sc), rtol=0, atol=0)
    torch.testing.assert_close(fresh.bank.scales, layer.bank.scales, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# XLoRAClassifier
# --------------------------------------------------------------------------------------------

CLASSIFIER_CASES = {
    "x-lora-mistral": dict(N=9, L=6, depth=1),  # 9 adapters, depth 1, layerwise, softmax, T=1
    "x-lora-gemma": dict(N=4, L=6, depth=2, hidden=2048, dropout=0.2),
    "depth3-T2": dict(N=3, L=5, depth=3, hidden=24, softmax_temperature=2.0),
    "not-layerwise": dict(N=5, L=4, depth=2, hidden=32, layerwise_scalings=False),
    "no-softmax": dict(N=4, L=3, depth=1, enable_softmax=False),
}


@pytest.mark.parametrize("case", list(CLASSIFIER_CASES))
def test_classifier_matches_peft(case):
    cfg = dict(CLASSIFIER_CASES[case])
    N, L, d = cfg.pop("N"), cfg.pop("L"), 32
    clf = XLoRAClassifier(d, N, L, **cfg).eval()
    n_lin = sum(isinstance(m, nn.Linear) for m in clf.modules())
    assert n_lin == cfg["depth"] and all(m.bias is not None for m in clf.modules()
                                         if isinstance(m, nn.Linear))
    if cfg["depth"] >= 2:
        assert clf.inner[0].out_features == cfg["hidden"]
        assert any(isinstance(m, nn.Dropout) and m.p == cfg.get("dropout", 0.2)
                   for m in clf.inner)
    h = torch.randn(2, 7, d, requires_grad=True)
    s = clf(h)
    assert s.shape == (2, 7, L, N)
    h2 = h.detach().clone().requires_grad_()
    s_ref = peft_classifier(h2, clf, L, N, cfg.get("layerwise_scalings", True),
                            cfg.get("enable_softmax", True), cfg.get("softmax_temperature", 1.0))
    torch.testing.assert_close(s, s_ref, **TOL)
    if cfg.get("enable_softmax", True):
        torch.testing.assert_close(s.sum(-1), torch.ones(2, 7, L), **TOL)
    g = torch.randn_like(s)
    ours = torch.autograd.grad(s, [h] + list(clf.parameters()), g)
    ref = torch.autograd.grad(s_ref, [h2] + list(clf.parameters()), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


# --------------------------------------------------------------------------------------------
# XLoRAModel: the two-pass helper on a tiny model
# --------------------------------------------------------------------------------------------

class TinyModel(nn.Module):
    """2 residual blocks of [XLoRALinear -> SiLU -> XLoRALinear]; returns the final hidden."""

    def __init__(self, d, f, ranks, alphas, **kw):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleList([
                XLoRALinear(nn.Linear(d, f), ranks, alphas, init="gaussian", **kw),
                XLoRALinear(nn.Linear(f, d), ranks, alphas, init="gaussian", **kw)]))

    def forward(self, h):
        for up, down in self.blocks:
            h = h + down(F.silu(up(h)))
        return h


def tiny_two_pass_loop(model, clf, x, pass1_value=0.0, top_k=None, **clf_cfg):
    """PEFT's hooks written out: pass 1 (no_grad, adapters off or constant scalings) ->
    classifier -> pass 2 with scalings[:, :, l, :] for the l-th adapted linear."""
    lins = [lin for blk in model.blocks for lin in blk]
    N = lins[0].num_experts

    def run(h, scal_of):
        for i, (up, down) in enumerate(model.blocks):
            u = peft_linear(h, up.base.weight, up.base.bias, adapters_of(up), scal_of(2 * i))
            h = h + peft_linear(F.silu(u), down.base.weight, down.base.bias, adapters_of(down),
                                scal_of(2 * i + 1))
        return h

    with torch.no_grad():
        if pass1_value == 0.0:
            h_last = x
            for up, down in model.blocks:
                h_last = h_last + F.linear(F.silu(F.linear(h_last, up.base.weight, up.base.bias)),
                                           down.base.weight, down.base.bias)
        else:
            const = torch.full((*x.shape[:-1], N), pass1_value)
            h_last = run(x, lambda l: peft_topk_scalings(const, top_k))
    s = peft_classifier(h_last, clf, len(lins), N, **clf_cfg)
    return run(x, lambda l: peft_topk_scalings(s[:, :, l, :], top_k)), s


@pytest.mark.parametrize("cfg", [
    dict(N=9, depth=1, pass1=0.0),                               # x-lora (Mistral) config
    dict(N=4, depth=2, hidden=2048, dropout=0.2, pass1=0.0),     # x-lora-gemma config (eval)
    dict(N=3, depth=1, pass1=0.5, top_k=2),                      # original repo's pass value
], ids=["mistral-9", "gemma-4", "pass-value-topk"])
def test_two_pass_model_matches_loop(cfg):
    cfg = dict(cfg)
    N, pass1, top_k = cfg.pop("N"), cfg.pop("pass1"), cfg.pop("top_k", None)
    d, f = 16, 24
    ranks = [4 + (n % 3) for n in range(N)]
    alphas = [8.0 + n for n in range(N)]
    model = TinyModel(d, f, ranks, alphas, top_k_lora=top_k)
    clf = XLoRAClassifier(d, N, 4, **cfg)
    xm = XLoRAModel(model, clf, scaling_pass_value=pass1).eval()
    assert [id(m) for m in xm.xlora_layers] == [id(m) for b in model.blocks for m in b]

    x = torch.randn(2, 5, d, requires_grad=True)
    y = xm(x)
    x2 = x.detach().clone().requires_grad_()
    y_ref, s_ref = tiny_two_pass_loop(model, clf, x2, pass1, top_k)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(xm.last_scalings, s_ref, **TOL)
    assert all(m.scalings is None and not m.adapters_off for m in xm.xlora_layers)

    gy = torch.randn_like(y)
    params = list(clf.parameters())
    ours = torch.autograd.grad(y, [x] + params, gy)
    ref = torch.autograd.grad(y_ref, [x2] + params, gy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)

    # only the classifier trains: the base and the adapters are frozen
    y = xm(x)
    y.backward(gy)
    assert all(p.grad is not None for p in clf.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert {n for n, p in xm.named_parameters() if p.requires_grad} == {
        "classifier." + n for n, _ in clf.named_parameters()}


def test_two_pass_model_state_dict_round_trip_and_hidden_states_fn():
    d, f, N = 12, 16, 3
    ranks, alphas = [2, 5, 3], [4.0, 10.0, 6.0]
    xm = XLoRAModel(TinyModel(d, f, ranks, alphas), XLoRAClassifier(d, N, 4, depth=2, hidden=20))
    xm.eval()
    buf = io.BytesIO()
    torch.save(xm.state_dict(), buf)
    buf.seek(0)
    fresh = XLoRAModel(TinyModel(d, f, ranks, alphas), XLoRAClassifier(d, N, 4, depth=2,
                                                                       hidden=20)).eval()
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(3, 4, d)
    torch.testing.assert_close(fresh(x), xm(x), rtol=0, atol=0)

    # a model returning a dict with hidden_states: the default reads hidden_states[-1]
    class DictModel(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h, output_hidden_states=False):
            out = self.inner(h)
            return {"logits": out * 2, "hidden_states": (h, out)} if output_hidden_states \
                else {"logits": out * 2}

    dm = XLoRAModel(DictModel(xm.model), xm.classifier,
                    scaling_pass_kwargs={"output_hidden_states": True})
    torch.testing.assert_close(dm(x)["logits"], 2 * xm(x), **TOL)
    torch.testing.assert_close(dm.last_scalings, xm.last_scalings, **TOL)


def test_model_checks_layer_count():
    model = TinyModel(8, 8, [2, 2], 4.0)
    with pytest.raises(ValueError, match="4 XLoRALinear"):
        XLoRAModel(model, XLoRAClassifier(8, 2, 3))
    with pytest.raises(ValueError, match="mixes 3 adapters"):
        XLoRAModel(model, XLoRAClassifier(8, 3, 4))
