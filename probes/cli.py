"""``workbench ablate``: joins the ``workbench`` CLI through the ``workbench.commands``
entry-point group (see ``pyproject.toml``), so that ``workbench`` never imports ``probes``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from workbench.console import (
    ReportingGroup,
    check_output_folder,
    console,
    reports_errors,
)

#: Metric (a function of ``probes.ablation``) -> the task whose samples it needs.
METRICS = {
    "needle_accuracy": "niah",
    "answer_logprob": "niah",
    "induction_accuracy": "repeats",
    "text_loss": "text",
}
DEFAULT_METRIC = {"niah": "needle_accuracy", "repeats": "induction_accuracy", "text": "text_loss"}
#: Activations per SAE training step; training needs at least two steps.
SAE_BATCH = 1024


sae_app = typer.Typer(help="Sparse autoencoders on attention outputs (sae-lens format).", no_args_is_help=True,
                      cls=ReportingGroup)


def register(app: typer.Typer) -> None:
    """Add the probes' commands to the ``workbench`` CLI (idempotent)."""
    if not any(c.name == "ablate" for c in app.registered_commands):
        app.command("ablate")(ablate)
    if not any(g.name == "sae" for g in app.registered_groups):
        app.add_typer(sae_app, name="sae")


@reports_errors
def ablate(
    run: Path = typer.Option(..., "--run", "-r", help="Run folder whose scores rank the heads."),
    rank_by: str = typer.Option("retrieval", "--rank-by", help="Score that ranks the heads."),
    score_task: str = typer.Option(None, help="Task of that score, when it was computed on several."),
    k: str = typer.Option("1,2,4", "--k", help="Comma-separated numbers of top heads to ablate together."),
    task: str = typer.Option("niah", "--task", "-t", help="Samples to measure on: niah, repeats or text."),
    metric: str = typer.Option(None, help="needle_accuracy, answer_logprob (niah), induction_accuracy (repeats), "
                               "text_loss (text); default: the task's first."),
    method: str = typer.Option("zero", help="zero, mean or resample."),
    length: int = typer.Option(None, "--length", "-n", help="Tokens per sample (default: the run's shortest)."),
    samples: int = typer.Option(8, "--samples", "-s", min=1, help="Samples (niah: per depth, 3 depths)."),
    draws: int = typer.Option(5, min=1, help="Random head sets per k."),
    control: str = typer.Option("all", help="Random heads from all layers, or from the top heads' layers "
                                "(same_layers: controls for depth)."),
    scan: bool = typer.Option(False, "--scan", help="Also ablate every head alone."),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: the run's)."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: CUDA when available)."),
    seed: int = typer.Option(0, help="Seed of the samples and the random head sets."),
) -> None:
    """Ablate the top-k heads of a run's score against k random heads (Wu et al.'s masking
    experiment); tables and figures go into the run folder."""
    _ablate(run, rank_by, score_task, k, task, metric, method, length, samples, draws, control, scan, model,
            device, seed)


