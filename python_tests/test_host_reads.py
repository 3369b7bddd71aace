"""Self-test of python_tests/host_reads.py: every counted pattern is caught, once, with its call
site; plain tensor math, int-repeat repeat_interleave, where(cond, a, b), index with an int
tensor, CPU -> CPU .to() are not; the patches are gone after the block."""
import math
import os

import pytest
import torch

from host_reads import count_host_reads

import molora_ops

_PKG = os.path.dirname(os.path.abspath(molora_ops.__file__))


def _t():
    return torch.tensor([[1.0, -2.0, 3.0], [0.0, 5.0, -6.0]])


def _setitem_mask(x):
    x[x > 0] = 0.0


def _setitem_mask_tuple(x):
    x[(x > 0).any(1), 0] = 1.0


READS = {
    "item": lambda x: x[0, 0].item(),
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "cpu": lambda x: x.cpu(),  # a no-op on CPU, a device -> host copy elsewhere
    "bool": lambda x: bool(x.any()),
    "if": lambda x: 1 if (x > 0).all() else 0,
    "not": lambda x: not x.any(),
    "int": lambda x: int(x.sum()),
    "float": lambda x: float(x.sum()),
    "complex": lambda x: complex(x.sum()),
    "index": lambda x: list(range(10))[x[0, 0].long()],
    "range": lambda x: range(x.shape[0] + x.sum().long()),
    "math": lambda x: math.sqrt(x.abs().sum()),
    "format": lambda x: f"{x.sum():.3f}",
    "repr": lambda x: repr(x),
    "str": lambda x: str(x),
    "contains": lambda x: 3.0 in x,
    "nonzero": lambda x: x.nonzero(),
    "nonzero-as-tuple": lambda x: x.nonzero(as_tuple=True),
    "torch.nonzero": lambda x: torch.nonzero(x),
    "argwhere": lambda x: torch.argwhere(x),
    "where-1-arg": lambda x: torch.where(x > 0),
    "unique": lambda x: torch.unique(x),
    "Tensor.unique": lambda x: x.unique(),
    "unique_consecutive": lambda x: torch.unique_consecutive(x),
    "masked_select": lambda x: torch.masked_select(x, x > 0),
    "Tensor.masked_select": lambda x: x.masked_select(x > 0),
    "getitem-mask": lambda x: x[x > 0],
    "getitem-mask-tuple": lambda x: x[(x > 0).any(1), :2],
    "setitem-mask": _setitem_mask,
    "setitem-mask-tuple": _setitem_mask_tuple,
    "repeat_interleave-tensor": lambda x: torch.repeat_interleave(x[0], torch.tensor([1, 2, 1])),
    "repeat_interleave-1-arg": lambda x: torch.repeat_interleave(torch.tensor([1, 2])),
    "Tensor.repeat_interleave-tensor": lambda x: x[0].repeat_interleave(torch.tensor([1, 2, 1])),
    "equal": lambda x: torch.equal(x, x),
    "allclose": lambda x: torch.allclose(x, x),
    "is_nonzero": lambda x: torch.is_nonzero(x[0, 0]),
}

NO_READS = {
    "math": lambda x: (x * 2 + 1).exp().sum(-1).softmax(0),
    "where-3-arg": lambda x: torch.where(x > 0, x, 0.0),
    "masked_fill": lambda x: x.masked_fill(x > 0, 0.0),
    "getitem-int-tensor": lambda x: x[torch.tensor([1, 0])],
    "getitem-slice": lambda x: x[:, 1:],
    "setitem-slice": lambda x: x.clone().__setitem__((slice(None), 0), 1.0),
    "repeat_interleave-int": lambda x: x.repeat_interleave(2, dim=0),
    "repeat_interleave-output_size": lambda x: torch.repeat_interleave(
        x[0], torch.tensor([1, 2, 1]), output_size=4),
    "Tensor.repeat_interleave-output_size": lambda x: x[0].repeat_interleave(
        torch.tensor([1, 2, 1]), dim=0, output_size=4),
    "to-cpu-from-cpu": lambda x: x.to("cpu"),
    "to-dtype": lambda x: x.to(torch.float64),
    "copy-cpu-cpu": lambda x: torch.empty_like(x).copy_(x),
    "shape": lambda x: (x.shape[0], x.numel(), x.dim(), len(x)),
    "topk-sort": lambda x: (x.topk(2).indices, x.sort(-1).values, x.argmax(-1)),
    "assert_async": lambda x: torch._assert_async((x == x).all()),
}


@pytest.mark.parametrize("name", sorted(READS))
def test_each_read_is_counted_once(name):
    x = _t()
    with count_host_reads() as reads:
        READS[name](x)
    assert len(reads) == 1, reads.report()
    r = reads.records[0]
    assert r.path == os.path.abspath(__file__), r.site  # the caller, not torch's internals
    assert r.via == ()


