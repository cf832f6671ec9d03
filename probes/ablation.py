"""Head ablation: replace chosen heads' outputs ``z`` (per head, before the output projection:
``hook_z`` on TransformerLens models, the input of ``o_proj`` on Hugging Face models) and
measure what that does to a metric.

- ``zero``: ``z = 0``;
- ``mean``: ``z`` = the head's mean over every position of a reference batch;
- ``resample``: ``z`` = the head's output at the same position on a randomly drawn reference
  input (the reference inputs must be at least as long; not while decoding);
- ``uniform``: Wu et al.'s masking: the head's attention scores set to 0 before the softmax, so
  equal weight on every key it sees (``z`` = the mean of the visible values), in decoding steps
  only (forwards that extend a non-empty KV cache; the prompt's prefill is unchanged).
  TransformerLens models only (the values come from its KV cache).

Works together with statistics recording (ablate inside ``instrument``, or the other way round).
Every function takes a model or its :class:`~workbench.adapters.ModelAdapter`; the experiments
resolve the adapter once and pass it along.

Example:
    >>> metric = needle_accuracy(needle_samples(model.tokenizer, [512], [0.2, 0.5, 0.8], 8))
    >>> with ablate(model, [(1, 1)], "uniform"):
    ...     metric(model)
    >>> scan_heads(model, metric, "uniform")        # every head alone: layer, head, value, delta
    >>> cumulative(model, metric, rank_heads(run, "retrieval"), ks=[1, 2, 4], method="uniform")
    >>> run_ablation(run, model, AblationSettings(rank_by="retrieval", ks=(1, 2)))  # all of it, into the run
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.adapters import ModelAdapter, adapter_for
from workbench.errors import WorkbenchError
from workbench.runs import Run
from workbench.scoring.formulas import answer_budget, answer_retrieved, answer_text, ends_answer
from workbench.tasks import TaskSample, second_copy_start

Head = tuple[int, int]
Model = torch.nn.Module | ModelAdapter
#: A function of the model (called with what the experiment was given: a model or its adapter)
#: that returns one number.
Metric = Callable[[Model], float]
METHODS = ("zero", "mean", "resample", "uniform")
#: Where the random heads of the masking experiment come from: outside the top ``max(ks)`` heads
#: of the ranking (``non_top``, Wu et al.'s control), outside the top ``k`` (``all``), or outside
#: the top ``k`` within their layers (``same_layers``).
CONTROLS = ("non_top", "all", "same_layers")
#: True while :func:`greedy_answers` decodes (``resample`` cannot: its positions start at 0).
_DECODING: ContextVar[bool] = ContextVar("decoding", default=False)


def all_heads(model: Model) -> list[Head]:
    """Every ``(layer, head)`` of the model, layer by layer."""
    adapter = adapter_for(model)
    n_heads, _ = adapter.head_shape
    return [(layer, head) for layer in range(adapter.n_layers) for head in range(n_heads)]


def check_heads(model: Model, heads: Iterable[Head]) -> list[Head]:
    """The heads as ``(layer, head)`` tuples; :class:`WorkbenchError` for an empty set or heads
    out of range."""
    heads = [tuple(int(x) for x in h) for h in heads]
    if not heads:
        raise WorkbenchError("the set of heads to ablate is empty")
    adapter = adapter_for(model)
    valid = set(all_heads(adapter))
    bad = [h for h in heads if h not in valid]
    if bad:
        raise WorkbenchError(
            f"heads {bad} out of range: the model has {adapter.n_layers} layers of "
            f"{adapter.head_shape[0]} heads (layer and head count from 0)"
        )
    return heads


@torch.no_grad()
def head_outputs(model: Model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's ``z [batch, tokens, head, d_head]`` on ``ids [batch, tokens]``."""
    adapter = adapter_for(model)
    seen: dict[int, torch.Tensor] = {}
    remove = adapter.z_hooks(lambda layer, z: seen.__setitem__(layer, z.detach().clone()))
    try:
        adapter.logits(ids.to(adapter.device))
    finally:
        remove()
    return seen


