"""Instrumented TransformerLens models: same outputs, same hooks, statistics equal to those
of the uninstrumented model's own ``hook_pattern``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from kernels import StatsSpec
from tests.conftest import SEED
from tests.kernels.oracle import stats_from_pattern
from workbench.errors import WorkbenchError
from workbench.instrument import instrument
from workbench.models import load_model
from workbench.recording import PatternSpec, Recording

SPEC = StatsSpec.all(sink_tokens=2, window=8, offsets=(1, 3))
CONFIGS = {
    "standard": dict(positional_embedding_type="standard"),
    "rotary": dict(positional_embedding_type="rotary", rotary_dim=16),
    "rotary-gqa": dict(positional_embedding_type="rotary", rotary_dim=16, n_key_value_heads=2),
    "bidirectional": dict(positional_embedding_type="standard", attention_dir="bidirectional"),
    # the variants of issue 22: Gemma 2's local layers and soft-capping, gpt-oss's learned sinks, ALiBi
    "local-softcap": dict(
        positional_embedding_type="rotary",
        rotary_dim=16,
        use_local_attn=True,
        attn_types=["local", "global"],
        window_size=6,
        attn_scores_soft_cap=30.0,
    ),
    "sinks": dict(positional_embedding_type="rotary", rotary_dim=16, use_attention_sinks=True),
    "alibi": dict(positional_embedding_type="alibi"),
}


def tiny_model(kind: str, seed: int = SEED) -> HookedTransformer:
    if kind == "zoo-2l":  # the committed, trained zoo model
        return load_model("zoo-2l", device="cpu")
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=64,
        n_heads=4,
        d_head=16,
        n_ctx=96,
        d_vocab=61,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        **CONFIGS[kind],
    )
    model = HookedTransformer(cfg)
    # Larger weights than the init give peaked, varied patterns (a stronger test).
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(6)
            block.attn.W_K.mul_(6)
            if cfg.use_attention_sinks:  # zeros at init; sinks of either sign, some large
                block.attn.sinks.copy_(torch.randn(cfg.n_heads) * 3)
    return model.eval()


def stats_of_plain_pattern(pattern: torch.Tensor, spec: StatsSpec, sinks: bool) -> dict[str, torch.Tensor]:
    """The statistics of TransformerLens's own ``hook_pattern``: with learned sinks its rows sum
    to less than 1, and the rest is the sink's (``learned_sink_mass``, and in the entropy)."""
    want = stats_from_pattern(pattern, spec)
    if sinks:
        sink = (1 - pattern.double().sum(-1)).clamp_min(0)
        want["entropy"] = want["entropy"] - torch.special.xlogy(sink, sink)
        want["learned_sink_mass"] = sink
    return want


@pytest.fixture(params=[*sorted(CONFIGS), "zoo-2l"])
def model(request):
    return tiny_model(request.param)


def atol(name: str, toks: torch.Tensor) -> float:
    """Layer 1 sees layer 0's output, equal only up to float32 rounding, through peaked
    attention; distance and key mass count positions / rows, so they scale with N."""
    return 2e-5 * (toks.shape[1] if name in ("distance", "key_mass", "lse") else 1)


def tokens(model, batch=3, n=40):
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, model.cfg.d_vocab, (batch, n), generator=g)


def test_outputs_and_statistics_match_the_plain_model(model):
    toks = tokens(model)
    plain_logits, cache = model.run_with_cache(toks)
    sinks = model.cfg.use_attention_sinks
    spec = replace(SPEC, learned_sink=sinks)
    with instrument(model, stats=spec, backend="reference") as rec:
        logits = model(toks)
    torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-4)
    assert rec.layers == list(range(model.cfg.n_layers))
    for layer in rec.layers:
        want = stats_of_plain_pattern(cache["pattern", layer], spec, sinks)
        got = rec.layer(layer)
        for name, t in want.items():
            torch.testing.assert_close(getattr(got, name).double(), t, atol=atol(name, toks), rtol=1e-4, msg=name)
        assert got.entropy.shape == (3, model.cfg.n_heads, 40)


def test_triton_backend_through_the_model(model):
    toks = tokens(model, batch=2, n=33)
    plain = model(toks)
    with instrument(model, stats=SPEC, backend="triton") as rec:
        logits = model(toks)
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
    with instrument(model, stats=SPEC, backend="reference") as ref:
        model(toks)
    for name, t in ref.layer(1).items():
        torch.testing.assert_close(getattr(rec.layer(1), name), t, atol=5 * atol(name, toks), rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["local-softcap", "sinks", "alibi"])
def test_explicit_patterns_of_the_variants_are_the_plain_models(kind):
    """Patterns asked for through PatternSpec carry the variant (window, soft-cap, sinks, ALiBi)
    exactly as TransformerLens's own forward computes them."""
    model = tiny_model(kind)
    toks = tokens(model, batch=2, n=24)
    _, plain = model.run_with_cache(toks)
    with instrument(model, stats=SPEC, patterns=PatternSpec(layers=(0, 1))) as rec:
        model(toks)
    for layer in (0, 1):
        # layer 1 reads layer 0's output, equal to the plain model's within float32 rounding
        torch.testing.assert_close(rec.patterns[layer][0], plain["pattern", layer], atol=2e-5, rtol=1e-4)


