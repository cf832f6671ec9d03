"""Test set-up: Triton runs through its CPU interpreter unless a GPU is present.

``TRITON_INTERPRET`` must be set before triton is imported, so it is set here, first.
Random configurations come from one seed, printed in the pytest header: fixed by default, so
that ``make test`` gives the same verdict on every machine, and fresh in ``make fuzz``, which sets
``WORKBENCH_TEST_SEED`` (that variable also replays any run). The seed is read from the
environment, never drawn here: every pytest-xdist worker imports this file and must agree.
"""

import contextlib
import functools
import os
import random
import re
import zlib
from pathlib import Path

import pytest

# pytest-xdist workers share the machine's cores: each gets its share of them for torch's intra-op
# threads (set before torch is imported; inherited by the processes tests start). With a worker
# per core, every worker's default thread pool would take every core: on a 2-core CI machine 4
# threads on 2 cores, where the pools' barriers on the many small ops of small models made
# decoding and small forwards many times slower. An explicit OMP_NUM_THREADS wins.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _XDIST_WORKERS:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // _XDIST_WORKERS)))

try:  # GPU machines test the compiled kernels; everywhere else the interpreter runs them.
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
    if _XDIST_WORKERS and os.environ["OMP_NUM_THREADS"].isdigit():  # in case torch came in before
        _torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Rich sizes tables by COLUMNS when there is no terminal: one width for every machine and CI.
os.environ["COLUMNS"] = "120"

#: The seed of ``make test``; ``make fuzz`` draws another.
DEFAULT_SEED = 20261201
SEED = int(os.environ.get("WORKBENCH_TEST_SEED") or DEFAULT_SEED)


def pytest_report_header(config):
    return f"workbench test seed: {SEED} (replay with WORKBENCH_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seeded_generators(request):
    """Seed the global generators per test from ``SEED`` and the test's id, so that a test draws
    the same numbers whichever worker runs it and whatever ran before it."""
    import numpy as np
    import torch

    seed = zlib.crc32(f"{SEED}-{request.node.nodeid}".encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- pytest-xdist scheduling

#: Tests that take from 20 s to a minute on a CPU (node id prefixes): started before the others so
#: that pytest-xdist's workers do not end on one of them while the other worker idles.
SLOW_FIRST = (
    "tests/project/test_notebooks.py::test_notebook_runs",
    "tests/workbench/test_scores.py::test_ablating_the_top_retrieval_head_hurts_retrieval_most",
    "tests/workbench/test_scores.py::test_default_model_has_the_documented_heads",
    "tests/kernels/test_benchmark.py::test_smoke_run_checks_every_variant_and_prints_the_table",
)
_MODULE_FIXTURE = re.compile(r"fixture\(\s*scope\s*=\s*[\"']module[\"']")


def pytest_collection_modifyitems(config, items):
    """:data:`SLOW_FIRST` tests first, the rest as collected."""
    items.sort(key=lambda item: not item.nodeid.startswith(SLOW_FIRST))  # a stable sort


@functools.cache
def shares_module_fixtures(module: str) -> bool:
    """Whether the test module (a path from the repository root) defines a module-scoped fixture:
    a scored run, a model, launched processes that its tests share."""
    try:
        return bool(_MODULE_FIXTURE.search((Path(__file__).parents[1] / module).read_text()))
    except OSError:
        return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n N`` (``--dist load``): the tests of a module with module-scoped fixtures go to one
    worker together, so that one worker builds each fixture once (under plain ``load`` both
    workers build it); every other test is scheduled alone. Groups first (largest first), then
    single tests in collection order (pytest-xdist's LoadScopeScheduling). Other ``--dist``
    modes are left as they are."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if shares_module_fixtures(module) else nodeid

    return ModuleFixtureScheduling(config, log)


# ----------------------------------------------------------------------------- PNG export

#: plotly's ``write_images`` as the session found it (set by :func:`_png_export_off`).
_WRITE_IMAGES: list = []


def _png_switched_off(*args, **kwargs):
    raise RuntimeError("PNG export switched off in the tests (tests.conftest.png_export turns it on)")


@pytest.fixture(scope="session", autouse=True)
def _png_export_off():
    """PNG export (``workbench.plots.save_figures``) starts a Chromium per run folder, seconds
    each: off for the session, as on a machine without one (the HTML figures are still written,
    and the run's ``figure_warnings`` say why the PNGs are missing). :func:`png_export` turns it
    back on where a test checks the PNGs. Processes the tests start keep it."""
    try:
        import plotly.io as pio
    except ImportError:  # a kernels-only environment (a GPU machine without the app): no figures
        yield
        return
    _WRITE_IMAGES.append(pio.write_images)
    pio.write_images = _png_switched_off
    yield
    pio.write_images = _WRITE_IMAGES.pop()


@contextlib.contextmanager
def png_export():
    """Within the block, PNG export works as outside the tests (when a Chromium is there)."""
    import plotly.io as pio

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pio, "write_images", _WRITE_IMAGES[-1] if _WRITE_IMAGES else pio.write_images)
        yield


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def zoo():
    """The default zoo model (zoo-2l) on the CPU, one per test module. Tests may hook or ablate it
    inside a ``with`` block, and must leave it as they found it."""
    from workbench.models import load_model

    return load_model("zoo-2l", device="cpu")


@pytest.fixture
def device() -> str:
    """Where kernel tests run: CUDA when present, else the CPU (Triton interpreter)."""
    return "cuda" if _HAS_CUDA else "cpu"


# ----------------------------------------------------------------------------- the explorer's fixture


class ExplorerFolders:
    """Folders the explorer tests serve: ``runs/`` with a scored zoo-2l run holding an ablation
    (``runs/zoo``) and a second run to compare with (``runs/repeats``), and ``saes/`` with one
    SAE saved by ``workbench sae train``."""

    def __init__(self, root):
        self.root = root
        self.runs = root / "runs"
        self.saes = root / "saes"
        self.run = self.runs / "zoo"
        self.other = self.runs / "repeats"
        self.sae = self.saes / "zoo-2l-L1-topk"


def _build_explorer_folders(folders: ExplorerFolders) -> None:
    """Score, ablate and train for real (zoo-2l on the CPU, small settings, about 15 s), as the
    explorer's load benchmark builds its folder: one builder for both."""
    from app.load_benchmark import build_runs

    build_runs(folders.root)


@pytest.fixture(scope="session")
def explorer_folders(tmp_path_factory, worker_id) -> ExplorerFolders:
    """Built once per test session, shared by the xdist workers (a file lock guards the build)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    folders = ExplorerFolders(shared / "explorer")
    with FileLock(str(shared / "explorer.lock")):
        if not (folders.root / "done").exists():
            _build_explorer_folders(folders)
            (folders.root / "done").write_text("ok")
    return folders
