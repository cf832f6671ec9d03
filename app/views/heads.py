"""Head map: a layer x head heatmap of any score; choosing a head (a click on the map, or the
selectors) opens its detail."""

from __future__ import annotations

import streamlit as st

from app.state import Context, head_picker, open_head, run_shape
from app.views.common import figure
from workbench import plots


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
    scores = list(dict.fromkeys(hs["score"]))
    score = st.selectbox("score", scores, key="heads.score")
    event = figure(
        plots.head_map(hs, score, clickable=True), key=f"heads.map.{score}", on_select="rerun", selection_mode="points"
    )
    hit = clicked_head(event)
    if hit is not None:
        open_head(*hit)
        st.rerun()
    st.caption("Click a cell to open that head's detail, or pick it here:")
    n_layers, n_heads = run_shape(run)
    layer, head = head_picker(n_layers, n_heads, "heads")
    st.button(f"Open head {layer}.{head}", on_click=open_head, args=(layer, head), key="heads.open")
    rows = hs[hs["score"] == score].sort_values("value", ascending=False)
    st.subheader(f"{score}: heads, highest first")
    st.dataframe(rows, hide_index=True, key="heads.table")
