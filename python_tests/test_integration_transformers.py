"""molora_ops.integrations.hf_transformers on tiny random transformers causal LMs (CPU, fp32).

The converted model's logits are checked against a per-expert Python loop written here from the
ORIGINAL HF modules (a deep copy of the base model) plus the adapter weights (the formulation of
PEFT / the MixLoRA reference code), not against the molora ops; the adapters' B matrices and the
routers are re-initialised randomly first so every adapter contributes.
"""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from molora_ops.integrations.hf_transformers import (  # noqa: E402
    CONFIG_NAME, WEIGHTS_NAME, MoLoRAConfig, MoLoRALayer, apply_molora, load_molora,
    merge_molora, molora_aux_loss, save_molora, unmerge_molora)
from molora_ops.modules import (HydraLoRA, LoRALinear, LoRAMoE, LoRASoupsCAT, MixLoRA,  # noqa: E402
                                MoLA, SMoRA)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}
VOCAB = 128

# small expert counts / ranks: fast, and every expert gets tokens
METHOD_CONFIGS = {
    "mixlora": dict(num_experts=4, top_k=2, rank=4, alpha=8.0, attention_rank=2),
    "mola": dict(top_k=2, rank=4, alpha=12.0),          # default MoLA-triangle: [6, 8] experts
    "smora": dict(rank=16, top_k=4, alpha=6.0),
    "hydralora": dict(num_experts=3, rank=4, alpha=4.0),
    "loramoe": dict(num_experts=3, rank=4, alpha=6.0),
    "lora_soups": dict(num_experts=2, rank=4, alpha=10.0),
    "lora": dict(rank=4, alpha=8.0),
}


def expected_scale(method, layer):
    """The LoRA scale each layer must use, from the test's config (not from the layer)."""
    c = METHOD_CONFIGS[method]
    if method == "mixlora" and layer.kind == "linear":      # attention LoRA: alpha / attention_rank
        return c["alpha"] / c["attention_rank"]
    if method == "smora":                                   # alpha / k
        return c["alpha"] / c["top_k"]
    return c["alpha"] / c["rank"]
METHOD_CLASSES = {"mixlora": MixLoRA, "mola": MoLA, "smora": SMoRA, "hydralora": HydraLoRA,
                  "loramoe": LoRAMoE, "lora_soups": LoRASoupsCAT, "lora": LoRALinear}


def tiny_model(family="llama", seed=0, **overrides):
    """A random 2-layer causal LM, hidden 64, d_ff 172, vocab 128, fp32, eval mode."""
    config_cls, model_cls = FAMILIES[family]
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    cfg.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**cfg)).float().eval()


def config(method, **overrides):
    return MoLoRAConfig(method, **{**METHOD_CONFIGS[method], **overrides})


def molora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALayer)}


@torch.no_grad()
def randomize_adapters(model, seed=1):
    """Random non-zero B's, decisive routers, static gates != 1, a SMoRA selection bias."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    for m in molora_layers(model).values():
        for name, p in m.molora.named_parameters():
            if name.endswith("B"):
                rand(p, 0.05)
            elif name.startswith("router"):
                rand(p, 0.3)
            elif name == "gating.alpha":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        if isinstance(m.molora, SMoRA):
            rand(m.molora.rank_bias, 0.05)


def batch(seed=0, B=2, S=7, pad=2):
    """input_ids [B, S], attention_mask [B, S] (row 0 left-padded by ``pad``), labels [B, S]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# --- the loop formulation (independent of the molora ops) ---------------------------------------


def dense_gate(m, x, k):
    """The [T, E] gate of a linear method, from the router weights (fp32)."""
    if isinstance(m, LoRALinear):
        return x.new_ones(x.shape[0], 1)
    if isinstance(m, LoRASoupsCAT):
        return m.gating.alpha.expand(x.shape[0], -1)
    p = torch.softmax(x.float() @ m.router.linear.weight.t(), dim=-1)
    if isinstance(m, MoLA):
        w, idx = p.topk(k, dim=-1)
        return torch.zeros_like(p).scatter(1, idx, w / w.sum(-1, keepdim=True))
    assert isinstance(m, (HydraLoRA, LoRAMoE))
    return p


