"""Kernel-test fixtures: the cpu backend's cases run on the CPU wherever CUDA is present."""

import pytest


@pytest.fixture
def device(device, request) -> str:
    """The conftest's device, but the CPU for tests parametrized with ``backend="cpu"`` (it takes
    CPU tensors only)."""
    callspec = getattr(request.node, "callspec", None)
    return "cpu" if callspec is not None and callspec.params.get("backend") == "cpu" else device
