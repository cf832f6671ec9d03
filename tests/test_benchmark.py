"""The benchmark script runs end to end on the CPU (its GPU figures are in docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import csv

import pytest

from kernels import benchmark


def test_smoke_run_checks_every_variant_and_prints_the_table(tmp_path, capsys):
    code = benchmark.main(["--smoke", "--breakdown", "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert code == 0, out
    tables = out[out.index("# mha"):]
    assert "# gqa" in tables and "# decode" in tables and "rowstats/sdpa" in tables
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    shapes = [(r["suite"], int(r["Hkv"]), int(r["Nq"]), int(r["N"])) for r in rows]
    assert shapes == [("mha", 4, 64, 64), ("mha", 4, 128, 128), ("gqa", 2, 64, 64),
                      ("decode", 2, 1, 128), ("decode", 2, 4, 128)]
    assert all(r["check"] == "ok" for r in rows)
    assert all(float(r["keymass_ms"]) > 0 for r in rows)
    assert all(float(r["entropy_ms"]) > 0 for r in rows if r["suite"] == "mha")
    # the decode rows also ran the kernel without key splitting (or say why not)
    assert all(r["unsplit_ms"] for r in rows if r["suite"] == "decode")


def test_sizes_parse_with_suffixes():
    assert benchmark.parse_sizes("1k,4K,128k") == (1024, 4096, 131072)
    with pytest.raises(argparse.ArgumentTypeError):
        benchmark.parse_size("fast")
