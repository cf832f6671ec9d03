"""Head map: a layer x head heatmap of any score (the run's own and those imported from other
tools), per query head or per KV group; choosing a head (a click on the map, or the selectors)
opens its detail."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.state import Context, head_picker, open_head, run_shape
from app.views.common import figure, head_view
from workbench import plots
from workbench.interop import IMPORTED


def clicked_head(event) -> tuple[int, int] | None:
    """The (layer, head) of the cell clicked on the map, if any."""
    points = (getattr(event, "selection", None) or {}).get("points") or []
    for point in points:
        try:
            return int(point["y"]), int(point["x"])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def render(ctx: Context) -> None:
    st.header("Head map")
    run = ctx.need_run()
    if run is None:
        return
    hs = run.table("head_scores")
    if run.has_table(IMPORTED):  # scores read from other tools' files (`workbench import`), to compare
        hs = pd.concat([hs, run.table(IMPORTED)], ignore_index=True)
    scores = list(dict.fromkeys(hs["score"]))
    score = st.selectbox("score", scores, key="heads.score")
    shown, head_label = head_view(run, hs, "heads")
    grouped = head_label != "head"  # a cell is a KV group: it opens no single head
    event = figure(
        plots.head_map(shown, score, clickable=not grouped, head_label=head_label),
        key=f"heads.map.{score}.{head_label}",
        on_select="rerun",
        selection_mode="points",
    )
    hit = None if grouped else clicked_head(event)
    if hit is not None:
        open_head(*hit)
        st.rerun()
    st.caption(
        "Pick a head to open its detail:" if grouped else "Click a cell to open that head's detail, or pick it here:"
    )
    n_layers, n_heads = run_shape(run)
    layer, head = head_picker(n_layers, n_heads, "heads")
    st.button(f"Open head {layer}.{head}", on_click=open_head, args=(layer, head), key="heads.open")
    rows = shown[shown["score"] == score].sort_values("value", ascending=False)
    if grouped:
        rows = rows.rename(columns={"head": "kv_head"})
    st.subheader(f"{score}: {'KV groups' if grouped else 'heads'}, highest first")
    st.dataframe(rows, hide_index=True, key="heads.table")
