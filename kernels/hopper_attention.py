"""Hopper (sm_90) backend: a warp-specialized Gluon forward that emits the row statistics.

Triton's automatic warp specialization fails on the causal two-loop kernel, so this kernel
schedules its warps by hand (``triton.experimental.gluon``, part of the Triton wheel):

* one loader warp streams K/V blocks into a shared-memory ring with TMA (``ready``/``empty``
  mbarriers per slot); the query tile is loaded once;
* two consumer warpgroups (three for plain attention at head dim 64, :data:`CONFIGS`), each its
  own partition, own 64 query rows each of the CTA's query tile and consume every key block;
  nothing couples them, so one's softmax runs while another's matrix multiplies do
  ("ping-pong", left to the warp schedulers);
* inside a consumer, the QK^T of block ``j`` and the PV of block ``j - 1`` are in flight
  together, and PV is waited for after the softmax of ``j`` (FlashAttention-3's in-warpgroup
  overlap; ptxas moves that wait up into the row max, docs/benchmarks.md);
* the programs run in sections of :func:`heads_in_l2` heads whose keys and values fit in L2,
  longest query tile first within a section (FlashAttention-4's order; 2 %-15 % faster than
  every head at once at 8K-16K tokens, docs/benchmarks.md).

Statistics (:class:`kernels.StatsSpec`): entropy (``t = sum p * x`` rescaled like ``l``),
argmax (one packed min a score, skipped by the warps none of whose rows' max grew in the
block: :func:`_first_max_column`) and ``max_prob = 1 / l`` ride in the main loop; distance
goes through the tensor cores (``P @ [BLOCK_N, 8]``, column 0 each key's offset from its
block's centre, on PV's own operand, issued just before PV). Masses are summed in the loop
only in the blocks they touch, rescaled like ``l``: sink mass in key block 0, local mass and
the first offset's (``0 <= o <= 128``) in the masked blocks near the diagonal.
Further offsets are recomputed after the loop as ``exp(s - lse)``, one key row per query row
from global memory. Key mass needs the final lse: the Triton key-mass pass runs after this
kernel.

Scope: what the model benchmarks and head scoring run most, causal self-attention
(``Nq == Nk``) in float16/bfloat16 with head dim 64 or 128, grouped-query heads, any length,
no padding lengths and no attention variants (window, soft-cap, learned sinks, ALiBi).
:func:`unsupported` says why a call does not fit; everything else runs on the Triton kernel.
``KERNELS_HOPPER=0`` turns this backend off. Gluon has no interpreter: CI compiles the kernel
for sm_90 on the CPU (:func:`compile_sm90`); on an sm_90 GPU
``tests/kernels/test_hopper_attention.py`` checks it against the float64 oracle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch

from kernels.spec import AttentionStats, StatsSpec, empty_output
from kernels.validate import Problem, fused_kernel_refusal

try:
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

    GLUON_AVAILABLE = True
except ImportError:  # Triton without Gluon (< 3.5) or without Triton: the Triton kernel serves
    GLUON_AVAILABLE = False

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (64, 128)
#: Fewer queries than this run on the Triton kernel, whose decoding path packs the heads.
MIN_QUERIES = 128
#: Most sink tokens: their keys must lie in the first key block.
MAX_SINK_TOKENS = 128
#: Most offsets (their masses are gathered after the loop, one key per row each, but the
#: first when it lies within a key block of the query, which is summed in the loop).
MAX_OFFSETS = 16


#: The key block the argmax's PTX is written for: the one every entry of CONFIGS uses.
ARGMAX_BLOCK_N = 128


def _argmax_asm(block_n: int) -> tuple[str, str]:
    """PTX and its operand constraints for one row's ``per_row = block_n // 4`` probabilities
    in a thread (:func:`_first_max_column`): operands ``$0 .. $(per_row - 1)`` out, then the
    probabilities' bits, then the row's warp-uniform flag (``per_row`` copies). Where the flag
    is 0 a uniform branch skips the work and every output is all ones; else every output is
    the unsigned min over the row of ``(~bits & -block_n) | code``, ``code`` each register's
    column within the thread."""
    per_row = block_n // 4
    flag = 2 * per_row
    lines = ["{", ".reg .pred p;", ".reg .b32 m<4>, t, k;", f"setp.ne.b32 p, ${flag}, 0;"]
    lines += [f"mov.b32 m{i}, -1;" for i in range(4)]
    lines += ["@!p bra.uni SKIP;", f"mov.b32 k, {-block_n};"]
    for e in range(per_row):  # four chains; 0xCE: (~a & c) | b
        lines += [f"lop3.b32 t, ${per_row + e}, {(e // 2) * 8 + e % 2}, k, 0xCE;", f"min.u32 m{e % 4}, m{e % 4}, t;"]
    lines += ["min.u32 m0, m0, m1;", "min.u32 m2, m2, m3;", "min.u32 m0, m0, m2;", "SKIP:"]
    lines += [f"mov.b32 ${i}, m0;" for i in range(per_row)]
    return "\n".join(lines + ["}"]), ",".join(["=r"] * per_row + ["r"] * (2 * per_row))


HALF_M = 64  # query rows of one consumer warpgroup


@dataclasses.dataclass(frozen=True)
class Config:
    """One build's shape: keys per block, K/V ring slots, and consumer warpgroups (64 query
    rows each, so a CTA's query tile is ``64 * consumers`` rows)."""

    block_n: int
    stages: int
    consumers: int

    @property
    def registers(self) -> tuple[int, int]:
        """``(launch cap, each consumer's after setmaxnreg)``, registers a thread: an SM's 64K
        are 512 a thread of one warpgroup, shared by the consumers and the loader (a warp padded
        to a warpgroup, left 24); both multiples of 8."""
        return (512 // (self.consumers + 1)) // 8 * 8, (512 - 24) // self.consumers // 8 * 8


#: Builds by (head dim, with statistics). Three consumers (160 registers each, FlashAttention-3's
#: head dim 64 tile) run plain attention at head dim 64 at 1.00x-1.01x cuDNN (8K-32K tokens;
#: two consumers 0.93x-0.94x, the Triton kernel 0.92x-0.97x); with the statistics they spill or
#: lose time (at best 0.72x against 0.74x), so two there (docs/benchmarks.md).
CONFIGS = {
    (64, False): Config(128, 3, 3),
    (64, True): Config(128, 3, 2),
    (128, False): Config(128, 2, 2),
    (128, True): Config(128, 2, 2),
}
_MASKED = -1.0e30  # masked raw scores: finite, so p * x stays 0 (no inf * 0)
_M_INIT = -5.0e29  # running max before the first key: above _MASKED, so alpha = 0, not NaN

if GLUON_AVAILABLE:
    _WG_ROWS = gl.constexpr(HALF_M)
    _MASKED_C = gl.constexpr(_MASKED)
    _M_INIT_C = gl.constexpr(_M_INIT)
    _LN2_C = gl.constexpr(LN2)
    # p as 16-bit pairs: column 2 i + 1 in the high half, 2 i in the low (cvt takes the high first)
    _PACK_BF16 = gl.constexpr("cvt.rn.bf16x2.f32 $0, $2, $1;")
    _PACK_F16 = gl.constexpr("cvt.rn.f16x2.f32 $0, $2, $1;")
    _ARGMAX_BLOCK_N = gl.constexpr(ARGMAX_BLOCK_N)
    _ARGMAX_ASM, _ARGMAX_CONSTRAINTS = (gl.constexpr(text) for text in _argmax_asm(ARGMAX_BLOCK_N))
    # 1 in every lane of a warp if the flag is set in any of its lanes
    _VOTE_ASM = gl.constexpr(
        "{ .reg .pred p; setp.ne.b32 p, $1, 0; vote.sync.any.pred p, p, 0xffffffff; selp.b32 $0, 1, 0, p; }"
    )
    # Gluon renames as it goes: Triton 3.6's thread_barrier and async_copy_global_to_shared
    # are barrier and async_load in later versions.
    _cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

    @gluon.constexpr_function
    def _mma_layout(n):
        """Accumulator layout of one warpgroup's [64, n] wgmma."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    @gluon.constexpr_function
    def _rows_layout():
        """A plain [64, D] layout for row gathers from global memory (8 elements a thread)."""
        return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])

    @gluon.jit
    def _loader(loads, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """Loader partition (one warp): each consumer's part of the query tile, then K/V block j
        into ring slot j % STAGES once every consumer has released it. ``loads``: its runtime
        arguments (:func:`_hopper_fwd`)."""
        (
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
            q_row0,
            q_col,
            kv_row0,
            kv_col,
            n_blocks,
        ) = loads
        mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
        for i in gl.static_range(CONSUMERS):
            _tma_load(q_desc, [q_row0 + i * _WG_ROWS, q_col], q_bar, q_smem.index(i))
        for j in range(n_blocks):
            s = j % STAGES
            ph = (j // STAGES) & 1
            mbarrier.wait(k_empty.index(s), ph ^ 1)  # a fresh barrier passes parity 1 at once
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            _tma_load(k_desc, [kv_row0 + j * BLOCK_N, kv_col], k_ready.index(s), k_smem.index(s))
            mbarrier.wait(v_empty.index(s), ph ^ 1)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            _tma_load(v_desc, [kv_row0 + j * BLOCK_N, kv_col], v_ready.index(s), v_smem.index(s))

    @gluon.jit
    def _first_max_column(p, grew, BLOCK_N: gl.constexpr):
        """Per row of ``p`` [64, BLOCK_N] (the block's probabilities, float32) where ``grew``
        [64] holds, the first column holding the row's max; arbitrary elsewhere.

        One unsigned min over the complemented bits with the column in the low bits: for p >= 0
        the unsigned order of ``~bits`` is the reverse of the float order, and the low
        log2(BLOCK_N) bits of p are far below the scores' own rounding near the max (p is near
        1 there). Columns are ``8 a + 2 c + b`` with ``c`` the thread's lane in its quad (the
        wgmma accumulator layout): ``8 a + b`` is a constant of each register, so packing it is
        one ``lop3``, and ``2 c`` joins after the reduction within the thread.

        The work is skipped where no row needs it: a row's argmax moves only in the blocks
        where its max grows, which in long rows is rare. Each of a thread's two rows (r and
        r + 8) shares its register with seven other rows across the warp, and a vote over
        them makes the skip a warp-uniform branch. Gluon has no branch that differs between
        warps, so the packing, the min and the branch are one inline PTX block for each row
        (:func:`_argmax_asm`)."""
        rows: gl.constexpr = p.shape[0]
        gl.static_assert(BLOCK_N == _ARGMAX_BLOCK_N)
        # [64, 4, BLOCK_N // 4] with no data movement: column 8 a + 2 c + b goes to [:, c, 2 a + b],
        # so axis 2 lies within each thread ...
        bits = gl.reshape(p.to(gl.int32, bitcast=True), [rows, BLOCK_N // 8, 4, 2])
        bits = gl.reshape(gl.permute(bits, (0, 2, 1, 3)), [rows, 4, BLOCK_N // 4])
        # ... and, renumbering the registers only, each row's BLOCK_N // 4 are consecutive, so
        # that one PTX block (pack = BLOCK_N // 4) takes a whole row
        by_row: gl.constexpr = gl.DistributedLinearLayout(
            [[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [0, 0, 16], [8, 0, 0]],
            [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            [[16, 0, 0], [32, 0, 0]],
            [],
            [rows, 4, BLOCK_N // 4],
        )
        bits = gl.convert_layout(bits, by_row, assert_trivial=True)
        vote = gl.inline_asm_elementwise(_VOTE_ASM, "=r,r", [grew.to(gl.int32)], dtype=gl.int32, is_pure=False, pack=1)
        vote = gl.convert_layout(vote, gl.SliceLayout(1, gl.SliceLayout(2, by_row)), assert_trivial=True)
        flag = gl.expand_dims(gl.expand_dims(vote, 1), 2) + gl.zeros_like(bits)
        per_row = gl.inline_asm_elementwise(
            _ARGMAX_ASM, _ARGMAX_CONSTRAINTS, [bits, flag], dtype=gl.int32, is_pure=True, pack=BLOCK_N // 4
        )
        for _ in gl.static_range(5):  # every output of a row is its min: keep the first
            per_row, _rest = gl.split(gl.reshape(per_row, [rows, 4, per_row.shape[2] // 2, 2]))
        per_lane = gl.reshape(per_row, [rows, 4]).to(gl.uint32, bitcast=True)
        lane = gl.arange(0, 4, layout=gl.SliceLayout(0, per_lane.type.layout)) * 2
        first = gl.min(per_lane | gl.expand_dims(lane, 0).to(gl.uint32), axis=1) & (BLOCK_N - 1)
        return gl.convert_layout(first.to(gl.int32), gl.SliceLayout(1, p.type.layout), assert_trivial=True)

    @gluon.jit
    def _softmax_block(
        qk,
        j,
        rows,
        st,
        qk_scale,
        marks,
        MASK: gl.constexpr,
        FIRST: gl.constexpr,
        ENTROPY: gl.constexpr,
        DIST: gl.constexpr,
        ARGMAX: gl.constexpr,
        LOCAL: gl.constexpr,
        SINK: gl.constexpr,
        NEAR: gl.constexpr,
        BLOCK_N: gl.constexpr,
    ):
        """Online softmax of key block j with the in-loop statistics.

        ``qk`` [64, BLOCK_N] raw scores; ``rows`` [64] query positions; ``st`` the row state
        ``(m, l, t, d, arg, loc, sink, near)``, each [64]: running max (log2 domain), sum,
        entropy and distance accumulators, argmax, local, sink and near-offset mass. MASK blocks
        mask keys after the query and sum the masses of the keys near it: within ``window``
        (LOCAL) and at ``near_offset`` (NEAR), where ``marks = (window, sink_tokens,
        near_offset)``; the FIRST block (key block 0) sums the sink mass (SINK: keys
        ``< sink_tokens <= BLOCK_N``). Every mass is rescaled like ``l``.
        Returns ``(p [64, BLOCK_N] unnormalised probabilities, alpha [64], new state)``.
        """
        m_i, l_i, t_i, d_i, a_i, w_i, s_i, o_i = st
        window, sink_tokens, near_offset = marks
        s_layout: gl.constexpr = qk.type.layout
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))  # [BLOCK_N]
        keys = j * BLOCK_N + cols
        if MASK:
            keep = gl.expand_dims(rows, 1) >= gl.expand_dims(keys, 0)  # [64, BLOCK_N]
            qk = gl.where(keep, qk, gl.full(qk.shape, _MASKED_C, gl.float32, s_layout))
        raw_max = gl.max(qk, axis=1)
        blk_max = raw_max * qk_scale  # qk_scale > 0: the raw max is the scaled one's
        m_new = gl.maximum(m_i, blk_max)
        alpha = gl.exp2(m_i - m_new)
        x = qk * qk_scale - gl.expand_dims(m_new, 1)  # [64, BLOCK_N], log2 domain, <= 0 up to rounding
        p = gl.exp2(x)
        l_blk = gl.sum(p, axis=1)
        if ENTROPY:  # t = sum p * (s - m), rescaled like l when the max moves
            t_i = alpha * (t_i + (m_i - m_new) * l_i) + gl.sum(p * x, axis=1)
        if DIST:  # sum p * block centre; the offsets from it go through the tensor cores
            d_i = alpha * d_i + (j * BLOCK_N + (BLOCK_N - 1) / 2) * l_blk
        if LOCAL:
            w_i = alpha * w_i
            if MASK:
                near = gl.expand_dims(keys, 0) > gl.expand_dims(rows - window, 1)
                w_i = w_i + gl.sum(gl.where(near, p, gl.zeros_like(p)), axis=1)
        if SINK:
            s_i = alpha * s_i
            if FIRST:
                sink = gl.expand_dims(keys < sink_tokens, 0)
                s_i = s_i + gl.sum(gl.where(sink, p, gl.zeros_like(p)), axis=1)
        if NEAR:
            o_i = alpha * o_i
            if MASK:
                hit = gl.expand_dims(keys, 0) == gl.expand_dims(rows - near_offset, 1)
                o_i = o_i + gl.sum(gl.where(hit, p, gl.zeros_like(p)), axis=1)
        if ARGMAX:  # last: before the exponentials it ran 11 % slower at D = 64
            grew = blk_max > m_i
            a_i = gl.where(grew, j * BLOCK_N + _first_max_column(p, grew, BLOCK_N), a_i)
        l_i = alpha * l_i + l_blk
        return p, alpha, (m_new, l_i, t_i, d_i, a_i, w_i, s_i, o_i)

    @gluon.jit
    def _packed_pairs(p, dtype: gl.constexpr):
        """``p`` [64, BLOCK_N] float32 rounded to ``dtype`` (16-bit), two columns in one int32:
        [64, BLOCK_N // 2]. Carried across the loop like this, the pairs go to PV as they are;
        carried as 16-bit values, ptxas swapped the halves of every pair on the way (a byte
        permute per two scores, 32 a block; docs/benchmarks.md)."""
        even, odd = gl.split(gl.reshape(p, [p.shape[0], p.shape[1] // 2, 2]))
        if dtype == gl.bfloat16:
            pairs = gl.inline_asm_elementwise(_PACK_BF16, "=r,r,r", [even, odd], dtype=gl.int32, is_pure=True, pack=1)
        else:
            pairs = gl.inline_asm_elementwise(_PACK_F16, "=r,r,r", [even, odd], dtype=gl.int32, is_pure=True, pack=1)
        return pairs

    @gluon.jit
    def _unpacked(pairs, dtype: gl.constexpr, a_layout: gl.constexpr):
        """:func:`_packed_pairs`' int32 [64, BLOCK_N // 2] back to ``dtype`` [64, BLOCK_N] in
        ``a_layout`` (no data movement: the pairs are already where the MMA wants them)."""
        even, odd = gl.inline_asm_elementwise(
            "mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs], dtype=(gl.int16, gl.int16), is_pure=True, pack=1
        )
        both = gl.join(even, odd).to(dtype, bitcast=True)
        return gl.convert_layout(gl.reshape(both, [both.shape[0], both.shape[1] * 2]), a_layout)

    @gluon.jit
    def _carried(p, dtype: gl.constexpr, P_F32: gl.constexpr):
        """``p`` [64, BLOCK_N] as it is carried to the next PV (:func:`_pv_operand`): as 16-bit
        pairs (:func:`_packed_pairs`), or with P_F32 in float32, converted just before PV (32
        more registers, which only two consumers at head dim 64 have; 2 % faster there with
        every row statistic than pairs)."""
        if P_F32:
            carried = p
        else:
            carried = _packed_pairs(p, dtype)
        return carried

    @gluon.jit
    def _pv_operand(p_prev, dtype: gl.constexpr, o_layout: gl.constexpr, P_F32: gl.constexpr):
        """The A operand of PV (and of the distance MMA) from what :func:`_carried` carried."""
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        if P_F32:
            operand = gl.convert_layout(p_prev.to(dtype), a_layout)
        else:
            operand = _unpacked(p_prev, dtype, a_layout)
        return operand

    @gluon.jit
    def _issue_pv(p_prev, v_tile, pos_t, acc, acc_d, DIST: gl.constexpr, P_F32: gl.constexpr):
        """Issue ``acc += P @ V`` with the carried ``p_prev`` and, with DIST, first ``acc_d += P @
        pos_t`` on the same A operand; both stay in flight, waited together. (Issued after PV,
        the eight N = 8 MMAs lengthened PV's wait: 0.725x against 0.752x cuDNN at head dim 64
        with every row statistic, 0.835x against 0.854x at 128; docs/benchmarks.md.)
        Returns ``(acc, acc_d)``."""
        o_layout: gl.constexpr = acc.type.layout
        pv_a = _pv_operand(p_prev, v_tile.dtype, o_layout, P_F32)
        if DIST:
            acc_d = warpgroup_mma(pv_a, pos_t, acc_d, is_async=True)
        acc = warpgroup_mma(pv_a, v_tile, acc, is_async=True)
        return acc, acc_d

    @gluon.jit
    def _consumer_step(
        j,
        rows,
        q_w,
        k_smem,
        v_smem,
        k_ready,
        v_ready,
        k_empty,
        v_empty,
        pos_t,
        p_prev,
        acc,
        acc_d,
        st,
        s_zero,
        qk_scale,
        marks,
        MASK: gl.constexpr,
        ENTROPY: gl.constexpr,
        DIST: gl.constexpr,
        ARGMAX: gl.constexpr,
        LOCAL: gl.constexpr,
        SINK: gl.constexpr,
        NEAR: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        P_F32: gl.constexpr,
    ):
        """Issue QK(j), then PV(j - 1) with ``p_prev``; wait for PV after the softmax of j.
        ``acc`` [64, D] is rescaled up to block j - 1; so is ``acc_d`` [64, 8] = P @ ``pos_t``
        (with DIST; column 0 of ``pos_t`` [BLOCK_N, 8] holds each key's offset from its block's
        centre), which rides with PV. Returns ``(p_prev, acc, acc_d, st)`` for j."""
        o_layout: gl.constexpr = acc.type.layout
        s = j % STAGES
        sp = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)
        qk = warpgroup_mma(q_w, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(sp), ((j - 1) // STAGES) & 1)
        acc, acc_d = _issue_pv(p_prev, v_smem.index(sp), pos_t, acc, acc_d, DIST, P_F32)
        # QK(j) done; PV(j - 1), and the distance MMA riding with it, may still run
        qk = warpgroup_mma_wait(2 if DIST else 1, deps=(qk,))
        mbarrier.arrive(k_empty.index(s))
        p, alpha, st = _softmax_block(
            qk, j, rows, st, qk_scale, marks, MASK, False, ENTROPY, DIST, ARGMAX, LOCAL, SINK, NEAR, BLOCK_N
        )
        acc, acc_d = warpgroup_mma_wait(0, deps=(acc, acc_d))
        mbarrier.arrive(v_empty.index(sp))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        if DIST:
            acc_d = acc_d * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc_d.type.layout)), 1)
        p_prev = _carried(p, v_smem.dtype, P_F32)
        return p_prev, acc, acc_d, st

    @gluon.jit
    def _gathered_mass(q_rows, k_base, k_stride, keys, ok, lse2, qk_scale, HEAD_D: gl.constexpr):
        """Probability of one key per row, ``exp2(q . k[key] * qk_scale - lse2)`` (0 where not ok).

        ``q_rows`` [64, HEAD_D] float32; ``keys``, ``ok`` and ``lse2`` [64] in its row layout;
        key ``j``'s row starts at ``k_base + j * k_stride``."""
        layout: gl.constexpr = q_rows.type.layout
        d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, layout))
        k_rows = gl.load(
            k_base + gl.expand_dims(keys.to(gl.int64), 1) * k_stride + gl.expand_dims(d, 0),
            mask=gl.expand_dims(ok, 1),
            other=0.0,
        )
        s = gl.sum(q_rows * k_rows.to(gl.float32), axis=1)
        return gl.where(ok, gl.exp2(s * qk_scale - lse2), gl.zeros_like(s))

    @gluon.jit
    def _consumer(
        WG: gl.constexpr,
        shared,
        BLOCK_N: gl.constexpr,
        HEAD_D: gl.constexpr,
        STAGES: gl.constexpr,
        STATS: gl.constexpr,
        ENTROPY: gl.constexpr,
        DIST: gl.constexpr,
        ARGMAX: gl.constexpr,
        LOCAL: gl.constexpr,
        SINK: gl.constexpr,
        NEAR: gl.constexpr,
        GATHER: gl.constexpr,
        F_ENT: gl.constexpr,
        F_MAX: gl.constexpr,
        F_LSINK: gl.constexpr,
        F_SINK: gl.constexpr,
        F_LOCAL: gl.constexpr,
        F_DIST: gl.constexpr,
        F_OFF: gl.constexpr,
        P_F32: gl.constexpr,
    ):
        """Consumer warpgroup WG: query rows ``start_m + WG * 64 + [0, 64)`` against every key
        block of the CTA; writes their output rows and statistics. ``shared``: the runtime
        arguments every consumer takes (:func:`_hopper_fwd`)."""
        (
            q_smem,
            pos_smem,
            k_smem,
            v_smem,
            q_bar,
            k_ready,
            v_ready,
            k_empty,
            v_empty,
            q_ptr,
            k_ptr,
            out_ptr,
            stats_ptr,
            argmax_ptr,
            offsets_ptr,
            bh,
            q_at,
            kv_at,
            o_at,
            N,
            rows_total,
            start_m,
            n_blocks,
            qk_scale,
            sink_tokens,
            window,
            n_offsets,
            near_offset,
            first_gathered,
        ) = shared
        s_layout: gl.constexpr = _mma_layout(BLOCK_N)
        o_layout: gl.constexpr = _mma_layout(HEAD_D)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        start_w = start_m + WG * _WG_ROWS
        rows = start_w + gl.arange(0, _WG_ROWS, layout=row_layout)  # [64] query positions
        q_w = q_smem.index(WG)
        zero_rows = gl.zeros([_WG_ROWS], gl.float32, row_layout)
        st = (
            gl.full([_WG_ROWS], _M_INIT_C, gl.float32, row_layout),
            zero_rows,
            zero_rows,
            zero_rows,
            gl.full([_WG_ROWS], -1, gl.int32, row_layout),
            zero_rows,
            zero_rows,
            zero_rows,
        )
        marks = (window, sink_tokens, near_offset)
        acc = gl.zeros([_WG_ROWS, HEAD_D], gl.float32, o_layout)
        acc_d = gl.zeros([_WG_ROWS, 8], gl.float32, _mma_layout(8))
        pos_t = pos_smem.permute((1, 0))
        s_zero = gl.zeros([_WG_ROWS, BLOCK_N], gl.float32, s_layout)
        # Key blocks [n_free, n_blocks) need masks: the causal diagonal, and those the window
        # (LOCAL) and the near offset (NEAR) of this warpgroup's first row reach.
        n_free = gl.minimum(start_w // BLOCK_N, n_blocks)  # a last tile's rows past N may start past its keys
        if LOCAL:
            n_free = gl.minimum(n_free, gl.maximum(start_w - window + 1, 0) // BLOCK_N)
        if NEAR:
            n_free = gl.minimum(n_free, gl.maximum(start_w - near_offset, 0) // BLOCK_N)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        qk = warpgroup_mma(q_w, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(0, deps=(qk,))
        mbarrier.arrive(k_empty.index(0))
        p, alpha, st = _softmax_block(
            qk, 0, rows, st, qk_scale, marks, True, True, ENTROPY, DIST, ARGMAX, LOCAL, SINK, NEAR, BLOCK_N
        )
        p_prev = _carried(p, v_smem.dtype, P_F32)
        for j in range(1, n_free):
            p_prev, acc, acc_d, st = _consumer_step(
                j,
                rows,
                q_w,
                k_smem,
                v_smem,
                k_ready,
                v_ready,
                k_empty,
                v_empty,
                pos_t,
                p_prev,
                acc,
                acc_d,
                st,
                s_zero,
                qk_scale,
                marks,
                False,
                ENTROPY,
                DIST,
                ARGMAX,
                LOCAL,
                SINK,
                NEAR,
                BLOCK_N,
                STAGES,
                P_F32,
            )
        for j in range(gl.maximum(n_free, 1), n_blocks):
            p_prev, acc, acc_d, st = _consumer_step(
                j,
                rows,
                q_w,
                k_smem,
                v_smem,
                k_ready,
                v_ready,
                k_empty,
                v_empty,
                pos_t,
                p_prev,
                acc,
                acc_d,
                st,
                s_zero,
                qk_scale,
                marks,
                True,
                ENTROPY,
                DIST,
                ARGMAX,
                LOCAL,
                SINK,
                NEAR,
                BLOCK_N,
                STAGES,
                P_F32,
            )
        last = n_blocks - 1
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        acc, acc_d = _issue_pv(p_prev, v_smem.index(last % STAGES), pos_t, acc, acc_d, DIST, P_F32)
        acc, acc_d = warpgroup_mma_wait(0, deps=(acc, acc_d))
        d_i = st[3] + gl.convert_layout(gl.sum(acc_d, axis=1), row_layout)
        mbarrier.arrive(v_empty.index(last % STAGES))

        m_i, l_i, t_i, _, a_i, w_i, s_i, o_i = st
        # Output rows, straight from registers (rows past N belong to no query).
        o_rows = start_w + gl.arange(0, _WG_ROWS, layout=gl.SliceLayout(1, o_layout))
        d_o = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        o_row0, o_col, o_stride = o_at
        o_base = out_ptr + o_col + o_row0 * o_stride
        gl.store(
            o_base + gl.expand_dims(o_rows.to(gl.int64), 1) * o_stride + gl.expand_dims(d_o, 0),
            out.to(out_ptr.dtype.element_ty),
            mask=gl.expand_dims(o_rows < N, 1),
        )
        if STATS:
            valid = rows < N
            grow = bh.to(gl.int64) * N + rows  # flat row index b * Hq * N + h * N + i
            log2_l = gl.log2(l_i)
            lse2 = m_i + log2_l
            gl.store(stats_ptr + grow, lse2 * _LN2_C, mask=valid)
            if F_ENT:
                gl.store(stats_ptr + F_ENT * rows_total + grow, (log2_l - t_i / l_i) * _LN2_C, mask=valid)
            if F_MAX:
                gl.store(stats_ptr + F_MAX * rows_total + grow, 1.0 / l_i, mask=valid)
            if F_LSINK:
                gl.store(stats_ptr + F_LSINK * rows_total + grow, zero_rows, mask=valid)
            if F_LOCAL:
                gl.store(stats_ptr + F_LOCAL * rows_total + grow, w_i / l_i, mask=valid)
            if F_DIST:
                gl.store(stats_ptr + F_DIST * rows_total + grow, rows.to(gl.float32) - d_i / l_i, mask=valid)
            if ARGMAX:
                gl.store(argmax_ptr + grow, a_i.to(gl.int64), mask=valid)
            if F_SINK:
                gl.store(stats_ptr + F_SINK * rows_total + grow, s_i / l_i, mask=valid)
            if NEAR:
                gl.store(stats_ptr + F_OFF * rows_total + grow * n_offsets, o_i / l_i, mask=valid)
            if GATHER:
                # The other offsets: one key per row at a time, from global memory, now that
                # lse is final.
                g_layout: gl.constexpr = _rows_layout()
                g_row: gl.constexpr = gl.SliceLayout(1, g_layout)
                g_rows = start_w + gl.arange(0, _WG_ROWS, layout=g_row)
                g_valid = g_rows < N
                d_g = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, g_layout))
                q_row0, q_col, q_stride = q_at
                kv_row0, kv_col, kv_stride = kv_at
                q_rows = gl.load(
                    q_ptr
                    + (q_col + q_row0 * q_stride)
                    + gl.expand_dims(g_rows.to(gl.int64), 1) * q_stride
                    + gl.expand_dims(d_g, 0),
                    mask=gl.expand_dims(g_valid, 1),
                    other=0.0,
                ).to(gl.float32)
                g_lse2 = gl.convert_layout(lse2, g_row)
                k_base = k_ptr + kv_col + kv_row0 * kv_stride
                g_grow = bh.to(gl.int64) * N + g_rows
                for i in range(first_gathered, n_offsets):
                    keys = g_rows - gl.load(offsets_ptr + i)
                    ok = g_valid & (keys >= 0) & (keys <= g_rows)
                    mass = _gathered_mass(q_rows, k_base, kv_stride, keys, ok, g_lse2, qk_scale, HEAD_D)
                    gl.store(stats_ptr + F_OFF * rows_total + g_grow * n_offsets + i, mass, mask=g_valid)

    @gluon.jit
    def _hopper_fwd(
        q_desc,
        k_desc,
        v_desc,
        q_ptr,
        k_ptr,
        out_ptr,
        stats_ptr,
        argmax_ptr,
        offsets_ptr,
        q_rows_b,
        q_rows_h,
        q_col_h,
        q_stride,
        kv_rows_b,
        kv_rows_h,
        kv_col_h,
        kv_stride,
        o_rows_b,
        o_rows_h,
        o_col_h,
        o_stride,
        N,
        Hq,
        GROUP,
        rows_total,
        qk_scale,
        sink_tokens,
        window,
        n_offsets,
        near_offset,
        first_gathered,
        BLOCK_N: gl.constexpr,
        HEAD_D: gl.constexpr,
        STAGES: gl.constexpr,
        STATS: gl.constexpr,
        ENTROPY: gl.constexpr,
        DIST: gl.constexpr,
        ARGMAX: gl.constexpr,
        LOCAL: gl.constexpr,
        SINK: gl.constexpr,
        NEAR: gl.constexpr,
        GATHER: gl.constexpr,
        F_ENT: gl.constexpr,
        F_MAX: gl.constexpr,
        F_LSINK: gl.constexpr,
        F_SINK: gl.constexpr,
        F_LOCAL: gl.constexpr,
        F_DIST: gl.constexpr,
        F_OFF: gl.constexpr,
        POS_LAYOUT: gl.constexpr,
        CONSUMERS: gl.constexpr,
        P_F32: gl.constexpr,
        REGISTERS: gl.constexpr,
        HEADS_L2,
    ):
        """grid = (B * Hq * cdiv(N, 64 * CONSUMERS),). q, k/v and out are each addressed as 2-D
        rows (:class:`Rows`: ``{x}_rows_b``, ``{x}_rows_h``, ``{x}_col_h``, ``{x}_stride``); the
        descriptors load [rows, D] blocks of those views. Programs run in sections of HEADS_L2 heads, whose
        keys and values fit in L2 together; within a section, query tiles run longest first,
        each tile of every head in the section before the next shorter one."""
        n_m = (N + CONSUMERS * _WG_ROWS - 1) // (CONSUMERS * _WG_ROWS)
        n_bh = gl.num_programs(0) // n_m
        section = gl.program_id(0) // (HEADS_L2 * n_m)
        within = gl.program_id(0) - section * (HEADS_L2 * n_m)
        heads_here = gl.minimum(HEADS_L2, n_bh - section * HEADS_L2)
        bh = section * HEADS_L2 + within % heads_here
        b = bh // Hq
        h = bh - b * Hq
        hk = h // GROUP
        # (row of position 0, column, row stride) of this head in each tensor's rows
        q_at = (b.to(gl.int64) * q_rows_b + h * q_rows_h, h * q_col_h, q_stride)
        kv_at = (b.to(gl.int64) * kv_rows_b + hk * kv_rows_h, hk * kv_col_h, kv_stride)
        o_at = (b.to(gl.int64) * o_rows_b + h * o_rows_h, h * o_col_h, o_stride)
        start_m = (n_m - 1 - within // heads_here) * (CONSUMERS * _WG_ROWS)
        dtype: gl.constexpr = q_desc.block_type.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, _WG_ROWS, HEAD_D], q_desc.layout)
        # [8, BLOCK_N] in p's dtype for the distance MMA: row 0 each key's offset from its block's
        # centre (-63.5 .. 63.5 for 128 keys, exact), the rest 0: its B operand, transposed like K.
        pos_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
        pos_rows = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(1, pos_layout)), 1)
        pos_cols = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, pos_layout)), 0)
        centred = pos_cols.to(gl.float32) - (BLOCK_N - 1) / 2
        positions = gl.where(pos_rows == 0, centred, gl.zeros_like(centred)).to(dtype)
        pos_smem = gl.allocate_shared_memory(dtype, [8, BLOCK_N], POS_LAYOUT, positions)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=CONSUMERS)  # one arrive from each consumer
            mbarrier.init(v_empty.index(i), count=CONSUMERS)
        fence_async_shared()
        _cta_barrier()

        n_blocks = (gl.minimum(start_m + CONSUMERS * _WG_ROWS, N) + BLOCK_N - 1) // BLOCK_N
        shared = (
            q_smem,
            pos_smem,
            k_smem,
            v_smem,
            q_bar,
            k_ready,
            v_ready,
            k_empty,
            v_empty,
            q_ptr,
            k_ptr,
            out_ptr,
            stats_ptr,
            argmax_ptr,
            offsets_ptr,
            bh,
            q_at,
            kv_at,
            o_at,
            N,
            rows_total,
            start_m,
            n_blocks,
            qk_scale,
            sink_tokens,
            window,
            n_offsets,
            near_offset,
            first_gathered,
        )
        loads = (
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
            (q_at[0] + start_m).to(gl.int32),
            q_at[1],
            kv_at[0].to(gl.int32),
            kv_at[1],
            n_blocks,
        )
        # warps and registers (Config.registers) of the partitions after the first
        if CONSUMERS == 3:
            gl.warp_specialize(
                [
                    (
                        _consumer,
                        (
                            0,
                            shared,
                            BLOCK_N,
                            HEAD_D,
                            STAGES,
                            STATS,
                            ENTROPY,
                            DIST,
                            ARGMAX,
                            LOCAL,
                            SINK,
                            NEAR,
                            GATHER,
                            F_ENT,
                            F_MAX,
                            F_LSINK,
                            F_SINK,
                            F_LOCAL,
                            F_DIST,
                            F_OFF,
                            P_F32,
                        ),
                    ),
                    (
                        _consumer,
                        (
                            1,
                            shared,
                            BLOCK_N,
                            HEAD_D,
                            STAGES,
                            STATS,
                            ENTROPY,
                            DIST,
                            ARGMAX,
                            LOCAL,
                            SINK,
                            NEAR,
                            GATHER,
                            F_ENT,
                            F_MAX,
                            F_LSINK,
                            F_SINK,
                            F_LOCAL,
                            F_DIST,
                            F_OFF,
                            P_F32,
                        ),
                    ),
                    (
                        _consumer,
                        (
                            2,
                            shared,
                            BLOCK_N,
                            HEAD_D,
                            STAGES,
                            STATS,
                            ENTROPY,
                            DIST,
                            ARGMAX,
                            LOCAL,
                            SINK,
                            NEAR,
                            GATHER,
                            F_ENT,
                            F_MAX,
                            F_LSINK,
                            F_SINK,
                            F_LOCAL,
                            F_DIST,
                            F_OFF,
                            P_F32,
                        ),
                    ),
                    (_loader, (loads, BLOCK_N, STAGES, CONSUMERS)),
                ],
                [4, 4, 1],
                [REGISTERS, REGISTERS, 24],
            )
        else:
            gl.warp_specialize(
                [
                    (
                        _consumer,
                        (
                            0,
                            shared,
                            BLOCK_N,
                            HEAD_D,
                            STAGES,
                            STATS,
                            ENTROPY,
                            DIST,
                            ARGMAX,
                            LOCAL,
                            SINK,
                            NEAR,
                            GATHER,
                            F_ENT,
                            F_MAX,
                            F_LSINK,
                            F_SINK,
                            F_LOCAL,
                            F_DIST,
                            F_OFF,
                            P_F32,
                        ),
                    ),
                    (
                        _consumer,
                        (
                            1,
                            shared,
                            BLOCK_N,
                            HEAD_D,
                            STAGES,
                            STATS,
                            ENTROPY,
                            DIST,
                            ARGMAX,
                            LOCAL,
                            SINK,
                            NEAR,
                            GATHER,
                            F_ENT,
                            F_MAX,
                            F_LSINK,
                            F_SINK,
                            F_LOCAL,
                            F_DIST,
                            F_OFF,
                            P_F32,
                        ),
                    ),
                    (_loader, (loads, BLOCK_N, STAGES, CONSUMERS)),
                ],
                [4, 1],
                [REGISTERS, 24],
            )


