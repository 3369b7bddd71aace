"""molora_ops.integrations.hf_peft against PEFT itself (installed peft, fully offline).

Everything is built from configs: a tiny random Llama (and GPT-2 for Conv1D / fan_in_fan_out),
LoRA adapters made with ``get_peft_model`` with random NON-ZERO lora_B, saved to tmp dirs and
read back. The references are PEFT's own models: ``PeftModel.from_pretrained`` (one adapter, or
several active adapters summed) and PEFT's X-LoRA (``get_peft_model(base, XLoraConfig(...))``).
fp32 on CPU, fixed seeds.

PEFT 0.21 X-LoRA quirk found here: the adapters are loaded under the names "0", "1", ... but
activated under the keys of ``XLoraConfig.adapters``, so any other keys make the first forward
fail (``KeyError`` in ``disable_adapter_layers``); the tests name the adapters "0", "1", "2".
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, XLoraConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from molora_ops.integrations.hf_peft import (FusedXLoraLinear, accelerate_xlora,  # noqa: E402
                                             apply_peft_adapters, apply_xlora_from_adapters,
                                             load_peft_adapters, read_peft_adapter,
                                             restore_xlora)
from molora_ops.modules import MoLE, LoRASoupsCAT, XLoRALinear  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             use_cache=False)

# three adapters: ragged ranks, different alphas, rsLoRA, rank/alpha patterns, different targets
ADAPTERS = {
    "0": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "1": dict(r=8, lora_alpha=32, use_rslora=True,
              target_modules=["q_proj", "k_proj", "down_proj"]),
    "2": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
              rank_pattern={"layers.0.self_attn.q_proj": 6, "k_proj": 2},
              alpha_pattern={"up_proj": 5, "v_proj": 3}),
}


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def save_adapter(model, path, seed, **lora_kwargs):
    """get_peft_model + random non-zero lora_B + save_pretrained; returns the path."""
    lora_kwargs.setdefault("lora_dropout", 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_adapter(llama(), root / f"a{name}", 10 + i, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, LLAMA["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def peft_lora(paths, active):
    """PEFT's own LoRA model with the given adapters loaded and ``active`` active (summed)."""
    names = list(paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(llama(), paths[names[0]], adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(paths[n], adapter_name=n)
    pm.base_model.set_adapter(active)
    return pm.eval()


# --------------------------------------------------------------------------------------------
# Banks from adapters
# --------------------------------------------------------------------------------------------


def test_read_adapter_ranks_scalings_and_patterns(adapters):
    ad = read_peft_adapter(adapters["2"])
    A, B, s = ad.modules["model.layers.0.self_attn.q_proj"]
    assert A.shape == (6, 32) and B.shape == (32, 6) and s == pytest.approx(8 / 6)  # rank_pattern
    assert ad.rank("model.layers.1.self_attn.q_proj") == 4
    assert ad.rank("model.layers.0.self_attn.k_proj") == 2
    assert ad.modules["model.layers.1.mlp.up_proj"][2] == pytest.approx(5 / 4)  # alpha_pattern
    assert ad.modules["model.layers.0.self_attn.v_proj"][2] == pytest.approx(3 / 4)
    assert read_peft_adapter(adapters["1"]).modules["model.layers.0.mlp.down_proj"][2] == \
        pytest.approx(32 / 8 ** 0.5)  # rsLoRA
    assert ad.rank("model.layers.0.mlp.down_proj") == 0 and ad.lora_dropout == 0.1
    # PEFT's own scaling of the same modules
    pm = peft_lora(adapters, ["0", "1", "2"])
    for name, (_, _, s) in ad.modules.items():
        assert pm.base_model.model.get_submodule(name).scaling["2"] == pytest.approx(s)


def test_banks_are_ragged_with_rank0_experts(adapters):
    banks = load_peft_adapters([adapters[n] for n in "012"])
    q0, k0, down = (banks[f"model.layers.0.{m}"] for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                           "mlp.down_proj"))
    assert q0.ranks == [4, 8, 6] and k0.ranks == [0, 8, 2] and down.ranks == [0, 8, 0]
    assert k0.scales[0].item() == 0 and not q0.A.requires_grad
    pm = peft_lora(adapters, ["0", "1", "2"])
    for name, bank in banks.items():
        layer = pm.base_model.model.get_submodule(name)
        ref = sum(layer.get_delta_weight(n) for n in layer.lora_A)
        torch.testing.assert_close(bank.delta_weight(), ref, **TOL)


@pytest.mark.parametrize("name", ["0", "1", "2"])
def test_single_adapter_matches_peft(adapters, ids, name):
    ref = logits(peft_lora({name: adapters[name]}, [name]), ids)
    model = llama()
    base = logits(model, ids)
    layers = apply_peft_adapters(model, [adapters[name]])            # LoRASoupsCAT, gate 1
    assert all(isinstance(m, LoRASoupsCAT) for m in layers.values())
    out = logits(model, ids)
    assert (ref - base).abs().max() > 1e-2                           # the adapter matters
    torch.testing.assert_close(out, ref, **TOL)


def test_adapter_sum_and_one_hot_match_peft(adapters, ids):
    model = llama()
    layers = apply_peft_adapters(model, adapters)
    pm = peft_lora(adapters, ["0", "1", "2"])
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), **TOL)
    for n in range(3):  # the CAT weights select one adapter: PEFT with that adapter alone
        with torch.no_grad():
            for layer in layers.values():
                layer.gating.alpha.copy_(torch.nn.functional.one_hot(torch.tensor(n), 3))
        pm.base_model.set_adapter(str(n))
        torch.testing.assert_close(logits(model, ids), logits(pm, ids), **TOL)


