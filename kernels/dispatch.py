"""The public entry point :func:`attention`: validation, then dispatch to a backend."""

from __future__ import annotations

import importlib.util
import warnings

import torch

from kernels.cpu import cpu_attention
from kernels.errors import AttentionInputError, KernelFallbackWarning
from kernels.reference import reference_attention
from kernels.spec import AttentionStats, StatsSpec
from kernels.validate import TRITON_DTYPES, Problem, check_inputs

BACKENDS = ("auto", "triton", "cute", "cpu", "reference")
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_warned: set[str] = set()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    stats: StatsSpec | None = None,
    backend: str = "auto",
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    keep_first: int | None = None,
    window_heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionStats | None]:
    """Scaled dot-product attention that optionally returns per-row and per-key statistics.

    Args:
        q: queries ``[B, Hq, Nq, D]``.
        k, v: keys and values ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (grouped-query
            attention; K/V are never repeated in memory).
        causal: ``True`` or ``False``; the causal mask is bottom-right aligned: query ``i`` sits
            at key position ``Nk - Nq + i``, so one call serves prefill and decoding with a KV cache.
        scale: score scale, a finite real number (``0`` gives uniform attention over the visible
            keys); ``1 / sqrt(D)`` by default.
        stats: which statistics to compute (:class:`StatsSpec`); ``None`` for plain attention.
        backend: ``"triton"`` (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"cpu"`` (chunked PyTorch in the input's precision, one pass per chunk; CPU tensors),
            ``"cute"`` (the CuTe DSL forward for Hopper, an optional extra: ``pip install .[cute]``;
            causal self-attention, head dim 64 or 128, no variants; otherwise, or without the
            extra, the Triton path with a :class:`KernelFallbackWarning`),
            ``"reference"`` (exact chunked PyTorch, any device, float64 capable: the oracle) or
            ``"auto"`` (Triton on CUDA; on the CPU ``"cpu"`` for float16/bfloat16/float32 and the
            reference for float64; the reference on other devices).
        key_lengths: ``[B]`` ints; keys at positions ``>= key_lengths[b]`` are padding.
        query_lengths: ``[B]`` ints; query rows ``>= query_lengths[b]`` are padding (empty rows).
            Lengths must lie in ``[0, Nk]`` / ``[0, Nq]``. CPU tensors are checked; CUDA
            tensors are not (that would synchronise the device on every call), and values
            outside the range act as clamped to it.
        mask: reference and cpu backends only: boolean (True = attend) or additive float mask
            that broadcasts to ``[B, Hq, Nq, Nk]``, applied on top of ``causal`` and the lengths
            (the cpu backend hands calls with an additive mask to the reference).
        chunk_size: reference and cpu backends only: query rows per chunk (memory ``chunk x Nk``).
        window: sliding-window attention (Mistral, Gemma, gpt-oss local layers): a query at
            position ``i`` sees only keys ``j > i - window`` (``window`` keys, itself included,
            when causal); ``None``: no window.
        softcap: logit soft-capping (Gemma 2): each scaled score ``s`` becomes
            ``softcap * tanh(s / softcap)`` before the softmax.
        sinks: learned sink logits ``[Hq]`` (gpt-oss): one logit per query head that joins each
            row's softmax denominator and carries no value, so a row's key probabilities sum to
            ``1 - learned_sink_mass`` (``StatsSpec(learned_sink=True)`` reports it). ``lse`` and
            ``entropy`` are those of the whole distribution, the sink included; ``max_prob``,
            ``argmax``, the masses and ``distance`` are over the keys alone (not renormalised).
        alibi_slopes: ALiBi ``[Hq]``: each score gets ``-slope * |i - j|`` (query position ``i``,
            key ``j``), after any soft-capping.
        keep_first: with ``window``, the first ``keep_first`` keys stay visible as well
            (StreamingLLM's kept initial tokens, "attention sinks" as tokens; not the learned
            logits of ``sinks``): key ``j`` is visible to the query at position ``i`` iff it is
            visible without a window (causal, lengths) and ``i - j < window or j < keep_first``.
            ``0`` or ``None``: the window alone. Needs ``window``.
        window_heads: boolean ``[Hq]``: the query heads that ``window`` (and ``keep_first``)
            restrict; the other heads attend to every key visible without a window (DuoAttention's
            streaming and full heads). ``None``: every head. Needs ``window``.

    Returns:
        ``(out, stats)``: ``out [B, Hq, Nq, D]`` in the input dtype, equal to
        ``torch.nn.functional.scaled_dot_product_attention`` within dtype tolerance, and an
        :class:`AttentionStats` (``None`` when ``stats`` is ``None``).

    Example:
        >>> q, k, v = (torch.randn(1, 4, 128, 64) for _ in range(3))
        >>> out, st = attention(q, k, v, stats=StatsSpec(entropy=True, sink_tokens=1))
        >>> st.entropy.shape, st.sink_mass.shape
        (torch.Size([1, 4, 128]), torch.Size([1, 4, 128]))
    """
    if backend not in BACKENDS:
        raise AttentionInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    p = check_inputs(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        stats=stats,
        key_lengths=key_lengths,
        query_lengths=query_lengths,
        window=window,
        softcap=softcap,
        sinks=sinks,
        alibi_slopes=alibi_slopes,
        keep_first=keep_first,
        window_heads=window_heads,
    )
    per_head = dict(sinks=sinks, alibi_slopes=alibi_slopes, window_heads=window_heads)
    chosen = _choose(q, p, backend, mask, chunk_size)
    if q.numel() == 0 or p.n_k == 0:
        return _degenerate(q, p, stats)
    if chosen == "cpu":
        return cpu_attention(q, k, v, p, stats, key_lengths, query_lengths, mask, chunk_size, **per_head)
    if chosen in ("triton", "cute"):
        from kernels.hopper_attention import hopper_attention, unsupported
        from kernels.triton_attention import triton_attention

        if chosen == "cute":
            from kernels.cute_attention import cute_attention
            from kernels.cute_attention import unsupported as cute_unsupported

            reason = cute_unsupported(q, p, stats, key_lengths, query_lengths, **per_head)
            if reason is None:
                with torch.cuda.device(q.device):
                    return cute_attention(q, k, v, p, stats)
            _warn_once(f"backend='cute' cannot run this call ({reason}); using the Triton kernels")
        if q.is_cuda:  # Triton launches on the current device: make it the tensors' own (device maps)
            with torch.cuda.device(q.device):
                if unsupported(q, p, stats, key_lengths, query_lengths, **per_head) is None:
                    return hopper_attention(q, k, v, p, stats)
                return triton_attention(q, k, v, p, stats, key_lengths, query_lengths, **per_head)
        return triton_attention(q, k, v, p, stats, key_lengths, query_lengths, **per_head)
    return reference_attention(q, k, v, p, stats, key_lengths, query_lengths, mask, chunk_size, **per_head)


