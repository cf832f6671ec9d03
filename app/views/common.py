"""Small layout pieces several pages use."""

from __future__ import annotations

import math

import streamlit as st


def figure(fig, key: str | None = None, **kwargs):
    """A plotly figure of :mod:`workbench.plots` at its own size."""
    return st.plotly_chart(fig, width="content", key=key, **kwargs)


def number(value) -> str:
    """A table value for a metric: 3 decimals, "n/a" for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
