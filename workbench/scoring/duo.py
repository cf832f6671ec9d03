"""DuoAttention's head gates (Xiao et al. 2025): one gate ``alpha`` in ``[0, 1]`` per (layer, KV
head), trained with the model frozen so that the model whose heads output
``alpha * full attention + (1 - alpha) * streaming attention`` keeps the full model's final
hidden states on needle (passkey) samples, while an L1 penalty pushes every gate towards
streaming. A gate that stays high marks a head that needs the whole context (their "retrieval
head"); one that falls to 0 a head that the first ``sink`` and the last ``recent`` keys serve.

Their code (``mit-han-lab/duo-attention``: ``duo_attn/train.py``, ``duo_attn/patch/llama.py``,
``duo_attn/patch/streaming_attn.py``, ``duo_attn/loss.py``, ``scripts/train.sh``), and what
this module keeps of it:

- gates: one per (layer, KV head), initialised to 1, clamped to ``[0, 1]`` in place before every
  step and inside the forward; the query heads of a KV group share their KV head's gate;
- streaming attention: a query at position ``i`` sees key ``j <= i`` when ``i - j < recent`` or
  ``j < sink`` (their ``generate_streaming_mask``);
- loss: ``mean over supervised positions and hidden dimensions of (h_gated - h_full)^2 +
  reg_weight * mean |alpha|``, where ``h`` is the last hidden state (after the final norm) and
  the supervised positions are the question and answer at the end of each sample (their
  labels); ``reg_weight`` 0.05, AdamW (no weight decay) at lr 0.02 with their schedule (linear
  warm-up from 0.1 over the first fifth of the steps, linear decay to 0.1 over the last fifth);
  batch 1; the final gates clipped to ``[0, 1]`` as their ``load_attn_pattern`` does.

Differences, for small models on a CPU (docs/scores.md, "DuoAttention gates"): ``sink`` 4 and
``recent`` 64 instead of 128 and 256, training samples of a few hundred tokens instead of 1K-32K,
a few hundred steps instead of 2000, one needle per sample (:func:`workbench.tasks.needle_samples`)
instead of ten passkeys of 32 words, float32 instead of bf16, exact masks instead of their
128-token blocks. TransformerLens ``HookedTransformer`` models only: the gated forward mixes the
two patterns at ``hook_pattern`` (the head's output is linear in its pattern, so this is exactly
the gated output), which costs O(N^2) memory per layer: fine at training lengths of small
models. Hugging Face models are refused for now.

Example:
    >>> result = train_gates(planted(context=1024), DuoSettings(steps=100, lengths=(256,)))
    >>> result.gates  # [n_layers, n_kv_heads]
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.errors import WorkbenchError
from workbench.tasks import answer_span, needle_samples

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from workbench.runs import Run
    from workbench.scoring.settings import ScoreRunSettings

#: The part file that holds a run's trained gates (next to the per-sample parts).
DUO_PART = "duo-gates"
#: Needle depths the training samples draw from (their ``min/max_needle_depth_ratio``).
DEPTHS = tuple(0.05 + 0.1 * i for i in range(10))


@dataclass(frozen=True)
class DuoSettings:
    """How the gates are trained (the run's ``seed`` draws the samples).

    ``steps``: optimiser steps, one needle sample each; ``lr``: AdamW's peak learning rate;
    ``reg_weight``: weight of ``mean |alpha|`` in the loss; ``sink``, ``recent``: the first and
    last keys streaming attention sees; ``lengths``: tokens per training sample (each step takes
    the next sample of a shuffled pool over these lengths and :data:`DEPTHS`)."""

    steps: int = 300
    lr: float = 0.02
    reg_weight: float = 0.05
    sink: int = 4
    recent: int = 64
    lengths: tuple[int, ...] = (256, 512)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        for name, low in (("steps", 1), ("sink", 0), ("recent", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise WorkbenchError(f"DuoSettings.{name} must be an int >= {low}, got {value!r}")
        if not self.lr > 0 or not self.reg_weight >= 0:
            raise WorkbenchError(f"DuoSettings needs lr > 0 and reg_weight >= 0, got {self.lr} and {self.reg_weight}")
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise WorkbenchError(f"DuoSettings.lengths must be at least 64 tokens each, got {list(self.lengths)}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> DuoSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_lengths(context: int | None, lengths: Sequence[int] = DuoSettings.lengths) -> tuple[int, ...]:
    """The training lengths a model gets when none are given: those of ``lengths`` that fit its
    ``context``, else the context itself."""
    return tuple(n for n in lengths if context is None or n <= context) or (int(context),)


def check_model(model, settings: DuoSettings) -> HookedTransformer:
    """``model`` as a ``HookedTransformer`` whose context holds every training length;
    :class:`WorkbenchError` otherwise (Hugging Face models are not supported yet)."""
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise WorkbenchError(
            f"DuoAttention gates are trained on TransformerLens HookedTransformer models only for now (this one "
            f"is a {type(model).__name__}): load it with tl:NAME, or leave duo out of --scores"
        )
    if model.cfg.attention_dir != "causal":
        raise WorkbenchError("DuoAttention gates need causal attention (streaming keeps the keys before a query)")
    too_long = [n for n in settings.lengths if n > model.cfg.n_ctx]
    if too_long:
        raise WorkbenchError(
            f"DuoAttention training lengths {too_long} exceed the model's context of {model.cfg.n_ctx} tokens: "
            "give shorter --duo-lengths"
        )
    from workbench.models import task_tokenizer

    need = needle_tokens(task_tokenizer(model))
    if min(settings.lengths) < need:
        raise WorkbenchError(
            f"DuoAttention training samples of {min(settings.lengths)} tokens cannot hold a needle, its question "
            f"and answer ({need} tokens or more with this tokenizer): give --duo-lengths of at least {need}"
        )
    return model


def needle_tokens(tokenizer) -> int:
    """About the fewest tokens a needle sample can have with ``tokenizer``: BOS, the longest
    needle, its question and answer, one haystack token (4-digit codes assumed to take at most
    as many tokens as "0000" plus 2)."""
    from workbench.tasks import NAMES, start_tokens

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    question = max(count(f" The secret code of {name} is") for name in NAMES)
    answer = count(" 0000") + 2
    return len(start_tokens(tokenizer)) + 2 * question + 2 * answer + count(".") + 1


def kv_heads(model: HookedTransformer) -> int:
    """The model's key/value heads per layer (its query heads without grouped-query attention)."""
    return int(model.cfg.n_key_value_heads or model.cfg.n_heads)


def streaming_visible(n: int, sink: int, recent: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n, n]`` bool: key ``j`` visible to query ``i`` under streaming attention (``j <= i`` and
    ``i - j < recent`` or ``j < sink``). O(N^2): for training lengths."""
    i = torch.arange(n, device=device).view(-1, 1)
    j = torch.arange(n, device=device).view(1, -1)
    return (j <= i) & ((i - j < recent) | (j < sink))


@contextmanager
def gated(model: HookedTransformer, alpha: torch.Tensor, sink: int, recent: int) -> Iterator[None]:
    """Within the block, every head of ``model`` outputs ``alpha * full + (1 - alpha) *
    streaming attention`` (``alpha [n_layers, n_kv_heads]``, clamped to ``[0, 1]``; gradients
    flow into it). The two patterns come from the same pre-softmax scores
    (``hook_attn_scores``) and are mixed at ``hook_pattern``; a model with learned sinks keeps
    its sink logit in both softmaxes. Inputs must be single sequences without padding or KV cache."""
    n_heads = int(model.cfg.n_heads)
    group = n_heads // kv_heads(model)
    if tuple(alpha.shape) != (model.cfg.n_layers, kv_heads(model)):
        raise WorkbenchError(
            f"alpha has shape {tuple(alpha.shape)}; this model needs [{model.cfg.n_layers}, {kv_heads(model)}] "
            "(layers, KV heads)"
        )
    stash: dict[int, torch.Tensor] = {}

    def keep_scores(layer: int):
        def hook(scores: torch.Tensor, hook) -> torch.Tensor:  # [B, H, Q, K]
            stash[layer] = scores
            return scores

        return hook

    def mix(layer: int):
        def hook(pattern: torch.Tensor, hook) -> torch.Tensor:  # [B, H, Q, K]
            scores = stash.pop(layer)
            n_q, n_k = scores.shape[-2:]
            if n_q != n_k:
                raise WorkbenchError("the gated model takes whole sequences (no KV cache)")
            visible = streaming_visible(n_k, sink, recent, scores.device)
            s = scores.float().masked_fill(~visible, -math.inf)
            attn = model.blocks[layer].attn
            if getattr(model.cfg, "use_attention_sinks", False):
                logit = attn.sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
                stream = F.softmax(torch.cat([s, logit], dim=-1), dim=-1)[..., :-1]
            else:
                stream = F.softmax(s, dim=-1)
            a = alpha[layer].clamp(0, 1).repeat_interleave(group).view(1, n_heads, 1, 1)
            return a * pattern + (1 - a) * stream.to(pattern.dtype)

        return hook

    hooks = []
    for layer, block in enumerate(model.blocks):
        hooks += [(block.attn.hook_attn_scores.name, keep_scores(layer)), (block.attn.hook_pattern.name, mix(layer))]
    with model.hooks(fwd_hooks=hooks):
        yield
    stash.clear()


def final_hidden(model: HookedTransformer, ids: torch.Tensor) -> torch.Tensor:
    """``[batch, tokens, d_model]``: the last hidden state, after the final norm when the model
    has one (what the unembedding reads; their ``outputs[0]`` of the base model)."""
    h = model(ids, stop_at_layer=model.cfg.n_layers, attention_mask=torch.ones_like(ids))
    return model.ln_final(h) if model.cfg.normalization_type is not None else h


@dataclass(frozen=True)
class TrainingSample:
    """One training input: ``ids [tokens]`` (a needle sample with its answer appended) and the
    ``supervised`` positions (the question and the answer at its end)."""

    ids: torch.Tensor
    supervised: range


def training_samples(tokenizer, settings: DuoSettings, seed: int, haystack: str | None = None) -> list[TrainingSample]:
    """``settings.steps`` needle samples, one per step, in a shuffled order fixed by ``seed``:
    a pool over ``settings.lengths`` x :data:`DEPTHS`, repeated as needed, each with a fresh
    name and code. The supervised positions are those of the question and the answer (their
    labels: the question-and-answer tokens after the context)."""
    cells = len(settings.lengths) * len(DEPTHS)
    per_cell = math.ceil(settings.steps / cells)
    pool = needle_samples(tokenizer, list(settings.lengths), list(DEPTHS), per_cell, haystack=haystack, seed=seed)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[: settings.steps]
    out = []
    for i in order.tolist():
        sample = pool[i]
        span = answer_span(sample)
        question = span.start - sample.needle.start  # the needle begins with the question's tokens
        ids = torch.cat([sample.ids, sample.answer])
        out.append(TrainingSample(ids, range(len(sample.ids) - question, len(ids))))
    return out


@dataclass
class DuoResult:
    """Trained gates ``[n_layers, n_kv_heads]`` in ``[0, 1]``, and per step the distillation
    loss, the regulariser ``mean |alpha|`` and the total."""

    gates: torch.Tensor
    distill: list[float]
    reg: list[float]
    loss: list[float]
    seconds: float


def schedule(step: int, steps: int) -> float:
    """Their learning-rate factor: linear warm-up from 0.1 over the first fifth of the steps,
    1 in the middle, linear decay to 0.1 over the last fifth."""
    fifth = max(1, steps // 5)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


def train_gates(
    model: HookedTransformer,
    settings: DuoSettings,
    seed: int = 0,
    *,
    haystack: str | None = None,
    progress: bool = True,
) -> DuoResult:
    """Train DuoAttention's gates for ``model`` (frozen; its parameters' ``requires_grad`` is
    restored after). Deterministic for a ``seed`` (up to float rounding across thread counts).
    ``haystack``: the needle samples' text (default: the built-in docstrings)."""
    from workbench.models import task_tokenizer

    model = check_model(model, settings)
    samples = training_samples(task_tokenizer(model), settings, seed, haystack)
    device = next(model.parameters()).device
    alpha = torch.nn.Parameter(torch.ones(model.cfg.n_layers, kv_heads(model), device=device))
    optimizer = torch.optim.AdamW([alpha], lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, settings.steps))
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    distills, regs, losses = [], [], []
    start = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        bar = tqdm(samples, desc="DuoAttention gates", unit="step", disable=not progress)
        for sample in bar:
            with torch.no_grad():
                alpha.clamp_(0, 1)
                ids = sample.ids.to(device).unsqueeze(0)
                target = final_hidden(model, ids)[0, sample.supervised.start : sample.supervised.stop].float()
            with torch.enable_grad():
                with gated(model, alpha, settings.sink, settings.recent):
                    hidden = final_hidden(model, ids)[0, sample.supervised.start : sample.supervised.stop].float()
                distill = (hidden - target).pow(2).mean()  # over positions and hidden dimensions
                reg = alpha.abs().mean()
                loss = distill + settings.reg_weight * reg
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            scheduler.step()
            distills.append(float(distill.detach()))
            regs.append(float(reg.detach()))
            losses.append(float(loss.detach()))
            bar.set_postfix(distill=f"{distills[-1]:.2e}", reg=f"{regs[-1]:.3f}")
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
    gates = alpha.detach().clamp(0, 1).cpu()
    return DuoResult(gates, distills, regs, losses, time.perf_counter() - start)


