"""Which Hugging Face causal-LM architectures the instrumentation covers, checked, not assumed.

For every model type of the installed transformers that has a causal-LM class, a tiny model with
random weights runs twice on one random input: once with eager attention
(``output_attentions=True``, the attention probabilities of every layer) and once under
:func:`workbench.instrument` (the statistics kernels, reference backend). The statistics the
kernels record must equal those computed from the eager probabilities, every attention layer
must record, and the logits must not change; otherwise the architecture is a ``"mismatch"``,
the silent failure the workbench must never have. ``python -m workbench.coverage --out
docs/coverage.md`` writes the table.

Statuses (:data:`STATUSES`):

- ``exact``: statistics and logits equal within :data:`STAT_TOLERANCE` / :data:`LOGIT_TOLERANCE`,
  every attention layer recorded.
- ``refused``: :func:`workbench.instrument` or the instrumented forward raised
  :class:`~workbench.errors.WorkbenchError` (the reason is its message).
- ``unsupported``: no tiny model could be made, built or run eagerly here (the reason says why).
- ``mismatch``: the instrumented model ran but its numbers differ, a layer recorded nothing, or
  it failed with something other than a :class:`~workbench.errors.WorkbenchError`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from kernels import StatsSpec, pattern_stats
from workbench.errors import WorkbenchError
from workbench.instrument import instrument

#: The statuses of :class:`CoverageResult`, in the order the table lists them.
STATUSES = ("exact", "refused", "unsupported", "mismatch")
#: Largest difference allowed between a recorded statistic and the eager pattern's, as
#: ``|got - want| / (1 + |want|)`` (absolute below 1, relative above).
STAT_TOLERANCE = 1e-5
#: Largest difference allowed between instrumented and eager logits (measured alike).
LOGIT_TOLERANCE = 1e-4
#: What the instrumented run records (the ``argmax`` is compared through the probability at it).
SPEC = StatsSpec(entropy=True, max_prob=True, argmax=True, sink_tokens=1)
#: The fixed seed of the command and the committed table.
DEFAULT_SEED = 0
DEFAULT_TOKENS = 32

# The tiny shapes every architecture gets (fields found by name, in the config and its sub-configs).
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB, POSITIONS = 2, 64, 4, 2, 16, 128, 256, 128
EXPERTS, EXPERTS_PER_TOKEN, WINDOW, LORA_RANK, ROPE_DIM = 4, 2, 8, 32, 8
MAX_LAYERS = 4  # layer kinds beyond this many are not all kept

_LAYER_FIELDS = {
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
    "num_decoder_layers", "num_encoder_layers", "depth", "conf_num_hidden_layers", "num_blocks",
}  # fmt: skip
_SIZES = {
    **dict.fromkeys(
        ("hidden_size", "n_embd", "n_embed", "d_model", "emb_dim", "embedding_dim", "embed_dim", "dim",
         "word_embed_proj_dim", "input_embedding_size", "output_embedding_size", "hidden_size_global",
         "lru_width", "attention_hidden_size", "out_hidden_size", "backbone_hidden_size", "input_size",
         "ple_embed_dim", "router_hidden_size", "embedding_size"),
        HIDDEN,
    ),
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
         "decoder_attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads",
         "attention_heads", "swa_num_attention_heads", "conf_num_attention_heads", "index_n_heads",
         "linear_num_heads", "linear_num_value_heads", "num_attention_heads_per_layer"),
        HEADS,
    ),
    **dict.fromkeys(
        ("num_key_value_heads", "num_kv_heads", "kv_n_heads", "swa_num_key_value_heads", "linear_num_key_heads"),
        KV_HEADS,
    ),
    **dict.fromkeys(
        ("head_dim", "kv_channels", "attention_head_size", "attention_head_dim", "d_head", "dim_head", "d_kv",
         "swa_head_dim", "v_head_dim", "qk_head_dim", "index_head_dim", "linear_key_head_dim",
         "linear_value_head_dim", "linear_head_dim", "mamba_d_head", "mamba_head_dim"),
        HEAD_DIM,
    ),
    **dict.fromkeys(
        ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "dff", "dim_ff", "d_inner", "ffn_hidden_size",
         "moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
         "decoder_ffn_dim", "encoder_ffn_dim", "intermediate_size_mlp", "expert_ffn_hidden_size",
         "dense_intermediate_size", "moe_shared_expert_intermediate_size", "feed_forward_size", "mlp_dim",
         "shared_intermediate_size", "mamba_d_ssm"),
        INTERMEDIATE,
    ),
    **dict.fromkeys(("vocab_size", "decoder_vocab_size", "vocab_size_per_layer_input"), VOCAB),
    **dict.fromkeys(
        ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
         "max_target_positions", "original_max_position_embeddings", "max_source_positions"),
        POSITIONS,
    ),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), EXPERTS),
    **dict.fromkeys(
        ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "moe_top_k"), EXPERTS_PER_TOKEN
    ),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group",
                     "topk_group", "num_expert_group"), 1),  # fmt: skip
    **dict.fromkeys(
        ("sliding_window", "sliding_window_size", "attention_window_size", "attention_chunk_size",
         "local_attention_window_len", "local_attention"),
        WINDOW,
    ),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank", "o_lora_rank"), LORA_RANK),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"), ROPE_DIM),
    **dict.fromkeys(("mamba_d_state", "ssm_state_size", "state_size"), 16),
    **dict.fromkeys(("index_topk",), 16),
    "num_kv_shared_layers": 0,  # Gemma 3n: layers reading another's cache; the kept layers may not pair up
}  # fmt: skip
# Sizes whose None means "off" (no window, no low-rank projection, no shared expert): left None.
_OPTIONAL = {
    "sliding_window", "sliding_window_size", "attention_window_size", "attention_chunk_size",
    "local_attention_window_len", "local_attention", "q_lora_rank", "kv_lora_rank", "o_lora_rank",
    "shared_expert_intermediate_size", "shared_experts_intermediate_size", "shared_intermediate_size",
    "moe_shared_expert_intermediate_size", "original_max_position_embeddings", "rotary_dim", "index_topk",
    "n_inner",
}  # fmt: skip
# Int fields naming a layer: kept when the layer is, renumbered.
_INDEX_LIST = re.compile(r"(_layers|_idxs|_ids|_indexes|_indices)$")
_TOKEN_ID = re.compile(r"(token_id|token_ids|token_index|^unk_index|^mask_index)$")


class NoTinyConfig(Exception):
    """No tiny configuration can be made for this model type; the message says why."""


@dataclass
class CoverageResult:
    """What :func:`check_architecture` found for one model type.

    Attributes:
        model_type: the transformers model type (``"llama"``).
        class_name: the causal-LM class (``"LlamaForCausalLM"``).
        status: one of :data:`STATUSES`.
        reason: why, for every status but ``"exact"`` (one line).
        max_diff: largest differences ``|got - want| / (1 + |want|)``, instrumented against eager
            (absolute below 1, relative above): ``logits``,
            ``entropy``, ``max_prob``, ``argmax_prob`` (eager probability at the recorded argmax
            against the eager maximum), ``sink_mass``; empty when the model did not run.
        variants: attention variants the tiny model uses, as far as its modules and config show
            (``"sliding window"``, ``"soft-capping"``, ``"learned sinks"``, ``"chunked"``).
        layers: attention layers (and calls) that produced eager probabilities.
        recorded: of those, how many the instrumentation recorded.
        seconds: wall time of the check.
    """

    model_type: str
    class_name: str
    status: str
    reason: str = ""
    max_diff: dict[str, float] = field(default_factory=dict)
    variants: list[str] = field(default_factory=list)
    layers: int = 0
    recorded: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ architectures


def causal_lm_architectures() -> list[str]:
    """The model types of the installed transformers that have a causal-LM class
    (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def causal_lm_class_name(model_type: str) -> str:
    """The name of ``model_type``'s causal-LM class (``"llama"`` -> ``"LlamaForCausalLM"``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


# ------------------------------------------------------------------------------------------ tiny configs


def tiny_config(model_type: str, *, strict: bool = False):
    """A tiny configuration of ``model_type`` (a ``transformers.PretrainedConfig``), or None.

    Every size-like field found by name is shrunk, in the configuration and in its sub-configs
    (the text, vision and audio configs of multimodal models): 2 layers (up to
    :data:`MAX_LAYERS` when the model mixes more kinds of layers, one of each kind kept), width
    64, 4 query heads, 2 key/value heads where the configuration has the field (grouped-query
    attention), head dim 16, feed-forward 128, vocabulary 256, 128 positions, 4 experts with 2
    per token, and attention windows of 8 tokens, so a 32-token input exercises them. Per-layer
    lists (``layer_types``, ...) keep the first layer of each kind; layer-index lists are
    renumbered; special token ids beyond the vocabulary are moved into it.

    Returns None when no tiny configuration can be made generically; the reason comes as a
    warning, or as :class:`NoTinyConfig` with ``strict=True``.
    """
    try:
        return _tiny_config(model_type)
    except NoTinyConfig as exc:
        if strict:
            raise
        warnings.warn(f"{model_type}: {exc}", stacklevel=2)
        return None


def _tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise NoTinyConfig(f"transformers has no configuration class for {model_type!r}")
    cls = CONFIG_MAPPING[model_type]
    try:
        default = _quiet(cls)
    except Exception as exc:
        raise NoTinyConfig(f"the default {cls.__name__} cannot be built: {_one_line(exc)}") from exc
    try:
        # is_decoder: the causal-LM classes of encoders (BERT, Reformer, ...) want a causal decoder
        return _quiet(cls, **_overrides(default), is_decoder=True)
    except Exception as exc:
        raise NoTinyConfig(f"the tiny {cls.__name__} is invalid: {_one_line(exc)}") from exc


def _overrides(cfg) -> dict[str, Any]:
    """Keyword arguments that make ``cfg``'s class tiny (sub-configs rebuilt as tiny objects)."""
    values = cfg.to_dict()
    out: dict[str, Any] = {}
    for name in getattr(type(cfg), "sub_configs", {}) or {}:
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            out[name] = _quiet(type(sub), **_overrides(sub))
    vocab = min(values.get("vocab_size") or VOCAB, VOCAB)
    derived = _derived_fields(cfg, values)
    for name, value in values.items():
        if name in out or name in derived or isinstance(value, bool):
            continue
        target = _SIZES.get(name, VOCAB if name.endswith(("_vocab", "vocab_size")) else None)
        if target is not None and isinstance(value, int) and value > 0:
            out[name] = min(value, target)
        elif target is not None and value is None and name not in _OPTIONAL:
            out[name] = target  # unset sizes that the model needs (no default checkpoint sets them here)
        elif target is not None and isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            out[name] = [min(v, target) for v in value]
    if values.get("kv_lora_rank") is not None:  # multi-head latent attention: a key per query head
        if "num_key_value_heads" in values:
            out["num_key_value_heads"] = out.get("num_attention_heads", HEADS)
        if values.get("head_dim") is not None and values.get("head_dim") == values.get("qk_rope_head_dim"):
            out["head_dim"] = out.get("qk_rope_head_dim", values["head_dim"])  # the rotary part's size
    out.update(_mamba_heads(values, out))
    out.update(_token_ids(values, vocab))
    out.update(_layers(values))
    if isinstance(values.get("attention_types"), list) and "attention_layers" in out:  # GPT-Neo: one repeat
        out["attention_types"] = [[out["attention_layers"], 1]]
    return out


def _mamba_heads(values: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """Mamba-2 heads that fill the expanded width (``heads * head_dim = expand * hidden``), in
    Mamba and hybrid configs, where that is a rule."""
    hidden = out.get("hidden_size", values.get("hidden_size"))
    for heads, head_dim, expand in (
        ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
        ("num_heads", "head_dim", "expand"),
    ):
        if all(isinstance(values.get(n), int) for n in (heads, head_dim, expand)) and isinstance(hidden, int):
            return {heads: values[expand] * hidden // out.get(head_dim, values[head_dim])}
    return {}


def _derived_fields(cfg, values: dict[str, Any]) -> set[str]:
    """Fields declared without a default (None) that the configuration filled in itself, such as
    ``head_dim = hidden_size // num_attention_heads``: left out, so they follow the tiny sizes."""
    if not dataclasses.is_dataclass(cfg):
        return set()
    return {f.name for f in dataclasses.fields(cfg) if f.default is None and values.get(f.name) is not None}


def _token_ids(values: dict[str, Any], vocab: int) -> dict[str, Any]:
    """Special token ids beyond a ``vocab``-sized vocabulary, moved to distinct ids at its top."""
    out: dict[str, Any] = {}
    spare = iter(range(vocab - 1, vocab // 2, -1))
    moved: dict[int, int] = {}

    def inside(i: int) -> int:
        if i < vocab:
            return i
        if i not in moved:
            moved[i] = next(spare)
        return moved[i]

    for name, value in sorted(values.items()):
        if not _TOKEN_ID.search(name) or isinstance(value, bool):
            continue
        if isinstance(value, int) and value >= vocab:
            out[name] = inside(value)
        elif isinstance(value, list) and any(isinstance(v, int) and v >= vocab for v in value):
            out[name] = [inside(v) if isinstance(v, int) else v for v in value]
    return out


def _layers(values: dict[str, Any]) -> dict[str, Any]:
    """The layer count and every per-layer field: keep the first layer of each kind.

    A layer's kind is its entry in every per-layer list (lists as long as the model is deep,
    such as ``layer_types``) and whether index lists (``cross_attention_layers``) name it."""
    name = next((n for n in values if n in _LAYER_FIELDS and isinstance(values[n], int)), None)
    if name is None:
        return {}
    depth = values[name]
    index_lists = {
        n: v
        for n, v in values.items()
        if isinstance(v, list)
        and _INDEX_LIST.search(n)
        and v
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in v)
    }
    per_layer = {
        n: v for n, v in values.items() if isinstance(v, list) and len(v) == depth > 1 and n not in index_lists
    }
    kinds: dict[tuple, int] = {}
    for i in range(depth):
        kind = tuple(repr(v[i]) for v in per_layer.values()) + tuple(i in v for v in index_lists.values())
        kinds.setdefault(kind, i)
    keep = sorted(kinds.values())[:MAX_LAYERS]
    for i in range(depth):
        if len(keep) >= min(LAYERS, depth):
            break
        if i not in keep:
            keep = sorted([*keep, i])
    out: dict[str, Any] = {n: len(keep) for n in values if n in _LAYER_FIELDS and isinstance(values[n], int)}
    for n, v in per_layer.items():
        kept = [v[i] for i in keep]
        target = _SIZES.get(n)
        out[n] = [min(x, target) if isinstance(x, int) and target else x for x in kept]
    out.update({n: [keep.index(i) for i in v if i in keep] for n, v in index_lists.items()})
    return out


# ------------------------------------------------------------------------------------------ the check


def check_architecture(model_type: str, *, tokens: int = DEFAULT_TOKENS, seed: int = DEFAULT_SEED) -> CoverageResult:
    """Check that instrumenting a tiny random ``model_type`` reproduces its eager attention.

    The model (random weights from ``seed``, float32, eval mode) runs on ``tokens`` random ids
    (``[1, tokens]``, special ids left out) with ``attn_implementation="eager"`` and
    ``output_attentions=True``, then under ``instrument(model, SPEC, backend="reference")``
    (plus the learned sink's mass where the kernels know learned sinks).
    Every attention call's recorded ``entropy``, ``max_prob`` and ``sink_mass`` (``[1, H, N]``)
    must equal :func:`kernels.pattern_stats` of its eager probabilities (``[1, H, N, N]``)
    within :data:`STAT_TOLERANCE`, the eager probability at the recorded ``argmax`` must equal
    the eager maximum (ties may pick another key), and the logits must agree within
    :data:`LOGIT_TOLERANCE`. Never raises for the model's sake: every failure is a status.
    """
    start = time.perf_counter()
    try:
        class_name = causal_lm_class_name(model_type)
    except KeyError:
        class_name = "?"
    result = _check(model_type, class_name, tokens, seed)
    result.seconds = time.perf_counter() - start
    return result


def _check(model_type: str, class_name: str, tokens: int, seed: int) -> CoverageResult:
    try:
        config = _tiny_config(model_type)
    except NoTinyConfig as exc:
        return CoverageResult(model_type, class_name, "unsupported", _one_line(f"no tiny config: {exc}"))
    try:
        model = _build(config, seed)
        ids = _input_ids(model, config, tokens, seed)
    except Exception as exc:
        reason = _one_line(f"the tiny model cannot be built: {type(exc).__name__}: {exc}")
        return CoverageResult(model_type, class_name, "unsupported", reason)
    return check_model(model, ids, model_type=model_type, class_name=class_name)


def check_model(
    model: torch.nn.Module, ids: torch.Tensor, *, model_type: str = "", class_name: str | None = None
) -> CoverageResult:
    """Classify one Hugging Face model as :func:`check_architecture` does: eager attention on
    ``ids [batch, tokens]`` (the model is switched to ``attn_implementation="eager"`` first),
    then the instrumented forward, then the comparison. Never raises for the model's sake."""
    class_name = class_name or type(model).__name__
    variants: list[str] = []

    def result(status: str, reason: str = "", **kw) -> CoverageResult:
        return CoverageResult(model_type, class_name, status, _one_line(reason), variants=variants, **kw)

    try:
        variants = _variants(model)
        if model.config._attn_implementation != "eager":
            model.set_attn_implementation("eager")
        eager_logits, patterns = _eager(model, ids)
    except Exception as exc:
        return result("unsupported", f"the eager run failed: {type(exc).__name__}: {exc}")
    n_calls = sum(len(p) for p in patterns.values())
    try:
        logits, calls = _instrumented(model, ids)
    except WorkbenchError as exc:
        return result("refused", str(exc), layers=n_calls)
    except Exception as exc:
        return result("mismatch", f"the instrumented forward crashed: {type(exc).__name__}: {exc}", layers=n_calls)
    if not patterns and not calls:
        return result("unsupported", "no softmax attention: the eager run gave no attention probabilities")
    return _compare(result, patterns, calls, eager_logits, logits, n_calls)


def _variants(model: torch.nn.Module) -> list[str]:
    """The attention variants ``model`` uses, from its attention modules and config."""
    found = set()
    for m in model.modules():
        if not isinstance(getattr(m, "layer_idx", None), int):
            continue
        if isinstance(getattr(m, "sliding_window", None), int):
            found.add("sliding window")
        if getattr(m, "attn_logit_softcapping", None) or getattr(m, "softcap", None):
            found.add("soft-capping")
        if isinstance(getattr(m, "sinks", None), torch.Tensor):
            found.add("learned sinks")
    for cfg in _configs(model.config):
        values = cfg.to_dict()
        types = values.get("layer_types") or []
        if "chunked_attention" in types:
            found.add("chunked")
        window_on = values.get("sliding_window") and values.get("use_sliding_window") is not False
        if window_on and (not types or "sliding_attention" in types):
            found.add("sliding window")
    return sorted(found)


def _build(config, seed: int) -> torch.nn.Module:
    """The causal-LM model of ``config`` with random weights from ``seed``, eager, eval, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = _quiet(AutoModelForCausalLM.from_config, config, attn_implementation="eager", dtype=torch.float32)
    return model.float().eval()


def _input_ids(model: torch.nn.Module, config, tokens: int, seed: int) -> torch.Tensor:
    """``[1, tokens]`` random ids from the vocabulary, special token ids left out."""
    vocab = model.get_input_embeddings().num_embeddings
    vocab = min(vocab, int(getattr(config, "vocab_size", vocab) or vocab))
    special = set()
    for cfg in _configs(config):
        for name, value in cfg.to_dict().items():
            if _TOKEN_ID.search(name) or name.endswith("_id"):
                special.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (1, tokens), generator=g)]


def _configs(config) -> Iterator:
    """``config`` and its sub-configs, recursively."""
    yield config
    for name in getattr(type(config), "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _configs(sub)


def _eager(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
    """Eager logits ``[1, N, V]`` and the attention probabilities of every attention call, by
    layer index, in call order (``[1, H, N, N]`` each).

    The probabilities are caught on their way out of each module with a ``layer_idx`` (the
    attention modules return ``(output, weights)``), so that layers map to what the
    instrumentation records; a model whose attention carries no layer index falls back to
    ``output_attentions``' tuple, numbered in order."""
    n = ids.shape[1]
    patterns: dict[int, list[torch.Tensor]] = {}
    # The tensors seen, kept alive: a freed one's id could come back for a later layer's.
    seen: dict[int, torch.Tensor] = {}

    def hook(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if _is_pattern(weights, n) and id(weights) not in seen:
            seen[id(weights)] = weights
            patterns.setdefault(module.layer_idx, []).append(weights.detach())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not patterns:
        found = [a for a in getattr(out, "attentions", None) or () if _is_pattern(a, n)]
        patterns = {i: [a.detach()] for i, a in enumerate(found)}
    return out.logits.detach(), patterns


def _is_pattern(t: Any, n: int) -> bool:
    """Whether ``t`` looks like attention probabilities of ``n`` tokens: ``[B, H, n, n]``, entries
    in [0, 1], rows summing to at most 1 (a learned sink may take the rest)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[-2:]) != (n, n) or not t.is_floating_point():
        return False
    t = t.detach().double()
    return bool((t >= 0).all() and (t.sum(-1) <= 1 + 1e-4).all() and (t.sum(-1) > 0).any())


def _instrumented(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, list]]:
    """Logits ``[1, N, V]`` and the recorded statistics by layer (one entry per call)."""
    with instrument(model, _spec(), backend="reference") as rec, torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return out.logits.detach(), rec.calls


def _compare(result, patterns, calls, eager_logits, logits, n_calls) -> CoverageResult:
    """The status from eager probabilities and logits against the recorded ones."""
    diff = {"logits": _max_diff(logits, eager_logits) if logits.shape == eager_logits.shape else math.inf}
    problems = []
    recorded = 0
    for layer, layer_patterns in sorted(patterns.items()):
        got = calls.get(layer, [])
        recorded += min(len(got), len(layer_patterns))
        if len(got) != len(layer_patterns):
            problems.append(f"layer {layer} recorded {len(got)} calls, eager attention ran {len(layer_patterns)}")
        for pattern, st in zip(layer_patterns, got):
            for name, d in _stat_diffs(pattern, st).items():
                diff[name] = max(diff.get(name, 0.0), d)
    extra = sorted(set(calls) - set(patterns))
    if extra:
        problems.append(f"layers {extra} recorded statistics but gave no eager probabilities")
    bad = [f"{name} differs by {d:.2g}" for name, d in diff.items() if d > _tolerance(name)]
    problems = bad + problems
    kw = dict(max_diff=diff, layers=n_calls, recorded=recorded)
    if problems:
        return result("mismatch", "; ".join(problems), **kw)
    return result("exact", **kw)


def _stat_diffs(pattern: torch.Tensor, st) -> dict[str, float]:
    """Largest differences of one call's recorded statistics (``[B, H, N]`` each) from its eager
    probabilities ``pattern [B, H, N, N]``."""
    p = pattern.double()
    if st.entropy is None or tuple(st.entropy.shape) != tuple(p.shape[:-1]):
        return {"shape": math.inf}
    sink = getattr(st, "learned_sink_mass", None)
    if sink is not None and (p.sum(-1) - 1).abs().max() < 1e-4 and float(sink.max()) > STAT_TOLERANCE:
        # The eager weights are over the keys alone and the sink scales the output afterwards
        # (Granite SWA): as probabilities of the whole softmax they are the kernels' (1 - sink)
        # times these; the logits check that sink mass.
        p = p * (1 - sink.double()).unsqueeze(-1)
    want = pattern_stats(p, _spec())
    at_argmax = p.gather(-1, st.argmax.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    diffs = {
        "entropy": _max_diff(st.entropy, want.entropy),
        "max_prob": _max_diff(st.max_prob, want.max_prob),
        "argmax_prob": _max_diff(at_argmax, want.max_prob),
        "sink_mass": _max_diff(st.sink_mass, want.sink_mass),
    }
    if sink is not None and getattr(want, "learned_sink_mass", None) is not None:
        diffs["learned_sink_mass"] = _max_diff(sink, want.learned_sink_mass)
    return diffs


def _spec() -> StatsSpec:
    """:data:`SPEC`, plus the learned sink's mass where the kernels know learned sinks: the
    kernels count the sink in the entropy, and an eager pattern of a sink model leaves it out."""
    if any(f.name == "learned_sink" for f in dataclasses.fields(StatsSpec)):
        return dataclasses.replace(SPEC, learned_sink=True)
    return SPEC


def _tolerance(name: str) -> float:
    return LOGIT_TOLERANCE if name == "logits" else STAT_TOLERANCE


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / (1 + |b|)``: absolute below 1, relative above (entropies reach log N, and
    float32 rounding grows with them); inf when the shapes differ."""
    if a.shape != b.shape:
        return math.inf
    b = b.double()
    d = (a.double() - b).abs() / (1 + b.abs())
    return float(d.max()) if d.numel() else 0.0


# ------------------------------------------------------------------------------------------ tables


def check_all(
    model_types: Iterable[str] | None = None,
    *,
    tokens: int = DEFAULT_TOKENS,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    threads: int | None = 1,
) -> list[CoverageResult]:
    """:func:`check_architecture` for each of ``model_types`` (default: every causal-LM
    architecture), with a progress bar.

    ``threads``: torch's intra-op threads meanwhile (restored after); one is fastest for models
    this small, and leaves other cores to other work (None: unchanged)."""
    from tqdm.auto import tqdm

    types = list(model_types) if model_types is not None else causal_lm_architectures()
    results = []
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        bar = tqdm(types, desc="architectures", unit="model", disable=not progress)
        for model_type in bar:
            bar.set_postfix_str(model_type)
            results.append(check_architecture(model_type, tokens=tokens, seed=seed))
    finally:
        torch.set_num_threads(before)
    return results


def coverage_table(results: Sequence[CoverageResult]) -> pd.DataFrame:
    """One row per architecture: ``model_type, class_name, status, layers, recorded, variants,
    reason``,
    the largest differences (``diff_logits``, ``diff_entropy``, ...; NaN where not run) and
    ``seconds``, sorted by status (in :data:`STATUSES` order) then model type."""
    names = ("logits", "entropy", "max_prob", "argmax_prob", "sink_mass")
    rows = [
        {
            "model_type": r.model_type,
            "class_name": r.class_name,
            "status": r.status,
            "layers": r.layers,
            "recorded": r.recorded,
            "variants": ", ".join(r.variants),
            "reason": r.reason,
            **{f"diff_{n}": r.max_diff.get(n, math.nan) for n in names},
            "seconds": r.seconds,
        }
        for r in results
    ]
    columns = ["model_type", "class_name", "status", "layers", "recorded", "variants", "reason"]
    columns += [f"diff_{n}" for n in names]
    table = pd.DataFrame(rows, columns=[*columns, "seconds"])
    order = {s: i for i, s in enumerate(STATUSES)}
    table = table.assign(_order=table["status"].map(order)).sort_values(["_order", "model_type"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def summary_line(results: Sequence[CoverageResult]) -> str:
    """``"196 architectures: 80 exact, 60 refused, 56 unsupported, 0 mismatch"``."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return f"{len(results)} architectures: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def coverage_markdown(results: Sequence[CoverageResult]) -> str:
    """A markdown table (model type, class, status, attention layers recorded of those that ran,
    attention variants, reason), sorted by status then model type, after a one-line summary of
    the counts.

    Only what is the same on every machine goes in (no timings, no differences), so a committed
    table can be compared with a fresh one."""
    table = coverage_table(results)
    lines = [
        f"**{summary_line(results)}.**",
        "",
        "| model type | class | status | layers recorded | variants | reason |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in table.itertuples():
        layers = f"{row.recorded}/{row.layers}" if row.layers else "-"
        cells = [f"`{row.model_type}`", f"`{row.class_name}`", row.status, layers, row.variants, _cell(row.reason)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def coverage_document(results: Sequence[CoverageResult]) -> str:
    """``docs/coverage.md``: what is checked, how to regenerate it, and :func:`coverage_markdown`."""
    import transformers

    return _INTRO.format(
        transformers=transformers.__version__,
        tokens=DEFAULT_TOKENS,
        seed=DEFAULT_SEED,
        stat_tol=_power_of_ten(STAT_TOLERANCE),
        logit_tol=_power_of_ten(LOGIT_TOLERANCE),
    ) + coverage_markdown(results)


def _power_of_ten(x: float) -> str:
    return f"1e-{round(-math.log10(x))}"


_INTRO = """\
# Hugging Face causal-LM coverage

Which architectures `workbench.instrument` covers, checked rather than assumed. For every model
type of transformers {transformers} with a causal-LM class (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`),
`workbench.coverage` builds a tiny model with random weights (`tiny_config`: 2 layers, or one of
each kind of layer up to 4; width 64; 4 query and 2 key/value heads where the config has them;
head dim 16; vocabulary 256; attention windows and chunks of 8 tokens; nested text and vision
configs shrunk alike), runs it once with eager attention (`output_attentions=True`) and once
under `workbench.instrument(model, StatsSpec(entropy=True, max_prob=True, argmax=True,
sink_tokens=1), backend="reference")`, on {tokens} random tokens (seed {seed}, float32), and
compares:

- entropy, max probability and sink mass of every attention call with `kernels.pattern_stats` of
  the eager probabilities, and the eager probability at the recorded argmax with the eager
  maximum (ties may pick another key): within {stat_tol} x (1 + |value|);
- the logits: within {logit_tol} x (1 + |value|);
- every attention call that ran eagerly must have recorded ("layers recorded": recorded / eager
  attention calls).

For models with learned sinks, the probability left to the sink is part of the comparison (the
kernels count it in the entropy). "variants" lists the attention variants the tiny model uses,
as its modules and config show them.

Statuses: **exact** (all equal); **refused** (`instrument` or the instrumented forward raised
`WorkbenchError`, with its message); **unsupported** (no tiny model could be made, built or run
eagerly here; the reason says why); **mismatch** (ran, but numbers differ, a layer recorded
nothing, or the instrumented forward crashed with another error: the failures
`tests/workbench/test_coverage.py` forbids).

Regenerate after changing the kernels, the adapters or transformers (the test compares this file
with a fresh run; about 10 s on one CPU core):

```bash
python -m workbench.coverage --out docs/coverage.md
```

"""


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _one_line(exc_or_text: Any, limit: int = 300) -> str:
    """An exception's message (or a text) on one line, at most ``limit`` characters; memory
    addresses are removed so reasons are the same from run to run."""
    text = " ".join(str(exc_or_text).split())
    if isinstance(exc_or_text, BaseException) and not text:
        text = type(exc_or_text).__name__
    text = re.sub(r" at 0x[0-9a-f]+", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with transformers' and Python's warnings and prints silenced."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


# ------------------------------------------------------------------------------------------ the command


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workbench.coverage [--out docs/coverage.md] [--only TYPE,...]``: check every
    architecture, print the summary (and any mismatch), write the document to ``--out``. Exits 1
    when some architecture is a mismatch (the document is written all the same)."""
    parser = argparse.ArgumentParser(prog="python -m workbench.coverage", description=main.__doc__)
    parser.add_argument("--out", type=Path, help="write the markdown document here (e.g. docs/coverage.md)")
    parser.add_argument("--only", help="comma-separated model types (default: every causal-LM architecture)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else None
    results = check_all(types, tokens=args.tokens, seed=args.seed)
    print(summary_line(results))
    for r in results:
        if r.status == "mismatch":
            print(f"MISMATCH {r.model_type}: {r.reason}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(coverage_document(results))
        print(f"wrote {args.out}")
    return 1 if any(r.status == "mismatch" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
