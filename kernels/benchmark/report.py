"""From measurements to rows and on to output: progress lines, table columns, the printed tables, CSV and JSON."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kernels.benchmark.config import OUT_TOL, STATS_CHECK_MAX_N, SUITES, Config, Row, Shape
from kernels.benchmark.measure import Measurement
from kernels.benchmark.variants import Variant


def rate(cfg: Config, shape: Shape, ms: float) -> tuple[str, float]:
    """``("TFLOP/s", x)``: causal FLOPs (4 D per visible query-key pair and head) per second;
    for decoding ``("GB/s", x)``: bytes of K and V read per second (decoding is memory-bound)."""
    if shape.suite == "decode":
        size = torch.tensor([], dtype=cfg.dtype).element_size()
        return "GB/s", 2 * cfg.batch * shape.kv_heads * shape.n * shape.d * size / (ms * 1e-3) / 1e9
    pairs = shape.n_q * shape.n - shape.n_q * (shape.n_q - 1) / 2
    return "TFLOP/s", 4 * cfg.batch * cfg.heads * pairs * shape.d / (ms * 1e-3) / 1e12


def progress_line(shape: Shape, m: Measurement) -> str:
    ms = f"{m.ms:10.4f} ms" if m.ms is not None else f"{'-':>10}   "
    parts = [f"  {shape.label()} {m.name:<9s}{ms}  {m.status}"]
    if m.peak_gib is not None:
        parts.append(f"peak {m.peak_gib:.2f} GiB")
    if m.gpu_ms is not None:
        parts.append(f"kernels alone {m.gpu_ms:.4f} ms")
    parts += [f"{c.name} {c.error:.1e}{'' if c.ok else ' FAIL'}" for c in m.checks]
    return " | ".join(parts)


def summarize_row(cfg: Config, shape: Shape, measured: list[tuple[Variant, Measurement]]) -> Row:
    """Table columns of one row: times, peak memory, ratios, TFLOP/s, error, check."""
    row: Row = {"suite": shape.suite, "D": shape.d, "Hkv": shape.kv_heads, "Nq": shape.n_q, "N": shape.n}
    for variant, m in measured:
        row[f"{variant.name}_ms"] = m.ms if m.status == "ok" else m.status
        if variant.track_memory:
            row[f"{variant.name}_peak_gib"] = m.peak_gib
    for variant, m in measured:
        if variant.kernel_time and cfg.device.type == "cuda":
            row[f"{variant.name}_gpu_ms"] = m.gpu_ms
    ref = next(((var, m) for var, m in measured if var.reference), None)
    ref_ms = ref[1].ms if ref and ref[1].status == "ok" else None
    for variant, m in measured:
        if variant.ratio and ref is not None:
            ok = ref_ms and m.ms and m.status == "ok"
            row[f"{variant.name}/{ref[0].name}"] = ref_ms / m.ms if ok else None
    for variant, m in measured:
        if variant.tflops:
            unit, _ = rate(cfg, shape, 1.0)
            row[f"{variant.name}_{unit}"] = rate(cfg, shape, m.ms)[1] if m.ms and m.status == "ok" else None
    errors = [m.out_error for _, m in measured if m.out_error is not None]
    row["max_err"] = max(errors) if errors else None
    failed = [f"{m.name}({','.join(m.failed)})" for _, m in measured if m.failed]
    if failed:
        row["check"] = "FAIL " + " ".join(failed)
    elif ref_ms is None and ref is not None:
        row["check"] = "no reference"
    else:
        row["check"] = "ok"
    return row


def format_cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if key.endswith("_ms"):
        return f"{value:.4f}" if value < 1 else f"{value:.3f}" if value < 100 else f"{value:.1f}"
    if key == "max_err":
        return f"{value:.1e}"
    if key.endswith("TFLOP/s") or key.endswith("GB/s"):
        return f"{value:.0f}"
    return f"{value:.2f}"  # ratios, GiB


def table_columns(rows: Sequence[Row]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    if "check" in columns:  # always last
        columns.remove("check")
        columns.append("check")
    return columns


def format_table(rows: Sequence[Row]) -> str:
    columns = table_columns(rows)
    cells = [[format_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = [val.ljust(w) if col == "check" else val.rjust(w) for col, val, w in zip(columns, values, widths)]
        return "  ".join(padded).rstrip()

    rule = "-" * len(line(columns))
    return "\n".join([rule, line(columns), rule, *(line(r) for r in cells), rule])


def suite_tables(rows: Sequence[Row]) -> str:
    """One table per suite, without the columns that say nothing there."""
    out = []
    for suite in SUITES:
        part = [
            {k: v for k, v in row.items() if k != "suite" and not (k == "Nq" and suite != "decode")}
            for row in rows
            if row["suite"] == suite
        ]
        if part:
            out.append(f"# {suite}\n{format_table(part)}")
    return "\n".join(out)


def write_outputs(
    base: Path, rows: Sequence[Row], details: list[dict[str, Any]], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """``base.csv`` (the table, raw values) and ``base.json`` (metadata, table, details)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = base.with_name(base.name + ".csv"), base.with_name(base.name + ".json")
    columns = table_columns(rows)
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    payload = {"meta": meta, "columns": columns, "rows": list(rows), "details": details}
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return csv_path, json_path


def print_legend(cfg: Config) -> None:
    tol = OUT_TOL[cfg.dtype]
    print(
        "# <v>_ms: median ms per call; <v>/sdpa: sdpa_ms / <v>_ms (1.0 = as fast as SDPA); "
        "TFLOP/s from causal FLOPs (4*B*H*D per visible query-key pair); decode GB/s: K and V bytes read"
    )
    print(
        f"# max_err: max ||out - sdpa|| / ||sdpa|| (tolerance {tol:g}); statistics checked "
        f"against backend='reference' for Nq*N <= {STATS_CHECK_MAX_N}^2; eager_peak_gib: peak "
        "memory above the inputs; OOM (est. X): float32 N x N scores alone need X"
    )
