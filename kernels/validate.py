"""Input checks shared by every backend: one place that turns bad input into clear errors."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from kernels.errors import AttentionInputError
from kernels.spec import StatsSpec

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)


@dataclass(frozen=True)
class Problem:
    """Sizes of one attention call, after validation."""

    batch: int
    q_heads: int
    kv_heads: int
    n_q: int
    n_k: int
    head_dim: int
    scale: float
    causal: bool
    window: int = 0  # sliding window: keys with query_position - key < window (0: none)
    softcap: float = 0.0  # scores soft-capped to cap * tanh(score / cap) (0: none)
    keep_first: int = 0  # with a window: keys < keep_first stay visible too (StreamingLLM; 0: none)

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.q_heads // self.kv_heads

    @property
    def q_offset(self) -> int:
        """Absolute position of query 0: causal masking is bottom-right aligned."""
        return self.n_k - self.n_q


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    stats: StatsSpec | None,
    key_lengths: torch.Tensor | None,
    query_lengths: torch.Tensor | None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    keep_first: int | None = None,
    window_heads: torch.Tensor | None = None,
) -> Problem:
    """Validate shapes, dtypes, devices, attention variants and statistics settings; return the
    problem sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttentionInputError(
                f"{name} must have 4 dimensions [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in REFERENCE_DTYPES:
        raise AttentionInputError(f"dtype {q.dtype} is not supported; use float16, bfloat16, float32 or float64")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise AttentionInputError(
            f"k and v must have the same shape [batch, kv_heads, keys, head_dim], "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if bk != b:
        raise AttentionInputError(f"q has batch {b} but k/v have batch {bk}")
    if dk != d:
        raise AttentionInputError(f"q has head_dim {d} but k/v have head_dim {dk}")
    if d == 0 or hkv == 0:
        raise AttentionInputError(
            f"head_dim and head counts must be positive, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if hq % hkv != 0:
        raise AttentionInputError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention"
        )
    if causal not in (True, False):  # None or a string would silently mean something
        raise AttentionInputError(f"causal must be True or False, got {causal!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else _check_scale(scale)

    _check_lengths("key_lengths", key_lengths, b, nk, q.device)
    _check_lengths("query_lengths", query_lengths, b, nq, q.device)

    if stats is not None:
        if not isinstance(stats, StatsSpec):
            raise AttentionInputError(f"stats must be a kernels.StatsSpec or None, got {type(stats).__name__}")
        for o in stats.offsets:
            if causal and o < 0:
                raise AttentionInputError(
                    f"offset {o} is out of range for causal attention: a query never sees later "
                    "keys, so offsets must be >= 0 (1 = previous token)"
                )
            if abs(o) >= 2**31:
                raise AttentionInputError(f"offset {o} is out of range: |offset| must be < 2**31")
    window = _check_window(window)
    softcap = _check_softcap(softcap)
    for name, t in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        _check_per_head(name, t, hq, q.device)
    keep_first = _check_keep_first(keep_first, window)
    _check_window_heads(window_heads, window, hq, q.device)
    return Problem(b, hq, hkv, nq, nk, d, float(scale), bool(causal), window, softcap, keep_first)


def _check_window(window) -> int:
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise AttentionInputError(
            f"window must be an int >= 1 (the keys a query sees, itself included) or None, got {window!r}"
        )
    return int(window)


def _check_keep_first(keep_first, window: int) -> int:
    """``keep_first`` (StreamingLLM's kept first tokens) as an int >= 0; it widens a window."""
    if keep_first is None:
        return 0
    if isinstance(keep_first, bool) or not isinstance(keep_first, numbers.Integral) or keep_first < 0:
        raise AttentionInputError(
            f"keep_first must be an int >= 0 (the first keys that stay visible besides the window) or None, "
            f"got {keep_first!r}"
        )
    if not window:
        raise AttentionInputError(
            "keep_first= keeps the first keys visible besides a sliding window: pass window= as well "
            "(without a window every key is visible already)"
        )
    return int(keep_first)


def _check_window_heads(heads: torch.Tensor | None, window: int, n_heads: int, device: torch.device) -> None:
    """``window_heads``: a boolean ``[Hq]`` on q's device, and only with a window."""
    if heads is None:
        return
    if not isinstance(heads, torch.Tensor) or heads.dtype != torch.bool or heads.shape != (n_heads,):
        shape = f"{heads.dtype} {tuple(heads.shape)}" if isinstance(heads, torch.Tensor) else type(heads).__name__
        raise AttentionInputError(
            f"window_heads must be a boolean tensor of shape [{n_heads}] (True: the query head attends within the "
            f"window, False: to every key), got {shape}"
        )
    if heads.device != device:
        raise AttentionInputError(f"window_heads is on {heads.device} but q is on {device}")
    if not window:
        raise AttentionInputError("window_heads= picks the heads that a window restricts: pass window= as well")


def _check_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap <= 0:
        raise AttentionInputError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    return float(softcap)


def _check_per_head(name: str, t: torch.Tensor | None, heads: int, device: torch.device) -> None:
    """``sinks`` and ``alibi_slopes``: one finite float per query head, on q's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.shape != (heads,):
        shape = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise AttentionInputError(f"{name} must be a float tensor of shape [{heads}] (one per query head), got {shape}")
    if t.device != device:
        raise AttentionInputError(f"{name} is on {t.device} but q is on {device}")
    if not t.is_cuda and not bool(torch.isfinite(t).all()):
        raise AttentionInputError(f"{name} must be finite, got {t.tolist()}")


def _check_scale(scale) -> float:
    """The score scale as a float: a finite real number (a one-element tensor is read once)."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.dtype.is_complex:
        value = float(scale)
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        value = float(scale)
    else:
        raise AttentionInputError(
            f"scale must be a real number (None for 1/sqrt(head_dim)), got {type(scale).__name__} {scale!r}"
        )
    if not math.isfinite(value):
        raise AttentionInputError(f"scale must be a finite number, got {value}")
    return value


def _check_lengths(name: str, lengths: torch.Tensor | None, batch: int, limit: int, device: torch.device) -> None:
    if lengths is None:
        return
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise AttentionInputError(f"{name} must be an integer tensor of shape [batch]")
    if lengths.shape != (batch,):
        raise AttentionInputError(f"{name} must have shape [{batch}], got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise AttentionInputError(f"{name} is on {lengths.device} but q is on {device}")
    # Values are checked on the CPU only: on a GPU the check would synchronise the device on
    # every call. Both backends treat values outside [0, limit] as clamped to it.
    if batch and not lengths.is_cuda:
        lo, hi = (int(x) for x in torch.aminmax(lengths))
        if lo < 0 or hi > limit:
            raise AttentionInputError(f"{name} must lie in [0, {limit}], got {lengths.tolist()}")


def fused_kernel_refusal(
    q: torch.Tensor,
    p: Problem,
    head_dims: tuple[int, ...],
    min_queries: int,
    key_lengths: torch.Tensor | None,
    query_lengths: torch.Tensor | None,
    per_head: dict,
) -> str | None:
    """Why a Hopper kernel (the Gluon or the CuTe one) cannot take a call, for what they share:
    fp16/bf16, one of ``head_dims``, causal self-attention of at least ``min_queries`` queries,
    no padding lengths or attention variants (``per_head``: ``sinks``, ``alibi_slopes``,
    ``window_heads``), a positive scale. None: nothing of these stops it."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    if p.head_dim not in head_dims:
        return f"head dim {p.head_dim} (it takes {', '.join(map(str, head_dims))})"
    if not p.causal or p.n_q != p.n_k or p.n_q < min_queries:
        return "not causal self-attention" + (f" of at least {min_queries} queries" if min_queries > 1 else "")
    if key_lengths is not None or query_lengths is not None:
        return "padding lengths"
    if p.window or p.softcap or p.keep_first or any(t is not None for t in per_head.values()):
        return "an attention variant"
    if p.scale <= 0:
        return "a scale <= 0"
    return None
