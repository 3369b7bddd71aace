"""molora_ops: fused Mixture-of-LoRA-Experts operators for PyTorch.

Ops live in ``torch.ops.molora`` and as typed wrappers here (declared in ``molora_ops/ops/``;
kernels: C++ from the native extension, Triton, or the reference); the pure-PyTorch oracle of
each is ``molora_ops.reference.<op>``. Op table: docs/OPS.md.
"""

from ._extension import extension_error, has_extension
from . import reference
from . import ops
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all
from . import backend
from .backend import get_backend, set_backend, use_backend
from ._checks import set_value_checks, use_value_checks, value_checks
from . import plan
from . import functional
from .functional import moe_lora_linear, routed_moe_lora_linear

__version__ = "0.1.0"

__all__ = ["has_extension", "extension_error", "reference", "ops", "backend", "get_backend",
           "set_backend", "use_backend", "functional", "plan", "moe_lora_linear",
           "routed_moe_lora_linear", "set_value_checks", "use_value_checks", "value_checks",
           "__version__"] + list(_ops_all)
