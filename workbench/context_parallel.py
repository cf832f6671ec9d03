"""Context parallelism for whole models: one long sequence's forward pass spread over the ranks
of a ``torch.distributed`` process group, every layer's attention computed with
:func:`kernels.context_parallel.context_parallel_attention`, and decoding after it against the
KV cache left split over the ranks (:func:`kernels.context_parallel.context_parallel_decode`).

:class:`ContextParallel` names the group and the sequence length; ``instrument(model, stats,
context_parallel=cp)`` (:mod:`workbench.instrument`) then makes the model take this rank's
shard of the tokens, the positions ``cp.positions`` (chunks ``r`` and ``2W - 1 - r`` of ``2W``,
:func:`kernels.context_parallel.shard_indices`), at their global positions, and gathers each
layer's statistics back into global position order on every rank (:meth:`ContextParallel.unshard_stats`).
The adapters route every layer's attention through :meth:`ContextParallel.attend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kernels import AttentionStats, StatsSpec
from kernels.context_parallel import context_parallel_attention, context_parallel_decode, shard_indices
from kernels.errors import AttentionInputError
from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class ContextParallel:
    """One sequence of ``n_total`` positions sharded over the ranks of ``group``.

    Attributes:
        n_total: positions in the whole sequence (at least ``2W`` for ``W`` ranks).
        group: the process group (``None``: the default group); it must be initialised and hold
            this process.
        gather: whether each layer's statistics are all-gathered into global position order on
            every rank (``True``), or kept as this rank's rows in shard order (``False``: a
            caller that reduces them itself, then combines the reductions).
        positions: this rank's global positions (int64 ``[n_local]``, ascending), derived.

    Raises :class:`WorkbenchError` when the group is not initialised, does not hold this
    process, or ``n_total`` is too short for its ranks: checked on every rank before any
    collective, so every rank refuses alike.

    A model under ``instrument(..., context_parallel=cp)`` can also decode after the prefill
    of its shard, one token at a time, every rank given the same token: the KV cache stays
    split (each rank holds its shard's keys, and every decoded token's), and each decoded
    token's logits and statistics are those of a single process, on every rank.

    Example:
        >>> cp = ContextParallel(ids.shape[1])  # the default group, launched by torchrun
        >>> with instrument(model, stats, context_parallel=cp) as rec:
        ...     logits = model(cp.shard(ids))  # [batch, n_local, vocab], positions cp.positions
        >>> rec.layer(0).entropy.shape  # [batch, head, n_total]: global order, on every rank
    """

    n_total: int
    group: dist.ProcessGroup | None = None
    gather: bool = True
    positions: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.n_total, bool) or not isinstance(self.n_total, int):
            raise WorkbenchError(f"context parallelism needs n_total as an int, got {self.n_total!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise WorkbenchError(
                "context parallelism needs torch.distributed initialised: launch with torchrun and join "
                "the process group first (workbench.distributed.process_group, or "
                "torch.distributed.init_process_group)"
            )
        rank = dist.get_rank(self.group)
        if rank < 0:
            raise WorkbenchError("this process is not a member of the context-parallel process group")
        try:
            positions = shard_indices(self.n_total, self.world, rank)
        except AttentionInputError as exc:
            raise WorkbenchError(f"context parallelism: {exc}") from None
        object.__setattr__(self, "positions", positions)

    @property
    def world(self) -> int:
        """Ranks in the group."""
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return dist.get_rank(self.group)

    @property
    def n_local(self) -> int:
        """Positions this rank holds."""
        return len(self.positions)

    def shard(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's columns of the whole sequence's ``ids [batch, n_total]`` (or any
        ``[batch, n_total, ...]`` tensor): ``[batch, n_local, ...]``, in position order."""
        if ids.dim() < 2 or ids.shape[1] != self.n_total:
            raise WorkbenchError(
                f"expected the whole sequence, [batch, {self.n_total}, ...], got shape {tuple(ids.shape)}"
            )
        return ids[:, self.positions.to(ids.device)]

    def check_local(self, n_local: int, what: str = "the input") -> None:
        """Refuse a shard whose length is not this rank's: before any collective."""
        if n_local != self.n_local:
            raise WorkbenchError(
                f"{what} holds {n_local} positions, but rank {self.rank} of {self.world} holds {self.n_local} "
                f"of the {self.n_total}: give the model ContextParallel.shard(ids)"
            )

    def check_call(self, n_new: int, n_cached: int, what: str = "the input") -> None:
        """Refuse, before any collective, a model call that is neither the prefill of this rank's
        shard (``n_cached == 0``, ``n_new == n_local``) nor one decoded token after it
        (``n_cached >= n_local``, ``n_new == 1``)."""
        if n_cached == 0:
            self.check_local(n_new, what)
        elif n_cached < self.n_local:
            raise WorkbenchError(
                f"the KV cache holds {n_cached} positions, fewer than the {self.n_local} of rank {self.rank}'s "
                "shard: under context parallelism, prefill the shard first, then decode"
            )
        elif n_new != 1:
            raise WorkbenchError(
                f"{what} holds {n_new} new positions after a context-parallel prefill: decode one token at a time"
            )

    def query_positions(self, n_cached: int) -> torch.Tensor:
        """Global positions (int64) of a call's new tokens after ``n_cached`` cached ones: the
        shard's (a prefill), or the one decoded token's, ``n_total + n_cached - n_local``."""
        if n_cached == 0:
            return self.positions
        return torch.tensor([self.n_total + n_cached - self.n_local])

    def key_positions(self, n_keys: int) -> torch.Tensor:
        """Global positions (int64 ``[n_keys]``) of a cache of ``n_keys`` keys on this rank: the
        shard's, then the decoded tokens' from ``n_total`` on."""
        return torch.cat([self.positions, torch.arange(self.n_total, self.n_total + n_keys - self.n_local)])

    def attend(
        self,
        into,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        scale: float | None,
        stats: StatsSpec,
        backend: str,
        **variants,
    ) -> torch.Tensor:
        """This rank's share of one layer's attention, its statistics added to ``into`` (a
        collector, ``add(layer, stats)``); returns the output ``[B, Hq, n, D]``.

        A prefill (``q`` and ``k [B, H, n_local, D]``, the shard) runs the shard's queries
        against every rank's keys, and its statistics are gathered into global position order
        (unless ``gather`` is off). A decoded token (``q [B, Hq, 1, D]``, ``k`` this rank's cache:
        the shard's keys, then every decoded token's) is attended to the split cache, and its
        statistics, the same on every rank, are added as they are. ``variants`` (the attention
        variants of :func:`kernels.attention`: window, softcap, sinks, ALiBi) are refused for now."""
        if variants:
            raise WorkbenchError(
                f"context parallelism does not take {', '.join(variants)} yet (layer {layer}): run this model on "
                "one process"
            )
        n_q, n_k = q.shape[2], k.shape[2]
        kwargs = dict(n_total=self.n_total, group=self.group, scale=scale, stats=stats, backend=backend)
        if n_q == n_k:
            self.check_local(n_q, f"layer {layer}'s queries")
            out, st = context_parallel_attention(q, k, v, causal=causal, **kwargs)
            into.add(layer, self.unshard_stats(st) if self.gather else st)
            return out
        if not causal:
            raise WorkbenchError(f"layer {layer}: decoding with a KV cache needs causal attention")
        self.check_call(n_q, n_k - n_q, f"layer {layer}'s queries")
        out, st = context_parallel_decode(q, k, v, **kwargs)
        into.add(layer, st)
        return out

    def from_last_position(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (a tensor of the same shape on every rank) as computed by the rank that holds
        the sequence's last position, the group's rank 0 (whose shard ends with chunk ``2W - 1``):
        the next token after a prefill, say. A collective."""
        sent = value.reshape(-1).contiguous()
        dist.broadcast(sent, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0, group=self.group)
        return sent.reshape(value.shape)

    def unshard(self, t: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Every rank's shard of ``t`` (``n_local`` positions along ``dim``) put together in global
        position order: ``n_total`` positions along ``dim``, on every rank (a collective)."""
        world, n_total = self.world, self.n_total
        shards = [shard_indices(n_total, world, r) for r in range(world)]
        longest = max(len(s) for s in shards)
        moved = t.movedim(dim, 0).contiguous()  # [n_local, ...]
        send = moved.new_zeros(longest, *moved.shape[1:])
        send[: moved.shape[0]] = moved
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send, group=self.group)
        out = moved.new_empty(n_total, *moved.shape[1:])
        for where, part in zip(shards, parts):
            out[where.to(out.device)] = part[: len(where)]
        return out.movedim(0, dim)

    def unshard_stats(self, st: AttentionStats) -> AttentionStats:
        """A layer's shard statistics (row statistics ``[B, H, n_local]``, ``offset_mass
        [B, H, n_local, O]``, ``key_mass [B, H, n_local]`` for this rank's keys) in global
        position order, ``n_total`` along the position axis, on every rank."""
        return AttentionStats(**{name: self.unshard(t, dim=2) for name, t in st.items()})
