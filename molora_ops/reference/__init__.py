"""Pure-PyTorch reference implementations of every op in docs/OPS.md.

They are the test oracle (forwards differentiable with plain autograd w.r.t. the inputs the contract
lists as having a gradient) and the fallback implementation when the native extension is missing.
"""

from . import dispatch as _dispatch, masked as _masked, router as _router, sgmv as _sgmv
from .dispatch import *  # noqa: F401,F403
from .masked import *  # noqa: F401,F403
from .router import *  # noqa: F401,F403
from .sgmv import *  # noqa: F401,F403

# One list per family module; this package re-exports them all.
__all__ = [*_router.__all__, *_dispatch.__all__, *_sgmv.__all__, *_masked.__all__]
