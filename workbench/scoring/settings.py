"""What decides a scoring run's numbers: :class:`ScoreRunSettings`, the defaults a model gets,
and the refusal of settings a model cannot run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from kernels import BACKENDS
from workbench.adapters import ModelAdapter, adapter_for
from workbench.errors import WorkbenchError
from workbench.scoring.duo import DuoSettings
from workbench.scoring.formulas import TASKS, ScoreSettings, check_request, scores_for

#: Sample lengths when none are given (those that fit the model's context).
DEFAULT_LENGTHS = (512, 1024, 2048)


@dataclass(frozen=True)
class ScoreRunSettings:
    """Everything that decides a run's numbers (the run folder's identity).

    ``lengths``: tokens per sample (for repeats: BOS plus ``repeats`` copies of
    ``(length - 1) // repeats`` tokens). ``samples``: samples per length (niah: per length and
    depth). ``text``: a file, a folder or ``hf:DATASET[:CONFIG]`` for the text task and the
    needle haystack (built-in docstrings when None). ``prefill_chunk``: prefill each sample this
    many tokens at a time against a growing KV cache (activation memory bounded by the chunk;
    the same numbers up to float rounding); None: in one forward pass. Left out of
    :meth:`to_dict` when None, so runs made before it existed keep their identity. ``duo``: how
    the ``duo`` score's gates are trained (:class:`~workbench.scoring.duo.DuoSettings`; the
    defaults when ``duo`` is scored, None otherwise; left out of :meth:`to_dict` when None).
    """

    model: str
    tasks: tuple[str, ...] = TASKS
    scores: tuple[str, ...] = ()
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    samples: int = 4
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    repeats: int = 2
    text: str | None = None
    sink_tokens: int = 1
    window: int = 64
    seed: int = 0
    dtype: str | None = None
    backend: str = "auto"
    prefill_chunk: int | None = None
    duo: DuoSettings | None = None

    def __post_init__(self) -> None:
        for name in ("tasks", "scores", "lengths", "depths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.scores:
            object.__setattr__(self, "scores", tuple(scores_for(self.tasks)))
        check_request(self.tasks, self.scores)
        if not self.lengths or any(n < 8 for n in self.lengths):
            raise WorkbenchError(f"lengths must be at least 8 tokens each, got {list(self.lengths)}")
        if self.samples < 1 or self.repeats < 2:
            raise WorkbenchError(f"samples must be >= 1 and repeats >= 2, got {self.samples} and {self.repeats}")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise WorkbenchError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise WorkbenchError(f"unknown kernel backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        ScoreSettings(self.sink_tokens, self.window)  # raises on a bad sink_tokens or window
        if self.prefill_chunk is not None and (
            isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1
        ):
            raise WorkbenchError(
                f"prefill_chunk must be an int >= 1 (tokens per chunk) or None, got {self.prefill_chunk!r}"
            )
        if isinstance(self.duo, dict):  # from a manifest
            object.__setattr__(self, "duo", DuoSettings.from_dict(self.duo))
        if "duo" in self.scores and self.duo is None:
            object.__setattr__(self, "duo", DuoSettings())
        if self.duo is not None and "duo" not in self.scores:
            raise WorkbenchError("duo settings were given but duo is not among the scores: add duo to --scores")
        if self.duo is not None and not isinstance(self.duo, DuoSettings):
            raise WorkbenchError(f"duo takes a workbench.scoring.duo.DuoSettings, got {type(self.duo).__name__}")

    @property
    def score_settings(self) -> ScoreSettings:
        return ScoreSettings(self.sink_tokens, self.window)

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if d["prefill_chunk"] is None:  # the identity of runs made before the option existed
            del d["prefill_chunk"]
        if self.duo is None:  # likewise
            del d["duo"]
        else:
            d["duo"] = self.duo.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ScoreRunSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def defaults_for(model: torch.nn.Module | ModelAdapter, tasks) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The lengths and scores a run of ``model`` uses when none are given: the default lengths
    that fit its context (else the context itself), and every score the tasks define that the
    model can compute (retrieval needs a causal language model, learned_sink learned sinks)."""
    adapter = adapter_for(model)
    context = adapter.context
    lengths = tuple(n for n in DEFAULT_LENGTHS if context is None or n <= context) or (int(context),)
    generates = adapter.can_generate
    return lengths, tuple(s for s in scores_for(tasks, adapter.learned_sinks) if generates or s != "retrieval")


def check_model(
    model: torch.nn.Module | ModelAdapter, settings: ScoreRunSettings, *, context_parallel: int = 1
) -> None:
    """Refuse settings this model cannot run: lengths beyond its context, retrieval or a prefill
    chunk without a language-model head or causal attention; with ``context_parallel`` ranks
    per sample, lengths too short to split over them (2 chunks per rank) and a prefill chunk."""
    adapter = adapter_for(model)
    if context_parallel > 1:
        short = [n for n in settings.lengths if n < 2 * context_parallel]
        if short:
            raise WorkbenchError(
                f"lengths {short} are too short to split over {context_parallel} context-parallel ranks "
                f"(2 chunks per rank): use lengths of at least {2 * context_parallel} tokens"
            )
        if settings.prefill_chunk is not None:
            raise WorkbenchError(
                "context parallelism and a prefill chunk do not combine yet: the shards already bound each "
                "rank's memory; leave out --prefill-chunk"
            )
    context = adapter.context
    too_long = [n for n in settings.lengths if context is not None and n > context]
    if too_long:
        raise WorkbenchError(f"lengths {too_long} exceed the model's context of {context} tokens")
    if settings.prefill_chunk is not None and not adapter.can_generate:
        raise WorkbenchError(
            f"a prefill chunk needs a causal language model with a KV cache (this one is a "
            f"{type(adapter.model).__name__}): leave out --prefill-chunk"
        )
    if "learned_sink" in settings.scores and not adapter.learned_sinks:
        raise WorkbenchError(
            "the learned_sink score reads a model's learned sink logits (gpt-oss); this model has none: "
            "leave learned_sink out of --scores (its first-token sink is the sink score)"
        )
    if "duo" in settings.scores:
        from workbench.scoring import duo

        duo.check_model(adapter.model, settings.duo)
    if "retrieval" in settings.scores and not adapter.can_generate:
        raise WorkbenchError(
            "the retrieval score decodes the needle's answer: it needs a causal language model "
            f"(this one is a {type(adapter.model).__name__}); leave retrieval out of --scores"
        )
