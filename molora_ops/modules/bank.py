"""The expert bank: E LoRA adapters of one linear layer stored as one stacked bank.

``A [R, d_in]`` holds expert e's ``lora_A.weight`` in rows ``rank_offsets[e]:rank_offsets[e+1]``
and ``B [d_out, R]`` its ``lora_B.weight`` in the same columns (ragged ranks need no padding),
``scales [E]`` the per-expert LoRA scaling (alpha / r_e, or alpha / sqrt(r_e) with rsLoRA).
Every method of ``molora_ops.modules`` computes its adapters through one of the bank's four data
paths, each a fixed composition of the fused ops:

* ``routed``: sparse top-k routing (weights / ids [T, k]): ``functional.moe_lora_linear`` (grouped
  dispatch -> sgmv_shrink -> sgmv_expand, or the dense / fused forms where they are cheaper).
* ``routed_per_slot``: the same, but returns the un-combined per-(token, slot) outputs [T, k, d_out]
  (MoELoRA's contrastive loss, the MoE-FFN's hidden pairs).
* ``dense``: soft gates over all experts (gate [T, E]): stacked_gated_lora (shared-A for HydraLoRA).
* ``per_expert``: every expert's output [T, E, d_out] (MoLE-Wu's output-conditioned gate).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .. import ops
from ..functional import moe_lora_linear

__all__ = ["LoRABank", "Dispatched", "lora_scaling"]


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); 0 for r == 0."""
    if rank <= 0:
        return 0.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class Dispatched:
    """Dispatch metadata of one routing (ids [T, k]) reused by every bank that consumes it.

    The MoE-FFN routes once and runs three banks (gate, up, down) on the same layout, so the
    histogram + scan + scatter is done once.
    """

    __slots__ = ("ids", "order", "pos", "expert_offsets", "num_experts")

    def __init__(self, ids: torch.Tensor, num_experts: int):
        self.ids = ids
        self.num_experts = num_experts
        self.order, self.pos, self.expert_offsets = ops.dispatch(ids, num_experts, 1)

    @property
    def pair_pos(self) -> torch.Tensor:
        """``pos`` viewed as T*k single-slot "tokens": row of pair p = t*k + j, shape [T*k, 1].

        With it, ``sgmv_expand`` writes one row per pair instead of summing a token's slots (the
        pair index p is exactly what ``order`` stores, so the layout is shared unchanged)."""
        return self.pos.reshape(-1, 1)


