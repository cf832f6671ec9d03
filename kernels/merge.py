"""Merge attention results computed over disjoint key sets into the result over all keys.

Split-KV decoding (a KV cache spread over ranks) and ring schemes compute, for the same
queries, the output and statistics over each part of the keys; :func:`merge_attention` combines
them exactly (DESIGN.md, Scale-out, normalised form). With ``lse`` the merged log-sum-exp and
``w_c = exp(lse_c - lse)`` the share of the row's softmax mass that part ``c`` holds:

- ``out = sum_c w_c out_c``; masses and means (sink, local, offset mass, distance) likewise;
- ``entropy = sum_c w_c (H_c - ln w_c)``;
- ``max_prob = max_c w_c p_c``; ``argmax`` comes from the part with the largest ``w_c p_c``;
- a part's row without keys (the sentinels ``lse = 0``, ``max_prob = 0``) has ``w_c = 0``;
- learned sinks (``attention(sinks=...)``) belong to one part only, whose ``lse`` counts the
  sink: ``learned_sink_mass = sum_c w_c x_c`` is then exact (each part's softmax would count
  a sink given to every part once more).

:func:`part_spec` gives the :class:`StatsSpec` each part must be computed with;
:func:`attend_part` computes one decoding row's part from the part's keys alone (no padding
keys), translating the positional statistics to the row's global position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from kernels.errors import AttentionInputError
from kernels.spec import AttentionStats, StatsSpec

#: Masses over a subset of the keys (or the learned sink): a part that holds none may omit them (0 there).
_MASSES = ("sink_mass", "local_mass", "offset_mass", "learned_sink_mass")
#: Row statistics merged as ``sum_c w_c x_c``.
_WEIGHTED = ("sink_mass", "local_mass", "distance", "offset_mass", "learned_sink_mass")
#: Largest scores of two parts within this many roundings (of the statistics' dtype) of each
#: other count as tied: the parts carry their largest score only as ``lse_c + ln max_prob_c``.
_TIE_ULPS = 16


def part_spec(spec: StatsSpec, first_key: int) -> StatsSpec:
    """The :class:`StatsSpec` a part whose keys start at global key ``first_key`` is computed with,
    so that :func:`merge_attention` can give ``spec`` over all keys: the sink keys the part
    holds (``sink_tokens - first_key`` of them, counted from its own first key), and always
    ``max_prob`` (it tells rows without keys and decides ``argmax`` between parts)."""
    if isinstance(first_key, bool) or not isinstance(first_key, int) or first_key < 0:
        raise AttentionInputError(f"first_key must be an int >= 0, got {first_key!r}")
    return replace(spec, sink_tokens=max(0, spec.sink_tokens - first_key), max_prob=True)


def attend_part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    spec: StatsSpec,
    first_key: int,
    query_position: int,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, AttentionStats]:
    """One decoding row over one part of its keys, as :func:`merge_attention` takes it.

    The part holds the global keys ``[first_key, first_key + Nk)``, all at or before the row's
    global position ``query_position``. It is computed on those keys alone, with the row placed
    at the part's last key, and the statistics that depend on the row's position are moved back
    by the gap ``s = query_position - (first_key + Nk - 1)``: the window shrinks by ``s`` (none of
    the part's keys is in it when ``s >= window``), each offset ``o`` becomes ``o - s`` (0 when
    its key lies after the part), and ``s`` is added to the distance. Sink keys come from
    :func:`part_spec`. (One row only: with several rows the window's upper end, the row's own
    position, would not move with them.)

    Args:
        q: the row's query ``[B, Hq, 1, D]``.
        k, v: the part's keys and values ``[B, Hkv, Nk, D]``.
        spec: the statistics of the merged result, over all keys.
        first_key: the global index of the part's first key.
        query_position: the row's global position (``>= first_key + Nk - 1``).
        scale, backend: as in :func:`kernels.attention`.

    Returns:
        ``(out [B, Hq, 1, D], stats)``: the fields of ``part_spec(spec, first_key)`` with every
        mass of ``spec`` present (zeros where the part holds none of its keys), ``argmax`` and
        ``key_mass [B, Hq, Nk]`` indexed within the part (give ``key_offsets`` to the merge).
    """
    from kernels.dispatch import attention

    for name, value in (("first_key", first_key), ("query_position", query_position)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AttentionInputError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(spec, StatsSpec):
        raise AttentionInputError(f"spec must be a kernels.StatsSpec, got {type(spec).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[2] != 1:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise AttentionInputError(f"attend_part takes one decoding row, q [B, Hq, 1, D]; got {shape}")
    n_k = k.shape[2] if isinstance(k, torch.Tensor) and k.dim() == 4 else None
    if n_k is not None and first_key + n_k - 1 > query_position:
        raise AttentionInputError(
            f"the part's keys [{first_key}, {first_key + n_k}) must all lie at or before the row's position "
            f"{query_position}"
        )
    gap = query_position - (first_key + (n_k or 0) - 1)
    offsets = [o - gap for o in spec.offsets]
    local = replace(
        part_spec(spec, first_key),
        window=max(0, spec.window - gap),
        offsets=tuple(o for o in offsets if o >= 0),
    )
    out, st = attention(q, k, v, causal=True, scale=scale, stats=local, backend=backend)
    zeros = torch.zeros_like(st.lse)
    found = dict(st.items())
    if spec.sink_tokens and st.sink_mass is None:
        found["sink_mass"] = zeros
    if spec.window and st.local_mass is None:
        found["local_mass"] = zeros
    if spec.distance:  # rows without keys keep the sentinel 0 (their weight is 0 in the merge)
        found["distance"] = torch.where(st.max_prob > 0, st.distance + gap, st.distance)
    if spec.offsets:
        columns = [st.offset_mass[..., local.offsets.index(o)] if o >= 0 else zeros for o in offsets]
        found["offset_mass"] = torch.stack(columns, dim=-1)
    return out, AttentionStats(**found)


def merge_attention(
    parts: Sequence[tuple[torch.Tensor, AttentionStats]],
    spec: StatsSpec,
    *,
    key_offsets: Sequence[int] | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Merge ``(out, stats)`` of the same queries over disjoint key sets into the result over
    all of them, as :func:`kernels.attention` with ``stats=spec`` over all keys would give it.

    Each part must be computed with :func:`part_spec` ``(spec, first_key)`` and with every query
    at the same position relative to the part's keys as in the whole call, so that causal masks,
    windows, offsets and distances agree: for keys ``[lo, hi)`` of ``k [B, Hkv, Nk, D]``, the
    call on ``k[:, :, lo:]`` with ``key_lengths = hi - lo`` (bottom-right alignment keeps the
    queries' positions; see ``tests/test_merge.py``).

    Args:
        parts: ``(out, stats)`` per part: ``out [B, H, Nq, D]`` (one dtype for all parts) and an
            :class:`AttentionStats` whose row statistics are ``[B, H, Nq]`` (``offset_mass``
            ``[B, H, Nq, len(offsets)]``). Every part carries ``lse``, ``max_prob`` and what
            ``spec`` asks for; a part holding none of the sink keys may lack ``sink_mass`` (and
            likewise ``local_mass``, ``offset_mass``): it counts as 0 there.
        spec: the statistics of the merged result.
        key_offsets: the global index of each part's first key, added to its ``argmax`` and
            used to place its ``key_mass``; ``None``: every part's indices are already global.

    Returns:
        ``(out, stats)``: ``out [B, H, Nq, D]`` in the parts' dtype (accumulated in float32,
        float64 for float64 parts); the fields of ``spec.output_fields()`` in float32 (float64
        for float64 parts), combined in float64. Rows without a
        key in any part get the sentinels of :class:`AttentionStats`. ``argmax`` ties between
        parts (largest scores within float rounding of each other) go to the lowest global
        index. ``key_mass [B, H, Nk]``: each part's ``[B, H, n_c]`` scaled by ``w_c`` and added in at
        global keys ``[offset_c, offset_c + n_c)`` (padding keys carry 0), ``Nk`` the largest end.
        It merges exactly only for one query row (decoding): summed over several rows, a part's
        key mass has lost the per-row weights ``w_c``, so ``spec.key_mass`` with ``Nq > 1`` is
        refused.

    Raises:
        AttentionInputError: no parts, shapes or dtypes that disagree, a statistic missing.
    """
    outs, stats = _check_parts(parts, spec)
    offsets = _check_offsets(key_offsets, len(parts))
    stat_dtype = torch.float64 if outs[0].dtype == torch.float64 else torch.float32  # as kernels.attention
    ok = torch.stack([st.max_prob > 0 for st in stats])  # [C, B, H, Nq]: rows with keys
    lse_c = torch.stack([st.lse.double() for st in stats]).masked_fill(~ok, -math.inf)
    row_ok = ok.any(0)
    lse = torch.where(row_ok, torch.logsumexp(lse_c, 0), 0.0)
    w = torch.where(ok, torch.exp(lse_c - lse), 0.0)  # [C, B, H, Nq]

    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    out = torch.zeros(outs[0].shape, dtype=acc, device=outs[0].device)
    for w_c, out_c in zip(w, outs):  # one part at a time: no [C, B, H, Nq, D] stack
        out += w_c.to(acc).unsqueeze(-1) * out_c.to(acc)

    found: dict[str, torch.Tensor] = {"lse": lse}
    if spec.entropy:
        ent = torch.stack([st.entropy.double() for st in stats])
        found["entropy"] = (w * ent - torch.special.xlogy(w, w)).sum(0).clamp_min(0)
    part_max = torch.stack([st.max_prob.double() for st in stats])
    if spec.max_prob:
        found["max_prob"] = (w * part_max).amax(0)
    if spec.argmax:
        found["argmax"] = _merged_argmax(stats, offsets, ok, lse_c, part_max, row_ok)
    for name in _WEIGHTED:
        if name in spec.output_fields():
            shape = (*lse.shape, len(spec.offsets)) if name == "offset_mass" else lse.shape
            zero = torch.zeros(shape, dtype=torch.float64, device=lse.device)
            x = torch.stack([zero if st_x is None else st_x.double() for st_x in (getattr(st, name) for st in stats)])
            found[name] = ((w if x.dim() == w.dim() else w.unsqueeze(-1)) * x).sum(0)
    if spec.key_mass:
        found["key_mass"] = _merged_key_mass(stats, offsets, w)
    merged = {name: t if t.dtype == torch.int64 else t.to(stat_dtype) for name, t in found.items()}
    return out.to(outs[0].dtype), AttentionStats(**merged)


