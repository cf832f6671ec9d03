"""``kernels.attention(backend="cute")`` beside ``backend="triton"`` (the Gluon kernel on
Hopper) and cuDNN SDPA, through the library's own entry point (host work included): bf16,
causal, B = 1, H = 32, ``do_bench`` medians, plain and with every row statistic; a table last
(docs/benchmarks.md, route 2 in the library). Needs an sm_90 GPU and ``nvidia-cutlass-dsl``:

    python docs/experiments/cute_backend.py [--lengths 16384,32768] [--group 1]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # hopper_ab beside this script
from hopper_ab import median_ms, problem  # noqa: E402

from kernels import StatsSpec, attention  # noqa: E402


def sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--group", type=int, default=1, help="query heads a key/value head")
    args = parser.parse_args()
    every = StatsSpec.every_row_statistic()
    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
    table = ["| N | D | call | ms | SDPA / call |", "| --- | --- | --- | --- | --- |"]
    for n in (int(x) for x in args.lengths.split(",")):
        for d in (128, 64):
            q, k, v, _ = problem(n, d, hq=32, hkv=32 // args.group)
            calls = {"SDPA (cuDNN)": functools.partial(sdpa, q, k, v)}
            for backend in ("triton", "cute"):
                for name, spec in (("plain", None), ("every row statistic", every)):
                    call = functools.partial(attention, q, k, v, stats=spec, backend=backend)
                    start = time.time()
                    call()  # compiles
                    torch.cuda.synchronize()
                    print(f"N = {n} D = {d} {backend} {name}: first call {time.time() - start:.1f} s", flush=True)
                    calls[f"{backend}, {name}"] = call
            times = {name: median_ms(call) for name, call in calls.items()}
            base = times["SDPA (cuDNN)"]
            table += [f"| {n} | {d} | {name} | {t:.3f} | {base / t:.3f}x |" for name, t in times.items()]
            print("\n".join(table[-len(times) :]), flush=True)
    print("\n".join(table))


if __name__ == "__main__":
    main()