class LoopLinear(nn.Module):
    """``base(x) + sum_e gate_e s_e B_e (A_e x)`` one expert at a time (SMoRA: one rank at a
    time), with the original HF linear as base."""

    def __init__(self, base, layer, scale, k):
        super().__init__()
        self.base, self.m, self.scale, self.k = base, layer.molora, scale, k

    def forward(self, x):
        m, s = self.m, self.scale
        x2 = x.reshape(-1, x.shape[-1])
        y = self.base(x2)
        if isinstance(m, SMoRA):
            score = torch.sigmoid(x2 @ m.router.linear.weight.t()) + m.rank_bias
            top, idx = score.topk(self.k, dim=-1)
            gate = top / top.sum(-1, keepdim=True) * self.k
            for j in range(self.k):
                col = idx[:, j]
                h = (x2 * m.lora.A[col]).sum(-1, keepdim=True)            # A[idx_j] . x
                y = y + s * gate[:, j:j + 1] * h * m.lora.B[:, col].t()
            return y.reshape(*x.shape[:-1], -1)
        gate = dense_gate(m, x2, self.k)
        for e in range(m.bank.num_experts):
            A, B = m.bank.expert(e)
            y = y + gate[:, e:e + 1] * s * ((x2 @ A.t()) @ B.t())
        return y.reshape(*x.shape[:-1], -1)


class LoopMixLoRAMLP(nn.Module):
    """MixLoRA's FFN as the reference code computes it: softmax top-k renorm, then for each
    expert its tokens through ``down(act(gate x + LoRA) * (up x + LoRA)) + LoRA``, weighted and
    scattered back (``index_add_``), with the original HF projections and act_fn."""

    def __init__(self, mlp, layer, scale, k):
        super().__init__()
        self.mlp, self.m, self.scale, self.k = mlp, layer.molora, scale, k

    def forward(self, x):
        m, mlp = self.m, self.mlp
        x2 = x.reshape(-1, x.shape[-1])
        p = torch.softmax(x2.float() @ m.router.linear.weight.t(), dim=-1)
        w, idx = p.topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x2)

        def lora(bank, e, h):
            A, B = bank.expert(e)
            return self.scale * ((h @ A.t()) @ B.t())

        for e in range(METHOD_CONFIGS["mixlora"]["num_experts"]):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            xe = x2[tok]
            g = mlp.gate_proj(xe) + lora(m.gate_lora, e, xe)
            u = mlp.up_proj(xe) + lora(m.up_lora, e, xe)
            a = mlp.act_fn(g) * u
            ye = mlp.down_proj(a) + lora(m.down_lora, e, a)
            y.index_add_(0, tok, w[tok, slot].unsqueeze(-1) * ye)
        return y.reshape(x.shape)


def loop_reference(base_copy, converted, method):
    """``base_copy`` (the unconverted model) with every converted module replaced by its loop;
    scales and k come from the test's config."""
    k = METHOD_CONFIGS[method].get("top_k")
    for name, layer in molora_layers(converted).items():
        parent_name, attr = name.rsplit(".", 1)
        parent = base_copy.get_submodule(parent_name)
        orig, s = getattr(parent, attr), expected_scale(method, layer)
        setattr(parent, attr, LoopMixLoRAMLP(orig, layer, s, k) if layer.kind == "mlp"
                else LoopLinear(orig, layer, s, k))
    return base_copy


# --- (a) forward equivalence ---------------------------------------------------------------------


CASES = [("llama", m, {}) for m in METHOD_CONFIGS] + [
    ("mistral", "mixlora", {}), ("qwen2", "mixlora", {}), ("qwen2", "mola", {}),
    ("llama", "mixlora", dict(mlp_bias=True, attention_bias=True)),
    ("llama", "mixlora", dict(hidden_act="gelu_pytorch_tanh")),
]


@pytest.mark.parametrize("family,method,overrides", CASES,
                         ids=[f"{f}-{m}{'-' + '-'.join(o) if o else ''}" for f, m, o in CASES])
