"""The MixLoRA fine-tuning example (molora_ops/examples/mixlora_finetune.py): it trains (the loss
falls), only the adapters and routers move, the aux loss is sane, and a freshly converted model
computes exactly the frozen base model."""

import copy
import math

import pytest
import torch

from molora_ops.examples import mixlora_finetune as ex
from molora_ops.modules import LoRALinear, MixLoRA

# small enough for a few seconds on 2 cores, large enough that 40 steps clearly learn
SMALL = dict(n_layers=2, pairs=12, batch_size=16, num_experts=4)


@pytest.fixture(scope="module")
def run():
    return ex.main(steps=40, seed=0, quiet=True, **SMALL)


def test_loss_falls(run):
    losses = run["losses"]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 1.0, (first, last)
    assert run["final_loss"] < run["initial_loss"]
    assert set(run["accuracy"]) == set(ex.TASKS)


def test_aux_loss_finite_and_positive(run):
    aux = run["aux_losses"]
    assert all(math.isfinite(a) and a > 0 for a in aux)
    # Mixtral load balance x 0.01 per layer: about 0.01 * k per layer when balanced (k = 2)
    n_layers = run["config"].n_layers
    assert 0.005 * n_layers < aux[-1] < 0.1 * n_layers
    share = run["expert_share"]
    assert share.shape == (n_layers, SMALL["num_experts"])
    torch.testing.assert_close(share.sum(1), torch.ones(n_layers))


def test_only_adapters_and_routers_train(run):
    model, cfg = run["model"], run["config"]
    torch.manual_seed(0)                       # main() builds the base model under this seed
    base = ex.TinyLlama(cfg)
    base_state = base.state_dict()
    trained = model.state_dict()
    n_adapter = 0
    for name, p in model.named_parameters():
        is_adapter = ".bank." in name or "_lora." in name or ".router." in name
        assert p.requires_grad == is_adapter, name
        if is_adapter:
            n_adapter += 1
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert n_adapter > 0
    # every frozen weight is bit-identical to the freshly built base model's
    for name, w in base_state.items():
        new = name.replace("_proj.weight", "_proj.base.weight") if ".self_attn." in name else name
        assert torch.equal(trained[new], w), name
    # and the adapters moved: some LoRA B is no longer zero
    assert any(m.down_lora.B.abs().max() > 0 for m in run["moe_layers"])
    assert run["trainable_params"] < run["total_params"]


def test_fresh_conversion_equals_base_model():
    cfg = ex.Config(**SMALL)
    torch.manual_seed(1)
    base = ex.TinyLlama(cfg).eval()
    model = copy.deepcopy(base)
    moe_layers = ex.convert_to_mixlora(model, num_experts=cfg.num_experts)
    model.eval()
    assert len(moe_layers) == cfg.n_layers and all(isinstance(m, MixLoRA) for m in moe_layers)
    for block in model.layers:
        assert isinstance(block.mlp, MixLoRA)
        assert all(isinstance(getattr(block.self_attn, n), LoRALinear)
                   for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gen = torch.Generator().manual_seed(2)
    tokens, _ = ex.make_batch(cfg, 4, torch.randperm(cfg.num_data, generator=gen), gen)
    with torch.no_grad():
        want = base(tokens)
        routings = []
        got = model(tokens, routings)
    # LoRA init: every B is 0, so each expert is the base FFN and the top-k weights sum to 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(routings) == cfg.n_layers
    for r in routings:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(r.weights.shape[0]))
