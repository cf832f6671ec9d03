"""Linear probes on each head's output: does head (layer, h) carry a token-level label?

For every head, a logistic regression (scikit-learn) reads the head's output ``z`` at each
token (``[d_head]``, before the output projection) and predicts the label. Accuracy is
balanced accuracy (chance = 0.5 whatever the class balance), cross-validated with folds that
split by sample, so no sample is both trained and tested on.

Example:
    >>> samples = needle_samples(model.tokenizer, [256], [0.2, 0.5, 0.8], 8)
    >>> probe_heads(model, samples, needle_labels(samples))   # layer, head, accuracy, std
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from probes.ablation import all_heads, head_outputs
from workbench.errors import WorkbenchError
from workbench.tasks import TaskSample, second_copy_start


def needle_labels(samples: Sequence[TaskSample]) -> list[torch.Tensor]:
    """True for the tokens of the needle sentence."""
    if any(s.needle is None for s in samples):
        raise WorkbenchError("needle labels need needle samples (workbench.tasks.needle_samples)")
    labels = []
    for s in samples:
        y = torch.zeros(len(s.ids), dtype=torch.bool)
        y[s.needle.start : s.needle.stop] = True
        labels.append(y)
    return labels


def repeat_labels(samples: Sequence[TaskSample]) -> list[torch.Tensor]:
    """True for the tokens of every copy after the first (tokens seen before)."""
    if any(s.period is None for s in samples):
        raise WorkbenchError("repeat labels need repeats samples (workbench.tasks.repeat_samples)")
    return [torch.arange(len(s.ids)) >= second_copy_start(s) for s in samples]


def probe_heads(
    model,
    samples: Sequence[TaskSample],
    labels: Sequence[torch.Tensor],
    folds: int = 4,
    max_tokens: int = 2000,
    shuffle: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Cross-validated balanced accuracy of a logistic-regression probe per head: rows
    ``layer, head, accuracy, std, tokens``. ``shuffle=True`` permutes the labels within each
    sample first (a control that should sit at chance, 0.5). At most ``max_tokens`` tokens per
    class are used (drawn at random)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(samples) != len(labels) or any(len(s.ids) != len(y) for s, y in zip(samples, labels)):
        raise WorkbenchError("labels must hold one boolean per token of each sample")
    if len(samples) < folds:
        raise WorkbenchError(
            f"{folds}-fold cross-validation by sample needs at least {folds} samples, got {len(samples)}"
        )
    rng = np.random.default_rng(seed)
    y = torch.cat([torch.as_tensor(l, dtype=torch.bool) for l in labels]).numpy()
    if shuffle:
        y = np.concatenate([rng.permutation(np.asarray(l, dtype=bool)) for l in labels])
    groups = np.concatenate([np.full(len(s.ids), i) for i, s in enumerate(samples)])
    if y.all() or not y.any():
        raise WorkbenchError("the labels hold a single class: a probe needs both")
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:max_tokens] for c in (False, True)])
    features = _features(model, samples)  # layer -> [tokens, head, d_head]
    rows = []
    for layer, head in tqdm(all_heads(model), desc="probing heads", unit="head", disable=not progress):
        x = features[layer][keep, head].numpy()
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        scores = cross_val_score(
            probe, x, y[keep], groups=groups[keep], cv=GroupKFold(n_splits=folds), scoring="balanced_accuracy"
        )
        rows.append((layer, head, float(scores.mean()), float(scores.std()), len(keep)))
    return pd.DataFrame(rows, columns=["layer", "head", "accuracy", "std", "tokens"])


@torch.no_grad()
def _features(model, samples: Sequence[TaskSample]) -> dict[int, torch.Tensor]:
    parts: dict[int, list[torch.Tensor]] = {}
    for s in samples:
        for layer, z in head_outputs(model, s.ids.view(1, -1)).items():
            parts.setdefault(layer, []).append(z[0].float().cpu())
    return {layer: torch.cat(zs) for layer, zs in parts.items()}
