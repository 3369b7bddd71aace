"""Triton kernels of the dense stacked gated LoRA op and its backward (docs/OPS.md, Family 3).

``stacked_gated_lora``: ``y[t] = base[t] + sum_e gate[t,e] * s_e * B_e @ (A_e @ x[t])``, two
launches of one tiled matmul kernel (``_mm_kernel``):

1. shrink ``h_g = x A^T`` [T, R] (fp32), the gate of each rank block and ``s_e`` applied in the
   epilogue: rank column ``a`` belongs to expert ``expert_of_rank[a]``. With ``shared_a`` the kernel
   computes the r distinct columns ``x A^T`` once and its epilogue writes E gated copies of them
   (``n_rep = E``), so HydraLoRA's shared A costs one r-wide shrink, not an R-wide one.
2. expand ``y = base + h_g B^T``, ``base`` added in the epilogue.

The backward reuses the same kernel for every matmul (``u = x A^T``, ``z = grad_y B``,
``dx = dh A``, ``dA = dh^T x``, ``dB = grad_y^T h_g``) plus one row-wise kernel
(``_gate_backward_kernel``) that turns ``z`` and ``u`` into ``dh``, ``h_g`` and ``dgate``.

Numerics: products on the tensor cores in the data dtype, accumulation in fp32; the small [T, R]
intermediates are kept in fp32 and rounded to the data dtype only where they enter a ``tl.dot``
(as vLLM's ``lora_expand`` does with its fp32 shrink buffer). ``masked.py`` reuses ``matmul``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import dot_block, index32, pow2_clamp, reject_float64

__all__ = ["stacked_gated_lora", "stacked_gated_lora_backward", "matmul", "expert_of_rank",
           "mm_config", "mm_split_k", "gate_backward_config", "sparse_shrink_config",
           "sparse_expand_config"]

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def expert_of_rank(rank_offsets: torch.Tensor, total_rank: int) -> torch.Tensor:
    """int32 [R]: the expert e with rank_offsets[e] <= a < rank_offsets[e+1] of each rank column a.

    Computed on the device (searchsorted over the E upper bounds; empty experts are skipped because
    equal bounds are all <= a), R taken from a shape: no host synchronisation."""
    ro = rank_offsets.to(torch.int64)
    cols = torch.arange(total_rank, device=ro.device, dtype=torch.int64)
    return torch.searchsorted(ro[1:].contiguous(), cols, right=True, out_int32=True)


# --------------------------------------------------------------------------------------------
# Block sizes: every heuristic of this module and of masked.py lives here.
# NOTE: untuned. The choices follow the usual Triton GEMM starting points for H100 and keep every
# tl.dot dimension >= 16 (``dot_block``).
# --------------------------------------------------------------------------------------------


def mm_config(M: int, N: int, K: int, fp32_operands: int = 0) -> dict:
    """Tiles of ``_mm_kernel``. The LoRA matmuls are skinny (N = R or K = R, R ~ 16..128), so the
    tile follows a small dim down to 16 instead of padding it to 64/128; 64 x 128 output tiles
    (8 warps) with num_stages=3 stay well under H100's 228 KB of shared memory.

    BLOCK_K follows the register budget, by ``fp32_operands`` (how many of a, b are fp32): 64 for
    two 16-bit operands; 32 when one fp32 operand is cast to the dot dtype inside the K loop; 16
    for an fp32 dot, which runs on FMAs that hold a BLOCK_K slice of both operand tiles per
    thread. A step wider spills on sm_90 or sm_80 (test_triton_compile.py).
    NOTE: untuned; no L2 tile swizzle."""
    bm, bn = dot_block(M, 64), dot_block(N, 128)
    bk = dot_block(K, (64, 32, 16)[fp32_operands])
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4 if bm * bn <= 64 * 64 else 8)


# Programs to aim for when splitting K: about two waves of H100's 132 SMs.
_SPLIT_K_TARGET_PROGRAMS = 264


def mm_split_k(tiles: int, K: int, block_k: int) -> int:
    """Split-K factor: > 1 only when the output has few tiles (decode-size T in the shrinks
    x A^T / grad_y B, or small R x d weight grads dA / dB whose K = T is long) and every split
    still gets >= 4 BLOCK_K steps. NOTE: untuned (about two waves of programs, see above)."""
    return max(1, min(_SPLIT_K_TARGET_PROGRAMS // max(tiles, 1), K // (4 * block_k), 32))


# Experts per window of the gate backward: the one-hot tl.dot's minimum width. Every column of the
# one-hot past an expert of the window is wasted fp32 FMA work, and the [tokens, BLOCK_E]
# accumulator must stay in registers.
GATE_BACKWARD_BLOCK_E = 16


def gate_backward_config(N: int, E: int) -> dict:
    """Tiles of ``_gate_backward_kernel``: 32 tokens x 64 rank columns per step (elementwise work,
    memory bound), experts in windows of GATE_BACKWARD_BLOCK_E (any E). 8 warps: with 4, the
    tile's five [32, 64] operands (each with its own 64-bit addresses) and the one-hot dot take
    255 registers a thread and spill on sm_90."""
    return dict(BLOCK_M=32, BLOCK_C=dot_block(N, 64), BLOCK_E=GATE_BACKWARD_BLOCK_E, num_warps=8)


def sparse_shrink_config(k: int, D: int) -> dict:
    """Tiles of masked.py's gathered-row dot (no tl.dot: every token reads its own k rows of A):
    16 tokens x up to 16 slots x BLOCK_D, the 3-D gather tile capped at 8192 elements (~64 fp32
    registers a thread with 4 warps)."""
    bt, bj = 16, pow2_clamp(k, 1, 16)
    return dict(BLOCK_T=bt, BLOCK_J=bj, BLOCK_D=pow2_clamp(D, 16, 8192 // (bt * bj)), num_warps=4)


def sparse_expand_config(N: int) -> dict:
    """Tiles of masked.py's column-gather expand / rank scatter: 16 tokens x up to 128 output
    columns (d_out, or R for the scatter), a loop over the k slots."""
    return dict(BLOCK_T=16, BLOCK_N=pow2_clamp(N, 16, 128), num_warps=4)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, base_ptr, gate_ptr, scales_ptr, group_ptr,
               M, N, K, n_rep, k_per_split,
               s_am, s_ak, s_bk, s_bn, s_cs, s_cm, s_cn, s_dm, s_dn, s_gm, s_ge,
               HAS_GATE: tl.constexpr, HAS_BASE: tl.constexpr, DOT_DTYPE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[m, rep*N + n] = coef(m, rep*N + n) * sum_k a[m, k] b[k, n] (+ base[m, rep*N + n]) for
    rep < n_rep, coef(m, c) = gate[m, group[c]] * scales[group[c]] with HAS_GATE, else 1.

    Split-K: program (., ., s) sums k in [s * k_per_split, (s + 1) * k_per_split) into slice s of
    c (stride s_cs); the epilogue is linear, so the gate scales every partial and only slice 0
    adds base; the launcher sums the slices.
    Any strides (transposed operands are passed as transposed views). Both tiles are cast to
    DOT_DTYPE (the data dtype) before tl.dot; the accumulator is fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    # int64 row / column offsets: a stride times an index may pass 2^31 on large layers
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rk0 = (k_lo + rk).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * s_am + rk0[None, :] * s_ak
    b_ptrs = b_ptr + rk0[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = rk < k_hi - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)
        # "ieee": fp32 operands are multiplied in full fp32, not TF32 (10-bit mantissa), so fp32
        # results match the fp32 reference; fp16/bf16 operands are unaffected (plain MMA).
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    mask = m_ok[:, None] & n_ok[None, :]
    for rep in range(n_rep):
        cols = rn + rep * N
        out = acc
        if HAS_GATE:
            grp = tl.load(group_ptr + cols, mask=n_ok, other=0)
            s = tl.load(scales_ptr + grp, mask=n_ok, other=0.0).to(tl.float32)
            g = tl.load(gate_ptr + rm[:, None] * s_gm + grp[None, :] * s_ge, mask=mask, other=0.0)
            out = acc * (g.to(tl.float32) * s[None, :])
        if HAS_BASE:
            d = tl.load(base_ptr + rm[:, None] * s_dm + cols[None, :] * s_dn,
                        mask=mask & (pid_k == 0), other=0.0)
            out = out + d.to(tl.float32)
        tl.store(c_ptr + pid_k * s_cs + rm[:, None] * s_cm + cols[None, :] * s_cn, out, mask=mask)


@triton.jit
def _gate_backward_kernel(z_ptr, u_ptr, gate_ptr, scales_ptr, group_ptr, ro_ptr, dh_ptr, hg_ptr,
                          dgate_ptr, T, N, E, n_rep, s_gm, s_ge,
                          SUM_REPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_E: tl.constexpr):
    """Per token tile, over the R = N * n_rep rank columns c (expert e = group[c], u column c % N):
    coef = gate[t, e] * s_e;  h_g[t, c] = coef * u[t, c % N];  dh[t, n] = sum_rep coef * z[t, c];
    dgate[t, e] = s_e * sum_{c in e} z[t, c] * u[t, c % N].

    z, h_g [T, R], u, dh [T, N] and dgate [T, E] are contiguous; group = expert_of_rank(ro), so
    the columns of expert e are [ro[e], ro[e+1]).
    The program walks the experts in windows of BLOCK_E and each window's columns in BLOCK_C
    tiles, so every column is read once and the dgate tile in registers is [BLOCK_M, BLOCK_E]
    whatever E is (a tile as wide as E spills). The per-expert sum is a tl.dot with a one-hot
    [columns x BLOCK_E] matrix (exact: products with 1 and 0) and each window's dgate is stored
    once: one program owns whole rows of dgate, deterministic, no atomics.
    dh: without SUM_REPS (n_rep == 1) column c of dh is coef * z[:, c], written in the same pass;
    with SUM_REPS it sums the n_rep column blocks, a second pass (reps innermost, so the sum
    stays in registers) that reads z again."""
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = rm < T
    re = tl.arange(0, BLOCK_E)
    R = N * n_rep
    for e0 in range(0, E, BLOCK_E):
        c_lo = tl.load(ro_ptr + e0)
        c_hi = tl.load(ro_ptr + tl.minimum(e0 + BLOCK_E, E))
        dg = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            rc = c0 + tl.arange(0, BLOCK_C)
            c_ok = rc < c_hi
            mask = m_ok[:, None] & c_ok[None, :]
            grp = tl.load(group_ptr + rc, mask=c_ok, other=0)
            s = tl.load(scales_ptr + grp, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            g = tl.load(gate_ptr + rm[:, None] * s_gm + grp[None, :] * s_ge, mask=mask, other=0.0)
            coef = g.to(tl.float32) * s
            if SUM_REPS:
                u_col = rc % N
            else:
                u_col = rc
            u = tl.load(u_ptr + rm[:, None] * N + u_col[None, :], mask=mask, other=0.0)
            z = tl.load(z_ptr + rm[:, None] * R + rc[None, :], mask=mask, other=0.0)
            tl.store(hg_ptr + rm[:, None] * R + rc[None, :], u * coef, mask=mask)
            if not SUM_REPS:
                tl.store(dh_ptr + rm[:, None] * N + rc[None, :], z * coef, mask=mask)
            onehot = ((grp - e0)[:, None] == re[None, :]).to(tl.float32)
            dg = tl.dot(z * u * s, onehot, dg, input_precision="ieee")  # fp32, exact one-hot
        e = e0 + re
        tl.store(dgate_ptr + rm[:, None] * E + e[None, :], dg, mask=m_ok[:, None] & (e < E)[None, :])
    if SUM_REPS:
        for n0 in range(0, N, BLOCK_C):
            rn = n0 + tl.arange(0, BLOCK_C)
            n_ok = rn < N
            mask = m_ok[:, None] & n_ok[None, :]
            dh = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for rep in range(n_rep):
                cols = rn + rep * N
                grp = tl.load(group_ptr + cols, mask=n_ok, other=0)
                s = tl.load(scales_ptr + grp, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                g = tl.load(gate_ptr + rm[:, None] * s_gm + grp[None, :] * s_ge, mask=mask,
                            other=0.0)
                z = tl.load(z_ptr + rm[:, None] * R + cols[None, :], mask=mask, other=0.0)
                dh += z * (g.to(tl.float32) * s)
            tl.store(dh_ptr + rm[:, None] * N + rn[None, :], dh, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, base=None, gate=None,
           scales=None, group=None, n_rep: int = 1, split_k: Optional[int] = None) -> torch.Tensor:
    """out[:, rep*N : (rep+1)*N] = coef * (a @ b) (+ base) for rep < n_rep, into ``out``
    [M, N * n_rep] (any float dtype; the store rounds). a [M, K], b [K, N], any strides. With
    ``gate`` [M, E], ``scales`` [E] and ``group`` [N * n_rep] int32: coef[m, c] =
    gate[m, group[c]] * scales[group[c]]. The dot runs in the lower of the operand precisions.
    ``split_k`` (default: ``mm_split_k``) > 1 writes fp32 partials [split, M, N * n_rep] and sums
    them in a fixed order (deterministic, no atomics)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0 or n_rep == 0:
        return out
    dot_dtype = a.dtype if a.dtype != torch.float32 else b.dtype
    cfg = mm_config(M, N, K, (a.dtype == torch.float32) + (b.dtype == torch.float32))
    bk = cfg["BLOCK_K"]
    grid_mn = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    split = mm_split_k(grid_mn[0] * grid_mn[1], K, bk) if split_k is None else split_k
    k_per = triton.cdiv(triton.cdiv(max(K, 1), split), bk) * bk  # whole BLOCK_K steps per split
    split = triton.cdiv(max(K, 1), k_per)
    dst = out if split == 1 else torch.empty(split, M, N * n_rep, device=out.device,
                                             dtype=torch.float32)
    c_strides = (0, *out.stride()) if split == 1 else dst.stride()
    has_gate = gate is not None
    if not has_gate:
        gate, scales, group = out, out, out  # never read (HAS_GATE is False)
    d = base if base is not None else out  # never read when base is None
    _mm_kernel[(*grid_mn, split)](
        a, b, dst, d, gate, scales, group, M, N, K, n_rep, k_per,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *c_strides,
        d.stride(0), d.stride(1), gate.stride(0), gate.stride(-1),
        HAS_GATE=has_gate, HAS_BASE=base is not None, DOT_DTYPE=_TL_DTYPE[dot_dtype], **cfg)
    if split > 1:
        out.copy_(dst.sum(0))
    return out