def query_gates(gates: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[n_layers, n_heads]``: each query head's KV-head gate."""
    return gates.repeat_interleave(n_heads // gates.shape[1], dim=1)


def gates_part(result: DuoResult, n_heads: int, settings: DuoSettings) -> pd.DataFrame:
    """The run's part for the gates, in the per-sample parts' columns: one ``duo`` row per
    (layer, query head) with ``total`` = its KV head's gate and ``count`` 1 (task ``niah``: the
    training data), plus per-run rows (layer -1): ``duo_first_loss``, ``duo_final_loss``
    (distillation loss, mean of the first / last tenth of the steps), ``duo_mean_gate``,
    ``duo_seconds``."""
    q = query_gates(result.gates, n_heads)
    rows = [("duo", layer, h, -1, float(q[layer, h]), 1.0) for layer in range(q.shape[0]) for h in range(q.shape[1])]
    tenth = max(1, len(result.distill) // 10)
    rows += [
        ("duo_first_loss", -1, -1, -1, sum(result.distill[:tenth]) / tenth, 1.0),
        ("duo_final_loss", -1, -1, -1, sum(result.distill[-tenth:]) / tenth, 1.0),
        ("duo_mean_gate", -1, -1, -1, float(result.gates.mean()), 1.0),
        ("duo_seconds", -1, -1, -1, result.seconds, 1.0),
    ]
    frame = pd.DataFrame(rows, columns=["name", "layer", "head", "bucket", "total", "count"])
    frame.insert(0, "sample", 0)
    frame.insert(0, "depth", math.nan)
    frame.insert(0, "length", max(settings.lengths))
    frame.insert(0, "task", "niah")
    return frame.astype({"layer": "int32", "head": "int32", "bucket": "int64"})


def ensure_gates(run: Run, model, settings: ScoreRunSettings, progress: bool = True) -> None:
    """Give ``run`` its trained gates (the :data:`DUO_PART` part; trained now unless a committed
    one is there, so a resumed run does not train again) and record the training in the
    manifest's ``duo`` entry (settings, losses, seconds). Nothing when ``duo`` is not scored."""
    if "duo" not in settings.scores:
        return
    from workbench.tasks import read_text

    duo = settings.duo
    if run.part_states([DUO_PART])[DUO_PART] != "done":
        run.discard_part(DUO_PART)
        haystack = read_text(settings.text) if settings.text is not None else None
        result = train_gates(model, duo, settings.seed, haystack=haystack, progress=progress)
        run.write_part(DUO_PART, gates_part(result, int(model.cfg.n_heads), duo))
    part = run.read_part(DUO_PART)
    measures = part[part["layer"] < 0].set_index("name")["total"]
    run.manifest["duo"] = {
        "settings": {**duo.to_dict(), "seed": settings.seed},
        **{k.removeprefix("duo_"): float(v) for k, v in measures.items()},
    }
