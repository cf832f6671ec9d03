"""Scoring runs and their folders: what a run writes, resuming, refusing other runs, corrupt
runs, the ``score`` / ``runs`` commands, and the tally arithmetic of :func:`aggregate`.

The committed zoo-2l model scores a 128-token sample in a fraction of a second on a CPU; what
costs time is the PNG export (it starts a Chromium), so it runs once, in ``complete_run``
(``tests.conftest`` switches it off for every other test, and ``no_png`` says so where a test
relies on it): the HTML figures and the figure warnings are still written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import workbench.scoring.run as scoring
from tests.conftest import SEED, png_export
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.models import task_tokenizer
from workbench.runs import (
    FORMAT_VERSION,
    MANIFEST,
    Run,
    atomic_write,
    list_runs,
    prepare,
)
from workbench.scoring import ScoreRunSettings, aggregate, plan, score_model
from workbench.scoring.formulas import SCORES, scores_for
from workbench.scoring.sample import PROFILE_STATISTICS

MODEL = "zoo-2l"
CONTEXT = 2048  # zoo-2l's context
ALL = ScoreRunSettings(model=MODEL, tasks=("niah", "repeats", "text"), lengths=(128,), samples=2, depths=(0.5,))
REPEATS = ScoreRunSettings(model=MODEL, tasks=("repeats",), lengths=(128,), samples=2)
HEAD_COLUMNS = ["task", "score", "layer", "head", "value", "samples"]
PROFILE_COLUMNS = ["task", "length", "statistic", "layer", "head", "bucket_start", "value", "rows"]
RETRIEVAL_COLUMNS = ["length", "depth", "layer", "head", "value", "answered", "samples", "accuracy"]
TABLES = ("head_scores", "profiles", "retrieval")

runner = CliRunner()


# ----------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def model(zoo):
    """The model the runs here are scored with (``MODEL``): the shared zoo fixture."""
    return zoo


@pytest.fixture(scope="module")
def shape(model):
    return model.cfg.n_layers, model.cfg.n_heads


@pytest.fixture(scope="module")
def complete_run(model, tmp_path_factory):
    """An uninterrupted run of all three tasks, PNG export included (when a Chromium is there)."""
    with png_export():
        return score_model(model, ALL, tmp_path_factory.mktemp("complete") / "run", progress=False)


_REAL_SCORE_SAMPLE = scoring.score_sample


def count_calls(monkeypatch) -> list[str]:
    """The unit keys :func:`score_model` computes from now on, in order (score_sample still runs)."""
    seen: list[str] = []

    def counting(model, unit, settings, **kwargs):
        seen.append(unit.key)
        return _REAL_SCORE_SAMPLE(model, unit, settings, **kwargs)

    monkeypatch.setattr(scoring, "score_sample", counting)
    return seen


@pytest.fixture
def no_png(monkeypatch):
    """PNG export fails, as on a machine without a Chromium (the HTML figures are still written)."""
    import plotly.io as pio

    def refuse(*args, **kwargs):
        raise RuntimeError("PNG export switched off in the tests")

    monkeypatch.setattr(pio, "write_images", refuse)


@pytest.fixture
def calls(monkeypatch):
    return count_calls(monkeypatch)


def interrupt_after(monkeypatch, k: int, exc: type[BaseException]) -> list[str]:
    """Make score_sample compute ``k`` samples, then raise ``exc`` (a killed run)."""
    done: list[str] = []

    def flaky(model, unit, settings, **kwargs):
        if len(done) == k:
            raise exc("interrupted by the test")
        done.append(unit.key)
        return _REAL_SCORE_SAMPLE(model, unit, settings, **kwargs)

    monkeypatch.setattr(scoring, "score_sample", flaky)
    return done


def keys(model, settings: ScoreRunSettings) -> list[str]:
    return [u.key for u in plan(settings, task_tokenizer(model))]


def temp_files(folder: Path) -> list[Path]:
    """Leftover temporary files (``.<name>.<random>.tmp``) in a run folder and its parts/."""
    return [*folder.glob(".*"), *(folder / "parts").glob(".*")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- 1. a complete run


def test_complete_run_writes_manifest(complete_run, model):
    m = Run.open(complete_run.path).manifest
    assert m["format"] == "attention-workbench-run" and m["status"] == "complete"
    assert m["settings"] == ALL.to_dict()
    assert ScoreRunSettings.from_dict(m["settings"]) == ALL
    assert m["versions"]["torch"] and m["versions"]["python"] and "transformer-lens" in m["versions"]
    assert "git_revision" in m and (m["git_revision"] is None or isinstance(m["git_revision"], str))
    assert m["model_info"]["layers"] == model.cfg.n_layers and m["model_info"]["heads"] == model.cfg.n_heads
    assert m["model_info"]["context"] == CONTEXT
    t = m["timings"]
    assert t["sample_seconds"] > 0
    assert {f"{task}_seconds" for task in ALL.tasks} <= set(t)
    assert math.isclose(sum(t[f"{task}_seconds"] for task in ALL.tasks), t["sample_seconds"], rel_tol=1e-9)
    # needle accuracy: the share of needles answered exactly, as the retrieval table has it
    s = m["summary"]
    accuracy = complete_run.table("retrieval")["accuracy"].unique()
    assert len(accuracy) == 1 and 0.0 <= s["needle_accuracy"] <= 1.0
    assert s["needle_accuracy"] == pytest.approx(accuracy[0]) == pytest.approx(s["needle_accuracy[128]"])
    assert {f"sink_rate[{task}]" for task in ALL.tasks} <= set(s)
    assert temp_files(complete_run.path) == []


def test_complete_run_writes_head_scores(complete_run, shape):
    n_layers, n_heads = shape
    hs = complete_run.table("head_scores")
    assert list(hs.columns) == HEAD_COLUMNS
    expected = {
        (task, score, layer, head)
        for task in ALL.tasks
        for score in scores_for([task])
        for layer in range(n_layers)
        for head in range(n_heads)
        if score in ALL.scores
    }
    got = list(zip(hs["task"], hs["score"], hs["layer"], hs["head"]))
    assert len(got) == len(set(got)) and set(got) == expected
    assert set(hs["score"]) == set(ALL.scores) == set(SCORES) - {"learned_sink"}  # zoo-2l has no learned sinks
    for score in set(hs["score"]):
        assert set(hs.loc[hs["score"] == score, "task"]) == set(SCORES[score].tasks) & set(ALL.tasks)
    # every sample counts for every row score; retrieval counts the needles answered exactly
    rows = hs[hs["score"] != "retrieval"]
    assert (rows["samples"] == ALL.samples).all() and rows["value"].notna().all()
    retrieval = hs[hs["score"] == "retrieval"]
    answered = round(complete_run.manifest["summary"]["needle_accuracy"] * ALL.samples)
    assert (retrieval["samples"] == answered).all()
    for score in ("sink", "entropy_norm", "streaming", "previous_token", "induction", "duplicate_token"):
        values = hs.loc[hs["score"] == score, "value"]
        assert values.between(-1e-6, 1 + 1e-6).all(), score


def test_complete_run_writes_profiles_retrieval_and_figures(complete_run, shape):
    n_layers, n_heads = shape
    prof = complete_run.table("profiles")
    assert list(prof.columns) == PROFILE_COLUMNS
    assert set(prof["statistic"]) == set(PROFILE_STATISTICS)
    assert set(prof["task"]) == set(ALL.tasks) and set(prof["length"]) == {128}
    assert (prof["rows"] > 0).all() and (prof["bucket_start"] < 128).all()
    ret = complete_run.table("retrieval")
    assert list(ret.columns) == RETRIEVAL_COLUMNS
    assert len(ret) == n_layers * n_heads and set(ret["depth"]) == set(ALL.depths)
    assert (ret["samples"] == ALL.samples).all() and ret["accuracy"].between(0, 1).all()

    figures = complete_run.path / "figures"
    html = {p.name for p in figures.glob("*.html")}
    assert html == {f"heads_{s}.html" for s in ALL.scores} | {"needle_accuracy.html"}
    assert all((figures / name).stat().st_size > 0 for name in html)
    pngs = {p.stem for p in figures.glob("*.png")}
    all_pngs = pngs >= {p.removesuffix(".html") for p in html}
    warnings = complete_run.manifest["figure_warnings"]
    assert all_pngs == (warnings == []), (sorted(pngs), warnings)


def test_run_without_niah_has_no_needle_results(model, tmp_path, no_png):
    run = score_model(model, REPEATS, tmp_path / "run", progress=False)
    assert run.complete and not run.has_table("retrieval")
    with pytest.raises(WorkbenchError, match="no retrieval table"):
        run.table("retrieval")
    assert not any(k.startswith("needle_accuracy") for k in run.manifest["summary"])
    assert set(run.table("head_scores")["score"]) == set(scores_for(["repeats"]))
    # PNG export failed: the warning says so, and the HTML figures are there all the same
    assert run.manifest["figure_warnings"] and "PNG" in run.manifest["figure_warnings"][0]
    assert not list((run.path / "figures").glob("*.png"))
    assert {p.stem for p in (run.path / "figures").glob("*.html")} == {f"heads_{s}" for s in REPEATS.scores}


# ----------------------------------------------------------------------------- 2, 3. resume, rerun


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_resumes_only_the_missing_samples(model, complete_run, tmp_path, monkeypatch, no_png, exc):
    out, order, k = tmp_path / "run", keys(model, ALL), 3
    done = interrupt_after(monkeypatch, k, exc)
    with pytest.raises(exc):
        score_model(model, ALL, out, progress=False)
    assert done == order[:k]
    stopped = Run.open(out)
    assert not stopped.complete and stopped.parts_done() == set(order[:k])
    with pytest.raises(WorkbenchError, match="has not finished"):
        stopped.table("head_scores")
    assert temp_files(out) == []

    seen = count_calls(monkeypatch)
    run = score_model(model, ALL, out, progress=False)
    assert seen == order[k:]
    assert run.complete and run.manifest["created"] == stopped.manifest["created"]
    assert run.parts_done() == set(order)
    for name in TABLES:
        assert_same_table(run.table(name), complete_run.table(name))
    assert temp_files(out) == []


def test_kill_while_writing_a_part_leaves_no_half_file(model, tmp_path, monkeypatch, no_png, calls):
    """A part is written to a temporary name first: a kill during the write leaves nothing."""
    out, order = tmp_path / "run", keys(model, REPEATS)
    real = pd.DataFrame.to_parquet
    writes = []

    def killed_on_second(self, path, *args, **kwargs):
        writes.append(Path(path))
        if len(writes) == 2:
            Path(path).write_bytes(b"PAR1 half a file")
            raise KeyboardInterrupt
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        score_model(model, REPEATS, out, progress=False)
    assert writes[1].name.startswith(".") and writes[1].parent == out / "parts"  # it was a temporary file...
    assert temp_files(out) == []  # ...and it is gone
    assert Run.open(out).parts_done() == {order[0]}
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    calls.clear()
    run = score_model(model, REPEATS, out, progress=False)
    assert calls == order[1:] and run.complete and run.parts_done() == set(order)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "table.txt"
    target.write_text("old")

    def fails(tmp: Path) -> None:
        tmp.write_text("new but unfinished")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.txt"]
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["table.txt"]


def test_rerunning_a_complete_run_computes_nothing(model, complete_run, tmp_path, no_png, calls):
    out = tmp_path / "run"
    shutil.copytree(complete_run.path, out)
    before = {name: Run.open(out).table(name) for name in TABLES}
    run = score_model(model, ALL, out, progress=False)
    assert calls == []
    assert run.complete and run.manifest["settings"] == ALL.to_dict()
    assert run.manifest["created"] == complete_run.manifest["created"]
    for name in TABLES:
        pd.testing.assert_frame_equal(run.table(name), before[name])


def test_a_deleted_part_is_recomputed_alone(model, complete_run, tmp_path, no_png, calls):
    out = tmp_path / "run"
    shutil.copytree(complete_run.path, out)
    lost = keys(model, ALL)[-1]
    (out / "parts" / f"{lost}.parquet").unlink()
    with pytest.warns(RuntimeWarning, match=rf"scoring 1 sample\(s\) again .*{lost}"):
        run = score_model(model, ALL, out, progress=False)
    assert calls == [lost] and run.complete
    for name in TABLES:
        assert_same_table(run.table(name), complete_run.table(name))


# ----------------------------------------------------------------------------- 4. another run, same folder


def test_other_settings_are_refused_naming_what_differs(model, tmp_path, no_png, calls):
    out = tmp_path / "run"
    score_model(model, REPEATS, out, progress=False)
    before = snapshot(out)
    calls.clear()
    longer = ScoreRunSettings(model=MODEL, tasks=("repeats",), lengths=(160,), samples=2)
    with pytest.raises(WorkbenchError, match=r"settings that differ: lengths\)"):
        score_model(model, longer, out, progress=False)
    other = ScoreRunSettings(model=MODEL, tasks=("repeats",), lengths=(128,), samples=3, window=32)
    with pytest.raises(WorkbenchError, match=r"settings that differ: samples, window\)"):
        score_model(model, other, out, progress=False)
    assert calls == [] and snapshot(out) == before


def test_resume_continues_the_stored_run_with_its_settings(model, tmp_path, monkeypatch, no_png):
    out, order = tmp_path / "run", keys(model, REPEATS)
    interrupt_after(monkeypatch, 1, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        score_model(model, REPEATS, out, progress=False)
    seen = count_calls(monkeypatch)
    longer = ScoreRunSettings(model=MODEL, tasks=("repeats",), lengths=(160,), samples=3)
    run = score_model(model, longer, out, resume=True, progress=False)
    assert seen == order[1:]  # the stored run's missing sample, at the stored length
    assert run.complete and run.manifest["settings"] == REPEATS.to_dict()
    assert Run.open(out).manifest["settings"] == REPEATS.to_dict()
    assert run.parts_done() == set(order)
    assert (run.table("head_scores")["samples"] == REPEATS.samples).all()


def test_force_replaces_the_stored_run(model, tmp_path, no_png, calls):
    out = tmp_path / "run"
    score_model(model, REPEATS, out, progress=False)
    old_parts = Run.open(out).parts_done()
    calls.clear()
    longer = ScoreRunSettings(model=MODEL, tasks=("repeats",), lengths=(160,), samples=2)
    run = score_model(model, longer, out, force=True, progress=False)
    assert calls == keys(model, longer)
    assert Run.open(out).manifest["settings"] == longer.to_dict() and run.complete
    assert run.parts_done() == set(keys(model, longer)) and not (old_parts & run.parts_done())
    assert not any("128" in p.name for p in (out / "parts").iterdir())


def test_resume_and_force_misuse_is_refused(tmp_path):
    settings, meta = REPEATS.to_dict(), {"created": "now"}
    with pytest.raises(WorkbenchError, match="contradict"):
        prepare(tmp_path / "a", settings, meta, resume=True, force=True)
    assert not (tmp_path / "a").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        with pytest.raises(WorkbenchError, match="nothing to resume"):
            prepare(folder, settings, meta, resume=True)
    assert list(empty.iterdir()) == [] and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("flags", [{}, {"force": True}], ids=["plain", "force"])
def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path, flags):
    out = tmp_path / "mine"
    (out / "parts").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "head_scores.parquet").write_bytes(b"not the workbench's")
    (out / "parts" / "x.parquet").write_bytes(b"mine too")
    before = snapshot(out)
    with pytest.raises(WorkbenchError, match="not empty and holds no run"):
        prepare(out, REPEATS.to_dict(), {"created": "now"}, **flags)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 5. corrupt runs


@pytest.fixture
def runs_folder(complete_run, tmp_path):
    """``good`` and copies of it: manifest not JSON, manifest untagged, head_scores damaged."""
    root = tmp_path / "runs"
    for name in ("good", "not_json", "untagged", "damaged"):
        shutil.copytree(complete_run.path, root / name, ignore=shutil.ignore_patterns("figures"))
    (root / "not_json" / MANIFEST).write_text('{"format": "attention-workbench-run", ')
    m = json.loads((root / "untagged" / MANIFEST).read_text())
    del m["format"]
    (root / "untagged" / MANIFEST).write_text(json.dumps(m))
    (root / "damaged" / "head_scores.parquet").write_bytes(b"\x00garbage\xff" * 50)
    (root / "not_a_run").mkdir()
    (root / "not_a_run" / "notes.txt").write_text("hello")
    return root


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"format": "attention-workbench-run", ', "not readable JSON"),
        (b"\xff\xfe\x00 binary", "not readable JSON"),
        (b"[1, 2, 3]", "not a workbench run manifest"),
        (b'{"settings": {}, "status": "complete"}', "not a workbench run manifest"),
        (b'{"format": "something-else", "settings": {}, "status": "complete"}', "missing format tag"),
        (b"", "not readable JSON"),
        (b"null", "not a workbench run manifest"),
        (b"42", "not a workbench run manifest"),
        (b'"manifest"', "not a workbench run manifest"),
        (b'{"format": "attention-workbench-run", "settings": [1], "status": "running"}', "settings as a mapping"),
        (
            b'{"format": "attention-workbench-run", "format_version": "2", "settings": {}, "status": "running"}',
            "format_version is '2', not a number",
        ),
        (
            b'{"format": "attention-workbench-run", "format_version": 2, "settings": {}, "status": "complete", '
            b'"tables": ["head_scores"]}',
            r"'tables' \(a list, not a mapping\)",
        ),
        (
            b'{"format": "attention-workbench-run", "format_version": 2, "settings": {}, "status": "complete", '
            b'"parts": {"repeats-128-000": "abc"}}',
            r"'parts' \(no valid sha256 for repeats-128-000\)",
        ),
    ],
    ids=[
        "truncated",
        "binary",
        "list",
        "untagged",
        "other-format",
        "empty",
        "null",
        "number",
        "string",
        "settings-list",
        "version-text",
        "tables-list",
        "bad-part-hash",
    ],
)
def test_a_corrupt_manifest_is_reported(tmp_path, content, message):
    (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(WorkbenchError, match=message) as err:
        Run.open(tmp_path)
    assert "corrupt" in str(err.value) and str(tmp_path) in str(err.value)


def test_a_manifest_cut_short_anywhere_is_reported(complete_run, tmp_path):
    """A manifest.json truncated at any point (a copy cut short, a disk that lost its end) is
    refused with a WorkbenchError, by Run.open, prepare (unless forced) and list_runs alike."""
    whole = (complete_run.path / MANIFEST).read_bytes()
    rng = random.Random(SEED)
    cuts = sorted({0, 1, len(whole) - 1, *(rng.randrange(len(whole)) for _ in range(8))})
    for cut in cuts:
        folder = tmp_path / f"cut{cut}"
        folder.mkdir()
        (folder / MANIFEST).write_bytes(whole[:cut])
        with pytest.raises(WorkbenchError, match="corrupt: manifest.json is not readable JSON") as err:
            Run.open(folder)
        assert str(folder) in str(err.value) and "--force" in str(err.value)
        with pytest.raises(WorkbenchError, match="corrupt"):
            prepare(folder, REPEATS.to_dict(), {"created": "now"})
    runs, broken = list_runs(tmp_path)
    assert runs == [] and sorted(f.name for f, _ in broken) == sorted(f"cut{c}" for c in cuts)


def test_a_run_of_a_newer_format_is_refused(tmp_path):
    manifest = {
        "format": "attention-workbench-run",
        "format_version": FORMAT_VERSION + 1,
        "settings": {},
        "status": "complete",
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(WorkbenchError, match=rf"newer workbench \(format {FORMAT_VERSION + 1}\); upgrade"):
        Run.open(tmp_path)


def test_corrupt_runs_are_reported_and_skipped(runs_folder):
    with pytest.raises(WorkbenchError, match="not readable JSON"):
        Run.open(runs_folder / "not_json")
    with pytest.raises(WorkbenchError, match=r"not a workbench run manifest \(missing format\)"):
        Run.open(runs_folder / "untagged")
    damaged = Run.open(runs_folder / "damaged")  # the manifest is fine...
    with pytest.raises(WorkbenchError, match=r"corrupt: cannot read head_scores\.parquet"):
        damaged.table("head_scores")  # ...the table is not
    pd.testing.assert_frame_equal(damaged.table("profiles"), Run.open(runs_folder / "good").table("profiles"))

    runs, broken = list_runs(runs_folder)
    # list_runs reads manifests only: the damaged table is found when the table is read
    assert sorted(r.path.name for r in runs) == ["damaged", "good"]
    assert sorted(folder.name for folder, _ in broken) == ["not_json", "untagged"]
    assert all("corrupt" in reason for _, reason in broken)

    result = runner.invoke(app, ["runs", "list", str(runs_folder)])
    assert result.exit_code == 0, result.output
    good = next(line for line in result.output.splitlines() if " good " in line)
    assert "complete" in good and "damaged" in result.output  # names relative to the folder listed
    assert "skipped not_json" in result.output
    result = runner.invoke(app, ["runs", "show", str(runs_folder / "damaged")])
    assert result.exit_code == 2 and "cannot read head_scores.parquet" in result.output
    assert "Traceback" not in result.output


def test_a_corrupt_run_is_refused_unless_forced(runs_folder):
    settings, meta = REPEATS.to_dict(), {"created": "now"}
    with pytest.raises(WorkbenchError, match="corrupt"):
        prepare(runs_folder / "not_json", settings, meta)
    run = prepare(runs_folder / "not_json", settings, meta, force=True)
    assert Run.open(run.path).manifest["settings"] == settings and not run.complete
    assert run.parts_done() == set() and not list(run.path.glob("*.parquet"))


# ----------------------------------------------------------------------------- 6. command line


def test_score_and_runs_commands(tmp_path, no_png):
    out = tmp_path / "runs" / "r1"
    result = runner.invoke(app, ["score", "--task", "repeats", "--lengths", "128", "--samples", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for score in scores_for(["repeats"]):
        assert score in result.output
    assert "retrieval" not in result.output and "complete" in result.output
    run = Run.open(out)
    assert run.complete and run.manifest["settings"]["tasks"] == ["repeats"]
    assert run.manifest["settings"]["lengths"] == [128] and run.manifest["settings"]["samples"] == 2
    assert set(run.table("head_scores")["score"]) == set(scores_for(["repeats"]))

    result = runner.invoke(app, ["runs", "list", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if f" {out.name} " in l)
    assert all(word in line for word in (MODEL, "repeats", "128", "complete"))

    result = runner.invoke(app, ["runs", "show", str(out)])
    assert result.exit_code == 0, result.output
    assert "lengths=[128]" in result.output and "samples=2" in result.output and "tasks=['repeats']" in result.output
    assert "top heads per score" in result.output
    for score in scores_for(["repeats"]):
        assert score in result.output

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["runs", "list", str(empty)])
    assert result.exit_code == 0 and "no runs in" in result.output


BAD_INPUT = {
    "unknown-score": (["--scores", "nope"], ["unknown score", "nope", "induction", "retrieval"]),
    "unknown-task": (["--task", "nope"], ["unknown task", "nope", "niah, repeats, text"]),
    "score-of-another-task": (
        ["--task", "text", "--scores", "induction"],
        ["no chosen task defines induction", "--task repeats"],
    ),
    "beyond-context": (["--task", "repeats", "--lengths", "4096", "--samples", "1"], ["4096", f"context of {CONTEXT}"]),
    "needle-does-not-fit": (
        ["--task", "niah", "--lengths", "16", "--samples", "1", "--depths", "0.5"],
        ["needle sample of 16 tokens does not fit"],
    ),
    "lengths-not-numbers": (["--lengths", "abc"], ["--lengths must be comma-separated integers", "abc"]),
    "length-too-short": (["--task", "repeats", "--lengths", "4"], ["at least 8 tokens"]),
    "depths-not-numbers": (["--depths", "half"], ["--depths must be comma-separated fractions", "half"]),
    "zero-samples": (["--samples", "0"], ["samples must be >= 1"]),
}


@pytest.mark.parametrize("args, fragments", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_score_rejects_bad_input(tmp_path, args, fragments):
    result = runner.invoke(app, ["score", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not a crash
    assert "error:" in result.output and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output


@pytest.mark.parametrize(
    "command, message",
    [
        (["runs", "show", "{tmp}"], "is not a run folder: it has no manifest.json"),
        (["runs", "show", "{tmp}/missing"], "is not a run folder"),
        (["runs", "list", "{tmp}/missing"], "does not exist"),
        (["runs", "list", "{tmp}/file"], "is a file, not a folder"),
    ],
    ids=["show-not-a-run", "show-missing", "list-missing", "list-file"],
)
def test_runs_commands_reject_bad_folders(tmp_path, command, message):
    (tmp_path / "file").write_text("not a folder")
    result = runner.invoke(app, [c.format(tmp=tmp_path) for c in command])
    assert result.exit_code == 2 and message in result.output, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output


def test_a_rejected_request_leaves_no_run_behind(tmp_path, no_png):
    """A request refused for its settings writes nothing, so the corrected command just runs."""
    out = tmp_path / "run"
    args = ["score", "--task", "repeats", "--samples", "1", "--out", str(out)]
    bad = runner.invoke(app, [*args, "--lengths", "4096"])
    assert bad.exit_code == 2 and "context of" in bad.output
    good = runner.invoke(app, [*args, "--lengths", "128"])
    assert good.exit_code == 0, good.output


def test_resume_scores_with_the_stored_model(tmp_path, monkeypatch, no_png):
    """`score --resume` loads the model the run was scored with, whatever --model says."""
    out = tmp_path / "run"
    args = ["score", "--task", "repeats", "--lengths", "128", "--samples", "2", "--out", str(out)]
    interrupt_after(monkeypatch, 1, RuntimeError)
    crashed = runner.invoke(app, args)
    assert isinstance(crashed.exception, RuntimeError) and Run.open(out).parts_done()
    monkeypatch.setattr(scoring, "score_sample", _REAL_SCORE_SAMPLE)
    result = runner.invoke(app, [*args, "--model", "random:gpt2-small", "--resume"])
    layers = Run.open(out).manifest["model_info"]["layers"]
    assert result.exit_code == 2 or Run.open(out).table("head_scores")["layer"].max() == layers - 1, result.output


# ----------------------------------------------------------------------------- 7. aggregate


def _parts(rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(
        rows, columns=["task", "length", "depth", "sample", "name", "layer", "head", "bucket", "total", "count"]
    )
    return frame.astype({"layer": "int32", "head": "int32", "bucket": "int64"})


def test_aggregate_is_total_over_count():
    nan = math.nan
    sink = {
        0: [(0, 3.0, 10.0), (1, 5.0, 30.0), (2, 0.0, 0.0)],  # head: (sample, total, count)
        1: [(0, 7.5, 10.0), (1, 1.25, 30.0), (2, 0.0, 0.0)],
    }
    rows = [("repeats", 128, nan, s, "sink", 0, h, -1, t, c) for h, tallies in sink.items() for s, t, c in tallies]
    rows += [("repeats", 128, nan, s, "streaming", 0, 0, -1, 0.0, 0.0) for s in range(3)]  # no row in reach
    rows += [("repeats", 128, nan, s, "seconds", -1, -1, -1, 0.5, 1.0) for s in range(3)]  # not a head score
    rows += [("repeats", 128, nan, s, "entropy", 0, 0, b, 2.0 + s + b, 4.0 + s) for s in range(2) for b in (0, 2)]
    hs = aggregate(_parts(rows))["head_scores"]
    assert list(hs.columns) == HEAD_COLUMNS
    assert set(zip(hs["score"], hs["head"])) == {("sink", 0), ("sink", 1), ("streaming", 0)}
    for head, tallies in sink.items():
        row = hs[(hs["score"] == "sink") & (hs["head"] == head)].iloc[0]
        assert row["value"] == pytest.approx(sum(t for _, t, _ in tallies) / sum(c for _, _, c in tallies))
        assert row["samples"] == sum(c > 0 for _, _, c in tallies) and row["task"] == "repeats"
    streaming = hs[hs["score"] == "streaming"].iloc[0]
    assert math.isnan(streaming["value"]) and streaming["samples"] == 0

    tables = aggregate(_parts(rows))
    assert "retrieval" not in tables
    prof = tables["profiles"]
    assert list(prof.columns) == PROFILE_COLUMNS and sorted(prof["bucket_start"]) == [0, 2]
    for b in (0, 2):
        cell = prof[prof["bucket_start"] == b].iloc[0]
        assert cell["rows"] == sum(4.0 + s for s in range(2))
        assert cell["value"] == pytest.approx(sum(2.0 + s + b for s in range(2)) / cell["rows"])


def test_aggregate_retrieval_averages_over_answered_needles():
    # three needles at one depth: two answered (count 1), one not (count 0, total 0)
    answered, hits = [1.0, 1.0, 0.0], [0.5, 0.25, 0.0]
    rows = [("niah", 128, 0.5, s, "retrieval", 1, 2, -1, h * a, a) for s, (h, a) in enumerate(zip(hits, answered))]
    rows += [("niah", 128, 0.5, s, "needle_accuracy", -1, -1, -1, a, 1.0) for s, a in enumerate(answered)]
    tables = aggregate(_parts(rows))
    ret = tables["retrieval"]
    assert list(ret.columns) == RETRIEVAL_COLUMNS and len(ret) == 1
    cell = ret.iloc[0]
    assert cell["value"] == pytest.approx(sum(h * a for h, a in zip(hits, answered)) / sum(answered))
    assert cell["answered"] == sum(answered) and cell["samples"] == len(answered)
    assert cell["accuracy"] == pytest.approx(sum(answered) / len(answered))
    hs = tables["head_scores"]
    assert list(zip(hs["score"], hs["layer"], hs["head"], hs["samples"])) == [("retrieval", 1, 2, 2)]


def test_a_run_refuses_samples_from_another_model(model, tmp_path, no_png, calls):
    """Same settings, other weights' shape: the stored run is not continued with them."""
    from workbench.zoo import ZOO, build

    out = tmp_path / "run"
    score_model(model, REPEATS, out, progress=False)
    calls.clear()
    with pytest.raises(WorkbenchError, match="scored with zoo-2l"):
        score_model(build(ZOO["tiny"]).eval(), REPEATS, out, progress=False)
    assert calls == []


