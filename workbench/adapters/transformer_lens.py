"""TransformerLens: each ``HookedTransformer`` attention module gets a forward that computes
attention with :func:`kernels.attention`, keeping every hook TransformerLens fires
(``hook_q/k/v``, ``hook_rot_q/k``, ``hook_z``, ``hook_result``) and firing
``hook_attn_scores`` / ``hook_pattern`` only for the layers a :class:`PatternSpec` asks for.

Patterns produced this way are observations: editing them in a hook does not change the
output, which the kernel computes without them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import einops
import torch
import torch.nn.functional as F

from kernels import StatsSpec, attention
from workbench.adapters.base import BoundAdapter, ZEdit
from workbench.adapters.padding import from_key_mask
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.adapters.streaming import LayerStreaming
    from workbench.context_parallel import ContextParallel

_QK_NORM_ARCHS = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def unsupported_features(cfg) -> list[str]:
    """Attention features of this config that the kernels cannot reproduce yet."""
    found = []
    if cfg.positional_embedding_type == "relative_positional_bias":
        found.append("relative_positional_bias position bias")
    if cfg.positional_embedding_type == "alibi" and cfg.attention_dir != "causal":
        found.append("bidirectional ALiBi (TransformerLens biases only the keys before a query)")
    for flag, name in (
        ("use_logn_attn", "log-n attention"),
        ("load_in_4bit", "4-bit weights"),
    ):
        if getattr(cfg, flag, False):
            found.append(name)
    if cfg.original_architecture in _QK_NORM_ARCHS:
        found.append(f"{cfg.original_architecture} QK-norm")
    return found


def context_parallel_problems(cfg) -> list[str]:
    """What keeps this config from running one sequence's shards at global positions."""
    found = []
    if cfg.positional_embedding_type not in ("standard", "shortformer", "rotary"):
        found.append(f"{cfg.positional_embedding_type} positions")
    if getattr(cfg, "use_dynamic_ntk_rope", False):
        found.append("dynamic NTK rotary scaling (it depends on the whole sequence's length)")
    return found


def make_forward(
    attn,
    layer: int,
    rec,
    stats: StatsSpec,
    patterns,
    backend: str,
    context_parallel: ContextParallel | None = None,
    streaming: LayerStreaming | None = None,
) -> Callable[..., torch.Tensor]:
    """The replacement ``forward`` of one TransformerLens attention module. With
    ``context_parallel``, the module takes this rank's shard of one sequence (or one decoded
    token after it): rotary positions are global ones, and attention runs over every rank's keys.
    With ``streaming``, the layer's streaming heads see only the kept first and the recent keys."""
    cfg = attn.cfg
    cp = context_parallel

    def layer_variants(device: torch.device) -> dict:
        found = variants(attn, device)
        return found if streaming is None else streaming.merge(layer, found, device)

    def forward(
        query_input,
        key_input,
        value_input,
        past_kv_cache_entry=None,
        additive_attention_mask=None,
        attention_mask=None,
        position_bias=None,
    ):
        if cp is not None:
            _check_shard_call(cp, layer, query_input, past_kv_cache_entry, additive_attention_mask, attention_mask)
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)  # [B, N, H, D]
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv) for t in (q, k, v))
        if cp is not None:
            return _shard_forward(attn, layer, rec, stats, backend, cp, q, k, v, past_kv_cache_entry, layer_variants)
        offset = 0
        if past_kv_cache_entry is not None:
            offset = past_kv_cache_entry.past_keys.size(1)
            k, v = past_kv_cache_entry.append(k, v)
        if cfg.positional_embedding_type == "rotary":
            q = attn.hook_rot_q(attn.apply_rotary(q, offset, attention_mask))
            k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
        causal = (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"

        if patterns is not None and layer in patterns.layers:
            _explicit_pattern(
                attn, layer, rec, patterns, q, k, offset, causal, attention_mask, additive_attention_mask, streaming
            )

        pad = from_key_mask(attention_mask, q.shape[1], k.shape[1], additive_attention_mask)
        out, st = attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=causal,
            scale=1.0 / attn.attn_scale,
            stats=stats,
            **pad.kwargs(backend),
            **layer_variants(q.device),
        )
        rec.add(layer, st)
        z = attn.hook_z(out.transpose(1, 2))  # [B, Nq, H, D]
        return _project(attn, z)

    return forward


