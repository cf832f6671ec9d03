"""Float64 oracle for the kernels: the explicit ``[B, H, Nq, Nk]`` softmax matrix.

Deliberately written independently of ``kernels.reference`` (full matrix, no chunks, K/V
repeated per query head) so that both backends are checked against plain definitions.
"""

from __future__ import annotations

import math

import torch


def attention_matrix(q, k, causal, scale=None, key_lengths=None, query_lengths=None, mask=None):
    """Float64 scores, validity and probabilities, each ``[B, Hq, Nq, Nk]``, on q's device."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dev = q.device
    scale = 1 / math.sqrt(d) if scale is None else scale
    kr = k.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kr) * scale
    valid = validity(b, hq, nq, nk, causal, key_lengths, query_lengths, dev)
    if mask is not None:
        if mask.dtype == torch.bool:
            valid &= mask.to(dev)
        else:
            s = s + mask.double().to(dev)
            valid &= torch.isfinite(s)
    s = s.masked_fill(~valid, -math.inf)
    row_ok = valid.any(-1, keepdim=True)
    prob = torch.where(row_ok, torch.softmax(torch.where(row_ok, s, 0.0), dim=-1), 0.0)
    prob = prob * valid
    return s, valid, prob


def validity(b, hq, nq, nk, causal, key_lengths=None, query_lengths=None, device="cpu") -> torch.Tensor:
    """Boolean ``[B, Hq, Nq, Nk]``: which (query, key) pairs attend (causal bottom-right, lengths)."""
    qpos = torch.arange(nq, device=device).view(nq, 1) + (nk - nq)
    kpos = torch.arange(nk, device=device).view(1, nk)
    valid = torch.ones(b, hq, nq, nk, dtype=torch.bool, device=device)
    if causal:
        valid &= kpos <= qpos
    for i in range(b):
        if key_lengths is not None:
            valid[i, :, :, int(key_lengths[i]) :] = False
        if query_lengths is not None:
            valid[i, :, int(query_lengths[i]) :, :] = False
    return valid


def expected(q, k, v, *, causal, spec, scale=None, key_lengths=None, query_lengths=None, mask=None):
    """Output and every statistic by definition, in float64, as a dict."""
    s, valid, prob = attention_matrix(q, k, causal, scale, key_lengths, query_lengths, mask)
    b, hq, nq, nk = prob.shape
    vr = v.double().repeat_interleave(hq // v.shape[1], dim=1)
    res = {"out": prob @ vr, "prob": prob, "valid": valid}
    # float32 rounding of a score is ~1e-7 of its size; tolerances must grow with it.
    finite = s[torch.isfinite(s)]
    res["score_max"] = finite.abs().max().item() if finite.numel() else 0.0
    lse = torch.logsumexp(s, dim=-1)
    res["lse"] = torch.where(valid.any(-1), lse, 0.0)
    if spec is None:
        return res
    res.update(stats_from_pattern(prob, spec, query_lengths))
    res["argmax"] = torch.where(valid.any(-1), s.argmax(-1), -1)
    return res


def stats_from_pattern(prob: torch.Tensor, spec, query_lengths=None) -> dict[str, torch.Tensor]:
    """Every statistic of ``spec`` from an explicit ``[B, H, Nq, Nk]`` probability matrix
    (``query_lengths [B]``, for ``key_mass_queries``: the valid rows; all by default)."""
    prob = prob.double()
    nq, nk = prob.shape[-2:]
    qpos = (torch.arange(nq) + nk - nq).view(nq, 1).double().to(prob.device)
    kpos = torch.arange(nk).view(1, nk).double().to(prob.device)
    res = {}
    res["entropy"] = -(prob * torch.log(torch.where(prob > 0, prob, 1.0))).sum(-1)
    res["max_prob"] = prob.amax(-1)
    if spec.sink_tokens:
        res["sink_mass"] = prob[..., : spec.sink_tokens].sum(-1)
    if spec.window:
        rel = qpos - kpos
        res["local_mass"] = (prob * ((rel >= 0) & (rel < spec.window))).sum(-1)
    if spec.distance:
        res["distance"] = (prob * (qpos - kpos)).sum(-1)
    if spec.offsets:
        res["offset_mass"] = torch.stack([(prob * ((qpos - kpos) == o)).sum(-1) for o in spec.offsets], dim=-1)
    if spec.key_mass:
        counted = prob
        if spec.key_mass_queries or spec.key_mass_stride > 1:  # the last valid row, every stride-th before it
            counted = torch.zeros_like(prob)
            for i in range(prob.shape[0]):
                last = (nq if query_lengths is None else int(query_lengths[i])) - 1
                rows = [r for r in range(last, -1, -spec.key_mass_stride)]
                if spec.key_mass_queries:
                    rows = [r for r in rows if r > last - spec.key_mass_queries]
                counted[i, :, rows] = prob[i, :, rows]
        res["key_mass"] = counted.sum(-2)
    return res


def naive(q, k, v, *, causal, spec, scale=None, key_lengths=None, query_lengths=None):
    """Plain attention in q's dtype, as a user would write it: scores materialised in that dtype,
    softmax, ``@ v``. Its statistics come from its own (rounded) probability matrix, evaluated in
    float64, so they carry the error of materialising attention in that dtype and no more.
    The yardstick of FlashAttention's accuracy rule; returns a dict like :func:`expected`."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    g = hq // hkv
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ kr.transpose(-1, -2)) * scale  # [B, Hq, Nq, Nk] in q's dtype
    valid = validity(b, hq, nq, nk, causal, key_lengths, query_lengths, q.device)
    s = s.masked_fill(~valid, -math.inf)
    row_ok = valid.any(-1)
    prob = torch.where(row_ok.unsqueeze(-1), torch.softmax(s, dim=-1), 0)
    res = {"out": prob @ vr, "prob": prob, "lse": torch.where(row_ok, torch.logsumexp(s, dim=-1), 0)}
    res.update(stats_from_pattern(prob, spec, query_lengths))
    res["argmax"] = torch.where(row_ok, s.argmax(-1), -1)
    return res