class LoRABank(nn.Module):
    """E LoRA experts of a ``d_in -> d_out`` linear layer, stacked (the ops' bank layout).

    Args:
        in_features, out_features: d_in, d_out.
        ranks: one rank for every expert (int, with ``num_experts``) or one rank per expert
            (ragged, FlexMoRE); a rank may be 0 (that expert adds nothing).
        num_experts: E (required when ``ranks`` is an int).
        alpha: LoRA alpha; ``scales[e] = alpha / r_e`` (``alpha / sqrt(r_e)`` if ``rslora``).
            Pass ``scales`` to set them directly (X-LoRA / MeteoRA per-adapter scalings).
        shared_a: HydraLoRA: one ``A [r, d_in]`` shared by every expert (all ranks equal).
        init: ``"lora"`` (PEFT default: A kaiming-uniform(a=sqrt(5)), B zeros, so the adapter
            starts at 0) or ``"gaussian"`` (A ~ N(0, 1/r), B kaiming too: a non-zero adapter, for
            tests and for banks loaded from pre-trained adapters).
        dtype, device: of the parameters.

    Parameters / buffers: ``A`` [R, d_in] (shared: [r, d_in]), ``B`` [d_out, R],
    ``rank_offsets`` [E+1] int32, ``scales`` [E] fp32 (constant, saved in the state dict).
    """

    def __init__(self, in_features: int, out_features: int, ranks: Union[int, Sequence[int]],
                 num_experts: Optional[int] = None, alpha: float = 1.0, *, rslora: bool = False,
                 scales: Optional[Sequence[float]] = None, shared_a: bool = False,
                 init: str = "lora", dtype=None, device=None):
        super().__init__()
        if isinstance(ranks, int):
            if num_experts is None or num_experts < 1:
                raise ValueError(f"LoRABank: num_experts must be >= 1 with an int rank, got "
                                 f"{num_experts}")
            ranks = [ranks] * num_experts
        ranks = [int(r) for r in ranks]
        if num_experts is not None and len(ranks) != num_experts:
            raise ValueError(f"LoRABank: {len(ranks)} ranks given for {num_experts} experts")
        if not ranks or min(ranks) < 0:
            raise ValueError(f"LoRABank: ranks must be a non-empty list of ints >= 0, got {ranks}")
        if shared_a and len(set(ranks)) != 1:
            raise ValueError(f"LoRABank: shared_a needs equal ranks, got {ranks}")
        if init not in ("lora", "gaussian"):
            raise ValueError(f"LoRABank: init must be 'lora' or 'gaussian', got {init!r}")
        self.in_features, self.out_features = in_features, out_features
        self.ranks = ranks
        self.shared_a = shared_a
        self.alpha, self.rslora = alpha, rslora
        E, R = len(ranks), sum(ranks)
        factory = dict(dtype=dtype, device=device)
        self.A = nn.Parameter(torch.empty(ranks[0] if shared_a else R, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, R, **factory))
        if scales is None:
            scales = [lora_scaling(alpha, r, rslora) for r in ranks]
        if len(scales) != E:
            raise ValueError(f"LoRABank: {len(scales)} scales given for {E} experts")
        # Host copies of the constant buffers: reset_parameters rebuilds the buffers from them
        # (after ``to_empty`` a buffer holds whatever the new memory held).
        self._scales_init = [float(v) for v in scales]
        self.register_buffer("rank_offsets", torch.empty(E + 1, dtype=torch.int32,
                                                         device=device))
        self.register_buffer("scales", torch.empty(E, dtype=torch.float32, device=device))
        self.init = init
        # Optional replacement of A's init (FlyLoRA's frozen sparse A), called as fn(A): kept on
        # the bank so any reset order (parents before children or after) gives the same A.
        self.a_init_fn: Optional[Callable[[torch.Tensor], None]] = None
        self.reset_parameters()

    # -- shapes ---------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    def extra_repr(self) -> str:
        ranks = self.ranks[0] if len(set(self.ranks)) == 1 else self.ranks
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, ranks={ranks}, alpha={self.alpha}"
                + (", shared_a=True" if self.shared_a else ""))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialises ``A`` / ``B`` and rebuilds the constant buffers ``rank_offsets`` /
        ``scales`` from the constructor's ranks and scalings (meta-device init: build under
        ``torch.device("meta")``, ``to_empty(device=...)``, then reset)."""
        offsets = torch.tensor([0] + self.ranks, dtype=torch.int64).cumsum(0)
        self.rank_offsets.copy_(offsets.to(torch.int32))
        self.scales.copy_(torch.tensor(self._scales_init, dtype=torch.float32))
        if self.a_init_fn is not None:
            self.a_init_fn(self.A)
        else:  # PEFT's nn.Linear-style init per expert (fan-in = d_in for A, r_e for B).
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if self.init == "lora":
            nn.init.zeros_(self.B)
            return
        for e in range(self.num_experts):
            _, B_e = self.expert(e)
            if B_e.shape[1]:
                nn.init.kaiming_uniform_(B_e, a=math.sqrt(5))

    def expert(self, e: int):
        """Views ``(A_e [r_e, d_in], B_e [d_out, r_e])`` of expert e (PEFT's lora_A / lora_B)."""
        r0, r1 = self.ranks_slice(e)
        A_e = self.A if self.shared_a else self.A[r0:r1]
        return A_e, self.B[:, r0:r1]

    def ranks_slice(self, e: int):
        r0 = sum(self.ranks[:e])
        return r0, r0 + self.ranks[e]

    @torch.no_grad()
    def load_expert(self, e: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scale: Optional[float] = None) -> None:
        """Copies a PEFT adapter's ``lora_A.weight`` [r_e, d_in] / ``lora_B.weight`` [d_out, r_e]
        into expert e (and its scaling, if given)."""
        A_e, B_e = self.expert(e)
        if tuple(lora_A.shape) != tuple(A_e.shape) or tuple(lora_B.shape) != tuple(B_e.shape):
            raise ValueError(f"LoRABank.load_expert: expert {e} takes A {tuple(A_e.shape)} and B "
                             f"{tuple(B_e.shape)}, got {tuple(lora_A.shape)} and "
                             f"{tuple(lora_B.shape)}")
        A_e.copy_(lora_A)
        B_e.copy_(lora_B)
        if scale is not None:
            self.scales[e] = scale

    def delta_weight(self, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_e gate_e s_e B_e A_e`` [d_out, d_in] (gate [E], default 1): the merged update."""
        g = self.scales if gate is None else gate.to(self.scales.dtype) * self.scales
        # output_size: the total rank is known on the host; without it the op reads the repeats.
        per_rank = torch.repeat_interleave(g, torch.tensor(self.ranks, device=g.device),
                                           output_size=self.total_rank)
        A = self.A.repeat(self.num_experts, 1) if self.shared_a else self.A
        return (self.B * per_rank.to(self.B.dtype)) @ A

    # -- data paths -----------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"LoRABank: x must have shape [T, {self.in_features}], got "
                             f"{tuple(x.shape)}")

    def routed(self, x: torch.Tensor, weights: Optional[torch.Tensor],
               route: Union[torch.Tensor, Dispatched], base: Optional[torch.Tensor] = None,
               x_by_pair: bool = False, algo: str = "auto") -> torch.Tensor:
        """``y[t] = base[t] + sum_j w[t,j] s_e B_e A_e x[t]`` over the experts ``e = ids[t, j]``,
        through ``molora_ops.functional.moe_lora_linear`` (``algo``: its formulation; "auto"
        picks grouped, dense or fused by the cost model for this device).

        Args:
            x: [T, d_in] (or [T*k, d_in] with ``x_by_pair``: pair p = t*k + j reads row p).
            weights: [T, k] routing weights or None (1). route: ids [T, k] int (-1 = none), or a
                ``Dispatched`` of them (its layout is reused: the grouped formulation).
            base: [T, d_out] or None.
        Returns: [T, d_out], x's dtype.
        """
        self._check_input(x)
        ids = route.ids if isinstance(route, Dispatched) else route
        dispatched = ((route.order, route.pos, route.expert_offsets)
                      if isinstance(route, Dispatched) else None)
        if x_by_pair:
            x = x.reshape(ids.shape[0], ids.shape[1], self.in_features)
        return moe_lora_linear(x, self._bank_a(), self.B, self.rank_offsets, weights, ids,
                               self.scales, base=base, algo=algo, max_rank=self.max_rank,
                               dispatched=dispatched, x_per_slot=x_by_pair)

    def routed_per_slot(self, x: torch.Tensor, route: Union[torch.Tensor, Dispatched],
                        base: Optional[torch.Tensor] = None,
                        x_by_pair: bool = False) -> torch.Tensor:
        """Un-combined ``y[t, j] = base[t, j] + s_e B_e A_e x[t]``, e = ids[t, j]: [T, k, d_out].

        base: [T, k, d_out] or None. Slots with id -1 hold base (or 0)."""
        self._check_input(x)
        d = route if isinstance(route, Dispatched) else Dispatched(route, self.num_experts)
        T, k = d.pos.shape
        pos_in = d.pair_pos if x_by_pair else d.pos
        h = ops.sgmv_shrink(x, self._bank_a(), self.rank_offsets, d.order, pos_in,
                            d.expert_offsets, None, None, max_rank=self.max_rank)
        base2 = None if base is None else base.reshape(T * k, self.out_features)
        y = ops.sgmv_expand(h, self.B, self.rank_offsets, d.order, d.pair_pos, d.expert_offsets,
                            None, self.scales, base2)
        return y.reshape(T, k, self.out_features)

    def dense(self, x: torch.Tensor, gate: torch.Tensor,
              base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``y[t] = base[t] + sum_e gate[t, e] s_e B_e A_e x[t]`` (gate [T, E]): [T, d_out]."""
        self._check_input(x)
        return ops.stacked_gated_lora(x, self.A, self.B, gate, self.rank_offsets, self.scales,
                                      base, self.shared_a)

    def per_expert(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's ``s_e B_e A_e x[t]``: [T, E, d_out].

        Routes every token to every expert (ids = arange(E), k = E) through the grouped ops."""
        self._check_input(x)
        ids = torch.arange(self.num_experts, device=x.device, dtype=torch.int32)
        return self.routed_per_slot(x, ids.expand(x.shape[0], -1))

    def _bank_a(self) -> torch.Tensor:
        # The grouped ops read expert rows of a stacked A; a shared A is the same rows E times.
        return self.A.repeat(self.num_experts, 1) if self.shared_a else self.A
