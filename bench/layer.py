"""The MoE-LoRA linear layer, through the ops and as the baselines users have today.

    y = x W0^T + sum_{j<k} w_j s_e B_e A_e x,   (w, e) = top-k of softmax(x Wg^T + bg)

with W0 [d_out, d_in] frozen, the router Wg [E, d_in] (+ a constant bias bg [E] that sets the
routing skew of a benchmark case), and expert e's LoRA factors A_e = A[e*r:(e+1)*r] ([R, d_in]
bank) and B_e = B[:, e*r:(e+1)*r] ([d_out, R] bank). Every implementation takes the same
``LayerArgs``; all compute the logits with the same matmul, so they route identically.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F


class LayerArgs(NamedTuple):
    x: torch.Tensor           # [T, d_in]
    W0: torch.Tensor          # [d_out, d_in], frozen
    Wg: torch.Tensor          # [E, d_in]
    bg: torch.Tensor          # [E], constant
    A: torch.Tensor           # [E*r, d_in]
    B: torch.Tensor           # [d_out, E*r]
    rank_offsets: torch.Tensor  # [E+1] int32, arange(E+1) * r
    scales: torch.Tensor      # [E] fp32
    k: int
    r: int


def moe_lora_layer(ops, a: LayerArgs, algo: str = "auto") -> torch.Tensor:
    """Through an ops namespace (molora_ops, molora_ops.reference, ...): the routed entry
    ``routed_moe_lora_linear`` (the gate, softmax_topk, then the one MoE-LoRA linear entry
    ``moe_lora_linear``, formulation ``algo``) on the frozen weight."""
    return ops.routed_moe_lora_linear(a.x, a.Wg, a.A, a.B, a.rank_offsets, a.k, a.scales,
                                      router_bias=a.bg, weight=a.W0, algo=algo, max_rank=a.r)[0]


def auto_algo(a: LayerArgs, backward: bool) -> str:
    """The formulation ``algo="auto"`` runs for this layer (molora_ops.plan's cost model)."""
    import molora_ops
    return molora_ops.functional.pick_algo(a.x, a.A, a.B, a.Wg.shape[0], a.k, a.r,
                                           backward=backward)


def torch_router(a: LayerArgs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weights [T,k] fp32, ids [T,k] int64): softmax in fp32, top-k, renormalised. The top-k is
    a stable descending sort of the logits (ties to the lower id, as the ops do): torch.topk's
    tie order is unspecified, and bf16 logits tie often enough to route some tokens differently."""
    logits = F.linear(a.x, a.Wg, a.bg).float()
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :a.k]
    weights = torch.softmax(logits, dim=-1).gather(-1, ids)
    return weights / weights.sum(-1, keepdim=True), ids


def base_linear(a: LayerArgs) -> torch.Tensor:
    """The frozen layer alone: what the model costs without any adapter."""
    return F.linear(a.x, a.W0)


def per_expert_loop(a: LayerArgs) -> torch.Tensor:
    """PEFT / MoE-PEFT style (MixLoRA's ``_mixlora_forward``): for each expert, find its tokens,
    run its LoRA on them and ``index_add_`` the weighted result into the output."""
    weights, ids = torch_router(a)
    y = base_linear(a)
    r = a.r
    for e in range(a.Wg.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        delta = F.linear(F.linear(a.x[tok], a.A[e * r:(e + 1) * r]), a.B[:, e * r:(e + 1) * r])
        coef = weights[tok, slot, None] * a.scales[e]
        y.index_add_(0, tok, (delta * coef).to(y.dtype))
    return y


class _Sorted(NamedTuple):
    """The routed pairs sorted by expert (stable), for the torch composites."""

    expert: torch.Tensor  # [P] expert of each sorted pair
    counts: torch.Tensor  # [E] pairs per expert
    tok: torch.Tensor     # [P] token of each sorted pair
    coef: torch.Tensor    # [P] fp32 routing weight * s_e


def _sorted_pairs(a: LayerArgs) -> _Sorted:
    weights, ids = torch_router(a)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    coef = weights.reshape(-1)[order] * a.scales[expert]
    return _Sorted(expert, torch.bincount(flat, minlength=a.Wg.shape[0]), order // a.k, coef)


def _banks(a: LayerArgs) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stacked banks as per-expert batches: A^T [E, d_in, r], B^T [E, r, d_out] (views)."""
    E, r = a.Wg.shape[0], a.r
    return (a.A.view(E, r, a.x.shape[1]).transpose(1, 2),
            a.B.view(a.W0.shape[0], E, r).permute(1, 2, 0))


def padded_bmm(a: LayerArgs) -> torch.Tensor:
    """Torch composite: gather tokens into a zero-padded [E, capacity, d_in] batch (capacity = the
    busiest expert's count; one host sync), two ``torch.bmm`` over all experts, weighted scatter."""
    s = _sorted_pairs(a)
    A_t, B_t = _banks(a)
    starts = torch.cumsum(s.counts, 0) - s.counts
    slot = torch.arange(s.tok.numel(), device=s.tok.device) - starts[s.expert]
    xp = a.x.new_zeros(A_t.shape[0], int(s.counts.max()), A_t.shape[1])
    xp[s.expert, slot] = a.x[s.tok]
    yp = torch.bmm(torch.bmm(xp, A_t), B_t)  # [E, cap, r] -> [E, cap, d_out]
    rows = yp[s.expert, slot] * s.coef[:, None]
    return base_linear(a).index_add(0, s.tok, rows.to(a.x.dtype))


def grouped_mm(a: LayerArgs) -> torch.Tensor:
    """Torch composite on ``torch._grouped_mm``: tokens sorted by expert, one grouped GEMM per
    factor over the ragged groups (offsets = cumulative counts), weighted scatter."""
    s = _sorted_pairs(a)
    A_t, B_t = _banks(a)
    offs = torch.cumsum(s.counts, 0).to(torch.int32)
    h = torch._grouped_mm(a.x[s.tok], A_t, offs=offs)
    ys = torch._grouped_mm(h, B_t, offs=offs)
    return base_linear(a).index_add(0, s.tok, (ys * s.coef[:, None]).to(a.x.dtype))


_GROUPED_MM: dict = {}


def grouped_mm_support(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when ``torch._grouped_mm`` exists and runs forward + backward for this device and
    dtype (a tiny probe, cached), else why not."""
    key = (device.type, device.index, dtype)
    if key not in _GROUPED_MM:
        if not hasattr(torch, "_grouped_mm"):
            _GROUPED_MM[key] = f"torch {torch.__version__} has no torch._grouped_mm"
        else:
            try:
                a = torch.randn(32, 16, device=device, dtype=dtype, requires_grad=True)
                b = torch.randn(2, 16, 16, device=device, dtype=dtype).requires_grad_()
                offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
                y = torch._grouped_mm(a, b.transpose(1, 2), offs=offs)
                torch.autograd.grad(y, (a, b), torch.randn_like(y))
                _GROUPED_MM[key] = None
            except Exception as exc:  # unsupported device / dtype / architecture
                _GROUPED_MM[key] = f"torch._grouped_mm unsupported here: {exc}".splitlines()[0]
    return _GROUPED_MM[key]
