"""Running one variant: the warm call and its checks, peak memory, the timer, GPU kernel time (:class:`Measurement`)."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.benchmark.checks import CheckResult, relative_error
from kernels.benchmark.config import GIB, SMOKE_REPS, Config
from kernels.benchmark.variants import Variant

#: The out-of-memory exception (``torch.OutOfMemoryError`` on torch >= 2.5).
OOM_ERROR: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

Timer = Callable[[Callable[[], Any]], float]


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
            "name": self.name,
            "status": self.status,
            "ms": self.ms,
            "peak_gib": self.peak_gib,
            "gpu_ms": self.gpu_ms,
            "checks": [dict(dataclasses.asdict(c), ok=c.ok) for c in self.checks],
        }


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