def test_logits_match_per_expert_loop(family, method, overrides):
    model = tiny_model(family, **overrides)
    base_copy = copy.deepcopy(model)
    apply_molora(model, config(method))
    randomize_adapters(model)
    model.eval()
    ref_model = loop_reference(base_copy, model, method)
    ids, mask, _ = batch()
    with torch.no_grad():
        base_logits = tiny_model(family, **overrides)(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
        want = ref_model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the adapters do contribute (so the comparison above can fail)
    assert (got - base_logits).abs().max() > 1e-2
    assert {type(m.molora) for m in molora_layers(model).values()} >= {METHOD_CLASSES[method]}


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_init_equals_base_model(method):
    """B = 0 at init (PEFT): the converted model computes the base model."""
    model = tiny_model()
    ids, mask, _ = batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        apply_molora(model, config(method))
        model.eval()
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert model.molora_config == config(method)


# --- (b) gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_gradients_only_for_adapters_and_routers(method):
    model = tiny_model()
    base_names = {n for n, _ in model.named_parameters()}
    apply_molora(model, config(method))
    randomize_adapters(model)
    model.train()
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()

    adapter_names = set()
    for name, layer in molora_layers(model).items():
        base_keys = layer._base_keys
        adapter_names |= {f"{name}.molora.{k}" for k, _ in layer.molora.named_parameters()
                          if k not in base_keys}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names and trainable
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # the base parameters are the same tensors, frozen (renamed only where wrapped)
    n_frozen = sum(1 for _, p in model.named_parameters() if not p.requires_grad)
    assert n_frozen == len(base_names)


def test_no_graph_kept_between_steps():
    model = apply_molora(tiny_model(), config("mixlora"))
    model.train()
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.aux_loss.requires_grad
    collector = model._molora_collector
    assert collector.records is None and collector.attention_mask is None
    assert molora_aux_loss(model).grad_fn is None
    for module in model.modules():
        for value in vars(module).values():
            assert not (isinstance(value, torch.Tensor) and value.grad_fn is not None)
    # a layer called outside a top-level forward records nothing
    model.model(ids, attention_mask=mask)
    assert collector.records is None


def test_gradient_checkpointing_non_reentrant_keeps_aux_gradient():
    """Under non-reentrant checkpointing the recomputation records nothing and the gradients
    (aux loss included) equal the plain run's."""
    ids, mask, labels = batch()
    grads = []
    for checkpointing in (False, True):
        model = apply_molora(tiny_model(), config("mixlora", dropout=0.0))
        randomize_adapters(model)
        model.train()
        if checkpointing:
            non_reentrant = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.x name
                model.activation_checkpointing_enable(non_reentrant)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        assert model._molora_collector.records is None
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- (c) aux loss -------------------------------------------------------------------------------


def capture_routings(model):
    """Hooks on the method modules collecting each call's Routing."""
    routings = []
    handles = [layer.molora.register_forward_hook(lambda mod, args, out: routings.append(out[1]))
               for layer in molora_layers(model).values() if layer.with_aux_loss]
    return routings, handles


def mixtral_balance(probs, ids, E, keep):
    """E * sum_e (share of kept (token, slot) pairs on e, per token) * (mean prob of e)."""
    keep = keep.float()
    n = keep.sum()
    f = torch.stack([((ids == e).float().sum(1) * keep).sum() / n for e in range(E)])
    P = (probs * keep[:, None]).sum(0) / n
    return E * (f * P).sum()


def mola_balance(probs, ids, E):
    f = torch.stack([(ids == e).float().sum() for e in range(E)]) / ids.numel()
    return E * (f * probs.mean(0)).sum()


def mola_authors_loss(layer_logits, k):
    """The MoLA authors' loss (``mola_modeling_llama_hacked.py``): per decoder layer, the router
    LOGITS of its modules ``torch.cat(..., dim=0)``, softmax, top-k, ``f = one_hot counts /
    their sum``, ``P = mean of the probs``, ``E_l * sum f P``; summed over layers, no mask."""
    total = 0.0
    for logits in layer_logits:
        z = torch.cat(logits, dim=0)
        E = z.shape[1]
        p = torch.softmax(z, dim=-1)
        sel = torch.topk(p, k, dim=-1).indices.reshape(-1)
        counts = F.one_hot(sel, E).sum(0).float()
        total = total + (counts / counts.sum() * p.mean(0)).sum() * E
    return total


@pytest.mark.parametrize("reduction", [None, "per_module"])
def test_mola_aux_loss_is_one_loss_per_decoder_layer(reduction):
    """apply_molora("mola") in training: the aux loss is 0.001 x the authors' per-layer loss,
    recomputed here from the router logits the hooks see (default), or the per-module sum."""
    model = apply_molora(tiny_model(), config("mola", dropout=0.0, aux_loss_reduction=reduction))
    randomize_adapters(model)
    model.train()
    ids, mask, labels = batch()
    # padding holds a real token: the pad id's zero embedding gives all-equal router logits,
    # whose top-k tie order is unspecified (padding is not masked: it takes part in the loss)
    ids = ids.masked_fill(mask == 0, 5)
    seen = []
    handles = [layer.molora.register_forward_hook(
        lambda mod, args, out, i=layer.layer_index: seen.append((i, out[1])))
        for layer in molora_layers(model).values()]
    out = model(ids, attention_mask=mask, labels=labels)
    for h in handles:
        h.remove()
    layers = sorted({i for i, _ in seen})
    assert layers == [0, 1] and len(seen) == 14              # 7 linears in each of 2 layers
    per_layer = [[r.logits for i, r in seen if i == l] for l in layers]
    want = 0.001 * mola_authors_loss(per_layer, 2)
    per_module = 0.001 * sum(mola_authors_loss([[r.logits]], 2) for _, r in seen)
    got = out.aux_loss
    if reduction is None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
        # the two forms really differ (about 7x: one term per linear instead of per layer)
        assert per_module > 5 * want
    else:
        torch.testing.assert_close(got, per_module, rtol=1e-5, atol=1e-8)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                         ignore_index=-100)
    torch.testing.assert_close(out.loss, ce + got, rtol=1e-5, atol=1e-7)
    got.backward()
    routers = [p.grad for n, p in model.named_parameters() if "router" in n]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)


