"""The module forwards, backwards and aux losses read no tensor data on the host (docs/DESIGN.md
"The GPU hot path (rules)": no host synchronisation on the CUDA path, aux losses included).

Each case runs a training step (forward, the method's aux loss, backward) on small CPU inputs
under ``use_value_checks("device")`` (value checks as device-side asserts, as on CUDA) inside
``count_host_reads()``, and asserts that no read happened in ``molora_ops/modules`` or
``molora_ops/integrations``. Reads in the op layer (``molora_ops/ops``, ``reference``,
``triton``, ``backend``, ``_checks``) are printed (``pytest -s``) and asserted on only with
``ASSERT_OPS = True``. Reads made by torch itself on behalf of our code (a Python function of
torch that reads) are attributed to our calling line, so they count.
"""
import pytest
import torch
from torch import nn

from host_reads import count_host_reads
from molora_ops import _checks
from molora_ops.modules import methods as M
from molora_ops.modules import losses, sequence, xlora

# Assert on the op layer's reads too (not only modules / integrations).
ASSERT_OPS = True

OURS = ("molora_ops/modules/", "molora_ops/integrations/")
OP_API = ("molora_ops/ops/",)  # the ops' public wrappers: what a module calls an op through
ALL = ("molora_ops/",)

D, D_FF, B, S = 16, 24, 2, 5


def _lin(a, b, bias=False):
    return nn.Linear(a, b, bias=bias)


def _mask():
    m = torch.ones(B, S, dtype=torch.long)
    m[0, :2] = 0  # left padding
    return m


def _x():
    return torch.randn(B, S, D, requires_grad=True)


