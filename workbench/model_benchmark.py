"""Whole-model benchmark: time and peak GPU memory of one forward pass with SDPA against the
same forward instrumented with the kernel statistics (recorded per position, and streamed), and
of scoring every head on one needle sample (``scored``: from the kernel statistics;
``materialised``: from eager attention's explicit patterns, one layer at a time).

    python -m workbench.model_benchmark --model random:llama-3.2-1b --lengths 32768,131072
    python -m workbench.model_benchmark --variants sdpa,scored,materialised --lengths 4096,32768
    python -m workbench.model_benchmark --variants sdpa,sdpa-chunked,recorded,streamed,scored \
        --lengths 131072,1048576 --prefill-chunk 8192
    python -m workbench.model_benchmark --model random:gpt2-small --lengths 1024 \
        --overhead reference,cpu --threads 2 --repeats 7
    python -m workbench.model_benchmark --variants sdpa,recorded --without argmax,distance

``--overhead BACKENDS`` measures what instrumenting costs per kernel backend: in each of
``--repeats`` rounds, a plain forward and then one forward instrumented with every statistic
(``StatsSpec.all()``) per backend, interleaved in one process so that a shared machine's load
falls on all of them alike; each round gives a ratio instrumented / plain, and the table shows
their median and minimum (:func:`measure_overhead`). It runs wherever the model does (the CPU
backend comparison of docs/benchmarks.md).

``recorded`` and ``streamed`` compute every row statistic (:data:`DEFAULT_STATS`), and
``--overhead`` every statistic, but those ``--without`` names (:meth:`kernels.StatsSpec.without`);
``scored`` asks for what its scores need.

Every forward computes only the last position's logits (``logits_to_keep=1``), so that the
``[tokens, vocabulary]`` logits, which are the same in every variant, do not dominate the peak.

``--prefill-chunk N`` runs every variant but ``sdpa`` as a chunked prefill
(:mod:`workbench.chunked`: ``N`` queries at a time against a growing KV cache); ``sdpa`` stays
the one-pass forward and ``sdpa-chunked`` is SDPA through the same chunked prefill. Lengths
past the model's context are allowed (random weights: only time and memory count here).
Without a GPU the benchmark runs on the CPU in float32 (a smoke test; no peak memory).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import torch

from kernels import BACKENDS, AttentionInputError, StatsSpec
from workbench.adapters import adapter_for
from workbench.adapters.transformer_lens import TransformerLensAdapter
from workbench.chunked import ChunkJoiner, ChunkPositions, check_chunk, chunked_prefill
from workbench.instrument import DEFAULT_STATS, instrument
from workbench.models import load_model, task_tokenizer
from workbench.recording import StreamingSummary
from workbench.scoring import ScoreRunSettings, plan, score_sample


@dataclass
class Result:
    """One measurement: ``variant`` is ``sdpa``, ``sdpa-chunked``, ``recorded``, ``streamed``
    (one forward pass), ``scored`` or ``materialised`` (all niah scores of one needle sample,
    answer decoding included); ``chunk`` the prefill chunk (None: one pass). Memory is NaN on
    the CPU."""

    variant: str
    tokens: int
    seconds: float
    peak_gib: float
    weights_gib: float
    chunk: int | None = None


VARIANTS = ("sdpa", "sdpa-chunked", "recorded", "streamed", "scored", "materialised")


def _forward(model, ids: torch.Tensor, chunk: int | None) -> None:
    if chunk is None:
        model(ids, logits_to_keep=1)
    else:
        _, cache = chunked_prefill(model, ids, chunk)
        del cache


def _cuda() -> bool:
    return torch.cuda.is_available()


def _synchronize() -> None:
    if _cuda():
        torch.cuda.synchronize()


def measure_forward(
    model,
    tokens: int,
    variant: str,
    stats: StatsSpec = DEFAULT_STATS,
    repeats: int = 2,
    seed: int = 0,
    chunk: int | None = None,
    warmup: bool = True,
) -> Result:
    """Time (best of ``repeats``, after one warm-up that also autotunes, unless ``warmup`` is
    False) and peak memory of a
    forward over ``tokens`` random token ids (batch 1); ``chunk``: prefill that many tokens at a
    time (every variant but ``sdpa``; ``sdpa-chunked`` needs one)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if variant == "sdpa":
        chunk = None
    elif chunk is not None:
        check_chunk(chunk)
    elif variant == "sdpa-chunked":
        raise ValueError("the sdpa-chunked variant needs a prefill chunk (--prefill-chunk)")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(model.device)
    weights = torch.cuda.memory_allocated() if _cuda() else float("nan")
    settings = ScoreRunSettings(
        model="benchmark", tasks=("niah",), lengths=(tokens,), samples=1, depths=(0.5,), prefill_chunk=chunk
    )
    unit = plan(settings, task_tokenizer(model))[0] if variant in ("scored", "materialised") else None
    n_layers = model.config.num_hidden_layers

    def once() -> float:
        _synchronize()
        start = time.perf_counter()
        if variant in ("sdpa", "sdpa-chunked"):
            _forward(model, ids, chunk)
        elif variant in ("scored", "materialised"):
            score_sample(model, unit, settings, materialised=variant == "materialised")
        elif variant == "streamed":
            summary = StreamingSummary(stats, n_layers, bucket_size=1024)
            with instrument(model, stats, into=summary if chunk is None else ChunkPositions(summary)):
                _forward(model, ids, chunk)
        elif chunk is None:  # recorded
            with instrument(model, stats):
                _forward(model, ids, chunk)
        else:  # recorded, joined into one call per layer as record_chunked returns it
            joiner = ChunkJoiner()
            with instrument(model, stats, into=joiner):
                _forward(model, ids, chunk)
            joiner.recording(stats, n_layers)
        _synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        if warmup:
            once()
        if _cuda():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        best = min(once() for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated() if _cuda() else float("nan")
    return Result(variant, tokens, best, peak / 2**30, weights / 2**30, chunk)


@dataclass
class Overhead:
    """Instrumented against plain forwards over ``tokens`` tokens with one kernel ``backend``:
    seconds of each round's plain and instrumented forward, in round order."""

    backend: str
    tokens: int
    plain: list[float]
    instrumented: list[float]

    @property
    def ratios(self) -> list[float]:
        """Instrumented / plain, round by round."""
        return [i / p for i, p in zip(self.instrumented, self.plain)]

    def row(self) -> dict:
        """The table row: median seconds, and the median and minimum of the per-round ratios."""
        return {
            "tokens": self.tokens,
            "backend": self.backend,
            "plain s": round(statistics.median(self.plain), 3),
            "instrumented s": round(statistics.median(self.instrumented), 3),
            "ratio median": round(statistics.median(self.ratios), 2),
            "ratio min": round(min(self.ratios), 2),
        }


def _plain_forward(model, ids: torch.Tensor, transformer_lens: bool) -> None:
    """One forward without logits beyond what the model needs: Hugging Face models compute the
    last position's only, TransformerLens models none."""
    if transformer_lens:
        model(ids, return_type=None)
    else:
        model(ids, logits_to_keep=1)


def check_backends(backends: tuple[str, ...]) -> None:
    """ValueError naming any of ``backends`` that is not a kernel backend."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown kernel backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")


def measure_overhead(
    model,
    tokens: int,
    backends: tuple[str, ...] = ("reference", "cpu"),
    stats: StatsSpec | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> list[Overhead]:
    """Time a plain forward over ``tokens`` random token ids (batch 1) and the same forward
    instrumented with ``stats`` (every statistic, key mass included, by default) through each
    kernel backend, interleaved: ``repeats`` rounds after one warm-up round, each running the
    plain forward then every backend (in reverse order every other round). One
    :class:`Overhead` per backend. Works for Hugging Face and TransformerLens models."""
    check_backends(backends)
    stats = stats or StatsSpec.all()
    adapter = adapter_for(model)
    transformer_lens = isinstance(adapter, TransformerLensAdapter)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, adapter.vocab_size, (1, tokens), generator=generator).to(adapter.device)

    def timed(backend: str | None) -> float:
        _synchronize()
        start = time.perf_counter()
        if backend is None:
            _plain_forward(model, ids, transformer_lens)
        else:
            with instrument(model, stats, backend=backend):
                _plain_forward(model, ids, transformer_lens)
        _synchronize()
        return time.perf_counter() - start

    found = {b: Overhead(b, tokens, [], []) for b in backends}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            plain = timed(None)
            order = backends if round_ % 2 else backends[::-1]
            seconds = {b: timed(b) for b in order}
            if round_:  # the first round warms up
                for b in backends:
                    found[b].plain.append(plain)
                    found[b].instrumented.append(seconds[b])
    return list(found.values())


def check_scoring(model, tokens: int, chunk: int | None = None) -> float:
    """Largest relative difference ``|a - b| / max(|b|, 1)`` between two scoring paths'
    per-sample values (scores and profile means; distances are in tokens, hence the floor):
    from the kernel statistics against materialised patterns, or, with ``chunk``, a chunked
    prefill against one pass (both from the kernel statistics)."""
    settings = ScoreRunSettings(model="benchmark", tasks=("niah",), lengths=(tokens,), samples=1, depths=(0.5,))
    unit = plan(settings, task_tokenizer(model))[0]
    keys = ["name", "layer", "head", "bucket"]
    if chunk is None:
        a, b = (score_sample(model, unit, settings, materialised=m) for m in (False, True))
    else:
        a, b = (score_sample(model, unit, replace(settings, prefill_chunk=c)) for c in (chunk, None))
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
        help=f"comma-separated: {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        metavar="N",
        help="prefill N tokens at a time against a growing KV cache (every variant but sdpa)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the best counts)")
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="time the first run (it autotunes the kernels too): for lengths where one pass takes minutes",
    )
    parser.add_argument(
        "--overhead",
        default=None,
        metavar="BACKENDS",
        help="comma-separated kernel backends (e.g. reference,cpu): instead of --variants, time a plain forward "
        "against one instrumented with every statistic per backend, interleaved over --repeats rounds",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (CPU runs)")
    parser.add_argument(
        "--without",
        default="",
        metavar="STATS",
        help="comma-separated statistics to drop (e.g. argmax,distance) from every row statistic in the "
        "recorded and streamed variants, and from every statistic with --overhead: what each one costs",
    )
    args = parser.parse_args(argv)
    dropped = [name for name in args.without.split(",") if name]
    try:
        stats = DEFAULT_STATS.without(*dropped)
    except AttentionInputError as exc:
        parser.error(f"--without: {exc}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.overhead is not None:
        return _overhead_main(parser, args, StatsSpec.all().without(*dropped))
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        parser.error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if "sdpa-chunked" in variants and args.prefill_chunk is None:
        parser.error("the sdpa-chunked variant needs --prefill-chunk")
    if _cuda():
        device, dtype, where = "cuda", torch.bfloat16, f"{torch.cuda.get_device_name()}, bf16"
    else:
        device, dtype, where = "cpu", torch.float32, "the CPU (no GPU: a smoke run, no peak memory), float32"
    model = load_model(args.model, device=device, dtype=dtype)
    chunked = f", prefill chunk {args.prefill_chunk}" if args.prefill_chunk else ""
    print(f"{args.model} on {where}, torch {torch.__version__}, batch 1{chunked}, statistics {stats}")
    lengths = [int(x) for x in args.lengths.split(",")]
    if "scored" in variants and "materialised" in variants:
        print(
            f"check at {lengths[0]} tokens: largest relative difference between scored and materialised values "
            f"{check_scoring(model, lengths[0]):.2e}"
        )
    if "scored" in variants and args.prefill_chunk is not None:
        print(
            f"check at {lengths[0]} tokens: largest relative difference between chunked and one-pass scored values "
            f"{check_scoring(model, lengths[0], args.prefill_chunk):.2e}"
        )
    rows = []
    for tokens in lengths:
        base = None
        for variant in variants:
            chunk = None if variant == "sdpa" else args.prefill_chunk
            label = variant if chunk is None or variant.endswith("-chunked") else f"{variant}-chunked"
            try:
                res = measure_forward(
                    model, tokens, variant, stats, repeats=args.repeats, chunk=chunk, warmup=not args.no_warmup
                )
            except torch.cuda.OutOfMemoryError:
                print(f"{tokens:>7} {label:>9}  out of memory")
                torch.cuda.empty_cache()
                continue
            base = base or (res if variant == "sdpa" else None)
            ratio = f"{res.peak_gib / base.peak_gib:.2f}x" if base and _cuda() else "-"
            above = (
                f"{(res.peak_gib - res.weights_gib) / (base.peak_gib - base.weights_gib):.2f}x"
                if base and _cuda()
                else "-"
            )
            time_ratio = f"{res.seconds / base.seconds:.2f}x" if base else "-"
            rows.append((tokens, label, f"{res.seconds:.3f}", time_ratio, f"{res.peak_gib:.2f}", ratio, above))
            print(*rows[-1], flush=True)
    print("\n| tokens | variant | seconds | time / SDPA | peak GiB | peak / SDPA | above weights / SDPA |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    return 0


def _overhead_main(parser: argparse.ArgumentParser, args: argparse.Namespace, stats: StatsSpec) -> int:
    """``--overhead``: the instrumented (with ``stats``) / plain table per length and backend."""
    backends = tuple(args.overhead.split(","))
    try:
        check_backends(backends)  # before the model loads
    except ValueError as exc:
        parser.error(str(exc))
    device, dtype = ("cuda", torch.bfloat16) if _cuda() else ("cpu", torch.float32)
    model = load_model(args.model, device=device, dtype=dtype)
    print(
        f"{args.model} on {device} ({dtype}), torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, "
        f"statistics {stats}, {args.repeats} interleaved rounds after one warm-up"
    )
    rows = []
    for tokens in (int(x) for x in args.lengths.split(",")):
        for i, found in enumerate(measure_overhead(model, tokens, backends, stats, repeats=args.repeats)):
            rows.append(found.row())
            if i == 0:
                print(f"{tokens} tokens, plain: {[round(s, 3) for s in found.plain]}", flush=True)
            print(f"{tokens} tokens, {found.backend}: {[round(s, 3) for s in found.instrumented]}", flush=True)
    print("\n| " + " | ".join(rows[0]) + " |")
    print("| " + " | ".join("---" for _ in rows[0]) + " |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
