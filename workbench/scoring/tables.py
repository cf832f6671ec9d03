"""The run's tables from its part files: :func:`aggregate` turns per-sample tallies into
``head_scores``, ``profiles`` and ``retrieval``; :func:`model_summary` gives the model-level
numbers (sink rate, retrieval heads, needle accuracy) of a run's manifest."""

from __future__ import annotations

import math

import pandas as pd
import torch

from workbench.scoring.formulas import SCORES, ScoreSettings, share_above


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


def sink_values(parts: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, sample, layer, head) with its own sink score ``value = total / count``
    (Gu et al.'s first-token score of that sample, layer and head): columns ``task, length,
    sample, layer, head, value``."""
    rows = parts[(parts["name"] == "sink") & (parts["layer"] >= 0) & (parts["bucket"] < 0)]
    keys = ["task", "length", "sample", "layer", "head"]
    if rows.duplicated(keys).any():  # one row per sample, layer and head: else the rate would mix samples
        raise ValueError("the parts hold more than one sink row per (task, length, sample, layer, head)")
    out = rows[keys].copy()
    out["value"] = rows["total"] / rows["count"].where(rows["count"] > 0)
    return out.reset_index(drop=True)


def model_summary(parts: pd.DataFrame, head_scores: pd.DataFrame, settings: ScoreSettings) -> dict:
    """The model-level numbers of a run:

    - ``sink_rate[task]``: the share of (sample, layer, head) whose sink score exceeds
      ``settings.sink_threshold`` (Gu et al.);
    - ``retrieval_heads``, ``retrieval_head_rate``: the heads whose retrieval score exceeds
      ``settings.retrieval_threshold`` (Wu et al.), their number and share of all heads (NaN
      when no sample retrieved its answer);
    - ``needle_accuracy``, ``needle_accuracy[length]``: the share of needle samples whose
      generated answer is retrieved (ROUGE-1 recall > 0.5), overall and per length.
    """
    summary: dict = {}
    for task, group in sink_values(parts).groupby("task"):
        summary[f"sink_rate[{task}]"] = share_above(torch.tensor(group["value"].to_numpy()), settings.sink_threshold)
    retrieval = head_scores[head_scores["score"] == "retrieval"]
    if len(retrieval):
        values = torch.tensor(retrieval["value"].to_numpy(dtype=float))
        rate = share_above(values, settings.retrieval_threshold)
        count = int((values > settings.retrieval_threshold).sum())
        summary["retrieval_heads"] = math.nan if math.isnan(rate) else count
        summary["retrieval_head_rate"] = rate
    needles = parts[parts["name"] == "needle_accuracy"]
    if len(needles):
        summary["needle_accuracy"] = float(needles["total"].mean())
        for length, group in needles.groupby("length"):
            summary[f"needle_accuracy[{length}]"] = float(group["total"].mean())
    return summary
