"""Speed and memory of :func:`kernels.attention` against PyTorch SDPA and an eager pattern path.

What is measured
----------------
Three suites of causal attention problems (``--suites``), each row built from fresh
``torch.randn`` inputs of batch ``B`` and ``H`` query heads:

``mha``
    Self-attention, ``Nq = Nk = N``, for each head dim ``D`` (``--dims``) and length ``N``
    (``--lengths``), ``Hkv = H``.
``gqa``
    The same with grouped-query attention: ``Hkv`` in ``--kv-heads`` (default 8 and 4 of 32
    query heads: groups of 4 and 8). K and V are never repeated in memory; SDPA gets
    ``enable_gqa=True``.
``decode``
    Decoding shapes: ``Nq`` in ``--queries`` (default 1, 4, 16) new queries against ``N``
    cached keys (bottom-right causal; SDPA gets ``causal_lower_right``), ``Hkv`` =
    ``--decode-kv-heads`` (default 8), ``D`` = 128. The kernel splits the keys across
    programs and merges (flash-decoding); ``unsplit`` is the same kernel with one program per
    key/value head, to show what the split buys.

These variants run on each row:

``sdpa``
    ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)``; PyTorch
    picks its fastest backend. Baseline of the ratios and reference output of the checks.
``plain``
    ``kernels.attention(q, k, v, stats=None, backend="triton")``.
``rowstats``
    ``kernels.attention`` with every row statistic (:data:`ROW_STATS`: entropy, max_prob,
    argmax, sink mass of 1 token, local mass of a 64-key window, mean distance, mass at
    offset 1).
``keymass``
    The same plus ``key_mass=True``; the whole call (forward kernel and key-mass pass).
``unsplit`` (decode suite)
    ``plain`` without key splitting.
``graphed`` (decode suite, CUDA)
    ``rowstats`` captured once in a CUDA graph and replayed: the call's latency without host
    time, as a decoding loop that captures its steps would see it. Its outputs are checked
    like the others', so the row also shows that the call is capturable.
``eager`` (mha suite)
    What TransformerLens does to expose the pattern: ``q`` and ``k`` upcast to float32,
    ``scores = q @ k^T * scale``, ``torch.where(causal_mask, scores, -inf)``, softmax,
    NaN -> 0, the pattern cast back to the input dtype and multiplied by ``v``; plus the row
    entropy from the float32 pattern. Its peak memory above what was allocated before the
    call is reported as well. It is skipped, reported as ``OOM (est. X GiB)``, when the
    float32 ``[B, H, N, N]`` matrix alone (X) exceeds the device memory; a real
    out-of-memory error is reported as ``OOM``.

Columns: ``<variant>_ms`` (median time per call), ``eager_peak_gib``, ``<variant>/sdpa``
(throughput relative to SDPA, ``sdpa_ms / variant_ms``: 1.0 is as fast as SDPA, higher is
faster), ``<variant>_TFLOP/s`` (causal FLOPs ``4 * B * H * D`` per visible query-key pair;
``N * N * D / 2`` pairs for self-attention), for decoding ``<variant>_GB/s`` (bytes of K
and V read per second), ``max_err`` (largest ``||out - sdpa|| / ||sdpa||`` over the
variants) and ``check``. Each suite prints its own table. Decode rows add
``<variant>_gpu_ms``: the GPU time of the call's kernels alone (PyTorch profiler), since at
these sizes a call's latency is mostly host time (Python, launches) rather than GPU work.

Method
------
* Before any timing, each variant runs once on the row's inputs. That call autotunes the
  Triton kernels for the new shape, and its outputs are checked: every output against SDPA
  by relative error (bf16 tolerance 2e-2), at every length; for ``Nq * N <= 4096^2`` also the
  statistics against the exact ``backend="reference"`` implementation; and ``key_mass``
  must add up to one per query row. A failed check prints ``FAIL`` in the ``check`` column
  (the variant is still timed).
* On CUDA, times come from ``triton.testing.do_bench(..., return_mode="median")``, which
  flushes the L2 cache before every timed call; its warm-up and repetition windows shrink
  as ``N`` grows, so the default sweep should take about 5 minutes on an H100 (an
  estimate, autotuning included). Rows that would end after ``--time-budget`` seconds
  (default 450; the duration of rows from 32k on is extrapolated as N^2) are skipped and
  marked, so the table is always printed.
* ``--smoke``: a tiny CPU-only run (D=32, H=2, N in 64 and 128, float32, the kernel rows on
  ``backend="reference"``, or Triton's interpreter under ``TRITON_INTERPRET=1``), timed by
  the median of a few ``time.perf_counter`` runs. It proves the script works end to end.

Output: a header (device, versions, dtype, exact command), one progress line per variant,
then the table, always printed last. ``--out PATH`` also writes ``PATH.csv`` (the table)
and ``PATH.json`` (metadata, table and every check).

Run::

    python -m kernels.benchmark                       # every suite (CUDA)
    python -m kernels.benchmark --suites mha --dims 128 --lengths 4k,32k --no-eager
    python -m kernels.benchmark --suites gqa --kv-heads 8
    python -m kernels.benchmark --suites decode --queries 1 --lengths 128k
    python -m kernels.benchmark --out results/h100    # + results/h100.csv, results/h100.json
    python -m kernels.benchmark --smoke               # tiny CPU check

To add a variant, return one more :class:`Variant`, a named zero-arg callable, from
:func:`build_variants`; the runner, checks and table pick it up.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kernels import AttentionStats, StatsSpec, attention

GIB = float(1 << 30)

#: Statistics of the ``rowstats`` variant: every per-row statistic.
ROW_STATS = StatsSpec(
    entropy=True, max_prob=True, argmax=True, sink_tokens=1, window=64, distance=True, offsets=(1,)
)
#: Statistics of the ``keymass`` variant: the row statistics plus the per-key mass.
KEY_STATS = dataclasses.replace(ROW_STATS, key_mass=True)

#: ``--breakdown``: each statistic alone, to see what each one costs.
BREAKDOWN = {
    "entropy": StatsSpec(entropy=True), "argmax": StatsSpec(argmax=True),
    "distance": StatsSpec(distance=True), "sink": StatsSpec(sink_tokens=1),
    "local": StatsSpec(window=64), "offset": StatsSpec(offsets=(1,)),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Largest accepted ``||out - ref|| / ||ref||`` per input dtype.
OUT_TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 5e-3}
#: Statistics are compared with the reference backend up to this length (it is O(N^2)).
STATS_CHECK_MAX_N = 4096
#: Largest accepted ``max |got - ref| / max(1, max |ref|)`` for a statistic.
STATS_TOL = 2e-2
#: Largest accepted fraction of rows whose argmax differs from the reference (near ties).
ARGMAX_TOL = 2e-2
#: Largest accepted relative deviation of ``sum(key_mass)`` from the number of query rows.
KEY_MASS_SUM_TOL = 5e-3

SUITES = ("mha", "gqa", "decode")
GPU_DEFAULTS = dict(
    dims="128,64", heads=32, dtype="bf16", kv_heads="8,4", queries="1,4,16", decode_kv_heads=8,
    decode_dims="128", lengths={"mha": "1k,2k,4k,8k,16k,32k,64k,128k", "gqa": "8k,32k",
                                "decode": "8k,32k,128k"},
)
SMOKE_DEFAULTS = dict(
    dims="32", heads=4, dtype="fp32", kv_heads="2", queries="1,4", decode_kv_heads=2,
    decode_dims="32", lengths={"mha": "64,128", "gqa": "64", "decode": "128"},
)
SMOKE_REPS = 3
#: The out-of-memory exception (``torch.OutOfMemoryError`` on torch >= 2.5).
OOM_ERROR: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class CheckResult:
    """One correctness check of one variant: ``error`` must be finite and ``<= tol``."""

    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tol


Check = Callable[[Any], list[CheckResult]]


def _first(result: Any) -> torch.Tensor:
    """The attention output of a variant's result: the tensor itself or its first item."""
    return result[0] if isinstance(result, tuple) else result


