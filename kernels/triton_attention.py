"""Triton backend: flash-style attention that emits statistics in the same pass.

Forward kernel (one program per block of ``BLOCK_M`` query rows):

* the main loop walks key blocks with the online softmax (running max ``m``, running sum
  ``l``, output accumulator), in base 2, and keeps more online accumulators when asked:
  ``t = sum p * (s - m)`` (entropy = ln l - ln2 * t / l), ``sum p * key_position`` (mean
  distance) and the index of the running maximum;
* key blocks that every row of the block sees run without any masking arithmetic, and with
  the score scale folded into the exponent's subtraction; only the causal diagonal and the
  padded tail are masked;
* after the loop the row log-sum-exp is final, so sink mass (keys ``< sink_tokens``), local
  mass (the ``window`` keys ending at the query) and offset mass (one key per row) are
  recomputed exactly as ``exp(s - lse)`` over just those few keys, like a backward pass does;
* ``max_prob = 1 / l`` comes for free.

Rows of a program are either ``BLOCK_M`` queries of one head (prefill), or, for decoding
shapes (few queries), every query of every head that shares one key/value head ("packed"),
so K and V are read once per group. When that leaves the GPU idle (few programs, many keys),
the keys are split across programs (flash-decoding): each split computes the output and
every statistic over its own keys as if they were the whole row, and a merge kernel combines
them exactly (weights ``exp(lse_s - lse)``; entropy adds the entropy of the weights).

The float32 row statistics of a call share one buffer (:func:`stat_fields`), so a call
allocates little and passes few pointers: on decoding shapes a call's latency is mostly
host time.

Key-mass kernel: one program per block of keys, looping over the query blocks that can see
them, summing ``exp(s - lse)`` over rows.

Attention variants (``window``, ``keep_first``, ``window_heads``, ``softcap``, ``sinks``,
``alibi_slopes``; compile-time flags, so plain calls compile as before):
soft-capping and ALiBi transform the scores wherever they are computed (blocks using them
always scale first); a sliding window starts the key loop at the window's first block and
masks the blocks it cuts; kept first keys (``keep_first``, StreamingLLM) add a masked loop over
their own blocks before the window's, so the blocks between them are skipped; with
``window_heads`` each row gets its head's window (heads without one see every key); a learned
sink is folded into the softmax after the key loop (one more logit, no value), or, with split
keys, by the merge, so it counts once.

Masked scores are the finite ``_MASKED`` and the running max starts at ``_M_INIT`` (greater
than ``_MASKED``): fully masked rows then give ``p = 0`` without ever forming ``inf - inf``.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from kernels.spec import AttentionStats, StatsSpec, empty_output
from kernels.validate import Problem

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_MASKED = tl.constexpr(-1.0e30)
_M_INIT = tl.constexpr(-5.0e29)

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
#: Decoding shapes (at most this many queries) pack a key/value head's query heads together.
DECODE_MAX_Q = 16
#: Packed rows per program at most (query heads per key/value head x queries).
PACK_MAX_ROWS = 128
#: Most splits of one row's keys.
MAX_SPLITS = 128


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _softcap(s, cap2):
    """``cap2 * tanh(s / cap2)``, elementwise; tanh(y) = sign(y) (1 - e) / (1 + e) with
    e = exp(-2 |y|) <= 1, which cannot overflow (Triton has no tanh of its own)."""
    y = s / cap2
    e = tl.math.exp2(tl.abs(y) * _LOG2E * -2.0)
    th = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0.0, -th, th) * cap2


@triton.jit
def _variant_scores(s, qpos, offs_n, cap2, slope2, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Scaled scores ``s [BLOCK_M, BLOCK_N]`` (log2 domain) soft-capped to ``cap2 * tanh(s / cap2)``
    (SOFTCAP), then less ``slope2 * |query position - key position|`` (ALIBI; ``qpos`` and
    ``slope2`` are ``[BLOCK_M]``, ``offs_n`` the key positions ``[BLOCK_N]``)."""
    if SOFTCAP:
        s = _softcap(s, cap2)
    if ALIBI:
        rel = qpos[:, None] - offs_n[None, :]  # [BLOCK_M, BLOCK_N]
        s = s - slope2[:, None] * tl.abs(rel).to(tl.float32)
    return s


