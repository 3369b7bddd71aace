"""The transformers / PEFT workflows of issue 16 on tiny random Llamas (CPU, fp32):

* a real ``transformers.Trainer``: every ``checkpoint-N`` and ``save_model`` hold the adapters and
  our config only, ``resume_from_checkpoint`` continues exactly the uninterrupted run,
  ``load_molora`` reads a checkpoint folder, ``from_pretrained`` on it raises;
* the PEFT-shaped API, each against PEFT itself where PEFT has the same call: config names,
  ``"all-linear"``, ``print_trainable_parameters``, ``merge_and_unload`` / ``unload``,
  ``disable_adapter``, export / import of the ``lora`` method in PEFT's format.
"""

import copy
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from molora_ops.integrations.hf_peft import export_peft_lora, import_peft_lora  # noqa: E402
from molora_ops.integrations.hf_transformers import (  # noqa: E402
    CONFIG_NAME, WEIGHTS_NAME, MoLoRAConfig, MoLoRALayer, apply_molora, disable_adapter,
    get_nb_trainable_parameters, load_molora, merge_and_unload, merge_molora, molora_aux_loss,
    print_trainable_parameters, unload, unmerge_molora)

from test_integration_transformers import (  # noqa: E402
    METHOD_CONFIGS, batch, config, molora_layers, randomize_adapters, tiny_model)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


# --- Trainer ------------------------------------------------------------------------------------


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8, S=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 128, (n, S), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i],
                "attention_mask": torch.ones_like(self.ids[i])}


def _trainer(model, out, steps=3):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=1, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1000, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_Data())


def _converted(method):
    model = tiny_model()
    torch.manual_seed(5)
    return apply_molora(model, config(method, **({} if method == "lora_soups" else
                                                 {"dropout": 0.0}))).train()


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".molora." in k
            and not any(k.endswith(s) for s in ("base.weight", "base.bias", "proj.weight",
                                                 "proj.bias"))}


@pytest.mark.parametrize("method", ["mixlora", "smora"])
def test_trainer_checkpoints_are_adapter_only_and_resume_exactly(tmp_path, method):
    """mixlora: routers + aux loss; smora: its selection-bias buffer changes every step."""
    model = _converted(method)
    init = _adapter_state(model)
    _trainer(model, tmp_path / "run").train()
    trained = _adapter_state(model)
    assert any(not torch.equal(init[k], trained[k]) for k in init)   # it did train

    adapter_keys = {f"{n}.{k}" for n, m in molora_layers(model).items()
                    for k in m.adapter_state_dict()}
    for step in (1, 2, 3):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert {CONFIG_NAME, WEIGHTS_NAME} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "config.json",
                            "adapter_model.safetensors"}
        assert set(load_file(str(ckpt / WEIGHTS_NAME))) == adapter_keys   # no base tensor
    final = tmp_path / "final"
    transformers.Trainer.save_model(_trainer(model, tmp_path / "unused"), str(final))
    assert set(load_file(str(final / WEIGHTS_NAME))) == adapter_keys
    adapter_bytes = sum(t.numel() * t.element_size() for m in molora_layers(model).values()
                        for t in m.adapter_state_dict().values())
    assert os.path.getsize(final / WEIGHTS_NAME) < adapter_bytes + 32 * 1024   # + the header

    # resume: a fresh converted model continues from step 2 to the same step-3 adapters
    resumed = _converted(method)
    _trainer(resumed, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" /
                                                                         "checkpoint-2"))
    after = _adapter_state(resumed)
    for k in trained:
        torch.testing.assert_close(after[k], trained[k], rtol=0, atol=0)

    # load_molora reads a checkpoint folder
    ids, mask, _ = batch()
    loaded = load_molora(tiny_model(), str(tmp_path / "run" / "checkpoint-3")).eval()
    model.eval()
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), rtol=0,
                               atol=0)

    # from_pretrained on an adapter checkpoint never random-initialises a base
    for kw in ({}, {"config": model.config}):
        with pytest.raises(Exception):
            transformers.LlamaForCausalLM.from_pretrained(str(final), **kw)


def test_load_molora_refuses_a_meta_base(tmp_path):
    model = _converted("lora")
    model.save_pretrained(str(tmp_path))
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(ValueError, match="meta device"):
        load_molora(meta, str(tmp_path))
    assert not molora_layers(meta)


def test_save_pretrained_is_adapter_only_and_unload_restores_it(tmp_path):
    model = _converted("lora")
    model.save_pretrained(str(tmp_path / "a"))
    assert set(os.listdir(tmp_path / "a")) == {CONFIG_NAME, WEIGHTS_NAME,
                                               "model.safetensors.index.json"}
    unload(model)
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(str(tmp_path / "b"))       # the base class's full save again
    assert "model.safetensors" in os.listdir(tmp_path / "b")


