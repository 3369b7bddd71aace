"""The complete X-LoRA model of ``apply_xlora_from_adapters`` against PEFT's X-LoRA (installed
peft, fully offline): logits over the same saved adapters with the same classifier weights in
both softmax modes (the classifier's softmax, PEFT's per-token softmax over the top-k), PEFT
classifier weights loaded as PEFT names them, ``generate`` with the KV cache of both passes,
``save_pretrained`` / ``from_pretrained``, and ``accelerate_xlora`` refusing a PEFT X-LoRA model
PEFT itself cannot run.

A tiny random Llama; three LoRA adapters (ragged ranks, different alphas and targets, random
NON-ZERO lora_B) made with ``get_peft_model`` and saved to tmp dirs; fp32 on CPU."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, XLoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from molora_ops.integrations.hf_peft import (FusedXLoraLinear, accelerate_xlora,  # noqa: E402
                                             apply_xlora_from_adapters, load_xlora,
                                             read_peft_adapter)
from molora_ops.modules import XLoRALinear, XLoRAModel  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 64
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ADAPTERS = {
    "0": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "1": dict(r=6, lora_alpha=24, target_modules=["q_proj", "k_proj", "up_proj"]),
    "2": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj", "down_proj"]),
}
NUM_MODULES = 2 * 6  # q, k, v, o, up, down in each of the 2 layers


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("xlora_adapters")
    paths = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(llama(), LoraConfig(**kw))
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        pm.save_pretrained(str(root / name))
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def batch():
    """input_ids [2, 7] and a left-padded attention mask (row 0 has 2 pad positions)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def peft_xlora(paths, seed=5, pass_value=0.0, **cfg):
    """PEFT's X-LoRA with a random classifier (decisive, tie-free scalings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xm = get_peft_model(llama(), XLoraConfig(task_type="CAUSAL_LM", hidden_size=32,
                                                 adapters=dict(paths), **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in xm.base_model.internal_xlora_classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if pass_value != 0.0:
        xm.base_model.set_scaling_pass_value(pass_value)
    return xm.eval()


def ours_like(xm, paths):
    """Ours over the same adapters and config, the PEFT classifier's state dict loaded AS IT IS
    (PEFT's key names, strict)."""
    ours = apply_xlora_from_adapters(llama(), paths, config=xm.base_model.xlora_config)
    ours.scaling_pass_value = xm.base_model.internal_xlora_classifier.override_scaling_pass_value
    ours.classifier.load_state_dict(xm.base_model.internal_xlora_classifier.state_dict())
    return ours.eval()


def logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


CASES = {
    # the classifier's softmax over the adapters (PEFT's default config)
    "softmax": dict(),
    "softmax-layerwise-T": dict(layerwise_scalings=True, softmax_temperature=0.7),
    "softmax-top1": dict(layerwise_scalings=True, top_k_lora=1),
    # PEFT's per-token softmax over the top-k scalings (raw classifier logits)
    "softmax_topk": dict(enable_softmax=False, enable_softmax_topk=True, top_k_lora=2,
                         layerwise_scalings=True),
    "both-softmaxes": dict(enable_softmax_topk=True, top_k_lora=2),
    "depth2-dropout": dict(xlora_depth=2, xlora_size=16, xlora_dropout_p=0.2,
                           layerwise_scalings=True, global_scaling_weight=0.7),
    "depth3-no-dropout": dict(xlora_depth=3, xlora_size=8, xlora_dropout_p=0.0,
                              enable_softmax=False, enable_softmax_topk=True, top_k_lora=2),
    "pass-value": dict(layerwise_scalings=True, top_k_lora=2, _pass_value=0.5),
    "pass-value-none": dict(enable_softmax_topk=True, top_k_lora=2, _pass_value=None),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_logits_equal_peft_xlora(adapters, batch, case):
    cfg = dict(CASES[case])
    pass_value = cfg.pop("_pass_value", 0.0)
    xm = peft_xlora(adapters, pass_value=pass_value, **cfg)
    ids, mask = batch
    ref = logits(xm, ids, mask)
    assert (ref - logits(llama(), ids, mask)).abs().max() > 1e-2   # the adapters matter
    ours = ours_like(xm, adapters)
    assert sum(isinstance(m, XLoRALinear) for m in ours.modules()) == NUM_MODULES
    torch.testing.assert_close(logits(ours, ids, mask), ref, **TOL)
    torch.testing.assert_close(ours.last_scalings, xm.base_model.get_latest_scalings(), **TOL)


def test_classifier_keys_are_peft_keys(adapters):
    """Same key names and shapes as PEFT's classifier for depth 1, 2 (dropout) and 3 (none)."""
    for cfg in (dict(), dict(xlora_depth=2, xlora_size=16, xlora_dropout_p=0.2),
                dict(xlora_depth=3, xlora_size=8, xlora_dropout_p=0.0, layerwise_scalings=True)):
        xm = peft_xlora(adapters, **cfg)
        ours = apply_xlora_from_adapters(llama(), adapters, config=xm.base_model.xlora_config)
        want = {k: v.shape for k, v in xm.base_model.internal_xlora_classifier.state_dict().items()}
        assert {k: v.shape for k, v in ours.classifier.state_dict().items()} == want


def test_load_peft_state_dict_prefixed_and_mismatch(adapters, batch):
    xm = peft_xlora(adapters, layerwise_scalings=True, xlora_depth=2, xlora_size=16)
    ids, mask = batch
    ref = logits(xm, ids, mask)
    ours = apply_xlora_from_adapters(llama(), adapters, config=xm.base_model.xlora_config).eval()
    ours.classifier.load_peft_state_dict(xm)    # the whole PeftModel: prefixed keys, others ignored
    torch.testing.assert_close(logits(ours, ids, mask), ref, **TOL)
    ours.classifier.load_peft_state_dict(xm.state_dict())
    torch.testing.assert_close(logits(ours, ids, mask), ref, **TOL)
    # a classifier of another shape (not layerwise): clear error, nothing copied
    other = apply_xlora_from_adapters(llama(), adapters, xlora_depth=2, xlora_size=16)
    before = {k: v.clone() for k, v in other.classifier.state_dict().items()}
    with pytest.raises(ValueError, match="wrong shape.*layers.3.weight"):
        other.classifier.load_peft_state_dict(xm)
    assert all(torch.equal(before[k], v) for k, v in other.classifier.state_dict().items())
    with pytest.raises(ValueError, match="missing"):
        other.classifier.load_peft_state_dict({"layers.0.weight": before["layers.0.weight"]})


def _record_lengths(model):
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    return seen, handle


def test_generate_with_kv_cache_equals_peft(adapters, batch):
    """Greedy generation on a left-padded batch: the same tokens as PEFT's X-LoRA (which
    re-runs both passes on the whole sequence at each step), the decode steps run ONE token
    through both passes, and the step logits equal a full forward of the final sequence."""
    xm = peft_xlora(adapters, layerwise_scalings=True, top_k_lora=2)
    ours = ours_like(xm, adapters)
    ids, mask = batch
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        ref = xm.generate(**kw)
        seen, handle = _record_lengths(ours.model)
        out = ours.generate(**kw, output_scores=True, return_dict_in_generate=True)
        handle.remove()
    assert torch.equal(out.sequences, ref)
    # prefill 7 tokens (scaling pass + real pass), then 4 decode steps of 1 token each, twice
    assert seen == [7, 7] + [1, 1] * 4, seen
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)
    full = logits(ours, out.sequences, full_mask)
    steps = torch.stack(out.scores, 1)                              # [2, 5, V]
    torch.testing.assert_close(steps, full[:, 6:-1], **TOL)
    # without the cache: both passes over the whole sequence each step (PEFT's way), same tokens
    with torch.no_grad():
        assert torch.equal(ours.generate(**kw, use_cache=False), ref)
    assert all(m.scalings is None and not m.adapters_off for m in ours.xlora_layers)


def test_incremental_forward_with_cache(adapters, batch):
    xm = peft_xlora(adapters, enable_softmax=False, enable_softmax_topk=True, top_k_lora=2)
    ours = ours_like(xm, adapters)
    ids, mask = batch
    full = logits(ours, ids, mask)
    with torch.no_grad():
        first = ours(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        cache = first.past_key_values
        second = ours(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=cache,
                      use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, **TOL)
    assert second.past_key_values is cache and cache.get_seq_length() == 7
    # a cache this model did not start has no adapters-off twin: refused
    with torch.no_grad():
        foreign = ours.model(input_ids=ids[:, :4], attention_mask=mask[:, :4],
                             use_cache=True).past_key_values
        with pytest.raises(ValueError, match="not started by this XLoRAModel"):
            ours(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=foreign)
        with pytest.raises(TypeError, match="transformers Cache"):
            ours(input_ids=ids, past_key_values=((torch.zeros(1),),))


def test_generate_refuses_beam_search_with_cache(adapters, batch):
    ours = ours_like(peft_xlora(adapters), adapters)
    ids, mask = batch
    with pytest.raises(ValueError, match="beam search"):
        ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=2)
    with torch.no_grad():
        out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=2,
                            use_cache=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_save_and_load_round_trip(adapters, batch, tmp_path):
    """Trained classifier AND trained adapters (use_trainable_adapters) saved and read back on a
    fresh base model: equal logits and settings; the saved adapters are PEFT LoRA adapters."""
    xm = peft_xlora(adapters, layerwise_scalings=True, top_k_lora=2, xlora_depth=2,
                    xlora_size=16, use_trainable_adapters=True, global_scaling_weight=0.8)
    ours = ours_like(xm, adapters)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():                                           # "training" moved them
        for m in ours.xlora_layers:
            m.bank.B.add_(torch.randn(m.bank.B.shape, generator=g) * 0.1)
    ids, mask = batch
    ref = logits(ours, ids, mask)
    ours.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapters", "xlora_classifier.safetensors",
                                            "xlora_config.json"]
    loaded = XLoRAModel.from_pretrained(llama(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, ids, mask), ref, rtol=0, atol=1e-6)
    assert loaded.adapter_names == ["0", "1", "2"]
    m0, l0 = ours.xlora_layers[0], loaded.xlora_layers[0]
    assert (l0.top_k_lora, l0.global_scaling_weight, l0.bank.A.requires_grad) == (2, 0.8, True)
    assert torch.equal(l0.bank.B, m0.bank.B)
    # each saved adapter is a PEFT LoRA adapter with the trained tensors
    ad = read_peft_adapter(str(tmp_path / "adapters" / "1"))
    A, B, scale = ad.modules["model.layers.0.self_attn.q_proj"]
    q = dict(ours.model.named_modules())["model.layers.0.self_attn.q_proj"]
    A1, B1 = q.bank.expert(1)
    assert torch.equal(A, A1) and torch.equal(B, B1) and scale == pytest.approx(24 / 6)
    # load_xlora checks before touching the model
    cfg_file = tmp_path / "xlora_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"num_layers": 12', '"num_layers": 11'))
    fresh = llama()
    with pytest.raises(ValueError, match="saved for 11 modules"):
        load_xlora(fresh, str(tmp_path))
    assert not any(isinstance(m, XLoRALinear) for m in fresh.modules())
    with pytest.raises(FileNotFoundError, match="xlora_config.json"):
        load_xlora(llama(), str(tmp_path / "adapters"))


