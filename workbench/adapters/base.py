"""What an adapter provides: :class:`ModelAdapter`, the only interface the layers above use to
inspect, run and instrument a model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from kernels import StatsSpec

#: ``edit(layer, z)``: sees the per-head attention output ``z [batch, tokens, head, d_head]``;
#: a returned tensor replaces it.
ZEdit = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@runtime_checkable
class ModelAdapter(Protocol):
    """One model of one library, seen the same way whatever the library.

    ``collector`` (in :meth:`install`) is anything with ``add(layer, stats)``: a
    :class:`~workbench.recording.Recording` or a :class:`~workbench.recording.StreamingSummary`.
    """

    model: torch.nn.Module
    #: whether :meth:`install` can fire explicit ``[B, H, Nq, Nk]`` pattern hooks (PatternSpec)
    supports_patterns: bool

    @property
    def n_layers(self) -> int: ...

    @property
    def head_shape(self) -> tuple[int, int]:
        """``(heads, d_head)`` of the per-head attention output."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def context(self) -> int | None:
        """Longest input in tokens (None: no limit known)."""
        ...

    @property
    def is_causal(self) -> bool: ...

    @property
    def learned_sinks(self) -> bool:
        """Whether its attention has learned sink logits (gpt-oss): the ``learned_sink`` score."""
        ...

    @property
    def can_generate(self) -> bool:
        """Whether the model decodes causally (what the retrieval score needs)."""
        ...

    @property
    def layer_windows(self) -> dict[int, int]:
        """The layers that attend within their own sliding window: layer index -> the window in
        tokens (keys each query sees, itself included: the ``window`` the layer's attention
        passes to :func:`kernels.attention`). Empty for a model whose layers all attend to
        every earlier key. TransformerLens: blocks with ``attn_type == "local"``
        (``cfg.window_size``); Hugging Face: ``sliding_attention`` entries of the config's
        ``layer_types`` (or every layer when the config sets ``sliding_window`` without
        ``layer_types``), ``sliding_window`` tokens. Such a layer already keeps only its window;
        streaming heads cannot be added to it (:meth:`LayerStreaming.merge` refuses)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where token ids go in."""
        ...

    @property
    def name(self) -> str: ...

    def run(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """One forward pass on ``ids [batch, tokens]`` with an optional padding mask."""
        ...

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[batch, tokens, vocab]``."""
        ...

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Forward on ``ids [batch, tokens]`` keeping a KV cache: ``(logits [batch, vocab], cache)``."""
        ...

    def decode(self, token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Extend the cache by ``token [batch, n]``: one decoding step (``n = 1``) or a chunk of a
        chunked prefill; returns ``(next-token logits [batch, vocab], cache)``."""
        ...

    def z_hooks(self, edit: ZEdit) -> Callable[[], None]:
        """Call ``edit`` on every layer's per-head output; returns the function removing the hooks."""
        ...

    def install(
        self, collector, stats: StatsSpec, backend: str, patterns=None, context_parallel=None, streaming=None
    ) -> Callable[[], None]:
        """Route attention through :func:`kernels.attention` into ``collector``; returns the
        function that undoes it.

        ``streaming`` (a :class:`~workbench.adapters.streaming.LayerStreaming`; ``None``: full
        attention): its streaming heads see only the kept first and the recent keys, through
        :meth:`LayerStreaming.merge` of each layer's own variants.

        ``context_parallel`` (a :class:`~workbench.context_parallel.ContextParallel`; ``None``,
        the default, for one process): the model then takes this rank's shard of one sequence
        (``ContextParallel.shard(ids)``) at the shard's global positions, and attention runs
        :func:`kernels.context_parallel.context_parallel_attention` over the group. An adapter
        that cannot give a shard its global positions raises :class:`WorkbenchError`."""
        ...


class BoundAdapter:
    """What every adapter class shares: the model it is bound to, where inputs go, its name."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    @property
    def name(self) -> str:
        return model_name(self.model)


def model_name(model: torch.nn.Module) -> str:
    """The name a model's config gives it, else its class name."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return str(getattr(cfg, "model_name", "") or getattr(cfg, "_name_or_path", "") or type(model).__name__)


def input_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (its embedding): where inputs go."""
    return next(model.parameters()).device
