"""Adapters: the one place that knows how each model library builds and runs a model.

Everything above this package talks to a model through :class:`ModelAdapter`; resolve it once
with :func:`adapter_for` and pass it along. A new library (as TransformerLens's TransformerBridge
did, in :mod:`~workbench.adapters.transformer_bridge`) joins by implementing the protocol and a
branch here.
"""

from __future__ import annotations

import torch

from workbench.adapters.base import ModelAdapter
from workbench.errors import WorkbenchError

__all__ = ["ModelAdapter", "adapter_for"]


def adapter_for(model: torch.nn.Module | ModelAdapter) -> ModelAdapter:
    """The adapter of ``model`` (a TransformerLens ``HookedTransformer`` or ``TransformerBridge``,
    or a Hugging Face ``PreTrainedModel``); an adapter passes through unchanged.
    :class:`WorkbenchError` for any other object, and for TransformerLens configurations the
    kernels cannot reproduce."""
    if isinstance(model, ModelAdapter):
        return model
    from workbench.adapters.transformer_bridge import is_transformer_bridge, wrapped_by_bridge

    if is_transformer_bridge(model):
        from workbench.adapters.transformer_bridge import TransformerBridgeAdapter

        return TransformerBridgeAdapter(model)
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # pragma: no cover - a dependency, but Hugging Face models do not need it
        HookedTransformer = ()
    if isinstance(model, HookedTransformer):
        from workbench.adapters.transformer_lens import TransformerLensAdapter

        return TransformerLensAdapter(model)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        from workbench.adapters.hugging_face import HuggingFaceAdapter

        if wrapped_by_bridge(model):  # the bridge's components compute attention, not AttentionInterface
            raise WorkbenchError(
                f"this {type(model).__name__} is the original_model of a TransformerBridge, whose components "
                "compute its attention: instrument the TransformerBridge itself"
            )
        return HuggingFaceAdapter(model)
    raise WorkbenchError(
        f"cannot instrument a {type(model).__name__}: pass a TransformerLens HookedTransformer or "
        "TransformerBridge, or a Hugging Face PreTrainedModel"
    )