@pytest.mark.parametrize("name", sorted(NO_READS))
def test_tensor_math_is_not_counted(name):
    x = _t()
    with count_host_reads() as reads:
        NO_READS[name](x)
    assert len(reads) == 0, reads.report()


def test_site_in_the_package_is_relative_and_filterable():
    """A read in a file under molora_ops/ is reported as molora_ops/<path>:<line>, with the
    package frames that led to it."""
    fake = os.path.join(_PKG, "modules", "_host_read_probe.py")  # never written: only a name
    src = ("def inner(t):\n"
           "    return int(t.sum())\n"
           "def outer(t):\n"
           "    return inner(t) + 1\n")
    ns = {}
    exec(compile(src, fake, "exec"), ns)
    with count_host_reads() as reads:
        ns["outer"](_t())
        _t()[0, 0].item()
    assert len(reads) == 2
    r = reads.records[0]
    assert (r.path, r.line, r.function) == ("molora_ops/modules/_host_read_probe.py", 2, "inner")
    assert r.via == ("molora_ops/modules/_host_read_probe.py:4 (outer)",)
    assert r.kind == "__int__"
    assert reads.under("molora_ops/modules/") == [r]
    assert reads.under("molora_ops/ops/", "molora_ops/reference/") == []
    assert "molora_ops/modules/_host_read_probe.py:2 (inner)" in reads.report()


def _probe(rel, src):
    ns = {"torch": torch}
    exec(compile(src, os.path.join(os.path.dirname(_PKG), rel), "exec"), ns)
    return ns


def test_made_by_follows_direct_helper_calls_only():
    """A read in a helper (molora_ops/reference/...) that a module calls directly is the module's;
    one behind an op's public wrapper (molora_ops/ops/) or a torch frame (an op dispatch,
    autograd) is not."""
    helper = _probe("molora_ops/reference/_probe.py", "def check(t):\n    return int(t.min())\n")
    wrapper = _probe("molora_ops/ops/_probe.py", "def op(check, t):\n    return check(t)\n")
    mod = _probe("molora_ops/modules/_probe.py",
                 "import torch.utils._pytree as pytree\n"
                 "def direct(check, t):\n    return check(t)\n"
                 "def through_op(op, check, t):\n    return op(check, t)\n"
                 "def through_torch(check, t):\n    return pytree.tree_map(check, [t])\n")
    ours, api = ("molora_ops/modules/",), ("molora_ops/ops/",)
    with count_host_reads() as reads:
        mod["direct"](helper["check"], _t())
        mod["through_op"](wrapper["op"], helper["check"], _t())
        mod["through_torch"](helper["check"], _t())
    assert len(reads) == 3 and all(r.path == "molora_ops/reference/_probe.py" for r in reads)
    direct, through_op, through_torch = reads.records
    assert direct.made_by(ours, api) and direct.via[0] == "molora_ops/modules/_probe.py:3 (direct)"
    assert not through_op.made_by(ours, api) and through_op.made_by(ours)
    assert not through_torch.made_by(ours) and "<torch>" in through_torch.chain
    assert reads.made_by(("molora_ops/",)) == reads.records
    assert reads.made_by(ours, api) == [direct]


def test_autograd_and_nn_frames_are_skipped():
    """A read inside torch (here a custom autograd Function's backward is ours, called by the
    engine) is attributed to our frame, not to torch/autograd."""

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            g.sum().item()
            return g * 2

    x = _t().requires_grad_()
    with count_host_reads() as reads:
        F.apply(x).sum().backward()
    assert len(reads) == 1 and reads.records[0].function == "backward", reads.report()


def test_patches_are_removed_and_blocks_do_not_nest():
    before = {n: torch.Tensor.__dict__.get(n) for n in ("item", "__bool__", "__getitem__", "to")}
    fns = (torch.where, torch.nonzero, torch.unique, torch.repeat_interleave)
    with count_host_reads():
        assert torch.Tensor.item is not before["item"]
        with pytest.raises(RuntimeError, match="nest"):
            with count_host_reads():
                pass
    assert {n: torch.Tensor.__dict__.get(n) for n in before} == before
    assert (torch.where, torch.nonzero, torch.unique, torch.repeat_interleave) == fns
    x = _t()
    assert bool(x.any()) and x[0, 0].item() == 1.0 and x[x > 0].numel() == 3


def test_results_are_unchanged():
    x = _t()
    with count_host_reads() as reads:
        got = (x[0, 0].item(), x[x > 0].clone(), torch.where(x > 0), torch.unique(x),
               torch.repeat_interleave(torch.tensor([1, 2])), int(x.sum()))
    want = (x[0, 0].item(), x[x > 0], torch.where(x > 0), torch.unique(x),
            torch.repeat_interleave(torch.tensor([1, 2])), int(x.sum()))
    assert len(reads) == 6
    assert got[0] == want[0] and got[5] == want[5]
    for a, b in zip(got[1:5], want[1:5]):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(u, v)