def test_local_layers_see_only_their_window():
    """The local layer of the Gemma-2-style config attends to the last 6 keys at most; the
    global layer reaches further."""
    model = tiny_model("local-softcap")
    with torch.no_grad(), instrument(model, stats=StatsSpec(distance=True, argmax=True), backend="reference") as rec:
        model(tokens(model, batch=1, n=40))
    rows = torch.arange(40)
    assert bool(((rows - rec.layer(0).argmax) < 6).all()) and float(rec.layer(0).distance.max()) <= 5
    assert bool(((rows - rec.layer(1).argmax) >= 6).any())


def test_hooks_keep_firing_and_patterns_only_when_asked():
    model = tiny_model("rotary-gqa")
    toks = tokens(model, batch=1, n=20)
    with instrument(model, stats=SPEC):
        _, cache = model.run_with_cache(toks)
    names = set(cache.keys())
    for hook in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z"):
        assert f"blocks.0.attn.{hook}" in names and f"blocks.1.attn.{hook}" in names
    assert not any("hook_pattern" in n or "hook_attn_scores" in n for n in names)
    _, plain = model.run_with_cache(toks)
    with instrument(model, stats=SPEC, patterns=PatternSpec(layers=(1,), heads=(0, 2))) as rec:
        _, cache = model.run_with_cache(toks)
    assert "blocks.1.attn.hook_pattern" in cache and "blocks.0.attn.hook_pattern" not in cache
    torch.testing.assert_close(cache["pattern", 1], plain["pattern", 1])
    torch.testing.assert_close(rec.patterns[1][0], plain["pattern", 1][:, [0, 2]])
    torch.testing.assert_close(cache["z", 0], plain["z", 0], atol=1e-5, rtol=1e-5)


def test_right_padding_and_kv_cache_generation():
    model = tiny_model("rotary")
    toks = tokens(model, batch=2, n=16)
    mask = torch.ones_like(toks)
    mask[1, 11:] = 0  # right padding
    plain = model(toks, attention_mask=mask)
    with instrument(model, stats=SPEC, backend="reference") as rec:
        padded = model(toks, attention_mask=mask)
    torch.testing.assert_close(padded[0], plain[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded[1, :11], plain[1, :11], atol=1e-4, rtol=1e-4)
    assert torch.all(rec.layer(0).argmax[1, :, 11:] == -1)  # padded queries are empty rows
    assert torch.all(rec.layer(0).key_mass[1, :, 11:] == 0)
    # greedy decoding with TransformerLens's KV cache: queries see the cached keys
    want = model.generate(toks[:1, :8], max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False)
    with instrument(model, stats=SPEC) as rec:
        got = model.generate(toks[:1, :8], max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False)
    assert torch.equal(got, want)
    assert len(rec.calls[0]) == 5 and rec.calls[0][-1].lse.shape == (1, 4, 1)


def test_model_is_restored_after_errors_and_refuses_double_instrumenting():
    model = tiny_model("standard")
    toks = tokens(model, batch=1, n=10)
    plain = model(toks)
    with pytest.raises(RuntimeError, match="boom"):
        with instrument(model):
            raise RuntimeError("boom")
    assert "forward" not in vars(model.blocks[0].attn)
    with instrument(model):
        with pytest.raises(WorkbenchError, match="already instrumented"):
            with instrument(model):
                pass
    torch.testing.assert_close(model(toks), plain)
    with pytest.raises(WorkbenchError, match="out of range"):
        with instrument(model, patterns=PatternSpec(layers=(5,))):
            pass
    with pytest.raises(WorkbenchError, match="max_tokens"):
        with instrument(model, patterns=PatternSpec(layers=(0,), max_tokens=4)):
            model(toks)
    with pytest.raises(WorkbenchError, match="HookedTransformer"):
        with instrument(torch.nn.Linear(2, 2)):
            pass


def test_recording_frame_and_round_trip(tmp_path):
    model = tiny_model("rotary")
    with instrument(model, stats=SPEC) as rec:
        model(tokens(model, batch=2, n=12))
        model(tokens(model, batch=1, n=12))
    st = rec.layer(0)
    assert st.entropy.shape == (3, 4, 12)  # two calls joined along the batch
    frame = rec.to_frame()
    assert set(frame.columns) == {"layer", "batch", "head", "position", "statistic", "value"}
    ent = frame[(frame.statistic == "entropy") & (frame.layer == 1)]
    assert len(ent) == 3 * 4 * 12
    row = ent.iloc[17]
    assert row.value == pytest.approx(rec.layer(1).entropy[row.batch, row["head"], row.position].item())
    assert {"offset_mass[1]", "offset_mass[3]", "key_mass"} <= set(frame.statistic)
    rec.save(tmp_path / "rec")
    back = Recording.load(tmp_path / "rec")
    assert back.spec == rec.spec and back.layers == rec.layers
    for name, t in rec.layer(1).items():
        torch.testing.assert_close(getattr(back.layer(1), name), t)
    with pytest.raises(WorkbenchError, match="cannot read"):
        Recording.load(tmp_path / "missing")
