"""Triton kernels of the grouped low-rank matmuls (docs/OPS.md, Family 3) and their backward ops.

Launchers (positional arguments as in the op schemas; outputs allocated here):

* ``sgmv_shrink(x, A, rank_offsets, order, pos, expert_offsets, weights, scales, max_rank)``
  -> ``h [P, max_rank]``
* ``sgmv_expand(h, B, rank_offsets, order, pos, expert_offsets, weights, scales, base)``
  -> ``y [T, d_out]``
* ``fused_moe_lora(x, A, B, rank_offsets, weights, ids, scales, base)`` -> ``y [T, d_out]``
  (the dense form in one launch, bank total rank <= 128: ``h`` never leaves the chip)
* ``sgmv_weight_grad(x, h, rank_offsets, order, pos, expert_offsets, weights, scales, total_rank,
  transposed)`` -> ``G [R, d]``, or ``G^T [d, R]`` with transposed
* ``pair_dot(a, b, pos, a_by_token)`` -> ``out [T, k]`` (fp32)

Schedule (shrink, weight grad, and expand with k == 1): the dispatched rows ``[0, expert_offsets[E])`` are cut into tiles
of BLOCK_M rows that never straddle two experts (expert e owns ``cdiv(n_e, BLOCK_M)`` tiles). The
launcher never reads the counts (no host sync, CUDA-graph friendly): it launches
``cdiv(P, BLOCK_M) + E`` programs on grid axis 0, an upper bound on the number of tiles
(``sum_e cdiv(n_e, BLOCK_M) <= P / BLOCK_M + E``), and each program loads ``expert_offsets`` as one
power-of-two vector, forms ``tile_ends = cumsum(cdiv(counts, BLOCK_M))`` in registers, finds its
expert by counting the ends <= its id, and exits when it lies past the last tile. (Computing the
tile offsets in-kernel instead of with torch ops in the launcher saves ~5 tiny launches per op.)
x rows are read through ``order`` (token ``order[i] // k``), never through a permuted copy.
The expand with k > 1 is token-owned instead (a tile of tokens sums its k slots in registers), and
``fused_moe_lora`` tiles tokens too: neither needs a per-row buffer or atomics.

Numerics: every product accumulates in fp32 (``tl.dot`` with an fp32 accumulator); for fp32 inputs
the dot runs with ``input_precision="ieee"`` (no TF32: results must match the fp32 reference),
and the long reductions of shrink and the fused kernel (over d_in, or d_out in the backward) and
of the weight gradient (over an expert's rows) sum chains of FP32_CHAIN_K columns / rows (one FMA
chain over all of K errs ~5x more than BLAS).
The row coefficient ``c_i = w[p] * s_e`` is applied in fp32 to the fp32 result. float64 is not
supported (the op's CUDA kernel routes it to the reference). The interpreter cannot run bf16 dots,
so the CPU tests use fp32/fp16; bf16 is covered by the GPU tests.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._utils import dot_block, index32, reject_float64

__all__ = ["sgmv_shrink", "sgmv_expand", "fused_moe_lora", "sgmv_weight_grad",
           "sgmv_expand_backward", "pair_dot"]

# The largest rank tile: at BLOCK_R = 128 the shrink and weight-grad kernels run out of registers
# (255 a thread) and spill on sm_90. Larger ranks take several rank tiles (a grid axis in shrink
# and weight grad, a loop in expand).
MAX_BLOCK_R = 64


# --------------------------------------------------------------------------------------------
# Shared jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _gather_rows(order, rows, row_end, K):
    """(p, tok, valid) of dispatched rows below row_end: pair p = order[i] of token p // K;
    padding rows (p == -1) and rows at or past row_end are invalid (tok 0, loads through them
    masked)."""
    p = tl.load(order + rows, mask=rows < row_end, other=-1)
    valid = p >= 0
    tok = tl.where(valid, p // K, 0)
    return p, tok, valid


@triton.jit
def _expert_rows(expert_offsets, rank_offsets, order, E, K, E_POW2: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """This program's row tile: (e, rows, p, tok, valid, r_lo, r_e); e >= E means "no tile, exit".

    Expert e owns cdiv(n_e, BLOCK_M) tiles, i.e. the program ids [ends[e] - tiles[e], ends[e])
    with ends = cumsum(tiles); so e = #{e' : ends[e'] <= pid}. The counts and their prefix sum
    come from one power-of-two vector load of expert_offsets (no launcher-side torch ops, no host
    sync); lanes >= E hold 0 tiles, so they only count once pid is past the last tile.
    An exiting program gets an empty row range: all its rows are invalid."""
    pid = tl.program_id(0)
    offs = tl.arange(0, E_POW2)
    lo = tl.load(expert_offsets + offs, mask=offs < E, other=0)
    hi = tl.load(expert_offsets + 1 + offs, mask=offs < E, other=0)
    tiles = (hi - lo + (BLOCK_M - 1)) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)
    e = tl.sum((ends <= pid).to(tl.int32), axis=0)
    mine = offs == e  # all False when e >= E: an exiting program gets an empty row range
    first_tile = tl.sum(tl.where(mine, ends - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(mine, lo, 0), axis=0)
    row_end = tl.sum(tl.where(mine, hi, 0), axis=0)
    rows = row_start + (pid - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    p, tok, valid = _gather_rows(order, rows, row_end, K)
    r_lo = tl.load(rank_offsets + e, mask=e < E, other=0)
    r_e = tl.load(rank_offsets + e + 1, mask=e < E, other=0) - r_lo
    return e, rows, p, tok, valid, r_lo, r_e


@triton.jit
def _row_coef(w, scales, p, valid, e, HAS_W: tl.constexpr, HAS_S: tl.constexpr):
    """c_i = w[p] * s_e in fp32 (each factor 1 when absent), 0 on invalid rows."""
    c = tl.where(valid, 1.0, 0.0)
    if HAS_W:
        c = c * tl.load(w + p, mask=valid, other=0.0)
    if HAS_S:
        c = c * tl.load(scales + e)
    return c


# fp32 ("ieee") dots run as FMAs on the CUDA cores: each output of a K loop that chains its
# tiles into one accumulator is a single FMA chain over all of K, whose rounding error grows with
# K. _shrink_acc sums chains of this many columns instead. In a numpy model of the orders (2048 x
# 16 outputs, fp32 against fp64) one chain is off by up to 1.5e-4 at K = 4096 and 4.3e-4 at
# K = 11008 (mean 1.3e-5 / 3.5e-5); 256-column chains by 2.4e-5 / 4.0e-5 (mean 3.8e-6 / 6.5e-6),
# BLAS (numpy's sgemm) by 3.4e-5 / 4.4e-5. A partial sum is one tile add per 256 columns.
# (Writing `acc += tl.dot(a, b)` per tile does not do it: Triton folds dot(a, b, 0) + acc back
# into dot(a, b, acc).) NOTE: untuned (128 to 256 model equally well).
FP32_CHAIN_K = tl.constexpr(256)


@triton.jit
def _shrink_chain(x_rows, a_rows, valid, a_ok, k_lo, k_hi, sxk, sak, DOT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One accumulator chained over the K tiles of [k_lo, k_hi) (masked)."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        xt = tl.load(x_rows + kk[None, :] * sxk, mask=valid[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_rows + kk[:, None] * sak, mask=k_ok[:, None] & a_ok[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _shrink_acc(x, A, tok, valid, r_lo, a, a_ok, k_lo, k_hi, sxm, sxk, sam, sak,
                DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_R] = x[tok, k_lo:k_hi] @ A[r_lo + a, k_lo:k_hi]^T (masked): one
    chain on the tensor cores (fp16 / bf16), a sum of FP32_CHAIN_K-column chains for fp32."""
    x_rows = x + tok.to(tl.int64)[:, None] * sxm
    a_rows = A + (r_lo + a).to(tl.int64)[None, :] * sam
    if DOT_PREC == "ieee":
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for c0 in range(k_lo, k_hi, FP32_CHAIN_K):
            acc += _shrink_chain(x_rows, a_rows, valid, a_ok, c0,
                                 tl.minimum(c0 + FP32_CHAIN_K, k_hi), sxk, sak, DOT_PREC,
                                 BLOCK_M, BLOCK_K, BLOCK_R)
    else:
        acc = _shrink_chain(x_rows, a_rows, valid, a_ok, k_lo, k_hi, sxk, sak, DOT_PREC,
                            BLOCK_M, BLOCK_K, BLOCK_R)
    return acc


