"""Pure-PyTorch reference implementations of every op in docs/OPS.md.

They are the test oracle (forwards differentiable with plain autograd w.r.t. the inputs the contract
lists as having a gradient) and the fallback implementation when the native extension is missing.
"""

from .dispatch import combine_rows, dispatch, gather_rows, pair_dot
from .masked import (
    id_histogram,
    rank_scatter,
    rank_sparse_expand,
    rank_sparse_shrink,
    rank_sparse_weight_grad,
    rank_topk,
)
from .router import (
    sigmoid_topk,
    sigmoid_topk_backward,
    softmax_route_backward,
    softmax_topk,
    softmax_topp,
    topk_softmax,
)
from .sgmv import (
    sgmv_expand,
    sgmv_shrink,
    sgmv_weight_grad,
    stacked_gated_lora,
    stacked_gated_lora_backward,
)

__all__ = [
    # router
    "softmax_topk",
    "topk_softmax",
    "sigmoid_topk",
    "softmax_topp",
    "softmax_route_backward",
    "sigmoid_topk_backward",
    # dispatch
    "dispatch",
    "gather_rows",
    "combine_rows",
    "pair_dot",
    # sgmv
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_weight_grad",
    "stacked_gated_lora",
    "stacked_gated_lora_backward",
    # masked
    "rank_topk",
    "rank_sparse_shrink",
    "rank_sparse_expand",
    "id_histogram",
    "rank_scatter",
    "rank_sparse_weight_grad",
]
