"""Which heads keep their full KV cache: the papers' head classifiers, side by side, each read
from a run's ``head_scores`` table and returned in one shape.

- :func:`razor_heads`: RazorAttention (Tang et al. 2024/2025): on random tokens repeated 4 times,
  the retrieval heads are the top 14% by induction score plus the top 1% by echo score
  (``duplicate_token`` here), ranked per KV head.
- :func:`wu_heads`: Wu et al. 2025: retrieval score above 0.1.
- :func:`streaming_heads`: the workbench's mass-based streaming score: a head that keeps less
  than ``threshold`` of its attention on the sink and the recent window needs full attention.
- :func:`duo_heads`: DuoAttention (Xiao et al. 2025): trained gate at or above 0.5 (or the top
  ``1 - sparsity`` of the gates).

Every classifier returns a tidy table, one row per (layer, query head), columns
:data:`COLUMNS`: ``classifier``, ``layer``, ``head``, ``score`` (the number the rule ranks,
oriented so that higher means more need of full attention), ``keep_full`` (True: the head keeps
its full cache, a retrieval / full-attention head) and ``detail`` (Razor: which of its two
rankings chose the head). :func:`classify` runs every classifier a run's scores allow;
:func:`head_mask` turns one classifier's rows into a boolean ``[n_layers, n_heads]``;
:func:`agreement` and :func:`score_correlations` compare them (docs/classifiers.md).

Example:
    >>> run = score_model(model, razor_settings("zoo-2l"), "runs/zoo-2l-razor")
    >>> razor_heads(run.table("head_scores"))
    >>> classify(run)  # every classifier the run's scores allow
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd
import torch

from workbench.errors import WorkbenchError
from workbench.scoring.formulas import RETRIEVAL_THRESHOLD
from workbench.scoring.settings import ScoreRunSettings

#: The columns of every classifier's table.
COLUMNS = ["classifier", "layer", "head", "score", "keep_full", "detail"]
#: The classifiers, in the order :func:`classify` runs them.
CLASSIFIERS = ("razor", "wu", "streaming", "duo")
#: RazorAttention's probe: random tokens repeated this many times (their ``REPET_TIMES``).
RAZOR_REPEATS = 4
#: RazorAttention's shares of the KV heads: top 14% by induction, top 1% by echo score.
RAZOR_INDUCTION_SHARE, RAZOR_ECHO_SHARE = 0.14, 0.01
#: The streaming classifier's default: a head keeping less than this share of its attention on the
#: first ``--sink-tokens`` and the last ``--window`` keys needs full attention.
STREAMING_THRESHOLD = 0.9
#: DuoAttention's deployment threshold on the gates (their ``full_attention_heads > 0.5``).
DUO_THRESHOLD = 0.5
#: Where the streaming score is read from when a run has several tasks: natural text first.
_STREAMING_TASKS = ("text", "niah", "repeats")


def razor_settings(model: str, lengths: Sequence[int] = (1024,), samples: int = 4, **options) -> ScoreRunSettings:
    """A scoring run with RazorAttention's probe: the ``repeats`` task with
    :data:`RAZOR_REPEATS` copies of random tokens (BOS, then 4 copies of ``(length - 1) // 4``
    tokens), scoring ``induction`` and ``duplicate_token`` (their echo score). The command line:
    ``workbench score --task repeats --repeats 4 --scores induction,duplicate_token --lengths 1024``.
    ``options``: any other :class:`ScoreRunSettings` field."""
    return ScoreRunSettings(
        model=model,
        tasks=("repeats",),
        scores=("induction", "duplicate_token"),
        lengths=tuple(lengths),
        samples=samples,
        repeats=RAZOR_REPEATS,
        **options,
    )


def top_count(n: int, share: float) -> int:
    """How many of ``n`` heads a top ``share`` holds: ``round(n * share)``, Python's round (half
    to even), as RazorAttention's code (``_select_top_heads``) counts. 14% of 8 heads is 1, of 12
    is 2, of 48 is 7; 1% is 0 below 50 heads."""
    if not 0.0 <= share <= 1.0:
        raise WorkbenchError(f"a share of heads lies in [0, 1], got {share}")
    return round(n * share)


def _score_grid(head_scores: pd.DataFrame, score: str, task: str | None = None) -> tuple[pd.DataFrame, str]:
    """One score's rows (``layer, head, value``) of one task, sorted; the task read. Without
    ``task`` the score must have one task, or :data:`_STREAMING_TASKS` order decides."""
    rows = head_scores[head_scores["score"] == score]
    if rows.empty:
        raise WorkbenchError(f"the head scores hold no {score!r} score: score the run with --scores including {score}")
    tasks = list(dict.fromkeys(rows["task"]))
    if task is None:
        task = next((t for t in _STREAMING_TASKS if t in tasks), tasks[0]) if len(tasks) > 1 else tasks[0]
    if task not in tasks:
        raise WorkbenchError(f"the {score!r} score has no rows of task {task!r} (it has: {', '.join(tasks)})")
    rows = rows[rows["task"] == task].sort_values(["layer", "head"])
    return rows[["layer", "head", "value"]].reset_index(drop=True), task


def _table(name: str, grid: pd.DataFrame, score, keep, detail) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "classifier": name,
            "layer": grid["layer"].astype(int).to_numpy(),
            "head": grid["head"].astype(int).to_numpy(),
            "score": np.asarray(score, dtype=float),
            "keep_full": np.asarray(keep, dtype=bool),
            "detail": detail if isinstance(detail, str) else list(detail),
        }
    )
    return out[COLUMNS]


def _top(values: pd.Series, k: int) -> pd.Series:
    """True for the values among the ``k`` largest (NaN never; ties at the cut-off all chosen,
    as their ``value in percent_values``)."""
    finite = values.dropna()
    if k <= 0 or finite.empty:
        return pd.Series(False, index=values.index)
    cut = finite.nlargest(min(k, len(finite))).iloc[-1]
    return values.ge(cut).fillna(False)


def razor_heads(
    head_scores: pd.DataFrame,
    *,
    induction_share: float = RAZOR_INDUCTION_SHARE,
    echo_share: float = RAZOR_ECHO_SHARE,
    kv_heads: int | None = None,
) -> pd.DataFrame:
    """RazorAttention's retrieval heads from a run scored on 4 copies of random tokens
    (:func:`razor_settings`): ``induction`` and ``duplicate_token`` (their echo score) of the
    ``repeats`` task.

    As their code does (mindspore-ai/golden-stick, ``razor_attention.py``): each KV head's score
    is the max over its query heads (``kv_heads`` per layer; None: no grouped-query attention);
    the KV heads are ranked over the whole model; the top ``round(n * induction_share)`` by
    induction and the top ``round(n * echo_share)`` by echo (``n``: all KV heads; ties at the
    cut-off included) are retrieval heads, their union kept full, every query head of a chosen
    KV head with it. ``score``: the KV head's induction score; ``detail``: ``induction``,
    ``echo``, both, or empty."""
    induction, _ = _score_grid(head_scores, "induction", "repeats")
    echo, _ = _score_grid(head_scores, "duplicate_token", "repeats")
    n_heads = int(induction["head"].max()) + 1
    group = n_heads // (kv_heads or n_heads)
    if kv_heads is not None and (kv_heads < 1 or n_heads % kv_heads):
        raise WorkbenchError(
            f"{kv_heads} KV heads cannot serve {n_heads} query heads per layer: give the model's number of "
            "key/value heads (its config's n_key_value_heads or num_key_value_heads)"
        )
    kv = induction["layer"] * (n_heads // group) + induction["head"] // group  # a KV head's index in the model

    def by_kv(values: pd.Series) -> pd.Series:  # [query heads] -> each one's KV-head max
        return values.groupby(kv).transform("max")

    ind, ech = by_kv(induction["value"]), by_kv(echo["value"])
    per_kv = pd.DataFrame({"kv": kv, "induction": ind, "echo": ech}).drop_duplicates("kv").set_index("kv")
    n = len(per_kv)
    chose_ind = _top(per_kv["induction"], top_count(n, induction_share)).reindex(kv).to_numpy()
    chose_echo = _top(per_kv["echo"], top_count(n, echo_share)).reindex(kv).to_numpy()
    detail = [",".join(w for w, c in (("induction", i), ("echo", e)) if c) for i, e in zip(chose_ind, chose_echo)]
    return _table("razor", induction, ind, chose_ind | chose_echo, detail)


def wu_heads(head_scores: pd.DataFrame, *, threshold: float = RETRIEVAL_THRESHOLD) -> pd.DataFrame:
    """Wu et al.'s retrieval heads: retrieval score above ``threshold`` (0.1); a head no sample
    counted (NaN) is not one. ``score``: the retrieval score."""
    grid, _ = _score_grid(head_scores, "retrieval", "niah")
    return _table("wu", grid, grid["value"], grid["value"].gt(threshold).fillna(False), "")


def streaming_heads(
    head_scores: pd.DataFrame,
    *,
    threshold: float = STREAMING_THRESHOLD,
    full_share: float | None = None,
    task: str | None = None,
) -> pd.DataFrame:
    """The mass-based classifier: a head whose ``streaming`` score (mass on the first
    ``--sink-tokens`` and the last ``--window`` keys) is below ``threshold`` needs full attention;
    with ``full_share``, instead the ``round(n * full_share)`` heads with the least streaming
    mass do (ties included). ``score``: ``1 - streaming``, the mass outside the sink and the
    window. ``task``: which task's score (default: text, else niah, else repeats)."""
    grid, _ = _score_grid(head_scores, "streaming", task)
    outside = 1.0 - grid["value"]
    if full_share is None:
        keep = grid["value"].lt(threshold).fillna(False)
    else:
        keep = _top(outside, top_count(len(grid), full_share))
    return _table("streaming", grid, outside, keep, "")


