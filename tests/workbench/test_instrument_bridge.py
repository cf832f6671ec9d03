"""Instrumented TransformerLens ``TransformerBridge`` models (transformer-lens 3): the statistics
equal a float64 computation from the bridge's own eager ``hook_pattern`` and those of the same
Hugging Face model through the Hugging Face adapter; the outputs equal the uninstrumented
bridge's; the hooks the adapter documents keep firing (and editing ``hook_z`` still edits).

Bridges are built offline: a tiny random Hugging Face model booted with ``hf_model=`` and the
zoo's byte tokenizer, or saved with ``save_pretrained`` and loaded as ``bridge:<folder>``. One
model of each way the adapter instruments a component: GPT-2 (``JointQKVAttentionBridge``, its
``_reconstruct_attention`` core replaced), GPT-NeoX (the same with rotary) and Llama with
grouped-query attention (``PositionEmbeddingsAttentionBridge``, handed to the Hugging Face module).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import transformers
from transformer_lens.model_bridge import TransformerBridge

from kernels import StatsSpec
from tests.conftest import SEED
from tests.kernels.oracle import stats_from_pattern
from workbench import record
from workbench.adapters import adapter_for
from workbench.adapters.streaming import StreamingAttention
from workbench.adapters.transformer_bridge import TESTED_WITH, TransformerBridgeAdapter
from workbench.errors import WorkbenchError
from workbench.instrument import instrument
from workbench.models import load_model
from workbench.recording import PatternSpec
from workbench.zoo.tokenizer import byte_tokenizer

SPEC = StatsSpec.all(sink_tokens=1, window=4, offsets=(1, 2))
VOCAB = 300  # the byte tokenizer's 259 ids fit
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=96),
    "neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=96,
        rotary_pct=0.5,
    ),
    "llama-gqa": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
    ),
}
#: Hooks of blocks.{i}.attn that do not fire while instrumented (the adapter's documentation).
NOT_FIRED = {
    "gpt2": {"hook_attn_scores", "hook_pattern"},
    "neox": {"hook_attn_scores", "hook_pattern"},
    "llama-gqa": {"hook_attn_scores", "hook_pattern", "hook_rot_q", "hook_rot_k"},
}


def hugging_face(kind: str):
    """The tiny Hugging Face model of ``kind`` (eager attention, sharper attention than the
    initialisation gives), the same weights every call."""
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind](), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("q_proj.weight", "k_proj.weight", "c_attn.weight", "query_key_value.weight")):
                p.mul_(4)
    return model


def bridge(kind: str):
    """``(bridge, the same Hugging Face model unwrapped)``."""
    model = hugging_face(kind)
    plain = copy.deepcopy(model)
    booted = TransformerBridge.boot_transformers(
        f"tiny-{kind}", hf_model=model, tokenizer=byte_tokenizer(), device="cpu"
    )
    return booted.eval(), plain


def padded_ids(n: int = 20, batch: int = 3) -> list[list[int]]:
    """Id sequences of different lengths (``record`` right-pads them)."""
    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, 256, (n - 5 * i,), generator=g).tolist() for i in range(batch)]


def token_ids(n: int, batch: int) -> torch.Tensor:
    """``[batch, n]`` random byte ids."""
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(SEED + n))


def attention_hooks(model) -> list[str]:
    """The hook points of block 0's attention that can take a hook without extra settings."""
    return [n for n in model.hook_dict if n.startswith("blocks.0.attn.") and model._gated_hook_reason(n) is None]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_statistics_equal_the_eager_pattern_and_the_hugging_face_adapter(kind):
    model, plain = bridge(kind)
    assert isinstance(adapter_for(model), TransformerBridgeAdapter)
    seqs = padded_ids()
    rec = record(model, seqs, SPEC, backend="reference", progress=False)
    ids, lengths = rec.tokens[0], rec.lengths[0]
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, attention_mask=mask)  # the bridge's own eager attention
        with instrument(model, SPEC, backend="reference"):
            instrumented = model(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(instrumented[valid], logits[valid], atol=1e-5, rtol=1e-5)
    through_hf = record(plain, seqs, SPEC, backend="reference", progress=False)
    for layer in range(2):
        st = rec.layer(layer)
        want = stats_from_pattern(cache[f"blocks.{layer}.attn.hook_pattern"], SPEC)  # float64
        for name, t in want.items():
            got = getattr(st, name).double()
            tol = 2e-5 * (ids.shape[1] if name in ("distance", "key_mass") else 1)
            for row, n in enumerate(lengths.tolist()):
                if name == "key_mass" and n < ids.shape[1]:  # eager counts padded query rows too
                    continue
                torch.testing.assert_close(got[row, :, :n], t[row, :, :n], atol=tol, rtol=1e-4, msg=f"{name} {row}")
            torch.testing.assert_close(
                getattr(st, name), getattr(through_hf.layer(layer), name), atol=1e-6, rtol=1e-6, msg=name
            )
        assert torch.all(st.argmax[2, :, lengths[2] :] == -1)  # padded queries are empty rows
    # restored: the bridge's own components and the wrapped model's attention implementation
    assert model.original_model.config._attn_implementation == "eager"
    assert all(not {"forward", "_reconstruct_attention"} & set(vars(b.attn)) for b in model.blocks)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_hooks_fire_as_documented_and_edits_of_hook_z_take_effect(kind):
    model, _ = bridge(kind)
    ids = token_ids(12, 2)
    fired: set[str] = set()

    def seen(name: str):
        return lambda tensor, hook: fired.add(name.removeprefix("blocks.0.attn."))

    hooks = [(name, seen(name)) for name in attention_hooks(model)]

    def ablate(z, hook):  # z [batch, tokens, head, d_head]
        z = z.clone()
        z[:, :, 1] = 0
        return z

    with torch.no_grad():
        model.run_with_hooks(ids, fwd_hooks=hooks)
        everything, fired = set(fired), set()
        plain = model(ids)
        ablated = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", ablate)])
        with instrument(model, SPEC, backend="reference"):
            model.run_with_hooks(ids, fwd_hooks=hooks)
            instrumented = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", ablate)])
            through_adapter = adapter_for(model)
            remove = through_adapter.z_hooks(lambda layer, z: ablate(z, None) if layer == 0 else None)
            try:
                edited = model(ids)
            finally:
                remove()
    assert {"hook_q", "hook_k", "hook_v", "hook_z", "hook_in", "hook_out"} <= fired
    assert everything - fired == NOT_FIRED[kind]
    assert not fired - everything
    assert (ablated - plain).abs().max() > 1e-3  # the edit matters...
    torch.testing.assert_close(instrumented, ablated, atol=1e-5, rtol=1e-5)  # ...and is the same instrumented
    torch.testing.assert_close(edited, ablated, atol=1e-5, rtol=1e-5)
    assert not model.blocks[0].attn.hook_z.fwd_hooks  # z_hooks removed its own


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_decoding_with_a_kv_cache_gives_the_full_forward_logits(kind):
    """Prefill then decode through the adapter, instrumented and not, equals one forward over
    every token (transformer-lens 3.9.0's components alone ignore the cache transformers 5
    passes as ``cache``; the adapter passes it under both names)."""
    model, _ = bridge(kind)
    adapter = adapter_for(model)
    ids = token_ids(14, 2)
    with torch.no_grad():
        full = model(ids)
        for instrumented in (False, True):
            with instrument(model, SPEC, backend="reference") if instrumented else nullcontext() as rec:
                logits, cache = adapter.prefill(ids[:, :9])
                steps = [logits]
                for t in range(9, 13):
                    logits, cache = adapter.decode(ids[:, t : t + 1], cache)
                    steps.append(logits)
            torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:13], atol=1e-5, rtol=1e-5)
    assert [c.lse.shape for c in rec.calls[0]] == [(2, 4, 9)] + [(2, 4, 1)] * 4


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_streaming_is_the_hugging_face_adapters(kind):
    model, plain = bridge(kind)
    streaming = StreamingAttention(window=5, keep_first=2, heads=[(0, 1), (1, 3)])
    ids = token_ids(24, 1)
    with torch.no_grad():
        full = model(ids)
        with instrument(model, SPEC, backend="reference", streaming=streaming) as rec:
            got = model(ids)
        with instrument(plain, SPEC, backend="reference", streaming=streaming) as want:
            expected = plain(ids).logits
    assert (got - full).abs().max() > 1e-3  # the restricted heads change the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for layer in range(2):
        for name, t in want.layer(layer).items():
            torch.testing.assert_close(getattr(rec.layer(layer), name), t, atol=1e-6, rtol=1e-6, msg=name)