def _check_shard_call(cp: ContextParallel, layer: int, x, past_kv_cache_entry, additive, attention_mask) -> None:
    """Refuse what a shard cannot take, before any collective."""
    if additive is not None or (attention_mask is not None and not bool(attention_mask.bool().all())):
        raise WorkbenchError(
            f"context parallelism takes no padding (layer {layer}): give sequences of one length, without a "
            "padding mask"
        )
    cached = past_kv_cache_entry.past_keys.size(1) if past_kv_cache_entry is not None else 0
    cp.check_call(x.shape[1], cached, f"layer {layer}'s input")


def _shard_forward(
    attn, layer: int, rec, stats: StatsSpec, backend: str, cp: ContextParallel, q, k, v, cache_entry, layer_variants
):
    """The module's output for this rank's shard ``q, k, v [B, n_local, H, D]``, or for one
    decoded token after it (``q, k, v [B, 1, H, D]``, ``cache_entry`` holding the shard's keys
    and the tokens decoded before it)."""
    cfg = attn.cfg
    if cache_entry is not None:
        k, v = cache_entry.append(k, v)  # [B, keys so far, H, D], unrotated as TransformerLens keeps them
    if cfg.positional_embedding_type == "rotary":
        keys = cp.key_positions(k.shape[1])
        q = attn.hook_rot_q(_rotate_at(attn, q, keys[k.shape[1] - q.shape[1] :]))
        k = attn.hook_rot_k(_rotate_at(attn, k, keys))
    causal = (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
    out = cp.attend(
        rec,
        layer,
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        causal=causal,
        scale=1.0 / attn.attn_scale,
        stats=stats,
        backend=backend,
        **layer_variants(q.device),
    )
    z = attn.hook_z(out.transpose(1, 2))  # [B, n, H, D]
    return _project(attn, z)


def _rotate_at(attn, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """TransformerLens's own rotary on ``x [B, n, H, D]`` at the global ``positions [n]``
    (ascending): each run of consecutive positions is rotated from its first position."""
    parts, start = [], 0
    for chunk in _runs(positions):
        parts.append(attn.apply_rotary(x[:, start : start + len(chunk)], chunk.start))
        start += len(chunk)
    return torch.cat(parts, dim=1)


def _runs(positions: torch.Tensor) -> list[range]:
    """``positions`` (ascending) as runs of consecutive positions."""
    runs, values = [], positions.tolist()
    first = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append(range(values[first], values[i - 1] + 1))
            first = i
    return runs


def _shard_pos_embed(model, cp: ContextParallel) -> tuple[Callable, Callable]:
    """A forward pre-hook of the model that notes how many positions its KV cache holds, and a
    ``hook_pos_embed`` hook: the learned embeddings of the call's global positions (the shard's,
    or one decoded token's after it)."""
    cached = [0]

    def note_cache(module, args, kwargs):
        cache = kwargs.get("past_kv_cache")
        cached[0] = cache.entries[0].past_keys.size(1) if cache is not None else 0

    def hook(pos_embed: torch.Tensor, hook) -> torch.Tensor:  # [B, n, d_model]
        w_pos = model.pos_embed.W_pos
        rows = w_pos[cp.query_positions(cached[0]).to(w_pos.device)]
        return rows.to(pos_embed)[None].expand_as(pos_embed).clone()

    return note_cache, hook


def local_window(attn) -> int | None:
    """The sliding window (tokens) of one TransformerLens attention module: ``cfg.window_size``
    for a local block (``attn_type == "local"``, Gemma 2's alternate layers), None for a global one."""
    if getattr(attn, "attn_type", "global") == "local":
        return int(attn.cfg.window_size)
    return None


def variants(attn, device: torch.device) -> dict:
    """The attention variants of one TransformerLens attention module, as :func:`kernels.attention`
    takes them: local attention (``attn_type == "local"``, ``cfg.window_size``), score
    soft-capping (``cfg.attn_scores_soft_cap``), learned sinks (``cfg.use_attention_sinks``) and
    causal ALiBi (``create_alibi_multipliers``: TransformerLens's bias ``-m_h (i - j)``)."""
    cfg, found = attn.cfg, {}
    window = local_window(attn)
    if window is not None:
        found["window"] = window
    if getattr(cfg, "attn_scores_soft_cap", -1.0) > 0:
        found["softcap"] = float(cfg.attn_scores_soft_cap)
    if getattr(cfg, "use_attention_sinks", False):
        found["sinks"] = attn.sinks.to(device)
    if cfg.positional_embedding_type == "alibi":
        found["alibi_slopes"] = attn.create_alibi_multipliers(cfg.n_heads, device).to(cfg.dtype)
    return found


def _explicit_pattern(attn, layer, rec, patterns, q, k, offset, causal, attention_mask, additive, streaming=None):
    """TransformerLens's own scores / pattern for this layer: fires the two O(N^2) hooks (with
    ``streaming``, the keys its streaming heads do not see are masked as well)."""
    if k.shape[1] > patterns.max_tokens:
        raise WorkbenchError(
            f"patterns asked for layer {layer} at {k.shape[1]} keys, over max_tokens="
            f"{patterns.max_tokens}: the pattern costs O(N^2) memory; raise PatternSpec.max_tokens "
            "or use the statistics instead"
        )
    scores = attn.calculate_attention_scores(q, k)  # soft-capped
    if attn.cfg.positional_embedding_type == "alibi":
        n_q, n_k = scores.shape[-2:]
        bias = attn.create_alibi_bias(attn.cfg.n_heads, n_k, scores.device)[:, -n_q:, :n_k]
        scores = scores + bias.to(scores.dtype)
    if causal:
        scores = attn.apply_causal_mask(scores, offset, attention_mask)  # local attention's window too
    if additive is not None:
        scores = scores + additive
    inside = streaming.visible(layer, scores.shape[-2], scores.shape[-1], scores.device) if streaming else None
    if inside is not None:  # [Hq, Nq, Nk]
        scores = scores.masked_fill(~inside, float("-inf"))
    scores = attn.hook_attn_scores(scores)
    if attn.cfg.use_attention_sinks:  # one more column in the softmax, dropped after it
        sink = attn.sinks.reshape(1, -1, 1, 1).to(scores).expand(*scores.shape[:-1], 1)
        pattern = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        pattern = torch.softmax(scores, dim=-1)
    pattern = attn.hook_pattern(torch.where(torch.isnan(pattern), 0.0, pattern))
    heads = list(patterns.heads) if patterns.heads is not None else slice(None)
    rec.add_pattern(layer, pattern[:, heads].detach())


def _project(attn, z: torch.Tensor) -> torch.Tensor:
    """The output projection, as TransformerLens computes it (``hook_result`` when enabled)."""
    w_o = attn.W_O.to(z.device)
    b_o = attn.b_O.to(z.device)
    z = z.to(w_o.dtype)
    if attn.cfg.use_attn_result:
        result = attn.hook_result(einops.einsum(z, w_o, "b p h d, h d m -> b p h m"))
        return result.sum(dim=2) + b_o
    w = einops.rearrange(w_o, "h d m -> m (h d)")
    return F.linear(z.reshape(z.shape[0], z.shape[1], -1), w, b_o)


class TransformerLensAdapter(BoundAdapter):
    """A TransformerLens ``HookedTransformer`` (see :class:`~workbench.adapters.ModelAdapter`)."""

    supports_patterns = True

    def __init__(self, model) -> None:
        problems = unsupported_features(model.cfg)
        if problems:
            raise WorkbenchError(
                "the statistics kernels cannot reproduce this model's attention yet: " + ", ".join(problems)
            )
        super().__init__(model)

    @property
    def n_layers(self) -> int:
        return len(self.model.blocks)

    @property
    def head_shape(self) -> tuple[int, int]:
        return int(self.model.cfg.n_heads), int(self.model.cfg.d_head)

    @property
    def vocab_size(self) -> int:
        return int(self.model.cfg.d_vocab)

    @property
    def context(self) -> int | None:
        return int(self.model.cfg.n_ctx)

    @property
    def is_causal(self) -> bool:
        return self.model.cfg.attention_dir == "causal"

    @property
    def learned_sinks(self) -> bool:
        return bool(getattr(self.model.cfg, "use_attention_sinks", False))

    @property
    def can_generate(self) -> bool:
        return self.is_causal

    @property
    def layer_windows(self) -> dict[int, int]:
        """The local blocks (``attn_type == "local"``) and their ``cfg.window_size``."""
        found = {layer: local_window(block.attn) for layer, block in enumerate(self.model.blocks)}
        return {layer: window for layer, window in found.items() if window is not None}

    def run(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.model(ids, attention_mask=mask)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def prefill(self, ids: torch.Tensor):
        try:  # TransformerLens 3
            from transformer_lens.cache.key_value_cache import (
                TransformerLensKeyValueCache as KeyValueCache,
            )
        except ImportError:  # TransformerLens 2
            from transformer_lens.past_key_value_caching import (
                HookedTransformerKeyValueCache as KeyValueCache,
            )

        cache = KeyValueCache.init_cache(self.model.cfg, ids.device, ids.shape[0])
        # an explicit all-ones mask: from the ids alone TransformerLens would mask every token that
        # equals the pad id (a generated one too), and cannot build a mask without a tokenizer
        return self.model(ids, past_kv_cache=cache, attention_mask=torch.ones_like(ids))[:, -1], cache

    def decode(self, token: torch.Tensor, cache):
        return self.model(token, past_kv_cache=cache, attention_mask=torch.ones_like(token))[:, -1], cache

    def install(
        self,
        collector,
        stats: StatsSpec,
        backend: str,
        patterns=None,
        context_parallel: ContextParallel | None = None,
        streaming: LayerStreaming | None = None,
    ) -> Callable[[], None]:
        """Give every block's attention the kernel forward (:func:`make_forward`); ``streaming``
        restricts its streaming heads to the kept first and the recent keys.

        With ``context_parallel``, the model takes this rank's shard of one sequence (then, with
        a KV cache, one decoded token at a time): rotary turns each query and key by its global
        position, learned position embeddings (``hook_pos_embed``, standard or shortformer) are
        replaced by the rows of the global positions, and attention runs over the group."""
        model = self.model
        pos_handle = cache_handle = None
        if context_parallel is not None:
            problems = context_parallel_problems(model.cfg)
            if problems:
                raise WorkbenchError("context parallelism cannot shard this model yet: " + ", ".join(problems))
            if model.cfg.positional_embedding_type in ("standard", "shortformer"):
                note_cache, pos_hook = _shard_pos_embed(model, context_parallel)
                cache_handle = model.register_forward_pre_hook(note_cache, with_kwargs=True)
                model.hook_pos_embed.add_hook(pos_hook, is_permanent=True)
                pos_handle = model.hook_pos_embed.fwd_hooks[-1]
        layers = [block.attn for block in model.blocks]
        for i, attn in enumerate(layers):
            attn.forward = make_forward(attn, i, collector, stats, patterns, backend, context_parallel, streaming)

        def restore() -> None:
            for attn in layers:
                vars(attn).pop("forward", None)  # the class's own forward shows through again
            if pos_handle is not None:
                pos_handle.hook.remove()
                model.hook_pos_embed.fwd_hooks.remove(pos_handle)
                cache_handle.remove()

        return restore

    def z_hooks(self, edit: ZEdit) -> Callable[[], None]:
        """Hooks on ``hook_z`` (before the output projection); the user's own hooks stay."""
        added = []
        for layer, block in enumerate(self.model.blocks):
            point = block.attn.hook_z
            point.add_hook(lambda z, hook, layer=layer: edit(layer, z))
            added.append((point, point.fwd_hooks[-1]))

        def remove() -> None:
            for point, handle in added:
                handle.hook.remove()
                point.fwd_hooks.remove(handle)

        return remove
