"""Live: type a prompt, pick a model, run it through the kernels and see every head's
statistics and one head's pattern at once."""

from __future__ import annotations

import streamlit as st

from app.state import attend_with, head_picker
from app.views.common import figure
from app.views.head_detail import DEFAULT_PROMPT, show_prompt
from workbench import plots
from workbench.models import available

OTHER = "another model (type its name)"


def render(ctx) -> None:
    st.header("Live")
    st.caption(
        "Any name `load_model` takes: zoo models and minilm load offline; tl:NAME, hf:ID or a local folder "
        "need the model in the Hugging Face cache or the network."
    )
    choice = st.selectbox("model", [*available(), OTHER], key="live.model")
    name = st.text_input("model name", key="live.other").strip() if choice == OTHER else choice
    text = st.text_area("prompt", DEFAULT_PROMPT, key="live.prompt")
    if st.button("Run", key="live.run", type="primary"):
        if not name:
            st.error("Type a model name first.")
        else:
            with st.spinner(f"running {name}..."):
                st.session_state["live.seen"] = (name, attend_with(name, text))
    if "live.seen" not in st.session_state:
        return
    name, seen = st.session_state["live.seen"]
    st.subheader(f"{name}: {seen.n_tokens} tokens")
    means = seen.head_means()
    statistic = st.selectbox(
        "statistic (mean over the prompt)", list(dict.fromkeys(means["score"])), key="live.statistic"
    )
    figure(plots.head_map(means, statistic), key="live.map")
    layer, head = head_picker(seen.n_layers, seen.n_heads, "live")
    show_prompt(seen, layer, head, "live")
