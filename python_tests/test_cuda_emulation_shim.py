"""Tests of the CUDA emulation shim itself (csrc/emu/cuda_emu.h), through the self-test kernels of
csrc/emu/emu_selftest.cu (private op torch.ops.molora_emu._selftest(name, x, a, b)).

The expected values are computed here from the CUDA programming guide's definitions, independently
of the shim's code. Every misuse case must raise (RuntimeError) and never hang.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from emu_utils import require_emu

emu = require_emu()


def st(name, x=None, a=0, b=0):
    if x is None:
        x = torch.zeros(1)
    return emu._selftest(name, x, a, b)


# --------------------------------------------------------------------------------------------
# Shared memory, __syncthreads, block-level patterns
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [32, 64, 256, 1024])
def test_block_sum_shared_memory(threads):
    x = torch.randn(1000, dtype=torch.float64)
    out = st("block_sum", x, threads, 3)
    assert out.shape == (3,)
    torch.testing.assert_close(out, x.sum().expand(3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_block_scan(threads):
    x = torch.randint(-50, 50, (threads,), dtype=torch.int32)
    out = st("block_scan", x)
    assert torch.equal(out, x.cumsum(0).to(torch.int32))


def test_static_shared_per_instantiation():
    out = st("static_smem")
    f32 = torch.arange(31, -1, -1, dtype=torch.float32) * 2 + 32
    i32 = torch.arange(63, -1, -1, dtype=torch.float32) * 2 + 64
    assert torch.equal(out, torch.cat([f32, i32, f32]))


@pytest.mark.parametrize("keep", [1, 31, 33, 100, 255, 256])
def test_early_exit_then_syncthreads_does_not_hang(keep):
    x = torch.randn(256)
    out = st("early_exit", x, 256, keep)
    assert torch.equal(out, x[:keep].flip(0))


def test_3d_grid_and_block():
    out = st("dims")
    nthreads, nblocks = 64, 12
    expect = (torch.arange(nthreads).repeat(nblocks) + 1000 * torch.arange(nblocks).repeat_interleave(nthreads))
    assert torch.equal(out, expect.to(torch.int32))


# --------------------------------------------------------------------------------------------
# Dynamic shared memory
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,threads", [(1, 32), (100, 64), (1000, 256)])
def test_dynamic_smem(n, threads):
    x = torch.randn(3, n)
    out = st("dyn_smem", x, threads, 0)
    assert torch.equal(out, x.flip(1))


def test_dynamic_smem_limit_and_opt_in():
    n = 16 * 1024  # 64 KiB > the 48 KiB default
    x = torch.randn(2, n)
    with pytest.raises(RuntimeError, match="invalid configuration argument.*dynamic shared memory"):
        st("dyn_smem", x, 256, 48 * 1024)  # the kernel's limit: the default
    out = st("dyn_smem", x, 256, 4 * n)  # set_max_dynamic_smem(kernel, 64 KiB) first
    assert torch.equal(out, x.flip(1))
    with pytest.raises(RuntimeError, match="invalid argument"):  # above the hardware limit
        st("dyn_smem", x, 256, 228 * 1024)


def test_uninitialised_dynamic_smem_is_poisoned():
    out = st("uninit_smem", a=64)
    assert torch.isnan(out).all()


def test_dynamic_smem_overflow_detected():
    with pytest.raises(RuntimeError, match="outside its 40 bytes of dynamic shared memory"):
        st("smem_overflow", a=10)


# --------------------------------------------------------------------------------------------
# Warp intrinsics
# --------------------------------------------------------------------------------------------

def shfl_expect(x, mode, a, width):
    """CUDA programming guide, warp shuffle functions (per lane of each warp of 32)."""
    out = x.clone()
    for t in range(x.numel()):
        lane, base = t % 32, t - t % 32
        seg = (lane // width) * width  # first lane of this lane's width-segment
        if mode == "idx":  # srcLane outside [0, width) -> srcLane modulo width, same segment
            src = seg + a % width
        elif mode == "up":  # lane - delta; unchanged if (lane % width) < delta
            src = lane if lane % width < a else lane - a
        elif mode == "down":  # lane + delta; unchanged if (lane % width) + delta >= width
            src = lane if lane % width + a >= width else lane + a
        else:  # xor: earlier segments reachable, later ones -> own value
            src = lane ^ a
            if src >= seg + width:
                src = lane
        out[t] = x[base + src]
    return out


SHFL_CASES = [
    ("idx", 0, 32), ("idx", 31, 32), ("idx", 7, 8), ("idx", 9, 8), ("idx", -1, 16), ("idx", 5, 1),
    ("up", 1, 32), ("up", 16, 32), ("up", 3, 8), ("up", 0, 32), ("up", 4, 4),
    ("down", 1, 32), ("down", 31, 32), ("down", 2, 16), ("down", 5, 8),
    ("xor", 1, 32), ("xor", 16, 32), ("xor", 31, 32), ("xor", 2, 4), ("xor", 8, 8), ("xor", 16, 8),
]


@pytest.mark.parametrize("mode,a,width", SHFL_CASES, ids=[f"{m}-{a}-w{w}" for m, a, w in SHFL_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.float64, torch.int64],
                         ids=["f32", "i32", "f64", "i64"])
def test_shuffles(mode, a, width, dtype):
    n = 128 * 2  # two blocks of 4 warps
    if dtype.is_floating_point:
        x = torch.randn(n, dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        x = torch.randint(info.min, info.max, (n,), dtype=dtype)
    out = st(f"shfl_{mode}", x, a, width)
    assert torch.equal(out, shfl_expect(x, mode, a, width))


def test_bad_shuffle_width():
    with pytest.raises(RuntimeError, match="width must be a power of two"):
        st("shfl_xor", torch.randn(32), 1, 12)


def test_warp_sum_many_blocks():
    x = torch.randn(256 * 16)
    out = st("warp_sum", x, 256)
    torch.testing.assert_close(out, x.view(-1, 32).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["random", "zeros", "ones", "one-hot"])
def test_votes(kind):
    n = 64 * 3
    if kind == "random":
        x = torch.randint(0, 4, (n,), dtype=torch.int32)
    elif kind == "zeros":
        x = torch.zeros(n, dtype=torch.int32)
    elif kind == "ones":
        x = torch.full((n,), 3, dtype=torch.int32)
    else:
        x = torch.zeros(n, dtype=torch.int32)
        x[5] = 7
    out = st("vote", x, 64)
    xw = x.view(-1, 32)
    bits = (1 << torch.arange(32, dtype=torch.int64))
    ballot = ((xw != 0).long() * bits).sum(1)
    match = torch.stack([((xw[w] == xw[w, l]).long() * bits).sum() for w in range(xw.shape[0]) for l in range(32)])
    assert torch.equal(out[:, 0], ballot.repeat_interleave(32))
    assert torch.equal(out[:, 1], (xw != 0).any(1).long().repeat_interleave(32))
    assert torch.equal(out[:, 2], (xw != 0).all(1).long().repeat_interleave(32))
    assert torch.equal(out[:, 3], match)


# --------------------------------------------------------------------------------------------
# Atomics
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bins,blocks", [(7, 1), (100, 3)])
def test_atomics_many_threads(bins, blocks):
    n = 3000
    x = torch.randint(0, bins, (n,), dtype=torch.int32)
    out = st("atomics", x, bins, blocks)
    assert torch.equal(out[:bins], torch.bincount(x.long(), minlength=bins))
    assert out[bins].item() == n  # float atomicAdd of 1.0 (exact below 2^24)
    assert out[bins + 1].item() == int(x.long().sum())
    assert out[bins + 2].item() == int(x.max()) and out[bins + 3].item() == int(x.min())
    assert out[bins + 4].item() == n  # atomicCAS increment loop


# --------------------------------------------------------------------------------------------
# Errors: device assert, launch configuration, misuse, deadlocks, watchdog
# --------------------------------------------------------------------------------------------

def test_device_assert_raises_and_clears():
    x = torch.rand(300)
    x[137] = -1.0
    with pytest.raises(RuntimeError, match=r"device-side assert triggered.*selftest: negative input"):
        st("assert", x, 64)
    # the error was reported once; the next launch runs normally
    y = torch.rand(300)
    assert torch.equal(st("assert", y, 64), y)


@pytest.mark.parametrize("grid,block,msg", [
    (1, 1000, "not a multiple of 32"),
    (1, 16, "not a multiple of 32"),
    (1, 2048, "out of range"),
    (1, 0, "out of range"),
    (0, 32, "out of range"),
    (-3, 32, "out of range"),
    (2 ** 31, 32, "out of range"),
])
def test_invalid_launch_configuration(grid, block, msg):
    with pytest.raises(RuntimeError, match=f"invalid configuration argument.*{msg}"):
        st("launch", a=grid, b=block)
    assert st("launch", a=3, b=64).item() == 1  # not sticky


@pytest.mark.parametrize("case,msg", [
    ("deadlock", "deadlock in block"),
    ("deadlock2", "deadlock in block"),
    ("partial_mask", "only the full mask"),
    ("exited_lane", "after some of its lanes exited"),
    ("divergent_ops", "execute different warp intrinsics"),
    ("throw", "exception escaped a kernel thread.*thrown from a kernel thread"),
])
def test_misuse_is_reported_not_hung(case, msg):
    with pytest.raises(RuntimeError, match=msg):
        st(case)
    assert torch.equal(st("block_sum", torch.ones(64), 64, 1), torch.tensor([64.0]))


def test_watchdog_stops_endless_kernel():
    """A block spinning on a flag another block sets (not allowed: blocks run sequentially here)
    is stopped by the watchdog instead of hanging (subprocess: the timeout is read once)."""
    code = textwrap.dedent("""
        import torch
        from molora_ops._emu import load_emu
        load_emu()
        try:
            torch.ops.molora_emu._selftest("spin", torch.zeros(1), 0, 0)
        except RuntimeError as e:
            print("RAISED", str(e).splitlines()[0])
        else:
            print("NO ERROR")
    """)
    env = dict(os.environ, MOLORA_EMU_TIMEOUT_S="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "RAISED" in r.stdout and "watchdog" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_launch_in_forked_child():
    """The worker pool is per process: a child forked after launches starts its own workers."""
    x = torch.randn(500, dtype=torch.float64)
    st("block_sum", x, 256, 1)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if the launch works
        ok = False
        try:
            ok = bool(torch.allclose(st("block_sum", x, 256, 1), x.sum().view(1)))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
