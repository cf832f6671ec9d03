"""Correctness checks of a variant's result: its output against SDPA, its statistics against the reference backend."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kernels import AttentionStats
from kernels.benchmark.config import ARGMAX_TOL, KEY_MASS_SUM_TOL, STATS_TOL


@dataclass(frozen=True)
class CheckResult:
    """One correctness check of one variant: ``error`` must be finite and ``<= tol``."""

    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tol


Check = Callable[[Any], list[CheckResult]]


def relative_error(out: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 26) -> float:
    """``||out - ref|| / ||ref||`` in float32, in chunks (no full float32 copies)."""
    if out.shape != ref.shape:
        return math.inf
    num = den = 0.0
    for o, r in zip(out.reshape(-1).split(chunk), ref.reshape(-1).split(chunk)):
        r32 = r.float()
        num += float((o.float() - r32).square().sum())
        den += float(r32.square().sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def scaled_max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max(1, max |ref|)``, in float64."""
    if got.shape != ref.shape:
        return math.inf
    g, r = got.double(), ref.double()
    return float((g - r).abs().max() / r.abs().max().clamp_min(1.0))


def stats_check(ref: AttentionStats | None) -> list[Check]:
    """Compare every statistic a result holds with the reference backend's."""
    if ref is None:
        return []

    def check(result: Any) -> list[CheckResult]:
        stats: AttentionStats = result[1]
        found = []
        for name, ref_t in ref.items():
            got = getattr(stats, name)
            if got is None:
                continue
            if name == "argmax":
                differ = float((got != ref_t).double().mean()) if got.shape == ref_t.shape else math.inf
                found.append(CheckResult(name, differ, ARGMAX_TOL))
            else:
                found.append(CheckResult(name, scaled_max_error(got, ref_t), STATS_TOL))
        return found

    return [check]


def key_mass_sum_check(n_q: int) -> list[Check]:
    """Each causal query row spreads a mass of one over its keys: sum(key_mass) = Nq."""

    def check(result: Any) -> list[CheckResult]:
        total = result[1].key_mass.double().sum(-1)
        return [CheckResult("key_mass_sum", float((total - n_q).abs().max()) / n_q, KEY_MASS_SUM_TOL)]

    return [check]


def eager_entropy_check(ref: AttentionStats | None) -> list[Check]:
    """The eager path's entropy (the second item of its result) against the reference's."""
    if ref is None or ref.entropy is None:
        return []
    return [lambda result: [CheckResult("entropy", scaled_max_error(result[1], ref.entropy), STATS_TOL)]]
