"""The Hopper kernel against the Triton kernel (``KERNELS_HOPPER=0``) at long lengths, every
statistic: the largest difference of each (docs/benchmarks.md, raw output in
docs/bench/hopper_long_compare.txt). Needs an sm_90 GPU.

    PYTHONPATH=. KERNELS_BLOCKS=64x64 python docs/experiments/hopper_long_compare.py
"""

import os
import time

import torch

from kernels import StatsSpec, attention


def timed_call(q, k, v, spec, hopper: bool):
    """One warm call, then one timed call, on the chosen kernel: ``(out, stats, ms)``."""
    os.environ["KERNELS_HOPPER"] = "1" if hopper else "0"
    attention(q, k, v, stats=spec)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out, st = attention(q, k, v, stats=spec)
    torch.cuda.synchronize()
    return out, st, 1e3 * (time.perf_counter() - start)


def main() -> None:
    torch.manual_seed(0)
    spec = StatsSpec.all(sink_tokens=4, window=64, offsets=(1, 4095))
    print("shape | stat | max abs diff (hopper - triton) | hopper ms | triton ms", flush=True)
    for n, d, hq, hkv in ((4096 + 77, 128, 8, 2), (32768, 64, 32, 8)):
        q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out_h, st_h, ms_h = timed_call(q, k, v, spec, hopper=True)
        out_t, st_t, ms_t = timed_call(q, k, v, spec, hopper=False)
        tag = f"N={n} D={d} Hq={hq} Hkv={hkv}"
        print(f"{tag} | out | {(out_h.float() - out_t.float()).abs().max().item():.2e} | {ms_h:.1f} | {ms_t:.1f}")
        for name, a in st_h.items():
            b = getattr(st_t, name)
            if name == "argmax":
                print(f"{tag} | argmax | {(a != b).float().mean().item():.2e} (share of rows that differ)")
            else:
                print(f"{tag} | {name} | {(a.double() - b.double()).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
