"""torch.library.opcheck (schema, autograd registration, fake tensor, aot_dispatch_dynamic) for all
21 ops of torch.ops.molora, on small samples that include a ragged one (empty expert, ragged /
rank-0 ranks, -1 ids) per op. Forward ops with gradients get requires_grad inputs."""
import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import ALL_OPS, BACKWARD_OPS, op_samples as samples, require_ext_enabled

pytestmark = pytest.mark.needs_ext


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
