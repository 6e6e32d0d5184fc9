"""The yardstick of the offline gate: causal attention without a position term, in the structure
known to be fast on Hopper (the structure of Triton's fused-attention tutorial), written here.

It is what relattn's forward key loop is measured against in ``tools/gpu_compile.py --gate``
(BENCHMARKS.md): tensor descriptors (TMA) for q, k, v and out over the (B·H·N, D) rows; the key
blocks below the diagonal in a loop without mask arithmetic and the diagonal blocks in a
masked loop of their own; log2 e folded into the scale and the running maximum subtracted in
the same FFMA (``qk·scale - m``), so a score costs one FFMA and one ``exp2``. Not used by the
library; compiled for sm_90a only and run in Triton's interpreter by the tests.

    out, lse = yardstick_forward(q, k, v)   # q, k, v (B, H, N, D) contiguous; lse natural log
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _yardstick_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_desc,
    v_desc,
    row0,
    start,
    stop,
    offs_m,
    qk_scale,
    DIAGONAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Key blocks [start, stop) of one query block (rows ``offs_m``; the (b, h) rows of the
    flattened tensors begin at ``row0``). DIAGONAL: the blocks the causal mask cuts."""
    for start_n in tl.range(start, stop, BLOCK_N):
        k = k_desc.load([row0 + start_n, 0])
        qk = tl.dot(q, tl.trans(k))
        if DIAGONAL:
            keep = offs_m[:, None] >= start_n + tl.arange(0, BLOCK_N)[None, :]
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FFMA a score
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([row0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def yardstick_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    N,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per (query block, batch·head); Q, K, V, Out (B·H·N, D) rows, N a multiple of
    BLOCK_M and of BLOCK_N; Lse (B·H·N) float32. ``qk_scale`` includes log2 e."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tl.num_programs(1) * N
    row0 = bh * N
    shape = [rows, HEAD_DIM]
    q_desc = tl.make_tensor_descriptor(Q, shape, [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, shape, [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, shape, [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(Out, shape, [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([row0 + start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # below the diagonal: every pair visible
    acc, l_i, m_i = _yardstick_blocks(
        acc, l_i, m_i, q, k_desc, v_desc, row0, 0, start_m, offs_m, qk_scale, False, BLOCK_N
    )
    # the diagonal blocks
    acc, l_i, m_i = _yardstick_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_desc,
        v_desc,
        row0,
        start_m,
        start_m + BLOCK_M,
        offs_m,
        qk_scale,
        True,
        BLOCK_N,
    )
    o_desc.store([row0 + start_m, 0], (acc / l_i[:, None]).to(Out.dtype.element_ty))
    tl.store(Lse + row0 + offs_m, (m_i + tl.math.log2(l_i)) * LN2)


def yardstick_forward(q, k, v, block_m: int = 16, block_n: int = 16):
    """``(out, lse)`` of causal attention without a position term (scale 1/√D); q, k, v
    ``(B, H, N, D)`` contiguous, N a multiple of both blocks. For the tests."""
    import torch

    b, h, n, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    if q.is_cuda:  # device-side descriptors take a global scratch buffer per launch
        triton.set_allocator(
            lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=q.device)
        )
    yardstick_fwd[(n // block_m, b * h)](
        q,
        k,
        v,
        out,
        lse,
        n,
        d**-0.5 * 1.4426950408889634,
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return out, lse
