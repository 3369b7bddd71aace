"""Triton kernels of the rank-wise masked ops (docs/OPS.md, Family 4) and their backward ops.

* ``rank_sparse_shrink``: ``h[t, j] = dot(A[ids[t, j]], x[t])``, a gathered-row dot per token
  (``_sparse_shrink_kernel``): only the k kept rows of A are read, accumulated in fp32.
* ``rank_sparse_expand``: ``y[t] = base[t] + scale * sum_j w[t,j] v[t,j] B[:, ids[t,j]]``, one
  program per (token tile, d_out tile) looping over the k slots and gathering only the kept
  columns of B (``_sparse_expand_kernel``). Token-owned: each y element is written once, no atomics.
* ``rank_scatter``: the same kernel with B = the identity (``out[t, r] = sum_j [ids[t,j] == r]
  src[t,j]``): every out element is written once, zeros included (no memset, deterministic).
* ``rank_sparse_weight_grad``: ``G = S^T x`` with ``S = rank_scatter(g)`` [T, R] in fp32, on the
  shared tiled matmul of ``gated.py``. Deterministic (no atomics) and on the tensor cores; it does
  R/k times the FLOPs of the sparse sum, which is the better trade while R/k is small (the
  atomic alternative issues T*k*d fp32 atomics). NOTE: untuned (the crossover in R/k).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import index32, reject_float64
from .gated import matmul, sparse_expand_config, sparse_shrink_config

__all__ = ["rank_sparse_shrink", "rank_sparse_expand", "rank_scatter", "rank_sparse_weight_grad"]


@triton.jit
def _sparse_shrink_kernel(x_ptr, a_ptr, ids_ptr, h_ptr, T, D, k,
                          s_xt, s_xd, s_ar, s_ad, s_it, s_ij,
                          BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """h[t, j] = sum_d x[t, d] * A[ids[t, j], d] (0 where ids == -1); h [T, k] contiguous.
    A rows are gathered as a [BLOCK_T, BLOCK_J, BLOCK_D] tile, contiguous along d when A is
    row-major; the x tile is loaded once per d step and reused by the BLOCK_J slots."""
    pid_t = tl.program_id(0)
    pid_j = tl.program_id(1)
    rt = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    rd = tl.arange(0, BLOCK_D)
    t_ok = rt < T
    tj_ok = t_ok[:, None] & (rj[None, :] < k)
    ids = tl.load(ids_ptr + rt[:, None] * s_it + rj[None, :] * s_ij, mask=tj_ok, other=-1)
    ok = ids >= 0
    rows = tl.where(ok, ids, 0).to(tl.int64)  # no address is formed from -1
    acc = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cd = d0 + rd
        d_ok = cd < D
        xv = tl.load(x_ptr + rt[:, None] * s_xt + cd[None, :] * s_xd,
                     mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        av = tl.load(a_ptr + rows[:, :, None] * s_ar + cd[None, None, :] * s_ad,
                     mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[:, None, :], axis=2)
    tl.store(h_ptr + rt[:, None] * k + rj[None, :], acc, mask=tj_ok)


@triton.jit
def _sparse_expand_kernel(v_ptr, ids_ptr, b_ptr, w_ptr, base_ptr, y_ptr, T, N, k, scale,
                          s_vt, s_vj, s_it, s_ij, s_bn, s_br, s_wt, s_wj, s_dt, s_dn,
                          B_IS_IDENTITY: tl.constexpr, HAS_W: tl.constexpr, HAS_BASE: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[t, n] = base[t, n] + scale * sum_j w[t,j] v[t,j] B[n, ids[t,j]] (ids == -1 skipped);
    y [T, N] contiguous. B_IS_IDENTITY: B[n, r] = [n == r] (rank_scatter; b_ptr unused).

    The B gather reads, for a fixed n, entries of row n only (R contiguous elements of a
    row-major [d_out, R] bank, one or two cache lines shared by the whole token tile), and is
    fully coalesced along n for a transposed bank (A.t() in the shrink backward)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rt = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    t_ok = rt < T
    n_ok = rn < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(k):
        ids = tl.load(ids_ptr + rt * s_it + j * s_ij, mask=t_ok, other=-1)
        ok = ids >= 0
        c = tl.load(v_ptr + rt * s_vt + j * s_vj, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            c *= tl.load(w_ptr + rt * s_wt + j * s_wj, mask=ok, other=0.0).to(tl.float32)
        col = tl.where(ok, ids, 0).to(tl.int64)  # no address is formed from -1
        if B_IS_IDENTITY:
            b = (rn[None, :] == col[:, None]).to(tl.float32)
        else:
            b = tl.load(b_ptr + rn[None, :] * s_bn + col[:, None] * s_br,
                        mask=ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += c[:, None] * b
    out = acc * scale
    mask = t_ok[:, None] & n_ok[None, :]
    if HAS_BASE:
        d = tl.load(base_ptr + rt[:, None] * s_dt + rn[None, :] * s_dn, mask=mask, other=0.0)
        out += d.to(tl.float32)
    tl.store(y_ptr + rt[:, None] * N + rn[None, :], out, mask=mask)


def _expand(values, ids, B, weights, scale, base, out, identity):
    """Launches ``_sparse_expand_kernel`` into ``out`` [T, N] (contiguous)."""
    T, N = out.shape
    if T == 0 or N == 0:
        return out
    ids = index32(ids)
    cfg = sparse_expand_config(N)
    b = out if identity else B  # never read with B_IS_IDENTITY
    w = weights if weights is not None else values  # never read without HAS_W
    d = base if base is not None else out  # never read without HAS_BASE
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _sparse_expand_kernel[grid](
        values, ids, b, w, d, out, T, N, ids.shape[1], float(scale),
        values.stride(0), values.stride(1), ids.stride(0), ids.stride(1), b.stride(0),
        b.stride(1), w.stride(0), w.stride(1), d.stride(0), d.stride(1),
        B_IS_IDENTITY=identity, HAS_W=weights is not None, HAS_BASE=base is not None, **cfg)
    return out


def rank_sparse_shrink(x: torch.Tensor, A: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [T,d_in], A [R,d_in], ids [T,k] -> h [T,k] (x.dtype), h[t,j] = dot(A[ids[t,j]], x[t])."""
    reject_float64(x, A)
    T, D = x.shape
    k = ids.shape[1]
    h = torch.empty(T, k, device=x.device, dtype=x.dtype)
    if T == 0 or k == 0:
        return h
    ids = index32(ids)
    cfg = sparse_shrink_config(k, D)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(k, cfg["BLOCK_J"]))
    _sparse_shrink_kernel[grid](x, A, ids, h, T, D, k, x.stride(0), x.stride(1), A.stride(0),
                                A.stride(1), ids.stride(0), ids.stride(1), **cfg)
    return h


