"""The benchmark script runs end to end on the CPU (its GPU figures are in docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys

import pytest
import torch

from kernels import benchmark


def test_smoke_defaults_plan_these_rows():
    parser = benchmark.build_parser()
    cfg = benchmark.resolve_config(parser.parse_args(["--smoke"]), parser)
    assert [(s.suite, s.d, s.kv_heads, s.n_q, s.n) for s in cfg.shapes] == [
        ("mha", 32, 4, 64, 64),
        ("mha", 32, 4, 128, 128),
        ("gqa", 32, 2, 64, 64),
        ("decode", 32, 2, 1, 128),
        ("decode", 32, 2, 4, 128),
    ]
    assert (cfg.heads, cfg.dtype, cfg.device.type, cfg.time_budget_s) == (4, torch.float32, "cpu", 0.0)


def test_smoke_run_checks_every_variant_and_prints_the_table(tmp_path, capsys, monkeypatch):
    """Every suite, variant and check end to end, on the smoke defaults but for N = 32 keys (two
    16-key blocks under the interpreter, two key splits in decoding), with one timed call per
    variant: the interpreter takes about a second per call, and smoke timings mean nothing."""
    monkeypatch.setattr("kernels.benchmark.measure.SMOKE_REPS", 1)
    code = benchmark.main(["--smoke", "--breakdown", "--lengths", "32", "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert code == 0, out
    tables = out[out.index("# mha") :]
    assert "# gqa" in tables and "# decode" in tables and "rowstats/sdpa" in tables
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    shapes = [(r["suite"], int(r["Hkv"]), int(r["Nq"]), int(r["N"])) for r in rows]
    assert shapes == [("mha", 4, 32, 32), ("gqa", 2, 32, 32), ("decode", 2, 1, 32), ("decode", 2, 4, 32)]
    assert all(r["check"] == "ok" for r in rows)
    assert all(float(r["keymass_ms"]) > 0 for r in rows)
    assert all(float(r["keymass_last_ms"]) > 0 for r in rows if r["suite"] != "decode")
    assert all(float(r["entropy_ms"]) > 0 for r in rows if r["suite"] == "mha")
    # the decode rows also ran the kernel without key splitting (or say why not)
    assert all(r["unsplit_ms"] for r in rows if r["suite"] == "decode")


def test_sizes_parse_with_suffixes():
    assert benchmark.parse_sizes("1k,4K,128k") == (1024, 4096, 131072)
    with pytest.raises(argparse.ArgumentTypeError):
        benchmark.parse_size("fast")


@pytest.mark.parametrize("under", ["afile/b", "afile/deeper/b.csv"])
def test_out_under_a_file_is_refused_before_the_run(tmp_path, capsys, under):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--smoke", "--out", str(tmp_path / under)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'afile'} (in --out {tmp_path / under}) is a file, not a folder" in captured.err
    assert "# kernels.benchmark" not in captured.out  # refused before the header, so before any row


def test_out_whose_csv_is_a_folder_is_refused(tmp_path):
    (tmp_path / "b.csv").mkdir()
    assert "is a folder, not a file" in benchmark.out_problem(tmp_path / "b")
    assert benchmark.out_problem(tmp_path / "new" / "b") is None


def test_metadata_records_the_full_git_revision_and_every_row_statistic():
    from kernels import StatsSpec
    from kernels.benchmark.environment import metadata
    from kernels.provenance import git_revision

    parser = benchmark.build_parser()
    meta = metadata(benchmark.resolve_config(parser.parse_args(["--smoke"]), parser))
    assert meta["git_revision"] == git_revision()
    assert meta["row_stats"] == repr(StatsSpec.every_row_statistic())
    assert meta["key_stats"] == repr(StatsSpec.all())


def test_python_dash_m_runs_the_package():
    done = subprocess.run(
        [sys.executable, "-m", "kernels.benchmark", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m kernels.benchmark")
