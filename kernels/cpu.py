"""The fast CPU backend: chunked PyTorch attention with statistics in the input's precision.

Queries are processed a chunk of rows at a time (memory O(chunk x keys), never the whole
``[Nq, Nk]`` matrix), and each chunk takes every key its rows can see, so the softmax of a row
is final within its chunk: the log-sum-exp is exact at once and every statistic, the per-key
mass included, comes from the same pass (no second pass over the keys). Per chunk:

- one scores matmul for all the heads of a key/value group (``[B, Hkv, G * C, D]`` queries
  against ``[B, Hkv, K, D]`` keys: K/V are never repeated for grouped-query attention), over
  only the keys the chunk can see (causal rows stop at their position, a window starts late);
- masking only where some row of the chunk loses a key (the causal diagonal, the window's
  edge, the padded tail) by adding the finite ``finfo.min / 2``, so that ``p * s`` stays 0
  there; masks that depend on positions only are built once per call;
- one fused ``softmax``; the argmax (only when asked for) and max score from the scores;
  ``lse = m - ln p_max`` (``p_max = 1 / l``); entropy ``lse - sum p s``; sink, local and
  offset masses from slices of the probabilities; the distance as one more column of the
  ``p @ [V | distance]`` matmul; the key mass as one batched matrix-vector product.

Every torch op is batched over heads and rows (Python loops over chunks only), so it uses the
intra-op threads (``torch.set_num_threads``).

Computes in float32 (float64 for float64 inputs) and returns statistics in that dtype, as the
reference backend does; :mod:`kernels.reference` stays the exact oracle. Additive float masks
are handed to the reference backend (their values, ``finfo.min`` in many models, could not be
told from the finite masking); every other feature of :func:`kernels.attention` is computed here.
"""

from __future__ import annotations

import torch

from kernels.errors import AttentionInputError
from kernels.reference import check_mask, reference_attention
from kernels.spec import AttentionStats, StatsSpec
from kernels.validate import Problem

#: Score elements of one chunk (all heads of the batch together): 2^21 floats, 8 MiB in float32.
CHUNK_ELEMENTS = 1 << 21
#: Fewest query rows per chunk (below this the per-chunk overhead dominates).
MIN_CHUNK_ROWS = 16


def chunk_rows(p: Problem, keys: int, budget: int | None = None) -> int:
    """Query rows per chunk so that a ``[B, Hq, rows, keys]`` score block holds at most ``budget``
    elements (:data:`CHUNK_ELEMENTS` by default), but at least :data:`MIN_CHUNK_ROWS` rows.
    (Taller early chunks for causal rows, which see fewer keys, were tried: fewer chunks, but
    more masked work in the first, square one, and slower.)"""
    rows = (budget or CHUNK_ELEMENTS) // max(1, p.batch * p.q_heads * keys)
    return max(MIN_CHUNK_ROWS, rows)


