"""The Hopper kernel's recorded variants (``docs/experiments/variants/*.patch``, compiled offline
and timed on a card, docs/benchmarks.md, kept to try again) still apply to the kernel, each alone
and all together, and all together build for sm_90."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.hopper_attention import GLUON_AVAILABLE

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "docs" / "experiments"
_spec = importlib.util.spec_from_file_location("hopper_variant", EXPERIMENTS / "hopper_variant.py")
hopper_variant = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hopper_variant)
ORDER = hopper_variant.ORDER


def test_every_recorded_variant_is_listed():
    assert sorted(p.stem for p in (EXPERIMENTS / "variants").glob("*.patch")) == sorted(ORDER)


def test_every_variant_applies_to_the_kernel(tmp_path):
    """Each recorded patch alone, and all of them named in reverse (none are recorded now)."""
    kernel = (ROOT / "kernels" / "hopper_attention.py").read_text()
    for names in [[name] for name in ORDER] + [list(reversed(ORDER))] * (len(ORDER) > 1):
        out = tmp_path / "variant.py"
        hopper_variant.write_variant(names, out)  # raises where a hunk does not match the kernel
        assert out.read_text() != kernel, names


def test_a_hunk_applies_only_where_its_old_lines_match_once():
    patch = (
        "diff --git a/k.py b/k.py\n--- a/k.py\n+++ b/k.py\n@@ -1,3 +1,3 @@\n"
        " a = 1\n-b = 2\n+b = 3\n c = 4\n"
        "diff --git a/other.py b/other.py\n--- a/other.py\n+++ b/other.py\n@@ -1 +1 @@\n-x\n+y\n"
    )
    assert hopper_variant.apply_patch("a = 1\nb = 2\nc = 4\nx\n", patch, "k.py") == "a = 1\nb = 3\nc = 4\nx\n"
    with pytest.raises(ValueError, match="matches 0 places"):
        hopper_variant.apply_patch("a = 1\nb = 5\nc = 4\n", patch, "k.py")
    with pytest.raises(ValueError, match="matches 2 places"):
        hopper_variant.apply_patch("a = 1\nb = 2\nc = 4\n" * 2, patch, "k.py")


def test_an_unknown_patch_fails(tmp_path):
    with pytest.raises(SystemExit, match="no_such_patch"):
        hopper_variant.write_variant(["no_such_patch"], tmp_path / "variant.py")


_BUILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from hopper_variant import load
from kernels import StatsSpec
kernel = load(sys.argv[2]).compile_sm90(64, torch.bfloat16, StatsSpec.every_row_statistic())
print(len(kernel.asm["cubin"]))
"""


@pytest.mark.skipif(not GLUON_AVAILABLE, reason="this Triton has no Gluon (Triton < 3.5)")
def test_the_variants_together_build_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # Gluon compiles only without it
    for together in ["+".join(ORDER)] if ORDER else []:
        run = subprocess.run(
            [sys.executable, "-c", _BUILD, str(EXPERIMENTS), together],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert int(run.stdout.split()[-1]) > 0  # the cubin's bytes
