"""Typed wrappers of every ``torch.ops.molora`` op (shapes and dtypes in each docstring and in
docs/OPS.md). Importing this package declares the ops (``_registry.define``: schema, fake kernel,
autograd, Python-served kernels); the op lists below are read from those declarations."""

# (imported in the order of the four families: the op lists follow it)
from ._registry import OPS
from .router import (sigmoid_topk, sigmoid_topk_backward, softmax_route_backward, softmax_topk,
                     softmax_topp, topk_softmax)
from .dispatch import combine_rows, dispatch, gather_rows, pair_dot  # noqa: I001
from .sgmv import (fused_moe_lora, routed_moe_lora, sgmv_expand, sgmv_expand_backward,
                   sgmv_shrink, sgmv_weight_grad, stacked_gated_lora, stacked_gated_lora_backward,
                   uniform_rank_offsets)
from .masked import (id_histogram, rank_scatter, rank_sparse_expand, rank_sparse_shrink,
                     rank_sparse_weight_grad, rank_topk)

FORWARD_OPS = tuple(name for name, op in OPS.items() if op.kind == "forward")
BACKWARD_OPS = tuple(name for name, op in OPS.items() if op.kind == "backward")
ALL_OPS = FORWARD_OPS + BACKWARD_OPS
PIPELINE_OPS = tuple(name for name, op in OPS.items() if op.kind == "pipeline")
TRITON_OPS = tuple(name for name, op in OPS.items() if op.triton is not None)

__all__ = list(ALL_OPS) + list(PIPELINE_OPS) + [
    "uniform_rank_offsets", "OPS", "FORWARD_OPS", "BACKWARD_OPS", "ALL_OPS", "PIPELINE_OPS",
    "TRITON_OPS"]
