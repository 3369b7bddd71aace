"""Ahead-of-time compilation of every Triton kernel (molora_ops.triton: sgmv, gated, masked) for
sm_90 and sm_80, without a GPU (Triton ships ptxas), asserting that no variant spills registers.

The CPU tests run the kernels in Triton's interpreter, which checks none of what only the compiler
sees (dot operand layouts and dtypes, tl.where / store dtypes, early returns, shared memory) and
cannot run bf16 dots at all. So this test compiles each kernel variant the launchers use, with
the block sizes and num_warps of the launchers' own config functions at large shapes: the flags
that change the code path in every combination the launchers pass (sgmv ATOMIC / SPLIT_LO, the
k = 1 and k > 1 expands, the fused kernel,
``_mm_kernel``'s gate and base epilogues with the operand dtypes of its launches, masked
B_IS_IDENTITY), the optional-operand flags (HAS_W, HAS_S, HAS_BASE: they only add loads) on, and
masked's expand with and without them. In bf16, fp16 and fp32 (the ieee fp32 dots), for
``GPUTarget("cuda", 90, 32)`` and ``GPUTarget("cuda", 80, 32)``: 100 compiles.

Spills: a spilling kernel still compiles and runs, only slower, so every variant's ``ptxas -v``
report (registers, spill store / load bytes) is read and any spill fails the test. The shapes
include the ones that used to spill: max_rank 128 (shrink, weight grad) and E = 256 (gate
backward). A CompiledKernel's own ``n_regs`` / ``n_spills`` cannot serve: Triton fills them in
when it loads the cubin into a CUDA context, which needs a device.

fp32 chains: the fp32 shrink and fused kernels must sum their long K reductions in chains
(``sgmv.FP32_CHAIN_K``); their TTGIR is read for a dot nested two loops deep (``CHAINED_FP32``).

Left out (``SKIPPED``), to keep the test under ~40 s on a 2-core CPU: the sm_80 fp16 and fp32
variants of sgmv's four biggest kernels (shrink, expand, fused, weight grad).
On sm_80 they are compiled in bf16, the same mma code path as fp16; fp32 runs its ieee dots as
FMAs, the same code on both targets, and is compiled for sm_90 (~1.5 s a variant).

The compiler runs in a subprocess without ``TRITON_INTERPRET`` (conftest sets it for the test
process before the kernel modules are imported) and with a fresh cache; all failing variants are
reported, not only the first. Skipped where CUDA is available: the GPU tests compile and run them.
Run this file as a script (``python python_tests/test_triton_compile.py [-v]``) to compile
outside pytest; ``-v`` prints each variant's compile time, registers and spill bytes.
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("triton")

pytestmark = pytest.mark.triton

ARCHS = (90, 80)
DTYPES = ("bf16", "fp16", "fp32")
# ("module.kernel", arch, dtype) left out of the matrix: see the module docstring
SKIPPED = {(f"sgmv.{k}", 80, dt) for dt in ("fp16", "fp32")
           for k in ("_shrink_kernel", "_expand_kernel", "_fused_moe_lora_kernel",
                     "_weight_grad_kernel")}


def _variants(dt: str):
    """(label, kernel, argument types, constexprs, num_warps) of every kernel variant for data
    dtype ``dt``: pointer types in the dict (by argument name), other arguments "i32" unless
    named; the flags as the launchers set them."""
    import triton.language as tl

    from molora_ops.triton import checks, gated, masked, sgmv

    d, f32 = "*" + dt, "*fp32"
    out = []

    def add(label, fn, types, cfg):
        cfg = dict(cfg)
        warps = cfg.pop("num_warps", 4)
        out.append((label, fn, types, cfg, warps))

    # sgmv: the launchers' block sizes at large shapes (64-row tiles) and max_rank 128, the rank
    # whose single 128-wide rank tile used to spill in shrink and weight grad
    big = dict(P=1 << 16, E=8, d_in=4096, d_out=4096, max_rank=128)
    blk = sgmv._blocks(**big)
    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    fused = sgmv._fused_blocks(4096, 4096, 4096, sgmv.FUSED_MAX_TOTAL_RANK, torch_dt)
    idx = {n: "*i32" for n in ("rank_offsets", "order", "expert_offsets", "pos")}
    idx.update(w=f32, scales=f32)
    prec = "ieee" if dt == "fp32" else "tf32"
    grouped = dict(HAS_W=True, HAS_S=True, DOT_PREC=prec, E_POW2=8, BLOCK_M=blk.M)
    for flag in (False, True):
        add(f"ATOMIC={flag}", sgmv._shrink_kernel, dict(idx, x=d, A=d, h=f32 if flag else d),
            dict(grouped, ATOMIC=flag, BLOCK_K=blk.K, BLOCK_R=blk.R))
    add("k=1", sgmv._expand_kernel, dict(idx, h=d, B=d, out=d),
        dict(grouped, BLOCK_N=blk.N, BLOCK_R=blk.R))
    add("k>1", sgmv._expand_token_kernel, dict(idx, h=d, B=d, base=d, y=d),
        dict(HAS_W=True, HAS_S=True, HAS_BASE=True, E_POW2=8, BLOCK_T=sgmv.BLOCK_T,
             BLOCK_N=blk.N))
    add("", sgmv._fused_moe_lora_kernel,
        dict(x=d, A=d, B=d, base=d, y=d, ids="*i32", w=f32, scales=f32, col_expert="*i32"),
        dict(HAS_W=True, HAS_S=True, HAS_BASE=True, DOT_PREC=prec, BLOCK_T=fused.M,
             BLOCK_K=fused.K, BLOCK_N=fused.N, BLOCK_R=fused.R, num_warps=sgmv.FUSED_WARPS))
    wg = sgmv._weight_grad_blocks(big["P"], big["E"], big["d_out"], big["max_rank"], torch_dt)
    add("", sgmv._weight_grad_kernel, dict(idx, x=d, h=d, G=d),
        dict(HAS_W=True, HAS_S=True, SPLIT_LO=dt != "fp32", DOT_PREC=prec, BLOCK_M=wg.M,
             BLOCK_R=wg.R, BLOCK_D=wg.N, num_warps=sgmv.WEIGHT_GRAD_WARPS))
    add("", sgmv._pair_dot_kernel, dict(a=d, b=d, out=f32, pos="*i32"),
        dict(A_BY_TOKEN=True, BLOCK_P=sgmv.BLOCK_T, BLOCK_D=64))

    # gated: _mm_kernel as each launch uses it (the fp32 [T, R] intermediates enter as f32
    # operands cast to the data dtype), a 64x128 and a 16x16 (decode / split-K) tile
    dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dt]
    mm = [  # (label, a, b, c, base / gate dummies, HAS_GATE, HAS_BASE, mm_config shape)
        ("shrink gated", d, d, f32, f32, True, False, (4096, 128, 4096)),
        ("expand +base", f32, d, d, d, False, True, (4096, 4096, 128)),
        ("dx/dA plain", f32, d, d, d, False, False, (128, 4096, 4096)),
        ("split-K partials", d, f32, f32, f32, False, False, (16, 16, 4096)),
    ]
    for label, a, b, c, dummy, has_gate, has_base, shape in mm:
        gate = dict(gate_ptr=d, scales_ptr=f32, group_ptr="*i32") if has_gate else \
            dict(gate_ptr=dummy, scales_ptr=dummy, group_ptr=dummy)
        cfg = gated.mm_config(*shape, fp32_operands=(a == "*fp32") + (b == "*fp32"))
        add(label, gated._mm_kernel, dict(gate, a_ptr=a, b_ptr=b, c_ptr=c, base_ptr=dummy),
            dict(cfg, HAS_GATE=has_gate, HAS_BASE=has_base, DOT_DTYPE=dot))
    # E = 256: a dgate tile as wide as E used to spill 2 KB
    for sum_reps in (False, True):
        add(f"E=256 SUM_REPS={sum_reps}", gated._gate_backward_kernel,
            dict(z_ptr=f32, u_ptr=f32, gate_ptr=d, scales_ptr=f32, group_ptr="*i32",
                 ro_ptr="*i32", dh_ptr=f32, hg_ptr=f32, dgate_ptr=d),
            dict(gated.gate_backward_config(128, 256), SUM_REPS=sum_reps))

    # masked
    add("", masked._sparse_shrink_kernel, dict(x_ptr=d, a_ptr=d, ids_ptr="*i32", h_ptr=d),
        masked.sparse_shrink_config(8, 4096))
    for identity, has_w, has_base, y in ((False, True, True, d), (False, False, False, d),
                                         (True, False, False, f32)):
        add(f"B_IS_IDENTITY={identity} HAS_W={has_w} HAS_BASE={has_base}",
            masked._sparse_expand_kernel,
            dict(v_ptr=d, ids_ptr="*i32", b_ptr=y if identity else d, w_ptr=d,
                 base_ptr=y if not has_base else d, y_ptr=y, scale="fp32"),
            dict(masked.sparse_expand_config(128 if identity else 4096), B_IS_IDENTITY=identity,
                 HAS_W=has_w, HAS_BASE=has_base))

    # checks: the one-launch value checks, int32 and int64 index tensors (no data dtype: with fp32)
    if dt == "fp32":
        for it in ("i32", "i64"):
            bounds = {f"{t}_{b}": "i64" for t in ("s0", "s1") for b in
                      ("f_lo", "f_hi", "d_lo", "d_hi", "l_lo", "l_hi")}
            bounds.update({f"{t}_{b}": "i64" for t in ("r0", "r1") for b in ("lo", "hi")})
            add(f"{it} indices", checks._values_ok_kernel,
                dict(bounds, ok="*i1", s0="*" + it, s1="*" + it, r0="*" + it, r1="*" + it),
                dict(BLOCK=checks.BLOCK))
    return out


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


# fp32 kernels whose long K loop must stay a sum of chains (sgmv.FP32_CHAIN_K): the TTGIR holds
# their dot in a loop nested in another. Written as `acc += tl.dot(a, b)` in one loop, Triton
# folds it back into one chain, silently.
CHAINED_FP32 = {"sgmv._shrink_kernel", "sgmv._fused_moe_lora_kernel",
                "sgmv._weight_grad_kernel"}


def dot_loop_depth(ttgir: str) -> int:
    """The deepest scf.for nesting of a tt.dot in a TTGIR listing (0: no dot in a loop). Each op
    prints on one line, with its attribute and layout braces balanced there; a region's braces
    open on its op's line and close on a line of their own."""
    stack, depth, deepest = [], 0, 0
    for line in ttgir.splitlines():
        if "tt.dot " in line:
            deepest = max(deepest, len(stack))
        net = line.count("{") - line.count("}")
        if net > 0 and "scf.for " in line:
            stack.append(depth)
        depth += net
        while stack and depth <= stack[-1]:
            stack.pop()
    return deepest


