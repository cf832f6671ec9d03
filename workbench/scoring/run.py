"""Scoring runs: :func:`score_model` scores every sample of a plan into a run folder, one part
file per sample as it finishes (so a killed run resumes), then :func:`finish` writes the tables,
figures and manifest.

Under ``torchrun`` (see :mod:`workbench.distributed` and docs/scale-out.md) the same call on
every rank scores the samples data-parallel: rank 0 alone prepares the run folder, each rank
scores its share of the samples still to do (``todo[rank::world]``, in plan order) into its own
part files, and rank 0 then writes the tables, figures and, last, the manifest. The per-sample
numbers do not depend on the rank and the tables are aggregated in key order, so the tables are
those of a single-process run. With context parallelism the ranks form groups that each spread
one sample's tokens over themselves, and the groups share the samples in the same way.

Example:
    >>> settings = ScoreRunSettings(model="zoo-2l", tasks=("repeats",), lengths=(256,), samples=4)
    >>> run = score_model(load_model("zoo-2l"), settings, "runs/zoo-2l-repeats")
    >>> run.table("head_scores")
"""

from __future__ import annotations

import hashlib
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kernels.provenance import git_revision, versions
from workbench import distributed
from workbench.adapters import ModelAdapter, adapter_for
from workbench.errors import WorkbenchError
from workbench.models import task_tokenizer
from workbench.runs import SCORING_TABLES, Run, prepare
from workbench.scoring.duo import ensure_gates
from workbench.scoring.formulas import SCORE_DEFINITIONS, ScoreSettings
from workbench.scoring.kv_groups import kv_heads_of
from workbench.scoring.plan import Unit, plan
from workbench.scoring.sample import score_sample
from workbench.scoring.settings import ScoreRunSettings, check_model
from workbench.scoring.tables import aggregate, model_summary


def score_model(
    model: torch.nn.Module | ModelAdapter,
    settings: ScoreRunSettings,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    context_parallel: int = 1,
) -> Run:
    """Score every head of ``model`` into the run folder ``out`` (see :mod:`workbench.runs`);
    resumes a run with the same settings. ``resume`` continues whatever run ``out`` holds with
    its own settings (``model`` must be the model it was scored with); ``force`` replaces it.

    Under ``torchrun`` every rank makes this same call (same settings, ``out``, ``resume`` and
    ``force``, else every rank raises a :class:`WorkbenchError` naming what differs); each scores
    its share of the samples and every rank returns the finished run. The manifest records
    ``world_size``, ``context_parallel`` and ``scored_by`` (sample key -> the rank that wrote it).

    ``context_parallel=N`` (under ``torchrun``, N dividing the number of processes) spreads each
    sample's tokens over groups of N ranks (:mod:`workbench.context_parallel`; the retrieval
    score decodes against the KV cache split over them); the groups share the samples as
    above, each group's rank 0 writing its parts. The tables equal a single process's within
    float rounding."""
    adapter = adapter_for(model)  # resolved once, passed to everything below
    distributed.check_context_parallel(context_parallel)  # before any collective
    if not resume:  # refuse a bad request before anything is written (and before any collective)
        check_model(adapter, settings, context_parallel=context_parallel)
        units = plan(settings, task_tokenizer(adapter.model))
    about = _manifest(adapter)
    with distributed.process_group(next(adapter.model.parameters()).device):
        rank, world = distributed.rank(), distributed.world_size()
        layout = distributed.layout(context_parallel)
        if world > 1:
            _same_request_on_every_rank(settings, out, resume=resume, force=force)
        shared, problem = None, None
        if rank == 0:  # alone: nothing else writes into the folder yet
            try:
                run, settings, units, shared = _open_for_scoring(
                    adapter,
                    settings,
                    out,
                    about,
                    resume=resume,
                    force=force,
                    layout=layout,
                    units=None if resume else units,
                )
            except WorkbenchError as exc:
                if world == 1:
                    raise
                problem = str(exc)
        if world > 1:  # the others open the folder rank 0 prepared
            shared, problem = distributed.broadcast((shared, problem))
            if problem is not None:
                raise WorkbenchError(f"{problem} (rank 0 of {world})")
            if rank > 0:
                try:
                    run, settings, units = _join(adapter, out, shared, context_parallel)
                except WorkbenchError as exc:
                    problem = str(exc)
            distributed.agree(problem)  # every rank stops if one cannot join
        if shared["finished"]:
            return run
        by_key = {u.key: u for u in units}
        mine = [by_key[k] for k in shared["todo"][layout.data_rank :: layout.data_world]]
        bar = (
            dict(initial=len(units) - len(shared["todo"]), total=len(units))
            if layout.data_world == 1
            else dict(total=len(mine), desc=f"scoring (group 0 of {layout.data_world}, its share)")
        )
        for unit in tqdm(mine, **{"desc": "scoring", **bar}, unit="sample", disable=not progress or rank > 0):
            frame = score_sample(adapter, unit, settings, context_parallel=layout.context_group)
            if layout.writes:
                run.write_part(unit.key, frame)
        # every rank is done once rank 0 has them all
        scored = distributed.gather([u.key for u in mine] if layout.writes else [])
        if rank == 0:
            try:
                run.manifest["scored_by"].update({key: r for r, keys in enumerate(scored) for key in keys})
                ensure_gates(run, adapter.model, settings, progress)  # trained scores (duo), once per run
                finish(run, settings)
            except WorkbenchError as exc:
                if world == 1:
                    raise
                problem = str(exc)
        if world > 1:
            problem = distributed.broadcast(problem)
            if problem is not None:
                raise WorkbenchError(f"{problem} (rank 0 of {world})")
            if rank > 0:
                run = Run.open(run.path)
    return run


