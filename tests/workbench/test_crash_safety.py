"""Crash safety of run folders: a scoring run SIGKILLed at random moments and resumed ends with
the tables of an uninterrupted run, and damaged parts and tables are never silently used.

The kill test runs a small fork server in a subprocess (``python -c "from
tests.workbench.test_crash_safety import _serve; _serve()"``): it loads zoo-2l once, then for each request
forks a child that scores :data:`SETTINGS` into a run folder and is SIGKILLed at the requested
moment, so twenty kills cost one Python start-up. A moment is a durable-write step (each
``os.fsync`` or ``os.replace`` of the run's writes, three per file), not a time on the clock, so
the same seed kills at the same places on every machine however loaded it is; every state the
folder can be in between two such steps is reached this way. The test process inspects the folder after each
kill (every committed part is exactly the clean run's part) and asks for the next resume.
PNG export is switched off everywhere (it starts a Chromium); the HTML figures are still written.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import workbench.scoring.run as scoring
from tests.conftest import SEED
from tests.workbench.test_runs import interrupt_after
from workbench.errors import WorkbenchError
from workbench.models import task_tokenizer
from workbench.runs import MANIFEST, Run, list_runs
from workbench.scoring import ScoreRunSettings, plan, score_model

MODEL = "zoo-2l"
SETTINGS = ScoreRunSettings(model=MODEL, tasks=("repeats", "niah"), lengths=(128,), samples=4, depths=(0.5,))
KILLS = 20
ROOT = Path(__file__).resolve().parents[2]
REPLY_TIMEOUT_S = 180  # a fork server that says nothing for this long is hung: fail, do not wait forever


def _no_png(*args, **kwargs):
    raise RuntimeError("PNG export switched off in the crash-safety tests")


def _without_seconds(part: pd.DataFrame) -> pd.DataFrame:
    """A part without its ``seconds`` row (the sample's wall time: the one value that differs between runs)."""
    return part[part["name"] != "seconds"].reset_index(drop=True)


def _temp_files(folder: Path) -> list[Path]:
    return [*folder.glob(".*"), *(folder / "parts").glob(".*"), *(folder / "figures").glob(".*.tmp*")]


def _assert_same_results(run: Run, reference: Run) -> None:
    """Same tables, bit for bit, and the same summary (timings differ and are not compared)."""
    assert run.complete and run.tables() == reference.tables()
    for name in reference.tables():
        pd.testing.assert_frame_equal(run.table(name), reference.table(name), check_exact=True)
    assert run.manifest["summary"] == reference.manifest["summary"]
    assert run.parts_done() == reference.parts_done()


# ----------------------------------------------------------------------------- the fork server (child side)


def _serve() -> None:
    """Fork server of the kill test: load the model once, then answer JSON-line requests
    ``{"out": folder, "kill_at": step | null, "timeline": file | null}`` on stdin: fork a child
    that scores SETTINGS into ``out``, SIGKILLed just before its ``kill_at``-th durable-write step;
    reply how the child ended."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else prints goes to stderr, not into the replies
    import plotly.io as pio
    import torch

    import workbench.plots  # noqa: F401 - imported here once, not in every forked child when it finishes
    from workbench.models import load_model

    pio.write_images = _no_png
    torch.set_num_threads(1)  # no thread pool to inherit across fork
    model = load_model(MODEL, device="cpu")
    # The plan is pure (same samples on every call) but tokenizes the needle haystack, ~0.3 s:
    # compute it once here rather than in each of the ~20 children.
    scoring.plan = functools.cache(scoring.plan)
    scoring.plan(SETTINGS, scoring.task_tokenizer(model))
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        proto.write(json.dumps(_cycle(model, **json.loads(line))) + "\n")


def _cycle(model, out: str, kill_at: int | None, timeline: str | None) -> dict:
    pid = os.fork()
    if pid == 0:
        _child(model, Path(out), kill_at, timeline)
    _, status = os.waitpid(pid, 0)
    reply = {
        "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
    }
    if timeline and reply["exit"] == 0:
        reply["timeline"] = json.loads(Path(timeline).read_text())
    return reply


def _count_write_steps(kill_at: int | None) -> list[int]:
    """In the forked writer: count every ``os.fsync`` and ``os.replace`` (the steps of a durable
    write), and SIGKILL this process just before step ``kill_at``. Returns the live count."""
    count = [0]

    def step(real):
        def counted(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return counted

    os.fsync, os.replace = step(os.fsync), step(os.replace)
    return count


def _child(model, out: Path, kill_at: int | None, timeline: str | None) -> None:
    """The forked writer: score (resume) the run, killed at step ``kill_at``; with ``timeline``,
    record the write step at which each part was committed and the run's last step; exit."""
    code = 0
    try:
        steps = _count_write_steps(kill_at)
        commits: list[int] = []
        if timeline:
            real = Run.write_part

            def counted(run, key, frame):
                real(run, key, frame)
                commits.append(steps[0])

            Run.write_part = counted
        score_model(model, SETTINGS, out, progress=False)
        if timeline:
            Path(timeline).write_text(json.dumps({"commits": commits, "end": steps[0]}))
    except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
        import traceback

        traceback.print_exc()
        code = 3
    finally:
        sys.stderr.flush()
        os._exit(code)


# ----------------------------------------------------------------------------- the fork server (test side)


class ForkServer:
    """The subprocess running :func:`_serve`; its stderr goes to ``log``."""

    def __init__(self, log: Path):
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.workbench.test_crash_safety import _serve; _serve()"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        assert self._reply() == {"ready": True}

    def _reply(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AssertionError(f"the fork server stopped or hung; its log:\n{self.log_path.read_text()[-4000:]}")
        return json.loads(line)

    def run(self, out: Path, kill_at: int | None = None, timeline: Path | None = None) -> dict:
        self.proc.stdin.write(
            json.dumps({"out": str(out), "kill_at": kill_at, "timeline": str(timeline) if timeline else None}) + "\n"
        )
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _after_kill(out: Path, reference_parts: dict[str, pd.DataFrame]) -> tuple[str, bool]:
    """Check a folder right after a kill; where the kill landed (``start``: before the first
    manifest, ``part``: while scoring, ``finish``: all parts committed, run not complete,
    ``late``: after the commit) and whether it interrupted a file write (temporary or
    uncommitted files left)."""
    leftovers = bool(_temp_files(out))
    if not (out / MANIFEST).exists():
        assert not (out / "parts").exists()
        return "start", leftovers
    run = Run.open(out)  # the manifest is always whole
    states = run.part_states()
    assert set(states.values()) <= {"done", "uncommitted"}, states  # a kill never leaves a wrong committed part
    for key, state in states.items():
        if state == "done":  # every committed part holds exactly what the clean run computed
            pd.testing.assert_frame_equal(_without_seconds(run.read_part(key)), reference_parts[key], check_exact=True)
    leftovers |= "uncommitted" in states.values()
    if run.complete:
        for name in run.tables():
            run.table(name)  # verified
        return "late", leftovers
    return ("finish" if sum(s == "done" for s in states.values()) == len(reference_parts) else "part"), leftovers


def test_sigkill_at_random_moments_then_resume_gives_the_same_tables(tmp_path):
    """20 SIGKILLs of a real scoring run at write steps drawn from Random(SEED) (scoring and
    finishing alike), each followed by a resume: every committed part is right after every kill,
    and the final tables equal the uninterrupted run's exactly.

    A resume repeats fewer steps than a clean run (its committed parts are not written again), so
    each kill is drawn from the steps still ahead: the clean run's steps less six (part and
    sidecar) per committed part; every other kill is drawn from the steps up to the last part's
    commit, so that scoring and finishing both take kills. Two clean runs differ only in wall times (each part's
    ``seconds`` row, the manifest's timings and dates), which the tables do not hold."""
    began = time.monotonic()
    server = ForkServer(tmp_path / "server.log")
    try:
        clean = server.run(tmp_path / "clean", timeline=tmp_path / "timeline.json")
        assert clean["exit"] == 0, (tmp_path / "server.log").read_text()
        commits, end = clean["timeline"]["commits"], clean["timeline"]["end"]
        reference = Run.open(tmp_path / "clean")
        reference_parts = {k: _without_seconds(reference.read_part(k)) for k in sorted(reference.parts_done())}
        assert len(commits) == len(reference_parts) == 2 * SETTINGS.samples
        steps_per_part = commits[1] - commits[0]

        rng = random.Random(SEED)
        landed = {"start": 0, "part": 0, "finish": 0, "late": 0}
        kills = mid_write = completed = cycles = 0
        episode = 0
        out = tmp_path / f"run{episode}"
        while kills < KILLS:
            cycles += 1
            assert cycles <= 3 * KILLS, f"only {kills} of {cycles} resumes were killed"
            done = len(Run.open(out).parts_done()) if (out / MANIFEST).exists() else 0
            ahead, scoring_ahead = end - steps_per_part * done, commits[-1] - steps_per_part * done
            # every other kill falls among the steps that score samples, while any remain
            pool = scoring_ahead if kills % 2 == 0 and scoring_ahead > 0 else ahead
            reply = server.run(out, kill_at=rng.randint(1, pool))
            if not reply["killed"]:  # the run completed before its kill step: check it, start another
                assert reply["exit"] == 0, (tmp_path / "server.log").read_text()
                _assert_same_results(Run.open(out), reference)
                completed += 1
                episode += 1
                out = tmp_path / f"run{episode}"
                continue
            kills += 1
            phase, interrupted_write = _after_kill(out, reference_parts)
            landed[phase] += 1
            mid_write += interrupted_write
        final = server.run(out)
        assert final["exit"] == 0, (tmp_path / "server.log").read_text()
    finally:
        server.close()
    run = Run.open(out)
    _assert_same_results(run, reference)
    assert _temp_files(out) == []
    rescored = (tmp_path / "server.log").read_text().count("whose part files were damaged or not committed")
    print(
        f"\ncrash safety: {kills} SIGKILLs in {cycles} resumes ({landed['part']} while scoring samples, "
        f"{landed['finish']} while finishing, {landed['start']} before the first manifest, {landed['late']} after "
        f"the commit; {mid_write} inside a file write, {rescored} resumes discarded an uncommitted part); "
        f"{completed} runs completed between kills; a clean run makes {end} write steps; "
        f"whole test {time.monotonic() - began:.1f} s"
    )
    # the kill steps are spread over the whole run, so kills land both while samples are scored
    # and while the tables and figures are written
    assert landed["part"] >= 1 and landed["finish"] >= 1, landed


# ----------------------------------------------------------------------------- damaged parts and tables


@pytest.fixture(scope="module")
def model(zoo):
    """The model the runs here are scored with (``MODEL``): the shared zoo fixture."""
    return zoo


@pytest.fixture(autouse=True)
def no_png(monkeypatch):
    import plotly.io as pio

    monkeypatch.setattr(pio, "write_images", _no_png)


@pytest.fixture(scope="module")
def clean(model, tmp_path_factory) -> Run:
    """An uninterrupted run of SETTINGS (PNG export off)."""
    import plotly.io as pio

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pio, "write_images", _no_png)
        return score_model(model, SETTINGS, tmp_path_factory.mktemp("clean") / "run", progress=False)


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """The unit keys :func:`score_model` scores from now on, in order."""
    seen: list[str] = []
    real = scoring.score_sample

    def counting(model, unit, settings, **kwargs):
        seen.append(unit.key)
        return real(model, unit, settings, **kwargs)

    monkeypatch.setattr(scoring, "score_sample", counting)
    return seen


def _keys(model) -> list[str]:
    return [u.key for u in plan(SETTINGS, task_tokenizer(model))]


def _flip_silently(file: Path, rng: random.Random) -> None:
    """Flip one bit of a parquet file where parquet itself does not notice: the file still reads,
    with other values (the damage only a checksum catches)."""
    data = file.read_bytes()
    before = pd.read_parquet(io.BytesIO(data))
    start = rng.randrange(len(data))
    for offset in range(len(data)):
        i = (start + offset) % len(data)
        flipped = bytearray(data)
        flipped[i] ^= 1 << rng.randrange(8)
        try:
            after = pd.read_parquet(io.BytesIO(bytes(flipped)))
        except Exception:  # noqa: BLE001 - parquet noticed this one: look further
            continue
        if not after.equals(before):
            file.write_bytes(bytes(flipped))
            return
    raise AssertionError(f"no silent bit flip found in {file}")


def _damage(run: Run, key: str, how: str, rng: random.Random) -> None:
    """Damage part ``key`` of ``run`` in one of the ways of :data:`PART_DAMAGE`."""
    part, sidecar = run.path / "parts" / f"{key}.parquet", run.path / "parts" / f"{key}.sha256"
    data = part.read_bytes()
    if how == "silent-bit-flip":
        _flip_silently(part, rng)
    elif how == "byte-flip":
        i = rng.randrange(len(data))
        part.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    elif how == "truncated":
        part.write_bytes(data[: rng.randrange(1, len(data))])
    elif how == "emptied":
        part.write_bytes(b"")
    elif how == "no-sidecar":  # killed between the part and its commit record
        sidecar.unlink()
    elif how == "bad-sidecar":
        sidecar.write_text("not a hash\n")
    elif how == "other-sidecar":  # another part's record
        other = sorted(p for p in sidecar.parent.glob("*.sha256") if p != sidecar)[0]
        sidecar.write_text(other.read_text().split()[0] + f"  {key}.parquet\n")
    else:
        raise ValueError(how)


PART_DAMAGE = ["silent-bit-flip", "byte-flip", "truncated", "emptied", "no-sidecar", "bad-sidecar", "other-sidecar"]


def _interrupt(monkeypatch, after: int | None) -> None:
    """Make the next score_model stop (KeyboardInterrupt) after ``after`` samples, or, with None,
    after every sample but before the tables are written."""
    if after is None:

        def stop(run, settings):
            raise KeyboardInterrupt("stopped before aggregating")

        monkeypatch.setattr(scoring, "finish", stop)
        return
    interrupt_after(monkeypatch, after, KeyboardInterrupt)


STAGES = {"in-progress": 6, "not-aggregated": None}  # samples scored before the stop (None: all, tables not written)


@pytest.fixture(scope="module")
def stopped(model, tmp_path_factory) -> dict[str, Path]:
    """Runs of SETTINGS stopped by a KeyboardInterrupt at each stage of :data:`STAGES`."""
    folders = {}
    for stage, after in STAGES.items():
        folders[stage] = tmp_path_factory.mktemp(stage) / "run"
        with pytest.MonkeyPatch.context() as mp:
            import plotly.io as pio

            mp.setattr(pio, "write_images", _no_png)
            _interrupt(mp, after)
            with pytest.raises(KeyboardInterrupt):
                score_model(model, SETTINGS, folders[stage], progress=False)
    return folders


def _stopped_copy(stopped: dict[str, Path], stage: str, model, tmp_path: Path) -> tuple[Run, list[str]]:
    """A copy of the run stopped at ``stage`` and the keys of its committed parts, in plan order."""
    out = tmp_path / "run"
    shutil.copytree(stopped[stage], out)
    order = _keys(model)
    return Run.open(out), order[: STAGES[stage]] if STAGES[stage] is not None else order


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("how", PART_DAMAGE)
def test_a_damaged_part_of_a_stopped_run_is_not_done_and_refuses_to_load(model, stopped, tmp_path, stage, how):
    run, committed = _stopped_copy(stopped, stage, model, tmp_path)
    assert run.parts_done() == set(committed)
    victim = committed[1]
    _damage(run, victim, how, random.Random(f"{SEED}-{stage}-{how}"))
    reopened = Run.open(run.path)
    assert reopened.parts_done() == set(committed) - {victim}
    assert reopened.part_states([victim]) == {
        victim: "uncommitted" if "sidecar" in how and how != "other-sidecar" else "damaged"
    }
    for read in (reopened.read_parts, lambda: reopened.read_part(victim)):
        with pytest.raises(WorkbenchError, match=rf"corrupt: cannot read parts/{victim}\.parquet"):
            read()


@pytest.mark.parametrize(
    "stage, how",
    [("in-progress", "silent-bit-flip"), ("not-aggregated", "truncated"), ("not-aggregated", "no-sidecar")],
)
def test_a_resume_scores_a_damaged_part_again(model, clean, stopped, tmp_path, monkeypatch, stage, how):
    """A resume deletes a damaged or uncommitted part before anything is scored, and scores it
    again, saying so (a RuntimeWarning naming it): the tables equal the clean run's."""
    run, committed = _stopped_copy(stopped, stage, model, tmp_path)
    victim = committed[1]
    _damage(run, victim, how, random.Random(f"{SEED}-{stage}-{how}"))
    seen, real = [], scoring.score_sample

    def scoring_sample(model, unit, settings, **kwargs):  # which sample, and what of the victim is left then
        seen.append((unit.key, sorted(p.name for p in (run.path / "parts").glob(f"{victim}.*"))))
        return real(model, unit, settings, **kwargs)

    monkeypatch.setattr(scoring, "score_sample", scoring_sample)
    with pytest.warns(RuntimeWarning, match=rf"scoring 1 sample\(s\) again .*{victim}"):
        resumed = score_model(model, SETTINGS, run.path, progress=False)
    assert seen == [(victim, [])] + [
        (k, [f"{victim}.parquet", f"{victim}.sha256"]) for k in _keys(model) if k not in committed
    ]
    _assert_same_results(resumed, clean)
    assert _temp_files(run.path) == []


def test_a_damaged_part_of_a_complete_run_is_refused_then_scored_again(model, clean, tmp_path, calls):
    out = tmp_path / "run"
    shutil.copytree(clean.path, out)
    victim = _keys(model)[-1]
    _damage(Run.open(out), victim, "silent-bit-flip", random.Random(SEED))
    damaged = Run.open(out)
    assert damaged.complete and victim not in damaged.parts_done()
    with pytest.raises(
        WorkbenchError,
        match=rf"cannot read parts/{victim}\.parquet \(its sha256 differs from the "
        r"one in manifest\.json",
    ):
        damaged.read_parts()
    with pytest.warns(RuntimeWarning, match=victim):
        run = score_model(model, SETTINGS, out, progress=False)
    assert calls == [victim]
    _assert_same_results(run, clean)


def _damage_table(file: Path, how: str, rng: random.Random) -> None:
    if how == "silent-bit-flip":
        _flip_silently(file, rng)
    elif how == "truncated":
        file.write_bytes(file.read_bytes()[: rng.randrange(1, file.stat().st_size)])
    elif how == "emptied":
        file.write_bytes(b"")
    elif how == "deleted":
        file.unlink()
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["silent-bit-flip", "truncated", "emptied", "deleted"])
@pytest.mark.parametrize("table", ["head_scores", "profiles", "retrieval"])
def test_a_damaged_table_of_a_complete_run_is_refused(clean, tmp_path, table, how):
    """Loading a damaged table raises a WorkbenchError naming it (never returns its values);
    the other tables still load, and the run is still listed (its manifest is fine)."""
    out = tmp_path / "run"
    shutil.copytree(clean.path, out, ignore=shutil.ignore_patterns("figures"))
    _damage_table(out / f"{table}.parquet", how, random.Random(f"{SEED}-{table}-{how}"))
    damaged = Run.open(out)
    assert damaged.damaged_tables() == [table]
    with pytest.raises(WorkbenchError, match=rf"cannot read {table}\.parquet.*score again with the same --out"):
        damaged.table(table)
    for other in set(clean.tables()) - {table}:
        pd.testing.assert_frame_equal(damaged.table(other), clean.table(other), check_exact=True)
    runs, broken = list_runs(tmp_path)
    assert [r.path for r in runs] == [out] and broken == []