@dataclass
class Variant:
    """One named way of computing attention on the row's inputs.

    Attributes:
        name: column prefix (``<name>_ms``).
        fn: zero-argument callable doing the whole computation (what gets timed).
        output: picks the ``[B, H, N, D]`` output from ``fn()``'s result.
        checks: extra checks on ``fn()``'s result (beyond the output against the reference).
        reference: this variant's output is the reference of the others (one per row).
        skip: if set, the variant does not run and this text fills its cells.
        track_memory: report the peak memory of one call (``<name>_peak_gib``).
        kernel_time: also report the GPU time of the call's kernels alone, without the host
            time between them (``<name>_gpu_ms``, from the PyTorch profiler; CUDA only).
        ratio: report the ``<name>/<reference>`` throughput ratio.
        tflops: report ``<name>_TFLOP/s``.
    """

    name: str
    fn: Callable[[], Any]
    output: Callable[[Any], torch.Tensor] = _first
    checks: Sequence[Check] = ()
    reference: bool = False
    skip: str | None = None
    track_memory: bool = False
    kernel_time: bool = False
    ratio: bool = True
    tflops: bool = False


@dataclass
class Measurement:
    """What one variant gave on one row; ``status`` is ``ok``, ``OOM``, ``ERROR ...`` or a
    skip reason."""

    name: str
    status: str = "ok"
    ms: float | None = None
    peak_gib: float | None = None
    gpu_ms: float | None = None
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    @property
    def out_error(self) -> float | None:
        return next((c.error for c in self.checks if c.name == "out"), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "status": self.status, "ms": self.ms, "peak_gib": self.peak_gib, "gpu_ms": self.gpu_ms,
            "checks": [dict(dataclasses.asdict(c), ok=c.ok) for c in self.checks],
        }


