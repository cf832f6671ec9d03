"""Chunked prefill (workbench.chunked): the statistics, tallies, profiles and score tables of a
prefill run ``chunk`` queries at a time against a growing KV cache equal those of one pass, for
TransformerLens (zoo-2l) and Hugging Face (a tiny random Llama) models; the model benchmark's
``--prefill-chunk`` runs on the CPU."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from kernels import AttentionStats, StatsSpec
from tests.tiny_models import tiny_llama
from workbench import WorkbenchError, record
from workbench.adapters import adapter_for
from workbench.chunked import chunk_bounds, chunked_prefill, record_chunked
from workbench.recording import StreamingSummary, join_positions
from workbench.scoring import ScoreRunSettings, score_model
from workbench.scoring.formulas import SCORES, ScoreSettings, prefill_tallies, stats_spec
from workbench.scoring.settings import check_model

#: Every statistic, key mass and two offsets included.
ALL_STATS = StatsSpec(
    entropy=True, max_prob=True, argmax=True, sink_tokens=2, window=4, distance=True, offsets=(1, 3), key_mass=True
)


def _tiny_llama(context: int = 64):
    model = tiny_llama(context=context, seed=0)
    model.tokenizer = None
    return model


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama()


def _assert_same(a, b, layers: int, atol: float = 2e-5) -> None:
    for i in range(layers):
        x, y = dict(a.layer(i).items()), dict(b.layer(i).items())
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].shape == y[name].shape, name
            if name == "argmax":
                assert torch.equal(x[name], y[name]), f"layer {i} argmax"
            else:
                torch.testing.assert_close(y[name], x[name], atol=atol, rtol=1e-4, msg=f"layer {i} {name}")


def test_chunk_bounds_cover_every_position_once():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(3, 10) == [(0, 3)]


@pytest.mark.parametrize("chunk", [1, 5, 7, 21, 50])
def test_record_chunked_equals_record_transformer_lens(zoo, chunk):
    ids = torch.randint(0, 256, (2, 21) if chunk > 1 else (1, 6))
    whole = record(zoo, ids, ALL_STATS, backend="reference", progress=False)
    chunked = record_chunked(zoo, ids, ALL_STATS, chunk=chunk, backend="reference")
    _assert_same(whole, chunked, 2)
    assert chunked.layer(0).entropy.shape == (ids.shape[0], 4, ids.shape[1])
    assert torch.equal(chunked.tokens[0], ids) and chunked.lengths[0].tolist() == [ids.shape[1]] * ids.shape[0]


@pytest.mark.parametrize("chunk", [1, 4, 6, 24, 30])
def test_record_chunked_equals_record_hugging_face(llama, chunk):
    ids = torch.randint(0, 300, (2, 24) if chunk > 1 else (1, 5))
    whole = record(llama, ids, ALL_STATS, backend="reference", progress=False)
    _assert_same(whole, record_chunked(llama, ids, ALL_STATS, chunk=chunk, backend="reference"), 2)


def test_record_chunked_triton_interpreter(llama):
    ids = torch.randint(0, 300, (1, 10))
    whole = record(llama, ids, ALL_STATS, backend="triton", progress=False)
    _assert_same(whole, record_chunked(llama, ids, ALL_STATS, chunk=4, backend="triton"), 2)


def test_chunked_prefill_logits_and_cache_continue_decoding(llama):
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        full = llama(ids).logits[:, -1]
        last, _ = chunked_prefill(llama, ids, 6)
        _, cache = chunked_prefill(llama, ids[:, :-1], 6)
        decoded, _ = adapter_for(llama).decode(ids[:, -1:], cache)
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-4)


def test_streamed_chunks_equal_streamed_whole(zoo):
    ids = torch.randint(0, 256, (2, 19))
    whole = record(zoo, ids, ALL_STATS, backend="reference", progress=False, bucket_size=4)
    into = StreamingSummary(ALL_STATS, 2, bucket_size=4)
    chunked = record_chunked(zoo, ids, ALL_STATS, chunk=6, backend="reference", into=into)
    assert chunked is into and chunked.rows_seen == whole.rows_seen == 2 * 19
    a, b = whole.to_frame(), chunked.to_frame()
    assert len(a) == len(b) and set(a["statistic"]) == set(b["statistic"]) >= {"key_mass", "entropy"}
    keys = ["layer", "head", "bucket_start", "statistic", "rows"]
    pd.testing.assert_frame_equal(a[keys], b[keys])
    torch.testing.assert_close(torch.tensor(b["mean"].values), torch.tensor(a["mean"].values), atol=2e-5, rtol=1e-4)


def test_join_positions_sums_key_mass_and_refuses_mixed_batches():
    a = AttentionStats(lse=torch.ones(1, 2, 3), key_mass=torch.ones(1, 2, 3), offset_mass=torch.zeros(1, 2, 3, 2))
    b = AttentionStats(lse=torch.full((1, 2, 2), 2.0), key_mass=torch.ones(1, 2, 5), offset_mass=torch.ones(1, 2, 2, 2))
    j = join_positions([a, b])
    assert j.lse.tolist() == [[[1, 1, 1, 2, 2]] * 2]
    assert j.key_mass.tolist() == [[[2, 2, 2, 1, 1]] * 2]
    assert j.offset_mass.shape == (1, 2, 5, 2) and j.offset_mass[0, 0, 3:].sum() == 4
    with pytest.raises(WorkbenchError, match="batch and heads"):
        join_positions([a, AttentionStats(lse=torch.ones(2, 2, 3))])


def test_prefill_tallies_of_chunks_add_up_to_the_whole(zoo):
    period, repeats = 7, 3
    ids = torch.cat([torch.tensor([256]), torch.randint(0, 256, (period,)).repeat(repeats)]).unsqueeze(0)
    scores = [s for s in SCORES if s != "retrieval"]
    settings = ScoreSettings(sink_tokens=1, window=3)
    spec = stats_spec(scores, settings, period, repeats)
    st = record(zoo, ids, spec, backend="reference", progress=False).layer(1)
    n = ids.shape[1]
    whole = prefill_tallies(st, scores, settings, spec, True, period, repeats)
    summed: dict[str, tuple[torch.Tensor, float]] = {}
    for start, end in chunk_bounds(n, 5):
        part = dataclasses.replace(
            st, **{k: v[:, :, start:end] for k, v in st.items() if k != "key_mass"}, key_mass=None
        )
        for name, (total, count) in prefill_tallies(
            part, scores, settings, spec, True, period, repeats, start=start, length=n
        ).items():
            old = summed.get(name)
            summed[name] = (total, count) if old is None else (old[0] + total, old[1] + count)
    assert sorted(summed) == sorted(whole)
    for name in whole:
        torch.testing.assert_close(summed[name][0], whole[name][0], msg=name)
        assert torch.equal(torch.as_tensor(summed[name][1]), torch.as_tensor(whole[name][1])), name
    assert float(whole["induction"][0].max()) > 0  # the offsets matter: a wrong start moves this mass


def _tables(run) -> dict[str, pd.DataFrame]:
    return {name: run.table(name) for name in ("head_scores", "profiles", "retrieval")}


def test_chunked_scoring_run_equals_one_pass(zoo, tmp_path):
    # depth 0.1: zoo-2l retrieves this sample's answer (ROUGE-1 recall > 0.5), so the retrieval table holds values
    base = ScoreRunSettings(model="zoo-2l", lengths=(256,), samples=1, depths=(0.1,), backend="reference")
    chunked = dataclasses.replace(base, prefill_chunk=100)
    a = _tables(score_model(zoo, base, tmp_path / "whole", progress=False))
    b = _tables(score_model(zoo, chunked, tmp_path / "chunked", progress=False))
    assert len(a["retrieval"]) and float(a["retrieval"].select_dtypes("number").abs().to_numpy().sum()) > 0
    for name in a:
        x, y = a[name], b[name]
        assert list(x.columns) == list(y.columns) and len(x) == len(y) > 0, name
        numbers = x.select_dtypes("number").columns
        others = [c for c in x.columns if c not in numbers]
        pd.testing.assert_frame_equal(x[others], y[others], obj=name)
        pd.testing.assert_frame_equal(x[numbers], y[numbers], check_exact=False, rtol=1e-5, atol=1e-6, obj=name)


def test_prefill_chunk_setting_round_trips_and_keeps_old_identities(zoo, llama):
    old = ScoreRunSettings(model="zoo-2l").to_dict()
    assert "prefill_chunk" not in old  # the dict of a run made before the option is unchanged
    assert ScoreRunSettings.from_dict(old).prefill_chunk is None
    new = ScoreRunSettings(model="zoo-2l", prefill_chunk=4096)
    assert new.to_dict()["prefill_chunk"] == 4096 and ScoreRunSettings.from_dict(new.to_dict()) == new
    for bad in (0, -3, True, 2.5, "8"):
        with pytest.raises(WorkbenchError, match="prefill_chunk"):
            ScoreRunSettings(model="zoo-2l", prefill_chunk=bad)
    check_model(zoo, new)
    check_model(llama, ScoreRunSettings(model="tiny", tasks=("text",), lengths=(32,), prefill_chunk=16))


def _tiny_encoder():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return BertModel(cfg).eval()


def test_refusals(zoo):
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(WorkbenchError, match="unpadded"):
        chunked_prefill(zoo, ids, 3, mask=torch.tensor([[1] * 8, [1] * 6 + [0] * 2]))
    for bad in (0, True, 1.5):
        with pytest.raises(WorkbenchError, match="int >= 1"):
            record_chunked(zoo, ids, chunk=bad)
    with pytest.raises(WorkbenchError, match=r"\[0, 256\)|\[0, "):
        record_chunked(zoo, torch.tensor([[1, 2, 100000]]), chunk=2)
    with pytest.raises(WorkbenchError, match="context"):
        record_chunked(zoo, torch.zeros(1, zoo.cfg.n_ctx + 1, dtype=torch.long), chunk=512)
    with pytest.raises(WorkbenchError, match="StreamingSummary"):
        record_chunked(zoo, ids, chunk=3, into=[])
    with pytest.raises(WorkbenchError, match="key_mass_queries"):
        record_chunked(zoo, ids, StatsSpec(key_mass=True, key_mass_queries=4), chunk=3)
    encoder = _tiny_encoder()
    with pytest.raises(WorkbenchError, match="causal language model"):
        chunked_prefill(encoder, torch.randint(0, 50, (1, 6)), 2)
    with pytest.raises(WorkbenchError, match="prefill chunk"):
        check_model(encoder, ScoreRunSettings(model="x", tasks=("text",), lengths=(64,), prefill_chunk=4))


def test_model_benchmark_smoke_with_prefill_chunk(monkeypatch, capsys):
    import workbench.model_benchmark as bench

    monkeypatch.setattr(bench, "load_model", lambda name, device, dtype: _tiny_llama().to(dtype))
    argv = ["--model", "tiny", "--lengths", "96", "--prefill-chunk", "40", "--repeats", "1"]
    assert bench.main(argv + ["--variants", "sdpa,sdpa-chunked,recorded,streamed,scored"]) == 0
    out = capsys.readouterr().out
    assert "prefill chunk 40" in out
    for label in ("sdpa", "sdpa-chunked", "recorded-chunked", "streamed-chunked", "scored-chunked"):
        assert f"| 96 | {label} |" in out, label
    check = next(line for line in out.splitlines() if "chunked and one-pass" in line)
    assert float(check.rsplit(" ", 1)[1]) < 1e-4
    assert (
        bench.main(["--model", "tiny", "--lengths", "32", "--variants", "sdpa", "--repeats", "1", "--no-warmup"]) == 0
    )
    assert "| 32 | sdpa |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs a prefill chunk"):
        bench.measure_forward(_tiny_llama(), 16, "sdpa-chunked", repeats=1)
    with pytest.raises(SystemExit):
        bench.main(argv[:4] + ["--variants", "sdpa-chunked"])
