"""Instrumented Hugging Face models (through AttentionInterface): same outputs as eager
attention, statistics equal to those of ``output_attentions=True``."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

from kernels import StatsSpec
from tests.conftest import SEED
from tests.kernels.oracle import stats_from_pattern
from workbench.errors import WorkbenchError
from workbench.instrument import instrument
from workbench.recording import PatternSpec

SPEC = StatsSpec.all(sink_tokens=1, window=4, offsets=(1, 2))
CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "qwen2-gqa": lambda: Qwen2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "bert": lambda: BertConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    ),
}


def build(kind: str):
    torch.manual_seed(SEED)
    cfg = CONFIGS[kind]()
    auto = AutoModel if kind == "bert" else AutoModelForCausalLM
    model = auto.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # sharper patterns than the init gives
        for name, p in model.named_parameters():
            if any(
                s in name for s in ("q_proj.weight", "k_proj.weight", "query.weight", "key.weight", "c_attn.weight")
            ):
                p.mul_(4)
    return model


def inputs(n=24, batch=2, vocab=97):
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (batch, n), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, n - 7 :] = 0  # right padding on the second sequence
    return ids, mask


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_outputs_and_statistics_match_eager(kind):
    model = build(kind)
    ids, mask = inputs()
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        with instrument(model, stats=SPEC, backend="reference") as rec:
            got = model(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(main_output(got)[valid], main_output(eager)[valid], atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == "eager"  # restored
    assert rec.layers == [0, 1]
    n_valid = int(mask[1].sum())
    for layer, pattern in enumerate(eager.attentions):
        st = rec.layer(layer)
        want = stats_from_pattern(pattern, SPEC)
        for name, t in want.items():
            got_t = getattr(st, name).double()
            tol = 2e-5 * (ids.shape[1] if name in ("distance", "key_mass") else 1)
            torch.testing.assert_close(got_t[0], t[0], atol=tol, rtol=1e-4, msg=f"{name} (full row)")
            if name == "key_mass":  # eager counts padded query rows too; the kernel skips them
                continue
            torch.testing.assert_close(got_t[1, :, :n_valid], t[1, :, :n_valid], atol=tol, rtol=1e-4, msg=name)
        assert torch.all(st.argmax[1, :, n_valid:] == -1)  # padded queries are empty rows


def test_greedy_generation_with_cache_is_unchanged():
    model = build("llama-gqa")
    ids, _ = inputs(n=10, batch=1)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with instrument(model, stats=SPEC) as rec:
            got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    # one forward per generated token (a random model may stop early at its EOS token)
    assert len(rec.calls[0]) == got.shape[1] - ids.shape[1]
    assert rec.calls[0][0].lse.shape == (1, 4, 10)
    if len(rec.calls[0]) > 1:
        assert rec.calls[0][-1].lse.shape == (1, 4, 1)


def test_bad_use():
    model = build("gpt2")
    with pytest.raises(WorkbenchError, match="TransformerLens"):
        with instrument(model, patterns=PatternSpec(layers=(0,))):
            pass
    with instrument(model):
        with pytest.raises(WorkbenchError, match="already instrumented"):
            with instrument(model):
                pass
    assert model.config._attn_implementation == "eager"
    model.train()
    with pytest.raises(WorkbenchError, match="eval mode"):
        with instrument(model):
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", ["bloom", "falcon"])
def test_models_that_compute_attention_themselves_are_refused_naming_the_layers(kind):
    """BLOOM (ALiBi) and Falcon do not route attention through AttentionInterface: instrumented,
    they would run and record nothing, so instrument() refuses them, naming their layers."""
    from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM

    torch.manual_seed(SEED)
    if kind == "bloom":
        model = BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=64))
        layer = "transformer.h.1.self_attention"
    else:
        model = FalconForCausalLM(
            FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64)
        )
        layer = "transformer.h.1.self_attention"
    with pytest.raises(WorkbenchError, match=f"computes attention in its own code.*{layer}"):
        with instrument(model.eval()):
            pass
    assert model.config._attn_implementation != "workbench"  # left as it was
