"""Small layout pieces several pages use."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import streamlit as st

if TYPE_CHECKING:
    import pandas as pd

    from workbench.runs import Run


def figure(fig, key: str | None = None, **kwargs):
    """A plotly figure of :mod:`workbench.plots` at its own size."""
    return st.plotly_chart(fig, width="content", key=key, **kwargs)


def number(value) -> str:
    """A table value for a metric: 3 decimals, "n/a" for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


#: The head map's views: every query head, or each key/value head by the max or mean of its group.
HEAD_VIEWS = ("query heads", "KV groups: max", "KV groups: mean")


def head_view(run: Run, head_scores: pd.DataFrame, key: str) -> tuple[pd.DataFrame, str]:
    """A toggle between query heads and KV groups (grouped-query models share a key/value head
    among several query heads; compression acts per KV head): ``(table, head_label)``, the table
    in the ``head_scores`` shape to draw (a KV group's value: the max or mean of its query heads',
    :mod:`workbench.scoring.kv_groups`) and what its head column holds."""
    view = st.radio("view", HEAD_VIEWS, horizontal=True, key=f"{key}.view")
    return in_view(run, head_scores, view, key)


def in_view(run: Run, head_scores: pd.DataFrame, view: str, key: str) -> tuple[pd.DataFrame, str]:
    """``head_scores`` of ``run`` in one of :data:`HEAD_VIEWS`: ``(table, head_label)`` as
    :func:`head_view` gives them. A run that does not record its key/value heads asks for them."""
    from workbench.errors import WorkbenchError
    from workbench.scoring.kv_groups import as_head_table, kv_group_scores, run_kv_heads

    if view == HEAD_VIEWS[0]:
        return head_scores, "head"
    try:
        heads, kv = run_kv_heads(run)
    except WorkbenchError:
        heads = int(head_scores["head"].max()) + 1
        divisors = [n for n in range(1, heads + 1) if heads % n == 0]
        kv = st.selectbox(
            "key/value heads per layer (this run does not record them: see the model's num_key_value_heads)",
            divisors,
            index=len(divisors) - 1,
            key=f"{key}.kv_heads",
        )
    if kv == heads:
        st.caption("Every query head has its own key/value head here: each KV group is one head.")
    else:
        st.caption(
            f"{heads // kv} query heads share each key/value head (query head h reads KV head h // {heads // kv})."
        )
    return as_head_table(kv_group_scores(head_scores, int(kv), heads), view.rsplit(" ", 1)[1]), "kv head"