@triton.jit
def _expand_store(out, delta, tok, valid, n, n_ok, som, son):
    """Add an expand tile delta [BLOCK_M, BLOCK_N] (fp32, c_i applied) into y[tok].

    Only for k == 1: a token owns at most one row, so the program owns y[tok] and adds in place
    (y already holds base, or 0). k > 1 runs the token-owned ``_expand_token_kernel``."""
    ptrs = out + tok.to(tl.int64)[:, None] * som + n[None, :] * son
    m = valid[:, None] & n_ok[None, :]
    y = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    tl.store(ptrs, (y + delta).to(out.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _shrink_kernel(x, A, h, rank_offsets, order, expert_offsets, w, scales,
                   E, K, k_chunk, d_in,
                   sxm, sxk, sam, sak, shm, shr,
                   HAS_W: tl.constexpr, HAS_S: tl.constexpr, ATOMIC: tl.constexpr,
                   DOT_PREC: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """grid (row tiles, rank tiles, K splits). h was zero-filled by the launcher, so programs
    with nothing to add (past the last tile, rank tile >= r_e) just exit. ATOMIC (split-K):
    each program reduces one chunk of d_in and atomically adds into the fp32 h.

    Ranks above BLOCK_R (<= MAX_BLOCK_R) are split over grid axis 1 rather than looped
    in-program: the tile's x rows over all of d_in do not fit on chip, so a loop over rank tiles
    would stream them from memory once per rank tile anyway; with one rank tile a program reads
    its x rows exactly once and the rank tiles run in parallel (a program whose tile lies past
    its expert's rank exits at once)."""
    e, rows, p, tok, valid, r_lo, r_e = _expert_rows(expert_offsets, rank_offsets, order, E, K,
                                                     E_POW2, BLOCK_M)
    if e >= E:
        return
    a = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(1) * BLOCK_R >= r_e:
        return
    k_lo = tl.program_id(2) * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, d_in)
    acc = _shrink_acc(x, A, tok, valid, r_lo, a, a < r_e, k_lo, k_hi, sxm, sxk, sam, sak,
                      DOT_PREC, BLOCK_M, BLOCK_K, BLOCK_R)
    acc = acc * _row_coef(w, scales, p, valid, e, HAS_W, HAS_S)[:, None]
    ptrs = h + rows.to(tl.int64)[:, None] * shm + a[None, :] * shr
    m = valid[:, None] & (a < r_e)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=m)
    else:
        tl.store(ptrs, acc.to(h.dtype.element_ty), mask=m)


@triton.jit
def _expand_kernel(h, B, out, rank_offsets, order, expert_offsets, w, scales,
                   d_out, E, K,
                   shm, shr, sbn, sbr, som, son,
                   HAS_W: tl.constexpr, HAS_S: tl.constexpr,
                   DOT_PREC: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """k == 1, grid (row tiles, d_out tiles): y[t_i] += c_i * h[i, :r_e] @ B[n, r_lo:r_lo+r_e]^T,
    the rank dimension reduced in BLOCK_R chunks (any rank), on the tensor cores."""
    e, rows, p, tok, valid, r_lo, r_e = _expert_rows(expert_offsets, rank_offsets, order, E, K,
                                                     E_POW2, BLOCK_M)
    if e >= E:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < d_out
    h_rows = h + rows.to(tl.int64)[:, None] * shm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for a0 in range(0, r_e, BLOCK_R):
        a = a0 + tl.arange(0, BLOCK_R)
        a_ok = a < r_e
        ht = tl.load(h_rows + a[None, :] * shr, mask=valid[:, None] & a_ok[None, :], other=0.0)
        bt = tl.load(B + n[None, :] * sbn + (r_lo + a)[:, None] * sbr,
                     mask=a_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(ht, bt, acc, input_precision=DOT_PREC)
    acc = acc * _row_coef(w, scales, p, valid, e, HAS_W, HAS_S)[:, None]
    _expand_store(out, acc, tok, valid, n, n_ok, som, son)


@triton.jit
def _expand_token_kernel(h, B, base, y, rank_offsets, pos, expert_offsets, w, scales,
                         T, d_out, E, K, max_rank,
                         shm, shr, sbn, sbr, sbm, sbo, sym, syn,
                         HAS_W: tl.constexpr, HAS_S: tl.constexpr, HAS_BASE: tl.constexpr,
                         E_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """k > 1, grid (token tiles, d_out tiles), token-owned: y[t] = base[t] + sum_j c_i *
    B[n, r_lo:r_lo + r_e] @ h[i, :r_e] with i = pos[t, j], the slots added in the fixed order
    j = 0..k-1 in fp32 registers and y written once: deterministic, no atomics and no [P, d_out]
    row buffer. The tokens of a tile use different experts, so the B columns are gathered per
    token and the rank loop runs on FMAs (k * r_e * d_out per token, small next to the tile's
    traffic). NOTE: untuned (against a tensor-core tile per expert plus a per-row buffer)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < d_out
    m = t_ok[:, None] & n_ok[None, :]
    t64 = t.to(tl.int64)
    if HAS_BASE:
        acc = tl.load(base + t64[:, None] * sbm + n[None, :] * sbo, mask=m,
                      other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    lanes = tl.arange(0, E_POW2)
    # ends[e] = expert_offsets[e + 1]; the expert of row i is #{e : ends[e] <= i} (empty experts
    # have equal ends and are skipped), lanes >= E never count.
    ends = tl.load(expert_offsets + 1 + lanes, mask=lanes < E, other=2147483647)
    b_cols = B + n[None, :] * sbn
    for j in range(0, K):
        p = t64 * K + j
        i = tl.load(pos + p, mask=t_ok, other=-1)
        valid = i >= 0
        e = tl.sum((ends[None, :] <= i[:, None]).to(tl.int32), axis=1)
        e = tl.where(valid, e, 0)
        r_lo = tl.load(rank_offsets + e, mask=valid, other=0)
        r_e = tl.load(rank_offsets + e + 1, mask=valid, other=0) - r_lo
        c = _row_coef(w, scales, p, valid, e, HAS_W, HAS_S)
        h_row = h + i.to(tl.int64) * shm
        for a in range(0, max_rank):
            a_ok = valid & (a < r_e)
            hv = tl.load(h_row + a * shr, mask=a_ok, other=0.0).to(tl.float32)
            bv = tl.load(b_cols + (r_lo + a).to(tl.int64)[:, None] * sbr,
                         mask=a_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            acc += (c * hv)[:, None] * bv
    tl.store(y + t64[:, None] * sym + n[None, :] * syn, acc.to(y.dtype.element_ty), mask=m)


@triton.jit
def _fused_moe_lora_kernel(x, A, B, base, y, ids, w, scales, col_expert,
                           T, d_in, d_out, R, K, cols_per_program,
                           sxm, sxk, sam, sak, sbn, sbr, sbm, sbo, sym, syn,
                           HAS_W: tl.constexpr, HAS_S: tl.constexpr, HAS_BASE: tl.constexpr,
                           DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """grid (token tiles, column splits), the dense form with h on chip: h = x[t] A^T over every
    bank column (all of d_in, into a [BLOCK_T, BLOCK_R] fp32 register tile), each column c scaled by
    g[t, c] = s_e * sum_j w[t, j] [ids[t, j] == e] with e = col_expert[c] (0 outside the token's
    experts), rounded to the data dtype (as the grouped path's h), then
    y[t] = base[t] + h_g B^T one d_out tile at a time, over this program's cols_per_program
    columns (a multiple of BLOCK_N). x, base and y cross HBM once each; A and B (R rows) are
    re-read per token tile from L2, x per column split. No dispatch, no atomics, deterministic."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    c = tl.arange(0, BLOCK_R)
    c_ok = c < R
    h = _shrink_acc(x, A, t, t_ok, 0, c, c_ok, 0, d_in, sxm, sxk, sam, sak, DOT_PREC, BLOCK_T,
                    BLOCK_K, BLOCK_R)
    ec = tl.load(col_expert + c, mask=c_ok, other=-2)
    g = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for j in range(0, K):
        idj = tl.load(ids + t64 * K + j, mask=t_ok, other=-1)
        if HAS_W:
            wj = tl.load(w + t64 * K + j, mask=t_ok, other=0.0)
        else:
            wj = tl.where(t_ok, 1.0, 0.0)
        g += tl.where(idj[:, None] == ec[None, :], wj[:, None], 0.0)
    if HAS_S:
        g = g * tl.load(scales + ec, mask=ec >= 0, other=0.0)[None, :]
    hg = (h * g).to(x.dtype.element_ty)
    # this program's columns [n_lo, n_lo + n_len), as int32 offsets of the column-indexed bases
    # (column indices are int32 throughout): the loop is that of a whole-d_out program (a loop
    # from n_lo, or int64 offsets, cost the sm_80 bf16 build 20 B of spills at 255 registers)
    n_lo = tl.program_id(1) * cols_per_program
    n_len = tl.minimum(cols_per_program, d_out - n_lo)
    B += n_lo * sbn
    base += n_lo * sbo
    y += n_lo * syn
    b_rows = B + c.to(tl.int64)[:, None] * sbr
    for n0 in range(0, n_len, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < n_len
        m = t_ok[:, None] & n_ok[None, :]
        bt = tl.load(b_rows + n[None, :] * sbn, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(hg, bt, input_precision=DOT_PREC)
        if HAS_BASE:
            acc += tl.load(base + t64[:, None] * sbm + n[None, :] * sbo, mask=m,
                           other=0.0).to(tl.float32)
        tl.store(y + t64[:, None] * sym + n[None, :] * syn, acc.to(y.dtype.element_ty), mask=m)


@triton.jit
def _weight_grad_chain(x, h, order, w, scales, e, a, a_ok, dcol, d_ok, row_lo, row_hi, K,
                       sxm, sxd, shm, shr, HAS_W: tl.constexpr, HAS_S: tl.constexpr,
                       SPLIT_LO: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One accumulator chained over the dispatched rows [row_lo, row_hi) of expert e:
    sum_i c_i h[i, a]^T x[t_i, dcol]."""
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for i0 in range(row_lo, row_hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        p, tok, valid = _gather_rows(order, rows, row_hi, K)
        c = _row_coef(w, scales, p, valid, e, HAS_W, HAS_S)
        xt = tl.load(x + tok.to(tl.int64)[:, None] * sxm + dcol[None, :] * sxd,
                     mask=valid[:, None] & d_ok[None, :], other=0.0)
        ht = tl.load(h + rows.to(tl.int64)[:, None] * shm + a[None, :] * shr,
                     mask=valid[:, None] & a_ok[None, :], other=0.0)
        hc = ht.to(tl.float32) * c[:, None]
        hi = hc.to(xt.dtype)
        acc = tl.dot(tl.trans(hi), xt, acc, input_precision=DOT_PREC)
        if SPLIT_LO:
            lo = (hc - hi.to(tl.float32)).to(xt.dtype)
            acc = tl.dot(tl.trans(lo), xt, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _weight_grad_kernel(x, h, G, rank_offsets, order, expert_offsets, w, scales, d, K,
                        sxm, sxd, shm, shr, sgr, sgd,
                        HAS_W: tl.constexpr, HAS_S: tl.constexpr, SPLIT_LO: tl.constexpr,
                        DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """grid (E, rank tiles, d tiles): G[r_lo + a, dcol] = sum_{i in e} c_i h[i, a] x[t_i, dcol],
    looping over the expert's rows in BLOCK_M chunks (each program owns its output tile: no
    atomics, deterministic; an expert with no rows writes zeros). Ranks above BLOCK_R
    (<= MAX_BLOCK_R) take several rank-tile programs: each owns a separate slice of G, so
    parallel programs are free, while an in-program loop would re-read the x rows per rank tile
    just the same.

    The rows are reduced in one chain (tensor cores), or for fp32 as a sum of FP32_CHAIN_K-row
    chains: an expert's rows are up to T*k long (an fp32 dB at T=8192, k=2, E=8 erred by 2.79e-4
    against a 2.77e-4 bound as one chain, on the GPU).

    c_i varies along the reduced dimension, so it scales h before the dot. For 16-bit inputs
    c * h is split into hi + lo halves in the data dtype and both are dotted with x (SPLIT_LO):
    twice the (tiny, rank-sized) tensor-core work, but no rounding of c * h beyond fp32 level."""
    e = tl.program_id(0)
    r_lo = tl.load(rank_offsets + e)
    r_e = tl.load(rank_offsets + e + 1) - r_lo
    a = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(1) * BLOCK_R >= r_e:
        return
    a_ok = a < r_e
    dcol = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dcol < d
    row_lo = tl.load(expert_offsets + e)
    row_hi = tl.load(expert_offsets + e + 1)
    if DOT_PREC == "ieee":  # fp32: a sum of FP32_CHAIN_K-row chains (see FP32_CHAIN_K)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for c0 in range(row_lo, row_hi, FP32_CHAIN_K):
            acc += _weight_grad_chain(x, h, order, w, scales, e, a, a_ok, dcol, d_ok, c0,
                                      tl.minimum(c0 + FP32_CHAIN_K, row_hi), K, sxm, sxd, shm,
                                      shr, HAS_W, HAS_S, SPLIT_LO, DOT_PREC, BLOCK_M, BLOCK_R,
                                      BLOCK_D)
    else:
        acc = _weight_grad_chain(x, h, order, w, scales, e, a, a_ok, dcol, d_ok, row_lo, row_hi,
                                 K, sxm, sxd, shm, shr, HAS_W, HAS_S, SPLIT_LO, DOT_PREC, BLOCK_M,
                                 BLOCK_R, BLOCK_D)
    tl.store(G + (r_lo + a).to(tl.int64)[:, None] * sgr + dcol[None, :] * sgd,
             acc.to(G.dtype.element_ty), mask=a_ok[:, None] & d_ok[None, :])


@triton.jit
def _pair_dot_kernel(a, b, out, pos, n_pairs, K, d,
                     sam, sad, sbm, sbd,
                     A_BY_TOKEN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """grid (pair tiles,): out[q] = dot(a[q // K if A_BY_TOKEN else pos[q]], b[pos[q]]) in fp32
    for flat pairs q = t*K + j; 0 where pos == -1."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = q < n_pairs
    i = tl.load(pos + q, mask=q_ok, other=-1)
    ok = i >= 0
    a_row = (q // K) if A_BY_TOKEN else i
    a_rows = a + a_row.to(tl.int64)[:, None] * sam
    b_rows = b + i.to(tl.int64)[:, None] * sbm
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (dd < d)[None, :]
        av = tl.load(a_rows + dd[None, :] * sad, mask=m, other=0.0).to(tl.float32)
        bv = tl.load(b_rows + dd[None, :] * sbd, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(av * bv, axis=1)
    tl.store(out + q, acc, mask=q_ok)


# --------------------------------------------------------------------------------------------
# Launcher helpers
# --------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (no TF32, results must match the fp32 reference);
    # for fp16/bf16 "tf32" is Triton's default and means the plain tensor-core dot.
    return "ieee" if dtype == torch.float32 else "tf32"


BLOCK_T = 16  # tokens per program of the k > 1 expand, (token, slot) pairs per pair_dot program


class _Blocks(NamedTuple):
    M: int  # dispatched rows per tile (rows of one expert)
    K: int  # reduction chunk over d_in (shrink)
    N: int  # d_out tile (expand, combine) or d tile (weight grad, pair_dot)
    R: int  # rank tile


def _blocks(P: int, E: int, d_in: int, d_out: int, max_rank: int) -> _Blocks:
    """The one place that picks block sizes (simple shape heuristics, no autotuning; every tl.dot
    dim >= 16). BLOCK_M follows the average rows per expert so small batches do not pad every
    expert's tile to 64 rows; one rank tile covers max_rank up to MAX_BLOCK_R (the register
    bound, see there), larger ranks take several.
    NOTE: untuned; 64 is the usual starting tile of Triton GEMMs."""
    return _Blocks(
        M=dot_block(triton.cdiv(max(P, 1), max(E, 1)), 64),
        K=dot_block(d_in, 64),
        N=dot_block(d_out, 64),
        R=dot_block(max_rank, MAX_BLOCK_R),
    )


def _weight_grad_blocks(P: int, E: int, d: int, max_rank: int, dtype: torch.dtype) -> _Blocks:
    """The weight gradient's tiles: those of _blocks, with row tiles of at most 32 rows in fp32,
    whose FMA dot summed in row chains held 255 registers and spilled at 64 rows (sm_90).
    NOTE: untuned."""
    blk = _blocks(P, E, 0, d, max_rank)
    return blk._replace(M=min(blk.M, 32)) if dtype == torch.float32 else blk


# Warps a program of the fused and weight-grad kernels: with 4, their 64 x 64 tiles reach 255
# registers a thread on sm_90 and spill (the weight grad in every dtype: it holds the scaled h tile
# and its hi / lo halves next to the accumulator; the fused kernel: it holds its h tile, the gate
# tile and the rounded copy through the expand).
FUSED_WARPS = 8
WEIGHT_GRAD_WARPS = 8
# The fused kernel holds a [BLOCK_T, next_pow2(R)] fp32 h tile (and its gate) in registers.
# NOTE: untuned (the register bound of the two R-wide tiles at BLOCK_T = 64, 8 warps).
FUSED_MAX_TOTAL_RANK = 128


def _fused_blocks(T: int, d_in: int, d_out: int, R: int, dtype: torch.dtype) -> _Blocks:
    """Tiles of the fused kernel: BLOCK_M token rows (fewer for a small batch), the whole bank
    (BLOCK_R = next_pow2(R)) at once. An fp32 (ieee) dot runs on FMAs, which keep both operand
    tiles in registers: fp32 takes 32 tokens and 32 output columns at a time.
    NOTE: untuned."""
    fp32 = dtype == torch.float32
    return _Blocks(M=dot_block(T, 32 if fp32 else 64), K=dot_block(d_in, 32 if fp32 else 64),
                   N=dot_block(d_out, 32 if fp32 else 64),
                   R=dot_block(R, FUSED_MAX_TOTAL_RANK))


def _coef(weights: Optional[torch.Tensor], scales: Optional[torch.Tensor], dummy: torch.Tensor):
    """(w [T*k] fp32, scales [E] fp32, HAS_W, HAS_S); absent ones are replaced by a dummy pointer
    that the kernels never dereference."""
    w = dummy if weights is None else weights.detach().reshape(-1).to(torch.float32).contiguous()
    s = dummy if scales is None else scales.detach().to(torch.float32).contiguous()
    return w, s, weights is not None, scales is not None


class _Grouped(NamedTuple):
    """Launch context shared by shrink / expand / fused."""
    ro: torch.Tensor
    order: torch.Tensor
    pos: torch.Tensor
    eo: torch.Tensor
    n_programs: int
    w: torch.Tensor
    s: torch.Tensor
    has_w: bool
    has_s: bool
    T: int
    K: int
    P: int
    E: int
    e_pow2: int


def _grouped(rank_offsets, order, pos, expert_offsets, weights, scales, block_m) -> _Grouped:
    order, pos, eo, ro = map(index32, (order, pos, expert_offsets, rank_offsets))
    T, K = pos.shape
    P, E = order.numel(), eo.numel() - 1
    # an upper bound on the row tiles: sum_e cdiv(n_e, BLOCK_M) <= P / BLOCK_M + E
    n_programs = triton.cdiv(P, block_m) + E
    w, s, has_w, has_s = _coef(weights, scales, eo)
    return _Grouped(ro, order, pos, eo, n_programs, w, s, has_w, has_s, T, K, P, E,
                    triton.next_power_of_2(E))


def _split_k(n_tiles: int, d_in: int, block_k: int) -> int:
    """Split-K factor for shrink: only when there are too few row/rank tiles to fill the GPU
    (an H100 has 132 SMs) and d_in is long (tall-skinny x^T A); each split reduces >= 512
    columns of d_in."""
    # NOTE: untuned (both thresholds)
    if n_tiles >= 128 or d_in < 1024:
        return 1
    return min(8, d_in // 512, triton.cdiv(d_in, block_k))


def _output_y(base: Optional[torch.Tensor], T: int, d_out: int, like: torch.Tensor):
    """y initialised for the direct (k == 1) path: a copy of base, or zeros."""
    if base is None:
        return torch.zeros(T, d_out, dtype=like.dtype, device=like.device)
    return base.to(like.dtype, copy=True, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def sgmv_shrink(x, A, rank_offsets, order, pos, expert_offsets, weights, scales, max_rank, *,
                split_k: Optional[int] = None):
    """h [P, max_rank] (dtype x): h[i, a] = c_i * dot(A[ro_e + a], x[t_i]) for a < r_e, else 0.

    ``split_k`` (not in the op schema; tests): number of d_in chunks reduced by separate programs
    with fp32 atomics; None picks it with ``_split_k``."""
    reject_float64(x, A)
    P, d_in = order.numel(), x.shape[1]
    if P == 0 or max_rank == 0 or A.shape[0] == 0:
        return torch.zeros(P, max_rank, dtype=x.dtype, device=x.device)
    blk = _blocks(P, expert_offsets.numel() - 1, d_in, 0, max_rank)
    g = _grouped(rank_offsets, order, pos, expert_offsets, weights, scales, blk.M)
    rank_tiles = triton.cdiv(max_rank, blk.R)
    if split_k is None:
        split_k = _split_k(g.n_programs * rank_tiles, d_in, blk.K)
    k_chunk = triton.cdiv(triton.cdiv(max(d_in, 1), split_k), blk.K) * blk.K
    atomic = split_k > 1
    # Zero-filled: rows past expert_offsets[E], padding rows and ranks >= r_e are never written.
    # Split-K partial sums meet in fp32 (the order of the splits' atomic adds is not fixed).
    out = torch.zeros(P, max_rank, dtype=torch.float32 if atomic else x.dtype, device=x.device)
    grid = (g.n_programs, rank_tiles, triton.cdiv(max(d_in, 1), k_chunk))
    _shrink_kernel[grid](
        x, A, out, g.ro, g.order, g.eo, g.w, g.s,
        g.E, g.K, k_chunk, d_in,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), out.stride(0), out.stride(1),
        HAS_W=g.has_w, HAS_S=g.has_s, ATOMIC=atomic, DOT_PREC=_dot_precision(x.dtype),
        E_POW2=g.e_pow2, BLOCK_M=blk.M, BLOCK_K=blk.K, BLOCK_R=blk.R)
    return out.to(x.dtype)


def sgmv_expand(h, B, rank_offsets, order, pos, expert_offsets, weights, scales, base):
    """y [T, d_out] (dtype h) = base + sum_j c_i * B[:, ro_e : ro_e + r_e] @ h[i, :r_e].

    k == 1: expert row tiles on the tensor cores, adding into y in place (a token owns one row).
    k > 1: token-owned tiles that sum a token's k slots in registers (``_expand_token_kernel``):
    y is written once, deterministically, with no [P, d_out] fp32 row buffer and no combine
    pass."""
    reject_float64(h, B, base)
    P, d_out, max_rank = order.numel(), B.shape[0], h.shape[1]
    T = pos.shape[0]
    if P == 0 or d_out == 0 or B.shape[1] == 0 or max_rank == 0:
        return _output_y(base, T, d_out, h)
    if pos.shape[1] > 1:
        return _expand_by_token(h, B, rank_offsets, order, pos, expert_offsets, weights, scales,
                                base)
    blk = _blocks(P, expert_offsets.numel() - 1, 0, d_out, max_rank)
    g = _grouped(rank_offsets, order, pos, expert_offsets, weights, scales, blk.M)
    out = _output_y(base, g.T, d_out, h)
    _expand_kernel[(g.n_programs, triton.cdiv(d_out, blk.N))](
        h, B, out, g.ro, g.order, g.eo, g.w, g.s,
        d_out, g.E, g.K,
        h.stride(0), h.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        HAS_W=g.has_w, HAS_S=g.has_s, DOT_PREC=_dot_precision(h.dtype),
        E_POW2=g.e_pow2, BLOCK_M=blk.M, BLOCK_N=blk.N, BLOCK_R=blk.R)
    return out


def _expand_by_token(h, B, rank_offsets, order, pos, expert_offsets, weights, scales, base):
    P, d_out, max_rank = order.numel(), B.shape[0], h.shape[1]
    g = _grouped(rank_offsets, order, pos, expert_offsets, weights, scales, 1)
    y = torch.empty(g.T, d_out, dtype=h.dtype, device=h.device)
    bn = _blocks(P, g.E, 0, d_out, max_rank).N
    b = y if base is None else base  # dummy pointer when there is no base
    _expand_token_kernel[(triton.cdiv(g.T, BLOCK_T), triton.cdiv(d_out, bn))](
        h, B, b, y, g.ro, g.pos, g.eo, g.w, g.s,
        g.T, d_out, g.E, g.K, max_rank,
        h.stride(0), h.stride(1), B.stride(0), B.stride(1), b.stride(0), b.stride(1),
        y.stride(0), y.stride(1),
        HAS_W=g.has_w, HAS_S=g.has_s, HAS_BASE=base is not None, E_POW2=g.e_pow2,
        BLOCK_T=BLOCK_T, BLOCK_N=bn)
    return y


def _fused_col_splits(token_tiles: int, col_tiles: int, device: torch.device) -> int:
    """Column splits of the fused kernel's grid: while the token tiles alone leave SMs idle (T=4096
    is 64 tiles of 64 tokens for 132 SMs on an H200), each token tile's d_out is shared by as
    many programs as fit in one wave. Each recomputes its tile's h (shrink work and x reads from
    L2 per split) on an SM that would otherwise idle, and the wave's longest program, which sets
    the time, streams fewer columns. 1 on CPU (the interpreter). NOTE: untuned (the model of one
    wave; measured neither way)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    splits = max(1, min(col_tiles, sms // max(token_tiles, 1)))
    return triton.cdiv(col_tiles, triton.cdiv(col_tiles, splits))  # no program without columns


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def fused_moe_lora(x, A, B, rank_offsets, weights, ids, scales, base, *,
                   col_splits: Optional[int] = None):
    """y [T, d_out] (dtype x) = base + sum_j w[t, j] s_e B_e A_e x[t] over e = ids[t, j] (-1: no
    expert), in one launch with h on chip (``_fused_moe_lora_kernel``): the dense form, no
    dispatch. Bank total rank R = A.shape[0] <= FUSED_MAX_TOTAL_RANK.

    ``col_splits`` (not in the op schema; tests): programs sharing a token tile's d_out; None
    picks it with ``_fused_col_splits``."""
    reject_float64(x, A, B, base)
    T, d_in = x.shape
    R, d_out = A.shape[0], B.shape[0]
    if R > FUSED_MAX_TOTAL_RANK:
        raise ValueError(f"molora triton: fused_moe_lora keeps the whole bank on chip and needs "
                         f"total rank R <= {FUSED_MAX_TOTAL_RANK}, got {R}")
    if T == 0 or d_out == 0 or R == 0 or ids.shape[1] == 0:
        return _output_y(base, T, d_out, x)
    from .gated import expert_of_rank
    col_expert = expert_of_rank(rank_offsets, R)
    ids32 = index32(ids)
    w, s, has_w, has_s = _coef(weights, scales, col_expert)
    y = torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    b = y if base is None else base
    blk = _fused_blocks(T, d_in, d_out, R, x.dtype)
    token_tiles, col_tiles = triton.cdiv(T, blk.M), triton.cdiv(d_out, blk.N)
    if col_splits is None:
        col_splits = _fused_col_splits(token_tiles, col_tiles, x.device)
    cols_per_program = triton.cdiv(col_tiles, col_splits) * blk.N
    _fused_moe_lora_kernel[(token_tiles, triton.cdiv(d_out, cols_per_program))](
        x, A, B, b, y, ids32, w, s, col_expert,
        T, d_in, d_out, R, ids32.shape[1], cols_per_program,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        b.stride(0), b.stride(1), y.stride(0), y.stride(1),
        HAS_W=has_w, HAS_S=has_s, HAS_BASE=base is not None, DOT_PREC=_dot_precision(x.dtype),
        BLOCK_T=blk.M, BLOCK_K=blk.K, BLOCK_N=blk.N, BLOCK_R=blk.R, num_warps=FUSED_WARPS)
    return y


def sgmv_weight_grad(x, h, rank_offsets, order, pos, expert_offsets, weights, scales,
                     total_rank, transposed=False):
    """G [R, d] (dtype x): G[ro_e + a] = sum_{i in e} c_i h[i, a] x[t_i] (grouped X^T Y); with
    transposed, G^T [d, R] (contiguous), the same kernel storing through swapped strides."""
    reject_float64(x, h)
    d, max_rank = x.shape[1], h.shape[1]
    E = expert_offsets.numel() - 1
    # every row ro_e + a (a < r_e) is written by exactly one program: no zero fill needed
    out = torch.empty((d, total_rank) if transposed else (total_rank, d), dtype=x.dtype,
                      device=x.device)
    G = out.t() if transposed else out  # NOTE: untuned: G^T's stores are contiguous along ranks
    if total_rank == 0 or d == 0:
        return out
    if order.numel() == 0 or max_rank == 0:
        return out.zero_()
    blk = _weight_grad_blocks(order.numel(), E, d, max_rank, x.dtype)
    order, pos, eo, ro = map(index32, (order, pos, expert_offsets, rank_offsets))
    w, s, has_w, has_s = _coef(weights, scales, eo)
    grid = (E, triton.cdiv(max_rank, blk.R), triton.cdiv(d, blk.N))
    _weight_grad_kernel[grid](
        x, h, G, ro, order, eo, w, s, d, pos.shape[1],
        x.stride(0), x.stride(1), h.stride(0), h.stride(1), G.stride(0), G.stride(1),
        HAS_W=has_w, HAS_S=has_s, SPLIT_LO=(has_w or has_s) and x.dtype != torch.float32,
        DOT_PREC=_dot_precision(x.dtype), BLOCK_M=blk.M, BLOCK_R=blk.R, BLOCK_D=blk.N,
        num_warps=WEIGHT_GRAD_WARPS)
    return out


def pair_dot(a, b, pos, a_by_token):
    """out [T, k] fp32: out[t, j] = dot(a[t if a_by_token else pos[t, j]], b[pos[t, j]]), 0 where
    pos == -1 (routing-weight gradients)."""
    reject_float64(a, b)
    T, K = pos.shape
    out = torch.empty(T, K, dtype=torch.float32, device=b.device)
    d = b.shape[1]
    if T * K == 0:
        return out
    pos = index32(pos)
    bd = _blocks(0, 1, 0, d, 0).N
    _pair_dot_kernel[(triton.cdiv(T * K, BLOCK_T),)](
        a, b, out, pos, T * K, K, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        A_BY_TOKEN=bool(a_by_token), BLOCK_P=BLOCK_T, BLOCK_D=bd)
    return out


def sgmv_expand_backward(grad_y, h, B, rank_offsets, order, pos, expert_offsets, weights, scales):
    """(dB [d_out, R], u [P, max_rank] opmath, d w [T, k] opmath) of the expand: this file's
    shrink (grad_y and B in opmath), weight gradient and pair dot, one launch each. NOTE: untuned:
    the CPU fuses the first two."""
    acc = torch.float32
    u = sgmv_shrink(grad_y.to(acc), B.to(acc).t(), rank_offsets, order, pos, expert_offsets, None,
                    scales, h.shape[1])
    dB = sgmv_weight_grad(grad_y, h, rank_offsets, order, pos, expert_offsets, weights, scales,
                          B.shape[1], True)
    return dB, u, pair_dot(h.to(acc), u, pos, False)
