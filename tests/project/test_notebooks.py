"""The notebooks run top to bottom (nbclient, offline, CPU), and are committed without outputs.

CI runs some of them with smaller values, papermill's way: a cell injected after the notebook's
cell tagged ``parameters`` (which holds the values readers run) sets :data:`CI_PARAMETERS`."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
#: Notebook -> the values CI runs it with (each cell still runs, and every assert in it holds).
CI_PARAMETERS = {
    # a 16K matrix would take 1 GiB, four times the notebook's bound on the peak's growth
    "05_long_context": {"LENGTHS": (4096, 8192, 16384)},
    # 9 fresh samples and 2 random sets per k: the top head still takes accuracy from 0.5 to < 0.1
    "03_retrieval_heads": {"ABLATION_SAMPLES": 3, "DRAWS": 2},
    # the planted model says the 5-token answer right away (its text goes on to a newline)
    "06_reproductions": {"ANSWER_TOKENS": 8},
}


def parameters_cell(book) -> int | None:
    """Index of the cell tagged ``parameters``, if any."""
    tagged = [i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) <= 1, "one parameters cell at most"
    return tagged[0] if tagged else None


def with_ci_parameters(book, name: str, values: dict | None = None):
    """The notebook with ``values`` (default: its :data:`CI_PARAMETERS`) injected after its
    parameters cell, each of which must be a name that cell assigns (so that a renamed parameter
    cannot quietly run the full size)."""
    values = CI_PARAMETERS.get(name) if values is None else values
    if not values:
        return book
    at = parameters_cell(book)
    assert at is not None, f"{name}: CI_PARAMETERS given, but no cell is tagged 'parameters'"
    tree = ast.parse(book.cells[at].source)
    assigned = {
        t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
    }
    assert set(values) <= assigned, f"{name}: the parameters cell does not set {sorted(set(values) - assigned)}"
    source = "# Injected by tests/project/test_notebooks.py: CI's values\n" + "\n".join(
        f"{key} = {value!r}" for key, value in values.items()
    )
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    book.cells.insert(at + 1, cell)
    return book


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5
    assert set(CI_PARAMETERS) <= {p.stem for p in NOTEBOOKS}


def test_ci_parameters_follow_the_parameters_cell():
    """The injected cell comes right after the cell tagged ``parameters``; a value the notebook
    does not define is refused."""
    for path in NOTEBOOKS:
        if path.stem in CI_PARAMETERS:
            book = with_ci_parameters(nbformat.read(path, as_version=4), path.stem)
            at = parameters_cell(book)
            assert book.cells[at + 1].metadata["tags"] == ["injected-parameters"]
            assert all(f"{key} = " in book.cells[at + 1].source for key in CI_PARAMETERS[path.stem])
    with pytest.raises(AssertionError, match="does not set"):
        with_ci_parameters(nbformat.read(NOTEBOOKS[0].parent / "05_long_context.ipynb", as_version=4), "05", {"N": 1})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs are committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's scratch run folders land here, not in /tmp
    book = with_ci_parameters(nbformat.read(path, as_version=4), path.stem)
    assert book.cells[0].cell_type == "markdown" and book.cells[-1].cell_type == "markdown"
    assert "What we found" in book.cells[-1].source
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
