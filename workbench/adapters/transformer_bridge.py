"""TransformerLens's ``TransformerBridge`` (transformer-lens 3.x, which deprecates
``HookedTransformer`` in its favour): a Hugging Face model wrapped in TransformerLens hook points.

Tested with transformer-lens 3.9.0 and transformers 5.24.0 (:data:`TESTED_WITH`). The adapter
uses a few of the bridge's own helpers (``_reshape_qkv_to_heads``, ``_update_kv_cache``,
``_apply_output_projection``, ...); a version without them is refused, naming the helper.

A bridge holds the Hugging Face model (``bridge.original_model``) with its attention modules
replaced by bridge components that compute attention themselves, eagerly: the ``[B, H, Nq, Nk]``
pattern is materialised so that ``hook_attn_scores`` / ``hook_pattern`` can fire, and the Hugging
Face ``attn_implementation`` is never consulted. Instrumented, every attention layer instead runs
:func:`~workbench.adapters.hugging_face.workbench_attention` (the function the Hugging Face
adapter registers under ``"workbench"``; it is selected on the wrapped model, so padding masks
stay O(N)), in one of three ways by the component's class:

- ``PositionEmbeddingsAttentionBridge`` (Llama, Mistral, Qwen 2/3, Gemma, OLMo, Phi, ...):
  the component hands the call to the wrapped Hugging Face attention module, as the bridge's
  base ``AttentionBridge`` does; its projections are bridge components, so ``hook_q``,
  ``hook_k``, ``hook_v``, ``hook_z`` and ``attn.hook_in`` / ``hook_out`` fire, and
  ``hook_cos`` / ``hook_sin`` are fired here. ``hook_rot_q`` / ``hook_rot_k`` (and
  ``hook_q_normed`` / ``hook_k_normed`` of QK-norm models) do not fire: rotary and the QK norms
  run inside the Hugging Face module.
- ``JointQKVAttentionBridge`` (GPT-2, GPT-BigCode) and ``JointQKVPositionEmbeddingsAttentionBridge``
  (GPT-NeoX / Pythia, Phi-3): the bridge's own forward runs up to its
  ``_reconstruct_attention(q, k, v)``, whose softmax core is replaced: ``hook_q/k/v``,
  ``hook_cos`` / ``hook_sin``, ``hook_z``, ``hook_result`` (``use_attn_result``), the split-input
  hooks and ``hook_hidden_states`` all fire.
- ``AttentionBridge`` itself (GPT-J, OPT, ...): it already calls the Hugging Face
  module, which now runs the workbench function.

``hook_attn_scores`` and ``hook_pattern`` never fire while instrumented (there is no pattern;
``supports_patterns`` is False: run the bridge outside ``instrument`` for them). Other attention
classes (multi-head latent attention, ALiBi, Bloom, CodeGen, ...) are refused by name, as are
models the Hugging Face adapter refuses.

transformers 5 renamed the KV cache argument of attention modules ``past_key_values`` ->
``cache``; the bridge's components of transformer-lens 3.9.0 still read ``past_key_values``, so
on their own they decode without the cache (each new token sees only itself). The instrumented
forms read either name, and :meth:`TransformerBridgeAdapter.prefill` / ``decode`` pass the cache
under both names, so decoding through the adapter is right instrumented or not.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from kernels import StatsSpec
from workbench.adapters.base import BoundAdapter, ZEdit
from workbench.adapters.hugging_face import HuggingFaceAdapter, _routes, workbench_attention
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.adapters.streaming import LayerStreaming
    from workbench.context_parallel import ContextParallel

#: The versions this adapter was tested with.
TESTED_WITH = "transformer-lens 3.9.0 with transformers 5.24.0"
_BRIDGE_MODULE = "transformer_lens.model_bridge"

#: How each attention component class is instrumented (see the module docstring).
DELEGATE, RECONSTRUCT, NATIVE = "delegate", "reconstruct", "native"
_MODES = {
    "PositionEmbeddingsAttentionBridge": DELEGATE,
    "JointQKVAttentionBridge": RECONSTRUCT,
    "JointQKVPositionEmbeddingsAttentionBridge": RECONSTRUCT,
    "AttentionBridge": NATIVE,
}
#: The bridge helpers each mode calls.
_HELPERS = {
    DELEGATE: ("_apply_position_embedding_hooks", "original_component"),
    RECONSTRUCT: (
        "_reconstruct_attention",
        "_reshape_qkv_to_heads",
        "_update_kv_cache",
        "_apply_output_projection",
        "_compute_per_head_result",
        "original_component",
    ),
    NATIVE: ("original_component",),
}
#: Bridge settings whose hooks a component handing its call to Hugging Face would skip.
_DELEGATE_REFUSES = {
    "use_split_qkv_input": "set_use_split_qkv_input(False)",
    "use_attn_in": "set_use_attn_in(False)",
    "use_attn_result": "set_use_attn_result(False)",
}
_CACHE_NAMES = ("cache", "past_key_values", "layer_past")


def is_transformer_bridge(model: object) -> bool:
    """Whether ``model`` is a ``TransformerBridge`` (without importing transformer-lens: a bridge
    can only exist once its module is loaded)."""
    module = sys.modules.get(_BRIDGE_MODULE)
    return module is not None and isinstance(model, module.TransformerBridge)


def wrapped_by_bridge(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a Hugging Face model) has TransformerBridge components inside it: the
    ``original_model`` of a bridge."""
    module = sys.modules.get(f"{_BRIDGE_MODULE}.generalized_components.base")
    if module is None:
        return False
    return any(isinstance(m, module.GeneralizedComponent) for m in model.modules())


