"""The Streamlit explorer of run folders, heads, patterns, ablations and SAE features.

Layout only: data comes from :mod:`workbench` and :mod:`probes`, figures from
:mod:`workbench.plots`. Start it with ``workbench app [--runs DIR] [--port N]``.
"""
