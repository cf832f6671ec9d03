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
from workbench.scoring.formulas import SCORES


def head_map(head_scores: pd.DataFrame, score: str, clickable: bool = False, head_label: str = "head") -> go.Figure:
    """Layer x head heatmap of one score, one panel per task it was computed on.

    ``clickable``: an invisible marker on every cell, so that point selection (a click in
    Streamlit's ``st.plotly_chart(on_select=...)``, which heatmaps do not report) picks a head.
    ``head_label``: what the columns are (``"kv head"`` for a KV-group view,
    :func:`workbench.scoring.kv_groups.as_head_table`)."""
    rows = head_scores[head_scores["score"] == score]
    tasks = list(dict.fromkeys(rows["task"]))
    fig = make_subplots(
        rows=1, cols=max(1, len(tasks)), subplot_titles=tasks, shared_yaxes=True, horizontal_spacing=0.06
    )
    lo, hi = rows["value"].min(), rows["value"].max()
    for i, task in enumerate(tasks, start=1):
        grid = rows[rows["task"] == task].pivot(index="layer", columns="head", values="value")
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[str(h) for h in grid.columns],
                y=[str(l) for l in grid.index],
                zmin=lo,
                zmax=hi,
                coloraxis="coloraxis",
                hovertemplate=f"{task}<br>layer %{{y}} {head_label} %{{x}}<br>{score} %{{z:.3f}}<extra></extra>",
            ),
            row=1,
            col=i,
        )
        if clickable:
            cells = rows[rows["task"] == task]
            fig.add_trace(
                go.Scatter(
                    x=cells["head"].astype(str),
                    y=cells["layer"].astype(str),
                    mode="markers",
                    showlegend=False,
                    marker={"symbol": "square", "size": 28, "opacity": 0},
                    customdata=cells["value"],
                    hovertemplate=f"{task}<br>layer %{{y}} {head_label} %{{x}}<br>{score} %{{customdata:.3f}}"
                    "<extra></extra>",
                ),
                row=1,
                col=i,
            )
        fig.update_xaxes(title_text=head_label, type="category", row=1, col=i)
    fig.update_yaxes(type="category", autorange="reversed")  # layers and heads are labels, not a scale
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(
        title=f"{score}: {SCORES[score].formula}" if score in SCORES else score,
        title_font_size=12,
        coloraxis={"colorscale": "Viridis"},
        width=max(480, 360 * len(tasks)),
        height=max(320, 90 + 22 * rows["layer"].nunique()),
    )
    return fig


def profile_map(profiles: pd.DataFrame, statistic: str, task: str, length: int) -> go.Figure:
    """Heads (``layer.head``) x position bucket heatmap of one statistic's mean."""
    rows = profiles[(profiles["statistic"] == statistic) & (profiles["task"] == task) & (profiles["length"] == length)]
    rows = rows.assign(label=rows["layer"].astype(str) + "." + rows["head"].astype(str))
    grid = rows.pivot(index="label", columns="bucket_start", values="value")
    grid = grid.loc[sorted(grid.index, key=lambda s: tuple(int(x) for x in s.split(".")))]
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=list(grid.columns),
            y=list(grid.index),
            colorscale="Viridis",
            hovertemplate="head %{y}<br>from position %{x}<br>%{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"{statistic} by position ({task}, {length} tokens)",
        xaxis_title="query position",
        yaxis={"title": "layer.head", "autorange": "reversed"},
        height=max(320, 90 + 14 * len(grid)),
    )
    return fig


def needle_map(retrieval: pd.DataFrame) -> go.Figure:
    """Needle accuracy by context length x needle depth."""
    cells = retrieval.drop_duplicates(["length", "depth"]).pivot(index="depth", columns="length", values="accuracy")
    fig = go.Figure(
        go.Heatmap(
            z=cells.to_numpy(),
            x=[str(c) for c in cells.columns],
            y=[f"{d:.2f}" for d in cells.index],
            zmin=0,
            zmax=1,
            colorscale="RdYlGn",
            hovertemplate="%{x} tokens, depth %{y}<br>accuracy %{z:.2f}<extra></extra>",
        )
    )
    fig.update_layout(
        title="needle accuracy (greedy, exact answer)",
        xaxis_title="context length (tokens)",
        yaxis_title="needle depth",
        width=480,
        height=360,
    )
    return fig