def _merged_argmax(stats, offsets, ok, lse_c, part_max, row_ok) -> torch.Tensor:
    """The argmax of the part with the largest score ``lse_c + ln max_prob_c``; ties (within
    float rounding) to the lowest global key index."""
    log_p = torch.log(torch.where(ok, part_max, 1.0))
    score = torch.where(ok, lse_c + log_p, -math.inf)
    eps = max(torch.finfo(st.lse.dtype).eps for st in stats)  # the coarsest statistics present
    tol = _TIE_ULPS * eps * (torch.where(ok, lse_c.abs(), 0.0) + log_p.abs() + 1)
    best = score.amax(0, keepdim=True)
    tied = ok & (score >= best - tol)
    index = torch.stack([st.argmax + first for st, first in zip(stats, offsets)])
    earliest = torch.where(tied, index, torch.iinfo(torch.int64).max).amin(0)
    return torch.where(row_ok, earliest, -1)


def _merged_key_mass(stats, offsets, w) -> torch.Tensor:
    """Key mass ``[B, H, Nk]`` of one query row: each part's, scaled by its weight, added in at its
    keys ``[offset, offset + its length)``; ``Nk`` is the largest such end."""
    n_q = w.shape[-1]
    if n_q > 1:
        raise AttentionInputError(
            f"key_mass merges only for one query row (decoding), got {n_q} rows: a part's key mass is "
            "summed over rows, which loses each row's weight exp(lse_c - lse). Leave key_mass out of "
            "the spec, or compute it in a second pass with the merged lse"
        )
    end = max(first + st.key_mass.shape[-1] for st, first in zip(stats, offsets))
    b, h = w.shape[1:3]
    mass = torch.zeros(b, h, end, dtype=torch.float64, device=w.device)
    for c, (st, first) in enumerate(zip(stats, offsets)):
        # w[c] is [B, H, Nq] with Nq <= 1: its sum over rows is the row's weight, or 0 without rows.
        mass[:, :, first : first + st.key_mass.shape[-1]] += w[c].sum(-1, keepdim=True) * st.key_mass.double()
    return mass


