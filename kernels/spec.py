"""What statistics to compute (:class:`StatsSpec`) and what comes back (:class:`AttentionStats`)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from kernels.errors import AttentionInputError

#: Each output but ``lse`` (the :class:`AttentionStats` fields, in order) and the
#: :class:`StatsSpec` settings that leave it out: the one place that says which flag gives
#: which output.
_OUTPUT_OFF = {
    "entropy": dict(entropy=False),
    "max_prob": dict(max_prob=False),
    "argmax": dict(argmax=False),
    "sink_mass": dict(sink_tokens=0),
    "local_mass": dict(window=0),
    "distance": dict(distance=False),
    "offset_mass": dict(offsets=()),
    "key_mass": dict(key_mass=False, key_mass_queries=0, key_mass_stride=1),
    "learned_sink_mass": dict(learned_sink=False),
}


@dataclass(frozen=True)
class StatsSpec:
    """Which per-row and per-key statistics :func:`kernels.attention` should emit.

    Every field is off by default; the row log-sum-exp (``lse``) is always returned when a
    spec is given. :meth:`every_row_statistic` and :meth:`all` give every statistic with
    common settings; :meth:`output_fields` names the fields a spec fills.

    Attributes:
        entropy: entropy of each attention row, in nats.
        max_prob: largest probability in each row.
        argmax: index of the most-attended key (first index on ties).
        sink_tokens: if > 0, mass on keys ``< sink_tokens`` (attention-sink mass).
        window: if > 0, mass on the ``window`` keys ending at the query's own position
            (``query_position - window < key <= query_position``): local / streaming mass.
        distance: expected ``query_position - key_position`` under the row's distribution.
        offsets: for each offset ``o``, probability on key ``query_position - o``
            (1 = previous token; ``T - 1`` = induction on period-``T`` repeats). Rows whose
            target key does not exist (or is masked) get 0. Causal attention needs offsets >= 0;
            negative offsets (later keys) are for non-causal attention.
        key_mass: attention each key receives, summed over query rows (a second pass).
        key_mass_queries: if > 0, ``key_mass`` sums only the last ``key_mass_queries`` query
            rows of each batch entry (rows ``>= query_lengths[b] - key_mass_queries``), as
            SnapKV scores the keys with an observation window of the last queries. The second
            pass then costs ``key_mass_queries / Nq`` of the full one. 0: every row.
        key_mass_stride: if > 1, ``key_mass`` sums only the last valid row and every
            ``key_mass_stride``-th row before it (within ``key_mass_queries``, if set): a
            sample of the rows whose sum, times the stride, estimates the full key mass (as
            H2O's accumulated attention) at ``1 / key_mass_stride`` of the pass's cost. 1: every row.
        learned_sink: probability of the learned sink logit (``attention(sinks=...)``, gpt-oss)
            in each row: the attention that goes to no key; 0 without ``sinks``.
    """

    entropy: bool = False
    max_prob: bool = False
    argmax: bool = False
    sink_tokens: int = 0
    window: int = 0
    distance: bool = False
    offsets: tuple[int, ...] = ()
    key_mass: bool = False
    key_mass_queries: int = 0
    key_mass_stride: int = 1
    learned_sink: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", tuple(self.offsets))
        for name, least in (("sink_tokens", 0), ("window", 0), ("key_mass_queries", 0), ("key_mass_stride", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise AttentionInputError(f"StatsSpec.{name} must be an int, got {value!r}")
            if value < least:
                off = "0 turns it off" if least == 0 else "1: every row"
                raise AttentionInputError(f"StatsSpec.{name} must be >= {least} ({off}), got {value}")
        for name, default in (("key_mass_queries", 0), ("key_mass_stride", 1)):
            if getattr(self, name) != default and not self.key_mass:
                raise AttentionInputError(f"StatsSpec.{name} needs key_mass=True (it picks the rows key_mass sums)")
        for o in self.offsets:
            if isinstance(o, bool) or not isinstance(o, int):
                raise AttentionInputError(f"StatsSpec.offsets must hold ints, got {o!r}")

    @classmethod
    def every_row_statistic(
        cls, sink_tokens: int = 1, window: int = 64, offsets: tuple[int, ...] = (1,), key_mass: bool = False
    ) -> StatsSpec:
        """Every per-row statistic with the given sink count, local window and offsets; the
        per-key mass (a second pass) only with ``key_mass=True``."""
        return cls(
            entropy=True,
            max_prob=True,
            argmax=True,
            sink_tokens=sink_tokens,
            window=window,
            distance=True,
            offsets=offsets,
            key_mass=key_mass,
        )

    @classmethod
    def all(cls, sink_tokens: int = 1, window: int = 64, offsets: tuple[int, ...] = (1,)) -> StatsSpec:
        """Every statistic, row and key, with the given sink count, local window and offsets."""
        return cls.every_row_statistic(sink_tokens, window, offsets, key_mass=True)

    def output_fields(self) -> tuple[str, ...]:
        """The :class:`AttentionStats` fields this spec fills, in field order (``lse`` always):
        a field is filled unless its settings are those :data:`_OUTPUT_OFF` turns it off with."""
        on = (name for name, off in _OUTPUT_OFF.items() if any(getattr(self, k) != v for k, v in off.items()))
        return ("lse", *on)

    def without(self, *names: str) -> StatsSpec:
        """This spec without the named outputs (:class:`AttentionStats` field names, as
        :meth:`output_fields` gives them), e.g. ``StatsSpec.every_row_statistic().without("argmax",
        "distance")``; ``lse`` is always computed and cannot be dropped."""
        unknown = [name for name in names if name not in _OUTPUT_OFF]
        if unknown:
            raise AttentionInputError(f"cannot drop {', '.join(unknown)}: choose from {', '.join(_OUTPUT_OFF)}")
        return replace(self, **{key: value for name in names for key, value in _OUTPUT_OFF[name].items()})

    @property
    def some_rows_key_mass(self) -> bool:
        """Whether ``key_mass`` sums only some query rows (``key_mass_queries``, ``key_mass_stride``)."""
        return bool(self.key_mass_queries) or self.key_mass_stride > 1

    def key_mass_rows(self, rows: torch.Tensor, query_lengths: torch.Tensor) -> torch.Tensor | None:
        """Which query rows ``key_mass`` sums, ``[B, 1, 1, C]`` bool, for row indices ``rows [C]``
        and the valid row counts ``query_lengths [B]``; None when every row counts."""
        if not self.some_rows_key_mass:
            return None
        back = query_lengths.view(-1, 1, 1, 1) - 1 - rows  # [B, 1, 1, C]: rows before the last valid one
        counted = back % self.key_mass_stride == 0
        if self.key_mass_queries:
            counted &= back < self.key_mass_queries
        return counted

    @property
    def row_stats(self) -> bool:
        """Whether any per-row statistic beyond the log-sum-exp is requested."""
        return bool(
            self.entropy
            or self.max_prob
            or self.argmax
            or self.sink_tokens
            or self.window
            or self.distance
            or self.offsets
            or self.learned_sink
        )


@dataclass
class AttentionStats:
    """Statistics of one attention call. Fields that were not requested are ``None``.

    Shapes (``B`` batch, ``H`` query heads, ``Nq`` queries, ``Nk`` keys); all float32 except
    ``argmax`` (int64):

    - ``lse``, ``entropy``, ``max_prob``, ``argmax``, ``sink_mass``, ``local_mass``,
      ``distance``: ``[B, H, Nq]``
    - ``offset_mass``: ``[B, H, Nq, len(offsets)]``
    - ``key_mass``: ``[B, H, Nk]``, attention received by each key, summed over query rows.
    - ``learned_sink_mass``: ``[B, H, Nq]``, the learned sink logit's probability.

    A row with no valid key (causal row before the first key, a padded query, or a batch
    entry with no keys) has a zero output and the finite sentinels ``lse = 0``,
    ``entropy = 0``, ``max_prob = 0``, ``argmax = -1``, every mass ``0`` and ``distance = 0``;
    it adds nothing to ``key_mass``.
    """

    lse: torch.Tensor
    entropy: torch.Tensor | None = None
    max_prob: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    sink_mass: torch.Tensor | None = None
    local_mass: torch.Tensor | None = None
    distance: torch.Tensor | None = None
    offset_mass: torch.Tensor | None = None
    key_mass: torch.Tensor | None = None
    learned_sink_mass: torch.Tensor | None = None

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every statistic present."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]


def empty_output(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised attention output ``[B, Hq, Nq, D]`` for query ``q``, laid out like q
    where q is token-major (``[B, N, H, D]`` in memory, heads side by side, as model
    projections give it), so that a model's ``out.transpose(1, 2)`` back to ``[B, N, H, D]``
    needs no copy, as with SDPA; head-major (contiguous) otherwise."""
    b, h, n, d = q.shape
    kind = dict(dtype=dtype or q.dtype, device=q.device)
    if not q.is_contiguous() and q.stride(1) == d and q.stride(3) == 1 and q.stride(2) >= h * d:
        return torch.empty((b, n, h, d), **kind).transpose(1, 2)
    return torch.empty((b, h, n, d), **kind)
