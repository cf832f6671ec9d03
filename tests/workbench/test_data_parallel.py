"""Data-parallel scoring under ``torchrun`` (issue 17): two CPU processes over gloo score the
samples of one run between them, and the tables equal a single-process run's bit for bit. With
``--context-parallel 2`` two processes spread each sample's tokens between them (tables equal
within float rounding), and four form a 2 x 2 mesh of data- and context-parallel groups (tables
equal the two-process context-parallel run's bit for bit).

Each test starts ``python -m torch.distributed.run --standalone --nproc_per_node=2`` as a
subprocess, either on ``-m workbench score`` itself or on a small driver script written to
``tmp_path``; the driver is how a test changes one rank's behaviour (a rank that kills itself, a
rank given other settings), since a monkeypatch cannot reach another process. Every launch has a
timeout, so a rank waiting forever for another fails the test instead of hanging it. The
reference is a single-process run of the same arguments through the same driver, with the same
thread count (one per process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import SEED
from workbench import distributed
from workbench.errors import WorkbenchError
from workbench.runs import SCORING_TABLES, Run
from workbench.scoring import ScoreRunSettings

SETTINGS = ScoreRunSettings(
    model="zoo-2l", tasks=("repeats", "niah"), lengths=(128,), samples=2, depths=(0.5,), seed=SEED % 10_000
)
#: The command-line form of SETTINGS (the CLI's defaults give the same scores).
ARGS = [
    "--model",
    "zoo-2l",
    "--task",
    "repeats,niah",
    "--lengths",
    "128",
    "--samples",
    "2",
    "--depths",
    "0.5",
    "--seed",
    str(SETTINGS.seed),
    "--device",
    "cpu",
]
KEYS = {"repeats-128-000", "repeats-128-001", "niah-128-d0.50-000", "niah-128-d0.50-001"}
LAUNCH_TIMEOUT_S = 240  # per torchrun launch; a rank that waits forever fails the test here
#: One thread per process, in the ranks and the single-process reference alike.
_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Run:
    """The single-process run of SETTINGS, through the same driver and with the same thread
    count as the ranks (bit-for-bit equality of float sums needs the same threads)."""
    folder = tmp_path_factory.mktemp("dp")
    script = folder / "driver.py"
    script.write_text(DRIVER)
    cmd = [sys.executable, str(script), "single", str(folder / "log.jsonl"), *ARGS, "--out", str(folder / "single")]
    result = subprocess.run(cmd, cwd=folder, env=_ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, _shown(result)
    return Run.open(folder / "single")


#: A driver in place of ``-m workbench``: switches PNG export off, applies one rank's change,
#: then runs the ``workbench`` command with the arguments after the mode.
DRIVER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import plotly.io as pio

    def no_png(*args, **kwargs):
        raise RuntimeError("PNG export switched off")

    pio.write_images = no_png
    mode, log, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    rank, attempt = int(os.environ.get("RANK", "0")), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if mode == "kill":  # rank 1 of the first attempt dies at its second sample, after its first part
        import workbench.scoring.run as scoring
        from workbench.runs import Run

        score_sample, write_part, started = scoring.score_sample, Run.write_part, []

        def logged(event, key):
            with open(log, "a") as f:
                f.write(json.dumps({"event": event, "key": key, "rank": rank, "attempt": attempt}) + "\\n")

        def scoring_sample(adapter, unit, settings, **options):
            started.append(unit.key)
            if rank == 1 and attempt == 0 and len(started) == 2:
                os._exit(1)
            logged("start", unit.key)
            return score_sample(adapter, unit, settings, **options)

        def writing_part(self, key, frame):
            write_part(self, key, frame)
            logged("wrote", key)

        scoring.score_sample, Run.write_part = scoring_sample, writing_part
    elif mode == "mismatch" and rank == 1:  # rank 1 asks for another sample count
        args[args.index("--samples") + 1] = "3"
    from workbench.cli import main_cli

    sys.argv = ["workbench", "score", *args]
    main_cli()
""")


