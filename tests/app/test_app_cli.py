"""``workbench app``: registered through the ``workbench.commands`` entry point, refuses a runs
folder that is not a folder, and starts Streamlit on localhost with static serving off."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from typer.testing import CliRunner

from app.cli import MAIN, register, streamlit_command
from workbench.cli import app

runner = CliRunner()


def said(result) -> str:
    """The command's output with line wrapping undone."""
    return " ".join(result.output.split())


def test_app_joins_the_cli_through_the_entry_point():
    found = {e.name: e.value for e in entry_points(group="workbench.commands")}
    assert found.get("app") == "app.cli:register"
    register(app)
    register(app)  # idempotent
    assert [c.name for c in app.registered_commands].count("app") == 1
    result = runner.invoke(app, ["app", "--help"])
    assert result.exit_code == 0 and "--runs" in result.output and "--port" in result.output


def test_app_refuses_a_runs_folder_that_is_not_a_folder(tmp_path, monkeypatch):
    register(app)
    started = []
    monkeypatch.setattr("os.execv", lambda *args: started.append(args))
    result = runner.invoke(app, ["app", "--runs", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in said(result) and "workbench score" in said(result)
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["app", "--runs", str(tmp_path / "file")])
    assert result.exit_code == 2 and "is a file, not a folder" in said(result)
    assert started == []


def test_app_starts_streamlit_on_localhost(tmp_path, monkeypatch):
    register(app)
    started = []
    monkeypatch.setattr("os.execv", lambda path, argv: started.append(argv))
    result = runner.invoke(app, ["app", "--runs", str(tmp_path), "--port", "8600"])
    assert result.exit_code == 0, result.output
    (argv,) = started
    assert argv[1:5] == ["-m", "streamlit", "run", str(MAIN)]
    split = argv.index("--")
    options = dict(zip(argv[5:split:2], argv[6:split:2]))
    assert options["--server.address"] == "127.0.0.1" and options["--server.port"] == "8600"
    assert options["--server.headless"] == "true" and options["--server.enableStaticServing"] == "false"
    assert options["--browser.gatherUsageStats"] == "false"
    assert argv[split + 1 :] == ["--runs", str(tmp_path.resolve()), "--saes", str((Path.cwd() / "saes").resolve())]
    assert argv == streamlit_command(tmp_path.resolve(), (Path.cwd() / "saes").resolve(), 8600)


def test_the_server_address_is_loopback_unless_host_says_otherwise(tmp_path, monkeypatch):
    def address(argv: list[str]) -> str:
        return argv[argv.index("--server.address") + 1]

    assert address(streamlit_command(tmp_path, tmp_path, 8501)) == "127.0.0.1"
    assert address(streamlit_command(tmp_path, tmp_path, 8501, host="0.0.0.0")) == "0.0.0.0"
    register(app)
    started = []
    monkeypatch.setattr("os.execv", lambda path, argv: started.append(argv))
    assert runner.invoke(app, ["app", "--runs", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["app", "--runs", str(tmp_path), "--host", "0.0.0.0"]).exit_code == 0
    assert [address(argv) for argv in started] == ["127.0.0.1", "0.0.0.0"]


def test_app_refuses_an_saes_path_that_is_a_file_and_accepts_a_missing_one(tmp_path, monkeypatch):
    register(app)
    started = []
    monkeypatch.setattr("os.execv", lambda path, argv: started.append(argv))
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["app", "--runs", str(tmp_path), "--saes", str(tmp_path / "file")])
    assert result.exit_code == 2 and "is a file, not a folder" in said(result) and started == []
    result = runner.invoke(app, ["app", "--runs", str(tmp_path), "--saes", str(tmp_path / "missing")])
    assert result.exit_code == 0 and len(started) == 1  # a missing SAE folder only leaves the SAE page empty
