"""The papers' head classifiers (workbench/scoring/classifiers.py) and DuoAttention's gates
(workbench/scoring/duo.py): Razor's rule counted exactly on a constructed table, every
classifier on the planted model, the gated forward against the kernels' streaming attention,
and the trained gates of the planted model."""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from typer.testing import CliRunner

from tests.conftest import SEED
from workbench.adapters.streaming import StreamingAttention
from workbench.errors import WorkbenchError
from workbench.instrument import instrument
from workbench.runs import Run
from workbench.scoring import ScoreRunSettings, score_model
from workbench.scoring.classifiers import (
    COLUMNS,
    agreement,
    classify,
    duo_heads,
    head_mask,
    razor_heads,
    razor_settings,
    spearman,
    streaming_heads,
    top_count,
    wu_heads,
)
from workbench.scoring.duo import (
    DUO_PART,
    DuoSettings,
    ensure_gates,
    final_hidden,
    gated,
    schedule,
    train_gates,
    training_samples,
)
from workbench.zoo.planted import ROLES, planted


def table(scores: dict[str, list[list[float]]], task: str) -> pd.DataFrame:
    """A head_scores table from ``{score: [[layer 0 values], [layer 1 values], ...]}``."""
    rows = [
        (task, score, layer, head, value, 1)
        for score, grid in scores.items()
        for layer, values in enumerate(grid)
        for head, value in enumerate(values)
    ]
    return pd.DataFrame(rows, columns=["task", "score", "layer", "head", "value", "samples"])


def chosen(classified: pd.DataFrame) -> set[tuple[int, int]]:
    return {(r.layer, r.head) for r in classified.itertuples() if r.keep_full}


def test_top_count_rounds_as_razor_does():
    assert [top_count(n, 0.14) for n in (8, 12, 25, 48, 1024)] == [1, 2, 4, 7, 143]  # 3.5 -> 4
    assert [top_count(n, 0.01) for n in (8, 49, 50, 150, 250, 1024)] == [0, 0, 0, 2, 2, 10]  # 0.5, 2.5: to even
    with pytest.raises(WorkbenchError, match=r"\[0, 1\]"):
        top_count(8, 1.5)


def test_razor_takes_the_union_of_two_top_shares():
    """50 heads (5 layers x 10): 14% is 7 by induction; 1% is 0.5, rounded half to even: no echo
    head; echo_share 0.04 gives 2 echo heads, one of them also an induction head."""
    induction = [[0.0] * 10 for _ in range(5)]
    echo = [[0.0] * 10 for _ in range(5)]
    top_induction = [(0, 1), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (4, 9)]
    for rank, (layer, head) in enumerate(top_induction):
        induction[layer][head] = 0.9 - 0.05 * rank
    induction[0][0] = 0.5  # the 8th: just outside the top 7
    echo[4][9], echo[2][2], echo[3][3] = 0.8, 0.7, 0.6  # (4, 9) is also an induction head
    hs = table({"induction": induction, "duplicate_token": echo}, "repeats")
    default = razor_heads(hs)
    assert list(default.columns) == COLUMNS and len(default) == 50
    assert chosen(default) == set(top_induction)  # 1% of 50 = 0.5 -> 0 echo heads
    wider = razor_heads(hs, echo_share=0.04)  # 2 echo heads: (4, 9) and (2, 2)
    assert chosen(wider) == set(top_induction) | {(2, 2)}
    detail = {(r.layer, r.head): r.detail for r in wider.itertuples()}
    assert detail[(4, 9)] == "induction,echo" and detail[(2, 2)] == "echo" and detail[(0, 1)] == "induction"
    assert detail[(0, 0)] == ""
    # a tie at the cut-off keeps every tied head, as their `value in percent_values`
    induction[0][0] = induction[4][9]
    assert chosen(razor_heads(table({"induction": induction, "duplicate_token": echo}, "repeats"))) == set(
        top_induction
    ) | {(0, 0)}


