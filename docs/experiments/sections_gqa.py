"""Section size at Llama-3.2-1B's heads (D = 64, 32 query / 8 key-value heads): the Hopper
kernel with every row statistic, its L2 budget scaled (issue 19; docs/benchmarks.md).

    PYTHONPATH=. python docs/experiments/sections_gqa.py
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import kernels.hopper_attention as hopper
from kernels import StatsSpec, attention

SCALES = (0.5, 1.0, 2.0, 4.0)


def main() -> None:
    l2 = hopper._l2_bytes(torch.device("cuda"))
    spec = StatsSpec.every_row_statistic()
    print(f"L2 {l2 / 2**20:.0f} MiB")
    print("| N | SDPA ms | " + " | ".join(f"L2 x {s}" for s in SCALES) + " |")
    print("| --- " * (len(SCALES) + 2) + "|")
    for n in (32768, 131072):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, h, n, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (32, 8, 8))
        sdpa = do_bench(
            functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True),
            warmup=10,
            rep=300,
            return_mode="median",
        )
        cells = []
        for scale in SCALES:
            hopper._l2_bytes = lambda device, scale=scale: int(l2 * scale)
            ms = do_bench(functools.partial(attention, q, k, v, stats=spec), warmup=10, rep=300, return_mode="median")
            cells.append(f"{ms:.3f} ({sdpa / ms:.3f}x)")
        print(f"| {n} | {sdpa:.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
