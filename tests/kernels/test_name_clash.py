"""The warning for Hugging Face's `kernels` installed beside this project (README, "Known clash")."""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError

import pytest

from kernels import name_clash


def test_this_environment_has_no_hub_kernels():
    """transformers >= 5.25 pulls Hugging Face's `kernels` in; pyproject keeps it out."""
    assert name_clash.hub_kernels_version() is None


def test_hub_kernels_installed_warns_with_the_fix(monkeypatch):
    monkeypatch.setattr(name_clash, "version", lambda name: "0.19.1" if name == "kernels" else "0")
    with pytest.warns(name_clash.KernelsNameClashWarning, match=r"`kernels` 0\.19\.1.*pip uninstall kernels"):
        name_clash.warn_if_hub_kernels()


def test_no_hub_kernels_no_warning(monkeypatch):
    def absent(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(name_clash, "version", absent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        name_clash.warn_if_hub_kernels()