def test_load_model_from_a_saved_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hugging_face("llama-gqa").save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    model = load_model(f"bridge:{tmp_path / 'm'}", device="cpu")
    assert isinstance(model, TransformerBridge) and not model.training
    rec = record(model, ["attention sinks", "a needle"], SPEC, progress=False)  # texts through its tokenizer
    assert rec.layer(1).entropy.shape == (2, 4, rec.tokens[0].shape[1])
    assert rec.model_name == str(tmp_path / "m")
    with pytest.raises(WorkbenchError, match="Available without any download"):
        load_model("bridge:someone/not-a-model-xyz")
    hugging_face("gpt2").save_pretrained(tmp_path / "untokenized")
    with pytest.raises(WorkbenchError, match="holds no tokenizer"):
        load_model(f"bridge:{tmp_path / 'untokenized'}")
    with pytest.raises(WorkbenchError, match="no folder"):
        load_model(f"bridge:{tmp_path / 'missing'}")
    with pytest.raises(WorkbenchError, match="device_map"):
        load_model(f"bridge:{tmp_path / 'm'}", device_map="auto")


def test_bad_use_is_refused_and_leaves_the_bridge_as_it_was(monkeypatch):
    model, _ = bridge("gpt2")
    with pytest.raises(WorkbenchError, match="run_with_cache"):
        with instrument(model, patterns=PatternSpec(layers=(0,))):
            pass
    with pytest.raises(WorkbenchError, match="TransformerBridge itself"):
        with instrument(model.original_model):
            pass
    with instrument(model):
        with pytest.raises(WorkbenchError, match="already instrumented"):
            with instrument(model):
                pass
    model.train()  # GPT-2's attention dropout
    with pytest.raises(WorkbenchError, match="eval mode"):
        with instrument(model):
            model(torch.zeros(1, 4, dtype=torch.long))
    model.eval()
    assert model.original_model.config._attn_implementation == "eager"
    assert "_reconstruct_attention" not in vars(model.blocks[0].attn)

    llama, _ = bridge("llama-gqa")
    llama.set_use_attn_result(True)  # hook_result would not fire inside the Hugging Face module
    with pytest.raises(WorkbenchError, match="set_use_attn_result"):
        with instrument(llama):
            pass
    assert llama.original_model.config._attn_implementation == "eager"

    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    monkeypatch.delattr(AttentionBridge, "_update_kv_cache")  # as a transformer-lens without the helper
    with pytest.raises(WorkbenchError, match=f"lacks _update_kv_cache.*{TESTED_WITH}"):
        adapter_for(model)


