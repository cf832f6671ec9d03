"""One sample through an instrumented model, reduced at once to score tallies and position
profiles: :func:`score_sample`."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import replace

import pandas as pd
import torch
import torch.distributed as dist

from kernels import AttentionStats
from workbench.adapters import ModelAdapter, adapter_for
from workbench.chunked import chunked_prefill
from workbench.context_parallel import ContextParallel
from workbench.errors import WorkbenchError
from workbench.instrument import instrument
from workbench.models import task_tokenizer
from workbench.recording import StreamingSummary
from workbench.scoring.formulas import (
    SCORES,
    ScoreSettings,
    Tally,
    answer_budget,
    answer_retrieved,
    answer_text,
    ends_answer,
    prefill_tallies,
    retrieval_hits,
    stats_spec,
)
from workbench.scoring.plan import Unit
from workbench.scoring.settings import ScoreRunSettings
from workbench.tasks import TaskSample, answer_span

#: Statistics kept per position bucket (the profiles).
PROFILE_STATISTICS = ("entropy", "sink_mass", "local_mass")
#: Position buckets per profile (bucket size = length / this, rounded up).
PROFILE_BUCKETS = 64


class SampleCollector:
    """Takes each layer's statistics as the forward pass produces them (``instrument(into=)``)
    and reduces them at once into score tallies, position profiles and, for retrieval, the
    most-attended key of the last row; nothing of size O(tokens) outlives its layer.

    A chunked prefill calls each layer once per chunk, in order: a call's rows start where the
    layer's previous call ended, and its tallies add to the earlier chunks'."""

    def __init__(
        self,
        n_layers: int,
        scores,
        settings: ScoreSettings,
        spec,
        causal: bool,
        sample: TaskSample,
        repeats: int,
        bucket_size: int,
    ):
        self.scores, self.settings, self.spec, self.causal = scores, settings, spec, causal
        self.period, self.repeats, self.length = sample.period, repeats, len(sample.ids)
        self.tallies: dict[tuple[str, int], Tally] = {}
        self.profile = StreamingSummary(spec, n_layers, bucket_size, statistics=PROFILE_STATISTICS)
        self.last_keys: list[list[torch.Tensor]] = []  # per forward call, per layer: [head]
        self.decoding = False
        self.rows_done: dict[int, int] = {}  # per layer: prefill rows already added

    def add(self, layer: int, st: AttentionStats) -> None:
        if not self.decoding:
            start = self.rows_done.get(layer, 0)
            self.rows_done[layer] = start + st.lse.shape[2]
            for name, (total, count) in prefill_tallies(
                st,
                self.scores,
                self.settings,
                self.spec,
                self.causal,
                self.period,
                self.repeats,
                start=start,
                length=self.length,
            ).items():
                old = self.tallies.get((name, layer))
                self.tallies[(name, layer)] = (total, count) if old is None else (old[0] + total, old[1] + count)
            self.profile.add(layer, st, start=start)
        if st.argmax is not None:
            if layer == 0:
                if not self.decoding and self.last_keys:  # a later prefill chunk: its last row predicts
                    self.last_keys.pop()
                self.last_keys.append([])
            self.last_keys[-1].append(st.argmax[0, :, -1])


@torch.no_grad()
def score_sample(
    model: torch.nn.Module | ModelAdapter,
    unit: Unit,
    settings: ScoreRunSettings,
    *,
    materialised: bool = False,
    context_parallel: dist.ProcessGroup | bool | None = None,
) -> pd.DataFrame:
    """One sample's tallies: rows ``name, layer, head, bucket, total, count`` (``bucket`` -1 for
    scores, the bucket's first position for profiles; ``layer`` -1 for per-sample measures:
    ``needle_accuracy``, ``answer_tokens`` (tokens decoded), ``seconds``). A score's row of one
    layer and head is that sample's own value ``total / count`` (the sink rate counts them).

    The retrieval score (Wu et al.) decodes greedily after the prompt until a token holding a
    newline, :data:`~workbench.scoring.formulas.MAX_ANSWER_TOKENS` tokens or the model's context;
    a head's row is ``hits / len(answer)`` with count 1 when the generated text retrieves the
    answer (ROUGE-1 recall > 0.5), total and count 0 when not (the sample is dropped); the
    ``needle_accuracy`` row is 1 or 0 by the same rule.

    ``materialised=True`` (Hugging Face models; a baseline for benchmarks and checks) computes
    the same tallies from the explicit ``[head, query, key]`` pattern of eager attention, one
    layer at a time, instead of from the kernel statistics.

    With ``settings.prefill_chunk``, the sample is prefilled that many tokens at a time
    (:func:`workbench.chunked.chunked_prefill`); the retrieval score then decodes the answer
    from the chunked prefill's cache.

    ``context_parallel`` (``True``: the default process group, or a group; every rank of it
    makes this call) spreads the sample's tokens over the group's ranks
    (:class:`~workbench.context_parallel.ContextParallel`): each rank runs its shard, the
    statistics are gathered into position order on every rank, and the retrieval score decodes
    against the KV cache split over the ranks, each token taken from the group's rank 0 (which
    holds the last position). Every rank returns the same tallies, within float rounding of a
    single process's."""
    start = time.perf_counter()
    adapter = adapter_for(model)
    scores = [s for s in settings.scores if s in SCORES and unit.task in SCORES[s].tasks]  # not trained ones
    sample, causal = unit.sample, adapter.is_causal
    spec = stats_spec(scores, settings.score_settings, sample.period, settings.repeats)
    device = adapter.device
    n_layers = adapter.n_layers
    collector = SampleCollector(
        n_layers,
        scores,
        settings.score_settings,
        spec,
        causal,
        sample,
        settings.repeats,
        bucket_size=math.ceil(len(sample.ids) / PROFILE_BUCKETS),
    )
    ids = sample.ids.to(device).unsqueeze(0)
    cp = None
    if context_parallel not in (None, False):
        cp = ContextParallel(ids.shape[1], None if context_parallel is True else context_parallel)
        ids = cp.shard(ids)
    rows: list[tuple[str, int, int, int, float, float]] = []
    with (
        _eager_patterns(adapter, spec, collector)
        if materialised
        else instrument(adapter, spec, backend=settings.backend, into=collector, context_parallel=cp)
    ):
        chunk = settings.prefill_chunk

        def next_token(logits: torch.Tensor) -> int:  # greedy; under context parallelism, rank 0's
            token = logits[0].argmax()
            return int(token if cp is None else cp.from_last_position(token))

        if "retrieval" in scores:  # greedy decoding, as Wu et al.: to a newline token or 50 tokens
            tokenizer = task_tokenizer(adapter.model)
            budget = answer_budget(len(sample.ids), adapter.context)
            logits, cache = adapter.prefill(ids) if chunk is None else chunked_prefill(adapter, ids, chunk)
            generated = [next_token(logits)]
            collector.decoding = True
            while len(generated) < budget and not ends_answer(tokenizer, generated[-1]):
                logits, cache = adapter.decode(torch.tensor([[generated[-1]]], device=device), cache)
                generated.append(next_token(logits))
            del cache
        elif chunk is not None:
            _, cache = chunked_prefill(adapter, ids, chunk)
            del cache
        else:
            adapter.run(ids, None)
    for (name, layer), (total, count) in collector.tallies.items():
        counts = count.tolist() if isinstance(count, torch.Tensor) else [count] * len(total)  # per head, or one
        rows += [(name, layer, h, -1, float(t), float(c)) for h, (t, c) in enumerate(zip(total.tolist(), counts))]
    if "retrieval" in scores:
        # the sample counts when its answer is retrieved; the others are dropped (count 0), not scored 0
        retrieved = answer_retrieved(answer_text(tokenizer, generated), answer_text(tokenizer, sample.answer))
        keys = torch.stack([torch.stack(step) for step in collector.last_keys])  # [step, layer, head]
        full = torch.cat([sample.ids, torch.tensor(generated[:-1], dtype=torch.long)])
        span = answer_span(sample)
        score = retrieval_hits(keys, full, span, generated) / len(span)
        rows += [
            ("retrieval", layer, h, -1, float(score[layer, h]) * retrieved, float(retrieved))
            for layer in range(n_layers)
            for h in range(score.shape[1])
        ]
        rows.append(("needle_accuracy", -1, -1, -1, float(retrieved), 1.0))
        rows.append(("answer_tokens", -1, -1, -1, float(len(generated)), 1.0))
    profile = collector.profile.to_frame()
    profile = profile[profile["rows"] > 0]
    frame = pd.DataFrame(rows, columns=["name", "layer", "head", "bucket", "total", "count"])
    frame = pd.concat(
        [
            frame,
            pd.DataFrame(
                {
                    "name": profile["statistic"],
                    "layer": profile["layer"],
                    "head": profile["head"],
                    "bucket": profile["bucket_start"],
                    "total": profile["mean"] * profile["rows"],
                    "count": profile["rows"],
                }
            ),
            pd.DataFrame([("seconds", -1, -1, -1, time.perf_counter() - start, 1.0)], columns=frame.columns),
        ],
        ignore_index=True,
    )
    frame.insert(0, "sample", unit.index)
    frame.insert(0, "depth", sample.depth if sample.depth is not None else math.nan)
    frame.insert(0, "length", unit.length)
    frame.insert(0, "task", unit.task)
    return frame.astype({"layer": "int32", "head": "int32", "bucket": "int64"})


@contextmanager
def _eager_patterns(adapter: ModelAdapter, spec, collector: SampleCollector):
    """Within the block, a Hugging Face model runs eager attention and every layer's pattern
    goes through :func:`kernels.pattern_stats` into ``collector`` (then is dropped)."""
    from kernels import pattern_stats
    from workbench.adapters import hugging_face

    if not isinstance(adapter, hugging_face.HuggingFaceAdapter):
        raise WorkbenchError("materialised scoring is for Hugging Face models")
    model = adapter.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    # rows of an eager pattern sum to 1 within rounding, or to 1 - the learned sink's share
    spec = replace(spec, learned_sink=adapter.learned_sinks)

    def hook(layer):
        return lambda module, args, output: collector.add(layer, pattern_stats(output[1].float(), spec))

    handles = [m.register_forward_hook(hook(layer)) for layer, m in hugging_face.attention_modules(model)]
    try:
        yield collector
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)
