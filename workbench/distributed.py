"""Data parallelism over ``torch.distributed``, launched by ``torchrun``: the few helpers a
command needs to run the same work on several processes (no scheduler of our own).

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper is a no-op: :func:`rank` is 0,
:func:`world_size` is 1, :func:`barrier` returns at once and the object collectives return their
input. Under ``torchrun --nproc_per_node=N`` (or its multi-node rendezvous) :func:`process_group`
joins the default process group: NCCL when the model is on a CUDA device (that device becomes
the process's current one; :func:`default_device` gives ``cuda:LOCAL_RANK``), gloo otherwise.

Errors. A collective waits for every rank, so a rank that stops before one would leave the others
waiting. Three rules keep that from hanging a run:

- settings are checked on every rank before the first collective (every rank was given the same
  command, so every rank refuses it the same way);
- a problem found by one rank at a known point is shared with :func:`agree`: every rank raises
  the same :class:`WorkbenchError` and exits;
- any other exception propagates and ends that process; ``torchrun`` notices the failed worker
  and stops the others at once (or restarts the whole group under ``--max-restarts``). A rank
  that hangs without failing is stopped by the collective timeout, :data:`TIMEOUT`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from workbench.errors import WorkbenchError

#: How long a collective waits for the slowest rank (a barrier after scoring waits for the rank
#: with the most work left): generous, because torchrun stops the group at once when a rank dies.
TIMEOUT = timedelta(hours=6)


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """Whether the default process group is initialised (by :func:`process_group` or the caller)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: the process group's, else ``torchrun``'s ``RANK``, else 0."""
    return dist.get_rank() if active() else (_env_int("RANK", 0) if launched() else 0)


def world_size() -> int:
    """The number of processes: the process group's, else ``torchrun``'s ``WORLD_SIZE``, else 1."""
    return dist.get_world_size() if active() else (_env_int("WORLD_SIZE", 1) if launched() else 1)


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; 0 without ``torchrun``)."""
    return _env_int("LOCAL_RANK", 0) if launched() else 0


def default_device() -> str | None:
    """The device of this rank when none is given: ``cuda:LOCAL_RANK`` under ``torchrun`` on a
    machine with CUDA (one GPU per process); None (the usual default) otherwise."""
    return f"cuda:{local_rank()}" if launched() and torch.cuda.is_available() else None


@contextmanager
def process_group(device: torch.device | str | None = None) -> Iterator[bool]:
    """Join the default process group for the ``with`` block when ``torchrun`` launched this
    process and nobody joined it yet; yields whether a group is active. A group this call created
    is destroyed at the end (one created by the caller is left alone).

    ``device``: where the model lives; NCCL for a CUDA device (which becomes current), gloo else."""
    created = False
    if launched() and not active():
        if not dist.is_available():
            raise WorkbenchError("torchrun started several processes, but this torch build has no torch.distributed")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            backend = "gloo"
        _init(backend)
        created = True
    try:
        yield active()
    finally:
        if created and active():
            dist.destroy_process_group()


def _init(backend: str) -> None:
    """``init_process_group`` from torchrun's environment. torchrun's agent hosts the store and
    keeps it across ``--max-restarts``, so a restarted group could read the addresses of the
    failed attempt's processes and fail to connect (pytorch/pytorch#135712): on one node (one
    agent, so every rank counts the same restarts) each attempt gets keys of its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and _env_int("LOCAL_WORLD_SIZE", 0) == world_size():
        store, rank_, world = next(dist.rendezvous("env://", timeout=TIMEOUT))
        store = dist.PrefixStore(f"workbench/restart_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world, timeout=TIMEOUT)
    else:
        dist.init_process_group(backend=backend, timeout=TIMEOUT)


def barrier() -> None:
    """Wait until every rank gets here (no-op without a process group)."""
    if active() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (a small picklable object) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list:
    """Every rank's ``obj`` (small, picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather(obj: Any, dst: int = 0) -> list | None:
    """Every rank's ``obj`` in rank order on rank ``dst``; None on the other ranks."""
    if not active():
        return [obj]
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def agree(problem: str | None) -> None:
    """Share each rank's problem (None: none): if any rank has one, every rank raises the same
    :class:`WorkbenchError` naming the first, so that all of them stop together instead of
    waiting for each other. Also a barrier."""
    problems = all_gather(problem)
    found = [(r, p) for r, p in enumerate(problems) if p is not None]
    if found:
        first_rank, message = found[0]
        where = f" (rank {first_rank} of {len(problems)})" if len(problems) > 1 else ""
        raise WorkbenchError(f"{message}{where}")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise WorkbenchError(
            f"environment variable {name}={os.environ[name]!r} is not a whole number "
            "(torchrun sets it; unset it when running a single process)"
        ) from None