@triton.jit
def _visible(
    offs_n,
    qpos,
    klen,
    attn_window,
    keep,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    KEEP: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Which keys ``offs_n [BLOCK_N]`` the queries at ``qpos [BLOCK_M]`` see: inside the keys'
    length, not after the query (CAUSAL), less than ``attn_window`` before it (WINDOW) or among
    the first ``keep`` keys (KEEP). ``attn_window`` and ``keep`` are scalars, or ``[BLOCK_M]``
    per row with ROWS (heads that the window restricts or not, :func:`_row_window`)."""
    ok = offs_n[None, :] < klen  # [1, BLOCK_N]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= qpos[:, None])  # [BLOCK_M, BLOCK_N]
    if WINDOW:
        if ROWS:
            inside = qpos[:, None] - offs_n[None, :] < attn_window[:, None]  # [BLOCK_M, BLOCK_N]
            if KEEP:
                inside = inside | (offs_n[None, :] < keep[:, None])
        else:
            inside = qpos[:, None] - offs_n[None, :] < attn_window  # [BLOCK_M, BLOCK_N]
            if KEEP:
                inside = inside | (offs_n[None, :] < keep)
        ok = ok & inside
    return ok


@triton.jit
def _row_window(WinHeads, h, row_in, attn_window, keep_first, Nk, BLOCK_M: tl.constexpr):
    """Per row ``[BLOCK_M]``: the window and kept first keys of the row's query head ``h`` (one
    scalar or ``[BLOCK_M]``): ``attn_window`` and ``keep_first`` where ``WinHeads[h]`` is set,
    else a window wider than any row (``Nk + 1``) and none kept. Rows outside ``row_in`` count
    as windowed (they must not widen a program's key range)."""
    hh = h + tl.zeros([BLOCK_M], dtype=tl.int64)  # [BLOCK_M]
    on = tl.load(WinHeads + hh, mask=row_in, other=1) != 0  # [BLOCK_M]
    win = tl.where(on, attn_window, Nk + 1)  # [BLOCK_M]
    keep = tl.where(on, keep_first, 0)  # [BLOCK_M]
    return win, keep


@triton.jit
def _per_row(ptr, h, row_in, BLOCK_M: tl.constexpr):
    """``ptr[h]`` (a per-head float: sink, slope) for each row as ``[BLOCK_M]`` float32;
    ``h`` is the rows' query head, one scalar or ``[BLOCK_M]``."""
    hh = h + tl.zeros([BLOCK_M], dtype=tl.int64)  # [BLOCK_M]
    return tl.load(ptr + hh, mask=row_in, other=0.0).to(tl.float32)


@triton.jit
def _fwd_block(
    acc,
    m_i,
    l_i,
    t_i,
    d_i,
    arg_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    start_n,
    qpos,
    klen,
    offs_d,
    qk_scale,
    desc_k,
    desc_v,
    b,
    hk,
    attn_window,
    keep,
    cap2,
    slope2,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    TMA: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    KEEP: tl.constexpr,
    ROWS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    ENTROPY: tl.constexpr,
    DIST: tl.constexpr,
    ARGMAX: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    """One key block of the online softmax with statistics accumulators.

    ``acc`` is ``[BLOCK_M, BLOCK_D]``; ``m_i``, ``l_i``, ``t_i``, ``d_i``, ``arg_i``,
    ``qpos`` and ``slope2`` are ``[BLOCK_M]``; ``q`` is ``[BLOCK_M, BLOCK_D]``; ``offs_d`` is
    ``[BLOCK_D]``. MASKED blocks mask keys past ``klen``, after the query (CAUSAL) and before
    the sliding window (WINDOW) unless kept (KEEP: keys ``< keep``); the others are visible to
    every row. ``attn_window`` and ``keep`` are scalars, or ``[BLOCK_M]`` with ROWS.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]: K transposed
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BLOCK_N, BLOCK_D]
    if MASKED:
        kt = tl.load(k_ptrs, mask=(offs_n[None, :] < klen) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vb = tl.load(v_ptrs, mask=(offs_n[:, None] < klen) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif TMA:
        kt = tl.trans(desc_k.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D))  # [BLOCK_D, BLOCK_N]
        vb = desc_v.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    elif EVEN_D:
        kt = tl.load(k_ptrs)
        vb = tl.load(v_ptrs)
    else:
        kt = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        vb = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    if DOT_F32:
        kt = kt.to(tl.float32)
        vb = vb.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PREC)  # [BLOCK_M, BLOCK_N] scores
    SCALED: tl.constexpr = MASKED or SOFTCAP or ALIBI
    if SCALED:
        s = _variant_scores(s * qk_scale, qpos, offs_n, cap2, slope2, SOFTCAP, ALIBI)
    if MASKED:
        ok = _visible(offs_n, qpos, klen, attn_window, keep, CAUSAL, WINDOW, KEEP, ROWS)  # [BLOCK_M or 1, BLOCK_N]
        s = tl.where(ok, s, _MASKED)
    # Unscaled blocks keep raw scores: qk_scale > 0 (the host makes it so), so the max and
    # argmax of the raw scores are those of the scaled ones.
    blk_max = tl.max(s, 1)  # [BLOCK_M]
    if ARGMAX:  # the first key holding the block's maximum (cheaper than a (value, index) reduction)
        cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
        blk_arg = tl.min(tl.where(s == blk_max[:, None], cols[None, :], BLOCK_N), 1)  # [BLOCK_M] index in the block
    if not SCALED:
        blk_max = blk_max * qk_scale
    if ARGMAX:  # strict: on ties the earlier key keeps the argmax
        arg_i = tl.where(blk_max > m_i, start_n + blk_arg, arg_i)
    m_new = tl.maximum(m_i, blk_max)  # [BLOCK_M] running max, log2 domain
    alpha = tl.math.exp2(m_i - m_new)  # [BLOCK_M] rescale of the old accumulators
    if SCALED:
        x = s - m_new[:, None]  # [BLOCK_M, BLOCK_N]
    else:
        x = s * qk_scale - m_new[:, None]
    p = tl.math.exp2(x)  # [BLOCK_M, BLOCK_N] unnormalised probabilities
    l_blk = tl.sum(p, 1)  # [BLOCK_M]
    if ENTROPY:  # t = sum p * (s - m) <= 0, rescaled like l when the max moves
        t_i = alpha * (t_i + (m_i - m_new) * l_i) + tl.sum(p * x, 1)
    l_i = alpha * l_i + l_blk
    acc = tl.dot(p.to(vb.dtype), vb, acc * alpha[:, None], input_precision=PREC)  # [BLOCK_M, BLOCK_D]
    if DIST:  # sum p * key position = sum p * (block start + offset in block)
        local_pos = tl.arange(0, BLOCK_N).to(tl.float32)  # [BLOCK_N]
        d_i = alpha * d_i + tl.sum(p * local_pos[None, :], 1) + (start_n * 1.0) * l_blk
    return acc, m_new, l_i, t_i, d_i, arg_i


@triton.jit
def _range_mass(
    q,
    k_base,
    stride_kn,
    stride_kd,
    lse2,
    qpos,
    klen,
    lo,
    hi,
    key_lo,
    key_hi,
    offs_d,
    qk_scale,
    attn_window,
    keep,
    cap2,
    slope2,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    KEEP: tl.constexpr,
    ROWS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per row, the exact probability mass on keys with ``key_lo <= key < key_hi`` (per-row
    bounds ``[BLOCK_M]``), scanning key blocks from ``lo`` to ``hi``.

    ``q`` is ``[BLOCK_M, BLOCK_D]``; ``lse2`` (log2-domain log-sum-exp), ``qpos`` and
    ``slope2`` are ``[BLOCK_M]``; returns ``[BLOCK_M]``.
    """
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BLOCK_M]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=(offs_n[None, :] < klen) & (offs_d[:, None] < HEAD_DIM),
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        if DOT_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N] scores, log2 domain
        s = _variant_scores(s, qpos, offs_n, cap2, slope2, SOFTCAP, ALIBI)
        ok = _visible(offs_n, qpos, klen, attn_window, keep, CAUSAL, WINDOW, KEEP, ROWS)
        ok = ok & (offs_n[None, :] >= key_lo[:, None]) & (offs_n[None, :] < key_hi[:, None])  # [BLOCK_M, BLOCK_N]
        mass += tl.sum(tl.math.exp2(tl.where(ok, s - lse2[:, None], -float("inf"))), 1)
    return mass


