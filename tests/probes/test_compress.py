"""The KV-cache compression what-if (``probes.compress``): the direction rule and its refusals;
KV groups of a grouped-query model stream whole (the group's score is its max / min, and the
streaming heads equal a float64 model with the restriction as an explicit mask); a set of
streaming KV heads equals ``instrument(model, streaming=StreamingAttention(heads=mask))`` and
share 0 equals the uninstrumented model; the random control is seeded, nested and differs
between draws; the memory table matches an explicit count; the planted model as the known case
(streaming its copying head destroys needle accuracy, streaming by the retrieval ranking keeps
it); the figure; ``workbench compress``. Each classifier's heads side by side
(``probes.compress_classifiers``): the KV heads a classifier streams (a GQA group stays full if
one of its query heads is kept), the random control as ``choices`` draws it, each row equal to
the per-set measurement ``compress`` uses and to an explicit streaming forward, the planted model
(Wu's set keeps every needle, streaming the copying head loses them), ``workbench compress
--classifiers``. Sliding-window layers: never candidates (ranking, shares, draws, classifiers),
their cache counted as their window; a local/global TransformerLens model compressed end to end
against a float64 explicit mask."""

from __future__ import annotations

import math
import random
import shutil

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from probes.cli import register
from probes.compress import (
    DIRECTIONS,
    FOLDER,
    CompressionSettings,
    KVLayout,
    choices,
    compress,
    compressions,
    direction_for,
    kv_count,
    kv_layout,
    kv_memory,
    read_compression,
    run_compression,
    stream_order,
    streaming_for,
    text_ids,
    workload,
)
from probes.compress_classifiers import classifier_sets, compare_classifiers, random_sets
from tests.workbench.test_instrument_transformer_lens import tiny_model
from tests.workbench.test_streaming_models import local_global_model, tl_float64_logits
from workbench import instrument
from workbench.adapters.streaming import StreamingAttention
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.plots import compression_curve
from workbench.runs import RUN_FOLDERS, Run
from workbench.scoring import ScoreRunSettings, score_model
from workbench.scoring.classifiers import COLUMNS as CLASSIFIER_COLUMNS
from workbench.tasks import needle_samples
from workbench.zoo.planted import ROLES, planted

CONTEXT = 256  # the planted model's context = the needle length: decoding stops after the answer
COPYING = ROLES["induction"]  # the planted copying (retrieval) head; every KV head is one query head
NEEDLES = dict(tasks=("niah",), lengths=(CONTEXT,), depths=(0.25, 0.5), samples=1, sink=4, window=32)


@pytest.fixture(autouse=True)
def _no_png(monkeypatch):
    """PNG export starts a browser per call (seconds); the HTML figures are still written."""
    import plotly.io as pio

    def refuse(*args, **kwargs):
        raise RuntimeError("PNG export switched off in these tests")

    monkeypatch.setattr(pio, "write_images", refuse)


@pytest.fixture(scope="module")
def model():
    return planted(context=CONTEXT)


