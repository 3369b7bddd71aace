"""Optional: method-level layers from ``molora_ops.modules`` (MixLoRA FFN, X-LoRA dense over 9
adapters, SMoRA r=64 k=8), benchmarked as whole nn.Modules.

Each method is looked up in ``molora_ops.modules`` when the suite starts; a method whose module is
missing (ImportError) or whose constructor does not take the arguments below (AttributeError,
TypeError) is skipped with a printed note, and the rest of the suite runs as usual.

A module is called through ``torch.func.functional_call`` with its trainable parameters passed as
inputs (``p.<name>``), so the suite's leaves / gradients / rotation machinery applies unchanged.
Its oracle is a float64 copy of the same module (the modules call the ops themselves, so there is
no backend to swap). Rows per method (the ``moe_lora`` layer's structure):

* ``module``: the ``molora_ops.modules`` nn.Module;
* ``loop``: the per-expert Python loop of the reference code users run today (MoE-PEFT /
  PEFT / srmole, each spelled out below), on the module's own parameters, so it is checked
  against the same float64 module and differentiates the same inputs;
* ``base``: the frozen layer alone (FFN or linear), d/dx only, against its float64 self: the
  ``x base`` column is the method's overhead over the model without adapters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cases import Impl, OpSpec, Problem, _dims
from .models import Cost, Dims, model
from .shapes import MODELS, XLORA, Case


# --- byte / FLOP models (same conventions as bench.models) -------------------------------------


@model
def mixlora_ffn(d: Dims) -> Dict[str, Cost]:
    """MixLoRA FFN, d = d_in, d_ff = d_out: frozen W1, W3 [d_ff,d], W2 [d,d_ff] run once per token
    (6*T*d*d_ff), router 2*T*d*E, LoRA experts on the three projections 3 * 2*P*r*(d + d_ff).
    bwd: dx through the frozen base (6*T*d*d_ff), router 4*T*d*E, LoRA 3 * 4*P*r*(d + d_ff); writes
    dx, dWg and the three LoRA banks whole."""
    T, P, d_, f, E, r, b = d.T, d.P, d.d_in, d.d_out, d.E, d.r, d.elem
    base = 3 * d_ * f * b
    lora = 3 * d.E_act * r * (d_ + f) * b
    fwd = Cost(6 * T * d_ * f + 2 * T * d_ * E + 6 * P * r * (d_ + f),
               T * d_ * b + base + E * d_ * b + lora + T * d_ * b)
    bwd = Cost(6 * T * d_ * f + 4 * T * d_ * E + 12 * P * r * (d_ + f),
               T * d_ * b + T * d_ * b + base + E * d_ * b + lora + T * d_ * b + E * d_ * b
               + 3 * E * r * (d_ + f) * b)
    return {"fwd": fwd, "bwd": bwd}


@model
def gated_ffn(d: Dims) -> Dict[str, Cost]:
    """The frozen FFN alone, W2 (silu(W1 x) * W3 x), d = d_in, d_ff = d_out: 6*T*d*d_ff each way
    (bwd: dx only); reads x (bwd: and gy), W1, W3, W2; writes y (bwd: dx)."""
    T, d_, f, b = d.T, d.d_in, d.d_out, d.elem
    return {"fwd": Cost(6 * T * d_ * f, (2 * T * d_ + 3 * d_ * f) * b),
            "bwd": Cost(6 * T * d_ * f, (3 * T * d_ + 3 * d_ * f) * b)}


@model
def xlora_dense(d: Dims) -> Dict[str, Cost]:
    """X-LoRA layer: frozen W0 + N = E frozen adapters mixed by scalings [T,N]:
    2*T*d_in*d_out + 2*T*R*(d_in + d_out). bwd (x and the scalings; adapters frozen): dx through
    W0, u = x A^T, z = gy B, dx += (g z) A: 2*T*d_in*d_out + 2*T*R*(2*d_in + d_out)."""
    T, R, di, do, E, b = d.T, d.R, d.d_in, d.d_out, d.E, d.elem
    weights = do * di * b + R * (di + do) * b
    fwd = Cost(2 * T * di * do + 2 * T * R * (di + do),
               T * di * b + weights + T * E * b + T * do * b)
    bwd = Cost(2 * T * di * do + 2 * T * R * (2 * di + do),
               T * do * b + T * di * b + weights + T * E * b + T * di * b + T * E * b)
    return {"fwd": fwd, "bwd": bwd}


@model
def smora(d: Dims) -> Dict[str, Cost]:
    """SMoRA: frozen W0, a router over R = E ranks (2*T*d_in*R), k kept ranks per token through
    rank_sparse_shrink / expand (2*T*k*(d_in + d_out)). bwd: dx through W0, router 4*T*d_in*R,
    LoRA 4*T*k*(d_in + d_out); writes dx, dWr, dA, dB whole."""
    T, R, k, di, do, b = d.T, d.R, d.k, d.d_in, d.d_out, d.elem
    params = R * di * b + R * di * b + do * R * b  # router, A, B
    fwd = Cost(2 * T * di * do + 2 * T * di * R + 2 * T * k * (di + do),
               T * di * b + do * di * b + params + T * do * b)
    bwd = Cost(2 * T * di * do + 4 * T * di * R + 4 * T * k * (di + do),
               T * do * b + T * di * b + do * di * b + params + T * di * b + params)
    return {"fwd": fwd, "bwd": bwd}


# --- building the modules -----------------------------------------------------------------------


def _linear(d_in, d_out, device, dtype):
    return nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)


def _build_mixlora(mods, case, device, dtype):
    d, f = case.d_in, case.d_out
    m = mods.MixLoRA(_linear(d, f, device, dtype), _linear(d, f, device, dtype),
                     _linear(f, d, device, dtype), num_experts=case.E, k=case.k, r=case.r,
                     dropout=0.0)
    return m, {}


def _build_xlora(mods, case, device, dtype):
    m = mods.XLoRALinear(_linear(case.d_in, case.d_out, device, dtype), case.r, 16.0,
                         num_adapters=case.E, init="gaussian")
    scalings = torch.softmax(torch.randn(case.T, case.E, device=device), -1).to(dtype)
    return m, {"scalings": scalings}


def _build_smora(mods, case, device, dtype):
    m = mods.SMoRA(_linear(case.d_in, case.d_out, device, dtype), r=case.E * case.r, k=case.k,
                   dropout=0.0)
    return m, {}


# --- the baselines: what the reference code runs, on the module's own weights -----------------
# Each takes (module, weights, x, **extra): the module for its sizes, ``weights`` every parameter
# and buffer by name, the trainable ones being the harness's inputs ``p.<name>`` (see on_module).


def _expert_lora(m: nn.Module, W, bank: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """s_e B_e (A_e x) of expert e of the LoRABank ``bank`` (PEFT's lora_B(lora_A(x)) * scaling)."""
    r0, r1 = m.get_submodule(bank).ranks_slice(e)
    h = F.linear(x, W[f"{bank}.A"][r0:r1])
    return F.linear(h, W[f"{bank}.B"][:, r0:r1]) * W[f"{bank}.scales"][e]


def _router_logits(W, x: torch.Tensor) -> torch.Tensor:
    """The fp32 router of the modules (fp64 stays fp64): x Wg^T."""
    op = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x.to(op), W["router.linear.weight"].to(op))


