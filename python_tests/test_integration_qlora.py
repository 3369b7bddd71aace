"""QLoRA: bitsandbytes ``Linear4bit`` (nf4) / ``Linear8bitLt`` (int8) bases under ``apply_molora``
for every method, on the CPU backend of bitsandbytes.

Reference: the same tiny Llama whose decoder linears are plain ``nn.Linear`` holding the
DEQUANTIZED weights, converted the same way with the same adapter tensors. The quantized model's
base outputs come from calling the bitsandbytes modules (their weights are integer codes that
cannot be read as floats), so equal logits and adapter gradients show that every base path,
including MixLoRA's shared-W2 down projection, calls the quantized module.
"""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes.functional import dequantize_4bit  # noqa: E402

from molora_ops.integrations.hf_transformers import (  # noqa: E402
    MoLoRAConfig, apply_molora, load_molora, merge_and_unload, merge_molora, save_molora)

from test_integration_transformers import (  # noqa: E402
    METHOD_CONFIGS, batch, config, molora_layers, randomize_adapters, tiny_model)


def _quantized_linear(lin: nn.Linear, bits: int):
    b = lin.bias is not None
    if bits == 4:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=b,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                     quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=b,
                                has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False,
                                     has_fp16_weights=False)
    if b:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")                                      # quantizes
    if bits == 4:
        w = dequantize_4bit(q.weight.data, q.weight.quant_state)
    else:
        w = q.weight.data.float() * q.weight.SCB.float()[:, None] / 127
    return q, w


# bitsandbytes' 4-bit inference path on CPUs with AVX512-BF16 repacks the weight in blocks of 32
# output features and asserts out_features % 32 == 0: the tests that run the quantized model in
# eval mode without grad take a d_ff that allows it (the tiny model's 172 does not).
BNB_EVAL_SHAPE = dict(intermediate_size=192)


def quantized_pair(bits, **overrides):
    """(model with bitsandbytes decoder linears, model with their dequantized nn.Linear)."""
    qm = tiny_model(**overrides)
    dm = copy.deepcopy(qm)
    for layer_q, layer_d in zip(qm.model.layers, dm.model.layers):
        for name, lin in list(layer_q.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            q, w = _quantized_linear(lin, bits)
            parent, _, attr = name.rpartition(".")
            setattr(layer_q.get_submodule(parent), attr, q)
            with torch.no_grad():
                layer_d.get_submodule(name).weight.copy_(w)
    assert type(qm.model.layers[0].mlp.down_proj).__module__.startswith("bitsandbytes")
    return qm, dm


def convert_both(qm, dm, method):
    kw = {} if method == "lora_soups" else {"dropout": 0.0}
    apply_molora(dm, config(method, **kw))
    apply_molora(qm, config(method, **kw))
    randomize_adapters(dm)
    q_layers = molora_layers(qm)
    for name, layer in molora_layers(dm).items():
        state = layer.adapter_state_dict()
        assert set(q_layers[name].adapter_state_dict()) == set(state)   # no quant-state keys
        q_layers[name].molora.load_state_dict(state, strict=False)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_quantized_base_matches_dequantized_reference(bits, method):
    qm, dm = quantized_pair(bits)
    convert_both(qm, dm, method)
    ids, mask, labels = batch()
    calls = []
    for layer in qm.model.layers:
        proj = layer.mlp.down_proj if method != "mixlora" else layer.mlp.molora.down_proj
        base = getattr(proj, "molora", None)
        target = proj if base is None else base.base
        assert type(target).__module__.startswith("bitsandbytes")
        target.register_forward_hook(lambda *a: calls.append(1))
    results = []
    for model in (dm, qm):
        model.train()
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), out.loss.detach(), grads))
    (ld, lossd, gd), (lq, lossq, gq) = results
    assert len(calls) == len(qm.model.layers)      # one down projection call per layer
    assert set(gd) == set(gq) and gd
    assert all(gq[k] is not None for k in gq if gd[k] is not None)
    torch.testing.assert_close(lq, ld, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lossq, lossd, rtol=1e-5, atol=1e-6)
    for k in gd:
        if gd[k] is not None:
            torch.testing.assert_close(gq[k], gd[k], rtol=1e-4, atol=1e-6)
    # trainable parameters: the adapters only (the quantized weights stay frozen)
    assert all(not p.requires_grad for n, p in qm.named_parameters() if ".molora." not in n
               or n.endswith(("base.weight", "proj.weight")))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_save_load_roundtrip(tmp_path, bits):
    qm, _ = quantized_pair(bits, **BNB_EVAL_SHAPE)
    apply_molora(qm, config("mixlora", dropout=0.0))
    randomize_adapters(qm)
    save_molora(qm, str(tmp_path))
    fresh, _ = quantized_pair(bits, **BNB_EVAL_SHAPE)
    load_molora(fresh, str(tmp_path))
    ids, mask, _ = batch()
    qm.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, attention_mask=mask).logits,
                                   qm(ids, attention_mask=mask).logits, rtol=0, atol=0)


