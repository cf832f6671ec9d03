"""Instrumented attention kernels: attention output plus per-row / per-key statistics.

Pure tensor operations; knows nothing of models. See :func:`attention`.
"""

from kernels.context_parallel import context_parallel_attention, shard_indices, shard_ranges
from kernels.dispatch import BACKENDS, attention
from kernels.errors import AttentionInputError, KernelFallbackWarning
from kernels.merge import merge_attention, part_spec
from kernels.reference import pattern_stats
from kernels.spec import AttentionStats, StatsSpec

__all__ = [
    "BACKENDS",
    "AttentionInputError",
    "AttentionStats",
    "KernelFallbackWarning",
    "StatsSpec",
    "attention",
    "context_parallel_attention",
    "merge_attention",
    "part_spec",
    "pattern_stats",
    "shard_indices",
    "shard_ranges",
]
