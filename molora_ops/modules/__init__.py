"""MoE-LoRA methods as nn.Modules on the fused ops (issue 5's reference layer).

One small core and thin method definitions on top:

* ``LoRABank`` (bank.py): E LoRA experts stacked in the ops' bank layout, with the four data paths
  (routed, routed per slot, dense, per expert) each a fixed composition of ``molora_ops`` ops.
* ``Router`` + gating policies + ``Routing`` (routing.py): logits -> sparse or dense gates.
* ``MoLoRALinear`` / ``LoRALinear`` (layers.py): frozen base + bank + router + policy.
* ``MoELoRAFFN`` (ffn.py): the shared-base MoE-FFN (W1/W3 once, W2 once on the weighted sum).
* methods.py: MixLoRA, LLaVA-MoLE, MoLA, LoRAMoE, HydraLoRA, DynMoLE, MeteoRA, FlexMoRE, MoELoRA,
  LoRA-Mixer, ReMix, LoRA Soups (CAT), MoLE, CoMoL, SMoRA, FlyLoRA, MoRA.
* xlora.py (X-LoRA, two-pass), sequence.py (MiLoRA, Poly / TensorPoly).
* losses.py: the aux losses (load balance, z-loss, Tsallis entropy, LoRAMoE LBC, aux-free bias).

Every method is importable from here: ``from molora_ops.modules import MixLoRA``.
"""

from . import losses
from .bank import Dispatched, LoRABank, lora_scaling
from .ffn import MoELoRAFFN
from torch import nn as _nn

from .layers import (LoRALinear, MoLoRALinear, base_dtype, base_forward, frozen_linear,
                     is_quantized)
from .methods import *  # noqa: F401,F403
from .methods import __all__ as _methods_all
from .routing import (DenseSoftmax, EqualWeightTopK, Router, Routing, SigmoidTopK, StaticGate,
                      StraightThroughTopK, SwitchTop1, TopK, TopKSoftmax, TopP)
from .sequence import *  # noqa: F401,F403
from .sequence import __all__ as _sequence_all
from .xlora import *  # noqa: F401,F403
from .xlora import __all__ as _xlora_all

__all__ = [
    "losses", "LoRABank", "Dispatched", "lora_scaling", "MoLoRALinear", "LoRALinear",
    "frozen_linear", "is_quantized", "base_dtype", "base_forward", "MoELoRAFFN", "Routing", "Router", "TopK", "TopKSoftmax", "TopP",
    "SigmoidTopK", "DenseSoftmax", "SwitchTop1", "EqualWeightTopK", "StaticGate",
    "StraightThroughTopK", "reset_parameters", *_methods_all, *_xlora_all, *_sequence_all,
]


def reset_parameters(module: _nn.Module) -> _nn.Module:
    """Calls ``reset_parameters()`` of every submodule that has one, children before parents
    (``module.apply``), and returns ``module``.

    The meta-device path of FSDP2 / accelerate: build under ``with torch.device("meta"):``,
    ``model.to_empty(device=...)`` (parameters AND buffers then hold uninitialised memory), then
    ``reset_parameters(model)``: every parameter gets its constructor's init and every buffer
    (``LoRABank.rank_offsets`` / ``scales``, selection biases, CoMoL's core offsets) its
    constructor's value. The order does not matter for our modules (a plain ``for m in
    model.modules(): m.reset_parameters()`` loop gives the same result); base linears are
    re-initialised randomly too: load the pre-trained weights afterwards.
    """
    def reset(m):
        fn = getattr(m, "reset_parameters", None)
        if callable(fn):
            fn()

    return module.apply(reset)
