"""Whole model with every row statistic computed inside a copy of FlashAttention-4's Hopper
forward instead of this project's Hopper kernel: issue 19's third target (an instrumented
forward of random Llama-3.2-1B within 1.1x of SDPA's time at 32K and 128K tokens), as a proxy
(docs/benchmarks.md; raw output in docs/bench/fa4_hopper_model.txt).

The copy (see fa4_stats.py beside this script) computes every row statistic but writes only
the entropy, where the lse goes. The proxy hands the workbench that entropy and, for the other
statistics, empty tensors of their shapes, so the recording after the kernel does the same
work. Timed with the model benchmark's own ``measure_forward`` (best of two after a warm-up),
in one process: SDPA, the recorded forward with this project's kernel, then with the copy.

    PYTHONPATH=/tmp/site_stats:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:.:docs/experiments \\
        python docs/experiments/fa4_model.py
"""

from __future__ import annotations

import torch
from fa4_stats import EVERY, configure_copy  # beside this script

import kernels.hopper_attention as hopper
from kernels import AttentionStats
from workbench import load_model
from workbench.instrument import DEFAULT_STATS
from workbench.model_benchmark import measure_forward


def fa4_proxy(fwd, shipped):
    """A stand-in for :func:`kernels.hopper_attention.hopper_attention` that runs the copy; its
    first call checks the copy's entropy against ``shipped`` (the project's kernel)."""
    seen = {"calls": 0, "copies": 0}

    def run(q, k, v, p, stats):
        views = [t.transpose(1, 2) for t in (q, k, v)]  # FlashAttention's [B, N, H, D]
        seen["copies"] += sum(not t.is_contiguous() for t in views)
        views = [t.contiguous() for t in views]
        out, entropy = fwd(*views, causal=True, softmax_scale=p.scale, return_lse=True, pack_gqa=False)[:2]
        b, h, n, _ = q.shape
        fields = {}
        for name in stats.output_fields():
            if name == "entropy":
                fields[name] = entropy
            elif name == "offset_mass":
                fields[name] = torch.empty(b, h, n, len(stats.offsets), device=q.device)
            else:
                fields[name] = torch.empty(b, h, n, device=q.device, dtype=torch.int64 if name == "argmax" else None)
        if seen["calls"] == 0:
            _, want = shipped(q, k, v, p, stats)
            print(f"first call {tuple(q.shape)}: max |entropy - kernel's| {(entropy - want.entropy).abs().max():.2e}")
        seen["calls"] += 1
        return out.transpose(1, 2), AttentionStats(**fields)

    return run, seen


def main() -> None:
    import flash_attn.cute.softmax as softmax_module
    from flash_attn.cute.interface import _flash_attn_fwd

    configure_copy(softmax_module, EVERY, "all", "holder")
    shipped = hopper.hopper_attention
    proxy, seen = fa4_proxy(_flash_attn_fwd, shipped)
    model = load_model("random:llama-3.2-1b", device="cuda", dtype=torch.bfloat16)
    print(f"random:llama-3.2-1b, {torch.cuda.get_device_name()}, torch {torch.__version__}, statistics {DEFAULT_STATS}")
    rows = []
    for tokens in (32768, 131072):
        sdpa = measure_forward(model, tokens, "sdpa")
        kernel = measure_forward(model, tokens, "recorded")
        hopper.hopper_attention = proxy
        try:
            copy = measure_forward(model, tokens, "recorded")
        finally:
            hopper.hopper_attention = shipped
        for name, res in (("SDPA", sdpa), ("recorded, this kernel", kernel), ("recorded, FA4 copy", copy)):
            rows.append(f"| {tokens} | {name} | {res.seconds:.3f} | {res.seconds / sdpa.seconds:.3f}x |")
            print(rows[-1], flush=True)
    print(f"proxy calls {seen['calls']}, inputs copied to be contiguous {seen['copies']}")
    print("| tokens | forward | seconds | time / SDPA |\n| --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