def run_figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """The figures a run folder holds: one head map per score, and the needle map."""
    figs = {
        f"heads_{score}": head_map(tables["head_scores"], score)
        for score in dict.fromkeys(tables["head_scores"]["score"])
    }
    if "retrieval" in tables:
        figs["needle_accuracy"] = needle_map(tables["retrieval"])
    return figs


def write_plotly_bundle(folder: Path) -> None:
    """``plotly.min.js`` in ``folder``, which the HTML figures load, written atomically. Plotly
    writes it itself, but in place and only when it is missing, so a run killed during that
    write would keep a truncated bundle; a bundle of the wrong size is replaced here."""
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs().encode()
    file = Path(folder) / "plotly.min.js"
    if not file.is_file() or file.stat().st_size != len(bundle):
        atomic_write(file, lambda tmp: tmp.write_bytes(bundle))


def save_figures(figs: dict[str, go.Figure], folder: Path) -> list[str]:
    """``<name>.html`` (offline: they share one ``plotly.min.js`` in the folder) and ``<name>.png`` for every figure.

    PNG export needs Kaleido and a Chrome/Chromium on the machine; without them the PNGs are
    skipped and the reasons returned (the HTML files are always written)."""
    folder = Path(folder)
    write_plotly_bundle(folder)
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
    rand = (
        cumulative[cumulative["selection"] == "random"].groupby("k")["value"].agg(["mean", "min", "max"]).reset_index()
    )
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=top["k"],
            y=top["value"],
            mode="lines+markers",
            name="top-k heads",
            text=top["heads"],
            hovertemplate="k %{x}: %{y:.3f}<br>%{text}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=rand["k"],
            y=rand["mean"],
            mode="lines+markers",
            name="k random heads (mean, range)",
            error_y={
                "type": "data",
                "symmetric": False,
                "array": rand["max"] - rand["mean"],
                "arrayminus": rand["mean"] - rand["min"],
            },
        )
    )
    base = cumulative[cumulative["selection"] == "none"]["value"]
    if len(base):
        fig.add_hline(y=float(base.iloc[0]), line_dash="dash", annotation_text="no ablation")
    fig.update_layout(
        title=f"{metric} with heads ablated", xaxis_title="heads ablated (k)", yaxis_title=metric, width=560, height=380
    )
    return fig


def streaming_curve(table: pd.DataFrame) -> go.Figure:
    """StreamingLLM's perplexity experiment (``probes.streaming.streaming_perplexity``'s table):
    perplexity by position bucket (log scale), one line per variant (full attention, the window
    alone, window + S first tokens), the window's size as a dotted line; overall perplexity in
    the legend."""
    fig = go.Figure()
    buckets = table[table["bucket"] != "all"]
    for variant, rows in buckets.groupby("variant", sort=False):
        overall = table[(table["variant"] == variant) & (table["bucket"] == "all")]["perplexity"]
        label = f"{variant} ({float(overall.iloc[0]):.2f})" if len(overall) else str(variant)
        rows = rows.sort_values("start")
        fig.add_trace(
            go.Scatter(
                x=(rows["start"] + rows["end"] - 1) / 2,
                y=rows["perplexity"],
                mode="lines+markers",
                name=label,
                text=rows["bucket"],
                hovertemplate="positions %{text}<br>perplexity %{y:.3f}<extra>" + str(variant) + "</extra>",
            )
        )
    windows = table["window"].unique()
    if len(windows) == 1:
        fig.add_vline(x=float(windows[0]), line_dash="dot", annotation_text=f"window {int(windows[0])}")
    fig.update_layout(
        title="perplexity with the first tokens kept besides a window (StreamingLLM)",
        xaxis_title="query position",
        yaxis={"title": "perplexity (overall in the legend)", "type": "log"},
        width=640,
        height=400,
    )
    return fig


