"""The explorer's Streamlit script: ``workbench app`` runs
``streamlit run app/main.py -- --runs DIR --saes DIR``.

The sidebar picks the page and the run; the address keeps both (``?page=Head+map&run=NAME``).
A page in the address that is not one of :data:`PAGES`, or a run name that is not a run folder
listed in the runs folder, is refused with a message; the address only ever picks among what
the explorer listed itself, so nothing it names is opened. Errors a user can cause show as
messages, never as tracebacks.
"""

from __future__ import annotations

import sys

import streamlit as st

from app import state
from app.views import ablation, compression, head_detail, heads, live, retrieval, runs, saes
from workbench.errors import WorkbenchError

PAGES = {
    "Runs": runs.render,
    "Head map": heads.render,
    "Head detail": head_detail.render,
    "Retrieval": retrieval.render,
    "Ablation": ablation.render,
    "Compression": compression.render,
    "SAE features": saes.render,
    "Live": live.render,
}


def choose_page() -> str:
    """The page selector; the first time from ``?page=`` (refused with a message unless it names a
    page), later from a page's request to switch."""
    if "page" not in st.session_state:
        asked = st.query_params.get("page")
        if asked is not None and asked not in PAGES:
            st.error(f"{state.shown(asked)} is not a page of the explorer (pages: {', '.join(PAGES)}); showing Runs.")
        st.session_state["page"] = asked if asked in PAGES else "Runs"
    if state.GOTO in st.session_state:
        st.session_state["page"] = st.session_state.pop(state.GOTO)
    return st.sidebar.radio("Page", list(PAGES), key="page")


def choose_run(ctx: state.Context) -> None:
    """The run selector; the first time from ``?run=``, refused unless it names a listed run."""
    for name, reason in ctx.broken:
        st.sidebar.warning(f"skipped {name}: {reason}")
    if not ctx.runs:
        return
    names = list(ctx.runs)
    asked = st.query_params.get("run")
    if "run" not in st.session_state or st.session_state["run"] not in names:
        if asked is not None and asked not in names:
            st.error(
                f"{state.shown(asked)} is not a run in the runs folder {ctx.folders.runs}; choose one in the sidebar."
            )
        st.session_state["run"] = asked if asked in names else names[0]
    ctx.run_name = st.sidebar.selectbox(
        "Run", names, key="run", format_func=lambda n: f"{n} ({ctx.runs[n].manifest['settings'].get('model')})"
    )


def main() -> None:
    st.set_page_config(page_title="Attention workbench", layout="wide")
    folders = state.parse_args(sys.argv[1:])
    st.sidebar.title("Attention workbench")
    page = choose_page()
    ctx = state.find_runs(folders)
    choose_run(ctx)
    try:
        PAGES[page](ctx)
    except WorkbenchError as exc:
        st.error(str(exc))
    except Exception as exc:  # a readable message instead of a traceback in the page
        st.error(f"Something went wrong on this page: {type(exc).__name__}: {exc}")
    st.query_params["page"] = page
    if ctx.run_name:
        st.query_params["run"] = ctx.run_name


main()
