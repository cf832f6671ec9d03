"""Where a whole-model forward's GPU time goes: SDPA against the instrumented forward, kernel
by kernel (issue 19's whole-model target; docs/benchmarks.md).

Profiles one forward of each variant (after the benchmark's own warm-up) with torch.profiler
and prints each variant's CUDA time by kernel group, then the largest kernels of each.

    python docs/experiments/model_profile.py [--model random:llama-3.2-1b] [--lengths 32768,131072]
"""

from __future__ import annotations

import argparse
import collections
import re

import torch
from torch.profiler import ProfilerActivity, profile

from workbench.instrument import DEFAULT_STATS, instrument
from workbench.model_benchmark import measure_forward
from workbench.models import load_model

#: Kernel groups, first match wins: (group, pattern of the kernel's name).
GROUPS = [
    ("attention (ours)", r"_hopper_fwd|_attn_fwd|_fwd_kernel|key_mass"),
    ("attention (SDPA)", r"cudnn|fmha|flash|sdpa"),
    ("matmul", r"gemm|nvjet|xmma|cutlass"),
    ("copy", r"copy|Copy|contiguous|cat"),
    ("elementwise", r"elementwise|vectorized|reduce|Reduce"),
]


def group(name: str) -> str:
    for label, pattern in GROUPS:
        if re.search(pattern, name):
            return label
    return "other"


def profiled(model, ids: torch.Tensor, recorded: bool) -> collections.Counter:
    """CUDA microseconds by kernel name over one forward."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        if recorded:
            with instrument(model, DEFAULT_STATS):
                model(ids, logits_to_keep=1)
        else:
            model(ids, logits_to_keep=1)
        torch.cuda.synchronize()
    times: collections.Counter = collections.Counter()
    for event in prof.key_averages():  # kernels carry self device time; the CPU ops above them none
        if event.self_device_time_total > 0:
            times[event.key] += event.self_device_time_total
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3.2-1b")
    parser.add_argument("--lengths", default="32768,131072")
    args = parser.parse_args()
    model = load_model(args.model, dtype=torch.bfloat16)
    for n in (int(x) for x in args.lengths.split(",")):
        walls = {v: measure_forward(model, n, v).seconds for v in ("sdpa", "recorded")}
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).cuda()
        by_variant = {v: profiled(model, ids, v == "recorded") for v in ("sdpa", "recorded")}
        print(
            f"\n== {n} tokens: wall s sdpa {walls['sdpa']:.4f}, recorded {walls['recorded']:.4f} "
            f"({walls['recorded'] / walls['sdpa']:.3f}x)"
        )
        labels = [g for g, _ in GROUPS] + ["other"]
        print("| group | sdpa ms | recorded ms |")
        print("| --- | --- | --- |")
        totals = {}
        for v, times in by_variant.items():
            sums = collections.Counter()
            for name, us in times.items():
                sums[group(name)] += us
            totals[v] = sums
        for g in labels + ["total"]:
            row = [sum(totals[v].values()) if g == "total" else totals[v][g] for v in ("sdpa", "recorded")]
            print(f"| {g} | {row[0] / 1e3:.2f} | {row[1] / 1e3:.2f} |")
        for v, times in by_variant.items():
            print(f"-- {v}: largest kernels (ms, count not kept)")
            for name, us in times.most_common(12):
                print(f"  {us / 1e3:9.2f}  [{group(name)}] {name[:110]}")


if __name__ == "__main__":
    main()
