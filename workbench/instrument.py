"""``instrument(model)``: run a model's attention through the statistics kernels."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kernels import BACKENDS, StatsSpec
from workbench.errors import WorkbenchError
from workbench.hooked import hugging_face as hf_adapter
from workbench.hooked import transformer_lens as tl_adapter
from workbench.recording import PatternSpec, Recording
from workbench.streaming import StreamingSummary

#: What ``instrument`` records when no ``stats`` is given: every row statistic (key mass,
#: which costs a second pass, is opt-in).
DEFAULT_STATS = StatsSpec.every_row_statistic()
_MARK = "_workbench_instrumented"


@contextmanager
def instrument(
    model: torch.nn.Module,
    stats: StatsSpec | None = None,
    patterns: PatternSpec | None = None,
    backend: str = "auto",
    into: Recording | StreamingSummary | None = None,
) -> Iterator[Recording | StreamingSummary]:
    """Within the block, the model's attention runs through :func:`kernels.attention` and
    every forward pass adds its per-layer statistics to the yielded :class:`Recording`.

    The model is restored on exit, also when the block raises. ``into`` collects into an
    existing :class:`Recording` or a :class:`~workbench.streaming.StreamingSummary` (means per
    head and position bucket, fixed memory) instead of a new recording.

    Example:
        >>> with instrument(model, stats=StatsSpec(entropy=True, sink_tokens=1)) as rec:
        ...     model(tokens)
        >>> rec.layer(0).entropy.shape  # [batch, head, position]
    """
    stats = stats if stats is not None else DEFAULT_STATS
    if not isinstance(stats, StatsSpec):
        raise WorkbenchError(f"stats must be a kernels.StatsSpec, got {type(stats).__name__}")
    if backend not in BACKENDS:
        raise WorkbenchError(f"unknown kernel backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if getattr(model, _MARK, False):
        raise WorkbenchError("this model is already instrumented: leave the outer `with instrument(...)` first")
    if into is not None and not callable(getattr(into, "add", None)):
        raise WorkbenchError(f"into= takes a Recording, a StreamingSummary or another collector with "
                             f"add(layer, stats), got {type(into).__name__}")
    adapter = adapter_for(model)
    n_layers = adapter.n_layers(model)
    if patterns is not None:
        _check_patterns(model, adapter, patterns, n_layers)
    rec = into if into is not None else Recording(stats, n_layers, model_name=_model_name(model))
    restore = adapter.install(model, rec, stats, backend, patterns)
    setattr(model, _MARK, True)
    try:
        yield rec
    finally:
        restore()
        delattr(model, _MARK)


def _check_patterns(model, adapter, patterns: PatternSpec, n_layers: int) -> None:
    """Patterns need a TransformerLens model, and layers and heads that it has."""
    if not isinstance(patterns, PatternSpec):
        raise WorkbenchError(f"patterns= takes a workbench.PatternSpec, got {type(patterns).__name__}")
    if adapter is not tl_adapter:
        raise WorkbenchError("patterns= needs a TransformerLens model; Hugging Face models give "
                             "patterns through attn_implementation='eager' and output_attentions=True")
    bad = [i for i in patterns.layers if not 0 <= i < n_layers]
    if bad:
        raise WorkbenchError(f"pattern layers {bad} out of range: the model has {n_layers} layers")
    n_heads = adapter.head_shape(model)[0]
    bad = [h for h in patterns.heads or () if not 0 <= h < n_heads]
    if bad:
        raise WorkbenchError(f"pattern heads {bad} out of range: the model has {n_heads} heads per layer")


def adapter_for(model):
    """The module (in ``workbench.hooked``) that knows this kind of model: layer count,
    vocabulary, context, forward pass and instrumentation."""
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        problems = tl_adapter.unsupported_features(model.cfg)
        if problems:
            raise WorkbenchError(
                "the statistics kernels cannot reproduce this model's attention yet: " + ", ".join(problems)
            )
        return tl_adapter
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        return hf_adapter
    raise WorkbenchError(
        f"cannot instrument a {type(model).__name__}: pass a TransformerLens HookedTransformer "
        "or a Hugging Face PreTrainedModel"
    )


def _model_name(model) -> str:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return str(getattr(cfg, "model_name", "") or getattr(cfg, "_name_or_path", "") or type(model).__name__)
