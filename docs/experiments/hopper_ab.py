"""A/B of Hopper kernel variants on one GPU: each variant is a copy of
``kernels/hopper_attention.py`` with a change, checked against the committed kernel and timed
beside it and cuDNN SDPA in one process (docs/benchmarks.md's A/B tables).

    python docs/experiments/hopper_ab.py /tmp/variant_a.py /tmp/variant_b.py --specs argmax,all
    python docs/experiments/hopper_ab.py NAME_A+NAME_B --specs plain,all --dims 64

A variant not ending in ``.py`` names patches in ``variants/``, joined by ``+``
(``hopper_variant.py``).

Checks, on five shapes (N = 128 to 4173, grouped-query heads, fp16 and bf16, every row
statistic): the largest difference of the output and of each statistic from the committed
kernel, how many argmax rows differ, and rows whose argmax does not hold a float64 maximum;
then exact ties (identical keys) must go to the earliest key. Timing: bf16, causal, B = 1,
H = 32, ``triton.testing.do_bench`` medians; ratios are SDPA's time over each variant's.
Compile the variants offline first (docs/experiments/hopper_sass.py) to catch spills.
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from types import ModuleType

import torch
import torch.nn.functional as F
from hopper_sass import SPECS  # beside this script: the benchmark's statistic sets by name
from hopper_variant import load
from triton.testing import do_bench

import kernels.hopper_attention as committed
from kernels import StatsSpec, attention
from kernels.validate import Problem

FIELDS = ("lse", "entropy", "max_prob", "sink_mass", "local_mass", "distance", "offset_mass")
SHAPES = ((128, 64, torch.bfloat16), (200, 128, torch.float16), (1300, 64, torch.bfloat16), (4173, 128, torch.bfloat16))
SHAPES += ((257, 128, torch.bfloat16),)


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def problem(n: int, d: int, hq: int = 8, hkv: int = 2, dtype=torch.bfloat16, seed: int = 0):
    """q, k, v ``[1, H, n, d]`` on the GPU and their causal :class:`Problem`."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
    return q, k, v, Problem(1, hq, hkv, n, n, d, d**-0.5, True)


def scores64(q: torch.Tensor, k: torch.Tensor, p: Problem) -> torch.Tensor:
    """Causal float64 scores ``[1, Hq, n, n]``, -inf above the diagonal."""
    n = p.n_q
    s = (q.double() @ k.repeat_interleave(p.q_heads // p.kv_heads, 1).double().transpose(-1, -2)) * p.scale
    return s.masked_fill(torch.ones(n, n, device=s.device, dtype=torch.bool).triu(1), -math.inf)


def check(name: str, module: ModuleType) -> None:
    """Print how far ``module`` is from the committed kernel, and its exact-tie rows."""
    every = SPECS["all"]
    worst: dict[str, float] = {}
    differ = off_max = 0
    for n, d, dtype in SHAPES:
        q, k, v, p = problem(n, d, dtype=dtype, seed=n)
        out0, st0 = committed.hopper_attention(q, k, v, p, every)
        out1, st1 = module.hopper_attention(q, k, v, p, every)
        worst["out"] = max(worst.get("out", 0.0), (out0.float() - out1.float()).abs().max().item())
        for f in FIELDS:
            worst[f] = max(worst.get(f, 0.0), (getattr(st0, f) - getattr(st1, f)).abs().max().item())
        differ += int((st0.argmax != st1.argmax).sum())
        s = scores64(q, k, p)
        chosen = s.gather(-1, st1.argmax.unsqueeze(-1)).squeeze(-1)
        off_max += int((chosen < s.amax(-1) - 1e-6 * s.abs().amax(-1)).sum())
    q, k, v, p = problem(700, 128, hq=4, hkv=1, seed=1)
    k[:, :, 300:] = k[:, :, 299:300]  # keys 299.. identical, positive scores from row 299 on
    q[:, :, 299:], k[:, :, 299:] = q[:, :, 299:].abs(), k[:, :, 299:].abs()
    _, st = module.hopper_attention(q, k, v, p, StatsSpec(argmax=True))
    ties = int((st.argmax[:, :, 299:] != scores64(q, k, p).argmax(-1)[:, :, 299:]).sum())  # torch takes the first
    diffs = " ".join(f"{f}={w:.1e}" for f, w in worst.items())
    print(f"  {name}: {diffs} argmax_differs={differ} argmax_off_max={off_max} tie_rows_wrong={ties}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="copies of kernels/hopper_attention.py, or patch names a+b")
    parser.add_argument("--specs", default="plain,distance,all", help=f"comma list of {', '.join(SPECS)}")
    parser.add_argument("--dims", default="128,64", help="head dims (default 128,64)")
    parser.add_argument("--length", type=int, default=16384, help="tokens N (default 16384)")
    args = parser.parse_args()
    modules = {"committed": committed} | {m.__name__: m for m in map(load, args.variants)}

    print("== against the committed kernel (every row statistic)")
    for name, module in list(modules.items())[1:]:
        check(name, module)
    print(f"== timing (ms), bf16 causal B=1 H=32 N={args.length}")
    rows = []
    for d in (int(x) for x in args.dims.split(",")):
        q, k, v, p = problem(args.length, d, hq=32, hkv=32)
        sdpa = median_ms(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True))
        routed = median_ms(partial(attention, q, k, v, causal=True, backend="triton"))
        rows.append((d, "routed", "plain", routed, sdpa / routed))
        for name, module in modules.items():
            for label in args.specs.split(","):
                t = median_ms(partial(module.hopper_attention, q, k, v, p, SPECS[label]))
                rows.append((d, name, label, t, sdpa / t))
                print(f"  D={d} {name:14s} {label:7s} {t:.3f} ms  {sdpa / t:.3f}x", flush=True)
    print("| D | variant | statistics | ms | SDPA / variant |\n| --- | --- | --- | --- | --- |")
    for d, name, label, t, ratio in rows:
        print(f"| {d} | {name} | {label} | {t:.3f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
