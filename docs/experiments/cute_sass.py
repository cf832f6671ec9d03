"""The library's CuTe DSL builds (:func:`kernels.cute_attention.build`) compiled without a GPU,
with the lengths, head counts and batch dynamic as the library marks them: registers, local
(spilled) memory ops, and the instructions of each softmax loop (``hopper_sass.loop_bodies``:
innermost loops with at least 32 exponentials, in program order). For changes that should
leave the kernel's inner loops alone (docs/benchmarks.md, "Route 2 on the card").

Needs ``nvidia-cutlass-dsl`` and triton (for its ``cuobjdump``) in one environment:

    PYTHONPATH=.:docs/experiments python docs/experiments/cute_sass.py [--layout token]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

_DUMP = tempfile.mkdtemp(prefix="cute-sass-")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
os.environ["CUTE_DSL_KEEP"], os.environ["CUTE_DSL_DUMP_DIR"] = "cubin", _DUMP

import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
from cute_fwd import fake_arguments  # noqa: E402
from cutlass.cute.runtime import make_fake_stream  # noqa: E402
from hopper_sass import _BIN, loop_bodies  # noqa: E402  (beside this script)

from kernels.cute_attention import DIM_ORDERS, Masses, build, row_fields  # noqa: E402
from kernels.cute_forward import WarpSpecializedForward  # noqa: E402


def compile_sass(head_dim: int, stats: bool, layout: str, group: int = 1) -> str:
    """The SASS of the library's build of one head dim, with every row statistic or without."""
    for f in os.listdir(_DUMP):
        os.remove(os.path.join(_DUMP, f))
    masses = Masses() if stats else None
    kernel = WarpSpecializedForward(head_dim, group, masses=masses, **build(head_dim, stats))
    args = fake_arguments(head_dim, len(row_fields(masses)), layout)
    cute.compile(kernel, *args, cutlass.Float32(head_dim**-0.5), make_fake_stream())
    (cubin,) = (os.path.join(_DUMP, f) for f in os.listdir(_DUMP) if f.endswith(".cubin"))
    res = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True)
    sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True)
    return res.stdout + sass.stdout


def summary(sass: str) -> str:
    """Registers, local memory ops and the softmax loops' instruction counts of one listing."""
    registers = sass.split("REG:")[1].split()[0] if "REG:" in sass else "?"
    local = sum(
        op in ("LDL", "STL") for op in (line.split()[1] if len(line.split()) > 1 else "" for line in sass.splitlines())
    )
    loops = [len(body) for body in loop_bodies(sass)]
    return f"registers {registers}, local ops {local}, softmax loops {loops}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(DIM_ORDERS), default="head", help="q, k and v's memory layout")
    args = parser.parse_args()
    for d in (128, 64):
        for stats in (False, True):
            print(
                f"D = {d}, {'every row statistic' if stats else 'plain'}, {args.layout}-major:",
                summary(compile_sass(d, stats, args.layout)),
                flush=True,
            )