class _IntLinear(nn.Linear):
    """A quantized linear that is not from bitsandbytes (int8 weight, own forward)."""

    def __init__(self, lin):
        super().__init__(lin.in_features, lin.out_features, bias=False)
        self.weight = nn.Parameter(lin.weight.detach().mul(100).to(torch.int8),
                                   requires_grad=False)

    def forward(self, x):
        return x @ self.weight.t().to(x.dtype) / 100


def test_unsupported_quantized_base_and_merge_raise_before_any_change():
    model = tiny_model()
    attn = model.model.layers[1].self_attn
    attn.v_proj = _IntLinear(attn.v_proj)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="v_proj .*only bitsandbytes"):
        apply_molora(model, MoLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters() if p.is_floating_point())

    qm, _ = quantized_pair(4)
    apply_molora(qm, config("lora"))
    randomize_adapters(qm)
    for fn in (merge_molora, merge_and_unload):
        with pytest.raises(ValueError, match="quantized"):
            fn(qm)
        assert molora_layers(qm) and not any(m.merged for m in molora_layers(qm).values())


@pytest.mark.parametrize("bits", [4, 8])
def test_trainer_on_a_model_loaded_quantized(tmp_path, bits):
    """``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` + apply_molora trains
    under transformers' Trainer (which refuses a quantized model without adapters), writes
    adapter-only checkpoints and resumes; unload restores the model's flags."""
    import transformers
    from safetensors.torch import load_file

    from test_integration_hf_workflows import _Data

    tiny_model(**BNB_EVAL_SHAPE).save_pretrained(str(tmp_path / "base"))

    def load():
        q = (transformers.BitsAndBytesConfig(load_in_4bit=True,
                                             bnb_4bit_compute_dtype=torch.float32)
             if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True))
        m = transformers.LlamaForCausalLM.from_pretrained(
            str(tmp_path / "base"), quantization_config=q, device_map="cpu",
            dtype=torch.float32)
        assert m.is_quantized
        torch.manual_seed(5)
        return apply_molora(m, config("mixlora", dropout=0.0)).train()

    def trainer(model, steps):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=steps, save_steps=1,
            per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True,
            seed=0, disable_tqdm=True)
        return transformers.Trainer(model=model, args=args, train_dataset=_Data())

    model = load()
    trainer(model, 3).train()
    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / "molora_adapter.safetensors"))
    assert saved and not any("weight.absmax" in k or k.endswith("SCB") or ".base." in k
                             for k in saved)
    resumed = load()
    trainer(resumed, 3).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for name, layer in molora_layers(resumed).items():
        for key, t in layer.adapter_state_dict().items():
            torch.testing.assert_close(t, saved[f"{name}.{key}"], rtol=0, atol=0)
    resumed.unload()
    assert not getattr(resumed, "_hf_peft_config_loaded", False)