def test_save_without_adapter_configs_synthesises_patterns(adapters, batch, tmp_path):
    """A model whose adapters' PEFT configs are unknown: per-module rank / alpha patterns."""
    ours = ours_like(peft_xlora(adapters, layerwise_scalings=True), adapters)
    ours.adapter_configs = None
    ids, mask = batch
    ref = logits(ours, ids, mask)
    ours.save_pretrained(str(tmp_path))
    loaded = XLoRAModel.from_pretrained(llama(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, ids, mask), ref, rtol=0, atol=1e-6)
    # a classifier file that does not fit: refused before the model is touched
    from safetensors.torch import save_file
    save_file({"layers.0.weight": torch.zeros(3, 32)},
              str(tmp_path / "xlora_classifier.safetensors"))
    fresh = llama()
    with pytest.raises(ValueError, match="missing.*layers.0.bias"):
        load_xlora(fresh, str(tmp_path))
    assert not any(isinstance(m, XLoRALinear) for m in fresh.modules())


def test_accelerate_xlora_refuses_named_adapters(adapters, batch):
    """PEFT loads adapter i as "i" but activates the config's keys: with other keys PEFT cannot
    run the model (KeyError); accelerate_xlora says so before changing anything."""
    named = {"math": adapters["0"], "code": adapters["1"]}
    xm = peft_xlora(named)
    ids, mask = batch
    with pytest.raises(KeyError):
        logits(xm, ids, mask)
    with pytest.raises(ValueError, match=r"\['math', 'code'\].*PEFT itself cannot run"):
        accelerate_xlora(xm)
    assert not any(isinstance(getattr(m.__dict__.get("forward"), "__self__", None),
                              FusedXLoraLinear) for m in xm.modules())
    # the same adapters under PEFT's names are served
    ok = peft_xlora({"0": adapters["0"], "1": adapters["1"]})
    ref = logits(ok, ids, mask)
    accelerate_xlora(ok)
    torch.testing.assert_close(logits(ok, ids, mask), ref, **TOL)
