"""Sequence-level routing: one routing decision per sequence (or per task), not per token.

* MiLoRA (Zhang et al., arXiv 2410.18035): the LoRA modules of a transformer layer are the
  experts; a prompt-aware router picks them once per prompt and the choice is reused for every
  decode step. ``MiLoRARouter``, ``MiLoRALinear``, ``MiLoRAAdapters`` (the router + the modules
  of one layer).
* Poly / TensorPoly (Ponti et al. 2022, "Combining Modular Skills in Multitask Learning",
  arXiv 2202.13914; Su et al., arXiv 2405.16671): per-task weight-space merge of skill LoRAs.
  ``PolyLinear``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.transforms import SigmoidTransform

from .. import _checks, ops
from .bank import LoRABank, lora_scaling
from .layers import MoLoRALinear
from .routing import Router, Routing

__all__ = ["MiLoRARouter", "MiLoRALinear", "MiLoRAAdapters", "PolyLinear", "masked_mean"]


def masked_mean(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """Mean of ``hidden [B, S, d]`` over the positions where ``attention_mask [B, S]`` is nonzero
    (all positions when None): [B, d]. A row without any kept position pools to 0."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


# ------------------------------------------------------------------------------------------------
# MiLoRA
# ------------------------------------------------------------------------------------------------

