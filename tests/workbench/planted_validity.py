"""The planted validity suite at any length and backend, for the GPU and long contexts (the CI
test, tests/workbench/test_planted.py, runs 256 and 1024 tokens on the CPU). It scores the
planted model with ``score_model`` and prints the problems :func:`role_problems` finds (none
when every score ranks its planted head first with the value the construction implies).

    PYTHONPATH=. KERNELS_BLOCKS=64x64 python -m tests.workbench.planted_validity triton 8192 32768

Results: docs/planted.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import SEED
from tests.workbench.test_planted import expected, role_problems
from workbench.scoring import ScoreRunSettings, score_model
from workbench.scoring.tables import sink_values
from workbench.zoo.planted import planted


def score(model, settings: ScoreRunSettings, out: Path) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """As the test's ``score``, with a progress bar (figures left out)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("workbench.plots.save_figures", lambda figures, folder: [])
        run = score_model(model, settings, out, progress=True)
    return run.table("head_scores"), run.manifest["summary"], sink_values(run.read_parts())


def main(backend: str, lengths: list[int]) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    model = planted(context=max(lengths), seed=SEED % 1000).to(device)
    print(f"planted(context={max(lengths)}) on {device}: {time.time() - start:.1f} s", flush=True)
    rows = []
    for n in lengths:
        settings = ScoreRunSettings(
            model="planted",
            tasks=("repeats", "niah"),
            lengths=(n,),
            samples=1,
            depths=(0.1, 0.5, 0.9),
            backend=backend,
            seed=SEED % 1000,
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        head_scores, summary, sinks = score(model, settings, Path(tempfile.mkdtemp()) / f"run{n}")
        seconds = time.time() - start
        problems = role_problems(head_scores, summary, sinks, {t: expected(settings, model, t) for t in settings.tasks})
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append((n, seconds, peak, summary.get("needle_accuracy"), problems))
        print(f"{n} tokens: {seconds:.1f} s, problems: {problems}", flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nseed {SEED % 1000}, backend {backend}, {name}, torch {torch.__version__}")
    print(f"{'tokens':>8} {'seconds':>8} {'peak GiB':>9} {'needle acc':>10} {'problems':>9}")
    for n, seconds, peak, accuracy, problems in rows:
        print(f"{n:>8} {seconds:>8.1f} {peak:>9.2f} {accuracy!s:>10} {len(problems):>9}")
    return 1 if any(r[-1] for r in rows) else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m tests.workbench.planted_validity BACKEND LENGTH [LENGTH ...]")
    sys.exit(main(sys.argv[1], [int(x) for x in sys.argv[2:]]))