def duo_heads(
    head_scores: pd.DataFrame, *, threshold: float = DUO_THRESHOLD, sparsity: float | None = None
) -> pd.DataFrame:
    """DuoAttention's full-attention heads: gate at or above ``threshold`` (0.5); with
    ``sparsity`` (their deployment option, the share of streaming heads), gates at or above the
    ``sparsity`` quantile of all gates (numpy's linear quantile, as their
    ``sparsify_attention_heads``; they add noise below 1e-6 to break ties, we keep ties full).
    ``score``: the gate."""
    grid, _ = _score_grid(head_scores, "duo")
    gates = grid["value"]
    if sparsity is not None:
        if not 0.0 <= sparsity <= 1.0:
            raise WorkbenchError(f"sparsity is the share of streaming heads, in [0, 1], got {sparsity}")
        threshold = 2.0 if sparsity >= 1 else -1.0 if sparsity <= 0 else float(np.quantile(gates, sparsity))
    return _table("duo", grid, gates, gates.ge(threshold).fillna(False), "")


def classify(
    run_or_table,
    classifiers: Sequence[str] | None = None,
    *,
    kv_heads: int | None = None,
    streaming_threshold: float = STREAMING_THRESHOLD,
    streaming_share: float | None = None,
    duo_threshold: float = DUO_THRESHOLD,
) -> pd.DataFrame:
    """Every classifier of ``classifiers`` (default: all that the scores allow) on a run (a
    :class:`~workbench.runs.Run`) or a ``head_scores`` table, concatenated (:data:`COLUMNS`).
    Asked-for classifiers whose scores are missing raise :class:`WorkbenchError`. A run scored
    with ``--repeats`` other than 4 gets a warning for Razor (its rule is for 4 copies);
    ``kv_heads`` defaults to the run's ``model_info.kv_heads`` when it records one."""
    head_scores = run_or_table if isinstance(run_or_table, pd.DataFrame) else run_or_table.table("head_scores")
    manifest = {} if isinstance(run_or_table, pd.DataFrame) else run_or_table.manifest
    if kv_heads is None:
        kv_heads = manifest.get("model_info", {}).get("kv_heads")
    present = set(head_scores["score"])
    needs = {"razor": {"induction", "duplicate_token"}, "wu": {"retrieval"}, "streaming": {"streaming"}, "duo": {"duo"}}
    asked = classifiers is not None
    chosen = list(classifiers) if asked else [c for c in CLASSIFIERS if needs[c] <= present]
    unknown = [c for c in chosen if c not in CLASSIFIERS]
    if unknown:
        raise WorkbenchError(f"unknown classifier(s) {unknown}; choose from: {', '.join(CLASSIFIERS)}")
    missing = {c: sorted(needs[c] - present) for c in chosen if not needs[c] <= present}
    if missing:
        listed = "; ".join(f"{c} needs {', '.join(m)}" for c, m in missing.items())
        raise WorkbenchError(f"the run lacks the scores some classifiers read ({listed}): score it with those --scores")
    repeats = manifest.get("settings", {}).get("repeats")
    if "razor" in chosen and repeats is not None and repeats != RAZOR_REPEATS:
        warnings.warn(
            f"RazorAttention's rule is for {RAZOR_REPEATS} copies of random tokens; this run has --repeats "
            f"{repeats} (induction and echo scores scale with the copies): score with --repeats 4",
            RuntimeWarning,
            stacklevel=2,
        )
    run = {
        "razor": lambda: razor_heads(head_scores, kv_heads=kv_heads),
        "wu": lambda: wu_heads(head_scores),
        "streaming": lambda: streaming_heads(head_scores, threshold=streaming_threshold, full_share=streaming_share),
        "duo": lambda: duo_heads(head_scores, threshold=duo_threshold),
    }
    if not chosen:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat([run[c]() for c in chosen], ignore_index=True)


