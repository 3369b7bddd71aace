"""torch.compile of a converted HF causal LM (molora_ops.integrations.hf_transformers): a forward
with labels, through the aux-loss hooks (routings collected per layer, the aux loss reduced and
added to ``outputs.loss``), is ONE graph: no graph break in the MoE-LoRA layers, the aux losses or
the hooks (docs/DESIGN.md "The GPU hot path (rules)").

The unit traced is a function calling the model, as a compiled training step does: compiling the
module object itself runs its hooks outside the traced frame (torch.compile's OptimizedModule),
so ``explain(model)`` would count each hook as a separate graph."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from molora_ops.integrations.hf_transformers import MoLoRAConfig, apply_molora  # noqa: E402

CONFIGS = {
    "mixlora": dict(num_experts=4, top_k=2, rank=4, attention_rank=2),
    "mola": dict(num_experts=4, top_k=2, rank=4),
}  # the other methods' layers and aux losses: test_modules_compile.py (a tiny Llama costs ~15 s)


@pytest.fixture(autouse=True)
def _reset_dynamo(dynamo_reset):
    yield


def _model(name, **overrides):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).float()
    model = apply_molora(model, MoLoRAConfig(name, **{**CONFIGS[name], **overrides})).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA init leaves B = 0: make every adapter contribute
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding: the aux losses read the mask
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_with_labels_has_no_graph_break(name):
    model = _model(name)
    ids, mask, labels = _batch()

    def step(input_ids, attention_mask, labels):
        return model(input_ids, attention_mask=attention_mask, labels=labels)

    explained = torch._dynamo.explain(step)(ids, mask, labels)
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


@pytest.mark.slow  # ~35 s on two cores: a forward + backward compile of the whole model
def test_training_step_compiles_fullgraph_and_matches_eager():
    """Loss (task + aux), aux loss and adapter / router gradients of the compiled step equal
    eager; the detached aux loss for logging is set by both."""
    from molora_ops.integrations.hf_transformers import molora_aux_loss

    model = _model("mixlora", dropout=0.0)  # no dropout: eager and compiled draw differently
    ids, mask, labels = _batch()

    def step(input_ids, attention_mask, labels):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return out.loss, out.aux_loss

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss, aux = fn(ids, mask, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), aux.detach(), molora_aux_loss(model), grads

    eager = run(step)
    compiled = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled[:3], eager[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled[3].keys() == eager[3].keys() and any("router" in n for n in eager[3])
    for n in eager[3]:
        torch.testing.assert_close(compiled[3][n], eager[3][n], rtol=1e-4, atol=1e-6, msg=n)
