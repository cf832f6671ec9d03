"""Where a number came from: the source revision and package versions, recorded in benchmark
reports and run manifests alike."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: Distributions whose versions decide the numbers.
DISTRIBUTIONS = ("attention-workbench", "torch", "triton", "transformers", "transformer-lens")


def git_revision() -> str | None:
    """The source checkout's commit (``+dirty`` with uncommitted changes); None when the
    package is installed outside a checkout or git is missing."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    return revision and revision + ("+dirty" if git("status", "--porcelain") else "")


def versions(distributions: tuple[str, ...] = DISTRIBUTIONS) -> dict[str, str | None]:
    """``{"python": ..., distribution: version or None}``."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in distributions:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    return found
