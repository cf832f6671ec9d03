"""Where a run happens: the device, versions, revision and command, recorded as metadata and printed as the header."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from typing import Any

import torch

from kernels.benchmark.config import GIB, KEY_MASS_LAST, KEY_STATS, ROW_STATS, SUITES, Config
from kernels.provenance import git_revision, versions


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


def sdpa_backends() -> str:
    """The SDPA backends PyTorch may choose from on CUDA."""
    flags = {
        "flash": torch.backends.cuda.flash_sdp_enabled,
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
        "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False),
        "math": torch.backends.cuda.math_sdp_enabled,
    }
    return ", ".join(name for name, enabled in flags.items() if enabled())


def hopper_kernel(cfg: Config) -> str:
    """Whether the mha and gqa rows run on the Hopper (Gluon) kernel, or why not."""
    from kernels.hopper_attention import unsupported
    from kernels.validate import check_inputs

    if cfg.kernel_backend == "cute":
        return "off (backend cute: the CuTe DSL kernel)"
    if cfg.kernel_backend != "triton":
        return "off (no Triton)"
    q = torch.empty((1, 2, 256, 128), dtype=cfg.dtype, device=cfg.device)
    p = check_inputs(q, q, q, causal=True, scale=None, stats=ROW_STATS, key_lengths=None, query_lengths=None)
    reason = unsupported(q, p, ROW_STATS)
    if reason is not None:
        return f"off ({reason})"
    return "on for head dims 64 and 128 (KERNELS_HOPPER=0 turns it off)"


def command_line() -> str:
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def metadata(cfg: Config) -> dict[str, Any]:
    """What the JSON output records about the run (``seconds`` is added when it ends)."""
    found = versions(("torch", "triton"))  # python, torch, triton
    return {
        "device": device_name(cfg.device),
        "torch": found["torch"],
        "cuda": torch.version.cuda,
        "triton": found["triton"],
        "python": found["python"],
        "git_revision": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "batch": cfg.batch,
        "heads": cfg.heads,
        "causal": True,
        "suites": sorted({sh.suite for sh in cfg.shapes}, key=SUITES.index),
        "kernel_backend": cfg.kernel_backend,
        "smoke": cfg.smoke,
        "sdpa_backends": sdpa_backends() if cfg.device.type == "cuda" else "cpu",
        "cudnn": torch.backends.cudnn.version() if cfg.device.type == "cuda" else None,
        "hopper_kernel": hopper_kernel(cfg),
        "row_stats": repr(ROW_STATS),
        "key_stats": repr(KEY_STATS),
    }


def print_header(meta: dict[str, Any]) -> None:
    print(
        f"# kernels.benchmark: causal attention, suites {', '.join(meta['suites'])}, "
        f"B={meta['batch']} H={meta['heads']}, dtype {meta['dtype']}, kernel backend {meta['kernel_backend']}"
        + (" (SMOKE: tiny CPU run, timings meaningless)" if meta["smoke"] else "")
    )
    revision = meta["git_revision"]
    git = revision[:12] + ("+dirty" if revision.endswith("+dirty") else "") if revision else None
    print(
        f"# device: {meta['device']} | torch {meta['torch']} (CUDA {meta['cuda']}) | "
        f"triton {meta['triton'] or 'not installed'} | python {meta['python']} | git {git}"
    )
    cudnn = f" (cuDNN {meta['cudnn']})" if meta["cudnn"] else ""
    print(f"# sdpa backends enabled: {meta['sdpa_backends']}{cudnn}")
    print(f"# Hopper kernel: {meta['hopper_kernel']}")
    print(
        f"# rowstats: {meta['row_stats']}; keymass: the same with key_mass=True; "
        f"keymass_last: key mass of the last {KEY_MASS_LAST} queries"
    )
    print(f"# command: {meta['command']}", flush=True)
