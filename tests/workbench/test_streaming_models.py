"""Instrumented models with streaming attention (``instrument(model, streaming=...)``): the
logits of a TransformerLens model (the trained zoo-2l, rotary; a GQA one) and of a small Hugging
Face Llama (GQA) equal a float64 computation of the uninstrumented model with the streaming
restriction as an explicit mask (a ``hook_attn_scores`` hook setting the hidden scores to -inf;
an explicit attention function), on every head or chosen heads, both kernel backends (Triton
through its interpreter without a GPU), prefill and KV-cache decoding. Then explicit patterns,
each adapter's ``layer_windows`` (the windows each layer hands the kernels: TransformerLens local
blocks, Hugging Face Gemma 2/3, Mistral, Qwen 2 configs, TransformerBridge), and the refusals: a
layer with its own window, context parallelism, bad settings."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.tiny_models import tiny_llama
from tests.workbench.test_instrument_transformer_lens import tiny_model
from workbench.adapters import adapter_for
from workbench.adapters.streaming import StreamingAttention
from workbench.errors import WorkbenchError
from workbench.instrument import instrument
from workbench.recording import PatternSpec

SETTINGS = {
    "all": StreamingAttention(window=8, keep_first=2),
    "window-only": StreamingAttention(window=5, keep_first=0),
    "chosen": StreamingAttention(window=6, keep_first=3, heads=[(0, 1), (1, 0), (1, 3)]),
}


def hidden(streaming: StreamingAttention, layer: int, n_layers: int, n_heads: int, n: int) -> torch.Tensor:
    """Boolean ``[Hq, n, n]``: the scores the restriction hides (causality aside), by definition."""
    i = torch.arange(n).view(n, 1)
    j = torch.arange(n).view(1, n)
    on = streaming.head_mask(n_layers, n_heads)[layer].view(-1, 1, 1)
    return on & (i - j >= streaming.window) & (j >= streaming.keep_first)


def tl_float64_logits(model, ids: torch.Tensor, streaming: StreamingAttention) -> torch.Tensor:
    """The uninstrumented TransformerLens model in float64, hidden scores set to -inf by hooks."""
    m64 = copy.deepcopy(model).double()
    cfg = model.cfg

    def hook(layer):
        def mask(scores, hook):
            return scores.masked_fill(hidden(streaming, layer, cfg.n_layers, cfg.n_heads, scores.shape[-1]), -math.inf)

        return mask

    hooks = [(f"blocks.{layer}.attn.hook_attn_scores", hook(layer)) for layer in range(cfg.n_layers)]
    with torch.no_grad():
        return m64.run_with_hooks(ids, fwd_hooks=hooks)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("kind", ["zoo-2l", "rotary-gqa"])
def test_transformer_lens_logits_equal_the_explicit_mask(kind, setting, backend):
    model = tiny_model(kind)
    torch.manual_seed(0)
    ids = torch.randint(0, model.cfg.d_vocab, (2, 40))
    streaming = SETTINGS[setting]
    want = tl_float64_logits(model, ids, streaming)
    with torch.no_grad():
        full = model(ids)
        with instrument(model, backend=backend, streaming=streaming):
            got = model(ids)
    assert float((full.double() - want).abs().max()) > 1e-2, "the restriction changes the logits"
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-4)


def test_transformer_lens_patterns_show_the_restriction():
    """Explicit patterns of a streaming layer are zero on the hidden keys, and rows sum to 1."""
    model = tiny_model("rotary")
    streaming = SETTINGS["chosen"]
    ids = torch.randint(0, model.cfg.d_vocab, (1, 30))
    with torch.no_grad(), instrument(model, patterns=PatternSpec(layers=(1,)), streaming=streaming) as rec:
        model(ids)
    pattern = rec.patterns[1][0][0]  # [H, N, N]
    off = hidden(streaming, 1, 2, 4, 30)
    assert float(pattern[off].abs().max()) == 0 and bool(off[0].any()) and not bool(off[1].any())
    torch.testing.assert_close(pattern.sum(-1), torch.ones(4, 30))


def _explicit_attention(streaming: StreamingAttention, n_layers: int, n_heads: int):
    """A float64 Hugging Face attention function: eager attention with causality and the
    restriction as an explicit mask (no kernels involved)."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        g = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        s = (query @ k.transpose(-1, -2)) * scaling  # [B, Hq, Nq, Nk]
        nq, nk = s.shape[-2:]
        i = torch.arange(nq).view(nq, 1) + nk - nq
        j = torch.arange(nk).view(1, nk)
        on = streaming.head_mask(n_layers, n_heads)[module.layer_idx].view(-1, 1, 1)
        off = (j > i) | (on & (i - j >= streaming.window) & (j >= streaming.keep_first))
        prob = torch.softmax(s.masked_fill(off, -math.inf), dim=-1)
        return (prob @ v).transpose(1, 2).contiguous(), None

    return attend


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(layers=2)