def test_attention_the_workbench_does_not_instrument_is_refused_by_name():
    """BLOOM's bridge component (ALiBi, computed in its own code) is not one of the instrumented
    classes: refused, naming the class and the way out."""
    torch.manual_seed(SEED)
    cfg = transformers.BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=VOCAB)
    bloom = transformers.BloomForCausalLM(cfg).eval()
    booted = TransformerBridge.boot_transformers("tiny-bloom", hf_model=bloom, tokenizer=byte_tokenizer(), device="cpu")
    with pytest.raises(WorkbenchError, match="BloomAttentionBridge.*hf:"):
        with instrument(booted):
            pass


def test_split_inputs_and_per_head_results_of_joint_qkv_attention_keep_working():
    """GPT-2's bridge with ``use_split_qkv_input`` and ``use_attn_result``: the per-head input
    and result hooks fire instrumented, and the output is the uninstrumented bridge's."""
    model, _ = bridge("gpt2")
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    ids = token_ids(12, 2)
    seen = []
    hooks = [
        (f"blocks.1.attn.{h}", lambda t, hook: seen.append(tuple(t.shape))) for h in ("hook_q_input", "hook_result")
    ]
    with torch.no_grad():
        plain = model(ids)
        with instrument(model, SPEC, backend="reference") as rec:
            got = model.run_with_hooks(ids, fwd_hooks=hooks)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    assert seen == [(2, 12, 4, 64), (2, 12, 4, 64)]  # [batch, tokens, head, d_model]
    assert rec.layer(1).entropy.shape == (2, 4, 12)
