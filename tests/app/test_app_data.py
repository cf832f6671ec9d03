"""What the explorer reads and draws, checked without Streamlit: one prompt's attention
(``workbench.prompt``), the run and SAE readers it uses, and the figures it adds to
``workbench.plots``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.sae import SavedSAE, list_saes
from workbench import WorkbenchError, load_model, plots
from workbench.prompt import attend
from workbench.runs import Run, head_summary

TEXT = "The secret code of Ada is 4711. The secret code of Ada is"


@pytest.mark.parametrize("which", ["zoo", "minilm"])
def test_prompt_statistics_agree_with_the_explicit_pattern(zoo, which):
    """Key mass = the pattern's column sums, entropy and max probability = those of its rows, for
    TransformerLens (hook_pattern) and Hugging Face (eager attention) models."""
    model = zoo if which == "zoo" else load_model("minilm", device="cpu")
    seen = attend(model, TEXT)
    assert seen.n_layers == (2 if which == "zoo" else 6) and len(seen.labels) == seen.n_tokens
    for layer, head in [(0, 1), (1, seen.n_heads - 1)]:
        p = seen.pattern(layer, head).astype(np.float64)
        assert p.shape == (seen.n_tokens, seen.n_tokens)
        np.testing.assert_allclose(p.sum(-1), 1, atol=1e-5)
        if which == "zoo":
            assert np.allclose(np.triu(p, 1), 0)  # causal
        np.testing.assert_allclose(seen.key_mass(layer, head)["mass"], p.sum(0), atol=1e-4)
        stats = seen.head_statistics(layer, head)
        entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(-1)
        np.testing.assert_allclose(stats["entropy"], entropy, atol=1e-4)
        np.testing.assert_allclose(stats["max_prob"], p.max(-1), atol=1e-5)
        np.testing.assert_allclose(stats["sink_mass"], p[:, 0], atol=1e-5)
        assert (stats["argmax"] == p.argmax(-1)).mean() > 0.95  # ties may break either way
        top = seen.top_keys(layer, head, 5)
        assert list(top["position"]) == list(np.argsort(-p.sum(0), kind="stable")[:5])
    means = seen.head_means()
    assert set(means["score"]) == {"entropy", "max_prob", "sink_mass", "local_mass", "distance", "previous_token"}
    assert len(means) == 6 * seen.n_layers * seen.n_heads
    fig = plots.head_map(means, "entropy")
    np.testing.assert_allclose(
        fig.data[0].z[1], [seen.head_statistics(1, h)["entropy"].mean() for h in range(seen.n_heads)], rtol=1e-5
    )


def test_long_prompts_get_statistics_but_no_pattern(zoo):
    ids = torch.randint(3, 250, (600,), generator=torch.Generator().manual_seed(0))
    seen = attend(zoo, ids, pattern_tokens=256)
    assert seen.pattern(1, 1) is None and seen.patterns == {}
    mass = seen.key_mass(1, 1)["mass"]
    assert len(mass) == 600 and mass.sum() == pytest.approx(600, rel=1e-4)  # every query row gives away 1


def test_prompt_errors_are_readable(zoo):
    with pytest.raises(WorkbenchError, match="the prompt is empty"):
        attend(zoo, "   ")
    with pytest.raises(WorkbenchError, match="longer than the model's context"):
        attend(zoo, torch.zeros(3000, dtype=torch.long) + 65)
    seen = attend(zoo, "abc")
    with pytest.raises(WorkbenchError, match="head 2.0 does not exist"):
        seen.pattern(2, 0)


def test_run_and_sae_readers(explorer_folders, tmp_path):
    run = Run.open(explorer_folders.run)
    assert run.tables() == sorted(
        ["head_scores", "profiles", "retrieval", "scan_needle_accuracy_uniform", run.manifest["ablations"][0]["table"]]
    )
    hs = run.table("head_scores")
    summary = head_summary(hs, 1, 1)
    assert len(summary) == len(hs.groupby(["score", "task"]))
    for row in summary.itertuples():
        group = hs[(hs["score"] == row.score) & (hs["task"] == row.task)]
        if np.isnan(row.value):
            continue
        assert row.rank == 1 + int((group["value"] > row.value).sum()) and row.heads == 8
    saes, broken = list_saes(explorer_folders.saes)
    assert [s.path for s in saes] == [explorer_folders.sae] and broken == []
    sae = saes[0]
    assert sae.layer == 1 and sae.model_name == "zoo-2l" and sae.hook_name == "blocks.1.attn.hook_z"
    assert {"l0", "explained_variance", "ce_loss_recovered"} <= set(sae.evaluation)
    assert list(sae.table("top_contexts").columns) == ["feature", "rank", "activation", "sample", "position", "context"]
    assert list_saes(tmp_path / "missing") == ([], [])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text("{}")
    (tmp_path / "bad" / "top_contexts.parquet").write_text("not parquet")
    bad = SavedSAE.open(tmp_path / "bad")
    with pytest.raises(WorkbenchError, match="is corrupt: cannot read top_contexts.parquet"):
        bad.table("top_contexts")
    with pytest.raises(WorkbenchError, match="has no head_attribution table"):
        bad.table("head_attribution")


def test_new_figures_draw_the_tables(explorer_folders):
    run = Run.open(explorer_folders.run)
    hs = run.table("head_scores")
    fig = plots.head_map(hs, "induction", clickable=True)
    markers = [t for t in fig.data if t.type == "scatter"]
    assert len(markers) == 1 and list(markers[0].x) == [str(h) for h in range(4)] * 2
    assert markers[0].marker.opacity == 0 and fig.layout.yaxis.type == "category"
    profiles = plots.head_profiles(run.table("profiles"), 0, 1)
    assert {t.name for t in profiles.data} == {f"{t} {n}" for t in ("niah", "repeats", "text") for n in (128, 256)}
    assert len(profiles.data) == 3 * 6
    standing = plots.head_standing(hs, 0, 1)
    red = [t for t in standing.data if t.marker.color == "crimson"]
    scored = hs.dropna(subset=["value"])  # a score no sample counted (retrieval, all dropped) has no marker
    assert len(red) == scored.groupby(["score", "task"]).ngroups and all(len(t.x) == 1 for t in red)
    ret = plots.retrieval_map(run.table("retrieval"), 1, 1)
    assert np.asarray(ret.data[0].z).shape == (2, 2)
    sae = SavedSAE.open(explorer_folders.sae)
    heads = plots.feature_heads(sae.table("head_attribution"), [0, 1, 2])
    np.testing.assert_allclose(np.asarray(heads.data[0].z).sum(-1), 1, atol=1e-5)
