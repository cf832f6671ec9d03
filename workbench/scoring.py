"""Scoring runs: task samples through an instrumented model, one sample at a time, each sample's
tallies written to the run folder as it finishes; then the head-score, profile and retrieval
tables, and the figures.

Example:
    >>> settings = ScoreRunSettings(model="zoo-2l", tasks=("repeats",), lengths=(256,), samples=4)
    >>> run = score_model(load_model("zoo-2l"), settings, "runs/zoo-2l-repeats")
    >>> run.table("head_scores")
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from kernels import BACKENDS, AttentionStats
from kernels.provenance import git_revision, versions
from workbench.errors import WorkbenchError
from workbench.instrument import adapter_for, instrument
from workbench.runs import SCORING_TABLES, Run, prepare
from workbench.scores import (SCORES, TASKS, ScoreSettings, Tally, check_request, prefill_tallies,
                              retrieval_hits, scores_for, sink_rate, stats_spec)
from workbench.streaming import StreamingSummary
from workbench.tasks import TaskSample, needle_samples, read_text, repeat_samples, start_tokens, text_samples

#: Statistics kept per position bucket (the profiles).
PROFILE_STATISTICS = ("entropy", "sink_mass", "local_mass")
#: Position buckets per profile (bucket size = length / this, rounded up).
PROFILE_BUCKETS = 64
#: Sample lengths when none are given (those that fit the model's context).
DEFAULT_LENGTHS = (512, 1024, 2048)


@dataclass(frozen=True)
class ScoreRunSettings:
    """Everything that decides a run's numbers (the run folder's identity).

    ``lengths``: tokens per sample (for repeats: BOS plus ``repeats`` copies of
    ``(length - 1) // repeats`` tokens). ``samples``: samples per length (niah: per length and
    depth). ``text``: a file, a folder or ``hf:DATASET[:CONFIG]`` for the text task and the
    needle haystack (built-in docstrings when None).
    """

    model: str
    tasks: tuple[str, ...] = TASKS
    scores: tuple[str, ...] = ()
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    samples: int = 4
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    repeats: int = 2
    text: str | None = None
    sink_tokens: int = 1
    window: int = 64
    seed: int = 0
    dtype: str | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("tasks", "scores", "lengths", "depths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.scores:
            object.__setattr__(self, "scores", tuple(scores_for(self.tasks)))
        check_request(self.tasks, self.scores)
        if not self.lengths or any(n < 8 for n in self.lengths):
            raise WorkbenchError(f"lengths must be at least 8 tokens each, got {list(self.lengths)}")
        if self.samples < 1 or self.repeats < 2:
            raise WorkbenchError(f"samples must be >= 1 and repeats >= 2, got {self.samples} and {self.repeats}")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise WorkbenchError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise WorkbenchError(f"unknown kernel backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        self.score_settings  # validates sink_tokens and window

    @property
    def score_settings(self) -> ScoreSettings:
        return ScoreSettings(self.sink_tokens, self.window)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ScoreRunSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Unit:
    """One sample of a run; ``key`` names its part file."""

    key: str
    task: str
    length: int
    index: int
    sample: TaskSample = field(repr=False)


def task_tokenizer(model):
    """The model's tokenizer, or the zoo's byte tokenizer for models without one (random
    models: their vocabularies hold its 259 ids)."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return tok
    from workbench.zoo.tokenizer import byte_tokenizer

    return byte_tokenizer()


def plan(settings: ScoreRunSettings, tokenizer) -> list[Unit]:
    """Every sample of the run, in a fixed order (the same on every resume)."""
    units = []
    text = read_text(settings.text) if settings.text is not None else None
    for task in settings.tasks:
        for length in settings.lengths:
            if task == "niah":
                samples = needle_samples(tokenizer, [length], list(settings.depths), settings.samples,
                                         haystack=text, seed=settings.seed + length)
                keys = [f"niah-{length}-d{s.depth:.2f}-{i % settings.samples:03d}" for i, s in enumerate(samples)]
            elif task == "repeats":
                period = (length - len(start_tokens(tokenizer))) // settings.repeats
                samples = repeat_samples(tokenizer, period, settings.repeats,
                                         settings.samples, seed=settings.seed + length)
                keys = [f"repeats-{length}-{i:03d}" for i in range(len(samples))]
            else:
                samples = text_samples(tokenizer, settings.text, length, settings.samples)
                if len(samples) < settings.samples:
                    raise WorkbenchError(f"the text holds only {len(samples)} samples of {length} tokens; "
                                         f"lower --samples or give more text with --text")
                keys = [f"text-{length}-{i:03d}" for i in range(len(samples))]
            units += [Unit(k, task, length, i, s) for i, (k, s) in enumerate(zip(keys, samples))]
    return units


