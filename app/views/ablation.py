"""Ablation: what `workbench ablate` wrote into the run: the masking experiment (top-k heads
against k random heads) and single-head scans."""

from __future__ import annotations

import streamlit as st

from app.state import Context
from app.views.common import figure, number
from workbench import plots


def render(ctx: Context) -> None:
    st.header("Ablation")
    run = ctx.need_run()
    if run is None:
        return
    names = [t for t in run.tables() if t.startswith(("ablation_", "scan_"))]
    if not names:
        st.info(
            f"No ablations in {ctx.run_name} yet: `workbench ablate --run {run.path} --rank-by retrieval "
            "--task niah --scan` writes them."
        )
        return
    about = {a.get("table"): a for a in run.manifest.get("ablations") or [] if isinstance(a, dict)}
    name = st.selectbox("experiment", names, key="ablation.table")
    table = run.table(name)
    config = about.get(name, {})
    if config:
        st.caption(", ".join(f"{k} {v}" for k, v in config.items() if k not in ("table", "figure_warnings")))
    if name.startswith("ablation_"):
        metric = str(table["metric"].iloc[0]) if "metric" in table and len(table) else config.get("metric", "metric")
        base = table[table["selection"] == "none"]["value"]
        top = table[table["selection"] == "top"].sort_values("k")
        cols = st.columns(1 + len(top))
        cols[0].metric("no ablation", number(float(base.iloc[0])) if len(base) else "n/a")
        for col, row in zip(cols[1:], top.itertuples()):
            col.metric(f"top {row.k} ablated ({row.heads})", number(float(row.value)))
        figure(plots.ablation_curve(table, metric), key="ablation.curve")
    else:
        metric = str(table["metric"].iloc[0]) if "metric" in table and len(table) else "metric"
        title = f"{metric} change when ablated alone"
        task = str(table["task"].iloc[0]) if "task" in table and len(table) else "scan"
        figure(plots.head_map(table.assign(score=title, value=table["delta"], task=task), title), key="ablation.scan")
        table = table.sort_values("delta")
    st.dataframe(table, hide_index=True, key="ablation.rows")
