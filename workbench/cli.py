"""The ``workbench`` command line."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import typer
from rich.table import Table

from workbench import __version__
from workbench.console import (
    ReportingGroup,
    check_output_folder,
    console,
    fail,
    parse_list,
    reports_errors,
    token_count,
)
from workbench.scoring import ScoreRunSettings
from workbench.scoring.duo import DuoSettings

app = typer.Typer(
    help="Attention workbench: attention statistics from fused kernels.", no_args_is_help=True, cls=ReportingGroup
)


def main_cli() -> None:
    """The ``workbench`` command: this module's commands plus those the higher layers register
    under the ``workbench.commands`` entry-point group (``probes``: ``workbench ablate``)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="workbench.commands"):
        entry.load()(app)
    app()


def _version(value: bool) -> None:
    if value:
        console.print(f"attention-workbench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Attention workbench."""


@app.command()
@reports_errors
def demo(
    tokens: int = typer.Option(4096, "--tokens", "-n", min=2, help="Sequence length."),
    backend: str = typer.Option(ScoreRunSettings.backend, help="Kernel backend: auto, triton, cpu or reference."),
) -> None:
    """Read planted head roles (sink, previous-token, local, diffuse) back from the kernel's statistics."""
    from workbench.demo import HEAD_ROLES, pattern_bytes, run_demo, uniform_entropy

    with console.status(f"attention with statistics over {tokens} tokens..."):
        res = run_demo(tokens, backend=backend)
    table = Table(title=f"Per-head statistics, mean over {res.n_tokens} query rows")
    table.add_column("statistic")
    for role in HEAD_ROLES:
        table.add_column(role, justify="right")
    for name, values in res.summary.items():
        table.add_row(name, *(f"{x:.3f}" for x in values))
    console.print(table)
    console.print(
        f"backend [bold]{res.backend}[/bold], {res.seconds:.2f} s. Uniform causal rows would have "
        f"entropy {uniform_entropy(res.n_tokens):.2f}. The full float32 pattern of these 4 heads "
        f"would take {pattern_bytes(res.n_tokens) / 2**30:.2f} GiB; the statistics take "
        f"{sum(t.numel() * t.element_size() for _, t in res.stats.items()) / 2**20:.2f} MiB."
    )


zoo_app = typer.Typer(
    help="The model zoo: small models trained by this project.", no_args_is_help=True, cls=ReportingGroup
)
app.add_typer(zoo_app, name="zoo")


def _require_zoo_name(name: str) -> None:
    from workbench.zoo import ZOO

    if name not in ZOO:
        fail(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO)}")


@zoo_app.command("list")
@reports_errors
def zoo_list() -> None:
    """Zoo models, their shapes and whether their weights are present."""
    from workbench.zoo import WEIGHTS_DIR, ZOO

    table = Table(title="Model zoo")
    for col in ("name", "layers x heads", "width", "trained", "description"):
        table.add_column(col)
    for spec in ZOO.values():
        present = (WEIGHTS_DIR / spec.name / "model.safetensors").exists()
        table.add_row(
            spec.name,
            f"{spec.n_layers} x {spec.n_heads}",
            str(spec.d_model),
            "yes" if present else "no",
            spec.description,
        )
    console.print(table)


@zoo_app.command("train")
@reports_errors
def zoo_train(
    name: str = typer.Argument(..., help="Zoo model to (re)train."),
    out: Path = typer.Option(None, help="Weights folder (default: the package's zoo/weights)."),
    corpus: Path = typer.Option(None, help="Corpus folder (`workbench zoo corpus`), for zoo-long."),
    max_seconds: float = typer.Option(None, help="Stop early after this long; the weights so far are kept."),
) -> None:
    """Retrain a zoo model from its recipe (deterministic seed)."""
    from workbench.zoo import WEIGHTS_DIR, ZOO, train

    _require_zoo_name(name)
    check_output_folder(out)
    metrics = train(ZOO[name], out or WEIGHTS_DIR, corpus_dir=corpus, max_seconds=max_seconds)
    stopped = f" (stopped early at step {metrics['stopped_at']})" if "stopped_at" in metrics else ""
    console.print(
        f"trained {name}: loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f} "
        f"in {metrics['seconds']:.0f} s on {metrics['device']}{stopped}; weights in {(out or WEIGHTS_DIR) / name}"
    )


