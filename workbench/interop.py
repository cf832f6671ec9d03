"""A run's head classification in the formats other tools read, and those files read back as
scores to compare (docs/interop.md).

Formats (what each tool's own code reads; checked against their repositories):

- ``duo``: DuoAttention's attention pattern, a folder holding ``full_attention_heads.tsv`` (one
  line per layer, one tab-separated value per key/value head: the gate of that KV head, 1 = full
  attention, 0 = streaming) and ``config.json`` (``sink_size``, ``recent_size`` of the streaming
  heads). ``duo_attn.utils.load_attn_pattern`` reads both (``np.loadtxt(delimiter="\\t")``, then
  clips the gates to [0, 1]); ``sparsify_attention_heads`` turns the gates into 0/1 with a
  quantile (``sparsity``: that share of KV heads becomes streaming). kvpress's
  ``DuoAttentionPress`` reads the same two files.
- ``retrieval-head``: Wu et al.'s ``head_score/<model>.json`` (nightdessert/Retrieval_Head),
  one JSON object on one line: key ``"<layer>-<head>"`` (query heads), value the list of the
  head's per-sample retrieval scores over the samples the model answered; their code ranks heads
  by ``np.mean`` of the list.
- ``kv-table``: a plain table, CSV or Parquet by the file's suffix, one row per KV head:
  ``layer, kv_head, score, keep_full`` (``keep_full``: stays a full-attention head), for
  kvpress-style presses that take a per-layer, per-KV-head score or mask.

Per-KV-head formats (``duo``, ``kv-table``) aggregate a score over each KV group's query heads
(:mod:`workbench.scoring.kv_groups`; ``max`` by default: a KV head stays full when any of the
query heads reading it needs it). Imports never touch the run's own tables: they go to the
``imported_scores`` table (the ``head_scores`` columns; ``task`` = the format, ``score`` = the
name given; a per-KV-head value is given to every query head of its group) and the manifest's
``imports`` records each file's path and sha256.

Example:
    >>> export_scores(run, "retrieval", "duo", "patterns/zoo")  # patterns/zoo/full_attention_heads.tsv
    >>> import_scores(run, "patterns/zoo", "duo", "duo_gates")
    >>> compare_imported(run, "duo_gates")  # score, task, level, heads, pearson, spearman
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.runs import Run, atomic_write
from workbench.scoring.kv_groups import AGGREGATES, group_size, kv_group_scores, run_kv_heads

#: The formats, and whether each holds one value per key/value head (else per query head).
FORMATS = {"duo": True, "retrieval-head": False, "kv-table": True}
#: DuoAttention's file names inside a pattern folder.
DUO_FILE = "full_attention_heads.tsv"
DUO_CONFIG = "config.json"
#: The table imports go to, and its columns (those of ``head_scores``).
IMPORTED = "imported_scores"
COLUMNS = ["task", "score", "layer", "head", "value", "samples"]
#: The columns of a ``kv-table`` file.
KV_TABLE_COLUMNS = ["layer", "kv_head", "score", "keep_full"]
#: The default share of KV heads a ``kv-table`` marks as streaming (``keep_full`` False), as
#: DuoAttention's README example (``sparsify_attention_heads(..., sparsity=0.5)``).
DEFAULT_SPARSITY = 0.5
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_KEY = re.compile(r"(\d+)-(\d+)")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise WorkbenchError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class Shape:
    """A model's attention shape: ``layers``, query ``heads``, ``kv_heads`` per layer."""

    layers: int
    heads: int
    kv_heads: int

    @property
    def group(self) -> int:
        return group_size(self.heads, self.kv_heads)

    def describe(self) -> str:
        return f"{self.layers} layers, {self.heads} query heads and {self.kv_heads} key/value heads per layer"


def run_shape(run: Run, kv_heads: int | None = None) -> Shape:
    """The attention shape of a run's model (manifest; see :func:`~workbench.scoring.kv_groups.run_kv_heads`)."""
    heads, kv = run_kv_heads(run, kv_heads)
    layers = (run.manifest.get("model_info") or {}).get("layers")
    if not isinstance(layers, int) or isinstance(layers, bool):
        layers = int(run.table("head_scores")["layer"].max()) + 1
    return Shape(layers, heads, kv)


# ----------------------------------------------------------------------------- the format files


