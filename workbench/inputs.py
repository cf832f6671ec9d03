"""Inputs a user hands to :func:`workbench.record`: texts, token-id tensors or lists of id
sequences, turned into padded batches of token ids."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from workbench.errors import WorkbenchError

Inputs = str | Sequence[str] | torch.Tensor | Sequence[Sequence[int]] | Sequence[torch.Tensor]


def batches(tokenizer, inputs: Inputs, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(ids [batch, tokens] int64, padding mask [batch, tokens] or None)`` per batch, right
    padded; texts are tokenised with ``tokenizer``. :class:`WorkbenchError` for inputs of any
    other kind."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor):
        ids = _id_tensor(inputs)
        for i in range(0, ids.shape[0], batch_size):
            yield ids[i : i + batch_size], None
        return
    if isinstance(inputs, (Mapping, bytes)) or not isinstance(inputs, Iterable):
        raise WorkbenchError(
            f"cannot record input of type {type(inputs).__name__}: pass a text, a list of texts, token ids "
            "[batch, tokens] or a list of id sequences"
        )
    items = list(inputs)
    if not items:
        raise WorkbenchError("empty input: nothing to record")
    texts = [isinstance(x, str) for x in items]
    if all(texts):
        yield from _text_batches(tokenizer, items, batch_size)
        return
    if any(texts):
        raise WorkbenchError("the input mixes texts and token ids: pass one kind")
    if all(isinstance(x, int) or (isinstance(x, torch.Tensor) and x.dim() == 0) for x in items):
        raise WorkbenchError(
            f"got a flat list of {len(items)} ints: pass [ids] (a list holding one id list) or a "
            "1-D tensor for one sequence"
        )
    seqs = [_id_sequence(x, i) for i, x in enumerate(items)]
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        n = max(s.numel() for s in chunk)
        ids = torch.zeros(len(chunk), n, dtype=torch.long)
        mask = torch.zeros(len(chunk), n, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : s.numel()] = s
            mask[j, : s.numel()] = 1
        yield ids, (None if bool(mask.all()) else mask)


def _text_batches(tokenizer, texts: list[str], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if tokenizer is None:
        raise WorkbenchError("this model has no tokenizer: pass token ids instead of strings")
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt")
        if enc["input_ids"].shape[1] == 0:
            raise WorkbenchError("the texts tokenise to no tokens: nothing to record")
        yield enc["input_ids"], enc["attention_mask"]


def _id_tensor(inputs: torch.Tensor) -> torch.Tensor:
    """A tensor of token ids ``[tokens]`` or ``[batch, tokens]`` as int64 ``[batch, tokens]``."""
    if _not_ids(inputs.dtype) or inputs.dim() not in (1, 2):
        raise WorkbenchError(
            f"token ids must be an integer tensor [tokens] or [batch, tokens], got {inputs.dtype} {tuple(inputs.shape)}"
        )
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
        raise WorkbenchError(
            f"input {i} must be a flat sequence of integer token ids, got {ids.dtype} {tuple(ids.shape)}"
        )
    return ids.long()


def _not_ids(dtype: torch.dtype) -> bool:
    # bool and uint8 tensors would index as masks, floats would be truncated silently
    return dtype == torch.bool or dtype.is_floating_point or dtype.is_complex