@pytest.fixture(scope="module")
def scored(model, tmp_path_factory):
    """The planted model scored on needles (retrieval and streaming)."""
    settings = ScoreRunSettings(
        model=f"planted:{CONTEXT}",
        tasks=("niah",),
        scores=("retrieval", "streaming"),
        lengths=(CONTEXT,),
        samples=1,
        depths=(0.3,),
        backend="reference",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("workbench.plots.save_figures", lambda figures, folder: [])
        return score_model(model, settings, tmp_path_factory.mktemp("planted") / "run", progress=False)


# ----------------------------------------------------------------------------- direction and settings


def test_the_direction_rule_and_its_refusals():
    assert direction_for("retrieval") == direction_for("induction") == "lowest"
    assert direction_for("streaming") == direction_for("sink") == "highest"
    assert direction_for("retrieval", "highest") == "highest" and direction_for("entropy", "lowest") == "lowest"
    assert direction_for("duo") == "lowest"  # DuoAttention's gate: low gates stream
    assert {d for d, _ in DIRECTIONS.values()} == {"highest", "lowest"} and "entropy" not in DIRECTIONS
    with pytest.raises(WorkbenchError, match="'entropy' has no defined compression direction.*--stream highest"):
        CompressionSettings(rank_by="entropy")
    assert CompressionSettings(rank_by="entropy", stream="lowest").name == "entropy_lowest"
    assert CompressionSettings().name == "retrieval_lowest"
    for kwargs, match in (
        ({"stream": "up"}, "stream must be 'highest' or 'lowest'"),
        ({"shares": (0.5, 1.5)}, r"shares are fractions of the KV heads in \[0, 1\]"),
        ({"shares": ()}, "shares are fractions"),
        ({"tasks": ("repeats",)}, "tasks must be among niah, text"),
        ({"draws": -1}, "draws must be an integer >= 0"),
        ({"window": 0}, "window must be an integer >= 1"),
        ({"lengths": (4,)}, "lengths must be at least 8 tokens"),
        ({"backend": "cuda"}, "unknown kernel backend"),
    ):
        with pytest.raises(WorkbenchError, match=match):
            CompressionSettings(**kwargs)
    assert CompressionSettings(shares=(0.5, 0.25, 0.5)).shares == (0.25, 0.5)
    assert [kv_count(s, 12) for s in (0.0, 1 / 24, 0.25, 0.5, 1.0)] == [0, 1, 3, 6, 12]


def test_the_ranking_direction_decides_which_heads_stream_first():
    layout = KVLayout(layers=2, heads=2, kv_heads=2, d_head=4, dtype="float32", itemsize=4)
    scores = pd.DataFrame(
        {"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "value": [0.9, 0.1, float("nan"), 0.5]}
    )  # fmt: skip
    low = stream_order(scores, layout, "lowest")
    assert list(zip(low["layer"], low["kv_head"])) == [(0, 1), (1, 1), (0, 0), (1, 0)]  # NaN last
    high = stream_order(scores, layout, "highest")
    assert list(zip(high["layer"], high["kv_head"])) == [(0, 0), (1, 1), (0, 1), (1, 0)]
    assert list(low["rank"]) == [0, 1, 2, 3]
    with pytest.raises(WorkbenchError, match="every head of the model once"):
        stream_order(scores.iloc[:3], layout, "lowest")
    with pytest.raises(WorkbenchError, match="NaN for every head"):
        stream_order(scores.assign(value=float("nan")), layout, "lowest")


# ----------------------------------------------------------------------------- grouped-query attention


def test_kv_groups_stream_whole_and_rank_by_their_max_or_min():
    """A TransformerLens model with 4 query heads on 2 KV heads per layer: a KV group's value is
    the max (lowest first) or min (highest first) of its query heads'; streaming KV head k makes
    query heads 2k and 2k+1 streaming heads, and the logits equal a float64 model hiding those
    heads' keys by an explicit mask."""
    gqa = tiny_model("rotary-gqa")
    layout = kv_layout(gqa)
    assert (layout.layers, layout.heads, layout.kv_heads, layout.group, layout.d_head) == (2, 4, 2, 2, 16)
    assert layout.dtype == "float32" and layout.itemsize == 4
    values = [0.3, 0.8, 0.5, 0.4, 0.1, 0.2, 0.9, 0.0]  # [layer 0 heads 0-3, layer 1 heads 0-3]
    scores = pd.DataFrame({"layer": [0] * 4 + [1] * 4, "head": [0, 1, 2, 3] * 2, "value": values})
    low = stream_order(scores, layout, "lowest")  # group max: (0,0) 0.8, (0,1) 0.5, (1,0) 0.2, (1,1) 0.9
    assert list(zip(low["layer"], low["kv_head"], low["value"])) == [(1, 0, 0.2), (0, 1, 0.5), (0, 0, 0.8), (1, 1, 0.9)]
    high = stream_order(scores, layout, "highest")  # group min: 0.3, 0.4, 0.1, 0.0
    assert list(zip(high["layer"], high["kv_head"])) == [(0, 1), (0, 0), (1, 0), (1, 1)]
    assert list(low["query_heads"]) == ["0 1", "2 3", "0 1", "2 3"]

    chosen = [(0, 1), (1, 0)]
    explicit = torch.zeros(2, 4, dtype=torch.bool)
    explicit[0, 2] = explicit[0, 3] = explicit[1, 0] = explicit[1, 1] = True
    streaming = streaming_for(layout, chosen, sink=2, window=6)
    assert torch.equal(streaming.head_mask(2, 4), explicit)
    ids = torch.randint(0, gqa.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    want = tl_float64_logits(gqa, ids, StreamingAttention(window=6, keep_first=2, heads=explicit))
    with torch.no_grad(), instrument(gqa, backend="reference", streaming=streaming):
        got = gqa(ids)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-4)
    assert streaming_for(layout, [], 2, 6) is None
    with pytest.raises(WorkbenchError, match="out of range"):
        layout.mask([(0, 2)])


# ----------------------------------------------------------------------------- a set of heads = instrument


def test_each_set_equals_instrument_with_its_mask_and_share_zero_the_plain_model(zoo):
    settings = CompressionSettings(
        rank_by="streaming", shares=(0.5,), tasks=("text",), lengths=(96,), text_samples=2,
        sink=2, window=16, draws=2, backend="reference", seed=3,
    )  # fmt: skip
    layout = kv_layout(zoo)
    scores = pd.DataFrame(
        [(layer, head, float(v)) for (layer, head), v in zip(
            [(l, h) for l in range(layout.layers) for h in range(layout.heads)],
            torch.rand(layout.layers * layout.heads, generator=torch.Generator().manual_seed(0)),
        )],
        columns=["layer", "head", "value"],
    )  # fmt: skip
    found = compress(zoo, scores, settings, progress=False)
    ids = text_ids(zoo, settings.resolved())
    assert ids.shape == (2, 96)
    summary = found.summary.set_index(["policy", "draw", "share"])
    assert len(summary) == 1 + 1 + 2
    with torch.no_grad():
        plain = zoo(ids).double()
    plain_loss = torch.nn.functional.cross_entropy(plain[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    base = summary.loc[("none", 0, 0.0)]
    assert base["kv_heads"] == 0 and abs(base["text_loss"] - float(plain_loss.mean())) < 1e-4
    assert abs(base["text_loss_past_window"] - float(plain_loss[:, 18:].mean())) < 1e-4
    differs = 0
    for (policy, draw, share), group in found.heads.groupby(["policy", "draw", "share"]):
        mask = torch.zeros(layout.layers, layout.heads, dtype=torch.bool)
        for row in group.itertuples():
            mask[row.layer, [int(h) for h in row.query_heads.split()]] = True
        assert int(mask.sum()) == kv_count(share, layout.total) * layout.group
        with torch.no_grad(), instrument(zoo, backend="reference", streaming=StreamingAttention(16, 2, heads=mask)):
            logits = zoo(ids).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        row = summary.loc[(policy, draw, share)]
        assert abs(row["text_loss"] - float(loss.double().mean())) < 1e-5
        assert abs(row["text_loss_past_window"] - float(loss[:, 18:].double().mean())) < 1e-5
        differs += abs(row["text_loss_past_window"] - base["text_loss_past_window"]) > 1e-3
    assert differs > 0, "streaming changes the loss"
    text = found.text.set_index(["policy", "draw", "share", "region"])
    assert text.loc[("none", 0, 0.0, "past_window"), "tokens"] == 2 * (95 - 18)
    ranked = found.heads[found.heads["policy"] == "ranked"]
    order = list(zip(found.order["layer"], found.order["kv_head"]))
    for share, group in ranked.groupby("share"):  # the ranking's prefix: highest streaming score first
        assert list(zip(group["layer"], group["kv_head"])) == order[: kv_count(share, layout.total)]
    assert found.order["value"].is_monotonic_decreasing


def test_random_draws_are_seeded_nested_and_differ():
    layout = KVLayout(layers=3, heads=8, kv_heads=4, d_head=8, dtype="float32", itemsize=4)
    order = layout.all_kv()[::-1]
    sets = choices(order, layout, (0.25, 0.5, 1.0), draws=4, seed=7)
    assert sets == choices(order, layout, (0.25, 0.5, 1.0), draws=4, seed=7)
    assert sets != choices(order, layout, (0.25, 0.5, 1.0), draws=4, seed=8)
    assert sets[0].policy == "none" and sets[0].kv_heads == ()
    random = [c for c in sets if c.policy == "random"]
    assert {(c.draw, c.seed) for c in random} == {(d, 7 + d) for d in range(4)}
    quarter = [frozenset(c.kv_heads) for c in random if c.share == 0.25]
    assert len(set(quarter)) > 1 and all(len(s) == 3 for s in quarter)
    for d in range(4):
        mine = {c.share: set(c.kv_heads) for c in random if c.draw == d}
        assert mine[0.25] <= mine[0.5] <= mine[1.0] == set(layout.all_kv())
    ranked = {c.share: c.kv_heads for c in sets if c.policy == "ranked"}
    assert ranked[0.5] == tuple(order[:6])
    with pytest.raises(WorkbenchError, match="rounds to none"):
        choices(order, layout, (0.01,), draws=1, seed=0)


# ----------------------------------------------------------------------------- memory


def test_memory_saved_matches_an_explicit_count():
    layout = KVLayout(layers=3, heads=8, kv_heads=2, d_head=16, dtype="bfloat16", itemsize=2)
    sink, window, lengths = 4, 64, (10, 68, 69, 300)
    table = kv_memory(layout, [(0.0, 0), (0.5, 3)], lengths, sink, window).set_index(["share", "length"])
    streaming = {(0, 0), (1, 1), (2, 0)}
    for length in lengths:
        kept = 0
        for layer in range(3):
            for kv in range(2):
                for j in range(length):  # the cache at the end of the sequence: key j still held?
                    kept += (layer, kv) not in streaming or j < sink or length - 1 - j < window
        row = table.loc[(0.5, length)]
        assert row["entries"] == 3 * 2 * length and row["entries_kept"] == kept
        assert math.isclose(row["saved_fraction"], 1 - kept / (6 * length))
        assert row["bytes_saved"] == (6 * length - kept) * 2 * 16 * 2 and row["bytes"] == 6 * length * 64
        assert table.loc[(0.0, length), "saved_fraction"] == 0
    assert table.loc[(0.5, 10), "saved_fraction"] == 0 and table.loc[(0.5, 300), "kept_per_head"] == 68


# ----------------------------------------------------------------------------- the planted model


def test_planted_model_streaming_its_copying_head_destroys_the_needle(model, scored):
    """The copying head (2, 0) is the only head the needle needs: streaming by the retrieval
    ranking (lowest first) keeps it to the last and keeps accuracy 1; a random set fails exactly
    when it holds that head; streaming the highest retrieval head alone fails every needle."""
    for sample in needle_samples(model.tokenizer, [CONTEXT], [0.25, 0.5], 1, seed=10_000):
        assert len(sample.ids) - sample.needle.stop > NEEDLES["sink"] + NEEDLES["window"], "needle inside the window"
    settings = CompressionSettings(rank_by="retrieval", shares=(0.25, 0.75), draws=2, backend="reference", **NEEDLES)
    found = run_compression(scored, model, settings, progress=False)
    assert found.order.iloc[-1][["layer", "kv_head", "value"]].tolist() == [*COPYING, 1.0]
    summary = found.summary
    assert summary[summary["policy"] != "random"]["needle_accuracy"].tolist() == [1.0, 1.0, 1.0]
    random = found.heads[found.heads["policy"] == "random"]
    holds = random.groupby(["draw", "share"]).apply(
        lambda g: bool(((g["layer"] == COPYING[0]) & (g["kv_head"] == COPYING[1])).any()), include_groups=False
    )
    for row in summary[summary["policy"] == "random"].itertuples():
        assert row.needle_accuracy == (0.0 if holds[(row.draw, row.share)] else 1.0)
    assert holds.any(), "some random draw streams the copying head"
    assert summary["text_loss"].isna().all() and found.text.empty
    needles = found.needles
    assert set(needles["length"]) == {CONTEXT} and set(needles["depth"]) == {0.25, 0.5}

    run = Run.open(scored.path)
    assert [c["name"] for c in compressions(run)] == ["retrieval_lowest"]
    tables = read_compression(run, "retrieval_lowest")
    pd.testing.assert_frame_equal(tables["summary"], found.summary)
    assert (scored.path / "compress" / "retrieval_lowest.html").exists()
    assert (scored.path / "compress" / "retrieval_lowest_summary.csv").exists()

    worst = CompressionSettings(rank_by="retrieval", stream="highest", shares=(1 / 12,), draws=0, **NEEDLES)
    found = run_compression(scored, model, worst, progress=False)
    (streamed,) = found.heads[["layer", "kv_head"]].itertuples(index=False)
    assert tuple(streamed) == COPYING
    assert found.summary["needle_accuracy"].tolist() == [1.0, 0.0]
    assert [c["name"] for c in compressions(Run.open(scored.path))] == ["retrieval_lowest", "retrieval_highest"]

    with pytest.raises(WorkbenchError, match="already holds the compression 'retrieval_highest'.*--force"):
        run_compression(scored, model, CompressionSettings(**{**worst.to_dict(), "seed": 1}), progress=False)
    again = run_compression(scored, model, worst, progress=False)
    assert again.notes and "replaced" in again.notes[0]


# ----------------------------------------------------------------------------- figure and command


def test_the_figure_draws_ranked_against_random_from_the_uncompressed_model():
    summary = pd.DataFrame(
        [("none", 0, 0.0, 0, 1.0, 2.0, 2.5), ("ranked", 0, 0.5, 2, 0.9, 2.1, 2.6),
         ("random", 0, 0.5, 2, 0.4, 2.4, 3.0), ("random", 1, 0.5, 2, 0.6, 2.2, 2.8)],
        columns=["policy", "draw", "share", "kv_heads", "needle_accuracy", "text_loss", "text_loss_past_window"],
    )  # fmt: skip
    fig = compression_curve(summary, "retrieval")
    traces = {(t.name, t.xaxis): t for t in fig.data}
    ranked, rand = traces[("by retrieval", "x")], traces[("random (mean, range)", "x")]
    assert list(ranked.x) == [0.0, 0.5] and list(ranked.y) == [1.0, 0.9]
    assert list(rand.y) == [1.0, 0.5] and list(rand.error_y.array) == pytest.approx([0.0, 0.1])
    assert list(traces[("random (mean, range)", "x2")].y) == pytest.approx([2.5, 2.9])
    assert [a.text for a in fig.layout.annotations] == ["needle accuracy", "text loss past window"]
    only_text = compression_curve(summary.assign(needle_accuracy=float("nan")), "retrieval")
    assert [a.text for a in only_text.layout.annotations] == ["text loss past window"]


def test_compress_command(scored, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(scored.path, run, ignore=shutil.ignore_patterns("compress"))
    copy = Run.open(run)  # without the compressions another test may have added
    copy.manifest.pop("compressions", None)
    copy.manifest["tables"] = {k: v for k, v in copy.manifest["tables"].items() if not k.startswith("compress/")}
    copy.save_manifest()
    register(app)
    runner = CliRunner()
    base = ["compress", "--run", str(run), "--device", "cpu", "--backend", "reference", "--window", "32"]
    needles = ["--task", "niah", "--length", str(CONTEXT), "--depths", "0.25", "--samples", "1"]
    rank = ["--rank-by", "retrieval"]
    result = runner.invoke(app, [*base, *rank, *needles, "--share", "0.25", "--draws", "1"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "needle acc. ranked" in text and "uncompressed: needle acc. 1.000" in text and "compress" in text
    summary = Run.open(run).table("compress/retrieval_lowest_summary")
    assert list(summary["policy"]) == ["none", "ranked", "random"] and list(summary["kv_heads"]) == [0, 3, 3]
    for args, message in (
        (["--rank-by", "entropy"], "'entropy' has no defined compression direction"),
        (["--rank-by", "sink", "--stream", "highest"], "no 'sink' score"),
        ([*rank, "--share", "1.5"], "shares are fractions"),
        ([*rank, "--share", "x"], "--share must be comma-separated numbers"),
        ([*rank, *needles, "--share", "0.5"], "pass --force to replace it"),
        ([*rank, "--task", "text", "--text-length", "30", "--force"], "no position past sink + window"),
        (["--share", "0.5"], "give --rank-by SCORE"),
        ([*rank, "--classifiers"], "not both"),
    ):
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)
    Run.open(run).clear()  # what `workbench score --force` does first: the compressions go with the run
    assert FOLDER in RUN_FOLDERS and not (run / FOLDER).exists()


# ----------------------------------------------------------------------------- each classifier's heads


def _classified(keep: dict[str, set[tuple[int, int]]], layers: int, heads: int) -> pd.DataFrame:
    """A classifier table as ``classify`` returns it, by hand: ``keep[name]`` the query heads kept full."""
    return pd.DataFrame(
        [(name, layer, head, float((layer, head) in full), (layer, head) in full, "")
         for name, full in keep.items() for layer in range(layers) for head in range(heads)],
        columns=CLASSIFIER_COLUMNS,
    )  # fmt: skip


def test_classifier_sets_stream_the_kv_heads_none_of_whose_query_heads_is_kept():
    planted_layout = KVLayout(layers=3, heads=4, kv_heads=4, d_head=8, dtype="float32", itemsize=4)
    table = _classified({"wu": {COPYING}, "razor": {COPYING, (2, 1)}, "none_kept": set()}, 3, 4)
    sets = classifier_sets(table, planted_layout)
    assert list(sets) == ["wu", "razor", "none_kept"]
    everyone = [(layer, kv) for layer in range(3) for kv in range(4)]
    assert sets["wu"] == tuple(kv for kv in everyone if kv != COPYING)
    assert sets["razor"] == tuple(kv for kv in everyone if kv not in {(2, 0), (2, 1)})
    assert sets["none_kept"] == tuple(everyone)

    # GQA: 4 query heads on 2 KV heads; a group stays full when any one of its query heads is kept
    gqa = KVLayout(layers=2, heads=4, kv_heads=2, d_head=8, dtype="float32", itemsize=4)
    table = _classified({"one": {(0, 1), (1, 3)}, "both_of_a_group": {(1, 0), (1, 1)}, "all": set()}, 2, 4)
    table.loc[table["classifier"] == "all", "keep_full"] = True
    sets = classifier_sets(table, gqa)
    assert sets["one"] == ((0, 1), (1, 0))  # (0, 0) holds query head 1, (1, 1) holds query head 3
    assert sets["both_of_a_group"] == ((0, 0), (0, 1), (1, 1))
    assert sets["all"] == ()

    with pytest.raises(WorkbenchError, match="'wu' classifier's rows must hold every head of the model once"):
        classifier_sets(_classified({"wu": {COPYING}}, 3, 4).iloc[1:], planted_layout)
    with pytest.raises(WorkbenchError, match="every head of the model once"):
        classifier_sets(_classified({"wu": {COPYING}}, 3, 4), gqa)
    with pytest.raises(WorkbenchError, match="lacks the columns"):
        classifier_sets(table.drop(columns="keep_full"), gqa)


def test_random_sets_are_the_draws_compress_makes():
    layout = KVLayout(layers=3, heads=8, kv_heads=4, d_head=8, dtype="float32", itemsize=4)
    everyone = layout.all_kv()
    for n in (1, 5, 12):
        found = random_sets(layout, n, draws=3, seed=11)
        assert [seed for seed, _ in found] == [11, 12, 13]
        for seed, heads in found:  # the first n of random.Random(seed + draw)'s order, as choices draws
            assert heads == tuple(random.Random(seed).sample(everyone, len(everyone))[:n])
        drawn = [c.kv_heads for c in choices(everyone, layout, (n / 12,), 3, 11) if c.policy == "random"]
        assert [heads for _, heads in found] == drawn
    assert random_sets(layout, 0, draws=2, seed=0) == [(0, ()), (1, ())]


def test_compare_classifiers_measures_each_set_as_compress_does(model):
    """On the planted model: Wu's set (every KV head but the copying head) keeps needle accuracy
    1.0; a set streaming the copying head alone loses every needle. Each row equals
    Workload.measure (compress's per-set measurement) of the same set and an explicit
    instrument(..., StreamingAttention) forward; the random control (text only, to stay fast)
    equals the same seeded draw measured alone."""
    small = dict(lengths=(CONTEXT,), depths=(0.5,), samples=1, text_samples=1, text_length=80, sink=4, window=32,
                 seed=0, backend="reference")  # fmt: skip
    ignored = dict(rank_by="entropy", stream="lowest", shares=(0.1,))  # no meaning here: not read
    settings = CompressionSettings(tasks=("niah", "text"), draws=0, **small, **ignored)
    everyone = kv_layout(model).all_kv()
    table = _classified({"wu": {COPYING}, "all_but_copying": {kv for kv in everyone if kv != COPYING}}, 3, 4)
    found = compare_classifiers(model, table, settings, progress=False)
    summary = found.summary.set_index("classifier")
    assert list(summary.index) == ["none", "wu", "all_but_copying"]
    base = summary.loc["none"]
    assert [base["heads_full"], base["kv_heads_full"], base["kv_heads_streamed"], base["needle_accuracy"]] == [
        12, 12, 0, 1.0
    ]  # fmt: skip
    wu, worst = summary.loc["wu"], summary.loc["all_but_copying"]
    assert (wu["heads_full"], wu["kv_heads_full"], wu["kv_heads_streamed"]) == (1, 1, 11)
    assert wu["kv_share"] == pytest.approx(11 / 12) and worst["kv_heads_streamed"] == 1
    assert wu["needle_accuracy"] == 1.0 and worst["needle_accuracy"] == 0.0
    assert summary["random_draws"].tolist() == [0, 0, 0] and summary["random_needle_accuracy"].isna().all()
    assert found.draws.empty

    work = workload(model, settings)  # the needles and text compare_classifiers measured
    sample = work.needles[0]
    assert len(sample.ids) - sample.needle.stop > 36, "the needle lies inside sink + window"
    kept = 36
    wu_set = tuple(kv for kv in everyone if kv != COPYING)
    mask = work.layout.mask(wu_set)
    with torch.no_grad(), instrument(model, backend="reference", streaming=StreamingAttention(32, 4, heads=mask)):
        logits = model(work.ids).double()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), work.ids[:, 1:], reduction="none")
    assert wu["text_loss_past_window"] == pytest.approx(float(loss[:, kept:].mean()), abs=1e-4)
    assert wu["text_loss"] == pytest.approx(float(loss.mean()), abs=1e-4)

    memory = kv_memory(work.layout, [(11 / 12, 11)], [CONTEXT], 4, 32).iloc[0]
    assert wu["kv_length"] == CONTEXT and wu["kv_saved_fraction"] == pytest.approx(memory["saved_fraction"])
    assert wu["kv_saved_fraction"] == pytest.approx(11 * (CONTEXT - 36) / (12 * CONTEXT))
    heads = found.heads[found.heads["classifier"] == "wu"]
    assert len(heads) == 12 and heads["streams"].sum() == 11
    assert heads[~heads["streams"]][["layer", "kv_head", "query_heads_full"]].values.tolist() == [[2, 0, "0"]]

    # text only (fast): each row and each random draw equals compress's per-set measurement
    text = CompressionSettings(tasks=("text",), draws=1, **small)
    found = compare_classifiers(model, table, text, progress=False)
    summary = found.summary.set_index("classifier")
    alone = workload(model, text)
    measured = alone.measure(wu_set)
    assert summary.loc["wu", ["text_loss", "text_loss_past_window"]].tolist() == pytest.approx(
        measured.text_losses(kept), abs=1e-6
    )
    for name, n in (("wu", 11), ("all_but_copying", 1)):
        draws = found.draws[found.draws["classifier"] == name]
        assert draws[["draw", "seed", "kv_heads"]].values.tolist() == [[0, 0, n]]
        ((_, heads),) = random_sets(alone.layout, n, 1, 0)
        loss, past = alone.measure(heads).text_losses(kept)
        assert draws[["text_loss", "text_loss_past_window"]].values.tolist() == [pytest.approx([loss, past], abs=1e-6)]
        assert summary.loc[name, ["random_text_loss", "random_text_loss_past_window"]].tolist() == pytest.approx(
            [loss, past], abs=1e-6
        )
        assert summary.loc[name, "random_draws"] == 1 and math.isnan(summary.loc[name, "random_needle_accuracy"])


def test_compress_classifiers_command(scored, tmp_path):
    """`workbench compress --classifiers` on the planted run scored for retrieval and streaming:
    wu and streaming measured, razor and duo skipped with a note; tables and the manifest entry
    written next to (not among) the ranked compressions; refusals before the model loads."""
    run = tmp_path / "run"
    shutil.copytree(scored.path, run, ignore=shutil.ignore_patterns("compress"))
    copy = Run.open(run)
    copy.manifest.pop("compressions", None)
    copy.manifest["tables"] = {k: v for k, v in copy.manifest["tables"].items() if not k.startswith("compress/")}
    copy.save_manifest()
    register(app)
    runner = CliRunner()
    base = ["compress", "--run", str(run), "--classifiers", "--device", "cpu", "--backend", "reference"]
    small = [
        "--window",
        "32",
        "--task",
        "niah",
        "--length",
        str(CONTEXT),
        "--depths",
        "0.5",
        "--samples",
        "1",
        "--draws",
        "0",
    ]
    result = runner.invoke(app, [*base, *small])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "uncompressed: needle acc. 1.000" in text and "skipped razor" in text and "skipped duo" in text
    opened = Run.open(run)
    summary = opened.table("compress/classifiers_summary")
    assert list(summary["classifier"]) == ["none", "wu", "streaming"]
    scores = opened.table("head_scores").query("score == 'retrieval'")
    retrieval = {(int(r.layer), int(r.head)) for r in scores.itertuples() if r.value > 0.1}  # Wu's rule
    assert COPYING in retrieval
    wu = summary.set_index("classifier").loc["wu"]
    assert (wu["kv_heads_full"], wu["kv_heads_streamed"]) == (len(retrieval), 12 - len(retrieval))
    assert wu["needle_accuracy"] == 1.0  # the copying head kept
    heads = opened.table("compress/classifiers_heads")
    full = heads[(heads["classifier"] == "wu") & ~heads["streams"]]
    assert set(zip(full["layer"], full["kv_head"])) == retrieval
    for name, group in heads.groupby("classifier"):  # the summary counts the heads table's streaming heads
        assert summary.set_index("classifier").loc[name, "kv_heads_streamed"] == group["streams"].sum()
    entry = opened.manifest["classifier_compression"]
    assert entry["classifiers"] == ["wu", "streaming"] and "rank_by" not in entry["settings"]
    assert len(entry["skipped"]) == 2 and (run / "compress" / "classifiers_summary.csv").exists()
    assert compressions(opened) == []  # the ranked experiments' list (the explorer page's) is untouched

    lacking = tmp_path / "lacking"
    shutil.copytree(run, lacking)
    bare = Run.open(lacking)
    scores = bare.table("head_scores")
    bare.write_table("head_scores", scores[~scores["score"].isin(["retrieval", "streaming"])])
    for args, message in (
        ([*base, *small, "--window", "16"], "already holds a classifier comparison with other settings"),
        (["compress", "--run", str(lacking), "--classifiers"], "none of the scores the head classifiers read"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)


# ----------------------------------------------------------------------------- sliding-window layers


def _explicit_kept(layout: KVLayout, streamed: set[tuple[int, int]], length: int, sink: int, window: int) -> int:
    """Cache entries held at the end of a sequence, key by key: a sliding-window layer's KV head
    holds its last ``w`` keys, a streaming one the first ``sink`` and last ``window``."""
    kept = 0
    for layer in range(layout.layers):
        own = dict(zip(layout.local_layers, layout.local_windows)).get(layer)
        for kv in range(layout.kv_heads):
            for j in range(length):
                back = length - 1 - j
                if own is not None:
                    kept += back < own
                else:
                    kept += (layer, kv) not in streamed or j < sink or back < window
    return kept


def test_sliding_window_layers_are_never_candidates():
    """KVLayout with local layers 0 and 2 (windows 5 and 9): the candidates are the other
    layers' KV heads; the ranking drops the local layers (its scores still cover them), shares
    and random draws are of the candidates, the memory table counts a local layer's entries as
    min(L, w) (an explicit count), the classifiers never stream a local layer; a model whose
    every layer is local is refused."""
    with pytest.raises(WorkbenchError, match="local_layers must be distinct ascending layers"):
        KVLayout(layers=3, heads=2, kv_heads=2, d_head=4, dtype="float32", itemsize=4, local_layers=(1,))
    layout = KVLayout(layers=4, heads=4, kv_heads=2, d_head=8, dtype="float32", itemsize=4,
                      local_layers=(0, 2), local_windows=(5, 9))  # fmt: skip
    assert (
        layout.total == 8 and layout.candidate_total == 4 and layout.window_of(2) == 9 and layout.window_of(1) is None
    )
    candidates = [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert layout.candidates() == candidates

    # the local layers' heads score highest: streamed first, were they candidates
    values = [(10.0 if layer in (0, 2) else 0.0) + 0.1 * head for layer in range(4) for head in range(4)]
    scores = pd.DataFrame(
        {"layer": [l for l in range(4) for _ in range(4)], "head": list(range(4)) * 4, "value": values}
    )
    order = stream_order(scores, layout, "highest")
    assert list(zip(order["layer"], order["kv_head"])) == [(1, 1), (3, 1), (1, 0), (3, 0)]
    assert list(order["rank"]) == [0, 1, 2, 3]
    with pytest.raises(WorkbenchError, match="every head of the model once"):
        stream_order(scores[scores["layer"] != 0], layout, "highest")
    nan_outside = scores.assign(value=[v if layer in (0, 2) else math.nan for layer in range(4) for v in values[:4]])
    with pytest.raises(WorkbenchError, match="NaN for every head"):
        stream_order(nan_outside, layout, "highest")

    ranked = list(zip(order["layer"], order["kv_head"]))
    sets = choices(ranked, layout, (0.25, 0.5, 1.0), draws=3, seed=5)
    by = {(c.policy, c.draw, c.share): c.kv_heads for c in sets}
    assert by[("ranked", 0, 0.25)] == ((1, 1),) and by[("ranked", 0, 1.0)] == tuple(ranked)
    for d in range(3):  # random orders of the candidates only, nested across shares
        drawn = tuple(random.Random(5 + d).sample(candidates, 4))
        assert [by[("random", d, share)] for share in (0.25, 0.5, 1.0)] == [drawn[:1], drawn[:2], drawn]
    with pytest.raises(WorkbenchError, match="every candidate KV head"):
        choices(layout.all_kv(), layout, (0.5,), draws=0, seed=0)
    with pytest.raises(WorkbenchError, match="of the model's 4 candidate KV heads outside its sliding-window layers"):
        choices(ranked, layout, (0.1,), draws=0, seed=0)
    every = KVLayout(layers=2, heads=2, kv_heads=2, d_head=4, dtype="float32", itemsize=4, local_layers=(0, 1),
                     local_windows=(4, 4))  # fmt: skip
    assert [c.kv_heads for c in choices([], every, (0.0,), draws=2, seed=0)] == [()]
    with pytest.raises(WorkbenchError, match="no KV head is left to stream"):
        choices([], every, (0.5,), draws=0, seed=0)

    sink, window, lengths = 2, 6, (4, 7, 30)
    table = kv_memory(layout, [(0.0, 0), (0.5, 2), (1.0, 4)], lengths, sink, window).set_index(["share", "length"])
    for share, streamed in ((0.0, set()), (0.5, {(1, 1), (3, 0)}), (1.0, set(candidates))):
        for length in lengths:
            row, kept = table.loc[(share, length)], _explicit_kept(layout, streamed, length, sink, window)
            full = _explicit_kept(layout, set(), length, sink, window)
            assert row["entries"] == full == 2 * (2 * length + min(length, 5) + min(length, 9))
            assert row["entries_kept"] == kept and row["kv_heads_total"] == 8
            assert math.isclose(row["saved_fraction"], 1 - kept / full)
            assert row["bytes_saved"] == (full - kept) * 2 * 8 * 4
    assert table.loc[(1.0, 30), "saved_fraction"] == pytest.approx(4 * 22 / (2 * (60 + 5 + 9)))

    table = _classified({"keeps_nothing": set(), "keeps_1.2": {(1, 2)}}, 4, 4)
    sets = classifier_sets(table, layout)
    assert sets == {"keeps_nothing": tuple(candidates), "keeps_1.2": ((1, 0), (3, 0), (3, 1))}
    for seed, heads in random_sets(layout, 3, draws=2, seed=4):
        assert heads == tuple(random.Random(seed).sample(candidates, 4)[:3])


def test_compress_streams_only_the_global_layers_of_a_local_global_model():
    """A TransformerLens model alternating local (window 8) and global layers, GQA: shares of
    its 4 global KV heads (1.0: every one, where a set of all KV heads held the local layers and
    was refused) run end to end; only global-layer KV heads stream; each set's loss equals a
    float64 model with the restriction as an explicit mask (the local layers keep their own
    window); the memory table equals an explicit count; compare_classifiers streams the same
    heads; a model of local layers only is refused."""
    model = local_global_model()
    layout = kv_layout(model)
    assert (layout.local_layers, layout.local_windows, layout.candidate_total) == ((0, 2), (8, 8), 4)
    local_first = torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat_interleave(4)  # highest first: the local layers'
    values = torch.rand(16, generator=torch.Generator().manual_seed(2)) + local_first
    scores = pd.DataFrame({"layer": [l for l in range(4) for _ in range(4)], "head": list(range(4)) * 4,
                           "value": values.tolist()})  # fmt: skip
    settings = CompressionSettings(
        rank_by="streaming", shares=(0.5, 1.0), tasks=("text",), lengths=(64,), text_samples=2,
        sink=2, window=12, draws=2, backend="reference", seed=1,
    )  # fmt: skip
    found = compress(model, scores, settings, progress=False)
    assert sorted(zip(found.order["layer"], found.order["kv_head"])) == layout.candidates()
    assert set(found.heads["layer"]) == {1, 3}
    summary = found.summary.set_index(["policy", "draw", "share"])
    assert summary["kv_heads"].tolist() == [0, 2, 2, 2, 4, 4, 4]
    assert summary["kv_share"].tolist() == pytest.approx((summary["kv_heads"] / 4).tolist())

    ids = text_ids(model, settings.resolved())
    kept, differs = 14, 0
    base = summary.loc[("none", 0, 0.0)]
    sets = [(("none", 0, 0.0), [])] + [(key, list(zip(g["layer"], g["kv_head"])))
                                         for key, g in found.heads.groupby(["policy", "draw", "share"])]  # fmt: skip
    for key, heads in sets:
        mask = layout.mask(heads)
        assert not bool(mask[[0, 2]].any())
        logits = tl_float64_logits(model, ids, StreamingAttention(12, 2, heads=mask))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        row = summary.loc[key]
        assert row["text_loss"] == pytest.approx(float(loss.mean()), abs=1e-4)
        assert row["text_loss_past_window"] == pytest.approx(float(loss[:, kept:].mean()), abs=1e-4)
        differs += abs(row["text_loss_past_window"] - base["text_loss_past_window"]) > 1e-3
    assert differs > 0, "streaming changes the loss"

    memory = found.memory.set_index("share")
    for share, n in ((0.0, 0), (0.5, 2), (1.0, 4)):
        row = memory.loc[share]
        streamed = set(layout.candidates()[:n])  # the count does not depend on which
        full = _explicit_kept(layout, set(), 64, 2, 12)
        assert row["entries"] == full == 2 * (64 + 64 + 8 + 8) and row["kv_heads"] == n
        assert row["entries_kept"] == _explicit_kept(layout, streamed, 64, 2, 12)
        assert row["saved_fraction"] == pytest.approx(n * (64 - 14) / full)

    table = _classified({"keeps_nothing": set(), "keeps_1.0": {(1, 0)}}, 4, 4)
    text = CompressionSettings(tasks=("text",), lengths=(64,), text_samples=2, sink=2, window=12, draws=0,
                               backend="reference")  # fmt: skip
    compared = compare_classifiers(model, table, text, progress=False).summary.set_index("classifier")
    assert compared[["kv_heads_full", "kv_heads_streamed"]].values.tolist() == [[4, 0], [0, 4], [1, 3]]
    assert compared["kv_share"].tolist() == pytest.approx([0.0, 1.0, 0.75])
    assert compared.loc["keeps_nothing", "text_loss"] == pytest.approx(summary.loc[("ranked", 0, 1.0), "text_loss"])
    assert compared.loc["keeps_nothing", "kv_saved_fraction"] == pytest.approx(memory.loc[1.0, "saved_fraction"])

    with pytest.raises(WorkbenchError, match="every layer of .* attends within its own sliding window"):
        workload(local_global_model(layers=2, attn_types=("local",)), text)
