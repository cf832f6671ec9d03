"""Export and import of head scores (workbench/interop.py): each format against a small file
written here by hand from the format's description (DuoAttention's full_attention_heads.tsv,
Retrieval_Head's head_score JSON, the kv-table), round trips on a tiny random GQA model's run,
and bad files refused with a WorkbenchError that says what is wrong."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.workbench import test_kv_groups
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.interop import (
    IMPORTED,
    compare_imported,
    export_scores,
    import_scores,
    imported_scores,
    keep_full,
    read_duo,
    read_retrieval_head,
)
from workbench.runs import Run
from workbench.scoring import aggregate
from workbench.scoring.kv_groups import kv_group_scores

runner = CliRunner()
gqa_run = test_kv_groups.gqa_run  # the tiny random GQA model's run (a module fixture)
#: Per-sample retrieval scores of the hand-made run: samples 0 and 2 answered, sample 1 not.
#: Layer 0 heads 0-3, then layer 1; the means are 0.25 0.5 0 0.125 | 1 0.75 0.5 0.5.
SAMPLE_0 = [0.25, 0.5, 0.0, 0.125, 1.0, 0.5, 0.5, 0.5]
SAMPLE_2 = [0.25, 0.5, 0.0, 0.125, 1.0, 1.0, 0.5, 0.5]


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory) -> Run:
    """A complete run of a 2-layer model with 4 query and 2 key/value heads whose parts hold
    the retrieval tallies above (made by hand, no model), its tables aggregated from them."""
    run = Run.create(
        tmp_path_factory.mktemp("hand") / "run",
        {
            "settings": {"model": "hf:someone/gqa", "sink_tokens": 4, "window": 32},
            "status": "running",
            "model_info": {"class": "X", "layers": 2, "heads": 4, "kv_heads": 2},
        },
    )
    for sample, (scores, answered) in enumerate([(SAMPLE_0, 1.0), ([0.0] * 8, 0.0), (SAMPLE_2, 1.0)]):
        rows = [("retrieval", i // 4, i % 4, -1, s * answered, answered) for i, s in enumerate(scores)]
        rows.append(("needle_accuracy", -1, -1, -1, answered, 1.0))
        frame = pd.DataFrame(rows, columns=["name", "layer", "head", "bucket", "total", "count"])
        frame.insert(0, "sample", sample)
        frame.insert(0, "depth", 0.5)
        frame.insert(0, "length", 128)
        frame.insert(0, "task", "niah")
        run.write_part(f"niah-{sample}", frame.astype({"layer": "int32", "head": "int32", "bucket": "int64"}))
    for name, table in aggregate(run.read_parts()).items():
        run.write_table(name, table)
    run.mark_complete()
    return run


@pytest.fixture
def hand_run(hand_made, tmp_path) -> Run:
    """A copy of ``hand_made`` that a test may import into."""
    import shutil

    return Run.open(shutil.copytree(hand_made.path, tmp_path / "run"))


# ----------------------------------------------------------------------------- the formats, by hand


def test_duo_export_is_the_file_duo_attention_reads(hand_run, tmp_path):
    """One line per layer, one tab-separated %.18e value per KV head (numpy savetxt's default),
    here the max over each group's query heads; config.json carries sink_size and recent_size."""
    path, what = export_scores(hand_run, "retrieval", "duo", tmp_path / "pattern")
    assert path == tmp_path / "pattern" / "full_attention_heads.tsv"
    assert path.read_text() == (
        "5.000000000000000000e-01\t1.250000000000000000e-01\n1.000000000000000000e+00\t5.000000000000000000e-01\n"
    )
    config = json.loads((tmp_path / "pattern" / "config.json").read_text())
    assert (config["sink_size"], config["recent_size"]) == (4, 32) and "max over each group's 2" in what
    export_scores(hand_run, "retrieval", "duo", tmp_path / "mean", agg="mean", sink_size=128, recent_size=256)
    assert (tmp_path / "mean" / "full_attention_heads.tsv").read_text() == (
        "3.750000000000000000e-01\t6.250000000000000000e-02\n8.750000000000000000e-01\t5.000000000000000000e-01\n"
    )
    assert json.loads((tmp_path / "mean" / "config.json").read_text())["recent_size"] == 256
    export_scores(hand_run, "retrieval", "duo", tmp_path / "binary", sparsity=0.25)  # the lowest KV head streams
    assert (tmp_path / "binary" / "full_attention_heads.tsv").read_text().split() == [
        "1.000000000000000000e+00",
        "0.000000000000000000e+00",
        "1.000000000000000000e+00",
        "1.000000000000000000e+00",
    ]


def test_a_duo_attention_file_reads_as_gates_per_kv_head(hand_run, tmp_path):
    """A pattern as DuoAttention ships them (written here by hand): its gates, clipped to [0, 1]
    as load_attn_pattern clips them, given to every query head of the KV head."""
    folder = tmp_path / "Model" / "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10"
    folder.mkdir(parents=True)
    (folder / "full_attention_heads.tsv").write_text(
        "6.054687500000000000e-01\t0.000000000000000000e+00\n1.000000000000000000e+00\t1.020000000000000000e+00\n"
    )
    (folder / "config.json").write_text('{"sink_size": 128, "recent_size": 256}')
    np.testing.assert_array_equal(read_duo(folder), [[0.60546875, 0.0], [1.0, 1.0]])
    rows = import_scores(hand_run, folder, "duo", "duo_gates")
    assert list(rows["value"]) == [0.60546875, 0.60546875, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert list(rows["task"].unique()) == ["duo"] and rows["samples"].isna().all()
    imports = hand_run.manifest["imports"]["duo_gates"]
    assert imports["level"] == "kv_head" and imports["format"] == "duo"
    assert imports["sha256"] == hashlib.sha256((folder / "full_attention_heads.tsv").read_bytes()).hexdigest()


def test_retrieval_head_export_is_their_head_score_json(hand_run, tmp_path):
    """One JSON object on one line, "layer-head" keys, each head's scores over the answered
    samples (np.mean of the list is the run's retrieval score)."""
    path, what = export_scores(hand_run, "retrieval", "retrieval-head", tmp_path / "model.json")
    assert path.read_text() == (
        '{"0-0": [0.25, 0.25], "0-1": [0.5, 0.5], "0-2": [0.0, 0.0], "0-3": [0.125, 0.125], '
        '"1-0": [1.0, 1.0], "1-1": [0.5, 1.0], "1-2": [0.5, 0.5], "1-3": [0.5, 0.5]}'
    )
    assert "per-sample" in what
    hs = hand_run.table("head_scores")
    lists = read_retrieval_head(path)
    for r in hs.itertuples():
        assert np.mean(lists[r.layer, r.head]) == pytest.approx(r.value, abs=1e-15) and r.samples == 2


def test_a_retrieval_head_file_reads_as_the_mean_of_each_list(hand_run, tmp_path):
    file = tmp_path / "llama.json"
    file.write_text(
        '{"0-0": [0, 0, 1], "0-1": [0.5, 0.25], "0-2": [], "0-3": [0.1], '
        '"1-0": [1], "1-1": [0.2, 0.4], "1-2": [0], "1-3": [0.3, 0.3, 0.3]}'
    )
    rows = import_scores(hand_run, file, "retrieval-head", "wu_scores").set_index(["layer", "head"])
    assert rows.loc[(0, 0), "value"] == pytest.approx(1 / 3) and rows.loc[(0, 0), "samples"] == 3
    assert rows.loc[(0, 1), "value"] == 0.375 and rows.loc[(1, 1), "value"] == pytest.approx(0.3)
    assert math.isnan(rows.loc[(0, 2), "value"]) and rows.loc[(0, 2), "samples"] == 0  # no answered sample
    assert hand_run.manifest["imports"]["wu_scores"]["level"] == "head"


def test_kv_table_export_and_import(hand_run, tmp_path):
    """layer, kv_head, score, keep_full; keep_full by threshold (value >= it) or by sparsity
    (the lowest share streams)."""
    path, what = export_scores(hand_run, "retrieval", "kv-table", tmp_path / "heads.csv", agg="mean")
    assert path.read_text() == (
        "layer,kv_head,score,keep_full\n0,0,0.375,False\n0,1,0.0625,False\n1,0,0.875,True\n1,1,0.5,True\n"
    )
    assert "keep_full (sparsity 0.5): 2 of 4" in what
    export_scores(hand_run, "retrieval", "kv-table", tmp_path / "heads.parquet", threshold=0.4)
    table = pd.read_parquet(tmp_path / "heads.parquet")
    assert list(table["keep_full"]) == [True, False, True, True] and list(table["score"]) == [0.5, 0.125, 1.0, 0.5]
    (tmp_path / "theirs.csv").write_text("kv_head,layer,score\n1,0,0.9\n0,0,0.1\n0,1,0.2\n1,1,0.3\n")
    rows = import_scores(hand_run, tmp_path / "theirs.csv", "kv-table", "press")
    assert list(rows["value"]) == [0.1, 0.1, 0.9, 0.9, 0.2, 0.2, 0.3, 0.3]


def test_keep_full_rules():
    values = np.array([[0.3, 0.1], [0.3, 0.9]])
    assert keep_full(values, threshold=0.3).tolist() == [[True, False], [True, True]]
    assert keep_full(values, sparsity=0.5).tolist() == [[False, False], [True, True]]  # a tie goes in head order
    assert keep_full(values, sparsity=0.0).all() and not keep_full(values, sparsity=1.0).any()


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("fmt", "out", "score", "options"),
    [
        ("duo", "pattern", "sink", {}),
        ("duo", "pattern", "entropy", {"rescale": True, "agg": "mean"}),
        ("kv-table", "heads.parquet", "entropy", {"agg": "mean"}),
        ("kv-table", "heads.csv", "sink", {"invert": True}),
        ("retrieval-head", "heads.json", "previous_token", {}),
    ],
)
def test_export_then_import_gives_the_same_values(gqa_run, tmp_path, fmt, out, score, options):
    """On a tiny random GQA model's run: the imported values equal the exported ones, per KV head
    (duo, kv-table: the chosen aggregate of each group) or per query head (retrieval-head)."""
    import shutil

    run = Run.open(shutil.copytree(gqa_run.path, tmp_path / "run"))
    before = run.manifest["tables"]["head_scores"]
    export_scores(run, score, fmt, tmp_path / out, task="text", **options)
    import_scores(run, tmp_path / out, fmt, "back")
    got = imported_scores(run)
    rows = run.table("head_scores").query("score == @score and task == 'text'").reset_index(drop=True)
    values = rows["value"].to_numpy()
    if options.get("rescale"):
        values = (values - values.min()) / (values.max() - values.min())
    if options.get("invert"):
        values = 1 - values
    if fmt == "retrieval-head":
        np.testing.assert_allclose(got["value"], values, rtol=1e-15)
    else:
        want = kv_group_scores(rows.assign(value=values), 2, 4)[options.get("agg", "max")]
        back = kv_group_scores(got, 2, 4)
        np.testing.assert_allclose(back["max"], want, rtol=1e-15)
        np.testing.assert_array_equal(back["max"], back["mean"])  # one value per KV head
    assert run.manifest["tables"]["head_scores"] == before  # the run's own table untouched
    if not options.get("invert"):  # (inverted: the max of 1 - value is 1 - the group's min, not its max)
        agree = compare_imported(run, "back", agg=options.get("agg", "max")).set_index(["score", "task"])
        assert agree.loc[(score, "text"), "spearman"] == pytest.approx(1.0)


def test_imports_replace_their_own_name_and_keep_others(hand_run, tmp_path):
    export_scores(hand_run, "retrieval", "kv-table", tmp_path / "a.csv")
    import_scores(hand_run, tmp_path / "a.csv", "kv-table", "first")
    import_scores(hand_run, tmp_path / "a.csv", "kv-table", "second")
    import_scores(hand_run, tmp_path / "a.csv", "kv-table", "first")
    table = Run.open(hand_run.path).table(IMPORTED)
    assert table["score"].value_counts().to_dict() == {"first": 8, "second": 8}


# ----------------------------------------------------------------------------- bad input


def _file(tmp_path, name: str, text: str):
    (tmp_path / name).write_text(text)
    return tmp_path / name


BAD_FILES = {
    "duo-three-layers": (
        "duo",
        "p.tsv",
        "1\t0\n1\t0\n1\t0\n",
        "has 3 lines \\(layers\\); this run's model has 2 layers",
    ),
    "duo-per-query-head": (
        "duo",
        "p.tsv",
        "1\t0\t1\t0\n1\t0\t1\t0\n",
        "has 4 values per line .*one per query head.*2 key/value heads per layer",
    ),
    "duo-ragged": ("duo", "p.tsv", "1\t0\n1\n", "malformed: its lines hold 1 and 2 tab-separated values"),
    "duo-word": ("duo", "p.tsv", "1\tx\n1\t0\n", "line 1: 'x' is not a number"),
    "duo-empty": ("duo", "p.tsv", "\n", "holds no values"),
    "rh-not-json": ("retrieval-head", "r.json", '{"0-0": [1]', "not readable JSON"),
    "rh-list": ("retrieval-head", "r.json", "[1, 2]", "a JSON object"),
    "rh-key": ("retrieval-head", "r.json", '{"0_0": [1]}', "key '0_0' is not \"<layer>-<head>\""),
    "rh-values": ("retrieval-head", "r.json", '{"0-0": 0.5}', "'0-0' holds 0.5, not a list of finite numbers"),
    "rh-twice": ("retrieval-head", "r.json", '{"0-0": [1], "0-0": [2]}', "0-0 appear more than once"),
    "rh-missing": ("retrieval-head", "r.json", '{"0-0": [1], "1-3": [0]}', "no scores for 6 of this run's 8 heads"),
    "rh-outside": ("retrieval-head", "r.json", '{"0-4": [1]}', "scores head 0-4, outside this run's model"),
    "kv-column": ("kv-table", "t.csv", "layer,head,score\n0,0,1\n", "has no kv_head column"),
    "kv-twice": (
        "kv-table",
        "t.csv",
        "layer,kv_head,score\n0,0,1\n0,0,1\n0,1,1\n1,0,1\n1,1,1\n",
        "layer 0 kv_head 0 appears 2 times",
    ),
    "kv-missing": ("kv-table", "t.csv", "layer,kv_head,score\n0,0,1\n1,1,1\n", "no row for layer 0 kv_head 1"),
    "kv-text": (
        "kv-table",
        "t.csv",
        "layer,kv_head,score\n0,0,high\n",
        "score 'high' \\(row 1\\) is not a finite number",
    ),
    "kv-suffix": ("kv-table", "t.txt", "layer,kv_head,score\n", "a .csv or a .parquet file"),
    "kv-parquet": ("kv-table", "t.parquet", "not parquet", "not a readable parquet table"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_refused_with_what_is_wrong(hand_run, tmp_path, case):
    fmt, name, text, message = BAD_FILES[case]
    before = sorted(p.name for p in hand_run.path.iterdir())
    with pytest.raises(WorkbenchError, match=message):
        import_scores(hand_run, _file(tmp_path, name, text), fmt, "theirs")
    assert sorted(p.name for p in hand_run.path.iterdir()) == before and not hand_run.has_table(IMPORTED)


def test_bad_requests_are_refused(hand_run, gqa_run, tmp_path):
    refusals = [
        (lambda: export_scores(hand_run, "induction", "duo", tmp_path / "x"), "has no score 'induction'"),
        (lambda: export_scores(hand_run, "retrieval", "onnx", tmp_path / "x"), "unknown format 'onnx'"),
        (lambda: export_scores(gqa_run, "sink", "duo", tmp_path / "x"), "scored on the tasks repeats, text: choose"),
        (lambda: export_scores(gqa_run, "entropy", "duo", tmp_path / "x", task="text"), "add --rescale"),
        (lambda: export_scores(hand_run, "retrieval", "duo", tmp_path / "x.tsv"), "reads a folder"),
        (lambda: export_scores(hand_run, "retrieval", "retrieval-head", tmp_path / "x", agg="mean"), "do not apply"),
        (
            lambda: export_scores(hand_run, "retrieval", "kv-table", tmp_path / "x.csv", threshold=0.5, sparsity=0.5),
            "not both",
        ),  # fmt: skip
        (lambda: export_scores(hand_run, "retrieval", "kv-table", tmp_path / "x.csv", sparsity=2.0), "in \\[0, 1\\]"),
        (lambda: export_scores(hand_run, "retrieval", "kv-table", tmp_path / "x.csv", agg="median"), "--agg"),
        (lambda: import_scores(hand_run, tmp_path / "none.tsv", "duo", "a"), "does not exist"),
        (lambda: import_scores(hand_run, tmp_path / "none.tsv", "duo", "retrieval"), "a score 'retrieval' of its own"),
        (lambda: import_scores(hand_run, tmp_path / "none.tsv", "duo", "1st try"), "--name '1st try'"),
        (lambda: compare_imported(hand_run, "never"), "no imported score 'never'"),
    ]
    for call, message in refusals:
        with pytest.raises(WorkbenchError, match=message):
            call()
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.csv").exists()


def test_the_commands(hand_run, tmp_path):
    out = tmp_path / "pattern"
    result = runner.invoke(app, ["export", "--run", str(hand_run.path), "--score", "retrieval", "--format", "duo",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (out / "full_attention_heads.tsv").is_file()
    result = runner.invoke(
        app,
        ["import", str(out), "--format", "duo", "--run", str(hand_run.path), "--name", "gates"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "imported gates (duo, per kv head) for 8 query heads" in result.output
    assert "retrieval" in result.output and "+1.00" in result.output  # its own source agrees perfectly
    result = runner.invoke(app, ["import", str(out), "--format", "tsv", "--run", str(hand_run.path), "--name", "g"])
    assert result.exit_code == 2 and "unknown format 'tsv'" in result.output