def _bank_layout(x, A, B, rank_offsets, scales, shared_a):
    """(E, N, n_rep, group, scales): N distinct shrink columns (r if shared_a else R), each written
    n_rep times (E if shared_a else 1); scales as an fp32 [E] tensor (ones when None)."""
    E = rank_offsets.numel() - 1
    R = B.shape[1]
    group = expert_of_rank(rank_offsets, R)
    if scales is None:
        scales = torch.ones(E, device=x.device, dtype=torch.float32)
    return E, A.shape[0], (E if shared_a else 1), group, scales.contiguous()  # kernels: stride 1


def _f32(*shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=torch.float32)


def stacked_gated_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gate: torch.Tensor,
                       rank_offsets: torch.Tensor, scales: Optional[torch.Tensor] = None,
                       base: Optional[torch.Tensor] = None, shared_a: bool = False) -> torch.Tensor:
    """x [T,d_in], A [R,d_in] ([r,d_in] if shared_a), B [d_out,R], gate [T,E]
    -> y [T,d_out] (x.dtype).

    y = base + h_g B^T with h_g[t, a] = gate[t, e(a)] * s_e(a) * (x A^T)[t, a (mod r)]."""
    reject_float64(x, A, B, gate, scales, base)
    E, N, n_rep, group, scales = _bank_layout(x, A, B, rank_offsets, scales, shared_a)
    T, R = x.shape[0], B.shape[1]
    h = matmul(x, A.t(), _f32(T, R, like=x), gate=gate, scales=scales, group=group, n_rep=n_rep)
    y = torch.empty(T, B.shape[0], device=x.device, dtype=x.dtype)
    return matmul(h, B.t(), y, base=base)


