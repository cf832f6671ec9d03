"""The Hopper kernel's machine code without a GPU: registers, spills and the instruction mix
of each softmax loop body, for every statistic set named (docs/benchmarks.md, "schedules
tried"). Triton compiles the kernel for sm_90 on the CPU (``compile_sm90``); the ``ptxas`` and
``cuobjdump`` bundled with Triton assemble and disassemble it. That ``ptxas`` must read the
PTX version Triton writes: Triton 3.6 works (``pip install triton==3.6.0`` in a separate
virtual environment, with torch).

    PYTHONPATH=. python docs/experiments/hopper_sass.py 64 plain all argmax
    PYTHONPATH=. python docs/experiments/hopper_sass.py 64 plain all --variant /tmp/variant.py

``--variant``: a copy of the kernel, or patches from ``variants/`` (``hopper_variant.py``).

``C75..`` in a report is ptxas saying it serialized the MMAs (docs/benchmarks.md says when).
A loop body is the range of a backward branch; the ones printed run the softmax (at least 32
``MUFU`` exponentials) and hold no such loop inside. Each consumer warpgroup has its own copy
of each loop: the free blocks' first, then the masked blocks'.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch
import triton
from hopper_variant import load  # beside this script

import kernels.hopper_attention
from kernels.benchmark.config import BREAKDOWN, ROW_STATS

#: Statistic sets by name: none, every row statistic, and each alone (the benchmark's rows).
SPECS = {"plain": None, "all": ROW_STATS, **BREAKDOWN}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*?(0x[0-9a-f]+)?\s*;")


def assemble(ptx: str) -> tuple[str, str]:
    """``(ptxas -v report, SASS listing)`` of one kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [os.path.join(_BIN, "ptxas"), "-v", "--gpu-name", "sm_90a", src, "-o", cubin]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        sass = subprocess.run(
            [os.path.join(_BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    return report, sass


Body = list[tuple[int, str, str | None, bool]]


def loop_bodies(sass: str) -> list[Body]:
    """The innermost loop bodies that compute exponentials (``MUFU``), as ``(address, opcode,
    last hex operand, predicated)`` in program order."""
    code = [(int(m[1], 16), m[3], m[4], bool(m[2])) for m in _INSTRUCTION.finditer(sass)]
    spans = {(int(t, 16), a) for a, op, t, _ in code if op == "BRA" and t and int(t, 16) < a}
    bodies = {(lo, hi): [c for c in code if lo <= c[0] <= hi] for lo, hi in sorted(spans)}
    softmax = [span for span, body in bodies.items() if sum(c[1] == "MUFU" for c in body) >= 32]
    return [
        bodies[(lo, hi)]
        for lo, hi in softmax
        if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) for lo2, hi2 in softmax)
    ]


def skip_path(body: Body) -> int:
    """Instructions of the body on the path that takes every forward conditional branch within
    it: the argmax's skip, where no row's max grew, and the accumulator's rescale's, where no
    row's subtracted max moved (the usual block of a long row)."""
    skipped, end = 0, body[-1][0]
    for address, op, target, predicated in body:
        if op == "BRA" and predicated and target and address < int(target, 16) <= end:
            skipped += sum(1 for c in body if address < c[0] < int(target, 16))
    return len(body) - skipped


def exponentials_before_pv_wait(body: Body) -> int:
    """How many ``MUFU`` come before the loop's PV wait: the first wait for every MMA
    (``WARPGROUP.DEPBAR.LE gsb0, 0x0``) after the QK wait (``0x1``, or ``0x2`` when the distance
    MMA rides with PV). All of them if the softmax overlaps PV; few if ptxas hoisted the wait."""
    waits = [(i, arg) for i, (_, op, arg, _) in enumerate(body) if op == "WARPGROUP" and arg in ("0x0", "0x1", "0x2")]
    qk = next((i for i, arg in waits if arg != "0x0"), -1)
    pv = next((i for i, arg in waits if arg == "0x0" and i > qk), len(body))
    return [c[1] for c in body[:pv]].count("MUFU")


def main(head_dim: int, names: list[str], kernel=kernels.hopper_attention) -> None:
    for name in names:
        report, sass = assemble(kernel.compile_sm90(head_dim, torch.bfloat16, SPECS[name]).asm["ptx"])
        spills = " ".join(re.findall(r"\d+ bytes spill (?:stores|loads)|C75\d\d", report))
        print(f"D = {head_dim}, {name}: {spills}")
        for body in loop_bodies(sass):
            counts = collections.Counter(c[1] for c in body)
            mix = " ".join(f"{op}:{n}" for op, n in counts.most_common(10))
            before = exponentials_before_pv_wait(body)
            print(
                f"  loop body, {len(body)} instructions ({skip_path(body)} on the skip path): {mix}; "
                f"{before} of {counts['MUFU']} MUFU before the PV wait"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("head_dim", type=int, choices=(64, 128))
    parser.add_argument("specs", nargs="*", default=["plain", "all"], help=", ".join(SPECS))
    parser.add_argument("--variant", help="a copy of the kernel (.py), or patch names a+b")
    args = parser.parse_args()
    main(args.head_dim, args.specs, load(args.variant) if args.variant else kernels.hopper_attention)
