"""Instrumented attention kernels: attention output plus per-row / per-key statistics.

Pure tensor operations; knows nothing of models. See :func:`attention`.
"""

from kernels.dispatch import BACKENDS, attention
from kernels.errors import AttentionInputError, KernelFallbackWarning
from kernels.reference import pattern_stats
from kernels.spec import AttentionStats, StatsSpec

__all__ = [
    "BACKENDS",
    "AttentionInputError",
    "AttentionStats",
    "KernelFallbackWarning",
    "StatsSpec",
    "attention",
    "pattern_stats",
]
