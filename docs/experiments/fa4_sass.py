"""FlashAttention-4's Hopper forward, or the local copy of it that carries the row statistics
(fa4_stats.py), compiled without a GPU: the registers it asks for, and the size and spills of
its softmax loops (docs/benchmarks.md, "Route 2: every row statistic inside FlashAttention-4's
Hopper forward"). CuTe DSL compiles for sm_90a on the CPU in FlashAttention-4's fake-tensor
mode, keeps the cubin, and the ``cuobjdump`` in Triton's wheel disassembles it.

Needs a virtual environment with torch, triton 3.6, ``nvidia-cutlass-dsl`` (with its
``libs-base``, ``libs-core`` and ``libs-cu13`` wheels), ``apache-tvm-ffi``, ``torch-c-dlpack-ext``,
``quack-kernels``, ``einops`` and ``flash-attn-4`` (``--no-deps``); put the copy first on the path:

    PYTHONPATH=/tmp/fa4s:.:docs/experiments python docs/experiments/fa4_sass.py 64 \\
        --stats entropy,distance,argmax,masses --variant holder

The loops printed are those of ``hopper_sass.loop_bodies``: innermost, with at least 32
exponentials, in program order. docs/benchmarks.md quotes the second, the free blocks' loop.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

# CuTe DSL reads these when it is imported: the target, and where the compiled cubin goes.
_DUMP = tempfile.mkdtemp(prefix="fa4-sass-")
for name, value in (("FLASH_ATTENTION_ARCH", "sm_90"), ("CUTE_DSL_ARCH", "sm_90a"), ("FLASH_ATTENTION_NUM_SMS", "132")):
    os.environ.setdefault(name, value)
os.environ["CUTE_DSL_KEEP"], os.environ["CUTE_DSL_DUMP_DIR"] = "cubin", _DUMP

import torch  # noqa: E402
from fa4_stats import configure_copy  # noqa: E402  (beside this script)
from hopper_sass import _BIN, loop_bodies  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402


def compile_sass(head_dim: int, tile: tuple[int, int] | None) -> str:
    """SASS of FlashAttention-4's forward for bf16, causal, ``[1, 16384, 32, head_dim]``."""
    from flash_attn.cute.interface import _flash_attn_fwd

    with FakeTensorMode(allow_non_fake_inputs=True):
        q, k, v = (torch.empty(1, 16384, 32, head_dim, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        _flash_attn_fwd(q, k, v, causal=True, return_lse=True, **({"tile_mn": tile} if tile else {}))
    (cubin,) = (os.path.join(_DUMP, f) for f in os.listdir(_DUMP) if f.endswith(".cubin"))
    listing = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True)
    return listing.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("head_dim", type=int, choices=(64, 128))
    parser.add_argument("--stats", default="", help="the copy's _STATS: entropy,distance,argmax,masses")
    parser.add_argument("--out", default=None, help="the copy's _OUT (default: all with statistics, else lse)")
    parser.add_argument("--variant", default="", help="the copy's _VARIANT: holder,snapshot")
    parser.add_argument("--tile", default=None, help="query x key tile, e.g. 128,128 (default: FA4's own)")
    args = parser.parse_args()
    if args.stats or args.variant or args.out:
        import flash_attn.cute.softmax as copy

        configure_copy(copy, args.stats, args.out or ("all" if args.stats else "lse"), args.variant)
    tile = tuple(int(x) for x in args.tile.split(",")) if args.tile else None
    sass = compile_sass(args.head_dim, tile)
    registers = sorted({int(m, 16) for m in re.findall(r"USETMAXREG[^;]*?(0x[0-9a-f]+)\s*;", sass)})
    spills = sum(" STL" in line for line in sass.splitlines())
    print(f"D = {args.head_dim}, stats {args.stats or 'none'}, variant {args.variant or 'none'}, tile {tile or 'own'}")
    print(f"  setmaxnreg {', '.join(map(str, registers))} registers; {spills} spill stores in the kernel")
    for body in loop_bodies(sass):
        local = sum(op in ("LDL", "STL") for _, op, _, _ in body)
        print(f"  softmax loop: {len(body)} instructions, {local} local loads and stores")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(_DUMP, ignore_errors=True)