def _choose(q: torch.Tensor, p: Problem, backend: str, mask, chunk_size) -> str:
    """The backend that runs the call: ``"triton"``, ``"cpu"`` or ``"reference"``."""
    if backend == "reference":
        return backend
    if backend == "cpu":
        if q.device.type != "cpu":
            raise AttentionInputError(
                f"backend='cpu' takes CPU tensors, got {q.device} tensors: use backend='auto' "
                "(Triton on CUDA) or backend='reference'"
            )
        return backend
    if backend == "auto":
        if q.device.type == "cpu":
            return "cpu" if q.dtype in TRITON_DTYPES else "reference"  # float64: the exact reference
        if mask is not None or chunk_size is not None or not (q.is_cuda and TRITON_AVAILABLE):
            return "reference"
        if q.dtype not in TRITON_DTYPES:
            return "reference"
        return "triton" if _head_dim_ok(p.head_dim) else "reference"
    if _choose_triton(q, p, mask, chunk_size, backend):
        return backend  # "triton" or "cute"
    return "reference"


def _choose_triton(q: torch.Tensor, p: Problem, mask, chunk_size, backend: str = "triton") -> bool:
    """``backend="triton"`` (or ``"cute"``, which falls back to it): refuse what it cannot run;
    False (the reference) for a head dim it lacks."""
    if mask is not None or chunk_size is not None:
        raise AttentionInputError(
            "mask= and chunk_size= are reference-backend options (the cpu backend takes them too); "
            "use backend='reference' or backend='cpu' "
            "(or key_lengths/query_lengths for padding with the Triton backend)"
        )
    if not TRITON_AVAILABLE:
        raise AttentionInputError(
            f"backend={backend!r} needs the triton package; install it or use backend='reference'"
        )
    if q.dtype not in TRITON_DTYPES:
        raise AttentionInputError(
            f"backend={backend!r} takes float16, bfloat16 or float32, got {q.dtype}; use backend='reference'"
        )
    from kernels.triton_attention import interpreting

    if not (q.is_cuda or interpreting()):
        raise AttentionInputError(
            f"backend={backend!r} needs CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 "
            "before importing kernels to run it on the CPU, or use backend='reference'"
        )
    if not q.is_cuda and q.device.type != "cpu":  # the interpreter reads CPU memory only
        raise AttentionInputError(
            f"backend={backend!r} takes CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; got {q.device} "
            "tensors: use backend='reference' (on the meta device it returns outputs of the right shapes)"
        )
    return _head_dim_ok(p.head_dim)


def _warn_once(message: str) -> None:
    """A :class:`KernelFallbackWarning` at the caller of :func:`attention`, once a process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, KernelFallbackWarning, stacklevel=3)


def _head_dim_ok(d: int) -> bool:
    from kernels.triton_attention import MAX_HEAD_DIM, MIN_HEAD_DIM

    if MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        return True
    key = f"head_dim={d}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"the Triton kernels take head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {d}; "
            "using the reference backend (exact, slower)",
            KernelFallbackWarning,
            stacklevel=4,
        )
    return False


def _degenerate(q: torch.Tensor, p: Problem, stats: StatsSpec | None):
    """Zero-size inputs or no keys at all: zero output, every row empty."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if stats is None:
        return out, None
    rows = (p.batch, p.q_heads, p.n_q)
    shapes = {"offset_mass": rows + (len(stats.offsets),), "key_mass": (p.batch, p.q_heads, p.n_k)}
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # as the backends return them
    found = {name: torch.zeros(shapes.get(name, rows), dtype=dtype, device=q.device) for name in stats.output_fields()}
    if "argmax" in found:
        found["argmax"] = torch.full(rows, -1, dtype=torch.int64, device=q.device)
    return out, AttentionStats(**found)