@triton.jit
def _valid_lengths(KLen, QLen, b, Nq, Nk, HAS_KLEN: tl.constexpr, HAS_QLEN: tl.constexpr):
    """Batch row ``b``'s valid key and query counts (the padding lengths, capped at Nk / Nq)."""
    klen = Nk
    if HAS_KLEN:
        klen = tl.minimum(tl.load(KLen + b).to(tl.int32), Nk)
    qlen = Nq
    if HAS_QLEN:
        qlen = tl.minimum(tl.load(QLen + b).to(tl.int32), Nq)
    return klen, qlen


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    desc_k,
    desc_v,
    Out,
    Stats,
    ArgMax,
    Offsets,
    KLen,
    QLen,
    Sinks,
    Slopes,
    WinHeads,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    Hq,
    Nq,
    Nk,
    GROUP,
    sink_tokens,
    window,
    attn_window,
    keep_first,
    cap2,
    split_len,
    split_base,
    rows_total,
    NQ_BUCKET,
    NK_BUCKET,  # autotuning keys only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    HAS_QLEN: tl.constexpr,
    WINDOW: tl.constexpr,
    KEEP: tl.constexpr,
    HEADS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr,
    ALIBI: tl.constexpr,
    STATS: tl.constexpr,
    ARGMAX: tl.constexpr,
    F_ENT: tl.constexpr,
    F_MAX: tl.constexpr,
    F_LSINK: tl.constexpr,
    F_SINK: tl.constexpr,
    F_LOCAL: tl.constexpr,
    F_DIST: tl.constexpr,
    F_OFF: tl.constexpr,
    N_OFF: tl.constexpr,
    PACK: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    """Output and row statistics of one block of rows (over one split of the keys if SPLIT).

    Rows: ``BLOCK_M`` queries of head ``program_id(1) % Hq`` (PACK=False), or every
    (query head of the group, query) pair of key/value head ``program_id(1) % (Hq / GROUP)``
    (PACK=True). Row statistics go to the float32 buffer ``Stats`` laid out by
    :func:`stat_fields` (``F_*`` are field indices, 0 = not computed). With SPLIT,
    ``program_id(2)`` picks keys ``[s * split_len, (s+1) * split_len)`` and the results are
    partial (see :func:`_merge_splits`): ``Out`` is float32 ``[splits, B, Hq, Nq, D]``, each
    split has its own ``Stats`` and ``ArgMax``, the lse field holds the log2-domain log-sum-exp
    (``_MASKED`` for rows without keys) and the max field the row's largest score (log2
    domain) instead of a probability.

    Variants (:func:`kernels.attention`): WINDOW sees keys ``qpos - key < attn_window`` only
    and skips the key blocks before the window (with SPLIT, splits start at ``split_base``);
    KEEP keeps keys ``< keep_first`` visible as well, scanning their blocks first (with SPLIT,
    split 0 takes those below ``split_base``); HEADS applies the window to the query heads ``h``
    with ``WinHeads[h] != 0`` only, the others seeing every key (per row in packed programs);
    SOFTCAP caps the log2-domain scores to ``cap2 * tanh(s / cap2)``; ALIBI subtracts
    ``Slopes[h] * |qpos - key|``; SINKS folds the logit ``Sinks[h]`` into the softmax of rows
    with keys after the key loop (the merge does it instead with SPLIT), so the loop's running
    max stays the key maximum (``max_prob``, ``argmax``).
    """
    ENTROPY: tl.constexpr = F_ENT > 0
    DIST: tl.constexpr = F_DIST > 0
    pid_h = tl.program_id(1).to(tl.int64)
    if PACK:
        n_kv = Hq // GROUP
        b = pid_h // n_kv
        hk = pid_h % n_kv
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] (query head, query) pairs
        h = hk * GROUP + rows // Nq  # [BLOCK_M] query head of each row
        qi = rows % Nq  # [BLOCK_M] query index
        row_in = rows < GROUP * Nq  # [BLOCK_M]
        q_first = 0
        q_last = Nq - 1
    else:
        b = pid_h // Hq
        h = pid_h % Hq
        hk = h // GROUP
        blk = tl.program_id(0)
        if CAUSAL:  # the longest rows first, so that short programs fill the tail
            blk = tl.num_programs(0) - 1 - blk
        qi = blk * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index
        row_in = qi < Nq  # [BLOCK_M]
        q_first = blk * BLOCK_M
        q_last = q_first + BLOCK_M - 1
    klen, qlen = _valid_lengths(KLen, QLen, b, Nq, Nk, HAS_KLEN, HAS_QLEN)
    q_off = Nk - Nq
    qpos = qi + q_off  # [BLOCK_M] absolute key position of each query
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_ok = offs_d < HEAD_DIM  # [BLOCK_D]
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    q_rows = b * stride_qb + h * stride_qh + qi * stride_qm  # [BLOCK_M]
    q = tl.load(
        Q + q_rows[:, None] + offs_d[None, :] * stride_qd, mask=row_in[:, None] & d_ok[None, :], other=0.0
    )  # [BLOCK_M, BLOCK_D]
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    # Keys [0, lo_masked) are visible to every row of this block (a sliding window aside, see
    # below): no mask needed there.
    if CAUSAL:
        hi = tl.minimum(klen, q_last + q_off + 1)
        lo_masked = tl.minimum(klen, q_first + q_off + 1)
    else:
        hi = klen
        lo_masked = klen
    if HAS_QLEN:  # a block of padded queries does no work
        hi = tl.where(q_first < qlen, hi, 0)
        lo_masked = tl.where(q_first < qlen, lo_masked, 0)
    hi = tl.maximum(hi, 0)
    lo_masked = (tl.maximum(lo_masked, 0) // BLOCK_N) * BLOCK_N
    if SPLIT:  # split_len (and split_base) are multiples of BLOCK_N
        k_lo = tl.program_id(2) * split_len
        if WINDOW:
            k_lo += split_base
        k_hi = tl.minimum(hi, k_lo + split_len)
    else:
        k_lo = 0
        k_hi = hi
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BLOCK_M] ALiBi slope per row, log2 domain
    if ALIBI:
        slope2 = _per_row(Slopes, h, row_in, BLOCK_M) * _LOG2E
    # The window of the rows and the first keys kept besides it: scalars, or [BLOCK_M] with HEADS
    # (rows of heads the window leaves alone get one wider than any row, and keep nothing).
    win = attn_window
    keep = keep_first
    win_big = attn_window  # the widest window of the rows: where their keys start
    win_small = attn_window  # the narrowest: from where every row sees every key
    keep_big = keep_first
    if HEADS:
        win, keep = _row_window(WinHeads, h, row_in, attn_window, keep_first, Nk, BLOCK_M)
        win_big = tl.max(win, 0)
        win_small = tl.min(win, 0)
        keep_big = tl.max(keep, 0)
    own_lo = k_lo  # the first key of this program's share
    if SPLIT and KEEP:  # split 0 also takes the kept keys before split_base
        own_lo = tl.where(tl.program_id(2) == 0, 0, k_lo)

    # Online accumulators, one per row ([BLOCK_M]): running max (log2 domain), sum of p,
    # sum of p * (s - m) (entropy), sum of p * key position (distance), running argmax.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _M_INIT
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    d_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    arg_i = tl.zeros([BLOCK_M], dtype=tl.int32) - 1
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BLOCK_M, BLOCK_D] unnormalised output

    k_start = k_lo
    if WINDOW:  # skip the blocks before the window; mask those it starts inside
        win_lo = (tl.maximum(q_first + q_off - win_big + 1, 0) // BLOCK_N) * BLOCK_N
        win_full = tl.cdiv(tl.maximum(q_last + q_off - win_small + 1, 0), BLOCK_N) * BLOCK_N
        if KEEP:  # the blocks of the kept first keys before the window's blocks, masked; the rest skipped
            keep_end = tl.minimum(tl.cdiv(keep_big, BLOCK_N) * BLOCK_N, win_lo)
            for start_n in range(own_lo, tl.minimum(keep_end, k_hi), BLOCK_N):
                acc, m_i, l_i, t_i, d_i, arg_i = _fwd_block(
                    acc,
                    m_i,
                    l_i,
                    t_i,
                    d_i,
                    arg_i,
                    q,
                    k_base,
                    v_base,
                    stride_kn,
                    stride_kd,
                    stride_vn,
                    stride_vd,
                    start_n,
                    qpos,
                    klen,
                    offs_d,
                    qk_scale,
                    desc_k,
                    desc_v,
                    b.to(tl.int32),
                    hk.to(tl.int32),
                    win,
                    keep,
                    cap2,
                    slope2,
                    HEAD_DIM,
                    BLOCK_N,
                    BLOCK_D,
                    EVEN_D,
                    False,
                    True,
                    CAUSAL,
                    WINDOW,
                    KEEP,
                    HEADS,
                    SOFTCAP,
                    ALIBI,
                    ENTROPY,
                    DIST,
                    ARGMAX,
                    DOT_F32,
                    PREC,
                )
        win_lo = tl.maximum(win_lo, k_lo)
        k_start = tl.minimum(tl.maximum(win_full, win_lo), k_hi)
        for start_n in range(win_lo, k_start, BLOCK_N):
            acc, m_i, l_i, t_i, d_i, arg_i = _fwd_block(
                acc,
                m_i,
                l_i,
                t_i,
                d_i,
                arg_i,
                q,
                k_base,
                v_base,
                stride_kn,
                stride_kd,
                stride_vn,
                stride_vd,
                start_n,
                qpos,
                klen,
                offs_d,
                qk_scale,
                desc_k,
                desc_v,
                b.to(tl.int32),
                hk.to(tl.int32),
                win,
                keep,
                cap2,
                slope2,
                HEAD_DIM,
                BLOCK_N,
                BLOCK_D,
                EVEN_D,
                False,
                True,
                CAUSAL,
                WINDOW,
                KEEP,
                HEADS,
                SOFTCAP,
                ALIBI,
                ENTROPY,
                DIST,
                ARGMAX,
                DOT_F32,
                PREC,
            )
    for start_n in range(k_start, tl.minimum(lo_masked, k_hi), BLOCK_N):
        acc, m_i, l_i, t_i, d_i, arg_i = _fwd_block(
            acc,
            m_i,
            l_i,
            t_i,
            d_i,
            arg_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            start_n,
            qpos,
            klen,
            offs_d,
            qk_scale,
            desc_k,
            desc_v,
            b.to(tl.int32),
            hk.to(tl.int32),
            win,
            keep,
            cap2,
            slope2,
            HEAD_DIM,
            BLOCK_N,
            BLOCK_D,
            EVEN_D,
            TMA,
            False,
            CAUSAL,
            WINDOW,
            KEEP,
            HEADS,
            SOFTCAP,
            ALIBI,
            ENTROPY,
            DIST,
            ARGMAX,
            DOT_F32,
            PREC,
        )
    for start_n in range(tl.maximum(lo_masked, k_start), k_hi, BLOCK_N):
        acc, m_i, l_i, t_i, d_i, arg_i = _fwd_block(
            acc,
            m_i,
            l_i,
            t_i,
            d_i,
            arg_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            start_n,
            qpos,
            klen,
            offs_d,
            qk_scale,
            desc_k,
            desc_v,
            b.to(tl.int32),
            hk.to(tl.int32),
            win,
            keep,
            cap2,
            slope2,
            HEAD_DIM,
            BLOCK_N,
            BLOCK_D,
            EVEN_D,
            False,
            True,
            CAUSAL,
            WINDOW,
            KEEP,
            HEADS,
            SOFTCAP,
            ALIBI,
            ENTROPY,
            DIST,
            ARGMAX,
            DOT_F32,
            PREC,
        )

    row_ok = row_in & (qi < qlen) & (l_i > 0.0)  # [BLOCK_M] rows with at least one key
    l_safe = tl.where(row_ok, l_i, 1.0)  # [BLOCK_M]
    FOLD: tl.constexpr = SINKS and not SPLIT
    if FOLD:  # the learned sink: one more logit, no value; m_i stays the key maximum
        sink2 = _per_row(Sinks, h, row_in, BLOCK_M) * _LOG2E  # [BLOCK_M] log2 domain
        m_all = tl.where(row_ok, tl.maximum(m_i, sink2), m_i)  # [BLOCK_M]
        alpha = tl.math.exp2(m_i - m_all)  # [BLOCK_M] rescale of the key sums
        p_sink = tl.math.exp2(tl.where(row_ok, sink2 - m_all, _MASKED))  # [BLOCK_M] 0 for empty rows
        l_all = alpha * l_safe + p_sink  # [BLOCK_M] the denominator, sink included
        key_share = alpha / l_all  # [BLOCK_M] exp2(m_i - lse2): turns key sums into probabilities
        out = tl.where(row_ok[:, None], acc * key_share[:, None], 0.0)  # [BLOCK_M, BLOCK_D]
    else:
        out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)  # [BLOCK_M, BLOCK_D]
    n_rows = b * 0 + rows_total  # int64: field offsets may pass 2^31
    if SPLIT:  # each split writes its own partial results
        part = tl.program_id(2).to(tl.int64)
        Out += part * n_rows * HEAD_DIM
        Stats += part * n_rows * (F_OFF + N_OFF)
        ArgMax += part * n_rows
    o_rows = b * stride_ob + h * stride_oh + qi * stride_om  # [BLOCK_M]
    tl.store(
        Out + o_rows[:, None] + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_in[:, None] & d_ok[None, :],
    )

    srow = (b * Hq + h) * Nq + qi  # [BLOCK_M] row indices; rows are flat [B, Hq, Nq]
    if FOLD:
        lse2 = m_all + tl.math.log2(l_all)  # [BLOCK_M] log2-domain log-sum-exp, sink included
    else:
        lse2 = m_i + tl.math.log2(l_safe)  # [BLOCK_M] log2-domain log-sum-exp
    if SPLIT:  # the merge needs the log-sum-exp even without statistics
        tl.store(Stats + srow, tl.where(row_ok, lse2, _MASKED), mask=row_in)
    elif STATS:
        tl.store(Stats + srow, tl.where(row_ok, lse2 * _LN2, 0.0), mask=row_in)
    if STATS:
        lse2 = tl.where(row_ok, lse2, -_MASKED)  # empty rows: every exp2(s - lse2) below is 0
        if ENTROPY:
            if FOLD:  # the sink is one more term of t = sum p * (s - m), with m moved to m_all
                t_all = alpha * (t_i + (m_i - m_all) * l_safe) + p_sink * (sink2 - m_all)
                ent = tl.log(l_all) - _LN2 * t_all / l_all  # [BLOCK_M] nats
            else:
                ent = tl.log(l_safe) - _LN2 * t_i / l_safe  # [BLOCK_M] nats
            tl.store(Stats + F_ENT * n_rows + srow, tl.where(row_ok, tl.maximum(ent, 0.0), 0.0), mask=row_in)
        if F_MAX > 0:
            if SPLIT:
                top = tl.where(row_ok, m_i, _MASKED)
            elif FOLD:
                top = tl.where(row_ok, tl.minimum(key_share, 1.0), 0.0)
            else:
                # l >= 1 in exact arithmetic; the GPU's approximate exp2 can leave it a hair below
                top = tl.where(row_ok, tl.minimum(1.0 / l_safe, 1.0), 0.0)
            tl.store(Stats + F_MAX * n_rows + srow, top, mask=row_in)
        if ARGMAX:
            tl.store(ArgMax + srow, tl.where(row_ok, arg_i, -1).to(tl.int64), mask=row_in)
        if DIST:
            if FOLD:  # sum p * (qpos - key) over the keys, whose probabilities sum to less than 1
                dist = (qpos.to(tl.float32) * l_safe - d_i) * key_share
            else:
                dist = qpos.to(tl.float32) - d_i / l_safe
            tl.store(Stats + F_DIST * n_rows + srow, tl.where(row_ok, dist, 0.0), mask=row_in)
        if F_LSINK > 0 and not SPLIT:  # (the merge writes it for splits)
            if SINKS:
                lsink = tl.where(row_ok, tl.minimum(p_sink / l_all, 1.0), 0.0)
            else:
                lsink = tl.zeros([BLOCK_M], dtype=tl.float32)
            tl.store(Stats + F_LSINK * n_rows + srow, lsink, mask=row_in)
        if F_SINK > 0:
            zero = tl.zeros([BLOCK_M], dtype=tl.int32)  # [BLOCK_M]
            sink = _range_mass(
                q,
                k_base,
                stride_kn,
                stride_kd,
                lse2,
                qpos,
                klen,
                own_lo,
                tl.minimum(sink_tokens, k_hi),
                zero,
                zero + sink_tokens,
                offs_d,
                qk_scale,
                win,
                keep,
                cap2,
                slope2,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_N,
                CAUSAL,
                WINDOW,
                KEEP,
                HEADS,
                SOFTCAP,
                ALIBI,
                DOT_F32,
                PREC,
            )  # [BLOCK_M]
            tl.store(Stats + F_SINK * n_rows + srow, tl.where(row_ok, tl.minimum(sink, 1.0), 0.0), mask=row_in)
        if F_LOCAL > 0:
            loc_lo = tl.maximum((tl.maximum(q_first + q_off - window + 1, 0) // BLOCK_N) * BLOCK_N, own_lo)
            loc_hi = tl.maximum(tl.minimum(k_hi, q_last + q_off + 1), 0)
            loc = _range_mass(
                q,
                k_base,
                stride_kn,
                stride_kd,
                lse2,
                qpos,
                klen,
                loc_lo,
                loc_hi,
                qpos - window + 1,
                qpos + 1,
                offs_d,
                qk_scale,
                win,
                keep,
                cap2,
                slope2,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_N,
                CAUSAL,
                WINDOW,
                KEEP,
                HEADS,
                SOFTCAP,
                ALIBI,
                DOT_F32,
                PREC,
            )  # [BLOCK_M]
            tl.store(Stats + F_LOCAL * n_rows + srow, tl.where(row_ok, tl.minimum(loc, 1.0), 0.0), mask=row_in)
        if N_OFF > 0:
            qf = q.to(tl.float32)  # [BLOCK_M, BLOCK_D]
            for j in tl.static_range(N_OFF):
                kp = qpos - tl.load(Offsets + j)  # [BLOCK_M] the one key of each row
                ok = row_ok & (kp >= own_lo) & (kp < k_hi)  # [BLOCK_M]
                if WINDOW:
                    inside = qpos - kp < win  # [BLOCK_M]
                    if KEEP:
                        inside = inside | (kp < keep)
                    ok = ok & inside
                kr = tl.load(
                    k_base + kp[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=ok[:, None] & d_ok[None, :],
                    other=0.0,
                )  # [BLOCK_M, BLOCK_D] a key per row
                sc = tl.sum(qf * kr.to(tl.float32), 1) * qk_scale  # [BLOCK_M] score, log2 domain
                if SOFTCAP:
                    sc = _softcap(sc, cap2)
                if ALIBI:
                    sc = sc - slope2 * tl.abs(qpos - kp).to(tl.float32)
                pm = tl.minimum(tl.math.exp2(tl.where(ok, sc - lse2, -float("inf"))), 1.0)  # [BLOCK_M]
                tl.store(Stats + F_OFF * n_rows + srow * N_OFF + j, pm, mask=row_in)


@triton.jit
def _merge_splits(
    OutP,
    StatsP,
    ArgP,
    Out,
    Stats,
    ArgMax,
    Sinks,
    n_splits,
    rows_total,
    Hq,
    Nq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ARGMAX: tl.constexpr,
    MAXP: tl.constexpr,
    SINKS: tl.constexpr,
    F_ENT: tl.constexpr,
    F_MAX: tl.constexpr,
    F_LSINK: tl.constexpr,
    F_MEAN: tl.constexpr,
    F_DIST: tl.constexpr,
    F_OFF: tl.constexpr,
    N_OFF: tl.constexpr,
):
    """Combine the splits of :func:`_attn_fwd` row by row (rows are flat ``B * Hq * Nq``;
    splits happen only for decoding shapes, so every offset here fits in int32).

    With ``lse`` the log-sum-exp over all keys, split ``s`` holds the weight
    ``w_s = exp(lse_s - lse)`` of the row's probability; the output and every mass and mean
    (fields ``F_MEAN`` up to the offsets, and the offsets) are ``sum_s w_s x_s``, the entropy
    is ``sum_s w_s (H_s - ln w_s)``, and the maximum is the largest split maximum (the
    earliest split on ties, so the earliest key). ``MAXP``: store the max probability.

    SINKS: the learned sink ``Sinks[h]`` of a row with keys is one more part, counted once
    here: log-sum-exp ``sink``, no output, entropy 0, no mass; its weight is the row's
    ``learned_sink_mass`` (field ``F_LSINK``, 0 without SINKS), and ``lse`` includes it.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] flat rows
    r_ok = r < rows_total  # [BLOCK_R]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_ok = offs_d < HEAD_DIM  # [BLOCK_D]
    per_split = rows_total * (F_OFF + N_OFF)
    top = tl.zeros([BLOCK_R], dtype=tl.float32) + _MASKED  # [BLOCK_R] largest split lse, log2 domain
    for s in range(n_splits):
        top = tl.maximum(top, tl.load(StatsP + s * per_split + r, mask=r_ok, other=_MASKED))
    row_ok = r_ok & (top > _M_INIT)
    top = tl.where(row_ok, top, 0.0)
    if SINKS:  # rows without keys stay empty: no sink for them
        sink2 = tl.load(Sinks + (r // Nq) % Hq, mask=r_ok, other=0.0).to(tl.float32) * _LOG2E  # [BLOCK_R]
        top = tl.where(row_ok, tl.maximum(top, sink2), top)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)  # [BLOCK_R]
    for s in range(n_splits):
        total += tl.math.exp2(tl.load(StatsP + s * per_split + r, mask=r_ok, other=_MASKED) - top)
    if SINKS:
        total += tl.where(row_ok, tl.math.exp2(sink2 - top), 0.0)
    total = tl.where(row_ok, total, 1.0)
    lse2 = top + tl.math.log2(total)  # [BLOCK_R] log-sum-exp over all keys (and the sink), log2 domain

    out = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # [BLOCK_R, BLOCK_D]
    ent = tl.zeros([BLOCK_R], dtype=tl.float32)  # [BLOCK_R]
    best = tl.zeros([BLOCK_R], dtype=tl.float32) + _MASKED  # [BLOCK_R] largest score so far
    arg = tl.zeros([BLOCK_R], dtype=tl.int64) - 1  # [BLOCK_R] its key
    for s in range(n_splits):
        log_w = tl.load(StatsP + s * per_split + r, mask=r_ok, other=_MASKED) - lse2  # [BLOCK_R] log2 of the weight
        w = tl.math.exp2(log_w)  # [BLOCK_R]
        o = tl.load(
            OutP + (s * rows_total + r)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=r_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_D] split output
        out += w[:, None] * o
        if F_ENT > 0:
            ent += w * (tl.load(StatsP + s * per_split + F_ENT * rows_total + r, mask=r_ok, other=0.0) - _LN2 * log_w)
        if F_MAX > 0:
            m_s = tl.load(StatsP + s * per_split + F_MAX * rows_total + r, mask=r_ok, other=_MASKED)  # [BLOCK_R]
            if ARGMAX:
                arg = tl.where(m_s > best, tl.load(ArgP + s * rows_total + r, mask=r_ok, other=-1), arg)
            best = tl.maximum(best, m_s)
    tl.store(
        Out + r[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :]
    )
    tl.store(Stats + r, tl.where(row_ok, lse2 * _LN2, 0.0), mask=r_ok)
    if SINKS:
        w_sink = tl.where(row_ok, tl.math.exp2(sink2 - lse2), 0.0)  # [BLOCK_R] learned_sink_mass
        ent -= w_sink * _LN2 * tl.where(row_ok, sink2 - lse2, 0.0)
    else:
        w_sink = tl.zeros([BLOCK_R], dtype=tl.float32)
    if F_LSINK > 0:
        tl.store(Stats + F_LSINK * rows_total + r, tl.minimum(w_sink, 1.0), mask=r_ok)
    if F_ENT > 0:
        tl.store(Stats + F_ENT * rows_total + r, tl.where(row_ok, tl.maximum(ent, 0.0), 0.0), mask=r_ok)
    if MAXP:
        top = tl.where(row_ok, tl.minimum(tl.math.exp2(best - lse2), 1.0), 0.0)
        tl.store(Stats + F_MAX * rows_total + r, top, mask=r_ok)
    if ARGMAX:
        tl.store(ArgMax + r, tl.where(row_ok, arg, -1), mask=r_ok)
    # Weighted means: sink and local mass, distance (fields F_MEAN..F_OFF-1), then the offsets.
    # (With SINKS, the weights of the key splits sum to 1 - learned_sink_mass, as they should.)
    for f in tl.static_range(F_MEAN, F_OFF + N_OFF):
        if f < F_OFF:
            at = f * rows_total + r
        else:
            at = F_OFF * rows_total + r * N_OFF + (f - F_OFF)
        mean = tl.zeros([BLOCK_R], dtype=tl.float32)  # [BLOCK_R]
        for s in range(n_splits):
            w = tl.math.exp2(tl.load(StatsP + s * per_split + r, mask=r_ok, other=_MASKED) - lse2)
            mean += w * tl.load(StatsP + s * per_split + at, mask=r_ok, other=0.0)
        if f != F_DIST:  # a mass
            mean = tl.minimum(mean, 1.0)
        tl.store(Stats + at, tl.where(row_ok, mean, 0.0), mask=r_ok)


@triton.jit
def _head_and_lengths(KLen, QLen, Hq, Nq, Nk, GROUP, HAS_KLEN: tl.constexpr, HAS_QLEN: tl.constexpr):
    """This program's (batch, query head, kv head) from grid axis 1, and its valid key / query
    counts. Indices are int64 so that base offsets may pass 2^31 elements."""
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    klen, qlen = _valid_lengths(KLen, QLen, b, Nq, Nk, HAS_KLEN, HAS_QLEN)
    return pid_bh, b, h, h // GROUP, klen, qlen


@triton.jit
def _key_mass(
    Q,
    K,
    Lse,
    KeyMass,
    KLen,
    QLen,
    Slopes,
    WinHeads,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    Hq,
    Nq,
    Nk,
    GROUP,
    attn_window,
    keep_first,
    cap2,
    km_rows,
    NQ_BUCKET,
    NK_BUCKET,  # autotuning keys only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    HAS_QLEN: tl.constexpr,
    WINDOW: tl.constexpr,
    KEEP: tl.constexpr,
    HEADS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
    KM_STRIDE: tl.constexpr,
):
    """Attention each key of one block receives, summed over the query rows that see it:
    ``exp(s - lse)`` with the scores of :func:`_attn_fwd` (variants included) and its ``Lse``
    (which includes any learned sink). Only the last ``km_rows`` valid rows count (``Nq`` or
    more: every row), and of those, with ``KM_STRIDE > 1``, the last and every ``KM_STRIDE``-th
    before it (gathered, so the loop does ``1 / KM_STRIDE`` of the work); the loop starts at
    the first counted row's block. Query blocks that cannot see the keys are skipped: past the
    window of the block's last key, unless the block holds kept first keys (KEEP); with HEADS,
    a head the window leaves alone (``WinHeads[h] == 0``) has no window."""
    pid_bh, b, h, hk, klen, qlen = _head_and_lengths(KLen, QLen, Hq, Nq, Nk, GROUP, HAS_KLEN, HAS_QLEN)
    q_off = Nk - Nq
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] this program's keys
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_ok = offs_d < HEAD_DIM  # [BLOCK_D]

    k_ok = offs_n < klen  # [BLOCK_N]
    kb = tl.load(
        K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=k_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    kt = tl.trans(kb)  # [BLOCK_D, BLOCK_N]
    if DOT_F32:
        kt = kt.to(tl.float32)
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)  # [BLOCK_N] mass received by each key
    first_m = tl.maximum(qlen - km_rows, 0)  # the first row the window of the last rows counts
    lo_row = first_m
    if CAUSAL:
        lo_row = tl.maximum(lo_row, n0 - q_off)
    end_m = qlen * (n0 < klen).to(tl.int32)  # a block of padding keys receives nothing
    win = attn_window
    keep = keep_first
    if HEADS:  # this program's head: windowed, or every key visible (a window wider than any row)
        on = tl.load(WinHeads + h) != 0
        win = tl.where(on, attn_window, Nk + 1)
        keep = tl.where(on, keep_first, 0)
    if WINDOW:  # rows past the window of the block's last key see none of it (unless kept)
        win_end = tl.maximum(n0 + BLOCK_N - 1 + win - q_off, 0)
        if KEEP:
            win_end = tl.where(n0 < keep, end_m, win_end)
        end_m = tl.minimum(end_m, win_end)
    # The loop walks counted rows [lo_row, end_m): every row, or (KM_STRIDE > 1) the last valid row
    # and every KM_STRIDE-th one before it, row base + KM_STRIDE * r at loop index r.
    if KM_STRIDE == 1:
        start_m = (lo_row // BLOCK_M) * BLOCK_M
    else:
        base = qlen - 1 - KM_STRIDE * (tl.maximum(qlen - 1 - first_m, 0) // KM_STRIDE)  # the first counted row
        start_m = (tl.cdiv(tl.maximum(lo_row - base, 0), KM_STRIDE) // BLOCK_M) * BLOCK_M
        end_m = tl.cdiv(tl.maximum(end_m - base, 0), KM_STRIDE)
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BLOCK_M] ALiBi slope, log2 domain
    if ALIBI:
        slope2 = _per_row(Slopes, h, tl.full([BLOCK_M], 1, tl.int1), BLOCK_M) * _LOG2E
    q_base = Q + b * stride_qb + h * stride_qh
    for m0 in range(start_m, end_m, BLOCK_M):
        if KM_STRIDE == 1:
            offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows
        else:
            offs_m = base + KM_STRIDE * (m0 + tl.arange(0, BLOCK_M))  # [BLOCK_M] every KM_STRIDE-th row
        m_ok = (offs_m < qlen) & (offs_m >= first_m)  # [BLOCK_M]
        q = tl.load(
            q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        if DOT_F32:
            q = q.to(tl.float32)
        lse2 = tl.load(Lse + pid_bh * Nq + offs_m, mask=m_ok, other=0.0) * _LOG2E  # [BLOCK_M] log2 domain
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N] scores, log2 domain
        qpos = offs_m + q_off  # [BLOCK_M]
        s = _variant_scores(s, qpos, offs_n, cap2, slope2, SOFTCAP, ALIBI)
        ok = m_ok[:, None] & _visible(offs_n, qpos, klen, win, keep, CAUSAL, WINDOW, KEEP, False)  # [BLOCK_M, BLOCK_N]
        mass += tl.sum(tl.math.exp2(tl.where(ok, s - lse2[:, None], -float("inf"))), 0)
    tl.store(KeyMass + pid_bh * Nk + offs_n, mass, mask=offs_n < Nk)


@functools.lru_cache(maxsize=64)
def _offsets_tensor(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Offsets as an int32 device tensor, cached: making it is a blocking host-to-device copy,
    which on every call would stall the host until the GPU has drained its queue (and cannot
    run inside CUDA-graph capture). The kernels only read it."""
    return torch.tensor(offsets, device=device, dtype=torch.int32)


def _pow2_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _set_descriptor_blocks(nargs: dict) -> None:
    """Autotuning pre-hook: the K/V tensor descriptors load blocks of the config's size."""
    for name in ("desc_k", "desc_v"):
        if nargs.get(name) is not None:
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]


def _configs(shapes) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_descriptor_blocks)
        for m, n, w, s in shapes
    ]