def _check_offsets(key_offsets: Sequence[int] | None, count: int) -> list[int]:
    if key_offsets is None:
        return [0] * count
    offsets = list(key_offsets)
    if len(offsets) != count:
        raise AttentionInputError(f"key_offsets has {len(offsets)} entries for {count} parts; give one per part")
    for o in offsets:
        if isinstance(o, bool) or not isinstance(o, int) or o < 0:
            raise AttentionInputError(f"key_offsets must be ints >= 0 (each part's first global key), got {o!r}")
    return offsets


def _check_parts(parts, spec: StatsSpec) -> tuple[list[torch.Tensor], list[AttentionStats]]:
    """Validate the parts against each other and ``spec``; return their outputs and statistics."""
    if not isinstance(spec, StatsSpec):
        raise AttentionInputError(f"spec must be a kernels.StatsSpec, got {type(spec).__name__}")
    parts = list(parts)
    if not parts:
        raise AttentionInputError("merge_attention needs at least one (out, stats) part, got none")
    outs, stats = [], []
    for c, part in enumerate(parts):
        if not (
            isinstance(part, tuple | list)
            and len(part) == 2
            and isinstance(part[0], torch.Tensor)
            and isinstance(part[1], AttentionStats)
        ):
            raise AttentionInputError(
                f"part {c} must be an (out, AttentionStats) pair as kernels.attention returns it with stats=, "
                f"got {type(part).__name__}"
            )
        outs.append(part[0])
        stats.append(part[1])
    first = outs[0]
    if first.dim() != 4:
        raise AttentionInputError(f"out must be [B, H, Nq, D], got shape {tuple(first.shape)} in part 0")
    rows = tuple(first.shape[:3])
    for c, (out, st) in enumerate(zip(outs, stats)):
        if out.shape != first.shape or out.dtype != first.dtype or out.device != first.device:
            raise AttentionInputError(
                f"every part's out must share one shape, dtype and device: part 0 has {tuple(first.shape)} "
                f"{first.dtype} on {first.device}, part {c} has {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if st.max_prob is None:
            raise AttentionInputError(
                f"part {c} has no max_prob: compute each part with kernels.merge.part_spec(spec, first_key), "
                "which asks for it (it tells rows without keys and decides argmax between parts)"
            )
        for name in spec.output_fields():
            value = getattr(st, name)
            if value is None and name in _MASSES:
                continue
            if value is None:
                raise AttentionInputError(
                    f"part {c} lacks {name}, which the merged spec asks for: compute each part with "
                    "kernels.merge.part_spec(spec, first_key)"
                )
            _check_shape(c, name, value, rows, spec)
        for name in ("lse", "max_prob"):
            _check_shape(c, name, getattr(st, name), rows, spec)
    return outs, stats


def _check_shape(c: int, name: str, value: torch.Tensor, rows: tuple[int, ...], spec: StatsSpec) -> None:
    if name == "key_mass":
        want_ok = value.dim() == 3 and tuple(value.shape[:2]) == rows[:2]
        want = f"[{rows[0]}, {rows[1]}, keys of the part]"
    else:
        shape = (*rows, len(spec.offsets)) if name == "offset_mass" else rows
        want_ok = tuple(value.shape) == shape
        want = str(list(shape))
    if not want_ok:
        raise AttentionInputError(
            f"part {c}: {name} has shape {tuple(value.shape)}, expected {want} to match its out [B, H, Nq, D]"
        )