@pytest.mark.parametrize("method,reduction", [("mixlora", None), ("mixlora", "sum"),
                                              ("mola", None)])
def test_aux_loss_added_to_loss(method, reduction):
    coef = 0.5                   # large, so a missing or doubled aux loss shows in the number
    model = apply_molora(tiny_model(), config(method, aux_loss_coef=coef, dropout=0.0,
                                               aux_loss_reduction=reduction))
    randomize_adapters(model)
    model.train()
    ids, mask, labels = batch()
    routings, handles = capture_routings(model)
    out = model(ids, attention_mask=mask, labels=labels)
    for h in handles:
        h.remove()

    logits = out.logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                         ignore_index=-100)
    keep = mask.reshape(-1).bool()
    if method == "mola":   # one loss per decoder layer over its 7 linears' rows
        want = sum(coef * mola_balance(torch.cat([r.probs for r in routings[7 * l:7 * l + 7]]),
                                       torch.cat([r.ids for r in routings[7 * l:7 * l + 7]]),
                                       routings[7 * l].probs.shape[1]) for l in range(2))
        assert len(routings) == 2 * 7                     # every linear of both layers
    elif reduction == "sum":
        want = sum(coef * mixtral_balance(r.probs, r.ids, 4, keep) for r in routings)
    else:   # pooled: all layers' tokens together, the mask repeated per layer
        want = coef * mixtral_balance(torch.cat([r.probs for r in routings]),
                                      torch.cat([r.ids for r in routings]), 4,
                                      keep.repeat(len(routings)))
    assert len(routings) >= 2
    torch.testing.assert_close(out.aux_loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ce + want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(molora_aux_loss(model), want.detach())
    assert out.aux_loss.item() > 0.1          # coef 0.5 on a loss >= 1 per layer group

    # no labels: no loss, the aux loss is still returned (and differentiable)
    out2 = model(ids, attention_mask=mask)
    assert out2.loss is None and out2.aux_loss.requires_grad
    # return_dict=False: the loss (first element) includes it
    out3 = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(out3[0], out.loss)
    torch.testing.assert_close(out3[1], out.logits)


@pytest.mark.parametrize("form", ["masked", "moe_peft"])
def test_mixlora_dynamic_aux_loss_padding_form(form):
    """MixLoRA-dynamic through apply_molora on a padded batch: the default ("masked") drops
    padded tokens from the pooled loss, "moe_peft" (MoE-PEFT's DynamicRouterLoss) counts them."""
    model = apply_molora(tiny_model(), config("mixlora", aux_loss_coef=0.5, dropout=0.0,
                                               method_kwargs={"routing": "dynamic",
                                                              "aux_loss_form": form}))
    randomize_adapters(model)
    model.train()
    ids, mask, labels = batch()
    routings, handles = capture_routings(model)
    out = model(ids, attention_mask=mask, labels=labels)
    for h in handles:
        h.remove()
    probs, sel = torch.cat([r.probs for r in routings]), torch.cat([r.ids for r in routings])
    keep = mask.reshape(-1).bool().repeat(len(routings))
    masked = 0.5 * mixtral_balance(probs, sel, 4, keep)
    unmasked = 0.5 * mixtral_balance(probs, sel, 4, torch.ones_like(keep))
    assert (masked - unmasked).abs() > 1e-4
    torch.testing.assert_close(out.aux_loss, masked if form == "masked" else unmasked,
                               rtol=1e-5, atol=1e-6)


def test_aux_loss_absent_for_methods_without_one():
    model = apply_molora(tiny_model(), config("hydralora"))
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels)
    assert "aux_loss" not in out and molora_aux_loss(model) is None
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce)