def write_duo(
    gates: np.ndarray, folder: str | Path, sink_size: int, recent_size: int, about: dict | None = None
) -> Path:
    """DuoAttention's pattern folder: ``gates [layer, kv_head]`` (values in [0, 1]) as
    ``full_attention_heads.tsv`` (``%.18e``, tab-separated, one line per layer, as numpy's
    ``savetxt`` writes it) and ``config.json`` (``sink_size``, ``recent_size`` and ``about``).
    Returns the TSV's path."""
    gates = np.asarray(gates, dtype=float)
    if gates.ndim != 2 or not np.isfinite(gates).all() or gates.min() < 0 or gates.max() > 1:
        raise WorkbenchError("DuoAttention's gates are a [layer, kv_head] grid of finite values in [0, 1]")
    folder = Path(folder).expanduser()
    if folder.suffix == ".tsv" or folder.is_file():
        raise WorkbenchError(
            f"--out {folder}: DuoAttention reads a folder (load_attn_pattern opens <folder>/{DUO_FILE} and "
            f"<folder>/{DUO_CONFIG}); give a folder"
        )
    text = "".join("\t".join(format(float(v), ".18e") for v in row) + "\n" for row in gates)
    config = {"sink_size": int(sink_size), "recent_size": int(recent_size), **(about or {})}
    atomic_write(folder / DUO_FILE, lambda tmp: tmp.write_text(text, encoding="ascii"))
    atomic_write(folder / DUO_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return folder / DUO_FILE


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise WorkbenchError(f"{where}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise WorkbenchError(f"{where}: {text.strip()!r} is not a finite number")
    return value


def read_duo(path: str | Path) -> np.ndarray:
    """The gates ``[layer, kv_head]`` of a DuoAttention pattern folder or its
    ``full_attention_heads.tsv``, clipped to [0, 1] as ``load_attn_pattern`` clips them."""
    path = Path(path).expanduser()
    file = path / DUO_FILE if path.is_dir() else path
    text = _read_text(file, f"a DuoAttention pattern folder or its {DUO_FILE}")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise WorkbenchError(f"{file} holds no values: a DuoAttention pattern has one line per layer")
    rows = [[_number(v, f"{file}, line {i + 1}") for v in line.strip().split("\t")] for i, line in enumerate(lines)]
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        raise WorkbenchError(
            f"{file} is malformed: its lines hold {' and '.join(map(str, widths))} tab-separated values; "
            "DuoAttention writes the same number (one per key/value head) on every line"
        )
    return np.clip(np.array(rows, dtype=float), 0.0, 1.0)


def write_retrieval_head(lists: dict[tuple[int, int], list[float]], file: str | Path) -> Path:
    """Wu et al.'s head score file: ``{"<layer>-<head>": [per-sample scores], ...}`` on one line
    (their loader reads ``json.loads(file.readline())``), heads in layer, head order."""
    file = Path(file).expanduser()
    if file.is_dir():
        raise WorkbenchError(f"--out {file} is a folder: give the .json file to write")
    data = {f"{layer}-{head}": [float(x) for x in values] for (layer, head), values in sorted(lists.items())}
    atomic_write(file, lambda tmp: tmp.write_text(json.dumps(data), encoding="utf-8"))
    return file


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise WorkbenchError(f"the key(s) {', '.join(twice[:3])} appear more than once")
    return dict(pairs)


def read_retrieval_head(path: str | Path) -> dict[tuple[int, int], list[float]]:
    """``{(layer, head): [per-sample scores]}`` of a Retrieval_Head head score file."""
    file = Path(path).expanduser()
    text = _read_text(file, "a Retrieval_Head head score file (.json)")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise WorkbenchError(
            f"{file} is not readable JSON ({exc}): a Retrieval_Head head score file is one JSON object"
        ) from exc
    except WorkbenchError as exc:
        raise WorkbenchError(f"{file} is malformed: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise WorkbenchError(
            f"{file} is malformed: a Retrieval_Head head score file is a JSON object of "
            '"<layer>-<head>": [scores] entries, got ' + (type(data).__name__ if data else "an empty object")
        )
    out = {}
    for key, values in data.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise WorkbenchError(f'{file} is malformed: key {key!r} is not "<layer>-<head>" (as "12-3")')
        if not isinstance(values, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values
        ):
            raise WorkbenchError(f"{file} is malformed: {key!r} holds {str(values)[:60]}, not a list of finite numbers")
        out[int(match[1]), int(match[2])] = [float(x) for x in values]
    return out


def write_kv_table(table: pd.DataFrame, file: str | Path) -> Path:
    """A ``kv-table`` (``layer, kv_head, score, keep_full``) as CSV or Parquet by the suffix."""
    file = Path(file).expanduser()
    kind = _table_kind(file)
    frame = table[KV_TABLE_COLUMNS].astype(
        {"layer": "int64", "kv_head": "int64", "score": "float64", "keep_full": bool}
    )
    if kind == "csv":
        atomic_write(file, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        atomic_write(file, lambda tmp: frame.to_parquet(tmp, index=False))
    return file


def _table_kind(file: Path) -> str:
    kind = file.suffix.lower().lstrip(".")
    if kind not in ("csv", "parquet") or file.is_dir():
        raise WorkbenchError(f"{file}: a kv-table is a .csv or a .parquet file; give a file name with one of them")
    return kind


def read_kv_table(path: str | Path) -> pd.DataFrame:
    """``layer, kv_head, score`` (and ``keep_full`` when present) of a ``kv-table`` file."""
    file = Path(path).expanduser()
    kind = _table_kind(file)
    _read_text(file, "a .csv or .parquet kv-table", binary=True)
    try:
        frame = pd.read_csv(file) if kind == "csv" else pd.read_parquet(file)
    except Exception as exc:  # pandas and pyarrow raise many types for malformed files
        raise WorkbenchError(f"{file} is not a readable {kind} table ({exc})") from exc
    missing = [c for c in ("layer", "kv_head", "score") if c not in frame.columns]
    if missing:
        raise WorkbenchError(
            f"{file} is malformed: it has no {', '.join(missing)} column(s) (a kv-table has columns "
            f"{', '.join(KV_TABLE_COLUMNS)}; keep_full is optional)"
        )
    for column in ("layer", "kv_head", "score"):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.astype(float))
        if column != "score":
            bad |= values != values.round()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            kind_of = "a finite number" if column == "score" else "an integer"
            raise WorkbenchError(
                f"{file} is malformed: {column} {frame[column].iloc[row]!r} (row {row + 1}) is not {kind_of}"
            )
        frame[column] = values.astype(float if column == "score" else "int64")
    return frame


def _read_text(file: Path, what: str, binary: bool = False) -> str:
    """``file``'s text; :class:`WorkbenchError` naming ``what`` was expected when it cannot be read."""
    if not file.is_file():
        raise WorkbenchError(f"{file} does not exist or is not a file: give {what}")
    try:
        return "" if binary else file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"cannot read {file} ({exc}): give {what}") from exc


# ----------------------------------------------------------------------------- a run's values


def score_rows(run: Run, score: str, task: str | None = None) -> tuple[pd.DataFrame, str]:
    """The ``head_scores`` rows of one score on one task (``task`` may be left out when the score
    has one), and that task."""
    hs = run.table("head_scores")
    rows = hs[hs["score"] == score]
    if rows.empty:
        raise WorkbenchError(
            f"the run in {run.path} has no score {score!r}; it has: {', '.join(dict.fromkeys(hs['score']))}"
        )
    tasks = list(dict.fromkeys(rows["task"]))
    if task is None and len(tasks) > 1:
        raise WorkbenchError(f"{score} was scored on the tasks {', '.join(tasks)}: choose one with --task")
    task = task if task is not None else tasks[0]
    if task not in tasks:
        raise WorkbenchError(f"{score} was not scored on the task {task!r}; it was on: {', '.join(tasks)}")
    return rows[rows["task"] == task].reset_index(drop=True), task


def grid(rows: pd.DataFrame, shape: Shape, value: str = "value") -> np.ndarray:
    """``[layer, head]`` of one score's rows; :class:`WorkbenchError` when a head is missing."""
    out = np.full((shape.layers, shape.heads), np.nan)
    seen = np.zeros((shape.layers, shape.heads), dtype=int)
    layers, heads = rows["layer"].to_numpy(int), rows["head"].to_numpy(int)
    if len(rows) and (
        layers.min() < 0 or layers.max() >= shape.layers or heads.min() < 0 or heads.max() >= shape.heads
    ):
        raise WorkbenchError(f"the table's heads do not fit the model's shape ({shape.describe()})")
    np.add.at(seen, (layers, heads), 1)
    if (seen != 1).any():
        raise WorkbenchError(f"the table does not hold every head once ({shape.describe()}): it is incomplete")
    out[layers, heads] = rows[value].to_numpy(float)
    return out


def transform(values: np.ndarray, rescale: bool, invert: bool) -> Callable[[np.ndarray], np.ndarray]:
    """The map applied to a score's values before export: ``rescale`` maps the finite values'
    range onto [0, 1] (``(x - min) / (max - min)``), then ``invert`` maps ``x`` to ``1 - x``
    (for scores where a high value means the head can be compressed, such as ``streaming``).
    The map is affine, so the mean of mapped per-sample values is the mapped mean."""
    finite = values[np.isfinite(values)]
    lo, span = (float(finite.min()), float(finite.max() - finite.min())) if finite.size else (0.0, 0.0)

    def scaled(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        return ((x - lo) / span if span > 0 else np.where(np.isnan(x), x, 1.0)) if rescale else x

    if invert:
        mapped = scaled(finite)
        if mapped.size and (mapped.min() < 0 or mapped.max() > 1):
            raise WorkbenchError("--invert exports 1 - value, for values in [0, 1]: add --rescale for this score")
        return lambda x: 1.0 - scaled(x)
    return scaled


def keep_full(values: np.ndarray, threshold: float | None = None, sparsity: float | None = None) -> np.ndarray:
    """Which heads stay full-attention heads: ``value >= threshold`` (DuoAttention's
    ``sparsify_attention_heads`` with a threshold), or all but the ``round(sparsity * n)`` lowest
    values (kvpress's ``DuoAttentionPress`` with ``head_compression_ratio=sparsity``; ties go in
    layer, head order). ``values`` is any shape; the same shape of bools comes back."""
    if threshold is not None and sparsity is not None:
        raise WorkbenchError("give --threshold or --sparsity, not both")
    if np.isnan(values).any():
        raise WorkbenchError(
            "some heads have no value (no sample counted them): a full/streaming split needs every head's; "
            "export a score (or --task) every head has"
        )
    if threshold is not None:
        return values >= threshold
    sparsity = DEFAULT_SPARSITY if sparsity is None else sparsity
    if not 0.0 <= sparsity <= 1.0:
        raise WorkbenchError(f"--sparsity is the share of key/value heads made streaming, in [0, 1]; got {sparsity}")
    flat = values.ravel()
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[: round(flat.size * sparsity)]] = False
    return keep.reshape(values.shape)


def per_sample_lists(run: Run, score: str, task: str, shape: Shape) -> dict[tuple[int, int], list[float]] | None:
    """Each head's per-sample values ``total / count`` over the samples that counted it, in
    sample order, when the score's tallies count each sample at most once (``count`` 0 or 1, as
    the retrieval score's: its value is then the mean of the list, as Wu et al. average); None
    for other scores (their value is a ratio of sums over rows, not a mean over samples)."""
    if not run.part_states():  # a run without its parts (copied tables only): one value per head
        return None
    parts = run.read_parts()
    rows = parts[(parts["name"] == score) & (parts["task"] == task) & (parts["layer"] >= 0) & (parts["bucket"] < 0)]
    if rows.empty or not rows["count"].isin([0.0, 1.0]).all():
        return None
    rows = rows[rows["count"] > 0].sort_values(["length", "depth", "sample", "layer", "head"])
    lists: dict[tuple[int, int], list[float]] = {(l, h): [] for l in range(shape.layers) for h in range(shape.heads)}
    for layer, head, total in zip(rows["layer"], rows["head"], rows["total"]):
        lists[int(layer), int(head)].append(float(total))
    return lists


# ----------------------------------------------------------------------------- export


def export_scores(
    run: Run,
    score: str,
    fmt: str,
    out: str | Path,
    *,
    task: str | None = None,
    agg: str | None = None,
    invert: bool = False,
    rescale: bool = False,
    threshold: float | None = None,
    sparsity: float | None = None,
    sink_size: int | None = None,
    recent_size: int | None = None,
    kv_heads: int | None = None,
) -> tuple[Path, str]:
    """Write one score of a run as ``fmt`` (:data:`FORMATS`) to ``out``; returns the file written
    and a line saying what it holds.

    ``agg``: ``max`` (default) or ``mean`` over each KV group's query heads (``duo``,
    ``kv-table``); ``rescale``, ``invert``: see :func:`transform`; ``threshold`` / ``sparsity``:
    the full/streaming split of :func:`keep_full` (``kv-table``: its ``keep_full`` column,
    default sparsity 0.5; ``duo``: given, the gates are written as 0/1); ``sink_size``,
    ``recent_size``: DuoAttention's streaming geometry (default: the run's ``sink_tokens`` and
    ``window``); ``kv_heads``: for runs that do not record it."""
    check_format(fmt)
    per_kv = FORMATS[fmt]
    if not per_kv and (agg is not None or threshold is not None or sparsity is not None):
        raise WorkbenchError(
            "a retrieval-head file holds every query head's own scores: --agg, --threshold and --sparsity do not apply"
        )
    if fmt != "duo" and (sink_size is not None or recent_size is not None):
        raise WorkbenchError("--sink-size and --recent-size go into DuoAttention's config.json: only with --format duo")
    agg = agg or "max"
    if agg not in AGGREGATES:
        raise WorkbenchError(f"unknown --agg {agg!r}: choose {' or '.join(AGGREGATES)}")
    shape = run_shape(run, kv_heads)
    rows, task = score_rows(run, score, task)
    values = grid(rows, shape)
    mapping = transform(values, rescale, invert)
    values = mapping(values)
    about = {"exported_by": "attention-workbench", "run": str(run.path), "score": score, "task": task}
    about |= {"rescale": rescale, "invert": invert}
    if not per_kv:
        lists = per_sample_lists(run, score, task, shape)
        if lists is None:  # one value per head: np.mean gives it back
            lists = {(l, h): ([] if math.isnan(v) else [v]) for (l, h), v in np.ndenumerate(values)}
            held = "each head's score as a one-value list"
        else:
            lists = {k: [float(x) for x in mapping(np.array(v))] for k, v in lists.items()}
            held = "each head's per-sample scores over the samples that counted"
        path = write_retrieval_head(lists, out)
        return path, f"{score} ({task}) of {shape.layers * shape.heads} query heads, {held}"
    kv_values = _aggregate(values, shape, agg)
    what = f"{score} ({task}), the {agg} over each group's {shape.group} query head(s), {kv_values.size} KV heads"
    if fmt == "duo":
        if threshold is not None or sparsity is not None:
            kv_values = keep_full(kv_values, threshold, sparsity).astype(float)
            what += ", as 0/1 gates"
        elif np.isnan(kv_values).any():
            raise WorkbenchError(
                f"{score} ({task}) has no value for some heads (no sample counted them), and DuoAttention needs a "
                "gate for every KV head: export a score (or --task) every head has"
            )
        elif kv_values.min() < 0 or kv_values.max() > 1:
            raise WorkbenchError(
                f"DuoAttention's gates lie in [0, 1], and {score} ({task}) runs from {kv_values.min():.3g} to "
                f"{kv_values.max():.3g} here: add --rescale"
            )
        settings = run.manifest.get("settings", {})
        sink = sink_size if sink_size is not None else int(settings.get("sink_tokens", 1))
        recent = recent_size if recent_size is not None else int(settings.get("window", 64))
        path = write_duo(kv_values, out, sink, recent, {**about, "agg": agg})
        return path, f"{what}; config.json: sink_size {sink}, recent_size {recent}"
    keep = keep_full(kv_values, threshold, sparsity)
    layer, kv_head = np.indices(kv_values.shape)
    table = pd.DataFrame(
        {"layer": layer.ravel(), "kv_head": kv_head.ravel(), "score": kv_values.ravel(), "keep_full": keep.ravel()}
    )
    rule = (
        f"value >= {threshold}"
        if threshold is not None
        else f"sparsity {DEFAULT_SPARSITY if sparsity is None else sparsity}"
    )
    path = write_kv_table(table, out)
    return path, f"{what}; keep_full ({rule}): {int(keep.sum())} of {keep.size}"


def _aggregate(values: np.ndarray, shape: Shape, agg: str) -> np.ndarray:
    """``[layer, kv_head]``: the ``agg`` of ``values [layer, head]`` over each KV group (NaN when
    any head of the group is NaN), through :func:`kv_group_scores`."""
    layer, head = np.indices(values.shape)
    table = pd.DataFrame(
        {"task": "-", "score": "-", "layer": layer.ravel(), "head": head.ravel(), "value": values.ravel()}
    )
    groups = kv_group_scores(table, shape.kv_heads, shape.heads)
    out = np.full((shape.layers, shape.kv_heads), np.nan)
    out[groups["layer"].to_numpy(int), groups["kv_head"].to_numpy(int)] = groups[agg].to_numpy(float)
    return out


# ----------------------------------------------------------------------------- import


def read_scores(path: str | Path, fmt: str, shape: Shape) -> tuple[pd.DataFrame, str]:
    """A file of format ``fmt`` as per-query-head rows ``layer, head, value, samples`` of a model
    of ``shape`` (a per-KV-head value given to each query head of its group; ``samples``: the
    list's length for ``retrieval-head``, else NaN), and the level its values came at
    (``kv_head`` or ``head``). :class:`WorkbenchError` when the file does not fit ``shape``."""
    check_format(fmt)
    path = Path(path).expanduser()
    if fmt == "retrieval-head":
        lists = read_retrieval_head(path)
        outside = sorted(k for k in lists if k[0] >= shape.layers or k[1] >= shape.heads)
        if outside:
            l, h = outside[0]
            raise WorkbenchError(
                f"{path} scores head {l}-{h}, outside this run's model ({shape.describe()}): is it this model's file?"
            )
        missing = [(l, h) for l in range(shape.layers) for h in range(shape.heads) if (l, h) not in lists]
        if missing:
            listed = ", ".join(f"{l}-{h}" for l, h in missing[:3])
            raise WorkbenchError(
                f"{path} has no scores for {len(missing)} of this run's {shape.layers * shape.heads} heads "
                f"(e.g. {listed}); a Retrieval_Head file lists every layer-head of the model"
            )
        rows = [(l, h, float(np.mean(v)) if v else math.nan, len(v)) for (l, h), v in sorted(lists.items())]
        return pd.DataFrame(rows, columns=["layer", "head", "value", "samples"]), "head"
    if fmt == "duo":
        gates = read_duo(path)
        _check_kv_grid(gates.shape, shape, path, "lines (layers)", "values per line (key/value heads)")
        kv_values = gates
    else:
        table = read_kv_table(path)
        kv_values = _kv_table_grid(table, shape, path)
    layer, head = np.indices((shape.layers, shape.heads))
    values = kv_values[layer, head // shape.group]
    frame = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "value": values.ravel(), "samples": math.nan})
    return frame, "kv_head"