def cpu_attention(
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
    """Attention output ``[B, Hq, Nq, D]`` (input dtype) and statistics, chunk by chunk.

    Arguments as :func:`kernels.reference.reference_attention` (``p`` from
    :func:`kernels.validate.check_inputs`); ``chunk_size``: query rows per chunk (default from
    :data:`CHUNK_ELEMENTS`). CPU tensors only. An additive float ``mask`` goes to the reference
    backend."""
    if mask is not None:
        mask = check_mask(mask, p, q.device)
        if mask.dtype != torch.bool:
            return reference_attention(
                q, k, v, p, stats, key_lengths, query_lengths, mask, chunk_size, sinks, alibi_slopes, window_heads
            )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise AttentionInputError(f"chunk_size must be an int >= 1 (query rows per chunk), got {chunk_size!r}")
    return _Chunks(q, k, v, p, stats, key_lengths, query_lengths, mask, sinks, alibi_slopes, window_heads).run(
        chunk_size
    )


class _Chunks:
    """One call's prepared inputs and outputs; :meth:`run` fills them chunk by chunk."""

    def __init__(self, q, k, v, p: Problem, stats, key_lengths, query_lengths, mask, sinks, alibi, window_heads):
        b, hkv, g, nq, nk, d = p.batch, p.kv_heads, p.group, p.n_q, p.n_k, p.head_dim
        self.p, self.stats, self.mask = p, stats, mask
        self.cd = cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        # Masked keys get this added to their scores: finite (so 0 * score = 0 in sum p s), far
        # below any real score, and no overflow to -inf. A row maximum below `empty_below` has no key.
        self.masked, self.empty_below = torch.finfo(cd).min / 2, torch.finfo(cd).min / 4
        self.out_dtype = q.dtype
        # Queries pre-scaled (and divided by the soft cap, whose tanh then takes them as they
        # are); padded query rows zeroed, padded keys and values too: never read NaN padding.
        factor = p.scale / p.softcap if p.softcap else p.scale
        qs = q.to(cd) * factor
        self.qlen = None
        if query_lengths is not None:
            self.qlen = query_lengths.clamp(0, nq)
            qs = qs.masked_fill(torch.arange(nq).view(1, 1, nq, 1) >= self.qlen.view(b, 1, 1, 1), 0)
        self.q = qs.view(b, hkv, g, nq, d) if qs.is_contiguous() else qs.reshape(b, hkv, g, nq, d)
        self.klen = key_lengths.clamp(0, nk) if key_lengths is not None else None
        # Keys any row can see: those below the longest key length.
        self.n_keys = int(self.klen.max()) if self.klen is not None and b else nk
        # The distance rides on the p @ V matmul as one more column of V when there are enough
        # query rows to pay for copying V; a few rows (decoding) take a separate product instead.
        self.dist_column = stats is not None and stats.distance and nq >= MIN_CHUNK_ROWS
        kc, vc = k.to(cd), v.to(cd)  # no copies for float32 (float64) inputs
        if self.dist_column:
            vc = torch.cat([vc, vc.new_empty(b, hkv, nk, 1)], dim=-1)
        if self.klen is not None:
            pad = (torch.arange(nk).view(1, 1, nk, 1) >= self.klen.view(b, 1, 1, 1)).expand(b, hkv, nk, 1)
            kc = kc.masked_fill(pad, 0)
            vc = vc.masked_fill(pad, 0)
        self.k, self.v = kc, vc
        self.sinks = sinks.to(cd).view(1, hkv, g, 1) if sinks is not None else None
        self.slopes = alibi.to(cd).view(1, hkv, g, 1, 1) if alibi is not None else None
        self.unwindowed = ~window_heads.view(1, hkv, g, 1, 1) if window_heads is not None else None
        self.outs: list[torch.Tensor] = []  # each chunk's output [B, Hkv, G, C, D], joined once at the end
        # Masks that depend on positions only, and so repeat from chunk to chunk: built once.
        self.cache: dict[tuple, torch.Tensor | None] = {}
        self.rows: dict[str, torch.Tensor] = {}
        if stats is not None:
            for name in stats.output_fields():
                if name == "key_mass":
                    self.rows[name] = torch.zeros(b, hkv, g, nk, dtype=cd)
                elif name == "argmax":
                    self.rows[name] = torch.empty(b, hkv, g, nq, dtype=torch.int64)
                elif name == "offset_mass":
                    self.rows[name] = torch.empty(b, hkv, g, nq, len(stats.offsets), dtype=cd)
                else:
                    self.rows[name] = torch.empty(b, hkv, g, nq, dtype=cd)

    def run(self, chunk: int | None) -> tuple[torch.Tensor, AttentionStats | None]:
        """Every chunk of ``chunk`` rows (None: :func:`chunk_rows`), then the results."""
        p = self.p
        chunk = chunk or chunk_rows(p, self.n_keys)
        for c0 in range(0, p.n_q, chunk):
            self.chunk(c0, min(p.n_q, c0 + chunk))
        out = torch.cat(self.outs, dim=3) if len(self.outs) > 1 else self.outs[0]
        out = out.to(self.out_dtype).reshape(p.batch, p.q_heads, p.n_q, p.head_dim)
        if self.stats is None:
            return out, None
        shape = (p.batch, p.q_heads)
        return out, AttentionStats(**{name: t.reshape(*shape, *t.shape[3:]) for name, t in self.rows.items()})

    def key_range(self, c0: int, c1: int) -> tuple[int, int]:
        """Keys ``[lo, hi)`` that hold every key a row of ``[c0, c1)`` can see."""
        p = self.p
        first, last = c0 + p.q_offset, c1 - 1 + p.q_offset  # positions of the chunk's rows
        hi = min(self.n_keys, last + 1) if p.causal else self.n_keys
        lo = 0
        if p.window and not p.keep_first and self.unwindowed is None:
            lo = max(0, first - p.window + 1)
        hi = max(0, hi)
        return min(lo, hi), hi

    def band(self, c0: int, c1: int, lo: int, hi: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """``(a, bias, valid)``: keys ``[a, hi)`` where some row of the chunk loses a key, their
        visibility ``valid`` (broadcasting to ``[B, Hkv, G, C, hi - a]``) and the matching
        ``bias`` to add to the scores (0, or :attr:`masked`); ``(hi, None, None)``: every key of
        ``[lo, hi)`` is visible to every row (query padding aside)."""
        p = self.p
        first, last = c0 + p.q_offset, c1 - 1 + p.q_offset
        starts = []
        if self.mask is not None:
            starts.append(lo)
        if p.causal and first + 1 < hi:
            starts.append(max(lo, first + 1))
        if p.window and last - p.window + 1 > lo:  # keys left of some row's window
            starts.append(lo)
        if self.klen is not None and bool((self.klen < hi).any()):
            starts.append(max(lo, int(self.klen.min())))
        if not starts:
            return hi, None, None
        a = min(starts)
        # The causal and window part depends on the positions relative to the chunk (and, with
        # kept first keys, on where the band starts): full chunks share it.
        key = ("positions", c1 - c0, first - a, hi - a, a if p.keep_first else None)
        if key not in self.cache:
            rel = torch.arange(first, last + 1).view(-1, 1) - torch.arange(a, hi).view(1, -1)  # [C, W]
            seen = rel >= 0 if p.causal else torch.ones(rel.shape, dtype=torch.bool)
            inside = None
            if p.window:
                inside = rel < p.window
                if p.keep_first:
                    inside = inside | (torch.arange(a, hi) < p.keep_first)
            self.cache[key] = seen if inside is None else seen & inside
            self.cache[("unwindowed", *key[1:])] = seen  # what heads without the window see
        valid = self.cache[key]
        if p.window and self.unwindowed is not None:  # the heads without a window see all `seen` keys
            valid = torch.where(self.unwindowed, self.cache[("unwindowed", *key[1:])], valid)
        if self.klen is not None:
            valid = valid & (torch.arange(a, hi) < self.klen.view(-1, 1, 1, 1, 1))
        if self.mask is not None:
            b, hkv, g = p.batch, p.kv_heads, p.group
            valid = valid & self.mask[:, :, c0:c1, a:hi].reshape(b, hkv, g, c1 - c0, hi - a)
        bias_key = ("bias", *key[1:]) if valid is self.cache[key] else None
        bias = self.cache.get(bias_key) if bias_key else None
        if bias is None:
            bias = torch.where(valid, torch.zeros((), dtype=self.cd), torch.tensor(self.masked, dtype=self.cd))
            if bias_key:
                self.cache[bias_key] = bias
        return a, bias, valid

    def chunk(self, c0: int, c1: int) -> None:
        p, st = self.p, self.stats
        b, hkv, g, d, n = p.batch, p.kv_heads, p.group, p.head_dim, c1 - c0
        lo, hi = self.key_range(c0, c1)
        width = hi - lo
        # Rows with a visible key; the others are empty (zero output, sentinel statistics).
        row_ok = torch.ones(1, 1, 1, n, dtype=torch.bool)
        if self.qlen is not None:
            row_ok = row_ok & (torch.arange(c0, c1).view(1, 1, 1, n) < self.qlen.view(b, 1, 1, 1))
        if width == 0:
            self.empty(c0, c1)
            return
        qc = self.q[:, :, :, c0:c1].reshape(b, hkv, g * n, d)
        s = torch.matmul(qc, self.k[:, :, lo:hi].transpose(-1, -2)).view(b, hkv, g, n, width)
        if p.softcap:
            s.tanh_().mul_(p.softcap)
        qpos = torch.arange(c0, c1).view(-1, 1) + p.q_offset
        if self.slopes is not None:
            dist = (qpos - torch.arange(lo, hi).view(1, -1)).abs().to(self.cd)
            s.addcmul_(self.slopes, dist, value=-1)
        a, bias, valid = self.band(c0, c1, lo, hi)
        if bias is not None:
            s[..., a - lo :].add_(bias)  # faster than masked_fill_
            if st is None and a == lo:  # with statistics, the row maximum tells (below)
                row_ok = row_ok & valid.any(-1)
        prob = torch.softmax(s, dim=-1)  # [B, Hkv, G, C, W]; an empty row comes out uniform (discarded)
        v = self.v[:, :, lo:hi]
        to_last = None  # [W]: the chunk's last row position minus each key's
        if st is not None and st.distance:
            to_last = float(qpos[-1, 0]) - torch.arange(lo, hi, dtype=self.cd)
            if self.dist_column:  # column d, summed over the keys by the matmul
                v[..., d] = to_last
        pv = torch.matmul(prob.view(b, hkv, g * n, width), v).view(b, hkv, g, n, -1)
        if st is None:
            self.outs.append(pv if bool(row_ok.all()) else torch.where(row_ok.unsqueeze(-1), pv, 0))
            return
        if st.argmax:  # argmax is a slow reduction (amax is vectorised): only when asked for
            idx = s.argmax(-1, keepdim=True)  # [B, Hkv, G, C, 1]; ties: first key
            m, p_max = s.gather(-1, idx).squeeze(-1), prob.gather(-1, idx).squeeze(-1)
        else:
            m, p_max = s.amax(-1), prob.amax(-1)
        # p_max = 1 / l, l = sum exp(s - m). Rows of masked keys only are empty; NaN stays NaN.
        row_ok = row_ok & ~(m < self.empty_below)
        lse = m - torch.log(p_max)
        keys = torch.ones_like(lse)  # the keys' share of the row (1 - the learned sink's)
        sink_p = None
        if self.sinks is not None:
            total = torch.logaddexp(lse, self.sinks)
            keys, sink_p = torch.exp(lse - total), torch.exp(self.sinks - total)
            lse = total
        keys = torch.where(row_ok, keys, 0)  # also the row weights of the key mass
        out = pv[..., :d] * keys.unsqueeze(-1) if self.sinks is not None else pv[..., :d]
        self.outs.append(out if bool(row_ok.all()) else torch.where(row_ok.unsqueeze(-1), out, 0))
        zero = torch.zeros((), dtype=self.cd)
        put = {"lse": torch.where(row_ok, lse, zero)}
        if st.entropy:
            # -sum p_f ln p_f with p_f = keys * p and ln p_f = s - lse, plus the sink's term.
            ps = s.mul_(prob).sum(-1)  # the scores are not needed after this
            entropy = keys * (lse - ps)
            if sink_p is not None:
                entropy = entropy - torch.special.xlogy(sink_p, sink_p)
            put["entropy"] = torch.where(row_ok, entropy, zero).clamp_min(0)
        if st.max_prob:
            put["max_prob"] = keys * p_max
        if st.argmax:
            put["argmax"] = torch.where(row_ok, idx.squeeze(-1) + lo, -1)
        if st.sink_tokens:
            upto = max(0, min(st.sink_tokens, hi) - lo)
            put["sink_mass"] = (keys * prob[..., :upto].sum(-1)).clamp(0, 1)
        if st.window:
            put["local_mass"] = (keys * self.local(prob, qpos, lo, hi, st.window)).clamp(0, 1)
        if st.distance:  # sum p (qpos - j) = (qpos - last) + sum p (last - j)
            to_keys = pv[..., d] if self.dist_column else torch.matmul(prob, to_last)
            put["distance"] = keys * ((qpos.view(-1) - qpos[-1, 0]).to(self.cd) + to_keys)
        if st.offsets:
            target = qpos - torch.tensor(st.offsets).view(1, -1) - lo  # [C, n_offsets], local key index
            inside = (target >= 0) & (target < width)
            picked = prob.gather(-1, target.clamp(0, width - 1).expand(b, hkv, g, n, -1))
            put["offset_mass"] = torch.where(inside, picked, zero) * keys.unsqueeze(-1)
        if st.learned_sink:
            put["learned_sink_mass"] = torch.where(row_ok, sink_p, zero) if sink_p is not None else zero.expand_as(lse)
        for name, value in put.items():
            self.rows[name][:, :, :, c0:c1] = value
        if st.key_mass:  # sum over rows of keys * p: one [1, C] @ [C, W] product per head
            if st.some_rows_key_mass:
                valid = self.qlen if self.qlen is not None else torch.tensor(p.n_q)
                keys = keys * st.key_mass_rows(torch.arange(c0, c1), valid)
            self.rows["key_mass"][..., lo:hi] += torch.matmul(keys.unsqueeze(-2), prob).squeeze(-2)

    def local(self, prob: torch.Tensor, qpos: torch.Tensor, lo: int, hi: int, window: int) -> torch.Tensor:
        """``sum p_j`` over ``qpos - window < j <= qpos``: only the band of keys some row's window holds."""
        first, last = int(qpos[0, 0]), int(qpos[-1, 0])
        a, z = max(lo, first - window + 1), min(hi, last + 1)
        if z <= a:
            return torch.zeros(prob.shape[:-1], dtype=prob.dtype)
        key = ("local", last - first, first - a, z - a)  # relative positions only: full chunks share it
        if key not in self.cache:
            rel = qpos - torch.arange(a, z).view(1, -1)
            self.cache[key] = ((rel >= 0) & (rel < window)).to(prob.dtype)
        return (prob[..., a - lo : z - lo] * self.cache[key]).sum(-1)

    def empty(self, c0: int, c1: int) -> None:
        """A chunk whose rows see no key: zero output, the sentinels of empty rows."""
        p = self.p
        self.outs.append(torch.zeros(p.batch, p.kv_heads, p.group, c1 - c0, p.head_dim, dtype=self.cd))
        for name, t in self.rows.items():
            if name != "key_mass":
                t[:, :, :, c0:c1] = -1 if name == "argmax" else 0
