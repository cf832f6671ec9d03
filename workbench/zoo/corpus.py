"""An offline training corpus of natural text, assembled from what is installed on the machine.

No download is possible where the zoo is trained, yet sinks need about 100M tokens of
training text to appear (Gu et al. 2025). Installed software carries that much prose:

- ``python``: docstrings and comment blocks of every ``.py`` file of the installed Python
  distributions and the standard library (parsed with :mod:`ast` and :mod:`tokenize`; the code
  itself is left out);
- ``docs``: ``.md``, ``.rst`` and ``.txt`` files inside those distributions;
- ``debian``: ``/usr/share/doc`` (READMEs, changelogs, ``.gz`` included).

Paragraphs (blank-line separated) are kept once, by the first file in a fixed order, so licence
texts and generated docstrings repeated across files count once. Documents are then shuffled
with a fixed seed, so that any stretch of the corpus mixes sources, and written as UTF-8 bytes
(the zoo's tokenizer has one token per byte: the corpus's size in bytes is its size in tokens).

The corpus depends on what is installed, so ``manifest.json`` beside it records the sources,
their sizes, the package versions and the corpus's SHA-256; a model's ``metrics.json`` names
that hash. Build with ``workbench zoo corpus --out DIR``.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import random
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from tqdm.auto import tqdm

from workbench.errors import WorkbenchError

DOC_SUFFIXES = (".md", ".rst", ".txt")
#: Paragraphs shorter than this (in characters) are dropped: argument stubs, "TODO", rulers.
MIN_PARAGRAPH = 40
#: Files larger than this are skipped (generated tables and vendored data, not prose).
MAX_FILE_BYTES = 2_000_000
CORPUS_FILE = "corpus.txt"
MANIFEST_FILE = "manifest.json"


def python_prose(source: str) -> list[str]:
    """The docstrings and comment blocks of one Python file, in source order.

    Consecutive comment lines form one block; a ``#!`` line and ``# noqa``-style pragmas are
    dropped. A file that does not parse gives its comments only.
    """
    pieces: list[tuple[int, str]] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    line = node.body[0].lineno if node.body else 0
                    pieces.append((line, doc))
    block: list[str] = []
    block_line = 0
    last_line = -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            if tok.string.startswith("#!") or text.startswith(("noqa", "type:", "pragma", "fmt:", "pylint", "-*-")):
                continue
            if tok.start[0] != last_line + 1 and block:
                pieces.append((block_line, " ".join(block)))
                block = []
            if not block:
                block_line = tok.start[0]
            block.append(text)
            last_line = tok.start[0]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    if block:
        pieces.append((block_line, " ".join(block)))
    return [text for _, text in sorted(pieces, key=lambda p: p[0])]


def paragraphs(text: str) -> list[str]:
    """Blank-line (or whitespace-line) separated paragraphs with their lines' trailing spaces removed, at least
    :data:`MIN_PARAGRAPH` characters long."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        para = "\n".join(line.rstrip() for line in para.strip("\n").splitlines())
        if len(para.strip()) >= MIN_PARAGRAPH:
            out.append(para)
    return out


@dataclass
class Source:
    """One kind of input and what it contributed."""

    name: str
    files: int = 0
    paragraphs: int = 0
    bytes: int = 0
    examples: list[str] = field(default_factory=list)


def distribution_files() -> Iterator[tuple[str, Path]]:
    """``(distribution, file)`` for every file of every installed distribution, then the
    standard library (``stdlib``), in sorted order; each file once."""
    seen: set[Path] = set()
    dists = sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        name = (dist.metadata["Name"] or "unknown").lower()
        for rel in sorted(str(f) for f in dist.files or ()):
            if ".dist-info/" in rel or ".egg-info/" in rel:  # packaging metadata, not prose
                continue
            path = Path(dist.locate_file(rel)).resolve()
            if path not in seen and path.is_file():
                seen.add(path)
                yield name, path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" not in path.parts and path.resolve() not in seen:
            seen.add(path.resolve())
            yield "stdlib", path


