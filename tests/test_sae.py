"""Attention-output SAEs (sae-lens) on the zoo model's hook_z."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from probes import sae as saes
from probes.cli import register
from tests.conftest import SEED
from workbench import WorkbenchError, load_model
from workbench.cli import app
from workbench.tasks import text_samples
from workbench.zoo import ZOO, build


@pytest.fixture(scope="module")
def zoo():
    return load_model("zoo-2l", device="cpu")


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
    torch.testing.assert_close(torch.tensor(shares.groupby("feature")["share"].sum().to_numpy()),
                               torch.ones(loaded.cfg.d_sae), atol=1e-5, rtol=0)
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
    result = runner.invoke(app, ["sae", "train", "--layer", "1", "--samples", "16", "--tokens", "50000",
                                 "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "explained_variance" in result.output and (out / "sae_weights.safetensors").exists()
    assert {"top_contexts.parquet", "head_attribution.parquet", "direct_attribution.parquet",
            "evaluation.json"} <= {p.name for p in out.iterdir()}
    result = runner.invoke(app, ["sae", "eval", str(out), "--layer", "1", "--samples", "2", "--device", "cpu"])
    assert result.exit_code == 0 and "ce_loss_recovered" in result.output, result.output
    result = runner.invoke(app, ["sae", "eval", str(out), "--layer", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "not blocks.0.attn.hook_z" in " ".join(result.output.split())
