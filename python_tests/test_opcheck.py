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
    assert len(ALL_OPS) == 22, ALL_OPS
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
