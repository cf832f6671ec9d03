"""The explorer under load: a benchmark that prints figures (it is not a test and has no thresholds).

``python -m app.load_benchmark`` starts the real explorer (the ``streamlit run`` line of
``workbench app``, :func:`app.cli.streamlit_command`, on a free port of 127.0.0.1) over a runs
folder: ``--runs DIR``, or a small zoo-2l run built first (scored, ablated, with an SAE, as the
tests' fixture builds it). Then ``--sessions`` headless Chromium sessions at once (Debian's
package through Playwright, no browser download) each click through every page of the sidebar
for ``--rounds`` rounds.

Per page it records the rerun time: from the click (or, for the first load, the navigation) to
the moment the page has finished rendering, that is Streamlit reports its script as not running,
no element is stale, the page's header is there, every Plotly chart has drawn, and all of that
has held for :data:`QUIET_MS`; the time is taken when it first held. Meanwhile it samples the
resident memory of the server (its process and children). It prints per page the count and the
50th / 95th percentile and maximum time in ms, and the server's RSS at the start, peak and end.

The run is bounded: at most :data:`MAX_SESSIONS` sessions and :data:`MAX_ROUNDS` rounds, each
page must finish within ``--page-timeout`` seconds, and no new click starts after
``--time-limit`` seconds; the server and browser are stopped in every case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.cli import streamlit_command
from workbench.errors import WorkbenchError

#: Chromium executables looked for on the PATH, in this order.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
#: How long the finished state must hold before a page counts as rendered.
QUIET_MS = 150
#: The label of the first navigation in the figures (it is not a click on a page).
FIRST_LOAD = "(first load)"
MAX_SESSIONS = 20
MAX_ROUNDS = 20
MIB = 1024 * 1024

# True (its value: performance.now() when the finished state began) once the page named `name`
# (any page for null) has finished rendering, with the sidebar's page list, and stayed so for
# `quiet` ms; false until then.
_RENDERED_JS = """([name, quiet]) => {
  const app = document.querySelector('[data-testid="stApp"]');
  const main = document.querySelector('[data-testid="stMain"]');
  const done = !!app && !!main
    && app.getAttribute('data-test-script-state') === 'notRunning'
    && app.getAttribute('data-test-connection-state') === 'CONNECTED'
    && !document.querySelector('[data-stale="true"]')
    && !!document.querySelector('[data-testid="stSidebar"] [role="radiogroup"] label')
    && [...main.querySelectorAll('h2')].some(h => name === null ? true : h.innerText.trim() === name)
    && [...main.querySelectorAll('[data-testid="stPlotlyChart"]')].every(c => c.querySelector('.main-svg'));
  const now = performance.now();
  if (!done) { window.__wbSince = null; return false; }
  if (window.__wbSince == null) window.__wbSince = now;
  return now - window.__wbSince >= quiet ? window.__wbSince : false;
}"""

_PROBLEMS_JS = """() => [...document.querySelectorAll(
  '[data-testid="stException"], [data-testid="stAlertContentError"]')].map(e => e.innerText.trim().slice(0, 300))"""


@dataclass
class Visit:
    """One page shown in one session: how long it took (ms; None when it did not finish) and the
    problems seen on it (exceptions, error messages, browser errors)."""

    session: int
    round: int
    page: str
    ms: float | None
    problems: list[str] = field(default_factory=list)


@dataclass
class LoadResult:
    """What one benchmark run measured: the visits, the server's RSS samples ``(seconds since
    the server answered, MiB)`` and whether every session finished its rounds."""

    sessions: int
    rounds: int
    pages: list[str]
    visits: list[Visit]
    rss: list[tuple[float, float]]
    wall_s: float
    complete: bool
    listening: list[str]
    server_cpu_s: float
    #: The machine's 1-minute load average before and after (other work on it slows every page).
    load_average: tuple[float, float] | None = None

    def page_times(self) -> dict[str, list[float]]:
        """Finished visits' times (ms) per page, first load first, then the sidebar's order."""
        out: dict[str, list[float]] = {name: [] for name in [FIRST_LOAD, *self.pages]}
        for v in self.visits:
            if v.ms is not None:
                out.setdefault(v.page, []).append(v.ms)
        return out

    def rows(self) -> list[dict]:
        """Per page: count, p50, p95 and max (ms; linear interpolation between order statistics)."""
        import numpy as np

        rows = []
        for page, times in self.page_times().items():
            row = {"page": page, "count": len(times), "p50": None, "p95": None, "max": None}
            if times:
                p50, p95 = np.percentile(np.array(times, dtype=float), [50, 95])
                row.update(p50=float(p50), p95=float(p95), max=float(max(times)))
            rows.append(row)
        return rows

    def memory(self) -> dict[str, float | None]:
        """Server RSS (MiB): before any session, highest sample, after the browser closed."""
        values = [m for _, m in self.rss]
        if not values:
            return {"start": None, "peak": None, "end": None}
        return {"start": values[0], "peak": max(values), "end": values[-1]}

    def problems(self) -> list[str]:
        return [f"session {v.session} round {v.round} {v.page}: {p}" for v in self.visits for p in v.problems]

    def to_json(self) -> dict:
        return {
            "sessions": self.sessions,
            "rounds": self.rounds,
            "pages": self.pages,
            "complete": self.complete,
            "wall_s": self.wall_s,
            "server_cpu_s": self.server_cpu_s,
            "listening": self.listening,
            "load_average": self.load_average,
            "cpu_count": os.cpu_count(),
            "per_page_ms": self.rows(),
            "rss_mib": self.memory(),
            "rss_samples": self.rss,
            "visits": [asdict(v) for v in self.visits],
        }


# ----------------------------------------------------------------------------- set-up


def find_chromium() -> str:
    """The system Chromium, or :class:`WorkbenchError` saying how to install it."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise WorkbenchError(
        "no Chromium on this machine (`command -v chromium` finds nothing): install Debian's "
        "package with `apt-get install chromium` as root (`make browser` does it), or pass "
        "--chromium PATH"
    )


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_runs(root: Path) -> tuple[Path, Path, str]:
    """A small explorer folder in ``root``: ``runs/zoo`` (zoo-2l scored on niah, repeats and text
    at 128 and 256 tokens, ablated with a scan), ``runs/repeats`` and ``saes/zoo-2l-L1-topk``.
    The tests' ``explorer_folders`` fixture is built by this function too (about 20 s on a CPU). Returns
    ``(runs, saes, run to open)``."""
    from unittest import mock

    import plotly.io as pio

    from probes.cli import register
    from workbench.cli import app
    from workbench.models import load_model
    from workbench.scoring import ScoreRunSettings, score_model

    runs, saes = root / "runs", root / "saes"

    def no_png(*args, **kwargs):  # PNG export starts a Chromium per call; the explorer draws its own figures
        raise RuntimeError("PNG export switched off while building the benchmark's runs")

    with mock.patch.object(pio, "write_images", no_png):
        model = load_model("zoo-2l", device="cpu")
        score_model(
            model,
            ScoreRunSettings(
                model="zoo-2l", tasks=("niah", "repeats", "text"), lengths=(128, 256), samples=1, depths=(0.3, 0.7)
            ),
            runs / "zoo",
            progress=False,
        )
        score_model(
            model,
            ScoreRunSettings(model="zoo-2l", tasks=("repeats",), lengths=(128,), samples=2),
            runs / "repeats",
            progress=False,
        )
        register(app)
        for args in (
            [
                "ablate",
                "--run",
                str(runs / "zoo"),
                "--rank-by",
                "induction",
                "--k",
                "1,2",
                "--task",
                "niah",
                "--length",
                "128",
                "--samples",
                "1",
                "--draws",
                "2",
                "--scan",
                "--device",
                "cpu",
            ],
            [
                "sae",
                "train",
                "--layer",
                "1",
                "--samples",
                "10",
                "--length",
                "128",
                "--tokens",
                "20000",
                "--d-sae",
                "32",
                "--k",
                "4",
                "--out",
                str(saes / "zoo-2l-L1-topk"),
                "--device",
                "cpu",
            ],
        ):
            code = app(args, standalone_mode=False)
            if code:
                raise WorkbenchError(f"`workbench {' '.join(args)}` failed with exit code {code}")
    return runs, saes, "zoo"