def compression_curve(summary: pd.DataFrame, rank_by: str = "the ranking") -> go.Figure:
    """KV-cache compression what-if (``probes.compress``'s ``summary`` table): needle accuracy
    and text loss on the positions past sink + window, one panel each (those the table has), by
    the share of KV heads made streaming; the heads chosen by ``rank_by`` against random heads
    (mean over the draws, their range as error bars); both start at the uncompressed model
    (share 0), also drawn as a dashed line."""
    panels = [
        (c, label)
        for c, label in (("needle_accuracy", "needle accuracy"), ("text_loss_past_window", "text loss past window"))
        if c in summary and summary[c].notna().any()
    ]
    fig = make_subplots(rows=1, cols=max(1, len(panels)), subplot_titles=[label for _, label in panels])
    base = summary[summary["policy"] == "none"]
    colors = {"ranked": "#1f77b4", "random": "#ff7f0e"}
    for col, (column, label) in enumerate(panels, start=1):
        start = base[["share", column]].assign(share=0.0)
        ranked = pd.concat([start, summary[summary["policy"] == "ranked"][["share", column]]]).sort_values("share")
        rand = summary[summary["policy"] == "random"].groupby("share")[column].agg(["mean", "min", "max"])
        if len(base):
            b = float(base[column].iloc[0])
            rand = pd.concat([pd.DataFrame({"mean": [b], "min": [b], "max": [b]}, index=[0.0]), rand])
            fig.add_hline(y=b, line_dash="dash", line_color="gray", row=1, col=col)
        rand = rand.reset_index(names="share").sort_values("share")
        fig.add_trace(
            go.Scatter(
                x=ranked["share"], y=ranked[column], mode="lines+markers", name=f"by {rank_by}",
                line={"color": colors["ranked"]}, showlegend=col == 1, legendgroup="ranked",
                hovertemplate=f"share %{{x:.3f}}<br>{label} %{{y:.3f}}<extra>by {rank_by}</extra>",
            ),
            row=1, col=col,
        )  # fmt: skip
        if len(rand) > int(len(base) > 0):
            fig.add_trace(
                go.Scatter(
                    x=rand["share"], y=rand["mean"], mode="lines+markers", name="random (mean, range)",
                    line={"color": colors["random"], "dash": "dot"}, showlegend=col == 1, legendgroup="random",
                    error_y={"type": "data", "symmetric": False, "array": rand["max"] - rand["mean"],
                             "arrayminus": rand["mean"] - rand["min"]},
                    hovertemplate=f"share %{{x:.3f}}<br>{label} %{{y:.3f}} (mean)<extra>random</extra>",
                ),
                row=1, col=col,
            )  # fmt: skip
        fig.update_xaxes(title_text="share of KV heads streaming", range=[-0.03, 1.03], row=1, col=col)
        fig.update_yaxes(title_text=label, row=1, col=col)
        if column == "needle_accuracy":
            fig.update_yaxes(range=[-0.05, 1.05], row=1, col=col)
    fig.update_layout(
        title=f"streaming heads chosen by {rank_by} vs at random (dashed: uncompressed)",
        title_font_size=13,
        width=max(480, 430 * len(panels)),
        height=400,
    )
    return fig


def sink_emergence(table: pd.DataFrame, threshold: float = 0.3) -> go.Figure:
    """Sink rate and the largest head's sink score against training tokens
    (``probes.emergence.sink_rate_over_training``'s table; Gu et al. 2025, Fig. 4); the
    threshold that makes a head a sink as a dotted line."""
    fig = go.Figure()
    hover = "step %{text}, %{x:.3s} tokens: %{y:.3f}<extra></extra>"
    for column, label in (("sink_rate", "sink rate"), ("max_sink", "largest head's sink score")):
        fig.add_trace(
            go.Scatter(
                x=table["tokens"], y=table[column], mode="lines+markers", name=label, text=table["step"],
                hovertemplate=hover,
            )
        )  # fmt: skip
    fig.add_hline(y=threshold, line_dash="dot", annotation_text=f"sink threshold {threshold}")
    fig.update_layout(
        title="attention sinks over training",
        xaxis_title="training tokens",
        yaxis={"title": "share of (sample, layer, head) / score", "range": [0, 1]},
        width=600,
        height=380,
    )
    return fig


# Head detail, prompts, comparison and SAE features (the explorer's pages; notebooks too).


