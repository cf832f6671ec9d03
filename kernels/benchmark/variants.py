"""The ways of computing one row's attention (:class:`Variant`): SDPA, the kernel with and without statistics, eager."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from kernels import AttentionStats, attention
from kernels.benchmark.checks import Check, eager_entropy_check, key_mass_sum_check, stats_check
from kernels.benchmark.config import BREAKDOWN, GIB, KEY_MASS_LAST, KEY_STATS, ROW_STATS, Config, Shape
from kernels.benchmark.environment import device_memory_bytes


def _first(result: Any) -> torch.Tensor:
    """The attention output of a variant's result: the tensor itself or its first item."""
    return result[0] if isinstance(result, tuple) else result


@dataclass
class Variant:
    """One named way of computing attention on the row's inputs.

    Attributes:
        name: column prefix (``<name>_ms``).
        fn: zero-argument callable doing the whole computation (what gets timed).
        output: picks the ``[B, H, N, D]`` output from ``fn()``'s result.
        checks: extra checks on ``fn()``'s result (beyond the output against the reference).
        reference: this variant's output is the reference of the others (one per row).
        skip: if set, the variant does not run and this text fills its cells.
        track_memory: report the peak memory of one call (``<name>_peak_gib``).
        kernel_time: also report the GPU time of the call's kernels alone, without the host
            time between them (``<name>_gpu_ms``, from the PyTorch profiler; CUDA only).
        ratio: report the ``<name>/<reference>`` throughput ratio.
        tflops: report ``<name>_TFLOP/s``.
    """

    name: str
    fn: Callable[[], Any]
    output: Callable[[Any], torch.Tensor] = _first
    checks: Sequence[Check] = ()
    reference: bool = False
    skip: str | None = None
    track_memory: bool = False
    kernel_time: bool = False
    ratio: bool = True
    tflops: bool = False


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise the pattern as TransformerLens does; returns ``(out, entropy)``.

    ``keep`` is the ``[N, N]`` boolean causal mask (True = attend), built once like the
    model's mask buffer.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if q.dtype not in (torch.float32, torch.float64):
        q, k = q.float(), k.float()
    scores = q @ k.transpose(-1, -2) * scale
    scores = torch.where(keep, scores, float("-inf"))
    pattern = torch.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    entropy = -torch.special.xlogy(pattern, pattern).sum(-1)
    out = pattern.to(v.dtype) @ v
    return out, entropy


def eager_variant(
    cfg: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: AttentionStats | None
) -> Variant:
    """The eager pattern path, or its skip when the float32 ``[B, H, N, N]`` scores alone
    would not fit in the device's memory."""
    b, h, n, d = q.shape
    matrix_gib = b * h * n * n * 4 / GIB
    total = device_memory_bytes(cfg.device)
    common = dict(track_memory=True, ratio=False, checks=eager_entropy_check(ref))
    if total is not None and matrix_gib * GIB > total:
        size = f"{matrix_gib:.0f}" if matrix_gib >= 10 else f"{matrix_gib:.2g}"
        return Variant("eager", lambda: None, skip=f"OOM (est. {size} GiB)", **common)
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scale = 1.0 / math.sqrt(d)
    return Variant("eager", lambda: eager_attention(q, k, v, keep, scale), **common)


def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """PyTorch SDPA on the row's problem: causal, bottom-right aligned when ``Nq < Nk``."""
    kwargs: dict[str, Any] = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q == n_k:
        kwargs["is_causal"] = True
    elif n_q > 1:  # a single query sees every key: no mask at all
        from torch.nn.attention.bias import causal_lower_right

        kwargs["attn_mask"] = causal_lower_right(n_q, n_k)
    return lambda: F.scaled_dot_product_attention(q, k, v, **kwargs)


def build_variants(
    cfg: Config, shape: Shape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: AttentionStats | None
) -> list[Variant]:
    """The variants of one row; the first is the reference."""
    backend = cfg.kernel_backend
    variants = [
        Variant("sdpa", sdpa_call(q, k, v), reference=True, ratio=False, tflops=True),
        Variant("plain", lambda: attention(q, k, v, causal=True, stats=None, backend=backend), tflops=True),
    ]
    if shape.suite == "decode":
        variants.append(unsplit_variant(backend, q, k, v))
        for variant in variants:
            variant.kernel_time = True
    rowstats = Variant(
        "rowstats",
        lambda: attention(q, k, v, causal=True, stats=ROW_STATS, backend=backend),
        checks=stats_check(ref),
        tflops=True,
    )
    variants += [
        rowstats,
        Variant(
            "keymass",
            lambda: attention(q, k, v, causal=True, stats=KEY_STATS, backend=backend),
            checks=stats_check(ref) + key_mass_sum_check(q.shape[2]),
        ),
    ]
    if shape.suite != "decode":  # decoding rows are fewer than the window: the same as keymass
        last = replace(KEY_STATS, key_mass_queries=KEY_MASS_LAST)
        variants.append(
            Variant(
                "keymass_last",
                lambda: attention(q, k, v, causal=True, stats=last, backend=backend),
                checks=key_mass_sum_check(min(KEY_MASS_LAST, q.shape[2])),
            )
        )
    if shape.suite == "decode":
        variants.append(graphed_variant(cfg, rowstats, ref))
    if cfg.breakdown and shape.suite == "mha":
        for name, spec in BREAKDOWN.items():
            variants.append(
                Variant(name, lambda spec=spec: attention(q, k, v, causal=True, stats=spec, backend=backend))
            )
    if cfg.eager and shape.suite == "mha":
        variants.append(eager_variant(cfg, q, k, v, ref))
    return variants


def unsplit_variant(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Variant:
    """The Triton kernel on a decoding shape with the keys not split across programs."""
    if backend != "triton":
        return Variant("unsplit", lambda: None, skip="n/a (no Triton)")
    from kernels.triton_attention import triton_attention
    from kernels.validate import check_inputs

    p = check_inputs(q, k, v, causal=True, scale=None, stats=None, key_lengths=None, query_lengths=None)
    return Variant("unsplit", lambda: triton_attention(q, k, v, p, None, max_splits=1), tflops=True, kernel_time=True)


def graphed_variant(cfg: Config, eager: Variant, ref: AttentionStats | None) -> Variant:
    """``eager`` replayed from a CUDA graph, captured at the first call (after one eager
    call, which autotunes and compiles outside the capture)."""
    if cfg.device.type != "cuda" or cfg.kernel_backend != "triton":
        return Variant("graphed", lambda: None, skip="n/a (CUDA only)")
    captured: dict[str, Any] = {}

    def replay() -> Any:
        if not captured:
            eager.fn()
            torch.cuda.synchronize(cfg.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured["result"] = eager.fn()
            captured["graph"] = graph
        captured["graph"].replay()
        return captured["result"]

    return Variant("graphed", replay, checks=stats_check(ref), tflops=True)
