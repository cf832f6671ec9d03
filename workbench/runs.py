"""Run directories: what a scoring run wrote, readable by the CLI, the app and notebooks.

Layout of a run folder::

    manifest.json         model, tasks, settings, versions, git revision, timings, summary, status,
                          and the sha256 of every table (``tables``) and, once complete, of every part
    parts/<unit>.parquet  one sample's tallies (written as each sample finishes: resume point)
    parts/<unit>.sha256   the part's commit record: the sha256 of its bytes (``sha256sum`` format)
    head_scores.parquet   task, score, layer, head, value, samples
    profiles.parquet      task, length, statistic, layer, head, bucket_start, value, rows
    retrieval.parquet     length, depth, layer, head, value, answered, samples, accuracy (niah)
    figures/<name>.html and .png

Crash safety (format 2). Every file is written to a temporary file in its folder, flushed and
fsynced, renamed into place and the folder fsynced: after a kill or a power loss a name holds
its old bytes or its new ones, never a mix. A part is committed by its sidecar, written the same
way after it; a part without a valid sidecar, or whose bytes differ from it, is not done (a
resumed run deletes and re-scores it). No two parts share a file, so several processes can write
parts into one folder at once. A table is committed by recording its sha256 in the manifest right
after writing it. The manifest is written last, with ``status: complete`` and the sha256 of
every part and table: the commit marker of a finished run. Every read checks the hash and
refuses a damaged file with a :class:`WorkbenchError` that names it. Runs of format 1 (no
hashes) still open; their files are read unverified.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workbench.errors import WorkbenchError

FORMAT = "attention-workbench-run"
#: 2: parts committed by sha256 sidecars, table and part hashes in the manifest (1: no hashes).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
#: Folders a run's writers create: the scoring's parts and figures, the compression what-ifs
#: (probes.compress); :meth:`Run.clear` removes them with the run.
RUN_FOLDERS = ("parts", "figures", "compress")
#: Tables the scoring run writes (``workbench score`` rebuilds them from the parts).
SCORING_TABLES = ("head_scores", "profiles", "retrieval")
_UMASK = os.umask(0)
os.umask(_UMASK)
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Temporary files of :func:`atomic_write` (``.<name>.<random>.tmp``) and of PNG export.
_TEMP_PATTERNS = (".*.tmp", ".*.tmp.png")
_WRITE_PROBLEMS = {  # errno: (what happened, what to do)
    errno.EROFS: ("the file system is read-only", "write the run to a writable folder (--out)"),
    errno.ENOSPC: ("the disk is full", "free some space and run the same command again"),
    getattr(errno, "EDQUOT", -1): ("the disk quota is used up", "free some space and run the same command again"),
    errno.EACCES: ("permission denied", "write the run to a folder you may write to (--out)"),
    errno.EPERM: ("permission denied", "write the run to a folder you may write to (--out)"),
}


def _write_error(path: Path, exc: OSError) -> WorkbenchError:
    """The error for an OSError while writing ``path``: what happened and what to do."""
    what, todo = _WRITE_PROBLEMS.get(
        exc.errno, (exc.strerror or str(exc), "check the disk and run the same command again")
    )
    return WorkbenchError(
        f"cannot write {path}: {what} ({exc}); {todo}. Files written before are kept "
        "and verified, so a run resumes where it stopped"
    )


def _fsync_dir(folder: Path) -> None:
    """fsync ``folder`` so that a rename in it survives a power loss; skipped where folders cannot
    be opened or fsynced (Windows, some network file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM):
            raise
    finally:
        os.close(fd)


def _sync_and_hash(file: Path) -> str:
    """fsync ``file``'s bytes to disk; their sha256 (hex)."""
    digest = hashlib.sha256()
    with open(file, "r+b") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], object]) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the folder; return the sha256 of the bytes written.

    If anything fails the temporary file is removed and ``path`` keeps its old bytes; an OSError
    (read-only or full disk, ...) becomes a :class:`WorkbenchError` naming ``path``."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        digest = _sync_and_hash(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
        return digest
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # pragma: no cover - the file system went away under us
                pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_sidecar(file: Path, name: str) -> str | None:
    """The sha256 a part's sidecar records for ``name``; None when it is missing or malformed."""
    try:
        fields = file.read_text(encoding="ascii").split()
    except (OSError, ValueError):
        return None
    if len(fields) == 2 and _SHA256.fullmatch(fields[0]) and fields[1] == name:
        return fields[0]
    return None