def stacked_gated_lora_backward(grad_y: torch.Tensor, x: torch.Tensor, A: torch.Tensor,
                                B: torch.Tensor, gate: torch.Tensor, rank_offsets: torch.Tensor,
                                scales: Optional[torch.Tensor], shared_a: bool
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dgate), each in its input's dtype.

    u = x A^T (ungated; [T, r] if shared_a), z = grad_y B; per rank column a of expert e:
    dh = z * gate * s_e (summed over the E blocks if shared_a), h_g = u * gate * s_e,
    dgate[:, e] = s_e * sum_{a in e} z * u; then dx = dh A, dA = dh^T x, dB = grad_y^T h_g."""
    reject_float64(grad_y, x, A, B, gate, scales)
    E, N, n_rep, group, scales = _bank_layout(x, A, B, rank_offsets, scales, shared_a)
    T, R = x.shape[0], B.shape[1]
    u = matmul(x, A.t(), _f32(T, N, like=x))
    z = matmul(grad_y, B, _f32(T, R, like=x))
    dh, hg = _f32(T, N, like=x), _f32(T, R, like=x)
    dgate = torch.empty(T, E, device=x.device, dtype=gate.dtype)
    if T > 0:
        cfg = gate_backward_config(N, E)
        _gate_backward_kernel[(triton.cdiv(T, cfg["BLOCK_M"]),)](
            z, u, gate, scales, group, index32(rank_offsets), dh, hg, dgate, T, N, E, n_rep,
            gate.stride(0), gate.stride(1), SUM_REPS=n_rep > 1, **cfg)
    dx = matmul(dh, A, torch.empty(x.shape, device=x.device, dtype=x.dtype))
    dA = matmul(dh.t(), x, torch.empty(A.shape, device=x.device, dtype=A.dtype))
    dB = matmul(grad_y.t(), hg, torch.empty(B.shape, device=x.device, dtype=B.dtype))
    return dx, dA, dB, dgate
