"""molora_ops: fused Mixture-of-LoRA-Experts operators for PyTorch.

Ops live in ``torch.ops.molora`` (native extension) and as typed wrappers here; the pure-PyTorch
oracle of each is ``molora_ops.reference.<op>``. Op table: docs/OPS.md.
"""

from ._extension import extension_error, has_extension
from . import reference
from . import ops
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all
from . import backend
from .backend import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["has_extension", "extension_error", "reference", "ops", "backend", "get_backend",
           "set_backend", "use_backend", "__version__"] + list(_ops_all)