class RssSampler:
    """Samples the resident memory of a process and its children every ``every`` seconds in a
    thread; ``samples`` holds ``(seconds since start, MiB)``."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self.process = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        """One sample now (skipped when the process is gone)."""
        import psutil

        try:
            procs = [self.process, *self.process.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            return
        self.samples.append((round(time.monotonic() - self._start, 3), round(total / MIB, 1)))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@contextmanager
def served(runs: Path, saes: Path, log: Path, start_timeout: float = 90):
    """The explorer as ``workbench app --runs RUNS --saes SAES`` serves it (default host, so
    127.0.0.1), on a free port; yields ``(base URL, server process)`` and stops it afterwards."""
    port = free_port()
    command = streamlit_command(runs, saes, port)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )  # its own process group: stopped as one below
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise WorkbenchError(f"the explorer exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=5) as response:
                    if response.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise WorkbenchError(
                    f"the explorer did not answer in {start_timeout:.0f} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def listening_addresses(pid: int) -> list[str]:
    """``ip:port`` of every socket the process listens on."""
    import psutil

    conns = psutil.Process(pid).net_connections(kind="inet")
    return sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN})


# ----------------------------------------------------------------------------- the sessions


async def _rendered(page, name: str | None, timeout_s: float) -> float:
    """Wait until the page ``name`` (any page for None) has finished rendering; performance.now()
    in the page when it did."""
    handle = await page.wait_for_function(_RENDERED_JS, arg=[name, QUIET_MS], polling=20, timeout=timeout_s * 1000)
    return float(await handle.json_value())


async def _problems(page, errors: list[str]) -> list[str]:
    """Exceptions and error messages on the page, plus browser errors since the last call."""
    found = list(await page.evaluate(_PROBLEMS_JS)) + [f"browser error: {e}" for e in errors]
    errors.clear()
    return found


async def _session(
    browser,
    url: str,
    index: int,
    rounds: int,
    deadline: float,
    page_timeout_s: float,
    visits: list[Visit],
    pages: list[str],
) -> bool:
    """One browser session: load ``url``, then click every page of the sidebar ``rounds`` times
    (each round ends on the first page again). True when it did all its rounds."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)[:300]))
        try:
            await page.goto(url, timeout=page_timeout_s * 1000)
            done_at = await _rendered(page, None, page_timeout_s)  # performance.now() counts from the navigation
        except Exception as exc:  # Playwright's timeouts and a closed page: recorded, the session stops
            visits.append(Visit(index, 0, FIRST_LOAD, None, [f"did not finish: {type(exc).__name__}"]))
            return False
        visits.append(Visit(index, 0, FIRST_LOAD, done_at, await _problems(page, errors)))
        labels = page.locator('[data-testid="stSidebar"] [role="radiogroup"] label')
        names = [t.strip() for t in await labels.all_inner_texts()]
        if not pages:
            pages.extend(names)
        if names != pages or not names:
            visits.append(Visit(index, 0, FIRST_LOAD, None, [f"the sidebar lists the pages {names}, not {pages}"]))
            return False
        order = names[1:] + names[:1]
        for r in range(1, rounds + 1):
            for name in order:
                if time.monotonic() > deadline:
                    return False
                clicked = await page.evaluate("() => { window.__wbSince = null; return performance.now(); }")
                try:
                    exact = re.compile(f"^{re.escape(name)}$")
                    await labels.filter(has_text=exact).click(timeout=page_timeout_s * 1000)
                    done_at = await _rendered(page, name, page_timeout_s)
                except Exception as exc:
                    visits.append(Visit(index, r, name, None, [f"did not finish: {type(exc).__name__}"]))
                    return False
                visits.append(Visit(index, r, name, done_at - clicked, await _problems(page, errors)))
        return True
    finally:
        await context.close()


