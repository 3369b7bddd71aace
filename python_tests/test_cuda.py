"""Every op on CUDA tensors vs the CPU reference, in float32 and bfloat16 (forward, and backward for
ops with gradients). Runs an op only when torch.ops.molora has a CUDA kernel for it (no silent
fallback to CPU: outputs must live on the GPU); otherwise skips with the reason."""
import pytest
import torch

import molora_ops
from utils import ALL_OPS, compare_with_reference, op_samples, torch_op

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

# positional args that carry the data dtype (cast to bf16); routing weights, gates, scales, biases and
# router gradients keep their (opmath) dtype
DATA_ARGS = {
    "softmax_topk": [0], "topk_softmax": [0], "sigmoid_topk": [0], "softmax_topp": [0],
    "dispatch": [], "id_histogram": [], "gather_rows": [0], "combine_rows": [0],
    "sgmv_shrink": [0, 1], "sgmv_expand": [0, 1, 8], "stacked_gated_lora": [0, 1, 2, 6],
    "rank_topk": [0], "rank_sparse_shrink": [0, 1], "rank_sparse_expand": [0, 2, 5],
    "softmax_route_backward": [3], "sigmoid_topk_backward": [3], "pair_dot": [0, 1],
    "sgmv_weight_grad": [0, 1], "sgmv_expand_backward": [0, 1, 2],
    "stacked_gated_lora_backward": [0, 1, 2, 3], "rank_scatter": [0],
    "rank_sparse_weight_grad": [0, 1], "fused_moe_lora": [0, 1, 2, 7],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_on_cuda(name, dtype):
    op = torch_op(name)
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"):
        pytest.skip(f"torch.ops.molora.{name} has no CUDA kernel yet")
    for sid, args, kwargs in op_samples(name):
        args = list(args)
        diff = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        if dtype != torch.float32:
            for i in DATA_ARGS[name]:
                if isinstance(args[i], torch.Tensor) and args[i].is_floating_point():
                    args[i] = args[i].detach().to(dtype).requires_grad_(args[i].requires_grad)
        compare_with_reference(name, args, kwargs, diff=diff, device="cuda")
        torch.cuda.synchronize()