def _fwd_configs(block_d: int) -> list[triton.Config]:
    if block_d <= 64:  # 64 x 128 blocks with 4 warps lead at D = 64 (H100, N = 16K: see docs/benchmarks.md)
        shapes = [(64, 128, 4, 3), (64, 128, 4, 2), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)]
    elif block_d <= 128:
        shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 4)]
    else:
        shapes = [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 3)]
    return _configs(shapes)


def _packed_configs(block_d: int, block_m: int) -> list[triton.Config]:
    """Decoding shapes: the rows are fixed (one group's queries); tune the key blocks."""
    if block_d <= 128:
        shapes = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (64, 8, 3), (128, 4, 3)]
    else:
        shapes = [(32, 4, 2), (64, 4, 2), (64, 8, 2)]
    return _configs([(block_m, n, w, s) for n, w, s in shapes])


def _key_mass_configs(block_d: int) -> list[triton.Config]:
    if block_d <= 128:
        shapes = [(64, 128, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)]
    else:
        shapes = [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)]
    return _configs(shapes)


_FWD_KEY = [
    "NQ_BUCKET",
    "NK_BUCKET",
    "HEAD_DIM",
    "CAUSAL",
    "HAS_KLEN",
    "HAS_QLEN",
    "WINDOW",
    "KEEP",
    "HEADS",
    "SOFTCAP",
    "SINKS",
    "ALIBI",
    "STATS",
    "ARGMAX",
    "F_ENT",
    "F_MAX",
    "F_LSINK",
    "F_SINK",
    "F_LOCAL",
    "F_DIST",
    "F_OFF",
    "N_OFF",
    "PACK",
    "SPLIT",
    "TMA",
]
_KM_KEY = [
    "NQ_BUCKET",
    "NK_BUCKET",
    "HEAD_DIM",
    "CAUSAL",
    "HAS_KLEN",
    "HAS_QLEN",
    "WINDOW",
    "KEEP",
    "HEADS",
    "SOFTCAP",
    "ALIBI",
]