def _enabled() -> bool:
    return os.environ.get("KERNELS_HOPPER", "1") not in ("", "0")


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def unsupported(
    q: torch.Tensor,
    p: Problem,
    stats: StatsSpec | None,
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
    **per_head: torch.Tensor | None,
) -> str | None:
    """Why this kernel cannot run the call (None: it can). ``per_head`` are the per-head
    variants of :func:`kernels.attention` (``sinks``, ``alibi_slopes``, ``window_heads``)."""
    reason = fused_kernel_refusal(q, p, HEAD_DIMS, MIN_QUERIES, key_lengths, query_lengths, per_head)
    if reason is not None:
        return reason
    if stats is not None and stats.sink_tokens > MAX_SINK_TOKENS:
        return f"more than {MAX_SINK_TOKENS} sink tokens"
    if stats is not None and len(stats.offsets) > MAX_OFFSETS:
        return f"more than {MAX_OFFSETS} offsets"
    if not GLUON_AVAILABLE:
        return "this Triton has no Gluon"
    if not _enabled():
        return "KERNELS_HOPPER=0"
    if not q.is_cuda or not _is_hopper(q.device):
        return "not a Hopper (sm_90) GPU"
    return None


@dataclasses.dataclass(frozen=True)
class Rows:
    """How the kernel addresses a ``[B, H, N, D]`` tensor: as a 2-D view of ``shape`` with
    unit-stride columns and rows ``stride`` elements apart, where position ``i`` of head ``h``
    of batch ``b`` is row ``b * rows_b + h * rows_h + i`` from column ``h * col_h``.

    Head-major (contiguous ``[B, H, N, D]``): ``[B*H*N, D]``. Token-major (``[B, N, H, D]`` in
    memory, as the projections of Hugging Face and TransformerLens models give it, possibly
    rows of a wider fused projection): ``[B*N, H*D]``, read in place."""

    rows_b: int
    rows_h: int
    col_h: int
    stride: int
    shape: tuple[int, int]

    @staticmethod
    def of(t: torch.Tensor) -> Rows | None:
        """``t``'s rows, or None where TMA cannot read it in place (it needs unit-stride head
        dims and 16-byte aligned rows)."""
        b, h, n, d = t.shape
        sb, sh, sn, sd = t.stride()
        if sd != 1 or t.data_ptr() % 16:
            return None
        if t.is_contiguous():
            return Rows(h * n, n, 0, d, (b * h * n, d))
        if (h == 1 or sh == d) and (b == 1 or sb == n * sn) and sn >= h * d and sn * t.element_size() % 16 == 0:
            return Rows(n, 0, d, sn, (b * n, h * d))
        return None

    def args(self, prefix: str) -> dict[str, int]:
        """The kernel's four integer arguments for this tensor, named ``{prefix}_...``."""
        return {
            f"{prefix}_rows_b": self.rows_b,
            f"{prefix}_rows_h": self.rows_h,
            f"{prefix}_col_h": self.col_h,
            f"{prefix}_stride": self.stride,
        }

    def descriptor(self, t: torch.Tensor, block_rows: int) -> TensorDescriptor:
        """A TMA descriptor over ``t``'s rows, loading ``[block_rows, D]`` blocks."""
        view = t.as_strided(self.shape, (self.stride, 1))
        dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
        block = [block_rows, t.shape[-1]]
        return TensorDescriptor.from_tensor(view, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where TMA can read it in place (:meth:`Rows.of`), else a contiguous copy."""
    return t if Rows.of(t) is not None else t.contiguous()


#: L2 bytes assumed where the device cannot be asked (the offline build): an H100's (an H200 reports 60 MiB).
L2_BYTES = 50 * 2**20


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else L2_BYTES


def heads_in_l2(p: Problem, element_size: int, l2_bytes: int) -> int:
    """How many query heads the kernel runs together (a section): the most whose keys and
    values fit in ``l2_bytes`` at once, rounded down to a power of two, at least one key/value
    head's worth (its ``p.group`` query heads), at most all ``B * Hq``. Within a section the
    programs run longest query tile first, each tile of every head before the next, so the
    section's keys and values are read from memory about once instead of once a tile."""
    kv_heads = max(1, l2_bytes // (2 * p.n_k * p.head_dim * element_size))
    return min(1 << int(math.log2(kv_heads * p.group)), p.batch * p.q_heads)


def launch_arguments(q, k, v, out, stats_buf, argmax, offsets, p: Problem, stats: StatsSpec | None, fields: dict):
    """The kernel's grid, arguments, constexprs and launch options for one call (shared by the
    launch and the offline compile). q, k, v and out must have :class:`Rows` (k's and v's the
    same: :func:`readable`)."""
    want = stats is not None
    config = CONFIGS[p.head_dim, want]
    block_n = config.block_n
    launch_cap, registers = config.registers
    n_off = len(stats.offsets) if want else 0
    assert not want or stats.sink_tokens <= block_n, "sink keys must lie in the first key block"
    # The first offset, if it lies within a block of the query, is summed in the loop.
    near = n_off > 0 and 0 <= stats.offsets[0] <= block_n
    q_rows, kv_rows, o_rows = Rows.of(q), Rows.of(k), Rows.of(out)
    assert None not in (q_rows, kv_rows, o_rows) and Rows.of(v) == kv_rows, "the kernel cannot read these layouts"
    args = dict(
        q_desc=q_rows.descriptor(q, HALF_M),
        k_desc=kv_rows.descriptor(k, block_n),
        v_desc=kv_rows.descriptor(v, block_n),
        q_ptr=q,
        k_ptr=k,
        out_ptr=out,
        stats_ptr=stats_buf,
        argmax_ptr=argmax,
        offsets_ptr=offsets,
        **q_rows.args("q"),
        **kv_rows.args("kv"),
        **o_rows.args("o"),
        N=p.n_q,
        Hq=p.q_heads,
        GROUP=p.group,
        rows_total=p.batch * p.q_heads * p.n_q,
        qk_scale=p.scale * LOG2E,
        sink_tokens=stats.sink_tokens if want else 0,
        window=stats.window if want else 0,
        n_offsets=n_off,
        near_offset=stats.offsets[0] if near else 0,
        first_gathered=int(near),
        HEADS_L2=heads_in_l2(p, q.element_size(), _l2_bytes(q.device)),
    )
    flags = dict(
        BLOCK_N=block_n,
        HEAD_D=p.head_dim,
        STAGES=config.stages,
        STATS=want,
        ENTROPY="entropy" in fields,
        DIST="distance" in fields,
        ARGMAX=bool(want and stats.argmax),
        LOCAL="local_mass" in fields,
        SINK="sink_mass" in fields,
        NEAR=near,
        GATHER=n_off > int(near),
        **{f"F_{short}": fields.get(name, 0) for short, name in _FIELD_FLAGS.items()},
        POS_LAYOUT=gl.NVMMASharedLayout.get_default_for([8, block_n], gl.float16),  # any 16-bit dtype
        CONSUMERS=config.consumers,
        P_F32=p.head_dim == 64 and registers >= 240,
        REGISTERS=registers,
    )
    grid = (p.batch * p.q_heads * math.ceil(p.n_q / (HALF_M * config.consumers)),)
    return grid, args, flags, dict(num_warps=4, maxnreg=launch_cap)


_FIELD_FLAGS = {
    "ENT": "entropy",
    "MAX": "max_prob",
    "LSINK": "learned_sink_mass",
    "SINK": "sink_mass",
    "LOCAL": "local_mass",
    "DIST": "distance",
    "OFF": "offset_mass",
}


def hopper_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, stats: StatsSpec | None
) -> tuple[torch.Tensor, AttentionStats | None]:
    """Run the Gluon kernel on a call :func:`unsupported` accepts; key mass by the Triton pass."""
    from kernels.triton_attention import _offsets_tensor, key_mass_pass, row_stats_views, stat_fields

    q, k, v = readable(q), readable(k), readable(v)
    if Rows.of(k) != Rows.of(v):  # one set of coordinates serves both
        k, v = k.contiguous(), v.contiguous()
    b, hq, n = p.batch, p.q_heads, p.n_q
    want = stats is not None
    fields = stat_fields(stats, False) if want else {}
    n_off = len(stats.offsets) if want else 0
    n_rows = b * hq * n
    out = empty_output(q)
    per_row = fields.get("offset_mass", 0) + n_off
    stats_buf = torch.empty(per_row * n_rows, device=q.device, dtype=torch.float32) if want else out
    argmax = torch.empty((b, hq, n), device=q.device, dtype=torch.int64) if want and stats.argmax else out
    offsets = _offsets_tensor(stats.offsets, q.device) if n_off else out
    grid, args, flags, options = launch_arguments(q, k, v, out, stats_buf, argmax, offsets, p, stats, fields)
    _hopper_fwd[grid](**args, **flags, **options)
    if not want:
        return out, None
    found = row_stats_views(stats_buf, fields, stats, (b, hq, n))
    key_mass = key_mass_pass(q, k, p, stats, found["lse"]) if stats.key_mass else None
    return out, AttentionStats(**found, argmax=argmax if stats.argmax else None, key_mass=key_mass)


_POINTER_TYPES = {torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}


def compile_sm90(head_dim: int, dtype: torch.dtype = torch.bfloat16, stats: StatsSpec | None = None):
    """Compile the kernel for sm_90 without a GPU (Triton's compiler and ptxas run on the CPU);
    returns Triton's compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``). The
    tests use it to check that the kernel builds with the installed Triton, and ``ptxas -v``
    on its PTX reports registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernels.triton_attention import stat_fields

    n = 256  # two query tiles or more, with any number of consumers
    p = Problem(1, 2, 1, n, n, head_dim, 1.0 / math.sqrt(head_dim), True)
    fields = stat_fields(stats, False) if stats is not None else {}
    qkv = torch.empty((1, 2, n, head_dim), dtype=dtype, device="meta")
    stats_buf = torch.empty(0, dtype=torch.float32, device="meta")
    argmax = torch.empty(0, dtype=torch.int64, device="meta")
    offsets = torch.empty(0, dtype=torch.int32, device="meta")
    _, args, flags, options = launch_arguments(qkv, qkv, qkv, qkv, stats_buf, argmax, offsets, p, stats, fields)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    signature = {}
    for key, value in args.items():
        if isinstance(value, TensorDescriptor):
            block = value.block_shape
            signature[key] = f"tensordesc<{name}[{block[0]}, {block[1]}],{value.layout!r}>"
        elif isinstance(value, torch.Tensor):
            signature[key] = "*" + _POINTER_TYPES.get(value.dtype, name)
        elif isinstance(value, float):
            signature[key] = "fp32"
        else:
            signature[key] = "i32"
    signature.update({key: "constexpr" for key in flags})
    source = GluonASTSource(_hopper_fwd, signature=signature, constexprs=flags)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