def test_conv1d_fan_in_fan_out_gpt2(tmp_path):
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg).eval()

    path = save_adapter(gpt2(), tmp_path / "g", 3, r=4, lora_alpha=8, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_proj"])
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = logits(PeftModel.from_pretrained(gpt2(), path).eval(), ids)
    model = gpt2()
    conv_w = model.transformer.h[0].attn.c_attn.weight
    layers = apply_peft_adapters(model, [path])
    assert len(layers) == 6
    q = layers["transformer.h.0.attn.c_attn"]
    assert q.base.weight.data_ptr() == conv_w.data_ptr()             # a view, no copy
    torch.testing.assert_close(logits(model, ids), ref, **TOL)
    for layer in layers.values():                                    # merging writes through
        layer.merge()
    torch.testing.assert_close(logits(model, ids), ref, **TOL)


def test_mole_from_adapters_trains_the_gate_only(adapters, ids):
    model = llama()
    model.requires_grad_(False)
    layers = apply_peft_adapters(model, adapters, MoLE, temperature=2.0)
    assert all(isinstance(m, MoLE) and m.bank.ranks for m in layers.values())
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".gate." in n or ".norm." in n for n in trained)
    assert torch.isfinite(out.logits).all()


# --------------------------------------------------------------------------------------------
# X-LoRA
# --------------------------------------------------------------------------------------------


