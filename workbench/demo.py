"""Kernel demo: four synthetic heads with planted roles, read back from the statistics.

Until the model zoo lands this is the workbench's main job: it shows that the O(N) statistics
of :func:`kernels.attention` tell a sink head, a previous-token head, a local head and a
diffuse head apart, at a length where the full pattern would be large.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kernels import AttentionStats, StatsSpec, attention

HEAD_ROLES = ("sink", "previous-token", "local", "diffuse")
DEMO_STATS = StatsSpec.all(sink_tokens=1, window=16, offsets=(1,))


@dataclass
class DemoResult:
    """Per-head summaries (means over query rows) and what the run cost."""

    n_tokens: int
    backend: str
    seconds: float
    stats: AttentionStats
    summary: dict[str, list[float]]  # statistic -> one value per head


def planted_heads(n: int, d: int = 64, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """q, k, v ``[1, 4, n, d]`` whose heads are, in order, those of :data:`HEAD_ROLES`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, n, d, generator=g) * 0.3
    k = torch.randn(1, 4, n, d, generator=g) * 0.3
    v = torch.randn(1, 4, n, d, generator=g)
    # sink: key 0 and every query share a strong direction
    k[0, 0, 0, 0] = 10.0
    q[0, 0, :, 0] = 10.0
    # previous token: each query copies (scaled) the key one position back
    k[0, 1] = torch.randn(n, d, generator=g)
    q[0, 1, 1:] = k[0, 1, :-1] * 1.5
    # local: sinusoidal position features, so q_i . k_j peaks at j = i and decays with |i - j|
    pos = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    freqs = 1.0 / (4.0 * 2.0 ** torch.arange(d // 2, dtype=torch.float32) / 4)
    feats = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], dim=1)
    q[0, 2] = feats * 3.0
    k[0, 2] = feats * 3.0
    # diffuse: queries near zero, so attention spreads over all earlier keys
    q[0, 3] *= 0.01
    return q.to(device), k.to(device), v.to(device)


def run_demo(n: int = 4096, device: str | None = None, backend: str = "auto") -> DemoResult:
    """Attention with every statistic over the planted heads; summaries per head."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v = planted_heads(n, device=device)
    start = time.perf_counter()
    _, st = attention(q, k, v, causal=True, stats=DEMO_STATS, backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    used = backend if backend != "auto" else ("triton" if q.is_cuda else "cpu")
    summary = {
        "entropy (nats)": st.entropy[0].mean(-1).tolist(),
        "max prob": st.max_prob[0].mean(-1).tolist(),
        "sink mass": st.sink_mass[0].mean(-1).tolist(),
        "previous-token mass": st.offset_mass[0, :, :, 0].mean(-1).tolist(),
        "local mass (16)": st.local_mass[0].mean(-1).tolist(),
        "mean distance": st.distance[0].mean(-1).tolist(),
    }
    return DemoResult(n, used, seconds, st, summary)


def pattern_bytes(n_tokens: int, heads: int = 4) -> int:
    """Bytes of the float32 ``[heads, n, n]`` pattern that eager attention would materialise."""
    return heads * n_tokens * n_tokens * 4


def uniform_entropy(n_tokens: int) -> float:
    """Mean entropy of causal uniform rows (row i spreads over i + 1 keys), for comparison."""
    return sum(math.log(i + 1) for i in range(n_tokens)) / n_tokens
