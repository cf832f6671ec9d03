"""What a benchmark run is: constants, the rows (:class:`Shape`), the command line and the resolved :class:`Config`."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernels import StatsSpec

GIB = float(1 << 30)

#: Statistics of the ``rowstats`` variant: every per-row statistic.
ROW_STATS = StatsSpec.every_row_statistic()
#: Statistics of the ``keymass`` variant: the row statistics plus the per-key mass.
KEY_STATS = StatsSpec.every_row_statistic(key_mass=True)
#: Query rows of the ``keymass_last`` variant: key mass over the last rows only (SnapKV's window).
KEY_MASS_LAST = 64

#: ``--breakdown``: each statistic alone, to see what each one costs.
BREAKDOWN = {
    "entropy": StatsSpec(entropy=True),
    "argmax": StatsSpec(argmax=True),
    "distance": StatsSpec(distance=True),
    "sink": StatsSpec(sink_tokens=1),
    "local": StatsSpec(window=64),
    "offset": StatsSpec(offsets=(1,)),
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
    dims="128,64",
    heads=32,
    dtype="bf16",
    kv_heads="8,4",
    queries="1,4,16",
    decode_kv_heads=8,
    decode_dims="128",
    lengths={"mha": "1k,2k,4k,8k,16k,32k,64k,128k", "gqa": "8k,32k", "decode": "8k,32k,128k"},
)
SMOKE_DEFAULTS = dict(
    dims="32",
    heads=4,
    dtype="fp32",
    kv_heads="2",
    queries="1,4",
    decode_kv_heads=2,
    decode_dims="32",
    lengths={"mha": "64,128", "gqa": "64", "decode": "128"},
)
SMOKE_REPS = 3


# --------------------------------------------------------------------------- data types


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
    """The command line of ``python -m kernels.benchmark`` (and ``workbench bench``)."""
    parser = argparse.ArgumentParser(
        prog="python -m kernels.benchmark",
        description="Time kernels.attention (plain, with row statistics, with key mass) against "
        "PyTorch SDPA and an eager TransformerLens-style path; causal, one row per (D, N).",
    )
    parser.add_argument(
        "--suites", default=",".join(SUITES), help=f"which suites, comma-separated: {', '.join(SUITES)} (default all)"
    )
    parser.add_argument(
        "--dims",
        type=parse_sizes,
        default=None,
        help=f"head dims of the mha and gqa suites (default {GPU_DEFAULTS['dims']}; "
        f"decode: {GPU_DEFAULTS['decode_dims']})",
    )
    parser.add_argument(
        "--lengths",
        type=parse_sizes,
        default=None,
        help="key counts N (= query counts in mha and gqa), comma-separated, k suffix "
        "allowed (default: mha "
        + GPU_DEFAULTS["lengths"]["mha"]
        + "; gqa "
        + GPU_DEFAULTS["lengths"]["gqa"]
        + "; decode "
        + GPU_DEFAULTS["lengths"]["decode"]
        + ")",
    )
    parser.add_argument("--heads", type=int, default=None, help=f"query heads (default {GPU_DEFAULTS['heads']})")
    parser.add_argument(
        "--kv-heads",
        type=parse_sizes,
        default=None,
        help=f"key/value heads of the gqa suite, each dividing --heads (default {GPU_DEFAULTS['kv_heads']})",
    )
    parser.add_argument(
        "--queries",
        type=parse_sizes,
        default=None,
        help=f"query counts of the decode suite (default {GPU_DEFAULTS['queries']})",
    )
    parser.add_argument(
        "--decode-kv-heads",
        type=int,
        default=None,
        help=f"key/value heads of the decode suite (default {GPU_DEFAULTS['decode_kv_heads']})",
    )
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help=f"input dtype (default {GPU_DEFAULTS['dtype']}; fp32 with --smoke)",
    )
    parser.add_argument("--no-eager", action="store_true", help="skip the eager pattern path")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each row statistic alone (entropy, argmax, ...) in the mha suite",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=450.0,
        metavar="SECONDS",
        help="skip rows predicted to end after this many seconds (0: no limit; default 450)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write PATH.csv (the table) and PATH.json (metadata + details)",
    )
    parser.add_argument(
        "--backend",
        choices=("triton", "cute"),
        default="triton",
        help="kernels.attention backend of the kernel rows on CUDA: triton (default: the Gluon kernel on "
        "Hopper, else Triton) or cute (the CuTe DSL kernel, pip install .[cute])",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny CPU-only run (D={SMOKE_DEFAULTS['dims']}, "
        f"H={SMOKE_DEFAULTS['heads']}, N={SMOKE_DEFAULTS['lengths']}, fp32) "
        "proving the script works without a GPU",
    )
    return parser


def out_base(out: Path) -> Path:
    """``--out PATH`` without a ``.csv`` / ``.json`` suffix: the base of both output files."""
    return out.with_suffix("") if out.suffix in (".csv", ".json") else out


def out_problem(out: Path) -> str | None:
    """Why ``--out`` cannot be written, or None: the folder of its files, or that folder's
    nearest existing parent, is a file, or one of ``PATH.csv`` / ``PATH.json`` is a folder.
    Checked before the run, since the files are written only once rows are done."""
    base = out_base(out)
    for folder in base.parents:
        if folder.exists():
            if not folder.is_dir():
                return f"{folder} (in --out {out}) is a file, not a folder: choose another --out"
            break
    for path in (base.with_name(base.name + ".csv"), base.with_name(base.name + ".json")):
        if path.is_dir():
            return f"{path} (from --out {out}) is a folder, not a file: choose another --out"
    return None


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
    problem = out_problem(args.out) if args.out is not None else None
    if problem:
        parser.error(problem)
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("CUDA is not available; run with --smoke for the CPU check")
    return Config(
        shapes=shapes,
        heads=heads,
        batch=args.batch,
        dtype=DTYPES[args.dtype or defaults["dtype"]],
        device=device,
        kernel_backend=kernel_backend(device, args.backend),
        eager=not args.no_eager,
        breakdown=args.breakdown,
        seed=args.seed,
        time_budget_s=0.0 if args.smoke else args.time_budget,
        smoke=args.smoke,
        out=out_base(args.out) if args.out is not None else None,
    )


def kernel_backend(device: torch.device, requested: str = "triton") -> str:
    """``requested`` (``triton`` or ``cute``) on CUDA; ``triton`` under Triton's interpreter,
    else ``reference``."""
    if device.type == "cuda":
        return requested
    try:
        from kernels.triton_attention import interpreting
    except ImportError:
        return "reference"
    return "triton" if interpreting() else "reference"
