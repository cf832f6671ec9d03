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
    pytest.fail("no Chromium on this machine: the browser test needs Debian's chromium package. Install it with "
                "`make browser` as root (or `apt-get install chromium`), or put a Chromium named "
                f"{' / '.join(CHROMIUM_NAMES)} on the PATH.")


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
    proc = subprocess.Popen([str(workbench), "app", "--runs", str(explorer_folders.runs), "--saes",
                             str(explorer_folders.saes), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
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
    for path in ("/app/static/manifest.json", "/app/static/zoo/manifest.json", "/zoo/manifest.json",
                 "/media/../zoo/manifest.json", "/app/static/../../runs/zoo/manifest.json"):
        status, body = get(served + path)
        assert "attention-workbench-run" not in body and manifest[:200] not in body, path
