"""Instrumented attention kernels: attention output plus per-row / per-key statistics.

Pure tensor operations; knows nothing of models. See :func:`attention`.
"""

from kernels.context_parallel import (
    context_parallel_attention,
    context_parallel_decode,
    shard_indices,
    shard_ranges,
)
from kernels.dispatch import BACKENDS, attention
from kernels.errors import AttentionInputError, KernelFallbackWarning
from kernels.merge import attend_part, merge_attention, part_spec
from kernels.name_clash import warn_if_hub_kernels
from kernels.reference import pattern_stats
from kernels.spec import AttentionStats, StatsSpec

warn_if_hub_kernels()  # also when transformers imports this package as its own, before it fails

__all__ = [
    "BACKENDS",
    "AttentionInputError",
    "AttentionStats",
    "KernelFallbackWarning",
    "StatsSpec",
    "attend_part",
    "attention",
    "context_parallel_attention",
    "context_parallel_decode",
    "merge_attention",
    "part_spec",
    "pattern_stats",
    "shard_indices",
    "shard_ranges",
]
