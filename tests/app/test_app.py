"""The explorer's pages driven by Streamlit's AppTest against a real scored run (the
``explorer_folders`` fixture of conftest.py): every page renders without an exception and shows
the numbers of the run's own tables."""

from __future__ import annotations

import base64
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from app.main import PAGES
from probes.sae import SavedSAE
from workbench.prompt import attend
from workbench.runs import Run, head_summary

MAIN = Path(__file__).parents[2] / "app" / "main.py"


def explorer(monkeypatch, runs: Path, saes: Path | None = None, **query: str) -> AppTest:
    """The app as ``workbench app --runs RUNS --saes SAES`` starts it, after one run."""
    monkeypatch.setattr(sys, "argv", ["main.py", "--runs", str(runs), "--saes", str(saes or runs / "no-saes")])
    at = AppTest.from_file(str(MAIN), default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def go(at: AppTest, page: str) -> AppTest:
    at.sidebar.radio(key="page").set_value(page)
    return at.run()


def figures(at: AppTest) -> list[dict]:
    """The plotly figures on the page, as plotly JSON."""
    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


def arr(value) -> np.ndarray:
    """A trace's numbers: plotly JSON holds arrays as lists or as base64 ``{"dtype", "bdata", "shape"}``."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:
            out = out.reshape([int(n) for n in str(value["shape"]).split(",")])
        return out.astype(float)
    return np.array(value, dtype=float)


def figure_titled(at: AppTest, start: str) -> dict:
    found = [f for f in figures(at) if str(f["layout"].get("title", {}).get("text", "")).startswith(start)]
    assert found, (start, [f["layout"].get("title", {}).get("text") for f in figures(at)])
    return found[0]


def frame(at: AppTest, *columns: str) -> pd.DataFrame:
    """The first table on the page with these columns."""
    for element in at.dataframe:
        if set(columns) <= set(element.value.columns):
            return element.value
    raise AssertionError(f"no table with columns {columns}: {[list(e.value.columns) for e in at.dataframe]}")


def ok(at: AppTest) -> None:
    """No exception element and no error message on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


@pytest.fixture
def zoo_run(explorer_folders) -> Run:
    return Run.open(explorer_folders.run)


@pytest.fixture
def app_at(explorer_folders, monkeypatch) -> AppTest:
    return explorer(monkeypatch, explorer_folders.runs, explorer_folders.saes, run="zoo")


# ----------------------------------------------------------------------------- every page


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_without_errors(app_at, page):
    at = go(app_at, page)
    ok(at)
    assert at.header[0].value == page


def test_runs_page_lists_runs_with_model_tasks_and_date(app_at, explorer_folders, zoo_run):
    ok(app_at)
    table = app_at.dataframe[0].value.set_index("run")
    assert set(table.index) == {"zoo", "repeats"}
    assert table.loc["zoo", "model"] == "zoo-2l" and table.loc["zoo", "tasks"] == "niah, repeats, text"
    assert table.loc["zoo", "created"] == zoo_run.manifest["created"]
    assert table.loc["repeats", "tasks"] == "repeats" and table.loc["repeats", "status"] == "complete"
    shown = metrics(app_at)
    for name, value in zoo_run.manifest["summary"].items():
        want = "n/a" if value != value else str(value) if isinstance(value, int) else f"{value:.3f}"
        assert shown[name] == want, name  # NaN: no sample counted; counts (retrieval_heads) as integers


def test_runs_page_compares_two_runs(app_at, zoo_run, explorer_folders):
    at = app_at.selectbox(key="runs.compare").select("repeats").run()
    at.selectbox(key="runs.compare_score").select("induction").run()
    ok(at)
    other = Run.open(explorer_folders.other).table("head_scores")
    fig = figure_titled(at, "induction: head by head")
    a = zoo_run.table("head_scores").query("score == 'induction' and task == 'repeats'").sort_values(["layer", "head"])
    b = other.query("score == 'induction' and task == 'repeats'").sort_values(["layer", "head"])
    points = fig["data"][0]
    assert points["name"] == "repeats" and len(arr(points["x"])) == len(a) == 8
    np.testing.assert_allclose(arr(points["x"]), a["value"], rtol=1e-6)
    np.testing.assert_allclose(arr(points["y"]), b["value"], rtol=1e-6)
    assert fig["layout"]["xaxis"]["title"]["text"] == "zoo" and fig["layout"]["yaxis"]["title"]["text"] == "repeats"


# ----------------------------------------------------------------------------- head map, head detail


@pytest.mark.parametrize("score", ["induction", "sink", "retrieval"])
def test_head_map_shows_the_score_of_every_head(app_at, zoo_run, score):
    at = go(app_at, "Head map")
    at.selectbox(key="heads.score").select(score).run()
    ok(at)
    hs = zoo_run.table("head_scores").query("score == @score")
    fig = figure_titled(at, f"{score}:")
    maps = [t for t in fig["data"] if t["type"] == "heatmap"]
    assert [t for t in fig["layout"]["annotations"]] and len(maps) == hs["task"].nunique()
    for trace, (_task, rows) in zip(maps, hs.groupby("task", sort=False)):
        grid = rows.pivot(index="layer", columns="head", values="value").to_numpy()
        np.testing.assert_allclose(arr(trace["z"]), grid, rtol=1e-6, equal_nan=True)
    listed = at.dataframe[0].value
    assert list(listed["value"].dropna()) == sorted(hs["value"].dropna(), reverse=True)


def test_choosing_a_head_opens_its_detail(app_at, zoo_run):
    at = go(app_at, "Head map")
    at.selectbox(key="heads.pick_layer").select(1).run()
    at.selectbox(key="heads.pick_head").select(2).run()
    at.button(key="heads.open").click().run()
    ok(at)
    assert at.sidebar.radio(key="page").value == "Head detail"
    assert at.selectbox(key="detail.pick_layer").value == 1 and at.selectbox(key="detail.pick_head").value == 2
    shown = frame(at, "score", "rank", "heads")
    want = head_summary(zoo_run.table("head_scores"), 1, 2)
    pd.testing.assert_frame_equal(shown.reset_index(drop=True), want, check_dtype=False)
    assert at.subheader[0].value == "Head 1.2: every score"


def test_a_clicked_cell_opens_the_head_detail(app_at):
    """What the map's click selection hands the page (checked in a real browser in test_app_browser)."""
    from app.views.heads import clicked_head

    assert clicked_head({"selection": {"points": [{"x": "3", "y": "1", "curve_number": 1}]}}) is None  # dict, no attr
    event = type("Event", (), {"selection": {"points": [{"x": "3", "y": "1"}]}})()
    assert clicked_head(event) == (1, 3)
    assert clicked_head(type("Event", (), {"selection": {"points": []}})()) is None


def test_head_detail_shows_profiles_and_retrieval_of_the_head(app_at, zoo_run):
    at = go(app_at, "Head detail")
    at.selectbox(key="detail.pick_layer").select(1).run()
    at.selectbox(key="detail.pick_head").select(1).run()
    ok(at)
    profiles = zoo_run.table("profiles").query("layer == 1 and head == 1 and statistic == 'sink_mass'")
    fig = figure_titled(at, "head 1.1 by position")
    lines = {t["name"]: t for t in fig["data"] if t["xaxis"] == "x2"}  # the second panel: sink_mass
    assert set(lines) == {f"{t} {n}" for t in ("niah", "repeats", "text") for n in (128, 256)}
    want = profiles.query("task == 'repeats' and length == 256").sort_values("bucket_start")
    np.testing.assert_allclose(arr(lines["repeats 256"]["y"]), want["value"], rtol=1e-6)
    np.testing.assert_array_equal(arr(lines["repeats 256"]["x"]), want["bucket_start"])
    ret = figure_titled(at, "retrieval score of head 1.1")["data"][0]
    grid = (
        zoo_run.table("retrieval")
        .query("layer == 1 and head == 1")
        .pivot(index="depth", columns="length", values="value")
    )
    np.testing.assert_allclose(arr(ret["z"]), grid.to_numpy(), equal_nan=True)
    standing = figure_titled(at, "head 1.1 among all heads")
    assert {t["marker"]["color"] for t in standing["data"]} == {"lightgrey", "crimson"}


def test_head_detail_shows_the_pattern_and_top_keys_on_typed_text(app_at, zoo):
    text = "abcabcabc The secret code of Ada is 4711."
    at = go(app_at, "Head detail")
    at.selectbox(key="detail.pick_layer").select(1).run()
    at.radio(key="detail.source").set_value("your text").run()
    at.text_area(key="detail.text").input(text).run()
    at.button(key="detail.show").click().run()
    ok(at)
    seen = attend(zoo, text)
    pattern = figure_titled(at, "head 1.0: attention pattern")
    z = arr(pattern["data"][0]["z"])
    assert z.shape == (seen.n_tokens, seen.n_tokens)
    np.testing.assert_allclose(z, seen.pattern(1, 0), atol=1e-5)
    np.testing.assert_allclose(z.sum(-1), 1, atol=1e-4)
    assert pattern["layout"]["xaxis"]["ticktext"][:4] == ["<bos>", "a", "b", "c"]
    top = frame(at, "position", "token", "mass")
    want = seen.top_keys(1, 0, 15)
    assert list(top["position"]) == list(want["position"])
    np.testing.assert_allclose(top["mass"], want["mass"], rtol=1e-4)
    stats = frame(at, "position", "entropy", "sink_mass")
    np.testing.assert_allclose(stats["entropy"], seen.head_statistics(1, 0)["entropy"], rtol=1e-4, atol=1e-6)


def test_head_detail_on_a_sample_of_the_run(app_at):
    """The run's own niah sample of 256 tokens: pattern (up to 256 tokens) and keys."""
    at = go(app_at, "Head detail")
    at.selectbox(key="detail.task").select("niah").run()
    at.selectbox(key="detail.length").select(256).run()
    at.button(key="detail.show").click().run()
    ok(at)
    n = [int(c.value.split()[0]) for c in at.caption if c.value.endswith(" tokens")][0]
    assert 240 < n < 256  # 256 tokens with the answer, which the prompt leaves out
    pattern = figure_titled(at, "head 0.0: attention pattern")
    assert arr(pattern["data"][0]["z"]).shape == (n, n)
    keys = frame(at, "position", "token", "mass")
    assert len(keys) == 15 and keys["mass"].is_monotonic_decreasing and (keys["mass"] > 0).all()


# ----------------------------------------------------------------------------- retrieval, ablation, SAEs, live


def test_retrieval_page_shows_needle_accuracy_and_head_scores(app_at, zoo_run):
    at = go(app_at, "Retrieval")
    ok(at)
    summary = zoo_run.manifest["summary"]
    shown = metrics(at)
    assert shown["needle_accuracy"] == f"{summary['needle_accuracy']:.3f}"
    assert shown["needle_accuracy[256]"] == f"{summary['needle_accuracy[256]']:.3f}"
    retrieval = zoo_run.table("retrieval")
    cells = retrieval.drop_duplicates(["length", "depth"]).pivot(index="depth", columns="length", values="accuracy")
    np.testing.assert_allclose(at.dataframe[0].value.to_numpy(), cells.to_numpy())
    needles = figure_titled(at, "needle accuracy")["data"][0]
    np.testing.assert_allclose(arr(needles["z"]), cells.to_numpy())
    at.selectbox(key="retrieval.pick_layer").select(1).run()
    at.selectbox(key="retrieval.pick_head").select(2).run()
    rows = frame(at, "length", "depth", "answered")
    want = retrieval.query("layer == 1 and head == 2")
    np.testing.assert_allclose(rows["value"], want["value"], equal_nan=True)
    assert figure_titled(at, "retrieval score of head 1.2")


def test_ablation_page_shows_what_workbench_ablate_wrote(app_at, zoo_run):
    at = go(app_at, "Ablation")
    ok(at)
    name = zoo_run.manifest["ablations"][0]["table"]
    assert at.selectbox(key="ablation.table").value == name
    table = zoo_run.table(name)
    shown = metrics(at)
    base = float(table.query("selection == 'none'")["value"].iloc[0])
    assert shown["no ablation"] == f"{base:.3f}"
    for row in table.query("selection == 'top'").itertuples():
        assert shown[f"top {row.k} ablated ({row.heads})"] == f"{row.value:.3f}"
    curve = figure_titled(at, "needle_accuracy with heads ablated")
    np.testing.assert_allclose(arr(curve["data"][0]["y"]), table.query("selection == 'top'").sort_values("k")["value"])
    scan_name = [t for t in zoo_run.tables() if t.startswith("scan_")][0]
    at.selectbox(key="ablation.table").select(scan_name).run()
    ok(at)
    scan = zoo_run.table(scan_name)
    heat = figure_titled(at, "needle_accuracy change when ablated alone")["data"][0]
    np.testing.assert_allclose(arr(heat["z"]), scan.pivot(index="layer", columns="head", values="delta").to_numpy())
    assert list(frame(at, "delta")["delta"]) == sorted(scan["delta"])


def test_sae_page_shows_evaluation_attribution_and_top_contexts(app_at, explorer_folders):
    at = go(app_at, "SAE features")
    ok(at)
    sae = SavedSAE.open(explorer_folders.sae)
    shown = metrics(at)
    for name in ("l0", "explained_variance", "ce_loss_recovered", "dead_fraction"):
        assert shown[name] == f"{sae.evaluation[name]:.3f}"
    contexts = sae.table("top_contexts")
    strongest = contexts.groupby("feature")["activation"].max().sort_values(ascending=False)
    features = strongest.index.tolist()
    assert at.selectbox(key="sae.feature").value == features[0]
    for feature in features[:2]:
        at.selectbox(key="sae.feature").select(feature).run()
        ok(at)
        rows = frame(at, "rank", "activation", "context")
        want = contexts.query("feature == @feature").sort_values("rank")
        assert list(rows["context"]) == list(want["context"])
        np.testing.assert_allclose(rows["activation"], want["activation"])
        share = frame(at, "head", "share")
        np.testing.assert_allclose(share["share"], sae.table("head_attribution").query("feature == @feature")["share"])
        direct = figure_titled(at, f"feature {feature}: contribution of each head")["data"][0]
        want_direct = (
            sae.table("direct_attribution")
            .query("feature == @feature")
            .pivot(index="rank", columns="head", values="contribution")
        )
        np.testing.assert_allclose(arr(direct["z"]), want_direct.to_numpy(), rtol=1e-5)


def test_live_page_runs_a_typed_prompt(app_at, zoo):
    text = "The secret code of Bo is 123. The secret code of Bo is"
    at = go(app_at, "Live")
    at.selectbox(key="live.model").select("zoo-2l").run()
    at.text_area(key="live.prompt").input(text).run()
    at.button(key="live.run").click().run()
    at.selectbox(key="live.statistic").select("sink_mass").run()
    ok(at)
    seen = attend(zoo, text)
    assert at.subheader[0].value == f"zoo-2l: {seen.n_tokens} tokens"
    heat = figure_titled(at, "sink_mass")["data"][0]
    want = seen.head_means().query("score == 'sink_mass'").pivot(index="layer", columns="head", values="value")
    np.testing.assert_allclose(arr(heat["z"]), want.to_numpy(), rtol=1e-4)
    assert figure_titled(at, "head 0.0: attention pattern")


def test_live_page_explains_a_model_that_does_not_load(app_at):
    at = go(app_at, "Live")
    at.selectbox(key="live.model").select("another model (type its name)").run()
    at.text_input(key="live.other").input("no such model!").run()  # an invalid hub id: refused without network
    at.button(key="live.run").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "could not load model 'no such model!'" in at.error[0].value
    assert "zoo-2l" in at.error[0].value  # lists what loads offline


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def mixed_runs(explorer_folders, tmp_path) -> Path:
    """A runs folder with one good run (a copy), a run with an unreadable manifest and a run
    whose head scores are damaged."""
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(explorer_folders.run, root / "good", ignore=shutil.ignore_patterns("parts", "figures"))
    (root / "garbled").mkdir()
    (root / "garbled" / "manifest.json").write_text("{ not json")
    shutil.copytree(explorer_folders.other, root / "damaged", ignore=shutil.ignore_patterns("parts", "figures"))
    (root / "damaged" / "head_scores.parquet").write_bytes(b"PAR1 this is not parquet")
    return root


@pytest.mark.parametrize("page", list(PAGES))
def test_a_missing_runs_folder_shows_a_message(monkeypatch, tmp_path, page):
    at = go(explorer(monkeypatch, tmp_path / "nowhere"), page)
    assert not at.exception
    if page not in ("Live", "SAE features"):
        assert any("does not exist" in m.value for m in at.info), [m.value for m in at.info]


@pytest.mark.parametrize("page", list(PAGES))
def test_an_empty_runs_folder_shows_a_message(monkeypatch, tmp_path, page):
    at = go(explorer(monkeypatch, tmp_path), page)
    assert not at.exception and not at.error
    if page not in ("Live", "SAE features"):
        assert any("No readable runs in" in m.value and "workbench score" in m.value for m in at.info)


@pytest.mark.parametrize("page", list(PAGES))
def test_corrupt_runs_show_messages_and_the_good_run_still_works(monkeypatch, mixed_runs, page):
    at = go(explorer(monkeypatch, mixed_runs, run="good"), page)
    assert not at.exception
    warnings = [w.value for w in at.sidebar.warning]
    assert len(warnings) == 1 and warnings[0].startswith("skipped garbled:") and "not readable JSON" in warnings[0]
    assert not at.error
    assert at.sidebar.selectbox(key="run").options == ["damaged (zoo-2l)", "good (zoo-2l)"]
    at.sidebar.selectbox(key="run").select("damaged").run()
    assert not at.exception
    if page in ("Head map", "Head detail"):
        assert len(at.error) == 1 and "is corrupt: cannot read head_scores.parquet" in at.error[0].value


_WATCHED: list[tuple[str, list]] = []  # (folder, hits): what the audit hook records while a test watches


def _audit(event: str, args: tuple) -> None:
    """Record files opened and folders listed under a watched folder (links resolved)."""
    if not _WATCHED or event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    if not isinstance(args[0], (str, bytes, os.PathLike)):
        return  # a file descriptor
    path = os.path.realpath(os.fsdecode(args[0]))
    for folder, hits in _WATCHED:
        if path == folder or path.startswith(folder + os.sep):
            hits.append((event, path))


@contextmanager
def reads_under(folder: Path):
    """The files opened and folders listed under ``folder`` (by any thread of this process)
    while the block runs, through Python's audit hooks (``open``, ``os.listdir``, ``os.scandir``)."""
    if not getattr(sys, "_workbench_audit", False):
        sys.addaudithook(_audit)  # hooks cannot be removed: it does nothing while nothing is watched
        sys._workbench_audit = True
    hits: list = []
    entry = (os.path.realpath(folder), hits)
    _WATCHED.append(entry)
    try:
        yield hits
    finally:
        _WATCHED.remove(entry)


@pytest.fixture
def outside_run(mixed_runs) -> Path:
    """A readable run beside the runs folder (``runs/../outside``): what an escaping name would reach."""
    import shutil

    outside = mixed_runs.parent / "outside"
    shutil.copytree(mixed_runs / "good", outside)
    return outside


LONG = "a" * 5000
#: Run names an address may carry that name no run of the runs folder.
BAD_RUN_NAMES = {
    "..": "..",
    "../runs": "../runs",
    "/etc": "/etc",
    "good/../../runs": "good/../../runs",
    "good/figures": "good/figures",
    "nothing-here": "nothing-here",
    "../outside": "../outside",
    "good/../../outside": "good/../../outside",
    "..%2F..%2Fetc": "..%2F..%2Fetc",
    "..%2Foutside": "..%2Foutside",
    "%2e%2e": "%2e%2e",
    "~": "~",
    "~/": "~/",
    "null-after": "good\x00",
    "null-before": "\x00../outside",
    "5000-chars": LONG,
    "2000-ups": "../" * 2000 + "etc",
}


@pytest.mark.parametrize("name", list(BAD_RUN_NAMES.values()), ids=list(BAD_RUN_NAMES))
def test_run_names_outside_the_runs_folder_are_refused(monkeypatch, mixed_runs, outside_run, name):
    """Escapes (plain, percent-encoded as they arrive when encoded twice, ``~``), null bytes and
    very long names: one message (the name cut short), the first run instead, nothing read outside."""
    with reads_under(outside_run) as reads:
        at = explorer(monkeypatch, mixed_runs, run=name, page="Runs")
    assert not at.exception
    assert len(at.error) == 1 and "is not a run in the runs folder" in at.error[0].value
    assert len(at.error[0].value) < 300  # a 5000-character name is not echoed whole
    assert at.sidebar.selectbox(key="run").value == "damaged"  # the first listed run instead
    assert at.query_params["run"] == "damaged"  # the address no longer holds the refused name
    assert reads == []


def test_a_run_folder_linked_from_outside_is_not_listed_or_read(monkeypatch, mixed_runs, outside_run):
    (mixed_runs / "linked").symlink_to(outside_run, target_is_directory=True)
    with reads_under(outside_run) as reads:
        at = explorer(monkeypatch, mixed_runs, run="linked")
    assert "linked" not in [o.split(" ")[0] for o in at.sidebar.selectbox(key="run").options]
    assert "is not a run in the runs folder" in at.error[0].value
    assert any(w.value.startswith("skipped linked: it links outside the runs folder") for w in at.sidebar.warning)
    assert reads == []  # not even its manifest


@pytest.mark.parametrize(
    "page",
    ["Nope", "head map", "../../etc/passwd", "", "Runs\x00", LONG],
    ids=["Nope", "lower-case", "traversal", "empty", "null", "5000-chars"],
)
def test_unknown_pages_in_the_address_are_refused(monkeypatch, explorer_folders, page):
    at = explorer(monkeypatch, explorer_folders.runs, explorer_folders.saes, run="zoo", page=page)
    assert not at.exception
    assert len(at.error) == 1 and "is not a page of the explorer" in at.error[0].value
    assert len(at.error[0].value) < 300
    assert at.header[0].value == "Runs" and at.sidebar.radio(key="page").value == "Runs"
    assert at.query_params["page"] == "Runs"


def test_inside_accepts_only_folders_directly_in_the_root(tmp_path):
    from app.state import inside

    (tmp_path / "runs" / "a" / "b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "runs"
    assert inside(root, "a") == (root / "a").resolve()
    assert inside(root, ".") == root.resolve()
    for bad in ("", "..", "../elsewhere", str(tmp_path / "elsewhere"), "a/b", "a/../..", "missing", "a\x00"):
        assert inside(root, bad) is None, bad


def test_an_sae_folder_linked_from_outside_is_not_listed_or_read(monkeypatch, explorer_folders, tmp_path):
    import shutil

    saes = tmp_path / "saes"
    shutil.copytree(explorer_folders.sae, saes / "own")
    (saes / "linked").symlink_to(explorer_folders.sae, target_is_directory=True)
    with reads_under(explorer_folders.sae) as reads:
        at = go(explorer(monkeypatch, explorer_folders.runs, saes, run="zoo"), "SAE features")
    assert not at.exception and not at.error
    assert at.selectbox(key="sae.name").options == ["own (zoo-2l, layer 1)"]
    assert [w.value for w in at.warning] == [
        "skipped linked: it links outside the SAE folder, and the explorer reads only folders inside it"
    ]
    assert reads == []


def test_an_empty_saes_folder_or_a_broken_sae_shows_a_message(monkeypatch, explorer_folders, tmp_path):
    saes = tmp_path / "saes"
    (saes / "broken").mkdir(parents=True)
    (saes / "broken" / "cfg.json").write_text("[not a config")
    at = go(explorer(monkeypatch, explorer_folders.runs, saes), "SAE features")
    assert not at.exception and not at.error
    assert [w.value for w in at.warning][0].startswith("skipped broken: the SAE in")
    assert "No SAEs in" in at.info[0].value and "workbench sae train" in at.info[0].value