def _same_request_on_every_rank(settings: ScoreRunSettings, out: str | Path, *, resume: bool, force: bool) -> None:
    """Refuse, on every rank, ranks given different settings, ``out``, ``resume`` or ``force``.
    (Every rank gathers every request, so all of them raise the same error and stop.)"""
    mine = {**settings.to_dict(), "out": str(out), "resume": resume, "force": force}
    requests = distributed.all_gather(mine)
    differing = {
        r: sorted(k for k in set(req) | set(requests[0]) if req.get(k) != requests[0].get(k))
        for r, req in enumerate(requests)
    }
    differing = {r: fields for r, fields in differing.items() if fields}
    if differing:

        def field(r: int, k: str) -> str:
            return f"{k} ({requests[r].get(k)!r}, rank 0: {requests[0].get(k)!r})"

        listed = "; ".join(
            f"rank {r} differs from rank 0 in {', '.join(field(r, k) for k in fields)}"
            for r, fields in differing.items()
        )
        raise WorkbenchError(f"the ranks were given different settings: {listed}; give every rank the same command")


def _open_for_scoring(
    adapter: ModelAdapter,
    settings: ScoreRunSettings,
    out: str | Path,
    about: dict,
    *,
    resume: bool,
    force: bool,
    layout: distributed.Layout,
    units: list[Unit] | None,
) -> tuple[Run, ScoreRunSettings, list[Unit], dict]:
    """Rank 0 (or the only process): prepare the run folder, clean up after a killed run, and
    decide what is left to score; returns the run, its settings and plan, and what the other
    ranks need (``settings``, ``todo`` keys in plan order, ``finished``, ``created``, ``plan``)."""
    run = prepare(out, settings.to_dict(), about, resume=resume, force=force)
    if resume:  # the stored run's settings, checked and planned now
        settings = ScoreRunSettings.from_dict(run.manifest["settings"])
        check_model(adapter, settings, context_parallel=layout.context_world)
        units = plan(settings, task_tokenizer(adapter.model))
    identity = ("class", "layers", "heads", "dtype")
    stored = {k: run.manifest.get("model_info", {}).get(k) for k in identity}
    if stored != {k: about["model_info"][k] for k in identity}:
        raise WorkbenchError(
            f"the run in {run.path} was scored with {settings.model} ({stored}); this model is "
            f"{about['model_info']}: load the run's own model to continue it"
        )
    todo = _resume_point(run, units, stacklevel=4)
    damaged = [t for t in run.damaged_tables() if t in SCORING_TABLES] if run.complete else []
    if todo or damaged or not run.complete:  # a finished run of any definitions opens as it is
        check_definitions(run, settings)
    elif _definitions(run) < SCORE_DEFINITIONS:
        warnings.warn(
            f"the run in {run.path} was scored with the score definitions of version {_definitions(run)} "
            f"(docs/scores.md); these are version {SCORE_DEFINITIONS}: use --force to score it again",
            RuntimeWarning,
            stacklevel=3,
        )
    if damaged:
        warnings.warn(
            f"the run in {run.path}: {', '.join(f'{t}.parquet' for t in damaged)} damaged (sha256 differs "
            "from the manifest's); rebuilding from the parts",
            RuntimeWarning,
            stacklevel=3,
        )
    finished = not todo and run.complete and not damaged
    if not finished:
        # Who scores what, recorded before scoring starts, so that the parts a killed run committed
        # keep their entry; the keys each rank really wrote replace it at the end.
        writers = layout.writers
        run.manifest["world_size"] = layout.world
        run.manifest["context_parallel"] = layout.context_world
        run.manifest.setdefault("scored_by", {}).update({u.key: writers[i % len(writers)] for i, u in enumerate(todo)})
        if run.complete:
            run.reopen()
        else:
            run.save_manifest()
    shared = {
        "settings": settings.to_dict(),
        "todo": [u.key for u in todo],
        "finished": finished,
        "created": run.manifest.get("created"),
        "plan": _plan_fingerprint(units) if layout.world > 1 else None,
    }
    return run, settings, units, shared


