"""Padding masks of model libraries, turned into what :func:`kernels.attention` takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KernelMask:
    """Keyword arguments for :func:`kernels.attention` that express a padding mask.

    Right padding becomes ``key_lengths`` (and ``query_lengths`` when queries and keys are the
    same positions: padded queries become empty rows, so they add nothing to the statistics);
    any other pattern becomes a ``[B, 1, 1, Nk]`` key mask, which the Triton backend cannot take
    (``"triton"`` becomes the reference for it; ``"auto"`` and ``"cpu"`` take it as they are;
    still O(N) memory: it broadcasts over queries).
    """

    key_lengths: torch.Tensor | None = None
    query_lengths: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def kwargs(self, backend: str) -> dict:
        return dict(
            key_lengths=self.key_lengths,
            query_lengths=self.query_lengths,
            mask=self.mask,
            backend="reference" if self.mask is not None and backend == "triton" else backend,
        )


def from_key_mask(keep: torch.Tensor | None, n_q: int, n_k: int, additive: torch.Tensor | None = None) -> KernelMask:
    """``keep``: ``[B, >= Nk]`` 1/True for real tokens (its last ``Nk`` columns are the keys);
    ``additive``: an optional float mask broadcastable to ``[B, 1, 1, Nk]``."""
    if keep is None and additive is None:
        return KernelMask()
    if additive is not None:
        mask = additive.reshape(additive.shape[0], 1, 1, -1)
        if keep is not None:
            mask = mask.masked_fill(~keep.bool()[:, None, None, -n_k:], float("-inf"))
        return KernelMask(mask=mask)
    keep = keep.bool()[:, -n_k:]
    lengths = keep.sum(-1)
    if torch.equal(keep, torch.arange(n_k, device=keep.device) < lengths.unsqueeze(-1)):
        return KernelMask(key_lengths=lengths, query_lengths=lengths if n_q == n_k else None)
    return KernelMask(mask=keep[:, None, None, :])
