"""Data parallelism over ``torch.distributed``, launched by ``torchrun``: the few helpers a
command needs to run the same work on several processes (no scheduler of our own).

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper is a no-op: :func:`rank` is 0,
:func:`world_size` is 1, :func:`barrier` returns at once and the object collectives return their
input. Under ``torchrun --nproc_per_node=N`` (or its multi-node rendezvous) :func:`process_group`
joins the default process group: NCCL when the model is on a CUDA device (that device becomes
the process's current one; :func:`default_device` gives ``cuda:LOCAL_RANK``), gloo otherwise.
:func:`layout` splits the processes into data- and context-parallel groups (a 2-D device mesh).

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Layout:
    """How the processes of a run share its work: ``data_world`` groups of ``context_world``
    ranks each (global rank ``data_rank * context_world + context_rank``, the row-major
    ``(data, context)`` device mesh). Each group takes its share of the samples; the ranks of a
    group spread each sample's tokens over themselves (context parallelism, through
    ``context_group``) and its ``context_rank`` 0 writes the results."""

    data_rank: int = 0
    data_world: int = 1
    context_rank: int = 0
    context_world: int = 1
    context_group: dist.ProcessGroup | None = None

    @property
    def world(self) -> int:
        """Every process of the run."""
        return self.data_world * self.context_world

    @property
    def writes(self) -> bool:
        """Whether this rank writes its group's results (the group's rank 0)."""
        return self.context_rank == 0

    @property
    def writers(self) -> list[int]:
        """The global rank that writes for each data-parallel group, in group order."""
        return [d * self.context_world for d in range(self.data_world)]


def check_context_parallel(context_parallel: int) -> None:
    """Refuse a context-parallel size that this launch cannot give (before any collective): not
    an int >= 1, more than one without ``torchrun``, or not dividing the number of processes."""
    if isinstance(context_parallel, bool) or not isinstance(context_parallel, int) or context_parallel < 1:
        raise WorkbenchError(f"context parallelism takes a number of ranks >= 1, got {context_parallel!r}")
    world = world_size()
    if context_parallel > 1 and world == 1:
        raise WorkbenchError(
            f"context parallelism over {context_parallel} ranks needs {context_parallel} processes (or a multiple): "
            f"launch with torchrun --nproc_per_node={context_parallel} (docs/scale-out.md)"
        )
    if world % context_parallel:
        raise WorkbenchError(
            f"{world} processes cannot be split into groups of {context_parallel} for context parallelism: "
            f"launch a multiple of {context_parallel} processes"
        )


def layout(context_parallel: int = 1) -> Layout:
    """This rank's place in the ``(data, context)`` mesh of the running processes (a collective
    when ``context_parallel > 1``: every rank calls it, after the process group is joined).
    ``context_parallel``: ranks per context-parallel group, dividing the world size."""
    check_context_parallel(context_parallel)
    world = world_size()
    if context_parallel == 1:
        return Layout(data_rank=rank(), data_world=world)
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(
        device_type, (world // context_parallel, context_parallel), mesh_dim_names=("data", "context")
    )
    return Layout(
        data_rank=mesh.get_local_rank("data"),
        data_world=world // context_parallel,
        context_rank=mesh.get_local_rank("context"),
        context_world=context_parallel,
        context_group=mesh.get_group("context"),
    )


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
