"""The documentation cites only what exists: every repository path, ``file::test`` and relative
link in the README files and docs/ names a real file (and a real test)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Top-level folders whose paths the docs cite.
FOLDERS = ("kernels", "workbench", "probes", "app", "notebooks", "tests", "docs", ".ci")
_CODE = re.compile(r"`([^`\s]+)`")
_LINK = re.compile(r"\]\(([^)\s#]+)")


def documents(root: Path) -> list[Path]:
    return sorted({*root.glob("*.md"), *root.glob("docs/*.md"), *root.glob("*/README.md")})


def missing_citations(root: Path) -> list[str]:
    """``doc: citation`` for each cited path that does not exist. Cited are: backticked tokens
    that start with a top-level folder (``workbench/runs.py``, ``tests/x.py::test_y``, a path
    prefix such as ``notebooks/05_long_context``), backticked bare file names (``runs.py``: some
    file of that name exists), and relative Markdown links. Placeholders (``NAME``, ``<run>``,
    ``*``) are not paths."""
    names = {p.name for p in root.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}
    bad = []
    for doc in documents(root):
        text = doc.read_text()
        cited = [(t, root) for t in _CODE.findall(text)] + [(t, doc.parent) for t in _LINK.findall(text)]
        for token, base in cited:
            token = token.rstrip(".,:;)")
            if token.startswith(("http:", "https:", "mailto:")) or re.search(r"[*<>{}$]|\b[A-Z]{3,}\b", token):
                continue
            path, _, test = token.partition("::")
            if base is root and "/" not in path:
                if re.fullmatch(r"[\w.-]+\.(py|md|toml|ipynb)", path) and path not in names:
                    bad.append(f"{doc.relative_to(root)}: {token}")
                continue
            if base is root and path.split("/")[0] not in FOLDERS:
                continue
            target = base / path.rstrip("/")
            exists = target.exists() or any(target.parent.glob(target.name + "*"))
            if not exists or (test and f"def {test.split('[')[0]}(" not in target.read_text()):
                bad.append(f"{doc.relative_to(root)}: {token}")
    return bad


def test_docs_cite_only_files_and_tests_that_exist():
    assert missing_citations(ROOT) == []


def test_a_missing_file_or_test_is_caught(tmp_path):
    for folder in ("docs", "workbench", "tests"):
        (tmp_path / folder).mkdir()
    (tmp_path / "workbench" / "runs.py").write_text("")
    (tmp_path / "tests" / "test_runs.py").write_text("def test_resume():\n    pass\n")
    (tmp_path / "docs" / "a.md").write_text(
        "`workbench/runs.py` `workbench/gone.py` `tests/test_runs.py::test_resume` `tests/test_runs.py::test_gone` "
        "`runs.py` `lost.py` [ok](../workbench/runs.py) [lost](missing.md) `workbench/zoo/weights/NAME/` `runs/<run>`"
    )
    assert missing_citations(tmp_path) == [
        "docs/a.md: workbench/gone.py",
        "docs/a.md: tests/test_runs.py::test_gone",
        "docs/a.md: lost.py",
        "docs/a.md: missing.md",
    ]


def test_every_tracked_python_file_is_in_the_readme_layout():
    """The README's layout tree lists every module of the four packages (and nothing else)."""
    text = (ROOT / "README.md").read_text()
    tree = text[text.index("## Layout") :]
    tree = tree[tree.index("```") + 3 :]
    tree = tree[: tree.index("```")]
    listed = set(layout_paths(tree))
    tracked = subprocess.run(
        ["git", "ls-files", "kernels", "workbench", "probes", "app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    modules = {p for p in tracked if p.endswith(".py")}
    assert sorted(modules - listed) == [], "modules missing from the README layout"
    assert sorted(p for p in listed - modules if p.endswith(".py")) == [], "README lists modules that do not exist"


def layout_paths(tree: str) -> list[str]:
    """Paths of a ``tree``-style listing (``├── name`` lines, 4 columns per level, folders end
    in ``/``); the text after a name is its description."""
    paths, stack = [], []
    for line in tree.splitlines():
        match = re.match(r"^((?:[│ ] {3})*)[├└]── (\S+)", line)
        if not match:
            top = re.match(r"^(\S+/)\s", line + " ")
            if top:
                stack = [top.group(1)]
            continue
        depth = len(match.group(1)) // 4 + 1
        stack = stack[:depth] + [match.group(2)]
        paths.append("".join(stack))
    return paths