def _join(
    adapter: ModelAdapter, out: str | Path, shared: dict, context_parallel: int
) -> tuple[Run, ScoreRunSettings, list[Unit]]:
    """A rank other than 0: open the run folder rank 0 prepared (``shared``: what it broadcast)
    and plan the same samples; :class:`WorkbenchError` when this rank cannot."""
    try:
        run = Run.open(out)
    except WorkbenchError as exc:
        raise WorkbenchError(
            f"{exc}; every rank must write into the same run folder, on a file system every node "
            "shares, at the same path"
        ) from exc
    if run.manifest.get("created") != shared["created"] or run.manifest["settings"] != shared["settings"]:
        raise WorkbenchError(
            f"{run.path} holds another run than the one rank 0 prepared; every rank must write into "
            "the same run folder, on a file system every node shares, at the same path"
        )
    settings = ScoreRunSettings.from_dict(shared["settings"])
    check_model(adapter, settings, context_parallel=context_parallel)
    units = plan(settings, task_tokenizer(adapter.model))
    if _plan_fingerprint(units) != shared["plan"]:
        raise WorkbenchError(
            "this rank planned other samples than rank 0 (another --text, tokenizer or workbench "
            "version?): give every rank the same inputs"
        )
    return run, settings, units


def _plan_fingerprint(units: list[Unit]) -> str:
    """sha256 of the plan's keys and token ids: equal on ranks that will score the same samples."""
    digest = hashlib.sha256()
    for unit in units:
        digest.update(unit.key.encode())
        digest.update(unit.sample.ids.cpu().numpy().tobytes())
    return digest.hexdigest()