@contextmanager
def ablate(
    model: Model, heads: Iterable[Head], method: str = "zero", reference: torch.Tensor | None = None, seed: int = 0
) -> Iterator[list[Head]]:
    """Within the block, ``heads`` are ablated with ``method`` in every forward pass (``uniform``:
    in every forward that extends a non-empty KV cache, i.e. decoding steps).
    ``reference [batch, tokens]``: token ids for ``mean`` and ``resample``."""
    adapter = adapter_for(model)
    heads = check_heads(adapter, heads)
    _check_method(method)
    if method in ("mean", "resample") and reference is None:
        raise WorkbenchError(f"{method} ablation needs reference token ids (reference=[batch, tokens])")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    if method == "uniform":
        with _uniform_attention(adapter, by_layer):
            yield heads
        return
    ref = head_outputs(adapter, reference) if method != "zero" else {}
    gen = torch.Generator().manual_seed(seed)

    def edit(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        chosen = by_layer.get(layer)
        if not chosen:
            return None
        z = z.clone()
        if method == "zero":
            z[:, :, chosen] = 0
        elif method == "mean":
            z[:, :, chosen] = ref[layer][:, :, chosen].mean((0, 1)).to(z.dtype)
        else:
            if _DECODING.get():
                raise WorkbenchError(
                    "resample ablation replaces z position by position from a full forward; decoding "
                    "(needle_accuracy) runs one position at a time: use zero, mean or uniform"
                )
            source = ref[layer]
            if source.shape[1] < z.shape[1]:
                raise WorkbenchError(
                    f"resample ablation: reference inputs of {source.shape[1]} tokens are shorter "
                    f"than the {z.shape[1]}-token input"
                )
            rows = torch.randint(0, source.shape[0], (z.shape[0],), generator=gen).to(source.device)
            z[:, :, chosen] = source[rows, : z.shape[1]][:, :, chosen].to(z.dtype)
        return z

    remove = adapter.z_hooks(edit)
    try:
        yield heads
    finally:
        remove()


@contextmanager
def _uniform_attention(adapter: ModelAdapter, by_layer: dict[int, list[int]]) -> Iterator[None]:
    """Wu et al.'s masking of the heads ``by_layer`` (layer -> heads) on a TransformerLens model:
    in a forward that extends a non-empty KV cache, each chosen head's ``z`` at every row becomes
    the mean of the values of the keys the row sees (its attention scores set to 0 before the
    softmax); other forwards (a prefill, a plain forward) are unchanged.

    A forward pre-hook on the model notes the KV cache it extends (``past_kv_cache``); the
    ``hook_z`` edit reads that layer's values from it (TransformerLens appends the forward's own
    keys and values before attending). Grouped-query heads read their key-value head's values; a
    local (sliding-window) layer averages the last ``window_size`` keys."""
    from workbench.adapters.transformer_lens import TransformerLensAdapter

    if not isinstance(adapter, TransformerLensAdapter):
        raise WorkbenchError(
            "uniform masking (Wu et al.) reads the masked heads' values from TransformerLens's KV cache: it is "
            f"implemented for TransformerLens models only, not for {type(adapter.model).__name__}; use "
            "--method zero or mean on this model"
        )
    model, cfg = adapter.model, adapter.model.cfg
    if cfg.attention_dir != "causal":
        raise WorkbenchError("uniform masking acts while decoding: it needs a causal language model")
    if getattr(cfg, "use_attention_sinks", False):
        raise WorkbenchError(
            "uniform masking of a model with learned attention sinks is not defined here (Wu et al. set the "
            "key scores to 0; the sink logit would still take its share): use --method zero or mean"
        )
    local = adapter.layer_windows
    windows = {layer: local.get(layer) for layer in by_layer}
    extending: list = [None]  # the KV cache the current forward extends, when it held keys before it

    def note(module, args, kwargs) -> None:
        cache = kwargs.get("past_kv_cache")
        extending[0] = cache if cache is not None and cache.entries[0].past_keys.shape[1] > 0 else None

    def done(module, args, output) -> None:
        extending[0] = None

    def edit(layer: int, z: torch.Tensor) -> torch.Tensor | None:  # z [B, n, H, D]
        chosen, cache = by_layer.get(layer), extending[0]
        if not chosen or cache is None:
            return None
        values = cache.entries[layer].past_values  # [B, keys so far (this forward's included), H_kv, D]
        group = z.shape[2] // values.shape[2]
        kv = [h // group for h in chosen]
        n, total = z.shape[1], values.shape[1]
        z = z.clone()
        for i in range(n):
            pos = total - n + i  # the row's own key
            first = 0 if windows[layer] is None else max(0, pos - windows[layer] + 1)
            mean = values[:, first : pos + 1, kv].float().mean(1)  # [B, chosen, D]
            z[:, i, chosen] = mean.to(z.dtype)
        return z

    handles = [
        model.register_forward_pre_hook(note, with_kwargs=True),
        model.register_forward_hook(done),
    ]
    remove = adapter.z_hooks(edit)
    try:
        yield
    finally:
        remove()
        for handle in handles:
            handle.remove()


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise WorkbenchError(f"unknown ablation method {method!r}; choose one of: {', '.join(METHODS)}")


# Metrics: functions of the model that return one number (higher or lower is better, as named).


def _groups(keys: Sequence, size: int) -> Iterator[list[int]]:
    """Indices of items with equal ``keys`` (so they stack into one batch), ``size`` at a time."""
    by_key: dict = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    for group in by_key.values():
        for i in range(0, len(group), size):
            yield group[i : i + size]


@torch.no_grad()
def _answer_logprobs(model: Model, samples: Sequence[TaskSample], batch_size: int) -> list[float]:
    """For each needle sample, the log-probability of its answer, teacher-forced."""
    adapter = adapter_for(model)
    device = adapter.device
    results = [0.0] * len(samples)
    for chunk in _groups([(len(s.ids), len(s.answer)) for s in samples], batch_size):
        batch = torch.stack([torch.cat([samples[i].ids, samples[i].answer[:-1]]) for i in chunk])
        logp = torch.log_softmax(adapter.logits(batch.to(device)).float(), -1)
        for row, i in zip(logp, chunk):
            steps = row[len(samples[i].ids) - 1 :]  # the rows that predict the answer tokens
            answer = samples[i].answer.to(device)
            results[i] = float(steps.gather(-1, answer.view(-1, 1)).sum())
    return results


@torch.no_grad()
def greedy_answers(
    model: Model, samples: Sequence[TaskSample], batch_size: int = 8, max_new_tokens: int | None = None
) -> list[list[int]]:
    """Each sample's greedy continuation, decoded as Wu et al. decode it: the prompt but its last
    token prefilled into a KV cache, then one decoding step at a time from the last prompt token
    (so the row that predicts the first answer token is a decoding step, which ``uniform``
    masking reaches), until a token whose text holds a newline, 50 tokens, or the model's context
    (:func:`~workbench.scoring.formulas.answer_budget`). ``max_new_tokens`` lowers the 50 (a
    shorter, cheaper budget: the answer is a prefix of the full one). Samples of equal length
    decode together, ``batch_size`` at a time."""
    from workbench.models import task_tokenizer

    adapter = adapter_for(model)
    tokenizer = task_tokenizer(adapter.model)
    results: list[list[int]] = [[] for _ in samples]
    if any(len(s.ids) < 2 for s in samples):
        raise WorkbenchError("greedy_answers needs prompts of at least 2 tokens")
    _check_max_new_tokens(max_new_tokens)
    token = _DECODING.set(True)
    try:
        for chunk in _groups([len(s.ids) for s in samples], batch_size):
            ids = torch.stack([samples[i].ids for i in chunk]).to(adapter.device)
            budget = answer_budget(ids.shape[1], adapter.context)
            if max_new_tokens is not None:
                budget = min(budget, max_new_tokens)
            _, cache = adapter.prefill(ids[:, :-1])
            step, done = ids[:, -1:], [False] * len(chunk)
            while not all(done):
                logits, cache = adapter.decode(step, cache)
                step = logits.argmax(-1, keepdim=True)  # [batch, 1]
                for row, (i, t) in enumerate(zip(chunk, step[:, 0].tolist())):
                    if not done[row]:
                        results[i].append(t)
                        done[row] = len(results[i]) >= budget or ends_answer(tokenizer, t)
            del cache
    finally:
        _DECODING.reset(token)
    return results


def needle_accuracy(samples: Sequence[TaskSample], batch_size: int = 8, max_new_tokens: int | None = None) -> Metric:
    """Share of needle samples whose answer greedy decoding retrieves: ROUGE-1 recall of the
    generated text (:func:`greedy_answers`, ``max_new_tokens`` its budget) against the answer
    above 0.5, the rule of Wu et al. and of the scoring runs' ``needle_accuracy``. For our
    one-word answers: the generated text holds the digits as a word."""
    _needles(samples)
    _check_max_new_tokens(max_new_tokens)

    def metric(model: Model) -> float:
        from workbench.models import task_tokenizer

        tokenizer = task_tokenizer(adapter_for(model).model)
        answers = greedy_answers(model, samples, batch_size, max_new_tokens)
        return sum(
            answer_retrieved(answer_text(tokenizer, got), answer_text(tokenizer, s.answer))
            for got, s in zip(answers, samples)
        ) / len(samples)

    return metric


def answer_logprob(samples: Sequence[TaskSample], batch_size: int = 8) -> Metric:
    """Mean log-probability of the needle's answer tokens (teacher-forced)."""
    _needles(samples)
    return lambda model: sum(_answer_logprobs(model, samples, batch_size)) / len(samples)


def _check_max_new_tokens(max_new_tokens: int | None) -> None:
    """``max_new_tokens``: None (the budget of 50) or an int of at least 1."""
    if max_new_tokens is not None and (
        not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1
    ):
        raise WorkbenchError(f"max_new_tokens must be an int of at least 1 (or None: 50), got {max_new_tokens!r}")


def _needles(samples: Sequence[TaskSample]) -> None:
    if not samples or any(s.answer is None for s in samples):
        raise WorkbenchError("needle metrics need needle samples (workbench.tasks.needle_samples)")


def text_loss(samples: Sequence[TaskSample], batch_size: int = 8) -> Metric:
    """Mean next-token cross-entropy (nats) over every position of the samples."""
    return lambda model: _next_token(model, samples, batch_size, lambda s: 0)[0]


def induction_accuracy(samples: Sequence[TaskSample], batch_size: int = 8) -> Metric:
    """Share of positions after the first copy of a repeats sample where the argmax next token
    is the right one (only induction can predict them)."""
    if not samples or any(s.period is None for s in samples):
        raise WorkbenchError("induction accuracy needs repeats samples (workbench.tasks.repeat_samples)")
    # row p predicts token p + 1: the rows from the one before the second copy on
    return lambda model: _next_token(model, samples, batch_size, lambda s: second_copy_start(s) - 1)[1]


@torch.no_grad()
def _next_token(model: Model, samples, batch_size: int, first: Callable[[TaskSample], int]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of next-token prediction on the rows from ``first(sample)``."""
    adapter = adapter_for(model)
    device = adapter.device
    loss, correct, count = 0.0, 0, 0
    for chunk in _groups([(len(s.ids), first(s)) for s in samples], batch_size):
        batch = torch.stack([samples[i].ids for i in chunk]).to(device)
        f = first(samples[chunk[0]])
        logits = adapter.logits(batch).float()[:, f:-1]
        target = batch[:, f + 1 :]
        loss += float(
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        )
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    return loss / count, correct / count


def logit_difference(ids: torch.Tensor, token_a: int, token_b: int) -> Metric:
    """Mean over ``ids [batch, tokens]`` of logit(a) - logit(b) at the last position."""

    def metric(model: Model) -> float:
        adapter = adapter_for(model)
        with torch.no_grad():
            last = adapter.logits(ids.to(adapter.device))[:, -1].float()
        return float((last[:, token_a] - last[:, token_b]).mean())

    return metric


# Experiments.


def scan_heads(
    model: Model, metric: Metric, method: str = "zero", reference: torch.Tensor | None = None, progress: bool = True
) -> pd.DataFrame:
    """Every head ablated alone: ``layer, head, value, baseline, delta`` (value - baseline).
    ``metric`` is called with ``model`` as given."""
    adapter = adapter_for(model)
    baseline = metric(model)
    rows = []
    for layer, head in tqdm(all_heads(adapter), desc="ablating heads", unit="head", disable=not progress):
        with ablate(adapter, [(layer, head)], method, reference):
            value = metric(model)
        rows.append((layer, head, value, baseline, value - baseline))
    return pd.DataFrame(rows, columns=["layer", "head", "value", "baseline", "delta"])


def cumulative(
    model: Model,
    metric: Metric,
    ranking: Sequence[Head],
    ks: Sequence[int],
    draws: int = 5,
    method: str = "zero",
    reference: torch.Tensor | None = None,
    seed: int = 0,
    control: str = "non_top",
    progress: bool = True,
) -> pd.DataFrame:
    """The masking experiment of Wu et al.: the top-``k`` heads of ``ranking`` ablated together,
    against ``draws`` sets of ``k`` random heads: from outside the top ``max(ks)`` heads of the
    ranking (``control="non_top"``: Wu et al. draw them outside their list of top heads, so no
    random set holds a top head of any k), from outside the top ``k`` (``"all"``), or from outside
    the top ``k`` in the layers the top ``k`` sit in (``"same_layers"``, which controls for depth:
    in a small model every early head may feed the later ones).
    Rows ``k, selection ("top" | "random" | "none"), draw, heads, value``; ``metric`` is
    called with ``model`` as given. Wu et al.'s experiment: ``method="uniform"`` with
    :func:`needle_accuracy`."""
    _check_control(control)
    adapter = adapter_for(model)
    ranking = check_heads(adapter, ranking)
    everyone = all_heads(adapter)
    bad = [k for k in ks if not 1 <= k <= len(ranking) or k > len(everyone) - k]
    if bad or not ks:
        raise WorkbenchError(
            f"k must lie in 1..{min(len(ranking), len(everyone) // 2)} (the ranking has "
            f"{len(ranking)} heads, the model {len(everyone)}), got {list(ks) or 'none'}"
        )
    rng = random.Random(seed)
    rows = [(0, "none", 0, "", metric(model))]
    jobs = [(k, "top", 0, list(ranking[:k])) for k in ks]
    for k in ks:
        layers = {layer for layer, _ in ranking[:k]} if control == "same_layers" else {layer for layer, _ in everyone}
        top = set(ranking[: max(ks)] if control == "non_top" else ranking[:k])
        others = [h for h in everyone if h not in top and h[0] in layers]
        if len(others) < k:
            where = f"the top {len(top)}" + (" in their layers" if control == "same_layers" else "")
            raise WorkbenchError(
                f"only {len(others)} heads outside {where}: too few to draw {k} random heads for the "
                f"{control} control; use another control or a smaller k"
            )
        jobs += [(k, "random", d, rng.sample(others, k)) for d in range(draws)]
    for k, selection, draw, heads in tqdm(jobs, desc="ablating head sets", unit="set", disable=not progress):
        with ablate(adapter, heads, method, reference, seed=seed):
            rows.append((k, selection, draw, " ".join(f"{l}.{h}" for l, h in heads), metric(model)))
    return pd.DataFrame(rows, columns=["k", "selection", "draw", "heads", "value"])


def _check_control(control: str) -> None:
    if control not in CONTROLS:
        raise WorkbenchError(f"control must be one of {', '.join(repr(c) for c in CONTROLS)}, got {control!r}")


def rank_heads(run: Run, score: str, task: str | None = None) -> list[Head]:
    """Heads of a run ordered by one score, highest first (NaN last); ``task`` picks the task
    when the score was computed on several."""
    table = run.table("head_scores")
    rows = table[table["score"] == score]
    if rows.empty:
        raise WorkbenchError(
            f"the run in {run.path} has no {score!r} score; it has: {', '.join(sorted(set(table['score'])))}"
        )
    tasks = sorted(set(rows["task"]))
    if task is None and len(tasks) > 1:
        raise WorkbenchError(f"{score} was scored on tasks {tasks}: choose one")
    rows = rows[rows["task"] == (task or tasks[0])]
    if rows.empty:
        raise WorkbenchError(f"{score} was not scored on task {task!r}; it was on: {', '.join(tasks)}")
    rows = rows.sort_values("value", ascending=False, na_position="last")
    return [(int(r.layer), int(r.head)) for r in rows.itertuples()]


# The masking experiment as one call (what `workbench ablate` runs).

#: Metric (the function of that name in this module) -> the task whose samples it needs.
METRICS = {
    "needle_accuracy": "niah",
    "answer_logprob": "niah",
    "induction_accuracy": "repeats",
    "text_loss": "text",
}
#: The metric a task is measured by when none is named.
DEFAULT_METRIC = {"niah": "needle_accuracy", "repeats": "induction_accuracy", "text": "text_loss"}
#: Metrics that decode (greedy generation with a KV cache): the ones uniform masking changes.
DECODING_METRICS = ("needle_accuracy",)
#: The ablation method a metric is measured with when none is named: Wu et al.'s uniform masking
#: for the needle accuracy, zero ablation for the metrics of one forward pass.
DEFAULT_METHOD = {metric: "uniform" if metric in DECODING_METRICS else "zero" for metric in METRICS}
#: Offset of the sample seed from the experiment's seed: fresh samples, not the ones the run's
#: scores came from.
FRESH_SAMPLES = 10_000


def check_length(model: Model, length: int) -> None:
    """Refuse samples longer than the model's context (the model would fail on them)."""
    context = adapter_for(model).context
    if context is not None and length > context:
        raise WorkbenchError(f"--length {length} is longer than the model's context of {context} tokens")


@dataclass(frozen=True)
class AblationSettings:
    """One masking experiment: the top-``k`` heads of a run's ``rank_by`` score ablated
    together with ``method``, against ``draws`` sets of ``k`` random heads (``control``, see
    :data:`CONTROLS`: by default from outside the top ``max(ks)`` heads, as Wu et al.), measured
    by ``metric`` on fresh ``task`` samples; ``scan`` also ablates every head alone.

    ``metric`` None: the task's :data:`DEFAULT_METRIC`. ``method`` None: the metric's
    :data:`DEFAULT_METHOD` (``uniform``, Wu et al.'s masking, for needle_accuracy, which decodes;
    ``zero`` for the others). ``length`` None: the run's shortest length. ``samples``: samples
    (niah: per depth of ``depths``). ``seed`` seeds the samples (offset by
    :data:`FRESH_SAMPLES`) and the random head sets. Refused at construction
    (:class:`WorkbenchError`): an unknown task, method or control, a metric of another task,
    resampling on niah (its reference inputs would be shorter), uniform masking with a metric
    that does not decode, repeats samples too short to repeat, fewer than one sample or draw.
    """

    rank_by: str = "retrieval"
    score_task: str | None = None
    ks: tuple[int, ...] = (1, 2, 4)
    task: str = "niah"
    metric: str | None = None
    method: str | None = None
    length: int | None = None
    samples: int = 8
    depths: tuple[float, ...] = (0.2, 0.5, 0.8)
    draws: int = 5
    control: str = "non_top"
    scan: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        if self.task not in DEFAULT_METRIC:
            raise WorkbenchError(f"unknown task {self.task!r}; choose from: {', '.join(DEFAULT_METRIC)}")
        metric = self.metric or DEFAULT_METRIC[self.task]
        if METRICS.get(metric) != self.task:
            valid = [m for m, t in METRICS.items() if t == self.task]
            raise WorkbenchError(f"metric {metric!r} does not fit task {self.task}; choose from: {', '.join(valid)}")
        object.__setattr__(self, "metric", metric)
        method = self.method or DEFAULT_METHOD[metric]
        _check_method(method)
        object.__setattr__(self, "method", method)
        if method == "uniform" and metric not in DECODING_METRICS:
            raise WorkbenchError(
                f"uniform masking acts on decoding steps only (Wu et al.); the metric {metric} does not decode: "
                f"use --metric {' or '.join(DECODING_METRICS)}, or another --method"
            )
        if self.method == "resample" and self.task == "niah":
            raise WorkbenchError(
                "resample ablation needs reference inputs as long as the measured ones: use it with "
                "--task repeats or text, or --method mean"
            )
        _check_control(self.control)
        if self.samples < 1 or self.draws < 1:
            raise WorkbenchError(f"samples and draws must be at least 1, got {self.samples} and {self.draws}")
        if self.length is not None and self.task == "repeats" and (self.length - 1) // 2 < 2:
            raise WorkbenchError(f"--length {self.length} is too short for repeats samples: give at least 5 tokens")

    @property
    def config(self) -> dict:
        """The columns every row of the experiment's tables carries (and its manifest entry)."""
        return {
            "rank_by": self.rank_by,
            "task": self.task,
            "metric": self.metric,
            "method": self.method,
            "length": self.length,
            "control": self.control,
        }

    @property
    def table_name(self) -> str:
        """The run table of the top-k against random experiment."""
        return f"ablation_{self.rank_by}_{self.metric}_{self.method}_{self.control}"

    @property
    def scan_name(self) -> str:
        """The run table of the single-head scan."""
        return f"scan_{self.metric}_{self.method}"

    def samples_for(self, tokenizer, text: str | None = None) -> list[TaskSample]:
        """The fresh samples the metric is measured on (``text``: the text source of the text
        task, as :func:`workbench.tasks.text_samples` takes it); needs ``length`` set."""
        from workbench.tasks import needle_samples, repeat_samples, text_samples

        if self.length is None:
            raise WorkbenchError("the ablation's sample length is not set")
        seed = self.seed + FRESH_SAMPLES
        if self.task == "niah":
            return needle_samples(tokenizer, [self.length], list(self.depths), self.samples, seed=seed)
        if self.task == "repeats":
            return repeat_samples(tokenizer, (self.length - 1) // 2, 2, self.samples, seed=seed)
        return text_samples(tokenizer, text, self.length, self.samples)


@dataclass
class AblationResult:
    """What :func:`run_ablation` wrote: the settings it ran with (``length`` resolved), the
    top-k table (:func:`cumulative`'s rows plus :attr:`AblationSettings.config`), the scan
    (or None), and the table's file."""

    settings: AblationSettings
    table: pd.DataFrame
    scan: pd.DataFrame | None
    path: Path


def run_ablation(
    run: Run | str | Path, model: Model, settings: AblationSettings, progress: bool = True
) -> AblationResult:
    """Wu et al.'s masking experiment on a run folder: rank the heads by the run's score,
    sample fresh inputs, ablate, and write the tables (:attr:`AblationSettings.table_name`,
    :attr:`~AblationSettings.scan_name`), their figures (``figures/``) and an entry in the
    manifest's ``ablations`` (replacing one of the same table) into the run."""
    from workbench.models import task_tokenizer
    from workbench.plots import ablation_curve, head_map, save_figures

    run = run if isinstance(run, Run) else Run.open(run)
    recorded = run.manifest["settings"]
    ranking = rank_heads(run, settings.rank_by, settings.score_task)
    adapter = adapter_for(model)
    if settings.length is None:
        settings = replace(settings, length=min(recorded["lengths"]))  # checked again
    check_length(adapter, settings.length)
    items = settings.samples_for(task_tokenizer(adapter.model), recorded.get("text"))
    measure = globals()[settings.metric](items)
    reference = torch.stack([s.ids for s in items]) if settings.method in ("mean", "resample") else None
    config = settings.config
    table = cumulative(
        adapter,
        measure,
        ranking,
        settings.ks,
        draws=settings.draws,
        method=settings.method,
        reference=reference,
        seed=settings.seed,
        control=settings.control,
        progress=progress,
    ).assign(**config)
    name, metric = settings.table_name, settings.metric
    run.write_table(name, table)
    figures = {name: ablation_curve(table, metric)}
    scanned = None
    if settings.scan:
        scanned = scan_heads(adapter, measure, settings.method, reference, progress=progress).assign(**config)
        run.write_table(settings.scan_name, scanned)
        figures[settings.scan_name] = head_map(
            scanned.assign(score=f"{metric} change when ablated alone", value=scanned["delta"], task=settings.task),
            f"{metric} change when ablated alone",
        )
    warnings = save_figures(figures, run.path / "figures")
    entries = [a for a in run.manifest.get("ablations", []) if a.get("table") != name]
    run.manifest["ablations"] = entries + [
        {
            **config,
            "k": list(settings.ks),
            "draws": settings.draws,
            "samples": len(items),
            "table": name,
            "figure_warnings": warnings,
        }
    ]
    run.save_manifest()
    return AblationResult(settings, table, scanned, run.path / f"{name}.parquet")
