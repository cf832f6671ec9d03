"""Head ablation: replace chosen heads' outputs ``z`` (per head, before the output projection:
``hook_z`` on TransformerLens models, the input of ``o_proj`` on Hugging Face models) and
measure what that does to a metric.

- ``zero``: ``z = 0``;
- ``mean``: ``z`` = the head's mean over every position of a reference batch;
- ``resample``: ``z`` = the head's output at the same position on a randomly drawn reference
  input (the reference inputs must be at least as long).

Works together with statistics recording (ablate inside ``instrument``, or the other way round).
Every function takes a model or its :class:`~workbench.adapters.ModelAdapter`; the experiments
resolve the adapter once and pass it along.

Example:
    >>> metric = needle_accuracy(needle_samples(model.tokenizer, [512], [0.2, 0.5, 0.8], 8))
    >>> with ablate(model, [(1, 1)]):
    ...     metric(model)
    >>> scan_heads(model, metric)                    # every head alone: layer, head, value, delta
    >>> cumulative(model, metric, rank_heads(run, "retrieval"), ks=[1, 2, 4])
    >>> run_ablation(run, model, AblationSettings(rank_by="retrieval", ks=(1, 2)))  # all of it, into the run
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.adapters import ModelAdapter, adapter_for
from workbench.errors import WorkbenchError
from workbench.runs import Run
from workbench.tasks import TaskSample, second_copy_start

Head = tuple[int, int]
Model = torch.nn.Module | ModelAdapter
#: A function of the model (called with what the experiment was given: a model or its adapter)
#: that returns one number.
Metric = Callable[[Model], float]
METHODS = ("zero", "mean", "resample")
CONTROLS = ("all", "same_layers")


def all_heads(model: Model) -> list[Head]:
    """Every ``(layer, head)`` of the model, layer by layer."""
    adapter = adapter_for(model)
    n_heads, _ = adapter.head_shape
    return [(layer, head) for layer in range(adapter.n_layers) for head in range(n_heads)]


def check_heads(model: Model, heads: Iterable[Head]) -> list[Head]:
    """The heads as ``(layer, head)`` tuples; :class:`WorkbenchError` for an empty set or heads
    out of range."""
    heads = [tuple(int(x) for x in h) for h in heads]
    if not heads:
        raise WorkbenchError("the set of heads to ablate is empty")
    adapter = adapter_for(model)
    valid = set(all_heads(adapter))
    bad = [h for h in heads if h not in valid]
    if bad:
        raise WorkbenchError(
            f"heads {bad} out of range: the model has {adapter.n_layers} layers of "
            f"{adapter.head_shape[0]} heads (layer and head count from 0)"
        )
    return heads


@torch.no_grad()
def head_outputs(model: Model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's ``z [batch, tokens, head, d_head]`` on ``ids [batch, tokens]``."""
    adapter = adapter_for(model)
    seen: dict[int, torch.Tensor] = {}
    remove = adapter.z_hooks(lambda layer, z: seen.__setitem__(layer, z.detach().clone()))
    try:
        adapter.logits(ids.to(adapter.device))
    finally:
        remove()
    return seen