@zoo_app.command("corpus")
@reports_errors
def zoo_corpus(
    out: Path = typer.Option(..., help="Folder for corpus.txt and manifest.json."),
    max_mb: float = typer.Option(130.0, help="Keep this many MB (= million tokens) of the shuffled documents."),
    min_mb: float = typer.Option(100.0, help="Refuse a corpus smaller than this."),
) -> None:
    """Build the offline training corpus of zoo-long from installed documentation (minutes)."""
    from workbench.zoo.corpus import build_corpus

    manifest = build_corpus(out, min_bytes=int(min_mb * 1e6), max_bytes=int(max_mb * 1e6))
    parts = ", ".join(f"{name} {src['bytes'] / 1e6:.0f} MB" for name, src in manifest["sources"].items())
    console.print(f"corpus of {manifest['bytes'] / 1e6:.1f} MB in {out} (found before the cut: {parts})")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@reports_errors
def bench(ctx: typer.Context) -> None:
    """Kernel benchmark (GPU); options as in `python -m kernels.benchmark --help`."""
    from kernels.benchmark import build_parser, out_problem
    from kernels.benchmark import main as bench_main

    out = build_parser().parse_args(ctx.args).out  # argparse reports bad options itself (exit 2)
    problem = out_problem(out) if out is not None else None
    if problem:  # the benchmark's own check, reported like every workbench error
        fail(problem)
    sys.exit(bench_main(ctx.args))


def _listed(values) -> str:
    """A default tuple of :class:`ScoreRunSettings` as the comma list the option takes."""
    return ",".join(str(v) for v in values)


