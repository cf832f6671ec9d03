"""FlashAttention-4's Hopper forward (``flash-attn-4``, CuTe DSL) against cuDNN SDPA and this
project's kernel, in one process: bf16, causal, B = 1, H = 32, N = 16384, ``do_bench`` medians
(issue 19's route 2; docs/benchmarks.md, raw output in docs/bench/fa4_hopper_plain.txt).

    PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:. python docs/experiments/fa4_hopper.py

Getting it onto the device tool's H200, which reaches no package index: ``fa4_wheels.sh``
(beside this script) downloads the wheels here and cuts the one too large for a call (the
CUDA 13 libraries, 92 MB as a wheel) into three xz parts under ``.fa4a/``, ``.fa4b/`` and
``.fa4c/`` (list them in ``.git/info/exclude``). Three back-to-back calls, each within the
30 s a machine stays warm, carry one folder each onto the same machine:

    carry [".fa4a"]: mkdir -p /tmp/fa4 && cp .fa4a/part.00 /tmp/fa4/
    carry [".fa4b"]: mkdir -p /tmp/fa4 && cp .fa4b/part.01 /tmp/fa4/
    carry [".fa4c"]: bash .fa4c/install.sh

``install.sh`` installs the small wheels into ``/tmp/site``, unpacks the parts over them and
runs this script (or the script and arguments it is given). Sourced (``. .fa4c/install.sh``)
it only installs and sets ``PYTHONPATH``, for commands of one's own: the library's
``backend="cute"`` tests and benchmarks ran that way. While the machine stays warm, later
calls need only ``export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:.``.
The ``.pth`` file of ``nvidia-cutlass-dsl`` is not read from ``PYTHONPATH``, hence its
``dsl_packages`` folder on the path.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from hopper_ab import median_ms, problem  # beside this script: the A/B's timing and inputs, so the figures compare

from kernels import attention
from kernels.benchmark.config import ROW_STATS


def one_head_dim(d: int, flash_attn_func) -> list[str]:
    """Check FlashAttention-4 against SDPA and the kernel's lse at head dim ``d``, then time
    every call; returns the table's rows."""
    q, k, v, _ = problem(16384, d, hq=32, hkv=32)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # FlashAttention's [B, N, H, D]
    start = time.time()
    out, lse = flash_attn_func(qt, kt, vt, causal=True, return_lse=True)
    torch.cuda.synchronize()
    print(f"D={d}: first call (JIT) {time.time() - start:.1f} s", flush=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    _, st = attention(q, k, v, causal=True, stats=ROW_STATS, backend="triton")
    out_err = (out.transpose(1, 2).float() - want.float()).abs().max().item()
    lse_err = (lse.float().reshape(st.lse.shape) - st.lse).abs().max().item()
    print(f"D={d}: max |FA4 - SDPA| {out_err:.2e}; max |FA4 lse - kernel lse| {lse_err:.2e}", flush=True)
    calls = {
        "SDPA (cuDNN)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "FA4": lambda: flash_attn_func(qt, kt, vt, causal=True),
        "FA4 with lse": lambda: flash_attn_func(qt, kt, vt, causal=True, return_lse=True),
        "kernel, plain": lambda: attention(q, k, v, causal=True, backend="triton"),
        "kernel, every row statistic": lambda: attention(q, k, v, causal=True, stats=ROW_STATS, backend="triton"),
    }
    times = {name: median_ms(fn) for name, fn in calls.items()}
    return [f"| {d} | {name} | {t:.3f} | {times['SDPA (cuDNN)'] / t:.3f}x |" for name, t in times.items()]


def main() -> None:
    from flash_attn.cute import flash_attn_func

    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
    rows = one_head_dim(128, flash_attn_func) + one_head_dim(64, flash_attn_func)
    print("| D | call | ms | SDPA / call |\n| --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