def rank_sparse_expand(values: torch.Tensor, ids: torch.Tensor, B: torch.Tensor,
                       weights: Optional[torch.Tensor] = None, scale: float = 1.0,
                       base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """values [T,k], ids [T,k], B [d_out,R], weights [T,k] or None, base [T,d_out] or None
    -> y [T,d_out] (values.dtype), reading only the kept columns of B."""
    reject_float64(values, B, weights, base)
    y = torch.empty(values.shape[0], B.shape[0], device=values.device, dtype=values.dtype)
    return _expand(values, ids, B, weights, scale, base, y, identity=False)


def rank_scatter(src: torch.Tensor, ids: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """src [T,k], ids [T,k] -> out [T,num_ranks] (src.dtype), out[t, ids[t,j]] += src[t,j]."""
    reject_float64(src)
    out = torch.empty(src.shape[0], num_ranks, device=src.device, dtype=src.dtype)
    return _expand(src, ids, None, None, 1.0, None, out, identity=True)


def rank_sparse_weight_grad(x: torch.Tensor, g: torch.Tensor, ids: torch.Tensor,
                            num_ranks: int) -> torch.Tensor:
    """x [T,d], g [T,k], ids [T,k] -> G [num_ranks, d] (x.dtype), G[ids[t,j]] += g[t,j] * x[t].

    G = S^T x, S = the fp32 rank scatter of g (module docstring: why dense and deterministic)."""
    reject_float64(x, g)
    S = torch.empty(x.shape[0], num_ranks, device=x.device, dtype=torch.float32)
    _expand(g, ids, None, None, 1.0, None, S, identity=True)
    G = torch.empty(num_ranks, x.shape[1], device=x.device, dtype=x.dtype)
    return matmul(S.t(), x, G)
