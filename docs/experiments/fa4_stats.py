"""Row statistics inside FlashAttention-4's Hopper forward: what they cost there (issue 19's
route 2; docs/benchmarks.md, raw output in docs/bench/fa4_hopper_stats.txt).

Runs against a local, modified copy of ``flash-attn-4`` 4.0.0b40 that is not part of this
project (the changes are described in docs/benchmarks.md; no FlashAttention code lands here).
The copy reads three module globals of its ``softmax.py`` when it traces a kernel: ``_STATS``
(which statistics the online softmax carries: entropy, distance, argmax, masses), ``_OUT``
(which one it writes where the lse goes) and ``_VARIANT`` (``holder``: the argmax kept only by
the threads that hold the row max; ``snapshot``: the local and offset masses kept under the
row max they were summed with, so the free key blocks never touch them; ``dmma``: distance by
an MMA of P with a [tile_n, 8] matrix of key columns, issued with PV; ``nosched``: no
ping-pong barriers between the consumer warpgroups). ``nooverlap`` is not the copy's: it
turns off FlashAttention-4's intra-warpgroup overlap through its own argument. This script sets them,
clears the copy's kernel cache, and for each build checks the value written against this
project's kernel on the same inputs, then times it beside cuDNN SDPA and this kernel. bf16, causal, B = 1,
H = 32, N = 16384 (``--lengths``), ``do_bench`` medians, head dims 128 and 64.

    PYTHONPATH=/tmp/site_stats:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:. \\
        python docs/experiments/fa4_stats.py [--lengths 8192,32768] [--short | --only REGEX]

``--short`` runs only the plain build and every row statistic with the holder argmax;
``--only REGEX`` the builds whose names match.

Getting flash-attn-4 onto the device tool's H200: see fa4_hopper.py beside this script. The
copy's three changed files travelled with the third call in a fourth ignored folder, were laid
over a copy of ``/tmp/site/flash_attn/cute`` in ``/tmp/site_stats/flash_attn/cute``, and this
script ran in place of fa4_hopper.py.
CuTe DSL also compiles on a machine without a GPU: FlashAttention-4's fake-tensor mode with
``FLASH_ATTENTION_ARCH=sm_90 CUTE_DSL_ARCH=sm_90a``, so each build was compiled, and its
SASS read, before it reached the card.
"""

from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F
from hopper_ab import median_ms, problem  # beside this script: the A/B's timing and inputs, so the figures compare

from kernels import attention
from kernels.benchmark.config import ROW_STATS

EVERY = "entropy,distance,argmax,masses"
#: (name, statistics carried, value written, query-by-key tile or None for FA4's own, variant)
BUILDS = [
    ("plain", "", "lse", None, ""),
    ("max prob only", "", "maxprob", None, ""),
    ("entropy", "entropy", "entropy", None, ""),
    ("distance", "distance", "pos", None, ""),
    ("distance, MMA", "distance", "pos", None, "dmma"),
    ("argmax", "argmax", "argmax", None, ""),
    ("argmax, holder", "argmax", "argmax", None, "holder"),
    ("local mass", "masses", "local", None, ""),
    ("local mass, snapshot", "masses", "local", None, "snapshot"),
    ("offset 1 mass, snapshot", "masses", "offset", None, "snapshot"),
    ("sink mass", "masses", "sink", None, ""),
    ("entropy, distance, argmax, max prob", "entropy,distance,argmax", "all", None, ""),
    ("entropy, distance, argmax, max prob; holder", "entropy,distance,argmax", "all", None, "holder"),
    ("every row statistic", EVERY, "all", None, ""),
    ("every row statistic; holder", EVERY, "all", None, "holder"),
    ("every row statistic; holder, snapshot", EVERY, "all", None, "holder,snapshot"),
    ("every row statistic; holder, distance MMA", EVERY, "all", None, "holder,dmma"),
    ("plain; no ping-pong", "", "lse", None, "nosched"),
    ("plain; no intra-warpgroup overlap", "", "lse", None, "nooverlap"),
    ("every row statistic; holder, no ping-pong", EVERY, "all", None, "holder,nosched"),
    ("plain, 128 x 128 tile", "", "lse", (128, 128), ""),
    ("every row statistic; holder, snapshot; 128 x 128 tile", EVERY, "all", (128, 128), "holder,snapshot"),
]
SHORT = ("plain", "every row statistic; holder")


