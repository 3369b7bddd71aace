"""Triton kernels of the grouped low-rank ops (one module per family, Liger-style).

Each module holds ``@triton.jit`` kernels and launchers named after the op they implement, with
the op schema's positional arguments (``molora_ops.triton.sgmv.sgmv_shrink(x, A, rank_offsets,
order, pos, expert_offsets, weights, scales, max_rank)``). Launchers do no validation (the op layer
checks first), never synchronise with the host, and run on CUDA tensors or, with
``TRITON_INTERPRET=1`` set before import, on CPU tensors in Triton's interpreter (the CPU tests).
Each op declaration names its launcher (``define(..., triton="module:function")`` in
``molora_ops/ops/``), which becomes the op's CUDA kernel where the extension has no CUDA C++ one.
"""
