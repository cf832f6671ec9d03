"""Linear probes on head outputs (zoo model)."""

from __future__ import annotations

import pytest
import torch

from probes.linear import needle_labels, probe_heads, repeat_labels
from tests.conftest import SEED
from workbench import WorkbenchError
from workbench.tasks import needle_samples, repeat_samples


def test_a_head_carries_whether_a_token_was_seen_before(zoo):
    """Whether a token lies in a later copy of a repeated sequence is readable from some head's
    output well above chance (the idle head 1.0 attends <bos> in the first copy only, and
    previous-token heads see a familiar pair), and no head reads shuffled labels."""
    samples = repeat_samples(zoo.tokenizer, 60, 2, 8, seed=SEED)
    real = probe_heads(zoo, samples, repeat_labels(samples), progress=False)
    control = probe_heads(zoo, samples, repeat_labels(samples), shuffle=True, seed=SEED, progress=False)
    assert len(real) == 8 and real["accuracy"].max() > 0.65
    assert control["accuracy"].max() < 0.56 and control["accuracy"].min() > 0.44


def test_labels_and_bad_input(zoo):
    needles = needle_samples(zoo.tokenizer, [128], [0.5], 4, seed=SEED)
    labels = needle_labels(needles)
    assert all(int(y.sum()) == len(s.needle) and bool(y[s.needle.start]) for s, y in zip(needles, labels))
    repeats = repeat_samples(zoo.tokenizer, 10, 3, 2, seed=SEED)
    assert [int(y.sum()) for y in repeat_labels(repeats)] == [20, 20]
    with pytest.raises(WorkbenchError, match="needle samples"):
        needle_labels(repeats)
    with pytest.raises(WorkbenchError, match="at least 4 samples"):
        probe_heads(zoo, repeats, repeat_labels(repeats), progress=False)
    with pytest.raises(WorkbenchError, match="one boolean per token"):
        probe_heads(zoo, needles, [torch.zeros(3, dtype=torch.bool)] * 4, progress=False)
    with pytest.raises(WorkbenchError, match="single class"):
        probe_heads(zoo, needles, [torch.zeros(len(s.ids), dtype=torch.bool) for s in needles], progress=False)
