"""The op table: every op of molora_ops is ONE ``define(...)`` call (in ``ops/<family>.py``).

From that declaration come: the schema (``torch.library`` in namespace ``molora``), the fake
kernel (metadata checks + output allocation), the autograd formula, the Python-served kernels
(the reference on CPU when the native extension is missing; the Triton launcher or the reference
on CUDA for an op with no CUDA C++ kernel), the value checks those Python kernels run, the
reference oracle of the tests, and the op lists (``ALL_OPS``, ``FORWARD_OPS``, ``BACKWARD_OPS``,
``TRITON_OPS``) that the tests, the sanitizer script, ``info`` and the backends iterate (the
tests require standard samples for every declared op: python_tests/utils.py ``op_samples``).
docs/OPS.md "Adding an op" is the checklist.

Kernels of the native extension are registered from C++ with ``TORCH_LIBRARY_IMPL`` only (CPU:
csrc/torch_bindings.cpp; CUDA: csrc/cuda/*.cu), so on CUDA ``torch.ops.molora.<op>`` reaches a
C++ kernel with no Python on the way (a Python autograd kernel runs first when autograd is on, as
for every ``torch.library`` op; not under ``torch.inference_mode``). ``molora_ops.backend`` can
override the CUDA kernels for tests and benchmarks (``use_backend``) and restores them after.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import _checks
from .._checks import opmath_dtype
from .._extension import has_extension

__all__ = ["OpDef", "OPS", "define", "call", "native", "opmath"]

# The public library and a private mirror of the same schemas whose only kernel is the reference:
# the CUDA C++ launchers call ``molora_ref::<op>`` for float64 (their kernels take fp16/bf16/fp32).
_LIB = torch.library.Library("molora", "FRAGMENT")
_REF_LIB = torch.library.Library("molora_ref", "FRAGMENT")


@dataclass
class OpDef:
    """One op. ``schema`` is ``"name(args) -> outputs"``; ``check(*args)`` raises on bad metadata
    (no data reads); ``fake(*args)`` allocates the outputs (after ``check``); ``reference(*args)``
    is the pure-PyTorch oracle (its value checks included); ``values(*args)`` the value checks a
    Python-served kernel runs first (``_checks`` decides host or device); ``triton`` the launcher
    ``"module:function"`` in molora_ops.triton."""

    name: str
    schema: str
    check: Callable
    fake: Callable
    reference: Callable
    values: Optional[Callable] = None
    triton: Optional[str] = None
    backward: Optional[Callable] = None
    setup_context: Optional[Callable] = None
    # "forward" (public, differentiable), "backward" (used by autograd) or "pipeline" (several
    # of the forward ops in one call, differentiable: an entry of molora_ops.functional calls it)
    kind: str = "forward"
    autocast: Tuple[str, ...] = ()  # the matmul operands cast to the autocast dtype (see below)
    op: Optional[torch._ops.OpOverload] = field(default=None, repr=False)
    native_kernels: Tuple[str, ...] = ()  # dispatch keys served by C++ kernels of molora_ops._C
    # Nothing for ``call`` to skip: no autograd kernel, or a C++ one (csrc/autograd.cpp), which
    # calls the kernel below it at once where there is nothing to record.
    plain_call: bool = False

    def reference_entry(self, *args):
        """The reference as a kernel: metadata checks, then the oracle (which checks values)."""
        self.check(*args)
        return self.reference(*args)

    def triton_launcher(self) -> Callable:
        module, fn = self.triton.split(":")
        return getattr(importlib.import_module(f"molora_ops.triton.{module}"), fn)

    def triton_entry(self) -> Callable:
        """The Triton launcher as a kernel: float64 data goes to the reference (the launchers take
        fp16/bf16/fp32), then metadata and value checks, then the launch. The launcher is bound
        on first use (importing triton at ``import molora_ops`` would cost every CPU user)."""
        check, values, reference_entry = self.check, self.values, self.reference_entry
        bound: List[Callable] = []

        def entry(*args):
            if args[0].dtype is torch.float64:
                return reference_entry(*args)
            if not bound:
                bound.append(self.triton_launcher())
            check(*args)
            if values is not None:
                with _checks.one_launch(self.name):  # on CUDA: one check kernel, one assert
                    values(*args)
            return bound[0](*args)

        entry.__name__ = f"{self.name}_triton"
        return entry


OPS: Dict[str, OpDef] = {}


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when triton imports (a GPU runs it; ``TRITON_INTERPRET=1`` runs it on CPU tensors).
    Cached: a failed import is not cached by Python, and ``serving`` / ``info`` ask per op."""
    try:
        importlib.import_module("triton")
    except Exception:  # not installed, or broken without a GPU driver
        return False
    return True