@app.command()
@reports_errors
def score(
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Model name (workbench zoo list, minilm, random:..., tl:..., hf:...); default: the default zoo model.",
    ),
    task: str = typer.Option(
        _listed(ScoreRunSettings.tasks), "--task", "-t", help="Comma-separated tasks: niah, repeats, text."
    ),
    scores: str = typer.Option(
        None, "--scores", help="Comma-separated scores (default: all the tasks define that the model can compute)."
    ),
    lengths: str = typer.Option(
        None,
        "--lengths",
        "-n",
        help="Tokens per sample, comma-separated (k = 1024; "
        "default: the lengths of ScoreRunSettings where they fit the model's context).",
    ),
    samples: int = typer.Option(
        ScoreRunSettings.samples, "--samples", "-s", help="Samples per length (niah: per length and depth)."
    ),
    depths: str = typer.Option(_listed(ScoreRunSettings.depths), help="Needle depths, fractions of the haystack."),
    repeats: int = typer.Option(ScoreRunSettings.repeats, help="Copies of the random sequence in a repeats sample."),
    text: str = typer.Option(
        None,
        help="Text file or folder, or hf:DATASET[:CONFIG] (online), for the text "
        "task and the needle haystack (default: built-in docstrings).",
    ),
    prefill_chunk: int = typer.Option(
        None,
        "--prefill-chunk",
        min=1,
        help="Prefill in chunks of this many tokens against a KV cache (bounds activation memory at long "
        "lengths; same scores).",
    ),
    sink_tokens: int = typer.Option(ScoreRunSettings.sink_tokens, help="Keys that count as the attention sink."),
    window: int = typer.Option(ScoreRunSettings.window, help="Recent-key window of the streaming score."),
    seed: int = typer.Option(ScoreRunSettings.seed, help="Seed of the samples (and of random models' weights)."),
    device: str = typer.Option(
        None, help="cpu, cuda, cuda:1, ... (default: CUDA when available; under torchrun cuda:LOCAL_RANK)."
    ),
    device_map: str = typer.Option(
        None,
        "--device-map",
        help="Spread a model too large for one GPU over several: auto, balanced, sequential or a GPU count "
        "(instead of --device; docs/scale-out.md).",
    ),
    context_parallel: int = typer.Option(
        1,
        "--context-parallel",
        min=1,
        help="Under torchrun: spread each sample's tokens over groups of this many processes (long contexts; "
        "the groups share the samples; docs/scale-out.md).",
    ),
    dtype: str = typer.Option(None, help="float32, float16 or bfloat16 (default: the model's own)."),
    backend: str = typer.Option(ScoreRunSettings.backend, help="Kernel backend: auto, triton, cpu or reference."),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<model>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its own settings."),
    force: bool = typer.Option(False, "--force", help="Replace the run in --out."),
    top: int = typer.Option(3, min=1, help="Heads shown per score."),
    duo_steps: int = typer.Option(DuoSettings.steps, "--duo-steps", min=1, help="duo: training steps."),
    duo_lr: float = typer.Option(DuoSettings.lr, "--duo-lr", help="duo: peak learning rate (AdamW)."),
    duo_reg: float = typer.Option(DuoSettings.reg_weight, "--duo-reg", help="duo: weight of mean |gate| in the loss."),
    duo_sink: int = typer.Option(DuoSettings.sink, "--duo-sink", min=0, help="duo: first keys kept."),
    duo_recent: int = typer.Option(DuoSettings.recent, "--duo-recent", min=1, help="duo: recent keys kept."),
    duo_lengths: str = typer.Option(
        None,
        "--duo-lengths",
        help=f"duo: tokens per training sample, comma-separated (default: {_listed(DuoSettings.lengths)} where they "
        "fit the model's context).",
    ),
) -> None:
    """Score every attention head: sinks, entropy, streaming, retrieval, induction and more.

    Writes a run folder (manifest.json, head_scores.parquet, profiles.parquet, retrieval.parquet,
    figures/) and prints the top heads per score. Rerunning the same command resumes an
    interrupted run. Under `torchrun --nproc_per_node=N -m workbench score ...` the N processes
    share the samples; with `--context-parallel C` each sample's tokens are spread over groups of
    C of them (docs/scale-out.md). `--scores duo` trains DuoAttention's gates once per run
    (TransformerLens models; docs/scores.md, "DuoAttention gates")."""
    import io
    from contextlib import nullcontext, redirect_stdout

    from workbench import distributed
    from workbench.adapters import adapter_for
    from workbench.models import load_model
    from workbench.scoring import defaults_for, score_model
    from workbench.scoring.duo import default_lengths as default_lengths_duo
    from workbench.zoo import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    out = out or Path("runs") / model.replace("/", "_").replace(":", "_")
    check_output_folder(out)
    if resume:  # continue with the stored run's own model and settings
        from workbench.runs import Run

        stored = Run.open(out).manifest["settings"]
        model, dtype, seed = stored.get("model", model), stored.get("dtype"), stored.get("seed", seed)
    settings = ScoreRunSettings(  # checks the names before the model loads
        model=model,
        tasks=parse_list(task),
        scores=parse_list(scores),
        lengths=parse_list(lengths, token_count, "--lengths", "integers (k = 1024)")
        if lengths
        else ScoreRunSettings.lengths,
        samples=samples,
        depths=parse_list(depths, float, "--depths", "fractions"),
        repeats=repeats,
        text=text,
        sink_tokens=sink_tokens,
        window=window,
        seed=seed,
        dtype=dtype,
        backend=backend,
        prefill_chunk=prefill_chunk,
    )
    duo = None
    if "duo" in settings.scores:
        duo = DuoSettings(
            steps=duo_steps,
            lr=duo_lr,
            reg_weight=duo_reg,
            sink=duo_sink,
            recent=duo_recent,
            lengths=parse_list(duo_lengths, token_count, "--duo-lengths", "integers (k = 1024)")
            if duo_lengths
            else DuoSettings.lengths,
        )
    distributed.check_context_parallel(context_parallel)  # before the model loads
    if device_map is not None and distributed.launched():
        fail(
            "--device-map spreads one model over the GPUs; under torchrun each process holds its own model on "
            "cuda:LOCAL_RANK: use one or the other"
        )
    if device_map is None:
        placement = {"device": device or distributed.default_device()}
    else:  # load_model refuses --device with it
        placement = {"device": device, "device_map": int(device_map) if device_map.isdigit() else device_map}
    first = distributed.rank() == 0  # under torchrun only rank 0 prints; errors print on every rank (stderr)
    with nullcontext() if first else redirect_stdout(io.StringIO()):
        with console.status(f"loading {model}...") if first else nullcontext():
            loaded = load_model(model, dtype=dtype, seed=seed, **placement)
        default_lengths, default_scores = defaults_for(loaded, settings.tasks)
        settings = replace(
            settings,
            lengths=settings.lengths if lengths else default_lengths,
            scores=settings.scores if scores else default_scores,
        )
        if duo is not None:  # default training lengths: those that fit the model's context
            fit = duo if duo_lengths else replace(duo, lengths=default_lengths_duo(adapter_for(loaded).context))
            settings = replace(settings, duo=fit)
        with distributed.process_group(next(loaded.parameters()).device):
            run = score_model(
                loaded, settings, out, resume=resume, force=force, progress=first, context_parallel=context_parallel
            )
    if first:
        print_run(run, top)


