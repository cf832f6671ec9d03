"""The library's CuTe DSL builds (:func:`kernels.cute_attention.build`), or ``cute_fwd.py``'s,
compiled without a GPU for arguments typed as the library passes them (``cute_fwd.
fake_arguments``): registers, local (spilled) memory ops, and each softmax loop's
instructions (``hopper_sass.loop_bodies``: innermost loops with at least 32 exponentials, in
program order), all of them and on the path that skips every forward branch
(``hopper_sass.skip_path``). For changes meant to leave the inner loops alone, or to shorten
them (docs/benchmarks.md, "Route 2 offline").

Needs ``nvidia-cutlass-dsl`` and triton (for its ``cuobjdump``) in one environment:

    PYTHONPATH=.:docs/experiments python docs/experiments/cute_sass.py [--kernels step4p,...]
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
from cute_fwd import KERNELS, fake_arguments  # noqa: E402
from cutlass.cute.runtime import make_fake_stream  # noqa: E402
from hopper_sass import _BIN, loop_bodies, skip_path  # noqa: E402  (beside this script)

from kernels.cute_attention import Masses  # noqa: E402
from kernels.cute_forward import library_kernel  # noqa: E402


def compile_sass(kernel) -> str:
    """``cuobjdump``'s resource usage and SASS of ``kernel``."""
    for f in os.listdir(_DUMP):
        os.remove(os.path.join(_DUMP, f))
    args = fake_arguments(kernel.d, kernel.fields)
    cute.compile(kernel, *args, cutlass.Float32(kernel.d**-0.5), make_fake_stream())
    (cubin,) = (os.path.join(_DUMP, f) for f in os.listdir(_DUMP) if f.endswith(".cubin"))
    res = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True)
    sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True)
    return res.stdout + sass.stdout


def summary(sass: str) -> str:
    """Registers, local memory ops and each softmax loop's instructions (all, and on the path
    that skips the argmax rescan and the rescale where no row's max moved) of one listing."""
    registers = sass.split("REG:")[1].split()[0] if "REG:" in sass else "?"
    ops = (line.split()[1] if len(line.split()) > 1 else "" for line in sass.splitlines())
    local = sum(op in ("LDL", "STL") for op in ops)
    loops = ", ".join(f"{len(body)}/{skip_path(body)}" for body in loop_bodies(sass))
    return f"registers {registers}, local ops {local}, softmax loops (all/skip path) {loops}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kernels", help=f"comma list of cute_fwd.py's builds ({', '.join(KERNELS)}); default the library's"
    )
    args = parser.parse_args()
    for d in (128, 64):
        if args.kernels:
            builds = {name: KERNELS[name](d, 1) for name in args.kernels.split(",")}
        else:
            builds = {"plain": library_kernel(d, 1, None), "every row statistic": library_kernel(d, 1, Masses())}
        for name, kernel in builds.items():
            print(f"D = {d}, {name}:", summary(compile_sass(kernel)), flush=True)
