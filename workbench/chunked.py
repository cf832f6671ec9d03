"""Chunked prefill: a long input goes through the model ``chunk`` queries at a time against a
growing KV cache, so that activation memory is bounded by the chunk instead of the input.

The first chunk is an ordinary prefill; every later chunk is a multi-token
:meth:`~workbench.adapters.ModelAdapter.decode` step. Instrumented attention then sees the
chunk's queries against the keys of the cache so far, and the kernels' bottom-right causal
alignment puts every query at its global position: row statistics are those of the whole
prefill, only computed a chunk at a time. :func:`record_chunked` joins the chunks' statistics
back into one :class:`~workbench.recording.Recording` per input.

Example:
    >>> rec = record_chunked(model, ids, chunk=8192)  # ids [1, 1_000_000]
    >>> rec.layer(0).entropy.shape  # [1, head, 1_000_000]
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from kernels import AttentionStats, StatsSpec
from workbench.adapters import ModelAdapter, adapter_for
from workbench.errors import WorkbenchError
from workbench.instrument import DEFAULT_STATS, instrument
from workbench.recording import Recording, StreamingSummary, join_positions


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk of ``n`` positions, in order (the last may be shorter)."""
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def check_chunk(chunk: Any) -> int:
    """``chunk`` if it is an int >= 1; :class:`WorkbenchError` otherwise."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise WorkbenchError(f"the prefill chunk must be an int >= 1 (tokens per chunk), got {chunk!r}")
    return chunk


def chunked_prefill(
    model: torch.nn.Module | ModelAdapter, ids: torch.Tensor, chunk: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, Any]:
    """Prefill ``ids [batch, tokens]`` ``chunk`` tokens at a time; returns what
    :meth:`~workbench.adapters.ModelAdapter.prefill` returns: ``(logits [batch, vocab] of the
    last position, KV cache of every position)``.

    Inputs must be unpadded: a ``mask`` with any padding is refused (the chunks of a padded
    batch would not line up). The model must decode causally with a KV cache."""
    check_chunk(chunk)
    adapter = adapter_for(model)
    if mask is not None and not bool(mask.bool().all()):
        raise WorkbenchError(
            "chunked prefill takes unpadded inputs only: run sequences of different lengths one at a "
            "time (batch 1), or without --prefill-chunk"
        )
    if not adapter.can_generate:
        raise WorkbenchError(
            f"chunked prefill needs a causal language model with a KV cache (this one is a "
            f"{type(adapter.model).__name__}): run it without a prefill chunk"
        )
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise WorkbenchError(f"chunked prefill takes token ids [batch, tokens] of at least one token, got {ids.shape}")
    bounds = chunk_bounds(ids.shape[1], chunk)
    logits, cache = adapter.prefill(ids[:, : bounds[0][1]])
    for start, end in bounds[1:]:
        logits, cache = adapter.decode(ids[:, start:end], cache)
    return logits, cache


class ChunkJoiner:
    """Collector for ``instrument(into=)`` during one chunked prefill: keeps each layer's
    chunk calls (in order) and :meth:`recording` joins them along the position axis.

    ``key_mass`` is summed as the chunks arrive (chunk ``c`` covers keys ``[0, end_c)``), so
    that it costs one ``[batch, head, keys]`` tensor per layer, not one per chunk."""

    def __init__(self) -> None:
        self.parts: dict[int, list[AttentionStats]] = {}
        self.key_mass: dict[int, torch.Tensor] = {}

    def add(self, layer: int, stats: AttentionStats) -> None:
        if stats.key_mass is not None:
            new, old = stats.key_mass, self.key_mass.get(layer)
            if old is not None:
                new[..., : old.shape[-1]] += old  # the new chunk's keys include every earlier key
            self.key_mass[layer] = new
            stats = replace(stats, key_mass=None)
        self.parts.setdefault(layer, []).append(stats)

    def recording(self, spec: StatsSpec, n_layers: int, model_name: str = "") -> Recording:
        """One :class:`Recording` call per layer: row statistics ``[batch, head, tokens]`` in
        position order, ``key_mass [batch, head, tokens]``. Empties the joiner."""
        rec = Recording(spec, n_layers, model_name=model_name)
        for layer in sorted(self.parts):
            joined = join_positions(self.parts.pop(layer))
            key_mass = self.key_mass.pop(layer, None)
            rec.add(layer, joined if key_mass is None else replace(joined, key_mass=key_mass))
        return rec


class ChunkPositions:
    """Collector for ``instrument(into=)``: hands each call of a chunked prefill to ``target``
    (a :class:`StreamingSummary`, or anything whose ``add`` takes ``start=``) with the
    position of the call's first query, counted per layer from the calls before it."""

    def __init__(self, target) -> None:
        self.target = target
        self.seen: dict[int, int] = {}

    def add(self, layer: int, stats: AttentionStats) -> None:
        start = self.seen.get(layer, 0)
        self.target.add(layer, stats, start=start)
        self.seen[layer] = start + stats.lse.shape[2]


@torch.no_grad()
def record_chunked(
    model: torch.nn.Module | ModelAdapter,
    ids: torch.Tensor,
    stats: StatsSpec | None = None,
    *,
    chunk: int,
    backend: str = "auto",
    into: StreamingSummary | None = None,
) -> Recording | StreamingSummary:
    """:func:`workbench.record` of unpadded token ids ``[batch, tokens]`` (or ``[tokens]``)
    through :func:`chunked_prefill`: the same statistics, ``chunk`` queries at a time.

    Returns a :class:`Recording` with one call per layer (``layer(i)`` row statistics
    ``[batch, head, tokens]`` in position order, ``key_mass [batch, head, tokens]``), or
    ``into``, a :class:`StreamingSummary` that takes each chunk at its positions."""
    check_chunk(chunk)
    adapter = adapter_for(model)
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int32, torch.int64):
        raise WorkbenchError(f"record_chunked takes integer token ids [batch, tokens], got {ids.dtype} {ids.shape}")
    vocab, context = adapter.vocab_size, adapter.context
    if ids.min() < 0 or ids.max() >= vocab:
        raise WorkbenchError(
            f"token ids must lie in [0, {vocab}) for this model, got ids from {int(ids.min())} to {int(ids.max())}"
        )
    if context is not None and ids.shape[1] > context:
        raise WorkbenchError(f"input of {ids.shape[1]} tokens is longer than the model's context of {context} tokens")
    if into is not None and not isinstance(into, StreamingSummary):
        raise WorkbenchError(f"into= takes a StreamingSummary, got {type(into).__name__}")
    stats = stats if stats is not None else DEFAULT_STATS
    if stats.some_rows_key_mass:
        raise WorkbenchError(
            "record_chunked does not take StatsSpec.key_mass_queries or key_mass_stride: each chunk is its own "
            "attention call, and they count rows back from its last row, not the input's. Record without a "
            "prefill chunk, or with key_mass over every row"
        )
    collector = ChunkJoiner() if into is None else ChunkPositions(into)
    with instrument(adapter, stats, backend=backend, into=collector):
        _, cache = chunked_prefill(adapter, ids.long().to(adapter.device), chunk)
        del cache
    if into is not None:
        return into
    rec = collector.recording(stats, adapter.n_layers, adapter.name)
    rec.tokens.append(ids.long().cpu())
    rec.lengths.append(torch.full((ids.shape[0],), ids.shape[1]))
    return rec


__all__ = ["ChunkJoiner", "ChunkPositions", "check_chunk", "chunk_bounds", "chunked_prefill", "record_chunked"]
