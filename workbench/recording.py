"""What instrumentation collects: :class:`Recording` (statistics per layer, per forward call),
:class:`StreamingSummary` (means per head and position bucket, fixed memory), and which explicit
patterns to produce (:class:`PatternSpec`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from kernels import AttentionStats, StatsSpec
from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class PatternSpec:
    """Which explicit attention patterns to produce (they cost O(N^2) memory per layer).

    Attributes:
        layers: layers whose ``hook_attn_scores`` / ``hook_pattern`` fire and are recorded.
        heads: heads kept in the recording (all heads when ``None``; hooks always see all).
        max_tokens: refuse patterns over more keys than this.
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...] | None = None
    max_tokens: int = 2048

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _indices("layers", self.layers))
        if self.heads is not None:
            object.__setattr__(self, "heads", _indices("heads", self.heads))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise WorkbenchError(f"PatternSpec.max_tokens must be an int >= 1, got {self.max_tokens!r}")


def _indices(name: str, values) -> tuple[int, ...]:
    """``values`` as a tuple of non-negative ints (layer or head indices)."""
    try:
        found = tuple(values)
    except TypeError:
        raise WorkbenchError(f"PatternSpec.{name} must be a sequence of indices, e.g. (0, 2), got {values!r}") from None
    bad = [v for v in found if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise WorkbenchError(f"PatternSpec.{name} must hold indices >= 0, got {bad}")
    return found


@dataclass
class Recording:
    """Attention statistics of every instrumented layer, one entry per forward call.

    ``layer(i)`` gives layer ``i``'s :class:`kernels.AttentionStats` with the calls joined along
    the batch axis: row statistics ``[batch, head, position]``, ``key_mass [batch, head, key]``,
    ``offset_mass [batch, head, position, offset]``.
    """

    spec: StatsSpec
    n_layers: int
    model_name: str = ""
    calls: dict[int, list[AttentionStats]] = field(default_factory=dict)
    patterns: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    tokens: list[torch.Tensor] = field(default_factory=list)  # [batch, tokens] ids per call (record())
    lengths: list[torch.Tensor] = field(default_factory=list)  # [batch] real tokens per sequence

    def add(self, layer: int, stats: AttentionStats) -> None:
        """Append one forward call's statistics of ``layer`` (called by the instrumentation)."""
        self.calls.setdefault(layer, []).append(stats)

    def add_pattern(self, layer: int, pattern: torch.Tensor) -> None:
        self.patterns.setdefault(layer, []).append(pattern)

    @property
    def layers(self) -> list[int]:
        """Layers that recorded at least one call, in order."""
        return sorted(self.calls)

    def layer(self, i: int) -> AttentionStats:
        """Layer ``i``'s statistics, calls concatenated along the batch axis."""
        if i not in self.calls:
            raise WorkbenchError(
                f"layer {i} recorded nothing; recorded layers: {self.layers or 'none (run the model first)'}"
            )
        parts = self.calls[i]
        if len(parts) == 1:
            return parts[0]
        shapes = {p.lse.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise WorkbenchError(
                f"layer {i} has calls of different shapes {sorted(shapes)}: read them one by one "
                "from rec.calls[layer], or record batches of equal length"
            )
        joined = {name: torch.cat([getattr(p, name) for p in parts], dim=0) for name, _ in parts[0].items()}
        return AttentionStats(**joined)

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: ``layer, batch, head, position, statistic, value`` (one row per value).

        ``key_mass`` rows index keys in ``position``; offset masses are named
        ``offset_mass[o]`` after their offset.
        """
        frames = []
        for i in self.layers:
            st = self.layer(i)
            for name, t in st.items():
                if name == "offset_mass":
                    for j, o in enumerate(self.spec.offsets):
                        frames.append(_tidy(i, f"offset_mass[{o}]", t[..., j]))
                else:
                    frames.append(_tidy(i, name, t))
        if not frames:
            return pd.DataFrame(columns=["layer", "batch", "head", "position", "statistic", "value"])
        return pd.concat(frames, ignore_index=True)

    def save(self, path: str | Path) -> None:
        """``path.safetensors`` (tensors) and ``path.json`` (spec, model, layout)."""
        path = Path(path)
        tensors, layout = {}, {}
        for i, parts in self.calls.items():
            layout[str(i)] = len(parts)
            for c, st in enumerate(parts):
                for name, t in st.items():
                    tensors[f"{i}.{c}.{name}"] = t.detach().contiguous().cpu()
        for i, parts in self.patterns.items():
            for c, t in enumerate(parts):
                tensors[f"{i}.{c}.pattern"] = t.detach().contiguous().cpu()
        for c, (ids, n) in enumerate(zip(self.tokens, self.lengths)):
            tensors[f"tokens.{c}"] = ids.contiguous()
            tensors[f"lengths.{c}"] = n.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path.with_suffix(".safetensors")))
        meta = {
            "spec": asdict(self.spec),
            "n_layers": self.n_layers,
            "model_name": self.model_name,
            "calls": layout,
            "patterns": {str(i): len(p) for i, p in self.patterns.items()},
            "token_batches": len(self.tokens),
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Recording:
        path = Path(path)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            tensors = load_file(str(path.with_suffix(".safetensors")))
        except (OSError, ValueError) as exc:
            raise WorkbenchError(f"cannot read recording {path}: {exc}") from exc
        spec = meta["spec"]
        spec["offsets"] = tuple(spec["offsets"])
        rec = cls(StatsSpec(**spec), meta["n_layers"], meta["model_name"])
        for i, n in meta["calls"].items():
            for c in range(n):
                prefix = f"{i}.{c}."
                fields = {
                    k[len(prefix) :]: v
                    for k, v in tensors.items()
                    if k.startswith(prefix) and not k.endswith("pattern")
                }
                rec.add(int(i), AttentionStats(**fields))
        for i, n in meta["patterns"].items():
            for c in range(n):
                rec.add_pattern(int(i), tensors[f"{i}.{c}.pattern"])
        for c in range(meta.get("token_batches", 0)):
            rec.tokens.append(tensors[f"tokens.{c}"])
            rec.lengths.append(tensors[f"lengths.{c}"])
        return rec


def join_positions(parts: list[AttentionStats]) -> AttentionStats:
    """One layer's calls over consecutive query positions of the same sequences (the chunks of
    a chunked prefill, in order) as one call: row statistics and ``offset_mass`` concatenated
    along the position axis; ``key_mass`` (chunk ``c`` covers keys ``[0, end_c)``) zero-padded
    to the longest and summed."""
    if not parts:
        raise WorkbenchError("join_positions needs at least one call")
    if len({p.lse.shape[:2] for p in parts}) > 1:
        raise WorkbenchError(
            f"calls joined along positions must share batch and heads, got {sorted({p.lse.shape[:2] for p in parts})}"
        )
    joined = {}
    for name, first in parts[0].items():
        if name == "key_mass":
            longest = max(p.key_mass.shape[-1] for p in parts)
            total = torch.zeros(*first.shape[:-1], longest, dtype=first.dtype, device=first.device)
            for p in parts:
                total[..., : p.key_mass.shape[-1]] += p.key_mass
            joined[name] = total
        else:
            joined[name] = torch.cat([getattr(p, name) for p in parts], dim=2)
    return AttentionStats(**joined)


def _tidy(layer: int, name: str, t: torch.Tensor) -> pd.DataFrame:
    b, h, n = t.shape
    idx = torch.cartesian_prod(torch.arange(b), torch.arange(h), torch.arange(n))
    return pd.DataFrame(
        {
            "layer": layer,
            "batch": idx[:, 0].numpy(),
            "head": idx[:, 1].numpy(),
            "position": idx[:, 2].numpy(),
            "statistic": name,
            "value": t.detach().reshape(-1).double().cpu().numpy(),
        }
    )


@dataclass
class StreamingSummary:
    """Means of every statistic per ``(layer, head, position bucket)``.

    Takes the place of a :class:`Recording` (same ``add``), but keeps only
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

    def add(self, layer: int, stats: AttentionStats, start: int = 0) -> None:
        """Add one call of ``layer``. ``start``: the position of the call's first query, for
        the chunks of a chunked prefill after the first (see :class:`workbench.chunked.ChunkPositions`);
        the row mask then covers the whole sequence, ``[batch, start + queries]``."""
        b, h, n = stats.lse.shape
        mask = self._row_mask
        if mask is None or mask.shape != (b, start + n):
            mask = torch.ones(b, start + n, dtype=torch.bool)
        mask = mask[:, start:].to(stats.lse.device)
        if layer == 0:
            self.rows_seen += int(mask.sum())
        for name, t in stats.items():
            if self.statistics is not None and name not in self.statistics:
                continue
            if name == "key_mass" and start > 0:
                # A chunk's queries add mass to every key so far, but each key is counted once:
                # by the chunk whose queries it is.
                ones = torch.ones(b, t.shape[-1], dtype=torch.bool, device=t.device)
                self._accumulate(layer, name, t, ones, counted=torch.arange(t.shape[-1], device=t.device) >= start)
            elif name == "key_mass":  # keys are the query positions in a prefill; else all count
                keys = mask if t.shape[-1] == n else torch.ones(b, t.shape[-1], dtype=torch.bool, device=t.device)
                self._accumulate(layer, name, t, keys)
            elif name == "offset_mass":
                for j, o in enumerate(self.spec.offsets):
                    self._accumulate(layer, f"offset_mass[{o}]", t[..., j], mask, first=start)
            else:
                self._accumulate(layer, name, t, mask, first=start)

    def _accumulate(
        self,
        layer: int,
        name: str,
        t: torch.Tensor,
        mask: torch.Tensor,
        first: int = 0,
        counted: torch.Tensor | None = None,
    ) -> None:
        """Add ``t [B, H, N]`` (positions ``first ..``) under ``mask [B, N]``; ``counted [N]``
        limits which positions add to the counts (all when None)."""
        n = t.shape[-1]
        buckets = (torch.arange(n, device=t.device) + first) // self.bucket_size
        n_buckets = int(buckets[-1]) + 1 if n else 0
        w = mask.to(torch.float64)  # [B, N]
        s = torch.zeros(t.shape[1], n_buckets, dtype=torch.float64, device=t.device)
        s.index_add_(1, buckets, (t.double() * w[:, None, :]).sum(0))
        rows = w.sum(0) if counted is None else w.sum(0) * counted
        c = torch.zeros(n_buckets, dtype=torch.float64, device=t.device).index_add_(0, buckets, rows)
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
            frames.append(
                pd.DataFrame(
                    {
                        "layer": layer,
                        "head": heads.numpy(),
                        "bucket_start": starts.numpy(),
                        "statistic": name,
                        "mean": (s / c).reshape(-1).cpu().numpy(),
                        "rows": c.repeat(h).cpu().numpy(),
                    }
                )
            )
        columns = ["layer", "head", "bucket_start", "statistic", "mean", "rows"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
