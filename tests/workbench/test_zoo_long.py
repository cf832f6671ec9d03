"""zoo-long's pieces: the training model against TransformerLens, the byte table, the corpus
builder, corpus training with checkpoints."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace

import pytest
import torch

from workbench import WorkbenchError
from workbench.zoo import ZOO, Stage, ZooSpec, build, load, train
from workbench.zoo import corpus as corpus_mod
from workbench.zoo.corpus import build_corpus, load_corpus, paragraphs, python_prose
from workbench.zoo.data import Mixture, bytes_to_ids, sample_batch
from workbench.zoo.functional import ZooModel
from workbench.zoo.tokenizer import byte_ids, byte_tokenizer
from workbench.zoo.train import checkpoint_steps, functional_model

SEED = 20261202


@pytest.mark.parametrize("d_mlp", [None, 48])
@pytest.mark.parametrize("layers,d_model,heads", [(1, 32, 2), (3, 48, 4)])
def test_training_model_is_the_hooked_transformer(layers, d_model, heads, d_mlp):
    spec = ZooSpec("t", "t", layers, d_model, heads, d_mlp, n_ctx=96, stages=(Stage(1, 8, 1),), seed=SEED % 97)
    tl, fast = build(spec), functional_model(spec)
    ours, theirs = fast.state_dict(), tl.state_dict()
    assert set(ours) <= set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # same initial weights, bit for bit
    assert not [k for k in theirs if k not in ours and not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
    with torch.no_grad():  # trained-looking weights: no parameter left at its initial 0 or 1
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tl.load_state_dict(fast.state_dict(), strict=False)
    ids = torch.randint(0, 259, (2, 90), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), tl(ids), atol=2e-5, rtol=1e-5)


def test_rotary_matters():
    """The check above can fail: a model without rotary positions is a different function."""
    spec = ZooSpec("t", "t", 2, 32, 2, None, n_ctx=64, stages=(Stage(1, 8, 1),))
    fast, tl = functional_model(spec), build(spec)
    fast.sin.zero_()
    fast.cos.fill_(1.0)
    ids = torch.randint(0, 259, (1, 40), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        assert (fast(ids) - tl(ids)).abs().max() > 1e-3


def test_byte_table_tokenises_like_the_tokenizer():
    text = "naïve café — 東京 🙂 \t\n\x00\x7f" + "".join(chr(i) for i in range(1, 700))
    expected = byte_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert byte_ids()[torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()].tolist() == expected
    assert bytes_to_ids(text.encode()).tolist() == expected and bytes_to_ids(b"").numel() == 0
    assert len(set(byte_ids().tolist())) == 256


SOURCE = '''#!/usr/bin/env python
"""Module docstring that explains what this little module is for."""

import os  # noqa: F401


def f(x):
    """Return x plus one, which is a very useful thing to compute."""
    # a comment block that spans
    # two lines of the file
    y = "not a docstring, a string constant inside the code"
    return x + 1  # pragma: no cover
'''


def test_python_prose_keeps_docstrings_and_comments_in_order():
    assert python_prose(SOURCE) == [
        "Module docstring that explains what this little module is for.",
        "Return x plus one, which is a very useful thing to compute.",
        "a comment block that spans two lines of the file",
    ]
    assert python_prose("def broken(:\n    # still a comment here\n") == ["still a comment here"]
    assert paragraphs("short\n\n" + "x" * 50 + "  \n  \n\n\n" + "y" * 45) == ["x" * 50, "y" * 45]


def _fake_install(tmp_path, monkeypatch):
    site, doc = tmp_path / "site", tmp_path / "doc"
    site.mkdir()
    doc.mkdir()
    (site / "a.py").write_text(SOURCE)
    (site / "b.py").write_text(SOURCE.replace("little", "small"))  # one paragraph new, the rest repeated
    (site / "README.md").write_text("A readme paragraph long enough to be kept by the builder.\n\nshort")
    (site / "data.bin").write_bytes(b"\0\1\2" * 100)
    (doc / "changelog.gz").write_bytes(gzip.compress(b"* Fixed a bug that made the tool crash on empty input."))
    (doc / "latin1.txt").write_bytes("caf\xe9 is not UTF-8 and must be skipped, whatever it says".encode("latin-1"))
    files = [("pkg", site / n) for n in ("README.md", "a.py", "b.py", "data.bin")]
    monkeypatch.setattr(corpus_mod, "distribution_files", lambda: iter(files))
    monkeypatch.setattr(corpus_mod, "debian_files", lambda: corpus_mod.__dict__["_debian"](doc))


def test_corpus_is_deduplicated_deterministic_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_debian", corpus_mod.debian_files, raising=False)
    _fake_install(tmp_path, monkeypatch)
    manifest = build_corpus(tmp_path / "c1", seed=3, progress=False)
    build_corpus(tmp_path / "c2", seed=3, progress=False)
    data, loaded = load_corpus(tmp_path / "c1")
    assert loaded == manifest and data == (tmp_path / "c2" / "corpus.txt").read_bytes()
    text = data.decode()
    assert text.count("Return x plus one") == 1 and "small module" in text and "little module" in text
    assert "crash on empty input" in text and "readme paragraph" in text
    assert "string constant" not in text and "caf" not in text and "\0" not in text
    assert manifest["sources"]["python"]["files"] == 2 and manifest["sources"]["debian"]["files"] == 1
    assert manifest["bytes"] == len(data)
    cut = build_corpus(tmp_path / "c3", seed=3, max_bytes=len(data) - 10, progress=False)
    assert cut["bytes"] < len(data) and load_corpus(tmp_path / "c3")[0] in data
    with pytest.raises(WorkbenchError, match="less than"):
        build_corpus(tmp_path / "c4", min_bytes=10**9, progress=False)
    (tmp_path / "c1" / "corpus.txt").write_bytes(data + b"x")
    with pytest.raises(WorkbenchError, match="SHA-256"):
        load_corpus(tmp_path / "c1")
    with pytest.raises(WorkbenchError, match="workbench zoo corpus"):
        load_corpus(tmp_path / "none")


def test_sample_batch_draws_text_from_the_given_corpus():
    corpus = bytes_to_ids(b"abcdefghij" * 200)
    ids, _ = sample_batch(4, 64, torch.Generator().manual_seed(SEED), Mixture(text=1, repeat=0, needle=0), corpus)
    text = byte_tokenizer().decode(ids[0, 1:])
    assert text in "abcdefghij" * 200 and ids.dtype == torch.long


def test_corpus_training_keeps_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_debian", corpus_mod.debian_files, raising=False)
    _fake_install(tmp_path, monkeypatch)
    build_corpus(tmp_path / "corpus", progress=False)
    mix = Mixture(text=0.8, repeat=0.2, needle=0)
    stages = (Stage(12, 32, 4, mix), Stage(12, 64, 2, mix))
    spec = replace(ZOO["tiny"], name="tiny-corpus", corpus="installed", checkpoints=(5, 20), n_ctx=64, stages=stages)
    with pytest.raises(WorkbenchError, match="--corpus"):
        train(spec, tmp_path / "w", progress=False)
    metrics = train(spec, tmp_path / "w", progress=False, corpus_dir=tmp_path / "corpus")
    assert metrics["steps"] == 24 and metrics["tokens"] == 12 * 32 * 4 + 12 * 64 * 2
    assert metrics["corpus_sha256"] == json.loads((tmp_path / "corpus" / "manifest.json").read_text())["sha256"]
    assert checkpoint_steps("tiny-corpus", tmp_path / "w") == [5, 20]
    early, final = load("tiny-corpus", tmp_path / "w", step=5), load("tiny-corpus", tmp_path / "w")
    assert early.W_Q.dtype == torch.float32
    assert not torch.allclose(early.W_Q, final.W_Q)
    with pytest.raises(WorkbenchError, match="5, 20"):
        load("tiny-corpus", tmp_path / "w", step=7)
    stopped = train(spec, tmp_path / "s", progress=False, corpus_dir=tmp_path / "corpus", max_seconds=1e-9)
    assert stopped["stopped_at"] == 1 and stopped["steps"] == 1


def test_zoo_long_recipe_fits_its_goals():
    spec = ZOO["zoo-long"]
    tokens = sum(s.steps * s.batch * s.seq_len for s in spec.stages)
    assert tokens >= 100_000_000  # the sink paper's threshold (Gu et al. 2025)
    assert max(s.seq_len for s in spec.stages) > 4096 + 16 and spec.n_ctx >= 4096 + 16
    params = sum(
        p.numel() for p in ZooModel(spec.n_layers, spec.d_model, spec.n_heads, spec.d_mlp, 64, 259, 0).parameters()
    )
    committed = params * 4 + len(spec.checkpoints) * params * 2  # float32 model, float16 checkpoints
    assert committed <= 25 * 2**20


def test_corpus_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from workbench.cli import app

    monkeypatch.setattr(corpus_mod, "_debian", corpus_mod.debian_files, raising=False)
    _fake_install(tmp_path, monkeypatch)
    runner = CliRunner()
    result = runner.invoke(app, ["zoo", "corpus", "--out", str(tmp_path / "c"), "--min-mb", "1"])
    assert result.exit_code == 2 and "less than the 1 MB" in result.output
    result = runner.invoke(app, ["zoo", "corpus", "--out", str(tmp_path / "c"), "--min-mb", "0"])
    assert result.exit_code == 0 and "corpus of 0.0 MB" in result.output, result.output
    assert load_corpus(tmp_path / "c")[1]["sources"]["python"]["files"] == 2
    result = runner.invoke(app, ["zoo", "train", "zoo-long", "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "workbench zoo corpus" in result.output
