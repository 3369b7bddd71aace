"""What each benchmarked op runs: its inputs for a Case, its call through a backend namespace,
the inputs it differentiates, the kernels it needs, and its baselines.

Every op is an ``OpSpec``. Implementations of an op (``Impl``) are its backends (bench.backends,
one per available namespace) plus its baselines (the layer's per-expert loop, torch composites,
the base linear). All of them run on the same ``Problem`` and are checked against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from molora_ops import reference as ref
from molora_ops import uniform_rank_offsets

from . import layer
from .backends import BACKENDS, resolve
from .models import Dims
from .shapes import Case, router_bias, routing_ids


@dataclass
class Problem:
    """One input set of a case: named inputs (tensors and python values), the model dims, and
    (when they depend on the inputs, as a module's parameters do) the inputs to differentiate."""

    inputs: Dict[str, Any]
    dims: Dims
    grads: Optional[Tuple[str, ...]] = None


@dataclass(frozen=True)
class Impl:
    """One implementation of an op. ``fn(inputs) -> outputs``. ``model`` / ``grads`` / ``oracle``
    override the op's (the base linear computes a different function: its own model, only dx, an
    fp64 oracle). ``optional``: an error in its check means "unsupported here", not a failure."""

    name: str
    kind: str  # "backend" or "baseline"
    fn: Callable[[Dict[str, Any]], Any]
    model: Optional[str] = None
    grads: Optional[Tuple[str, ...]] = None
    oracle: Optional[Callable[[Dict[str, Any]], Any]] = None
    optional: bool = False
    # the process state its calls need, entered once around its check and its GPU timing (a
    # backend's switch: bench/backends.py _Switched.scope)
    scope: Optional[Callable[[], ContextManager]] = None


@dataclass(frozen=True)
class OpSpec:
    name: str
    make: Callable[[Case, torch.device, torch.dtype, int], Problem]
    run: Callable[[Any, Dict[str, Any]], Any]  # (ops namespace, inputs) -> outputs
    grads: Tuple[str, ...] = ()  # inputs differentiated by the backward modes
    kernels: Tuple[str, ...] = ()  # torch.ops.molora ops it runs, forward and backward
    # Implementations besides the backends: (device, dtype) -> [Impl].
    baselines: Optional[Callable[[torch.device, torch.dtype], List[Impl]]] = None
    use_backends: bool = True  # False: only `baselines` (modules, which call the ops themselves)
    # (inputs, mode) -> the formulation a backend row runs (moe_lora: what algo="auto" picked)
    describe: Optional[Callable[[Dict[str, Any], str], str]] = None

    def impls(self, device: torch.device, dtype: torch.dtype) -> Tuple[List[Impl], List[dict]]:
        """(implementations available here, [{impl, reason}] for those that are not)."""
        impls, skipped = [], []
        for backend in BACKENDS if self.use_backends else ():
            ns, why = resolve(backend, self.kernels, device)
            if ns is None:
                skipped.append({"impl": backend.name, "reason": why})
            else:
                impls.append(Impl(backend.name, "backend", partial(self.run, ns),
                                  scope=getattr(ns, "scope", None)))
        return impls + (self.baselines(device, dtype) if self.baselines else []), skipped


# --- input builders ---------------------------------------------------------------------------


class _Rand:
    """Seeded random tensors on the device (floats) and on CPU (routing draws)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.cpu = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std: float = 1.0, dtype=None) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, device=self.device) * std
        return t.to(dtype or self.dtype)

    def weights(self, T: int, k: int) -> torch.Tensor:
        """Routing weights [T,k] fp32: positive, each row sums to 1."""
        return torch.softmax(self.normal(T, k, dtype=torch.float32), dim=-1)

    def ids(self, case: Case, E: Optional[int] = None) -> torch.Tensor:
        E = case.E if E is None else E
        return routing_ids(case.T, E, case.k, case.routing, self.cpu).to(self.device)


def _dims(case: Case, dtype: torch.dtype, ids: Optional[torch.Tensor] = None) -> Dims:
    """Dims of a case; `active` = distinct ids when the routing is given."""
    active = None if ids is None else int(torch.unique(ids[ids >= 0]).numel())
    return Dims(case.T, case.d_in, case.d_out, case.E, case.k, case.r,
                torch.empty((), dtype=dtype).element_size(), active)


def _dispatched(case: Case, rnd: _Rand) -> Tuple[Dict[str, Any], torch.Tensor]:
    ids = rnd.ids(case)
    order, pos, eo = ref.dispatch(ids, case.E, 1)
    meta = dict(rank_offsets=uniform_rank_offsets(case.E, case.r, rnd.device), order=order,
                pos=pos, expert_offsets=eo, weights=rnd.weights(case.T, case.k))
    return meta, ids


def make_softmax_topk(case, device, dtype, seed):
    rnd = _Rand(device, dtype, seed)
    bias = router_bias(case.E, case.routing).to(device)
    return Problem({"logits": (rnd.normal(case.T, case.E, dtype=torch.float32) + bias).to(dtype),
                    "k": case.k}, _dims(case, dtype))


def make_dispatch(case, device, dtype, seed):
    ids = _Rand(device, dtype, seed).ids(case)
    return Problem({"ids": ids, "E": case.E}, _dims(case, dtype, ids))


def make_gather_rows(case, device, dtype, seed):
    rnd = _Rand(device, dtype, seed)
    meta, ids = _dispatched(case, rnd)
    return Problem({"x": rnd.normal(case.T, case.d_in), **meta}, _dims(case, dtype, ids))


def make_combine_rows(case, device, dtype, seed):
    rnd = _Rand(device, dtype, seed)
    meta, ids = _dispatched(case, rnd)
    y_perm = rnd.normal(case.T * case.k, case.d_out)
    return Problem({"y_perm": y_perm, **meta}, _dims(case, dtype, ids))


def make_sgmv_shrink(case, device, dtype, seed):
    rnd = _Rand(device, dtype, seed)
    meta, ids = _dispatched(case, rnd)
    return Problem({"x": rnd.normal(case.T, case.d_in),
                    "A": rnd.normal(case.E * case.r, case.d_in, std=case.d_in ** -0.5),
                    "r": case.r, **meta}, _dims(case, dtype, ids))


def make_sgmv_expand(case, device, dtype, seed):
    rnd = _Rand(device, dtype, seed)
    meta, ids = _dispatched(case, rnd)
    return Problem({"h": rnd.normal(case.T * case.k, case.r),
                    "B": rnd.normal(case.d_out, case.E * case.r, std=case.r ** -0.5),
                    "scales": torch.full((case.E,), 2.0, device=device),
                    "base": rnd.normal(case.T, case.d_out), **meta}, _dims(case, dtype, ids))


def make_stacked_gated_lora(case, device, dtype, seed):
    rnd = _Rand(device, dtype, seed)
    T, E, r = case.T, case.E, case.r
    return Problem({"x": rnd.normal(T, case.d_in),
                    "A": rnd.normal(E * r, case.d_in, std=case.d_in ** -0.5),
                    "B": rnd.normal(case.d_out, E * r, std=r ** -0.5),
                    "gate": torch.softmax(rnd.normal(T, E, dtype=torch.float32), -1).to(dtype),
                    "rank_offsets": uniform_rank_offsets(E, r, device),
                    "scales": torch.full((E,), 2.0, device=device),
                    "base": rnd.normal(T, case.d_out)}, _dims(case, dtype))


def make_rank_topk(case, device, dtype, seed):
    rnd = _Rand(device, dtype, seed)
    return Problem({"h": rnd.normal(case.T, case.E * case.r), "k": case.k}, _dims(case, dtype))


def make_rank_sparse_expand(case, device, dtype, seed):
    rnd = _Rand(device, dtype, seed)
    ids = rnd.ids(case, case.E * case.r)
    return Problem({"values": rnd.normal(case.T, case.k), "ids": ids,
                    "B": rnd.normal(case.d_out, case.E * case.r),
                    "weights": rnd.weights(case.T, case.k), "scale": 0.25,
                    "base": rnd.normal(case.T, case.d_out)}, _dims(case, dtype, ids))


def make_moe_lora(case, device, dtype, seed):
    rnd = _Rand(device, dtype, seed)
    T, d_in, d_out, E, r = case.T, case.d_in, case.d_out, case.E, case.r
    args = layer.LayerArgs(
        x=rnd.normal(T, d_in), W0=rnd.normal(d_out, d_in, std=d_in ** -0.5),
        Wg=rnd.normal(E, d_in, std=d_in ** -0.5), bg=router_bias(E, case.routing).to(device, dtype),
        A=rnd.normal(E * r, d_in, std=d_in ** -0.5), B=rnd.normal(d_out, E * r, std=r ** -0.5),
        rank_offsets=uniform_rank_offsets(E, r, device),
        scales=torch.full((E,), 2.0, device=device), k=case.k, r=r)
    _, ids = ref.softmax_topk(F.linear(args.x, args.Wg, args.bg), case.k, True)
    return Problem(args._asdict(), _dims(case, dtype, ids))


# --- calls through a namespace ----------------------------------------------------------------


def _meta(i):
    return i["rank_offsets"], i["order"], i["pos"], i["expert_offsets"]


def _layer_impl(name: str, fn, **kw) -> Impl:
    return Impl(name, "baseline", lambda i: fn(layer.LayerArgs(**i)), **kw)


def _linear_fp64(i):
    return F.linear(i["x"].double(), i["W0"].double())


def _algo_impl(algo: str) -> Impl:
    import molora_ops
    return Impl(algo, "baseline", lambda i: layer.moe_lora_layer(molora_ops, layer.LayerArgs(**i),
                                                                 algo))


def layer_baselines(device: torch.device, dtype: torch.dtype) -> List[Impl]:
    # Each formulation of moe_lora_linear by itself next to the backend rows (algo="auto").
    impls = [_algo_impl("grouped"), _algo_impl("dense")]
    if device.type == "cuda":
        impls.append(_algo_impl("fused"))
    impls += [_layer_impl("loop", layer.per_expert_loop),
              _layer_impl("bmm", layer.padded_bmm)]
    if layer.grouped_mm_support(device, dtype) is None:
        impls.append(_layer_impl("grouped_mm", layer.grouped_mm, optional=True))
    impls.append(_layer_impl("base", layer.base_linear, model="linear", grads=("x",),
                             oracle=_linear_fp64))
    return impls


_ROUTE_BWD = ("softmax_route_backward",)
_SGMV = ("sgmv_shrink", "sgmv_expand", "sgmv_weight_grad", "sgmv_expand_backward", "pair_dot")

SPECS: Dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("softmax_topk", make_softmax_topk,
           lambda ns, i: ns.softmax_topk(i["logits"], i["k"], True),
           ("logits",), ("softmax_topk",) + _ROUTE_BWD),
    OpSpec("dispatch", make_dispatch, lambda ns, i: ns.dispatch(i["ids"], i["E"], 1),
           (), ("dispatch",)),
    OpSpec("gather_rows", make_gather_rows,
           lambda ns, i: ns.gather_rows(i["x"], i["order"], i["pos"], i["weights"]),
           ("x", "weights"), ("gather_rows", "combine_rows", "pair_dot")),
    OpSpec("combine_rows", make_combine_rows,
           lambda ns, i: ns.combine_rows(i["y_perm"], i["order"], i["pos"], i["weights"]),
           ("y_perm", "weights"), ("combine_rows", "gather_rows", "pair_dot")),
    OpSpec("sgmv_shrink", make_sgmv_shrink,
           lambda ns, i: ns.sgmv_shrink(i["x"], i["A"], *_meta(i), None, None, max_rank=i["r"]),
           ("x", "A"), _SGMV),
    OpSpec("sgmv_expand", make_sgmv_expand,
           lambda ns, i: ns.sgmv_expand(i["h"], i["B"], *_meta(i), i["weights"], i["scales"],
                                        i["base"]),
           ("h", "B", "weights"), _SGMV),
    OpSpec("stacked_gated_lora", make_stacked_gated_lora,
           lambda ns, i: ns.stacked_gated_lora(i["x"], i["A"], i["B"], i["gate"],
                                               i["rank_offsets"], i["scales"], i["base"], False),
           ("x", "A", "B", "gate"), ("stacked_gated_lora", "stacked_gated_lora_backward")),
    OpSpec("rank_topk", make_rank_topk, lambda ns, i: ns.rank_topk(i["h"], i["k"]),
           ("h",), ("rank_topk", "rank_scatter")),
    OpSpec("rank_sparse_expand", make_rank_sparse_expand,
           lambda ns, i: ns.rank_sparse_expand(i["values"], i["ids"], i["B"], i["weights"],
                                               i["scale"], i["base"]),
           ("values", "B", "weights"),
           ("rank_sparse_expand", "rank_sparse_shrink", "rank_sparse_weight_grad")),
    OpSpec("moe_lora", make_moe_lora, lambda ns, i: layer.moe_lora_layer(ns, layer.LayerArgs(**i)),
           ("x", "Wg", "A", "B"), ("softmax_topk", "dispatch") + _ROUTE_BWD + _SGMV,
           layer_baselines,
           describe=lambda i, mode: layer.auto_algo(layer.LayerArgs(**i), mode != "fwd")),
)}