def peft_xlora(paths, seed=5, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xm = get_peft_model(llama(), XLoraConfig(task_type="CAUSAL_LM", hidden_size=32,
                                                 adapters=dict(paths), **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a classifier with decisive, tie-free scalings
        for p in xm.base_model.internal_xlora_classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return xm.eval()


def fused_layers(xm):
    return [m.forward.__self__ for m in xm.modules()
            if isinstance(getattr(m.__dict__.get("forward"), "__self__", None), FusedXLoraLinear)]


XLORA_CASES = [
    dict(),
    dict(layerwise_scalings=True),
    dict(top_k_lora=1),
    dict(top_k_lora=2, enable_softmax_topk=True, enable_softmax=False, layerwise_scalings=True),
    dict(enable_softmax=False, global_scaling_weight=0.5, xlora_depth=2, xlora_size=16),
    dict(layerwise_scalings=True, top_k_lora=2, softmax_temperature=0.5, _pass_value=None),
]


@pytest.mark.parametrize("case", XLORA_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                     c.items()) or "default")
def test_accelerated_xlora_matches_peft(adapters, ids, case):
    case = dict(case)
    pass_value = case.pop("_pass_value", 0.0)
    xm = peft_xlora(adapters, **case)
    if pass_value != 0.0:
        xm.base_model.set_scaling_pass_value(pass_value)             # None -> 1/n
    ref = logits(xm, ids)
    ref_scalings = xm.base_model.get_latest_scalings().clone()
    assert (ref - logits(llama(), ids)).abs().max() > 1e-2
    assert accelerate_xlora(xm) is xm
    fused = fused_layers(xm)
    assert len(fused) == 10                                          # every lora.Linear
    out = logits(xm, ids)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(xm.base_model.get_latest_scalings(), ref_scalings, **TOL)
    assert sum(f.fallback_calls for f in fused) == 0
    restore_xlora(xm)
    assert not fused_layers(xm)
    torch.testing.assert_close(logits(xm, ids), ref, rtol=0, atol=0)


def test_accelerated_xlora_training_dropout_and_gradients_match_peft(adapters, ids):
    """Training mode with LoRA dropout 0.1: the fused layers draw PEFT's masks in PEFT's order
    (a non-zero scaling pass value, so both passes run the adapters), so the same seed gives the
    same logits and classifier gradients; only the classifier is trained."""
    xm = peft_xlora(adapters, layerwise_scalings=True, top_k_lora=2)
    xm.base_model.set_scaling_pass_value(0.5)
    xm.train()

    def step():
        torch.manual_seed(123)
        xm.zero_grad(set_to_none=True)
        out = xm(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in xm.named_parameters()
                                     if p.grad is not None}

    ref_logits, ref_grads = step()
    accelerate_xlora(xm)
    out_logits, grads = step()
    torch.testing.assert_close(out_logits, ref_logits, **TOL)
    assert sorted(grads) == sorted(ref_grads) and grads
    assert all("internal_xlora_classifier" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL)
    torch.manual_seed(7)  # dropout is really on: two draws differ
    a = logits(xm, ids)
    assert (a - logits(xm, ids)).abs().max() > 1e-4


def test_accelerated_xlora_trainable_adapters_gradients(adapters, ids):
    xm = peft_xlora(adapters, use_trainable_adapters=True, top_k_lora=2)

    def step():
        xm.zero_grad(set_to_none=True)
        xm(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in xm.named_parameters() if p.grad is not None}

    ref = step()
    accelerate_xlora(xm)
    got = step()
    assert sorted(got) == sorted(ref) and any(".lora_A." in n for n in got)
    for n in got:
        torch.testing.assert_close(got[n], ref[n], **TOL)


def test_accelerated_xlora_generate(adapters, ids):
    xm = peft_xlora(adapters, layerwise_scalings=True)
    mask = torch.ones_like(ids)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = xm.generate(**kw)
        accelerate_xlora(xm)
        out = xm.generate(**kw)
    assert out.shape == (2, ids.shape[1] + 4)
    assert torch.equal(out, ref)


def test_xlora_from_adapters_matches_peft_xlora(adapters, ids):
    for case in (dict(layerwise_scalings=True, top_k_lora=2),
                 dict(xlora_depth=2, xlora_size=16, enable_softmax_topk=True, top_k_lora=2)):
        xm = peft_xlora(adapters, **case)
        ref = logits(xm, ids)
        model = llama()
        ours = apply_xlora_from_adapters(model, config=xm.base_model.xlora_config)
        peft_lin = [m for m in xm.base_model.internal_xlora_classifier.layers
                    if isinstance(m, nn.Linear)]
        our_lin = [m for m in ours.classifier.inner if isinstance(m, nn.Linear)]
        our_lin.append(ours.classifier.last)
        for a, b in zip(our_lin, peft_lin, strict=True):
            a.load_state_dict(b.state_dict())
        ours.eval()
        assert sum(isinstance(m, XLoRALinear) for m in model.modules()) == 10
        torch.testing.assert_close(logits(ours, ids), ref, **TOL)
        torch.testing.assert_close(ours.last_scalings, xm.base_model.get_latest_scalings(), **TOL)
        trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith("classifier.") for n in trainable)


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(use_dora=True), "DoRA"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(bias="lora_only"), "base biases"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(init_lora_weights="olora"), "modified"),
    (dict(target_modules=["embed_tokens"]), "embedding LoRA"),
], ids=["dora", "lora_bias", "bias", "modules_to_save", "olora", "embedding"])
def test_unsupported_adapters_raise(tmp_path, kw, match):
    kw = {"r": 4, "target_modules": ["q_proj"], **kw}
    path = save_adapter(llama(), tmp_path / "bad", 0, **kw)
    with pytest.raises(NotImplementedError, match=match):
        load_peft_adapters([path])
    model = llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(NotImplementedError, match=match):
        apply_peft_adapters(model, [path])
    assert [type(m) for m in model.modules()] == before             # untouched