def _compile(fn, sig, consts, arch, warps):
    """(registers a thread, spill store bytes, spill load bytes, TTGIR) of one compile, read from
    the ``ptxas -v`` report that Triton prints with ``knobs.nvidia.dump_ptxas_log`` (the compiled
    kernel's own ``n_regs`` / ``n_spills`` come from loading the cubin into a CUDA context)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    regs, spills = _PTXAS_REGS.search(log.getvalue()), _PTXAS_SPILLS.search(log.getvalue())
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v report in the compile output: {log.getvalue()[-500:]!r}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), kernel.asm["ttgir"]


def compile_all(verbose: bool = False) -> list:
    """Compile the matrix; returns the failures (compile errors, register spills, fp32 K loops
    folded into one chain), one line each."""
    from triton import knobs

    # ptxas must run (and report) for every variant, also when a cache holds the kernel
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True

    failures, skipped, n, t0 = [], set(), 0, time.perf_counter()
    for arch in ARCHS:
        for dt in DTYPES:
            for label, fn, types, consts, warps in _variants(dt):
                kernel = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
                if (kernel, arch, dt) in SKIPPED:
                    skipped.add((kernel, arch, dt))
                    continue
                what = f"sm_{arch} {dt} {kernel} {label}".rstrip()
                sig = {a: "constexpr" if a in consts else types.get(a, "i32")
                       for a in fn.arg_names}
                t = time.perf_counter()
                try:
                    regs, spill_st, spill_ld, ttgir = _compile(fn, sig, consts, arch, warps)
                except Exception as e:  # noqa: BLE001  (report every failing variant)
                    failures.append(f"{what}: {type(e).__name__}: {str(e)[-1500:]}")
                    regs = spill_st = spill_ld = -1
                    ttgir = None
                if ttgir is not None and dt == "fp32" and kernel in CHAINED_FP32 \
                        and dot_loop_depth(ttgir) < 2:
                    failures.append(f"{what}: the fp32 K loop is one FMA chain (its dot sits "
                                    f"at loop depth {dot_loop_depth(ttgir)}, not in chains)")
                if spill_st > 0 or spill_ld > 0:
                    failures.append(f"{what}: spills ({regs} registers, {spill_st} B spill "
                                    f"stores, {spill_ld} B spill loads, {warps} warps)")
                n += 1
                if verbose:
                    print(f"{time.perf_counter() - t:6.2f}s  {regs:3d} regs  spills "
                          f"{spill_st}/{spill_ld} B  {what}", flush=True)
    if SKIPPED - skipped:  # a renamed kernel must not drop out of the skip list silently
        failures.append(f"SKIPPED names no variant: {sorted(SKIPPED - skipped)}")
    print(f"{n} kernel variants compiled in {time.perf_counter() - t0:.1f}s, "
          f"{len(failures)} failed", flush=True)
    return failures


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run them")
def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    errors = compile_all(verbose="-v" in sys.argv[1:])
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1 if errors else 0)