def _gaussian_b(module):
    """LoRA init leaves B = 0: make the adapter path carry gradient everywhere."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("B") and p.requires_grad:
                p.normal_(0, 0.1)
    return module


def _weighted_sum(y):
    return (y * torch.linspace(0.5, 1.5, y.numel()).reshape(y.shape)).sum()


# --- one training step per method: build() outside the counted block, step(module) inside ------

def _routed(aux=lambda m, r: m.aux_loss(r)):
    def step(m):
        y, r = m(_X[0], return_routing=True)
        return _weighted_sum(y) + aux(m, r)
    return step


def _moelora_step(m):
    y, r, o = m(_X[0], return_routing=True, return_expert_outputs=True)
    return _weighted_sum(y) + m.aux_loss(r, o, attention_mask=_MASK[0])


def _remix_step(m):
    y, r = m(_X[0], return_routing=True)
    return _weighted_sum(y) - m.gating.log_prob(r.logits, r.ids).mean()


def _xlora_step(m):
    s = torch.softmax(torch.randn(B, S, m.num_experts), -1).requires_grad_()
    return _weighted_sum(m(_X[0], s))


def _milora_build():
    bases = {n: _lin(D, D) for n in ("q_proj", "v_proj", "o_proj")}
    return _gaussian_b(sequence.MiLoRAAdapters(D, bases, k=2, r=4, alpha=8.0, dropout=0.1))


def _milora_step(m):
    m.route(_X[0], _MASK[0])
    return sum(_weighted_sum(m[n](_X[0])) for n in ("q_proj", "v_proj", "o_proj"))


def _poly_step(m):
    return _weighted_sum(m(_X[0], torch.tensor([0, 2])))


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = xlora.XLoRALinear(_lin(D, D), [2, 3, 4], 8.0, init="gaussian", top_k_lora=2,
                                   enable_softmax_topk=True)
        self.b = xlora.XLoRALinear(_lin(D, D), 3, 8.0, num_adapters=3, init="gaussian")

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _xlora_model_build():
    clf = xlora.XLoRAClassifier(D, 3, 2, depth=2, hidden=8)
    return xlora.XLoRAModel(_Stack(), clf)


def _xlora_model_step(m):
    return _weighted_sum(m(_X[0]))


def _ffn(cls, **kw):
    return lambda: cls(_lin(D, D_FF), _lin(D, D_FF), _lin(D_FF, D), init="gaussian", **kw)


_X, _MASK = [None], [None]  # the current case's inputs (made before the counted block)

CASES = {
    "MoLA": (lambda: M.MoLA(_lin(D, D), 4, init="gaussian"), _routed()),
    "MixLoRA": (_ffn(M.MixLoRA, num_experts=4, r=4),
                _routed(lambda m, r: m.aux_loss(r, attention_mask=_MASK[0]))),
    "MixLoRA-dynamic": (_ffn(M.MixLoRA, num_experts=4, r=4, routing="dynamic"),
                        _routed(lambda m, r: m.aux_loss(r, attention_mask=_MASK[0]))),
    "MixLoRA-switch": (_ffn(M.MixLoRA, num_experts=4, r=4, routing="switch", expert_capacity=2,
                            ffn_dropout=0.1),
                       _routed(lambda m, r: m.aux_loss(r, attention_mask=_MASK[0]))),
    "LLaVAMoLE": (_ffn(M.LLaVAMoLE, r=4),
                  _routed(lambda m, r: m.aux_loss(r, (B, S), attention_mask=_MASK[0]))),
    "LLaVAMoLE-dense": (_ffn(M.LLaVAMoLE, r=4, dense=True),
                        _routed(lambda m, r: m.aux_loss(r, (B, S), attention_mask=_MASK[0]))),
    "LoRAMoE": (lambda: M.LoRAMoE(_lin(D, D), 4, init="gaussian", lbc_weight=0.1, lbc_alpha=0.1),
                _routed(lambda m, r: m.aux_loss(r, torch.tensor([0, 1]), (B, S), _MASK[0]))),
    "HydraLoRA": (lambda: M.HydraLoRA(_lin(D, D), init="gaussian"), _routed()),
    "DynMoLE": (lambda: M.DynMoLE(_lin(D, D), 4, r=4, init="gaussian"),
                _routed(lambda m, r: m.aux_loss(r, attention_mask=_MASK[0]))),
    "MeteoRA": (lambda: M.MeteoRA(_lin(D, D), 6, init="gaussian"),
                _routed(lambda m, r: m.aux_loss(
                    r, torch.tensor([[0, 1, -100, 5, 2], [3, -100, 4, 4, 0]]), (B, S)))),
    "FlexMoRE": (lambda: M.FlexMoRE(_lin(D, D), [1, 4, 0, 8], init="gaussian"), _routed()),
    "MoELoRA": (lambda: M.MoELoRA(_lin(D, D), 4, init="gaussian"), _moelora_step),
    "LoRAMixer": (lambda: M.LoRAMixer(_lin(D, D), init="gaussian"),
                  _routed(lambda m, r: m.aux_loss(r, attention_mask=_MASK[0]))),
    "ReMix": (lambda: M.ReMix(_lin(D, D), 4, init="gaussian"), _remix_step),
    "LoRASoupsCAT": (lambda: M.LoRASoupsCAT(_lin(D, D), [2, 4], init="gaussian"),
                     _routed(lambda m, r: 0)),
    "MoLE": (lambda: M.MoLE(_lin(D, D), [2, 4, 3], init="gaussian"), _routed()),
    "CoMoL": (lambda: _gaussian_b(M.CoMoL(_lin(D, D), 4, r=4)), _routed(lambda m, r: 0)),
    "CoMoL-top2": (lambda: _gaussian_b(M.CoMoL(_lin(D, D), 4, r=4, k=2)),
                   _routed(lambda m, r: 0)),
    "SMoRA": (lambda: M.SMoRA(_lin(D, D), r=16, k=4, init="gaussian", rank_partition=2),
              _routed(lambda m, r: 0)),
    "FlyLoRA": (lambda: _gaussian_b(M.FlyLoRA(_lin(D, D), r=16, k=4)), _routed(lambda m, r: 0)),
    "MoRA": (lambda: M.MoRA(_lin(D, D), r=8, k=2, init="gaussian"), _routed(lambda m, r: 0)),
    "XLoRALinear-topk-softmax": (
        lambda: xlora.XLoRALinear(_lin(D, D), [2, 4, 3], 8.0, init="gaussian", top_k_lora=2,
                                  enable_softmax_topk=True, trainable_adapters=True),
        _xlora_step),
    "XLoRALinear-per-token": (
        lambda: xlora.XLoRALinear(_lin(D, D), 4, 8.0, num_adapters=3, init="gaussian",
                                  top_k_lora=2, enable_softmax_topk=True,
                                  per_token_softmax_topk=True, global_scaling_weight=0.5,
                                  trainable_adapters=True),
        _xlora_step),
    "XLoRAModel": (_xlora_model_build, _xlora_model_step),
    "MiLoRA": (_milora_build, _milora_step),
    "Poly-relaxed_bernoulli": (
        lambda: _gaussian_b(sequence.PolyLinear(_lin(D, D), 3, 4, 4, 8.0, n_splits=2,
                                                routing="relaxed_bernoulli")), _poly_step),
    "Poly-straight_through": (
        lambda: _gaussian_b(sequence.PolyLinear(_lin(D, D), 3, 4, 4, 8.0,
                                                routing="straight_through")), _poly_step),
}


def _check(reads, what):
    """Fails on a read made by module / integration code (at its own line or in a helper it calls
    directly, e.g. a check in molora_ops/_checks.py or molora_ops/reference/); a read inside an
    op (reached through molora_ops/ops/ or a torch.ops dispatch) is op-level."""
    ours = reads.made_by(OURS, boundaries=OP_API)
    ops_level = [r for r in reads.made_by(ALL) if r not in ours]
    if ops_level:
        print(f"\n[{what}] op-level " + reads.report(ops_level))
    bad = reads.made_by(ALL) if ASSERT_OPS else ours
    assert not bad, f"{what}: " + reads.report(bad)


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_step_reads_nothing_on_the_host(name):
    build, step = CASES[name]
    module = build().train()
    _X[0], _MASK[0] = _x(), _mask()
    with _checks.use_value_checks("device"):
        with count_host_reads() as reads:
            loss = step(module)
            loss.backward()
    _check(reads, name)
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert _X[0].grad is None or torch.isfinite(_X[0].grad).all()


def _loss_inputs():
    T, E, k = B * S, 6, 2
    probs = torch.softmax(torch.randn(T, E), -1).requires_grad_()
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    ids[1, 1] = -1
    return T, E, probs, ids


def test_every_aux_loss_reads_nothing_on_the_host():
    """Each function of modules.losses, straight (lists of layers, masks, dropped slots)."""
    T, E, probs, ids = _loss_inputs()
    logits = torch.randn(T, E, requires_grad=True)
    mask = _mask()
    p3 = probs.reshape(B, S, E)
    outs = torch.randn(T, 2, D, requires_grad=True)
    bias = torch.zeros(E)
    with _checks.use_value_checks("device"):
        with count_host_reads() as reads:
            total = (losses.mixtral_load_balancing_loss([probs, probs], [ids, ids], E, mask)
                     + losses.switch_load_balancing_loss(probs, ids[:, 0], E, mask)
                     + losses.router_z_loss([logits, logits], mask)
                     + losses.tsallis_entropy(probs).sum()
                     + losses.dynmole_loss(probs, probs * (probs > 0.2), attention_mask=mask)
                     + losses.mola_balance_loss([[probs, probs], [probs[:, :4]]],
                                                [[ids, ids], [ids.clamp_max(3)]])
                     + losses.mola_balance_loss_per_module([probs, probs[:, :4]],
                                                           [ids, ids.clamp_max(3)])
                     + losses.llava_mole_balance_loss([p3, p3], [ids[:, 0].reshape(B, S)] * 2,
                                                      mask)
                     + losses.loramoe_lbc_loss(p3, torch.tensor([1, 0]), 0.1, mask)
                     + losses.mole_gate_balance_loss(probs)
                     + losses.meteora_gate_loss([logits.reshape(B, S, E)] * 2,
                                                ids[:, 0].long().reshape(B, S).masked_fill(
                                                    mask == 0, -100))
                     + losses.moelora_contrastive_loss(outs, ids)
                     + losses.lora_mixer_rsl_loss(probs, ids, attention_mask=mask))
            total.backward()
            losses.aux_free_bias_update_(bias, ids, E, 1e-3)
            losses.expert_counts(ids, E)
    _check(reads, "losses")
    assert torch.isfinite(total) and torch.isfinite(probs.grad).all()


def test_the_counter_sees_the_host_checks():
    """Control: in the default mode a CPU eager loss checks its ids on the host (a read the
    counter must see, attributed to the check and reached from the loss)."""
    T, E, probs, ids = _loss_inputs()
    with _checks.use_value_checks("auto"):
        with count_host_reads() as reads:
            losses.mixtral_load_balancing_loss(probs, ids, E)
    assert reads.under("molora_ops/_checks.py"), reads.report()
    assert reads.made_by(OURS, OP_API), reads.report()  # the loss's own check, not an op's


def test_device_checks_still_fire():
    """The device-side form of a value check still rejects bad input (here: raised on CPU by
    torch._assert_async), with the exception class in its message."""
    T, E, probs, ids = _loss_inputs()
    with _checks.use_value_checks("device"):
        with pytest.raises(RuntimeError, match="IndexError"):
            losses.mixtral_load_balancing_loss(probs, ids.clone().fill_(E), E)
        with pytest.raises(RuntimeError, match="ValueError"):
            losses.loramoe_lbc_loss(probs.reshape(B, S, E), torch.tensor([0, 2]))
        with pytest.raises(RuntimeError, match="IndexError"):
            losses.meteora_gate_loss(probs.reshape(B, S, E), torch.full((B, S), E))
        with pytest.raises(RuntimeError, match="IndexError"):
            losses.moelora_contrastive_loss(torch.randn(T, 2, 3), ids.clone().fill_(-2))
        poly = sequence.PolyLinear(_lin(D, D), 3, 4, 4, 8.0)
        with pytest.raises(RuntimeError, match="n_tasks"):
            poly(torch.randn(2, S, D), torch.tensor([0, 3]))


# --- the HF integration: a converted tiny Llama, one training step -----------------------------

def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).float()


HF_CONFIGS = {
    "mixlora": dict(num_experts=4, top_k=2, rank=4, attention_rank=2),
    "mixlora-sum": dict(num_experts=4, top_k=2, rank=4, aux_loss_reduction="sum"),
    "mola": dict(num_experts=4, top_k=2, rank=4),
    "smora": dict(rank=16, top_k=4),
    "loramoe": dict(num_experts=3, rank=4),
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_training_step_reads_nothing_on_the_host(name):
    from molora_ops.integrations.hf_transformers import MoLoRAConfig, apply_molora

    model = apply_molora(_tiny_llama(), MoLoRAConfig(name.split("-")[0], **HF_CONFIGS[name]))
    model.train()
    _gaussian_b(model)
    ids = torch.randint(3, 64, (B, S))
    mask = _mask()
    labels = ids.masked_fill(mask == 0, -100)
    with _checks.use_value_checks("device"):
        with count_host_reads() as reads:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
    _check(reads, f"hf {name}")
    elsewhere = [r for r in reads if not r.made_by(ALL)]
    if elsewhere:
        print(f"\n[hf {name}] outside molora_ops (transformers / torch) " + reads.report(elsewhere))
    if name.startswith(("mixlora", "mola")):
        assert out.aux_loss.requires_grad
