"""Token-major inputs read in place against copied to head-major (issue 19; docs/benchmarks.md).

A model hands attention q, k, v as ``[B, N, H, D]`` storage seen through a transpose, and
transposes the output back to ``[B, N, H, D]`` contiguous. This times, on the Hopper kernel
with and without every row statistic: the kernel alone on head-major inputs; token-major
inputs read in place with a token-major output (the library now); and the copies the library
made before (``.contiguous()`` of q, k, v, and of the transposed output). cuDNN SDPA takes the
same token-major inputs and its output goes through the same transpose and ``.contiguous()``.

    PYTHONPATH=. python docs/experiments/layout_ab.py
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from kernels import StatsSpec, attention

SHAPES = [(32768, 64, 32, 8), (16384, 128, 32, 32)]  # (N, D, Hq, Hkv): Llama-3.2-1B's heads, and MHA


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def sdpa(q, k, v) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).contiguous()


def in_place(q, k, v, spec) -> torch.Tensor:
    return attention(q, k, v, stats=spec)[0].transpose(1, 2).contiguous()


def copied(q, k, v, spec) -> torch.Tensor:
    return attention(q.contiguous(), k.contiguous(), v.contiguous(), stats=spec)[0].transpose(1, 2).contiguous()


def main() -> None:
    columns = ["N", "D", "Hq/Hkv", "statistics", "SDPA ms", "head-major, kernel alone", "token-major, in place"]
    print("| " + " | ".join(columns + ["token-major, copied"]) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for n, d, hq, hkv in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
            for h in (hq, hkv, hkv)
        )
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        base = median_ms(functools.partial(sdpa, q, k, v))
        for name, spec in (("plain", None), ("every row statistic", StatsSpec.every_row_statistic())):
            out, _ = attention(q, k, v, stats=spec)
            assert out.transpose(1, 2).is_contiguous() and torch.equal(out, attention(qc, kc, vc, stats=spec)[0])
            times = [
                median_ms(functools.partial(attention, qc, kc, vc, stats=spec)),
                median_ms(functools.partial(in_place, q, k, v, spec)),
                median_ms(functools.partial(copied, q, k, v, spec)),
            ]
            ratios = " | ".join(f"{t:.3f} ms ({base / t:.3f}x)" for t in times)
            print(f"| {n} | {d} | {hq}/{hkv} | {name} | {base:.3f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