def hf_float64(llama, streaming: StreamingAttention):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    name = "streaming_test_explicit"
    AttentionInterface.register(name, _explicit_attention(streaming, 2, 4))
    AttentionMaskInterface.register(name, flash_attention_mask)
    m64 = copy.deepcopy(llama).double()
    m64.set_attn_implementation(name)
    return m64


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("setting", ["all", "chosen"])
def test_hugging_face_logits_equal_the_explicit_mask(llama, setting, backend):
    """Prefill logits, and the logits of KV-cache decoding steps after a prefill (packed decoding
    rows), equal the float64 model with the explicit mask."""
    streaming = SETTINGS[setting]
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 36))
    with torch.no_grad():
        want = hf_float64(llama, streaming)(input_ids=ids).logits
        full = llama(input_ids=ids).logits
        adapter = adapter_for(llama)
        with instrument(llama, backend=backend, streaming=streaming):
            got = llama(input_ids=ids).logits
            first, cache = adapter.prefill(ids[:, :30])
            steps = [first]
            for t in range(30, 35):
                logits, cache = adapter.decode(ids[:, t : t + 1], cache)
                steps.append(logits)
    assert float((full.double() - want).abs().max()) > 1e-3, "the restriction changes the logits"
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.stack(steps, 1).double(), want[:, 29:35], rtol=0, atol=1e-4)


def test_a_layer_with_its_own_window_is_refused():
    """Gemma-2-style local layer 0 (window 6) cannot stream as well; streaming heads in the global
    layer only are fine."""
    model = tiny_model("local-softcap")
    ids = torch.randint(0, model.cfg.d_vocab, (1, 20))
    with pytest.raises(WorkbenchError, match="layer 0 already attends within a sliding window of 6 tokens"):
        with torch.no_grad(), instrument(model, backend="reference", streaming=StreamingAttention(window=4)):
            model(ids)
    assert "forward" not in vars(model.blocks[0].attn), "restored after the error"
    with torch.no_grad(), instrument(model, backend="reference", streaming=StreamingAttention(4, 1, heads=[(1, 2)])):
        model(ids)


