"""What every page of the explorer shares: the folders it serves, the runs in them (only those
inside the runs folder), the chosen run and head, and cached models."""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from workbench.errors import WorkbenchError
from workbench.runs import MANIFEST, Run

#: Session-state key of the head chosen on any page, ``(layer, head)``.
HEAD = "chosen_head"
#: Session-state key of the page to show on the next run (the page selector takes it then).
GOTO = "goto_page"


@dataclass(frozen=True)
class Folders:
    """The two folders the explorer reads (resolved); nothing outside them is shown."""

    runs: Path
    saes: Path


def parse_args(argv: list[str]) -> Folders:
    """``--runs DIR`` (default ``runs``) and ``--saes DIR`` (default ``saes``) from the script's
    arguments (what follows ``--`` on the ``streamlit run`` line); other arguments are ignored."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--saes", default="saes")
    args, _ = parser.parse_known_args(argv)
    return Folders(Path(args.runs).expanduser().resolve(), Path(args.saes).expanduser().resolve())


def inside(root: Path, name: str | None) -> Path | None:
    """``root/name`` when ``name`` names ``root`` itself (``"."``) or a folder directly inside it
    after resolving links and ``..``; None for anything else (absolute paths, escapes, nesting)."""
    if not name or "\x00" in name or len(name) > 255:
        return None
    root = root.resolve()
    target = (root / name).resolve()
    if target != root and target.parent != root:
        return None
    return target if target.is_dir() else None


def shown(name: str, limit: int = 80) -> str:
    """``name`` as a message quotes it: its ``repr``, cut to ``limit`` characters (names come from
    the address, which anyone can make as long as they like)."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def folders_inside(root: Path) -> tuple[list[Path], list[str]]:
    """The folders directly in ``root`` that stay inside it once links are resolved (sorted), and
    the names of those that lead elsewhere. Only names and ``stat`` are looked at, so a folder
    that links out of ``root`` is never listed or read."""
    kept, outside = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if inside(root, folder.name) == folder.resolve():
            kept.append(folder)
        else:
            outside.append(folder.name)
    return kept, outside


#: Why a folder that links out of the runs or SAE folder is skipped.
LINKS_OUT = "it links outside the {what} folder, and the explorer reads only folders inside it"


@dataclass
class Context:
    """What a page renders from: the folders, the runs found (by name), the runs that could not be
    read, and the run chosen in the sidebar (None when there is none)."""

    folders: Folders
    runs: dict[str, Run] = field(default_factory=dict)
    broken: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None  # why there is no run to show (missing or empty folder)
    run_name: str | None = None

    @property
    def run(self) -> Run | None:
        return self.runs.get(self.run_name) if self.run_name else None

    def need_run(self) -> Run | None:
        """The chosen run, or None after telling the user why there is none."""
        if self.run is None:
            st.info(self.problem or "Choose a run in the sidebar.")
        return self.run


def find_runs(folders: Folders) -> Context:
    """The runs directly inside the runs folder, newest first, by folder name (``"."`` for the
    folder itself). Folders that link outside it are skipped with a reason, unread."""
    ctx = Context(folders)
    root = folders.runs
    if not root.is_dir():
        ctx.problem = (
            f"The runs folder {root} does not exist. Start the explorer with `workbench app --runs DIR` "
            "on a folder of runs; `workbench score` writes them to runs/<model>."
        )
        return ctx
    try:
        kept, outside = folders_inside(root)
    except OSError as exc:
        ctx.problem = f"The runs folder {root} cannot be read ({exc}); check its permissions."
        return ctx
    found = []
    for name, folder in [(".", root), *((f.name, f) for f in kept)]:
        if not (folder / MANIFEST).exists():
            continue
        try:
            found.append((name, Run.open(folder)))
        except WorkbenchError as exc:
            ctx.broken.append((name, str(exc)))
    found.sort(key=lambda item: str(item[1].manifest.get("created", "")), reverse=True)
    ctx.runs = dict(found)
    ctx.broken += [(name, LINKS_OUT.format(what="runs")) for name in outside]
    if not ctx.runs:
        ctx.problem = (
            f"No readable runs in {root}"
            + (" (see the warnings above)" if ctx.broken else "")
            + f". Create one with `workbench score --out {root}/<name>`."
        )
    return ctx


def chosen_head(n_layers: int, n_heads: int) -> tuple[int, int]:
    """The head chosen so far (on any page), kept within the model's shape."""
    layer, head = st.session_state.get(HEAD, (0, 0))
    return min(max(int(layer), 0), n_layers - 1), min(max(int(head), 0), n_heads - 1)


def head_picker(n_layers: int, n_heads: int, key: str) -> tuple[int, int]:
    """Layer and head selectors that start at the chosen head and update it."""
    layer, head = chosen_head(n_layers, n_heads)
    left, right = st.columns(2)
    layer = left.selectbox("layer", range(n_layers), index=layer, key=f"{key}.pick_layer")
    head = right.selectbox("head", range(n_heads), index=head, key=f"{key}.pick_head")
    st.session_state[HEAD] = (int(layer), int(head))
    return int(layer), int(head)


def open_head(layer: int, head: int) -> None:
    """Choose a head and show its detail page on the next run."""
    st.session_state[HEAD] = (int(layer), int(head))
    st.session_state[GOTO] = "Head detail"


def run_shape(run: Run) -> tuple[int, int]:
    """``(layers, heads)`` of a run's model (from the manifest, else from its head scores)."""
    info = run.manifest.get("model_info") or {}
    if isinstance(info.get("layers"), int) and isinstance(info.get("heads"), int):
        return info["layers"], info["heads"]
    hs = run.table("head_scores")
    return int(hs["layer"].max()) + 1, int(hs["head"].max()) + 1


@st.cache_resource(show_spinner="loading the model...", max_entries=2)
def cached_model(name: str, dtype: str | None = None):
    """``(model, lock)``: one loaded model per name and dtype, shared by every session; hold the
    lock while instrumenting it (instrumentation swaps its attention for the duration)."""
    import torch

    from workbench.models import load_model

    return load_model(name, dtype=getattr(torch, dtype) if dtype else None), threading.Lock()


def attend_with(name: str, prompt, dtype: str | None = None):
    """:func:`workbench.prompt.attend` on the cached model ``name``."""
    from workbench.prompt import attend

    model, lock = cached_model(name, dtype)
    with lock:
        return attend(model, prompt)
