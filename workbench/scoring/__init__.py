"""Head scoring: what each score is (:mod:`~workbench.scoring.formulas`), what decides a run
(:mod:`~workbench.scoring.settings`), its samples (:mod:`~workbench.scoring.plan`), one sample
through the model (:mod:`~workbench.scoring.sample`), the tables (:mod:`~workbench.scoring.tables`)
and the run itself (:mod:`~workbench.scoring.run`); DuoAttention's trained gates
(:mod:`~workbench.scoring.duo`) and the papers' head classifiers
(:mod:`~workbench.scoring.classifiers`).

Example:
    >>> settings = ScoreRunSettings(model="zoo-2l", tasks=("repeats",), lengths=(256,), samples=4)
    >>> run = score_model(load_model("zoo-2l"), settings, "runs/zoo-2l-repeats")
    >>> run.table("head_scores")
"""

from workbench.scoring.duo import DuoSettings
from workbench.scoring.formulas import SCORES, TASKS, TRAINED_SCORES, Score, ScoreSettings, scores_for
from workbench.scoring.plan import Unit, plan
from workbench.scoring.run import finish, score_model
from workbench.scoring.sample import score_sample
from workbench.scoring.settings import (
    DEFAULT_LENGTHS,
    ScoreRunSettings,
    check_model,
    defaults_for,
)
from workbench.scoring.tables import aggregate

__all__ = [
    "DEFAULT_LENGTHS",
    "DuoSettings",
    "SCORES",
    "TASKS",
    "TRAINED_SCORES",
    "Score",
    "ScoreRunSettings",
    "ScoreSettings",
    "Unit",
    "aggregate",
    "check_model",
    "defaults_for",
    "finish",
    "plan",
    "score_model",
    "score_sample",
    "scores_for",
]
