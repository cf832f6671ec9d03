"""load_model names and the one-call record(): real MiniLM, random shapes, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kernels import StatsSpec
from tests.kernels.oracle import stats_from_pattern
from tests.workbench.test_instrument_transformer_lens import tiny_model
from workbench import Recording, WorkbenchError, load_model, record
from workbench.models import RANDOM_SHAPES

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention sinks appear in many language models.",
    "Short one.",
]


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm", device="cpu")


def test_minilm_is_the_real_pretrained_encoder(minilm):
    assert minilm.config.num_hidden_layers == 6 and minilm.config.num_attention_heads == 12
    enc = minilm.tokenizer(["hello world"], return_tensors="pt")
    with torch.no_grad():
        emb = minilm(**enc).last_hidden_state.mean(1)

    # Trained weights: a sentence embedding is far from what a random init gives, and two
    # related sentences are closer than two unrelated ones.
    def embed(texts):
        e = minilm.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = minilm(**e).last_hidden_state
        m = e["attention_mask"].unsqueeze(-1)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    a, b, c = embed(["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply."])
    assert (a @ b) > (a @ c) + 0.3
    assert emb.shape == (1, 384)


def test_minilm_statistics_equal_eager_output_attentions(minilm):
    spec = StatsSpec(entropy=True, max_prob=True, sink_tokens=1, window=3, distance=True, offsets=(1,))
    rec = record(minilm, SENTENCES, stats=spec, backend="reference", progress=False)
    assert minilm.config._attn_implementation == "sdpa"  # restored
    enc = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    minilm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = minilm(**enc, output_attentions=True).attentions
    finally:
        minilm.set_attn_implementation("sdpa")
    lengths = enc["attention_mask"].sum(-1)
    assert torch.equal(rec.lengths[0], lengths) and torch.equal(rec.tokens[0], enc["input_ids"])
    for layer in range(6):
        want = stats_from_pattern(eager[layer], spec)
        got = rec.layer(layer)
        for b, n in enumerate(lengths.tolist()):
            for name, t in want.items():
                torch.testing.assert_close(
                    getattr(got, name)[b, :, :n].double(),
                    t[b, :, :n],
                    atol=5e-5 * (n if name == "distance" else 1),
                    rtol=1e-4,
                    msg=f"layer {layer} {name}",
                )


def test_random_shapes_are_the_published_ones():
    expected_params = {
        "gpt2-small": 124.4e6,
        "llama-3.2-1b": 1235.8e6,
        "llama-3.2-3b": 3212.7e6,
        "qwen2.5-0.5b": 494.0e6,
    }
    for name, make in RANDOM_SHAPES.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(make())
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - expected_params[name]) / expected_params[name] < 0.01, (name, n)
    cfg = RANDOM_SHAPES["llama-3.2-1b"]()
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 64)
    cfg = RANDOM_SHAPES["llama-3.2-3b"]()
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (28, 24, 8, 128)


def test_random_model_loads_and_records():
    model = load_model("random:gpt2-small", device="cpu")
    assert model.tokenizer is None and not model.training
    rec = record(model, torch.randint(0, 50257, (2, 16)), progress=False)
    assert rec.n_layers == 12 and rec.layer(11).entropy.shape == (2, 12, 16)


def test_unknown_and_unreachable_names(monkeypatch, tmp_path):
    with pytest.raises(WorkbenchError, match="random:llama-3.2-1b"):
        load_model("random:llama-9b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match="Available without any download: zoo-2l, zoo-long, planted, minilm"):
        load_model("hf:someone/not-a-model-xyz")
    with pytest.raises(WorkbenchError, match="non-empty"):
        load_model("")


def test_record_pads_id_sequences_and_round_trips(tmp_path):
    model = tiny_model("rotary")
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]]
    rec = record(model, seqs, batch_size=2, progress=False)
    assert [t.shape for t in rec.tokens] == [(2, 6), (1, 4)]
    assert rec.lengths[0].tolist() == [6, 3]
    assert torch.all(rec.calls[0][0].argmax[1, :, 3:] == -1)  # padded positions are empty rows
    rec.save(tmp_path / "r")
    back = Recording.load(tmp_path / "r")
    assert torch.equal(back.tokens[1], rec.tokens[1]) and torch.equal(back.lengths[0], rec.lengths[0])


def test_record_bad_input():
    model = tiny_model("standard")
    with pytest.raises(WorkbenchError, match="empty input"):
        record(model, [], progress=False)
    with pytest.raises(WorkbenchError, match="empty input"):
        record(model, torch.zeros(0, dtype=torch.long), progress=False)
    with pytest.raises(WorkbenchError, match=r"token ids must lie in \[0, 61\)"):
        record(model, torch.tensor([[1, 2, 99]]), progress=False)
    with pytest.raises(WorkbenchError, match="longer than the model's context of 96"):
        record(model, torch.ones(1, 97, dtype=torch.long), progress=False)
    with pytest.raises(WorkbenchError, match="no tokenizer"):
        record(model, "some text", progress=False)
    with pytest.raises(WorkbenchError, match="batch_size"):
        record(model, [[1, 2]], batch_size=0, progress=False)
    with pytest.raises(WorkbenchError, match="integer tensor"):
        record(model, torch.ones(2, 3), progress=False)


def test_streaming_summary_equals_the_mean_of_the_full_recording():
    model = tiny_model("rotary")
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 61, (int(n),), generator=g) for n in torch.randint(5, 40, (7,), generator=g)]
    spec = StatsSpec.all(sink_tokens=1, window=4, offsets=(1, 2))
    full = record(model, seqs, stats=spec, batch_size=3, progress=False)
    summary = record(model, seqs, stats=spec, batch_size=3, progress=False, bucket_size=8)
    for layer in range(2):
        for name in ("entropy", "sink_mass", "distance", "offset_mass[2]"):
            sums, counts = torch.zeros(4, 5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
            for c, st in enumerate(full.calls[layer]):
                t = st.offset_mass[..., 1] if name == "offset_mass[2]" else getattr(st, name)
                for b, n in enumerate(full.lengths[c].tolist()):  # real tokens only
                    for p in range(n):
                        sums[:, p // 8] += t[b, :, p].double()
                        counts[p // 8] += 1
            torch.testing.assert_close(summary.mean(layer, name), sums / counts, msg=name)
    frame = summary.to_frame()
    assert set(frame.columns) == {"layer", "head", "bucket_start", "statistic", "mean", "rows"}
    assert summary.rows_seen == sum(len(s) for s in seqs)
    with pytest.raises(WorkbenchError, match="recorded statistics"):
        summary.mean(0, "nonsense")
