"""MoE-LoRA training under torch.distributed (docs/DISTRIBUTED.md): 2 gloo ranks on the CPU.

For MixLoRA (FFN experts + attention LoRA), MoLA (experts on attention and MLP) and SMoRA
(rank-wise, with the aux-free ``rank_bias`` statistic), a tiny ``apply_molora`` Llama trains 3 SGD
steps under DDP and under FSDP2 (``fully_shard`` on the decoder layers and the root: the frozen
base and the adapters sharded), with and without activation checkpointing. Every rank's losses
(aux losses included), adapter weights and buffers must equal those of one process taking the same
steps (``distributed_finetune.reference``: the global batch in one forward for SMoRA; for the
methods with a load-balancing loss, one micro-batch per rank, accumulated, because their loss is
a product of per-forward means, see the example's doc). One spawn of 2 ranks runs every case (and
the references, in the ranks' processes before the group exists). The engines are the real ones;
the only collective of ours is the statistic reduction.
"""

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from molora_ops import distributed as mdist
from molora_ops.examples import distributed_finetune as ex  # imports transformers lazily
from molora_ops.examples import distributed_memory
from molora_ops.modules import SMoRA, losses

HAVE_GLOO = dist.is_available() and dist.is_gloo_available()
needs_gloo = pytest.mark.skipif(not HAVE_GLOO, reason="torch.distributed is built without the "
                                "gloo backend (or without distributed support): no CPU process "
                                "group can be created")

TOL = 1e-5
WORLD = 2
CASES = [(m, e, c) for m in ex.METHODS for e in ex.ENGINES for c in (False, True)]
SYNC_OFF = ("smora", "ddp", False, False)   # the same DDP run with the reduction switched off
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs():
    pytest.importorskip("transformers")  # the tiny Llama of the example
    t0 = time.perf_counter()
    ranks, refs = ex.run_distributed(CASES + [SYNC_OFF], steps=3, world=WORLD, progress=True)
    print(f"\n2-rank spawn, {len(CASES) + 1} cases + {len(refs)} references: "
          f"{time.perf_counter() - t0:.1f} s")
    return ranks, refs


@needs_gloo
@pytest.mark.parametrize("case", CASES, ids=["-".join([c[0], c[1]] + (["ckpt"] if c[2] else []))
                                             for c in CASES])
def test_ranks_match_single_process(runs, case):
    ranks, refs = runs
    method, _, ckpt = case
    ref = refs[(method, ckpt)]
    for r in range(WORLD):
        res = ranks[r][case]
        assert len(res["loss"]) == 3
        d = ex.max_diffs(res, ref, r)
        assert all(v <= TOL for v in d.values()), (r, d)
        if method == "smora":
            assert "buffers" in d
            # the bias did move (rate 1e-2 in the example): the equality is not vacuous
            bias = [v for k, v in res["state"].items() if k.endswith("rank_bias")]
            assert bias and max(b.abs().max().item() for b in bias) >= 1e-2
        else:
            assert all(a > 0 for a in res["aux"])
    # and the replicas are identical to each other
    s0, s1 = ranks[0][case]["state"], ranks[1][case]["state"]
    assert max((s0[k] - s1[k]).abs().max().item() for k in s0) <= TOL


@needs_gloo
def test_switch_off_lets_smora_bias_drift(runs):
    """With the reduction off each rank follows its own counts: the replicas' rank_bias differ
    (the behaviour the reduction fixes) while the gradients are still averaged by DDP."""
    ranks, refs = runs
    s0, s1 = ranks[0][SYNC_OFF]["state"], ranks[1][SYNC_OFF]["state"]
    ref = refs[("smora", False)]["state"]
    bias_keys = [k for k in s0 if k.endswith("rank_bias")]
    drift = max((s0[k] - s1[k]).abs().max().item() for k in bias_keys)
    assert drift >= 1e-2
    assert max((s0[k] - ref[k]).abs().max().item() for k in bias_keys) >= 1e-2


# --- the reduction itself, without processes: one all_reduce per update, and the switch ---------