def merge_parts(parts) -> dict[str, torch.Tensor]:
    """Merge results for the same queries over disjoint key sets (DESIGN.md, Scale-out), in
    float64, independently of the kernels' own merge.

    ``parts``: ``(first_key, out, stats)`` per part, ``stats`` an :class:`AttentionStats` with at
    least ``lse`` and ``argmax`` (``argmax`` is local to the part, offset by ``first_key``; -1
    marks a row without keys, whose ``lse = 0`` sentinel must not count). Normalised form:
    ``w_c = exp(lse_c - lse)``; out, masses and means ``sum w_c x_c``; entropy
    ``sum w_c (H_c - ln w_c)``; max_prob ``max w_c p_c``; argmax the earliest key among the parts
    whose largest score ``lse_c + ln p_c`` is the overall largest. A statistic a part lacks
    (``None``) counts as 0 there (e.g. sink mass of a part past the sink). Returns a dict of
    float64 tensors (argmax int64) named as the :class:`AttentionStats` fields, plus ``out``.
    """
    ok = torch.stack([st.argmax >= 0 for _, _, st in parts])  # [C, B, H, Nq]
    lse_c = torch.stack([st.lse.double() for _, _, st in parts]).masked_fill(~ok, -math.inf)
    row_ok = ok.any(0)
    lse = torch.where(row_ok, torch.logsumexp(lse_c, 0), 0.0)
    w = torch.where(ok, torch.exp(lse_c - lse), 0.0)
    res = {"lse": lse, "out": (w.unsqueeze(-1) * torch.stack([o.double() for _, o, _ in parts])).sum(0)}
    ent = torch.stack([st.entropy.double() for _, _, st in parts])
    res["entropy"] = torch.where(ok, w * (ent - torch.log(torch.where(ok, w, 1.0))), 0.0).sum(0)
    part_max = torch.stack([st.max_prob.double() for _, _, st in parts])
    res["max_prob"] = (w * part_max).amax(0)
    # Largest score of each part. Equal within 1e-3 counts as a tie: callers use problems whose
    # distinct scores lie far further apart (integer-valued q and k) than float32 rounding.
    score = torch.where(ok, lse_c + torch.log(torch.where(ok, part_max, 1.0)), -math.inf)
    best = score.amax(0, keepdim=True)
    first = torch.stack([st.argmax + first_key for first_key, _, st in parts])
    tied = ok & (score >= best - 1e-3)
    res["argmax"] = torch.where(row_ok, torch.where(tied, first, torch.iinfo(torch.int64).max).amin(0), -1)
    for name in ("sink_mass", "local_mass", "distance", "offset_mass"):
        x = [getattr(st, name) for _, _, st in parts]
        if all(t is None for t in x):
            continue
        like = next(t for t in x if t is not None).double()
        stacked = torch.stack([torch.zeros_like(like) if t is None else t.double() for t in x])
        weight = w if stacked.dim() == w.dim() else w.unsqueeze(-1)
        res[name] = (weight * stacked).sum(0)
    return res


def expected_variant(
    q,
    k,
    v,
    *,
    causal,
    spec,
    scale=None,
    key_lengths=None,
    query_lengths=None,
    window=None,
    softcap=None,
    sinks=None,
    alibi_slopes=None,
):
    """Output and statistics by definition, in float64, for the attention variants of
    :func:`kernels.attention`: soft-capped scores, an ALiBi bias, a sliding window, and learned
    sinks as one more column of the softmax (then dropped), all on the full matrix."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    kr = k.double().repeat_interleave(hq // k.shape[1], dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kr) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    rel = (torch.arange(nq).view(nq, 1) + nk - nq) - torch.arange(nk).view(1, nk)
    if alibi_slopes is not None:
        s = s - alibi_slopes.double().view(1, hq, 1, 1) * rel.abs().double()
    valid = validity(b, hq, nq, nk, causal, key_lengths, query_lengths, q.device)
    if window:
        valid &= rel < window
    s = s.masked_fill(~valid, -math.inf)
    row_ok = valid.any(-1)
    column = torch.full((b, hq, nq, 1), -math.inf, dtype=torch.float64)
    if sinks is not None:
        column = sinks.double().view(1, hq, 1, 1).expand(b, hq, nq, 1)
    full = torch.cat([s, column], dim=-1)
    full_prob = torch.softmax(torch.where(row_ok.unsqueeze(-1), full, 0.0), dim=-1)
    full_prob = torch.where(row_ok.unsqueeze(-1), full_prob, 0.0)
    prob, sink_prob = full_prob[..., :nk] * valid, full_prob[..., nk]
    vr = v.double().repeat_interleave(hq // v.shape[1], dim=1)
    res = {"out": prob @ vr, "prob": prob}
    res["lse"] = torch.where(row_ok, torch.logsumexp(torch.where(row_ok.unsqueeze(-1), full, 0.0), dim=-1), 0.0)
    res.update(stats_from_pattern(prob, spec))
    res["entropy"] = res["entropy"] - torch.special.xlogy(sink_prob, sink_prob)
    res["argmax"] = torch.where(row_ok, s.argmax(-1), -1)
    res["learned_sink_mass"] = sink_prob
    return res
