"""Causal flash-attention forward for Hopper (sm_90) written in Gluon (Triton 3.6).

Prototype to compare an explicitly scheduled Gluon kernel against cuDNN SDPA.

    q, k, v : bf16 [B, H, N, D], contiguous, D in {64, 128}, N % 128 == 0
    out     : bf16 [B, H, N, D]
    lse     : fp32 [B, H, N]   natural-log row log-sum-exp of (q k^T / sqrt(D)), causal

Versions
  A : one partition (no warp specialization). K/V tiles in a STAGES-deep smem ring,
      loaded by TMA; the load of block j+STAGES-1 is issued before block j is computed.
      QK^T and PV by async warpgroup_mma, waited right away.
  B : gl.warp_specialize: a 1-warp producer partition issues the TMA loads of Q/K/V into
      the ring (ready/empty mbarriers per slot, K and V released separately); the
      default partition (num_warps = 4 per consumer warpgroup) does softmax + wgmma with
      FA3-style intra-warpgroup overlap: QK(j) and PV(j-1) are in flight together and the
      softmax of block j runs while PV(j-1) is still executing. With num_warps=8 both consumer
      warpgroups sit in one partition (the compiler's partition-wide barriers keep them in
      lockstep); with num_warps=4, BLOCK_M=64 and two CTAs per SM instead.
  C : as B, but each of the two consumer warpgroups is its own partition (default + 4-warp
      worker), sharing the K/V ring (empty barriers count 2); no barrier couples them, so one
      can run its softmax while the other's wgmmas run (ping-pong left to the schedulers).

Usage
  PYTHONPATH=. python docs/experiments/gluon_fwd.py --compile-only     # offline, sm_90 target, no GPU
  PYTHONPATH=. python docs/experiments/gluon_fwd.py --check-and-time   # on the H200
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, STAGES, num_warps) per version and head dim; at most 2 per D.
# A/B with num_warps=8: two consumer warpgroups, 64 query rows each, one CTA per SM.
# B with num_warps=4: one consumer warpgroup (BLOCK_M=64), smem/registers small enough for
#   two CTAs per SM, so the two CTAs' softmax and wgmma phases interleave on their own.
# C: num_warps=4 is per consumer partition (two of them, 64 rows each), one CTA per SM.
CONFIGS = {
    "A": {64: [(128, 128, 3, 8), (128, 64, 3, 8)], 128: [(128, 128, 2, 8), (128, 64, 3, 8)]},
    "B": {64: [(128, 128, 3, 8), (64, 128, 3, 4)], 128: [(128, 128, 2, 8), (64, 64, 2, 4)]},
    "C": {64: [(128, 128, 3, 4), (128, 64, 3, 4)], 128: [(128, 128, 2, 4), (128, 64, 3, 4)]},
}
VERSIONS = ["A", "B", "C"]


# ----------------------------------------------------------------------------- layouts
@gluon.constexpr_function
def _mma_layout(num_warps, n):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


# ----------------------------------------------------------------------------- shared helpers
@gluon.jit
def _tma_load(desc, row, bar, dst, pred=True):
    """TMA-load the [rows, D] block at global row `row` into dst; completion signals bar."""
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, 0], bar, dst, pred=pred)


@gluon.jit
def _prefetch_kv(
    jn, n_blocks, row0, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, BLOCK_N: gl.constexpr, STAGES: gl.constexpr
):
    """Version A: K/V block jn (if it exists) into ring slot jn % STAGES."""
    sn = jn % STAGES
    _tma_load(k_desc, row0 + jn * BLOCK_N, k_bars.index(sn), k_smem.index(sn), pred=jn < n_blocks)
    _tma_load(v_desc, row0 + jn * BLOCK_N, v_bars.index(sn), v_smem.index(sn), pred=jn < n_blocks)


@gluon.jit
def _softmax_block(
    qk,
    j,
    start_m,
    m_i,
    l_i,
    qk_scale,
    MASK: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    s_layout: gl.constexpr,
):
    """qk: fp32 [BLOCK_M, BLOCK_N] raw scores of key block j. Returns p (fp32, unnormalised,
    base-2 with the scale folded), alpha (rescale factor for acc/l), and new m_i, l_i [BLOCK_M]."""
    if MASK:
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = gl.expand_dims(offs_m, 1) >= gl.expand_dims(offs_n, 0)
        qk = gl.where(keep, qk, gl.full(qk.shape, float("-inf"), gl.float32, s_layout))
    m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(qk * qk_scale - gl.expand_dims(m_new, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _epilogue(
    acc,
    m_i,
    l_i,
    q_smem,
    o_desc,
    lse_ptr,
    bh,
    N,
    start_m,
    BLOCK_M: gl.constexpr,
    s_layout: gl.constexpr,
    o_layout: gl.constexpr,
):
    """acc: fp32 [BLOCK_M, D]; writes out[bh, start_m:start_m+BLOCK_M, :] (TMA store via
    q_smem, which is free by now) and lse[bh, start_m:...] = ln(sum exp(scaled scores))."""
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = acc / gl.expand_dims(l_o, 1)
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(lse_ptr + bh.to(gl.int64) * N + offs_m, lse)
    gl.thread_barrier()  # every warpgroup is done reading q_smem
    q_smem.store(out.to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(o_desc, [bh * N + start_m, 0], q_smem)
    tma.store_wait(0)


# ----------------------------------------------------------------------------- version A
@gluon.jit
def _step_a(
    j,
    n_blocks,
    row0,
    start_m,
    q_smem,
    k_smem,
    v_smem,
    k_bars,
    v_bars,
    k_desc,
    v_desc,
    acc,
    m_i,
    l_i,
    s_zero,
    qk_scale,
    MASK: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    s_layout: gl.constexpr,
    o_layout: gl.constexpr,
):
    """One key block j of version A; returns updated acc [BLOCK_M, D], m_i, l_i [BLOCK_M]."""
    # Prefetch block j+STAGES-1 into the slot block j-1 used (its wgmmas were waited on).
    gl.thread_barrier()  # all warpgroups are past block j-1
    _prefetch_kv(j + STAGES - 1, n_blocks, row0, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, BLOCK_N, STAGES)
    s = j % STAGES
    ph = (j // STAGES) & 1
    mbarrier.wait(k_bars.index(s), ph)
    qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    qk = warpgroup_mma_wait(0, deps=(qk,))
    p, alpha, m_i, l_i = _softmax_block(qk, j, start_m, m_i, l_i, qk_scale, MASK, BLOCK_M, BLOCK_N, s_layout)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    p16 = gl.convert_layout(p.to(gl.bfloat16), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    mbarrier.wait(v_bars.index(s), ph)
    acc = warpgroup_mma(p16, v_smem.index(s), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    return acc, m_i, l_i


@gluon.jit
def attn_fwd_a(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    N,
    qk_scale,  #
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_D: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    """grid = (B*H, N // BLOCK_M); descriptors view q/k/v/o as [B*H*N, D]."""
    bh = gl.program_id(0)
    pid_m = gl.num_programs(1) - 1 - gl.program_id(1)  # heaviest (longest) query blocks first
    start_m = pid_m * BLOCK_M
    row0 = bh * N
    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(num_warps, HEAD_D)

    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()
    gl.thread_barrier()

    n_full = start_m // BLOCK_N  # key blocks entirely below the diagonal
    n_blocks = (start_m + BLOCK_M) // BLOCK_N  # BLOCK_M % BLOCK_N == 0

    _tma_load(q_desc, row0 + start_m, q_bar, q_smem)
    for i in gl.static_range(STAGES - 1):
        _prefetch_kv(i, n_blocks, row0, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, BLOCK_N, STAGES)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)

    for j in range(0, n_full):
        acc, m_i, l_i = _step_a(
            j,
            n_blocks,
            row0,
            start_m,
            q_smem,
            k_smem,
            v_smem,
            k_bars,
            v_bars,
            k_desc,
            v_desc,
            acc,
            m_i,
            l_i,
            s_zero,
            qk_scale,
            False,
            BLOCK_M,
            BLOCK_N,
            STAGES,
            s_layout,
            o_layout,
        )
    for j in range(n_full, n_blocks):
        acc, m_i, l_i = _step_a(
            j,
            n_blocks,
            row0,
            start_m,
            q_smem,
            k_smem,
            v_smem,
            k_bars,
            v_bars,
            k_desc,
            v_desc,
            acc,
            m_i,
            l_i,
            s_zero,
            qk_scale,
            True,
            BLOCK_M,
            BLOCK_N,
            STAGES,
            s_layout,
            o_layout,
        )

    _epilogue(acc, m_i, l_i, q_smem, o_desc, lse_ptr, bh, N, start_m, BLOCK_M, s_layout, o_layout)