def test_default_lengths_and_scores_fit_the_model(tmp_path):
    """Without --lengths and --scores, an encoder with a 512-token context gets the lengths that
    fit and every score but retrieval (which needs a causal language model)."""
    out = tmp_path / "minilm"
    result = runner.invoke(
        app,
        [
            "score",
            "--model",
            "minilm",
            "--task",
            "niah",
            "--samples",
            "1",
            "--depths",
            "0.5",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    run = Run.open(out)
    assert run.manifest["settings"]["lengths"] == [512]
    assert set(run.table("head_scores")["score"]) == set(scores_for(["niah"])) - {"retrieval"}
    result = runner.invoke(
        app, ["score", "--model", "minilm", "--task", "niah", "--scores", "retrieval", "--out", str(tmp_path / "other")]
    )
    assert result.exit_code == 2 and "causal language model" in " ".join(result.output.split())


# ----------------------------------------------------------------------------- 8. the disk fails


@pytest.fixture(scope="module")
def repeats_run(model, tmp_path_factory):
    """An uninterrupted run of REPEATS (PNG export off)."""
    import plotly.io as pio

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pio, "write_images", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no PNG in the tests")))
        return score_model(model, REPEATS, tmp_path_factory.mktemp("repeats") / "run", progress=False)


def fail_once(monkeypatch, where: str, code: int, target) -> list[Path]:
    """Make the first write of a file for which ``target(final_path)`` holds fail with
    ``OSError(code)``: ``write`` (half the bytes reach the temporary file, then the error),
    ``replace`` (the rename into place) or ``fsync``. The paths that failed, once it has."""
    failed: list[Path] = []
    real_parquet, real_text, real_replace, real_fsync = pd.DataFrame.to_parquet, Path.write_text, os.replace, os.fsync

    def final(tmp: Path) -> Path:  # .<name>.<random>.tmp -> <name>
        return tmp.with_name(tmp.name[1:].rsplit(".", 2)[0])

    def armed(path: Path) -> bool:
        return not failed and target(path)

    def error(path: Path) -> OSError:
        failed.append(path)
        return OSError(code, os.strerror(code), str(path))

    def to_parquet(self, path, *args, **kwargs):
        if where == "write" and armed(final(Path(path))):
            Path(path).write_bytes(b"PAR1" + b"\0" * 100)
            raise error(final(Path(path)))
        return real_parquet(self, path, *args, **kwargs)

    def write_text(self, data, *args, **kwargs):
        if where == "write" and self.name.endswith(".tmp") and armed(final(self)):
            real_text(self, data[: len(data) // 2], *args, **kwargs)
            raise error(final(self))
        return real_text(self, data, *args, **kwargs)

    def replace(src, dst):
        if where == "replace" and armed(Path(dst)):
            raise error(Path(dst))
        return real_replace(src, dst)

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))  # Linux: the file this descriptor is open on
        if where == "fsync" and path.name.endswith(".tmp") and armed(final(path)):
            raise error(final(path))
        return real_fsync(fd)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def _part(n: int):
    return lambda p: p.parent.name == "parts" and p.name.endswith(".parquet") and p.stem.endswith(f"-{n:03d}")


def _final_manifest(monkeypatch):
    """True for manifest.json once the run is being marked complete (the commit of the run)."""
    committing = []
    real = Run.mark_complete
    monkeypatch.setattr(Run, "mark_complete", lambda self: committing.append(True) or real(self))
    return lambda p: p.name == MANIFEST and bool(committing)


DISK_FAULTS = {  # where, errno, which file, what the message says to do
    "full-while-writing-a-part": ("write", errno.ENOSPC, lambda mp: _part(1), "free some space"),
    "read-only-when-renaming-a-part": ("replace", errno.EROFS, lambda mp: _part(1), "writable folder"),
    "read-only-when-committing-a-part": (
        "replace",
        errno.EROFS,
        lambda mp: lambda p: p.suffix == ".sha256",
        "writable folder",
    ),
    "full-when-renaming-a-table": (
        "replace",
        errno.ENOSPC,
        lambda mp: lambda p: p.name == "profiles.parquet",
        "free some space",
    ),
    "full-while-writing-the-final-manifest": ("write", errno.ENOSPC, _final_manifest, "free some space"),
    "read-only-when-renaming-the-final-manifest": ("replace", errno.EROFS, _final_manifest, "writable folder"),
    "io-error-in-fsync-of-a-part": ("fsync", errno.EIO, lambda mp: _part(1), "check the disk"),
}


@pytest.mark.parametrize("where, code, target, todo", DISK_FAULTS.values(), ids=DISK_FAULTS.keys())
def test_a_full_or_read_only_disk_stops_the_run_and_loses_nothing(
    model, repeats_run, tmp_path, monkeypatch, no_png, where, code, target, todo
):
    """Writing onto a full or read-only disk (we run as root: simulated by OSError from the write,
    the rename or the fsync) raises a WorkbenchError naming the file and what to do, leaves no
    temporary file, and keeps everything committed before readable and verified; the same
    command completes the run once the disk is back."""
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        failed = fail_once(mp, where, code, target(mp))
        with pytest.raises(WorkbenchError) as err:
            score_model(model, REPEATS, out, progress=False)
    assert len(failed) == 1
    message = str(err.value)
    assert f"cannot write {failed[0]}" in message and todo in message and "resumes where it stopped" in message
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == code
    assert temp_files(out) == []
    stopped = Run.open(out)  # the previous manifest is whole
    assert not stopped.complete
    for key in stopped.parts_done():
        stopped.read_part(key)  # verified
    for name in stopped.tables():
        stopped.table(name)  # verified
    uncommitted = [k for k, state in stopped.part_states().items() if state != "done"]
    assert len(uncommitted) == (where == "replace" and failed[0].suffix == ".sha256")  # a part without its record
    with pytest.warns(RuntimeWarning, match=uncommitted[0]) if uncommitted else contextlib.nullcontext():
        run = score_model(model, REPEATS, out, progress=False)
    for name in ("head_scores", "profiles"):
        pd.testing.assert_frame_equal(run.table(name), repeats_run.table(name), check_exact=True)
    assert temp_files(out) == []


@pytest.mark.parametrize("where", ["write", "replace"])
def test_a_full_disk_when_adding_a_table_to_a_complete_run_changes_nothing(repeats_run, tmp_path, monkeypatch, where):
    out = tmp_path / "run"
    shutil.copytree(repeats_run.path, out)
    before = snapshot(out)
    run = Run.open(out)
    with monkeypatch.context() as mp:
        fail_once(mp, where, errno.ENOSPC, lambda p: p.name == "ablation_x.parquet")
        with pytest.raises(WorkbenchError, match=r"ablation_x\.parquet: the disk is full"):
            run.write_table("ablation_x", pd.DataFrame({"k": [1]}))
    assert snapshot(out) == before
    reopened = Run.open(out)
    assert reopened.complete and reopened.tables() == repeats_run.tables()
    for name in reopened.tables():
        pd.testing.assert_frame_equal(reopened.table(name), repeats_run.table(name))


def test_a_read_only_disk_at_the_start_writes_nothing(model, tmp_path, monkeypatch, calls):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        fail_once(mp, "replace", errno.EROFS, lambda p: p.name == MANIFEST)
        with pytest.raises(WorkbenchError, match=rf"cannot write {out / MANIFEST}: the file system is read-only"):
            score_model(model, REPEATS, out, progress=False)
    assert calls == [] and list(out.iterdir()) == []


def test_a_run_killed_while_writing_its_first_manifest_starts_afresh(tmp_path):
    """Killed before its first manifest was in place, a run leaves only a temporary manifest:
    the next run in that folder starts (and removes it); other files still make it refuse."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f".{MANIFEST}.k1ll3d.tmp").write_text('{"format": "attention-workbe')
    run = prepare(out, REPEATS.to_dict(), {"created": "now"})
    assert [p.name for p in out.iterdir()] == [MANIFEST] and Run.open(out).manifest == run.manifest
    other = tmp_path / "other"
    other.mkdir()
    (other / f".{MANIFEST}.k1ll3d.tmp").write_text("{")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(WorkbenchError, match="not empty and holds no run"):
        prepare(other, REPEATS.to_dict(), {"created": "now"})
    assert len(list(other.iterdir())) == 2


# ----------------------------------------------------------------------------- 9. runs of format 1


def test_a_format_1_run_without_hashes_still_opens_and_resumes(model, repeats_run, tmp_path, no_png, calls):
    """Runs written before parts and tables had sha256 records open, read (unverified) and resume."""
    out = tmp_path / "run"
    shutil.copytree(repeats_run.path, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 1
    del manifest["parts"], manifest["tables"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    for sidecar in (out / "parts").glob("*.sha256"):
        sidecar.unlink()
    old = Run.open(out)
    assert old.complete and not old.verified
    assert old.parts_done() == repeats_run.parts_done() and old.tables() == repeats_run.tables()
    for name in old.tables():
        pd.testing.assert_frame_equal(old.table(name), repeats_run.table(name))
    assert score_model(model, REPEATS, out, progress=False).complete and calls == []
    lost = sorted(old.parts_done())[-1]
    (out / "parts" / f"{lost}.parquet").unlink()
    run = score_model(model, REPEATS, out, progress=False)
    assert calls == [lost] and run.complete and run.manifest["format_version"] == 1
    for name in ("head_scores", "profiles"):
        pd.testing.assert_frame_equal(run.table(name), repeats_run.table(name), check_exact=True)