def head_mask(classified: pd.DataFrame, classifier: str | None = None) -> torch.Tensor:
    """Boolean ``[n_layers, n_heads]`` (True: keep full) of one classifier's rows (``classifier``
    may be left out when the table holds one)."""
    names = list(dict.fromkeys(classified["classifier"]))
    if classifier is None:
        if len(names) != 1:
            raise WorkbenchError(f"the table holds the classifiers {names}: name one")
        classifier = names[0]
    rows = classified[classified["classifier"] == classifier]
    if rows.empty:
        raise WorkbenchError(f"no rows of classifier {classifier!r} (the table has: {', '.join(names)})")
    mask = torch.zeros(int(rows["layer"].max()) + 1, int(rows["head"].max()) + 1, dtype=torch.bool)
    mask[torch.tensor(rows["layer"].to_numpy()), torch.tensor(rows["head"].to_numpy())] = torch.tensor(
        rows["keep_full"].to_numpy(dtype=bool)
    )
    return mask


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (average ranks for ties; pairs
    with a NaN dropped); NaN when fewer than 3 pairs remain or either side is constant."""
    frame = pd.DataFrame({"a": np.asarray(a, dtype=float), "b": np.asarray(b, dtype=float)}).dropna()
    if len(frame) < 3:
        return float("nan")
    ra, rb = frame["a"].rank().to_numpy(), frame["b"].rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(classified: pd.DataFrame) -> pd.DataFrame:
    """Every pair of classifiers in ``classified``: ``a, b``, the heads each keeps full
    (``full_a``, ``full_b``), ``both``, ``jaccard`` (both / either; NaN when neither keeps any)
    and ``spearman`` of their ``score`` columns over the heads."""
    wide = classified.pivot(index=["layer", "head"], columns="classifier", values=["keep_full", "score"])
    rows = []
    names = list(dict.fromkeys(classified["classifier"]))
    for a, b in combinations(names, 2):
        ka, kb = wide["keep_full"][a].astype(bool), wide["keep_full"][b].astype(bool)
        both, either = int((ka & kb).sum()), int((ka | kb).sum())
        rows.append(
            {
                "a": a,
                "b": b,
                "full_a": int(ka.sum()),
                "full_b": int(kb.sum()),
                "both": both,
                "jaccard": both / either if either else float("nan"),
                "spearman": spearman(wide["score"][a], wide["score"][b]),
            }
        )
    return pd.DataFrame(rows, columns=["a", "b", "full_a", "full_b", "both", "jaccard", "spearman"])
