"""Variants of the Hopper kernel: a copy of ``kernels/hopper_attention.py`` with patches from
``variants/`` applied, for ``hopper_ab.py`` to time beside the committed kernel and for
``hopper_sass.py`` to compile (docs/benchmarks.md says what each patch is).

    python docs/experiments/hopper_variant.py NAME_A NAME_B -o /tmp/variant.py

Any subset applies, in the order of :data:`ORDER` whatever the order named; only the patches'
hunks for the kernel file are used (a patch may also carry the test changes the kernel change
needs, for when it is adopted with ``git apply``). The hunks are applied here, in Python (each
one's old lines must match exactly, once), so that the device machine needs no ``git``.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType

KERNEL = "kernels/hopper_attention.py"
ROOT = Path(__file__).resolve().parents[2]  # the checkout
VARIANTS = Path(__file__).parent / "variants"
#: Every patch in VARIANTS, in the order they apply (each was written against the committed
#: kernel; where two touch nearby lines, the later one's context has the earlier's change).
#: lazy_rescale, level or slower on the H200 (docs/benchmarks.md), is kept for other cards;
#: argmax_quad_in_branch and masses_in_masked_blocks, timed slower, are in git at 5ef1669,
#: lane_sums at 9e8ae63, earlier patches at b1e244a.
ORDER: tuple[str, ...] = ("lazy_rescale",)


def apply_patch(text: str, patch: str, path: str = KERNEL) -> str:
    """``text`` with the hunks of unified diff ``patch`` that change ``path`` applied: each
    hunk's old lines (context and removed) must occur exactly once in the text as it stands."""
    for section in re.split(r"^diff --git ", patch, flags=re.M):
        if not section.startswith(f"a/{path} "):
            continue
        for hunk in re.split(r"^@@ [^\n]*@@[^\n]*\n", section, flags=re.M)[1:]:
            lines = [line for line in hunk.splitlines(keepends=True) if line[:1] in (" ", "-", "+")]
            old = "".join(line[1:] for line in lines if line[0] != "+")
            new = "".join(line[1:] for line in lines if line[0] != "-")
            if text.count(old) != 1:
                raise ValueError(f"a hunk of the patch matches {text.count(old)} places of {path}:\n{old}")
            text = text.replace(old, new)
    return text


def write_variant(names: list[str], out: Path, root: Path = ROOT) -> None:
    """Apply ``VARIANTS/<name>.patch`` for each name (in :data:`ORDER`) to a copy of the kernel
    at ``out``."""
    unknown = set(names) - set(ORDER)
    if unknown:
        raise SystemExit(f"unknown patches {sorted(unknown)}; the patches are {', '.join(ORDER)}")
    text = (root / KERNEL).read_text()
    for name in sorted(set(names), key=ORDER.index):
        text = apply_patch(text, (VARIANTS / f"{name}.patch").read_text())
    out.write_text(text)


def load(variant: str) -> ModuleType:
    """Import a variant under its file's name (its Gluon kernels compile separately): a copy of
    the kernel (``*.py``), or patch names joined by ``+``, written first (:func:`write_variant`)."""
    if not variant.endswith(".py"):
        out = Path(tempfile.mkdtemp()) / f"{variant}.py"
        write_variant(variant.split("+"), out)
        variant = str(out)
    spec = importlib.util.spec_from_file_location(Path(variant).stem, variant)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patches", nargs="+", help=", ".join(ORDER))
    parser.add_argument("-o", "--out", type=Path, required=True, help="where to write the variant (a .py file)")
    args = parser.parse_args()
    write_variant(args.patches, args.out)


if __name__ == "__main__":
    main()
