"""Multi-tenant serving (molora_ops.serving): one batch, one adapter per row, mixed methods.

The reference of every row is the request run ALONE through a model built by ``load_molora``
(or ``apply_molora``) with that one adapter; the adapters are saved with random non-zero B's and
decisive routers, so every expert contributes. Tiny random Llama, CPU, fp32.
"""


import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from host_reads import count_host_reads  # noqa: E402
from molora_ops import _checks  # noqa: E402
from molora_ops.integrations.hf_transformers import (MoLoRAConfig, MoLoRALayer,  # noqa: E402
                                                     apply_molora, load_molora, save_molora)
from molora_ops.modules import (FlexMoRE, HydraLoRA, LoRALinear, LoRAMoE,  # noqa: E402
                                LoRASoupsCAT, MeteoRA, MoELoRA, MoLA)
from molora_ops.serving import (MultiAdapterModel, MultiTenantFFN,  # noqa: E402
                                MultiTenantLinear, _BankSite, _linear_entry, _where_local)

VOCAB = 128
TOL = 1e-5

# plain LoRA and MoE-LoRA mixed: different ranks, expert counts, k and methods
ADAPTERS = {
    "lora": dict(method="lora", rank=4, alpha=8.0),
    "lora_r2": dict(method="lora", rank=2, alpha=3.0, target_modules=["q_proj", "v_proj"]),
    "mola": dict(method="mola", top_k=2, rank=4, alpha=12.0),
    "mixlora": dict(method="mixlora", num_experts=4, top_k=2, rank=4, alpha=8.0,
                    attention_rank=2),
    "mixlora_k3": dict(method="mixlora", num_experts=6, top_k=3, rank=2, alpha=6.0,
                       target_modules=["q_proj", "o_proj"]),
    "loramoe": dict(method="loramoe", num_experts=3, rank=4, alpha=6.0),
    "hydralora": dict(method="hydralora", num_experts=3, rank=4, alpha=4.0),
    "lora_soups": dict(method="lora_soups", num_experts=2, rank=4, alpha=10.0),
}