def _torchrun(
    cwd: Path, *command: str, launcher: tuple[str, ...] = (), processes: int = 2
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=PROCESSES [launcher options] command`` in ``cwd``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd += [*launcher, *command]
    try:
        return subprocess.run(cmd, cwd=cwd, env=_ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"torchrun did not end within {LAUNCH_TIMEOUT_S} s (a rank waiting forever?):\n{exc.stdout}\n{exc.stderr}"
        )


def _driver(
    tmp_path: Path, mode: str, *args: str, launcher: tuple[str, ...] = (), processes: int = 2
) -> subprocess.CompletedProcess:
    """The driver under torchrun: ``mode`` kill or mismatch changes a rank, plain (or any other)
    runs ``workbench score`` as it is, without PNG export."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return _torchrun(
        tmp_path, str(script), mode, str(tmp_path / "log.jsonl"), *args, launcher=launcher, processes=processes
    )


def _shown(result: subprocess.CompletedProcess) -> str:
    return f"exit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def _assert_same_tables(run: Run, reference: Run) -> None:
    assert run.complete and run.tables() == reference.tables() == sorted(SCORING_TABLES)
    for name in SCORING_TABLES:
        pd.testing.assert_frame_equal(run.table(name), reference.table(name), check_exact=True)
    assert run.manifest["summary"] == reference.manifest["summary"]


def test_two_ranks_score_the_tables_of_one_process(tmp_path, reference):
    """`torchrun ... -m workbench score` with the single-process arguments: the samples split
    between the ranks, the same tables bit for bit, the table printed once (by rank 0)."""
    out = tmp_path / "run"
    result = _torchrun(tmp_path, "-m", "workbench", "score", *ARGS, "--out", str(out))
    assert result.returncode == 0, _shown(result)
    run = Run.open(out)
    _assert_same_tables(run, reference)
    assert run.manifest["world_size"] == 2
    assert run.manifest["scored_by"] == {
        "repeats-128-000": 0,
        "repeats-128-001": 1,
        "niah-128-d0.50-000": 0,
        "niah-128-d0.50-001": 1,
    }
    assert run.parts_done() == KEYS
    assert result.stdout.count("top heads per score") == 1, _shown(result)
    assert "error" not in result.stderr.lower(), _shown(result)


def test_a_single_process_records_rank_zero(reference):
    assert reference.manifest["world_size"] == 1
    assert reference.manifest["scored_by"] == dict.fromkeys(KEYS, 0)


def test_a_killed_rank_is_resumed_by_the_restarted_group(tmp_path, reference):
    """Rank 1 dies after its first part; torchrun stops rank 0 and, under --max-restarts=1,
    restarts both: the new group scores only the samples without a committed part, and the
    tables are the single-process run's."""
    out = tmp_path / "run"
    result = _driver(tmp_path, "kill", *ARGS, "--out", str(out), launcher=("--max-restarts=1",))
    assert result.returncode == 0, _shown(result)
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    started = [{e["key"] for e in events if e["event"] == "start" and e["attempt"] == a} for a in (0, 1)]
    wrote_first = {e["key"] for e in events if e["event"] == "wrote" and e["attempt"] == 0}
    killed_rank_part = {e["key"] for e in events if e["event"] == "wrote" and e["attempt"] == 0 and e["rank"] == 1}
    assert len(killed_rank_part) == 1, events  # rank 1 committed one part, then died
    assert started[1] <= KEYS - wrote_first, events  # no committed part is scored again
    assert started[1] >= KEYS - started[0], events  # every sample never started is scored
    run = Run.open(out)
    _assert_same_tables(run, reference)
    assert run.parts_done() == KEYS and not list(out.rglob(".*.tmp"))
    assert run.manifest["world_size"] == 2 and set(run.manifest["scored_by"]) == KEYS
    assert run.manifest["scored_by"][killed_rank_part.pop()] == 1


def test_ranks_given_different_settings_stop_with_the_differing_field(tmp_path):
    """Rank 1 asks for 3 samples, rank 0 for 2: both ranks refuse, naming the field, before
    anything is written (and neither waits for the other)."""
    out = tmp_path / "run"
    result = _driver(tmp_path, "mismatch", *ARGS, "--out", str(out))
    assert result.returncode != 0, _shown(result)
    message = "error: the ranks were given different settings: rank 1 differs from rank 0 in samples (3, rank 0: 2)"
    assert result.stderr.count(message) == 2, _shown(result)  # printed by each rank
    assert not out.exists()


def test_bad_settings_are_refused_before_the_ranks_meet(tmp_path):
    """An unknown task under torchrun: the ranks print the usual error and exit with the usage
    status (2) before joining the process group. torchrun stops the other ranks as soon as one
    exits, so whether the second prints too depends on timing: at least one must."""
    out = tmp_path / "run"
    result = _torchrun(tmp_path, "-m", "workbench", "score", *ARGS[:2], "--task", "bogus", "--out", str(out))
    assert result.returncode != 0, _shown(result)
    assert result.stderr.count("error: unknown task(s) ['bogus']") >= 1, _shown(result)
    assert re.search(r"exitcode\s*:\s*2\b", result.stderr), _shown(result)  # the first rank out: a usage error
    assert "WorkbenchError" not in result.stderr, _shown(result)  # an error message, not a traceback
    assert not out.exists()


@pytest.fixture(scope="module")
def context_parallel_run(tmp_path_factory) -> Run:
    """The run of ARGS on two processes with ``--context-parallel 2``."""
    folder = tmp_path_factory.mktemp("cp")
    result = _driver(folder, "plain", *ARGS, "--context-parallel", "2", "--out", str(folder / "run"))
    assert result.returncode == 0, _shown(result)
    assert result.stdout.count("top heads per score") == 1, _shown(result)
    return Run.open(folder / "run")


def test_context_parallel_scoring_gives_the_tables_of_one_process(context_parallel_run, reference):
    """Each sample's tokens spread over two ranks (the needle's answer decoded against the KV
    cache split between them): every score and profile within float rounding of one process's
    (float32 sums in other shapes and orders), the needle accuracy and retrieval hits exactly."""
    run = context_parallel_run
    assert run.complete and run.tables() == reference.tables()
    for name in SCORING_TABLES:
        got, want = run.table(name), reference.table(name)
        floats = [c for c in want.columns if want[c].dtype.kind == "f"]
        pd.testing.assert_frame_equal(got.drop(columns=floats), want.drop(columns=floats), check_exact=True)
        pd.testing.assert_frame_equal(got[floats], want[floats], check_exact=False, rtol=1e-5, atol=1e-5)
    assert run.manifest["summary"] == reference.manifest["summary"]
    assert run.manifest["summary"]["needle_accuracy"] > 0  # the decoded answers were retrieved
    assert (run.manifest["world_size"], run.manifest["context_parallel"]) == (2, 2)
    assert run.manifest["scored_by"] == dict.fromkeys(KEYS, 0)  # one group: its rank 0 writes


def test_a_data_by_context_mesh_gives_the_context_parallel_tables(tmp_path, context_parallel_run):
    """Four processes with --context-parallel 2: two groups of two share the samples; each
    sample is computed as in the two-process run, so the tables are that run's bit for bit."""
    out = tmp_path / "run"
    result = _driver(tmp_path, "plain", *ARGS, "--context-parallel", "2", "--out", str(out), processes=4)
    assert result.returncode == 0, _shown(result)
    run = Run.open(out)
    _assert_same_tables(run, context_parallel_run)
    assert (run.manifest["world_size"], run.manifest["context_parallel"]) == (4, 2)
    assert run.manifest["scored_by"] == {
        "repeats-128-000": 0,
        "repeats-128-001": 2,
        "niah-128-d0.50-000": 0,
        "niah-128-d0.50-001": 2,
    }
    assert result.stdout.count("top heads per score") == 1, _shown(result)


def test_context_parallel_sizes_the_launch_cannot_give_are_refused(tmp_path):
    """--context-parallel 3 over 2 processes: every rank refuses before the model loads."""
    out = tmp_path / "run"
    result = _torchrun(tmp_path, "-m", "workbench", "score", *ARGS, "--context-parallel", "3", "--out", str(out))
    assert result.returncode != 0, _shown(result)
    message = "error: 2 processes cannot be split into groups of 3 for context parallelism"
    assert result.stderr.count(message) == 2, _shown(result)
    assert not out.exists()


def test_context_parallel_settings_are_checked_before_any_collective(monkeypatch, zoo):
    from workbench.scoring import check_model

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(WorkbenchError, match="needs 2 processes .*torchrun --nproc_per_node=2"):
        distributed.check_context_parallel(2)
    for bad in (0, 1.5, True):
        with pytest.raises(WorkbenchError, match="context parallelism takes a number of ranks >= 1"):
            distributed.check_context_parallel(bad)
    monkeypatch.setenv("WORLD_SIZE", "6")
    distributed.check_context_parallel(3)
    with pytest.raises(WorkbenchError, match="6 processes cannot be split into groups of 4"):
        distributed.check_context_parallel(4)
    short = ScoreRunSettings(model="zoo-2l", tasks=("repeats",), lengths=(8, 64))
    with pytest.raises(WorkbenchError, match=r"lengths \[8\] are too short to split over 6 context-parallel ranks"):
        check_model(zoo, short, context_parallel=6)
    check_model(zoo, short, context_parallel=4)
    chunked = ScoreRunSettings(model="zoo-2l", tasks=("repeats",), lengths=(64,), prefill_chunk=16)
    with pytest.raises(WorkbenchError, match="context parallelism and a prefill chunk do not combine"):
        check_model(zoo, chunked, context_parallel=2)


def test_helpers_without_torchrun_are_one_process(monkeypatch):
    import torch

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not distributed.launched() and (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.default_device() is None  # the usual default (CUDA when available) applies
    with distributed.process_group("cpu") as active:
        assert not active
        distributed.barrier()
        assert distributed.broadcast({"a": 1}) == {"a": 1}
        assert distributed.all_gather("x") == ["x"] and distributed.gather("x") == ["x"]
        distributed.agree(None)
        with pytest.raises(WorkbenchError, match="^disk full$"):
            distributed.agree("disk full")


def test_torchrun_environment_picks_this_ranks_gpu(monkeypatch):
    """Under torchrun (before the group is joined) rank and world come from the environment,
    and the default device is ``cuda:LOCAL_RANK`` when CUDA is available."""
    import torch

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() and (distributed.rank(), distributed.world_size()) == (3, 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.default_device() == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.default_device() is None
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(WorkbenchError, match="WORLD_SIZE='two' is not a whole number"):
        distributed.launched()