def _native_kernels(name: str) -> Tuple[str, ...]:
    if not has_extension():
        return ()
    return tuple(key for key in ("CPU", "CUDA")
                 if torch._C._dispatch_has_kernel_for_dispatch_key(f"molora::{name}", key))


def _has_cpp_autograd(name: str) -> bool:
    return has_extension() and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"molora::{name}", "Autograd")


def gpu_entry(opdef: OpDef) -> Callable:
    """The Python kernel that serves ``opdef`` on CUDA when the extension has no CUDA C++ kernel
    for it: its Triton launcher if it has one (and triton imports), else the reference."""
    if opdef.triton is not None and has_triton():
        return opdef.triton_entry()
    return opdef.reference_entry


def define(schema: str, *, check: Callable, fake: Callable, reference: Callable,
           values: Optional[Callable] = None, triton: Optional[str] = None,
           backward: Optional[Callable] = None, setup_context: Optional[Callable] = None,
           kind: str = "forward", autocast: Tuple[str, ...] = ()) -> OpDef:
    """Declares op ``molora::<name>`` (see the module docstring) and returns its ``OpDef``.

    ``autocast`` names the arguments that one matmul reads together (activation, bank, ``base``;
    they must share a dtype): under CPU / CUDA autocast they are cast to the autocast dtype, as
    ``torch.mm`` would cast them; every other argument keeps its dtype. See ``_register_autocast``.
    """
    name = schema.split("(", 1)[0]
    if name in OPS:
        raise RuntimeError(f"molora op {name!r} is defined twice")
    opdef = OpDef(name, schema, check, fake, reference, values, triton, backward, setup_context,
                  kind, tuple(autocast))
    _LIB.define(schema)
    _REF_LIB.define(schema)
    _REF_LIB.impl(name, opdef.reference_entry, "CompositeExplicitAutograd")
    opdef.native_kernels = _native_kernels(name)
    opdef.plain_call = backward is None or _has_cpp_autograd(name)

    def fake_kernel(*args):
        check(*args)
        return fake(*args)

    torch.library.register_fake(f"molora::{name}", fake_kernel, lib=_LIB)
    # csrc/autograd.cpp registers C++ autograd kernels for a few ops (the same formulas): then
    # the Python formula is only the pure-Python build's.
    if backward is not None and not _has_cpp_autograd(name):
        torch.library.register_autograd(f"molora::{name}", once_differentiable(
            _without_autocast(backward)), setup_context=setup_context, lib=_LIB)
    if "CPU" not in opdef.native_kernels:
        _LIB.impl(name, opdef.reference_entry, "CPU")
    if "CUDA" not in opdef.native_kernels:
        _LIB.impl(name, _lazy_gpu_entry(opdef), "CUDA")
    opdef.op = getattr(torch.ops.molora, name).default
    _register_autocast(opdef)
    OPS[name] = opdef
    return opdef


_TWICE = ("molora: trying to differentiate twice a function that was marked with "
          "@once_differentiable (the ops' gradients are first-order only)")