def tiny_model(seed=0):
    """A random 2-layer Llama, hidden 64, d_ff 172, vocab 128, fp32, eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).float().eval()


@torch.no_grad()
def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, MoLoRALayer):
            for name, p in m.molora.named_parameters():
                if name.endswith("B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                elif name.startswith("router"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                elif name == "gating.alpha":
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def converted(name, seed):
    cfg = dict(ADAPTERS[name])
    return randomize(apply_molora(tiny_model(), MoLoRAConfig(**cfg)), seed).eval()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, name in enumerate(ADAPTERS):
        dirs[name] = str(root / name)
        save_molora(converted(name, 100 + i), dirs[name])
    return dirs


@pytest.fixture(scope="module")
def served(adapter_dirs):
    model = MultiAdapterModel(tiny_model())
    for name, d in adapter_dirs.items():
        model.add_adapter(name, d)
    return model.eval()


def alone(adapter_dirs, name):
    """The reference: the base model with this one adapter, as load_molora builds it."""
    if name is None:
        return tiny_model()
    return load_molora(tiny_model(), adapter_dirs[name]).eval()


def batch(B, S, seed=0, pad=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b, p in (pad or {}).items():
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


# --- equality with each request alone ----------------------------------------------------------


def test_mixed_prefill_equals_each_request_alone(served, adapter_dirs):
    # every adapter, a repeated one, the base model; rows in an order unlike the load order
    names = ["mixlora_k3", None, "lora", "mola", "mixlora", "loramoe", "lora_soups",
             "hydralora", "lora_r2", "mola", "__base__"]
    ids, mask = batch(len(names), 9, seed=1, pad={0: 3, 4: 2})
    with torch.no_grad():
        got = served(ids, attention_mask=mask, adapter_names=names).logits
        for b, name in enumerate(names):
            ref = alone(adapter_dirs, None if name == "__base__" else name)
            want = ref(ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
            keep = mask[b].bool()
            err = (got[b][keep] - want[keep]).abs().max().item()
            assert err <= TOL, (name, err)
            # the adapter changes this row (the test can fail)
            if name not in (None, "__base__"):
                base = tiny_model()(ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
                assert (want[keep] - base[keep]).abs().max() > 1e-3, name


def test_generate_with_kv_cache_equals_each_request_alone(served, adapter_dirs):
    names = ["mixlora", "mola", "lora", None, "mixlora_k3", "loramoe"]
    ids, mask = batch(len(names), 6, seed=2, pad={1: 2, 3: 1})
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)
    with torch.no_grad():
        out = served.generate(ids, attention_mask=mask, adapter_names=names, **gen)
        for b, name in enumerate(names):
            ref = alone(adapter_dirs, name).generate(ids[b:b + 1], attention_mask=mask[b:b + 1],
                                                     **gen)
            assert torch.equal(out.sequences[b], ref.sequences[0]), name
            for step, (lg, lw) in enumerate(zip(out.logits, ref.logits)):
                err = (lg[b] - lw[0]).abs().max().item()
                assert err <= TOL, (name, step, err)


def test_adapter_names_none_runs_the_base_model(served):
    ids, mask = batch(3, 5, seed=3)
    with torch.no_grad():
        want = tiny_model()(ids, attention_mask=mask).logits
        assert (served(ids, attention_mask=mask).logits - want).abs().max() <= TOL
        got = served(ids, attention_mask=mask, adapter_names=[None, "__base__", None]).logits
        assert (got - want).abs().max() <= TOL


def test_bf16_model_and_adapters():
    """A bf16 base with bf16 adapters: each row within bf16 rounding of the request alone."""
    srcs = {n: randomize(apply_molora(tiny_model().bfloat16(), MoLoRAConfig(**ADAPTERS[n])),
                         20 + i).eval() for i, n in enumerate(["lora", "mola", "mixlora"])}
    model = MultiAdapterModel(tiny_model().bfloat16())
    for n, m in srcs.items():
        model.add_adapter(n, m)
    ids, mask = batch(3, 6, seed=8)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, adapter_names=list(srcs)).logits
        assert got.dtype == torch.bfloat16
        base = tiny_model().bfloat16()(ids, attention_mask=mask).logits.float()
        for b, m in enumerate(srcs.values()):
            want = m(ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0].float()
            err = (got[b].float() - want).abs().max()
            assert err <= 2 ** -5 * want.abs().max()
            assert err <= 0.25 * (want - base[b]).abs().max()     # far below the adapter's effect


def test_qwen2_attention_biases(tmp_path):
    """Qwen2 (q/k/v biases): the multi-tenant linears keep the base bias once per row."""
    def qwen():
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, attn_implementation="eager")
        return transformers.Qwen2ForCausalLM(cfg).float().eval()

    names = ["lora", "mola", "mixlora"]
    for i, n in enumerate(names):
        save_molora(randomize(apply_molora(qwen(), MoLoRAConfig(**ADAPTERS[n])), 30 + i),
                    str(tmp_path / n))
    model = MultiAdapterModel(qwen())
    for n in names:
        model.add_adapter(n, str(tmp_path / n))
    rows = names + [None]
    ids, mask = batch(len(rows), 6, seed=9, pad={0: 2})
    with torch.no_grad():
        got = model(ids, attention_mask=mask, adapter_names=rows).logits
        for b, n in enumerate(rows):
            ref = qwen() if n is None else load_molora(qwen(), str(tmp_path / n)).eval()
            want = ref(ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
            keep = mask[b].bool()
            assert (got[b][keep] - want[keep]).abs().max() <= TOL, n


def test_source_model_equals_source_directory(adapter_dirs):
    """add_adapter takes a converted model as well as a save_molora directory."""
    model = MultiAdapterModel(tiny_model())
    model.add_adapter("mola", converted("mola", 102))          # seed of "mola" in adapter_dirs
    model.add_adapter("mola_dir", adapter_dirs["mola"])
    ids, mask = batch(2, 7, seed=4)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, adapter_names=["mola", "mola"]).logits
        b = model(ids, attention_mask=mask, adapter_names=["mola_dir", "mola_dir"]).logits
    assert (a - b).abs().max() <= TOL


def test_one_dispatch_per_module_whatever_the_number_of_adapters(served, monkeypatch):
    """The pairs of every adapter of the batch go through one dispatch per adapted module: a
    MultiTenantLinear 1, a MultiTenantFFN 2 (gate+up bank, down bank); the count does not grow
    with the number of distinct adapters in the batch."""
    import molora_ops.ops as ops_mod
    calls = []
    real = ops_mod.dispatch

    def counting(ids, num_experts, block_size=1):
        calls.append(num_experts)
        return real(ids, num_experts, block_size)

    monkeypatch.setattr(ops_mod, "dispatch", counting)
    ids, mask = batch(8, 5, seed=7)
    counts = {}
    for rows in (["mola"] * 8,
                 ["mixlora_k3", "lora", "mola", "mixlora", "loramoe", "lora_soups",
                  "hydralora", "lora_r2"]):
        calls.clear()
        with torch.no_grad():
            served(ids, attention_mask=mask, adapter_names=rows)
        counts[len(set(rows))] = list(calls)
    n_linear = sum(isinstance(m, MultiTenantLinear) and m.site.bank is not None
                   for m in served.modules())
    n_ffn = sum(isinstance(m, MultiTenantFFN) for m in served.modules())
    assert len(counts[8]) == len(counts[1]) == n_linear + 2 * n_ffn
    assert counts[8] == counts[1]          # same banks: all adapters' experts, one layout each


# --- adding and removing adapters -------------------------------------------------------------


def test_add_and_remove_keep_the_modules(adapter_dirs):
    model = MultiAdapterModel(tiny_model())
    modules_before = {n: id(m) for n, m in model.named_modules()
                      if isinstance(m, (MultiTenantLinear, MultiTenantFFN))}
    assert modules_before
    q = model.model.model.layers[0].self_attn.q_proj
    ffn = model.model.model.layers[0].mlp
    ids, mask = batch(3, 6, seed=5)
    names = ["lora", "mixlora", "mola"]

    def run(rows):
        with torch.no_grad():
            return model(ids, attention_mask=mask, adapter_names=rows).logits

    model.add_adapter("lora", adapter_dirs["lora"])
    assert q.site.total_experts == 1 and ffn.gate_site.total_experts == 1
    model.add_adapter("mixlora", adapter_dirs["mixlora"])
    assert q.site.total_experts == 2 and ffn.gate_site.total_experts == 1 + 4
    model.add_adapter("mola", adapter_dirs["mola"])
    E_mola = load_molora(tiny_model(), adapter_dirs["mola"]).model.layers[0].self_attn \
        .q_proj.molora.num_experts
    assert q.site.total_experts == 2 + E_mola
    full = run(names)
    model.remove_adapter("mixlora")                       # the bank shrinks, the others stay
    assert q.site.total_experts == 1 + E_mola and ffn.gate_site.total_experts == 1 + E_mola
    assert model.adapter_names == ("lora", "mola")
    after = run(["lora", None, "mola"])
    assert (after[[0, 2]] - full[[0, 2]]).abs().max() <= TOL
    with pytest.raises(ValueError, match="unknown adapter 'mixlora'"):
        run(names)
    model.add_adapter("mixlora", adapter_dirs["mixlora"])   # back, in a new slot
    assert (run(names) - full).abs().max() <= TOL
    modules_after = {n: id(m) for n, m in model.named_modules()
                     if isinstance(m, (MultiTenantLinear, MultiTenantFFN))}
    assert modules_after == modules_before
    with pytest.raises(ValueError, match="already loaded"):
        model.add_adapter("lora", adapter_dirs["lora"])
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.remove_adapter("nope")


# --- what cannot be served exactly is rejected at load time -----------------------------------


def _banks(model):
    return {n: (None if s.bank is None else s.bank.num_experts)
            for n, m in model.named_modules() if isinstance(m, MultiTenantLinear)
            for s in [m.site]}


@pytest.mark.parametrize("cfg,match", [
    (dict(method="smora", rank=8, top_k=2), "SMoRA.*rank-wise"),
    (dict(method="mixlora", num_experts=4, top_k=2, rank=4,
          method_kwargs={"routing": "dynamic"}), "routing='dynamic'"),
    (dict(method="mixlora", num_experts=4, top_k=2, rank=4,
          method_kwargs={"routing": "switch"}), "routing='switch'"),
])
def test_unsupported_methods_rejected_before_any_change(adapter_dirs, tmp_path, cfg, match):
    model = MultiAdapterModel(tiny_model())
    model.add_adapter("lora", adapter_dirs["lora"])
    before = _banks(model)
    src = apply_molora(tiny_model(), MoLoRAConfig(**cfg))
    with pytest.raises(ValueError, match=match):
        model.add_adapter("bad", src)
    save_molora(src, str(tmp_path))
    with pytest.raises(ValueError, match=match):
        model.add_adapter("bad", str(tmp_path))
    assert model.adapter_names == ("lora",) and _banks(model) == before


def test_load_and_call_errors(adapter_dirs, tmp_path):
    model = MultiAdapterModel(tiny_model())
    model.add_adapter("lora", adapter_dirs["lora"])
    # another bank dtype than the loaded adapters
    src = converted("mola", 7).double()
    with pytest.raises(ValueError, match="share one dtype"):
        model.add_adapter("mola64", src)
    assert model.adapter_names == ("lora",)
    # a merged source
    from molora_ops.integrations.hf_transformers import merge_molora
    with pytest.raises(ValueError, match="merged"):
        model.add_adapter("m", merge_molora(converted("lora", 3)))
    # a model with other shapes
    other = apply_molora(tiny_model(), MoLoRAConfig("lora", rank=2))
    other_small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    save_molora(apply_molora(other_small, MoLoRAConfig("lora", rank=2)), str(tmp_path))
    with pytest.raises(ValueError, match="here but"):
        model.add_adapter("small", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        model.add_adapter("missing", str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="source must be"):
        model.add_adapter("x", 3)
    with pytest.raises(ValueError, match="name must be"):
        model.add_adapter("__base__", other)
    with pytest.raises(ValueError, match="not one converted by apply_molora"):
        MultiAdapterModel(other)
    ids, mask = batch(2, 4)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model(ids, adapter_names=["lora", "nope"])
    with pytest.raises(TypeError, match="one name per batch row"):
        model(ids, adapter_names="lora")
    with pytest.raises(ValueError, match="3 adapter names but the module input has shape"):
        model(ids, adapter_names=["lora", "lora", None])
    assert model._state.rows is None                      # the failed call left no state


# --- one bank site against each module alone (the linear methods not in apply_molora) ---------


def _gaussian(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("B"):
                p.normal_(0, 0.1)
            elif name.startswith("router"):
                p.normal_(0, 0.5)
    return m.eval()


def test_bank_site_equals_each_method_alone():
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    methods = {
        "lora": LoRALinear(base, 3, 6.0),
        "mola": MoLA(base, 5, k=2, r=4),
        "flexmore": FlexMoRE(base, [1, 3, 6], k=2),               # ragged ranks
        "meteora": MeteoRA(base, 4, k=2, r=2, temperature=0.7),   # top-k -> softmax
        "moelora": MoELoRA(base, 6, k=3, r=2),
        "loramoe": LoRAMoE(base, 3, r=4),                        # dense softmax
        "hydra": HydraLoRA(base, 3, r=4),                        # shared A
        "soups": LoRASoupsCAT(base, [2, 5]),                     # static weights
    }
    site = _BankSite(24, 20)
    for name, m in methods.items():
        site.entries[name] = _linear_entry(name, _gaussian(m))
    with torch.no_grad():
        methods["soups"].gating.alpha.copy_(torch.tensor([0.7, 1.3]))
        site.entries["soups"] = _linear_entry("soups", methods["soups"])
    registry = list(methods)[::-1] + ["absent"]
    site.rebuild(registry, "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(-1, len(registry), (64,), generator=g)
    x = torch.randn(64, 24, generator=g)
    with torch.no_grad():
        ids, w = site.route(x, _where_local(site.slot_map, tokens))
        y = site.bank.routed(x, w, ids, base(x))
        for a, name in enumerate(registry):
            rows = tokens == a
            want = base(x[rows]) if name == "absent" else methods[name](x[rows])
            assert (y[rows] - want).abs().max() <= TOL, name
        assert (y[tokens == -1] - base(x[tokens == -1])).abs().max() <= TOL


# --- sync-free forward --------------------------------------------------------------------------


def test_forward_reads_no_tensor_data_on_the_host(served):
    names = ["mixlora", "mola", "lora", None, "mixlora_k3", "hydralora", "lora_soups"]
    ids, mask = batch(len(names), 5, seed=6)
    with torch.no_grad(), _checks.use_value_checks("device"):
        served(ids, attention_mask=mask, adapter_names=names)        # warm
        with count_host_reads() as reads:
            served(ids, attention_mask=mask, adapter_names=names)
    ours = reads.under("molora_ops/serving.py", "molora_ops/modules/", "molora_ops/ops/")
    assert not ours, reads.report(ours)


# --- docs: the runnable example and the bench row ----------------------------------------------


def test_multi_tenant_example_runs(tmp_path, capsys):
    from molora_ops.examples import multi_tenant_serving
    result = multi_tenant_serving.main(str(tmp_path))
    assert result["max_abs_diff"] <= TOL
    assert "equal to each request alone" in capsys.readouterr().out


def test_bench_serving_table(capsys):
    bench_serving = pytest.importorskip("bench.serving")
    rows = bench_serving.run(adapter_counts=(1, 4), batch=4, seq=4, hidden=32, layers=1,
                             repeats=1, warmup=0)
    assert [r["adapters"] for r in rows] == [1, 4]
    for r in rows:
        assert r["max_abs_diff_vs_peft"] <= TOL and r["molora_ms"] > 0 and r["peft_ms"] > 0
    assert "adapters" in capsys.readouterr().out