def debian_files(root: Path = Path("/usr/share/doc")) -> Iterator[Path]:
    """Readable text files under ``root`` (``.gz`` included), in sorted order."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.suffix not in (".png", ".gif", ".jpg", ".svg", ".pdf"):
            yield path


def read_text(path: Path) -> str | None:
    """A file's text (``.gz`` decompressed) if it is UTF-8 and not too large, else None."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        if b"\0" in data[:4096] or len(data) > 4 * MAX_FILE_BYTES:
            return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def documents(
    files: Iterable[tuple[str, Path]], debian: Iterable[Path], progress: bool = True
) -> tuple[list[str], dict[str, Source]]:
    """Deduplicated documents (one per input file that keeps a paragraph) and per-source counts."""
    sources = {name: Source(name) for name in ("python", "docs", "debian")}
    seen: set[bytes] = set()
    docs: list[str] = []

    def add(kind: str, texts: Iterable[str]) -> None:
        kept = []
        for text in texts:
            for para in paragraphs(text):
                key = hashlib.blake2b(para.encode(), digest_size=16).digest()
                if key not in seen:
                    seen.add(key)
                    kept.append(para)
        if kept:
            doc = "\n\n".join(kept)
            docs.append(doc)
            src = sources[kind]
            src.files += 1
            src.paragraphs += len(kept)
            src.bytes += len(doc.encode())
            if len(src.examples) < 3 and len(doc) > 200:
                src.examples.append(doc[:200])

    inputs = [("python" if p.suffix == ".py" else "docs", p) for _, p in files if p.suffix in (".py", *DOC_SUFFIXES)]
    inputs += [("debian", p) for p in debian]
    for kind, path in tqdm(inputs, desc="reading", disable=not progress, unit="file"):
        text = read_text(path)
        if text is not None:
            add(kind, python_prose(text) if kind == "python" else [text])
    return docs, sources


def build_corpus(
    out: Path, seed: int = 0, min_bytes: int = 0, max_bytes: int | None = None, progress: bool = True
) -> dict:
    """Write ``out/corpus.txt`` and ``out/manifest.json``; return the manifest.

    ``max_bytes``: keep the shuffled documents up to this size. Refused
    (:class:`WorkbenchError`) when the corpus is smaller than ``min_bytes``.
    """
    docs, sources = documents(distribution_files(), debian_files(), progress)
    random.Random(seed).shuffle(docs)
    data = "\n\n".join(docs).encode()
    if max_bytes is not None and len(data) > max_bytes:
        cut = data.rfind(b"\n\n", 0, max_bytes)
        data = data[: cut if cut > 0 else max_bytes]
    if len(data) < min_bytes:
        raise WorkbenchError(
            f"the installed software holds {len(data) / 1e6:.1f} MB of prose, less than the "
            f"{min_bytes / 1e6:.0f} MB asked for: install documentation packages or more Python distributions"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CORPUS_FILE).write_bytes(data)
    manifest = {
        "bytes": len(data),
        "max_bytes": max_bytes,
        "sha256": hashlib.sha256(data).hexdigest(),
        "documents": len(docs),
        "seed": seed,
        "python": sys.version.split()[0],
        "sources": {name: {k: v for k, v in vars(s).items() if k != "name"} for name, s in sources.items()},
        "distributions": sorted(
            f"{(d.metadata['Name'] or 'unknown').lower()}=={d.version}" for d in metadata.distributions()
        ),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


def load_corpus(folder: Path) -> tuple[bytes, dict]:
    """The corpus bytes and manifest from a :func:`build_corpus` folder; checks the hash."""
    folder = Path(folder)
    path = folder / CORPUS_FILE
    if not path.exists():
        raise WorkbenchError(f"no corpus in {folder}: build one with `workbench zoo corpus --out {folder}`")
    data = path.read_bytes()
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise WorkbenchError(f"{path} does not match its manifest's SHA-256: rebuild it")
    return data, manifest