class SampleCollector:
    """Takes each layer's statistics as the forward pass produces them (``instrument(into=)``)
    and reduces them at once into score tallies, position profiles and, for retrieval, the
    most-attended key of the last row; nothing of size O(tokens) outlives its layer."""

    def __init__(self, n_layers: int, scores, settings: ScoreSettings, spec, causal: bool,
                 sample: TaskSample, repeats: int, bucket_size: int):
        self.scores, self.settings, self.spec, self.causal = scores, settings, spec, causal
        self.period, self.repeats = sample.period, repeats
        self.tallies: dict[tuple[str, int], Tally] = {}
        self.profile = StreamingSummary(spec, n_layers, bucket_size, statistics=PROFILE_STATISTICS)
        self.last_keys: list[list[torch.Tensor]] = []  # per forward call, per layer: [head]
        self.decoding = False

    def add(self, layer: int, st: AttentionStats) -> None:
        if not self.decoding:
            for name, tally in prefill_tallies(st, self.scores, self.settings, self.spec, self.causal,
                                               self.period, self.repeats).items():
                self.tallies[(name, layer)] = tally
            self.profile.add(layer, st)
        if st.argmax is not None:
            if layer == 0:
                self.last_keys.append([])
            self.last_keys[-1].append(st.argmax[0, :, -1])


@torch.no_grad()
def score_sample(model, unit: Unit, settings: ScoreRunSettings, *, materialised: bool = False) -> pd.DataFrame:
    """One sample's tallies: rows ``name, layer, head, bucket, total, count`` (``bucket`` -1 for
    scores, the bucket's first position for profiles; ``layer`` -1 for per-sample measures:
    ``needle_accuracy``, ``seconds``).

    ``materialised=True`` (Hugging Face models; a baseline for benchmarks and checks) computes
    the same tallies from the explicit ``[head, query, key]`` pattern of eager attention, one
    layer at a time, instead of from the kernel statistics."""
    start = time.perf_counter()
    adapter = adapter_for(model)
    scores = [s for s in settings.scores if unit.task in SCORES[s].tasks]
    sample, causal = unit.sample, adapter.is_causal(model)
    spec = stats_spec(scores, settings.score_settings, sample.period, settings.repeats)
    device = next(model.parameters()).device
    n_layers = adapter.n_layers(model)
    collector = SampleCollector(n_layers, scores, settings.score_settings, spec, causal, sample, settings.repeats,
                                bucket_size=math.ceil(len(sample.ids) / PROFILE_BUCKETS))
    ids = sample.ids.to(device).unsqueeze(0)
    rows: list[tuple[str, int, int, int, float, float]] = []
    with (_eager_patterns(model, spec, collector) if materialised
          else instrument(model, spec, backend=settings.backend, into=collector)):
        if "retrieval" in scores:
            logits, cache = adapter.prefill(model, ids)
            generated = [int(logits[0].argmax())]
            collector.decoding = True
            for _ in range(len(sample.answer) - 1):
                logits, cache = adapter.decode(model, torch.tensor([[generated[-1]]], device=device), cache)
                generated.append(int(logits[0].argmax()))
            del cache
        else:
            adapter.run(model, ids, None)
    for (name, layer), (total, count) in collector.tallies.items():
        rows += [(name, layer, h, -1, float(t), count) for h, t in enumerate(total.tolist())]
    if "retrieval" in scores:
        correct = generated == sample.answer.tolist()
        keys = torch.stack([torch.stack(step) for step in collector.last_keys])  # [step, layer, head]
        full = torch.cat([sample.ids, torch.tensor(generated[:-1], dtype=torch.long)])
        hits = retrieval_hits(keys, full, sample.needle, generated) / len(generated)
        rows += [("retrieval", layer, h, -1, float(hits[layer, h]) * correct, float(correct))
                 for layer in range(n_layers) for h in range(hits.shape[1])]
        rows.append(("needle_accuracy", -1, -1, -1, float(correct), 1.0))
    profile = collector.profile.to_frame()
    profile = profile[profile["rows"] > 0]
    frame = pd.DataFrame(rows, columns=["name", "layer", "head", "bucket", "total", "count"])
    frame = pd.concat([frame, pd.DataFrame({
        "name": profile["statistic"], "layer": profile["layer"], "head": profile["head"],
        "bucket": profile["bucket_start"], "total": profile["mean"] * profile["rows"], "count": profile["rows"],
    }), pd.DataFrame([("seconds", -1, -1, -1, time.perf_counter() - start, 1.0)], columns=frame.columns)],
        ignore_index=True)
    frame.insert(0, "sample", unit.index)
    frame.insert(0, "depth", sample.depth if sample.depth is not None else math.nan)
    frame.insert(0, "length", unit.length)
    frame.insert(0, "task", unit.task)
    return frame.astype({"layer": "int32", "head": "int32", "bucket": "int64"})


