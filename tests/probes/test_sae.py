"""Attention-output SAEs (sae-lens) on the zoo model's hook_z."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

from probes import sae as saes
from probes.cli import register, sae_eval, sae_train
from probes.sae import SAE_BATCH, SAEEvalSettings, SAETrainSettings
from tests.conftest import SEED
from workbench import WorkbenchError
from workbench.adapters.transformer_lens import TransformerLensAdapter
from workbench.cli import app
from workbench.tasks import text_samples
from workbench.zoo import ZOO, build


@pytest.fixture(scope="module")
def texts(zoo):
    items = text_samples(zoo.tokenizer, None, 256, 40)
    return items[:32], items[32:]


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_sae_trains_to_a_stated_quality(zoo, texts, architecture):
    """On layer 1's hook_z (4 heads x 32), 200K training tokens (a few seconds): explained
    variance >= 0.6 and at least half of the zero-ablation loss gap recovered on held-out text."""
    train, held_out = texts
    sae = saes.train_sae(zoo, 1, train, architecture, training_tokens=200_000, seed=SEED)
    m = saes.evaluate(zoo, sae, 1, held_out)
    assert m["explained_variance"] >= 0.6, m
    assert m["ce_loss_recovered"] >= 0.5 and m["ce_loss_clean"] < m["ce_loss_spliced"] < m["ce_loss_zero_ablated"], m
    assert 0 <= m["dead_fraction"] < 1
    if architecture == "topk":
        assert m["l0"] == pytest.approx(8)
    else:
        assert 0 < m["l0"] < 64


def test_save_load_attribution_and_contexts(zoo, texts, tmp_path):
    train, held_out = texts
    sae = saes.train_sae(zoo, 0, train, "topk", training_tokens=50_000, seed=SEED)
    path = saes.save_sae(sae, tmp_path / "sae")
    assert json.loads((path / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.0.attn.hook_z"
    loaded = saes.load_sae(path, zoo, 0)
    x = saes.activations(zoo, 0, held_out[:2])
    # saving folds the decoder norm into the weights: compare what the SAE computes
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)
    shares = saes.head_attribution(loaded, 4)
    assert len(shares) == 4 * loaded.cfg.d_sae
    torch.testing.assert_close(
        torch.tensor(shares.groupby("feature")["share"].sum().to_numpy()),
        torch.ones(loaded.cfg.d_sae),
        atol=1e-5,
        rtol=0,
    )
    # a feature that reads a single head has all its attribution there
    with torch.no_grad():
        loaded.W_dec[0] = 0
        loaded.W_dec[0, 64:96] = 1.0
    assert saes.head_attribution(loaded, 4).query("feature == 0").set_index("head")["share"].idxmax() == 2
    top = saes.top_contexts(zoo, loaded, 0, held_out, n=3, features=[1, 2, 3])
    for _, group in top.groupby("feature"):
        assert list(group["activation"]) == sorted(group["activation"], reverse=True)
        assert group["context"].str.contains(r"\[\[").all()
    # direct attribution: the heads' contributions plus the encoder bias give the activation
    dfa = saes.direct_attribution(zoo, loaded, 0, held_out, top, 4)
    summed = dfa.groupby(["feature", "rank"])["contribution"].sum()
    for row in top.itertuples():
        want = row.activation - float(loaded.b_enc[row.feature])
        assert summed[(row.feature, row.rank)] == pytest.approx(want, abs=1e-4)


def test_loading_an_sae_of_another_hook_or_width_fails(zoo, texts, tmp_path):
    sae = saes.train_sae(zoo, 0, texts[0], "topk", training_tokens=20_000, seed=SEED)
    path = saes.save_sae(sae, tmp_path / "sae")
    with pytest.raises(WorkbenchError, match="reads blocks.0.attn.hook_z, not blocks.1.attn.hook_z"):
        saes.load_sae(path, zoo, 1)
    tiny = build(ZOO["tiny"]).eval()  # layer 0 too, but 2 heads x 16
    with pytest.raises(WorkbenchError, match="has 2 x 16 = 32"):
        saes.load_sae(path, tiny, 0)
    with pytest.raises(WorkbenchError, match="no cfg.json"):
        saes.load_sae(tmp_path, zoo, 0)
    with pytest.raises(WorkbenchError, match="unknown SAE architecture"):
        saes.train_sae(zoo, 0, texts[0], "gated")
    with pytest.raises(WorkbenchError, match="layer 5 out of range"):
        saes.activations(zoo, 5, texts[0])


def test_sae_commands(tmp_path):
    register(app)
    runner = CliRunner()
    out = tmp_path / "sae"
    result = runner.invoke(
        app,
        ["sae", "train", "--layer", "1", "--samples", "16", "--tokens", "50000", "--out", str(out), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "explained_variance" in result.output and (out / "sae_weights.safetensors").exists()
    assert {"top_contexts.parquet", "head_attribution.parquet", "direct_attribution.parquet", "evaluation.json"} <= {
        p.name for p in out.iterdir()
    }
    result = runner.invoke(app, ["sae", "eval", str(out), "--layer", "1", "--samples", "2", "--device", "cpu"])
    assert result.exit_code == 0 and "ce_loss_recovered" in result.output, result.output
    result = runner.invoke(app, ["sae", "eval", str(out), "--layer", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "not blocks.0.attn.hook_z" in " ".join(result.output.split())


SAE_REFUSALS = {
    "architecture": ({"architecture": "gated"}, "unknown SAE architecture 'gated'; choose one of: standard, topk"),
    "d-sae-0": ({"d_sae": 0}, "at least 1 feature, got d_sae 0"),
    "k-0": ({"k": 0}, "at least 1 active feature, got k 0"),
    "k-above-d-sae": ({"k": 64, "d_sae": 32}, "--k 64 active features cannot exceed --d-sae 32"),
    "negative-l1": ({"architecture": "standard", "l1_coefficient": -0.5}, "L1 coefficient must be >= 0"),
    "nan-l1": ({"architecture": "standard", "l1_coefficient": float("nan")}, "L1 coefficient must be >= 0"),
    "one-step": ({"training_tokens": 1500}, "fewer than two batches of 1024"),
    "batch-0": ({"batch": 0}, "the batch must hold at least 1 activation, got 0"),
    "lr-0": ({"lr": 0.0}, "learning rate must be > 0"),
}


@pytest.mark.parametrize("kwargs, match", SAE_REFUSALS.values(), ids=SAE_REFUSALS.keys())
def test_train_sae_refuses_bad_settings_before_any_work(zoo, kwargs, match):
    """train_sae checks its arguments first (no samples: any work would fail otherwise), and
    SAETrainSettings refuses the same settings."""
    with pytest.raises(WorkbenchError, match=match):
        saes.train_sae(zoo, 0, [], **kwargs)
    with pytest.raises(WorkbenchError, match=match):
        SAETrainSettings(layer=0, **kwargs)


def test_sae_settings_refuse_bad_counts_and_name_their_folder():
    # a standard SAE ignores k, so k above d_sae is fine there
    assert SAETrainSettings(layer=0, architecture="standard", d_sae=4, k=8).k == 8
    for kwargs, match in (
        ({"layer": -1}, "layer must be >= 0"),
        ({"layer": 0, "samples": 1}, "at least 2 samples"),
        ({"layer": 0, "length": 1}, "of at least 2 tokens"),
    ):
        with pytest.raises(WorkbenchError, match=match):
            SAETrainSettings(**kwargs)
    for kwargs in ({"layer": -1}, {"layer": 0, "samples": 0}, {"layer": 0, "length": 1}):
        with pytest.raises(WorkbenchError, match="an SAE evaluation needs"):
            SAEEvalSettings(**kwargs)
    settings = SAETrainSettings(layer=1, architecture="standard")
    assert str(settings.default_folder("org/model:v1")) == "saes/org_model_v1-L1-standard"
    assert SAETrainSettings(layer=0).batch == SAE_BATCH


def test_the_sae_options_default_to_the_settings():
    """`workbench sae train` and `sae eval` take their defaults from the settings dataclasses."""
    train = {name: p.default.default for name, p in inspect.signature(sae_train).parameters.items()}
    defaults = SAETrainSettings(layer=0)
    for option, field in (
        ("architecture", "architecture"),
        ("d_sae", "d_sae"),
        ("k", "k"),
        ("l1", "l1_coefficient"),
        ("samples", "samples"),
        ("length", "length"),
        ("tokens", "training_tokens"),
        ("text", "text"),
        ("seed", "seed"),
    ):
        assert train[option] == getattr(defaults, field), option
    evaluation = {name: p.default.default for name, p in inspect.signature(sae_eval).parameters.items()}
    for name in ("samples", "length", "text"):
        assert evaluation[name] == getattr(SAEEvalSettings(layer=0), name), name


def test_train_and_evaluate_writes_the_folder_with_one_adapter(zoo, tmp_path, monkeypatch):
    """The Python API of `workbench sae train`: one adapter for the whole flow; the SAE, its
    evaluation (the returned metrics) and the three tables; evaluate_saved reads it back."""
    built = []
    init = TransformerLensAdapter.__init__

    def counting(self, model):
        built.append(model)
        init(self, model)

    monkeypatch.setattr(TransformerLensAdapter, "__init__", counting)
    settings = SAETrainSettings(layer=1, d_sae=32, k=4, samples=8, length=128, training_tokens=4 * SAE_BATCH, seed=SEED)
    out = tmp_path / "sae"
    metrics = saes.train_and_evaluate(zoo, settings, out)
    assert len(built) == 1
    assert json.loads((out / "evaluation.json").read_text()) == pytest.approx(metrics, nan_ok=True)
    assert {
        "cfg.json",
        "sae_weights.safetensors",
        "evaluation.json",
        "head_attribution.parquet",
        "top_contexts.parquet",
        "direct_attribution.parquet",
    } <= {p.name for p in out.iterdir()}
    assert metrics["l0"] == pytest.approx(4) and metrics["tokens"] == 2 * 128  # two held-out samples
    again = saes.evaluate_saved(zoo, out, SAEEvalSettings(layer=1, samples=2, length=128))
    assert again["tokens"] == 2 * 128 and again["l0"] == pytest.approx(4)
    with pytest.raises(WorkbenchError, match="longer than the model's context of 2048"):
        saes.train_and_evaluate(zoo, SAETrainSettings(layer=1, length=4096), tmp_path / "other")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(WorkbenchError, match="is a file, not a folder"):
        saes.train_and_evaluate(zoo, settings, afile)
    assert not (tmp_path / "other").exists() and afile.read_text() == "x"
