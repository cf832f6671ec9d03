"""Per-KV-group views (workbench/scoring/kv_groups.py): the grouping convention against the
libraries' own code, the aggregation against an explicit loop on a tiny random GQA model's run,
the identity without GQA, runs that do not record their key/value heads, and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import SEED
from tests.tiny_models import tiny_llama
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.runs import Run
from workbench.scoring import ScoreRunSettings, score_model
from workbench.scoring.kv_groups import (
    KV_GROUP_COLUMNS,
    as_head_table,
    kv_group_scores,
    kv_head_of,
    kv_heads_of,
    query_heads_of,
    run_kv_group_scores,
    run_kv_heads,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def gqa_run(tmp_path_factory) -> Run:
    """A scored run of the tiny random Llama (2 layers, 4 query heads, 2 key/value heads):
    repeats and text, one 64-token sample each (a few seconds on one core; no figures). Scored
    once per process: test_interop.py uses it too (and copies it before writing into it)."""
    import workbench.plots

    folder = tmp_path_factory.getbasetemp() / "gqa-run"
    if (folder / "manifest.json").is_file() and Run.open(folder).complete:
        return Run.open(folder)
    mp = pytest.MonkeyPatch()
    mp.setattr(workbench.plots, "run_figures", lambda tables: {})
    try:
        model = tiny_llama(context=256)
        model.tokenizer = None  # the zoo's byte tokenizer builds the samples
        settings = ScoreRunSettings(model="tiny-llama", tasks=("repeats", "text"), lengths=(64,), samples=1)
        return score_model(model, settings, folder, progress=False)
    finally:
        mp.undo()


def synthetic_run(path, layers: int, heads: int, kv_heads: int | None, model: str = "hf:someone/model", seed=SEED):
    """A complete run folder holding only a ``head_scores`` table of random values (two scores,
    two tasks); ``kv_heads=None``: a manifest written before key/value heads were recorded."""
    gen = np.random.default_rng(seed)
    rows = [
        (task, score, layer, head, float(gen.random()), 3)
        for score in ("sink", "entropy")
        for task in ("repeats", "text")
        for layer in range(layers)
        for head in range(heads)
    ]
    info = {"class": "X", "layers": layers, "heads": heads} | ({} if kv_heads is None else {"kv_heads": kv_heads})
    run = Run.create(path, {"settings": {"model": model}, "status": "complete", "model_info": info})
    run.write_table("head_scores", pd.DataFrame(rows, columns=["task", "score", "layer", "head", "value", "samples"]))
    return run


# ----------------------------------------------------------------------------- the convention


def test_query_head_h_reads_kv_head_h_over_group_size_as_in_hugging_face_and_transformer_lens():
    """Hugging Face's repeat_kv and TransformerLens's GroupedQueryAttention both give query head h
    the key/value head h // (heads // kv_heads)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.components import GroupedQueryAttention
    from transformers.models.llama.modeling_llama import repeat_kv

    heads, kv = 6, 2
    k = torch.randn(1, kv, 5, 4, generator=torch.Generator().manual_seed(SEED))
    expanded = repeat_kv(k, heads // kv)  # [1, heads, 5, 4]
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=24, n_ctx=8, d_head=4, n_heads=heads, n_key_value_heads=kv, act_fn="gelu", attn_only=True
    )
    attn = GroupedQueryAttention(cfg)
    with torch.no_grad():  # the weights start uninitialised
        attn._W_K.copy_(torch.randn(attn._W_K.shape, generator=torch.Generator().manual_seed(SEED)))
    for h in range(heads):
        assert torch.equal(expanded[0, h], k[0, kv_head_of(h, heads, kv)])
        assert torch.equal(attn.W_K[h], attn._W_K[kv_head_of(h, heads, kv)])
        assert h in query_heads_of(kv_head_of(h, heads, kv), heads, kv)
    assert [kv_head_of(h, heads, kv) for h in range(heads)] == [0, 0, 0, 1, 1, 1]


def test_kv_heads_of_reads_the_model_config(zoo):
    from workbench.adapters import adapter_for

    assert kv_heads_of(adapter_for(tiny_llama(layers=1))) == 2  # num_key_value_heads
    assert kv_heads_of(adapter_for(zoo)) == zoo.cfg.n_heads  # TransformerLens without GQA


# ----------------------------------------------------------------------------- the aggregation


def test_kv_group_scores_of_a_tiny_gqa_run_match_an_explicit_loop(gqa_run):
    info = gqa_run.manifest["model_info"]
    assert (info["heads"], info["kv_heads"]) == (4, 2)  # recorded from the model's config
    hs = gqa_run.table("head_scores")
    got = run_kv_group_scores(gqa_run)
    assert list(got.columns) == KV_GROUP_COLUMNS
    want = []
    for score, task in dict.fromkeys(zip(hs["score"], hs["task"])):
        for layer in range(2):
            for kv in range(2):
                group = [
                    hs[(hs.score == score) & (hs.task == task) & (hs.layer == layer) & (hs["head"] == h)].iloc[0]
                    for h in (2 * kv, 2 * kv + 1)
                ]
                values = [float(r["value"]) for r in group]
                unknown = any(math.isnan(v) for v in values)
                want.append(
                    (
                        task,
                        score,
                        layer,
                        kv,
                        f"{2 * kv},{2 * kv + 1}",
                        math.nan if unknown else math.fsum(values) / 2,
                        math.nan if unknown else max(values),
                        min(int(r["samples"]) for r in group),
                    )
                )
    want = pd.DataFrame(want, columns=KV_GROUP_COLUMNS)
    assert len(got) == len(want) == len(hs) // 2
    pd.testing.assert_frame_equal(
        got.drop(columns=["mean", "max"]), want.drop(columns=["mean", "max"]), check_dtype=False
    )
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(got["max"], want["max"])  # max picks one of the values: exact