def _check_kv_grid(found: tuple[int, int], shape: Shape, path: Path, rows: str, cols: str) -> None:
    layers, kv = found
    if layers != shape.layers:
        raise WorkbenchError(f"{path} has {layers} {rows}; this run's model has {shape.layers} layers")
    if kv != shape.kv_heads:
        hint = (
            " (one per query head: DuoAttention and kvpress keep one value per key/value head)"
            if kv == shape.heads
            else ""
        )
        raise WorkbenchError(
            f"{path} has {kv} {cols}{hint}; this run's model has {shape.kv_heads} key/value heads per layer "
            f"({shape.heads} query heads)"
        )


def _kv_table_grid(table: pd.DataFrame, shape: Shape, path: Path) -> np.ndarray:
    """``[layer, kv_head]`` of a kv-table's scores; :class:`WorkbenchError` unless it holds every
    layer and KV head of ``shape`` once."""
    layers, kv = table["layer"].to_numpy(int), table["kv_head"].to_numpy(int)
    if not len(table):
        raise WorkbenchError(f"{path} holds no rows: a kv-table has one row per layer and kv_head")
    if layers.min() < 0 or kv.min() < 0:
        raise WorkbenchError(f"{path} is malformed: layer and kv_head count from 0")
    found = (int(layers.max()) + 1, int(kv.max()) + 1)
    _check_kv_grid(found, shape, path, "layers", "key/value heads per layer")
    seen = np.zeros((shape.layers, shape.kv_heads), dtype=int)
    np.add.at(seen, (layers, kv), 1)
    twice, none = np.argwhere(seen > 1), np.argwhere(seen == 0)
    if len(twice):
        l, k = twice[0]
        raise WorkbenchError(f"{path} is malformed: layer {l} kv_head {k} appears {seen[l, k]} times (once, please)")
    if len(none):
        l, k = none[0]
        raise WorkbenchError(f"{path} is malformed: it has no row for layer {l} kv_head {k} (one row per KV head)")
    out = np.empty((shape.layers, shape.kv_heads))
    out[layers, kv] = table["score"].to_numpy(float)
    return out


