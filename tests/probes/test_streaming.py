"""StreamingLLM's perplexity experiment (``probes.streaming``) on the repository's models:
a window wider than the text leaves every variant equal to full attention; the window-only and
window + S losses equal an independent float64 computation of the uninstrumented model with the
explicit mask (a ``hook_attn_scores`` hook); the table's buckets and overall rows are the means
of the per-token losses; settings are refused clearly; the figure has a line per variant."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from probes.streaming import StreamingSettings, sample_ids, streaming_perplexity, summarize, token_losses
from workbench.errors import WorkbenchError
from workbench.models import load_model
from workbench.plots import streaming_curve

L = 192


@pytest.fixture(scope="module")
def planted():
    return load_model("planted:1024", device="cpu")


@pytest.mark.parametrize("which", ["zoo", "planted"])
def test_a_window_as_long_as_the_text_changes_nothing(which, zoo, planted):
    model = zoo if which == "zoo" else planted
    settings = StreamingSettings(length=L, window=L, keep_first=(1, 4), samples=2, backend="reference")
    losses = token_losses(model, sample_ids(model, settings), settings)
    assert list(dict.fromkeys(losses["variant"])) == ["full", "window", "window+1", "window+4"]
    full = losses[losses["variant"] == "full"]["loss"].to_numpy()
    assert len(full) == 2 * (L - 1)
    for variant in ("window", "window+1", "window+4"):
        got = losses[losses["variant"] == variant]["loss"].to_numpy()
        assert abs(got - full).max() < 1e-5, variant


def explicit_losses(model, ids: torch.Tensor, window: int, keep_first: int) -> torch.Tensor:
    """Per-token loss ``[samples, L-1]`` of the uninstrumented model in float64, the keys outside
    the window and the first ``keep_first`` hidden by a hook on every layer's scores."""
    m64 = copy.deepcopy(model).double()
    n = ids.shape[1]
    i, j = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    off = (i - j >= window) & (j >= keep_first)

    def hook(scores, hook):
        return scores.masked_fill(off, -math.inf)

    with torch.no_grad():
        logits = m64.run_with_hooks(
            ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_attn_scores", hook) for layer in range(model.cfg.n_layers)]
        )
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


def test_window_losses_equal_the_explicit_mask(zoo):
    """zoo-2l (rotary), L = 192, W = 32: the probe's per-token losses of the window alone and of
    window + 4 equal the float64 masked model; the window alone costs loss after the window."""
    settings = StreamingSettings(length=L, window=32, keep_first=(4,), samples=2, backend="reference")
    ids = sample_ids(zoo, settings)
    losses = token_losses(zoo, ids, settings)
    for keep, variant in ((0, "window"), (4, "window+4")):
        rows = losses[losses["variant"] == variant].sort_values(["sample", "position"])
        got = torch.tensor(rows["loss"].to_numpy()).view(2, L - 1)
        torch.testing.assert_close(got, explicit_losses(zoo, ids, 32, keep), rtol=0, atol=2e-4)
    full = losses[losses["variant"] == "full"]["loss"].to_numpy()
    window = losses[losses["variant"] == "window"]["loss"].to_numpy()
    before = losses[losses["variant"] == "full"]["position"].to_numpy() < 32
    assert abs(full - window)[before].max() < 1e-5 and abs(full - window)[~before].max() > 1e-2


def test_summary_buckets_and_overall_are_means_of_the_tokens():
    losses = pd.DataFrame(
        {
            "variant": ["full"] * 5 + ["window"] * 5,
            "keep_first": [-1] * 5 + [0] * 5,
            "window": 2,
            "sample": 0,
            "position": list(range(5)) * 2,
            "loss": [1.0, 2.0, 3.0, 4.0, 5.0, 2.0, 2.0, 2.0, 2.0, 8.0],
        }
    )
    table = summarize(losses, bucket=2)
    full = table[table["variant"] == "full"]
    assert list(full["bucket"]) == ["0-1", "2-3", "4-4", "all"]
    assert list(full["tokens"]) == [2, 2, 1, 5] and list(full["loss"]) == [1.5, 3.5, 5.0, 3.0]
    window = table[(table["variant"] == "window") & (table["bucket"] == "all")]
    assert float(window["loss"].iloc[0]) == 3.2 and math.isclose(float(window["perplexity"].iloc[0]), math.exp(3.2))
    assert list(table[table["bucket"] == "all"]["end"]) == [5, 5]


def test_the_experiment_table_and_figure(zoo):
    table = streaming_perplexity(
        zoo, StreamingSettings(length=128, window=16, keep_first=(1, 4, 4), samples=1, bucket=64, backend="reference")
    )
    assert list(dict.fromkeys(table["variant"])) == ["full", "window", "window+1", "window+4"]
    assert list(table[table["variant"] == "full"]["bucket"]) == ["0-63", "64-126", "all"]
    assert (table["perplexity"] > 1).all() and table["loss"].notna().all()
    fig = streaming_curve(table)
    assert [t.name.split(" ")[0] for t in fig.data] == ["full", "window", "window+1", "window+4"]
    assert all(len(t.x) == 2 for t in fig.data)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(length=1), "length must be an int >= 2"),
        (dict(window=0), "window must be an int >= 1"),
        (dict(keep_first=(1, -4)), "keep_first must hold ints >= 0"),
        (dict(bucket=0), "bucket must be an int >= 1"),
        (dict(backend="cuda"), "unknown kernel backend"),
    ],
)
def test_bad_settings_are_refused(kwargs, words):
    with pytest.raises(WorkbenchError, match=words):
        StreamingSettings(**kwargs)


def test_texts_longer_than_the_context_are_refused(zoo):
    with pytest.raises(WorkbenchError, match="longer than the model's context of 2048"):
        sample_ids(zoo, StreamingSettings(length=4096))
