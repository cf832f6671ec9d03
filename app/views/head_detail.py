"""Head detail: one head's scores among all heads, its profiles by position, its retrieval score
by length and depth, and its attention on a prompt (pattern with token labels for short
prompts; statistics and the keys that receive the most attention at any length)."""

from __future__ import annotations

import streamlit as st

from app.state import Context, attend_with, head_picker, run_shape
from app.views.common import figure
from workbench import plots
from workbench.prompt import PATTERN_TOKENS
from workbench.runs import head_summary

DEFAULT_PROMPT = (
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n\n'
    "The secret code of Ada is 4711. The secret code of Ada is"
)


def prompt_source(run, key: str):
    """The prompt to look at: a sample of the run's own tasks (the samples it was scored on), or
    typed text. Returns ``(cache key, prompt)``, prompt None until there is one."""
    settings = run.manifest["settings"]
    source = st.radio("prompt", ["a sample of this run", "your text"], horizontal=True, key=f"{key}.source")
    if source == "your text":
        text = st.text_area("text", DEFAULT_PROMPT, key=f"{key}.text")
        return ("text", text), text
    left, right = st.columns(2)
    task = left.selectbox("task", settings.get("tasks") or [], key=f"{key}.task")
    length = right.selectbox("length (tokens)", settings.get("lengths") or [], key=f"{key}.length")
    if task is None or length is None:
        return None, None
    return ("sample", task, int(length)), None


def run_sample(run, task: str, length: int):
    """Token ids of the run's first sample of ``task`` at ``length`` (planned as scoring plans them)."""
    from workbench.errors import WorkbenchError
    from workbench.models import task_tokenizer
    from workbench.scoring import ScoreRunSettings, plan

    settings = ScoreRunSettings.from_dict(run.manifest["settings"])
    settings = ScoreRunSettings.from_dict(
        {**settings.to_dict(), "tasks": [task], "lengths": [length], "samples": 1, "scores": []}
    )
    model, _ = _model(run)
    for unit in plan(settings, task_tokenizer(model)):
        return unit.sample.ids
    raise WorkbenchError(f"no {task} sample of {length} tokens could be made")


def _model(run):
    from app.state import cached_model

    s = run.manifest["settings"]
    return cached_model(s["model"], s.get("dtype"))


def render(ctx: Context) -> None:
    st.header("Head detail")
    run = ctx.need_run()
    if run is None:
        return
    n_layers, n_heads = run_shape(run)
    layer, head = head_picker(n_layers, n_heads, "detail")
    hs = run.table("head_scores")

    st.subheader(f"Head {layer}.{head}: every score")
    figure(plots.head_standing(hs, layer, head), key="detail.standing")
    st.dataframe(head_summary(hs, layer, head), hide_index=True, key="detail.scores")

    if run.has_table("profiles"):
        st.subheader("By position (means over the run's samples)")
        figure(plots.head_profiles(run.table("profiles"), layer, head), key="detail.profiles")
    if run.has_table("retrieval"):
        st.subheader("Retrieval score by context length and needle depth")
        figure(plots.retrieval_map(run.table("retrieval"), layer, head), key="detail.retrieval")

    st.subheader("On a prompt")
    st.caption(
        f"The run's model ({run.manifest['settings'].get('model')}) through the kernels; the explicit "
        f"pattern up to {PATTERN_TOKENS} tokens, statistics and the most-attended keys at any length."
    )
    key, text = prompt_source(run, "detail")
    store = st.session_state.setdefault("detail.seen", {})
    cache_key = (str(run.path), *(key or ()))
    if st.button("Show attention", key="detail.show") and key is not None:
        with st.spinner("running the model..."):
            prompt = text if key[0] == "text" else run_sample(run, key[1], key[2])
            s = run.manifest["settings"]
            store.clear()
            store[cache_key] = attend_with(s["model"], prompt, s.get("dtype"))
    seen = store.get(cache_key)
    if seen is not None:
        show_prompt(seen, layer, head, "detail")


def show_prompt(seen, layer: int, head: int, key: str) -> None:
    """One head on one prompt: pattern (short prompts), most-attended keys, statistics by position."""
    st.caption(f"{seen.n_tokens} tokens")
    pattern = seen.pattern(layer, head)
    if pattern is not None:
        figure(
            plots.head_pattern(pattern, seen.labels, f"head {layer}.{head}: attention pattern"), key=f"{key}.pattern"
        )
    else:
        st.caption(
            f"Pattern not drawn: over {PATTERN_TOKENS} tokens it costs O(N²); the statistics below come from "
            "the kernel in O(N)."
        )
    top = seen.top_keys(layer, head, 15)
    left, right = st.columns(2)
    with left:
        figure(plots.top_keys(top, f"head {layer}.{head}: keys that receive the most attention"), key=f"{key}.keys")
    with right:
        st.dataframe(top, hide_index=True, key=f"{key}.keys_table")
    stats = seen.head_statistics(layer, head)
    figure(plots.prompt_statistics(stats, title=f"head {layer}.{head} by position"), key=f"{key}.stats")
    with st.expander("every statistic at every position"):
        st.dataframe(stats, hide_index=True, key=f"{key}.stats_table")