def test_without_gqa_every_group_is_its_head():
    gen = np.random.default_rng(SEED)
    hs = pd.DataFrame(
        [("text", "sink", l, h, float(gen.random()), 2) for l in range(3) for h in range(4)],
        columns=["task", "score", "layer", "head", "value", "samples"],
    )
    got = kv_group_scores(hs, n_kv_heads=4)
    assert list(got["kv_head"]) == list(hs["head"]) and list(got["query_heads"]) == [str(h) for h in hs["head"]]
    assert list(got["mean"]) == list(hs["value"]) == list(got["max"])
    shown = as_head_table(got, "mean")
    pd.testing.assert_frame_equal(shown.drop(columns="query_heads"), hs)


def test_a_head_without_value_leaves_its_group_unknown_and_multi_query_is_one_group():
    hs = pd.DataFrame(
        {"task": "t", "score": "s", "layer": 0, "head": [0, 1, 2, 3], "value": [0.1, math.nan, 0.3, 0.7], "samples": 1}
    )
    got = kv_group_scores(hs, 2)
    assert math.isnan(got["mean"][0]) and math.isnan(got["max"][0])
    assert got["mean"][1] == pytest.approx(0.5) and got["max"][1] == 0.7
    one = kv_group_scores(hs.fillna(0.2), 1)  # multi-query attention: one K/V head for all
    assert list(one["query_heads"]) == ["0,1,2,3"] and one["max"][0] == 0.7


@pytest.mark.parametrize("kv", [3, 0, 8])
def test_a_grouping_that_cannot_be_is_refused(kv):
    hs = pd.DataFrame({"task": "t", "score": "s", "layer": 0, "head": [0, 1, 2, 3], "value": 0.5, "samples": 1})
    with pytest.raises(WorkbenchError, match="key/value heads"):
        kv_group_scores(hs, kv)
    with pytest.raises(WorkbenchError, match="unknown aggregate"):
        as_head_table(kv_group_scores(hs, 2), "median")


# ----------------------------------------------------------------------------- older runs


def test_runs_without_recorded_kv_heads(tmp_path):
    """A manifest without kv_heads: a model the workbench builds offline is read from its config,
    --kv-heads serves any other, and without it the error asks for it."""
    assert run_kv_heads(synthetic_run(tmp_path / "zoo", 2, 4, None, model="zoo-2l")) == (4, 4)
    assert run_kv_heads(synthetic_run(tmp_path / "rand", 1, 32, None, model="random:llama-3.2-1b")) == (32, 8)
    old = synthetic_run(tmp_path / "hub", 2, 4, None)
    with pytest.raises(WorkbenchError, match="pass --kv-heads N.*num_key_value_heads"):
        run_kv_heads(old)
    assert run_kv_heads(old, 2) == (4, 2)
    with pytest.raises(WorkbenchError, match="cannot serve 4 query heads"):
        run_kv_heads(old, 3)
    new = synthetic_run(tmp_path / "new", 2, 4, 2)
    with pytest.raises(WorkbenchError, match="records 2 key/value heads.*not 1"):
        run_kv_heads(new, 1)


# ----------------------------------------------------------------------------- the CLI


def test_runs_show_per_kv_group(gqa_run):
    result = runner.invoke(app, ["runs", "show", str(gqa_run.path), "--per", "kv-group", "--agg", "mean"])
    assert result.exit_code == 0, result.output
    assert "top KV groups per score (layer.kv_head mean over its query heads)" in " ".join(result.output.split())
    assert "(q 0,1)" in result.output or "(q 2,3)" in result.output
    plain = runner.invoke(app, ["runs", "show", str(gqa_run.path)])
    assert plain.exit_code == 0 and "(q " not in plain.output


def test_runs_show_per_kv_group_refusals(tmp_path, gqa_run):
    result = runner.invoke(app, ["runs", "show", str(gqa_run.path), "--per", "layer"])
    assert result.exit_code == 2 and "unknown --per 'layer': choose head or kv-group" in result.output
    old = synthetic_run(tmp_path / "old", 2, 4, None)
    result = runner.invoke(app, ["runs", "show", str(old.path), "--per", "kv-group"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "pass --kv-heads N" in result.output
    result = runner.invoke(app, ["runs", "show", str(old.path), "--per", "kv-group", "--kv-heads", "2"])
    assert result.exit_code == 0 and "(q 2,3)" in result.output