def test_scoring_a_complete_run_again_rebuilds_a_damaged_table(model, clean, tmp_path, calls):
    out = tmp_path / "run"
    shutil.copytree(clean.path, out)
    _damage_table(out / "head_scores.parquet", "silent-bit-flip", random.Random(SEED))
    with pytest.warns(RuntimeWarning, match=r"head_scores\.parquet damaged"):
        run = score_model(model, SETTINGS, out, progress=False)
    assert calls == []  # rebuilt from the parts, nothing scored again
    _assert_same_results(run, clean)
    _assert_same_results(Run.open(out), clean)


def test_damaged_or_uncommitted_extra_tables_are_refused(clean, tmp_path):
    """A table another command added (an ablation) is verified too; a table file the manifest
    does not record (its writer stopped before committing it) is refused, not read."""
    out = tmp_path / "run"
    shutil.copytree(clean.path, out)
    run = Run.open(out)
    extra = pd.DataFrame({"k": [1, 2], "value": [0.5, 0.25]})
    run.write_table("ablation_test", extra)
    pd.testing.assert_frame_equal(Run.open(out).table("ablation_test"), extra)
    assert "ablation_test" in Run.open(out).tables()
    _flip_silently(out / "ablation_test.parquet", random.Random(SEED))
    with pytest.raises(WorkbenchError, match=r"cannot read ablation_test\.parquet.*run the command that wrote it"):
        Run.open(out).table("ablation_test")

    extra.to_parquet(out / "scan_test.parquet")  # written, never committed
    reopened = Run.open(out)
    assert "scan_test" not in reopened.tables() and not reopened.has_table("scan_test")
    with pytest.raises(WorkbenchError, match=r"cannot read scan_test\.parquet \(it was never committed"):
        reopened.table("scan_test")


def test_a_manifest_recording_a_missing_part_is_refused(clean, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(clean.path, out)
    key = sorted(clean.manifest["parts"])[0]
    for file in (out / "parts").glob(f"{key}.*"):
        file.unlink()
    run = Run.open(out)
    assert key not in run.parts_done() and run.part_states([key]) == {key: "damaged"}
    with pytest.raises(WorkbenchError, match=rf"cannot read parts/{key}\.parquet"):
        run.read_parts()


def test_a_truncated_figure_bundle_is_written_again(tmp_path, monkeypatch):
    """The plotly.min.js that HTML figures share is replaced when a killed write left it short."""
    import plotly.graph_objects as go
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from workbench.plots import save_figures

    def no_png(*args, **kwargs):
        raise RuntimeError("PNG export switched off")

    monkeypatch.setattr(pio, "write_images", no_png)
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "plotly.min.js").write_text("/* cut short */")
    save_figures({"f": go.Figure()}, figures)
    assert (figures / "plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()
    assert (figures / "f.html").is_file() and not list(figures.glob(".*.tmp"))