def print_run(run, top: int = 3, per: str = "head", agg: str = "max", kv_heads: int | None = None) -> None:
    """The top heads per score and the model-level summary of a run; ``per="kv-group"``: the top
    KV groups, each scored by the ``agg`` of its query heads (docs/interop.md)."""
    import math

    from rich.markup import escape

    m = run.manifest
    s = m["settings"]
    hs = run.table("head_scores")
    what = "heads per score (layer.head value)"
    if per == "kv-group":
        from workbench.scoring.kv_groups import as_head_table, run_kv_group_scores

        hs = as_head_table(run_kv_group_scores(run, kv_heads), agg)
        what = f"KV groups per score (layer.kv_head {agg} over its query heads)"
    elif per != "head":
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"unknown --per {per!r}: choose head or kv-group")
    table = Table(title=f"{s['model']}: top {what}, {run.path}")
    for col in ("score", "task", "top heads", "samples"):
        table.add_column(col, justify="right" if col == "samples" else "left")
    for (score_name, task), group in hs.groupby(["score", "task"], sort=False):
        best = group.dropna(subset=["value"]).nlargest(top, "value")
        heads = "  ".join(
            f"{r.layer}.{r.head} [bold]{r.value:.2f}[/bold]" + (f" (q {r.query_heads})" if per != "head" else "")
            for r in best.itertuples()
        )
        heads = heads or "no samples"
        table.add_row(score_name, task, heads, str(int(group["samples"].max())))
    console.print(table)
    summary = m.get("summary", {})
    if summary:
        console.print(
            "  ".join(
                f"{escape(k)} [bold]{'nan' if isinstance(v, float) and math.isnan(v) else f'{v:.2f}'}[/bold]"
                for k, v in summary.items()
            )
        )
    timings = m.get("timings", {})
    console.print(
        f"{m.get('status')}; {timings.get('sample_seconds', 0):.1f} s of model time on {m.get('device')}; "
        f"tables and figures in {run.path}"
    )
    for warning in m.get("figure_warnings", []):
        console.print(f"[yellow]{warning}[/yellow]")


runs_app = typer.Typer(help="Run folders written by `workbench score`.", no_args_is_help=True, cls=ReportingGroup)
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
@reports_errors
def runs_list(root: Path = typer.Argument(Path("runs"), help="Folder holding run folders.")) -> None:
    """Runs under a folder: model, tasks, lengths, status, date."""
    from workbench.runs import list_runs

    runs, broken = list_runs(root)
    table = Table(title=f"Runs in {root}")
    for col in ("run", "model", "tasks", "lengths", "samples", "status", "created"):
        table.add_column(col, overflow="fold")
    for run in runs:
        s = run.manifest["settings"]
        table.add_row(
            _relative(run.path, root),
            str(s.get("model")),
            ",".join(s.get("tasks", [])),
            ",".join(str(n) for n in s.get("lengths", [])),
            str(s.get("samples")),
            run.manifest["status"],
            str(run.manifest.get("created", "")),
        )
    console.print(table)
    for folder, reason in broken:
        console.print(f"[yellow]skipped {_relative(folder, root)}:[/yellow] {reason}")
    if not runs and not broken:
        console.print(f"no runs in {root}: create one with `workbench score`")


def _relative(folder: Path, root: Path) -> str:
    return str(folder.relative_to(root)) if folder != root else "."