class MiLoRARouter(nn.Module):
    """MiLoRA's prompt-aware router (Zhang et al., arXiv 2410.18035). [abstract: no public code;
    the router form, the pooling and the renormalisation are our reading, METHODS.md 2.9]

    For the M LoRA modules of one transformer layer (q, k, v, o, gate, up, down: M = 7) and the
    layer's input hidden states of the prompt ``H [B, S, d]`` with mask ``m [B, S]``::

        u [B, d]    = sum_s m_bs H_bs / sum_s m_bs           (masked mean over prompt tokens)
        z [B, M]    = u W_r^T                                W_r [M, d], fp32, no bias
        p           = softmax(z);  (w, idx) = top-k(p)       k of M modules per sequence
        w           <- w / sum(w)                            (``renormalize=True``, default)
        gates [B, M] = w scattered at idx, 0 elsewhere

    Routing is computed ONCE per sequence: ``route`` stores ``gates`` / ``selected`` / ``routing``
    and ``forward`` returns the cached gates in eval mode once they exist (decode steps, S = 1,
    reuse the prompt's routing; call ``reset()`` before a new batch of prompts). In training mode
    ``forward`` always re-routes (teacher-forced sequences are routed from their prompt mask).

    Args: hidden_size: d. num_modules: M. k: modules kept per sequence (1 <= k <= M; the paper's
        value is not public). renormalize: True (the kept weights sum to 1, as the other top-k
        LoRA-MoEs do). bias: False. init: ``Router`` init (``"kaiming"``: nn.Linear default).
    No reference code exists, so no quirk is reproduced; the router runs in fp32 like the
    others (``Router``).
    """

    def __init__(self, hidden_size: int, num_modules: int, k: int, renormalize: bool = True,
                 bias: bool = False, init: str = "kaiming", device=None):
        super().__init__()
        if not 1 <= k <= num_modules:
            raise ValueError(f"MiLoRARouter: k must be in [1, {num_modules}], got {k}")
        self.router = Router(hidden_size, num_modules, bias=bias, init=init, device=device)
        self.k, self.renormalize = k, renormalize
        self.gates: Optional[torch.Tensor] = None
        self.selected: Optional[torch.Tensor] = None
        self.routing: Optional[Routing] = None

    @property
    def num_modules(self) -> int:
        return self.router.num_experts

    def reset(self) -> None:
        """Forgets the cached routing (call before a new batch of prompts)."""
        self.gates = self.selected = self.routing = None

    def route(self, prompt_hidden: torch.Tensor,
              attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Routes the prompts ``[B, S, d]`` (mask [B, S]: 1 = prompt token) and caches the result:
        gates [B, M] fp32, dense with 0 for the unselected modules."""
        if prompt_hidden.dim() != 3:
            raise ValueError(f"MiLoRARouter: prompt_hidden must be [B, S, d], got "
                             f"{tuple(prompt_hidden.shape)}")
        logits = self.router(masked_mean(prompt_hidden, attention_mask))
        w, ids = ops.softmax_topk(logits, self.k, self.renormalize)
        self.routing = Routing(w, ids, logits, torch.softmax(logits, -1))
        self.gates = self.routing.to_dense(self.num_modules)
        self.selected = torch.zeros_like(self.gates, dtype=torch.bool).scatter(1, ids.long(), True)
        return self.gates

    def forward(self, hidden: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cached gates (eval, after the first call) or ``route(hidden, attention_mask)``."""
        if self.training or self.gates is None:
            return self.route(hidden, attention_mask)
        if self.gates.shape[0] != hidden.shape[0]:
            raise ValueError(f"MiLoRARouter: cached routing is for {self.gates.shape[0]} "
                             f"sequences, got {hidden.shape[0]}; call reset() for new prompts")
        return self.gates

    def extra_repr(self) -> str:
        return f"k={self.k}, renormalize={self.renormalize}"


class MiLoRALinear(MoLoRALinear):
    """One LoRA module of a MiLoRA layer (arXiv 2410.18035): its delta is scaled by the gate its
    sequence's router gave it. [abstract: no public code]

    With ``gate [B]`` (this module's column of ``MiLoRARouter.gates``) and x [B, S, d_in]::

        y[b, s] = W0 x[b, s] + gate_b (alpha / r) B A drop(x[b, s])        A [r, d_in], B [d_out, r]

    computed through the grouped ops of an E = 1 ``LoRABank``: per-token weight = the gate of the
    token's sequence, id 0 for tokens of sequences that selected the module and -1 otherwise,
    so the unselected sequences' tokens are dropped by ``dispatch`` and cost nothing in
    ``sgmv_shrink`` / ``sgmv_expand`` (multi-tenant serving: each module only runs the
    sequences that picked it).

    ``forward(x [B, S, d_in] or [B, d_in] (one decode step), gate [B] = None, selected [B] =
    None)``: gate None reads the router given at construction (``router.gates[:, index]``, the
    cached routing: a decode step reuses the prompt's routing); selected None = ``gate != 0``
    (or the router's selection). The router is referenced, not registered as a submodule (the
    layer owns it; see ``MiLoRAAdapters``).

    Args: base (frozen in place), r, alpha (scaling alpha / r), dropout, router, index (this
    module's column m), rslora, init (``"lora"``: B = 0; ``"gaussian"``: non-zero).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, *,
                 router: Optional[MiLoRARouter] = None, index: int = 0, rslora: bool = False,
                 init: str = "lora", dtype=None):
        bank = LoRABank(base.in_features, base.out_features, r, 1, alpha, rslora=rslora,
                        init=init, dtype=dtype or base.weight.dtype, device=base.weight.device)
        super().__init__(base, bank, None, None, dropout)
        self.__dict__["milora_router"] = router  # a reference, not a submodule
        self.index = index

    def _router_gate(self) -> Tuple[torch.Tensor, torch.Tensor]:
        router = self.__dict__["milora_router"]
        if router is None or router.gates is None:
            raise ValueError("MiLoRALinear: pass gate= or route the prompt first (the router has "
                             "no cached routing)")
        return router.gates[:, self.index], router.selected[:, self.index]

    def forward(self, x: torch.Tensor, gate: Optional[torch.Tensor] = None,
                selected: Optional[torch.Tensor] = None, return_routing: bool = False):
        if gate is None:
            gate, sel = self._router_gate()
            selected = sel if selected is None else selected
        if selected is None:
            selected = gate != 0
        if x.dim() not in (2, 3) or gate.shape != (x.shape[0],):
            raise ValueError(f"MiLoRALinear: x must be [B, S, d_in] or [B, d_in] with gate [B], "
                             f"got x {tuple(x.shape)} and gate {tuple(gate.shape)}")
        S = x.shape[1] if x.dim() == 3 else 1  # [B, d_in]: one decode step
        w = gate.reshape(-1, 1).expand(-1, S).reshape(-1, 1)
        ids = torch.where(selected, 0, -1).to(torch.int32).reshape(-1, 1).expand(-1, S)
        return super().forward(x, Routing(w, ids.reshape(-1, 1)), return_routing)


class MiLoRAAdapters(nn.Module):
    """The MiLoRA adapters of one transformer layer: a ``MiLoRARouter`` + one ``MiLoRALinear``
    per named base linear (``modules["q_proj"]`` ...), module m = the m-th name (arXiv
    2410.18035). Call ``route(layer_input [B, S, d], prompt_mask)`` (or ``router(...)``, cached)
    at prefill, then the modules; ``reset()`` between batches of prompts.

    Args: hidden_size: d (the layer input). bases: name -> frozen ``nn.Linear`` (M of them, 7 for
    a Llama layer). k, r, alpha, dropout, renormalize, init: as ``MiLoRARouter`` /
    ``MiLoRALinear`` (every module gets the same r / alpha). [abstract: no public code]"""

    def __init__(self, hidden_size: int, bases: Mapping[str, nn.Linear], k: int, r: int,
                 alpha: float, dropout: float = 0.0, *, renormalize: bool = True,
                 init: str = "lora", dtype=None):
        super().__init__()
        device = next(iter(bases.values())).weight.device
        self.router = MiLoRARouter(hidden_size, len(bases), k, renormalize, device=device)
        self.adapters = nn.ModuleDict({
            name: MiLoRALinear(base, r, alpha, dropout, router=self.router, index=m, init=init,
                               dtype=dtype)
            for m, (name, base) in enumerate(bases.items())})

    def route(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
        """Routing for this layer (cached in eval once computed): gates [B, M]."""
        return self.router(hidden, attention_mask)

    def reset(self) -> None:
        self.router.reset()

    def __getitem__(self, name: str) -> MiLoRALinear:
        return self.adapters[name]


# ------------------------------------------------------------------------------------------------
# Poly / TensorPoly
# ------------------------------------------------------------------------------------------------

_POLY_ROUTING = ("sigmoid", "relaxed_bernoulli", "straight_through")


class PolyLinear(MoLoRALinear):
    """Polytropon (Poly) LoRA: a per-task, weight-space mixture of skill LoRAs.

    Ponti et al., "Combining Modular Skills in Multitask Learning" (arXiv 2202.13914); TensorPoly
    (Su et al., arXiv 2405.16671) builds on it. Reference code: ``microsoft/mttl``
    ``mttl/models/modifiers/poly.py :: PolytroponSelector.forward`` and ``lora.py ::
    SkilledLoRA.forward_linear_`` (TensorPoly's TLoRA class was not located: this is Poly's
    SkilledLoRA; METHODS.md 3.4).

    Routing, with ``module_logits Z [n_tasks, Q * K]`` (Q = n_splits, K = n_skills) and per-example
    task ids ``t [B]``::

        z [B, Q, K] = Z[t].view(B, Q, K)
        v = sigmoid(z)                                           eval, and routing="sigmoid"
          | RelaxedBernoulli(temperature, logits=z).rsample()     training, "relaxed_bernoulli"
          | sigmoid(z) + (round(sigmoid(z)) - sigmoid(z)).detach()  "straight_through"
        w [B, Q, K] = v / (sum_k v + 1e-12)

    Weight-space merge per example (skill k: ``A_k [r, d_in]``, ``B_k [d_out, r]``, one
    ``LoRABank`` with E = K, same rank r) and split q (``A_k`` split along d_in, ``B_k`` along
    d_out, each into Q equal chunks; chunk q is mixed with the weights ``w[b, q, :]``)::

        A_b[:, chunk_q(d_in)]  = sum_k w[b,q,k] A_k[:, chunk_q(d_in)]        A_b [B, r, d_in]
        B_b[chunk_q(d_out), :] = sum_k w[b,q,k] B_k[chunk_q(d_out), :]       B_b [B, d_out, r]
        y [B, S, d_out] = W0 x + (alpha / r) (x A_b^T) B_b^T                 (two bmm)

    (mttl's ``lora_a [Q, K, d_in/Q, r]`` is ``A_k[:, chunk_q].T``, ``lora_b [Q, K, r, d_out/Q]``
    is ``B_k[chunk_q, :].T``.) The ranks are shared across splits: the r-dim code sums every
    input chunk. It is a mixture of FACTORS, not of outputs:
    ``(sum_k w_k B_k)(sum_k w_k A_k) != sum_k w_k B_k A_k`` (cross terms B_j A_k), which is why
    this runs as a weight merge + bmm in plain torch rather than through the bank's gated ops
    (no op computes it; merging is also cheaper when S > 1: O(B K r d) + O(B S r d)).

    Args: base (frozen in place), n_tasks, n_skills (K), r, alpha (scaling alpha / r; mttl
        defaults r = 4, alpha = 16), n_splits (Q, divides d_in and d_out; default 1),
        routing: ``"sigmoid"`` (default) | ``"relaxed_bernoulli"`` | ``"straight_through"``,
        temperature: the relaxed Bernoulli temperature (mttl: 1.0),
        straight_through_eval: True = mttl (the rounding is applied in eval too, not only in
        training; the default because the mttl code, whose numbers we match, does so: its
        ``elif self.use_straight_through`` is not gated by ``self.training``; False gives the
        sigmoid weights in eval), init (bank init; ``"lora"``: B = 0, mttl's default).
    ``module_logits`` init U(-1e-3, 1e-3) as mttl. mttl's SkilledLoRA applies no LoRA dropout
    (``lora_dropout`` is configured but unused): neither does this layer.

    ``forward(x [B, S, d_in] or [B, d_in], task_ids [B] int)``; when x's batch is a multiple of
    ``len(task_ids)`` the ids are repeated (``repeat_interleave``, mttl's beam-search rule).
    """

    def __init__(self, base: nn.Linear, n_tasks: int, n_skills: int, r: int, alpha: float,
                 n_splits: int = 1, routing: str = "sigmoid", temperature: float = 1.0, *,
                 straight_through_eval: bool = True, init: str = "lora", dtype=None):
        if routing not in _POLY_ROUTING:
            raise ValueError(f"PolyLinear: routing must be one of {_POLY_ROUTING}, got "
                             f"{routing!r}")
        if n_splits < 1 or base.in_features % n_splits or base.out_features % n_splits:
            raise ValueError(f"PolyLinear: n_splits={n_splits} must divide d_in="
                             f"{base.in_features} and d_out={base.out_features}")
        if r < 1:
            raise ValueError(f"PolyLinear: r must be >= 1, got {r}")
        bank = LoRABank(base.in_features, base.out_features, r, n_skills, alpha, init=init,
                        dtype=dtype or base.weight.dtype, device=base.weight.device)
        super().__init__(base, bank, None, None, 0.0)
        self.n_tasks, self.n_skills, self.n_splits, self.r = n_tasks, n_skills, n_splits, r
        self.routing, self.temperature = routing, temperature
        self.straight_through_eval = straight_through_eval
        self.scaling = lora_scaling(alpha, r)
        self.module_logits = nn.Parameter(torch.empty(
            n_tasks, n_splits * n_skills, device=base.weight.device).uniform_(-1e-3, 1e-3))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``module_logits`` ~ U(-1e-3, 1e-3) as in the constructor (meta-device init)."""
        self.module_logits.uniform_(-1e-3, 1e-3)

    def mixing_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``w [B, Q, K]`` for the task ids [B] (mttl ``PolytroponSelector.forward``)."""
        if task_ids.numel():
            # Host check (clear error) on CPU in eager mode; elsewhere a device-side assert, so
            # the forward never waits for the device (molora_ops._checks value-check modes).
            if _checks.on_host(task_ids):
                if int(task_ids.max()) >= self.n_tasks:
                    raise ValueError(f"PolyLinear: task id {int(task_ids.max())} >= n_tasks "
                                     f"{self.n_tasks}")
            else:
                torch._assert_async((task_ids < self.n_tasks).all(),
                                    f"PolyLinear: a task id is >= n_tasks {self.n_tasks} "
                                    f"(ValueError)")
        z = self.module_logits[task_ids.long()].view(-1, self.n_splits, self.n_skills)
        if self.training and self.routing == "relaxed_bernoulli":
            # RelaxedBernoulli(temperature, logits=z).rsample(), spelled out: its base
            # distribution is built with argument validation on whatever validate_args says, and
            # the check reads the logits on the host (a sync). Same draws, same values.
            base = LogitRelaxedBernoulli(self.temperature, logits=z, validate_args=False)
            v = SigmoidTransform()(base.rsample())
        elif self.routing == "straight_through" and (self.training or self.straight_through_eval):
            v = torch.sigmoid(z)
            v = v + (torch.round(v) - v).detach()
        else:
            v = torch.sigmoid(z)
        return v / (v.sum(dim=-1, keepdim=True) + 1e-12)

    def merge_factors(self, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-example merged factors for ``weights [B, Q, K]``: ``A_b [B, r, d_in]``,
        ``B_b [B, d_out, r]``."""
        K, Q, r = self.n_skills, self.n_splits, self.r
        d_in, d_out = self.in_features, self.out_features
        w = weights.to(self.bank.A.dtype)
        A = self.bank.A.view(K, r, Q, d_in // Q)
        B = self.bank.B.view(Q, d_out // Q, K, r)
        A_b = torch.einsum("bqk,krqi->brqi", w, A).reshape(-1, r, d_in)
        B_b = torch.einsum("bqk,qokr->bqor", w, B).reshape(-1, d_out, r)
        return A_b, B_b

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.forward(x.unsqueeze(1), task_ids).squeeze(1)
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"PolyLinear: x must be [B, S, {self.in_features}], got "
                             f"{tuple(x.shape)}")
        task_ids = task_ids.reshape(-1)
        if task_ids.numel() != x.shape[0]:
            if task_ids.numel() == 0 or x.shape[0] % task_ids.numel():
                raise ValueError(f"PolyLinear: {task_ids.numel()} task ids for a batch of "
                                 f"{x.shape[0]}")
            task_ids = task_ids.repeat_interleave(x.shape[0] // task_ids.numel())
        A_b, B_b = self.merge_factors(self.mixing_weights(task_ids))
        xl = x.to(A_b.dtype)
        delta = torch.bmm(torch.bmm(xl, A_b.transpose(1, 2)), B_b.transpose(1, 2)) * self.scaling
        base = self.base(x.to(self.base.weight.dtype))
        return (base.to(delta.dtype) + delta).to(x.dtype)

    @torch.no_grad()
    def task_delta_weight(self, task_id: int) -> torch.Tensor:
        """``(alpha / r) B_t A_t`` [d_out, d_in] for one task at eval-mode weights."""
        was = self.training
        self.eval()
        try:
            ids = torch.tensor([task_id], device=self.module_logits.device)
            A_b, B_b = self.merge_factors(self.mixing_weights(ids))
        finally:
            self.train(was)
        return self.scaling * (B_b[0] @ A_b[0])

    def extra_repr(self) -> str:
        return (f"n_tasks={self.n_tasks}, n_skills={self.n_skills}, n_splits={self.n_splits}, "
                f"r={self.r}, routing={self.routing!r}, temperature={self.temperature}")
