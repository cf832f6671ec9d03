"""Hugging Face: attention through ``transformers.AttentionInterface``.

The function :func:`workbench_attention` is registered under the name ``"workbench"``
(with transformers' flash-attention mask builder, which hands over an O(N) ``[B, Nk]`` padding
mask instead of an O(N^2) 4-D one) and selected with ``model.set_attn_implementation``, so
every architecture that routes attention through the interface is covered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kernels import StatsSpec, attention
from workbench.adapters.base import BoundAdapter, ZEdit, input_device
from workbench.adapters.padding import KernelMask, from_key_mask
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.adapters.streaming import LayerStreaming
    from workbench.context_parallel import ContextParallel

IMPLEMENTATION = "workbench"
# id(attention module) -> (collector, layer index, statistics, backend, ContextParallel or None,
# LayerStreaming or None) while instrumented
_routes: dict[int, tuple] = {}


def workbench_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """``AttentionInterface`` function: query ``[B, Hq, Nq, D]``, key/value ``[B, Hkv, Nk, D]``;
    returns ``([B, Nq, Hq, D], None)`` and records the statistics of this layer."""
    route = _routes.get(id(module))
    if route is None:
        raise WorkbenchError(
            f"attn_implementation={IMPLEMENTATION!r} only works inside `with workbench.instrument(model)`"
        )
    rec, layer, stats, backend, cp, streaming = route
    if dropout and module.training:
        raise WorkbenchError("instrumented attention has no dropout: put the model in eval mode (model.eval())")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    variants = _variants(kwargs)
    if streaming is not None:
        variants = streaming.merge(layer, variants, query.device)
    if cp is not None:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise WorkbenchError(
                f"context parallelism takes no padding (layer {layer}): give sequences of one length, without a "
                "padding mask"
            )
        kwargs = dict(causal=bool(causal), scale=scaling, stats=stats, backend=backend, **variants)
        return cp.attend(rec, layer, query, key, value, **kwargs).transpose(1, 2).contiguous(), None
    pad = _kernel_mask(attention_mask, query.shape[2], key.shape[2])
    out, st = attention(
        query, key, value, causal=bool(causal), scale=scaling, stats=stats, **pad.kwargs(backend), **variants
    )
    rec.add(layer, st)
    return out.transpose(1, 2).contiguous(), None


def _variants(kwargs: dict) -> dict:
    """The attention variants a model passes to its attention function, as :func:`kernels.attention`
    takes them: ``sliding_window`` (Mistral, Gemma 2/3, gpt-oss), ``softcap`` (Gemma 2) and
    ``s_aux``, learned sink logits per head (gpt-oss)."""
    found = {}
    if kwargs.get("sliding_window") is not None:
        found["window"] = int(kwargs["sliding_window"])
    if kwargs.get("softcap") is not None:
        found["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        found["sinks"] = kwargs["s_aux"]
    return found


def layer_windows(model) -> dict[int, int]:
    """Layer index -> sliding window (tokens) of the layers whose attention modules pass a
    ``sliding_window`` (what :func:`_variants` turns into the kernels' ``window``), read from the
    (text) config as transformers' models read it: with ``layer_types``, the
    ``"sliding_attention"`` layers get ``sliding_window`` (Gemma 2/3, gpt-oss, Qwen 2/3,
    Cohere 2, Ministral: their attention modules keep a ``sliding_window`` attribute, set for
    those layers only); without it, a set ``sliding_window`` applies to every layer (Mistral,
    Mixtral, Phi-3, Starcoder 2 pass ``config.sliding_window`` to each, and ignore a
    ``layer_types`` given to their config: so do we when no attention module keeps the
    attribute) unless ``use_sliding_window`` is False. ``{}`` when ``sliding_window`` is None."""
    cfg = _text_config(model)
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return {}
    layer_types = getattr(cfg, "layer_types", None)
    per_layer = any(hasattr(m, "sliding_window") for _, m in attention_modules(model))
    if layer_types is None or not per_layer:
        return dict.fromkeys(range(int(cfg.num_hidden_layers)), int(window))
    return {layer: int(window) for layer, kind in enumerate(layer_types) if kind == "sliding_attention"}


def _kernel_mask(attention_mask: torch.Tensor | None, n_q: int, n_k: int) -> KernelMask:
    if attention_mask is None or attention_mask.dim() == 2:
        return from_key_mask(attention_mask, n_q, n_k)
    # A model that built its own 4-D mask (boolean keep-mask or additive): pass it through.
    return KernelMask(mask=attention_mask)


def register() -> None:
    """Make ``"workbench"`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(IMPLEMENTATION, workbench_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)


def attention_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """``(layer, module)`` for every submodule that carries a layer index (at most one attention
    module per index)."""
    found = [(m.layer_idx, m) for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if not found:
        raise WorkbenchError(f"found no attention layers (modules with a layer_idx) in {type(model).__name__}")
    layers = [layer for layer, m in found if type(m).__name__.endswith("Attention")]
    if len(set(layers)) != len(layers):
        raise WorkbenchError(
            f"{type(model).__name__} has several attention stacks that share layer indices (an encoder, a "
            "global and a decoder stack?): the workbench instruments one stack of numbered layers"
        )
    return found


#: Attention that goes through ``AttentionInterface`` but is more than one softmax over the keys
#: the kernels are given, by ``model_type``: instrumented, such a model would run with other numbers.
_OTHER_ATTENTION = {"diffllama": "differential attention (two softmax maps per head, subtracted)"}


def _check_instrumentable(model) -> None:
    """Refuse, naming the reason, a model whose attention the kernels would not reproduce:
    attention computed in the model's own code, not through ``AttentionInterface`` (BLOOM,
    Falcon: it would run and record nothing), sparse attention whose keys a learned indexer picks
    (DeepSeek V3.2), chunked attention (Llama 4), or another kind of attention
    (:data:`_OTHER_ATTENTION`). docs/coverage.md lists the architectures and what they get."""
    name, cfg = type(model).__name__, _text_config(model)
    if not getattr(type(model), "_supports_attention_backend", True):
        layers = [n for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
        if not layers:
            raise WorkbenchError(f"{name} has no attention layers to instrument (a recurrent or state-space model?)")
        shown = ", ".join(layers[:4]) + (f", ... ({len(layers)} in all)" if len(layers) > 4 else "")
        raise WorkbenchError(
            f"{name} computes attention in its own code, not through transformers' AttentionInterface, so its "
            f"attention layers ({shown}) cannot be instrumented; instrumenting it would record nothing. Models "
            "that route attention through the interface are listed in docs/coverage.md"
        )
    kind = _OTHER_ATTENTION.get(getattr(cfg, "model_type", None))
    if getattr(cfg, "index_topk", None) is not None:
        kind = "sparse attention whose keys a learned indexer picks (DeepSeek sparse attention)"
    elif getattr(cfg, "attention_chunk_size", None) is not None or "chunked_attention" in (
        getattr(cfg, "layer_types", None) or ()
    ):
        kind = "chunked attention (each query sees only its own chunk of keys)"
    if kind is not None:
        raise WorkbenchError(
            f"{name} uses {kind}, which the statistics kernels do not reproduce yet: it cannot be instrumented "
            "(docs/coverage.md lists the architectures that can)"
        )


def _text_config(model):
    """The config of the language model (the text config of a multimodal model's composite one)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _remove(modules) -> None:
    for _, m in modules:
        _routes.pop(id(m), None)


class HuggingFaceAdapter(BoundAdapter):
    """A Hugging Face ``PreTrainedModel`` (see :class:`~workbench.adapters.ModelAdapter`)."""

    supports_patterns = False  # eager attention with output_attentions=True gives them

    @property
    def n_layers(self) -> int:
        layers = getattr(_text_config(self.model), "num_hidden_layers", None)
        if layers is None:  # BLT: an encoder, a global and a decoder stack
            raise WorkbenchError(
                f"{type(self.model).__name__}'s config names no num_hidden_layers: the workbench instruments "
                "one stack of numbered layers"
            )
        return int(layers)

    @property
    def head_shape(self) -> tuple[int, int]:
        """``(heads, d_head)`` of the attention output entering each layer's output projection."""
        cfg = _text_config(self.model)
        heads = int(cfg.num_attention_heads)
        return heads, int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)

    @property
    def vocab_size(self) -> int:
        return int(_text_config(self.model).vocab_size)

    @property
    def context(self) -> int | None:
        return getattr(_text_config(self.model), "max_position_embeddings", None)

    @property
    def is_causal(self) -> bool:
        return any(getattr(m, "is_causal", False) for _, m in attention_modules(self.model))

    @property
    def learned_sinks(self) -> bool:
        return any(isinstance(getattr(m, "sinks", None), torch.Tensor) for _, m in attention_modules(self.model))

    @property
    def can_generate(self) -> bool:
        return bool(getattr(self.model, "can_generate", lambda: False)()) and self.is_causal

    @property
    def layer_windows(self) -> dict[int, int]:
        """The sliding-window layers of the config (:func:`layer_windows`)."""
        return layer_windows(self.model)

    def run(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.model(input_ids=ids, attention_mask=mask)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def prefill(self, ids: torch.Tensor):
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # logits of the last position only
        return out.logits[:, -1], out.past_key_values

    def decode(self, token: torch.Tensor, cache):
        out = self.model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def install(
        self,
        collector,
        stats: StatsSpec,
        backend: str,
        patterns=None,
        context_parallel: ContextParallel | None = None,
        streaming: LayerStreaming | None = None,
    ) -> Callable[[], None]:
        """Select the ``"workbench"`` attention implementation and route every attention module's
        calls into ``collector``. (``patterns``: :func:`workbench.instrument` refuses them here.)
        ``streaming`` restricts its streaming heads to the kept first and the recent keys.

        With ``context_parallel``, the model takes this rank's shard of one sequence: a forward
        pre-hook gives every call the global ``position_ids`` of its tokens (the shard's, or
        after it one decoded token's; ``use_cache=False`` unless given), and attention runs
        through :meth:`~workbench.context_parallel.ContextParallel.attend`."""
        model = self.model
        _check_instrumentable(model)
        register()
        modules = attention_modules(model)
        previous = model.config._attn_implementation
        for layer, m in modules:
            _routes[id(m)] = (collector, layer, stats, backend, context_parallel, streaming)
        try:
            model.set_attn_implementation(IMPLEMENTATION)
        except Exception as exc:
            _remove(modules)
            raise WorkbenchError(
                f"{type(model).__name__} does not accept a custom attention implementation: {exc}"
            ) from exc
        handle = None
        if context_parallel is not None:
            handle = model.register_forward_pre_hook(_global_positions(context_parallel), with_kwargs=True)

        def restore() -> None:
            if handle is not None:
                handle.remove()
            _remove(modules)
            model.set_attn_implementation(previous)

        return restore

    def z_hooks(self, edit: ZEdit) -> Callable[[], None]:
        """Hooks on the input of each layer's output projection (``o_proj`` and its namesakes)."""
        heads, d_head = self.head_shape
        handles = []
        for layer, module in attention_modules(self.model):
            proj = next(
                (
                    getattr(module, n)
                    for n in _OUTPUT_PROJECTIONS
                    if isinstance(getattr(module, n, None), torch.nn.Module)
                ),
                None,
            )
            if proj is None:
                for h in handles:
                    h.remove()
                raise WorkbenchError(
                    f"cannot find the output projection of {type(module).__name__} (looked for "
                    f"{', '.join(_OUTPUT_PROJECTIONS)}): head ablation does not support this "
                    "architecture yet"
                )

            def pre_hook(mod, args, layer=layer):
                x = args[0]
                z = x.reshape(*x.shape[:-1], heads, d_head)
                new = edit(layer, z)
                return None if new is None else (new.reshape(x.shape), *args[1:])

            handles.append(proj.register_forward_pre_hook(pre_hook))

        def remove() -> None:
            for h in handles:
                h.remove()

        return remove


_OUTPUT_PROJECTIONS = ("o_proj", "c_proj", "out_proj", "dense")


def _global_positions(cp: ContextParallel):
    """Forward pre-hook of the whole model: the global ``position_ids`` of the call's tokens (the
    shard's, or one decoded token's after it)."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        cached = int(cache.get_seq_length()) if cache is not None else 0
        if ids is not None:  # checked before any collective: a wrong shard fails on its own rank
            cp.check_call(ids.shape[1], cached)
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise WorkbenchError("context parallelism takes no padding: call the model without a padding mask")
        if kwargs.get("position_ids") is None:
            batch = ids.shape[0] if ids is not None else 1
            kwargs["position_ids"] = cp.query_positions(cached).to(input_device(module))[None].expand(batch, -1)
        kwargs.setdefault("use_cache", False)
        return args, kwargs

    return hook