@dataclass(frozen=True)
class Shape:
    """One row: a causal problem of ``Nq`` queries against ``N`` keys."""

    suite: str
    d: int
    kv_heads: int
    n_q: int
    n: int

    @property
    def series(self) -> tuple:
        """The rows that differ only in ``N`` (a line of the table, read down)."""
        return (self.suite, self.d, self.kv_heads, self.n_q if self.suite == "decode" else 0)

    def label(self) -> str:
        q = "" if self.n_q == self.n else f" Nq={self.n_q:<3d}"
        return f"{self.suite:<6s} D={self.d:<4d} Hkv={self.kv_heads:<3d}{q} N={self.n:<7d}"


@dataclass(frozen=True)
class Config:
    """Everything a run needs, resolved from the command line."""

    shapes: tuple[Shape, ...]
    heads: int
    batch: int
    dtype: torch.dtype
    device: torch.device
    kernel_backend: str
    eager: bool
    breakdown: bool
    seed: int
    time_budget_s: float
    smoke: bool
    out: Path | None


Row = dict[str, Any]
Timer = Callable[[Callable[[], Any]], float]


# --------------------------------------------------------------------------- command line


def parse_size(text: str) -> int:
    """``"4096"``, ``"4k"`` or ``"1m"`` (binary multiples) as an int."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1024, 4k, 128k)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20}[match.group(2).lower()]
    return int(match.group(1)) * scale


def parse_sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of :func:`parse_size` values; each must be positive."""
    sizes = tuple(parse_size(part) for part in text.split(",") if part.strip())
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"need positive sizes, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.benchmark",
        description="Time kernels.attention (plain, with row statistics, with key mass) against "
        "PyTorch SDPA and an eager TransformerLens-style path; causal, one row per (D, N).",
    )
    parser.add_argument("--suites", default=",".join(SUITES),
                        help=f"which suites, comma-separated: {', '.join(SUITES)} (default all)")
    parser.add_argument("--dims", type=parse_sizes, default=None,
                        help=f"head dims of the mha and gqa suites (default {GPU_DEFAULTS['dims']}; "
                        f"decode: {GPU_DEFAULTS['decode_dims']})")
    parser.add_argument("--lengths", type=parse_sizes, default=None,
                        help="key counts N (= query counts in mha and gqa), comma-separated, k suffix "
                        "allowed (default: mha " + GPU_DEFAULTS["lengths"]["mha"] + "; gqa "
                        + GPU_DEFAULTS["lengths"]["gqa"] + "; decode " + GPU_DEFAULTS["lengths"]["decode"] + ")")
    parser.add_argument("--heads", type=int, default=None,
                        help=f"query heads (default {GPU_DEFAULTS['heads']})")
    parser.add_argument("--kv-heads", type=parse_sizes, default=None,
                        help=f"key/value heads of the gqa suite, each dividing --heads "
                        f"(default {GPU_DEFAULTS['kv_heads']})")
    parser.add_argument("--queries", type=parse_sizes, default=None,
                        help=f"query counts of the decode suite (default {GPU_DEFAULTS['queries']})")
    parser.add_argument("--decode-kv-heads", type=int, default=None,
                        help=f"key/value heads of the decode suite (default {GPU_DEFAULTS['decode_kv_heads']})")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help=f"input dtype (default {GPU_DEFAULTS['dtype']}; fp32 with --smoke)")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager pattern path")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each row statistic alone (entropy, argmax, ...) in the mha suite")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    parser.add_argument("--time-budget", type=float, default=450.0, metavar="SECONDS",
                        help="skip rows predicted to end after this many seconds (0: no limit; "
                        "default 450)")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="also write PATH.csv (the table) and PATH.json (metadata + details)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny CPU-only run (D={SMOKE_DEFAULTS['dims']}, "
                        f"H={SMOKE_DEFAULTS['heads']}, N={SMOKE_DEFAULTS['lengths']}, fp32) "
                        "proving the script works without a GPU")
    return parser


