"""Tasks: exact needle spans and answers for any tokenizer, repeats, text windows, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import SEED
from workbench import WorkbenchError, load_model
from workbench.tasks import needle_samples, read_text, repeat_samples, text_samples
from workbench.zoo.tokenizer import byte_tokenizer


@pytest.fixture(scope="module", params=["bytes", "wordpiece"])
def tokenizer(request):
    if request.param == "bytes":
        return byte_tokenizer()
    return load_model("minilm", device="cpu").tokenizer  # BERT WordPiece, no BOS token


def test_needle_samples_know_their_needle_and_answer(tokenizer):
    depths = [0.0, 0.25, 0.5, 1.0]
    samples = needle_samples(tokenizer, lengths=[300, 700], depths=depths, per_cell=2, seed=SEED)
    assert len(samples) == 2 * len(depths) * 2
    for i, s in enumerate(samples):  # ordered by length, then depth
        assert len(s.ids) + len(s.answer) == (300 if i < len(samples) // 2 else 700) and s.ids.dtype == torch.long
        needle = s.ids[s.needle.start : s.needle.stop]
        text = tokenizer.decode(needle).lower()
        assert "secret code of" in text and tokenizer.decode(s.answer).strip() in text
        # the question at the end is the needle up to the answer, so copying it is retrieval
        q = len(s.ids) - (len(needle) - len(s.answer) - 1)
        assert torch.equal(s.ids[q:], needle[: len(s.ids) - q])
        assert torch.equal(needle[len(s.ids) - q : len(s.ids) - q + len(s.answer)], s.answer)
    starts = [[s.needle.start for s in samples if s.depth == d and len(s.ids) + len(s.answer) == 700] for d in depths]
    assert all(max(a) < min(b) for a, b in zip(starts, starts[1:]))  # deeper needles sit later


def test_zoo_model_answers_needle_samples(zoo):
    model = zoo
    samples = needle_samples(model.tokenizer, lengths=[512], depths=[0.2, 0.8], per_cell=4, seed=SEED)
    correct = 0
    with torch.no_grad():
        for s in samples:
            cur = s.ids[None]
            for _ in range(len(s.answer)):
                cur = torch.cat([cur, model(cur)[0, -1].argmax().view(1, 1)], 1)
            correct += torch.equal(cur[0, len(s.ids) :], s.answer)
    assert correct >= 3  # chance is 1e-4 per sample; the model scores ~0.8 at this length


def test_repeat_samples(tokenizer):
    samples = repeat_samples(tokenizer, period=23, repeats=3, n=5, seed=SEED)
    special = set(tokenizer.all_special_ids)
    for s in samples:
        body = s.ids[len(s.ids) - 69 :]
        assert len(s.ids) in (69, 70) and s.period == 23
        assert torch.equal(body[:23], body[23:46]) and torch.equal(body[:23], body[46:])
        assert not special & set(body.tolist())
    assert not torch.equal(samples[0].ids, samples[1].ids)


def test_text_samples_from_files(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("Attention sinks are everywhere. " * 40)
    samples = text_samples(tokenizer, tmp_path, length=64)
    assert len(samples) > 3 and all(len(s.ids) == 64 for s in samples)
    assert len(text_samples(tokenizer, tmp_path / "a.txt", length=64, n=2)) == 2
    assert len(text_samples(tokenizer, None, length=128, n=3)) == 3


def test_bad_task_input(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(WorkbenchError, match="does not fit"):
        needle_samples(tok, lengths=[20], depths=[0.5])
    with pytest.raises(WorkbenchError, match=r"\[0, 1\]"):
        needle_samples(tok, lengths=[200], depths=[1.5])
    with pytest.raises(WorkbenchError, match="too few"):
        needle_samples(tok, lengths=[500], depths=[0.5], haystack="short text " * 10)
    with pytest.raises(WorkbenchError, match="period >= 2"):
        repeat_samples(tok, period=1)
    with pytest.raises(WorkbenchError, match="neither a file nor a directory"):
        text_samples(tok, tmp_path / "missing")
    with pytest.raises(WorkbenchError, match="no .txt or .md"):
        text_samples(tok, tmp_path)
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(WorkbenchError, match="fewer than one"):
        text_samples(tok, tmp_path / "tiny.txt", length=64)


def test_text_from_a_hugging_face_dataset(tmp_path, monkeypatch):
    """``hf:NAME`` streams a dataset's train split (here a local folder of JSON lines, so no
    download); an unreachable name gives a WorkbenchError that points to --text PATH. (One
    test, not one per tokenizer: parallel workers would share datasets' cache locks.)"""
    tokenizer = byte_tokenizer()
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rows = [f"Row {i} of a local dataset, long enough to make windows of text." for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(rows)))
    text = read_text(f"hf:{tmp_path}")
    assert text.startswith(rows[0]) and rows[-1] in text
    samples = text_samples(tokenizer, f"hf:{tmp_path}", length=64, n=3)
    assert len(samples) == 3
    with pytest.raises(WorkbenchError, match="--text PATH"):
        read_text("hf:no-such-owner/no-such-dataset-for-the-workbench")
