"""Each head classifier's compression what-if, side by side: every KV head that a classifier
(:mod:`workbench.scoring.classifiers`: RazorAttention, Wu et al.'s retrieval heads, the streaming
mass, DuoAttention's gates) does not keep full becomes a streaming head (the first ``sink`` and
the last ``window`` keys, in prefill and decoding), and the model is measured as
:func:`probes.compress.compress` measures each set: needle accuracy, text loss overall and past
``sink + window``, the KV cache saved; against the uncompressed model and, per classifier, random
sets of as many KV heads.

Which KV heads stream (:func:`classifier_sets`). The cache is held per KV head; under
grouped-query attention a KV head serves a group of query heads (query head ``h`` reads KV head
``h // (heads / kv_heads)``), and it can only stream when none of its query heads needs full
attention: a group stays full if any of its query heads is ``keep_full``. So a classifier's set
is the KV heads none of whose query heads it keeps full. A layer with its own sliding window
(:attr:`probes.compress.KVLayout.local_layers`) already keeps only its window and never streams,
whatever the classifier says of its heads.

Control. For a classifier streaming ``n`` KV heads, ``draws`` random sets of ``n`` KV heads,
draw ``d`` the first ``n`` of ``random.Random(seed + d)``'s order of the candidate KV heads
(:meth:`probes.compress.KVLayout.candidates`: all of them without sliding-window layers), exactly as
:func:`probes.compress.choices` draws them (classifiers streaming as many heads share their
draws). Equal sets, across classifiers and draws, are measured once.

Settings: :class:`probes.compress.CompressionSettings`; ``sink``, ``window``, ``tasks``,
``lengths``, ``depths``, ``samples``, ``text_samples``, ``text_length``, ``draws``, ``seed``,
``backend`` and ``batch_size`` apply; ``rank_by``, ``score_task``, ``stream`` and ``shares``
(:data:`IGNORED`) have no meaning here (the classifiers choose the heads and their number) and
are left out of what the run folder records.

Example:
    >>> classified = classify(run)  # razor, wu, streaming, duo: whichever the run's scores allow
    >>> found = compare_classifiers(model, classified, CompressionSettings(lengths=(1024,), window=256))
    >>> found.summary   # classifier, kv_heads_full, kv_heads_streamed, needle_accuracy, random_..., ...
    >>> run_classifier_comparison(run, model, settings)   # the same, into run/compress/classifiers_*
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from probes.compress import (
    FOLDER,
    NONE,
    RANDOM,
    CompressionSettings,
    KVHead,
    KVLayout,
    Measurement,
    Model,
    choices,
    kv_memory,
    replacement_notes,
    workload,
    write_tables,
)
from workbench.errors import WorkbenchError
from workbench.runs import Run
from workbench.scoring.classifiers import CLASSIFIERS, classify

#: The experiment's name in the run folder: tables ``compress/classifiers_<table>``.
NAME = "classifiers"
#: The tables it writes (``compress/classifiers_<table>.parquet`` and ``.csv``).
TABLES = ("summary", "draws", "heads")
#: The manifest key of its entry (a sibling of ``compressions``).
MANIFEST_KEY = "classifier_compression"
#: Fields of :class:`CompressionSettings` that have no meaning here.
IGNORED = ("rank_by", "score_task", "stream", "shares")
#: What each classifier reads, for the messages that name the scores to compute.
READS = {
    "razor": "induction and duplicate_token of --task repeats --repeats 4",
    "wu": "retrieval (--task niah)",
    "streaming": "streaming",
    "duo": "duo (--scores duo, TransformerLens models)",
}


def classifier_sets(classified: pd.DataFrame, layout: KVLayout) -> dict[str, tuple[KVHead, ...]]:
    """For each classifier in ``classified`` (columns ``classifier, layer, head, keep_full``,
    :func:`workbench.scoring.classifiers.classify`; first-seen order), the KV heads that stream:
    the candidates (:meth:`probes.compress.KVLayout.candidates`: none of a sliding-window layer)
    none of whose query heads is ``keep_full``, layer by layer. Each classifier's rows must cover
    every query head of ``layout`` once."""
    missing = {"classifier", "layer", "head", "keep_full"} - set(classified.columns)
    if missing:
        raise WorkbenchError(f"the classifier table lacks the columns {sorted(missing)} (classify(run) gives them)")
    want = {(layer, head) for layer in range(layout.layers) for head in range(layout.heads)}
    sets: dict[str, tuple[KVHead, ...]] = {}
    for name in dict.fromkeys(classified["classifier"]):
        rows = classified[classified["classifier"] == name]
        have = list(zip(rows["layer"].astype(int), rows["head"].astype(int)))
        if len(have) != len(set(have)) or set(have) != want:
            raise WorkbenchError(
                f"the {name!r} classifier's rows must hold every head of the model once ({layout.layers} layers of "
                f"{layout.heads} heads); they hold {len(have)} rows for {len(set(have) & want)} of the {len(want)} "
                "heads: does the run belong to this model?"
            )
        full = {(layer, head // layout.group) for (layer, head), keep in zip(have, rows["keep_full"]) if bool(keep)}
        sets[str(name)] = tuple(kv for kv in layout.candidates() if kv not in full)
    return sets


def random_sets(layout: KVLayout, n: int, draws: int, seed: int) -> list[tuple[int, tuple[KVHead, ...]]]:
    """``(seed, KV heads)`` of each of ``draws`` random sets of ``n`` candidate KV heads, drawn as
    :func:`probes.compress.choices` draws them (draw ``d``: ``random.Random(seed + d)``)."""
    if n == 0:
        return [(seed + d, ()) for d in range(draws)]
    drawn = choices(layout.candidates(), layout, (n / layout.candidate_total,), draws, seed)
    found = [(c.seed, c.kv_heads) for c in drawn if c.policy == RANDOM]
    assert all(len(heads) == n for _, heads in found)
    return found


def comparison_settings(settings: CompressionSettings) -> dict:
    """The settings the comparison depends on (:meth:`CompressionSettings.to_dict` without
    :data:`IGNORED`), as the manifest records them."""
    return {k: v for k, v in settings.to_dict().items() if k not in IGNORED}


@dataclass
class ClassifierComparison:
    """What :func:`compare_classifiers` measured (tidy tables):

    - ``summary``: one row for the uncompressed model (``classifier`` ``none``), then one per
      classifier: ``heads_full`` (query heads it keeps full), ``kv_heads_full`` (candidate KV
      heads kept full), ``kv_heads_streamed``, ``kv_share`` (streamed / candidate KV heads: those
      outside sliding-window layers, all of them for a full-attention model), ``needle_accuracy``,
      ``text_loss``, ``text_loss_past_window``, ``kv_saved_fraction`` and ``kv_bytes_saved``
      (:func:`probes.compress.kv_memory` at ``kv_length``, the longest length measured),
      ``random_draws`` and the random sets' means ``random_needle_accuracy``,
      ``random_text_loss``, ``random_text_loss_past_window`` (NaN for ``none`` or no draws);
    - ``draws``: each random set: ``classifier, draw, seed, kv_heads, needle_accuracy,
      text_loss, text_loss_past_window``;
    - ``heads``: per classifier and KV head: ``layer, kv_head, query_heads`` (``"0 1"``),
      ``query_heads_full`` (those the classifier keeps full) and ``streams``.
    """

    settings: CompressionSettings
    layout: KVLayout
    summary: pd.DataFrame
    draws: pd.DataFrame
    heads: pd.DataFrame
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {name: getattr(self, name) for name in TABLES}


SUMMARY_COLUMNS = [
    "classifier", "heads_full", "kv_heads_full", "kv_heads_streamed", "kv_share", "needle_accuracy", "text_loss",
    "text_loss_past_window", "kv_length", "kv_saved_fraction", "kv_bytes_saved", "random_draws",
    "random_needle_accuracy", "random_text_loss", "random_text_loss_past_window",
]  # fmt: skip
MEASURES = ["needle_accuracy", "text_loss", "text_loss_past_window"]


@torch.no_grad()
def compare_classifiers(
    model: Model,
    classified: pd.DataFrame,
    settings: CompressionSettings,
    text: str | Path | None = None,
    progress: bool = True,
) -> ClassifierComparison:
    """Stream, for each classifier of ``classified`` (:func:`workbench.scoring.classifiers.classify`),
    the KV heads it does not keep full (:func:`classifier_sets`), and ``settings.draws`` random
    sets of as many KV heads; measure each set with :meth:`probes.compress.Workload.measure`
    (what :func:`probes.compress.compress` measures per set; equal sets once) against the
    uncompressed model. ``settings.lengths`` must be set; :data:`IGNORED` fields are not read;
    ``text`` is the text task's source."""
    work = workload(model, settings, text)
    layout, s = work.layout, work.settings
    sets = classifier_sets(classified, layout)
    if not sets:
        raise WorkbenchError("the classifier table holds no classifier: classify(run) gives one")
    drawn = {name: random_sets(layout, len(heads), s.draws, s.seed) for name, heads in sets.items()}
    wanted = [(), *sets.values(), *(heads for found in drawn.values() for _, heads in found)]
    unique = list({frozenset(heads): heads for heads in wanted}.values())
    measured: dict[frozenset, Measurement] = {}
    for heads in tqdm(unique, desc="compressing by classifier", unit="set", disable=not progress):
        measured[frozenset(heads)] = work.measure(heads)

    def values(heads: Sequence[KVHead]) -> list[float]:
        found = measured[frozenset(heads)]
        return [found.needle_accuracy, *found.text_losses(work.kept)]

    longest = max(work.lengths)
    counts = sorted({len(heads) for heads in wanted})
    candidates = layout.candidate_total  # > 0: workload() refuses a model without any
    memory = kv_memory(layout, [(n / candidates, n) for n in counts], [longest], s.sink, s.window)
    saved = {int(r.kv_heads): (r.saved_fraction, int(r.bytes_saved)) for r in memory.itertuples()}
    full_heads = classified.groupby("classifier", sort=False)["keep_full"].sum()
    rows = [(NONE, layout.layers * layout.heads, candidates, 0, 0.0, *values(()), longest, *saved[0], 0,
             math.nan, math.nan, math.nan)]  # fmt: skip
    draw_rows = []
    for name, heads in sets.items():
        randoms = [(seed, values(found)) for seed, found in drawn[name]]
        draw_rows += [(name, d, seed, len(heads), *v) for d, (seed, v) in enumerate(randoms)]
        means = [sum(v[i] for _, v in randoms) / len(randoms) if randoms else math.nan for i in range(3)]
        n = len(heads)
        rows.append((name, int(full_heads[name]), candidates - n, n, n / candidates, *values(heads), longest,
                     *saved[n], len(randoms), *means))  # fmt: skip
    heads_rows = []
    for name, heads in sets.items():
        mine = classified[classified["classifier"] == name]
        full = {(int(r.layer), int(r.head)) for r in mine.itertuples() if bool(r.keep_full)}
        streams = set(heads)
        for layer, kv in layout.all_kv():
            query = list(layout.query_heads(kv))
            kept = " ".join(str(h) for h in query if (layer, h) in full)
            heads_rows.append((name, layer, kv, " ".join(map(str, query)), kept, (layer, kv) in streams))
    return ClassifierComparison(
        settings=s,
        layout=layout,
        summary=pd.DataFrame(rows, columns=SUMMARY_COLUMNS),
        draws=pd.DataFrame(draw_rows, columns=["classifier", "draw", "seed", "kv_heads", *MEASURES]),
        heads=pd.DataFrame(
            heads_rows, columns=["classifier", "layer", "kv_head", "query_heads", "query_heads_full", "streams"]
        ),
    )


