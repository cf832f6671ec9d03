"""Test set-up: Triton runs through its CPU interpreter unless a GPU is present.

``TRITON_INTERPRET`` must be set before triton is imported, so it is set here, first.
Random configurations come from one seed, printed in the pytest header: fixed by default, so
that ``make test`` gives the same verdict on every machine, and fresh in ``make fuzz``, which sets
``WORKBENCH_TEST_SEED`` (that variable also replays any run). The seed is read from the
environment, never drawn here: every pytest-xdist worker imports this file and must agree.
"""

import os
import random
import zlib

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
