"""torch.library.opcheck (schema, autograd registration, fake tensor, aot_dispatch_dynamic) for all
21 ops of torch.ops.molora, on small samples that include a ragged one (empty expert, ragged /
rank-0 ranks, -1 ids) per op. Forward ops with gradients get requires_grad inputs."""
import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import (ALL_OPS, BACKWARD_OPS, FORWARD_OPS, distinct_ids, drop_ids, make_ids,
                   max_rank_of, ragged_rank_offsets, require_ext_enabled, routing_weights,
                   tie_free_logits, uniform_rank_offsets)

pytestmark = pytest.mark.needs_ext


def rg(t):
    return t.detach().clone().requires_grad_(True)


def _routing(T=6, E=5, k=2, bs=2, kind="drop"):
    ids = make_ids(kind, T, E, k)
    order, pos, eo = ref.dispatch(ids, E, bs)
    return ids, order, pos, eo


def _ragged_bank(E=5, r=3):
    ro = ragged_rank_offsets(E, r, zeros=1)
    return ro, int(ro[-1]), max_rank_of(ro)


def samples(name):
    """List of (sample id, args, kwargs)."""
    T, E, k, d = 6, 5, 2, 4
    out = []
    if name == "softmax_topk":
        out.append(("basic", (rg(tie_free_logits(T, E)), k, True), {}))
        out.append(("plain-bf16", (rg(tie_free_logits(T, E, torch.bfloat16)), 3, False), {}))
        out.append(("T0-k=E", (rg(tie_free_logits(0, E)), E, True), {}))
    elif name == "topk_softmax":
        out.append(("basic", (rg(tie_free_logits(T, E)), k, 0.7), {}))
        out.append(("T0-k=E", (rg(tie_free_logits(0, E)), E, 1.0), {}))
    elif name == "sigmoid_topk":
        out.append(("nobias", (rg(tie_free_logits(T, E)), k, None, True, False, 1.0), {}))
        out.append(("bias-biw", (rg(tie_free_logits(T, E)), k, torch.rand(E) * 0.1, True, True, 2.0), {}))
        out.append(("T0", (rg(tie_free_logits(0, E)), k, torch.rand(E), False, False, 1.0), {}))
    elif name == "softmax_topp":
        out.append(("ragged", (rg(tie_free_logits(T, E, row_scale=(0.2, 2.0))), 0.55, 1, 1.0, 1.1, 1e-5), {}))
        out.append(("entropy", (rg(tie_free_logits(T, E, row_scale=(0.1, 2.0))), 0.55, 2, 0.8, 1.0, 1e-5), {}))
    elif name == "dispatch":
        ids = make_ids("exclude", T, E, k)
        ids[0, 1] = -1
        out.append(("drop-empty-bs1", (ids, E, 1), {}))
        out.append(("drop-empty-bs4", (ids, E, 4), {}))
        out.append(("int64", (make_ids("router", T, E, k).long(), E, 2), {}))
    elif name in ("gather_rows", "combine_rows"):
        ids, order, pos, eo = _routing()
        rows = T if name == "gather_rows" else order.numel()
        out.append(("weighted-drop", (rg(torch.randn(rows, d)), order, pos, rg(routing_weights(ids))), {}))
        out.append(("noweights", (rg(torch.randn(rows, d)), order, pos, None), {}))
    elif name == "sgmv_shrink":
        ids, order, pos, eo = _routing()
        ro, R, mr = _ragged_bank(E)
        out.append(("ragged", (rg(torch.randn(T, d)), rg(torch.randn(R, d)), ro, order, pos, eo,
                               rg(routing_weights(ids)), torch.rand(E) + 0.5), {"max_rank": mr + 1}))
        out.append(("plain", (rg(torch.randn(T, d)), rg(torch.randn(R, d)), ro, order, pos, eo, None, None),
                    {"max_rank": mr}))
    elif name == "sgmv_expand":
        ids, order, pos, eo = _routing()
        ro, R, mr = _ragged_bank(E)
        out.append(("ragged-base", (rg(torch.randn(order.numel(), mr)), rg(torch.randn(d, R)), ro, order, pos,
                                    eo, rg(routing_weights(ids)), torch.rand(E) + 0.5, rg(torch.randn(T, d))), {}))
        out.append(("plain", (rg(torch.randn(order.numel(), mr + 1)), rg(torch.randn(d, R)), ro, order, pos, eo,
                              None, None, None), {}))
    elif name == "stacked_gated_lora":
        ro, R, _ = _ragged_bank(E)
        out.append(("ragged-base", (rg(torch.randn(T, d)), rg(torch.randn(R, d)), rg(torch.randn(d, R)),
                                    rg(torch.randn(T, E)), ro, torch.rand(E) + 0.5, rg(torch.randn(T, d)), False), {}))
        ro_s = uniform_rank_offsets(E, 2)
        out.append(("shared-a", (rg(torch.randn(T, d)), rg(torch.randn(2, d)), rg(torch.randn(d, 2 * E)),
                                 rg(torch.randn(T, E)), ro_s, None, None, True), {}))
    elif name == "rank_topk":
        R = 9
        out.append(("scores-bias", (rg(torch.randn(T, R)), 3, tie_free_logits(T, R), torch.rand(R) * 0.01, False), {}))
        out.append(("abs", (rg(tie_free_logits(T, R)), 4, None, None, True), {}))
    elif name == "rank_sparse_shrink":
        R = 9
        ids = drop_ids(distinct_ids(T, R, 3), 0.4)
        out.append(("drop", (rg(torch.randn(T, d)), rg(torch.randn(R, d)), ids), {}))
    elif name == "rank_sparse_expand":
        R = 9
        ids = drop_ids(distinct_ids(T, R, 3), 0.4)
        out.append(("drop-w-base", (rg(torch.randn(T, 3)), ids, rg(torch.randn(d, R)), rg(torch.rand(T, 3)), 1.5,
                                    rg(torch.randn(T, d))), {}))
        out.append(("plain", (rg(torch.randn(T, 3)), ids, rg(torch.randn(d, R)), None, 1.0, None), {}))
    elif name == "id_histogram":
        ids = torch.randint(-1, 7, (T, 3), dtype=torch.int32)
        out.append(("drop", (ids, 7), {}))
        out.append(("3d-int64", (torch.randint(-1, 4, (2, 3, 4)), 4), {}))
    elif name == "softmax_route_backward":
        logits = tie_free_logits(T, E)
        w, ids = ref.softmax_topk(logits, k, True)
        out.append(("renorm", (torch.randn(T, k), w.detach(), ids, logits, True, 1.0), {}))
        w, ids = ref.softmax_topp(logits, 0.55)
        out.append(("topp-drop", (torch.randn(T, E), w.detach(), ids, logits, False, 1.0), {}))
    elif name == "sigmoid_topk_backward":
        logits, bias = tie_free_logits(T, E), torch.rand(E) * 0.1
        w, ids = ref.sigmoid_topk(logits, k, bias, True, True, 2.0)
        out.append(("bias", (torch.randn(T, k), w.detach(), ids, logits, bias, True, True, 2.0), {}))
        w, ids = ref.sigmoid_topk(logits, k, None, False, False, 1.0)
        out.append(("nobias", (torch.randn(T, k), w.detach(), ids, logits, None, False, False, 1.0), {}))
    elif name == "pair_dot":
        ids, order, pos, eo = _routing()
        out.append(("by-token-drop", (torch.randn(T, d), torch.randn(order.numel(), d), pos, True), {}))
        out.append(("by-row-drop", (torch.randn(order.numel(), d), torch.randn(order.numel(), d), pos, False), {}))
    elif name == "sgmv_weight_grad":
        ids, order, pos, eo = _routing()
        ro, R, mr = _ragged_bank(E)
        out.append(("ragged", (torch.randn(T, d), torch.randn(order.numel(), mr), ro, order, pos, eo,
                               routing_weights(ids), torch.rand(E) + 0.5, R), {}))
    elif name == "stacked_gated_lora_backward":
        ro, R, _ = _ragged_bank(E)
        out.append(("ragged", (torch.randn(T, d), torch.randn(T, d), torch.randn(R, d), torch.randn(d, R),
                               torch.randn(T, E), ro, torch.rand(E) + 0.5, False), {}))
        ro_s = uniform_rank_offsets(E, 2)
        out.append(("shared-a", (torch.randn(T, d), torch.randn(T, d), torch.randn(2, d), torch.randn(d, 2 * E),
                                 torch.randn(T, E), ro_s, None, True), {}))
    elif name == "rank_scatter":
        ids = drop_ids(distinct_ids(T, 9, 3), 0.4)
        out.append(("drop", (torch.randn(T, 3), ids, 9), {}))
    elif name == "rank_sparse_weight_grad":
        ids = drop_ids(distinct_ids(T, 9, 3), 0.4)
        out.append(("drop", (torch.randn(T, d), torch.randn(T, 3), ids, 9), {}))
    else:
        raise KeyError(name)
    return out