@contextmanager
def ablate(
    model: Model, heads: Iterable[Head], method: str = "zero", reference: torch.Tensor | None = None, seed: int = 0
) -> Iterator[list[Head]]:
    """Within the block, ``heads`` are ablated with ``method`` in every forward pass.
    ``reference [batch, tokens]``: token ids for ``mean`` and ``resample``."""
    adapter = adapter_for(model)
    heads = check_heads(adapter, heads)
    _check_method(method)
    if method != "zero" and reference is None:
        raise WorkbenchError(f"{method} ablation needs reference token ids (reference=[batch, tokens])")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    ref = head_outputs(adapter, reference) if method != "zero" else {}
    gen = torch.Generator().manual_seed(seed)

    def edit(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        chosen = by_layer.get(layer)
        if not chosen:
            return None
        z = z.clone()
        if method == "zero":
            z[:, :, chosen] = 0
        elif method == "mean":
            z[:, :, chosen] = ref[layer][:, :, chosen].mean((0, 1)).to(z.dtype)
        else:
            source = ref[layer]
            if source.shape[1] < z.shape[1]:
                raise WorkbenchError(
                    f"resample ablation: reference inputs of {source.shape[1]} tokens are shorter "
                    f"than the {z.shape[1]}-token input"
                )
            rows = torch.randint(0, source.shape[0], (z.shape[0],), generator=gen).to(source.device)
            z[:, :, chosen] = source[rows, : z.shape[1]][:, :, chosen].to(z.dtype)
        return z

    remove = adapter.z_hooks(edit)
    try:
        yield heads
    finally:
        remove()


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise WorkbenchError(f"unknown ablation method {method!r}; choose one of: {', '.join(METHODS)}")


# Metrics: functions of the model that return one number (higher or lower is better, as named).


def _groups(keys: Sequence, size: int) -> Iterator[list[int]]:
    """Indices of items with equal ``keys`` (so they stack into one batch), ``size`` at a time."""
    by_key: dict = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    for group in by_key.values():
        for i in range(0, len(group), size):
            yield group[i : i + size]


@torch.no_grad()
def _teacher_forced(model: Model, samples: Sequence[TaskSample], batch_size: int) -> list[tuple[float, bool]]:
    """For each needle sample: (log-probability of the answer, whether greedy decoding would
    produce it exactly). Greedy decoding reproduces the answer iff the argmax is right at every
    answer position given the right prefix, so one teacher-forced forward decides both."""
    adapter = adapter_for(model)
    device = adapter.device
    results: list[tuple[float, bool]] = [(0.0, False)] * len(samples)
    for chunk in _groups([(len(s.ids), len(s.answer)) for s in samples], batch_size):
        batch = torch.stack([torch.cat([samples[i].ids, samples[i].answer[:-1]]) for i in chunk])
        logp = torch.log_softmax(adapter.logits(batch.to(device)).float(), -1)
        for row, i in zip(logp, chunk):
            steps = row[len(samples[i].ids) - 1 :]  # the rows that predict the answer tokens
            answer = samples[i].answer.to(device)
            results[i] = (float(steps.gather(-1, answer.view(-1, 1)).sum()), bool((steps.argmax(-1) == answer).all()))
    return results


def needle_accuracy(samples: Sequence[TaskSample], batch_size: int = 8) -> Metric:
    """Share of needle samples whose answer greedy decoding reproduces exactly."""
    _needles(samples)
    return lambda model: sum(ok for _, ok in _teacher_forced(model, samples, batch_size)) / len(samples)


def answer_logprob(samples: Sequence[TaskSample], batch_size: int = 8) -> Metric:
    """Mean log-probability of the needle's answer tokens (teacher-forced)."""
    _needles(samples)
    return lambda model: sum(lp for lp, _ in _teacher_forced(model, samples, batch_size)) / len(samples)


def _needles(samples: Sequence[TaskSample]) -> None:
    if not samples or any(s.answer is None for s in samples):
        raise WorkbenchError("needle metrics need needle samples (workbench.tasks.needle_samples)")


def text_loss(samples: Sequence[TaskSample], batch_size: int = 8) -> Metric:
    """Mean next-token cross-entropy (nats) over every position of the samples."""
    return lambda model: _next_token(model, samples, batch_size, lambda s: 0)[0]


def induction_accuracy(samples: Sequence[TaskSample], batch_size: int = 8) -> Metric:
    """Share of positions after the first copy of a repeats sample where the argmax next token
    is the right one (only induction can predict them)."""
    if not samples or any(s.period is None for s in samples):
        raise WorkbenchError("induction accuracy needs repeats samples (workbench.tasks.repeat_samples)")
    # row p predicts token p + 1: the rows from the one before the second copy on
    return lambda model: _next_token(model, samples, batch_size, lambda s: second_copy_start(s) - 1)[1]


@torch.no_grad()
def _next_token(model: Model, samples, batch_size: int, first: Callable[[TaskSample], int]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of next-token prediction on the rows from ``first(sample)``."""
    adapter = adapter_for(model)
    device = adapter.device
    loss, correct, count = 0.0, 0, 0
    for chunk in _groups([(len(s.ids), first(s)) for s in samples], batch_size):
        batch = torch.stack([samples[i].ids for i in chunk]).to(device)
        f = first(samples[chunk[0]])
        logits = adapter.logits(batch).float()[:, f:-1]
        target = batch[:, f + 1 :]
        loss += float(
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        )
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    return loss / count, correct / count


def logit_difference(ids: torch.Tensor, token_a: int, token_b: int) -> Metric:
    """Mean over ``ids [batch, tokens]`` of logit(a) - logit(b) at the last position."""

    def metric(model: Model) -> float:
        adapter = adapter_for(model)
        with torch.no_grad():
            last = adapter.logits(ids.to(adapter.device))[:, -1].float()
        return float((last[:, token_a] - last[:, token_b]).mean())

    return metric


# Experiments.


def scan_heads(
    model: Model, metric: Metric, method: str = "zero", reference: torch.Tensor | None = None, progress: bool = True
) -> pd.DataFrame:
    """Every head ablated alone: ``layer, head, value, baseline, delta`` (value - baseline).
    ``metric`` is called with ``model`` as given."""
    adapter = adapter_for(model)
    baseline = metric(model)
    rows = []
    for layer, head in tqdm(all_heads(adapter), desc="ablating heads", unit="head", disable=not progress):
        with ablate(adapter, [(layer, head)], method, reference):
            value = metric(model)
        rows.append((layer, head, value, baseline, value - baseline))
    return pd.DataFrame(rows, columns=["layer", "head", "value", "baseline", "delta"])


def cumulative(
    model: Model,
    metric: Metric,
    ranking: Sequence[Head],
    ks: Sequence[int],
    draws: int = 5,
    method: str = "zero",
    reference: torch.Tensor | None = None,
    seed: int = 0,
    control: str = "all",
    progress: bool = True,
) -> pd.DataFrame:
    """The masking experiment of Wu et al.: the top-``k`` heads of ``ranking`` ablated together,
    against ``draws`` sets of ``k`` random heads outside the top ``k``: from all layers
    (``control="all"``) or from the layers the top ``k`` sit in (``"same_layers"``, which
    controls for depth: in a small model every early head may feed the later ones).
    Rows ``k, selection ("top" | "random" | "none"), draw, heads, value``; ``metric`` is
    called with ``model`` as given."""
    _check_control(control)
    adapter = adapter_for(model)
    ranking = check_heads(adapter, ranking)
    everyone = all_heads(adapter)
    bad = [k for k in ks if not 1 <= k <= len(ranking) or k > len(everyone) - k]
    if bad or not ks:
        raise WorkbenchError(
            f"k must lie in 1..{min(len(ranking), len(everyone) // 2)} (the ranking has "
            f"{len(ranking)} heads, the model {len(everyone)}), got {list(ks) or 'none'}"
        )
    rng = random.Random(seed)
    rows = [(0, "none", 0, "", metric(model))]
    jobs = [(k, "top", 0, list(ranking[:k])) for k in ks]
    for k in ks:
        layers = {layer for layer, _ in ranking[:k]} if control == "same_layers" else {layer for layer, _ in everyone}
        others = [h for h in everyone if h not in ranking[:k] and h[0] in layers]
        if len(others) < k:
            raise WorkbenchError(
                f"only {len(others)} heads outside the top {k} in their layers: too few for a "
                "same-layer control; use control='all' or a smaller k"
            )
        jobs += [(k, "random", d, rng.sample(others, k)) for d in range(draws)]
    for k, selection, draw, heads in tqdm(jobs, desc="ablating head sets", unit="set", disable=not progress):
        with ablate(adapter, heads, method, reference, seed=seed):
            rows.append((k, selection, draw, " ".join(f"{l}.{h}" for l, h in heads), metric(model)))
    return pd.DataFrame(rows, columns=["k", "selection", "draw", "heads", "value"])


def _check_control(control: str) -> None:
    if control not in CONTROLS:
        raise WorkbenchError(f"control must be 'all' or 'same_layers', got {control!r}")


def rank_heads(run: Run, score: str, task: str | None = None) -> list[Head]:
    """Heads of a run ordered by one score, highest first (NaN last); ``task`` picks the task
    when the score was computed on several."""
    table = run.table("head_scores")
    rows = table[table["score"] == score]
    if rows.empty:
        raise WorkbenchError(
            f"the run in {run.path} has no {score!r} score; it has: {', '.join(sorted(set(table['score'])))}"
        )
    tasks = sorted(set(rows["task"]))
    if task is None and len(tasks) > 1:
        raise WorkbenchError(f"{score} was scored on tasks {tasks}: choose one")
    rows = rows[rows["task"] == (task or tasks[0])]
    if rows.empty:
        raise WorkbenchError(f"{score} was not scored on task {task!r}; it was on: {', '.join(tasks)}")
    rows = rows.sort_values("value", ascending=False, na_position="last")
    return [(int(r.layer), int(r.head)) for r in rows.itertuples()]


# The masking experiment as one call (what `workbench ablate` runs).

#: Metric (the function of that name in this module) -> the task whose samples it needs.
METRICS = {
    "needle_accuracy": "niah",
    "answer_logprob": "niah",
    "induction_accuracy": "repeats",
    "text_loss": "text",
}
#: The metric a task is measured by when none is named.
DEFAULT_METRIC = {"niah": "needle_accuracy", "repeats": "induction_accuracy", "text": "text_loss"}
#: Offset of the sample seed from the experiment's seed: fresh samples, not the ones the run's
#: scores came from.
FRESH_SAMPLES = 10_000


def check_length(model: Model, length: int) -> None:
    """Refuse samples longer than the model's context (the model would fail on them)."""
    context = adapter_for(model).context
    if context is not None and length > context:
        raise WorkbenchError(f"--length {length} is longer than the model's context of {context} tokens")


@dataclass(frozen=True)
class AblationSettings:
    """One masking experiment: the top-``k`` heads of a run's ``rank_by`` score ablated
    together with ``method``, against ``draws`` sets of ``k`` random heads (``control``: from
    all layers or from the top heads' layers), measured by ``metric`` on fresh ``task``
    samples; ``scan`` also ablates every head alone.

    ``metric`` None: the task's :data:`DEFAULT_METRIC`. ``length`` None: the run's shortest
    length. ``samples``: samples (niah: per depth of ``depths``). ``seed`` seeds the samples
    (offset by :data:`FRESH_SAMPLES`) and the random head sets. Refused at construction
    (:class:`WorkbenchError`): an unknown task, method or control, a metric of another task,
    resampling on niah (its reference inputs would be shorter), repeats samples too short to
    repeat, fewer than one sample or draw.
    """

    rank_by: str = "retrieval"
    score_task: str | None = None
    ks: tuple[int, ...] = (1, 2, 4)
    task: str = "niah"
    metric: str | None = None
    method: str = "zero"
    length: int | None = None
    samples: int = 8
    depths: tuple[float, ...] = (0.2, 0.5, 0.8)
    draws: int = 5
    control: str = "all"
    scan: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        if self.task not in DEFAULT_METRIC:
            raise WorkbenchError(f"unknown task {self.task!r}; choose from: {', '.join(DEFAULT_METRIC)}")
        metric = self.metric or DEFAULT_METRIC[self.task]
        if METRICS.get(metric) != self.task:
            valid = [m for m, t in METRICS.items() if t == self.task]
            raise WorkbenchError(f"metric {metric!r} does not fit task {self.task}; choose from: {', '.join(valid)}")
        object.__setattr__(self, "metric", metric)
        _check_method(self.method)
        if self.method == "resample" and self.task == "niah":
            raise WorkbenchError(
                "resample ablation needs reference inputs as long as the measured ones: use it with "
                "--task repeats or text, or --method mean"
            )
        _check_control(self.control)
        if self.samples < 1 or self.draws < 1:
            raise WorkbenchError(f"samples and draws must be at least 1, got {self.samples} and {self.draws}")
        if self.length is not None and self.task == "repeats" and (self.length - 1) // 2 < 2:
            raise WorkbenchError(f"--length {self.length} is too short for repeats samples: give at least 5 tokens")

    @property
    def config(self) -> dict:
        """The columns every row of the experiment's tables carries (and its manifest entry)."""
        return {
            "rank_by": self.rank_by,
            "task": self.task,
            "metric": self.metric,
            "method": self.method,
            "length": self.length,
            "control": self.control,
        }

    @property
    def table_name(self) -> str:
        """The run table of the top-k against random experiment."""
        return f"ablation_{self.rank_by}_{self.metric}_{self.method}_{self.control}"

    @property
    def scan_name(self) -> str:
        """The run table of the single-head scan."""
        return f"scan_{self.metric}_{self.method}"

    def samples_for(self, tokenizer, text: str | None = None) -> list[TaskSample]:
        """The fresh samples the metric is measured on (``text``: the text source of the text
        task, as :func:`workbench.tasks.text_samples` takes it); needs ``length`` set."""
        from workbench.tasks import needle_samples, repeat_samples, text_samples

        if self.length is None:
            raise WorkbenchError("the ablation's sample length is not set")
        seed = self.seed + FRESH_SAMPLES
        if self.task == "niah":
            return needle_samples(tokenizer, [self.length], list(self.depths), self.samples, seed=seed)
        if self.task == "repeats":
            return repeat_samples(tokenizer, (self.length - 1) // 2, 2, self.samples, seed=seed)
        return text_samples(tokenizer, text, self.length, self.samples)


@dataclass
class AblationResult:
    """What :func:`run_ablation` wrote: the settings it ran with (``length`` resolved), the
    top-k table (:func:`cumulative`'s rows plus :attr:`AblationSettings.config`), the scan
    (or None), and the table's file."""

    settings: AblationSettings
    table: pd.DataFrame
    scan: pd.DataFrame | None
    path: Path


def run_ablation(
    run: Run | str | Path, model: Model, settings: AblationSettings, progress: bool = True
) -> AblationResult:
    """Wu et al.'s masking experiment on a run folder: rank the heads by the run's score,
    sample fresh inputs, ablate, and write the tables (:attr:`AblationSettings.table_name`,
    :attr:`~AblationSettings.scan_name`), their figures (``figures/``) and an entry in the
    manifest's ``ablations`` (replacing one of the same table) into the run."""
    from workbench.models import task_tokenizer
    from workbench.plots import ablation_curve, head_map, save_figures

    run = run if isinstance(run, Run) else Run.open(run)
    recorded = run.manifest["settings"]
    ranking = rank_heads(run, settings.rank_by, settings.score_task)
    adapter = adapter_for(model)
    if settings.length is None:
        settings = replace(settings, length=min(recorded["lengths"]))  # checked again
    check_length(adapter, settings.length)
    items = settings.samples_for(task_tokenizer(adapter.model), recorded.get("text"))
    measure = globals()[settings.metric](items)
    reference = torch.stack([s.ids for s in items]) if settings.method != "zero" else None
    config = settings.config
    table = cumulative(
        adapter,
        measure,
        ranking,
        settings.ks,
        draws=settings.draws,
        method=settings.method,
        reference=reference,
        seed=settings.seed,
        control=settings.control,
        progress=progress,
    ).assign(**config)
    name, metric = settings.table_name, settings.metric
    run.write_table(name, table)
    figures = {name: ablation_curve(table, metric)}
    scanned = None
    if settings.scan:
        scanned = scan_heads(adapter, measure, settings.method, reference, progress=progress).assign(**config)
        run.write_table(settings.scan_name, scanned)
        figures[settings.scan_name] = head_map(
            scanned.assign(score=f"{metric} change when ablated alone", value=scanned["delta"], task=settings.task),
            f"{metric} change when ablated alone",
        )
    warnings = save_figures(figures, run.path / "figures")
    entries = [a for a in run.manifest.get("ablations", []) if a.get("table") != name]
    run.manifest["ablations"] = entries + [
        {
            **config,
            "k": list(settings.ks),
            "draws": settings.draws,
            "samples": len(items),
            "table": name,
            "figure_warnings": warnings,
        }
    ]
    run.save_manifest()
    return AblationResult(settings, table, scanned, run.path / f"{name}.parquet")