def plan_shapes(args: argparse.Namespace, parser: argparse.ArgumentParser, heads: int) -> tuple[Shape, ...]:
    """Every row of the run, suite by suite, lengths outermost (so a time budget cuts the
    longest rows)."""
    defaults = SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS
    suites = tuple(x.strip() for x in args.suites.split(",") if x.strip())
    unknown = [x for x in suites if x not in SUITES]
    if unknown or not suites:
        parser.error(f"unknown suite(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SUITES)}")
    kv_heads = args.kv_heads or parse_sizes(defaults["kv_heads"])
    decode_kv = args.decode_kv_heads if args.decode_kv_heads is not None else defaults["decode_kv_heads"]
    for kv in (*kv_heads, decode_kv):
        if kv <= 0 or heads % kv:
            parser.error(f"key/value heads ({kv}) must be positive and divide --heads ({heads})")
    queries = args.queries or parse_sizes(defaults["queries"])
    shapes = []
    for suite in suites:
        lengths = args.lengths or parse_sizes(defaults["lengths"][suite])
        if suite == "decode":
            dims = args.dims or parse_sizes(defaults["decode_dims"])
            shapes += [Shape(suite, d, decode_kv, nq, n) for n in lengths for nq in queries if nq <= n for d in dims]
        else:
            dims = args.dims or parse_sizes(defaults["dims"])
            kvs = (heads,) if suite == "mha" else kv_heads
            shapes += [Shape(suite, d, kv, n, n) for n in lengths for d in dims for kv in kvs]
    return tuple(shapes)


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """Fill defaults (GPU sweep or smoke), check consistency, pick the device and backend."""
    defaults = SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS
    heads = args.heads if args.heads is not None else defaults["heads"]
    if heads <= 0:
        parser.error("--heads must be positive")
    shapes = plan_shapes(args, parser, heads)
    if args.batch <= 0:
        parser.error("--batch must be positive")
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("CUDA is not available; run with --smoke for the CPU check")
    out = args.out
    if out is not None and out.suffix in (".csv", ".json"):
        out = out.with_suffix("")
    return Config(
        shapes=shapes, heads=heads, batch=args.batch,
        dtype=DTYPES[args.dtype or defaults["dtype"]], device=device,
        kernel_backend=kernel_backend(device), eager=not args.no_eager, breakdown=args.breakdown, seed=args.seed,
        time_budget_s=0.0 if args.smoke else args.time_budget, smoke=args.smoke, out=out,
    )


def kernel_backend(device: torch.device) -> str:
    """``triton`` on CUDA or under Triton's interpreter, else ``reference``."""
    if device.type == "cuda":
        return "triton"
    try:
        from kernels.triton_attention import interpreting
    except ImportError:
        return "reference"
    return "triton" if interpreting() else "reference"


