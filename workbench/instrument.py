"""``instrument(model)``: run a model's attention through the statistics kernels; ``record(model,
inputs)``: the one-call form."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kernels import BACKENDS, StatsSpec
from workbench.adapters import ModelAdapter, adapter_for
from workbench.adapters.streaming import LayerStreaming, StreamingAttention
from workbench.context_parallel import ContextParallel
from workbench.errors import WorkbenchError
from workbench.inputs import Inputs
from workbench.inputs import batches as input_batches
from workbench.recording import PatternSpec, Recording, StreamingSummary

#: What ``instrument`` records when no ``stats`` is given: every row statistic (key mass,
#: which costs a second pass, is opt-in).
DEFAULT_STATS = StatsSpec.every_row_statistic()
_MARK = "_workbench_instrumented"


@contextmanager
def instrument(
    model: torch.nn.Module | ModelAdapter,
    stats: StatsSpec | None = None,
    patterns: PatternSpec | None = None,
    backend: str = "auto",
    into: Recording | StreamingSummary | None = None,
    context_parallel: ContextParallel | None = None,
    streaming: StreamingAttention | None = None,
) -> Iterator[Recording | StreamingSummary]:
    """Within the block, the model's attention runs through :func:`kernels.attention` and
    every forward pass adds its per-layer statistics to the yielded :class:`Recording`.

    The model is restored on exit, also when the block raises. ``into`` collects into an
    existing :class:`Recording` or a :class:`~workbench.recording.StreamingSummary` (means per
    head and position bucket, fixed memory) instead of a new recording.

    ``context_parallel`` (:class:`~workbench.context_parallel.ContextParallel`: a process group
    and the sequence length ``n_total``) spreads one sequence over the group's ranks. Every rank
    enters the block and calls the model on its shard, ``cp.shard(ids)`` (``[batch, n_local]``,
    the positions ``cp.positions``; no padding mask, no KV cache): the model sees the shard at
    its global positions (Hugging Face ``position_ids``; TransformerLens rotary and
    ``hook_pos_embed``), every layer's attention runs
    :func:`kernels.context_parallel.context_parallel_attention`, and the model's outputs
    (logits ``[batch, n_local, vocab]``) are the shard's positions, in shard order. Each layer's
    statistics are all-gathered as they arrive, so the recording holds the whole sequence in
    global position order on every rank, equal to a single-process recording (within float
    rounding); ``ContextParallel(gather=False)`` keeps each rank's rows in shard order instead.
    After a prefill with a KV cache (``adapter.prefill(cp.shard(ids))``), the model decodes one
    token at a time against the cache left split over the ranks (``adapter.decode``, the same
    token on every rank): logits and statistics of each decoded token are those of one process,
    on every rank. Patterns are refused.

    ``streaming`` (:class:`~workbench.adapters.streaming.StreamingAttention`) runs the model with
    StreamingLLM-style attention: its heads (every head, or the chosen ones) see only the first
    ``keep_first`` tokens and the last ``window`` ones, in prefill and decoding; the outputs and
    the statistics are those of the restricted attention. Explicit patterns show it too. A layer
    with its own sliding window, and context parallelism, are refused with it.

    Example:
        >>> with instrument(model, stats=StatsSpec(entropy=True, sink_tokens=1)) as rec:
        ...     model(tokens)
        >>> rec.layer(0).entropy.shape  # [batch, head, position]
    """
    stats = stats if stats is not None else DEFAULT_STATS
    if not isinstance(stats, StatsSpec):
        raise WorkbenchError(f"stats must be a kernels.StatsSpec, got {type(stats).__name__}")
    if backend not in BACKENDS:
        raise WorkbenchError(f"unknown kernel backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    adapter = adapter_for(model)
    model = adapter.model
    if getattr(model, _MARK, False):
        raise WorkbenchError("this model is already instrumented: leave the outer `with instrument(...)` first")
    if into is not None and not callable(getattr(into, "add", None)):
        raise WorkbenchError(
            f"into= takes a Recording, a StreamingSummary or another collector with "
            f"add(layer, stats), got {type(into).__name__}"
        )
    if patterns is not None:
        _check_patterns(adapter, patterns)
    plan = None
    if streaming is not None:
        if context_parallel is not None:
            raise WorkbenchError("streaming= is not available under context parallelism yet: run on one process")
        plan = LayerStreaming(streaming, adapter.n_layers, adapter.head_shape[0])
    rec = into if into is not None else Recording(stats, adapter.n_layers, model_name=adapter.name)
    if context_parallel is None:
        restore = adapter.install(rec, stats, backend, patterns, streaming=plan)
    else:
        if not isinstance(context_parallel, ContextParallel):
            raise WorkbenchError(
                f"context_parallel= takes a workbench.context_parallel.ContextParallel, got "
                f"{type(context_parallel).__name__}"
            )
        if patterns is not None:
            raise WorkbenchError("patterns= are not available under context parallelism (each rank holds a shard)")
        restore = adapter.install(rec, stats, backend, context_parallel=context_parallel)
    setattr(model, _MARK, True)
    try:
        yield rec
    finally:
        restore()
        delattr(model, _MARK)


def _check_patterns(adapter: ModelAdapter, patterns: PatternSpec) -> None:
    """Patterns need a TransformerLens model, and layers and heads that it has."""
    if not isinstance(patterns, PatternSpec):
        raise WorkbenchError(f"patterns= takes a workbench.PatternSpec, got {type(patterns).__name__}")
    if not adapter.supports_patterns:
        raise WorkbenchError(
            getattr(adapter, "patterns_hint", None)
            or "patterns= needs a TransformerLens model; Hugging Face models give "
            "patterns through attn_implementation='eager' and output_attentions=True"
        )
    n_layers = adapter.n_layers
    bad = [i for i in patterns.layers if not 0 <= i < n_layers]
    if bad:
        raise WorkbenchError(f"pattern layers {bad} out of range: the model has {n_layers} layers")
    n_heads = adapter.head_shape[0]
    bad = [h for h in patterns.heads or () if not 0 <= h < n_heads]
    if bad:
        raise WorkbenchError(f"pattern heads {bad} out of range: the model has {n_heads} heads per layer")


def record(
    model: torch.nn.Module | ModelAdapter,
    inputs: Inputs,
    stats: StatsSpec | None = None,
    *,
    batch_size: int = 8,
    backend: str = "auto",
    progress: bool = True,
    bucket_size: int | None = None,
    context_parallel: dist.ProcessGroup | bool | None = None,
) -> Recording | StreamingSummary:
    """Run ``model`` on ``inputs`` under instrumentation; return the :class:`Recording`.

    ``inputs``: a string or list of strings (tokenised with ``model.tokenizer``, right padding),
    token ids ``[batch, tokens]`` or ``[tokens]``, or a list of id sequences of any lengths
    (right-padded per batch). Padded positions are empty rows in the statistics. The token ids
    of every batch are kept in ``rec.tokens`` with their lengths in ``rec.lengths``.

    With ``bucket_size``, statistics are reduced as batches arrive into a
    :class:`~workbench.recording.StreamingSummary` (means per layer, head and position bucket,
    padding left out), whose memory does not grow with the number of samples.

    ``context_parallel``: ``True`` (the default process group) or a process group spreads each
    sequence over the group's ranks (:func:`instrument`'s ``context_parallel``). Every rank is
    given the same ``inputs`` and runs its shard of each batch; the result, on every rank,
    equals the single-process recording (statistics in global position order; ``rec.tokens``
    the whole sequences). Batches must be unpadded (sequences of one length per batch; pass
    ``batch_size=1`` for sequences of different lengths) and at least ``2W`` tokens long.

    Example:
        >>> rec = record(load_model("minilm"), ["The cat sat.", "Attention sinks."])
        >>> rec.layer(0).sink_mass.shape  # [batch, head, position]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WorkbenchError(f"batch_size must be an int >= 1, got {batch_size!r}")
    adapter = adapter_for(model)
    batches = list(input_batches(getattr(adapter.model, "tokenizer", None), inputs, batch_size))
    vocab, context = adapter.vocab_size, adapter.context
    for ids, _ in batches:
        if ids.min() < 0 or ids.max() >= vocab:
            raise WorkbenchError(
                f"token ids must lie in [0, {vocab}) for this model, got ids from {int(ids.min())} to {int(ids.max())}"
            )
        if context is not None and ids.shape[1] > context:
            raise WorkbenchError(
                f"input of {ids.shape[1]} tokens is longer than the model's context of {context} tokens"
            )
    group = _context_parallel_group(context_parallel, batches)
    device = adapter.device
    summary = None
    if bucket_size is not None:
        summary = StreamingSummary(stats or DEFAULT_STATS, adapter.n_layers, bucket_size)
    if group is not None:
        return _record_context_parallel(adapter, batches, stats, backend, group, summary, progress)
    with instrument(adapter, stats, backend=backend, into=summary) as rec, torch.no_grad():
        for ids, mask in tqdm(batches, desc="recording", unit="batch", disable=not progress or len(batches) < 2):
            if summary is not None:
                summary.set_row_mask(None if mask is None else mask.bool())
            adapter.run(ids.to(device), None if mask is None else mask.to(device))
            if summary is None:
                rec.tokens.append(ids.cpu())
                rec.lengths.append(
                    (mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).cpu()
                )
    return rec