def _resume_point(run: Run, units: list[Unit], stacklevel: int = 3) -> list[Unit]:
    """The units still to score, in plan order. Stale temporary files of a killed run are
    removed, and parts that are damaged (bytes differ from their sha256) or were never committed
    (no valid sidecar) are deleted, with a warning, to be scored again. (Only while no other
    process writes into the folder: under torchrun, rank 0 before the others start.)"""
    run.remove_temp_files()
    states = run.part_states([u.key for u in units])
    bad = {k: s for k, s in states.items() if s in ("damaged", "uncommitted")}
    for key in bad:
        run.discard_part(key)
    if bad:
        listed = ", ".join(f"{k} ({s})" for k, s in list(bad.items())[:5]) + (", ..." if len(bad) > 5 else "")
        warnings.warn(
            f"the run in {run.path}: scoring {len(bad)} sample(s) again whose part files were damaged or "
            f"not committed: {listed}",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return [u for u in units if states[u.key] != "done"]


def _definitions(run: Run) -> int:
    """The version of the score definitions a run was scored with (1: before the manifest said)."""
    recorded = run.manifest.get("score_definitions")
    return int(recorded.get("version", 1)) if isinstance(recorded, dict) else 1


def check_definitions(run: Run, settings: ScoreRunSettings) -> None:
    """Refuse to add to or rebuild a needle run scored with earlier definitions (its parts hold
    the old retrieval and needle numbers: exactly ``len(answer)`` decoded tokens, samples counted
    when answered exactly). Runs without the needle task read the same as before (the sink rate
    is recomputed from their per-sample parts) and pass."""
    version = _definitions(run)
    if version < SCORE_DEFINITIONS and "niah" in settings.tasks:
        raise WorkbenchError(
            f"the run in {run.path} was scored with the score definitions of version {version}: its needle "
            "samples decoded exactly len(answer) tokens and counted only exact answers, where these decode to a "
            "newline or 50 tokens and count answers by ROUGE-1 recall (docs/scores.md). Its tables still open "
            "(workbench runs show), but it cannot be continued or rebuilt: score it again with --force, or "
            "into another folder"
        )


def finish(run: Run, settings: ScoreRunSettings) -> None:
    """Aggregate the parts into the tables, draw the figures, mark the run complete (the
    manifest's ``summary``: :func:`~workbench.scoring.tables.model_summary`; its
    ``score_definitions``: the definitions they follow). Refuses a needle run scored with
    earlier definitions (:func:`check_definitions`)."""
    from workbench.plots import run_figures, save_figures

    check_definitions(run, settings)
    parts = run.read_parts()
    tables = aggregate(parts)
    for name, table in tables.items():
        run.write_table(name, table)
    score_settings = settings.score_settings
    summary = model_summary(parts, tables["head_scores"], score_settings)
    seconds = parts[parts["name"] == "seconds"]
    run.manifest["timings"] = {
        "sample_seconds": float(seconds["total"].sum()),
        **{f"{t}_seconds": float(g["total"].sum()) for t, g in seconds.groupby("task")},
    }
    run.manifest["summary"] = summary
    run.manifest["score_definitions"] = score_settings.definitions()
    run.manifest["figure_warnings"] = save_figures(run_figures(tables), run.path / "figures")
    run.manifest["finished"] = _now()
    run.mark_complete()  # the manifest, written last, commits the run


def _manifest(adapter: ModelAdapter) -> dict:
    model = adapter.model
    param = next(model.parameters())
    n_heads = adapter.head_shape[0]
    return {
        "created": _now(),
        "model_info": {
            "class": type(model).__name__,
            "layers": adapter.n_layers,
            "heads": n_heads,
            "kv_heads": kv_heads_of(adapter),  # query head h reads K/V head h // (heads // kv_heads)
            "context": adapter.context,
            "dtype": str(param.dtype).removeprefix("torch."),
        },
        "score_definitions": ScoreSettings().definitions(),
        "device": str(param.device) + (f" ({torch.cuda.get_device_name(param.device)})" if param.is_cuda else ""),
        "versions": versions(),
        "git_revision": git_revision(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
