"""Issue 19, route 2: a causal attention forward for Hopper written in CuTe DSL, our own
(docs/benchmarks.md, "Route 2, steps 0-4"). Step 0 (:class:`CausalForward`): one warpgroup a
CTA takes 64 query rows; key blocks of 64 come by TMA one at a time; QK^T and PV run on wgmma, P
from registers. Step 1 (:class:`WarpSpecializedForward`): a loader warpgroup and two consumer
warpgroups with a K/V ring, FlashAttention-3's roles without its overlaps. Step 2: step 1 with
QK of block j in flight beside PV of block j - 1. Step 3: step 2 with the two consumers taking
turns to issue their matrix multiplies (ping-pong), so that one's softmax runs under the
other's. Step 4: step 3 with every row statistic. All return the output and the row lse; batch
1; GQA by ``group`` query heads a key/value head.

It needs ``nvidia-cutlass-dsl`` (4.8.1 here; not a dependency of the project). Without a GPU it
checks where the wgmma fragments put each register (:func:`register_coordinate`, traced on the
host) and compiles the kernel for sm_90a:

    CUTE_DSL_ARCH=sm_90a python docs/experiments/cute_fwd.py --offline

(``CUTE_DSL_KEEP=cubin CUTE_DSL_DUMP_DIR=DIR`` keeps the cubins; ``cuobjdump -res-usage`` from
Triton's wheel reads their registers and spills.) On an sm_90 GPU, with torch, it checks the
output and lse against float64 attention and times the kernels beside cuDNN SDPA:

    python docs/experiments/cute_fwd.py [--kernels step0,step1,step2,step3,step4] [--time]

On the device tool's H200 the CuTe DSL wheels travel in three calls, as for FlashAttention-4
(fa4_wheels.sh, fa4_hopper.py); the third is ``bash .fa4c/install.sh docs/experiments/cute_fwd.py --time``.
"""

from __future__ import annotations

import argparse
import functools
import os

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
import cutlass.pipeline as pipeline  # noqa: E402
import cutlass.utils.hopper_helpers as sm90_utils  # noqa: E402
from cutlass.cute.nvgpu import cpasync, warpgroup  # noqa: E402
from cutlass.tensor_utils import LayoutEnum  # noqa: E402

MAJOR = cute.nvgpu.OperandMajorMode
BLOCK_M = 64
BLOCK_N = 64
LOG2E = 1.4426950408889634
#: The row statistics of step 4 (StatsSpec.every_row_statistic()'s settings): partial sums a row
#: (entropy's t, distance's sum p key, sink, local and offset-1 masses), and their settings.
STAT_SUMS = 5
SINK_TOKENS = 1
WINDOW = 64
NO_KEY = 1 << 30
#: Masked scores: finite, so that p * x is 0 for them (not 0 * inf), and far below any score.
MASKED = -1.0e30
#: The running max before the first block: above MASKED and finite, so that the first block's
#: alpha is 0 and entropy's rescale (m_old - m_new) * l adds 0, not -inf * 0 = NaN.
M_INIT = -5.0e29
#: Fields of the ``rows`` output ``(N, B*H, fields)``: lse, then with the statistics entropy,
#: max prob, distance, sink, local and offset-1 masses, and the argmax (exact as float32 below
#: 2^24 keys).
ROW_FIELDS = ("lse", "entropy", "max_prob", "distance", "sink_mass", "local_mass", "offset_mass", "argmax")
#: Named barriers 1 to 3 (0 is the CTA's): consumer h waits on 1 + h for its turn to issue its
#: matrix multiplies, and arrives on the next one's when it has (step 3, FlashAttention-3's
#: ping-pong).
_TURN_BARRIER = 1


#: Independent chains a row's max and sums run in (then combined pairwise): shorter dependency
#: chains for the issue slots the other warpgroup leaves.
MAX_CHAINS = 4
SUM_CHAINS = 2


def chains(values: list, op, n: int):
    """``op``-reduce ``values`` (traced scalars) in ``n`` interleaved chains, then pairwise."""
    acc = list(values[:n])
    for i, x in enumerate(values[n:]):
        acc[i % n] = op(acc[i % n], x)
    while len(acc) > 1:
        acc = [op(acc[i], acc[i + 1]) if i + 1 < len(acc) else acc[i] for i in range(0, len(acc), 2)]
    return acc[0]


def fma_chains(pairs: list, n: int):
    """``sum a * b`` over ``pairs`` in ``n`` interleaved FMA chains, then pairwise."""
    acc = [a * b for a, b in pairs[:n]]
    for i, (a, b) in enumerate(pairs[n:]):
        acc[i % n] = acc[i % n] + a * b
    while len(acc) > 1:
        acc = [acc[i] + acc[i + 1] if i + 1 < len(acc) else acc[i] for i in range(0, len(acc), 2)]
    return acc[0]


