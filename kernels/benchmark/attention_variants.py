"""Speed of the attention variants in the Triton kernels (GPU): ``python -m
kernels.benchmark.attention_variants [--length N] [--window W] [--dim D]``.

Causal bfloat16 attention, batch 1, 32 heads, each variant of :func:`kernels.attention` alone
and all together, with and without row statistics; milliseconds per call (mean of 10 after two
warm-up calls that also autotune) and the ratio to the plain kernel. Last, the windowed output
is checked against the reference backend on the last 64 query rows.
"""

from __future__ import annotations

import argparse

import torch

from kernels import StatsSpec, attention


def time_ms(q, k, v, reps: int = 10, **kwargs) -> float:
    """Mean milliseconds of one causal Triton call with ``kwargs``, after two warm-up calls."""
    for _ in range(2):
        attention(q, k, v, causal=True, backend="triton", **kwargs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        attention(q, k, v, causal=True, backend="triton", **kwargs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768, help="tokens N (default 32768)")
    parser.add_argument("--window", type=int, default=4096, help="sliding window W (default 4096)")
    parser.add_argument("--dim", type=int, default=128, help="head dim D (default 128)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times the Triton kernels on a CUDA GPU")
    torch.manual_seed(0)
    b, h, n, d, w = 1, 32, args.length, args.dim, args.window
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sinks = torch.randn(h, device="cuda")
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(h)], device="cuda")
    stats = StatsSpec(entropy=True, max_prob=True, argmax=True, distance=True)
    runs = [
        ("plain", {}),
        (f"window={w}", dict(window=w)),
        ("softcap=30", dict(softcap=30.0)),
        ("sinks", dict(sinks=sinks)),
        ("alibi", dict(alibi_slopes=slopes)),
        (f"window={w}+softcap+sinks+alibi", dict(window=w, softcap=30.0, sinks=sinks, alibi_slopes=slopes)),
        ("plain + stats", dict(stats=stats)),
        (f"window={w} + stats", dict(window=w, stats=stats)),
    ]
    print(f"causal bf16 attention, B={b} H={h} N={n} D={d} on {torch.cuda.get_device_name()}")
    print(f"{'variant':<36}{'ms':>10}{'vs plain':>10}")
    base = None
    for name, kwargs in runs:
        ms = time_ms(q, k, v, **kwargs)
        base = base or ms
        print(f"{name:<36}{ms:>10.2f}{ms / base:>10.2f}")
    out, _ = attention(q, k, v, causal=True, window=w, backend="triton")
    ref, _ = attention(q[:, :, -64:], k, v, causal=True, window=w, backend="reference")
    print(
        "window: max |triton - reference| on the last 64 rows:",
        float((out[:, :, -64:].float() - ref.float()).abs().max()),
    )


if __name__ == "__main__":
    main()
