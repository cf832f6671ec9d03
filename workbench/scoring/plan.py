"""A run's samples: :func:`plan` lists every :class:`Unit` (one sample, one part file) in a fixed
order, the same on every resume."""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.errors import WorkbenchError
from workbench.scoring.settings import ScoreRunSettings
from workbench.tasks import (
    TaskSample,
    needle_samples,
    read_text,
    repeat_samples,
    start_tokens,
    text_samples,
)


@dataclass(frozen=True)
class Unit:
    """One sample of a run; ``key`` names its part file."""

    key: str
    task: str
    length: int
    index: int
    sample: TaskSample = field(repr=False)


def plan(settings: ScoreRunSettings, tokenizer) -> list[Unit]:
    """Every sample of the run, in a fixed order (the same on every resume)."""
    units = []
    text = read_text(settings.text) if settings.text is not None else None
    for task in settings.tasks:
        for length in settings.lengths:
            if task == "niah":
                samples = needle_samples(
                    tokenizer,
                    [length],
                    list(settings.depths),
                    settings.samples,
                    haystack=text,
                    seed=settings.seed + length,
                )
                keys = [f"niah-{length}-d{s.depth:.2f}-{i % settings.samples:03d}" for i, s in enumerate(samples)]
            elif task == "repeats":
                period = (length - len(start_tokens(tokenizer))) // settings.repeats
                samples = repeat_samples(
                    tokenizer, period, settings.repeats, settings.samples, seed=settings.seed + length
                )
                keys = [f"repeats-{length}-{i:03d}" for i in range(len(samples))]
            else:
                samples = text_samples(tokenizer, settings.text, length, settings.samples)
                if len(samples) < settings.samples:
                    raise WorkbenchError(
                        f"the text holds only {len(samples)} samples of {length} tokens; "
                        f"lower --samples or give more text with --text"
                    )
                keys = [f"text-{length}-{i:03d}" for i in range(len(samples))]
            units += [Unit(k, task, length, i, s) for i, (k, s) in enumerate(zip(keys, samples))]
    return units
