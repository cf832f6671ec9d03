"""SAE features: what `workbench sae train` saved (evaluation, per-head attribution, top
activating contexts), and a feature browser."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app.state import LINKS_OUT, Context, folders_inside
from app.views.common import figure, number
from probes.sae import SavedSAE
from workbench import plots
from workbench.errors import WorkbenchError

SHOWN_METRICS = ("l0", "explained_variance", "ce_loss_recovered", "dead_fraction")


def saes_inside(root: Path) -> tuple[list[SavedSAE], list[tuple[str, str]]]:
    """The SAE folders directly in ``root`` (those with a ``cfg.json``), by name, and ``(name,
    reason)`` for those that cannot be read or that link outside ``root`` (never read); empty when
    ``root`` does not exist. :func:`probes.sae.list_saes` without the links that lead out."""
    if not root.is_dir():
        return [], []
    kept, outside = folders_inside(root)
    found, broken = [], [(name, LINKS_OUT.format(what="SAE")) for name in outside]
    for folder in kept:
        if not (folder / "cfg.json").exists():
            continue
        try:
            found.append(SavedSAE.open(folder))
        except WorkbenchError as exc:
            broken.append((folder.name, str(exc)))
    return found, broken


def render(ctx: Context) -> None:
    st.header("SAE features")
    root = ctx.folders.saes
    st.caption(f"SAE folder: {root}")
    found, broken = saes_inside(root)
    for name, reason in broken:
        st.warning(f"skipped {name}: {reason}")
    if not found:
        st.info(
            f"No SAEs in {root}: `workbench sae train --layer 1 --out {root}/<name>` trains one and saves its "
            "evaluation, head attribution and top contexts there."
        )
        return
    by_name = {s.path.name: s for s in found}
    model = ctx.run.manifest["settings"].get("model") if ctx.run else None
    names = sorted(by_name, key=lambda n: (by_name[n].model_name != model, n))
    name = st.selectbox(
        "SAE", names, key="sae.name", format_func=lambda n: f"{n} ({by_name[n].model_name}, layer {by_name[n].layer})"
    )
    sae = by_name[name]
    st.caption(f"reads {sae.hook_name}; {sae.cfg.get('d_sae')} features of width {sae.cfg.get('d_in')}")
    if sae.evaluation:
        for col, metric in zip(st.columns(len(SHOWN_METRICS)), SHOWN_METRICS):
            col.metric(metric, number(sae.evaluation.get(metric)))
    else:
        st.caption("no evaluation.json beside this SAE")
    if not sae.has_table("top_contexts"):
        st.info("This SAE has no top_contexts table (`workbench sae train` writes it): no feature browser.")
        return
    contexts = sae.table("top_contexts")
    if contexts.empty:
        st.info("No feature was active on the held-out text.")
        return
    strongest = contexts.groupby("feature")["activation"].max().sort_values(ascending=False)
    attribution = sae.table("head_attribution") if sae.has_table("head_attribution") else None
    if attribution is not None:
        st.subheader("Head attribution of the most active features")
        figure(plots.feature_heads(attribution, list(strongest.index[:40])), key="sae.heads")
    st.subheader("Feature browser")
    feature = st.selectbox(
        "feature (most active first)",
        list(strongest.index),
        key="sae.feature",
        format_func=lambda f: f"{f} (max activation {strongest[f]:.2f})",
    )
    rows = contexts[contexts["feature"] == feature].sort_values("rank")
    st.markdown("**top activating contexts** (the token in `[[ ]]`)")
    st.dataframe(rows[["rank", "activation", "sample", "position", "context"]], hide_index=True, key="sae.contexts")
    left, right = st.columns(2)
    if attribution is not None:
        with left:
            st.markdown("**decoder-norm share per head**")
            st.dataframe(
                attribution[attribution["feature"] == feature][["head", "share"]], hide_index=True, key="sae.share"
            )
    if sae.has_table("direct_attribution"):
        with right:
            figure(plots.feature_contributions(sae.table("direct_attribution"), feature), key="sae.direct")
