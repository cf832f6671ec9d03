"""The zoo's code: tokenizer, data mixture, training, loading, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from workbench import WorkbenchError, load_model, record
from workbench.cli import app
from workbench.zoo import ZOO, ZooSpec, load, train
from workbench.zoo.data import Mixture, sample_batch
from workbench.zoo.tokenizer import byte_tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "naïve café — 東京 \n\t code 4821"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text and len(tok) == 259


def test_byte_tokenizer_folder_lives_as_long_as_its_process():
    show = "from workbench.zoo.tokenizer import byte_tokenizer as b; import os; f = b().name_or_path; "
    show += "print(os.path.isfile(os.path.join(f, 'tokenizer.json'))); print(f)"
    shown = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=True)
    existed, folder = shown.stdout.splitlines()[-2:]  # the folder's name may hold spaces
    assert existed == "True" and not Path(folder).exists()


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
        period = next(p for p in range(1, 200) if torch.equal(row[1 + p :], row[1:-p]))
        assert not mask[: period + 1].any() and mask[period + 1 :].all()
    _, loss = sample_batch(
        40, 300, torch.Generator().manual_seed(1), Mixture(text=0, repeat=1, needle=0, first_period_loss=True)
    )
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
