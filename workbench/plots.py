"""Plotly figures of a run's tables: the one set of figures the CLI, the app and the notebooks
share. Every function takes a table of :mod:`workbench.runs` and returns a ``go.Figure``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.runs import atomic_write
from workbench.scores import SCORES


def head_map(head_scores: pd.DataFrame, score: str) -> go.Figure:
    """Layer x head heatmap of one score, one panel per task it was computed on."""
    rows = head_scores[head_scores["score"] == score]
    tasks = list(dict.fromkeys(rows["task"]))
    fig = make_subplots(rows=1, cols=max(1, len(tasks)), subplot_titles=tasks, shared_yaxes=True,
                        horizontal_spacing=0.06)
    lo, hi = rows["value"].min(), rows["value"].max()
    for i, task in enumerate(tasks, start=1):
        grid = rows[rows["task"] == task].pivot(index="layer", columns="head", values="value")
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(), x=[str(h) for h in grid.columns], y=[str(l) for l in grid.index],
            zmin=lo, zmax=hi, coloraxis="coloraxis",
            hovertemplate=f"{task}<br>layer %{{y}} head %{{x}}<br>{score} %{{z:.3f}}<extra></extra>",
        ), row=1, col=i)
        fig.update_xaxes(title_text="head", row=1, col=i)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_layout(title=f"{score}: {SCORES[score].formula}" if score in SCORES else score,
                      title_font_size=12, coloraxis={"colorscale": "Viridis"},
                      width=max(480, 360 * len(tasks)), height=max(320, 90 + 22 * rows["layer"].nunique()))
    return fig


def profile_map(profiles: pd.DataFrame, statistic: str, task: str, length: int) -> go.Figure:
    """Heads (``layer.head``) x position bucket heatmap of one statistic's mean."""
    rows = profiles[(profiles["statistic"] == statistic) & (profiles["task"] == task) & (profiles["length"] == length)]
    rows = rows.assign(label=rows["layer"].astype(str) + "." + rows["head"].astype(str))
    grid = rows.pivot(index="label", columns="bucket_start", values="value")
    grid = grid.loc[sorted(grid.index, key=lambda s: tuple(int(x) for x in s.split(".")))]
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=list(grid.columns), y=list(grid.index), colorscale="Viridis",
                               hovertemplate="head %{y}<br>from position %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"{statistic} by position ({task}, {length} tokens)", xaxis_title="query position",
                      yaxis={"title": "layer.head", "autorange": "reversed"}, height=max(320, 90 + 14 * len(grid)))
    return fig


def needle_map(retrieval: pd.DataFrame) -> go.Figure:
    """Needle accuracy by context length x needle depth."""
    cells = retrieval.drop_duplicates(["length", "depth"]).pivot(index="depth", columns="length", values="accuracy")
    fig = go.Figure(go.Heatmap(z=cells.to_numpy(), x=[str(c) for c in cells.columns], y=[f"{d:.2f}" for d in cells.index],
                               zmin=0, zmax=1, colorscale="RdYlGn",
                               hovertemplate="%{x} tokens, depth %{y}<br>accuracy %{z:.2f}<extra></extra>"))
    fig.update_layout(title="needle accuracy (greedy, exact answer)", xaxis_title="context length (tokens)",
                      yaxis_title="needle depth", width=480, height=360)
    return fig


def run_figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """The figures a run folder holds: one head map per score, and the needle map."""
    figs = {f"heads_{score}": head_map(tables["head_scores"], score)
            for score in dict.fromkeys(tables["head_scores"]["score"])}
    if "retrieval" in tables:
        figs["needle_accuracy"] = needle_map(tables["retrieval"])
    return figs


def save_figures(figs: dict[str, go.Figure], folder: Path) -> list[str]:
    """``<name>.html`` (offline: they share one ``plotly.min.js`` in the folder) and ``<name>.png`` for every figure.

    PNG export needs Kaleido and a Chrome/Chromium on the machine; without them the PNGs are
    skipped and the reasons returned (the HTML files are always written)."""
    folder = Path(folder)
    for name, fig in figs.items():
        atomic_write(folder / f"{name}.html", lambda tmp, fig=fig: fig.write_html(tmp, include_plotlyjs="directory"))
    try:
        import plotly.io as pio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pio.write_images(list(figs.values()), [folder / f".{name}.tmp.png" for name in figs])
        for name in figs:
            os.replace(folder / f".{name}.tmp.png", folder / f"{name}.png")
    except Exception as exc:  # Kaleido raises its own types when no browser is found
        return [f"PNG figures skipped: {type(exc).__name__}: {exc}".splitlines()[0]]
    return []


def ablation_curve(cumulative: pd.DataFrame, metric: str) -> go.Figure:
    """Metric after ablating the top-k heads of a ranking against k random heads (mean and
    range over draws), by k; the unablated value as a dashed line."""
    top = cumulative[cumulative["selection"] == "top"].sort_values("k")
    rand = cumulative[cumulative["selection"] == "random"].groupby("k")["value"].agg(["mean", "min", "max"]).reset_index()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=top["k"], y=top["value"], mode="lines+markers", name="top-k heads",
                             text=top["heads"], hovertemplate="k %{x}: %{y:.3f}<br>%{text}<extra></extra>"))
    fig.add_trace(go.Scatter(x=rand["k"], y=rand["mean"], mode="lines+markers", name="k random heads (mean, range)",
                             error_y={"type": "data", "symmetric": False, "array": rand["max"] - rand["mean"],
                                      "arrayminus": rand["mean"] - rand["min"]}))
    base = cumulative[cumulative["selection"] == "none"]["value"]
    if len(base):
        fig.add_hline(y=float(base.iloc[0]), line_dash="dash", annotation_text="no ablation")
    fig.update_layout(title=f"{metric} with heads ablated", xaxis_title="heads ablated (k)", yaxis_title=metric,
                      width=560, height=380)
    return fig