# --- (d, e) save / load, generate ---------------------------------------------------------------


@pytest.mark.parametrize("family,method", [("llama", "mixlora"), ("qwen2", "mixlora"),
                                           ("llama", "mola"), ("llama", "smora"),
                                           ("llama", "lora_soups")])
def test_save_load_roundtrip_and_generate(tmp_path, family, method):
    model = apply_molora(tiny_model(family), config(method))
    randomize_adapters(model)
    model.eval()
    save_molora(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_saved_params = sum(t.numel() for k, t in saved.items()
                         if not k.endswith(("rank_offsets", "scales", "rank_bias")))
    assert n_saved_params == n_adapter                    # adapters only, no base weight
    assert not any(k.endswith(("proj.weight", "base.weight")) for k in saved)

    loaded = load_molora(tiny_model(family), str(tmp_path))
    loaded.eval()
    assert loaded.molora_config == model.molora_config
    ids, mask, _ = batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = loaded(ids, attention_mask=mask).logits
    assert torch.equal(got, want)

    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out_saved = model.generate(ids, attention_mask=mask, **gen)
    out_loaded = loaded.generate(ids, attention_mask=mask, **gen)
    assert out_saved.shape == (2, ids.shape[1] + 4)
    assert torch.equal(out_saved, out_loaded)


# --- (f) merge / unmerge ------------------------------------------------------------------------


@pytest.mark.parametrize("method,skip_routed", [("lora_soups", False), ("lora", False),
                                                ("mixlora", True)])
def test_merge_unmerge_roundtrip(method, skip_routed):
    model = apply_molora(tiny_model(), config(method))
    randomize_adapters(model)
    model.eval()
    ids, mask, _ = batch()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        merge_molora(model, skip_routed=skip_routed)
        merged = model(ids, attention_mask=mask).logits
        merge_molora(model, skip_routed=skip_routed)          # no-op
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
        unmerge_molora(model)
        after = model(ids, attention_mask=mask).logits
    mergeable = [n for n, m in molora_layers(model).items() if m.mergeable]
    assert len(changed) == len(mergeable) > 0             # one base weight per static adapter
    assert all(n.endswith("base.weight") for n in changed)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


# --- (g) errors ---------------------------------------------------------------------------------


def test_config_roundtrip_and_errors():
    cfg = config("mixlora", target_modules=["q_proj", "v_proj"],
                 method_kwargs={"routing": "dynamic", "top_p": 0.7})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert MoLoRAConfig.from_dict(d) == cfg and d["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="unknown method 'moe_lora'"):
        MoLoRAConfig("moe_lora")
    with pytest.raises(ValueError, match="unknown keys"):
        MoLoRAConfig.from_dict({**d, "experts": 3})
    with pytest.raises(ValueError, match="num_experts does not apply to method 'smora'"):
        MoLoRAConfig("smora", num_experts=4)
    with pytest.raises(ValueError, match="'lora_soups' needs num_experts"):
        MoLoRAConfig("lora_soups", rank=4)
    with pytest.raises(ValueError, match="top_k=5 > num_experts=4"):
        MoLoRAConfig("mixlora", num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"method_kwargs \['r'\]"):
        MoLoRAConfig("mola", method_kwargs={"r": 4})
    with pytest.raises(ValueError, match="pooled"):
        MoLoRAConfig("mola", aux_loss_reduction="pooled")
    with pytest.raises(ValueError, match="ambiguous for mola"):
        MoLoRAConfig("mola", aux_loss_reduction="sum")
    with pytest.raises(ValueError, match="per_layer"):
        MoLoRAConfig("mixlora", aux_loss_reduction="per_layer")
    with pytest.raises(TypeError, match="JSON"):
        MoLoRAConfig("mola", method_kwargs={"dtype": torch.float32})


def assert_untouched(model):
    assert getattr(model, "molora_config", None) is None and not molora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_apply_errors_leave_model_untouched():
    with pytest.raises(ValueError, match="no decoder layers"):
        apply_molora(nn.Sequential(nn.Linear(4, 4)), MoLoRAConfig("lora"))
    with pytest.raises(TypeError, match="MoLoRAConfig"):
        apply_molora(tiny_model(), "mixlora")

    model = tiny_model().train()
    with pytest.raises(ValueError, match=r"target_modules \['qkv_proj'\] match no nn.Linear"):
        apply_molora(model, MoLoRAConfig("mola", target_modules=["q_proj", "qkv_proj"]))
    assert_untouched(model)
    with pytest.raises(TypeError, match="method_kwargs"):
        apply_molora(model, MoLoRAConfig("mixlora", method_kwargs={"no_such_arg": 1}))
    assert_untouched(model)
    with pytest.raises(ValueError, match="replaces the whole mlp"):
        apply_molora(model, MoLoRAConfig("mixlora", target_modules=["q_proj", "up_proj"]))
    assert_untouched(model)

    # a model with no matching modules: GPT-2 (Conv1D projections, c_fc/c_proj MLP)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="not a gated MLP"):
        apply_molora(gpt2, MoLoRAConfig("mixlora"))
    with pytest.raises(ValueError, match="no module of GPT2LMHeadModel matches"):
        apply_molora(gpt2, MoLoRAConfig("mola", num_experts=2))
    assert_untouched(gpt2)

    with pytest.raises(ValueError, match="3 entries for a model with 2 decoder layers"):
        apply_molora(model, MoLoRAConfig("mola", experts_per_layer=[2, 4, 6]))
    assert_untouched(model)

    apply_molora(model, config("mixlora"))
    with pytest.raises(ValueError, match="already converted"):
        apply_molora(model, config("mola"))
    with pytest.raises(ValueError, match="routed.*skip_routed=True"):
        merge_molora(model)
    with pytest.raises(ValueError, match="not a MoE-LoRA model"):
        merge_molora(tiny_model())


def test_load_into_mismatched_model_raises(tmp_path):
    model = apply_molora(tiny_model(), config("mixlora"))
    save_molora(model, str(tmp_path))
    for overrides, what in [(dict(num_hidden_layers=3), "model.layers.2.mlp"),
                            (dict(intermediate_size=128), "'out_features': 172"),
                            (dict(hidden_size=32, num_attention_heads=2), "'in_features': 64")]:
        other = tiny_model(**overrides).train()
        with pytest.raises(ValueError, match="does not match the saved adapters") as info:
            load_molora(other, str(tmp_path))
        assert what in str(info.value)
        assert_untouched(other)
    with pytest.raises(ValueError, match="already converted"):
        load_molora(model, str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_molora(tiny_model(), str(tmp_path / "nowhere"))


# --- the README example -------------------------------------------------------------------------


def test_readme_example_runs(tmp_path, monkeypatch):
    """The first code block of README.md's "Use with transformers / PEFT" section runs."""
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    with open(readme) as f:
        text = f.read()
    section = text.split("## Use with transformers / PEFT", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "mixlora-adapter" / CONFIG_NAME).is_file()