@pytest.fixture
def fake_group(monkeypatch):
    """Pretend a 2-rank group is initialised: all_reduce doubles the tensor (the other rank
    holds the same counts) and records the call."""
    calls = []

    def all_reduce(t, op=None, group=None, async_op=False):
        calls.append((t.dtype, tuple(t.shape), op, group))
        t.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


@needs_gloo
def test_bias_update_reduces_counts_once(fake_group, monkeypatch):
    other = torch.tensor([0, 0, 0, 6])    # the other rank's counts

    def all_reduce(t, op=None, group=None, async_op=False):
        fake_group.append((t.dtype, tuple(t.shape), op, group))
        t.add_(other)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1]])
    b = torch.zeros(4)
    losses.aux_free_bias_update_(b, ids, 4, 0.5)
    assert fake_group == [(torch.int64, (4,), dist.ReduceOp.SUM, None)]
    # local [3, 2, 1, 0] (alone: [-1, -1, +1, +1]); summed [3, 2, 1, 6], mean 3 -> [0, +1, +1, -1]
    torch.testing.assert_close(b, torch.tensor([0.0, 0.5, 0.5, -0.5]))


@needs_gloo
def test_switch_global_module_and_call(fake_group):
    ids = torch.tensor([[0, 1]])
    with mdist.use_sync_statistics(False):
        assert not mdist.statistics_sync_active()
        losses.aux_free_bias_update_(torch.zeros(3), ids, 3, 1.0)
        losses.aux_free_bias_update_(torch.zeros(3), ids, 3, 1.0, sync=True)  # per call wins
    assert len(fake_group) == 1
    losses.aux_free_bias_update_(torch.zeros(3), ids, 3, 1.0, sync=False)
    assert len(fake_group) == 1
    assert mdist.sync_statistics() and mdist.statistics_sync_active()

    torch.manual_seed(0)
    m = SMoRA(torch.nn.Linear(8, 8), r=4, k=2, dropout=0.0).train()
    x = torch.randn(3, 8)
    m(x)
    assert len(fake_group) == 2           # one reduction per training forward
    m.eval()(x)
    assert len(fake_group) == 2           # none in eval (no update)
    m.train().sync_statistics = False     # per module
    m(x)
    assert len(fake_group) == 2
    off = SMoRA(torch.nn.Linear(8, 8), r=4, k=2, dropout=0.0, sync_statistics=False).train()
    off(x)
    assert len(fake_group) == 2
    with pytest.raises(TypeError):
        mdist.set_sync_statistics(1)


@needs_gloo
def test_reduced_update_reads_nothing_on_the_host(fake_group):
    """The statistic path with the reduction active stays free of host reads (the switch and the
    group test are pure Python)."""
    from host_reads import count_host_reads
    from molora_ops import _checks

    torch.manual_seed(0)
    m = SMoRA(torch.nn.Linear(8, 8), r=4, k=2, dropout=0.0).train()
    x = torch.randn(3, 8, requires_grad=True)
    with _checks.use_value_checks("device"):
        with count_host_reads() as reads:
            m(x).sum().backward()
    assert len(fake_group) == 1
    bad = reads.made_by(("molora_ops/",))
    assert not bad, reads.report(bad)


def test_no_reduction_without_group():
    assert not dist.is_initialized()
    assert not mdist.statistics_sync_active(True)
    c = torch.tensor([1, 2])
    assert mdist.all_reduce_counts_(c) is c and c.tolist() == [1, 2]


# --- the doc's numbers come from the script ------------------------------------------------------


def test_doc_numbers_are_the_scripts():
    table = distributed_memory.markdown()
    doc = (ROOT / "docs" / "DISTRIBUTED.md").read_text()
    assert table in doc, "docs/DISTRIBUTED.md: regenerate the table with " \
                         "python -m molora_ops.examples.distributed_memory"
    b7 = distributed_memory.LLAMA2_7B
    assert abs(b7.params - 6.738e9) < 1e6          # Llama-2-7B's published count
    assert abs(distributed_memory.LLAMA2_70B.params - 68.98e9) < 1e7
    # the per-GPU sharded state shrinks as 1/N
    e8, e64 = (distributed_memory.estimate(b7, n) for n in (8, 64))
    assert abs(e8["sharded_gib"] / e64["sharded_gib"] - 8) < 1e-9
