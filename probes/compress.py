"""KV-cache compression what-if: turn a share of a model's KV heads into streaming heads (they
see only the first ``sink`` and the last ``window`` keys, in prefill and decoding), chosen by a
run's head ranking and, as a control, at random, and measure what that costs: needle accuracy
by length and depth, text loss, and the KV cache it would save.

What streams. Compression acts per KV head: a key-value head serves a group of query heads
(grouped-query attention), and its cache can only shrink if every query head reading it streams.
So the unit is the KV head ``(layer, kv_head)``; query head ``h`` reads KV head
``h // (n_heads // n_kv_heads)`` (the convention of TransformerLens, Hugging Face and SDPA), and
streaming a KV head makes all its query heads streaming heads
(:class:`workbench.adapters.streaming.StreamingAttention` with their ``[n_layers, n_heads]``
mask, the kernels' per-head sink + window restriction: O(N) memory, exact).

Direction. A score says which heads to keep or which are safe to stream; :data:`DIRECTIONS`
says which end of each score's ranking streams first: ``lowest`` for "keep these" scores
(retrieval, induction, ...: heads that read far back), ``highest`` for scores of heads that
already look only at the first and recent tokens (``streaming``: mass on sink + window). A score
without a defined direction (entropy, ...) is refused unless ``stream=`` says which end.

Sliding-window layers. A layer with its own sliding window (Gemma 2/3's local layers, gpt-oss,
Mistral-style configs: :attr:`ModelAdapter.layer_windows`) already keeps only its window and is
left as it is: its KV heads are never candidates (:attr:`KVLayout.local_layers`). Shares, the
ranking's prefix and the random draws are of the **candidate** KV heads, those of the
full-attention layers (every KV head for a model without such layers).

Grouping rule. A KV group is as hard to stream as its least streamable query head: with
``lowest`` the group's value is the **maximum** of its query heads' scores, with ``highest`` the
**minimum**; candidate groups are then sorted (NaN groups last, ties in layer and head order) and
the first ``round(share * candidate KV heads)`` stream (half rounds up). For models without
grouping a group is one head and the rule changes nothing.

Control. ``draws`` random orders of the candidate KV heads (``random.Random(seed + draw)``, seed
recorded per row); each share streams the first ``round(share * candidate KV heads)`` of each
order: same number of KV heads, drawn uniformly, nested across shares like the ranking's.

Memory. A sequence of ``L`` tokens keeps ``L`` entries (a key and a value of ``d_head`` numbers)
per KV head of a full-attention layer, ``min(L, w)`` per KV head of a layer with its own window
``w``; a streaming KV head keeps ``min(L, sink + window)``. The share of entries dropped is
``streamed KV heads * (L - min(L, sink + window))`` over the uncompressed cache's entries
(``layers * KV heads * L`` without sliding-window layers); bytes are
``entries * 2 * d_head * bytes per number`` at the model's dtype, per sequence.

The restriction is a mask over the whole sequence (every token keeps its position, the prompt is
prefilled with it), not a cache that evicts keys: see ``docs/compression.md`` for how that
differs from DuoAttention and kvpress.

Example:
    >>> settings = CompressionSettings(rank_by="retrieval", shares=(0.25, 0.5), lengths=(1024,), window=256)
    >>> found = compress(model, head_values(run, "retrieval"), settings)
    >>> found.summary          # policy, draw, share, needle_accuracy, text_loss, ...
    >>> run_compression(run, model, settings)   # the same, written into run/compress/
    >>> workload(model, settings.resolved()).measure([(0, 1)])  # one set's needles and text loss

Each set is measured by :meth:`Workload.measure`, which :mod:`probes.compress_classifiers`
(each head classifier's set, side by side) shares.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from kernels import BACKENDS, StatsSpec
from probes.ablation import FRESH_SAMPLES, check_length, greedy_answers, rank_heads
from probes.streaming import StreamingSettings, _Discard, sample_ids, streaming_losses
from workbench import instrument
from workbench.adapters import ModelAdapter, adapter_for
from workbench.adapters.streaming import StreamingAttention
from workbench.errors import WorkbenchError
from workbench.runs import Run, atomic_write

Model = torch.nn.Module | ModelAdapter
KVHead = tuple[int, int]  # (layer, kv_head)

#: Which end of a score's ranking streams first, and why. ``lowest``: the score marks heads to
#: keep (they read far back); ``highest``: it marks heads that already attend to the first and
#: recent tokens. Scores not listed have no defined direction (pass ``stream=``).
DIRECTIONS: dict[str, tuple[str, str]] = {
    "retrieval": ("lowest", "retrieval heads copy the needle from far back: keep the highest"),
    "induction": ("lowest", "induction heads attend to earlier copies anywhere in the context: keep the highest"),
    "duplicate_token": ("lowest", "duplicate-token heads attend to earlier occurrences anywhere: keep the highest"),
    "distance": ("lowest", "heads with a long mean attention distance read far back: keep the highest"),
    "duo": (
        "lowest",
        "DuoAttention's gate: a low gate marks a head the sink and recent keys serve (their streaming heads)",
    ),
    "streaming": ("highest", "mass on the sink and window tokens: the highest lose least when the rest is dropped"),
    "sink": ("highest", "mass on the first tokens, which streaming keeps: the highest lose least"),
    "previous_token": ("highest", "attention to the previous token, inside any window: the highest lose least"),
}
STREAM_CHOICES = ("highest", "lowest")
#: The tasks a compression is measured on.
TASKS = ("niah", "text")
#: The ``policy`` column: the uncompressed model, the run's ranking, the random control.
NONE, RANKED, RANDOM = "none", "ranked", "random"
#: The folder of the run that holds the tables and figures (one of the run folders
#: :meth:`workbench.runs.Run.clear` removes).
FOLDER = "compress"
#: The tables one experiment writes (``compress/<name>_<table>.parquet`` and ``.csv``).
TABLES = ("summary", "needles", "text", "memory", "heads", "order")


def direction_for(score: str, stream: str | None = None) -> str:
    """``"lowest"`` or ``"highest"``: which end of ``score``'s ranking streams first
    (:data:`DIRECTIONS`), or ``stream`` when given; :class:`WorkbenchError` for a score without a
    defined direction and no ``stream``."""
    if stream is not None:
        if stream not in STREAM_CHOICES:
            raise WorkbenchError(f"stream must be 'highest' or 'lowest' (which end streams first), got {stream!r}")
        return stream
    if score not in DIRECTIONS:
        known = ", ".join(f"{s} ({d})" for s, (d, _) in DIRECTIONS.items())
        raise WorkbenchError(
            f"the score {score!r} has no defined compression direction (which heads should stream, its highest "
            f"or its lowest?); pass --stream highest or --stream lowest. Scores with a direction: {known}"
        )
    return DIRECTIONS[score][0]


def kv_count(share: float, total: int) -> int:
    """KV heads a share streams: ``round(share * total)``, half rounding up."""
    return int(math.floor(share * total + 0.5))


@dataclass(frozen=True)
class KVLayout:
    """The KV cache's shape: ``layers``, query ``heads`` and ``kv_heads`` per layer, ``d_head``
    and the dtype's name (``float32``, ...) and size in bytes; ``local_layers`` (ascending), the
    layers with their own sliding window, and ``local_windows``, each one's window in tokens
    (:attr:`ModelAdapter.layer_windows`; both empty for a full-attention model). The KV heads of
    the other layers are the :meth:`candidates` for streaming."""

    layers: int
    heads: int
    kv_heads: int
    d_head: int
    dtype: str
    itemsize: int
    local_layers: tuple[int, ...] = ()
    local_windows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        layers, windows = tuple(int(x) for x in self.local_layers), tuple(int(w) for w in self.local_windows)
        if (
            len(layers) != len(windows)
            or list(layers) != sorted(set(layers))
            or any(not 0 <= x < self.layers for x in layers)
            or any(w < 1 for w in windows)
        ):
            raise WorkbenchError(
                f"KVLayout.local_layers must be distinct ascending layers in [0, {self.layers}) with one window "
                f">= 1 each in local_windows, got {list(self.local_layers)} and {list(self.local_windows)}"
            )
        object.__setattr__(self, "local_layers", layers)
        object.__setattr__(self, "local_windows", windows)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @property
    def total(self) -> int:
        """KV heads of the whole model."""
        return self.layers * self.kv_heads

    def query_heads(self, kv_head: int) -> range:
        """The query heads that read ``kv_head``."""
        return range(kv_head * self.group, (kv_head + 1) * self.group)

    def all_kv(self) -> list[KVHead]:
        """Every ``(layer, kv_head)``, layer by layer."""
        return [(layer, kv) for layer in range(self.layers) for kv in range(self.kv_heads)]

    def candidates(self) -> list[KVHead]:
        """The KV heads that may stream, layer by layer: those outside :attr:`local_layers`."""
        local = set(self.local_layers)
        return [(layer, kv) for layer, kv in self.all_kv() if layer not in local]

    @property
    def candidate_total(self) -> int:
        """How many KV heads may stream (:meth:`candidates`)."""
        return (self.layers - len(self.local_layers)) * self.kv_heads

    def window_of(self, layer: int) -> int | None:
        """The layer's own sliding window (None: full attention)."""
        return dict(zip(self.local_layers, self.local_windows)).get(layer)

    def mask(self, kv_heads: Sequence[KVHead]) -> torch.Tensor:
        """Boolean ``[layers, heads]``: True for every query head of the given KV heads."""
        mask = torch.zeros(self.layers, self.heads, dtype=torch.bool)
        for layer, kv in kv_heads:
            if not (0 <= layer < self.layers and 0 <= kv < self.kv_heads):
                raise WorkbenchError(
                    f"KV head ({layer}, {kv}) is out of range: the model has {self.layers} layers of "
                    f"{self.kv_heads} KV heads"
                )
            mask[layer, self.query_heads(kv).start : self.query_heads(kv).stop] = True
        return mask


