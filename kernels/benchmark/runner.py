"""The main loop: every row within the time budget, its inputs and reference, then the output (:func:`main`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from kernels import AttentionStats, attention
from kernels.benchmark.config import (
    KEY_STATS,
    OUT_TOL,
    STATS_CHECK_MAX_N,
    Config,
    Row,
    Shape,
    build_parser,
    resolve_config,
)
from kernels.benchmark.environment import metadata, print_header
from kernels.benchmark.measure import Measurement, attempt, make_timer, release_memory, run_variant
from kernels.benchmark.report import print_legend, progress_line, suite_tables, summarize_row, write_outputs
from kernels.benchmark.variants import Variant, build_variants


def make_inputs(cfg: Config, shape: Shape, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``(q, k, v)`` of one row from ``torch.randn``: ``[B, H, Nq, D]`` and ``[B, Hkv, N, D]``."""

    def randn(heads: int, n: int) -> torch.Tensor:
        return torch.randn(cfg.batch, heads, n, shape.d, generator=gen, device=cfg.device, dtype=cfg.dtype)

    return randn(cfg.heads, shape.n_q), randn(shape.kv_heads, shape.n), randn(shape.kv_heads, shape.n)


def reference_stats(cfg: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionStats | None:
    """Exact statistics of the row from the reference backend (small problems only)."""
    if q.shape[2] * k.shape[2] > STATS_CHECK_MAX_N**2:
        return None
    stats, failure = attempt(
        lambda: attention(q, k, v, causal=True, stats=KEY_STATS, backend="reference")[1], cfg.device
    )
    if failure:
        print(f"    reference statistics unavailable: {failure}", flush=True)
    return stats


def run_row(cfg: Config, shape: Shape, gen: torch.Generator) -> tuple[Row, list[Measurement]]:
    """Build the inputs and variants of one shape, measure each, summarise as a row."""
    q, k, v = make_inputs(cfg, shape, gen)
    ref = reference_stats(cfg, q, k, v)
    variants = build_variants(cfg, shape, q, k, v, ref)
    timer = make_timer(cfg, shape.n if shape.suite != "decode" else 1024)
    tol = OUT_TOL[cfg.dtype]
    ref_out: torch.Tensor | None = None
    measured: list[tuple[Variant, Measurement]] = []
    for variant in variants:
        m, out = run_variant(variant, ref_out, timer, cfg, tol)
        if variant.reference:
            ref_out = out
        print(progress_line(shape, m), flush=True)
        measured.append((variant, m))
    del q, k, v, ref, variants, ref_out
    release_memory(cfg.device)
    return summarize_row(cfg, shape, measured), [m for _, m in measured]


def predicted_seconds(history: dict[tuple, tuple[int, float]], shape: Shape) -> float | None:
    """Row duration scaled by N^2 from the previous row of this kind, once rows are long
    enough (from 32k on) for the quadratic work, not compilation or fixed windows, to dominate."""
    if shape.series not in history:
        return None
    prev_n, seconds = history[shape.series]
    if prev_n < 32768:
        return None
    power = 1 if shape.suite == "decode" else 2
    return seconds * (shape.n / prev_n) ** power


def run(cfg: Config, meta: dict[str, Any]) -> tuple[list[Row], list[dict[str, Any]]]:
    """Every row of :attr:`Config.shapes`; a time budget skips the rows that would end late."""
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed)
    rows: list[Row] = []
    details: list[dict[str, Any]] = []
    history: dict[tuple, tuple[int, float]] = {}
    start = time.perf_counter()
    try:
        for shape in cfg.shapes:
            elapsed = time.perf_counter() - start
            guess = predicted_seconds(history, shape)
            if cfg.time_budget_s > 0 and elapsed + (guess or 0.0) > cfg.time_budget_s:
                print(
                    f"  {shape.label()} skipped: {elapsed:.0f} s elapsed + {guess or 0.0:.0f} s "
                    f"predicted > --time-budget {cfg.time_budget_s:g}",
                    flush=True,
                )
                rows.append(
                    {
                        "suite": shape.suite,
                        "D": shape.d,
                        "Hkv": shape.kv_heads,
                        "Nq": shape.n_q,
                        "N": shape.n,
                        "check": "skipped (time budget)",
                        "_series": shape.series,
                    }
                )
                continue
            t0 = time.perf_counter()
            row, measured = run_row(cfg, shape, gen)
            seconds = time.perf_counter() - t0
            history[shape.series] = (shape.n, seconds)
            print(f"  {shape.label()} row took {seconds:.1f} s (total {time.perf_counter() - start:.0f} s)", flush=True)
            rows.append(row | {"_series": shape.series})
            details.append(
                {**dataclasses.asdict(shape), "seconds": seconds, "variants": [m.as_dict() for m in measured]}
            )
            if cfg.out is not None:
                write_outputs(cfg.out, ordered(rows, cfg), details, meta)
    except KeyboardInterrupt:
        print("  interrupted: the tables hold the rows finished so far", flush=True)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    return ordered(rows, cfg), details


def ordered(rows: list[Row], cfg: Config) -> list[Row]:
    """Rows grouped by series (suite, D, Hkv, Nq) in planned order, then by N."""
    first: dict[tuple, int] = {}
    for i, shape in enumerate(cfg.shapes):
        first.setdefault(shape.series, i)
    return [
        {k: v for k, v in row.items() if k != "_series"}
        for row in sorted(rows, key=lambda row: (first[row["_series"]], row["N"]))
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark of ``argv`` (the command line by default); 1 if a check failed.
    Bad arguments end in argparse's error (exit status 2) before any work."""
    parser = build_parser()
    cfg = resolve_config(parser.parse_args(argv), parser)
    meta = metadata(cfg)
    print_header(meta)
    with torch.no_grad():
        rows, details = run(cfg, meta)
    print(f"# done in {meta['seconds']:.1f} s")
    print_legend(cfg)
    if cfg.out is not None:
        csv_path, json_path = write_outputs(cfg.out, rows, details, meta)
        print(f"# wrote {csv_path} and {json_path}")
    print(suite_tables(rows), flush=True)
    return 1 if any(str(r.get("check", "")).startswith("FAIL") for r in rows) else 0