@functools.cache
def _tuned(kernel_name: str, block_d: int, block_m: int = 0):
    """The autotuned launcher for one kernel and padded head dim (compiled lazily)."""
    if kernel_name == "fwd":
        return triton.autotune(_fwd_configs(block_d), key=_FWD_KEY)(_attn_fwd)
    if kernel_name == "packed":
        return triton.autotune(_packed_configs(block_d, block_m), key=_FWD_KEY)(_attn_fwd)
    return triton.autotune(_key_mass_configs(block_d), key=_KM_KEY)(_key_mass)


#: The best config of each tuned launch, once known: later calls launch with it directly,
#: which skips ~0.1 ms of the autotuner's own host-side bookkeeping per call.
_best_configs: dict[tuple, dict] = {}


def _launch(
    kernel_name: str,
    block_d: int,
    block_m: int,
    grid,
    args: dict,
    flags: dict,
    element_size: int,
    pinned: dict[str, int] | None,
    descriptors: tuple = (),
) -> None:
    """Launch a kernel with the ``pinned`` blocks (:func:`_pinned_blocks`), or autotuned.

    ``args`` (runtime values, including the autotuning buckets ``NQ_BUCKET`` and
    ``NK_BUCKET``) and ``flags`` (constexprs) are keyword arguments named as the kernel's
    parameters, without the tuned ones (``BLOCK_M``, ``BLOCK_N``, ``num_warps``,
    ``num_stages``: the config or the pinned blocks give those). ``grid`` maps the launch's
    meta-parameters to the grid; ``block_m`` is the packed rows (0 otherwise);
    ``descriptors`` are the TMA descriptors, whose block shape follows BLOCK_N.
    """
    kernel = _key_mass if kernel_name == "key_mass" else _attn_fwd
    if pinned is not None:
        meta = dict(pinned, num_warps=4, num_stages=_pinned_stages(pinned["BLOCK_N"], block_d, element_size))
        if block_m:
            meta["BLOCK_M"] = block_m
    else:
        key = (kernel_name, block_d, block_m, element_size, args["NQ_BUCKET"], args["NK_BUCKET"], *flags.values())
        meta = _best_configs.get(key)
        if meta is None:
            tuner = _tuned(kernel_name, block_d, block_m)
            tuner[grid](**args, **flags)
            _best_configs[key] = tuner.best_config.all_kwargs()
            return
    for desc in descriptors:
        if desc is not None:
            desc.block_shape = [1, 1, meta["BLOCK_N"], block_d]
    kernel[grid(meta)](**args, **flags, **meta)


