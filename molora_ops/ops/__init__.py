"""Typed wrappers of every ``torch.ops.molora`` op (shapes and dtypes in each docstring and in
docs/OPS.md). Importing this package registers the fake kernels and autograd formulas."""

from .dispatch import combine_rows, dispatch, gather_rows, pair_dot
from .masked import (id_histogram, rank_scatter, rank_sparse_expand, rank_sparse_shrink,
                     rank_sparse_weight_grad, rank_topk)
from .router import (sigmoid_topk, sigmoid_topk_backward, softmax_route_backward, softmax_topk,
                     softmax_topp, topk_softmax)
from .sgmv import (sgmv_expand, sgmv_shrink, sgmv_weight_grad, stacked_gated_lora,
                   stacked_gated_lora_backward, uniform_rank_offsets)

FORWARD_OPS = (
    "softmax_topk", "topk_softmax", "sigmoid_topk", "softmax_topp",
    "dispatch", "gather_rows", "combine_rows",
    "sgmv_shrink", "sgmv_expand", "stacked_gated_lora",
    "rank_topk", "rank_sparse_shrink", "rank_sparse_expand", "id_histogram",
)
BACKWARD_OPS = (
    "softmax_route_backward", "sigmoid_topk_backward", "pair_dot", "sgmv_weight_grad",
    "stacked_gated_lora_backward", "rank_scatter", "rank_sparse_weight_grad",
)
ALL_OPS = FORWARD_OPS + BACKWARD_OPS

__all__ = list(ALL_OPS) + ["uniform_rank_offsets", "FORWARD_OPS", "BACKWARD_OPS", "ALL_OPS"]
