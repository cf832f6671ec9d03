"""``instrument(model)``: run a model's attention through the statistics kernels; ``record(model,
inputs)``: the one-call form."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from kernels import BACKENDS, StatsSpec
from workbench.adapters import ModelAdapter, adapter_for
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
) -> Iterator[Recording | StreamingSummary]:
    """Within the block, the model's attention runs through :func:`kernels.attention` and
    every forward pass adds its per-layer statistics to the yielded :class:`Recording`.

    The model is restored on exit, also when the block raises. ``into`` collects into an
    existing :class:`Recording` or a :class:`~workbench.recording.StreamingSummary` (means per
    head and position bucket, fixed memory) instead of a new recording.

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
    rec = into if into is not None else Recording(stats, adapter.n_layers, model_name=adapter.name)
    restore = adapter.install(rec, stats, backend, patterns)
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
            "patterns= needs a TransformerLens model; Hugging Face models give "
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
) -> Recording | StreamingSummary:
    """Run ``model`` on ``inputs`` under instrumentation; return the :class:`Recording`.

    ``inputs``: a string or list of strings (tokenised with ``model.tokenizer``, right padding),
    token ids ``[batch, tokens]`` or ``[tokens]``, or a list of id sequences of any lengths
    (right-padded per batch). Padded positions are empty rows in the statistics. The token ids
    of every batch are kept in ``rec.tokens`` with their lengths in ``rec.lengths``.

    With ``bucket_size``, statistics are reduced as batches arrive into a
    :class:`~workbench.recording.StreamingSummary` (means per layer, head and position bucket,
    padding left out), whose memory does not grow with the number of samples.

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
    device = adapter.device
    summary = None
    if bucket_size is not None:
        summary = StreamingSummary(stats or DEFAULT_STATS, adapter.n_layers, bucket_size)
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