def kv_layout(model: Model) -> KVLayout:
    """The model's :class:`KVLayout`: KV heads from its config (TransformerLens
    ``n_key_value_heads``, Hugging Face ``num_key_value_heads``; the query heads when unset),
    sliding-window layers from :attr:`ModelAdapter.layer_windows`."""
    adapter = adapter_for(model)
    heads, d_head = adapter.head_shape
    cfg = getattr(adapter.model, "cfg", None)
    if cfg is not None and hasattr(cfg, "n_heads"):
        kv = getattr(cfg, "n_key_value_heads", None)
    else:
        config = getattr(adapter.model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        kv = getattr(text, "num_key_value_heads", None)
    kv = int(kv or heads)
    if kv < 1 or heads % kv:
        raise WorkbenchError(f"the model has {heads} query heads and {kv} KV heads per layer: not a grouping")
    dtype = next(adapter.model.parameters()).dtype
    windows = adapter.layer_windows
    local = tuple(sorted(windows))
    return KVLayout(
        adapter.n_layers,
        heads,
        kv,
        d_head,
        str(dtype).removeprefix("torch."),
        dtype.itemsize,
        local_layers=local,
        local_windows=tuple(windows[layer] for layer in local),
    )


def head_values(run: Run, score: str, task: str | None = None) -> pd.DataFrame:
    """The run's ``score`` per query head: ``layer, head, value`` (``task`` picks the task when
    the score was computed on several; refused as :func:`probes.ablation.rank_heads` refuses)."""
    rank_heads(run, score, task)  # a missing score or task, several tasks: refused with the choices
    table = run.table("head_scores")
    rows = table[table["score"] == score]
    rows = rows[rows["task"] == (task or sorted(set(rows["task"]))[0])]
    return rows[["layer", "head", "value"]].reset_index(drop=True)


def stream_order(scores: pd.DataFrame, layout: KVLayout, direction: str) -> pd.DataFrame:
    """The candidate KV heads (:meth:`KVLayout.candidates`: none of a sliding-window layer) in
    the order they stream: ``rank`` (0 streams first), ``layer``, ``kv_head``, ``query_heads``
    (``"0 1"``), ``value`` (the group's score: the maximum of its query heads' for ``lowest``,
    the minimum for ``highest``; NaN values ignored, a group of NaNs last).

    ``scores``: ``layer, head, value`` per query head (:func:`head_values`), every head of the
    model once (the sliding-window layers' included)."""
    direction = direction_for("", direction)
    want = {(layer, head) for layer in range(layout.layers) for head in range(layout.heads)}
    have = [(int(r.layer), int(r.head)) for r in scores.itertuples()]
    if len(have) != len(set(have)) or set(have) != want:
        raise WorkbenchError(
            f"the ranking must hold every head of the model once ({layout.layers} layers of {layout.heads} heads); "
            f"it holds {len(have)} rows for {len(set(have) & want)} of the {len(want)} heads: does the run belong "
            "to this model?"
        )
    frame = scores.assign(layer=scores["layer"].astype(int), kv_head=scores["head"].astype(int) // layout.group)
    frame = frame[~frame["layer"].isin(layout.local_layers)]  # their own window: never streamed
    if frame["value"].isna().all() and len(frame):
        raise WorkbenchError(
            "the score is NaN for every head (no sample counted: for retrieval, the model answered no needle); "
            "it ranks nothing: choose another --rank-by"
        )
    grouped = frame.groupby(["layer", "kv_head"], sort=True)["value"]
    value = grouped.max() if direction == "lowest" else grouped.min()  # pandas skips NaN
    groups = value.reset_index()
    groups["query_heads"] = [" ".join(map(str, layout.query_heads(kv))) for kv in groups["kv_head"]]
    key = groups["value"] if direction == "lowest" else -groups["value"]
    groups = groups.assign(_key=key).sort_values(["_key", "layer", "kv_head"], kind="stable", na_position="last")
    groups = groups.drop(columns="_key").reset_index(drop=True)
    groups.insert(0, "rank", range(len(groups)))
    return groups.assign(direction=direction)[["rank", "layer", "kv_head", "query_heads", "value", "direction"]]


@dataclass(frozen=True)
class Choice:
    """One set of streaming KV heads: ``policy`` (:data:`NONE`, :data:`RANKED`,
    :data:`RANDOM`), ``draw`` (0 but for random), ``seed`` (random only), the requested
    ``share`` and the KV heads."""

    policy: str
    draw: int
    seed: int | None
    share: float
    kv_heads: tuple[KVHead, ...]


def choices(order: Sequence[KVHead], layout: KVLayout, shares: Sequence[float], draws: int, seed: int) -> list[Choice]:
    """The uncompressed model (share 0), then for each share (0 skipped) the first
    :func:`kv_count` of the candidate KV heads (:meth:`KVLayout.candidates`: a share is a
    fraction of them) of ``order`` and, for each of ``draws`` random orders of the candidates
    (``random.Random(seed + draw)``), the first as many of that order."""
    everyone = layout.candidates()
    total = len(everyone)
    if sorted(order) != everyone:
        raise WorkbenchError(
            "the streaming order must hold every candidate KV head of the model once (those outside its "
            "sliding-window layers)"
        )
    found = [Choice(NONE, 0, None, 0.0, ())]
    shuffled = [random.Random(seed + d).sample(everyone, total) for d in range(draws)]
    for share in shares:
        n = kv_count(share, total)
        if share == 0:
            continue
        if total == 0:
            raise WorkbenchError(
                f"every layer of the model attends within its own sliding window (layers {list(layout.local_layers)}): "
                "no KV head is left to stream; give only share 0"
            )
        if n == 0:
            outside = " outside its sliding-window layers" if layout.local_layers else ""
            raise WorkbenchError(
                f"a share of {share} of the model's {total} candidate KV heads{outside} rounds to none: give shares "
                f"of at least {0.5 / total:.3g}"
            )
        found.append(Choice(RANKED, 0, None, share, tuple(order[:n])))
        found += [Choice(RANDOM, d, seed + d, share, tuple(perm[:n])) for d, perm in enumerate(shuffled)]
    return found


def streaming_for(layout: KVLayout, kv_heads: Sequence[KVHead], sink: int, window: int) -> StreamingAttention | None:
    """The :class:`StreamingAttention` that makes every query head of ``kv_heads`` a streaming
    head (None when there are none: full attention)."""
    if not kv_heads:
        return None
    return StreamingAttention(window=window, keep_first=sink, heads=layout.mask(kv_heads))


def kv_memory(layout: KVLayout, counts: Sequence[tuple[float, int]], lengths: Sequence[int], sink: int, window: int):
    """The KV cache of one sequence with ``n`` candidate KV heads streaming, for each
    ``(share, n)`` of ``counts`` and each length: ``share, kv_heads, kv_heads_total`` (every KV
    head), ``length, kept_per_head`` (a streaming head's: ``min(L, sink + window)``), ``entries``
    (the uncompressed cache: ``L`` per KV head of a full-attention layer, ``min(L, w)`` of a
    layer with its own window ``w``; ``layers * KV heads * L`` without such layers),
    ``entries_kept``, ``saved_fraction``, ``bytes``, ``bytes_saved`` (an entry is a key and a
    value of ``d_head`` numbers at ``dtype``) and ``dtype``."""
    per_entry = 2 * layout.d_head * layout.itemsize
    rows = []
    for share, n in counts:
        for length in sorted(set(lengths)):
            kept = min(length, sink + window)
            entries = layout.kv_heads * sum(
                length if (w := layout.window_of(layer)) is None else min(length, w) for layer in range(layout.layers)
            )
            dropped = n * (length - kept)
            rows.append(
                (share, n, layout.total, length, kept, entries, entries - dropped, dropped / entries,
                 entries * per_entry, dropped * per_entry, layout.dtype)
            )  # fmt: skip
    columns = ["share", "kv_heads", "kv_heads_total", "length", "kept_per_head", "entries", "entries_kept"]
    return pd.DataFrame(rows, columns=[*columns, "saved_fraction", "bytes", "bytes_saved", "dtype"])


@dataclass(frozen=True)
class CompressionSettings:
    """One compression experiment.

    Attributes:
        rank_by: the run's score that ranks the heads (:data:`DIRECTIONS` says which end streams).
        score_task: the task of that score, when the run computed it on several.
        stream: ``"highest"`` or ``"lowest"``: which end of the ranking streams first, overriding
            :data:`DIRECTIONS` (needed for a score without a direction).
        shares: shares of the model's candidate KV heads made streaming (those outside its
            sliding-window layers; all of them for a full-attention model; 0 is the uncompressed
            model, which is always measured).
        sink: first tokens a streaming head keeps.
        window: recent tokens a streaming head keeps (itself included).
        tasks: ``niah`` (needle accuracy, greedy decoding, Wu et al.'s ROUGE rule) and/or ``text``
            (next-token loss).
        lengths: needle prompt lengths (None: the run's lengths).
        depths: needle depths.
        samples: needle samples per (length, depth).
        text_samples: text samples.
        text_length: tokens per text sample (None: the longest needle length); it must exceed
            ``sink + window + 1`` so that some tokens see the restriction.
        draws: random orders of the KV heads (the control); 0: none.
        seed: seeds the samples (offset by :data:`probes.ablation.FRESH_SAMPLES`) and the draws
            (draw ``d``: ``seed + d``).
        backend: kernel backend (``auto``, ``triton``, ``reference``).
        batch_size: samples per forward pass.
    """

    rank_by: str = "retrieval"
    score_task: str | None = None
    stream: str | None = None
    shares: tuple[float, ...] = (0.25, 0.5, 0.75)
    sink: int = 4
    window: int = 256
    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] | None = None
    depths: tuple[float, ...] = (0.2, 0.5, 0.8)
    samples: int = 4
    text_samples: int = 4
    text_length: int | None = None
    draws: int = 3
    seed: int = 0
    backend: str = "auto"
    batch_size: int = 8

    def __post_init__(self) -> None:
        try:
            shares = tuple(float(s) for s in self.shares)
            depths = tuple(float(d) for d in self.depths)
            lengths = None if self.lengths is None else tuple(int(n) for n in self.lengths)
        except (TypeError, ValueError):
            raise WorkbenchError("shares and depths must be numbers, lengths integers") from None
        bad = [s for s in shares if not 0.0 <= s <= 1.0 or math.isnan(s)]
        if not shares or bad:
            raise WorkbenchError(
                f"shares are fractions of the KV heads in [0, 1] (of those outside the model's sliding-window "
                f"layers, if it has any), got {list(shares) or 'none'}"
            )
        object.__setattr__(self, "shares", tuple(sorted(set(shares))))
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "lengths", lengths)
        tasks = tuple(dict.fromkeys(self.tasks))
        if not tasks or any(t not in TASKS for t in tasks):
            raise WorkbenchError(f"tasks must be among {', '.join(TASKS)}, got {list(self.tasks) or 'none'}")
        object.__setattr__(self, "tasks", tasks)
        for name, low in (("sink", 0), ("window", 1), ("samples", 1), ("text_samples", 1), ("draws", 0),
                          ("batch_size", 1)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise WorkbenchError(f"{name} must be an integer >= {low}, got {value!r}")
        if lengths is not None and (not lengths or min(lengths) < 8):
            raise WorkbenchError(f"lengths must be at least 8 tokens each, got {list(lengths)}")
        if self.text_length is not None and self.text_length < 2:
            raise WorkbenchError(f"text_length must be at least 2 tokens, got {self.text_length}")
        if self.backend not in BACKENDS:
            raise WorkbenchError(f"unknown kernel backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        direction_for(self.rank_by, self.stream)  # a score without a direction is refused here

    @property
    def direction(self) -> str:
        """Which end of the ranking streams first."""
        return direction_for(self.rank_by, self.stream)

    @property
    def name(self) -> str:
        """The experiment's name in the run folder: ``<rank_by>_<direction>``."""
        return f"{self.rank_by}_{self.direction}"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def resolved(self, run_lengths: Sequence[int] | None = None) -> CompressionSettings:
        """``lengths`` (the run's when None) and ``text_length`` (the longest length when None) set."""
        lengths = self.lengths or (tuple(int(n) for n in run_lengths) if run_lengths else None)
        if lengths is None:
            raise WorkbenchError("give the needle lengths (lengths=...): there is no run to take them from")
        return replace(self, lengths=lengths, text_length=self.text_length or max(lengths))


@dataclass
class Compression:
    """What :func:`compress` measured (tidy tables; the ``policy, draw, share, kv_heads`` columns
    name the set of streaming KV heads):

    - ``summary``: per set: ``seed``, ``kv_share`` (streamed / candidate KV heads: those outside
      sliding-window layers, all of them for a full-attention model), ``needle_accuracy``,
      ``text_loss`` (every position), ``text_loss_past_window`` (positions ``>= sink + window``,
      the rows that lose keys);
    - ``needles``: per set and (length, depth): ``samples``, ``correct``, ``accuracy``;
    - ``text``: per set and region (``all``, ``past_window``): ``start``, ``tokens``, ``loss``;
    - ``memory``: :func:`kv_memory` per share and length;
    - ``heads``: the streamed KV heads of each set (``layer, kv_head, query_heads, value``);
    - ``order``: the ranking's streaming order (:func:`stream_order`).
    """

    settings: CompressionSettings
    layout: KVLayout
    summary: pd.DataFrame
    needles: pd.DataFrame
    text: pd.DataFrame
    memory: pd.DataFrame
    heads: pd.DataFrame
    order: pd.DataFrame
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {name: getattr(self, name) for name in TABLES}


def text_ids(model: Model, settings: CompressionSettings, text: str | Path | None = None) -> torch.Tensor:
    """The text samples ``[text_samples, text_length]`` (:func:`probes.streaming.sample_ids`;
    ``text``: a file or folder, None: the built-in docstrings)."""
    streaming = StreamingSettings(
        length=settings.text_length, window=settings.window, samples=settings.text_samples, text=text
    )
    return sample_ids(model, streaming)


def _needle_results(adapter: ModelAdapter, samples, batch_size: int) -> list[bool]:
    """Whether greedy decoding retrieves each needle's answer (Wu et al.'s ROUGE rule)."""
    from workbench.models import task_tokenizer
    from workbench.scoring.formulas import answer_retrieved, answer_text

    tokenizer = task_tokenizer(adapter.model)
    answers = greedy_answers(adapter, samples, batch_size)
    return [
        answer_retrieved(answer_text(tokenizer, got), answer_text(tokenizer, s.answer))
        for got, s in zip(answers, samples)
    ]


@dataclass(frozen=True)
class Measurement:
    """What one set of streaming KV heads gives: ``correct`` (per needle of the workload, in its
    order: answer retrieved) and ``loss`` (``[text_samples, text_length - 1]`` next-token loss,
    float32, None without the text task)."""

    correct: tuple[bool, ...]
    loss: torch.Tensor | None

    @property
    def needle_accuracy(self) -> float:
        """Share of needles answered (NaN without needles)."""
        return sum(self.correct) / len(self.correct) if self.correct else math.nan

    def text_losses(self, start: int) -> tuple[float, float]:
        """Mean loss over every position and over positions ``>= start`` (NaN without text)."""
        if self.loss is None:
            return math.nan, math.nan
        return float(self.loss.double().mean()), float(self.loss[:, start:].double().mean())


@dataclass
class Workload:
    """What every set of streaming KV heads is measured on (:func:`workload`): the model's
    ``adapter`` and :class:`KVLayout`, the resolved ``settings``, the fresh ``needles`` (empty
    without the niah task) and the text ``ids`` ``[text_samples, text_length]`` (None without
    the text task)."""

    adapter: ModelAdapter
    layout: KVLayout
    settings: CompressionSettings
    needles: list
    ids: torch.Tensor | None

    @property
    def kept(self) -> int:
        """Keys a streaming head keeps: ``sink + window``."""
        return self.settings.sink + self.settings.window

    @property
    def lengths(self) -> tuple[int, ...]:
        """The sequence lengths measured (needle lengths, then the text length): the memory table's."""
        s = self.settings
        return (*(s.lengths if "niah" in s.tasks else ()), *((s.text_length,) if "text" in s.tasks else ()))

    @torch.no_grad()
    def measure(self, kv_heads: Sequence[KVHead]) -> Measurement:
        """Needle answers and text loss with every query head of ``kv_heads`` a streaming head
        (none: the uncompressed model through the same kernel path)."""
        s = self.settings
        streaming = streaming_for(self.layout, kv_heads, s.sink, s.window)
        correct: list[bool] = []
        if self.needles:
            with instrument(self.adapter, StatsSpec(), backend=s.backend, into=_Discard(), streaming=streaming):
                correct = _needle_results(self.adapter, self.needles, s.batch_size)
        loss = None
        if self.ids is not None:
            loss = streaming_losses(self.adapter, self.ids, streaming, s.backend, s.batch_size)
        return Measurement(tuple(correct), loss)


def workload(model: Model, settings: CompressionSettings, text: str | Path | None = None) -> Workload:
    """The :class:`Workload` of ``settings`` (``lengths`` must be set:
    :meth:`CompressionSettings.resolved`) on ``model``, checked: a causal language model, lengths
    within its context, needles longer and text samples longer than ``sink + window`` (else
    nothing would be compressed), some layer without its own sliding window (else no KV head
    could stream). Needles are fresh (seed + :data:`probes.ablation.FRESH_SAMPLES`); ``text`` is
    the text task's source."""
    from workbench.models import task_tokenizer
    from workbench.tasks import needle_samples

    s = settings.resolved()
    adapter = adapter_for(model)
    if not adapter.is_causal or not adapter.can_generate:
        raise WorkbenchError(
            "compression is measured by decoding and next-token loss: it needs a causal language model"
        )
    layout = kv_layout(adapter)
    if layout.candidate_total == 0:
        raise WorkbenchError(
            f"every layer of {adapter.name} attends within its own sliding window (layers "
            f"{list(layout.local_layers)}, windows {sorted(set(layout.local_windows))}): its cache already keeps "
            "only that window and no KV head is left to stream"
        )
    kept = s.sink + s.window
    for length in (*s.lengths, s.text_length):
        check_length(adapter, length)
    if "niah" in s.tasks and max(s.lengths) <= kept:
        raise WorkbenchError(
            f"every needle prompt (lengths {list(s.lengths)}) fits in sink + window = {kept} tokens: streaming heads "
            "would see every key and nothing is compressed; use longer --length or a smaller --window"
        )
    if "text" in s.tasks and s.text_length < kept + 2:
        raise WorkbenchError(
            f"text samples of {s.text_length} tokens have no position past sink + window = {kept}: give "
            f"--text-length {kept + 2} or more, or a smaller --window"
        )
    needles = (
        needle_samples(
            task_tokenizer(adapter.model), list(s.lengths), list(s.depths), s.samples, seed=s.seed + FRESH_SAMPLES
        )
        if "niah" in s.tasks
        else []
    )
    ids = text_ids(adapter, s, text) if "text" in s.tasks else None
    return Workload(adapter, layout, s, needles, ids)


@torch.no_grad()
def compress(
    model: Model,
    scores: pd.DataFrame,
    settings: CompressionSettings,
    text: str | Path | None = None,
    progress: bool = True,
) -> Compression:
    """The experiment on ``model``: rank its KV heads by ``scores`` (``layer, head, value`` per
    query head, :func:`head_values`), stream the shares of :attr:`CompressionSettings.shares`
    chosen by the ranking and at random, and measure each set against the uncompressed model
    (share 0, through the same kernel path with no streaming head). ``settings.lengths`` must
    be set (:meth:`CompressionSettings.resolved`); ``text`` is the text task's source. Each set
    is measured by :meth:`Workload.measure` (equal sets once)."""
    order = stream_order(scores, kv_layout(adapter_for(model)), settings.direction)  # its refusals first
    work = workload(model, settings, text)
    layout, s, needles, kept = work.layout, work.settings, work.needles, work.kept
    sets = choices(list(zip(order["layer"], order["kv_head"])), layout, s.shares, s.draws, s.seed)
    measured: dict[frozenset, Measurement] = {}  # equal sets measure the same
    summary, cells, regions = [], [], []
    for choice in tqdm(sets, desc="compressing", unit="set", disable=not progress):
        key = frozenset(choice.kv_heads)
        if key not in measured:
            measured[key] = work.measure(choice.kv_heads)
        found = measured[key]
        correct, loss = found.correct, found.loss
        label = (choice.policy, choice.draw, choice.share, len(choice.kv_heads))
        accuracy = found.needle_accuracy
        overall, past = found.text_losses(kept)
        if loss is not None:
            regions += [(*label, "all", 0, loss.numel(), overall),
                        (*label, "past_window", kept, loss[:, kept:].numel(), past)]  # fmt: skip
        if needles:
            by_cell: dict[tuple[int, float], list[bool]] = {}
            for sample, ok in zip(needles, correct):
                by_cell.setdefault((len(sample.ids) + len(sample.answer), float(sample.depth)), []).append(ok)
            cells += [(*label, n, d, len(v), sum(v), sum(v) / len(v)) for (n, d), v in by_cell.items()]
        summary.append((*label, choice.seed, len(choice.kv_heads) / layout.candidate_total, accuracy, overall, past))
    keys = ["policy", "draw", "share", "kv_heads"]
    summary = pd.DataFrame(
        summary, columns=[*keys, "seed", "kv_share", "needle_accuracy", "text_loss", "text_loss_past_window"]
    ).astype({"seed": "Int64"})
    value = {(r.layer, r.kv_head): (r.query_heads, r.value) for r in order.itertuples()}
    heads = pd.DataFrame(
        [
            (c.policy, c.draw, c.share, len(c.kv_heads), c.seed, i, layer, kv, *value[(layer, kv)])
            for c in sets
            for i, (layer, kv) in enumerate(c.kv_heads)
        ],
        columns=[*keys, "seed", "position", "layer", "kv_head", "query_heads", "value"],
    ).astype({"seed": "Int64"})
    counts = list(dict.fromkeys((0.0 if c.policy == NONE else c.share, len(c.kv_heads)) for c in sets))
    return Compression(
        settings=s,
        layout=layout,
        summary=summary,
        needles=pd.DataFrame(cells, columns=[*keys, "length", "depth", "samples", "correct", "accuracy"]),
        text=pd.DataFrame(regions, columns=[*keys, "region", "start", "tokens", "loss"]),
        memory=kv_memory(layout, counts, work.lengths, s.sink, s.window),
        heads=heads,
        order=order,
    )


# The experiment in a run folder (what `workbench compress` runs).


def compressions(run: Run) -> list[dict]:
    """The compression experiments the run's manifest records (``compressions``), oldest first."""
    found = run.manifest.get("compressions") or []
    return [c for c in found if isinstance(c, dict) and isinstance(c.get("name"), str)]


def read_compression(run: Run, name: str) -> dict[str, pd.DataFrame]:
    """The tables of the experiment ``name`` (:attr:`CompressionSettings.name`), checked
    against the manifest's sha256 (:data:`TABLES` -> table)."""
    if name not in {c["name"] for c in compressions(run)}:
        have = ", ".join(c["name"] for c in compressions(run)) or "none"
        raise WorkbenchError(f"the run in {run.path} has no compression {name!r} (it has: {have})")
    return {table: run.table(f"{FOLDER}/{name}_{table}") for table in TABLES}


def replacement_notes(run: Run, before: dict | None, now: dict, force: bool, held: str, earlier: str) -> list[str]:
    """Whether an experiment with settings ``now`` may be written into ``run``'s compress/ folder,
    where ``before`` are the recorded settings of the earlier one it would replace (None: there
    is none): other settings are refused (:class:`WorkbenchError`, naming ``held``, e.g. "the
    compression 'x'") unless ``force``; returns the note to print when it will be replaced
    ("replaced the earlier ``earlier`` ...")."""
    if before is None:
        return []
    if before != now and not force:
        changed = sorted(k for k, v in now.items() if before.get(k) != v)
        raise WorkbenchError(
            f"{run.path / FOLDER} already holds {held} with other settings (differing: {', '.join(changed)}); "
            "pass --force to replace it"
        )
    return [f"replaced the earlier {earlier} in {run.path / FOLDER}"]


def write_tables(run: Run, name: str, tables: dict[str, pd.DataFrame]) -> Path:
    """Each table as ``compress/<name>_<table>.parquet`` (committed in the manifest like the
    run's own tables) and ``.csv``; returns the folder."""
    folder = run.path / FOLDER
    for table, frame in tables.items():
        run.write_table(f"{FOLDER}/{name}_{table}", frame)
        atomic_write(folder / f"{name}_{table}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    return folder


def check_rerun(run: Run, settings: CompressionSettings, force: bool = False) -> list[str]:
    """Whether the experiment may be written into ``run``: an earlier one of the same name with
    other settings is refused (:class:`WorkbenchError`) unless ``force``; returns the note to
    print when an earlier one will be replaced. ``settings`` resolved against the run."""
    settings = settings.resolved(run.manifest["settings"].get("lengths"))
    name = settings.name
    before = next((c for c in compressions(run) if c["name"] == name), None)
    recorded = None if before is None else (before.get("settings") or {})
    return replacement_notes(
        run, recorded, settings.to_dict(), force, f"the compression {name!r}", f"compression {name!r}"
    )


def run_compression(
    run: Run | str | Path, model: Model, settings: CompressionSettings, force: bool = False, progress: bool = True
) -> Compression:
    """The experiment on a run folder: the run's ``rank_by`` scores rank the KV heads; needle
    lengths default to the run's and the text comes from the run's text source. Writes every
    table of :class:`Compression` as ``compress/<name>_<table>.parquet`` (committed in the
    manifest like the run's own tables) and ``.csv``, the figure ``compress/<name>.html`` (and
    ``.png`` when a browser is there) and an entry in the manifest's ``compressions``.

    Re-running: an experiment of the same name with the same settings is replaced (a note says
    so); with other settings it is refused unless ``force``."""
    from workbench.plots import compression_curve, save_figures

    run = run if isinstance(run, Run) else Run.open(run)
    recorded = run.manifest["settings"]
    settings = settings.resolved(recorded.get("lengths"))
    scores = head_values(run, settings.rank_by, settings.score_task)
    name = settings.name
    notes = check_rerun(run, settings, force)
    found = compress(model, scores, settings, text=recorded.get("text"), progress=progress)
    folder = write_tables(run, name, found.tables())
    warnings = save_figures({name: compression_curve(found.summary, settings.rank_by)}, folder)
    entries = [c for c in compressions(run) if c["name"] != name]
    run.manifest["compressions"] = entries + [
        {
            "name": name,
            "settings": settings.to_dict(),
            "direction": settings.direction,
            "kv_layout": asdict(found.layout),
            "tables": [f"{FOLDER}/{name}_{t}" for t in TABLES],
            "figure": f"{FOLDER}/{name}.html",
            "figure_warnings": warnings,
        }
    ]
    run.save_manifest()
    found.path, found.notes = folder, notes
    return found