def test_converted_model_pickles_and_deep_copies():
    """The PEFT-shaped calls bound on the instance follow the model through torch.save / load
    and deepcopy (bound to the copy, not to the original)."""
    import io
    ids, mask, labels = batch()
    model = apply_molora(tiny_model(), config("mixlora"))
    randomize_adapters(model)
    model.eval()
    want = logits(model, ids, mask)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        torch.testing.assert_close(logits(other, ids, mask), want, rtol=0, atol=0)
        assert other.save_pretrained.args[0] is other
        with other.disable_adapter():
            torch.testing.assert_close(logits(other, ids, mask), logits(tiny_model(), ids, mask),
                                       rtol=0, atol=0)
        assert not any(m._disabled for m in molora_layers(model).values())
        assert other(ids, attention_mask=mask, labels=labels).aux_loss is not None


# --- PEFT-shaped config -------------------------------------------------------------------------


def test_peft_config_names():
    c = MoLoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj"],
                     task_type="CAUSAL_LM", bias="none")
    assert (c.method, c.rank, c.alpha, c.dropout) == ("lora", 8, 16, 0.05)
    assert (c.r, c.lora_alpha, c.lora_dropout) == (None, None, None)
    assert MoLoRAConfig.from_dict(c.to_dict()) == c
    assert MoLoRAConfig("mixlora", r=4, lora_alpha=8, num_experts=2).rank == 4
    assert MoLoRAConfig(r=4, rank=4).rank == 4
    with pytest.raises(ValueError, match="r=4 and rank=8"):
        MoLoRAConfig(r=4, rank=8)
    with pytest.raises(ValueError, match="task_type"):
        MoLoRAConfig(r=4, task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="bias"):
        MoLoRAConfig(r=4, bias="all")
    with pytest.raises(TypeError, match="all-linear"):
        MoLoRAConfig(target_modules="q_proj")
    assert MoLoRAConfig(task_type=peft.TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"
    c = MoLoRAConfig("smora", target_modules="all-linear")
    assert MoLoRAConfig.from_dict(c.to_dict()).target_modules == "all-linear"


def _peft_model(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **kw))


def _peft_targets(pm):
    return {n[len("base_model.model."):] for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("method", ["lora", "hydralora", "mixlora"])
def test_all_linear_matches_peft(method):
    pm = _peft_model(tiny_model(), r=4, target_modules="all-linear")
    want = _peft_targets(pm)
    assert "lm_head" not in want and len(want) == 14
    ours = set(molora_layers(apply_molora(tiny_model(), config(method, target_modules=
                                                                 "all-linear"))))
    if method == "mixlora":     # the MLP is one MoE-FFN; the other linears get plain LoRA
        want = {n for n in want if ".mlp." not in n} | {"model.layers.0.mlp",
                                                        "model.layers.1.mlp"}
    assert ours == want


def test_print_trainable_parameters_matches_peft(capsys):
    _peft_model(tiny_model(), r=4, lora_alpha=8, target_modules="all-linear") \
        .print_trainable_parameters()
    want = capsys.readouterr().out
    model = apply_molora(tiny_model(), MoLoRAConfig(r=4, lora_alpha=8,
                                                    target_modules="all-linear"))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == want
    print_trainable_parameters(model)
    assert capsys.readouterr().out == want
    trainable, total = get_nb_trainable_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


# --- merge_and_unload / unload / disable_adapter ------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "lora_soups"])
def test_merge_and_unload(method):
    ids, mask, _ = batch()
    model = apply_molora(tiny_model(), config(method))
    randomize_adapters(model)
    model.eval()
    want = logits(model, ids, mask)
    out = model.merge_and_unload()
    assert out is model and not molora_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not hasattr(model, "molora_config") and "save_pretrained" not in model.__dict__
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(tiny_model(), ids, mask), want, atol=1e-3)
    apply_molora(model, config(method))          # convertible again