def _hash_map_problem(value) -> str | None:
    """Why a manifest's ``parts`` / ``tables`` entry is not a mapping of names to sha256; None if it is."""
    if not isinstance(value, dict):
        return f"a {type(value).__name__}, not a mapping"
    bad = [k for k, v in value.items() if not (isinstance(v, str) and _SHA256.fullmatch(v))]
    return f"no valid sha256 for {', '.join(map(str, bad[:3]))}" if bad else None


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
            raise WorkbenchError(
                f"the run in {path} is corrupt: {MANIFEST} is not readable JSON ({exc}); "
                "delete the folder or score again with --force"
            ) from exc
        missing = (
            [k for k in ("format", "settings", "status") if k not in manifest]
            if isinstance(manifest, dict)
            else ["all"]
        )
        if not missing and not isinstance(manifest["settings"], dict):
            missing = ["settings as a mapping"]
        if missing or manifest.get("format") != FORMAT:
            raise WorkbenchError(
                f"the run in {path} is corrupt: {MANIFEST} is not a workbench run manifest "
                f"(missing {', '.join(missing) or 'format tag'}); delete the folder or use --force"
            )
        version = manifest.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise WorkbenchError(f"the run in {path} is corrupt: format_version is {version!r}, not a number")
        if version > FORMAT_VERSION:
            raise WorkbenchError(
                f"the run in {path} was written by a newer workbench (format "
                f"{manifest['format_version']}); upgrade attention-workbench to read it"
            )
        for key in ("parts", "tables"):
            problem = _hash_map_problem(manifest[key]) if key in manifest else None
            if problem:
                raise WorkbenchError(
                    f"the run in {path} is corrupt: {MANIFEST}'s {key!r} ({problem}) is not a "
                    "list of sha256 hashes; delete the folder or score again with --force"
                )
        return cls(path, manifest)

    @classmethod
    def create(cls, path: str | Path, manifest: dict) -> Run:
        """A new run in ``path``: ``manifest`` with the format tags, written at once."""
        run = cls(Path(path).expanduser(), {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest})
        run.save_manifest()
        return run

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    @property
    def verified(self) -> bool:
        """Whether this run's format requires every part and table to match a recorded sha256 (format >= 2)."""
        return self.manifest.get("format_version", 0) >= 2

    def save_manifest(self) -> None:
        atomic_write(self.path / MANIFEST, lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=2, default=str)))

    def reopen(self) -> None:
        """Mark a complete run as running again (before more parts are added): its part list is
        dropped from the manifest, to be recorded anew when it completes."""
        self.manifest["status"] = "running"
        self.manifest.pop("parts", None)
        self.save_manifest()

    def mark_complete(self) -> None:
        """Commit a finished run: the sha256 of every committed part and ``status: complete`` go
        into the manifest, written last (call after every table is written)."""
        keys = sorted(self._part_keys())
        self.manifest["parts"] = {k: h for k in keys if (h := self._recorded_part_hash(k)) is not None}
        self.manifest["status"] = "complete"
        self.save_manifest()

    # Per-sample parts: the resume points.
    def _part_file(self, key: str) -> Path:
        return self.path / "parts" / f"{key}.parquet"

    def _sidecar(self, key: str) -> Path:
        return self.path / "parts" / f"{key}.sha256"

    def _part_keys(self) -> set[str]:
        """Keys of the parts in the folder (with a part file or a sidecar) and, once complete, in the manifest."""
        folder = self.path / "parts"
        found = (
            {p.stem for pattern in ("*.parquet", "*.sha256") for p in folder.glob(pattern)}
            if folder.is_dir()
            else set()
        )
        return found | (set(self.manifest.get("parts", {})) if self.complete else set())

    def _recorded_part_hash(self, key: str) -> str | None:
        """The sha256 the part's bytes must have: the manifest's once the run is complete, else
        its sidecar's; None when the part was never committed."""
        listed = self.manifest.get("parts", {}) if self.complete else {}
        return listed.get(key) or _read_sidecar(self._sidecar(key), f"{key}.parquet")

    def part_states(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        """Each part's state: ``done`` (committed and its bytes match), ``missing`` (neither file),
        ``uncommitted`` (no valid sidecar, or a sidecar without its part) or ``damaged`` (bytes
        differ from the recorded sha256). Every part in the folder when ``keys`` is None.

        Format 1 runs have no sidecars: there a part file without one counts as done."""
        states = {}
        for key in sorted(self._part_keys() if keys is None else keys):
            file, recorded = self._part_file(key), self._recorded_part_hash(key)
            try:
                data = file.read_bytes()
            except FileNotFoundError:  # recorded but gone: damaged; a stray or malformed sidecar: uncommitted
                states[key] = (
                    "damaged" if recorded is not None else "uncommitted" if self._sidecar(key).exists() else "missing"
                )
                continue
            except OSError:
                states[key] = "damaged"
                continue
            if recorded is None:
                states[key] = "uncommitted" if self.verified else "done"
            else:
                states[key] = "done" if _sha256(data) == recorded else "damaged"
        return states

    def parts_done(self) -> set[str]:
        """Keys of the parts that are committed and whose bytes match their sha256."""
        return {k for k, state in self.part_states().items() if state == "done"}

    def write_part(self, key: str, frame: pd.DataFrame) -> None:
        """Write one sample's part, then commit it with its sidecar (both written atomically)."""
        digest = atomic_write(self._part_file(key), lambda tmp: frame.to_parquet(tmp, index=False))
        atomic_write(self._sidecar(key), lambda tmp: tmp.write_text(f"{digest}  {key}.parquet\n", encoding="ascii"))

    def discard_part(self, key: str) -> None:
        """Delete a part and its sidecar (the sidecar first: a kill in between leaves an uncommitted part)."""
        for file in (self._sidecar(key), self._part_file(key)):
            file.unlink(missing_ok=True)

    def read_parts(self) -> pd.DataFrame:
        """Every part, concatenated; :class:`WorkbenchError` naming the first damaged or uncommitted one."""
        keys = sorted(self._part_keys(), key=lambda k: f"{k}.parquet")
        if not keys:
            raise WorkbenchError(f"the run in {self.path} has no finished samples yet")
        return pd.concat([self.read_part(k) for k in keys], ignore_index=True)

    def read_part(self, key: str) -> pd.DataFrame:
        """One part, checked against its sha256; :class:`WorkbenchError` naming it when it is damaged,
        missing or was never committed."""
        recorded = self._recorded_part_hash(key)
        if recorded is None and self.verified:
            raise WorkbenchError(
                f"the run in {self.path} is corrupt: cannot read parts/{key}.parquet (it was never "
                f"committed: parts/{key}.sha256 is missing or malformed); score again with the same "
                "--out: the sample is scored again"
            )
        where = MANIFEST if self.complete and key in self.manifest.get("parts", {}) else f"parts/{key}.sha256"
        return self._read(
            self._part_file(key), recorded, where, "score again with the same --out: damaged samples are scored again"
        )

    # Tables.
    def _tables(self) -> dict[str, str]:
        return self.manifest.get("tables", {})

    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        """Write a table and commit it: its sha256 goes into the manifest, saved at once. (A kill
        between the two leaves a table the manifest does not match: refused when read, rebuilt
        by the command that writes it.)"""
        digest = atomic_write(self.path / f"{name}.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
        self.manifest.setdefault("tables", {})[name] = digest
        self.save_manifest()

    def has_table(self, name: str) -> bool:
        """Whether the run holds the table (format 2: committed in the manifest)."""
        return name in self._tables() if self.verified else (self.path / f"{name}.parquet").is_file()

    def table(self, name: str) -> pd.DataFrame:
        """``head_scores``, ``profiles``, ``retrieval`` (or another table) as a DataFrame, checked
        against the sha256 the manifest records; :class:`WorkbenchError` naming a damaged file."""
        file = self.path / f"{name}.parquet"
        recorded = self._tables().get(name)
        if recorded is None and file.is_file() and self.verified:
            raise WorkbenchError(
                f"the run in {self.path} is corrupt: cannot read {file.name} (it was never committed: "
                f"{MANIFEST} holds no sha256 for it, so the process writing it stopped); " + self._rebuild(name)
            )
        if recorded is None and not file.is_file():
            have = self.tables()
            raise WorkbenchError(
                f"the run in {self.path} has no {name} table (it has: {', '.join(have) or 'none'}); "
                + ("" if self.complete else "the run has not finished: score again to resume it")
            )
        return self._read(file, recorded, MANIFEST, self._rebuild(name))

    def tables(self) -> list[str]:
        """Names of the tables in the run folder (``head_scores``, ``ablation_...``, ...), sorted
        (format 2: those committed in the manifest)."""
        return sorted(self._tables()) if self.verified else sorted(p.stem for p in self.path.glob("*.parquet"))

    def damaged_tables(self) -> list[str]:
        """Committed tables whose file is missing or whose bytes differ from the recorded sha256."""
        damaged = []
        for name, recorded in sorted(self._tables().items()):
            try:
                ok = _sha256((self.path / f"{name}.parquet").read_bytes()) == recorded
            except OSError:
                ok = False
            if not ok:
                damaged.append(name)
        return damaged

    def _rebuild(self, name: str) -> str:
        if name in SCORING_TABLES:
            return "score again with the same --out to rebuild it from the parts, or with --force to start over"
        return "run the command that wrote it again"

    def _read(self, file: Path, recorded: str | None, where: str, todo: str) -> pd.DataFrame:
        """Read a parquet file whose bytes must hash to ``recorded`` (as ``where`` records; None: unverified)."""
        name = file.relative_to(self.path).as_posix()
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise WorkbenchError(f"the run in {self.path} is corrupt: cannot read {name} ({exc}); {todo}") from exc
        if recorded is not None and _sha256(data) != recorded:
            raise WorkbenchError(
                f"the run in {self.path} is corrupt: cannot read {name} (its sha256 differs from the "
                f"one in {where}: the file was damaged or changed after it was recorded); {todo}"
            )
        try:
            return pd.read_parquet(io.BytesIO(data))
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise WorkbenchError(f"the run in {self.path} is corrupt: cannot read {name} ({exc}); {todo}") from exc

    def remove_temp_files(self) -> list[Path]:
        """Delete the temporary files a killed writer left (``.<name>.<random>.tmp``); the files
        removed. Only while no other process writes into the folder."""
        removed = []
        for folder in (self.path, self.path / "parts", self.path / "figures"):
            for pattern in _TEMP_PATTERNS:
                for file in folder.glob(pattern):
                    file.unlink(missing_ok=True)
                    removed.append(file)
        return removed

    def clear(self) -> None:
        """Remove what a run wrote (only the run's own files and folders)."""
        for name in RUN_FOLDERS:
            shutil.rmtree(self.path / name, ignore_errors=True)
        for file in self.path.glob("*.parquet"):
            file.unlink()
        self.remove_temp_files()
        (self.path / MANIFEST).unlink(missing_ok=True)


def head_summary(head_scores: pd.DataFrame, layer: int, head: int) -> pd.DataFrame:
    """One head's row of every score and task in a ``head_scores`` table, with its rank among
    the heads (1 = highest value): ``score, task, value, rank, heads, samples``."""
    ranked = head_scores.assign(
        rank=head_scores.groupby(["score", "task"], sort=False)["value"].rank(ascending=False, method="min"),
        heads=head_scores.groupby(["score", "task"], sort=False)["value"].transform("size"),
    )
    mine = ranked[(ranked["layer"] == layer) & (ranked["head"] == head)]
    return mine.astype({"rank": "Int64"})[["score", "task", "value", "rank", "heads", "samples"]].reset_index(drop=True)


def list_runs(root: str | Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Runs in the folders directly under ``root`` (and ``root`` itself), newest first, plus
    ``(folder, reason)`` for folders with a manifest that cannot be read."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise WorkbenchError(f"runs folder {root} {what}: give the folder that holds the run folders")
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
        leftovers = list(out.glob(f".{MANIFEST}.*.tmp"))  # a run killed while writing its first manifest
        if out.is_dir() and any(p not in leftovers for p in out.iterdir()):
            raise WorkbenchError(f"{out} is not empty and holds no run: choose another --out")
        for file in leftovers:
            file.unlink(missing_ok=True)
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
        changed = sorted(
            k
            for k in set(settings) | set(run.manifest["settings"])
            if settings.get(k) != run.manifest["settings"].get(k)
        )
        raise WorkbenchError(
            f"{out} holds a different run (settings that differ: {', '.join(changed)}); "
            "pass --resume to continue that run, --force to replace it, or another --out"
        )
    return run