# ----------------------------------------------------------------------------- version B
@gluon.jit
def _b_loader(
    q_desc,
    k_desc,
    v_desc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    k_ready,
    v_ready,
    k_empty,
    v_empty,  #
    row0,
    start_m,
    n_blocks,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Producer partition (1 warp): Q once (q_smem [NQ, BLOCK_M // NQ, D], one piece per
    consumer warpgroup partition), then K/V block j into ring slot j % STAGES."""
    NQ: gl.constexpr = q_smem.shape[0]
    QROWS: gl.constexpr = q_smem.shape[1]
    mbarrier.expect(q_bar, NQ * q_desc.block_type.nbytes)
    for i in gl.static_range(NQ):
        tma.async_copy_global_to_shared(q_desc, [row0 + start_m + i * QROWS, 0], q_bar, q_smem.index(i))
    for j in range(n_blocks):
        s = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(k_empty.index(s), ph ^ 1)  # fresh barrier: parity 1 passes at once
        _tma_load(k_desc, row0 + j * BLOCK_N, k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        _tma_load(v_desc, row0 + j * BLOCK_N, v_ready.index(s), v_smem.index(s))


@gluon.jit
def _b_step(
    j,
    start_m,
    q_smem,
    k_smem,
    v_smem,
    k_ready,
    v_ready,
    k_empty,
    v_empty,
    p_prev,
    acc,
    m_i,
    l_i,
    s_zero,
    qk_scale,
    MASK: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    s_layout: gl.constexpr,
    o_layout: gl.constexpr,
):
    """Issue QK(j) then PV(j-1); softmax(j) overlaps PV(j-1). p_prev: bf16 [BLOCK_M, BLOCK_N]
    probabilities of block j-1 (dot-operand layout); acc already rescaled up to block j-1."""
    s = j % STAGES
    ph = (j // STAGES) & 1
    sp = (j - 1) % STAGES
    php = ((j - 1) // STAGES) & 1
    mbarrier.wait(k_ready.index(s), ph)
    qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(sp), php)
    acc = warpgroup_mma(p_prev, v_smem.index(sp), acc, is_async=True)
    qk = warpgroup_mma_wait(1, deps=(qk,))  # QK(j) done, PV(j-1) may still run
    mbarrier.arrive(k_empty.index(s))
    p, alpha, m_i, l_i = _softmax_block(qk, j, start_m, m_i, l_i, qk_scale, MASK, BLOCK_M, BLOCK_N, s_layout)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(v_empty.index(sp))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    p_prev = gl.convert_layout(p.to(gl.bfloat16), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    return p_prev, acc, m_i, l_i


@gluon.jit
def _b_consumer(
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    k_ready,
    v_ready,
    k_empty,
    v_empty,
    start_m,
    n_full,
    n_blocks,
    qk_scale,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_D: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Default partition (num_warps warps = num_warps/4 consumer warpgroups, 64 rows each).
    Returns acc fp32 [BLOCK_M, HEAD_D] (unnormalised), m_i, l_i fp32 [BLOCK_M]."""
    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(num_warps, HEAD_D)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    # block 0 (masked: a no-op unless this is the first query tile, and only one block)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    qk = warpgroup_mma_wait(0, deps=(qk,))
    mbarrier.arrive(k_empty.index(0))
    p, alpha, m_i, l_i = _softmax_block(qk, 0, start_m, m_i, l_i, qk_scale, True, BLOCK_M, BLOCK_N, s_layout)
    p_prev = gl.convert_layout(p.to(gl.bfloat16), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))

    for j in range(1, n_full):
        p_prev, acc, m_i, l_i = _b_step(
            j,
            start_m,
            q_smem,
            k_smem,
            v_smem,
            k_ready,
            v_ready,
            k_empty,
            v_empty,
            p_prev,
            acc,
            m_i,
            l_i,
            s_zero,
            qk_scale,
            False,
            BLOCK_M,
            BLOCK_N,
            STAGES,
            s_layout,
            o_layout,
        )
    for j in range(gl.maximum(n_full, 1), n_blocks):
        p_prev, acc, m_i, l_i = _b_step(
            j,
            start_m,
            q_smem,
            k_smem,
            v_smem,
            k_ready,
            v_ready,
            k_empty,
            v_empty,
            p_prev,
            acc,
            m_i,
            l_i,
            s_zero,
            qk_scale,
            True,
            BLOCK_M,
            BLOCK_N,
            STAGES,
            s_layout,
            o_layout,
        )
    # PV of the last block
    jl = n_blocks - 1
    sl = jl % STAGES
    mbarrier.wait(v_ready.index(sl), (jl // STAGES) & 1)
    acc = warpgroup_mma(p_prev, v_smem.index(sl), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    return acc, m_i, l_i


@gluon.jit
def _c_consumer(
    WG: gl.constexpr,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    k_ready,
    v_ready,
    k_empty,
    v_empty,
    o_desc,
    lse_ptr,
    bh,
    N,
    start_m,
    n_full,
    n_blocks,
    qk_scale,
    HALF_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_D: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Version C: one consumer warpgroup as its own partition: query rows start_m + WG*HALF_M
    + [0, HALF_M) of the CTA tile; runs the B consumer loop over all key blocks of the CTA
    tile, then stores its own out rows / lse."""
    s_layout: gl.constexpr = _mma_layout(4, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(4, HEAD_D)
    start_w = start_m + WG * HALF_M
    q_w = q_smem.index(WG)
    acc, m_i, l_i = _b_consumer(
        q_w,
        k_smem,
        v_smem,
        q_bar,
        k_ready,
        v_ready,
        k_empty,
        v_empty,
        start_w,
        n_full,
        n_blocks,
        qk_scale,
        HALF_M,
        BLOCK_N,
        HEAD_D,
        STAGES,
        4,
    )
    _epilogue(acc, m_i, l_i, q_w, o_desc, lse_ptr, bh, N, start_w, HALF_M, s_layout, o_layout)


@gluon.jit
def attn_fwd_ws(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    N,
    qk_scale,  #
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_D: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Versions B and C (warp-specialized), grid = (B*H, N // BLOCK_M). The q/o descriptor
    block has BLOCK_M rows for B (one consumer partition of num_warps warps + 1 loader warp)
    and BLOCK_M // 2 rows for C (two 4-warp consumer partitions + 1 loader warp)."""
    SPLIT: gl.constexpr = BLOCK_M // q_desc.block_type.shape[0]
    QROWS: gl.constexpr = BLOCK_M // SPLIT
    bh = gl.program_id(0)
    pid_m = gl.num_programs(1) - 1 - gl.program_id(1)
    start_m = pid_m * BLOCK_M
    row0 = bh * N

    q_smem = gl.allocate_shared_memory(gl.bfloat16, [SPLIT, QROWS, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=SPLIT)  # one (single-thread) arrive per consumer partition
        mbarrier.init(v_empty.index(i), count=SPLIT)
    fence_async_shared()
    gl.thread_barrier()

    n_full = start_m // BLOCK_N  # key blocks entirely below the diagonal
    n_blocks = (start_m + BLOCK_M) // BLOCK_N
    loader_args = (
        q_desc,
        k_desc,
        v_desc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        k_ready,
        v_ready,
        k_empty,
        v_empty,
        row0,
        start_m,
        n_blocks,
        BLOCK_N,
        STAGES,
    )
    if SPLIT == 1:
        acc, m_i, l_i = gl.warp_specialize(
            [
                (
                    _b_consumer,
                    (
                        q_smem.index(0),
                        k_smem,
                        v_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        k_empty,
                        v_empty,
                        start_m,
                        n_full,
                        n_blocks,
                        qk_scale,
                        BLOCK_M,
                        BLOCK_N,
                        HEAD_D,
                        STAGES,
                        num_warps,
                    ),
                ),
                (_b_loader, loader_args),
            ],
            [1],
            [24],
        )
        _epilogue(
            acc,
            m_i,
            l_i,
            q_smem.index(0),
            o_desc,
            lse_ptr,
            bh,
            N,
            start_m,
            BLOCK_M,
            _mma_layout(num_warps, BLOCK_N),
            _mma_layout(num_warps, HEAD_D),
        )
    else:
        gl.static_assert(SPLIT == 2, "C: two consumer partitions")
        gl.static_assert(num_warps == 4, "C: 4 warps per consumer partition")
        gl.warp_specialize(
            [
                (
                    _c_consumer,
                    (
                        0,
                        q_smem,
                        k_smem,
                        v_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        k_empty,
                        v_empty,
                        o_desc,
                        lse_ptr,
                        bh,
                        N,
                        start_m,
                        n_full,
                        n_blocks,
                        qk_scale,
                        QROWS,
                        BLOCK_N,
                        HEAD_D,
                        STAGES,
                    ),
                ),
                (
                    _c_consumer,
                    (
                        1,
                        q_smem,
                        k_smem,
                        v_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        k_empty,
                        v_empty,
                        o_desc,
                        lse_ptr,
                        bh,
                        N,
                        start_m,
                        n_full,
                        n_blocks,
                        qk_scale,
                        QROWS,
                        BLOCK_N,
                        HEAD_D,
                        STAGES,
                    ),
                ),
                (_b_loader, loader_args),
            ],
            [4, 1],
            [240, 24],
        )  # registers/thread: second consumer warpgroup, loader


# ----------------------------------------------------------------------------- host side
KERNELS = {"A": attn_fwd_a, "B": attn_fwd_ws, "C": attn_fwd_ws}


def _layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


def _q_rows(version, BLOCK_M):
    """Rows of the q/o TMA blocks: C splits the CTA's query tile between two partitions."""
    return BLOCK_M // 2 if version == "C" else BLOCK_M


def _launch_opts(version, num_warps):
    """B/C: the loader warp is padded to a warpgroup (C adds a second consumer warpgroup):
    cap registers/thread so the CTA(s) fit in 64K registers; setmaxnreg then moves the
    loader's share to the consumers."""
    if version in ("B", "C"):
        ctas_per_sm = 2 if (version == "B" and num_warps == 4) else 1
        extra_warps = 8 if version == "C" else 4  # C: second consumer warpgroup + loader
        total_threads = (num_warps + extra_warps) * 32 * ctas_per_sm
        return {"num_warps": num_warps, "maxnreg": (65536 // total_threads) // 8 * 8}
    return {"num_warps": num_warps}


def _prepare(q, k, v, version="A", cfg=None):
    """Allocate out/lse, build the TMA descriptors; returns (launch, out, lse) where launch()
    runs the kernel (so timing excludes the host-side descriptor set-up)."""
    B, H, N, D = q.shape
    assert k.shape == q.shape and v.shape == q.shape, "no GQA / cross-attention in this prototype"
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.is_cuda
    assert D in (64, 128), "D must be 64 or 128"
    assert N % 128 == 0, "N must be a multiple of 128"
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    BLOCK_M, BLOCK_N, STAGES, num_warps = cfg if cfg is not None else CONFIGS[version][D][0]
    assert BLOCK_M % BLOCK_N == 0 and N % BLOCK_M == 0
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    q2, k2, v2, o2 = (t.view(B * H * N, D) for t in (q, k, v, out))
    QM = _q_rows(version, BLOCK_M)
    q_desc = TensorDescriptor.from_tensor(q2, [QM, D], _layout([QM, D]))
    k_desc = TensorDescriptor.from_tensor(k2, [BLOCK_N, D], _layout([BLOCK_N, D]))
    v_desc = TensorDescriptor.from_tensor(v2, [BLOCK_N, D], _layout([BLOCK_N, D]))
    o_desc = TensorDescriptor.from_tensor(o2, [QM, D], _layout([QM, D]))
    qk_scale = LOG2E / math.sqrt(D)
    grid = (B * H, N // BLOCK_M)
    kernel, opts = KERNELS[version], _launch_opts(version, num_warps)

    def launch():
        kernel[grid](q_desc, k_desc, v_desc, o_desc, lse, N, qk_scale, BLOCK_M, BLOCK_N, D, STAGES, **opts)

    return launch, out, lse


def gluon_attention(q, k, v, version="A", cfg=None):
    """q, k, v: bf16 [B, H, N, D] contiguous -> (out bf16 [B, H, N, D], lse fp32 [B, H, N]).
    cfg = (BLOCK_M, BLOCK_N, STAGES, num_warps), default CONFIGS[version][D][0]."""
    launch, out, lse = _prepare(q, k, v, version, cfg)
    launch()
    return out, lse


# ----------------------------------------------------------------------------- offline compile
def _desc_sig(block):
    return f"tensordesc<bf16[{block[0]}, {block[1]}],{_layout(block)!r}>"


def compile_offline(version, D, cfg):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    BLOCK_M, BLOCK_N, STAGES, num_warps = cfg
    QM = _q_rows(version, BLOCK_M)
    sig = {
        "q_desc": _desc_sig([QM, D]),
        "k_desc": _desc_sig([BLOCK_N, D]),
        "v_desc": _desc_sig([BLOCK_N, D]),
        "o_desc": _desc_sig([QM, D]),
        "lse_ptr": "*fp32",
        "N": "i32",
        "qk_scale": "fp32",
    }
    consts = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "HEAD_D": D, "STAGES": STAGES, "num_warps": num_warps}
    sig.update({name: "constexpr" for name in consts})
    src = GluonASTSource(KERNELS[version], signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=_launch_opts(version, num_warps))


def ptxas_stats(ptx):
    """ptxas -v on the PTX: registers, spill bytes, and any warning (e.g. wgmma serialization)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        r = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True
        )
    txt = r.stdout + r.stderr
    (regs,) = re.findall(r"Used (\d+) registers", txt) or ["?"]
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", txt)
    warns = [ln.strip() for ln in txt.splitlines() if "warn" in ln.lower() or "serializ" in ln.lower()]
    warn = f" PTXAS: {' | '.join(warns)[:300]}" if warns else ""
    return f"regs={regs} spill_st/ld={'/'.join(spills) or '?'}{warn}"


def _brief(e):
    """Short description of a (possibly nested) compilation error."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {' | '.join(str(e).strip().splitlines()[-4:])[:800]}"


def compile_only():
    for version in VERSIONS:
        for D in (64, 128):
            for cfg in CONFIGS[version][D]:
                tag = f"{version} D={D} BM,BN,STAGES,warps={cfg}"
                try:
                    kern = compile_offline(version, D, cfg)
                    ptx = kern.asm["ptx"]
                    nreg = sorted({int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)})
                    ws = f" setmaxnreg={nreg} maxnreg={kern.metadata.maxnreg}" if nreg else ""
                    print(
                        f"OK     {tag}: {ptxas_stats(ptx)}{ws} smem={kern.metadata.shared}B "
                        f"warps={kern.metadata.num_warps}",
                        flush=True,
                    )
                except Exception as e:  # noqa: BLE001
                    print(f"FAILED {tag}: {_brief(e)}", flush=True)


# ----------------------------------------------------------------------------- device check + timing
def _ref_lse(q, k):
    """fp32 reference lse [B, H, N] (natural log) of causal softmax(q k^T / sqrt(D))."""
    N, D = q.shape[-2:]
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(D)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    return torch.logsumexp(s.masked_fill(~causal, float("-inf")), dim=-1)


def _check_and_time_one(version):
    """Child process body: correctness, then timing, for one version. Prints ROW lines."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    ok = {}
    for D in (64, 128):
        for cfg in CONFIGS[version][D]:
            tag = f"{version} D={D} cfg(BM,BN,ST,W)={cfg}"
            try:
                errs = []
                for N in (128, 384, 1024):
                    q, k, v = (torch.randn(2, 4, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                    out, lse = gluon_attention(q, k, v, version, cfg)
                    torch.cuda.synchronize()
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    e_out = (out.float() - ref.float()).abs().max().item()
                    e_lse = (lse - _ref_lse(q, k)).abs().max().item()
                    errs.append((N, e_out, e_lse))
                ok[(D, cfg)] = all(e < 2e-2 for _, e, _ in errs)  # NaN fails too
                lse_bad = not all(e < 1e-3 for _, _, e in errs)
                detail = "  ".join(f"N={n}: out {eo:.2e} lse {el:.2e}" for n, eo, el in errs)
                print(
                    f"{'ok    ' if ok[(D, cfg)] else 'FAILED'} {tag}  {detail}{'  (LSE OFF)' if lse_bad else ''}",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                ok[(D, cfg)] = False
                print(f"FAILED {tag}: {_brief(e)}", flush=True)
    for D in (64, 128):
        for N in (8192, 16384):
            if not any(ok.get((D, cfg)) for cfg in CONFIGS[version][D]):
                continue
            q, k, v = (torch.randn(1, 32, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    t_sdpa = triton.testing.do_bench(
                        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),  # noqa: B023 (do_bench calls it at once)
                        warmup=25,
                        rep=200,
                    )
            except Exception as e:  # noqa: BLE001
                print(f"cuDNN SDPA failed D={D} N={N}: {_brief(e)}", flush=True)
                t_sdpa = float("nan")
            for cfg in CONFIGS[version][D]:
                if not ok.get((D, cfg)):
                    continue
                try:
                    launch, _, _ = _prepare(q, k, v, version, cfg)
                    t = triton.testing.do_bench(launch, warmup=25, rep=200)
                    print("ROW " + json.dumps([version, D, N, list(cfg), t_sdpa, t]), flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"timing failed {version} D={D} N={N} {cfg}: {_brief(e)}", flush=True)


def check_and_time(child_timeout=80):
    """Runs each version in its own process (a hang or a CUDA fault in one version cannot
    take the others down), then prints the summary table."""
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    rows = []
    for version in VERSIONS:
        print(f"--- version {version}", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--version", version]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=child_timeout)
            out, note = r.stdout + r.stderr, ("" if r.returncode == 0 else f"[version {version} exited {r.returncode}]")
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            note = f"[version {version} TIMED OUT after {child_timeout}s (hang?)]"
        for line in out.splitlines():
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
            elif "Warning" not in line and "warn(" not in line:
                print(line[:800])
        if note:
            print(note)
    print("\nversion  D      N  cfg(BM,BN,ST,W)      sdpa_ms  gluon_ms  sdpa/gluon  gluon_TFLOPs")
    for version, D, N, cfg, ts, tg in rows:
        tflops = 2 * 32 * N * N * D / (tg * 1e-3) / 1e12  # causal: half of 4*N^2*D flops per head
        print(
            f"{version:>7} {D:>3} {N:>6}  {str(tuple(cfg)):<18} {ts:>8.3f}  {tg:>8.3f}  {ts / tg:>10.3f}  "
            f"{tflops:>12.1f}"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--check-and-time", action="store_true")
    ap.add_argument("--version", default=None, help="restrict to one version (A, B or C)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.version:
        VERSIONS[:] = [args.version]
    if args.compile_only:
        compile_only()
    if args.child:
        _check_and_time_one(VERSIONS[0])
    elif args.check_and_time:
        check_and_time()


if __name__ == "__main__":
    main()
