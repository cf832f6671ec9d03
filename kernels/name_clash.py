"""Hugging Face's hub-kernels distribution is also imported as ``kernels`` (README, "Known
clash"). Installed beside this project, transformers finds its version, imports this package in
its place and fails with an ImportError that does not say why; this says why, once, at import."""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version


class KernelsNameClashWarning(UserWarning):
    """Hugging Face's ``kernels`` distribution is installed beside this project."""


def hub_kernels_version() -> str | None:
    """The installed version of the distribution named ``kernels`` (Hugging Face's: this
    project's distribution is ``attention-workbench``), or None."""
    try:
        return version("kernels")
    except PackageNotFoundError:
        return None


def warn_if_hub_kernels() -> None:
    """Warn, saying what to do, when Hugging Face's ``kernels`` is installed."""
    found = hub_kernels_version()
    if found is not None:
        warnings.warn(
            f"Hugging Face's `kernels` {found} is installed beside attention-workbench, whose package "
            "has the same import name: transformers may import this one in its place and fail. "
            "Run `pip uninstall kernels` and keep transformers < 5.25 (which requires it); see the "
            "README's 'Known clash'.",
            KernelsNameClashWarning,
            stacklevel=2,
        )
