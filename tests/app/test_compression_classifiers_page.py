"""The explorer's Compression page shows what ``workbench compress --classifiers`` wrote (each
head classifier's streaming heads side by side), also in a run with no ranked compression. The
comparison is text only, on short samples, to stay fast."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from probes.compress import CompressionSettings
from probes.compress_classifiers import run_classifier_comparison
from tests.app.test_app import explorer, frame, go, ok
from workbench.runs import Run


@pytest.mark.filterwarnings("ignore:RazorAttention's rule is for 4 copies:RuntimeWarning")  # the run has 2
def test_compression_page_shows_each_classifiers_heads(monkeypatch, explorer_folders, zoo, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(explorer_folders.run, root / "zoo", ignore=shutil.ignore_patterns("parts", "figures"))
    settings = CompressionSettings(tasks=("text",), text_samples=1, text_length=40, sink=2, window=16, draws=1,
                                   lengths=(128,), backend="reference")  # fmt: skip
    found = run_classifier_comparison(root / "zoo", zoo, settings, progress=False)
    assert len(found.summary) > 1  # the run's scores allow at least one classifier
    at = go(explorer(monkeypatch, root, run="zoo"), "Compression")
    ok(at)
    assert not at.info, [m.value for m in at.info]
    summary = Run.open(root / "zoo").table("compress/classifiers_summary")
    shown = frame(at, "classifier", "kv_heads_streamed")
    assert list(shown["classifier"]) == list(summary["classifier"])
    np.testing.assert_allclose(shown["text_loss_past_window"], summary["text_loss_past_window"])
    heads = frame(at, *[c for c in summary["classifier"] if c != "none"])
    assert len(heads) == found.layout.total
