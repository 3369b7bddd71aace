"""torch.library.opcheck (schema, autograd registration, fake tensor, aot_dispatch_dynamic) for every
op of torch.ops.molora (the op declarations, molora_ops/ops/), on small samples that include a ragged one (empty expert, ragged /
rank-0 ranks, -1 ids) per op. Forward ops with gradients get requires_grad inputs."""
import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import ALL_OPS, BACKWARD_OPS, op_samples as samples, require_ext_enabled

pytestmark = pytest.mark.needs_ext


_N_SAMPLES = {name: len(samples(name)) for name in ALL_OPS}
PARAMS = [(n, i) for n in ALL_OPS for i in range(_N_SAMPLES[n])]


def test_extension_loaded_and_all_ops_registered():
    if not molora_ops.has_extension():
        pytest.fail("extension not loaded") if require_ext_enabled() else pytest.skip("extension not loaded")
    assert len(ALL_OPS) == 23, ALL_OPS
    assert all(n >= 1 for n in _N_SAMPLES.values()), _N_SAMPLES  # every op has samples
    for name in ALL_OPS:
        op = getattr(torch.ops.molora, name)
        assert hasattr(op, "default"), name
        assert callable(getattr(molora_ops, name)), name
        assert callable(getattr(ref, name)), name


@pytest.mark.parametrize("name,idx", PARAMS, ids=[f"{n}-{i}" for n, i in PARAMS])
def test_opcheck(name, idx):
    sid, args, kwargs = samples(name)[idx]
    op = getattr(torch.ops.molora, name).default
    if name in BACKWARD_OPS or name in ("dispatch", "id_histogram"):
        assert not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    else:
        assert any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("name,idx", [(n, i) for n, i in PARAMS if n not in BACKWARD_OPS
                                      and n not in ("dispatch", "id_histogram")],
                         ids=[f"{n}-{i}" for n, i in PARAMS if n not in BACKWARD_OPS
                              and n not in ("dispatch", "id_histogram")])
@pytest.mark.parametrize("loss_kind", ["square", "linear"])
def test_double_backward_raises(name, idx, loss_kind):
    """Every op's gradients are first-order only (their formulas call backward-only ops with no
    autograd of their own): with create_graph=True the first-order gradients are the ones
    without it, and differentiating them again raises, where it used to give a silently wrong
    (zero or partial) second derivative; also for a loss linear in the outputs, whose incoming
    gradient does not require grad (a gradient penalty would otherwise miss the op's part)."""
    sid, args, kwargs = samples(name)[idx]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outs = getattr(molora_ops, name)(*args, **kwargs)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,))
            if o.is_floating_point() and o.requires_grad]
    if not outs or sum(o.numel() for o in outs) == 0:
        pytest.skip(f"{sid}: nothing to differentiate")
    if loss_kind == "square":
        loss = sum((o.float() ** 2).sum() for o in outs)
    else:
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum()
                   for o in outs)
    plain = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    for a, b in zip(grads, plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    live = [g for g in grads if g is not None and g.requires_grad]
    assert live, f"{sid}: no gradient recorded for a second differentiation"
    with pytest.raises(RuntimeError, match="differentiate twice"):
        sum(g.float().sum() for g in live).backward()