_N_SAMPLES = {"softmax_topk": 3, "topk_softmax": 2, "sigmoid_topk": 3, "softmax_topp": 2, "dispatch": 3,
              "gather_rows": 2, "combine_rows": 2, "sgmv_shrink": 2, "sgmv_expand": 2,
              "stacked_gated_lora": 2, "rank_topk": 2, "rank_sparse_shrink": 1, "rank_sparse_expand": 2,
              "id_histogram": 2, "softmax_route_backward": 2, "sigmoid_topk_backward": 2, "pair_dot": 2,
              "sgmv_weight_grad": 1, "stacked_gated_lora_backward": 2, "rank_scatter": 1,
              "rank_sparse_weight_grad": 1}
PARAMS = [(n, i) for n in ALL_OPS for i in range(_N_SAMPLES[n])]


def test_extension_loaded_and_all_ops_registered():
    if not molora_ops.has_extension():
        pytest.fail("extension not loaded") if require_ext_enabled() else pytest.skip("extension not loaded")
    assert len(ALL_OPS) == 21 and set(_N_SAMPLES) == set(ALL_OPS)
    for name in ALL_OPS:
        op = getattr(torch.ops.molora, name)
        assert hasattr(op, "default"), name
        assert callable(getattr(molora_ops, name)), name
        assert callable(getattr(ref, name)), name


@pytest.mark.parametrize("name,idx", PARAMS, ids=[f"{n}-{i}" for n, i in PARAMS])
def test_opcheck(name, idx):
    smp = samples(name)
    assert len(smp) == _N_SAMPLES[name]
    sid, args, kwargs = smp[idx]
    op = getattr(torch.ops.molora, name).default
    if name in BACKWARD_OPS or name in ("dispatch", "id_histogram"):
        assert not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    else:
        assert any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    torch.library.opcheck(op, args, kwargs)