# Fixed small blocks under the interpreter: autotuning there would only cost time.
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _pinned_stages(block_n: int, block_d: int, element_size: int) -> int:
    """Pipeline stages for pinned blocks: as many (up to 3) as K/V buffers fit in shared memory."""
    per_stage = 2 * block_n * block_d * element_size
    return max(1, min(3, (160 * 1024) // per_stage))


def _pinned_blocks() -> dict[str, int] | None:
    """Blocks fixed by ``KERNELS_BLOCKS=MxN`` (skips autotuning, e.g. for test suites on GPU)."""
    if interpreting():
        return _INTERPRET_BLOCKS
    env = os.environ.get("KERNELS_BLOCKS")
    if not env:
        return None
    m, n = (int(x) for x in env.lower().split("x"))
    return {"BLOCK_M": m, "BLOCK_N": n}


#: The float32 row statistics of one value per row, in the order of their fields.
_SINGLE_FIELDS = ("lse", "entropy", "max_prob", "learned_sink_mass", "sink_mass", "local_mass", "distance")


def stat_fields(stats: StatsSpec | None, split: bool) -> dict[str, int]:
    """Layout of the float32 row statistics in the kernels' one buffer: ``{name: field}``.

    Field ``f`` holds rows ``[f * R, (f + 1) * R)`` (``R = B * Hq * Nq``, rows flat): ``lse``
    is field 0, then the fields the split merge treats specially (``entropy``, ``max_prob``,
    which also serves argmax, ``learned_sink_mass``), then the weighted means (``sink_mass``, ``local_mass``,
    ``distance``); ``offset_mass`` is where the ``[R, len(offsets)]`` block starts, which is
    also the number of single fields. One buffer means one allocation per call.
    """
    filled = set(stats.output_fields()) if stats is not None else set()
    if split:  # the merge needs the log-sum-exp even without statistics
        filled.add("lse")
    if "argmax" in filled:  # the split merge finds the argmax by the largest split maximum
        filled.add("max_prob")
    return {name: i for i, name in enumerate([*(f for f in _SINGLE_FIELDS if f in filled), "offset_mass"])}


def packed_rows(p: Problem) -> int:
    """Rows of one program in the packed (decoding) layout, or 0 when the problem is not a
    decoding shape: few queries, so the query heads of a group share one program."""
    rows = p.group * p.n_q
    return rows if p.n_q <= DECODE_MAX_Q and rows <= PACK_MAX_ROWS else 0


#: Splits of the keys start at multiples of this (of every BLOCK_N) on GPUs.
_SPLIT_ALIGN = 256


def key_splits(programs: int, n_k: int, device: torch.device, limit: int = MAX_SPLITS) -> tuple[int, int]:
    """``(splits, keys per split)``: enough splits of the keys that ``programs`` programs per
    split fill the GPU (two per SM), each split at least a few key blocks long."""
    if interpreting():  # tiny, so that the tests' small shapes exercise the merge
        target, min_keys, align = 8, 16, _INTERPRET_BLOCKS["BLOCK_N"]
    else:
        target, min_keys, align = 2 * _sm_count(device), 512, _SPLIT_ALIGN
    splits = min(triton.cdiv(target, programs), n_k // min_keys, limit)
    if splits <= 1:
        return 1, n_k
    per_split = triton.cdiv(triton.cdiv(n_k, splits), align) * align
    return triton.cdiv(n_k, per_split), per_split


def window_start(p: Problem, device: torch.device) -> int:
    """The first key that a sliding window (``p.window``) lets any query see, rounded down to
    the split alignment of :func:`key_splits` (0 without a window): split decoding skips the
    keys before it, but for the kept first keys (``p.keep_first``), which split 0 takes."""
    if not p.window:
        return 0
    align = _INTERPRET_BLOCKS["BLOCK_N"] if interpreting() else _SPLIT_ALIGN
    return max(0, p.n_k - p.n_q - p.window + 1) // align * align


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


#: Load the unmasked K/V blocks through TMA tensor descriptors where the GPU has them
#: (compute capability 9.0 and up; the interpreter too, so CPU tests cover that path).
USE_TMA = True


@functools.cache
def _has_tma(device: torch.device) -> bool:
    return interpreting() or torch.cuda.get_device_capability(device)[0] >= 9


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, block_d: int) -> tuple:
    """Tensor descriptors of K and V (``[B, Hkv, Nk, D]``, one ``[BLOCK_N, BLOCK_D]`` block
    per load), or ``(None, None)`` where TMA cannot be used: it needs a contiguous head dim
    and 16-byte aligned addresses and strides."""
    if not USE_TMA or not _has_tma(k.device):
        return None, None
    size = k.element_size()
    for t in (k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, block_d]) for t in (k, v))