def test_merge_and_unload_routed_raises_before_any_change():
    ids, mask, _ = batch()
    model = apply_molora(tiny_model(), config("mixlora"))
    randomize_adapters(model)
    model.eval()
    want = logits(model, ids, mask)
    with pytest.raises(ValueError, match="routed"):
        merge_and_unload(model)
    assert not any(m.merged for m in molora_layers(model).values())
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_unload_and_disable_adapter_give_the_base_model(method):
    ids, mask, labels = batch()
    base = tiny_model()
    originals = {n: m for n, m in tiny_model().named_modules()}   # same seed: same names
    want = logits(base, ids, mask)
    model = apply_molora(tiny_model(), config(method))
    randomize_adapters(model)
    model.eval()
    adapted = logits(model, ids, mask)
    assert not torch.allclose(adapted, want, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids, mask), want, rtol=0, atol=0)
        out = model(ids, attention_mask=mask, labels=labels)
        assert getattr(out, "aux_loss", None) is None and molora_aux_loss(model) is None
    torch.testing.assert_close(logits(model, ids, mask), adapted, rtol=0, atol=0)
    if method in ("lora", "lora_soups"):
        merge_molora(model)
        with pytest.raises(ValueError, match="unmerge"):
            with disable_adapter(model):
                pass
        unmerge_molora(model)
    else:
        merge_molora(model, skip_routed=True)
    unload(model)
    assert not molora_layers(model)
    assert {n for n, _ in model.named_modules()} == set(originals)
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=1e-6, atol=1e-6)


# --- PEFT's format for the lora method ----------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_export_to_peft_roundtrip(tmp_path, rslora):
    ids, mask, _ = batch()
    model = apply_molora(tiny_model(), MoLoRAConfig(
        r=4, lora_alpha=8, target_modules="all-linear",
        method_kwargs={"rslora": True} if rslora else {}))
    randomize_adapters(model)
    model.eval()
    export_peft_lora(model, str(tmp_path))
    assert set(os.listdir(tmp_path)) == {"adapter_config.json", "adapter_model.safetensors"}
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path)).eval()
    assert _peft_targets(pm) == set(molora_layers(model))
    ours = logits(model, ids, mask)
    assert not torch.allclose(ours, logits(tiny_model(), ids, mask), atol=1e-3)
    torch.testing.assert_close(logits(pm, ids, mask), ours, rtol=0, atol=1e-6)
    # and back: our import of our export
    back = import_peft_lora(tiny_model(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(back, ids, mask), ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj",
                                                                          "down_proj"]),
                                dict(r=3, lora_alpha=5, use_rslora=True, lora_dropout=0.1,
                                     target_modules="all-linear")])
def test_import_peft_saved_adapter(tmp_path, kw):
    ids, mask, _ = batch()
    pm = _peft_model(tiny_model(), init_lora_weights=False, **kw).eval()
    pm.save_pretrained(str(tmp_path))
    want = logits(pm, ids, mask)
    assert not torch.allclose(want, logits(tiny_model(), ids, mask), atol=1e-3)
    model = import_peft_lora(tiny_model(), str(tmp_path)).eval()
    assert model.molora_config.method == "lora"
    assert set(molora_layers(model)) == _peft_targets(pm)
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=0, atol=1e-6)


def test_peft_format_errors_before_any_change(tmp_path):
    with pytest.raises(ValueError, match="only the 'lora' method"):
        export_peft_lora(apply_molora(tiny_model(), config("lora_soups")), str(tmp_path / "x"))
    model = apply_molora(tiny_model(), config("lora"))
    merge_molora(model)
    with pytest.raises(ValueError, match="unmerge"):
        export_peft_lora(model, str(tmp_path / "y"))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
    # an adapter on layer 0 only: apply_molora would adapt both layers
    pm = _peft_model(tiny_model(), r=4, target_modules=["q_proj"], layers_to_transform=[0])
    pm.save_pretrained(str(tmp_path / "l0"))
    fresh = tiny_model()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        import_peft_lora(fresh, str(tmp_path / "l0"))
    assert not molora_layers(fresh) and not hasattr(fresh, "molora_config")
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in fresh.parameters())
    assert isinstance(fresh.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert not isinstance(fresh.model.layers[0].self_attn.q_proj, MoLoRALayer)


# --- the docs' examples run as written ----------------------------------------------------------

_ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _code_block(path, heading):
    with open(os.path.join(_ROOT, path)) as f:
        text = f.read()
    section = text.split(heading + "\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("path, heading", [
    ("README.md", "### PEFT: expert banks from saved LoRA adapters, and a fused X-LoRA"),
    ("docs/INTEGRATIONS.md", "## PEFT: expert banks from saved LoRA adapters, and a fused X-LoRA"),
    ("docs/INTEGRATIONS.md", "### PEFT-shaped API"),
    ("docs/MODULES.md", "## Meta-device init (FSDP2, accelerate)"),
])
def test_doc_example_runs(tmp_path, monkeypatch, path, heading):
    code = _code_block(path, heading)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, path, "exec"), {"__name__": "doc_example"})
