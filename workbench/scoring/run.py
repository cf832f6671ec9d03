"""Scoring runs: :func:`score_model` scores every sample of a plan into a run folder, one part
file per sample as it finishes (so a killed run resumes), then :func:`finish` writes the tables,
figures and manifest.

Example:
    >>> settings = ScoreRunSettings(model="zoo-2l", tasks=("repeats",), lengths=(256,), samples=4)
    >>> run = score_model(load_model("zoo-2l"), settings, "runs/zoo-2l-repeats")
    >>> run.table("head_scores")
"""

from __future__ import annotations

import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kernels.provenance import git_revision, versions
from workbench.adapters import ModelAdapter, adapter_for
from workbench.errors import WorkbenchError
from workbench.models import task_tokenizer
from workbench.runs import SCORING_TABLES, Run, prepare
from workbench.scoring.formulas import sink_rate
from workbench.scoring.plan import Unit, plan
from workbench.scoring.sample import score_sample
from workbench.scoring.settings import ScoreRunSettings, check_model
from workbench.scoring.tables import aggregate


def score_model(model: torch.nn.Module | ModelAdapter, settings: ScoreRunSettings, out: str | Path, *, resume: bool = False, force: bool = False,
                progress: bool = True) -> Run:
    """Score every head of ``model`` into the run folder ``out`` (see :mod:`workbench.runs`);
    resumes a run with the same settings. ``resume`` continues whatever run ``out`` holds with
    its own settings (``model`` must be the model it was scored with); ``force`` replaces it."""
    adapter = adapter_for(model)  # resolved once, passed to everything below
    if not resume:  # refuse a bad request before anything is written
        check_model(adapter, settings)
        units = plan(settings, task_tokenizer(adapter.model))
    about = _manifest(adapter)
    run = prepare(out, settings.to_dict(), about, resume=resume, force=force)
    if resume:  # the stored run's settings, checked and planned now
        settings = ScoreRunSettings.from_dict(run.manifest["settings"])
        check_model(adapter, settings)
        units = plan(settings, task_tokenizer(adapter.model))
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
        run.write_part(unit.key, score_sample(adapter, unit, settings))
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


def _manifest(adapter: ModelAdapter) -> dict:
    model = adapter.model
    param = next(model.parameters())
    n_heads = adapter.head_shape[0]
    return {
        "created": _now(),
        "model_info": {"class": type(model).__name__, "layers": adapter.n_layers, "heads": n_heads,
                       "context": adapter.context, "dtype": str(param.dtype).removeprefix("torch.")},
        "device": str(param.device) + (f" ({torch.cuda.get_device_name(param.device)})" if param.is_cuda else ""),
        "versions": versions(),
        "git_revision": git_revision(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