async def _drive(
    chromium: str, url: str, sessions: int, rounds: int, deadline: float, page_timeout_s: float
) -> tuple[list[Visit], list[str], bool]:
    """``sessions`` concurrent sessions in one headless Chromium (one browser context each)."""
    from playwright.async_api import async_playwright

    visits: list[Visit] = []
    pages: list[str] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, headless=True)
        try:
            done = await asyncio.gather(
                *(_session(browser, url, i, rounds, deadline, page_timeout_s, visits, pages) for i in range(sessions))
            )
        finally:
            await browser.close()
    return visits, pages, all(done)


# ----------------------------------------------------------------------------- the benchmark


def run_benchmark(
    runs: Path,
    saes: Path,
    sessions: int = 5,
    rounds: int = 3,
    run: str | None = None,
    chromium: str | None = None,
    page_timeout_s: float = 120,
    time_limit_s: float = 600,
    log: Path | None = None,
) -> LoadResult:
    """Serve ``runs`` and ``saes`` with the explorer and drive ``sessions`` browser sessions at
    once through every page ``rounds`` times (opening ``run``, else the explorer's first run).
    Stops by itself: no click starts after ``time_limit_s``; a page that does not finish within
    ``page_timeout_s`` ends its session (``complete`` is then False)."""
    try:
        import playwright.async_api  # noqa: F401  (the sessions import it; fail here, before the server starts)
        import psutil
    except ImportError as exc:
        raise WorkbenchError(
            f"the load benchmark needs {exc.name}: install the test extra with `pip install -e '.[test]'`"
        ) from None
    if not 1 <= sessions <= MAX_SESSIONS or not 1 <= rounds <= MAX_ROUNDS:
        raise WorkbenchError(
            f"sessions must be within 1..{MAX_SESSIONS} and rounds within 1..{MAX_ROUNDS}, got {sessions} and {rounds}"
        )
    runs = Path(runs).expanduser().resolve()
    if not runs.is_dir():
        raise WorkbenchError(f"the runs folder {runs} is not a folder: pass --runs DIR, or leave it out to build one")
    chromium = chromium or find_chromium()
    query = f"?run={urllib.request.quote(run)}" if run else ""
    with tempfile.TemporaryDirectory(prefix="load-benchmark-") as tmp:
        log = log or Path(tmp) / "server.log"
        load_before = os.getloadavg()[0]
        start = time.monotonic()
        with served(runs, Path(saes).expanduser().resolve(), log) as (base, proc):
            listening = listening_addresses(proc.pid)
            server = psutil.Process(proc.pid)
            cpu_before = sum(server.cpu_times()[:2])
            with RssSampler(proc.pid) as rss:
                visits, pages, complete = asyncio.run(
                    _drive(chromium, base + "/" + query, sessions, rounds, start + time_limit_s, page_timeout_s)
                )
            cpu = sum(server.cpu_times()[:2]) - cpu_before
        wall = time.monotonic() - start
    return LoadResult(
        sessions,
        rounds,
        pages,
        sorted(visits, key=lambda v: (v.session, v.round)),
        rss.samples,
        round(wall, 2),
        complete,
        listening,
        round(cpu, 2),
        (load_before, os.getloadavg()[0]),
    )