# --------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GIB:.1f} GiB)"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the device (physical RAM for the CPU), if known."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def sdpa_backends() -> str:
    """The SDPA backends PyTorch may choose from on CUDA."""
    flags = {
        "flash": torch.backends.cuda.flash_sdp_enabled,
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
        "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False),
        "math": torch.backends.cuda.math_sdp_enabled,
    }
    return ", ".join(name for name, enabled in flags.items() if enabled())


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def command_line() -> str:
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def metadata(cfg: Config) -> dict[str, Any]:
    return {
        "device": device_name(cfg.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "batch": cfg.batch, "heads": cfg.heads, "causal": True,
        "suites": sorted({sh.suite for sh in cfg.shapes}, key=SUITES.index),
        "kernel_backend": cfg.kernel_backend, "smoke": cfg.smoke,
        "sdpa_backends": sdpa_backends() if cfg.device.type == "cuda" else "cpu",
        "row_stats": repr(ROW_STATS), "key_stats": repr(KEY_STATS),
    }


def print_header(meta: dict[str, Any]) -> None:
    print(f"# kernels.benchmark: causal attention, suites {', '.join(meta['suites'])}, "
          f"B={meta['batch']} H={meta['heads']}, dtype {meta['dtype']}, kernel backend {meta['kernel_backend']}"
          + (" (SMOKE: tiny CPU run, timings meaningless)" if meta["smoke"] else ""))
    print(f"# device: {meta['device']} | torch {meta['torch']} (CUDA {meta['cuda']}) | "
          f"triton {meta['triton']} | python {meta['python']} | git {meta['git_commit']}")
    print(f"# sdpa backends enabled: {meta['sdpa_backends']}")
    print(f"# rowstats: {meta['row_stats']}; keymass: the same with key_mass=True")
    print(f"# command: {meta['command']}", flush=True)


# --------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attempt(fn: Callable[[], Any], device: torch.device) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, "OOM" / "ERROR ...")`` with the memory released.

    Any exception is caught so one broken variant cannot stop the sweep; its traceback goes
    to stderr and the table shows ``ERROR``.
    """
    failure = None
    try:
        result = fn()
        synchronize(device)
        return result, None
    except OOM_ERROR:
        failure = "OOM"
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        failure = f"ERROR {type(exc).__name__}"
    # The exception and its frames (holding the big temporaries) are gone only here.
    release_memory(device)
    return None, failure


def bench_windows_ms(n: int) -> tuple[int, int]:
    """``(warmup, rep)`` windows of ``do_bench``: short for long rows, whose single calls take
    ~0.1-1 s and where do_bench's fixed minimum of calls already dominates."""
    if n <= 8192:
        return 25, 100
    if n <= 32768:
        return 10, 200
    return 1, 1000


def make_timer(cfg: Config, n: int) -> Timer:
    """Median milliseconds per call of a zero-arg callable."""
    if cfg.device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = bench_windows_ms(n)
        return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def cpu_timer(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(SMOKE_REPS):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return cpu_timer


def peak_memory_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / GIB


def relative_error(out: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 26) -> float:
    """``||out - ref|| / ||ref||`` in float32, in chunks (no full float32 copies)."""
    if out.shape != ref.shape:
        return math.inf
    num = den = 0.0
    for o, r in zip(out.reshape(-1).split(chunk), ref.reshape(-1).split(chunk)):
        r32 = r.float()
        num += float((o.float() - r32).square().sum())
        den += float(r32.square().sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def run_variant(
    variant: Variant, ref_out: torch.Tensor | None, timer: Timer, cfg: Config, tol: float
) -> tuple[Measurement, torch.Tensor | None]:
    """Warm call (autotunes), checks, optional peak memory, then timing.

    Returns the measurement and, for the reference variant, its output.
    """
    m = Measurement(variant.name)
    if variant.skip is not None:
        m.status = variant.skip
        return m, None
    result, failure = attempt(variant.fn, cfg.device)
    if failure:
        m.status = failure
        return m, None
    out = variant.output(result)
    if ref_out is not None and not variant.reference:
        m.checks.append(CheckResult("out", relative_error(out, ref_out), tol))
    for check in variant.checks:
        m.checks.extend(check(result))
    keep = out if variant.reference else None
    del result, out
    if variant.track_memory:
        m.peak_gib, failure = attempt(lambda: peak_memory_gib(variant.fn, cfg.device), cfg.device)
        if failure:
            m.status = failure
            return m, keep
    m.ms, failure = attempt(lambda: timer(variant.fn), cfg.device)
    if failure:
        m.status = failure
    elif variant.kernel_time and cfg.device.type == "cuda":
        m.gpu_ms, _ = attempt(lambda: kernel_ms(variant.fn), cfg.device)
    return m, keep


def kernel_ms(fn: Callable[[], Any], calls: int = 20) -> float:
    """Mean GPU time per call of the kernels ``fn`` launches (PyTorch profiler): the device's
    own work, without the host time between launches that short calls wait for."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / calls / 1e3


# --------------------------------------------------------------------------- checks


def scaled_max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max(1, max |ref|)``, in float64."""
    if got.shape != ref.shape:
        return math.inf
    g, r = got.double(), ref.double()
    return float((g - r).abs().max() / r.abs().max().clamp_min(1.0))


def stats_check(ref: AttentionStats | None) -> list[Check]:
    """Compare every statistic a result holds with the reference backend's."""
    if ref is None:
        return []

    def check(result: Any) -> list[CheckResult]:
        stats: AttentionStats = result[1]
        found = []
        for name, ref_t in ref.items():
            got = getattr(stats, name)
            if got is None:
                continue
            if name == "argmax":
                differ = float((got != ref_t).double().mean()) if got.shape == ref_t.shape else math.inf
                found.append(CheckResult(name, differ, ARGMAX_TOL))
            else:
                found.append(CheckResult(name, scaled_max_error(got, ref_t), STATS_TOL))
        return found

    return [check]


def key_mass_sum_check(n_q: int) -> Check:
    """Each causal query row spreads a mass of one over its keys: sum(key_mass) = Nq."""

    def check(result: Any) -> list[CheckResult]:
        total = result[1].key_mass.double().sum(-1)
        return [CheckResult("key_mass_sum", float((total - n_q).abs().max()) / n_q, KEY_MASS_SUM_TOL)]

    return [check]


def eager_entropy_check(ref: AttentionStats | None) -> list[Check]:
    if ref is None or ref.entropy is None:
        return []
    return [lambda result: [CheckResult("entropy", scaled_max_error(result[1], ref.entropy), STATS_TOL)]]


# --------------------------------------------------------------------------- variants


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise the pattern as TransformerLens does; returns ``(out, entropy)``.

    ``keep`` is the ``[N, N]`` boolean causal mask (True = attend), built once like the
    model's mask buffer.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if q.dtype not in (torch.float32, torch.float64):
        q, k = q.float(), k.float()
    scores = q @ k.transpose(-1, -2) * scale
    scores = torch.where(keep, scores, float("-inf"))
    pattern = torch.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    entropy = -torch.special.xlogy(pattern, pattern).sum(-1)
    out = pattern.to(v.dtype) @ v
    return out, entropy


def eager_variant(cfg: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  ref: AttentionStats | None) -> Variant:
    b, h, n, d = q.shape
    matrix_gib = b * h * n * n * 4 / GIB
    total = device_memory_bytes(cfg.device)
    common = dict(track_memory=True, ratio=False, checks=eager_entropy_check(ref))
    if total is not None and matrix_gib * GIB > total:
        size = f"{matrix_gib:.0f}" if matrix_gib >= 10 else f"{matrix_gib:.2g}"
        return Variant("eager", lambda: None, skip=f"OOM (est. {size} GiB)", **common)
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scale = 1.0 / math.sqrt(d)
    return Variant("eager", lambda: eager_attention(q, k, v, keep, scale), **common)


def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """PyTorch SDPA on the row's problem: causal, bottom-right aligned when ``Nq < Nk``."""
    kwargs: dict[str, Any] = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q == n_k:
        kwargs["is_causal"] = True
    elif n_q > 1:  # a single query sees every key: no mask at all
        from torch.nn.attention.bias import causal_lower_right

        kwargs["attn_mask"] = causal_lower_right(n_q, n_k)
    return lambda: F.scaled_dot_product_attention(q, k, v, **kwargs)


def build_variants(cfg: Config, shape: Shape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   ref: AttentionStats | None) -> list[Variant]:
    """The variants of one row; the first is the reference."""
    backend = cfg.kernel_backend
    variants = [
        Variant("sdpa", sdpa_call(q, k, v), reference=True, ratio=False, tflops=True),
        Variant("plain", lambda: attention(q, k, v, causal=True, stats=None, backend=backend), tflops=True),
    ]
    if shape.suite == "decode":
        variants.append(unsplit_variant(backend, q, k, v))
        for variant in variants:
            variant.kernel_time = True
    rowstats = Variant("rowstats", lambda: attention(q, k, v, causal=True, stats=ROW_STATS, backend=backend),
                       checks=stats_check(ref), tflops=True)
    variants += [
        rowstats,
        Variant("keymass", lambda: attention(q, k, v, causal=True, stats=KEY_STATS, backend=backend),
                checks=stats_check(ref) + key_mass_sum_check(q.shape[2])),
    ]
    if shape.suite == "decode":
        variants.append(graphed_variant(cfg, rowstats, ref))
    if cfg.breakdown and shape.suite == "mha":
        for name, spec in BREAKDOWN.items():
            variants.append(Variant(name, lambda spec=spec: attention(q, k, v, causal=True, stats=spec, backend=backend)))
    if cfg.eager and shape.suite == "mha":
        variants.append(eager_variant(cfg, q, k, v, ref))
    return variants


def unsplit_variant(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Variant:
    """The Triton kernel on a decoding shape with the keys not split across programs."""
    if backend != "triton":
        return Variant("unsplit", lambda: None, skip="n/a (no Triton)")
    from kernels.triton_attention import triton_attention
    from kernels.validate import check_inputs

    p = check_inputs(q, k, v, causal=True, scale=None, stats=None, key_lengths=None, query_lengths=None)
    return Variant("unsplit", lambda: triton_attention(q, k, v, p, None, max_splits=1), tflops=True,
                   kernel_time=True)


def graphed_variant(cfg: Config, eager: Variant, ref: AttentionStats | None) -> Variant:
    """``eager`` replayed from a CUDA graph, captured at the first call (after one eager
    call, which autotunes and compiles outside the capture)."""
    if cfg.device.type != "cuda" or cfg.kernel_backend != "triton":
        return Variant("graphed", lambda: None, skip="n/a (CUDA only)")
    captured: dict[str, Any] = {}

    def replay() -> Any:
        if not captured:
            eager.fn()
            torch.cuda.synchronize(cfg.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured["result"] = eager.fn()
            captured["graph"] = graph
        captured["graph"].replay()
        return captured["result"]

    return Variant("graphed", replay, checks=stats_check(ref), tflops=True)


# --------------------------------------------------------------------------- rows


def make_inputs(cfg: Config, shape: Shape, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    def randn(heads: int, n: int) -> torch.Tensor:
        return torch.randn(cfg.batch, heads, n, shape.d, generator=gen, device=cfg.device, dtype=cfg.dtype)

    return randn(cfg.heads, shape.n_q), randn(shape.kv_heads, shape.n), randn(shape.kv_heads, shape.n)


def reference_stats(cfg: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionStats | None:
    """Exact statistics of the row from the reference backend (small problems only)."""
    if q.shape[2] * k.shape[2] > STATS_CHECK_MAX_N**2:
        return None
    stats, failure = attempt(
        lambda: attention(q, k, v, causal=True, stats=KEY_STATS, backend="reference")[1], cfg.device
    )
    if failure:
        print(f"    reference statistics unavailable: {failure}", flush=True)
    return stats


def rate(cfg: Config, shape: Shape, ms: float) -> tuple[str, float]:
    """``("TFLOP/s", x)``: causal FLOPs (4 D per visible query-key pair and head) per second;
    for decoding ``("GB/s", x)``: bytes of K and V read per second (decoding is memory-bound)."""
    if shape.suite == "decode":
        size = torch.tensor([], dtype=cfg.dtype).element_size()
        return "GB/s", 2 * cfg.batch * shape.kv_heads * shape.n * shape.d * size / (ms * 1e-3) / 1e9
    pairs = shape.n_q * shape.n - shape.n_q * (shape.n_q - 1) / 2
    return "TFLOP/s", 4 * cfg.batch * cfg.heads * pairs * shape.d / (ms * 1e-3) / 1e12


def progress_line(shape: Shape, m: Measurement) -> str:
    ms = f"{m.ms:10.4f} ms" if m.ms is not None else f"{'-':>10}   "
    parts = [f"  {shape.label()} {m.name:<9s}{ms}  {m.status}"]
    if m.peak_gib is not None:
        parts.append(f"peak {m.peak_gib:.2f} GiB")
    if m.gpu_ms is not None:
        parts.append(f"kernels alone {m.gpu_ms:.4f} ms")
    parts += [f"{c.name} {c.error:.1e}{'' if c.ok else ' FAIL'}" for c in m.checks]
    return " | ".join(parts)


def run_row(cfg: Config, shape: Shape, gen: torch.Generator) -> tuple[Row, list[Measurement]]:
    """Build the inputs and variants of one shape, measure each, summarise as a row."""
    q, k, v = make_inputs(cfg, shape, gen)
    ref = reference_stats(cfg, q, k, v)
    variants = build_variants(cfg, shape, q, k, v, ref)
    timer = make_timer(cfg, shape.n if shape.suite != "decode" else 1024)
    tol = OUT_TOL[cfg.dtype]
    ref_out: torch.Tensor | None = None
    measured: list[tuple[Variant, Measurement]] = []
    for variant in variants:
        m, out = run_variant(variant, ref_out, timer, cfg, tol)
        if variant.reference:
            ref_out = out
        print(progress_line(shape, m), flush=True)
        measured.append((variant, m))
    del q, k, v, ref, variants, ref_out
    release_memory(cfg.device)
    return summarize_row(cfg, shape, measured), [m for _, m in measured]


def summarize_row(cfg: Config, shape: Shape, measured: list[tuple[Variant, Measurement]]) -> Row:
    """Table columns of one row: times, peak memory, ratios, TFLOP/s, error, check."""
    row: Row = {"suite": shape.suite, "D": shape.d, "Hkv": shape.kv_heads, "Nq": shape.n_q, "N": shape.n}
    for variant, m in measured:
        row[f"{variant.name}_ms"] = m.ms if m.status == "ok" else m.status
        if variant.track_memory:
            row[f"{variant.name}_peak_gib"] = m.peak_gib
    for variant, m in measured:
        if variant.kernel_time and cfg.device.type == "cuda":
            row[f"{variant.name}_gpu_ms"] = m.gpu_ms
    ref = next(((var, m) for var, m in measured if var.reference), None)
    ref_ms = ref[1].ms if ref and ref[1].status == "ok" else None
    for variant, m in measured:
        if variant.ratio and ref is not None:
            ok = ref_ms and m.ms and m.status == "ok"
            row[f"{variant.name}/{ref[0].name}"] = ref_ms / m.ms if ok else None
    for variant, m in measured:
        if variant.tflops:
            unit, _ = rate(cfg, shape, 1.0)
            row[f"{variant.name}_{unit}"] = rate(cfg, shape, m.ms)[1] if m.ms and m.status == "ok" else None
    errors = [m.out_error for _, m in measured if m.out_error is not None]
    row["max_err"] = max(errors) if errors else None
    failed = [f"{m.name}({','.join(m.failed)})" for _, m in measured if m.failed]
    if failed:
        row["check"] = "FAIL " + " ".join(failed)
    elif ref_ms is None and ref is not None:
        row["check"] = "no reference"
    else:
        row["check"] = "ok"
    return row


# --------------------------------------------------------------------------- output


def format_cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if key.endswith("_ms"):
        return f"{value:.4f}" if value < 1 else f"{value:.3f}" if value < 100 else f"{value:.1f}"
    if key == "max_err":
        return f"{value:.1e}"
    if key.endswith("TFLOP/s") or key.endswith("GB/s"):
        return f"{value:.0f}"
    return f"{value:.2f}"  # ratios, GiB


def table_columns(rows: Sequence[Row]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    if "check" in columns:  # always last
        columns.remove("check")
        columns.append("check")
    return columns


def format_table(rows: Sequence[Row]) -> str:
    columns = table_columns(rows)
    cells = [[format_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = [val.ljust(w) if col == "check" else val.rjust(w)
                  for col, val, w in zip(columns, values, widths)]
        return "  ".join(padded).rstrip()

    rule = "-" * len(line(columns))
    return "\n".join([rule, line(columns), rule, *(line(r) for r in cells), rule])


def write_outputs(base: Path, rows: Sequence[Row], details: list[dict[str, Any]],
                  meta: dict[str, Any]) -> tuple[Path, Path]:
    """``base.csv`` (the table, raw values) and ``base.json`` (metadata, table, details)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = base.with_name(base.name + ".csv"), base.with_name(base.name + ".json")
    columns = table_columns(rows)
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    payload = {"meta": meta, "columns": columns, "rows": list(rows), "details": details}
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return csv_path, json_path


def print_legend(cfg: Config) -> None:
    tol = OUT_TOL[cfg.dtype]
    print("# <v>_ms: median ms per call; <v>/sdpa: sdpa_ms / <v>_ms (1.0 = as fast as SDPA); "
          "TFLOP/s from causal FLOPs (4*B*H*D per visible query-key pair); decode GB/s: K and V bytes read")
    print(f"# max_err: max ||out - sdpa|| / ||sdpa|| (tolerance {tol:g}); statistics checked "
          f"against backend='reference' for Nq*N <= {STATS_CHECK_MAX_N}^2; eager_peak_gib: peak "
          "memory above the inputs; OOM (est. X): float32 N x N scores alone need X")


# --------------------------------------------------------------------------- main loop


def predicted_seconds(history: dict[tuple, tuple[int, float]], shape: Shape) -> float | None:
    """Row duration scaled by N^2 from the previous row of this kind, once rows are long
    enough (from 32k on) for the quadratic work, not compilation or fixed windows, to dominate."""
    if shape.series not in history:
        return None
    prev_n, seconds = history[shape.series]
    if prev_n < 32768:
        return None
    power = 1 if shape.suite == "decode" else 2
    return seconds * (shape.n / prev_n) ** power


def run(cfg: Config, meta: dict[str, Any]) -> tuple[list[Row], list[dict[str, Any]]]:
    """Every row of :attr:`Config.shapes`; a time budget skips the rows that would end late."""
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed)
    rows: list[Row] = []
    details: list[dict[str, Any]] = []
    history: dict[tuple, tuple[int, float]] = {}
    start = time.perf_counter()
    try:
        for shape in cfg.shapes:
            elapsed = time.perf_counter() - start
            guess = predicted_seconds(history, shape)
            if cfg.time_budget_s > 0 and elapsed + (guess or 0.0) > cfg.time_budget_s:
                print(f"  {shape.label()} skipped: {elapsed:.0f} s elapsed + {guess or 0.0:.0f} s "
                      f"predicted > --time-budget {cfg.time_budget_s:g}", flush=True)
                rows.append({"suite": shape.suite, "D": shape.d, "Hkv": shape.kv_heads, "Nq": shape.n_q,
                             "N": shape.n, "check": "skipped (time budget)", "_series": shape.series})
                continue
            t0 = time.perf_counter()
            row, measured = run_row(cfg, shape, gen)
            seconds = time.perf_counter() - t0
            history[shape.series] = (shape.n, seconds)
            print(f"  {shape.label()} row took {seconds:.1f} s (total {time.perf_counter() - start:.0f} s)", flush=True)
            rows.append(row | {"_series": shape.series})
            details.append({**dataclasses.asdict(shape), "seconds": seconds,
                            "variants": [m.as_dict() for m in measured]})
            if cfg.out is not None:
                write_outputs(cfg.out, ordered(rows, cfg), details, meta)
    except KeyboardInterrupt:
        print("  interrupted: the tables hold the rows finished so far", flush=True)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    return ordered(rows, cfg), details


def ordered(rows: list[Row], cfg: Config) -> list[Row]:
    """Rows grouped by series (suite, D, Hkv, Nq) in planned order, then by N."""
    first: dict[tuple, int] = {}
    for i, shape in enumerate(cfg.shapes):
        first.setdefault(shape.series, i)
    return [{k: v for k, v in row.items() if k != "_series"}
            for row in sorted(rows, key=lambda row: (first[row["_series"]], row["N"]))]


def suite_tables(rows: Sequence[Row]) -> str:
    """One table per suite, without the columns that say nothing there."""
    out = []
    for suite in SUITES:
        part = [{k: v for k, v in row.items() if k != "suite" and not (k == "Nq" and suite != "decode")}
                for row in rows if row["suite"] == suite]
        if part:
            out.append(f"# {suite}\n{format_table(part)}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    cfg = resolve_config(parser.parse_args(argv), parser)
    meta = metadata(cfg)
    print_header(meta)
    with torch.no_grad():
        rows, details = run(cfg, meta)
    print(f"# done in {meta['seconds']:.1f} s")
    print_legend(cfg)
    if cfg.out is not None:
        csv_path, json_path = write_outputs(cfg.out, rows, details, meta)
        print(f"# wrote {csv_path} and {json_path}")
    print(suite_tables(rows), flush=True)
    return 1 if any(str(r.get("check", "")).startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
