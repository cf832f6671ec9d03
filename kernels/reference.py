"""Exact chunked PyTorch attention with statistics: any device, any dtype, float64 capable.

Queries are processed in chunks, so memory is O(chunk x keys) per head, never the whole
``[Nq, Nk]`` matrix (unless the caller passes such a ``mask``). Also takes an arbitrary
boolean or additive mask, which the Triton backend does not.
"""

from __future__ import annotations

import torch

from kernels.errors import AttentionInputError
from kernels.spec import AttentionStats, StatsSpec
from kernels.validate import Problem

# Score elements materialised per chunk (all heads of the batch together): 2^24 floats.
_CHUNK_ELEMENTS = 1 << 24


def check_mask(mask: torch.Tensor, p: Problem, device: torch.device) -> torch.Tensor:
    """Validate a boolean (True = attend) or additive float mask; return it as 4-D."""
    if not isinstance(mask, torch.Tensor):
        raise AttentionInputError(f"mask must be a tensor, got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise AttentionInputError(f"mask must be boolean (True = attend) or additive float, got {mask.dtype}")
    if mask.device != device:
        raise AttentionInputError(f"mask is on {mask.device} but q is on {device}")
    full = (p.batch, p.q_heads, p.n_q, p.n_k)
    try:
        return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(full)
    except RuntimeError as exc:
        raise AttentionInputError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to [B, Hq, Nq, Nk] = {list(full)}"
        ) from exc


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: Problem,
    stats: StatsSpec | None,
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window_heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionStats | None]:
    """Attention output ``[B, Hq, Nq, D]`` and statistics, computed exactly chunk by chunk.

    Computes in float32 (float64 for float64 inputs); statistics come back in that dtype. The
    variants (``p.window``, ``p.keep_first``, ``p.softcap``, ``sinks``, ``alibi_slopes``,
    ``window_heads``) are those of :func:`kernels.attention`.
    """
    b, hkv, g, nq, nk, d = p.batch, p.kv_heads, p.group, p.n_q, p.n_k, p.head_dim
    dev = q.device
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    if mask is not None:
        mask = check_mask(mask, p, dev)
    if chunk_size is None:
        chunk_size = max(1, min(nq, _CHUNK_ELEMENTS // max(1, b * p.q_heads * nk)))
    # [B, Hkv, 1, Nk, D]: one K/V per group, broadcast over the group's query heads (no copy).
    k_c = k.to(cd).unsqueeze(2)
    v_c = v.to(cd).unsqueeze(2)
    kpos = torch.arange(nk, device=dev)
    klen = (key_lengths if key_lengths is not None else torch.full((b,), nk, device=dev)).view(b, 1, 1, 1, 1)
    qlen = (query_lengths if query_lengths is not None else torch.full((b,), nq, device=dev)).view(b, 1, 1, 1)
    if key_lengths is not None:
        # Padding keys get probability 0, but 0 * NaN is NaN: never let padded V (an
        # uninitialised cache, say) into ``prob @ v``. Scores need nothing: they are masked.
        v_c = v_c.masked_fill(kpos.view(1, 1, 1, -1, 1) >= klen, 0)

    slopes = alibi_slopes.to(cd).view(1, hkv, g, 1, 1) if alibi_slopes is not None else None
    sink = sinks.to(cd).view(1, hkv, g, 1) if sinks is not None else None  # per query head
    # Heads the window leaves alone (attending to every key), [1, Hkv, G, 1, 1]; None: none.
    unwindowed = ~window_heads.view(1, hkv, g, 1, 1) if window_heads is not None else None
    out = torch.empty(b, hkv, g, nq, d, device=dev, dtype=q.dtype)
    want = stats is not None
    rows: dict[str, list[torch.Tensor]] = {}
    key_mass = torch.zeros(b, hkv, g, nk, device=dev, dtype=cd) if want and stats.key_mass else None

    for c0 in range(0, nq, chunk_size):
        c1 = min(nq, c0 + chunk_size)
        qc = q[:, :, c0:c1].to(cd).view(b, hkv, g, c1 - c0, d)
        s = (qc @ k_c.transpose(-1, -2)) * p.scale  # [B, Hkv, G, C, Nk]
        if p.softcap:
            s = p.softcap * torch.tanh(s / p.softcap)
        rows_i = torch.arange(c0, c1, device=dev)
        qpos = (rows_i + p.q_offset).view(1, 1, 1, -1, 1)
        rel = qpos - kpos.view(1, 1, 1, 1, -1)  # query position - key position
        if slopes is not None:
            s = s - slopes * rel.abs().to(cd)
        valid = (kpos.view(1, 1, 1, 1, -1) < klen) & (rows_i.view(1, 1, -1, 1) < qlen).unsqueeze(1)
        if p.causal:
            valid = valid & (rel >= 0)
        if p.window:
            inside = rel < p.window
            if p.keep_first:
                inside = inside | (kpos.view(1, 1, 1, 1, -1) < p.keep_first)
            if unwindowed is not None:
                inside = inside | unwindowed
            valid = valid & inside
        if mask is not None:
            mc = mask[:, :, c0:c1].reshape(b, hkv, g, c1 - c0, nk)
            if mc.dtype == torch.bool:
                valid = valid & mc
            else:
                s = s + mc.to(cd)
        s = s.masked_fill(~valid, float("-inf"))
        m = s.amax(-1)
        row_ok = m > float("-inf")  # rows with a visible key; the others are empty, learned sink or not
        if sink is not None:
            m = torch.maximum(m, sink)
        m = torch.where(row_ok, m, 0)
        e = torch.exp(s - m.unsqueeze(-1))
        l = e.sum(-1)
        sink_e = torch.where(row_ok, torch.exp(sink - m), 0) if sink is not None else None
        if sink_e is not None:
            l = l + sink_e
        l_safe = torch.where(row_ok, l, 1)
        prob = e / l_safe.unsqueeze(-1)
        out[:, :, :, c0:c1] = (prob @ v_c).to(q.dtype)
        if not want:
            continue
        sink_prob = sink_e / l_safe if sink_e is not None else None
        add = {
            "lse": torch.where(row_ok, m + torch.log(l_safe), 0),
            **row_statistics(prob, qpos, kpos, stats, row_ok, s, sink_prob),
        }
        for name, value in add.items():
            rows.setdefault(name, []).append(value)
        if key_mass is not None:
            counted = stats.key_mass_rows(rows_i, qlen)  # [B, 1, 1, C] or None: every row
            key_mass += (prob if counted is None else prob * counted.unsqueeze(-1)).sum(-2)

    out = out.view(b, p.q_heads, nq, d)
    if not want:
        return out, None
    shaped = {
        name: torch.cat(parts, dim=3).reshape(b, p.q_heads, nq, *parts[0].shape[4:]) for name, parts in rows.items()
    }
    if key_mass is not None:
        shaped["key_mass"] = key_mass.view(b, p.q_heads, nk)
    return out, AttentionStats(**shaped)


def row_statistics(
    prob: torch.Tensor,
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    stats: StatsSpec,
    row_ok: torch.Tensor,
    scores: torch.Tensor | None = None,
    sink_prob: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Row statistics (all but ``lse``) of explicit attention probabilities ``prob [..., Nq, Nk]``:
    query positions ``qpos`` broadcast to ``[..., Nq, 1]``, key positions ``kpos [Nk]``,
    ``row_ok [..., Nq]`` False for rows with no valid key. ``argmax`` is taken on the scores when
    given (so ties resolve as in the kernels), else on ``prob``. ``sink_prob [..., Nq]``: the
    learned sink's probability (in the entropy, and ``learned_sink_mass``); None: no sink."""
    zero = torch.zeros((), device=prob.device, dtype=prob.dtype)
    nk = prob.shape[-1]
    out: dict[str, torch.Tensor] = {}
    if stats.entropy:
        entropy = -torch.special.xlogy(prob, prob).sum(-1)
        if sink_prob is not None:
            entropy = entropy - torch.special.xlogy(sink_prob, sink_prob)
        out["entropy"] = entropy.clamp_min(0)
    if stats.max_prob:
        out["max_prob"] = prob.amax(-1)
    if stats.argmax:
        out["argmax"] = torch.where(row_ok, (scores if scores is not None else prob).argmax(-1), -1)
    if stats.sink_tokens:
        out["sink_mass"] = prob[..., : stats.sink_tokens].sum(-1).clamp(0, 1)
    rel = qpos - kpos
    if stats.window:
        out["local_mass"] = (prob * ((rel >= 0) & (rel < stats.window))).sum(-1).clamp(0, 1)
    if stats.distance:
        out["distance"] = (prob * rel.to(prob.dtype)).sum(-1)
    if stats.offsets:
        offsets = torch.tensor(stats.offsets, device=prob.device, dtype=torch.long)
        target = qpos - offsets  # [..., Nq, n_offsets]
        inside = (target >= 0) & (target < nk)
        picked = prob.gather(-1, target.clamp(0, nk - 1).expand(*prob.shape[:-1], -1))
        out["offset_mass"] = torch.where(inside, picked, zero)
    if stats.learned_sink:
        out["learned_sink_mass"] = sink_prob if sink_prob is not None else torch.zeros_like(prob[..., 0])
    return out


def pattern_stats(pattern: torch.Tensor, stats: StatsSpec) -> AttentionStats:
    """The row statistics (and ``key_mass``) of an explicit attention pattern ``[B, H, Nq, Nk]``
    (rows summing to 1, causal bottom-right aligned), as :func:`kernels.attention` returns them;
    ``lse`` is 0 (a pattern has no scores). For baselines that materialise attention, and tests.

    With ``stats.learned_sink``, a row summing to less than 1 (the eager pattern of a model with
    learned sinks, which drops the sink's column) gives the rest to the learned sink, in
    ``learned_sink_mass`` and in the entropy."""
    nq, nk = pattern.shape[-2:]
    qpos = (torch.arange(nq, device=pattern.device) + nk - nq).view(-1, 1)
    kpos = torch.arange(nk, device=pattern.device)
    total = pattern.sum(-1)
    row_ok = total > 0
    sink_prob = torch.where(row_ok, (1 - total).clamp(0, 1), 0) if stats.learned_sink else None
    rows = {"lse": torch.zeros_like(total), **row_statistics(pattern, qpos, kpos, stats, row_ok, None, sink_prob)}
    if stats.key_mass:
        rows["key_mass"] = pattern.sum(-2)
    return AttentionStats(**rows)
