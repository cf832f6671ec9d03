"""``workbench app``: joins the ``workbench`` CLI through the ``workbench.commands`` entry-point
group (see ``pyproject.toml``), so that neither ``workbench`` nor ``probes`` imports ``app``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from workbench.console import console, fail

#: The Streamlit script of the explorer.
MAIN = Path(__file__).with_name("main.py")


def register(app: typer.Typer) -> None:
    """Add ``workbench app`` to the ``workbench`` CLI (idempotent)."""
    if not any(c.name == "app" for c in app.registered_commands):
        app.command("app")(explorer)


def streamlit_command(runs: Path, saes: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` command line that serves the explorer on ``host:port``: headless, no
    usage statistics, no static file serving, the folders passed to the script after ``--``."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(MAIN),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.enableStaticServing",
        "false",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--",
        "--runs",
        str(runs),
        "--saes",
        str(saes),
    ]


def explorer(
    runs: Path = typer.Option(
        Path("runs"), "--runs", "-r", help="Folder of run folders (what `workbench score` writes into)."
    ),
    saes: Path = typer.Option(
        Path("saes"), "--saes", help="Folder of SAE folders (what `workbench sae train` writes into; may be missing)."
    ),
    port: int = typer.Option(8501, "--port", "-p", min=1, max=65535, help="Port to serve on."),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to serve on (localhost by default; 0.0.0.0 serves every network interface).",
    ),
) -> None:
    """Start the Streamlit explorer: runs, head maps, head detail, retrieval, ablations, SAE
    features and live prompts, at http://HOST:PORT."""
    runs = runs.expanduser()
    if not runs.is_dir():
        what = "is a file, not a folder" if runs.exists() else "does not exist"
        fail(
            f"the runs folder {runs} {what}: create runs with `workbench score` "
            "(they go to runs/<model>) or pass --runs DIR"
        )
    if saes.exists() and not saes.is_dir():
        fail(f"--saes {saes} is a file, not a folder")
    command = streamlit_command(runs.resolve(), saes.expanduser().resolve(), port, host)
    console.print(f"explorer of {runs.resolve()} at http://{host}:{port} (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execv(command[0], command)  # streamlit takes this process over: signals reach it directly
