"""The explorer in a real browser: ``workbench app`` serves the fixture run on a free localhost
port, headless Chromium (Debian's package, driven by Playwright with the system browser, no
browser download) loads it, the head map renders without an exception, a click on a cell opens
the head's detail, and nothing outside the runs folder is served."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    """The system Chromium; the test fails (it does not skip) when there is none."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "no Chromium on this machine: the browser test needs Debian's chromium package. Install it with "
        "`make browser` as root (or `apt-get install chromium`), or put a Chromium named "
        f"{' / '.join(CHROMIUM_NAMES)} on the PATH."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@pytest.fixture
def served(explorer_folders, tmp_path):
    """``workbench app`` on a free port (the real command, through its entry point); the base URL."""
    port = free_port()
    workbench = Path(sys.executable).with_name("workbench")
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen(
        [
            str(workbench),
            "app",
            "--runs",
            str(explorer_folders.runs),
            "--saes",
            str(explorer_folders.saes),
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"workbench app exited with {proc.returncode}:\n{(tmp_path / 'app.log').read_text()}")
            try:
                if get(f"{base}/_stcore/health")[1].strip() == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"workbench app did not answer in 90 s:\n{(tmp_path / 'app.log').read_text()}")
            time.sleep(0.3)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: streamlit and anything it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_head_map_renders_in_chromium(served, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = chromium()
    shot = tmp_path / "head_map.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{served}/?page=Head+map&run=zoo", timeout=60_000)
            page.wait_for_selector(".js-plotly-plot", timeout=90_000)
            page.wait_for_timeout(1000)  # let the rest of the page settle
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.get_by_role("heading", name="Head map", exact=True).count() == 1
            assert page.locator(".js-plotly-plot .heatmaplayer").count() >= 1  # the heatmap itself was drawn
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot of the head map: {shot}")

            # a click on a cell (the repeats panel, layer 1 head 0) opens that head's detail
            cell = page.locator(".js-plotly-plot .nsewdrag").nth(1).bounding_box()
            page.mouse.click(cell["x"] + cell["width"] * 0.125, cell["y"] + cell["height"] * 0.75)
            page.get_by_role("heading", name="Head detail", exact=True).wait_for(timeout=60_000)
            page.get_by_text("Head 1.0: every score").wait_for(timeout=60_000)
            assert page.locator('[data-testid="stException"]').count() == 0

            # a run name that escapes the runs folder: a readable message, no traceback
            page.goto(f"{served}/?page=Runs&run=..%2F..%2Fetc", timeout=60_000)
            page.get_by_text("is not a run in the runs folder").wait_for(timeout=60_000)
            assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def test_nothing_outside_the_app_is_served(served, explorer_folders):
    """No static file serving: paths that would reach run files get the app's page, never the files."""
    manifest = (explorer_folders.run / "manifest.json").read_text()
    for path in (
        "/app/static/manifest.json",
        "/app/static/zoo/manifest.json",
        "/zoo/manifest.json",
        "/media/../zoo/manifest.json",
        "/app/static/../../runs/zoo/manifest.json",
    ):
        status, body = get(served + path)
        assert "attention-workbench-run" not in body and manifest[:200] not in body, path


# ----------------------------------------------------------------------------- the load benchmark


def test_the_load_benchmark_visits_every_page_of_a_loopback_server(explorer_folders):
    """``python -m app.load_benchmark`` in small (2 sessions x 1 round): every page visited by
    every session, times positive, no page errors, memory sampled, the server on 127.0.0.1 only."""
    from app.load_benchmark import FIRST_LOAD, report, run_benchmark
    from app.main import PAGES

    result = run_benchmark(
        explorer_folders.runs,
        explorer_folders.saes,
        sessions=2,
        rounds=1,
        run="zoo",
        chromium=chromium(),
        page_timeout_s=90,
        time_limit_s=240,
    )
    assert result.complete and result.problems() == []
    assert result.pages == list(PAGES)
    times = result.page_times()
    assert list(times) == [FIRST_LOAD, *PAGES]
    assert all(len(ms) == 2 for ms in times.values()), {page: len(ms) for page, ms in times.items()}
    assert all(0 < t < 240_000 for ms in times.values() for t in ms)
    for row in result.rows():
        assert row["count"] == 2 and 0 < row["p50"] <= row["p95"] <= row["max"]
    memory = result.memory()
    assert len(result.rss) >= 2 and 0 < memory["start"] <= memory["peak"] and memory["end"] <= memory["peak"]
    assert memory["peak"] > memory["start"]  # the sessions' pages cost the server memory: it was sampled live
    assert result.listening and all(a.startswith("127.0.0.1:") for a in result.listening), result.listening
    printed = report(result)
    assert all(page in printed for page in PAGES) and "server RSS (MiB): start" in printed


def test_load_benchmark_figures_and_a_missing_chromium(monkeypatch):
    """The table's arithmetic on known times, and the message when there is no Chromium."""
    from app import load_benchmark
    from app.load_benchmark import FIRST_LOAD, LoadResult, Visit
    from workbench.errors import WorkbenchError

    visits = [Visit(0, 0, FIRST_LOAD, 1000.0)] + [Visit(0, 1, "Runs", ms) for ms in (100.0, 200.0, 300.0, 400.0)]
    visits.append(Visit(1, 1, "Live", None, ["did not finish: TimeoutError"]))
    result = LoadResult(
        2, 1, ["Runs", "Live"], visits, [(0.0, 70.0), (0.2, 300.0), (0.4, 250.0)], 1.0, False, ["127.0.0.1:1"], 0.5
    )
    rows = {row["page"]: row for row in result.rows()}
    assert rows["Runs"] == {"page": "Runs", "count": 4, "p50": 250.0, "p95": pytest.approx(385.0), "max": 400.0}
    assert rows["Live"]["count"] == 0 and rows["Live"]["p50"] is None and rows[FIRST_LOAD]["max"] == 1000.0
    assert result.memory() == {"start": 70.0, "peak": 300.0, "end": 250.0}
    assert result.problems() == ["session 1 round 1 Live: did not finish: TimeoutError"]
    assert "INCOMPLETE" in load_benchmark.report(result)

    monkeypatch.setattr(load_benchmark.shutil, "which", lambda name: None)
    with pytest.raises(WorkbenchError, match=r"apt-get install chromium"):
        load_benchmark.find_chromium()
    assert load_benchmark.main(["--runs", ".", "--sessions", "1", "--rounds", "1"]) == 2