def transformer_lens_version() -> str:
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - imported from a source tree
        return "unknown"


def attention_components(bridge) -> list[tuple[int, torch.nn.Module, str]]:
    """``(layer, attention component, mode)`` of every block, refusing attention classes the
    workbench does not instrument and bridges that lack the helpers a mode calls."""
    blocks = getattr(bridge, "blocks", None)
    arch = getattr(bridge.cfg, "architecture", None) or type(bridge.original_model).__name__
    if blocks is None or len(blocks) == 0:
        raise WorkbenchError(
            f"this TransformerBridge ({arch}) has no `blocks`: the workbench instruments decoder stacks of numbered "
            "blocks"
        )
    found = []
    for layer, block in enumerate(blocks):
        attn = block._modules.get("attn")
        cls = type(attn).__name__ if attn is not None else "no attention"
        mode = _MODES.get(cls)
        if mode is None:
            supported = ", ".join(sorted(_MODES))
            raise WorkbenchError(
                f"block {layer} of this TransformerBridge ({arch}) has {cls}, which the workbench does not instrument "
                f"yet (it instruments {supported}); load the model as a Hugging Face model instead "
                f"(workbench.load_model('hf:...')) if its attention goes through AttentionInterface"
            )
        missing = [h for h in _HELPERS[mode] if getattr(attn, h, None) is None]
        if missing:
            raise WorkbenchError(
                f"{cls} of transformer-lens {transformer_lens_version()} lacks {', '.join(missing)}, which the "
                f"workbench calls: the TransformerBridge adapter is tested with {TESTED_WITH}"
            )
        found.append((layer, attn, mode))
    return found


