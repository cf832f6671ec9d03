"""``workbench ablate``, ``workbench compress`` and ``workbench sae``: join the ``workbench`` CLI through the
``workbench.commands`` entry-point group (see ``pyproject.toml``), so that ``workbench`` never
imports ``probes``.

Thin: options (their defaults from the experiments' settings), model loading, one call into
:mod:`probes.ablation`, :mod:`probes.compress` or :mod:`probes.sae`, printing.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from probes.ablation import AblationResult, AblationSettings
from probes.compress import Compression, CompressionSettings
from probes.compress_classifiers import ClassifierComparison
from probes.sae import SAE_BATCH, SAEEvalSettings, SAETrainSettings
from workbench.console import (
    ReportingGroup,
    check_output_folder,
    console,
    parse_list,
    reports_errors,
)
from workbench.runs import Run

TEXT_HELP = "Text file, folder or hf:DATASET (default: built-in docstrings)."

sae_app = typer.Typer(
    help="Sparse autoencoders on attention outputs (sae-lens format).", no_args_is_help=True, cls=ReportingGroup
)


def register(app: typer.Typer) -> None:
    """Add the probes' commands to the ``workbench`` CLI (idempotent)."""
    if not any(c.name == "ablate" for c in app.registered_commands):
        app.command("ablate")(ablate)
    if not any(c.name == "compress" for c in app.registered_commands):
        app.command("compress")(compress)
    if not any(g.name == "sae" for g in app.registered_groups):
        app.add_typer(sae_app, name="sae")


def _load(name: str, device: str | None, dtype: str | None = None):
    """The model, loaded under a status spinner."""
    import torch

    from workbench.models import load_model

    with console.status(f"loading {name}..."):
        return load_model(name, device=device, dtype=getattr(torch, dtype) if dtype else None)


@reports_errors
def ablate(
    run: Path = typer.Option(..., "--run", "-r", help="Run folder whose scores rank the heads."),
    rank_by: str = typer.Option(AblationSettings.rank_by, "--rank-by", help="Score that ranks the heads."),
    score_task: str = typer.Option(
        AblationSettings.score_task, help="Task of that score, when it was computed on several."
    ),
    k: str = typer.Option(
        ",".join(map(str, AblationSettings.ks)), "--k", help="Comma-separated numbers of top heads to ablate together."
    ),
    task: str = typer.Option(
        AblationSettings.task, "--task", "-t", help="Samples to measure on: niah, repeats or text."
    ),
    metric: str = typer.Option(
        AblationSettings.metric,
        help="needle_accuracy, answer_logprob (niah), "
        "induction_accuracy (repeats), text_loss (text); default: the task's first.",
    ),
    method: str = typer.Option(
        AblationSettings.method,
        help="uniform (Wu et al.: attention scores 0 in decoding steps; TransformerLens models), zero, mean or "
        "resample; default: uniform for needle_accuracy, zero for the other metrics.",
    ),
    length: int = typer.Option(
        AblationSettings.length, "--length", "-n", help="Tokens per sample (default: the run's shortest)."
    ),
    samples: int = typer.Option(
        AblationSettings.samples,
        "--samples",
        "-s",
        min=1,
        help=f"Samples (niah: per depth, {len(AblationSettings.depths)} depths).",
    ),
    draws: int = typer.Option(AblationSettings.draws, min=1, help="Random head sets per k."),
    control: str = typer.Option(
        AblationSettings.control,
        help="Random heads from outside the top max(k) heads (non_top, Wu et al.), outside the top k (all), or "
        "outside the top k in the top heads' layers (same_layers: controls for depth).",
    ),
    scan: bool = typer.Option(AblationSettings.scan, "--scan", help="Also ablate every head alone."),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: the run's)."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: CUDA when available)."),
    seed: int = typer.Option(AblationSettings.seed, help="Seed of the samples and the random head sets."),
) -> None:
    """Ablate the top-k heads of a run's score against k random heads (Wu et al.'s masking
    experiment: by default uniform attention in decoding steps, measured by needle accuracy);
    tables and figures go into the run folder."""
    from probes.ablation import rank_heads, run_ablation
    from workbench.runs import Run

    settings = AblationSettings(
        rank_by=rank_by,
        score_task=score_task,
        ks=parse_list(k, int, "--k", "integers"),
        task=task,
        metric=metric,
        method=method,
        length=length,
        samples=samples,
        draws=draws,
        control=control,
        scan=scan,
        seed=seed,
    )
    opened = Run.open(run)
    rank_heads(opened, rank_by, score_task)  # a score the run lacks is refused before the model loads
    recorded = opened.manifest["settings"]
    loaded = _load(model or recorded["model"], device, recorded.get("dtype"))
    _print_ablation(run_ablation(opened, loaded, settings))


