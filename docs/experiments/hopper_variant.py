"""Variants of the Hopper kernel: a copy of ``kernels/hopper_attention.py`` with patches from
``variants/`` applied, for ``hopper_ab.py`` to time beside the committed kernel and for
``hopper_sass.py`` to compile (docs/benchmarks.md says what each patch is).

    python docs/experiments/hopper_variant.py lane_sums packed_pairs -o /tmp/hop_lp.py

Any subset applies, in the order of :data:`ORDER` whatever the order named; only the patches'
hunks for the kernel file are used (a patch may also carry the test changes the kernel change
needs, for when it is adopted with ``git apply``).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

KERNEL = "kernels/hopper_attention.py"
ROOT = Path(__file__).resolve().parents[2]  # the checkout
VARIANTS = Path(__file__).parent / "variants"
#: Every patch in VARIANTS, in the order they apply (each was written against the committed
#: kernel; where two touch nearby lines, the later one's context has the earlier's change).
ORDER = ("packed_pairs", "pairs_at_64", "lane_sums", "distance_before_pv", "thread_release", "three_consumers_noskip")


def write_variant(names: list[str], out: Path, root: Path = ROOT) -> None:
    """Apply ``VARIANTS/<name>.patch`` for each name (in :data:`ORDER`) to a copy of the kernel
    at ``out``."""
    unknown = set(names) - set(ORDER)
    if unknown:
        raise SystemExit(f"unknown patches {sorted(unknown)}; the patches are {', '.join(ORDER)}")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / KERNEL
        copy.parent.mkdir(parents=True)
        shutil.copy(root / KERNEL, copy)
        for name in sorted(set(names), key=ORDER.index):
            patch = (VARIANTS / f"{name}.patch").resolve()
            subprocess.run(["git", "apply", f"--include={KERNEL}", str(patch)], cwd=tmp, check=True)
        shutil.copy(copy, out)


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
