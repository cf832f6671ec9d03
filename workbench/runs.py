"""Run directories: what a scoring run wrote, readable by the CLI, the app and notebooks.

Layout of a run folder::

    manifest.json         model, tasks, settings, versions, git revision, timings, summary, status
    parts/<unit>.parquet  one sample's tallies (written as each sample finishes: resume point)
    head_scores.parquet   task, score, layer, head, value, samples
    profiles.parquet      task, length, statistic, layer, head, bucket_start, value, rows
    retrieval.parquet     length, depth, layer, head, value, answered, samples, accuracy (niah)
    figures/<name>.html and .png

Every file is written to a temporary name and renamed into place, so a killed run never leaves
a half-written file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workbench.errors import WorkbenchError

FORMAT = "attention-workbench-run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Run:
    """A run folder and its manifest (see the module docstring for the layout)."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Read a run folder; :class:`WorkbenchError` with the reason when it is not a valid run."""
        path = Path(path).expanduser()
        file = path / MANIFEST
        if not file.is_file():
            raise WorkbenchError(f"{path} is not a run folder: it has no {MANIFEST}")
        try:
            manifest = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise WorkbenchError(f"the run in {path} is corrupt: {MANIFEST} is not readable JSON ({exc}); "
                                 "delete the folder or score again with --force") from exc
        missing = [k for k in ("format", "settings", "status") if k not in manifest] if isinstance(manifest, dict) else ["all"]
        if not missing and not isinstance(manifest["settings"], dict):
            missing = ["settings as a mapping"]
        if missing or manifest.get("format") != FORMAT:
            raise WorkbenchError(f"the run in {path} is corrupt: {MANIFEST} is not a workbench run manifest "
                                 f"(missing {', '.join(missing) or 'format tag'}); delete the folder or use --force")
        version = manifest.get("format_version", 0)
        if not isinstance(version, int):
            raise WorkbenchError(f"the run in {path} is corrupt: format_version is {version!r}, not a number")
        if version > FORMAT_VERSION:
            raise WorkbenchError(f"the run in {path} was written by a newer workbench (format "
                                 f"{manifest['format_version']}); upgrade attention-workbench to read it")
        return cls(path, manifest)

    @classmethod
    def create(cls, path: str | Path, manifest: dict) -> Run:
        run = cls(Path(path).expanduser(), {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest})
        run.save_manifest()
        return run

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    def save_manifest(self) -> None:
        atomic_write(self.path / MANIFEST, lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=2, default=str)))

    # Per-sample parts: the resume points.
    def parts_done(self) -> set[str]:
        folder = self.path / "parts"
        return {p.stem for p in folder.glob("*.parquet")} if folder.is_dir() else set()

    def write_part(self, key: str, frame: pd.DataFrame) -> None:
        self.write_table(f"parts/{key}", frame)

    def read_parts(self) -> pd.DataFrame:
        files = sorted((self.path / "parts").glob("*.parquet"))
        if not files:
            raise WorkbenchError(f"the run in {self.path} has no finished samples yet")
        return pd.concat([self._read(f) for f in files], ignore_index=True)

    # Tables.
    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        atomic_write(self.path / f"{name}.parquet", lambda tmp: frame.to_parquet(tmp, index=False))

    def has_table(self, name: str) -> bool:
        return (self.path / f"{name}.parquet").is_file()

    def table(self, name: str) -> pd.DataFrame:
        """``head_scores``, ``profiles`` or ``retrieval`` as a DataFrame."""
        file = self.path / f"{name}.parquet"
        if not file.is_file():
            have = sorted(p.stem for p in self.path.glob("*.parquet"))
            raise WorkbenchError(f"the run in {self.path} has no {name} table (it has: {', '.join(have) or 'none'}); "
                                 + ("" if self.complete else "the run has not finished: score again to resume it"))
        return self._read(file)

    def tables(self) -> list[str]:
        """Names of the tables in the run folder (``head_scores``, ``ablation_...``, ...), sorted."""
        return sorted(p.stem for p in self.path.glob("*.parquet"))

    def _read(self, file: Path) -> pd.DataFrame:
        try:
            return pd.read_parquet(file)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise WorkbenchError(f"the run in {self.path} is corrupt: cannot read {file.name} ({exc}); "
                                 "score again with --force") from exc

    def clear(self) -> None:
        """Remove what a run wrote (only the run's own files and folders)."""
        for name in ("parts", "figures"):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for file in self.path.glob("*.parquet"):
            file.unlink()
        (self.path / MANIFEST).unlink(missing_ok=True)


def head_summary(head_scores: pd.DataFrame, layer: int, head: int) -> pd.DataFrame:
    """One head's row of every score and task in a ``head_scores`` table, with its rank among
    the heads (1 = highest value): ``score, task, value, rank, heads, samples``."""
    ranked = head_scores.assign(rank=head_scores.groupby(["score", "task"], sort=False)["value"]
                                .rank(ascending=False, method="min"),
                                heads=head_scores.groupby(["score", "task"], sort=False)["value"].transform("size"))
    mine = ranked[(ranked["layer"] == layer) & (ranked["head"] == head)]
    return mine.astype({"rank": "Int64"})[["score", "task", "value", "rank", "heads", "samples"]].reset_index(drop=True)


def list_runs(root: str | Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Runs in the folders directly under ``root`` (and ``root`` itself), newest first, plus
    ``(folder, reason)`` for folders with a manifest that cannot be read."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise WorkbenchError(f"runs folder {root} does not exist")
    runs, broken = [], []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if not (folder / MANIFEST).exists():
            continue
        try:
            runs.append(Run.open(folder))
        except WorkbenchError as exc:
            broken.append((folder, str(exc)))
    runs.sort(key=lambda r: str(r.manifest.get("created", "")), reverse=True)
    return runs, broken


def prepare(out: str | Path, settings: dict, manifest: dict, resume: bool = False, force: bool = False) -> Run:
    """The run to write into ``out``.

    - empty or missing folder: a new run;
    - a run with the same settings: that run (it resumes where it stopped);
    - a run with other settings: refused, unless ``resume`` (continue it with *its* settings)
      or ``force`` (delete its files and start again);
    - a folder with other files, or a corrupt run: refused (``force`` replaces a corrupt run).
    """
    out = Path(out).expanduser()

    def new_run() -> Run:
        return Run.create(out, {**manifest, "settings": settings, "status": "running"})

    if resume and force:
        raise WorkbenchError("--resume and --force contradict each other: choose one")
    has_manifest = (out / MANIFEST).exists()
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"{out} is a file, not a folder: choose another --out")
    if not has_manifest:
        if resume:
            raise WorkbenchError(f"nothing to resume: {out} holds no run")
        if out.is_dir() and any(out.iterdir()):
            raise WorkbenchError(f"{out} is not empty and holds no run: choose another --out")
        return new_run()
    try:
        run = Run.open(out)
    except WorkbenchError:
        if not force:
            raise
        Run(out, {}).clear()
        return new_run()
    if force:
        run.clear()
        return new_run()
    if run.manifest["settings"] != settings and not resume:
        changed = sorted(k for k in set(settings) | set(run.manifest["settings"])
                         if settings.get(k) != run.manifest["settings"].get(k))
        raise WorkbenchError(f"{out} holds a different run (settings that differ: {', '.join(changed)}); "
                             "pass --resume to continue that run, --force to replace it, or another --out")
    return run
