"""``record(model, inputs)``: the one-call form of :func:`workbench.instrument`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from kernels import StatsSpec
from workbench.errors import WorkbenchError
from workbench.instrument import DEFAULT_STATS, adapter_for, instrument
from workbench.recording import Recording
from workbench.streaming import StreamingSummary

Inputs = str | Sequence[str] | torch.Tensor | Sequence[Sequence[int]] | Sequence[torch.Tensor]


def record(
    model: torch.nn.Module,
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
    :class:`~workbench.streaming.StreamingSummary` (means per layer, head and position bucket,
    padding left out), whose memory does not grow with the number of samples.

    Example:
        >>> rec = record(load_model("minilm"), ["The cat sat.", "Attention sinks."])
        >>> rec.layer(0).sink_mass.shape  # [batch, head, position]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WorkbenchError(f"batch_size must be an int >= 1, got {batch_size!r}")
    batches = list(_batches(model, inputs, batch_size))
    adapter = adapter_for(model)
    vocab, context = adapter.vocab_size(model), adapter.context(model)
    for ids, _ in batches:
        if ids.min() < 0 or ids.max() >= vocab:
            raise WorkbenchError(
                f"token ids must lie in [0, {vocab}) for this model, got ids from {int(ids.min())} to {int(ids.max())}"
            )
        if context is not None and ids.shape[1] > context:
            raise WorkbenchError(
                f"input of {ids.shape[1]} tokens is longer than the model's context of {context} tokens"
            )
    device = next(model.parameters()).device
    summary = None
    if bucket_size is not None:
        summary = StreamingSummary(stats or DEFAULT_STATS, adapter.n_layers(model), bucket_size)
    with instrument(model, stats, backend=backend, into=summary) as rec, torch.no_grad():
        for ids, mask in tqdm(batches, desc="recording", unit="batch", disable=not progress or len(batches) < 2):
            if summary is not None:
                summary.set_row_mask(None if mask is None else mask.bool())
            adapter.run(model, ids.to(device), None if mask is None else mask.to(device))
            if summary is None:
                rec.tokens.append(ids.cpu())
                rec.lengths.append((mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).cpu())
    return rec


def _batches(model, inputs: Inputs, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(ids [batch, tokens] int64, padding mask or None)`` per batch; :class:`WorkbenchError`
    for inputs of any other kind."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor):
        ids = _id_tensor(inputs)
        for i in range(0, ids.shape[0], batch_size):
            yield ids[i:i + batch_size], None
        return
    if isinstance(inputs, (Mapping, bytes)) or not isinstance(inputs, Iterable):
        raise WorkbenchError(f"cannot record input of type {type(inputs).__name__}: pass a text, a list of texts, token ids "
                             "[batch, tokens] or a list of id sequences")
    items = list(inputs)
    if not items:
        raise WorkbenchError("empty input: nothing to record")
    texts = [isinstance(x, str) for x in items]
    if all(texts):
        yield from _text_batches(model, items, batch_size)
        return
    if any(texts):
        raise WorkbenchError("the input mixes texts and token ids: pass one kind")
    if all(isinstance(x, int) or (isinstance(x, torch.Tensor) and x.dim() == 0) for x in items):
        raise WorkbenchError(f"got a flat list of {len(items)} ints: pass [ids] (a list holding one id list) or a "
                             "1-D tensor for one sequence")
    seqs = [_id_sequence(x, i) for i, x in enumerate(items)]
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        n = max(s.numel() for s in chunk)
        ids = torch.zeros(len(chunk), n, dtype=torch.long)
        mask = torch.zeros(len(chunk), n, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : s.numel()] = s
            mask[j, : s.numel()] = 1
        yield ids, (None if bool(mask.all()) else mask)


def _text_batches(model, texts: list[str], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise WorkbenchError("this model has no tokenizer: pass token ids instead of strings")
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, return_tensors="pt")
        if enc["input_ids"].shape[1] == 0:
            raise WorkbenchError("the texts tokenise to no tokens: nothing to record")
        yield enc["input_ids"], enc["attention_mask"]


def _id_tensor(inputs: torch.Tensor) -> torch.Tensor:
    """A tensor of token ids ``[tokens]`` or ``[batch, tokens]`` as int64 ``[batch, tokens]``."""
    if _not_ids(inputs.dtype) or inputs.dim() not in (1, 2):
        raise WorkbenchError(f"token ids must be an integer tensor [tokens] or [batch, tokens], got {inputs.dtype} "
                             f"{tuple(inputs.shape)}")
    if inputs.numel() == 0:
        raise WorkbenchError(f"empty input {tuple(inputs.shape)}: nothing to record")
    if inputs.is_meta:
        raise WorkbenchError("token ids on the meta device hold no values: pass real ids")
    return (inputs if inputs.dim() == 2 else inputs.unsqueeze(0)).long()


def _id_sequence(item, i: int) -> torch.Tensor:
    """Item ``i`` of a list of id sequences as int64 ``[tokens]``."""
    try:
        ids = torch.as_tensor(item)
    except (TypeError, ValueError, RuntimeError):
        raise WorkbenchError(f"input {i} is not a sequence of token ids: {item!r:.80}") from None
    if ids.dim() == 1 and ids.numel() == 0:
        raise WorkbenchError(f"input {i} is an empty sequence: every sequence needs at least one token")
    if _not_ids(ids.dtype) or ids.dim() != 1:
        raise WorkbenchError(f"input {i} must be a flat sequence of integer token ids, got {ids.dtype} "
                             f"{tuple(ids.shape)}")
    return ids.long()


def _not_ids(dtype: torch.dtype) -> bool:
    # bool and uint8 tensors would index as masks, floats would be truncated silently
    return dtype == torch.bool or dtype.is_floating_point or dtype.is_complex