@runs_app.command("show")
@reports_errors
def runs_show(
    run: Path = typer.Argument(..., help="Run folder."),
    top: int = typer.Option(3, min=1, help="Heads shown per score."),
    per: str = typer.Option(
        "head", "--per", help="head, or kv-group: each key/value head scored over its query heads (GQA models)."
    ),
    agg: str = typer.Option("max", "--agg", help="With --per kv-group: max or mean over the group's query heads."),
    kv_heads: int = typer.Option(
        None, "--kv-heads", min=1, help="Key/value heads per layer, for runs that do not record it."
    ),
) -> None:
    """A run's settings, top heads (or KV groups) per score and summary."""
    from workbench.runs import Run

    opened = Run.open(run)
    settings = opened.manifest["settings"]
    console.print(" ".join(f"{k}={v}" for k, v in settings.items()))
    print_run(opened, top, per=per, agg=agg, kv_heads=kv_heads)


_FORMATS_HELP = (
    "duo (DuoAttention's pattern folder), retrieval-head (Retrieval_Head's JSON) or kv-table (.csv/.parquet)."
)


@app.command("export")
@reports_errors
def export_command(
    run: Path = typer.Option(..., "--run", help="Run folder."),
    score: str = typer.Option(..., "--score", help="The score to export (as `workbench runs show` lists them)."),
    fmt: str = typer.Option(..., "--format", help=_FORMATS_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder (duo) or file (.json; .csv or .parquet) to write."),
    task: str = typer.Option(None, "--task", help="The task whose values to export, when the score has several."),
    agg: str = typer.Option(None, "--agg", help="duo, kv-table: max (default) or mean over each KV group."),
    invert: bool = typer.Option(False, "--invert", help="Export 1 - value (scores where high means compressible)."),
    rescale: bool = typer.Option(False, "--rescale", help="Map the score's range onto [0, 1] first."),
    threshold: float = typer.Option(None, "--threshold", help="Full-attention KV heads: value >= this."),
    sparsity: float = typer.Option(
        None, "--sparsity", help="Full-attention KV heads: all but this share of lowest values (kv-table default 0.5)."
    ),
    sink_size: int = typer.Option(
        None, "--sink-size", min=0, help="duo: config.json's sink_size (default: the run's)."
    ),
    recent_size: int = typer.Option(
        None, "--recent-size", min=1, help="duo: config.json's recent_size (default: the run's window)."
    ),
    kv_heads: int = typer.Option(None, "--kv-heads", min=1, help="Key/value heads per layer, for older runs."),
) -> None:
    """Write a run's score in a format other tools read (docs/interop.md)."""
    from workbench.interop import export_scores
    from workbench.runs import Run

    path, what = export_scores(
        Run.open(run),
        score,
        fmt,
        out,
        task=task,
        agg=agg,
        invert=invert,
        rescale=rescale,
        threshold=threshold,
        sparsity=sparsity,
        sink_size=sink_size,
        recent_size=recent_size,
        kv_heads=kv_heads,
    )
    console.print(f"wrote {path}: {what}")


@app.command("import")
@reports_errors
def import_command(
    path: Path = typer.Argument(..., help="The file (or DuoAttention pattern folder) to read."),
    fmt: str = typer.Option(..., "--format", help=_FORMATS_HELP),
    run: Path = typer.Option(..., "--run", help="Run folder of the same model."),
    name: str = typer.Option(..., "--name", help="Name of the imported score (in the run's imported_scores table)."),
    agg: str = typer.Option("max", "--agg", help="Per-KV-head imports are compared with this aggregate of each group."),
    kv_heads: int = typer.Option(None, "--kv-heads", min=1, help="Key/value heads per layer, for older runs."),
) -> None:
    """Read another tool's head scores into a run, beside its own, and compare them (docs/interop.md)."""
    import math

    from workbench.interop import compare_imported, import_scores
    from workbench.runs import Run

    opened = Run.open(run)
    rows = import_scores(opened, path, fmt, name, kv_heads=kv_heads)
    level = opened.manifest["imports"][name]["level"]
    console.print(
        f"imported {name} ({fmt}, per {level.replace('_', ' ')}) for {len(rows)} query heads into {opened.path}"
    )
    table = Table(title=f"{name} against the run's scores (per {level.replace('_', ' ')})")
    for col in ("score", "task", "heads", "pearson", "spearman"):
        table.add_column(col, justify="left" if col in ("score", "task") else "right")
    for r in compare_imported(opened, name, agg=agg, kv_heads=kv_heads).itertuples():
        cells = ("n/a" if math.isnan(v) else f"{v:+.2f}" for v in (r.pearson, r.spearman))
        table.add_row(r.score, r.task, str(r.heads), *cells)
    console.print(table)
