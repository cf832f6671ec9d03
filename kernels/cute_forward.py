"""The CuTe DSL attention forward for Hopper (sm_90): the ``backend="cute"`` kernel of
:func:`kernels.attention` (host side in :mod:`kernels.cute_attention`), our own, written for
issue 19's route 2 (docs/benchmarks.md, "Route 2 ... on the card").

A CTA of ``consumers + 1`` warpgroups takes ``64 * consumers`` query rows of one head:
warpgroup 0 loads (one warp issues TMA: the query tile once, then K and V blocks into a ring
of ``stages`` slots with their own full and empty barriers); each consumer warpgroup computes
64 rows against every key block: S = QK^T on wgmma, the online softmax on its registers,
O += PV with P from registers. QK of block j runs beside PV of block j - 1, and the consumers
take turns to issue their matrix multiplies (ping-pong), so one's softmax runs under the
other's. The row statistics ride in the softmax: entropy and distance as one FMA a score into
per-thread partial sums, the sink mass in the first key block, the local and offset masses in
the blocks near the diagonal, the argmax rescanned only where a block raised the max. The
output goes through shared memory and a TMA store; longest tiles start first.

Tensors (:func:`cute_views`): q, out ``(N, D, Hq, B)``, k ``(N, D, Hkv, B)``, v as
``(D, N, Hkv, B)`` (the same memory, viewed as PV's B operand), each head- or token-major;
``rows`` ``(N, B*Hq, fields)`` float32 (:func:`row_fields`). The kernel merges each
``(H, B)`` into one mode (:func:`heads_as_one_mode`), a CTA's head index.
Importing this module needs ``nvidia-cutlass-dsl`` (the ``cute`` extra); it compiles for
sm_90a without a GPU (``docs/experiments/cute_fwd.py --offline``).
"""

from __future__ import annotations

import os

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")  # the only target; lets the compiler run without a GPU

import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
import cutlass.pipeline as pipeline  # noqa: E402
import cutlass.utils.hopper_helpers as sm90_utils  # noqa: E402
import torch  # noqa: E402
from cutlass._mlir.dialects import llvm  # noqa: E402
from cutlass.cute.nvgpu import cpasync, warpgroup  # noqa: E402
from cutlass.cutlass_dsl import T, dsl_user_op  # noqa: E402
from cutlass.tensor_utils import LayoutEnum  # noqa: E402

from kernels.cute_attention import Masses, build, in_place, row_fields  # noqa: E402
from kernels.spec import empty_output  # noqa: E402

MAJOR = cute.nvgpu.OperandMajorMode
BLOCK_M = 64
LOG2E = 1.4426950408889634


NO_KEY = 1 << 30
#: Masked scores: finite, so that p * x is 0 for them (not 0 * inf), and far below any score.
MASKED = -1.0e30
#: The running max before the first block: above MASKED and finite, so that the first block's
#: alpha is 0 and entropy's rescale (m_old - m_new) * l adds 0, not -inf * 0 = NaN.
M_INIT = -5.0e29
#: How far (log2 units) a row's max may pass its reference before the lazy softmax moves it
#: (:func:`online_softmax`): p then stays below 2^8, far inside float32, bf16 and fp16.
RESCALE_SLACK = 8.0
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