def test_razor_ranks_kv_heads_by_their_best_query_head():
    """2 layers x 4 query heads, 2 KV heads per layer: each KV head scores the max of its two
    query heads; 14% of the 4 KV heads is 1, and both query heads of that KV head are kept."""
    induction = [[0.1, 0.2, 0.3, 0.05], [0.6, 0.0, 0.2, 0.25]]
    echo = [[0.0] * 4, [0.0] * 4]
    hs = table({"induction": induction, "duplicate_token": echo}, "repeats")
    assert chosen(razor_heads(hs)) == {(1, 0)}  # 14% of 8 heads = 1
    grouped = razor_heads(hs, kv_heads=2)
    assert chosen(grouped) == {(1, 0), (1, 1)}
    assert grouped.set_index(["layer", "head"]).loc[(1, 1), "score"] == 0.6  # the group's max
    with pytest.raises(WorkbenchError, match="3 KV heads"):
        razor_heads(hs, kv_heads=3)


def test_threshold_classifiers_and_their_shared_shape():
    hs = pd.concat(
        [
            table({"retrieval": [[0.5, 0.1, math.nan], [0.0, 0.11, 0.2]]}, "niah"),
            table({"streaming": [[0.99, 0.2, 0.95], [0.5, 0.9, 0.3]]}, "text"),
            table({"streaming": [[0.0] * 3, [0.0] * 3]}, "repeats"),
            table({"duo": [[1.0, 0.5, 0.49], [0.0, 0.8, 0.2]]}, "niah"),
        ]
    )
    assert chosen(wu_heads(hs)) == {(0, 0), (1, 1), (1, 2)}  # > 0.1; NaN is not a retrieval head
    stream = streaming_heads(hs)  # text preferred; below 0.9 keeps full
    assert chosen(stream) == {(0, 1), (1, 0), (1, 2)}
    assert stream["score"].round(6).tolist() == [0.01, 0.8, 0.05, 0.5, 0.1, 0.7]  # mass outside sink + window
    assert chosen(streaming_heads(hs, full_share=0.34)) == {(0, 1), (1, 2)}  # round(6 * 0.34) = 2
    assert len(chosen(streaming_heads(hs, task="repeats"))) == 6
    assert chosen(duo_heads(hs)) == {(0, 0), (0, 1), (1, 1)}  # >= 0.5
    assert chosen(duo_heads(hs, sparsity=0.5)) == {(0, 0), (0, 1), (1, 1)}  # median 0.495
    assert chosen(duo_heads(hs, sparsity=1.0)) == set() and len(chosen(duo_heads(hs, sparsity=0.0))) == 6
    both = classify(hs)
    assert list(both.columns) == COLUMNS and list(dict.fromkeys(both["classifier"])) == ["wu", "streaming", "duo"]
    assert head_mask(both, "duo").tolist() == [[True, True, False], [False, True, False]]
    pairs = agreement(both).set_index(["a", "b"])
    assert pairs.loc[("wu", "duo"), "both"] == 2 and pairs.loc[("wu", "duo"), "jaccard"] == pytest.approx(2 / 4)
    with pytest.raises(WorkbenchError, match="razor needs duplicate_token, induction"):
        classify(hs, ["razor"])
    with pytest.raises(WorkbenchError, match="unknown classifier"):
        classify(hs, ["razr"])


