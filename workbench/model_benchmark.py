"""Whole-model benchmark: time and peak GPU memory of one forward pass with SDPA against the
same forward instrumented with the kernel statistics (recorded per position, and streamed), and
of scoring every head on one needle sample (``scored``: from the kernel statistics;
``materialised``: from eager attention's explicit patterns, one layer at a time).

    python -m workbench.model_benchmark --model random:llama-3.2-1b --lengths 32768,131072
    python -m workbench.model_benchmark --variants sdpa,scored,materialised --lengths 4096,32768

Every forward computes only the last position's logits (``logits_to_keep=1``), so that the
``[tokens, vocabulary]`` logits, which are the same in every variant, do not dominate the peak.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from kernels import StatsSpec
from workbench.instrument import DEFAULT_STATS, instrument
from workbench.models import load_model, task_tokenizer
from workbench.recording import StreamingSummary
from workbench.scoring import ScoreRunSettings, plan, score_sample


@dataclass
class Result:
    """One measurement: ``variant`` is ``sdpa``, ``recorded``, ``streamed`` (one forward pass),
    ``scored`` or ``materialised`` (all niah scores of one needle sample, answer decoding included)."""

    variant: str
    tokens: int
    seconds: float
    peak_gib: float
    weights_gib: float


def _forward(model, ids: torch.Tensor) -> None:
    model(ids, logits_to_keep=1)


def measure_forward(
    model, tokens: int, variant: str, stats: StatsSpec = DEFAULT_STATS, repeats: int = 2, seed: int = 0
) -> Result:
    """Time (best of ``repeats``, after one warm-up that also autotunes) and peak memory of a
    forward over ``tokens`` random token ids (batch 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(model.device)
    weights = torch.cuda.memory_allocated()
    settings = ScoreRunSettings(model="benchmark", tasks=("niah",), lengths=(tokens,), samples=1, depths=(0.5,))
    unit = plan(settings, task_tokenizer(model))[0] if variant in ("scored", "materialised") else None

    def once() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        if variant == "sdpa":
            _forward(model, ids)
        elif variant in ("scored", "materialised"):
            score_sample(model, unit, settings, materialised=variant == "materialised")
        else:
            n_layers = model.config.num_hidden_layers
            into = StreamingSummary(stats, n_layers, bucket_size=1024) if variant == "streamed" else None
            with instrument(model, stats, into=into):
                _forward(model, ids)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        once()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        best = min(once() for _ in range(repeats))
    return Result(variant, tokens, best, torch.cuda.max_memory_allocated() / 2**30, weights / 2**30)


def check_scoring(model, tokens: int) -> float:
    """Largest relative difference ``|a - b| / max(|b|, 1)`` between the two scoring paths'
    per-sample values (scores and profile means; distances are in tokens, hence the floor)."""
    settings = ScoreRunSettings(model="benchmark", tasks=("niah",), lengths=(tokens,), samples=1, depths=(0.5,))
    unit = plan(settings, task_tokenizer(model))[0]
    keys = ["name", "layer", "head", "bucket"]
    a, b = (score_sample(model, unit, settings, materialised=m) for m in (False, True))
    joined = a[a["name"] != "seconds"].merge(b, on=keys)
    ratio_a = joined["total_x"] / joined["count_x"].where(joined["count_x"] > 0)
    ratio_b = joined["total_y"] / joined["count_y"].where(joined["count_y"] > 0)
    return float(((ratio_a - ratio_b).abs() / ratio_b.abs().clip(lower=1)).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:llama-3.2-1b")
    parser.add_argument("--lengths", default="8192,32768,131072", help="comma-separated token counts")
    parser.add_argument(
        "--variants",
        default="sdpa,recorded,streamed",
        help="comma-separated: sdpa, recorded, streamed, scored, materialised",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the model benchmark needs a CUDA GPU")
        return 2
    model = load_model(args.model, device="cuda", dtype=torch.bfloat16)
    print(
        f"{args.model} on {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch 1, "
        f"statistics {DEFAULT_STATS}"
    )
    variants = args.variants.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    if "scored" in variants and "materialised" in variants:
        print(
            f"check at {lengths[0]} tokens: largest relative difference between scored and materialised values "
            f"{check_scoring(model, lengths[0]):.2e}"
        )
    rows = []
    for tokens in lengths:
        base = None
        for variant in variants:
            try:
                res = measure_forward(model, tokens, variant)
            except torch.cuda.OutOfMemoryError:
                print(f"{tokens:>7} {variant:>9}  out of memory")
                torch.cuda.empty_cache()
                continue
            base = base or (res if variant == "sdpa" else None)
            ratio = f"{res.peak_gib / base.peak_gib:.2f}x" if base else "-"
            above = f"{(res.peak_gib - res.weights_gib) / (base.peak_gib - base.weights_gib):.2f}x" if base else "-"
            rows.append((tokens, variant, f"{res.seconds:.3f}", f"{res.peak_gib:.2f}", ratio, above))
            print(*rows[-1], flush=True)
    print("\n| tokens | variant | seconds | peak GiB | peak / SDPA | above weights / SDPA |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
