"""The ``workbench`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from workbench import __version__

app = typer.Typer(help="Attention workbench: attention statistics from fused kernels.", no_args_is_help=True)
console = Console()


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
def demo(
    tokens: int = typer.Option(4096, "--tokens", "-n", min=2, help="Sequence length."),
    backend: str = typer.Option("auto", help="Kernel backend: auto, triton or reference."),
) -> None:
    """Read planted head roles (sink, previous-token, local, diffuse) back from the kernel's statistics."""
    from kernels import AttentionInputError
    from workbench.demo import HEAD_ROLES, pattern_bytes, run_demo, uniform_entropy

    with console.status(f"attention with statistics over {tokens} tokens..."):
        try:
            res = run_demo(tokens, backend=backend)
        except AttentionInputError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
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


zoo_app = typer.Typer(help="The model zoo: small models trained by this project.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


def _require_zoo_name(name: str) -> None:
    from workbench.zoo import ZOO

    if name not in ZOO:
        console.print(f"[red]error:[/red] unknown zoo model {name!r}; choose one of: {', '.join(ZOO)}")
        raise typer.Exit(2)


@zoo_app.command("list")
def zoo_list() -> None:
    """Zoo models, their shapes and whether their weights are present."""
    from workbench.zoo import WEIGHTS_DIR, ZOO

    table = Table(title="Model zoo")
    for col in ("name", "layers x heads", "width", "trained", "description"):
        table.add_column(col)
    for spec in ZOO.values():
        present = (WEIGHTS_DIR / spec.name / "model.safetensors").exists()
        table.add_row(spec.name, f"{spec.n_layers} x {spec.n_heads}", str(spec.d_model),
                      "yes" if present else "no", spec.description)
    console.print(table)


@zoo_app.command("train")
def zoo_train(
    name: str = typer.Argument(..., help="Zoo model to (re)train."),
    out: Path = typer.Option(None, help="Weights folder (default: the package's zoo/weights)."),
) -> None:
    """Retrain a zoo model from its recipe (deterministic seed)."""
    from workbench.zoo import WEIGHTS_DIR, ZOO, train

    _require_zoo_name(name)
    metrics = train(ZOO[name], out or WEIGHTS_DIR)
    console.print(f"trained {name}: loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f} "
                  f"in {metrics['seconds']:.0f} s on {metrics['device']}; weights in {(out or WEIGHTS_DIR) / name}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Kernel benchmark (GPU); options as in `python -m kernels.benchmark --help`."""
    from kernels.benchmark import main as bench_main

    sys.exit(bench_main(ctx.args))


@zoo_app.command("measure")
def zoo_measure(
    name: str = typer.Argument(None, help="Zoo model (default: the default zoo model)."),
    length: int = typer.Option(1024, "--length", "-n", min=64, help="Tokens per text and needle sample."),
    samples: int = typer.Option(16, "--samples", "-s", min=1, help="Samples per measurement."),
    periods: str = typer.Option("37,300", help="Comma-separated repeat periods for the induction test."),
) -> None:
    """What every head of a zoo model does: sinks, previous-token, induction and needle copying."""
    from workbench.errors import WorkbenchError
    from workbench.zoo import DEFAULT_MODEL, load
    from workbench.zoo.measure import measure

    name = name or DEFAULT_MODEL
    _require_zoo_name(name)
    try:
        model = load(name)
    except WorkbenchError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    context = model.cfg.n_ctx
    try:
        period_list = tuple(int(p) for p in periods.split(","))
    except ValueError:
        period_list = ()
    if not period_list or any(not 2 <= p <= (context - 1) // 2 for p in period_list) or length > context:
        console.print(f"[red]error:[/red] {name} has a context of {context} tokens: --length must be at most "
                      f"{context} and --periods integers from 2 to {(context - 1) // 2} (got {periods!r})")
        raise typer.Exit(2)
    with console.status(f"measuring {name} on {samples} samples of {length} tokens..."):
        result = measure(model, n_samples=samples, length=length, periods=period_list)
    columns = {"sink_mass": "sink", "previous_token_mass": "prev"}
    for p in period_list:
        columns[f"induction_mass_period_{p}"] = f"ind@{p}"
        columns[f"sink_mass_first_copy_period_{p}"] = f"idle sink@{p}"
    columns["copy_rate"] = "copy"
    table = Table(title=f"{name}: attention mass per head (layer.head)")
    table.add_column("head")
    for title in columns.values():
        table.add_column(title, justify="right")
    for head in result["sink_mass"]:
        values = [result[key][head] for key in columns]
        table.add_row(head, *(f"[bold]{v:.2f}[/bold]" if v >= 0.5 else f"{v:.2f}" for v in values))
    console.print(table)
    console.print("sink, prev: mass on the first / previous token over text. ind@T: mass on the token after "
                  "the earlier occurrence, in the second copy of a random sequence of period T. idle sink@T: "
                  "mass on the first token in the first copy (nothing to copy yet). copy: share of needle-answer "
                  "steps whose most-attended key is inside the needle and holds the generated token.")
    console.print(f"needle accuracy (greedy, 4 digits): {result['needle_accuracy']:.2f} "
                  f"on {result['needle_samples']} samples of {length} tokens")
