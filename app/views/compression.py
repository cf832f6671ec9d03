"""Compression: what `workbench compress` wrote into the run's compress/ folder: needle accuracy
and text loss with a share of the KV heads made streaming heads (by the run's ranking against
random heads), needle accuracy by length and depth, the KV cache saved, the heads streamed; and
(`--classifiers`) each head classifier's streaming heads side by side."""

from __future__ import annotations

import streamlit as st

from app.state import Context
from app.views.common import figure, number
from probes.compress import compressions, read_compression
from probes.compress_classifiers import classifier_comparison, read_classifier_comparison
from workbench import plots


def render(ctx: Context) -> None:
    st.header("Compression")
    run = ctx.need_run()
    if run is None:
        return
    entries = {c["name"]: c for c in compressions(run)}
    by_classifier = classifier_comparison(run)
    if not entries:
        if by_classifier is None:
            st.info(
                f"No compression what-if in {ctx.run_name} yet: `workbench compress --run {run.path} --rank-by "
                "retrieval --share 0.25,0.5,0.75 --sink 4 --window 256` writes one (`--classifiers` instead of "
                "`--rank-by retrieval`: each head classifier's heads side by side)."
            )
        else:
            _classifiers(run, by_classifier)
        return
    name = st.selectbox("experiment", list(entries), key="compression.name")
    about, tables = entries[name], read_compression(run, name)
    settings = about.get("settings") or {}
    st.caption(
        f"streaming heads see the first {settings.get('sink')} and the last {settings.get('window')} keys; "
        f"KV heads ranked by {settings.get('rank_by')}, {about.get('direction')} first; "
        f"random control: {settings.get('draws')} draws (seeds {settings.get('seed')}...)"
    )
    summary, memory = tables["summary"], tables["memory"]
    base = summary[summary["policy"] == "none"].iloc[0]
    longest = int(memory["length"].max())
    most = memory[memory["length"] == longest].sort_values("share").iloc[-1]
    cols = st.columns(3)
    cols[0].metric("uncompressed needle accuracy", number(float(base["needle_accuracy"])))
    cols[1].metric("uncompressed text loss past window", number(float(base["text_loss_past_window"])))
    cols[2].metric(f"KV saved at share {most['share']:g}, {longest} tokens", f"{most['saved_fraction']:.1%}")
    figure(plots.compression_curve(summary, str(settings.get("rank_by", "the ranking"))), key="compression.curve")
    st.dataframe(summary, hide_index=True, key="compression.summary")
    st.subheader("KV cache saved")
    st.dataframe(memory, hide_index=True, key="compression.memory")
    needles = tables["needles"]
    if len(needles):
        st.subheader("Needle accuracy by length and depth")
        sets = needles.drop_duplicates(["policy", "draw", "share"])
        labels = [f"{r.policy} share {r.share:g}" + (f" draw {r.draw}" if r.policy == "random" else "") for r in
                  sets.itertuples()]  # fmt: skip
        at = st.selectbox("set of streaming heads", range(len(labels)), format_func=labels.__getitem__,
                          key="compression.set")  # fmt: skip
        chosen = sets.iloc[at]
        rows = needles[
            (needles["policy"] == chosen["policy"])
            & (needles["draw"] == chosen["draw"])
            & (needles["share"] == chosen["share"])
        ]
        st.dataframe(
            rows.pivot(index="depth", columns="length", values="accuracy"), key="compression.needles"
        )  # fmt: skip
    st.subheader("Streamed KV heads")
    st.dataframe(tables["heads"], hide_index=True, key="compression.heads")
    if by_classifier is not None:
        _classifiers(run, by_classifier)


def _classifiers(run, about: dict) -> None:
    """What `workbench compress --classifiers` wrote: one row per classifier, its KV heads."""
    tables, settings = read_classifier_comparison(run), about.get("settings") or {}
    st.subheader("Each classifier's heads, side by side")
    st.caption(
        f"every KV head a classifier does not keep full streams (the first {settings.get('sink')} and the last "
        f"{settings.get('window')} keys); random control: {settings.get('draws')} draws of as many KV heads "
        f"(seeds {settings.get('seed')}...); " + " ".join(about.get("skipped") or [])
    )
    st.dataframe(tables["summary"], hide_index=True, key="compression.classifiers")
    heads = tables["heads"]
    st.dataframe(
        heads.pivot(index=["layer", "kv_head"], columns="classifier", values="streams"),
        key="compression.classifier_heads",
    )