def _strides(names: tuple[str, str, str, str], t: torch.Tensor) -> dict[str, int]:
    """The strides of a ``[B, H, N, D]`` tensor as keyword arguments of a kernel, named ``names``."""
    return dict(zip(names, t.stride()))


def _common_flags(q: torch.Tensor, p: Problem, key_lengths, query_lengths) -> dict:
    """The compile-time flags the forward and key-mass kernels share.

    Triton's interpreter mis-evaluates bfloat16 dot products, and its float32 -> bfloat16
    conversion truncates (GPUs round to nearest): it computes in float32 there (DOT_F32), and
    the forward writes its output as float32 for PyTorch to round. float32 inputs get exact
    float32 products (PREC; Triton would otherwise use TF32 on GPUs).
    """
    dot_f32 = interpreting() and q.dtype == torch.bfloat16
    return dict(
        HEAD_DIM=p.head_dim,
        BLOCK_D=max(MIN_HEAD_DIM, triton.next_power_of_2(p.head_dim)),
        CAUSAL=p.causal,
        HAS_KLEN=key_lengths is not None,
        HAS_QLEN=query_lengths is not None,
        DOT_F32=dot_f32,
        PREC="ieee" if (q.dtype == torch.float32 or dot_f32) else "tf32",
    )


def row_stats_views(row_stats: torch.Tensor, fields: dict[str, int], stats: StatsSpec, shape) -> dict:
    """The requested float32 row statistics as views of the kernels' one buffer (laid out by
    :func:`stat_fields`): ``{name: [B, Hq, Nq]}``, and ``offset_mass [B, Hq, Nq, len(offsets)]``.
    ``shape`` is ``(B, Hq, Nq)``."""
    n_rows, n_off = math.prod(shape), len(stats.offsets)
    wanted = stats.output_fields()  # not max_prob when its field served argmax only
    single = row_stats[: fields["offset_mass"] * n_rows].view(-1, *shape)
    found = {name: single[i] for name, i in fields.items() if name in wanted and name != "offset_mass"}
    if n_off:
        found["offset_mass"] = row_stats[fields["offset_mass"] * n_rows :].view(*shape, n_off)
    return found


