"""The zoo's code: tokenizer, data mixture, training, loading, CLI."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from workbench import WorkbenchError, load_model, record
from workbench.cli import app
from workbench.zoo import DEFAULT_MODEL, ZOO, ZooSpec, load, train
from workbench.zoo.data import Mixture, sample_batch
from workbench.zoo.measure import measure
from workbench.zoo.tokenizer import byte_tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "naïve café — 東京 \n\t code 4821"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text and len(tok) == 259


def test_mixture_is_deterministic_and_varies_the_period():
    a = sample_batch(12, 200, torch.Generator().manual_seed(5))
    b = sample_batch(12, 200, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ids, loss = sample_batch(40, 300, torch.Generator().manual_seed(1), Mixture(text=0, repeat=1, needle=0))
    periods = set()
    for row in ids[:, 1:]:
        period = next(p for p in range(1, 200) if torch.equal(row[p:], row[:-p]))
        periods.add(period)
    assert len(periods) > 10
    assert torch.all(ids[:, 0] == byte_tokenizer().bos_token_id)
    for row, mask in zip(ids, loss):  # the unpredictable first period is left out of the loss...
        period = next(p for p in range(1, 200) if torch.equal(row[1 + p:], row[1:-p]))
        assert not mask[: period + 1].any() and mask[period + 1:].all()
    _, loss = sample_batch(40, 300, torch.Generator().manual_seed(1),
                           Mixture(text=0, repeat=1, needle=0, first_period_loss=True))
    assert loss.all()  # ...unless asked for
    ids, loss = sample_batch(6, 300, torch.Generator().manual_seed(2), Mixture(text=0, repeat=0, needle=1))
    tok = byte_tokenizer()
    for row, m in zip(ids, loss):
        text = tok.decode(row[1:])
        answer = tok.decode(row[1:][m[1:]])  # loss marks the positions that predict the answer
        code = text[-4:]
        assert f"is {code}." in text and m.sum() == 4 and len(answer) == 4


def test_spec_round_trips_through_json():
    import json
    from dataclasses import asdict

    for spec in ZOO.values():
        assert ZooSpec.from_dict(json.loads(json.dumps(asdict(spec)))) == spec


def test_default_model_has_the_documented_heads():
    """The committed zoo-2l: previous-token heads in layer 0, induction heads in layer 1 at a
    short and a long period, a head that parks on <bos> when there is nothing to copy, and
    needle retrieval through a copying head (figures in docs/zoo.md)."""
    r = measure(load(DEFAULT_MODEL), n_samples=8, length=512, periods=(37, 300))
    layer = lambda table, i: [v for k, v in table.items() if k.startswith(f"{i}.")]  # noqa: E731
    assert max(layer(r["previous_token_mass"], 0)) > 0.2
    for period in (37, 300):
        assert max(layer(r[f"induction_mass_period_{period}"], 1)) > 0.4
        assert max(layer(r[f"induction_mass_period_{period}"], 0)) < 0.05  # layer 0 cannot do induction
    assert max(r["sink_mass_first_copy_period_37"].values()) > 0.5
    assert r["needle_accuracy"] >= 0.5
    best = max(r["copy_rate"], key=r["copy_rate"].get)
    assert best.startswith("1.") and r["copy_rate"][best] > 0.5


def test_tiny_trains_deterministically_and_loads(tmp_path):
    m1 = train(ZOO["tiny"], tmp_path / "a", progress=False)
    train(ZOO["tiny"], tmp_path / "b", progress=False)
    assert m1["final_loss"] < m1["first_loss"] - 0.5
    w1 = load_file(str(tmp_path / "a" / "tiny" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "b" / "tiny" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    model = load("tiny", tmp_path / "a")
    rec = record(model, ["hello zoo", "a longer piece of text"], progress=False)
    assert rec.layer(0).entropy.shape[:2] == (2, 2)


def test_missing_weights_and_unknown_names(tmp_path):
    try:
        load("tiny", tmp_path)
    except WorkbenchError as exc:
        assert "workbench zoo train tiny" in str(exc)
    else:
        raise AssertionError("expected an error")
    try:
        load_model("random:nope")
    except WorkbenchError as exc:
        assert "random:llama-3.2-1b" in str(exc)


def test_zoo_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["zoo", "list"])
    assert result.exit_code == 0 and "tiny" in result.output and "zoo-2l" in result.output
    result = runner.invoke(app, ["zoo", "train", "nope"])
    assert result.exit_code == 2 and "unknown zoo model" in result.output
    result = runner.invoke(app, ["zoo", "train", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny" / "metrics.json").exists()
    result = runner.invoke(app, ["zoo", "measure", "--length", "256", "--samples", "2", "--periods", "20"])
    assert result.exit_code == 0, result.output
    assert "1.3" in result.output and "needle accuracy" in result.output
    result = runner.invoke(app, ["zoo", "measure", "--periods", "5000"])
    assert result.exit_code == 2 and "context of 2048" in result.output