def configure_copy(softmax_module, stats: str, out: str, variant: str = "") -> None:
    """Set the copy's trace-time globals: ``stats`` and ``variant`` are comma lists."""
    softmax_module._STATS = frozenset(x for x in stats.split(",") if x)
    softmax_module._OUT = out
    softmax_module._VARIANT = frozenset(x for x in variant.split(",") if x)


def expected(out: str, st, n: int) -> torch.Tensor:
    """This kernel's value of what the copy writes as ``out``, ``[1, H, n]`` float32."""
    if out == "pos":  # the expected key index: the query's index less its mean distance
        return torch.arange(n, device=st.lse.device, dtype=torch.float32) - st.distance
    field = {
        "lse": "lse",
        "entropy": "entropy",
        "all": "entropy",
        "maxprob": "max_prob",
        "argmax": "argmax",
        "local": "local_mass",
        "sink": "sink_mass",
    }.get(out)
    value = st.offset_mass[..., 0] if out == "offset" else getattr(st, field)
    return value.float()


def one_shape(n: int, d: int, fwd, softmax_module, builds: list[tuple]) -> list[str]:
    """Check and time ``builds`` at ``n`` tokens and head dim ``d``; returns the table's rows."""
    q, k, v, _ = problem(n, d, hq=32, hkv=32)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # FlashAttention's [B, N, H, D]
    _, st = attention(q, k, v, causal=True, stats=ROW_STATS, backend="triton")
    sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    rows = [f"| {n} | {d} | SDPA (cuDNN) | | {sdpa:.3f} | 1.000x | |"]
    every = dict(causal=True, stats=ROW_STATS, backend="triton")
    for name, fn in (
        ("this kernel, plain", lambda: attention(q, k, v, causal=True, backend="triton")),
        ("this kernel, every row statistic", lambda: attention(q, k, v, **every)),
    ):
        t = median_ms(fn)
        rows.append(f"| {n} | {d} | {name} | | {t:.3f} | {sdpa / t:.3f}x | |")
    plain_ms = {}
    for name, stats, out, tile, variant in builds:
        if tile and d != 64:  # FA4's own tile at D = 128 is 128 x 128 already
            continue
        configure_copy(softmax_module, stats, out, variant)
        fwd.compile_cache.clear()
        extra = ({"tile_mn": tile} if tile else {}) | ({"intra_wg_overlap": False} if "nooverlap" in variant else {})
        try:
            got = fwd(qt, kt, vt, causal=True, return_lse=True, **extra)[1].float().reshape(st.lse.shape)
        except Exception as error:  # a build that fails to compile or run is a result too
            rows.append(f"| {n} | {d} | FA4 copy: {name} | failed: {type(error).__name__}: {str(error)[:80]} | | | |")
            continue
        want = expected(out, st, n)
        if out == "argmax":
            check = f"{int((got.long() != want.long()).sum())} of {want.numel()} rows differ"
        else:
            check = f"max err {(got - want).abs().max().item():.2e}"
        t = median_ms(lambda extra=extra: fwd(qt, kt, vt, causal=True, return_lse=True, **extra))
        if name.startswith("plain") and not variant:
            plain_ms[tile] = t
        cost = f"{100 * (t / plain_ms[tile] - 1):+.1f} %" if tile in plain_ms else ""
        rows.append(f"| {n} | {d} | FA4 copy: {name} | {check} | {t:.3f} | {sdpa / t:.3f}x | {cost} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    import flash_attn.cute.softmax as softmax_module
    from flash_attn.cute.interface import _flash_attn_fwd

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="16384", help="comma-separated token counts")
    parser.add_argument("--short", action="store_true", help="only plain and every row statistic (holder)")
    parser.add_argument("--only", default=None, help="a regular expression: the builds whose names match it")
    args = parser.parse_args()
    builds = [b for b in BUILDS if (not args.short or b[0] in SHORT) and (not args.only or re.search(args.only, b[0]))]
    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
    print("flash_attn.cute from", softmax_module.__file__, flush=True)
    rows = [
        row
        for n in (int(x) for x in args.lengths.split(","))
        for d in (128, 64)
        for row in one_shape(n, d, _flash_attn_fwd, softmax_module, builds)
    ]
    print("| N | D | call | check against this kernel | ms | SDPA / call | over the copy's plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
