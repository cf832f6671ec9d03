"""Attention workbench: models, instrumentation, tasks, head scores, runs, plots and the CLI.

Builds on :mod:`kernels` (statistics-emitting attention).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attention-workbench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.instrument import DEFAULT_STATS, instrument, record  # noqa: E402
from workbench.models import load_model  # noqa: E402
from workbench.recording import PatternSpec, Recording  # noqa: E402

__all__ = [
    "DEFAULT_STATS",
    "PatternSpec",
    "Recording",
    "WorkbenchError",
    "__version__",
    "instrument",
    "load_model",
    "record",
]