def _edit(src, dst, cfg_update=None, tensors=None):
    from safetensors.torch import load_file, save_file
    os.makedirs(dst)
    with open(os.path.join(src, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg.update(cfg_update or {})
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    sd = load_file(os.path.join(src, "adapter_model.safetensors"))
    save_file(tensors(sd) if tensors else sd, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def test_malformed_adapters_raise(adapters, tmp_path):
    src = adapters["0"]
    with pytest.raises(FileNotFoundError, match="local directory"):
        read_peft_adapter(tmp_path / "missing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft_adapter(tmp_path / "empty")
    with pytest.raises(ValueError, match="peft_type"):
        read_peft_adapter(_edit(src, str(tmp_path / "ia3"), {"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="rank 4 but the config"):
        read_peft_adapter(_edit(src, str(tmp_path / "r"), {"r": 8}))
    conv = _edit(src, str(tmp_path / "conv"),
                 tensors=lambda sd: {k: v[..., None, None] for k, v in sd.items()})
    with pytest.raises(NotImplementedError, match="convolution"):
        read_peft_adapter(conv)
    with pytest.raises(TypeError, match="list"):
        load_peft_adapters(src)


def test_wrong_model_and_not_xlora_raise(adapters, tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="does not have"):
        apply_peft_adapters(gpt2, adapters)
    assert not any(isinstance(m, LoRASoupsCAT) for m in gpt2.modules())
    with pytest.raises(ValueError, match="no PEFT XLoraModel"):
        accelerate_xlora(peft_lora({"0": adapters["0"]}, ["0"]))
    other = save_adapter(llama(), tmp_path / "d", 1, r=4, lora_dropout=0.0,
                         target_modules=["q_proj"])
    with pytest.raises(ValueError, match="different lora_dropout"):
        apply_xlora_from_adapters(llama(), [adapters["0"], other])
    with pytest.raises(TypeError, match="unknown XLoraConfig"):
        apply_xlora_from_adapters(llama(), [adapters["0"]], top_k=2)


def test_accelerate_xlora_dora_raises_before_any_change(tmp_path, ids):
    paths = {"0": save_adapter(llama(), tmp_path / "d0", 0, r=4, use_dora=True,
                               target_modules=["q_proj"]),
             "1": save_adapter(llama(), tmp_path / "d1", 1, r=4, target_modules=["q_proj"])}
    xm = peft_xlora(paths)
    with pytest.raises(ValueError, match="DoRA"):
        accelerate_xlora(xm)
    assert not fused_layers(xm)


def test_fused_layer_called_directly_without_scalings(adapters):
    """Outside X-LoRA's hooks PEFT's layer sums the adapters with weight 1 (any input shape),
    in eval and, with the same seed, in training (one dropout mask per adapter)."""
    xm = peft_xlora(adapters)
    layer = xm.base_model.lora_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    for train in (False, True):
        layer.train(train)
        torch.manual_seed(0)
        ref = layer(x)
        accelerate_xlora(xm)
        torch.manual_seed(0)
        out = layer(x)
        assert isinstance(layer.forward.__self__, FusedXLoraLinear)
        assert layer.forward.__self__.fallback_calls == 0
        torch.testing.assert_close(out, ref, **TOL)
        restore_xlora(xm)
