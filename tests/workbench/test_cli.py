"""The ``workbench`` command line and the kernel demo behind it."""

from __future__ import annotations

from typer.testing import CliRunner

from workbench.cli import app
from workbench.demo import HEAD_ROLES, run_demo

runner = CliRunner()


def test_demo_reads_planted_roles_back():
    res = run_demo(256, backend="reference")
    s = {name: dict(zip(HEAD_ROLES, values)) for name, values in res.summary.items()}
    assert max(s["sink mass"], key=s["sink mass"].get) == "sink" and s["sink mass"]["sink"] > 0.5
    prev = s["previous-token mass"]
    assert max(prev, key=prev.get) == "previous-token" and prev["previous-token"] > 0.5
    ent = s["entropy (nats)"]
    assert max(ent, key=ent.get) == "diffuse"
    # the local head keeps more mass in its window than any head except the previous-token one
    local = s["local mass (16)"]
    assert local["local"] > max(local["sink"], local["diffuse"]) + 0.3


def test_demo_command_prints_table():
    result = runner.invoke(app, ["demo", "--tokens", "128", "--backend", "reference"])
    assert result.exit_code == 0, result.output
    for role in HEAD_ROLES:
        assert role in result.output
    assert "sink mass" in result.output


def test_demo_command_rejects_bad_input():
    result = runner.invoke(app, ["demo", "--tokens", "1"])
    assert result.exit_code != 0
    result = runner.invoke(app, ["demo", "--tokens", "64", "--backend", "fast"])
    assert result.exit_code == 2 and "unknown backend" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and "attention-workbench" in result.output


def test_errors_read_the_same_on_any_terminal_and_path(tmp_path):
    """An error message is printed unwrapped: a narrow terminal and a long path leave it whole."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / ("and-another-one-" * 4)
    deep.mkdir(parents=True)
    for columns in ("20", "80", "400"):
        result = runner.invoke(app, ["runs", "show", str(deep)], env={"COLUMNS": columns})
        assert result.exit_code == 2, result.output
        assert f"error: {deep} is not a run folder: it has no manifest.json" in result.output


def test_score_refuses_an_unknown_backend_before_writing(tmp_path):
    """`--backend bogus` is a user error (exit 2, no traceback) and leaves no run folder behind."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["score", "--backend", "bogus", "--lengths", "128", "--out", str(out)])
    assert result.exit_code == 2 and "unknown kernel backend 'bogus'" in result.output, result.output
    assert isinstance(result.exception, SystemExit) and not out.exists()


def test_kernel_input_errors_end_commands_cleanly(tmp_path, monkeypatch):
    """An AttentionInputError raised under a command ends it with `error:` and exit 2."""
    import workbench.demo
    from kernels import AttentionInputError

    def refuse(*args, **kwargs):
        raise AttentionInputError("q must be a 4-d tensor")

    monkeypatch.setattr(workbench.demo, "run_demo", refuse)
    result = runner.invoke(app, ["demo", "--tokens", "64"])
    assert result.exit_code == 2 and "error: q must be a 4-d tensor" in result.output
    assert "Traceback" not in result.output


def test_score_prefills_in_chunks_when_asked(tmp_path):
    from workbench.runs import Run

    args = ["score", "--task", "repeats", "--lengths", "128", "--samples", "1", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--prefill-chunk", "48", "--out", str(tmp_path / "chunked")])
    assert result.exit_code == 0, result.output
    assert Run.open(tmp_path / "chunked").manifest["settings"]["prefill_chunk"] == 48
    result = runner.invoke(app, [*args, "--prefill-chunk", "0", "--out", str(tmp_path / "zero")])
    assert result.exit_code == 2 and "--prefill-chunk" in result.output
