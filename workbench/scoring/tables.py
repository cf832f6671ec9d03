"""The run's tables from its part files: :func:`aggregate` turns per-sample tallies into
``head_scores``, ``profiles`` and ``retrieval``."""

from __future__ import annotations

import pandas as pd

from workbench.scoring.formulas import SCORES


def aggregate(parts: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``head_scores``, ``profiles`` and (needle task) ``retrieval`` tables from the tallies."""

    def ratio(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        g = frame.groupby(keys, sort=True)
        out = g[["total", "count"]].sum()
        out["value"] = out["total"] / out["count"].where(out["count"] > 0)
        out["samples"] = g["count"].apply(lambda c: int((c > 0).sum()))
        return out.reset_index()

    heads = parts[(parts["layer"] >= 0) & (parts["bucket"] < 0)]
    head_scores = ratio(heads, ["task", "name", "layer", "head"]).rename(columns={"name": "score"})
    order = {name: i for i, name in enumerate(SCORES)}
    head_scores = head_scores.sort_values(
        ["score", "task", "layer", "head"], key=lambda c: c.map(order) if c.name == "score" else c
    )
    tables = {"head_scores": head_scores[["task", "score", "layer", "head", "value", "samples"]].reset_index(drop=True)}
    prof = ratio(parts[parts["bucket"] >= 0], ["task", "length", "name", "layer", "head", "bucket"])
    tables["profiles"] = prof.rename(columns={"name": "statistic", "bucket": "bucket_start", "count": "rows"})[
        ["task", "length", "statistic", "layer", "head", "bucket_start", "value", "rows"]
    ]
    retrieval = parts[(parts["name"] == "retrieval") & (parts["layer"] >= 0)]
    if len(retrieval):
        cells = ratio(retrieval, ["length", "depth", "layer", "head"]).rename(columns={"count": "answered"})
        needles = parts[parts["name"] == "needle_accuracy"].groupby(["length", "depth"])["total"]
        cells = cells.merge(
            needles.agg(["mean", "size"]).rename(columns={"mean": "accuracy", "size": "samples_total"}),
            left_on=["length", "depth"],
            right_index=True,
        )
        tables["retrieval"] = cells[
            ["length", "depth", "layer", "head", "value", "answered", "samples_total", "accuracy"]
        ].rename(columns={"samples_total": "samples"})
    return tables