@dsl_user_op
def exp2(x, *, loc=None, ip=None):
    """2^x by ``ex2.approx.ftz.f32`` (one MUFU.EX2), as ``cute.arch.exp2`` (deprecated) emits
    it, but free of side effects, so that the compiler may move or drop it like any math."""
    value = llvm.inline_asm(
        T.f32(),
        [cutlass.Float32(x).ir_value(loc=loc, ip=ip)],
        "ex2.approx.ftz.f32 $0, $1;",
        "=f,f",
        has_side_effects=False,
        is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
    )
    return cutlass.Float32(value)


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
    masses: cutlass.Constexpr = None,
    lazy: cutlass.Constexpr = False,
    top: cute.Tensor = None,
):
    """One key block of the online softmax, in place: ``acc_s`` (this thread's registers of the
    [64, block] scores, rows from ``row0``, keys from ``key0``) becomes p = exp2(s * scale_log2 -
    m); the running max ``m_i`` [2] (log2 units, the whole row's) and this thread's partial sums
    ``l_i`` [2] move on. ``acc_o`` is rescaled here, or, given ``alpha_out`` [2], the factors go
    there for the caller to apply once the PV in flight has landed. ``masked``: mask keys after
    the row or past ``n`` (the diagonal block).

    With ``sums`` [2 * masses.sums] (this thread's partial sums, rescaled like ``l``;
    ``masses``: :class:`Masses`) the row statistics ride along: entropy's ``t = sum p x``
    (x = s - m, log2 units) and distance's ``sum p key`` (an FMA with the column's offset from
    the thread's first key, an immediate), one FMA a score each; the sink mass in the ``first``
    block; the local and offset masses in the ``near`` blocks.
    ``arg`` [2]: the first key of this thread's columns that holds the row max (or ``NO_KEY``):
    rescanned only where the block raised the max, so an earlier key keeps an exact tie.
    ``lazy``: ``m_i`` is the rows' reference, not their max: it moves (and l, the sums and
    ``acc_o`` are rescaled) only where the block's max passes it by more than
    :data:`RESCALE_SLACK`, so that p stays below 2^RESCALE_SLACK; most blocks leave alpha exactly
    1 and skip every rescale (the caller's too: :func:`rescale_where_moved`). ``top`` [2] then
    keeps the rows' true max for the argmax and max prob (with the statistics)."""
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
        block_max = mx * scale_log2
        row_max = top[h] if cutlass.const_expr(top is not None) else m_i[h]  # the max before the block
        if cutlass.const_expr(arg is not None):
            if block_max > row_max:  # the block raised the max: this thread's first column with it
                arg[h] = NO_KEY
                for v in reversed(regs):  # last first: the earliest column is written last
                    if acc_s[v] == mx:
                        arg[h] = key0 + register_coordinate(tidx, v)[1]
        base = h * masses.sums if cutlass.const_expr(sums is not None) else 0
        if cutlass.const_expr(lazy):
            if cutlass.const_expr(top is not None):
                top[h] = cute.arch.fmax(row_max, block_max)
            move = block_max > m_i[h] + RESCALE_SLACK
            m_new = cutlass.Float32(cutlass.select_(move, block_max, m_i[h]))
            alpha = exp2(m_i[h] - m_new)  # exactly 1 where it stays
            if cutlass.const_expr(sums is not None):
                if move:
                    rescale_sums(sums, base, masses.sums, alpha, (m_i[h] - m_new) * l_i[h])
        else:
            m_new = cute.arch.fmax(m_i[h], block_max)
            alpha = exp2(m_i[h] - m_new)
            if cutlass.const_expr(sums is not None):
                rescale_sums(sums, base, masses.sums, alpha, (m_i[h] - m_new) * l_i[h])
        xs = []
        for v in regs:
            xs.append(acc_s[v] * scale_log2 - m_new)  # one FMA (log2 units)
            acc_s[v] = exp2(xs[-1])
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
                if cutlass.const_expr(first and masses.sink_tokens > 0):
                    if key < masses.sink_tokens:
                        sums[base + 2] = sums[base + 2] + acc_s[v]
                if cutlass.const_expr(near):
                    if cutlass.const_expr(masses.window > 0):
                        if key > row - masses.window:
                            sums[base + 3] = sums[base + 3] + acc_s[v]
                    for i, o in enumerate(masses.offsets):
                        if key == row - o:
                            sums[base + 4 + i] = sums[base + 4 + i] + acc_s[v]
        l_i[h] = l_i[h] * alpha + total
        m_i[h] = m_new
        if cutlass.const_expr(alpha_out is None):
            for v in cutlass.range_constexpr(cute.size(acc_o)):
                if cutlass.const_expr((v // 2) % 2 == h):
                    acc_o[v] = acc_o[v] * alpha
        else:
            alpha_out[h] = alpha


@cute.jit
def rescale_sums(sums: cute.Tensor, base, count: cutlass.Constexpr, alpha, shift):
    """A row's partial sums ``sums[base : base + count]`` moved to a new max: each times
    ``alpha``, entropy's (the first) after adding ``shift`` = (m_old - m_new) * l."""
    sums[base] = alpha * (sums[base] + shift)
    for f in cutlass.range_constexpr(1, count):
        sums[base + f] = alpha * sums[base + f]


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
    masses: cutlass.Constexpr = None,
    lazy: cutlass.Constexpr = False,
    top: cute.Tensor = None,
):
    """:func:`online_softmax` of key block ``j`` of 64 rows from ``row0``: masked from block
    ``j_mask`` on (the block of ``row0``: later blocks hold keys after some row, or past ``n``);
    with the statistics (``masses``), the local and offset masses summed from block ``j_near``
    on (the blocks they reach); the sink mass in the ``first``."""
    common = (acc_s, acc_o, m_i, l_i, tidx, row0, j * block_n, n, scale_log2)
    extra = dict(alpha_out=alpha, sums=sums, arg=arg, first=first, masses=masses, lazy=lazy, top=top)
    stats = sums is not None
    if j >= j_mask:
        online_softmax(*common, True, near=stats, **extra)
    elif cutlass.const_expr(stats):
        if j >= j_near:
            online_softmax(*common, False, near=True, **extra)
        else:
            online_softmax(*common, False, **extra)
    else:
        online_softmax(*common, False, **extra)


@dsl_user_op
def _pack2(lo, hi, dtype, *, loc=None, ip=None):
    """Two float32 values rounded into one 32-bit register of two 16-bit ``dtype`` halves
    (``lo`` in the low half), as an MMA's A operand reads them."""
    kind = "bf16x2" if dtype is cutlass.BFloat16 else "f16x2"
    value = llvm.inline_asm(
        T.i32(),
        [cutlass.Float32(hi).ir_value(loc=loc, ip=ip), cutlass.Float32(lo).ir_value(loc=loc, ip=ip)],
        f"cvt.rn.{kind}.f32 $0, $1, $2;",
        "=r,f,f",
        has_side_effects=False,
        is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
    )
    return cutlass.Int32(value)


@cute.jit
def to_p(acc_s: cute.Tensor, p16: cute.Tensor, packed: cutlass.Constexpr):
    """P = ``acc_s`` rounded to 16 bits into ``p16``: element by element, or (``packed``) two
    at a time into 32-bit registers, so that PV's A operand needs no packing between its
    matrix multiplies."""
    if cutlass.const_expr(packed):
        p32 = cute.recast_tensor(p16, cutlass.Int32)
        for i in cutlass.range_constexpr(cute.size(acc_s) // 2):
            p32[i] = _pack2(acc_s[2 * i], acc_s[2 * i + 1], p16.element_type)
    else:
        p16.store(acc_s.load().to(p16.element_type))


@cute.jit
def rescale_where_moved(acc_o: cute.Tensor, alpha: cute.Tensor, lazy: cutlass.Constexpr):
    """:func:`rescale`; ``lazy``: only where a row's max moved (a factor below 1; skipped,
    alpha is exactly 1, as in most blocks of a long row)."""
    if cutlass.const_expr(lazy):
        if cutlass.min(alpha[0], alpha[1]) < 1.0:
            rescale(acc_o, alpha)
    else:
        rescale(acc_o, alpha)


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
    masses: cutlass.Constexpr = None,
    top: cute.Tensor = None,
):
    """Write this thread's output rows (``acc_o`` / the row sum) and their :func:`row_fields`
    (the lse; with ``sums``, ``arg`` and ``masses`` every row statistic), rows from ``row0`` of
    head ``bh``; ``top``: the rows' true max where ``m_i`` is a lazy reference below it;
    rows at ``n`` or past it are skipped. ``out=None``: the caller stores the output
    (:func:`store_output`) and takes ``acc_o`` back scaled by 1 / the row sum."""
    for h in cutlass.range_constexpr(2):
        l_sum = quad_sum(l_i[h])
        inv = 1.0 / l_sum
        row = row0 + register_coordinate(tidx, 2 * h)[0]
        totals = []
        if cutlass.const_expr(sums is not None):
            totals = [quad_sum(sums[h * masses.sums + f]) for f in range(masses.sums)]
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
                    t, dist = totals[:2]
                    rows[row, bh, 1] = (log2_l - t * inv) * (1.0 / LOG2E)
                    if cutlass.const_expr(top is not None):
                        rows[row, bh, 2] = exp2(top[h] - m_i[h]) * inv
                    else:
                        rows[row, bh, 2] = inv
                    rows[row, bh, 3] = cutlass.Float32(row) - dist * inv
                    for f, mass in enumerate(totals[2:]):  # sink, local, then the offsets
                        rows[row, bh, 4 + f] = mass * inv
                    rows[row, bh, 2 + masses.sums] = cutlass.Float32(first)


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


def cute_views(q, k, v, out, rows) -> tuple:
    """CuTe views of torch tensors for the kernel: q, k, v and out ``[B, H, N, D]`` (H = Hq for
    q and out, Hkv for k and v) as TMA reads them in place
    (:func:`kernels.cute_attention.in_place`), rows float32 ``[B*Hq, N, fields]`` contiguous.
    q, k and out are viewed as ``(N, D, H, B)``, v as ``(D, N, H, B)`` (PV's B operand), with
    every extent and stride but the head dim's unit stride dynamic: one compiled kernel serves
    every shape and layout of a head dim, group and dtype. The kernel merges ``(H, B)`` into
    one mode (:func:`heads_as_one_mode`). The rows are compact, their lengths and heads
    dynamic, the fields' count static."""
    from cutlass.cute.runtime import from_dlpack

    nd, dn = (2, 3, 1, 0), (3, 2, 1, 0)
    views = [
        from_dlpack(t.permute(perm), assumed_align=16).mark_layout_dynamic(leading_dim=perm.index(3))
        for t, perm in zip((q, k, v, out), (nd, nd, dn, nd))
    ]
    marked = from_dlpack(rows.permute(1, 0, 2), assumed_align=16)  # (N, B*Hq, fields)
    for mode in (1, 0):  # modes from the outermost, as torch's dim_order() gives them
        marked = marked.mark_compact_shape_dynamic(mode=mode, stride_order=(1, 0, 2))
    return (*views, marked)


def kernel_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fields: int) -> tuple:
    """The kernel's arguments for torch q, k, v ``[B, H, N, D]`` (read in place where TMA can:
    :func:`~kernels.cute_attention.in_place`), a new output laid out like q
    (:func:`~kernels.spec.empty_output`) and new float32 rows ``[B*Hq, N, fields]``:
    ``(cute_views(...), out, rows)``."""
    b, h, n, _ = q.shape
    out = empty_output(q)
    rows = torch.empty(b * h, n, fields, device=q.device, dtype=torch.float32)
    return cute_views(*(in_place(t) for t in (q, k, v, out)), rows), out, rows