def once_differentiable(backward: Callable) -> Callable:
    """Every autograd formula is first-order only: its gradients are exact, and differentiating
    them again raises (the message above). The formulas call backward-only ops that have no
    autograd of their own, so a recorded double backward came out silently zero or incomplete
    (gradgradcheck failed for every op). Stricter than ``torch.autograd.function.
    once_differentiable``, which marks the gradients only when an incoming gradient requires
    grad: whenever a backward is recorded (create_graph=True) they are marked, so a gradient
    penalty over a loss linear in the output raises too instead of missing this node's part."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        recording = torch.is_grad_enabled()
        with torch.no_grad():
            outs = backward(ctx, *grads)
        if not recording:
            return outs
        single = not isinstance(outs, tuple)
        outs = (outs,) if single else outs
        marked = [o.detach().requires_grad_() if isinstance(o, torch.Tensor)
                  and o.is_floating_point() else o for o in outs]
        flagged = [o for o in marked if isinstance(o, torch.Tensor) and o.requires_grad]
        if flagged:
            errors = torch._C._functions.DelayedError(_TWICE.encode(), len(flagged))(*flagged)
            errors = iter(errors if isinstance(errors, tuple) else (errors,))
            marked = [next(errors) if isinstance(o, torch.Tensor) and o.requires_grad else o
                      for o in marked]
        return marked[0] if single else tuple(marked)

    return run


def _without_autocast(backward: Callable) -> Callable:
    """The autograd formula run with autocast off: a backward computes in the dtypes the forward
    ran in (autocast chose them then) and keeps its opmath parts in fp32, also when
    ``.backward()`` is called inside an autocast region."""
    def run(ctx, *grads):
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return backward(ctx, *grads)

    run.__name__ = getattr(backward, "__name__", "backward")
    return run


# Autocast keys of the devices whose kernels we register (the CPU and CUDA kernels).
_AUTOCAST_DEVICES = (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA"))
# Dtypes autocast may cast (as torch's own autocast: float64 and integer tensors never are).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))


def _register_autocast(opdef: OpDef) -> None:
    """The op's rule under ``torch.autocast`` (CPU and CUDA, any autocast dtype).

    Without an Autocast kernel the dispatcher falls through with autocast still on, so every
    ``mm`` inside our kernels (the C++ CPU kernels call ``at::mm``) would be autocast behind the
    kernel's back and return a dtype the kernel does not expect. The rule: the arguments named in
    ``opdef.autocast`` (the operands of the op's matmuls) are cast to the autocast dtype when they
    are fp32 / fp16 / bf16 tensors on that device, like ``torch.mm``'s operands; the others
    (routing weights, gates, scales, logits, ids) keep their dtype; then the op runs with autocast
    off for that device, so nothing inside it is cast again. Ops with no such argument (routers,
    dispatch, gather / combine, the selection ops) just run in their input dtypes.
    """
    names = [a.name for a in opdef.op._schema.arguments]
    unknown = [n for n in opdef.autocast if n not in names]
    if unknown:
        raise RuntimeError(f"molora op {opdef.name!r}: autocast names unknown arguments {unknown}")
    cast_at = tuple(names.index(n) for n in opdef.autocast)
    op = opdef.op

    for device_type, key_name in _AUTOCAST_DEVICES:
        key = getattr(torch._C.DispatchKey, key_name)
        keyset = torch._C.DispatchKeySet(key)

        def run(*args, _device_type=device_type, _keyset=keyset):
            if cast_at:
                dtype = torch.get_autocast_dtype(_device_type)
                args = list(args)
                for i in cast_at:
                    t = args[i]
                    if (isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE
                            and t.dtype != dtype and t.device.type == _device_type):
                        args[i] = t.to(dtype)
            with torch._C._ExcludeDispatchKeyGuard(_keyset):
                return op(*args)

        run.__name__ = f"{opdef.name}_{key_name}"
        # The dispatcher's kernel, and the same rule for the Python dispatcher (torch.compile
        # traces autocast regions through it), as torch.library.register_autocast does.
        _LIB.impl(opdef.name, lambda _ks, *args, _run=run: _run(*args), key_name, with_keyset=True)
        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(run)


def _lazy_gpu_entry(opdef: OpDef) -> Callable:
    """``gpu_entry(opdef)``, bound on the first CUDA call (no triton import before that)."""
    bound: List[Callable] = []

    def entry(*args):
        if not bound:
            bound.append(gpu_entry(opdef))
        return bound[0](*args)

    entry.__name__ = f"{opdef.name}_gpu"
    return entry


def native(name: str) -> Callable:
    """Op ``name`` as the backward formulas call it: through ``call``, so inside a backward (run
    with grad mode off, ``once_differentiable``) the call skips the op's own autograd kernel, a
    Python function that would only find there is nothing to record. NOTE: measured on
    softmax_topk's backward at T=256 (before its autograd moved to C++): 1.04x -> 0.96x the
    reference's time (min of alternating runs, 2-core CPU). (Not cached: dynamo, tracing
    moe_lora_linear's grouped node, warns on every lru_cache-wrapped call it meets.)"""
    return functools.partial(call, name)


_any_requires_grad = torch._C._any_requires_grad
_below_autograd = torch._C._AutoDispatchBelowAutograd


def call(name: str, *args):
    """Runs op ``name`` through the dispatcher (the typed wrappers' body).

    When no gradient can flow (grad mode off, or no input requires grad), the call skips the
    op's autograd kernel: ``torch.library``'s is a Python function that the dispatcher boxes every
    argument for, even to find that there is nothing to record, and it is most of a decode-size
    call's overhead (bench/results/cpu-overhead-2026-12-03). An op with a C++ autograd kernel
    (``plain_call``) is called as it is: that kernel makes the same test itself. Traced code keeps
    the plain call."""
    opdef = OPS[name]
    if (opdef.plain_call or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and _any_requires_grad(*args))):
        return opdef.op(*args)
    with _below_autograd():
        return opdef.op(*args)


def opmath(*tensors):
    """The tensors in their opmath dtype (fp32 for fp16/bf16; no copy for fp32/fp64)."""
    return tuple(t.to(opmath_dtype(t.dtype)) for t in tensors)

