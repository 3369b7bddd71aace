"""Every op that has a CUDA kernel runs its standard samples (utils.op_samples) in CPU emulation
(torch.ops.molora_emu, csrc/emu/) against the reference. An op gets covered automatically as soon
as its launcher registers it (MOLORA_CUDA_LIBRARY_IMPL in csrc/cuda/<family>.cu); ops without a
kernel yet skip with the reason. Forward outputs only (the CUDA ops have no autograd of their own).
The per-family emulated tests (test_cuda_emulated_<family>.py) cover the edge cases in depth.

Cannot hang: deadlocks in a kernel are detected by the shim and the watchdog
(MOLORA_EMU_TIMEOUT_S) stops endless kernels.
"""
import pytest
import torch

from emu_utils import emu_op, require_emu
from utils import ALL_OPS, compare_with_reference, op_samples

require_emu()

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cast_floats(x, dtype):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(dtype)
    if isinstance(x, torch.Tensor):
        return x.detach()
    return x


def _has_float_input(args, kwargs):
    return any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in list(args) + list(kwargs.values()))


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_samples_emulated(name):
    op = emu_op(name)
    for sid, args, kwargs in op_samples(name):
        # fp64 is not a kernel dtype (the launchers hand it to the reference): run such
        # samples in fp32; compare_with_reference still checks against the fp64 reference.
        args = tuple(_cast_floats(a, torch.float32) if isinstance(a, torch.Tensor) and a.dtype == torch.float64
                     else _cast_floats(a, a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: _cast_floats(v, torch.float32) if isinstance(v, torch.Tensor) and v.dtype == torch.float64
                  else v for k, v in kwargs.items()}
        try:
            compare_with_reference(name, args, kwargs, ours_fn=op)
        except AssertionError as exc:
            raise AssertionError(f"{name} sample {sid!r}: {exc}") from exc


@pytest.mark.parametrize("name", ALL_OPS)
def test_fp64_goes_to_the_reference(name):
    """float64 data never reaches a kernel: the CUDA launchers hand it to the reference
    (molora_ref::<op>), whose result they return unchanged."""
    op = emu_op(name)
    from molora_ops.ops import OPS
    tried = False
    for _sid, args, kwargs in op_samples(name):
        if not _has_float_input(args, kwargs):
            continue
        tried = True
        args = tuple(_cast_floats(a, torch.float64) for a in args)
        kwargs = {k: _cast_floats(v, torch.float64) for k, v in kwargs.items()}
        got = op(*args, *kwargs.values())
        want = OPS[name].reference(*args, *kwargs.values())
        got = got if isinstance(got, (tuple, list)) else (got,)
        want = want if isinstance(want, (tuple, list)) else (want,)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), name
    if not tried:
        pytest.skip(f"{name} has no floating-point input")
