"""Variants of the Hopper kernel: a copy of ``kernels/hopper_attention.py`` with patches from
``variants/`` applied, for ``hopper_ab.py`` to time beside the committed kernel and for
``hopper_sass.py`` to compile (docs/benchmarks.md says what each patch is).

    python docs/experiments/hopper_variant.py lane_sums packed_pairs -o /tmp/hop_lp.py

Patches apply in the order given (``packed_pairs``, ``lane_sums``, ``distance_before_pv`` in
that order, any subset); only their hunks for the kernel file are used (a patch may also carry
the test changes the kernel change needs, for when it is adopted with ``git apply``).
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
VARIANTS = Path(__file__).parent / "variants"


def write_variant(names: list[str], out: Path, root: Path = Path(".")) -> None:
    """Apply ``VARIANTS/<name>.patch`` for each name, in order, to a copy of the kernel at ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / KERNEL
        copy.parent.mkdir(parents=True)
        shutil.copy(root / KERNEL, copy)
        for name in names:
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
    parser.add_argument("patches", nargs="+", help=", ".join(sorted(p.stem for p in VARIANTS.glob("*.patch"))))
    parser.add_argument("-o", "--out", type=Path, required=True, help="where to write the variant (a .py file)")
    args = parser.parse_args()
    write_variant(args.patches, args.out)


if __name__ == "__main__":
    main()
