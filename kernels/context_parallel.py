"""Context parallelism: one long sequence's attention spread over the ranks of a process group.

The sequence ``[0, n)`` is cut into ``2W`` chunks for ``W`` ranks; rank ``r`` holds chunks ``r``
and ``2W - 1 - r`` (an early and a late chunk, so every rank has about the same causal work).
Each rank all-gathers K and V, then computes its queries against the keys they see with
:func:`kernels.attention`; bottom-right alignment puts each query at its global position, so
the row statistics are exact without any merge (DESIGN.md, Scale-out).

Decoding after such a prefill keeps the KV cache split: :func:`context_parallel_decode` has
every rank attend the new row to the keys it holds and merges the parts exactly
(:func:`kernels.merge.merge_attention`), so no rank ever holds the whole cache.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from kernels.dispatch import attention
from kernels.errors import AttentionInputError
from kernels.merge import attend_part, merge_attention, part_spec
from kernels.spec import AttentionStats, StatsSpec


def shard_ranges(n: int, world: int, rank: int) -> tuple[range, range]:
    """The two chunks of positions ``[0, n)`` that ``rank`` of ``world`` holds: chunks ``rank``
    and ``2 * world - 1 - rank`` of ``2 * world`` near-equal chunks, in position order.

    Chunks have ``n // (2W)`` positions; the ``n % (2W)`` left over go one per rank, ranks
    ``0, 1, ...`` first to their early chunk, then (when more than ``W`` are left) to their late
    chunk. Ranks then hold the same number of positions within one, and the same number of
    causal query-key pairs within ``n`` (one query row's worth).
    """
    for name, value in (("n", n), ("world", world), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise AttentionInputError(f"{name} must be an int, got {value!r}")
    if world < 1 or not 0 <= rank < world:
        raise AttentionInputError(f"need world >= 1 and 0 <= rank < world, got world={world}, rank={rank}")
    chunks = 2 * world
    if n < chunks:
        raise AttentionInputError(
            f"a sequence of {n} positions cannot be split into 2 x {world} ranks = {chunks} chunks: "
            f"use at most {n // 2} ranks for it, or a sequence of at least {chunks} positions"
        )
    base, extra = divmod(n, chunks)
    sizes = [base] * chunks
    for i in range(extra):  # ranks 0..W-1 early chunks (chunk i), then late chunks (2W-1-i)
        sizes[i if i < world else 3 * world - 1 - i] += 1
    starts = [sum(sizes[:i]) for i in range(chunks + 1)]
    early, late = rank, chunks - 1 - rank
    return range(starts[early], starts[early + 1]), range(starts[late], starts[late + 1])


def shard_indices(n: int, world: int, rank: int) -> torch.Tensor:
    """Global positions (int64, ascending) of the shard that ``rank`` holds: :func:`shard_ranges`."""
    early, late = shard_ranges(n, world, rank)
    return torch.tensor([*early, *late], dtype=torch.int64)


def context_parallel_attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    n_total: int,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    scale: float | None = None,
    stats: StatsSpec | None = None,
    backend: str = "auto",
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionStats | None]:
    """:func:`kernels.attention` over a sequence of ``n_total`` positions sharded over ``group``.

    Every rank of ``group`` calls it (a collective) with its shard, the positions of
    :func:`shard_indices` ``(n_total, W, rank)`` (two chunks, concatenated in position order).

    Args:
        q_local: this rank's queries ``[B, Hq, n_local, D]``.
        k_local, v_local: this rank's keys and values ``[B, Hkv, n_local, D]`` (``Hq % Hkv == 0``).
        n_total: positions in the whole sequence (at least ``2W``).
        group: the process group (``None``: the default group); ranks are group ranks.
        causal, scale, stats, backend: as in :func:`kernels.attention`; positions (causal mask,
            window, distance, offsets, sinks) are global.
        key_lengths, query_lengths, mask: padding is not supported yet; must be ``None``.

    Returns:
        ``(out_local, stats_local)`` for this rank's queries: ``out [B, Hq, n_local, D]``, row
        statistics ``[B, Hq, n_local]``, exactly as the single call over the whole sequence gives
        them at these positions. ``key_mass`` (if asked) is summed over every rank's queries
        (``all_reduce``) and returned for this rank's own keys, ``[B, Hq, n_local]``.

    Memory: K and V of the whole sequence (one layer), ``2 x B x Hkv x n_total x D`` elements,
    twice that while they are gathered and put in position order, plus the per-call buffers.
    Non-causal calls pad each query chunk with empty rows up to the last position (the Triton
    kernels skip them), so that positional statistics see global positions: a query buffer of
    up to ``B x Hq x n_total x D`` elements.
    """
    if key_lengths is not None or query_lengths is not None or mask is not None:
        raise AttentionInputError(
            "context_parallel_attention does not take key_lengths, query_lengths or mask yet: "
            "shard unpadded sequences (one sequence per batch entry, all of length n_total)"
        )
    if stats is not None and stats.some_rows_key_mass:
        raise AttentionInputError(
            "context_parallel_attention does not take StatsSpec.key_mass_queries or key_mass_stride: they count "
            "rows back from the last row of one call, and here the rows are spread over the ranks. Use key_mass "
            "over every row"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise AttentionInputError(
            "context_parallel_attention needs torch.distributed initialised: launch with torchrun and "
            "call torch.distributed.init_process_group() first (or use kernels.attention on one process)"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    early, late = shard_ranges(n_total, world, rank)
    _check_shard(q_local, k_local, v_local, len(early) + len(late), n_total, world, rank)

    k, v = _gather_kv(k_local, v_local, len(early), n_total, world, group)  # [B, Hkv, n_total, D] views
    outs, found = [], []
    for chunk, local in ((early, slice(0, len(early))), (late, slice(len(early), None))):
        q_chunk = q_local[:, :, local]
        if causal:  # keys [0, stop): the chunk's last query sits at the last key, position stop - 1
            out, st = attention(
                q_chunk,
                k[:, :, : chunk.stop],
                v[:, :, : chunk.stop],
                causal=True,
                scale=scale,
                stats=stats,
                backend=backend,
            )
        else:  # all keys; empty rows pad the chunk so that it ends at position n_total - 1
            pad = q_chunk.new_zeros(*q_chunk.shape[:2], n_total - chunk.stop, q_chunk.shape[3])
            lengths = torch.full((q_chunk.shape[0],), len(chunk), dtype=torch.int64, device=q_chunk.device)
            out, st = attention(
                torch.cat([q_chunk, pad], 2),
                k,
                v,
                causal=False,
                scale=scale,
                stats=stats,
                backend=backend,
                query_lengths=lengths,
            )
            out = out[:, :, : len(chunk)]
            if st is not None:  # rows of the chunk only; key mass is per key
                st = AttentionStats(
                    **{name: t if name == "key_mass" else t[:, :, : len(chunk)] for name, t in st.items()}
                )
        outs.append(out)
        found.append(st)
    out_local = torch.cat(outs, dim=2)
    if stats is None:
        return out_local, None
    return out_local, _join_chunks(found, early, late, n_total, group)


def context_parallel_decode(
    q: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    n_total: int,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    stats: StatsSpec | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, AttentionStats | None]:
    """One causal decoding row over a KV cache split over ``group`` (split-KV decoding).

    After a context-parallel prefill of ``n_total`` positions, rank ``r`` holds the keys of its
    shard (:func:`shard_indices`) and, after them, the keys of every token decoded since
    (the same on every rank; rank 0 counts them). Every rank calls this with the same query, the
    token at global position ``n_total + n_new - 1``; each attends it to the keys it holds
    (:func:`kernels.merge.attend_part`, its two chunks and on rank 0 the decoded keys), the
    parts' outputs and row statistics are all-gathered (a few numbers per head), and every rank
    merges them (:func:`kernels.merge.merge_attention`) into the same result.

    Args:
        q: the new token's query ``[B, Hq, 1, D]``, the same on every rank.
        k_local, v_local: this rank's cache ``[B, Hkv, n_local + n_new, D]``: its shard of the
            prefill in position order, then the ``n_new >= 1`` decoded keys (the last is the
            query's own).
        n_total, group: the prefill's sequence length and process group.
        scale, stats, backend: as in :func:`kernels.attention`.

    Returns:
        ``(out [B, Hq, 1, D], stats)`` equal on every rank to :func:`kernels.attention` over the
        whole cache at this position (within float rounding): row statistics ``[B, Hq, 1]``,
        ``argmax`` a global key index, ``key_mass [B, Hq, n_total + n_new]`` in global key order
        (the parts' masses, weighted by the merge, put together with an ``all_reduce``).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise AttentionInputError(
            "context_parallel_decode needs torch.distributed initialised (or use kernels.attention on one process)"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    early, late = shard_ranges(n_total, world, rank)
    n_local = len(early) + len(late)
    _check_decode(q, k_local, v_local, n_local, rank, world)
    n_new = k_local.shape[2] - n_local
    position = n_total + n_new - 1
    spec = stats if stats is not None else StatsSpec()
    pieces = [(slice(0, len(early)), early.start), (slice(len(early), n_local), late.start)]
    if rank == 0:
        pieces.append((slice(n_local, None), n_total))
    mine = [
        attend_part(
            q,
            k_local[:, :, where],
            v_local[:, :, where],
            spec=spec,
            first_key=first,
            query_position=position,
            scale=scale,
            backend=backend,
        )
        for where, first in pieces
    ]
    row_spec = replace(spec, key_mass=False)
    names = list(part_spec(row_spec, 0).output_fields())
    parts = _exchange_rows(mine, names, world, group)  # every rank's parts, 3 slots per rank
    firsts = [first for r in range(world) for first in (*(c.start for c in shard_ranges(n_total, world, r)), n_total)]
    out, merged = merge_attention(parts, row_spec, key_offsets=firsts)
    if stats is None:
        return out, None
    if spec.key_mass:
        merged.key_mass = _merged_key_mass(mine, pieces, merged.lse, n_total + n_new, group)
    return out, merged


def _check_decode(q, k, v, n_local: int, rank: int, world: int) -> None:
    """Shapes of a split-KV decoding call, checked before any collective."""
    for name, t in (("q", q), ("k_local", k), ("v_local", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise AttentionInputError(
                f"{name} must be a 4-D tensor [B, heads, positions, D], got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
    if q.shape[2] != 1:
        raise AttentionInputError(
            f"context_parallel_decode takes one new token's query [B, Hq, 1, D], got {q.shape[2]} rows: "
            "decode one token at a time under context parallelism"
        )
    if k.shape != v.shape:
        raise AttentionInputError(f"k_local and v_local must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] <= n_local:
        raise AttentionInputError(
            f"the cache of rank {rank} of {world} holds {k.shape[2]} keys: its {n_local} prefill positions "
            "and then at least the new token's own key were expected"
        )


def _exchange_rows(mine, names: list[str], world: int, group) -> list[tuple[torch.Tensor, AttentionStats]]:
    """Every rank's parts (``out`` and the row statistics ``names``), in rank order, three slots
    per rank (a missing third part: an empty row, weight 0 in the merge), on every rank: one
    all-gather of the parts packed into float64 ``[3, B, H, 1, F]``."""
    out0, st0 = mine[0]
    widths = [out0.shape[-1]] + [getattr(st0, n).shape[-1] if n == "offset_mass" else 1 for n in names]
    send = torch.zeros(3, *out0.shape[:3], sum(widths), dtype=torch.float64, device=out0.device)
    for slot, (out, st) in enumerate(mine):
        columns = [out] + [getattr(st, n) if n == "offset_mass" else getattr(st, n).unsqueeze(-1) for n in names]
        send[slot] = torch.cat([c.double() for c in columns], dim=-1)
    gathered = send.new_empty(world * 3, *send.shape[1:])
    _all_gather(gathered, send, world, group)
    stat_dtype = st0.lse.dtype
    parts = []
    for packed in gathered:
        columns = packed.split(widths, dim=-1)
        fields = {
            n: c.long()[..., 0] if n == "argmax" else (c if n == "offset_mass" else c[..., 0]).to(stat_dtype)
            for n, c in zip(names, columns[1:])
        }
        parts.append((columns[0].to(out0.dtype), AttentionStats(**fields)))
    return parts


def _merged_key_mass(mine, pieces, lse: torch.Tensor, n_keys: int, group) -> torch.Tensor:
    """Key mass ``[B, H, n_keys]`` of the merged row: each part's, weighted by its share
    ``exp(lse_c - lse)`` of the row, put at its global keys; summed over ranks."""
    total = torch.zeros(*lse.shape[:2], n_keys, dtype=torch.float64, device=lse.device)
    for (_, st), (_, first) in zip(mine, pieces):
        share = torch.where(st.max_prob > 0, torch.exp(st.lse.double() - lse.double()), 0.0)  # [B, H, 1]
        total[:, :, first : first + st.key_mass.shape[-1]] += share * st.key_mass.double()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(lse.dtype)


def _join_chunks(found: list[AttentionStats], early: range, late: range, n_total: int, group) -> AttentionStats:
    """The two chunks' row statistics end to end; key mass summed over ranks, kept for this shard's keys."""
    rows = {name: torch.cat([t, getattr(found[1], name)], dim=2) for name, t in found[0].items() if name != "key_mass"}
    if found[0].key_mass is not None:
        first = found[0].key_mass
        total = torch.zeros((*first.shape[:2], n_total), dtype=first.dtype, device=first.device)
        for st in found:  # [B, Hq, keys the chunk saw]: a prefix of the sequence
            total[:, :, : st.key_mass.shape[2]] += st.key_mass
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        rows["key_mass"] = torch.cat(
            [total[:, :, early.start : early.stop], total[:, :, late.start : late.stop]], dim=2
        )
    return AttentionStats(**rows)


def _check_shard(q, k, v, n_local: int, n_total: int, world: int, rank: int) -> None:
    """Shapes of this rank's shard, checked before any collective (a rank that fails here would
    leave the others waiting in the gather)."""
    for name, t in (("q_local", q), ("k_local", k), ("v_local", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise AttentionInputError(
                f"{name} must be a 4-D tensor [B, heads, n_local, D], got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if t.shape[2] != n_local:
            raise AttentionInputError(
                f"{name} holds {t.shape[2]} positions, but rank {rank} of {world} holds {n_local} of the "
                f"{n_total}: shard with kernels.context_parallel.shard_indices(n_total, world, rank)"
            )
    if k.shape != v.shape:
        raise AttentionInputError(f"k_local and v_local must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")


def _gather_kv(k_local: torch.Tensor, v_local: torch.Tensor, n_early: int, n_total: int, world: int, group):
    """All ranks' K and V in global position order, as ``[B, Hkv, n_total, D]`` views of one buffer.

    Each rank sends ``[2 chunks, longest chunk, K/V, B, Hkv, D]`` (its first ``n_early``
    positions, then the rest; chunks padded to one length, as the single-tensor all-gather needs
    equal sizes); the gathered rows are then put in position order by one ``index_select``.
    """
    b, hkv, _, d = k_local.shape
    longest = max(len(c) for r in range(world) for c in shard_ranges(n_total, world, r))
    send = k_local.new_zeros(2, longest, 2, b, hkv, d)
    for slot, part in enumerate((slice(0, n_early), slice(n_early, None))):
        rows = k_local[:, :, part].shape[2]
        send[slot, :rows, 0] = k_local[:, :, part].permute(2, 0, 1, 3)
        send[slot, :rows, 1] = v_local[:, :, part].permute(2, 0, 1, 3)
    gathered = send.new_empty(world * 2, *send.shape[1:])  # rank r's send at rows [2r, 2r + 2)
    _all_gather(gathered, send, world, group)
    index = torch.empty(n_total, dtype=torch.int64)  # row of the flattened gathered buffer per position
    for r in range(world):
        for slot, chunk in enumerate(shard_ranges(n_total, world, r)):
            first = (r * 2 + slot) * longest
            index[chunk.start : chunk.stop] = torch.arange(first, first + len(chunk))
    kv = gathered.view(world * 2 * longest, 2, b, hkv, d).index_select(0, index.to(k_local.device))
    return kv[:, 0].permute(1, 2, 0, 3), kv[:, 1].permute(1, 2, 0, 3)  # kv: [n_total, K/V, B, Hkv, D]


def _all_gather(out: torch.Tensor, x: torch.Tensor, world: int, group) -> None:
    """``out`` = every rank's ``x`` concatenated along dim 0 in rank order: the single-tensor
    all-gather (``all_gather_single`` is the newer name of ``all_gather_into_tensor``), or the
    list form where the backend lacks it."""
    single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    try:
        single(out, x, group=group)
    except (RuntimeError, NotImplementedError):
        dist.all_gather(list(out.chunk(world)), x, group=group)
