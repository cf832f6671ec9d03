"""Streaming attention for instrumented models (StreamingLLM, DuoAttention's streaming heads):
chosen heads see only the first ``keep_first`` tokens and the last ``window`` ones.

:class:`StreamingAttention` says which heads of which layers, with what window;
``workbench.instrument(model, streaming=...)`` runs the model so. The adapters turn it into the
``window``, ``keep_first`` and ``window_heads`` arguments of :func:`kernels.attention` for each
layer (:class:`LayerStreaming`), which keeps memory O(N) and skips the key blocks between the
kept tokens and the window.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class StreamingAttention:
    """Attention restricted to the first ``keep_first`` keys and the last ``window`` keys.

    A query at position ``i`` sees key ``j`` iff it saw it before (causal, padding) and
    ``i - j < window or j < keep_first``: ``window`` keys ending at the query (itself included)
    plus the first ``keep_first`` tokens of the sequence (StreamingLLM's "attention sinks" kept
    as tokens). Positions are those of the input (token indices): the kept tokens keep their
    positions and rotary models see the original distances (StreamingLLM's rolling cache
    re-numbers them instead; docs/streaming.md).

    Attributes:
        window: recent keys each query sees, itself included (``>= 1``).
        keep_first: first keys every query sees besides the window (``>= 0``; 0: a window alone).
        heads: which heads stream; the others keep full attention. ``None``: every head of every
            layer; a boolean tensor ``[n_layers, n_heads]`` (query heads; True = streaming); or
            ``(layer, head)`` pairs.

    Example:
        >>> with instrument(model, streaming=StreamingAttention(window=256, keep_first=4)):
        ...     logits = model(tokens)
    """

    window: int
    keep_first: int = 4
    heads: torch.Tensor | tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        for name, low in (("window", 1), ("keep_first", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise WorkbenchError(f"StreamingAttention.{name} must be an int >= {low}, got {value!r}")
        heads = self.heads
        if heads is None:
            return
        if isinstance(heads, torch.Tensor):
            if heads.dtype != torch.bool or heads.dim() != 2:
                raise WorkbenchError(
                    "StreamingAttention.heads takes a boolean tensor [n_layers, n_heads] (True: the head "
                    f"streams), (layer, head) pairs or None, got a {heads.dtype} tensor of shape {tuple(heads.shape)}"
                )
            object.__setattr__(self, "heads", heads.detach().cpu())
            return
        if isinstance(heads, str) or not isinstance(heads, Iterable):
            raise WorkbenchError(
                "StreamingAttention.heads takes a boolean tensor [n_layers, n_heads], (layer, head) pairs or None, "
                f"got {heads!r}"
            )
        pairs = []
        for pair in heads:
            try:
                layer, head = pair
            except (TypeError, ValueError):
                raise WorkbenchError(f"StreamingAttention.heads: expected (layer, head) pairs, got {pair!r}") from None
            if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (layer, head)):
                raise WorkbenchError(f"StreamingAttention.heads: layer and head must be ints, got {pair!r}")
            pairs.append((int(layer), int(head)))
        object.__setattr__(self, "heads", tuple(pairs))

    def head_mask(self, n_layers: int, n_heads: int) -> torch.Tensor:
        """Which heads stream, as a boolean ``[n_layers, n_heads]`` on the CPU; checked against
        the model's sizes."""
        if self.heads is None:
            return torch.ones(n_layers, n_heads, dtype=torch.bool)
        if isinstance(self.heads, torch.Tensor):
            if tuple(self.heads.shape) != (n_layers, n_heads):
                raise WorkbenchError(
                    f"StreamingAttention.heads has shape {tuple(self.heads.shape)}, but the model has "
                    f"{n_layers} layers of {n_heads} (query) heads: pass [{n_layers}, {n_heads}]"
                )
            return self.heads.clone()
        mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in self.heads:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise WorkbenchError(
                    f"StreamingAttention.heads: head ({layer}, {head}) is out of range for a model of "
                    f"{n_layers} layers of {n_heads} heads"
                )
            mask[layer, head] = True
        return mask

    def visible(self, n_q: int, n_k: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The window-and-kept-keys condition alone as an explicit boolean ``[n_q, n_k]`` (queries
        bottom-right aligned, as in :func:`kernels.attention`; causality not included): for
        explicit patterns and tests. O(N^2)."""
        qpos = torch.arange(n_q, device=device).view(-1, 1) + (n_k - n_q)
        kpos = torch.arange(n_k, device=device).view(1, -1)
        return (qpos - kpos < self.window) | (kpos < self.keep_first)


class LayerStreaming:
    """A :class:`StreamingAttention` bound to one model: the :func:`kernels.attention` arguments
    of each layer (:meth:`kwargs`), with the per-head selection moved to each device once."""

    def __init__(self, streaming: StreamingAttention, n_layers: int, n_heads: int) -> None:
        if not isinstance(streaming, StreamingAttention):
            raise WorkbenchError(
                f"streaming= takes a workbench.adapters.streaming.StreamingAttention, got {type(streaming).__name__}"
            )
        self.streaming = streaming
        self.mask = streaming.head_mask(n_layers, n_heads)  # [n_layers, n_heads] bool
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    def kwargs(self, layer: int, device: torch.device) -> dict:
        """``window``, ``keep_first`` and (when only some heads stream) ``window_heads [Hq]`` for
        ``layer``; ``{}`` when none of its heads stream."""
        row = self.mask[layer]
        if not bool(row.any()):
            return {}
        s = self.streaming
        found = dict(window=s.window, keep_first=s.keep_first)
        if not bool(row.all()):
            key = (layer, torch.device(device))
            if key not in self._on_device:
                self._on_device[key] = row.to(device)
            found["window_heads"] = self._on_device[key]
        return found

    def merge(self, layer: int, model_variants: dict, device: torch.device) -> dict:
        """The model's own attention variants of ``layer`` with the streaming arguments added;
        a layer that has its own sliding window cannot stream as well (refused)."""
        extra = self.kwargs(layer, device)
        if not extra:
            return model_variants
        if "window" in model_variants:
            raise WorkbenchError(
                f"layer {layer} already attends within a sliding window of {model_variants['window']} tokens: "
                "streaming attention cannot be added to it; choose streaming heads in the other layers "
                "(StreamingAttention.heads)"
            )
        return {**model_variants, **extra}

    def visible(self, layer: int, n_q: int, n_k: int, device: torch.device) -> torch.Tensor | None:
        """The explicit ``[Hq, n_q, n_k]`` mask of ``layer`` (True: visible besides causality and
        padding), or None when it does not stream. O(N^2): for explicit patterns."""
        row = self.mask[layer]
        if not bool(row.any()):
            return None
        inside = self.streaming.visible(n_q, n_k, device)  # [n_q, n_k]
        return inside | ~row.to(device).view(-1, 1, 1)