def _ablate(run_path, rank_by, score_task, k, task, metric, method, length, samples, draws, control, scan,
            model_name, device, seed) -> None:
    import torch

    from probes import ablation
    from workbench.errors import WorkbenchError
    from workbench.models import load_model, task_tokenizer
    from workbench.plots import ablation_curve, head_map, save_figures
    from workbench.runs import Run
    from workbench.tasks import needle_samples, repeat_samples, text_samples

    run = Run.open(run_path)
    settings = run.manifest["settings"]
    metric = metric or DEFAULT_METRIC.get(task)
    if task not in DEFAULT_METRIC:
        raise WorkbenchError(f"unknown task {task!r}; choose from: {', '.join(DEFAULT_METRIC)}")
    if METRICS.get(metric) != task:
        valid = [m for m, t in METRICS.items() if t == task]
        raise WorkbenchError(f"metric {metric!r} does not fit task {task}; choose from: {', '.join(valid)}")
    try:
        ks = [int(x) for x in k.split(",") if x.strip()]
    except ValueError:
        raise WorkbenchError(f"--k must be comma-separated integers, got {k!r}") from None
    if method == "resample" and task == "niah":
        raise WorkbenchError("resample ablation needs reference inputs as long as the measured ones: use it with "
                             "--task repeats or text, or --method mean")
    ranking = ablation.rank_heads(run, rank_by, score_task)
    with console.status(f"loading {model_name or settings['model']}..."):
        model = load_model(model_name or settings["model"], device=device,
                           dtype=getattr(torch, settings["dtype"]) if settings.get("dtype") else None)
    tok = task_tokenizer(model)
    length = length or min(settings["lengths"])
    _check_length(model, length)
    gen_seed = seed + 10_000  # fresh samples, not the ones the scores came from
    if task == "niah":
        items = needle_samples(tok, [length], [0.2, 0.5, 0.8], samples, seed=gen_seed)
    elif task == "repeats":
        if (length - 1) // 2 < 2:
            raise WorkbenchError(f"--length {length} is too short for repeats samples: give at least 5 tokens")
        items = repeat_samples(tok, (length - 1) // 2, 2, samples, seed=gen_seed)
    else:
        items = text_samples(tok, settings.get("text"), length, samples)
    measure = getattr(ablation, metric)(items)
    reference = torch.stack([s.ids for s in items]) if method != "zero" else None
    table = ablation.cumulative(model, measure, ranking, ks, draws=draws, method=method, reference=reference,
                                seed=seed, control=control)
    config = {"rank_by": rank_by, "task": task, "metric": metric, "method": method, "length": length,
              "control": control}
    table = table.assign(**config)
    name = f"ablation_{rank_by}_{metric}_{method}_{control}"
    run.write_table(name, table)
    figures = {name: ablation_curve(table, metric)}
    if scan:
        scanned = ablation.scan_heads(model, measure, method, reference).assign(**config)
        run.write_table(f"scan_{metric}_{method}", scanned)
        figures[f"scan_{metric}_{method}"] = head_map(
            scanned.assign(score=f"{metric} change when ablated alone", value=scanned["delta"], task=task),
            f"{metric} change when ablated alone")
    warnings = save_figures(figures, run.path / "figures")
    run.manifest.setdefault("ablations", [])
    run.manifest["ablations"] = [a for a in run.manifest["ablations"] if a.get("table") != name] + [
        {**config, "k": ks, "draws": draws, "samples": len(items), "table": name, "figure_warnings": warnings}]
    run.save_manifest()
    _print(table, metric, rank_by, run.path / f"{name}.parquet")


def _print(table, metric: str, rank_by: str, where: Path) -> None:
    base = float(table[table["selection"] == "none"]["value"].iloc[0])
    out = Table(title=f"{metric} with the top-k {rank_by} heads ablated vs k random heads (no ablation: {base:.3f})")
    for col in ("k", "top-k heads", "top-k", "random: mean", "random: min–max"):
        out.add_column(col, justify="left" if col == "top-k heads" else "right")
    for k, group in table[table["selection"] != "none"].groupby("k"):
        top = group[group["selection"] == "top"].iloc[0]
        rand = group[group["selection"] == "random"]["value"]
        out.add_row(str(k), top["heads"], f"{top['value']:.3f}", f"{rand.mean():.3f}", f"{rand.min():.3f}–{rand.max():.3f}")
    console.print(out)
    console.print(f"table in {where}")


@sae_app.command("train")
@reports_errors
def sae_train(
    layer: int = typer.Option(..., "--layer", "-l", help="Layer whose hook_z (heads concatenated) the SAE reads."),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: the default zoo model)."),
    architecture: str = typer.Option("topk", help="topk or standard (L1)."),
    d_sae: int = typer.Option(128, min=1, help="Features."),
    k: int = typer.Option(8, min=1, help="Active features (topk), at most --d-sae."),
    l1: float = typer.Option(1.0, min=0.0, help="L1 coefficient (standard)."),
    samples: int = typer.Option(48, "--samples", "-s", min=2, help="Text samples to train on."),
    length: int = typer.Option(256, "--length", "-n", min=2, help="Tokens per sample."),
    tokens: int = typer.Option(400_000, min=2 * SAE_BATCH, help="Training tokens (samples are revisited)."),
    text: str = typer.Option(None, help="Text file, folder or hf:DATASET (default: built-in docstrings)."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder (default: saes/<model>-L<layer>-<architecture>)."),
    device: str = typer.Option(None, help="cpu, cuda, ..."),
    seed: int = typer.Option(0),
) -> None:
    """Train an SAE on one layer's attention output; save it in sae-lens's format with its
    evaluation, per-head attribution and top-activating contexts."""
    _sae_train(layer, model, architecture, d_sae, k, l1, samples, length, tokens, text, out, device, seed)


def _sae_train(layer, model_name, architecture, d_sae, k, l1, samples, length, tokens, text, out, device, seed):
    import json

    from probes import sae as saes
    from workbench.adapters import adapter_for
    from workbench.errors import WorkbenchError
    from workbench.models import load_model
    from workbench.runs import atomic_write
    from workbench.tasks import text_samples
    from workbench.zoo import DEFAULT_MODEL

    model_name = model_name or DEFAULT_MODEL
    if architecture == "topk" and k > d_sae:
        raise WorkbenchError(f"--k {k} active features cannot exceed --d-sae {d_sae} features")
    out = out or Path("saes") / f"{model_name.replace('/', '_').replace(':', '_')}-L{layer}-{architecture}"
    check_output_folder(out)
    model = load_model(model_name, device=device)
    _check_length(model, length)
    items = text_samples(model.tokenizer, text, length, samples + max(2, samples // 8))
    if len(items) < samples + 2:
        raise WorkbenchError(f"the text holds only {len(items)} samples of {length} tokens; lower --samples")
    train, held_out = items[:samples], items[samples:]
    sae = saes.train_sae(model, layer, train, architecture, d_sae=d_sae, k=k, l1_coefficient=l1,
                         training_tokens=tokens, batch=SAE_BATCH, seed=seed,
                         device=str(next(model.parameters()).device))
    saes.save_sae(sae, out)
    sae = saes.load_sae(out, model, layer)  # the inference form, as every later reader sees it
    metrics = saes.evaluate(model, sae, layer, held_out)
    atomic_write(out / "evaluation.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    n_heads = adapter_for(model).head_shape[0]
    saes.head_attribution(sae, n_heads).to_parquet(out / "head_attribution.parquet", index=False)
    contexts = saes.top_contexts(model, sae, layer, held_out)
    contexts.to_parquet(out / "top_contexts.parquet", index=False)
    saes.direct_attribution(model, sae, layer, held_out, contexts, n_heads).to_parquet(
        out / "direct_attribution.parquet", index=False)
    _print_sae(metrics, out)


@sae_app.command("eval")
@reports_errors
def sae_eval(
    path: Path = typer.Argument(..., help="SAE folder (sae-lens format)."),
    layer: int = typer.Option(..., "--layer", "-l"),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: the default zoo model)."),
    samples: int = typer.Option(8, "--samples", "-s", min=1),
    length: int = typer.Option(256, "--length", "-n", min=2),
    text: str = typer.Option(None, help="Text file, folder or hf:DATASET (default: built-in docstrings)."),
    device: str = typer.Option(None),
) -> None:
    """L0, explained variance, CE loss recovered and dead features of an SAE on text."""
    from probes import sae as saes
    from workbench.models import load_model
    from workbench.tasks import text_samples
    from workbench.zoo import DEFAULT_MODEL

    loaded = load_model(model or DEFAULT_MODEL, device=device)
    _check_length(loaded, length)
    sae = saes.load_sae(path, loaded, layer)
    items = text_samples(loaded.tokenizer, text, length)[-samples:]  # the end of the text: not trained on
    _print_sae(saes.evaluate(loaded, sae, layer, items), path)


def _check_length(model, length: int) -> None:
    """Refuse samples longer than the model's context (the model would fail on them)."""
    from workbench.adapters import adapter_for
    from workbench.errors import WorkbenchError

    context = adapter_for(model).context
    if context is not None and length > context:
        raise WorkbenchError(f"--length {length} is longer than the model's context of {context} tokens")


def _print_sae(metrics: dict, where: Path) -> None:
    table = Table(title=f"SAE {where}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