def _delegating_forward(attn) -> Callable:
    """``attn``'s forward handing the call to the wrapped Hugging Face attention module (between
    ``hook_in`` and ``hook_out``, as the base ``AttentionBridge`` does), firing ``hook_cos`` /
    ``hook_sin`` on the rotary tables it passes down."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    def forward(*args, **kwargs):
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = attn._apply_position_embedding_hooks(kwargs["position_embeddings"])
        return AttentionBridge.forward(attn, *args, **kwargs)

    return forward


def _kernel_reconstruct(attn, layer: int) -> Callable:
    """A replacement of ``attn._reconstruct_attention(q, k, v, **kwargs)``: q/k/v ``[B, N, H*D]``
    (or ``[B, N, H, D]`` from the split-input fork) from the bridge's projections; rotary,
    KV cache and output projection as the bridge does them; attention through
    :func:`workbench_attention` on the wrapped module (its route: collector, statistics, padding,
    streaming, context parallelism). Returns ``(output [B, N, d_model], None)``."""
    hf_attn = attn.original_component
    cfg = attn.config

    def reconstruct(q, k, v, **kwargs):
        heads = int(cfg.n_heads)
        kv_heads = int(getattr(cfg, "n_key_value_heads", None) or heads)
        q, k, v, batch, n, d_head = attn._reshape_qkv_to_heads(q, k, v, heads, kv_heads)  # [B, H, N, D]
        rotary = kwargs.get("position_embeddings")
        if isinstance(rotary, tuple) and hasattr(attn, "_apply_rotary_pos_emb"):
            cos, sin = attn._apply_position_embedding_hooks(rotary)
            q, k = attn._apply_rotary_pos_emb(q, k, cos, sin)
        cache = next((kwargs[n] for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
        if cache is not None:
            k, v = attn._update_kv_cache(k, v, **{**kwargs, "past_key_values": cache})
        scale = getattr(hf_attn, "scaling", None)
        if scale is None:  # the bridge's rule
            scale = d_head**-0.5
            if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
                scale /= float(layer + 1)
        dropout = getattr(getattr(hf_attn, "attn_dropout", None), "p", 0.0)
        out, _ = workbench_attention(
            hf_attn, q, k, v, kwargs.get("attention_mask"), dropout=dropout, scaling=scale, is_causal=attn.is_causal
        )  # [B, N, H, D]
        z = out.reshape(batch, n, heads * d_head)
        if getattr(cfg, "use_attn_result", False):
            z = attn.o.hook_in(z)
            return attn._compute_per_head_result(z.view(batch, n, heads, d_head), heads, d_head), None
        return attn._apply_output_projection(z), None

    return reconstruct


def _check_delegation(bridge) -> None:
    for flag, fix in _DELEGATE_REFUSES.items():
        if getattr(bridge.cfg, flag, False):
            raise WorkbenchError(
                f"this TransformerBridge has {flag} set, whose hooks its attention (run by the Hugging Face module "
                f"while instrumented) would not fire: call bridge.{fix} before instrumenting it"
            )


@contextmanager
def _cache_under_both_names(bridge, components) -> Iterator[None]:
    """While inside, every attention component that runs its own forward also finds the KV
    cache (transformers 5 passes it as ``cache``) under ``past_key_values``, the name the
    bridge's own components read."""

    def alias(module, args, kwargs):
        if "forward" in vars(module):  # instrumented by delegation: Hugging Face reads `cache` itself
            return None
        cache = kwargs.get("cache")
        if cache is not None and kwargs.get("past_key_values") is None:
            return args, {**kwargs, "past_key_values": cache}
        return None

    handles = [
        attn.register_forward_pre_hook(alias, with_kwargs=True) for _, attn, mode in components if mode != NATIVE
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class TransformerBridgeAdapter(BoundAdapter):
    """A TransformerLens ``TransformerBridge`` (see :class:`~workbench.adapters.ModelAdapter` and
    the module docstring). Shapes, padding, streaming and context parallelism are those of the
    Hugging Face adapter of the wrapped model (``self.hugging_face``)."""

    supports_patterns = False
    #: what instrument(patterns=...) tells the user
    patterns_hint = (
        "patterns= needs a TransformerLens HookedTransformer; a TransformerBridge gives patterns outside "
        "instrument(), where it runs eager attention: bridge.run_with_cache(tokens) holds blocks.{i}.attn.hook_pattern"
    )

    def __init__(self, model) -> None:
        if not is_transformer_bridge(model):
            raise WorkbenchError(f"TransformerBridgeAdapter takes a TransformerBridge, got {type(model).__name__}")
        super().__init__(model)
        self.components = attention_components(model)
        self.hugging_face = HuggingFaceAdapter(model.original_model)

    @property
    def n_layers(self) -> int:
        return len(self.components)

    @property
    def head_shape(self) -> tuple[int, int]:
        return int(self.model.cfg.n_heads), int(self.model.cfg.d_head)

    @property
    def vocab_size(self) -> int:
        return self.hugging_face.vocab_size

    @property
    def context(self) -> int | None:
        return self.hugging_face.context

    @property
    def is_causal(self) -> bool:
        return self.hugging_face.is_causal

    @property
    def learned_sinks(self) -> bool:
        return self.hugging_face.learned_sinks

    @property
    def can_generate(self) -> bool:
        return self.hugging_face.can_generate

    @property
    def layer_windows(self) -> dict[int, int]:
        """The wrapped model's sliding-window layers (the Hugging Face adapter's), except those
        whose component reconstructs attention itself (:data:`RECONSTRUCT`: no ``sliding_window``
        reaches the kernels there, the layer attends to every earlier key)."""
        windows = self.hugging_face.layer_windows
        return {layer: windows[layer] for layer, _, mode in self.components if mode != RECONSTRUCT and layer in windows}

    def run(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.model(ids, attention_mask=mask, return_type=None)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, return_type="logits")

    def prefill(self, ids: torch.Tensor):
        with _cache_under_both_names(self.model, self.components):
            logits, cache = self.model(ids, use_cache=True, logits_to_keep=1, return_type="logits_and_cache")
        return logits[:, -1], cache

    def decode(self, token: torch.Tensor, cache):
        with _cache_under_both_names(self.model, self.components):
            logits, cache = self.model(
                token, past_key_values=cache, use_cache=True, logits_to_keep=1, return_type="logits_and_cache"
            )
        return logits[:, -1], cache

    def install(
        self,
        collector,
        stats: StatsSpec,
        backend: str,
        patterns=None,
        context_parallel: ContextParallel | None = None,
        streaming: LayerStreaming | None = None,
    ) -> Callable[[], None]:
        """The Hugging Face adapter's install on the wrapped model (the ``"workbench"``
        implementation and its routes), then every attention component routed to it: a
        forward handing the call to the Hugging Face module, or a kernel
        ``_reconstruct_attention``. Undone in reverse order."""
        if any(mode == DELEGATE for _, _, mode in self.components):
            _check_delegation(self.model)
        undo = self.hugging_face.install(collector, stats, backend, patterns, context_parallel, streaming)
        unrouted = [layer for layer, attn, _ in self.components if id(attn.original_component) not in _routes]
        if unrouted:
            undo()
            raise WorkbenchError(
                f"the Hugging Face attention modules of layers {unrouted} carry no layer_idx, so the workbench "
                f"cannot tell their layers apart: this architecture is not supported through TransformerBridge yet"
            )
        patched = []
        for layer, attn, mode in self.components:
            if mode == DELEGATE:
                vars(attn)["forward"] = _delegating_forward(attn)  # past GeneralizedComponent.__setattr__
                patched.append((attn, "forward"))
            elif mode == RECONSTRUCT:
                vars(attn)["_reconstruct_attention"] = _kernel_reconstruct(attn, layer)
                patched.append((attn, "_reconstruct_attention"))

        def restore() -> None:
            for attn, name in patched:
                vars(attn).pop(name, None)  # the class's own method shows through again
            undo()

        return restore

    def z_hooks(self, edit: ZEdit) -> Callable[[], None]:
        """Hooks on each block's ``attn.hook_z`` (``[batch, tokens, head, d_head]``, before the
        output projection); the user's own hooks stay."""
        added = []
        for layer, attn, _ in self.components:
            point = attn.hook_z
            point.add_hook(lambda z, hook, layer=layer: edit(layer, z))
            added.append((point, point.fwd_hooks[-1]))

        def remove() -> None:
            for point, handle in added:
                handle.hook.remove()
                point.fwd_hooks.remove(handle)

        return remove