def report(result: LoadResult) -> str:
    """The figures as a plain-text table."""
    lines = [
        f"{result.sessions} sessions x {result.rounds} rounds, {result.wall_s:.1f} s wall, server CPU "
        f"{result.server_cpu_s:.1f} s, listening on {', '.join(result.listening)}"
        + (
            f", load average {result.load_average[0]:.1f} -> {result.load_average[1]:.1f} on {os.cpu_count()} CPUs"
            if result.load_average
            else ""
        )
        + ("" if result.complete else "  (INCOMPLETE: a page timed out or the time limit was reached)"),
        "",
        f"{'page':<14} {'count':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}",
    ]
    for row in result.rows():
        cells = [f"{row[k]:8.0f}" if row[k] is not None else f"{'-':>8}" for k in ("p50", "p95", "max")]
        lines.append(f"{row['page']:<14} {row['count']:>5} {' '.join(cells)}")
    mem = result.memory()
    lines += [
        "",
        "server RSS (MiB): " + ", ".join(f"{k} {v:.0f}" if v is not None else f"{k} -" for k, v in mem.items()),
    ]
    problems = result.problems()
    lines.append(f"problems on pages: {len(problems)}")
    lines += [f"  {p}" for p in problems[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.load_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, help="runs folder to serve (default: build a small zoo-2l one)")
    parser.add_argument("--saes", type=Path, help="SAE folder (default: saes/ beside the built runs, else ./saes)")
    parser.add_argument("--run", help="run to open (default: zoo for the built folder, else the explorer's first)")
    parser.add_argument("--sessions", type=int, default=5, help=f"concurrent browser sessions (1..{MAX_SESSIONS})")
    parser.add_argument("--rounds", type=int, default=3, help=f"times each session visits every page (1..{MAX_ROUNDS})")
    parser.add_argument(
        "--page-timeout", type=float, default=120, help="seconds a page may take (then its session stops)"
    )
    parser.add_argument("--time-limit", type=float, default=600, help="seconds after which no new click starts")
    parser.add_argument("--chromium", help="Chromium executable (default: chromium on the PATH)")
    parser.add_argument("--json", type=Path, help="also write the figures and every visit as JSON here")
    args = parser.parse_args(argv)
    try:
        chromium = args.chromium or find_chromium()
        with tempfile.TemporaryDirectory(prefix="load-benchmark-runs-") as tmp:
            runs, saes, run = args.runs, args.saes, args.run
            if runs is None:
                print(f"building a small zoo-2l run in {tmp} ...", file=sys.stderr, flush=True)
                with contextlib.redirect_stdout(sys.stderr):  # the commands' own output is not the figures
                    runs, built_saes, built_run = build_runs(Path(tmp))
                saes, run = saes or built_saes, run or built_run
            result = run_benchmark(
                runs,
                saes or Path("saes"),
                args.sessions,
                args.rounds,
                run,
                chromium,
                args.page_timeout,
                args.time_limit,
            )
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
        print(f"figures in {args.json}")
    return 0 if result.complete and not result.problems() else 1


if __name__ == "__main__":
    sys.exit(main())
