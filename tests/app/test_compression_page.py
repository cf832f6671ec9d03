"""The explorer's Compression page (Streamlit AppTest) on a copy of the explorer's zoo-2l run
after a small ``run_compression``: it shows the experiment's own numbers; a run without one
shows how to make it. The heads are ranked by ``induction`` (the run's repeats task defines it for
every head): the run's ``retrieval`` counts only the needles zoo-2l answers, and with one sample
per length and depth that can be none, which leaves nothing to rank."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from probes.compress import CompressionSettings, run_compression
from tests.app.test_app import arr, explorer, figure_titled, frame, go, metrics, ok
from workbench.runs import Run


@pytest.fixture
def compressed(explorer_folders, zoo, tmp_path):
    """A runs folder holding a copy of the explorer's zoo run with a compression experiment."""
    root = tmp_path / "runs"
    shutil.copytree(explorer_folders.run, root / "zoo", ignore=shutil.ignore_patterns("parts", "figures"))
    settings = CompressionSettings(
        rank_by="induction", shares=(0.5,), lengths=(128,), depths=(0.5,), samples=2, text_samples=1,
        sink=2, window=16, draws=2, backend="reference",
    )  # fmt: skip
    run_compression(root / "zoo", zoo, settings, progress=False)
    return root


def test_compression_page_shows_what_workbench_compress_wrote(monkeypatch, compressed):
    at = go(explorer(monkeypatch, compressed, run="zoo"), "Compression")
    ok(at)
    run = Run.open(compressed / "zoo")
    summary = run.table("compress/induction_lowest_summary")
    base = summary[summary["policy"] == "none"].iloc[0]
    shown = metrics(at)
    assert shown["uncompressed needle accuracy"] == f"{base['needle_accuracy']:.3f}"
    assert shown["uncompressed text loss past window"] == f"{base['text_loss_past_window']:.3f}"
    memory = run.table("compress/induction_lowest_memory").query("share == 0.5 and length == 128").iloc[0]
    assert shown["KV saved at share 0.5, 128 tokens"] == f"{memory['saved_fraction']:.1%}"
    curve = figure_titled(at, "streaming heads chosen by induction")
    ranked = [t for t in curve["data"] if t["name"] == "by induction"]
    want = [base["needle_accuracy"], *summary[summary["policy"] == "ranked"]["needle_accuracy"]]
    np.testing.assert_allclose(arr(ranked[0]["y"]), want)
    np.testing.assert_allclose(frame(at, "policy", "needle_accuracy")["text_loss"], summary["text_loss"])
    heads = frame(at, "kv_head", "query_heads")
    assert len(heads) == 3 * 4 and set(heads["policy"]) == {"ranked", "random"}  # 4 of 8 KV heads, 3 sets


def test_compression_page_says_how_to_make_one(monkeypatch, explorer_folders):
    at = go(explorer(monkeypatch, explorer_folders.runs, run="zoo"), "Compression")
    ok(at)
    assert any("workbench compress --run" in m.value for m in at.info), [m.value for m in at.info]