def heads_as_one_mode(t: cute.Tensor) -> cute.Tensor:
    """``(N, D, H, B)`` (or ``(D, N, H, B)``) as ``(N, D, (H, B))``: head ``bh`` of the merged
    mode is head ``bh % H`` of batch ``bh // H``, as in ``[B*H, ...]``."""
    return cute.group_modes(t, 2, 4)


class WarpSpecializedForward:
    """The causal forward (the module's docstring), built for one head dim, GQA ``group`` (query
    heads a key/value head) and statistics ``masses`` (:class:`Masses`; None: out and lse only).
    A CTA of ``consumers + 1`` warpgroups takes ``64 * consumers`` query rows: warpgroup 0 loads
    (one warp issues TMA: the query tile once, then K and V blocks of ``block_n`` keys into a
    ring of ``stages`` slots, each with its own full and empty barriers, so QK can start before
    V lands); the others each compute 64 of the rows against every key block, releasing each
    slot as they finish with it. ``setmaxnreg`` moves registers from the loader to the
    consumers. Without ``overlap`` the consumers wait for each matrix multiply (route 2's step
    1); ``pingpong`` adds the turns (step 3). ``packed_p`` rounds P into 32-bit register pairs
    as it is made (:func:`to_p`); ``lazy_rescale`` moves a row's softmax reference, and
    rescales O and the sums, only where its max passes the reference by 2^8
    (:func:`online_softmax`; neither yet timed on a GPU). Call it through ``cute.compile``
    with ``(q, k, vt, out, rows, scale, stream)``."""

    def __init__(
        self,
        head_dim: int,
        group: int,
        stages: int = 2,
        overlap: bool = True,
        pingpong: bool = True,
        masses: Masses | None = None,
        consumers: int = 2,
        block_n: int = 128,
        packed_p: bool = False,
        lazy_rescale: bool = False,
    ):
        stats = masses is not None
        assert overlap or not (pingpong or stats), "turns and statistics are in the overlapped loop"
        assert consumers in (2, 3)
        self.consumers = consumers
        self.block_n = block_n
        self.packed_p = packed_p
        self.lazy_rescale = lazy_rescale
        self.block_m = BLOCK_M * consumers  # the CTA's query rows, 64 a consumer
        # setmaxnreg: the loader's warpgroup keeps 24 registers a thread, the consumers share the rest
        self.registers = (512 - 24) // consumers // 8 * 8
        self.d = head_dim
        self.group = group
        self.stages = stages
        self.overlap = overlap
        self.pingpong = pingpong
        self.stats = stats
        self.masses = masses
        self.fields = len(row_fields(masses))

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
        q, k, vt, out = (heads_as_one_mode(t) for t in (q, k, vt, out))
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
        grid = (cute.ceil_div(q.shape[0], self.block_m), cute.size(q, mode=[2]), 1)
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
            cute.arch.setmaxregister_decrease(24)
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
            cute.arch.setmaxregister_increase(self.registers)
            half = wg - 1
            t = tidx % 128
            rq, rk, rv, acc_s, acc_o, p16, rp, m_i, l_i = consumer_registers(mma_qk, mma_pv, t, sq, sk, sv, bn, d)
            row0 = m_block * self.block_m + half * BLOCK_M  # this consumer's first row
            sums, arg, masses = None, None, self.masses
            if cutlass.const_expr(self.stats):
                sums = cute.make_rmem_tensor((2 * self.masses.sums,), cutlass.Float32)
                sums.fill(0.0)
                arg = cute.make_rmem_tensor((2,), cutlass.Int32)
                arg.fill(NO_KEY)
            lazy, top = self.lazy_rescale, None
            if cutlass.const_expr(lazy and self.stats):  # the rows' true max, ahead of m_i
                top = cute.make_rmem_tensor((2,), cutlass.Float32)
                top.fill(M_INIT)
            k_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
            v_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
            cute.arch.mbarrier_wait(q_bar, 0)
            state = (acc_s, acc_o, m_i, l_i, t, row0)  # what every block's softmax takes first
            j_mask = row0 // bn  # from this block on, keys after some row of this consumer's
            reach = self.masses.reach if cutlass.const_expr(self.stats) else 0
            j_near = cutlass.max(row0 - reach, 0) // bn  # ... and keys its local and offset masses reach
            if cutlass.const_expr(not self.overlap):
                for j in cutlass.range(n_blocks, unroll=1):
                    pipe_k.consumer_wait(k_state)
                    mma_qk = issue_qk(mma_qk, acc_s, rq, rk, half, k_state.index, d)
                    warpgroup.wait_group(0)
                    pipe_k.consumer_release(k_state)
                    k_state.advance()
                    softmax_block(*state, j, j_mask, j_near, bn, n, scale_log2)
                    to_p(acc_s, p16, self.packed_p)
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
                rest = dict(masses=masses, lazy=lazy, top=top)  # what every block's softmax takes last
                softmax_block(*state, 0, j_mask, j_near, bn, n, scale_log2, alpha, sums, arg, True, **rest)
                to_p(acc_s, p16, self.packed_p)
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
                            online_softmax(*state, j * bn, n, scale_log2, False, alpha, sums, arg, **rest)
                        else:
                            softmax_block(*state, j, j_mask, j_near, bn, n, scale_log2, alpha, sums, arg, **rest)
                        warpgroup.wait_group(0)
                        pipe_v.consumer_release(v_state)
                        v_state.advance()
                        rescale_where_moved(acc_o, alpha, lazy)
                        to_p(acc_s, p16, self.packed_p)
                pipe_v.consumer_wait(v_state)
                mma_pv = issue_pv(mma_pv, acc_o, rp, rv, v_state.index, bn)
                warpgroup.wait_group(0)
                pipe_v.consumer_release(v_state)
            store_rows(acc_o, m_i, l_i, t, row0, n, None, rows, bh, sums, arg, masses, top)
            tos, tog = cpasync.tma_partition(
                tma_o,
                0,
                cute.make_layout(1),
                cute.group_modes(sq, 0, 2),
                cute.group_modes(cute.local_tile(to[None, None, bh], (BLOCK_M, d), (None, 0)), 0, 2),
            )
            tile = self.consumers * m_block + half
            store_output(mma_pv, acc_o, t, sq[None, None, half], tma_o, tos[(None, half)], tog[(None, tile)], 4 + half)


