"""Runs: every run folder with model, tasks, lengths, status and date; the chosen run's settings
and summary; comparing two runs score by score, by query head or by KV group."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.state import Context
from app.views.common import HEAD_VIEWS, figure, in_view, number
from workbench import plots


def overview(ctx: Context) -> pd.DataFrame:
    """One row per run, as ``workbench runs list`` prints them."""
    rows = []
    for name, run in ctx.runs.items():
        s = run.manifest["settings"]
        rows.append(
            {
                "run": name,
                "model": str(s.get("model")),
                "tasks": ", ".join(s.get("tasks", [])),
                "lengths": ", ".join(str(n) for n in s.get("lengths", [])),
                "samples": s.get("samples"),
                "status": run.manifest.get("status"),
                "created": str(run.manifest.get("created", "")),
            }
        )
    return pd.DataFrame(rows)


def summary(run) -> None:
    """The run's model-level numbers (sink rate, needle accuracy) as metrics."""
    items = list((run.manifest.get("summary") or {}).items())
    for start in range(0, len(items), 4):
        for col, (name, value) in zip(st.columns(4), items[start : start + 4]):
            col.metric(name, number(value))


def render(ctx: Context) -> None:
    st.header("Runs")
    st.caption(f"runs folder: {ctx.folders.runs}")
    if not ctx.runs:
        st.info(ctx.problem)
        return
    st.dataframe(overview(ctx), hide_index=True, key="runs.table")
    run = ctx.need_run()
    if run is None:
        return
    st.subheader(f"{ctx.run_name}: {run.manifest['settings'].get('model')}")
    summary(run)
    with st.expander("settings"):
        st.json(run.manifest["settings"])
    others = [name for name in ctx.runs if name != ctx.run_name]
    if not others:
        st.caption("Only one run: score another to compare two.")
        return
    st.subheader("Compare with another run")
    other_name = st.selectbox("compare with", ["(none)", *others], key="runs.compare")
    if other_name == "(none)":
        return
    other = ctx.runs[other_name]
    left, right = st.columns(2)
    for col, (name, r) in zip((left, right), ((ctx.run_name, run), (other_name, other))):
        with col:
            st.markdown(f"**{name}** ({r.manifest['settings'].get('model')})")
            summary(r)
    a, b = run.table("head_scores"), other.table("head_scores")
    common = [s for s in dict.fromkeys(a["score"]) if s in set(b["score"])]
    if not common:
        st.info("The two runs have no score in common.")
        return
    score = st.selectbox("score", common, key="runs.compare_score")
    view = st.radio("view", HEAD_VIEWS, horizontal=True, key="runs.view")
    left, right = st.columns(2)
    with left:
        a, label = in_view(run, a, view, "runs.a")
    with right:
        b, _ = in_view(other, b, view, "runs.b")
    if label != "head" and a["head"].nunique() != b["head"].nunique():
        st.info("The two runs have different numbers of key/value heads per layer: compare them by query head.")
        return
    figure(plots.compare_heads(a, b, score, (ctx.run_name, other_name), head_label=label), key="runs.compare_fig")
    left, right = st.columns(2)
    with left:
        figure(plots.head_map(a, score, head_label=label), key="runs.map_a")
    with right:
        figure(plots.head_map(b, score, head_label=label), key="runs.map_b")