def import_scores(run: Run, path: str | Path, fmt: str, name: str, kv_heads: int | None = None) -> pd.DataFrame:
    """Read ``path`` (format ``fmt``) as the score ``name`` into the run's ``imported_scores``
    table (replacing an earlier import of that name) and record it in the manifest's ``imports``;
    the rows imported. The run's own tables stay as they are."""
    check_format(fmt)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise WorkbenchError(
            f"--name {name!r}: give a name of letters, digits, '_', '.' or '-' starting with a letter (as duo_gates)"
        )
    own = set(run.table("head_scores")["score"])
    if name in own:
        raise WorkbenchError(f"the run already has a score {name!r} of its own: give the import another --name")
    shape = run_shape(run, kv_heads)
    rows, level = read_scores(path, fmt, shape)
    rows.insert(0, "score", name)
    rows.insert(0, "task", fmt)
    rows = rows[COLUMNS].astype({"layer": "int64", "head": "int64", "value": "float64", "samples": "float64"})
    earlier = imported_scores(run)
    table = pd.concat([earlier[earlier["score"] != name], rows], ignore_index=True) if len(earlier) else rows
    source = Path(path).expanduser().resolve()
    file = source / DUO_FILE if source.is_dir() else source
    run.manifest.setdefault("imports", {})[name] = {
        "format": fmt,
        "path": str(file),
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        "level": level,
        "imported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    run.write_table(IMPORTED, table)  # saves the manifest with the table's sha256
    return rows


def imported_scores(run: Run) -> pd.DataFrame:
    """The run's ``imported_scores`` table (empty, with its columns, when nothing was imported)."""
    return run.table(IMPORTED) if run.has_table(IMPORTED) else pd.DataFrame(columns=COLUMNS)


def compare_imported(run: Run, name: str, agg: str = "max", kv_heads: int | None = None) -> pd.DataFrame:
    """How the imported score ``name`` agrees with each of the run's scores: one row per
    ``score, task`` with ``level`` (``kv_head``: per KV head, the run's scores as the ``agg`` over
    each group; ``head``: per query head), ``heads`` compared (both values known), and the
    ``pearson`` and ``spearman`` correlations (NaN when either side is constant)."""
    imported = imported_scores(run)
    mine = imported[imported["score"] == name]
    if mine.empty:
        have = ", ".join(dict.fromkeys(imported["score"])) or "none"
        raise WorkbenchError(f"the run in {run.path} has no imported score {name!r} (imported: {have})")
    level = (run.manifest.get("imports", {}).get(name) or {}).get("level", "head")
    hs = run.table("head_scores")
    key = ["layer", "head"]
    if level == "kv_head":
        heads, kv = run_kv_heads(run, kv_heads)
        hs = kv_group_scores(hs, kv, heads).rename(columns={"kv_head": "head", agg: "value"})
        mine = kv_group_scores(mine, kv, heads).rename(columns={"kv_head": "head", "max": "value"})
    theirs = mine[key + ["value"]]
    out = []
    for (score, task), group in hs.groupby(["score", "task"], sort=False):
        both = group[key + ["value"]].merge(theirs, on=key, suffixes=("", "_imported")).dropna()
        x, y = both["value"], both["value_imported"]
        out.append((score, task, level, len(both), _corr(x, y), _corr(x.rank(), y.rank())))
    return pd.DataFrame(out, columns=["score", "task", "level", "heads", "pearson", "spearman"])


def _corr(x: pd.Series, y: pd.Series) -> float:
    if len(x) < 2 or x.nunique() < 2 or y.nunique() < 2:
        return math.nan
    return float(np.corrcoef(x.to_numpy(float), y.to_numpy(float))[0, 1])
