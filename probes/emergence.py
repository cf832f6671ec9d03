"""Head roles over training: a zoo model's checkpoints scored with the normal pipeline.

Gu et al. (2025, "When Attention Sink Emerges in Language Models", Fig. 4) plot the sink rate
against training steps: none at first, then emergence once the model has seen enough data.
:func:`sink_rate_over_training` draws the same curve for a zoo model from its initial weights
(rebuilt from the recipe's seed), its kept checkpoints and its final weights.

Example:
    >>> table = sink_rate_over_training("zoo-long", lengths=(512,), samples=4)
    >>> sink_emergence(table).show()
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from workbench.errors import WorkbenchError
from workbench.scoring import ScoreRunSettings, score_model
from workbench.zoo import WEIGHTS_DIR, ZOO, ZooSpec, build, load
from workbench.zoo.train import checkpoint_steps


def tokens_seen(spec: ZooSpec, step: int) -> int:
    """Training tokens (samples x length, the loss mask aside) in the first ``step`` steps."""
    tokens, left = 0, step
    for stage in spec.stages:
        done = min(left, stage.steps)
        tokens += done * stage.batch * stage.seq_len
        left -= done
    return tokens


def sink_rate_over_training(
    name: str,
    lengths: Sequence[int] = (512,),
    samples: int = 4,
    weights_dir: Path = WEIGHTS_DIR,
    out: Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per training point of zoo model ``name`` (step 0, each checkpoint, the end):
    ``step``, ``tokens``, ``sink_rate`` (Gu et al.'s, on text samples of ``lengths``) and
    ``max_sink`` (the largest per-head sink score). Each point is a scoring run in ``out``
    (a temporary folder by default)."""
    if name not in ZOO:
        raise WorkbenchError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO)}")
    spec = ZOO[name]
    final = load(name, weights_dir)  # first: refuses a model without weights, naming the command that trains it
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"workbench-{name}-emergence-"))
    points = [0, *checkpoint_steps(name, weights_dir), spec.steps]
    settings = ScoreRunSettings(model=name, tasks=("text",), scores=("sink",), lengths=tuple(lengths), samples=samples)
    rows = []
    for step in tqdm(points, desc=f"{name} checkpoints", disable=not progress):
        if step == 0:
            model = build(spec).eval()
        else:
            model = final if step == spec.steps else load(name, weights_dir, step=step)
        run = score_model(model, settings, out / f"step-{step}", progress=False)
        sinks = run.table("head_scores").query("score == 'sink'")["value"]
        rows.append(
            {
                "step": step,
                "tokens": tokens_seen(spec, step),
                "sink_rate": run.manifest["summary"]["sink_rate[text]"],
                "max_sink": float(sinks.max()),
            }
        )
    return pd.DataFrame(rows)
