"""Streaming reduction: statistics averaged per head and position bucket as batches arrive,
so memory stays fixed however many samples are recorded."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from kernels import AttentionStats, StatsSpec
from workbench.errors import WorkbenchError


@dataclass
class StreamingSummary:
    """Means of every statistic per ``(layer, head, position bucket)``.

    Takes the place of a :class:`~workbench.recording.Recording` (same ``add``), but keeps only
    float64 sums and counts: ``[head, bucket]`` per statistic and layer. Position ``p`` falls in
    bucket ``p // bucket_size``; ``key_mass`` is bucketed by key position. Rows (and, in a
    prefill, keys) outside the mask set with :meth:`set_row_mask` (padding) are left out.
    ``statistics``, when given, names the only statistics kept.
    """

    spec: StatsSpec
    n_layers: int
    bucket_size: int = 64
    model_name: str = ""
    statistics: tuple[str, ...] | None = None
    sums: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    rows_seen: int = 0
    _row_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bucket_size < 1:
            raise WorkbenchError(f"bucket_size must be >= 1, got {self.bucket_size}")

    def set_row_mask(self, mask: torch.Tensor | None) -> None:
        """``[batch, tokens]`` True for real tokens of the next forward call (None: all)."""
        self._row_mask = mask

    def add(self, layer: int, stats: AttentionStats) -> None:
        b, h, n = stats.lse.shape
        mask = self._row_mask
        if mask is None or mask.shape != (b, n):
            mask = torch.ones(b, n, dtype=torch.bool)
        mask = mask.to(stats.lse.device)
        if layer == 0:
            self.rows_seen += int(mask.sum())
        for name, t in stats.items():
            if self.statistics is not None and name not in self.statistics:
                continue
            if name == "key_mass":  # keys are the query positions in a prefill; else all count
                keys = mask if t.shape[-1] == n else torch.ones(b, t.shape[-1], dtype=torch.bool, device=t.device)
                self._accumulate(layer, name, t, keys)
            elif name == "offset_mass":
                for j, o in enumerate(self.spec.offsets):
                    self._accumulate(layer, f"offset_mass[{o}]", t[..., j], mask)
            else:
                self._accumulate(layer, name, t, mask)

    def _accumulate(self, layer: int, name: str, t: torch.Tensor, mask: torch.Tensor) -> None:
        n = t.shape[-1]
        buckets = torch.arange(n, device=t.device) // self.bucket_size
        n_buckets = int(buckets[-1]) + 1 if n else 0
        w = mask.to(torch.float64)  # [B, N]
        s = torch.zeros(t.shape[1], n_buckets, dtype=torch.float64, device=t.device)
        s.index_add_(1, buckets, (t.double() * w[:, None, :]).sum(0))
        c = torch.zeros(n_buckets, dtype=torch.float64, device=t.device).index_add_(0, buckets, w.sum(0))
        key = (layer, name)
        old_s, old_c = self.sums.get(key), self.counts.get(key)
        if old_s is not None and old_s.shape[1] < n_buckets:  # longer inputs than before: grow
            old_s = torch.nn.functional.pad(old_s, (0, n_buckets - old_s.shape[1]))
            old_c = torch.nn.functional.pad(old_c, (0, n_buckets - old_c.shape[0]))
        if old_s is not None and old_s.shape[1] > n_buckets:
            s = torch.nn.functional.pad(s, (0, old_s.shape[1] - n_buckets))
            c = torch.nn.functional.pad(c, (0, old_c.shape[0] - n_buckets))
        self.sums[key] = s if old_s is None else old_s + s
        self.counts[key] = c if old_c is None else old_c + c

    def mean(self, layer: int, name: str) -> torch.Tensor:
        """``[head, bucket]`` mean of one statistic (NaN where a bucket saw no rows)."""
        if (layer, name) not in self.sums:
            names = sorted({k[1] for k in self.sums})
            raise WorkbenchError(f"no {name!r} for layer {layer}; recorded statistics: {names}")
        return self.sums[(layer, name)] / self.counts[(layer, name)]

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: ``layer, head, bucket_start, statistic, mean, rows``."""
        frames = []
        for (layer, name), s in sorted(self.sums.items()):
            c = self.counts[(layer, name)]
            h, nb = s.shape
            heads = torch.arange(h).repeat_interleave(nb)
            starts = torch.arange(nb).repeat(h) * self.bucket_size
            frames.append(pd.DataFrame({
                "layer": layer, "head": heads.numpy(), "bucket_start": starts.numpy(), "statistic": name,
                "mean": (s / c).reshape(-1).cpu().numpy(), "rows": c.repeat(h).cpu().numpy(),
            }))
        columns = ["layer", "head", "bucket_start", "statistic", "mean", "rows"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