def _variants(p: Problem, alibi_slopes, window_heads) -> tuple[dict, dict]:
    """The attention variants as the kernels' runtime arguments and compile-time flags."""
    # (keep_first past the keys changes nothing; capped, it stays an int32)
    args = dict(attn_window=p.window, keep_first=min(p.keep_first, p.n_k), cap2=(p.softcap or 1.0) * LOG2E)
    flags = dict(
        WINDOW=p.window > 0,
        KEEP=p.keep_first > 0,
        HEADS=window_heads is not None,
        SOFTCAP=p.softcap > 0,
        ALIBI=alibi_slopes is not None,
    )
    return args, flags


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: Problem,
    stats: StatsSpec | None,
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
    max_splits: int = MAX_SPLITS,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window_heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionStats | None]:
    """Run the Triton kernels (autotuned, or with the blocks of :func:`_pinned_blocks`).

    ``max_splits=1`` turns off key splitting for decoding shapes (for benchmarks). The
    variants are ``p.window``, ``p.keep_first``, ``p.softcap``, ``sinks``, ``alibi_slopes``
    (``[Hq]`` floats) and ``window_heads`` (``[Hq]`` booleans), as in :func:`kernels.attention`.
    """
    b, hq, nq, nk, d = p.batch, p.q_heads, p.n_q, p.n_k, p.head_dim
    dev = q.device
    scale = p.scale
    if scale < 0:  # the kernel needs a positive scale; negating q is exact
        q, scale = -q, -scale

    common_flags = _common_flags(q, p, key_lengths, query_lengths)
    block_d, dot_f32 = common_flags["BLOCK_D"], common_flags["DOT_F32"]
    want = stats is not None
    n_off = len(stats.offsets) if want else 0

    rows = packed_rows(p)
    splits, split_len, split_base = 1, nk, 0
    if rows:
        # Splits cover the window's keys only (split 0 takes the kept first keys too), unless some
        # heads have no window: which ones, the host does not read (that would synchronise).
        split_base = window_start(p, dev) if window_heads is None else 0
        splits, split_len = key_splits(b * p.kv_heads, nk - split_base, dev, max_splits)
    split = splits > 1
    n_rows = b * hq * nq
    fields = stat_fields(stats, split)
    per_row = fields["offset_mass"] + n_off  # float32 statistics per row

    out_dtype = torch.float32 if dot_f32 else q.dtype
    # the split merge writes its output head-major
    out = torch.empty((b, hq, nq, d), device=dev, dtype=out_dtype) if split else empty_output(q, out_dtype)
    row_stats = torch.empty(per_row * n_rows, device=dev, dtype=torch.float32) if per_row else out
    argmax = torch.empty((b, hq, nq), device=dev, dtype=torch.int64) if want and stats.argmax else out
    if split:  # per-split partial results, merged below
        part = torch.empty(splits * n_rows * (d + per_row), device=dev, dtype=torch.float32)
        out_part, stats_part = part[: splits * n_rows * d].view(splits, b, hq, nq, d), part[splits * n_rows * d :]
        arg_part = torch.empty((splits, n_rows), device=dev, dtype=torch.int64) if want and stats.argmax else out
    else:
        out_part, stats_part, arg_part = out, row_stats, argmax
    offsets = _offsets_tensor(stats.offsets, dev) if n_off else out
    klen = key_lengths if key_lengths is not None else out  # unused pointers get any tensor
    qlen = query_lengths if query_lengths is not None else out
    sinks_f = sinks.float().contiguous() if sinks is not None else out
    slopes_f = alibi_slopes.float().contiguous() if alibi_slopes is not None else out
    heads_i8 = window_heads.to(torch.int8) if window_heads is not None else out
    variant_args, variant_flags = _variants(p, alibi_slopes, window_heads)
    qk_scale = scale * LOG2E
    buckets = dict(NQ_BUCKET=_pow2_bucket(nq), NK_BUCKET=_pow2_bucket(nk))
    q_strides = _strides(("stride_qb", "stride_qh", "stride_qm", "stride_qd"), q)
    k_strides = _strides(("stride_kb", "stride_kh", "stride_kn", "stride_kd"), k)
    out_view = out_part[0] if split else out

    # Decoding is bound by reading K/V once, not by load instructions: TMA's per-call
    # descriptor set-up would only add host time there.
    pinned = _pinned_blocks()
    desc_k, desc_v = (None, None) if rows else _kv_descriptors(k, v, (pinned or {}).get("BLOCK_N", 64), block_d)
    fwd_args = dict(
        Q=q,
        K=k,
        V=v,
        desc_k=desc_k,
        desc_v=desc_v,
        Out=out_part,
        Stats=stats_part,
        ArgMax=arg_part,
        Offsets=offsets,
        KLen=klen,
        QLen=qlen,
        Sinks=sinks_f,
        Slopes=slopes_f,
        WinHeads=heads_i8,
        qk_scale=qk_scale,
        **q_strides,
        **k_strides,
        **_strides(("stride_vb", "stride_vh", "stride_vn", "stride_vd"), v),
        **_strides(("stride_ob", "stride_oh", "stride_om", "stride_od"), out_view),
        Hq=hq,
        Nq=nq,
        Nk=nk,
        GROUP=p.group,
        sink_tokens=stats.sink_tokens if want else 0,
        window=stats.window if want else 0,
        **variant_args,
        split_len=split_len,
        split_base=split_base,
        rows_total=n_rows,
        **buckets,
    )
    field_flags = dict(
        F_ENT=fields.get("entropy", 0),
        F_MAX=fields.get("max_prob", 0),
        F_LSINK=fields.get("learned_sink_mass", 0),
        F_SINK=fields.get("sink_mass", 0),
        F_LOCAL=fields.get("local_mass", 0),
        F_DIST=fields.get("distance", 0),
        F_OFF=fields["offset_mass"],
        N_OFF=n_off,
    )
    fwd_flags = dict(
        common_flags,
        **variant_flags,
        SINKS=sinks is not None,
        STATS=want,
        ARGMAX=want and stats.argmax,
        **field_flags,
        PACK=bool(rows),
        SPLIT=split,
        TMA=desc_k is not None,
    )
    if rows:
        block_m = max(16, triton.next_power_of_2(rows))
        _launch(
            "packed",
            block_d,
            block_m,
            lambda meta: (1, b * p.kv_heads, splits),
            fwd_args,
            fwd_flags,
            q.element_size(),
            pinned,
        )
    else:
        _launch(
            "fwd",
            block_d,
            0,
            lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * hq, 1),
            fwd_args,
            fwd_flags,
            q.element_size(),
            pinned,
            (desc_k, desc_v),
        )
    if split:
        block_r = 16
        _merge_splits[(triton.cdiv(n_rows, block_r),)](
            OutP=out_part,
            StatsP=stats_part,
            ArgP=arg_part,
            Out=out,
            Stats=row_stats,
            ArgMax=argmax,
            Sinks=sinks_f,
            n_splits=splits,
            rows_total=n_rows,
            Hq=hq,
            Nq=nq,
            HEAD_DIM=d,
            BLOCK_D=block_d,
            BLOCK_R=block_r,
            ARGMAX=want and stats.argmax,
            MAXP=want and stats.max_prob,
            SINKS=sinks is not None,
            F_ENT=field_flags["F_ENT"],
            F_MAX=field_flags["F_MAX"],
            F_LSINK=field_flags["F_LSINK"],
            F_MEAN=1 + ("entropy" in fields) + ("max_prob" in fields) + ("learned_sink_mass" in fields),
            F_DIST=field_flags["F_DIST"],
            F_OFF=fields["offset_mass"],
            N_OFF=n_off,
            num_warps=4,
        )
    if dot_f32:
        out = out.to(q.dtype)
    if not want:
        return out, None

    found = row_stats_views(row_stats, fields, stats, (b, hq, nq))
    key_mass = None
    if stats.key_mass:
        key_mass = key_mass_pass(
            q, k, p, stats, found["lse"], key_lengths, query_lengths, alibi_slopes, window_heads, scale=scale
        )
    return out, AttentionStats(**found, argmax=argmax if stats.argmax else None, key_mass=key_mass)


def key_mass_pass(
    q: torch.Tensor,
    k: torch.Tensor,
    p: Problem,
    stats: StatsSpec,
    lse: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window_heads: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The key-mass pass: attention each key receives, ``[B, Hq, Nk]`` float32, given the
    forward's final row log-sum-exp ``lse [B, Hq, Nq]``. ``scale`` (default ``p.scale``) must
    be positive: a caller with a negative scale passes ``-q`` and ``-scale``."""
    b, hq, nq, nk = p.batch, p.q_heads, p.n_q, p.n_k
    scale = p.scale if scale is None else scale
    variant_args, variant_flags = _variants(p, alibi_slopes, window_heads)
    key_mass = torch.empty((b, hq, nk), device=q.device, dtype=torch.float32)
    unused = key_mass  # unused pointers get any tensor
    km_args = dict(
        Q=q,
        K=k,
        Lse=lse,
        KeyMass=key_mass,
        KLen=key_lengths if key_lengths is not None else unused,
        QLen=query_lengths if query_lengths is not None else unused,
        Slopes=alibi_slopes.float().contiguous() if alibi_slopes is not None else unused,
        WinHeads=window_heads.to(torch.int8) if window_heads is not None else unused,
        qk_scale=scale * LOG2E,
        **_strides(("stride_qb", "stride_qh", "stride_qm", "stride_qd"), q),
        **_strides(("stride_kb", "stride_kh", "stride_kn", "stride_kd"), k),
        Hq=hq,
        Nq=nq,
        Nk=nk,
        GROUP=p.group,
        **variant_args,
        km_rows=stats.key_mass_queries or nq,
        NQ_BUCKET=_pow2_bucket(nq),
        NK_BUCKET=_pow2_bucket(nk),
    )
    flags = dict(_common_flags(q, p, key_lengths, query_lengths), **variant_flags, KM_STRIDE=stats.key_mass_stride)
    _launch(
        "key_mass",
        flags["BLOCK_D"],
        0,
        lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]), b * hq),
        km_args,
        flags,
        q.element_size(),
        _pinned_blocks(),
    )
    return key_mass