def _context_parallel_group(context_parallel, batches) -> dist.ProcessGroup | None | bool:
    """The process group of ``record(context_parallel=...)`` (``False``: none), checked on every
    rank before any collective: an initialised group, unpadded batches."""
    if context_parallel is None or context_parallel is False:
        return None
    if context_parallel is not True and not isinstance(context_parallel, dist.ProcessGroup):
        raise WorkbenchError(
            f"context_parallel= takes True (the default process group) or a torch.distributed ProcessGroup, "
            f"got {type(context_parallel).__name__}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise WorkbenchError(
            "context_parallel= needs torch.distributed initialised: launch with torchrun and join the process "
            "group first (workbench.distributed.process_group, or torch.distributed.init_process_group)"
        )
    for ids, mask in batches:
        if mask is not None and not bool(mask.bool().all()):
            raise WorkbenchError(
                "context parallelism takes no padding: these inputs pad sequences of different lengths into one "
                f"batch of {ids.shape[0]}; give sequences of one length, or batch_size=1"
            )
    return True if context_parallel is True else context_parallel


def _record_context_parallel(adapter, batches, stats, backend, group, summary, progress):
    """``record`` with each batch's sequence spread over ``group``: one instrumented block per
    batch (its own sequence length), collecting into one recording."""
    group = None if group is True else group
    cps = [ContextParallel(ids.shape[1], group) for ids, _ in batches]  # every length checked first
    device = adapter.device
    rec = summary
    if rec is None:
        rec = Recording(stats or DEFAULT_STATS, adapter.n_layers, model_name=adapter.name)
    show = progress and len(batches) >= 2 and cps[0].rank == 0
    for (ids, _), cp in tqdm(list(zip(batches, cps)), desc="recording", unit="batch", disable=not show):
        with instrument(adapter, stats, backend=backend, into=rec, context_parallel=cp), torch.no_grad():
            adapter.run(cp.shard(ids).to(device), None)
        if summary is None:
            rec.tokens.append(ids.cpu())
            rec.lengths.append(torch.full((ids.shape[0],), ids.shape[1]))
    return rec
