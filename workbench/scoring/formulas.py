"""Head scores: one number per attention head for each role a head can play, computed from the
O(N) statistics of :func:`kernels.attention` (never from the attention matrix).

Every score is a ratio ``sum(total) / sum(count)`` of per-sample tallies, so samples of any
length combine, and an interrupted run resumes by adding the samples it had not done.
:data:`SCORES` holds each score's formula and the paper or tool it follows; ``docs/scores.md``
explains them at length. :data:`TRAINED_SCORES` holds the scores trained once per run instead
(DuoAttention's gates, :mod:`workbench.scoring.duo`).

Example:
    >>> spec = stats_spec(["sink", "induction"], ScoreSettings(), period=50, repeats=2)
    >>> with instrument(model, spec) as rec:
    ...     model(ids)
    >>> prefill_tallies(rec.layer(0), ["sink", "induction"], ScoreSettings(), spec, causal=True,
    ...                 period=50, repeats=2)["induction"]  # (total [head], count)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import AttentionStats, StatsSpec
from workbench.errors import WorkbenchError

#: The tasks of :mod:`workbench.tasks` that scores run on.
TASKS = ("niah", "repeats", "text")


@dataclass(frozen=True)
class Score:
    """A head score: ``name``, the ``tasks`` it is defined on, its ``formula`` and ``source``."""

    name: str
    tasks: tuple[str, ...]
    formula: str
    source: str


SCORES: dict[str, Score] = {
    s.name: s
    for s in (
        Score(
            "sink",
            TASKS,
            "mean over query rows of the attention mass on the first `sink_tokens` keys (with one sink "
            "token: the mean attention the first token receives over the queries that see it)",
            "Gu et al. 2025, When Attention Sink Emerges in Language Models (sink rate: the share of "
            "(sample, layer, head) whose first-token score exceeds 0.3)",
        ),
        Score(
            "learned_sink",
            TASKS,
            "mean over query rows of the probability of the head's learned sink logit, the attention "
            "that goes to no key (models with learned sinks only)",
            "OpenAI 2025, gpt-oss model card (learned attention sinks); Xiao et al. 2024 StreamingLLM",
        ),
        Score("entropy", TASKS, "mean over query rows of the row's entropy, in nats", "attention entropy"),
        Score(
            "entropy_norm",
            TASKS,
            "mean over rows that see at least 2 keys of entropy / log(keys seen): "
            "1 = uniform over the keys, 0 = all mass on one key",
            "attention entropy, length-normalised",
        ),
        Score(
            "streaming",
            TASKS,
            "mean over rows at positions >= sink_tokens + window - 1 of the mass on the first "
            "`sink_tokens` keys plus the last `window` keys (up to and including the query)",
            "Xiao et al. 2024 StreamingLLM; Xiao et al. 2025 DuoAttention (streaming vs retrieval heads)",
        ),
        Score(
            "distance",
            TASKS,
            "mean over query rows of the expected query - key distance, in tokens",
            "mean attention distance",
        ),
        Score(
            "previous_token",
            TASKS,
            "sum over query rows of the mass on the previous token / number of rows",
            "TransformerLens head_detector, previous_token_head, error_measure='mul'",
        ),
        Score(
            "duplicate_token",
            ("repeats",),
            "sum over query rows of the mass on earlier occurrences of the "
            "row's own token / number of rows (BOS row included)",
            "TransformerLens head_detector, duplicate_token_head, error_measure='mul'",
        ),
        Score(
            "induction",
            ("repeats",),
            "sum over query rows of the mass on the tokens that followed earlier "
            "occurrences of the row's token / number of rows (BOS row included; with R copies a perfect "
            "induction head scores about (R-1)/R)",
            "Olsson et al. 2022; TransformerLens head_detector, induction_head, error_measure='mul'",
        ),
        Score(
            "retrieval",
            ("niah",),
            "greedy decoding after the question until a newline token or 50 tokens; per generated token, "
            "+1/|answer| when the head's most-attended key (in the row that predicted the token) lies inside "
            "the needle's answer span and holds that token; averaged over the samples whose answer is "
            "retrieved (ROUGE-1 recall > 0.5), the others dropped",
            "Wu et al. 2025, Retrieval Head Mechanistically Explains Long-Context Factuality, and their "
            "retrieval_head_detection.py (a retrieval head scores > 0.1)",
        ),
    )
}


#: Scores that are trained once per run rather than tallied per sample: their numbers come from
#: their own part (``workbench.scoring.duo``), never from :func:`prefill_tallies`, and no run
#: computes them unless asked for (``--scores duo``). A run's tasks do not matter to them.
TRAINED_SCORES: dict[str, Score] = {
    "duo": Score(
        "duo",
        TASKS,
        "DuoAttention's gate alpha in [0, 1] of the head's KV head, trained with the model frozen so that heads "
        "outputting alpha * full + (1 - alpha) * streaming attention (the first `sink` and last `recent` keys) keep "
        "the final hidden states of needle samples' question and answer (MSE), plus 0.05 * mean |alpha|; higher = "
        "needs full attention (rows of task niah: the training data)",
        "Xiao et al. 2025, DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads, "
        "and their code (mit-han-lab/duo-attention, duo_attn/train.py)",
    ),
}


#: Gu et al.'s epsilon: a (sample, layer, head) whose first-token score exceeds it is a sink.
SINK_THRESHOLD = 0.3
#: Wu et al.: a head whose retrieval score exceeds it is a retrieval head.
RETRIEVAL_THRESHOLD = 0.1
#: Wu et al.: a sample counts (its answer is retrieved) when the ROUGE-1 recall of the generated
#: text against the answer exceeds it.
ROUGE_THRESHOLD = 0.5
#: Wu et al.: greedy decoding after the question stops after this many generated tokens (or at a
#: newline token, whichever comes first).
MAX_ANSWER_TOKENS = 50
#: The version of the score definitions above; run manifests record it (``score_definitions``).
#: 2: retrieval decodes to a newline or 50 tokens and counts samples by ROUGE-1 recall; the sink
#: rate counts (sample, layer, head) triples. 1 (runs without the entry): exactly ``len(answer)``
#: tokens decoded, samples counted when answered exactly, sink rate over per-head means.
SCORE_DEFINITIONS = 2


@dataclass(frozen=True)
class ScoreSettings:
    """``sink_tokens``: keys that count as the sink; ``window``: the recent-key window of the
    streaming score; ``sink_threshold``: first-token score above which a (sample, layer, head)
    is a sink (the model's sink rate is the share of such triples; Gu et al. use 0.3);
    ``retrieval_threshold``: retrieval score above which a head is a retrieval head (Wu et al.
    use 0.1)."""

    sink_tokens: int = 1
    window: int = 64
    sink_threshold: float = SINK_THRESHOLD
    retrieval_threshold: float = RETRIEVAL_THRESHOLD

    def __post_init__(self) -> None:
        if self.sink_tokens < 1 or self.window < 1:
            raise WorkbenchError(f"sink_tokens and window must be >= 1, got {self.sink_tokens} and {self.window}")
        if not 0.0 < self.sink_threshold < 1.0:
            raise WorkbenchError(f"sink_threshold must lie in (0, 1), got {self.sink_threshold}")
        if not 0.0 <= self.retrieval_threshold:
            raise WorkbenchError(f"retrieval_threshold must be >= 0, got {self.retrieval_threshold}")

    def definitions(self) -> dict:
        """What decides the model-level numbers, as run manifests record it."""
        return {
            "version": SCORE_DEFINITIONS,
            "sink_threshold": self.sink_threshold,
            "retrieval_threshold": self.retrieval_threshold,
            "rouge1_recall_threshold": ROUGE_THRESHOLD,
            "max_answer_tokens": MAX_ANSWER_TOKENS,
        }


def scores_for(tasks: Sequence[str], learned_sinks: bool = False) -> list[str]:
    """Every score defined on at least one of ``tasks``, in :data:`SCORES` order; ``learned_sink``
    only for a model with learned sinks (``learned_sinks=True``)."""
    return [
        name for name, s in SCORES.items() if set(s.tasks) & set(tasks) and (learned_sinks or name != "learned_sink")
    ]


def check_request(tasks: Sequence[str], scores: Sequence[str]) -> None:
    """Raise :class:`WorkbenchError` naming the valid choices for unknown or unusable names."""
    bad_tasks = [t for t in tasks if t not in TASKS]
    if bad_tasks or not tasks:
        raise WorkbenchError(f"unknown task(s) {bad_tasks or '(none)'}; choose from: {', '.join(TASKS)}")
    known = {**SCORES, **TRAINED_SCORES}
    unknown = [s for s in scores if s not in known]
    if unknown or not scores:
        raise WorkbenchError(f"unknown score(s) {unknown or '(none)'}; choose from: {', '.join(known)}")
    orphans = [s for s in scores if not set(known[s].tasks) & set(tasks)]
    if orphans:
        need = "; ".join(f"{s} needs --task {'|'.join(known[s].tasks)}" for s in orphans)
        raise WorkbenchError(f"no chosen task defines {', '.join(orphans)} ({need})")


def stats_spec(
    scores: Sequence[str], settings: ScoreSettings, period: int | None = None, repeats: int = 2
) -> StatsSpec:
    """The kernel statistics that ``scores`` need (plus entropy, sink and local mass, which the
    position profiles always use). ``period`` and ``repeats`` describe a repeats sample."""
    offsets = _offsets(scores, period, repeats)
    return StatsSpec(
        entropy=True,
        argmax="retrieval" in scores,
        sink_tokens=settings.sink_tokens,
        window=settings.window,
        distance="distance" in scores,
        offsets=tuple(offsets),
        learned_sink=True,  # 0 without learned sinks; the detector scores divide by the keys' share
    )


def _offsets(scores: Sequence[str], period: int | None, repeats: int) -> list[int]:
    wanted = [1] if "previous_token" in scores else []
    if period is not None:
        for k in range(1, repeats):
            wanted += ([k * period - 1] if "induction" in scores else []) + (
                [k * period] if "duplicate_token" in scores else []
            )
    return list(dict.fromkeys(wanted))


Tally = tuple[torch.Tensor, float | torch.Tensor]  # (total [head] float64, count or count [head])


def prefill_tallies(
    st: AttentionStats,
    scores: Sequence[str],
    settings: ScoreSettings,
    spec: StatsSpec,
    causal: bool,
    period: int | None = None,
    repeats: int = 2,
    *,
    start: int = 0,
    length: int | None = None,
) -> dict[str, Tally]:
    """Per-head ``(total, count)`` of every row score in ``scores`` (all but retrieval) from one
    prefill's statistics ``[batch, head, position]`` of one layer, every position a real token.

    For repeats samples the last ``repeats * period`` tokens are the copies (anything before,
    such as BOS, is a prefix); rows of copy ``r`` look for targets in copies ``0 .. r-1``.

    One chunk of a chunked prefill: ``start`` is the position of its first row and ``length``
    the whole sequence's (default: ``start`` plus the rows given); the tallies of the chunks add
    up to those of the whole prefill.
    """
    b, _, n = st.entropy.shape
    pos = start + torch.arange(n, device=st.entropy.device)
    length = start + n if length is None else length
    rows = float(b * n)
    if st.learned_sink_mass is not None:  # TransformerLens's detectors divide by the pattern's sum
        rows = (1 - st.learned_sink_mass.double()).sum((0, 2))  # [head]: the keys' share of the rows
    out: dict[str, Tally] = {}

    def over(values: torch.Tensor, keep: torch.Tensor | None = None) -> Tally:  # values [B, H, N]
        if keep is not None:
            values = values[..., keep]
        return values.double().sum((0, 2)), float(b * values.shape[-1])

    if "sink" in scores:
        out["sink"] = over(st.sink_mass)
    if "learned_sink" in scores:
        out["learned_sink"] = over(st.learned_sink_mass)
    if "entropy" in scores:
        out["entropy"] = over(st.entropy)
    if "entropy_norm" in scores:
        keys = (pos + 1) if causal else torch.full_like(pos, length)
        two = keys >= 2
        out["entropy_norm"] = over(st.entropy[..., two] / torch.log(keys[two].double()))
    if "streaming" in scores:  # rows where the sink and the window do not overlap
        out["streaming"] = over(st.sink_mass + st.local_mass, pos >= settings.sink_tokens + settings.window - 1)
    if "distance" in scores:
        out["distance"] = over(st.distance)
    if "previous_token" in scores:
        out["previous_token"] = (st.offset_mass[..., spec.offsets.index(1)].double().sum((0, 2)), rows)
    for name, shift in (("induction", -1), ("duplicate_token", 0)):
        if name not in scores or period is None:
            continue
        copy = (pos - (length - repeats * period)).div(period, rounding_mode="floor")  # -1 for the prefix
        total = torch.zeros(st.entropy.shape[1], dtype=torch.float64, device=pos.device)
        for k in range(1, repeats):
            mass = st.offset_mass[..., spec.offsets.index(k * period + shift)]
            total += mass[..., copy >= k].double().sum((0, 2))
        out[name] = (total, rows)
    return out


def retrieval_hits(keys: torch.Tensor, ids: torch.Tensor, span: range, generated: Sequence[int]) -> torch.Tensor:
    """Per head ``[layer, head]``: the generated tokens whose row's most-attended key lies inside
    ``span`` (the needle's answer) and holds the token generated (Wu et al.'s hit; the score adds
    ``1 / len(span)`` per hit).

    ``keys [step, layer, head]``: argmax key of the row that predicted each generated token (step
    0: the prompt's last row); ``ids [tokens]``: the prompt followed by the generated tokens (keys
    index into it); ``generated``: the generated tokens, one per step.
    """
    inside = (keys >= span.start) & (keys < span.stop)
    held = ids.to(keys.device)[keys.clamp(0, len(ids) - 1)]
    target = torch.as_tensor(list(generated), device=keys.device).view(-1, 1, 1)
    return (inside & (held == target)).sum(0).double()


def share_above(values: torch.Tensor, threshold: float) -> float:
    """Share of the non-NaN ``values`` (any shape) that exceed ``threshold``; NaN when none.

    The sink rate (Gu et al.): ``values`` = first-token scores, one per (sample, layer, head),
    threshold 0.3. The retrieval-head rate (Wu et al.): ``values`` = retrieval scores, one per
    head, threshold 0.1."""
    finite = values[~torch.isnan(values)]
    return float((finite > threshold).double().mean()) if finite.numel() else math.nan


def sink_rate(sink: torch.Tensor, threshold: float = SINK_THRESHOLD) -> float:
    """Gu et al.'s sink rate: the share of ``sink`` values (first-token scores, one per
    (sample, layer, head)) that exceed ``threshold``."""
    return share_above(sink, threshold)


_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's words: lower-cased, every run of characters other than ``a-z0-9`` a separator.
    This is rouge_score's tokenisation without its optional stemmer (``use_stemmer=False``, its
    default); Wu et al. stem (Porter, words longer than 3 letters), which leaves digit strings
    unchanged."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def rouge1_recall(generated: str, reference: str) -> float:
    """ROUGE-1 recall: the reference's words that the generated text holds (each word counted at
    most as often as the generated text has it) / the reference's words; 0 for an empty
    reference, as rouge_score gives."""
    want, got = Counter(rouge_tokens(reference)), Counter(rouge_tokens(generated))
    total = sum(want.values())
    return sum(min(n, got[w]) for w, n in want.items()) / total if total else 0.0


def answer_retrieved(generated: str, answer: str) -> bool:
    """Wu et al.'s success rule: ROUGE-1 recall of the generated text against the answer above
    :data:`ROUGE_THRESHOLD`. For a one-word answer (our needle's digits) it means the generated
    text holds the answer as a whole word."""
    return rouge1_recall(generated, answer) > ROUGE_THRESHOLD


def answer_budget(prompt_tokens: int, context: int | None) -> int:
    """How many tokens greedy decoding may generate after a prompt: :data:`MAX_ANSWER_TOKENS`,
    or fewer where the model's ``context`` ends (the row predicting a token must lie inside it:
    ``context - prompt_tokens + 1``). Needle samples leave room for the answer, so this is at
    least ``len(answer) + 1`` on them."""
    if context is None:
        return MAX_ANSWER_TOKENS
    return max(1, min(MAX_ANSWER_TOKENS, context - prompt_tokens + 1))


def ends_answer(tokenizer, token: int) -> bool:
    """Whether decoding stops after ``token``: its text holds a newline (Wu et al. stop at the
    newline token; this also covers tokens such as ``"\\n\\n"`` or ``".\\n"``)."""
    return "\n" in tokenizer.decode([int(token)])


def answer_text(tokenizer, tokens: Sequence[int]) -> str:
    """The text of generated tokens as Wu et al. score it: special tokens skipped, stripped."""
    return tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True).strip()