def _print_ablation(result: AblationResult) -> None:
    table, metric, rank_by = result.table, result.settings.metric, result.settings.rank_by
    base = float(table[table["selection"] == "none"]["value"].iloc[0])
    out = Table(title=f"{metric} with the top-k {rank_by} heads ablated vs k random heads (no ablation: {base:.3f})")
    for col in ("k", "top-k heads", "top-k", "random: mean", "random: min–max"):
        out.add_column(col, justify="left" if col == "top-k heads" else "right")
    for k, group in table[table["selection"] != "none"].groupby("k"):
        top = group[group["selection"] == "top"].iloc[0]
        rand = group[group["selection"] == "random"]["value"]
        out.add_row(
            str(k), top["heads"], f"{top['value']:.3f}", f"{rand.mean():.3f}", f"{rand.min():.3f}–{rand.max():.3f}"
        )
    console.print(out)
    console.print(f"table in {result.path}")


@reports_errors
def compress(
    run: Path = typer.Option(..., "--run", "-r", help="Run folder whose scores rank the heads."),
    rank_by: str = typer.Option(
        None, "--rank-by", help="Score that ranks the heads (e.g. retrieval; or give --classifiers)."
    ),
    classifiers: bool = typer.Option(
        False,
        "--classifiers",
        help="Instead of a ranking: for each head classifier the run's scores allow (razor, wu, streaming, duo), "
        "stream the KV heads it does not keep full, against random sets of as many (--share, --stream ignored).",
    ),
    score_task: str = typer.Option(
        CompressionSettings.score_task, help="Task of that score, when it was computed on several."
    ),
    stream: str = typer.Option(
        CompressionSettings.stream,
        "--stream",
        help="Which end of the ranking streams first: highest or lowest (default: the score's own direction, "
        "e.g. lowest retrieval, highest streaming; see docs/compression.md).",
    ),
    share: str = typer.Option(
        ",".join(map(str, CompressionSettings.shares)),
        "--share",
        help="Comma-separated shares of the KV heads made streaming (of those outside the model's own sliding-window "
        "layers; 0: the uncompressed model, always measured).",
    ),
    sink: int = typer.Option(CompressionSettings.sink, "--sink", min=0, help="First tokens a streaming head keeps."),
    window: int = typer.Option(
        CompressionSettings.window, "--window", min=1, help="Recent tokens a streaming head keeps."
    ),
    task: str = typer.Option(",".join(CompressionSettings.tasks), "--task", "-t", help="niah, text or both."),
    length: str = typer.Option(
        None, "--length", "-n", help="Comma-separated needle lengths in tokens (default: the run's)."
    ),
    depths: str = typer.Option(",".join(map(str, CompressionSettings.depths)), help="Comma-separated needle depths."),
    samples: int = typer.Option(
        CompressionSettings.samples, "--samples", "-s", min=1, help="Needle samples per length and depth."
    ),
    text_samples: int = typer.Option(CompressionSettings.text_samples, min=1, help="Text samples."),
    text_length: int = typer.Option(
        CompressionSettings.text_length, min=2, help="Tokens per text sample (default: the longest needle length)."
    ),
    draws: int = typer.Option(CompressionSettings.draws, min=0, help="Random draws of the KV heads per share."),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: the run's)."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: CUDA when available)."),
    backend: str = typer.Option(CompressionSettings.backend, help="Kernel backend: auto, triton, cpu or reference."),
    seed: int = typer.Option(CompressionSettings.seed, help="Seed of the samples and the random draws."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier compression of other settings."),
) -> None:
    """KV-cache compression what-if: make a share of the KV heads streaming heads (first --sink and
    last --window keys only, in prefill and decoding), chosen by a run's ranking (--rank-by) and at
    random, or by each head classifier (--classifiers); needle accuracy, text loss and the KV cache
    saved go into the run's compress/ folder."""
    from probes.compress import check_rerun, head_values, run_compression
    from workbench.errors import WorkbenchError
    from workbench.runs import Run

    if classifiers == (rank_by is not None):
        raise WorkbenchError(
            "give --rank-by SCORE (shares of the KV heads streamed by a ranking) or --classifiers (each head "
            "classifier's streaming heads), " + ("not both" if classifiers else "one of them")
        )
    settings = CompressionSettings(
        rank_by=rank_by or CompressionSettings.rank_by,
        score_task=None if classifiers else score_task,
        stream=None if classifiers else stream,
        shares=parse_list(share, float, "--share", "numbers"),
        sink=sink,
        window=window,
        tasks=parse_list(task, str, "--task", "task names"),
        lengths=parse_list(length, int, "--length", "integers") or None,
        depths=parse_list(depths, float, "--depths", "numbers"),
        samples=samples,
        text_samples=text_samples,
        text_length=text_length,
        draws=draws,
        seed=seed,
        backend=backend,
    )
    opened = Run.open(run)
    if classifiers:
        _compare_classifiers(opened, settings, model, device, force)
        return
    head_values(opened, rank_by, score_task)  # refused before the model loads: a score the run lacks,
    check_rerun(opened, settings, force)  # an earlier compression of other settings
    recorded = opened.manifest["settings"]
    loaded = _load(model or recorded["model"], device, recorded.get("dtype"))
    _print_compression(run_compression(opened, loaded, settings, force=force))


def _measures(summary) -> list[tuple[str, str]]:
    """The summary's measured columns and their headings: needle accuracy, loss past the window
    (each only when the experiment measured it)."""
    shown = (("needle_accuracy", "needle acc."), ("text_loss_past_window", "loss past window"))
    return [(column, name) for column, name in shown if summary[column].notna().any()]


def _print_compression(found: Compression) -> None:
    s, summary, memory = found.settings, found.summary, found.memory
    base = summary[summary["policy"] == "none"].iloc[0]
    longest = int(memory["length"].max())
    measures = _measures(summary)
    out = Table(
        title=f"{s.sink} first + {s.window} last keys on a share of KV heads, chosen by {s.rank_by} "
        f"({s.direction} first) or at random (mean, min-max); uncompressed: "
        + ", ".join(f"{n} {float(base[c]):.3f}" for c, n in measures)
    )
    out.add_column("share")
    out.add_column("KV heads", justify="right")
    for _, name in measures:
        out.add_column(f"{name} ranked", justify="right")
        out.add_column(f"{name} random", justify="right")
    out.add_column(f"KV saved, {longest} tok.", justify="right")
    for share, group in summary[summary["policy"] != "none"].groupby("share"):
        ranked, rand = group[group["policy"] == "ranked"].iloc[0], group[group["policy"] == "random"]
        cells = []
        for c, _ in measures:
            spread = f"{rand[c].mean():.3f} ({rand[c].min():.2f}-{rand[c].max():.2f})" if len(rand) else "-"
            cells += [f"{ranked[c]:.3f}", spread]
        mem = memory[(memory["share"] == share) & (memory["length"] == longest)].iloc[0]
        saved = f"{mem['saved_fraction']:.1%}, {mem['bytes_saved'] / 2**20:.3g} MiB"
        out.add_row(f"{share:g}", str(int(ranked["kv_heads"])), *cells, saved)
    console.print(out)
    for note in found.notes:
        console.print(note)
    console.print(f"tables and figure in {found.path}")


def _compare_classifiers(
    run: Run, settings: CompressionSettings, model: str | None, device: str | None, force: bool
) -> None:
    """``workbench compress --classifiers``: checked before the model loads, then measured and printed."""
    from probes.compress_classifiers import check_classifier_rerun, run_classifier_comparison, run_classifiers

    run_classifiers(run)  # refused before the model loads: no classifier's scores in the run,
    check_classifier_rerun(run, settings, force)  # an earlier comparison of other settings
    recorded = run.manifest["settings"]
    loaded = _load(model or recorded["model"], device, recorded.get("dtype"))
    _print_classifier_comparison(run_classifier_comparison(run, loaded, settings, force=force))


def _print_classifier_comparison(found: ClassifierComparison) -> None:
    s, summary = found.settings, found.summary
    base = summary.iloc[0]
    measures = _measures(summary)
    out = Table(
        title=f"{s.sink} first + {s.window} last keys on the KV heads each classifier does not keep full, against "
        f"{s.draws} random sets of as many (mean); uncompressed: "
        + ", ".join(f"{n} {float(base[c]):.3f}" for c, n in measures)
    )
    out.add_column("classifier")
    out.add_column("KV heads full", justify="right")
    out.add_column("streamed", justify="right")
    for _, name in measures:
        out.add_column(name, justify="right")
        out.add_column(f"{name} random", justify="right")
    out.add_column(f"KV saved, {int(base['kv_length'])} tok.", justify="right")
    for row in summary.iloc[1:].itertuples():
        cells = []
        for c, _ in measures:
            rand = getattr(row, f"random_{c}")
            cells += [f"{getattr(row, c):.3f}", "-" if math.isnan(rand) else f"{rand:.3f}"]
        saved = f"{row.kv_saved_fraction:.1%}, {row.kv_bytes_saved / 2**20:.3g} MiB"
        out.add_row(row.classifier, str(row.kv_heads_full), str(row.kv_heads_streamed), *cells, saved)
    console.print(out)
    for note in found.notes:
        console.print(note)
    console.print(f"tables in {found.path}")


@sae_app.command("train")
@reports_errors
def sae_train(
    layer: int = typer.Option(..., "--layer", "-l", help="Layer whose hook_z (heads concatenated) the SAE reads."),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: the default zoo model)."),
    architecture: str = typer.Option(SAETrainSettings.architecture, help="topk or standard (L1)."),
    d_sae: int = typer.Option(SAETrainSettings.d_sae, min=1, help="Features."),
    k: int = typer.Option(SAETrainSettings.k, min=1, help="Active features (topk), at most --d-sae."),
    l1: float = typer.Option(SAETrainSettings.l1_coefficient, min=0.0, help="L1 coefficient (standard)."),
    samples: int = typer.Option(SAETrainSettings.samples, "--samples", "-s", min=2, help="Text samples to train on."),
    length: int = typer.Option(SAETrainSettings.length, "--length", "-n", min=2, help="Tokens per sample."),
    tokens: int = typer.Option(
        SAETrainSettings.training_tokens, min=2 * SAE_BATCH, help="Training tokens (samples are revisited)."
    ),
    text: str = typer.Option(SAETrainSettings.text, help=TEXT_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="Folder (default: saes/<model>-L<layer>-<architecture>)."),
    device: str = typer.Option(None, help="cpu, cuda, ..."),
    seed: int = typer.Option(SAETrainSettings.seed),
) -> None:
    """Train an SAE on one layer's attention output; save it in sae-lens's format with its
    evaluation, per-head attribution and top-activating contexts."""
    from probes.sae import train_and_evaluate
    from workbench.zoo import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    settings = SAETrainSettings(
        layer=layer,
        architecture=architecture,
        d_sae=d_sae,
        k=k,
        l1_coefficient=l1,
        samples=samples,
        length=length,
        training_tokens=tokens,
        text=text,
        seed=seed,
    )
    out = out or settings.default_folder(model)
    check_output_folder(out)  # before the model loads
    _print_sae(train_and_evaluate(_load(model, device), settings, out), out)


@sae_app.command("eval")
@reports_errors
def sae_eval(
    path: Path = typer.Argument(..., help="SAE folder (sae-lens format)."),
    layer: int = typer.Option(..., "--layer", "-l"),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: the default zoo model)."),
    samples: int = typer.Option(SAEEvalSettings.samples, "--samples", "-s", min=1),
    length: int = typer.Option(SAEEvalSettings.length, "--length", "-n", min=2),
    text: str = typer.Option(SAEEvalSettings.text, help=TEXT_HELP),
    device: str = typer.Option(None),
) -> None:
    """L0, explained variance, CE loss recovered and dead features of an SAE on text."""
    from probes.sae import evaluate_saved
    from workbench.zoo import DEFAULT_MODEL

    settings = SAEEvalSettings(layer=layer, samples=samples, length=length, text=text)
    _print_sae(evaluate_saved(_load(model or DEFAULT_MODEL, device), path, settings), path)


def _print_sae(metrics: dict, where: Path) -> None:
    table = Table(title=f"SAE {where}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
