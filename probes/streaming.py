"""StreamingLLM's perplexity experiment (Xiao et al. 2024, "Efficient Streaming Language Models
with Attention Sinks"): the next-token loss of a causal model on long texts with (a) full
attention, (b) only the last ``window`` tokens visible, (c) the last ``window`` tokens plus the
first ``S`` tokens, for each ``S`` of ``keep_first`` (the paper: 1 and 4). The paper's finding:
(b) blows up once the text is longer than the window, (c) stays close to (a).

How this differs from the paper. The paper streams: it keeps a rolling KV cache of the ``S``
first and ``window`` recent tokens, and gives positions within the cache (the kept tokens
``0..S-1``, the recent ones right after them), so a rotary model never sees a distance larger
than ``S + window``. Here every variant is one causal forward over the whole text, with the
restriction as an attention mask (:class:`workbench.adapters.streaming.StreamingAttention`,
through the kernels' ``window`` and ``keep_first``): each token keeps its original position.
Every query sees the same keys as in the paper, but a rotary (or ALiBi) model sees the kept first
tokens at their true distance (up to ``L``), not at ``S + window``, and a model with learned
absolute positions sees them at positions past the cache's. The mask is what DuoAttention's
streaming heads and KV-cache compression keep, so it measures the cost of dropping the middle
keys without the re-positioning's own effect; a model trained at length ``L`` needs no position
it has not seen. Loss per token is the cross-entropy of token ``t + 1`` given the logits at
position ``t`` (``position`` = ``t``), in nats; perplexity = exp(mean loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from kernels import BACKENDS, StatsSpec
from workbench import instrument
from workbench.adapters import ModelAdapter, adapter_for
from workbench.adapters.streaming import StreamingAttention
from workbench.errors import WorkbenchError
from workbench.models import task_tokenizer
from workbench.tasks import text_samples

#: The variant names in tables and figures: full attention, the window alone, window + S first.
FULL, WINDOW = "full", "window"


def variant_name(keep_first: int | None) -> str:
    """``"full"`` (None), ``"window"`` (0) or ``"window+S"``."""
    if keep_first is None:
        return FULL
    return WINDOW if keep_first == 0 else f"{WINDOW}+{keep_first}"


@dataclass(frozen=True)
class StreamingSettings:
    """One run of the experiment.

    Attributes:
        length: tokens per text sample ``L`` (BOS included when the tokenizer has one).
        window: recent tokens each query sees, itself included.
        keep_first: the numbers ``S`` of first tokens kept besides the window (0 is the window
            alone, always run).
        samples: text samples (consecutive ``length``-token windows of ``text``).
        bucket: positions per bucket in the table.
        batch_size: samples per forward pass.
        backend: kernel backend (``"auto"``: Triton on CUDA, the exact reference elsewhere).
        text: a text file or folder of ``.txt``/``.md`` files; None: the built-in docstrings.
    """

    length: int = 1024
    window: int = 64
    keep_first: tuple[int, ...] = (1, 4)
    samples: int = 4
    bucket: int = 128
    batch_size: int = 4
    backend: str = "auto"
    text: str | Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_first", tuple(self.keep_first))
        for name, low in (("length", 2), ("window", 1), ("samples", 1), ("bucket", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise WorkbenchError(f"StreamingSettings.{name} must be an int >= {low}, got {value!r}")
        for s in self.keep_first:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise WorkbenchError(f"StreamingSettings.keep_first must hold ints >= 0, got {self.keep_first!r}")
        if self.backend not in BACKENDS:
            raise WorkbenchError(f"unknown kernel backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")

    def variants(self) -> list[int | None]:
        """Kept first tokens of each variant: None (full attention), 0 (the window alone), then
        each of ``keep_first`` (repeats dropped, in order)."""
        return [None, *dict.fromkeys((0, *self.keep_first))]


class _Discard:
    """A collector that keeps nothing: the experiment needs the logits, not the statistics."""

    def add(self, layer, stats, start: int = 0) -> None:
        pass


def sample_ids(model: torch.nn.Module | ModelAdapter, settings: StreamingSettings) -> torch.Tensor:
    """The text samples of ``settings`` as token ids ``[samples, length]`` (the model's tokenizer,
    or the zoo's byte tokenizer)."""
    adapter = adapter_for(model)
    if adapter.context is not None and settings.length > adapter.context:
        raise WorkbenchError(f"length {settings.length} is longer than the model's context of {adapter.context} tokens")
    found = text_samples(task_tokenizer(adapter.model), settings.text, settings.length, settings.samples)
    return torch.stack([s.ids for s in found])


@torch.no_grad()
def streaming_losses(
    model: torch.nn.Module | ModelAdapter,
    ids: torch.Tensor,
    streaming: StreamingAttention | None,
    backend: str = "auto",
    batch_size: int = 4,
) -> torch.Tensor:
    """Next-token loss ``[samples, L-1]`` (nats, float32, on the CPU) of ``ids [samples, L]``
    with the model instrumented under ``streaming`` (None: full attention through the same
    kernel path); entry ``[s, t]`` is the loss of token ``t + 1`` given the logits at ``t``.
    What :func:`token_losses` computes for each variant, and :mod:`probes.compress` for each
    set of streaming heads."""
    adapter = adapter_for(model)
    if not adapter.is_causal:
        raise WorkbenchError("the streaming experiment needs a causal language model")
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise WorkbenchError(f"ids must be [samples, tokens] with at least 2 tokens, got {tuple(ids.shape)}")
    losses = []
    with instrument(adapter, StatsSpec(), backend=backend, into=_Discard(), streaming=streaming):
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(adapter.device)
            logits = adapter.logits(batch).float()[:, :-1]  # [b, L-1, vocab]
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            losses.append(loss.cpu())
    return torch.cat(losses)


@torch.no_grad()
def token_losses(model: torch.nn.Module | ModelAdapter, ids: torch.Tensor, settings: StreamingSettings) -> pd.DataFrame:
    """Next-token loss of every position of ``ids [samples, L]`` under each variant.

    Returns a tidy table, one row per (variant, sample, position): ``variant``, ``keep_first``
    (``-1`` for full attention), ``window``, ``sample``, ``position`` (the predicting token ``t``,
    ``0 .. L-2``) and ``loss`` (nats, for token ``t + 1``)."""
    adapter = adapter_for(model)
    frames = []
    for keep in settings.variants():
        streaming = None if keep is None else StreamingAttention(window=settings.window, keep_first=keep)
        loss = streaming_losses(adapter, ids, streaming, settings.backend, settings.batch_size)
        n, positions = loss.shape
        frames.append(
            pd.DataFrame(
                {
                    "variant": variant_name(keep),
                    "keep_first": -1 if keep is None else keep,
                    "window": settings.window,
                    "sample": torch.arange(n).repeat_interleave(positions).numpy(),
                    "position": torch.arange(positions).repeat(n).numpy(),
                    "loss": loss.reshape(-1).double().numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def summarize(losses: pd.DataFrame, bucket: int) -> pd.DataFrame:
    """Mean loss and perplexity per variant and position bucket, and overall.

    One row per (variant, bucket): ``variant``, ``keep_first``, ``window``, ``bucket`` (a label,
    ``"start-end"`` with ``end`` inclusive, or ``"all"``), ``start``, ``end`` (exclusive),
    ``tokens``, ``loss`` (mean nats) and ``perplexity`` (``exp(loss)``); buckets in position
    order, the overall row last within each variant."""
    rows = []
    for (variant, keep, window), part in losses.groupby(["variant", "keep_first", "window"], sort=False):
        first = part["position"] // bucket * bucket
        for start, group in part.groupby(first, sort=True):
            end = int(group["position"].max()) + 1
            rows.append(
                (variant, keep, window, f"{start}-{end - 1}", int(start), end, len(group), group["loss"].mean())
            )
        end = int(part["position"].max()) + 1
        rows.append((variant, keep, window, "all", 0, end, len(part), part["loss"].mean()))
    table = pd.DataFrame(rows, columns=["variant", "keep_first", "window", "bucket", "start", "end", "tokens", "loss"])
    table["perplexity"] = table["loss"].map(math.exp)
    return table


def streaming_perplexity(
    model: torch.nn.Module | ModelAdapter, settings: StreamingSettings | None = None, ids: torch.Tensor | None = None
) -> pd.DataFrame:
    """The experiment: :func:`token_losses` on ``ids [samples, L]`` (default: the text samples of
    ``settings``, :func:`sample_ids`), summarised per position bucket and overall
    (:func:`summarize`). Draw it with :func:`workbench.plots.streaming_curve`.

    Example:
        >>> table = streaming_perplexity(load_model("zoo-2l"), StreamingSettings(length=1024, window=64))
        >>> table[table.bucket == "all"][["variant", "perplexity"]]
    """
    settings = settings if settings is not None else StreamingSettings()
    adapter = adapter_for(model)
    if ids is None:
        ids = sample_ids(adapter, settings)
    return summarize(token_losses(adapter, ids, settings), settings.bucket)