def local_global_model(layers: int = 4, window: int = 8, attn_types: tuple[str, ...] = ("local", "global")):
    """A random TransformerLens model whose blocks alternate ``attn_types`` (Gemma 2's local
    layers with ``window``, then global ones): rotary, 4 query heads on 2 KV heads, a vocabulary
    holding the byte tokenizer's 259 ids, sharpened queries and keys."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from tests.conftest import SEED

    torch.manual_seed(SEED)
    cfg = HookedTransformerConfig(
        n_layers=layers,
        d_model=64,
        n_heads=4,
        d_head=16,
        n_key_value_heads=2,
        n_ctx=96,
        d_vocab=300,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=16,
        use_local_attn=True,
        attn_types=[attn_types[i % len(attn_types)] for i in range(layers)],
        window_size=window,
        seed=SEED,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            for name in ("W_Q", "_W_K"):
                getattr(block.attn, name).mul_(4)
    return model.eval()


def _hf_model(make):
    import transformers

    torch.manual_seed(0)
    sizes = dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=96)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(make(transformers, sizes), attn_implementation="eager").eval()


def _bridge(make):
    from transformer_lens.model_bridge import TransformerBridge

    from workbench.zoo.tokenizer import byte_tokenizer

    return TransformerBridge.boot_transformers(
        "tiny", hf_model=_hf_model(make), tokenizer=byte_tokenizer(), device="cpu"
    )


SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
#: model -> the layer windows its config gives (what each attention call passes to the kernels)
WINDOWED = {
    "tl-local-global": (lambda: local_global_model(), {0: 8, 2: 8}),
    "tl-global": (lambda: tiny_model("rotary"), {}),
    "gemma2-layer-types": (lambda: _hf_model(lambda t, c: t.Gemma2Config(sliding_window=6, head_dim=16,
                                                                          layer_types=SLIDING, **c)),
                           {0: 6, 2: 6, 3: 6}),
    "gemma3-text": (lambda: _hf_model(lambda t, c: t.Gemma3TextConfig(sliding_window=5, head_dim=16,
                                                                       sliding_window_pattern=2, **c)), {0: 5, 2: 5}),
    "mistral-every-layer": (lambda: _hf_model(lambda t, c: t.MistralConfig(sliding_window=7, **c)),
                            {0: 7, 1: 7, 2: 7, 3: 7}),
    "mistral-ignores-layer-types": (lambda: _hf_model(lambda t, c: t.MistralConfig(sliding_window=7,
                                                                                   layer_types=SLIDING, **c)),
                                    {0: 7, 1: 7, 2: 7, 3: 7}),
    "qwen2-use-sliding-window-off": (lambda: _hf_model(lambda t, c: t.Qwen2Config(sliding_window=7, **c)), {}),
    "qwen2-from-max-window-layers": (lambda: _hf_model(lambda t, c: t.Qwen2Config(
        sliding_window=7, use_sliding_window=True, max_window_layers=3, **c)), {3: 7}),
    "llama": (lambda: _hf_model(lambda t, c: t.LlamaConfig(**c)), {}),
    "bridge-gemma2": (lambda: _bridge(lambda t, c: t.Gemma2Config(sliding_window=6, head_dim=16, layer_types=SLIDING,
                                                                    **c)), {0: 6, 2: 6, 3: 6}),
    # Phi-3's bridge components compute attention themselves: no sliding_window reaches the kernels
    "bridge-phi3": (lambda: _bridge(lambda t, c: t.Phi3Config(sliding_window=7, pad_token_id=0, **c)), {}),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(WINDOWED))
def test_layer_windows_are_the_windows_each_layer_passes_to_the_kernels(kind, monkeypatch):
    """``adapter.layer_windows`` equals the config's own answer and the ``window`` each layer's
    attention actually hands the kernels (seen in LayerStreaming.merge, which every adapter
    calls per layer with the model's own variants)."""
    from workbench.adapters.streaming import LayerStreaming

    make, want = WINDOWED[kind]
    model = make()
    seen: dict[int, int | None] = {}
    merge = LayerStreaming.merge

    def spy(self, layer, model_variants, device):
        seen[layer] = model_variants.get("window")
        return merge(self, layer, model_variants, device)

    monkeypatch.setattr(LayerStreaming, "merge", spy)
    adapter = adapter_for(model)
    assert adapter.layer_windows == want
    with torch.no_grad(), instrument(model, backend="reference", streaming=StreamingAttention(window=4, heads=[])):
        adapter.run(torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0)), None)
    assert sorted(seen) == list(range(adapter.n_layers))
    assert {layer: w for layer, w in seen.items() if w is not None} == want


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: StreamingAttention(window=0), "window must be an int >= 1"),
        (lambda: StreamingAttention(window=4, keep_first=-1), "keep_first must be an int >= 0"),
        (lambda: StreamingAttention(window=4, heads=torch.ones(2, 4)), r"boolean tensor \[n_layers, n_heads\]"),
        (lambda: StreamingAttention(window=4, heads=[(0, 1, 2)]), r"expected \(layer, head\) pairs"),
        (lambda: StreamingAttention(window=4, heads="all"), "takes a boolean tensor"),
    ],
)
def test_bad_streaming_settings_are_refused(make, words):
    with pytest.raises(WorkbenchError, match=words):
        make()


@pytest.mark.parametrize(
    "heads, words",
    [
        (torch.ones(2, 3, dtype=torch.bool), r"has shape \(2, 3\), but the model has 2 layers of 4"),
        ([(2, 0)], r"head \(2, 0\) is out of range"),
    ],
)
def test_heads_must_fit_the_model(heads, words):
    model = tiny_model("rotary")
    with pytest.raises(WorkbenchError, match=words):
        with instrument(model, streaming=StreamingAttention(window=4, heads=heads)):
            pass
    assert not hasattr(model, "_workbench_instrumented")


def test_context_parallelism_refuses_streaming(tmp_path):
    """instrument refuses streaming with context parallelism before installing anything, and
    ContextParallel.attend (the one place both adapters route through) refuses the kernel
    arguments it becomes, before any collective: a one-process gloo group."""
    import torch.distributed as dist

    from kernels import StatsSpec
    from workbench.context_parallel import ContextParallel
    from workbench.recording import Recording

    spec = StatsSpec(entropy=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        cp = ContextParallel(8)
        model = tiny_model("rotary")
        with pytest.raises(WorkbenchError, match="streaming= is not available under context parallelism"):
            with instrument(model, context_parallel=cp, streaming=StreamingAttention(window=4)):
                pass
        assert "forward" not in vars(model.blocks[0].attn)
        q = torch.randn(1, 4, 8, 16)
        kwargs = dict(causal=True, scale=None, stats=spec, backend="reference")
        with pytest.raises(WorkbenchError, match=r"does not take window, keep_first, window_heads yet \(layer 1\)"):
            cp.attend(
                Recording(spec, 2), 1, q, q, q, window=4, keep_first=2, window_heads=torch.ones(4, dtype=bool), **kwargs
            )
    finally:
        dist.destroy_process_group()