@contextmanager
def _eager_patterns(model, spec, collector: SampleCollector):
    """Within the block, a Hugging Face model runs eager attention and every layer's pattern
    goes through :func:`kernels.pattern_stats` into ``collector`` (then is dropped)."""
    from kernels import pattern_stats
    from workbench.hooked import hugging_face

    if adapter_for(model) is not hugging_face:
        raise WorkbenchError("materialised scoring is for Hugging Face models")
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")

    def hook(layer):
        return lambda module, args, output: collector.add(layer, pattern_stats(output[1].float(), spec))

    handles = [m.register_forward_hook(hook(layer)) for layer, m in hugging_face.attention_modules(model)]
    try:
        yield collector
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)


def defaults_for(model, tasks) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The lengths and scores a run of ``model`` uses when none are given: the default lengths
    that fit its context (else the context itself), and every score the tasks define that the
    model can compute (retrieval needs a causal language model)."""
    adapter = adapter_for(model)
    context = adapter.context(model)
    lengths = tuple(n for n in DEFAULT_LENGTHS if context is None or n <= context) or (int(context),)
    generates = adapter.can_generate(model)
    return lengths, tuple(s for s in scores_for(tasks) if generates or s != "retrieval")


def check_model(model, settings: ScoreRunSettings) -> None:
    """Refuse settings this model cannot run: lengths beyond its context, retrieval without a
    language-model head or causal attention."""
    adapter = adapter_for(model)
    context = adapter.context(model)
    too_long = [n for n in settings.lengths if context is not None and n > context]
    if too_long:
        raise WorkbenchError(f"lengths {too_long} exceed the model's context of {context} tokens")
    if "retrieval" in settings.scores and not adapter.can_generate(model):
        raise WorkbenchError("the retrieval score decodes the needle's answer: it needs a causal language model "
                             f"(this one is a {type(model).__name__}); leave retrieval out of --scores")


def score_model(model, settings: ScoreRunSettings, out: str | Path, *, resume: bool = False, force: bool = False,
                progress: bool = True) -> Run:
    """Score every head of ``model`` into the run folder ``out`` (see :mod:`workbench.runs`);
    resumes a run with the same settings. ``resume`` continues whatever run ``out`` holds with
    its own settings (``model`` must be the model it was scored with); ``force`` replaces it."""
    if not resume:  # refuse a bad request before anything is written
        check_model(model, settings)
        units = plan(settings, task_tokenizer(model))
    about = _manifest(model)
    run = prepare(out, settings.to_dict(), about, resume=resume, force=force)
    if resume:  # the stored run's settings, checked and planned now
        settings = ScoreRunSettings.from_dict(run.manifest["settings"])
        check_model(model, settings)
        units = plan(settings, task_tokenizer(model))
    identity = ("class", "layers", "heads", "dtype")
    stored = {k: run.manifest.get("model_info", {}).get(k) for k in identity}
    if stored != {k: about["model_info"][k] for k in identity}:
        raise WorkbenchError(f"the run in {run.path} was scored with {settings.model} ({stored}); this model is "
                             f"{about['model_info']}: load the run's own model to continue it")
    todo = _resume_point(run, units)
    damaged = [t for t in run.damaged_tables() if t in SCORING_TABLES] if run.complete else []
    if damaged:
        warnings.warn(f"the run in {run.path}: {', '.join(f'{t}.parquet' for t in damaged)} damaged (sha256 differs "
                      "from the manifest's); rebuilding from the parts", RuntimeWarning, stacklevel=2)
    if not todo and run.complete and not damaged:
        return run
    if run.complete:
        run.reopen()
    for unit in tqdm(todo, desc="scoring", unit="sample", disable=not progress,
                     initial=len(units) - len(todo), total=len(units)):
        run.write_part(unit.key, score_sample(model, unit, settings))
    finish(run, settings)
    return run


def _resume_point(run: Run, units: list[Unit]) -> list[Unit]:
    """The units still to score, in plan order. Stale temporary files of a killed run are
    removed, and parts that are damaged (bytes differ from their sha256) or were never committed
    (no valid sidecar) are deleted, with a warning, to be scored again."""
    run.remove_temp_files()
    states = run.part_states([u.key for u in units])
    bad = {k: s for k, s in states.items() if s in ("damaged", "uncommitted")}
    for key in bad:
        run.discard_part(key)
    if bad:
        listed = ", ".join(f"{k} ({s})" for k, s in list(bad.items())[:5]) + (", ..." if len(bad) > 5 else "")
        warnings.warn(f"the run in {run.path}: scoring {len(bad)} sample(s) again whose part files were damaged or "
                      f"not committed: {listed}", RuntimeWarning, stacklevel=3)
    return [u for u in units if states[u.key] != "done"]


def finish(run: Run, settings: ScoreRunSettings) -> None:
    """Aggregate the parts into the tables, draw the figures, mark the run complete."""
    from workbench.plots import run_figures, save_figures

    parts = run.read_parts()
    tables = aggregate(parts)
    for name, table in tables.items():
        run.write_table(name, table)
    head_scores = tables["head_scores"]
    summary: dict = {}
    threshold = settings.score_settings.sink_threshold
    sinks = head_scores[head_scores["score"] == "sink"]
    for task, group in sinks.groupby("task"):
        summary[f"sink_rate[{task}]"] = sink_rate(torch.tensor(group["value"].to_numpy()), threshold)
    needles = parts[parts["name"] == "needle_accuracy"]
    if len(needles):
        summary["needle_accuracy"] = float(needles["total"].mean())
        for length, group in needles.groupby("length"):
            summary[f"needle_accuracy[{length}]"] = float(group["total"].mean())
    seconds = parts[parts["name"] == "seconds"]
    run.manifest["timings"] = {"sample_seconds": float(seconds["total"].sum()),
                               **{f"{t}_seconds": float(g["total"].sum()) for t, g in seconds.groupby("task")}}
    run.manifest["summary"] = summary
    run.manifest["figure_warnings"] = save_figures(run_figures(tables), run.path / "figures")
    run.manifest["finished"] = _now()
    run.mark_complete()  # the manifest, written last, commits the run


def aggregate(parts: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``head_scores``, ``profiles`` and (needle task) ``retrieval`` tables from the tallies."""
    def ratio(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        g = frame.groupby(keys, sort=True)
        out = g[["total", "count"]].sum()
        out["value"] = out["total"] / out["count"].where(out["count"] > 0)
        out["samples"] = g["count"].apply(lambda c: int((c > 0).sum()))
        return out.reset_index()

    heads = parts[(parts["layer"] >= 0) & (parts["bucket"] < 0)]
    head_scores = ratio(heads, ["task", "name", "layer", "head"]).rename(columns={"name": "score"})
    order = {name: i for i, name in enumerate(SCORES)}
    head_scores = head_scores.sort_values(["score", "task", "layer", "head"], key=lambda c: c.map(order) if c.name == "score" else c)
    tables = {"head_scores": head_scores[["task", "score", "layer", "head", "value", "samples"]].reset_index(drop=True)}
    prof = ratio(parts[parts["bucket"] >= 0], ["task", "length", "name", "layer", "head", "bucket"])
    tables["profiles"] = prof.rename(columns={"name": "statistic", "bucket": "bucket_start", "count": "rows"})[
        ["task", "length", "statistic", "layer", "head", "bucket_start", "value", "rows"]]
    retrieval = parts[(parts["name"] == "retrieval") & (parts["layer"] >= 0)]
    if len(retrieval):
        cells = ratio(retrieval, ["length", "depth", "layer", "head"]).rename(columns={"count": "answered"})
        needles = parts[parts["name"] == "needle_accuracy"].groupby(["length", "depth"])["total"]
        cells = cells.merge(needles.agg(["mean", "size"]).rename(columns={"mean": "accuracy", "size": "samples_total"}),
                            left_on=["length", "depth"], right_index=True)
        tables["retrieval"] = cells[["length", "depth", "layer", "head", "value", "answered", "samples_total",
                                     "accuracy"]].rename(columns={"samples_total": "samples"})
    return tables


def _manifest(model) -> dict:
    adapter = adapter_for(model)
    param = next(model.parameters())
    n_heads = adapter.head_shape(model)[0]
    return {
        "created": _now(),
        "model_info": {"class": type(model).__name__, "layers": adapter.n_layers(model), "heads": n_heads,
                       "context": adapter.context(model), "dtype": str(param.dtype).removeprefix("torch.")},
        "device": str(param.device) + (f" ({torch.cuda.get_device_name(param.device)})" if param.is_cuda else ""),
        "versions": versions(),
        "git_revision": git_revision(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
