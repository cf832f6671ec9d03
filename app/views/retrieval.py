"""Retrieval: needle accuracy by context length x depth, every head's retrieval score, and one
head's retrieval score by length x depth."""

from __future__ import annotations

import streamlit as st

from app.state import Context, head_picker, run_shape
from app.views.common import figure, number
from workbench import plots


def render(ctx: Context) -> None:
    st.header("Retrieval")
    run = ctx.need_run()
    if run is None:
        return
    if not run.has_table("retrieval"):
        st.info(f"The run {ctx.run_name} has no needle-in-a-haystack results: score with `--task niah` to get them.")
        return
    retrieval = run.table("retrieval")
    accuracy = {k: v for k, v in (run.manifest.get("summary") or {}).items() if k.startswith("needle_accuracy")}
    for col, (name, value) in zip(st.columns(max(1, len(accuracy))), accuracy.items()):
        col.metric(name, number(value))
    left, right = st.columns(2)
    with left:
        figure(plots.needle_map(retrieval), key="retrieval.needles")
    with right:
        cells = retrieval.drop_duplicates(["length", "depth"]).pivot(index="depth", columns="length", values="accuracy")
        st.markdown("**needle accuracy** (rows: depth, columns: length)")
        st.dataframe(cells, key="retrieval.accuracy")
    hs = run.table("head_scores")
    if "retrieval" in set(hs["score"]):
        st.subheader("Retrieval score per head")
        figure(plots.head_map(hs, "retrieval"), key="retrieval.heads")
    st.subheader("One head by length and depth")
    layer, head = head_picker(*run_shape(run), "retrieval")
    figure(plots.retrieval_map(retrieval, layer, head), key="retrieval.head")
    rows = retrieval[(retrieval["layer"] == layer) & (retrieval["head"] == head)]
    st.dataframe(rows, hide_index=True, key="retrieval.head_table")