# The comparison in a run folder (what `workbench compress --classifiers` runs).


def run_classifiers(run: Run, classifiers: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The run's classifier table (:func:`workbench.scoring.classifiers.classify`) and a note per
    classifier skipped because the run lacks its scores. ``classifiers``: those to run (a
    missing score is then refused); None: every one the scores allow, :class:`WorkbenchError`
    naming the scores to compute when none is."""
    if classifiers is not None:
        return classify(run, classifiers), []
    classified = classify(run)
    present = set(classified["classifier"])
    skipped = [name for name in CLASSIFIERS if name not in present]
    if not present:
        needs = "; ".join(f"{name} reads {READS[name]}" for name in skipped)
        raise WorkbenchError(
            f"the run in {run.path} has none of the scores the head classifiers read ({needs}): score it with "
            "those --scores, e.g. `workbench score --task niah,text --scores retrieval,streaming`"
        )
    return classified, [f"skipped {name}: it reads {READS[name]}, which the run has not scored" for name in skipped]


def classifier_comparison(run: Run) -> dict | None:
    """The manifest's entry of the run's classifier comparison (None when there is none)."""
    entry = run.manifest.get(MANIFEST_KEY)
    return entry if isinstance(entry, dict) else None


def read_classifier_comparison(run: Run) -> dict[str, pd.DataFrame]:
    """The comparison's tables (:data:`TABLES` -> table), checked against the manifest's sha256."""
    if classifier_comparison(run) is None:
        raise WorkbenchError(
            f"the run in {run.path} has no classifier comparison: `workbench compress --run {run.path} "
            "--classifiers` makes one"
        )
    return {table: run.table(f"{FOLDER}/{NAME}_{table}") for table in TABLES}


def check_classifier_rerun(run: Run, settings: CompressionSettings, force: bool = False) -> list[str]:
    """Whether the comparison may be written into ``run``: an earlier one with other settings
    (:func:`comparison_settings`) is refused unless ``force``; returns the note to print when
    an earlier one will be replaced."""
    settings = settings.resolved(run.manifest["settings"].get("lengths"))
    before = classifier_comparison(run)
    recorded = None if before is None else (before.get("settings") or {})
    return replacement_notes(
        run, recorded, comparison_settings(settings), force, "a classifier comparison", "classifier comparison"
    )


def run_classifier_comparison(
    run: Run | str | Path,
    model: Model,
    settings: CompressionSettings,
    force: bool = False,
    progress: bool = True,
    classifiers: Sequence[str] | None = None,
) -> ClassifierComparison:
    """The comparison on a run folder: every classifier the run's scores allow (or
    ``classifiers``; the others skipped with a note), needle lengths defaulting to the run's and
    the text from the run's text source. Writes each table of :class:`ClassifierComparison` as
    ``compress/classifiers_<table>.parquet`` (committed in the manifest) and ``.csv``, and the
    manifest entry :data:`MANIFEST_KEY` (settings, classifiers, skipped, KV layout, tables).
    Re-running with the same settings replaces it (a note says so); other settings are refused
    unless ``force``."""
    run = run if isinstance(run, Run) else Run.open(run)
    recorded = run.manifest["settings"]
    settings = settings.resolved(recorded.get("lengths"))
    classified, notes = run_classifiers(run, classifiers)
    notes += check_classifier_rerun(run, settings, force)
    found = compare_classifiers(model, classified, settings, text=recorded.get("text"), progress=progress)
    folder = write_tables(run, NAME, found.tables())
    run.manifest[MANIFEST_KEY] = {
        "name": NAME,
        "settings": comparison_settings(settings),
        "classifiers": [c for c in found.summary["classifier"] if c != NONE],
        "skipped": [n for n in notes if n.startswith("skipped")],
        "kv_layout": asdict(found.layout),
        "tables": [f"{FOLDER}/{NAME}_{t}" for t in TABLES],
    }
    run.save_manifest()
    found.path, found.notes = folder, notes
    return found