@cute.jit
def online_softmax(
    acc_s: cute.Tensor,
    acc_o: cute.Tensor,
    m_i: cute.Tensor,
    l_i: cute.Tensor,
    tidx,
    row0,
    key0,
    n,
    scale_log2: cutlass.Float32,
    masked: cutlass.Constexpr,
    alpha_out: cute.Tensor = None,
    sums: cute.Tensor = None,
    arg: cute.Tensor = None,
    first: cutlass.Constexpr = False,
    near: cutlass.Constexpr = False,
):
    """One key block of the online softmax, in place: ``acc_s`` (this thread's registers of the
    [64, block] scores, rows from ``row0``, keys from ``key0``) becomes p = exp2(s * scale_log2 -
    m); the running max ``m_i`` [2] (log2 units, the whole row's) and this thread's partial sums
    ``l_i`` [2] move on. ``acc_o`` is rescaled here, or, given ``alpha_out`` [2], the factors go
    there for the caller to apply once the PV in flight has landed. ``masked``: mask keys after
    the row or past ``n`` (the diagonal block).

    With ``sums`` [2 * STAT_SUMS] (this thread's partial sums, rescaled like ``l``) the row
    statistics ride along: entropy's ``t = sum p x`` (x = s - m, log2 units) and distance's
    ``sum p key`` (an FMA with the column's offset from the thread's first key, an immediate),
    one FMA a score each; the sink mass (keys < SINK_TOKENS) in the ``first``
    block; local (the WINDOW keys up to the row) and offset-1 masses in the ``near`` blocks.
    ``arg`` [2]: the first key of this thread's columns that holds the row max (or ``NO_KEY``):
    rescanned only where the block raised the max, so an earlier key keeps an exact tie."""
    for h in cutlass.range_constexpr(2):  # this thread's two rows
        regs = [v for v in range(cute.size(acc_s)) if (v // 2) % 2 == h]
        if cutlass.const_expr(masked):  # on the raw scores: the scale is folded into the exponent
            for v in regs:
                r, col = register_coordinate(tidx, v)
                if key0 + col > row0 + r:
                    acc_s[v] = MASKED
                if key0 + col >= n:
                    acc_s[v] = MASKED
        mx = chains([acc_s[v] for v in regs], cute.arch.fmax, MAX_CHAINS)
        mx = cute.arch.fmax(mx, cute.arch.shuffle_sync_bfly(mx, offset=1))
        mx = cute.arch.fmax(mx, cute.arch.shuffle_sync_bfly(mx, offset=2))
        m_new = cute.arch.fmax(m_i[h], mx * scale_log2)
        alpha = cute.arch.exp2(m_i[h] - m_new)
        if cutlass.const_expr(arg is not None):
            if mx * scale_log2 > m_i[h]:  # the block raised the max: this thread's first column with it
                arg[h] = NO_KEY
                for v in reversed(regs):  # last first: the earliest column is written last
                    if acc_s[v] == mx:
                        arg[h] = key0 + register_coordinate(tidx, v)[1]
        if cutlass.const_expr(sums is not None):
            base = h * STAT_SUMS
            sums[base] = alpha * (sums[base] + (m_i[h] - m_new) * l_i[h])
            for f in cutlass.range_constexpr(1, STAT_SUMS):
                sums[base + f] = alpha * sums[base + f]
        xs = []
        for v in regs:
            xs.append(acc_s[v] * scale_log2 - m_new)  # one FMA (log2 units)
            acc_s[v] = cute.arch.exp2(xs[-1])
        add = lambda a, b: a + b  # noqa: E731
        total = chains([acc_s[v] for v in regs], add, SUM_CHAINS)
        if cutlass.const_expr(sums is not None):
            # entropy's sum p x and distance's sum p (key - the thread's first key), one FMA a score
            # each (masked: p = 0 and x finite), in independent chains
            sums[base] = sums[base] + fma_chains([(acc_s[v], x) for v, x in zip(regs, xs)], SUM_CHAINS)
            offsets = fma_chains([(acc_s[v], float(v % 2 + 8 * (v // 4))) for v in regs], SUM_CHAINS)
            sums[base + 1] = sums[base + 1] + offsets + cutlass.Float32(key0 + register_coordinate(tidx, 0)[1]) * total
            for v in regs:
                r, col = register_coordinate(tidx, v)
                key, row = key0 + col, row0 + r
                if cutlass.const_expr(first):
                    if key < SINK_TOKENS:
                        sums[base + 2] = sums[base + 2] + acc_s[v]
                if cutlass.const_expr(near):
                    if key > row - WINDOW:
                        sums[base + 3] = sums[base + 3] + acc_s[v]
                    if key == row - 1:
                        sums[base + 4] = sums[base + 4] + acc_s[v]
        l_i[h] = l_i[h] * alpha + total
        m_i[h] = m_new
        if cutlass.const_expr(alpha_out is None):
            for v in cutlass.range_constexpr(cute.size(acc_o)):
                if cutlass.const_expr((v // 2) % 2 == h):
                    acc_o[v] = acc_o[v] * alpha
        else:
            alpha_out[h] = alpha


@cute.jit
def softmax_block(
    acc_s: cute.Tensor,
    acc_o: cute.Tensor,
    m_i: cute.Tensor,
    l_i: cute.Tensor,
    tidx,
    row0,
    j,
    j_mask,
    j_near,
    block_n: cutlass.Constexpr,
    n,
    scale_log2: cutlass.Float32,
    alpha: cute.Tensor = None,
    sums: cute.Tensor = None,
    arg: cute.Tensor = None,
    first: cutlass.Constexpr = False,
):
    """:func:`online_softmax` of key block ``j`` of 64 rows from ``row0``: masked from block
    ``j_mask`` on (the block of ``row0``: later blocks hold keys after some row, or past ``n``);
    with the statistics, the local and offset masses summed from block ``j_near`` on (the window
    and the offset reach back less than a block); the sink mass in the ``first``."""
    stats = sums is not None
    if j >= j_mask:
        online_softmax(
            acc_s, acc_o, m_i, l_i, tidx, row0, j * block_n, n, scale_log2, True, alpha, sums, arg, first, stats
        )
    elif cutlass.const_expr(stats):
        if j >= j_near:
            online_softmax(
                acc_s, acc_o, m_i, l_i, tidx, row0, j * block_n, n, scale_log2, False, alpha, sums, arg, first, True
            )
        else:
            online_softmax(
                acc_s, acc_o, m_i, l_i, tidx, row0, j * block_n, n, scale_log2, False, alpha, sums, arg, first
            )
    else:
        online_softmax(acc_s, acc_o, m_i, l_i, tidx, row0, j * block_n, n, scale_log2, False, alpha)


@cute.jit
def rescale(acc_o: cute.Tensor, alpha: cute.Tensor):
    """``acc_o`` rows times their factors ``alpha`` [2] (:func:`online_softmax`)."""
    for v in cutlass.range_constexpr(cute.size(acc_o)):
        acc_o[v] = acc_o[v] * alpha[(v // 2) % 2]


@cute.jit
def issue_qk(
    mma: cute.TiledMma,
    acc_s: cute.Tensor,
    rq: cute.Tensor,
    rk: cute.Tensor,
    q_slot,
    k_slot,
    head_dim: cutlass.Constexpr,
):
    """Issue S = Q K^T (Q and K from shared memory slots ``q_slot``, ``k_slot``) as one wgmma
    group; not waited for. Returns ``mma``, whose accumulate field it sets: the caller rebinds
    it, so that the tracer carries that state through staged loops and branches."""
    mma.set(warpgroup.Field.ACCUMULATE, False)
    warpgroup.fence()
    for kb in cutlass.range_constexpr(head_dim // 16):
        cute.gemm(mma, acc_s, rq[(None, None, kb, q_slot)], rk[(None, None, kb, k_slot)], acc_s)
        mma.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    return mma


@cute.jit
def issue_pv(
    mma: cute.TiledMma, acc_o: cute.Tensor, rp: cute.Tensor, rv: cute.Tensor, v_slot, block_n: cutlass.Constexpr
):
    """Issue O += P V (P from registers, V from shared-memory slot ``v_slot``) as one wgmma
    group; not waited for. Returns ``mma`` (see :func:`issue_qk`)."""
    mma.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.fence()
    for kb in cutlass.range_constexpr(block_n // 16):
        cute.gemm(mma, acc_o, rp[(None, None, kb)], rv[(None, None, kb, v_slot)], acc_o)
    warpgroup.commit_group()
    return mma


@cute.jit
def quad_sum(x):
    """The sum of ``x`` over the four threads that share a row."""
    x = x + cute.arch.shuffle_sync_bfly(x, offset=1)
    return x + cute.arch.shuffle_sync_bfly(x, offset=2)


@cute.jit
def store_rows(
    acc_o: cute.Tensor,
    m_i: cute.Tensor,
    l_i: cute.Tensor,
    tidx,
    row0,
    n,
    out: cute.Tensor,
    rows: cute.Tensor,
    bh,
    sums: cute.Tensor = None,
    arg: cute.Tensor = None,
):
    """Write this thread's output rows (``acc_o`` / the row sum) and their :data:`ROW_FIELDS`
    (the lse; with ``sums`` and ``arg`` every row statistic), rows from ``row0`` of head ``bh``;
    rows at ``n`` or past it are skipped. ``out=None``: the caller stores the output
    (:func:`store_output`) and takes ``acc_o`` back scaled by 1 / the row sum."""
    for h in cutlass.range_constexpr(2):
        l_sum = quad_sum(l_i[h])
        inv = 1.0 / l_sum
        row = row0 + register_coordinate(tidx, 2 * h)[0]
        totals = []
        if cutlass.const_expr(sums is not None):
            totals = [quad_sum(sums[h * STAT_SUMS + f]) for f in range(STAT_SUMS)]
            first = arg[h]
            first = cutlass.min(first, cute.arch.shuffle_sync_bfly(first, offset=1))
            first = cutlass.min(first, cute.arch.shuffle_sync_bfly(first, offset=2))
        if cutlass.const_expr(out is None):
            for v in cutlass.range_constexpr(cute.size(acc_o)):
                if cutlass.const_expr((v // 2) % 2 == h):
                    acc_o[v] = acc_o[v] * inv
        if row < n:
            if cutlass.const_expr(out is not None):
                for v in cutlass.range_constexpr(cute.size(acc_o)):
                    if cutlass.const_expr((v // 2) % 2 == h):
                        out[row, register_coordinate(tidx, v)[1], bh] = (acc_o[v] * inv).to(out.element_type)
            if tidx % 4 == 0:
                log2_l = cute.math.log2(l_sum)
                rows[row, bh, 0] = (m_i[h] + log2_l) * (1.0 / LOG2E)
                if cutlass.const_expr(sums is not None):
                    t, dist, sink, local, offset = totals
                    rows[row, bh, 1] = (log2_l - t * inv) * (1.0 / LOG2E)
                    rows[row, bh, 2] = inv
                    rows[row, bh, 3] = cutlass.Float32(row) - dist * inv
                    rows[row, bh, 4] = sink * inv
                    rows[row, bh, 5] = local * inv
                    rows[row, bh, 6] = offset * inv
                    rows[row, bh, 7] = cutlass.Float32(first)


@cute.jit
def store_output(mma_pv, acc_o: cute.Tensor, t, slot: cute.Tensor, tma_o, tile_s, tile_g, barrier_id):
    """Write a consumer's normalized output tile: its 128 threads put ``acc_o`` (bf16) into
    ``slot`` (its query tile's shared memory, free once its last QK has landed), then one thread
    stores the tile with TMA (``tile_s`` to ``tile_g``; rows past the end are clipped) and waits
    until the store has read shared memory."""
    r_out = cute.make_rmem_tensor_like(acc_o, slot.element_type)
    r_out.store(acc_o.load().to(slot.element_type))
    cute.autovec_copy(r_out, mma_pv.get_slice(t).partition_C(slot))
    cute.arch.fence_view_async_shared()  # the generic proxy's writes, seen by TMA
    cute.arch.barrier(barrier_id=barrier_id, number_of_threads=128)
    if t == 0:
        cute.copy(tma_o, tile_s, tile_g)
        cute.arch.cp_async_bulk_commit_group()
        cute.arch.cp_async_bulk_wait_group(0, read=True)


@cute.jit
def tma_tiles(tma, tensors, smem, bh, hk, block_n: cutlass.Constexpr, head_dim: cutlass.Constexpr):
    """Per-operand ``(shared, global)`` TMA partitions of the query head ``bh``'s 64-row tiles and
    the key/value head ``hk``'s blocks of ``block_n`` keys: the global side is indexed by tile
    or block, the shared side by slot. ``tma``, ``tensors`` and ``smem`` are (q, k, v) triples."""
    tq, tk, tv = tensors
    tiles = (
        cute.local_tile(tq[None, None, bh], (BLOCK_M, head_dim), (None, 0)),
        cute.local_tile(tk[None, None, hk], (block_n, head_dim), (None, 0)),
        cute.local_tile(tv[None, None, hk], (head_dim, block_n), (0, None)),
    )
    one = cute.make_layout(1)
    return tuple(
        cpasync.tma_partition(atom, 0, one, cute.group_modes(s, 0, 2), cute.group_modes(g, 0, 2))
        for atom, s, g in zip(tma, smem, tiles)
    )


@cute.jit
def consumer_registers(mma_qk, mma_pv, t, sq, sk, sv, block_n: cutlass.Constexpr, head_dim: cutlass.Constexpr):
    """One consumer warpgroup's operands and state for thread ``t`` (0-127): the Q, K and V
    fragments (shared-memory descriptors), the S and O accumulators (O zeroed), P's 16-bit
    registers and PV's A operand viewed on them, and the running max and sums [2] of its two
    rows: ``(rq, rk, rv, acc_s, acc_o, p16, rp, m_i, l_i)``."""
    thr_qk = mma_qk.get_slice(t)
    thr_pv = mma_pv.get_slice(t)
    rq = mma_qk.make_fragment_A(thr_qk.partition_A(sq))
    rk = mma_qk.make_fragment_B(thr_qk.partition_B(sk))
    rv = mma_pv.make_fragment_B(thr_pv.partition_B(sv))
    acc_s = cute.make_rmem_tensor(thr_qk.partition_shape_C((BLOCK_M, block_n)), cutlass.Float32)
    acc_o = cute.make_rmem_tensor(thr_pv.partition_shape_C((BLOCK_M, head_dim)), cutlass.Float32)
    acc_o.fill(0.0)
    a_layout = mma_pv.make_fragment_A(thr_pv.partition_shape_A((BLOCK_M, block_n))).layout
    p16 = cute.make_rmem_tensor_like(acc_s, mma_pv.op.a_dtype)
    rp = cute.make_tensor(p16.iterator, a_layout)  # the same registers as PV's A operand
    m_i = cute.make_rmem_tensor((2,), cutlass.Float32)  # running max of rows h = 0, 1 (log2 units)
    l_i = cute.make_rmem_tensor((2,), cutlass.Float32)  # this thread's part of the running sums
    for h in cutlass.range_constexpr(2):
        m_i[h] = M_INIT
        l_i[h] = 0.0
    return rq, rk, rv, acc_s, acc_o, p16, rp, m_i, l_i


def tiled_mmas(dtype, block_n: int, head_dim: int) -> tuple:
    """``(QK^T, PV)`` tiled MMAs of one warpgroup's 64 rows: QK^T with both operands K-major in
    shared memory; PV with P from registers and V MN-major (``(D, N)`` view) in shared memory."""
    qk = sm90_utils.make_trivial_tiled_mma(
        dtype, dtype, MAJOR.K, MAJOR.K, cutlass.Float32, (1, 1, 1), tiler_mn=(BLOCK_M, block_n)
    )
    pv = sm90_utils.make_trivial_tiled_mma(
        dtype,
        dtype,
        MAJOR.K,
        MAJOR.MN,
        cutlass.Float32,
        (1, 1, 1),
        tiler_mn=(BLOCK_M, head_dim),
        a_source=warpgroup.OperandSource.RMEM,
    )
    return qk, pv


def smem_operands(q, k, vt, block_n: int, head_dim: int, q_slots: int, kv_slots: int) -> tuple:
    """Shared-memory layouts of ``q_slots`` 64-row query tiles and ``kv_slots`` K and V blocks of
    ``block_n`` keys, and the TMA atoms and tensors that fill them:
    ``((q_layout, k_layout, v_layout), ((tma_q, tq), (tma_k, tk), (tma_v, tv)))``."""
    dtype = q.element_type
    layouts = (
        sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (BLOCK_M, block_n, head_dim), dtype, q_slots),
        sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (BLOCK_M, block_n, head_dim), dtype, kv_slots),
        sm90_utils.make_smem_layout_b(LayoutEnum.COL_MAJOR, (BLOCK_M, head_dim, block_n), dtype, kv_slots),
    )
    op = cpasync.CopyBulkTensorTileG2SOp()
    tiles = ((BLOCK_M, head_dim), (block_n, head_dim), (head_dim, block_n))
    atoms = tuple(
        cpasync.make_tiled_tma_atom(op, t, cute.slice_(layout, (None, None, 0)), tile)
        for t, layout, tile in zip((q, k, vt), layouts, tiles)
    )
    return layouts, atoms


class CausalForward:
    """``out = softmax(q k^T * scale, causal) v`` and ``lse``; q, out ``(N, D, B*Hq)``, k
    ``(N, D, B*Hkv)``, v as ``(D, N, B*Hkv)`` (the same memory, viewed for PV's B operand),
    ``rows`` ``(N, B*Hq, fields)`` float32 (:data:`ROW_FIELDS`; here only the lse)."""

    fields = 1

    def __init__(self, head_dim: int, group: int):
        self.d = head_dim
        self.group = group

    @cute.jit
    def __call__(
        self,
        q: cute.Tensor,
        k: cute.Tensor,
        vt: cute.Tensor,
        out: cute.Tensor,
        rows: cute.Tensor,
        scale: cutlass.Float32,
        stream,
    ):
        dtype = q.element_type
        d = self.d
        mma_qk, mma_pv = tiled_mmas(dtype, BLOCK_N, d)
        (q_layout, k_layout, v_layout), ((tma_q, tq), (tma_k, tk), (tma_v, tv)) = smem_operands(
            q, k, vt, BLOCK_N, d, 1, 1
        )

        @cute.struct
        class Shared:
            bars: cute.struct.MemRange[cutlass.Int64, 2]
            sq: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(q_layout)], 1024]
            sk: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(k_layout)], 1024]
            sv: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(v_layout)], 1024]

        self.shared = Shared
        n = q.shape[0]
        grid = (cute.ceil_div(n, BLOCK_M), q.shape[2], 1)
        self.kernel(
            mma_qk,
            mma_pv,
            tma_q,
            tq,
            tma_k,
            tk,
            tma_v,
            tv,
            out,
            rows,
            scale * LOG2E,
            q_layout,
            k_layout,
            v_layout,
        ).launch(grid=grid, block=[128, 1, 1], stream=stream)

    @cute.kernel
    def kernel(
        self,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        tma_q: cute.CopyAtom,
        tq: cute.Tensor,
        tma_k: cute.CopyAtom,
        tk: cute.Tensor,
        tma_v: cute.CopyAtom,
        tv: cute.Tensor,
        out: cute.Tensor,
        rows: cute.Tensor,
        scale_log2: cutlass.Float32,
        q_layout: cute.ComposedLayout,
        k_layout: cute.ComposedLayout,
        v_layout: cute.ComposedLayout,
    ):
        d = self.d
        tidx, _, _ = cute.arch.thread_idx()
        m_block, bh, _ = cute.arch.block_idx()
        hk = bh // self.group
        n = out.shape[0]
        smem = cutlass.memory.SmemAllocator()
        st = smem.allocate(self.shared)
        bars = st.bars.data_ptr()
        sq = st.sq.get_tensor(q_layout.outer, swizzle=q_layout.inner)
        sk = st.sk.get_tensor(k_layout.outer, swizzle=k_layout.inner)
        sv = st.sv.get_tensor(v_layout.outer, swizzle=v_layout.inner)
        if tidx == 0:
            cute.arch.mbarrier_init(bars, 1)
            cute.arch.mbarrier_init(bars + 1, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        (tqs, tqg), (tks, tkg), (tvs, tvg) = tma_tiles(
            (tma_q, tma_k, tma_v), (tq, tk, tv), (sq, sk, sv), bh, hk, BLOCK_N, d
        )
        rq, rk, rv, acc_s, acc_o, p16, rp, m_i, l_i = consumer_registers(mma_qk, mma_pv, tidx, sq, sk, sv, BLOCK_N, d)

        # TMA copies elect their issuing thread themselves: the whole warp 0 calls them
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp == 0:
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(
                    bars, cute.size_in_bytes(out.element_type, cute.slice_(q_layout, (None, None, 0)))
                )
            cute.copy(tma_q, tqg[(None, m_block)], tqs[(None, 0)], tma_bar_ptr=bars)
        cute.arch.mbarrier_wait(bars, 0)

        n_blocks = cute.ceil_div(cutlass.min((m_block + 1) * BLOCK_M, n), BLOCK_N)
        kv_bytes = cute.size_in_bytes(out.element_type, cute.slice_(k_layout, (None, None, 0))) * 2
        for j in cutlass.range(n_blocks, unroll=1):
            if warp == 0:
                with cute.arch.elect_one():
                    cute.arch.mbarrier_arrive_and_expect_tx(bars + 1, kv_bytes)
                cute.copy(tma_k, tkg[(None, j)], tks[(None, 0)], tma_bar_ptr=bars + 1)
                cute.copy(tma_v, tvg[(None, j)], tvs[(None, 0)], tma_bar_ptr=bars + 1)
            cute.arch.mbarrier_wait(bars + 1, j % 2)

            mma_qk = issue_qk(mma_qk, acc_s, rq, rk, 0, 0, d)
            warpgroup.wait_group(0)
            online_softmax(acc_s, acc_o, m_i, l_i, tidx, m_block * BLOCK_M, j * BLOCK_N, n, scale_log2, True)
            p16.store(acc_s.load().to(p16.element_type))
            mma_pv = issue_pv(mma_pv, acc_o, rp, rv, 0, BLOCK_N)
            warpgroup.wait_group(0)
            cute.arch.sync_threads()  # every warp done with this K/V before the next load

        store_rows(acc_o, m_i, l_i, tidx, m_block * BLOCK_M, n, out, rows, bh)


def fake_arguments(n: int, heads: int, group: int, head_dim: int, fields: int = 1, dtype=cutlass.BFloat16) -> tuple:
    """Fake tensors of one problem (batch 1; ``heads`` query heads): compile without a GPU."""
    from cutlass.cute.runtime import make_fake_tensor

    kv = heads // group
    q, out = (make_fake_tensor(dtype, (n, head_dim, heads), stride=(head_dim, 1, n * head_dim)) for _ in range(2))
    k = make_fake_tensor(dtype, (n, head_dim, kv), stride=(head_dim, 1, n * head_dim))
    vt = make_fake_tensor(dtype, (head_dim, n, kv), stride=(1, head_dim, n * head_dim))
    rows = make_fake_tensor(cutlass.Float32, (n, heads, fields), stride=(fields, n * fields, 1))
    return q, k, vt, out, rows


def torch_arguments(q, k, v, fields: int = 1):
    """CuTe views of torch ``[1, H, N, D]`` contiguous q, k, v, and of a new output and rows,
    and those two: ``(cute arguments, out [1, H, N, D], rows [1, H, N, fields])``."""
    import torch
    from cutlass.cute.runtime import from_dlpack

    _, h, n, d = q.shape
    out = torch.empty_like(q)
    rows = torch.empty(1, h, n, fields, device=q.device, dtype=torch.float32)
    views = (
        (q[0].permute(1, 2, 0), 0),  # (N, D, H), with the mode of the sequence
        (k[0].permute(1, 2, 0), 0),
        (v[0].permute(2, 1, 0), 1),  # (D, N, Hkv): V as PV's B operand
        (out[0].permute(1, 2, 0), 0),
        (rows[0].permute(1, 0, 2), 0),  # (N, H, fields)
    )
    # the length dynamic, the other strides static where they follow from it: one compiled
    # kernel serves every length, as a library needs
    cute_views = tuple(
        from_dlpack(t, assumed_align=16).mark_compact_shape_dynamic(mode=m, stride_order=t.dim_order())
        for t, m in views
    )
    return cute_views, out, rows


class WarpSpecializedForward:
    """Step 1: FlashAttention-3's roles without its overlaps. A CTA of ``consumers + 1``
    warpgroups takes ``64 * consumers`` query rows: warpgroup 0 loads (one warp issues TMA: the
    query tile once, then K and V blocks of 128 keys into a ring of ``stages`` slots, each with
    its own full and empty barriers, so QK can start before V lands); the others each compute 64
    of the rows against every key block, S = QK^T, the online softmax, O += PV, releasing each
    slot as they finish with it. ``setmaxnreg`` moves registers from the loader to the
    consumers. ``overlap`` (step 2), ``pingpong`` (step 3) and ``stats`` (step 4) add the rest.
    Same tensors as :class:`CausalForward`."""

    block_n = 128

    def __init__(
        self,
        head_dim: int,
        group: int,
        stages: int = 2,
        overlap: bool = False,
        pingpong: bool = False,
        stats: bool = False,
        consumers: int = 2,
        block_n: int = 128,
    ):
        assert overlap or not (pingpong or stats), "turns and statistics are in the overlapped loop"
        assert consumers in (2, 3)
        self.consumers = consumers
        self.block_n = block_n
        self.block_m = BLOCK_M * consumers  # the CTA's query rows, 64 a consumer
        # setmaxnreg: the loader's warpgroup keeps 24 registers a thread, the consumers share the rest
        self.registers = (512 - 24) // consumers // 8 * 8
        self.d = head_dim
        self.group = group
        self.stages = stages
        self.overlap = overlap
        self.pingpong = pingpong
        self.stats = stats
        self.fields = len(ROW_FIELDS) if stats else 1

    @cute.jit
    def __call__(
        self,
        q: cute.Tensor,
        k: cute.Tensor,
        vt: cute.Tensor,
        out: cute.Tensor,
        rows: cute.Tensor,
        scale: cutlass.Float32,
        stream,
    ):
        dtype = q.element_type
        d, bn = self.d, self.block_n
        mma_qk, mma_pv = tiled_mmas(dtype, bn, d)
        # the query tile as two 64-row halves, one a consumer
        (q_layout, k_layout, v_layout), ((tma_q, tq), (tma_k, tk), (tma_v, tv)) = smem_operands(
            q, k, vt, bn, d, self.consumers, self.stages
        )
        stages = self.stages

        @cute.struct
        class Shared:
            q_bar: cute.struct.MemRange[cutlass.Int64, 1]
            k_bars: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            v_bars: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            sq: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(q_layout)], 1024]
            sk: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(k_layout)], 1024]
            sv: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(v_layout)], 1024]

        self.shared = Shared
        tma_o, to = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileS2GOp(), out, cute.slice_(q_layout, (None, None, 0)), (BLOCK_M, d)
        )
        grid = (cute.ceil_div(q.shape[0], self.block_m), q.shape[2], 1)
        self.kernel(
            mma_qk,
            mma_pv,
            tma_q,
            tq,
            tma_k,
            tk,
            tma_v,
            tv,
            tma_o,
            to,
            rows,
            scale * LOG2E,
            q_layout,
            k_layout,
            v_layout,
        ).launch(grid=grid, block=[128 * (self.consumers + 1), 1, 1], stream=stream)

    @cute.kernel
    def kernel(
        self,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        tma_q: cute.CopyAtom,
        tq: cute.Tensor,
        tma_k: cute.CopyAtom,
        tk: cute.Tensor,
        tma_v: cute.CopyAtom,
        tv: cute.Tensor,
        tma_o: cute.CopyAtom,
        to: cute.Tensor,
        rows: cute.Tensor,
        scale_log2: cutlass.Float32,
        q_layout: cute.ComposedLayout,
        k_layout: cute.ComposedLayout,
        v_layout: cute.ComposedLayout,
    ):
        d, bn = self.d, self.block_n
        tidx, _, _ = cute.arch.thread_idx()
        m_rev, bh, _ = cute.arch.block_idx()
        m_block = cute.arch.grid_dim()[0] - 1 - m_rev  # the longest (last) tiles start first
        hk = bh // self.group
        n = to.shape[0]
        wg = cute.arch.make_warp_uniform(tidx // 128)
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        st = cutlass.memory.SmemAllocator().allocate(self.shared)
        sq = st.sq.get_tensor(q_layout.outer, swizzle=q_layout.inner)
        sk = st.sk.get_tensor(k_layout.outer, swizzle=k_layout.inner)
        sv = st.sv.get_tensor(v_layout.outer, swizzle=v_layout.inner)
        q_bar = st.q_bar.data_ptr()
        half_q_bytes = cute.size_in_bytes(sq.element_type, cute.slice_(q_layout, (None, None, 0)))
        kv_bytes = cute.size_in_bytes(sq.element_type, cute.slice_(k_layout, (None, None, 0)))
        if tidx == 0:
            cute.arch.mbarrier_init(q_bar, 1)
        loader = pipeline.CooperativeGroup(pipeline.Agent.Thread)
        consumers = pipeline.CooperativeGroup(pipeline.Agent.Thread, 4 * self.consumers)  # one arrive a warp
        cta = cute.make_layout((1, 1, 1, 1))
        pipe_k = pipeline.PipelineTmaAsync.create(
            barrier_storage=st.k_bars.data_ptr(),
            num_stages=self.stages,
            producer_group=loader,
            consumer_group=consumers,
            tx_count=kv_bytes,
            cta_layout_vmnk=cta,
        )
        pipe_v = pipeline.PipelineTmaAsync.create(
            barrier_storage=st.v_bars.data_ptr(),
            num_stages=self.stages,
            producer_group=loader,
            consumer_group=consumers,
            tx_count=kv_bytes,
            cta_layout_vmnk=cta,
        )  # each create fences the barrier inits and syncs the CTA
        n_blocks = cute.ceil_div(cutlass.min((m_block + 1) * self.block_m, n), bn)

        if wg == 0:
            cute.arch.warpgroup_reg_dealloc(24)
            if warp == 0:
                (tqs, tqg), (tks, tkg), (tvs, tvg) = tma_tiles(
                    (tma_q, tma_k, tma_v), (tq, tk, tv), (sq, sk, sv), bh, hk, bn, d
                )
                with cute.arch.elect_one():
                    cute.arch.mbarrier_arrive_and_expect_tx(q_bar, self.consumers * half_q_bytes)
                for c in cutlass.range_constexpr(self.consumers):
                    cute.copy(tma_q, tqg[(None, self.consumers * m_block + c)], tqs[(None, c)], tma_bar_ptr=q_bar)
                k_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                v_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                for j in cutlass.range(n_blocks, unroll=1):
                    pipe_k.producer_acquire(k_state)
                    cute.copy(
                        tma_k,
                        tkg[(None, j)],
                        tks[(None, k_state.index)],
                        tma_bar_ptr=pipe_k.producer_get_barrier(k_state),
                    )
                    pipe_k.producer_commit(k_state)
                    k_state.advance()
                    pipe_v.producer_acquire(v_state)
                    cute.copy(
                        tma_v,
                        tvg[(None, j)],
                        tvs[(None, v_state.index)],
                        tma_bar_ptr=pipe_v.producer_get_barrier(v_state),
                    )
                    pipe_v.producer_commit(v_state)
                    v_state.advance()
        else:
            cute.arch.warpgroup_reg_alloc(self.registers)
            half = wg - 1
            t = tidx % 128
            rq, rk, rv, acc_s, acc_o, p16, rp, m_i, l_i = consumer_registers(mma_qk, mma_pv, t, sq, sk, sv, bn, d)
            row0 = m_block * self.block_m + half * BLOCK_M  # this consumer's first row
            sums, arg = None, None
            if cutlass.const_expr(self.stats):
                sums = cute.make_rmem_tensor((2 * STAT_SUMS,), cutlass.Float32)
                sums.fill(0.0)
                arg = cute.make_rmem_tensor((2,), cutlass.Int32)
                arg.fill(NO_KEY)
            k_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
            v_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
            cute.arch.mbarrier_wait(q_bar, 0)
            j_mask = row0 // bn  # from this block on, keys after some row of this consumer's
            j_near = cutlass.max(row0 - WINDOW + 1, 0) // bn  # ... and keys its window reaches
            if cutlass.const_expr(not self.overlap):
                for j in cutlass.range(n_blocks, unroll=1):
                    pipe_k.consumer_wait(k_state)
                    mma_qk = issue_qk(mma_qk, acc_s, rq, rk, half, k_state.index, d)
                    warpgroup.wait_group(0)
                    pipe_k.consumer_release(k_state)
                    k_state.advance()
                    softmax_block(acc_s, acc_o, m_i, l_i, t, row0, j, j_mask, j_near, bn, n, scale_log2)
                    p16.store(acc_s.load().to(p16.element_type))
                    pipe_v.consumer_wait(v_state)
                    mma_pv = issue_pv(mma_pv, acc_o, rp, rv, v_state.index, bn)
                    warpgroup.wait_group(0)
                    pipe_v.consumer_release(v_state)
                    v_state.advance()
            else:
                # QK of block j runs while PV of block j - 1 does; the softmax of j waits only for
                # QK, and O is rescaled by j's factors once PV(j - 1) has landed in it.
                alpha = cute.make_rmem_tensor((2,), cutlass.Float32)
                pipe_k.consumer_wait(k_state)
                mma_qk = issue_qk(mma_qk, acc_s, rq, rk, half, k_state.index, d)
                warpgroup.wait_group(0)
                pipe_k.consumer_release(k_state)
                k_state.advance()
                softmax_block(
                    acc_s, acc_o, m_i, l_i, t, row0, 0, j_mask, j_near, bn, n, scale_log2, alpha, sums, arg, True
                )
                p16.store(acc_s.load().to(p16.element_type))
                if cutlass.const_expr(self.pingpong):  # the first consumer issues first
                    if half == self.consumers - 1:
                        cute.arch.barrier_arrive(barrier_id=_TURN_BARRIER, number_of_threads=256)
                # Two loops, so that ptxas allocates the free blocks' loop on its own: first the
                # blocks that need neither masks nor the near masses, then the rest.
                tail = cutlass.max(1, cutlass.min(j_near, n_blocks))
                for free in (True, False):  # unrolled as the kernel is traced
                    lo, hi = (1, tail) if free else (tail, n_blocks)
                    for j in cutlass.range(lo, hi, unroll=1):
                        pipe_k.consumer_wait(k_state)
                        pipe_v.consumer_wait(v_state)
                        if cutlass.const_expr(self.pingpong):  # wait for this consumer's turn
                            cute.arch.barrier(barrier_id=_TURN_BARRIER + half, number_of_threads=256)
                        mma_qk = issue_qk(mma_qk, acc_s, rq, rk, half, k_state.index, d)
                        mma_pv = issue_pv(mma_pv, acc_o, rp, rv, v_state.index, bn)
                        if cutlass.const_expr(self.pingpong):  # then hand the turn to the other
                            turn = _TURN_BARRIER + (half + 1) % self.consumers  # the next consumer's
                            cute.arch.barrier_arrive(barrier_id=turn, number_of_threads=256)
                        warpgroup.wait_group(1)  # QK(j) has landed; PV(j - 1) may still run
                        pipe_k.consumer_release(k_state)
                        k_state.advance()
                        if cutlass.const_expr(free):
                            online_softmax(
                                acc_s, acc_o, m_i, l_i, t, row0, j * bn, n, scale_log2, False, alpha, sums, arg
                            )
                        else:
                            softmax_block(
                                acc_s, acc_o, m_i, l_i, t, row0, j, j_mask, j_near, bn, n, scale_log2, alpha, sums, arg
                            )
                        warpgroup.wait_group(0)
                        pipe_v.consumer_release(v_state)
                        v_state.advance()
                        rescale(acc_o, alpha)
                        p16.store(acc_s.load().to(p16.element_type))
                pipe_v.consumer_wait(v_state)
                mma_pv = issue_pv(mma_pv, acc_o, rp, rv, v_state.index, bn)
                warpgroup.wait_group(0)
                pipe_v.consumer_release(v_state)
            store_rows(acc_o, m_i, l_i, t, row0, n, None, rows, bh, sums, arg)
            tos, tog = cpasync.tma_partition(
                tma_o,
                0,
                cute.make_layout(1),
                cute.group_modes(sq, 0, 2),
                cute.group_modes(cute.local_tile(to[None, None, bh], (BLOCK_M, d), (None, 0)), 0, 2),
            )
            tile = self.consumers * m_block + half
            store_output(mma_pv, acc_o, t, sq[None, None, half], tma_o, tos[(None, half)], tog[(None, tile)], 4 + half)


@cute.jit
def _fragment_layouts(block_n: cutlass.Constexpr, head_dim: cutlass.Constexpr, mismatches: cutlass.Constexpr):
    """Append to ``mismatches`` every register of threads 0-127 whose ``(row, col)`` in the S, P
    and O fragments differs from :func:`register_coordinate` (traced on the host, no GPU)."""
    qk, pv = tiled_mmas(cutlass.BFloat16, block_n, head_dim)
    for t in cutlass.range_constexpr(128):
        fragments = (
            (qk.get_slice(t).partition_C(cute.make_identity_tensor((BLOCK_M, block_n))), block_n),
            (pv.get_slice(t).partition_A(cute.make_identity_tensor((BLOCK_M, block_n))), block_n),
            (pv.get_slice(t).partition_C(cute.make_identity_tensor((BLOCK_M, head_dim))), head_dim),
        )
        for frag, cols in fragments:  # a Python loop over a tuple: unrolled
            base, layout = frag.iterator, frag.layout
            for v in cutlass.range_constexpr(cols // 2):
                offset = layout(v)
                got = (base[0] + offset[0], base[1] + offset[1])
                if cutlass.const_expr(got != register_coordinate(t, v)):
                    mismatches.append((t, v, got))


def register_coordinate(thread: int, v: int) -> tuple[int, int]:
    """``(row, col)`` in the 64-row tile of register ``v`` of ``thread`` in a wgmma accumulator
    (and in PV's A operand, k-blocks of 16 columns in turn): ``v = c + 2 h + 4 i``."""
    lane, warp = thread % 32, thread // 32
    c, h, i = v % 2, (v // 2) % 2, v // 4
    return 16 * warp + lane // 4 + 8 * h, 2 * (lane % 4) + c + 8 * i


#: The kernels by name: each ``kernel(head_dim, group)``.
KERNELS = {
    "step0": CausalForward,
    "step1": WarpSpecializedForward,
    "step2": functools.partial(WarpSpecializedForward, overlap=True),
    "step3": functools.partial(WarpSpecializedForward, overlap=True, pingpong=True),
    "step4": functools.partial(WarpSpecializedForward, overlap=True, pingpong=True, stats=True),
    # step 4 with three consumers of 160 registers (FlashAttention-3's head dim 64 tile)
    "step4c3": functools.partial(WarpSpecializedForward, overlap=True, pingpong=True, stats=True, consumers=3),
    "step3c3": functools.partial(WarpSpecializedForward, overlap=True, pingpong=True, consumers=3),
    "step4c3n96": functools.partial(
        WarpSpecializedForward, overlap=True, pingpong=True, stats=True, consumers=3, block_n=96
    ),
    "step3c3n96": functools.partial(WarpSpecializedForward, overlap=True, pingpong=True, consumers=3, block_n=96),
    "step4np": functools.partial(WarpSpecializedForward, overlap=True, stats=True),  # step 4 without turns
    "step4s3": functools.partial(WarpSpecializedForward, overlap=True, pingpong=True, stats=True, stages=3),
}


def offline(name: str, head_dim: int, group: int) -> None:
    from cutlass.cute.runtime import make_fake_stream

    kernel = KERNELS[name](head_dim, group)
    args = fake_arguments(4096, 8, group, head_dim, kernel.fields)
    cute.compile(kernel, *args, cutlass.Float32(head_dim**-0.5), make_fake_stream())
    print(f"{name} D = {head_dim}, group {group}: compiled")


def check_on_gpu(name: str, lengths=(128, 200, 1000, 4096), dims=(64, 128), groups=(1, 4)) -> None:
    """Against this project's float64 reference backend (``kernels.attention``), on random
    problems: the output, the lse and, for kernels with the statistics, every row statistic
    (``StatsSpec.every_row_statistic()``'s settings) and how many argmax rows differ. Needs an
    sm_90 GPU; run from the checkout's root."""
    import cuda.bindings.driver as cuda_driver
    import torch

    from kernels import StatsSpec, attention

    stream = cuda_driver.CUstream(torch.cuda.current_stream().cuda_stream)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for d in dims:
        for group in groups:
            kernel, compiled = KERNELS[name](d, group), None
            for n in lengths:
                h = 8
                q, k, v = (
                    torch.randn(1, x, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                    for x in (h, h // group, h // group)
                )
                args, out, rows = torch_arguments(q, k, v, kernel.fields)
                scale = cutlass.Float32(d**-0.5)
                compiled = compiled or cute.compile(kernel, *args, scale, stream)  # one build, every length
                compiled(*args, scale, stream)
                torch.cuda.synchronize()
                want_out, want = attention(
                    *(t.double() for t in (q, k, v)), stats=StatsSpec.every_row_statistic(), backend="reference"
                )
                errors = {"out": (out.double() - want_out).abs().max().item()}
                for f, field in enumerate(ROW_FIELDS[: kernel.fields]):
                    got = rows[..., f].double()
                    if field == "argmax":
                        errors["argmax rows differing"] = int((got.long() != want.argmax).sum())
                    else:
                        expect = want.offset_mass[..., 0] if field == "offset_mass" else getattr(want, field)
                        errors[field] = (got - expect).abs().max().item()
                shown = ", ".join(
                    f"{key} {value:.2e}" if isinstance(value, float) else f"{key} {value}"
                    for key, value in errors.items()
                )
                print(f"{name} D = {d} group {group} N = {n}: {shown}", flush=True)


def time_on_gpu(names: list[str], lengths=(16384, 32768), heads: int = 32) -> None:
    """Milliseconds of each kernel, of cuDNN SDPA and of this project's kernel with every row
    statistic (``kernels.attention``), bf16, causal, batch 1, ``do_bench`` medians; a table
    last (needs an sm_90 GPU)."""
    import cuda.bindings.driver as cuda_driver
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from kernels import StatsSpec, attention

    stream = cuda_driver.CUstream(torch.cuda.current_stream().cuda_stream)
    table = ["| N | D | call | ms | SDPA / call |", "| --- | --- | --- | --- | --- |"]
    for n in lengths:
        for d in (128, 64):
            q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                call = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
                calls = {"SDPA (cuDNN)": call}
            stats = StatsSpec.every_row_statistic()
            calls["project kernel, every row statistic"] = functools.partial(
                attention, q, k, v, stats=stats, backend="triton"
            )
            for name in names:
                kernel = KERNELS[name](d, 1)
                args, _, _ = torch_arguments(q, k, v, kernel.fields)
                scale = cutlass.Float32(d**-0.5)
                calls[name] = functools.partial(cute.compile(kernel, *args, scale, stream), *args, scale, stream)
            times = {}
            for name, call in calls.items():
                try:
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        times[name] = do_bench(call, warmup=25, rep=200, return_mode="median")
                except Exception as error:  # e.g. more shared memory than a CTA may have
                    print(f"{name} N = {n} D = {d}: {type(error).__name__}: {error}"[:300], flush=True)
            sdpa = times["SDPA (cuDNN)"]
            table += [f"| {n} | {d} | {name} | {t:.3f} | {sdpa / t:.3f}x |" for name, t in times.items()]
            print(table[-1], flush=True)
    print("\n".join(table))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="check the register mapping and compile, no GPU")
    parser.add_argument(
        "--kernels", default="step0,step1,step2,step3,step4", help=f"comma list of {', '.join(KERNELS)}"
    )
    parser.add_argument("--time", action="store_true", help="after the checks, time them beside cuDNN SDPA")
    parser.add_argument("--no-check", action="store_true", help="skip the checks against float64 attention")
    parser.add_argument("--check-lengths", default="128,200,1000,4096", help="sequence lengths of the checks")
    args = parser.parse_args()
    names = args.kernels.split(",")
    if args.offline:
        for bn in (BLOCK_N, 96, 128):
            for d in (64, 128):
                wrong = []
                cute.compile(_fragment_layouts, bn, d, wrong)
                print(f"keys {bn}, D = {d}: {len(wrong)} registers off register_coordinate", wrong[:4])
        for name in names:
            for d in (64, 128):
                for g in (1, 4):
                    offline(name, d, g)
    else:
        for name in names if not args.no_check else ():
            check_on_gpu(name, tuple(int(x) for x in args.check_lengths.split(",")))
        if args.time:
            time_on_gpu(names)