def test_spearman_is_a_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert math.isnan(spearman([1, 2], [2, 1])) and math.isnan(spearman([1, 2, 3], [5, 5, 5]))


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """The planted model scored with Razor's probe (4 copies) and a needle, reference backend."""
    razor = razor_settings("planted", lengths=(256,), samples=1, backend="reference", seed=SEED % 1000)
    settings = replace(
        razor,
        tasks=("repeats", "niah"),
        scores=("induction", "duplicate_token", "retrieval", "streaming"),
        depths=(0.5,),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("workbench.plots.save_figures", lambda figures, folder: [])
        return score_model(planted(context=512, seed=SEED % 1000), settings, tmp_path_factory.mktemp("p") / "run")


def test_the_planted_copying_head_is_a_retrieval_head_for_every_classifier(planted_run):
    assert planted_run.manifest["settings"]["repeats"] == 4
    found = classify(planted_run)
    assert list(dict.fromkeys(found["classifier"])) == ["razor", "wu", "streaming"]
    copying = ROLES["induction"]
    razor = found[found["classifier"] == "razor"]
    assert copying in chosen(razor) and len(chosen(razor)) == 2  # 14% of 12 heads
    assert razor.set_index(["layer", "head"]).loc[copying, "detail"] == "induction"
    assert chosen(found[found["classifier"] == "wu"]) == {copying}
    # the mass-based rule keeps the heads that look far back: copying, uniform, duplicate
    stream = chosen(found[found["classifier"] == "streaming"])
    assert copying in stream and stream <= {copying, ROLES["uniform"], ROLES["duplicate"]}
    local = [ROLES[r] for r in ("previous_token", "offset_2", "offset_5", "offset_10", "sink", "local", "dormant")]
    assert not stream & set(local)


def tiny(kind: str) -> HookedTransformer:
    torch.manual_seed(SEED % 1000)
    extra = {
        "gqa": dict(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2),
        "sinks": dict(positional_embedding_type="rotary", rotary_dim=8, use_attention_sinks=True),
        "standard": dict(positional_embedding_type="standard"),
    }[kind]
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        n_ctx=96,
        d_vocab=50,
        act_fn="gelu",
        normalization_type="LN",
        **extra,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:  # peaked patterns: streaming changes the outputs
            block.attn.W_Q.mul_(4)
            if kind == "sinks":
                block.attn.sinks.copy_(torch.randn(4))
    return model.eval()


@pytest.mark.parametrize("kind", ["standard", "gqa", "sinks"])
def test_gated_forward_is_full_at_one_and_the_kernels_streaming_at_zero(kind):
    model = tiny(kind)
    kv = int(model.cfg.n_key_value_heads or model.cfg.n_heads)
    ids = torch.randint(0, 50, (1, 80))
    sink, recent = 3, 10
    with torch.no_grad():
        full = final_hidden(model, ids)
        with gated(model, torch.ones(2, kv), sink, recent):
            assert torch.equal(final_hidden(model, ids), full)
        alpha = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat_interleave(kv // 2, dim=1)  # half the KV heads stream
        with gated(model, alpha, sink, recent):
            mixed = final_hidden(model, ids)
        heads = (alpha == 0).repeat_interleave(4 // kv, dim=1)  # query heads whose KV head streams
        with instrument(model, backend="reference", streaming=StreamingAttention(recent, sink, heads=heads)):
            want = final_hidden(model, ids)
        half = torch.full_like(alpha, 0.5)
        with gated(model, half, sink, recent):
            between = final_hidden(model, ids)
    assert (mixed - full).abs().max() > 1e-2  # streaming matters in this model
    torch.testing.assert_close(mixed, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(between, full) and not torch.allclose(between, mixed)
    with pytest.raises(WorkbenchError, match=rf"\[2, {kv}\]"):
        with gated(model, torch.ones(2, kv + 1), sink, recent):
            pass


def test_schedule_and_samples_follow_their_recipe(small_planted):
    assert [round(schedule(s, 10), 2) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0.5]
    assert schedule(0, 100) == pytest.approx(0.1) and schedule(99, 100) == pytest.approx(0.1)
    model = small_planted
    samples = training_samples(model.tokenizer, DuoSettings(steps=5, lengths=(128,)), seed=1)
    assert len(samples) == 5 and all(len(s.ids) == 128 for s in samples)
    for s in samples:  # the supervised tail is the question " The secret code of NAME is" and the answer
        text = model.tokenizer.decode(s.ids[s.supervised.start : s.supervised.stop].tolist())
        assert text.startswith(" The secret code of ") and text[-4:].isdigit() and s.supervised.stop == 128


def test_duo_refuses_other_models_and_bad_settings(small_planted):
    from transformers import GPT2Config, GPT2LMHeadModel

    from workbench.scoring.duo import check_model

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=64, vocab_size=50))
    with pytest.raises(WorkbenchError, match="TransformerLens HookedTransformer models only"):
        check_model(hf, DuoSettings(lengths=(64,)))
    with pytest.raises(WorkbenchError, match="exceed the model's context of 256"):
        check_model(small_planted, DuoSettings())
    with pytest.raises(WorkbenchError, match="cannot hold a needle"):  # the byte tokenizer's needles take ~75
        check_model(small_planted, DuoSettings(lengths=(64,)))
    with pytest.raises(WorkbenchError, match="steps"):
        DuoSettings(steps=0)
    with pytest.raises(WorkbenchError, match="duo is not among the scores"):
        ScoreRunSettings(model="x", scores=("sink",), duo=DuoSettings())
    assert ScoreRunSettings(model="x", scores=("duo",)).duo == DuoSettings()
    assert "duo" not in ScoreRunSettings(model="x").to_dict()  # old runs keep their identity


@pytest.fixture(scope="module")
def small_planted():
    return planted(context=256, seed=SEED % 1000)


def test_planted_gates_keep_the_copying_head_and_stream_the_rest(small_planted):
    """24 steps on 96-token needles at lr 0.05, recent 16: the copying head must look back at
    the needle, 30 or more tokens before the question (gate near 1); the offset, sink and local
    heads are served by the first 4 and the last 16 keys, and the heads that write nothing are
    free (their gates fall with the L1 term)."""
    model = small_planted
    settings = DuoSettings(steps=24, lr=0.05, lengths=(96,), recent=16)
    result = train_gates(model, settings, seed=3, progress=False)
    assert all(p.requires_grad for p in model.parameters())  # frozen while training, restored after
    gates = result.gates
    assert gates.shape == (3, 4) and bool(((gates >= 0) & (gates <= 1)).all())
    assert result.loss[-1] < result.loss[0] - 0.01  # the L1 term falls faster than the distillation rises
    copying = float(gates[ROLES["induction"]])
    others = [float(gates[ROLES[r]]) for r in ROLES if r != "induction"]
    assert copying > 0.85 and max(others) < copying - 0.5, gates


def test_score_duo_writes_a_duo_column_and_resumes_without_training(tmp_path, monkeypatch, small_planted):
    from workbench.cli import app

    monkeypatch.setattr("workbench.plots.save_figures", lambda figures, folder: [])
    out = tmp_path / "run"
    args = ["score", "--model", "planted:256", "--task", "repeats", "--lengths", "64", "--samples", "1"]
    args += ["--scores", "duo,induction", "--duo-steps", "3", "--duo-lengths", "128", "--duo-recent", "16"]
    args += ["--backend", "reference", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = Run.open(out)
    hs = run.table("head_scores")
    duo = hs[hs["score"] == "duo"]
    assert len(duo) == 12 and set(duo["task"]) == {"niah"} and duo["value"].between(0, 1).all()
    assert run.manifest["settings"]["duo"] == {
        "steps": 3,
        "lr": 0.02,
        "reg_weight": 0.05,
        "sink": 4,
        "recent": 16,
        "lengths": [128],
    }
    assert run.manifest["duo"]["settings"]["seed"] == 0 and run.manifest["duo"]["seconds"] > 0
    # a committed gates part is not trained again; a damaged one is
    settings = ScoreRunSettings.from_dict(run.manifest["settings"])

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr("workbench.scoring.duo.train_gates", refuse)
    ensure_gates(run, small_planted, settings, progress=False)
    (out / "parts" / f"{DUO_PART}.parquet").write_bytes(b"damaged")
    with pytest.raises(AssertionError, match="trained again"):
        ensure_gates(run, small_planted, settings, progress=False)
    bad = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "other"), "--duo-lengths", "512"])
    assert bad.exit_code == 2 and "exceed the model's context of 256" in bad.output
