"""The head map's KV-group view and imported scores, on a hand-made run of a grouped-query
model (2 layers, 4 query heads, 2 key/value heads; no model runs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.app.test_app import arr, explorer, figure_titled, go, ok
from tests.conftest import SEED
from workbench.interop import import_scores
from workbench.runs import Run


def gqa_runs(root, kv_heads: int | None = 2, name: str = "gqa") -> Run:
    """``root/runs/<name>``: a complete run whose head_scores hold random sink and entropy values
    (drawn from the seed and ``name``), and a kv-table import named ``press``."""
    gen = np.random.default_rng([SEED, len(name)])
    rows = [
        ("text", score, layer, head, float(gen.random()), 2)
        for score in ("sink", "entropy")
        for layer in range(2)
        for head in range(4)
    ]
    info = {"class": "X", "layers": 2, "heads": 4} | ({} if kv_heads is None else {"kv_heads": kv_heads})
    run = Run.create(
        root / "runs" / name,
        {"settings": {"model": "hf:someone/gqa", "tasks": ["text"]}, "status": "complete", "model_info": info},
    )
    run.write_table("head_scores", pd.DataFrame(rows, columns=["task", "score", "layer", "head", "value", "samples"]))
    (root / "press.csv").write_text("layer,kv_head,score\n0,0,0.1\n0,1,0.9\n1,0,0.4\n1,1,0.6\n")
    import_scores(run, root / "press.csv", "kv-table", "press", kv_heads=kv_heads or 2)
    return run


@pytest.mark.parametrize("view", ["KV groups: max", "KV groups: mean"])
def test_head_map_shows_kv_groups(tmp_path, monkeypatch, view):
    run = gqa_runs(tmp_path)
    at = go(explorer(monkeypatch, tmp_path / "runs", run="gqa"), "Head map")
    at.selectbox(key="heads.score").select("sink").run()
    at.radio(key="heads.view").set_value(view).run()
    ok(at)
    hs = run.table("head_scores").query("score == 'sink'")
    values = hs.pivot(index="layer", columns="head", values="value").to_numpy()  # [layer, head]
    pairs = values.reshape(2, 2, 2)  # [layer, kv_head, query head in the group]: head h -> kv h // 2
    want = pairs.max(-1) if view.endswith("max") else pairs.mean(-1)
    fig = figure_titled(at, "sink:")
    (heatmap,) = [t for t in fig["data"] if t["type"] == "heatmap"]
    np.testing.assert_allclose(arr(heatmap["z"]), want, rtol=1e-12)
    assert fig["layout"]["xaxis"]["title"]["text"] == "kv head"
    table = at.dataframe[0].value
    assert {"kv_head", "query_heads"} <= set(table.columns) and set(table["query_heads"]) == {"0,1", "2,3"}
    np.testing.assert_allclose(sorted(table["value"]), sorted(want.ravel()), rtol=1e-12)


def test_imported_scores_are_on_the_head_map(tmp_path, monkeypatch):
    gqa_runs(tmp_path)
    at = go(explorer(monkeypatch, tmp_path / "runs", run="gqa"), "Head map")
    at.selectbox(key="heads.score").select("press").run()
    ok(at)
    (heatmap,) = [t for t in figure_titled(at, "press")["data"] if t["type"] == "heatmap"]
    np.testing.assert_allclose(arr(heatmap["z"]), [[0.1, 0.1, 0.9, 0.9], [0.4, 0.4, 0.6, 0.6]])
    assert at.radio(key="heads.view").value == "query heads"


def test_a_run_without_kv_heads_asks_for_them(tmp_path, monkeypatch):
    gqa_runs(tmp_path, kv_heads=None)
    at = go(explorer(monkeypatch, tmp_path / "runs", run="gqa"), "Head map")
    at.radio(key="heads.view").set_value("KV groups: max").run()
    ok(at)
    asked = at.selectbox(key="heads.kv_heads")
    assert list(asked.options) == ["1", "2", "4"] and asked.value == 4  # default: no grouping
    at = asked.select(2).run()
    ok(at)
    assert set(at.dataframe[0].value["query_heads"]) == {"0,1", "2,3"}


def test_two_runs_compare_by_kv_group(tmp_path, monkeypatch):
    """The runs page's comparison in the KV-group view: each point is a KV group's max in both runs."""
    first, second = gqa_runs(tmp_path), gqa_runs(tmp_path, name="gqa-b")
    at = go(explorer(monkeypatch, tmp_path / "runs", run="gqa"), "Runs")
    at = at.selectbox(key="runs.compare").select("gqa-b").run()
    at.selectbox(key="runs.compare_score").select("sink").run()
    at.radio(key="runs.view").set_value("KV groups: max").run()
    ok(at)

    def group_max(run: Run) -> np.ndarray:  # [layer, kv head]: query heads 2g and 2g + 1 share KV head g
        values = run.table("head_scores").query("score == 'sink'").pivot(index="layer", columns="head", values="value")
        return values.to_numpy().reshape(2, 2, 2).max(-1)

    points = figure_titled(at, "sink: kv head by kv head")["data"][0]
    at_group = [tuple(int(i) for i in text.split(".")) for text in points["text"]]  # "layer.kv_head"
    assert sorted(at_group) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_allclose(arr(points["x"]), [group_max(first)[g] for g in at_group], rtol=1e-12)
    np.testing.assert_allclose(arr(points["y"]), [group_max(second)[g] for g in at_group], rtol=1e-12)
    assert not np.allclose(group_max(first), group_max(second))  # two different runs