def mixlora_loop(m, W, x):
    """MoE-PEFT ``MixtralSparseMoe.forward`` with MixLoRA experts (``_mixlora_forward``, its
    efficient operator): softmax -> top-k -> renormalise; W1 x and W3 x once for all tokens; per
    expert, its pairs ``tok, slot = nonzero(ids == e)`` run the expert's FFN
    ``W2 a + s B2 A2 a``, ``a = silu(W1 x + s B1 A1 x) * (W3 x + s B3 A3 x)`` (W2 once per pair),
    ``index_add_`` weighted by the routing weight."""
    w, ids = torch.softmax(_router_logits(W, x), -1).topk(m.gating.k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    g0, u0 = F.linear(x, W["gate_proj.weight"]), F.linear(x, W["up_proj.weight"])
    y = torch.zeros_like(x)
    for e in range(m.num_experts):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        a = (F.silu(g0[tok] + _expert_lora(m, W, "gate_lora", e, xe))
             * (u0[tok] + _expert_lora(m, W, "up_lora", e, xe)))
        ye = F.linear(a, W["down_proj.weight"]) + _expert_lora(m, W, "down_lora", e, a)
        y.index_add_(0, tok, (ye * w[tok, slot, None]).to(y.dtype))
    return y


def ffn_base(m, W, x):
    """The frozen FFN alone: W2 (silu(W1 x) * W3 x)."""
    a = F.silu(F.linear(x, W["gate_proj.weight"])) * F.linear(x, W["up_proj.weight"])
    return F.linear(a, W["down_proj.weight"])


def xlora_loop(m, W, x, scalings):
    """PEFT ``XLoraLinearLayer.forward``: ``y = W0 x + sum_n s_n B_n A_n (x * scalings[:, n])``,
    one adapter at a time (global scaling weight 1, no top-k: the module's defaults)."""
    y = F.linear(x, W["base.weight"])
    for n in range(m.num_experts):
        y = y + _expert_lora(m, W, "bank", n, x * scalings[:, n:n + 1])
    return y


def linear_base(m, W, x, **_):
    """The frozen linear alone: W0 x."""
    return F.linear(x, W["base.weight"])


def smora_loop(m, W, x):
    """srmole ``SRMoLELinear.forward`` with ``dense_compute``: ``g = sigmoid(x Wg^T)``, top-k of
    ``g + b``, gate ``v / sum v * k`` scattered into a dense [T, r] mask,
    ``y = W0 x + alpha/k ((x A^T) * gate) B^T``."""
    g = torch.sigmoid(_router_logits(W, x))
    v, idx = (g + W["rank_bias"]).topk(m.k, dim=-1)
    gate = torch.zeros_like(g).scatter(1, idx, v / v.sum(-1, keepdim=True) * m.k)
    h = F.linear(x, W["lora.A"]) * gate
    return F.linear(x, W["base.weight"]) + F.linear(h.to(x.dtype), W["lora.B"]) * m.scaling


def module_forward(m, W, x, **extra):
    """The module itself, its weights (trainable ones from the inputs) through functional_call."""
    return torch.func.functional_call(m, W, (x,), extra)


# --- the methods --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable  # (molora_ops.modules, case, device, dtype) -> (module, extra inputs)
    extra_grads: Tuple[str, ...]  # inputs besides x that get gradients
    loop: Callable  # (module, weights, x, **extra) -> y: the reference code's per-expert loop
    base: Callable  # (module, weights, x, **extra) -> y: the frozen layer alone
    base_model: str  # the byte / FLOP model of `base`


METHODS = (
    Method("mixlora_ffn", _build_mixlora, (), mixlora_loop, ffn_base, "gated_ffn"),
    Method("xlora_dense", _build_xlora, ("scalings",), xlora_loop, linear_base, "linear"),
    Method("smora", _build_smora, (), smora_loop, linear_base, "linear"),
)

_EXTRA = ("scalings",)  # inputs passed to the module's forward besides x


def _params(inputs: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    return {n[2:]: v for n, v in inputs.items() if n.startswith("p.")}


def on_module(fn: Callable) -> Callable[[Dict[str, Any]], Any]:
    """inputs -> fn(module, its parameters and buffers with the trainable ones taken from the
    inputs' ``p.<name>``, x, **extra inputs)."""
    def run(inputs: Dict[str, Any]):
        m = inputs["module"]
        weights = {**dict(m.named_parameters()), **dict(m.named_buffers()), **_params(inputs)}
        extra = {k: v for k, v in inputs.items() if k in _EXTRA}
        return fn(m, weights, inputs["x"], **extra)
    return run


def fp64(run: Callable) -> Callable[[Dict[str, Any]], Any]:
    """`run` in float64: on the module's float64 copy, floating inputs upcast."""
    def oracle(inputs: Dict[str, Any]):
        up = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items()}
        return run({**up, "module": inputs["module64"]})
    return oracle


def _spec(method: Method, mods) -> OpSpec:
    def make(case: Case, device, dtype, seed) -> Problem:
        torch.manual_seed(seed)  # module initialisation uses the global generator
        module, extra = method.build(mods, case, device, dtype)
        module.eval()  # no dropout, no training-time side effects (SMoRA's bias update)
        with torch.no_grad():  # LoRA B starts at 0: make the adapters do something
            for p in module.parameters():
                if p.requires_grad and not p.any():
                    p.normal_(0.0, 0.02)
        params = {f"p.{n}": p.detach() for n, p in module.named_parameters() if p.requires_grad}
        x = torch.randn(case.T, case.d_in, device=device).to(dtype)
        inputs = {"module": module, "module64": copy.deepcopy(module).double(), "x": x, **extra,
                  **params}
        return Problem(inputs, _dims(case, dtype),
                       grads=("x",) + method.extra_grads + tuple(params))

    module = on_module(module_forward)
    oracle = fp64(module)

    def impls(device, dtype) -> List[Impl]:
        base = on_module(method.base)
        return [Impl("module", "module", module, oracle=oracle),
                Impl("loop", "baseline", on_module(method.loop), oracle=oracle),
                Impl("base", "baseline", base, model=method.base_model, grads=("x",),
                     oracle=fp64(base))]

    return OpSpec(method.name, make, lambda ns, i: module(i), ("x",), baselines=impls,
                  use_backends=False)


def method_cases(preset: str) -> List[Case]:
    """The method layers' cases of a preset (names as in METHODS); none in `layer`."""
    if preset == "layer":
        return []
    if preset == "full":
        cases = [Case(T, d, f, 8, 2, 16, op="mixlora_ffn", tag=f"{name}.ffn")
                 for name, (d, f) in MODELS.items() for T in (16, 4096)]
        d, f = MODELS["llama2-7b"]
        cases += [Case(T, d, d, op="xlora_dense", tag="llama2-7b.q", **XLORA) for T in (16, 4096)]
        cases += [Case(T, d, f, 64, 8, 1, op="smora", tag="llama2-7b.up") for T in (16, 4096)]
        return cases
    tiny = preset == "tiny"
    d, f, T = (64, 96, 8) if tiny else (512, 1376, 256)
    return [Case(T, d, f, 8, 2, 8 if tiny else 16, op="mixlora_ffn", tag="ffn"),
            Case(T, d, d, op="xlora_dense", tag="q", **XLORA),
            Case(T, d, f, 16 if tiny else 64, 4 if tiny else 8, 1, op="smora", tag="up")]


def method_specs() -> Tuple[Dict[str, OpSpec], List[str]]:
    """({name: spec} of the methods molora_ops.modules provides, [notes on those skipped])."""
    try:
        import molora_ops.modules as mods
    except Exception as exc:  # absent (ImportError), or broken mid-edit: never stop the suite
        return {}, [f"method layers skipped: molora_ops.modules not importable "
                    f"({type(exc).__name__}: {exc})"]
    specs, notes = {}, []
    probe = torch.device("cpu")
    for method in METHODS:
        case = next(c for c in method_cases("tiny") if c.op == method.name)
        try:
            method.build(mods, case, probe, torch.float32)
        except (ImportError, AttributeError, TypeError) as exc:
            notes.append(f"{method.name} skipped: {type(exc).__name__}: {exc}")
            continue
        specs[method.name] = _spec(method, mods)
    return specs, notes
