"""X-LoRA: per-token, per-module soft mixing of frozen pre-trained LoRA adapters.

Buehler & Buehler, "X-LoRA: Mixture of Low-Rank Adapter Experts" (arXiv 2402.07148). Reference code:
``huggingface/peft src/peft/tuners/xlora/{classifier,layer,model}.py`` (``XLoraClassifier.forward``,
``XLoraLayer.get_maybe_topk_scalings``, ``XLoraLinearLayer.forward``,
``XLoraModel._enable_peft_forward_hooks``) and the original ``EricLBuehler/xlora``
(``xlora_insertion.py``, ``xlora_classifier.py``).

Three pieces:

* ``XLoRAClassifier``: the trainable scaling head, last hidden state [B, S, d] -> scalings
  [B, S, L, N] (L = number of X-LoRA modules, N = number of adapters).
* ``XLoRALinear``: a frozen base linear + N frozen adapters in one ``LoRABank``; the per-token
  scalings are the dense gate of ``LoRABank.dense`` (the stacked gated op).
* ``XLoRAModel``: the two-pass orchestration (scaling pass with adapters off -> classifier ->
  real pass with each module's slice of the scalings).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .bank import LoRABank, lora_scaling
from .layers import MoLoRALinear, check_last_dim
from .routing import Routing

__all__ = ["XLoRAClassifier", "XLoRALinear", "XLoRAModel", "xlora_topk_scalings"]


class XLoRAClassifier(nn.Module):
    """X-LoRA's scaling head (PEFT ``XLoraClassifier``), arXiv 2402.07148.

    With ``h`` the last hidden state [B, S, d] of the adapter-off scaling pass::

        depth 1:   logits = h W^T + b                                  W [N*L, d]
        depth D>1: z_1 = Dropout(ReLU(h W_1^T + b_1))                  W_1 [hidden, d]
                   z_i = Dropout(ReLU(z_{i-1} W_i^T + b_i)), i < D     W_i [hidden, hidden]
                   logits = z_{D-1} W_D^T + b_D                        W_D [N*L, hidden]
        scalings = softmax(logits.reshape(B, S, L, N) / T, dim=-1)     [B, S, L, N]

    Without ``layerwise_scalings`` the last layer has N outputs and its logits [B, S, N] are
    broadcast to all L modules. Without ``enable_softmax`` the raw logits are the scalings.

    The MLP is ``self.layers``, an ``nn.Sequential`` laid out exactly as PEFT's
    ``XLoraClassifier.layers`` (Linear, ReLU, Dropout only when ``dropout > 0``, ..., last
    Linear), so the state-dict keys are PEFT's (``layers.0.weight``, ..., e.g. ``layers.3.weight``
    for the last Linear of a depth-2 classifier with dropout): a PEFT X-LoRA classifier's
    ``state_dict()`` loads as it is (``load_state_dict``, or ``load_peft_state_dict`` for the
    prefixed keys of a whole PEFT model). ``inner`` / ``last`` are views of the hidden layers /
    the last Linear.

    Args (PEFT ``XLoraConfig`` names in brackets, defaults as there):
        hidden_size: d [hidden_size]. num_adapters: N (number of adapters). num_layers: L, the
            number of X-LoRA modules in the model (``XLoRAModel`` counts them).
        depth: 1 [xlora_depth]. hidden: 2048 [xlora_size]. dropout: 0.2 [xlora_dropout_p].
        layerwise_scalings: True. enable_softmax: True. softmax_temperature: 1.0.
        relu_and_dropout: True [enable_relu_and_dropout]. bias: True [use_bias].

    Published configurations: ``lamm-mit/x-lora`` (Mistral-7B, d=4096): N=9, depth 1,
    layerwise, softmax, T=1; ``lamm-mit/x-lora-gemma-7b``: N=4, depth 2, hidden 2048, dropout 0.2.
    Any leading dims: ``forward(h [..., d]) -> [..., L, N]``. Reference quirks: none here (PEFT's
    classifier and the original's are the same MLP; PEFT builds it in the model's dtype: pass
    ``dtype``). The Dropout layers (depth >= 2) are active in training mode only.
    """

    def __init__(self, hidden_size: int, num_adapters: int, num_layers: int, depth: int = 1,
                 hidden: int = 2048, dropout: float = 0.2, layerwise_scalings: bool = True,
                 enable_softmax: bool = True, softmax_temperature: float = 1.0,
                 relu_and_dropout: bool = True, bias: bool = True, dtype=None, device=None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"XLoRAClassifier: depth must be >= 1, got {depth}")
        if num_adapters < 1 or num_layers < 1:
            raise ValueError(f"XLoRAClassifier: need num_adapters >= 1 and num_layers >= 1, got "
                             f"{num_adapters} and {num_layers}")
        if softmax_temperature <= 0:
            raise ValueError(f"XLoRAClassifier: softmax_temperature must be > 0, got "
                             f"{softmax_temperature}")
        self.hidden_size, self.num_adapters, self.num_layers = hidden_size, num_adapters, num_layers
        self.depth, self.layerwise_scalings = depth, layerwise_scalings
        self.enable_softmax, self.softmax_temperature = enable_softmax, softmax_temperature
        self.hidden, self.dropout_p = hidden, dropout
        self.relu_and_dropout, self.use_bias = relu_and_dropout, bias
        factory = dict(bias=bias, dtype=dtype, device=device)
        layers: List[nn.Module] = []
        width = hidden_size
        for _ in range(depth - 1):
            layers.append(nn.Linear(width, hidden, **factory))
            if relu_and_dropout:
                # PEFT adds the Dropout only for p > 0: the same indices give the same keys
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            width = hidden
        out = num_adapters * num_layers if layerwise_scalings else num_adapters
        layers.append(nn.Linear(width, out, **factory))
        self.layers = nn.Sequential(*layers)

    @property
    def inner(self) -> nn.Sequential:
        """The hidden layers (everything before the last Linear), sharing ``self.layers``."""
        return nn.Sequential(*list(self.layers)[:-1])

    @property
    def last(self) -> nn.Linear:
        """The last Linear (``[N*L, width]`` or ``[N, width]``)."""
        return self.layers[-1]

    def logits(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """Classifier logits reshaped to [..., L, N] (before the softmax)."""
        logits = self.layers(hidden_state)
        lead = logits.shape[:-1]
        if not self.layerwise_scalings:
            return logits.unsqueeze(-2).expand(*lead, self.num_layers, self.num_adapters)
        return logits.reshape(*lead, self.num_layers, self.num_adapters)

    def config_dict(self) -> Dict[str, Any]:
        """The constructor arguments (JSON-serialisable; dtype / device excluded)."""
        return dict(hidden_size=self.hidden_size, num_adapters=self.num_adapters,
                    num_layers=self.num_layers, depth=self.depth, hidden=self.hidden,
                    dropout=self.dropout_p, layerwise_scalings=self.layerwise_scalings,
                    enable_softmax=self.enable_softmax,
                    softmax_temperature=self.softmax_temperature,
                    relu_and_dropout=self.relu_and_dropout, bias=self.use_bias)

    @torch.no_grad()
    def load_peft_state_dict(self, state_dict: Union[Mapping[str, torch.Tensor], nn.Module]
                             ) -> "XLoRAClassifier":
        """Loads PEFT X-LoRA classifier weights as PEFT names them.

        ``state_dict``: PEFT's ``XLoraClassifier.state_dict()`` (``layers.0.weight``, ...), or
        a whole PEFT model's state dict / the model itself (keys ``...internal_xlora_classifier.
        layers.N.*``: everything up to ``internal_xlora_classifier.`` is dropped and the other
        keys are ignored), or any module whose ``state_dict()`` is one of those. Values are cast
        to this classifier's dtype / device. ValueError (before anything is copied) when the
        keys or shapes differ, e.g. another ``xlora_depth``, ``layerwise_scalings``, number of
        adapters or of X-LoRA modules. Returns self.
        """
        if isinstance(state_dict, nn.Module):
            state_dict = state_dict.state_dict()
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"XLoRAClassifier.load_peft_state_dict: state_dict must be a mapping "
                            f"or a module, got {type(state_dict).__name__}")
        tag = "internal_xlora_classifier."
        if any(tag in k for k in state_dict):
            sd = {k[k.index(tag) + len(tag):]: v for k, v in state_dict.items() if tag in k}
        else:
            sd = dict(state_dict)
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        shapes = [f"{k}: {tuple(sd[k].shape)} vs ours {tuple(own[k].shape)}" for k in own
                  if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"XLoRAClassifier.load_peft_state_dict: the weights do not fit this "
                             f"classifier ({self.extra_repr()}): missing {missing}, unexpected "
                             f"{unexpected}, wrong shape {shapes} (check xlora_depth, "
                             f"layerwise_scalings, the adapters and the adapted modules)")
        for k, t in own.items():
            t.copy_(sd[k])
        return self

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """hidden_state [..., d] -> scalings [..., L, N]."""
        logits = self.logits(hidden_state)
        if self.enable_softmax:
            return torch.softmax(logits / self.softmax_temperature, dim=-1)
        return logits

    def extra_repr(self) -> str:
        return (f"num_adapters={self.num_adapters}, num_layers={self.num_layers}, "
                f"depth={self.depth}, layerwise_scalings={self.layerwise_scalings}, "
                f"enable_softmax={self.enable_softmax}, T={self.softmax_temperature}")


def xlora_topk_scalings(scalings: torch.Tensor, top_k_lora: Optional[int] = None,
                        enable_softmax_topk: bool = False,
                        per_token_softmax_topk: bool = False) -> torch.Tensor:
    """PEFT ``XLoraLayer.get_maybe_topk_scalings`` on one module's scalings [..., N].

    ``top_k_lora``: every scaling but the k largest of a token is zeroed (``x * mask``).
    ``enable_softmax_topk``: the nonzero scalings are replaced by a softmax over them. The
    original repo (and older PEFT releases) do ``softmax(scalings[nonzero_mask], dim=-1)`` on the
    FLATTENED 1-D selection, i.e. one softmax over the nonzero scalings of every token of the
    batch; that is this function's default (``per_token_softmax_topk=False``).
    ``per_token_softmax_topk=True`` gives the per-token softmax over each token's nonzero
    scalings, which is what PEFT 0.21 does (``masked_fill(-inf)`` + softmax over the adapters;
    ``apply_xlora_from_adapters`` defaults to it). Out of place.
    """
    s = scalings
    if top_k_lora is not None:
        idx = torch.topk(s, k=top_k_lora, dim=-1).indices
        mask = torch.zeros_like(s, dtype=torch.bool).scatter(-1, idx, True)
        s = s * mask.to(s.dtype)
    if not enable_softmax_topk:
        return s
    nonzero = s != 0
    if not per_token_softmax_topk:
        # The reference quirk: one softmax across all B*S tokens' nonzero entries. Computed over
        # the whole flattened tensor with the zero entries at -inf (exp gives exactly 0) instead
        # of gathering s[nonzero], whose size is data-dependent (a host sync, a graph break).
        fill = torch.where(nonzero.any(), float("-inf"), 0.0).to(s.dtype)
        p = torch.softmax(torch.where(nonzero, s, fill).reshape(-1), dim=0).reshape(s.shape)
        return torch.where(nonzero, p, torch.zeros_like(p))
    # per token: masked entries -> -inf (rows without any nonzero entry -> 0 and stay 0)
    fill = torch.where(nonzero.any(-1, keepdim=True), float("-inf"), 0.0)
    p = torch.softmax(torch.where(nonzero, s, fill.to(s.dtype)), dim=-1)
    return torch.where(nonzero, p, torch.zeros_like(p))


class XLoRALinear(MoLoRALinear):
    """One X-LoRA module: frozen ``W0`` + N frozen pre-trained LoRA adapters mixed per token by
    externally given scalings (arXiv 2402.07148; PEFT ``XLoraLinearLayer.forward``).

    With scalings ``sigma [T, N]`` for this module (a slice ``S[:, :, l, :]`` of the classifier's
    [B, S, L, N] output, processed by ``xlora_topk_scalings``)::

        y [T, d_out] = W0 x + sum_n  g * sigma_n  (alpha_n / r_n)  B_n A_n drop(x)
        A_n [r_n, d_in], B_n [d_out, r_n], g = global_scaling_weight

    computed by ``LoRABank.dense`` (the stacked gated op: one GEMM to the N*r stacked ranks, the
    gate broadcast per rank block, one GEMM out) with gate ``[T, N] = g * sigma``. Ragged ranks
    (and rank 0) are allowed; ``scales[n] = alpha_n / r_n`` (rsLoRA: alpha_n / sqrt(r_n)).

    Args:
        base: the frozen ``nn.Linear`` (frozen in place). ranks: r_n per adapter (or one int with
            ``num_adapters``). alphas: LoRA alpha (one float or one per adapter).
        dropout: LoRA dropout (one p for all adapters; PEFT has one per adapter).
        top_k_lora: None (dense, the default) or k. enable_softmax_topk: False.
        per_token_softmax_topk: False = the original repo's flattened softmax (see below);
            True = per token, as PEFT 0.21 (``apply_xlora_from_adapters``' default).
        global_scaling_weight: 1.0. trainable_adapters: False (PEFT ``use_trainable_adapters``).
        init: bank init (``"lora"``: B = 0; load the adapters with ``bank.load_expert`` or use
            ``from_peft_adapters``; ``"gaussian"``: random non-zero adapters).

    ``forward(x [..., d_in], scalings [..., N] = None)``: scalings None reads the per-layer slot
    ``self.scalings`` (set by ``XLoRAModel``); if that is None too, every adapter gets weight 1
    and no ``global_scaling_weight`` (what PEFT's layer does when called without scalings).
    ``adapters_off = True`` returns ``W0 x`` without touching the bank (the scaling pass).

    Reference-code quirks:

    * ``enable_softmax_topk`` normalises across ALL tokens of the batch in the original repo
      (and older PEFT releases: a softmax of the flattened nonzero selection). Reproduced by
      this class's default for parity with the released checkpoints' code;
      ``per_token_softmax_topk=True`` gives the per-token softmax that PEFT 0.21 computes. Both
      only matter when ``enable_softmax_topk=True`` (off in every released config).
    * X-LoRA scales the INPUT before dropout, ``B_n A_n drop(x * sigma_n)``; here the gate scales
      the adapter output, ``sigma_n B_n A_n drop(x)``. LoRA is linear and sigma_n is a per-token
      scalar, so the two are equal without dropout (eval, or dropout = 0, the released configs);
      in training the fused path draws ONE dropout mask shared by the N adapters where PEFT draws
      one per adapter (same distribution per adapter, correlated across adapters).
    * The original repo's ``top_k_lora`` takes the top-k over dim 1 (the sequence); PEFT fixed
      it to the adapter dim; we follow PEFT.
    """

    def __init__(self, base: nn.Linear, ranks: Union[int, Sequence[int]],
                 alphas: Union[float, Sequence[float]] = 16.0, num_adapters: Optional[int] = None,
                 dropout: float = 0.0, *, top_k_lora: Optional[int] = None,
                 enable_softmax_topk: bool = False, per_token_softmax_topk: bool = False,
                 global_scaling_weight: float = 1.0, trainable_adapters: bool = False,
                 rslora: bool = False, init: str = "lora", dtype=None):
        if isinstance(ranks, int):
            if num_adapters is None:
                raise ValueError("XLoRALinear: num_adapters is required with an int rank")
            ranks = [ranks] * num_adapters
        ranks = [int(r) for r in ranks]
        if isinstance(alphas, (int, float)):
            alphas = [float(alphas)] * len(ranks)
        if len(alphas) != len(ranks):
            raise ValueError(f"XLoRALinear: {len(alphas)} alphas for {len(ranks)} adapters")
        if top_k_lora is not None and not 1 <= top_k_lora <= len(ranks):
            raise ValueError(f"XLoRALinear: top_k_lora must be in [1, {len(ranks)}], got "
                             f"{top_k_lora}")
        scales = [lora_scaling(a, r, rslora) for a, r in zip(alphas, ranks)]
        bank = LoRABank(base.in_features, base.out_features, ranks, len(ranks), scales=scales,
                        init=init, dtype=dtype or base.weight.dtype, device=base.weight.device)
        bank.requires_grad_(trainable_adapters)
        super().__init__(base, bank, None, None, dropout)
        self.top_k_lora = top_k_lora
        self.enable_softmax_topk = enable_softmax_topk
        self.per_token_softmax_topk = per_token_softmax_topk
        self.global_scaling_weight = global_scaling_weight
        self.adapters_off = False
        # the per-layer slot, set by XLoRAModel: scalings [..., N], a constant float, or None
        self.scalings: Union[torch.Tensor, float, None] = None

    @classmethod
    def from_peft_adapters(cls, base: nn.Linear,
                           adapters: Sequence[Tuple[torch.Tensor, torch.Tensor, float]],
                           dropout: float = 0.0, **kwargs: Any) -> "XLoRALinear":
        """Builds the layer from PEFT adapters ``[(lora_A.weight [r_n, d_in], lora_B.weight
        [d_out, r_n], lora_alpha), ...]`` (the scaling is ``alpha / r_n``, or ``alpha /
        sqrt(r_n)`` with ``rslora=True``); the factors are copied with ``bank.load_expert``."""
        if not adapters:
            raise ValueError("XLoRALinear.from_peft_adapters: no adapters given")
        ranks = [int(a.shape[0]) for a, _, _ in adapters]
        kwargs.setdefault("dtype", adapters[0][0].dtype)
        layer = cls(base, ranks, [float(al) for _, _, al in adapters], dropout=dropout, **kwargs)
        for n, (a, b, _) in enumerate(adapters):
            layer.bank.load_expert(n, a.to(layer.bank.A), b.to(layer.bank.B))
        return layer

    def gate(self, scalings: Union[torch.Tensor, float, None], num_tokens: int) -> torch.Tensor:
        """The dense gate [T, N] that ``forward`` hands to the bank (a float: every scaling)."""
        N = self.num_experts
        if scalings is None:
            return self.bank.scales.new_ones(num_tokens, N)
        if not isinstance(scalings, torch.Tensor):
            scalings = self.bank.scales.new_full((num_tokens, N), float(scalings))
        if scalings.shape[-1] != N or scalings.numel() != num_tokens * N:
            raise ValueError(f"XLoRALinear: scalings must have shape [..., {N}] with the "
                             f"input's {num_tokens} tokens, got {tuple(scalings.shape)}")
        s = xlora_topk_scalings(scalings.reshape(num_tokens, N), self.top_k_lora,
                                self.enable_softmax_topk, self.per_token_softmax_topk)
        return s * self.global_scaling_weight if self.global_scaling_weight != 1.0 else s

    def forward(self, x: torch.Tensor, scalings: Optional[torch.Tensor] = None,
                return_routing: bool = False):
        if self.adapters_off:
            check_last_dim(self, x, self.in_features)
            y = self.base(x.to(self.base.weight.dtype)).to(x.dtype)
            return (y, None) if return_routing else y
        if scalings is None:
            scalings = self.scalings
        T = x.numel() // x.shape[-1] if x.shape[-1] else 0
        routing = Routing(self.gate(scalings, T), None)
        return super().forward(x, routing, return_routing)

    def extra_repr(self) -> str:
        return (f"top_k_lora={self.top_k_lora}, enable_softmax_topk={self.enable_softmax_topk}, "
                f"per_token_softmax_topk={self.per_token_softmax_topk}, "
                f"global_scaling_weight={self.global_scaling_weight}")


def _last_hidden_state(output: Any) -> torch.Tensor:
    """``output.hidden_states[-1]`` (HF ModelOutput or dict), else the output tensor itself (or
    the first element of a tuple)."""
    hs = output.get("hidden_states") if isinstance(output, dict) else getattr(
        output, "hidden_states", None)
    if hs is not None:
        return hs[-1]
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"XLoRAModel: cannot find the last hidden state in a "
                        f"{type(output).__name__}; pass hidden_states_fn")
    return output


class XLoRAModel(nn.Module):
    """X-LoRA's two-pass forward around any model whose adapted linears are ``XLoRALinear``
    (PEFT ``XLoraModel._enable_peft_forward_hooks``; arXiv 2402.07148 Fig. 1).

    ``forward(*args, **kwargs)``:

    1. scaling pass, under ``no_grad``: every ``XLoRALinear`` has its adapters off (PEFT's
       scaling pass: its all-zero dummy scalings make every adapter add exactly 0; here a
       base-only forward, no bank work), ``h = hidden_states_fn(model(*args, **kwargs,
       **scaling_pass_kwargs))`` [B, S, d] (default: ``output.hidden_states[-1]`` when the output
       has hidden states, else the output tensor);
    2. ``scalings = classifier(h)`` [B, S, L, N] (kept as ``last_scalings``);
    3. real pass: module l (the l-th ``XLoRALinear`` in ``model.modules()`` order, as PEFT
       numbers them) gets ``scalings[..., l, :]``; returns ``model(*args, **kwargs)``.

    KV cache (transformers ``Cache`` objects): the scaling pass of a token needs the
    ADAPTERS-OFF keys / values of the earlier tokens, the real pass the adapters-on ones, so
    the two passes keep two caches. The real pass's cache is the one the caller sees (``past_
    key_values`` in and out, as for the bare model); its scaling-pass twin is kept here, keyed
    by that cache object (weakly), created when the real pass starts a cache (``use_cache``
    with no ``past_key_values``, or an empty one) and advanced with it. A cache this model did
    not start raises ValueError; twins whose lengths disagree (a cache cropped or reordered
    outside this model, e.g. beam search) raise RuntimeError. Because both passes are causal,
    incremental decoding gives the logits of the full-sequence forward (PEFT instead forces
    ``use_cache=False`` and re-runs both passes on the whole sequence at every step).

    ``generate(*args, **kwargs)``: the wrapped model's ``generate`` (transformers), every model
    call of it running the two passes with the KV cache as above (greedy / sampling; beam
    search and assisted decoding need ``use_cache=False``).

    ``save_pretrained(directory)`` / ``XLoRAModel.from_pretrained(model, directory)``: the
    classifier, the adapters (as PEFT LoRA adapters) and the X-LoRA settings
    (``molora_ops.integrations.hf_peft.save_xlora`` / ``load_xlora``).

    Args:
        model: the model (its ``XLoRALinear`` modules are found in module order; L = their
            number must equal ``classifier.num_layers``).
        classifier: ``XLoRAClassifier``.
        hidden_states_fn: output of the scaling pass -> last hidden state.
        scaling_pass_value: the scalings of the scaling pass. 0.0 (default; PEFT's and the
            original repo's default) = adapters off, which is exactly equal and skips the
            adapters; another value v runs the adapters with every scaling = v (PEFT's
            ``set_scaling_pass_value``, through the layers' top-k / softmax-top-k as PEFT);
            None = 1/N.
        scaling_pass_kwargs: extra kwargs of the scaling pass only (e.g.
            ``{"output_hidden_states": True, "return_dict": True}`` for a HF model).
        freeze_model: True: every parameter of ``model`` is frozen (PEFT trains the classifier
            only; adapters frozen unless ``use_trainable_adapters``).
    """

    def __init__(self, model: nn.Module, classifier: XLoRAClassifier,
                 hidden_states_fn: Optional[Callable[[Any], torch.Tensor]] = None,
                 scaling_pass_value: Optional[float] = 0.0,
                 scaling_pass_kwargs: Optional[dict] = None, freeze_model: bool = True):
        super().__init__()
        layers = [m for m in model.modules() if isinstance(m, XLoRALinear)]
        if not layers:
            raise ValueError("XLoRAModel: the model has no XLoRALinear module")
        if len(layers) != classifier.num_layers:
            raise ValueError(f"XLoRAModel: the model has {len(layers)} XLoRALinear modules but "
                             f"the classifier predicts {classifier.num_layers} layers")
        bad = [m.num_experts for m in layers if m.num_experts != classifier.num_adapters]
        if bad:
            raise ValueError(f"XLoRAModel: the classifier mixes {classifier.num_adapters} adapters"
                             f" but a module has {bad[0]}")
        self.model = model
        self.classifier = classifier
        self.__dict__["xlora_layers"] = layers  # not re-registered: they live in self.model
        self.hidden_states_fn = hidden_states_fn or _last_hidden_state
        self.scaling_pass_value = scaling_pass_value
        self.scaling_pass_kwargs = dict(scaling_pass_kwargs or {})
        self.last_scalings: Optional[torch.Tensor] = None
        # adapter names / their PEFT configs (set by apply_xlora_from_adapters; used on save)
        self.adapter_names: Optional[List[str]] = None
        self.adapter_configs: Optional[Dict[str, dict]] = None
        self._scaling_caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._busy = False
        self._hook_state: List[Any] = []
        if freeze_model:
            model.requires_grad_(False)

    def _set_slots(self, scalings: Optional[torch.Tensor] = None, off: bool = False) -> None:
        for l, layer in enumerate(self.xlora_layers):
            layer.adapters_off = off
            layer.scalings = None if scalings is None else scalings[..., l, :]

    # -- the KV-cache twins ----------------------------------------------------------------

    def _cache_plan(self, kwargs: dict) -> Tuple[dict, bool]:
        """(kwargs the scaling pass adds / overrides, whether the real pass returns a cache to
        pair with the scaling pass's). Touches nothing."""
        pkv = kwargs.get("past_key_values")
        if pkv is None:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(getattr(self.model, "config", None), "use_cache", False)
            return ({}, True) if use_cache else ({}, False)
        if not callable(getattr(pkv, "get_seq_length", None)):
            raise TypeError(f"XLoRAModel: past_key_values must be a transformers Cache (e.g. "
                            f"DynamicCache), got {type(pkv).__name__}")
        twin = self._scaling_caches.get(pkv)
        if twin is None:
            if pkv.get_seq_length() != 0:
                raise ValueError("XLoRAModel: past_key_values holds tokens but was not started by "
                                 "this XLoRAModel, so its scaling pass has no adapters-off cache "
                                 "of them; start with past_key_values=None (use_cache=True) or "
                                 "an empty cache")
            return {"past_key_values": None, "use_cache": True}, True
        if twin.get_seq_length() != pkv.get_seq_length():
            raise RuntimeError(f"XLoRAModel: the KV cache holds {pkv.get_seq_length()} tokens but "
                               f"its scaling-pass twin {twin.get_seq_length()}: the cache was "
                               f"cropped or reordered outside this model (beam search and "
                               f"assisted decoding need use_cache=False)")
        return {"past_key_values": twin, "use_cache": True}, True

    def _pair(self, output: Any, scaling_output: Any) -> None:
        cache, twin = _cache_of(output), _cache_of(scaling_output)
        if cache is not None and twin is not None:
            self._scaling_caches[cache] = twin

    # -- the two passes --------------------------------------------------------------------

    @torch.no_grad()
    def _scaling_pass(self, args: tuple, kwargs: dict) -> Tuple[torch.Tensor, Any]:
        value = self.scaling_pass_value
        kwargs = {**kwargs, **self.scaling_pass_kwargs}
        busy, self._busy = self._busy, True   # generate's hooks skip this inner call
        try:
            if value == 0.0:
                self._set_slots(off=True)
            else:
                v = 1.0 / self.classifier.num_adapters if value is None else float(value)
                for layer in self.xlora_layers:
                    layer.scalings = v
            out = self.model(*args, **kwargs)
        finally:
            self._set_slots(None)
            self._busy = busy
        return self.hidden_states_fn(out), out

    def scaling_pass(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Pass 1: the last hidden state with the adapters off (or at ``scaling_pass_value``).
        Called on its own it keeps no cache (``past_key_values`` / ``use_cache`` as given)."""
        return self._scaling_pass(args, kwargs)[0]

    def _begin(self, args: tuple, kwargs: dict) -> Tuple[bool, Any]:
        extra, caching = self._cache_plan(kwargs)
        hidden, scaling_out = self._scaling_pass(args, {**kwargs, **extra})
        scalings = self.classifier(hidden)
        self.last_scalings = scalings
        self._set_slots(scalings)
        return caching, scaling_out

    def _end(self, state: Tuple[bool, Any], output: Any) -> None:
        self._set_slots(None)
        caching, scaling_out = state
        if caching and output is not None:
            self._pair(output, scaling_out)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self._begin(args, kwargs)
        out = None
        try:
            busy, self._busy = self._busy, True
            try:
                out = self.model(*args, **kwargs)
            finally:
                self._busy = busy
        finally:
            self._end(state, out)
        return out

    # -- generation ------------------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._busy:
            self._hook_state.append(self._begin(args, kwargs))

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._busy and self._hook_state:
            self._end(self._hook_state.pop(), output)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` (transformers) with X-LoRA's two passes at every model call and
        the KV cache of both passes (class doc); same arguments and return value. The cache is
        on unless ``use_cache=False`` is passed (the model config's ``use_cache``, which PEFT's
        X-LoRA requires to be False, is not consulted). ValueError
        (before generating) for beam search or assisted decoding with the cache on: the
        scaling pass's cache would not follow their reordering / cropping."""
        gen = getattr(self.model, "generate", None)
        if not callable(gen):
            raise TypeError(f"XLoRAModel.generate: {type(self.model).__name__} has no generate "
                            f"(a transformers PreTrainedModel has)")
        cfg = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        # the cache is on unless asked off: a model prepared for PEFT's X-LoRA has
        # config.use_cache = False (PEFT requires it), which must not turn it off here
        use_cache = kwargs.setdefault("use_cache", True)
        num_beams = kwargs.get("num_beams", getattr(cfg, "num_beams", 1)) or 1
        if use_cache and num_beams > 1:
            raise ValueError(f"XLoRAModel.generate: beam search (num_beams={num_beams}) with the "
                             f"KV cache is not supported (the scaling pass's cache is not "
                             f"reordered with the beams); pass use_cache=False")
        assisted = [k for k in ("assistant_model", "prompt_lookup_num_tokens")
                    if kwargs.get(k) is not None]
        if use_cache and assisted:
            raise ValueError(f"XLoRAModel.generate: assisted decoding ({assisted[0]}) with the KV "
                             f"cache is not supported; pass use_cache=False")
        if self._hook_state:
            raise RuntimeError("XLoRAModel.generate: already generating")
        handles = (self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                   self.model.register_forward_hook(self._post_hook, with_kwargs=True,
                                                    always_call=True))
        try:
            return gen(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            self._hook_state.clear()
            self._set_slots(None)

    # -- save / load -----------------------------------------------------------------------

    def save_pretrained(self, directory: str) -> None:
        """Writes the classifier, the adapters and the X-LoRA settings to ``directory`` (see
        ``molora_ops.integrations.hf_peft.save_xlora``)."""
        from ..integrations.hf_peft import save_xlora
        save_xlora(self, directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, **kwargs: Any) -> "XLoRAModel":
        """Rebuilds a saved X-LoRA model on ``model`` (a fresh base model; see
        ``molora_ops.integrations.hf_peft.load_xlora``)."""
        from ..integrations.hf_peft import load_xlora
        return load_xlora(model, directory, **kwargs)


def _cache_of(output: Any) -> Any:
    """``output.past_key_values`` (HF ModelOutput or dict), else None."""
    if isinstance(output, dict):
        return output.get("past_key_values")
    return getattr(output, "past_key_values", None)