def _token_axis(labels: list[str], most: int = 64) -> dict:
    """Axis ticks at token positions labelled with the tokens (every k-th when there are many)."""
    step = max(1, -(-len(labels) // most))
    positions = list(range(0, len(labels), step))
    return {"tickmode": "array", "tickvals": positions, "ticktext": [labels[p] for p in positions], "tickangle": 0}


def head_pattern(pattern, labels: list[str], title: str = "attention pattern") -> go.Figure:
    """One head's attention pattern ``[query, key]`` on one prompt, tokens labelling both axes
    (e.g. :meth:`workbench.prompt.PromptAttention.pattern`)."""
    n = len(labels)
    fig = go.Figure(
        go.Heatmap(
            z=pattern,
            x=list(range(n)),
            y=list(range(n)),
            colorscale="Blues",
            zmin=0,
            hovertemplate="query %{y}, key %{x}<br>attention %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis={"title": "key", "side": "top", **_token_axis(labels)},
        yaxis={"title": "query", "autorange": "reversed", **_token_axis(labels)},
        width=min(900, 260 + 14 * n),
        height=min(900, 220 + 14 * n),
    )
    return fig


def top_keys(keys: pd.DataFrame, title: str = "keys that receive the most attention") -> go.Figure:
    """Bars of the attention keys receive, summed over queries: rows ``position, token, mass``,
    highest first (e.g. :meth:`workbench.prompt.PromptAttention.top_keys`)."""
    labels = [f"{p}: {t}" for p, t in zip(keys["position"], keys["token"])]
    fig = go.Figure(
        go.Bar(
            x=keys["mass"],
            y=labels,
            orientation="h",
            hovertemplate="key %{y}<br>attention received %{x:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="attention received (sum over queries)",
        yaxis={"autorange": "reversed", "type": "category"},
        width=520,
        height=max(260, 120 + 22 * len(keys)),
    )
    return fig


def _lines(panels: list[tuple[str, list[tuple[str, list, list]]]], x_title: str, title: str) -> go.Figure:
    """One panel per statistic, lines ``(name, x, y)`` in each; a line's colour is the same in every panel."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p for p, _ in panels], horizontal_spacing=0.07)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for col, (_, lines) in enumerate(panels, start=1):
        for i, (name, x, y) in enumerate(lines):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": palette[i % len(palette)]},
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=x_title, row=1, col=col)
    fig.update_layout(title=title, width=max(520, 330 * len(panels)), height=360)
    return fig


def head_profiles(
    profiles: pd.DataFrame, layer: int, head: int, statistics: tuple[str, ...] = ("entropy", "sink_mass", "local_mass")
) -> go.Figure:
    """One head's means by query position (a run's ``profiles`` table), one panel per statistic,
    one line per task and length."""
    rows = profiles[(profiles["layer"] == layer) & (profiles["head"] == head)]
    panels = []
    for statistic in statistics:
        stat = rows[rows["statistic"] == statistic]
        groups = stat.sort_values("bucket_start").groupby(["task", "length"])
        panels.append(
            (
                statistic,
                [(f"{task} {length}", list(g["bucket_start"]), list(g["value"])) for (task, length), g in groups],
            )
        )
    return _lines(panels, "query position", f"head {layer}.{head} by position")


def prompt_statistics(
    frame: pd.DataFrame,
    statistics: tuple[str, ...] = ("entropy", "sink_mass", "local_mass"),
    title: str = "statistics by position",
) -> go.Figure:
    """One head's row statistics at every position of one prompt (rows ``position`` plus a
    column per statistic, e.g. :meth:`workbench.prompt.PromptAttention.head_statistics`)."""
    return _lines([(s, [(s, list(frame["position"]), list(frame[s]))]) for s in statistics], "query position", title)


def head_standing(head_scores: pd.DataFrame, layer: int, head: int) -> go.Figure:
    """Where one head stands among all heads on every score and task: each row spans the
    heads' range of that score (lowest left, highest right), grey dots are the other heads,
    the red one this head; hover gives the values."""
    fig = go.Figure()
    for (score, task), group in head_scores.groupby(["score", "task"], sort=False):
        group = group.dropna(subset=["value"])
        if group.empty:
            continue
        lo, hi = group["value"].min(), group["value"].max()
        pos = (group["value"] - lo) / (hi - lo) if hi > lo else group["value"] * 0 + 0.5
        mine = (group["layer"] == layer) & (group["head"] == head)
        label = f"{score} ({task})"
        for chosen, colour, size in ((False, "lightgrey", 8), (True, "crimson", 13)):
            sel = mine == chosen
            fig.add_trace(
                go.Scatter(
                    x=pos[sel],
                    y=[label] * int(sel.sum()),
                    mode="markers",
                    showlegend=False,
                    marker={"color": colour, "size": size},
                    text=[
                        f"{l}.{h}: {v:.3f}"
                        for l, h, v in zip(group["layer"][sel], group["head"][sel], group["value"][sel])
                    ],
                    hovertemplate=f"{label}<br>head %{{text}}<extra></extra>",
                )
            )
    fig.update_layout(
        title=f"head {layer}.{head} among all heads",
        xaxis={"title": "lowest head → highest head", "range": [-0.05, 1.05], "showticklabels": False},
        yaxis={"autorange": "reversed"},
        width=640,
        height=max(260, 90 + 26 * head_scores.groupby(["score", "task"]).ngroups),
    )
    return fig


def retrieval_map(retrieval: pd.DataFrame, layer: int, head: int) -> go.Figure:
    """One head's retrieval score by context length x needle depth (a run's ``retrieval``
    table), with how many answered needles each cell counts."""
    rows = retrieval[(retrieval["layer"] == layer) & (retrieval["head"] == head)]
    cells = rows.pivot(index="depth", columns="length", values="value")
    answered = rows.pivot(index="depth", columns="length", values="answered")
    fig = go.Figure(
        go.Heatmap(
            z=cells.to_numpy(),
            x=[str(c) for c in cells.columns],
            y=[f"{d:.2f}" for d in cells.index],
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            customdata=answered.to_numpy(),
            hovertemplate="%{x} tokens, depth %{y}<br>retrieval %{z:.2f} (%{customdata:.0f} answered)<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"retrieval score of head {layer}.{head}",
        xaxis_title="context length (tokens)",
        yaxis_title="needle depth",
        width=480,
        height=360,
    )
    return fig


def compare_heads(
    a: pd.DataFrame,
    b: pd.DataFrame,
    score: str,
    names: tuple[str, str] = ("run A", "run B"),
    head_label: str = "head",
) -> go.Figure:
    """Two runs' values of one score, head by head (heads matched on task, layer and head); the
    diagonal marks equal values. ``head_label``: what the head column holds, as in :func:`head_map`."""
    key = ["task", "layer", "head"]
    both = a[a["score"] == score][key + ["value"]].merge(
        b[b["score"] == score][key + ["value"]], on=key, suffixes=("_a", "_b")
    )
    fig = go.Figure()
    for task, group in both.groupby("task", sort=False):
        fig.add_trace(
            go.Scatter(
                x=group["value_a"],
                y=group["value_b"],
                mode="markers",
                name=task,
                text=[f"{l}.{h}" for l, h in zip(group["layer"], group["head"])],
                hovertemplate=head_label + " %{text}<br>%{x:.3f} → %{y:.3f}<extra>" + task + "</extra>",
            )
        )
    if len(both):
        lo = float(min(both["value_a"].min(), both["value_b"].min()))
        hi = float(max(both["value_a"].max(), both["value_b"].max()))
        fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line={"dash": "dash", "color": "grey"})
    title = f"{score}: {head_label} by {head_label}"
    fig.update_layout(title=title, xaxis_title=names[0], yaxis_title=names[1], width=520, height=460)
    return fig


def feature_heads(attribution: pd.DataFrame, features=None) -> go.Figure:
    """SAE features x heads: each feature's share of its decoder norm in each head (rows
    ``feature, head, share``, :func:`probes.sae.head_attribution`)."""
    if features is not None:
        attribution = attribution[attribution["feature"].isin(list(features))]
    grid = attribution.pivot(index="feature", columns="head", values="share")
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[str(h) for h in grid.columns],
            y=[str(f) for f in grid.index],
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            hovertemplate="feature %{y}, head %{x}<br>share %{z:.2f}<extra></extra>",
        )
    )
    fig.update_layout(
        title="decoder-norm share per head",
        xaxis_title="head",
        yaxis={"title": "feature", "type": "category", "autorange": "reversed"},
        width=420,
        height=max(300, 110 + 16 * len(grid)),
    )
    return fig


def feature_contributions(direct: pd.DataFrame, feature: int) -> go.Figure:
    """Each head's direct contribution to one SAE feature on its top-activating examples (rows
    ``feature, rank, head, contribution``, :func:`probes.sae.direct_attribution`)."""
    rows = direct[direct["feature"] == feature]
    grid = rows.pivot(index="rank", columns="head", values="contribution")
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[str(h) for h in grid.columns],
            y=[f"#{r}" for r in grid.index],
            colorscale="RdBu",
            zmid=0,
            hovertemplate="example %{y}, head %{x}<br>contribution %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"feature {feature}: contribution of each head",
        xaxis_title="head",
        yaxis={"title": "top example", "autorange": "reversed"},
        width=420,
        height=max(260, 110 + 26 * len(grid)),
    )
    return fig