def library_kernel(head_dim: int, group: int, masses: Masses | None) -> WarpSpecializedForward:
    """The build :func:`kernels.cute_attention.cute_attention` compiles (settings:
    :func:`kernels.cute_attention.build`), with the statistics' ``masses`` or without."""
    return WarpSpecializedForward(head_dim, group, masses=masses, **build(head_dim, masses is not None))


@cute.jit
def _fragment_layouts(block_n: cutlass.Constexpr, head_dim: cutlass.Constexpr, mismatches: cutlass.Constexpr):
    """Append to ``mismatches`` every register of threads 0-127 whose ``(row, col)`` in the S, P
    and O fragments differs from :func:`register_coordinate` (traced on the host, no GPU), and
    ``("P", v)`` for any element of P's registers out of place: P (laid out like S), its
    32-bit view (:func:`to_p`'s packed pairs) and PV's A operand on them must all enumerate the
    same registers in order, element ``2 i`` in the low half of pair ``i``."""
    qk, pv = tiled_mmas(cutlass.BFloat16, block_n, head_dim)
    shape_s = qk.get_slice(0).partition_shape_C((BLOCK_M, block_n))
    p16 = cute.make_rmem_tensor_like(cute.make_rmem_tensor(shape_s, cutlass.Float32), cutlass.BFloat16)
    p32 = cute.recast_tensor(p16, cutlass.Int32)
    a_layout = pv.make_fragment_A(pv.get_slice(0).partition_shape_A((BLOCK_M, block_n))).layout
    for v in cutlass.range_constexpr(cute.size(p16)):
        if cutlass.const_expr(p16.layout(v) != v or a_layout(v) != v or p32.layout(v // 2) != v // 2):
            mismatches.append(("P", v))
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
