"""Where the Hopper kernel's warps wait: Nsight Compute's stall samples, per instruction of the
consumer's softmax loop (docs/benchmarks.md, "a profile of its stalls").

``run`` launches one shape three times (bf16, causal, B = 1, H = 32, N = 16384) so that ncu can
profile the third launch; ``report`` reads the source page ncu exports and prints the share of
each stall reason, over the whole kernel and over the hottest loop, and that loop's costliest
instructions. On the H200 of the device tool (Firecracker runtime; ncu reads the counters with
the clocks left alone)::

    ncu --clock-control none --kernel-name regex:hopper_fwd --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SchedulerStats --section SourceCounters \\
        -o d64_all python docs/experiments/hopper_profile.py run 64 all
    ncu -i d64_all.ncu-rep --page source --csv --print-source sass > d64_all.csv
    python docs/experiments/hopper_profile.py report d64_all.csv

``run 64 sdpa`` launches PyTorch's SDPA instead (profile it with ``--kernel-name regex:sdpa``).
The loop is the contiguous run of instructions executed exactly as often as the most executed
``MUFU``: one consumer warpgroup's loop over the free key blocks.
"""

from __future__ import annotations

import collections
import csv
import sys

N, HEADS = 16384, 32


def run(head_dim: int, spec: str) -> None:
    """Three launches of the Hopper kernel (or of SDPA, ``spec == "sdpa"``)."""
    import torch  # here, so that ``report`` runs where torch is not installed
    import torch.nn.functional as F
    from hopper_sass import SPECS  # beside this script

    from kernels.hopper_attention import hopper_attention
    from kernels.validate import Problem

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, N, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    problem = Problem(1, HEADS, HEADS, N, N, head_dim, head_dim**-0.5, True)
    for _ in range(3):
        if spec == "sdpa":
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            hopper_attention(q, k, v, problem, SPECS[spec])
    torch.cuda.synchronize()


def _rows(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and instruction rows of ncu's ``--page source --csv`` export."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = next(r for r in rows if r and r[0] == "Address")
    return header, [r for r in rows if len(r) == len(header) and r[0] != "Address"]


def _shares(samples: collections.Counter) -> str:
    total = sum(samples.values()) or 1
    return "  ".join(f"{k}={v / total:.1%}" for k, v in samples.most_common(10) if v)


def report(path: str, top: int = 25) -> None:
    """Print stall shares for the kernel and its hottest loop, then the loop's top instructions."""
    header, rows = _rows(path)
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def samples(r: list[str]) -> collections.Counter:
        return collections.Counter({h[len("stall_") :]: int(r[col[h]] or 0) for h in reasons})

    executed = [int(r[col["Instructions Executed"]] or 0) for r in rows]
    source = [r[col["Source"]].strip() for r in rows]
    hottest = max(e for e, s in zip(executed, source) if "MUFU" in s)
    lo = hi = next(i for i, (e, s) in enumerate(zip(executed, source)) if e == hottest and "MUFU" in s)
    while lo > 0 and executed[lo - 1] == hottest:
        lo -= 1
    while hi + 1 < len(rows) and executed[hi + 1] == hottest:
        hi += 1

    kernel = sum((samples(r) for r in rows), collections.Counter())
    body = sum((samples(rows[i]) for i in range(lo, hi + 1)), collections.Counter())
    print(f"kernel: {sum(kernel.values())} samples, {sum(executed):,} warp instructions")
    print(f"  {_shares(kernel)}")
    print(f"loop: instructions {lo}..{hi} ({hi - lo + 1}), each executed {hottest:,} times")
    print(f"  {sum(body.values())} samples: {_shares(body)}")
    ranked = sorted(range(lo, hi + 1), key=lambda i: -sum(samples(rows[i]).values()))
    for i in ranked[:top]:
        s = samples(rows[i])
        reasons_here = " ".join(f"{k}:{v}" for k, v in s.most_common(3) if v)
        print(f"  {i - lo:4d} {sum(s.values()):6d}  {source[i][:58]:58s} {reasons_here}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        run(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        sys.exit(__doc__)
