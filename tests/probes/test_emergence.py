"""probes.emergence: a zoo model's checkpoints scored in training order."""

from __future__ import annotations

from dataclasses import replace

import pytest

from probes.emergence import sink_rate_over_training, tokens_seen
from workbench import WorkbenchError
from workbench.zoo import ZOO, Stage, train


def test_tokens_seen_counts_across_stages():
    spec = replace(ZOO["tiny"], stages=(Stage(3, 16, 2), Stage(5, 32, 4)))
    assert [tokens_seen(spec, s) for s in (0, 2, 3, 4, 8, 9)] == [0, 64, 96, 224, 736, 736]


def test_checkpoints_are_scored_in_order(tmp_path):
    spec = replace(ZOO["tiny"], checkpoints=(10, 25))
    train(spec, tmp_path / "w", progress=False)
    table = sink_rate_over_training("tiny", lengths=(32,), samples=2, weights_dir=tmp_path / "w", out=tmp_path / "runs")
    assert table["step"].tolist() == [0, 10, 25, spec.steps]
    assert table["tokens"].tolist() == [tokens_seen(spec, s) for s in (0, 10, 25, spec.steps)]
    assert table["sink_rate"].between(0, 1).all() and (table["max_sink"] > 0).all()
    assert table["max_sink"].nunique() == 4  # four different sets of weights
    for step in table["step"]:  # each point is a normal run folder
        assert (tmp_path / "runs" / f"step-{step}" / "manifest.json").exists()
    with pytest.raises(WorkbenchError, match="unknown zoo model"):
        sink_rate_over_training("nope")
    with pytest.raises(WorkbenchError, match="workbench zoo train tiny"):
        sink_rate_over_training("tiny", weights_dir=tmp_path / "empty")
