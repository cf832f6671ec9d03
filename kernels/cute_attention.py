"""``backend="cute"`` of :func:`kernels.attention`: the CuTe DSL forward for Hopper
(:mod:`kernels.cute_forward`, issue 19's route 2) behind the same contract as the other
backends. An optional extra: ``pip install .[cute]`` brings ``nvidia-cutlass-dsl``; without it,
or where the kernel does not apply (:func:`unsupported`), the call runs the Triton path with a
:class:`~kernels.errors.KernelFallbackWarning`.

This module imports no CuTe DSL code until a call runs the kernel, so that the settings and the
statistics' unpacking below are importable (and tested) everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from kernels.spec import AttentionStats, StatsSpec
from kernels.validate import Problem, fused_kernel_refusal

#: nvidia-cutlass-dsl (the ``cute`` extra) is installed.
CUTE_AVAILABLE = importlib.util.find_spec("cutlass") is not None
HEAD_DIMS = (64, 128)
#: The argmax travels as a float32 key index, exact below 2^24 keys.
MAX_KEYS = 1 << 24
#: Sink tokens are summed in the first key block only; the smallest block is 96 keys.
MAX_SINK_TOKENS = 96


@dataclasses.dataclass(frozen=True)
class Masses:
    """The settings of the row statistics' masses (:class:`StatsSpec`'s, a compile-time
    constant of the kernel): mass on keys ``< sink_tokens``, on the ``window`` keys up to the
    row, and on key ``row - o`` for each of ``offsets``; 0 or () turns one off."""

    sink_tokens: int = 1
    window: int = 64
    offsets: tuple[int, ...] = (1,)

    @classmethod
    def of(cls, stats: StatsSpec) -> Masses:
        return cls(stats.sink_tokens, stats.window, tuple(stats.offsets))

    @property
    def sums(self) -> int:
        """Partial sums a row in the kernel: entropy's ``sum p x``, distance's ``sum p key``, the
        sink and local masses, then one an offset."""
        return 4 + len(self.offsets)

    @property
    def reach(self) -> int:
        """How far before a row the local and offset masses look: the key blocks this far back
        from a consumer's first row are the "near" ones that sum them."""
        return max([self.window - 1, *self.offsets, 0])


def row_fields(masses: Masses | None) -> tuple[str, ...]:
    """The fields of the kernel's ``rows`` output ``[B*Hq, N, fields]``: the lse; with the
    statistics entropy, max prob, distance, sink and local masses, each offset's mass
    (``offset_mass_0``...) and the argmax (a float32 key index)."""
    if masses is None:
        return ("lse",)
    offsets = tuple(f"offset_mass_{i}" for i in range(len(masses.offsets)))
    return ("lse", "entropy", "max_prob", "distance", "sink_mass", "local_mass", *offsets, "argmax")


def tma_readable(t: torch.Tensor) -> bool:
    """Whether the kernel's TMA can read (or write) ``t`` ``[B, H, N, D]`` in place: a unit-stride
    head dim, a 16-byte aligned start and every other stride a positive multiple of 16 bytes
    (size-1 modes aside). Head-major, token-major (``[B, N, H, D]`` in memory, as model
    projections give it) and rows of a wider fused projection all are."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    size = t.element_size()
    return all(s > 0 and s * size % 16 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1)


def in_place(t: torch.Tensor) -> torch.Tensor:
    """``t`` where :func:`tma_readable` (a size-1 mode's stride, which torch leaves free, set to
    the tensor's span so that TMA takes it), else a contiguous copy."""
    if not tma_readable(t):
        return t.contiguous()
    span = max(n * s for n, s in zip(t.shape, t.stride()))
    return t.as_strided(t.shape, [s if n > 1 else span for n, s in zip(t.shape, t.stride())])


def build(head_dim: int, stats: bool) -> dict:
    """The kernel's build for a head dim: at D = 64 with statistics three consumer warpgroups
    and 96-key blocks (two consumers and 128 keys spill there); two and 128 otherwise
    (docs/benchmarks.md, route 2 on the card)."""
    if head_dim == 64 and stats:
        return dict(consumers=3, block_n=96)
    return dict(consumers=2, block_n=128)


def unsupported(
    q: torch.Tensor,
    p: Problem,
    stats: StatsSpec | None,
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
    **per_head: torch.Tensor | None,
) -> str | None:
    """Why the CuTe kernel cannot run the call (None: it can). ``per_head`` are the per-head
    variants of :func:`kernels.attention` (``sinks``, ``alibi_slopes``, ``window_heads``)."""
    reason = fused_kernel_refusal(q, p, HEAD_DIMS, 1, key_lengths, query_lengths, per_head)
    if reason is not None:
        return reason
    if p.n_k >= MAX_KEYS:
        return f"{p.n_k} keys (at most {MAX_KEYS - 1})"
    if stats is not None and stats.sink_tokens > MAX_SINK_TOKENS:
        return f"more than {MAX_SINK_TOKENS} sink tokens"
    if not CUTE_AVAILABLE:
        return "nvidia-cutlass-dsl is not installed (pip install .[cute])"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "not a Hopper (sm_90) GPU"
    return None


def stats_from_rows(rows: torch.Tensor, stats: StatsSpec, shape: tuple[int, int, int]) -> dict:
    """The requested statistics from the kernel's ``rows`` ``[B*Hq, N, fields]`` (laid out by
    :func:`row_fields`): ``{name: [B, Hq, N]}`` (the argmax as int64), ``offset_mass
    [B, Hq, N, len(offsets)]``. ``shape`` is ``(B, Hq, N)``."""
    names = row_fields(Masses.of(stats))
    wanted = stats.output_fields()
    found = {name: rows[..., i].reshape(shape).contiguous() for i, name in enumerate(names) if name in wanted}
    if "argmax" in found:
        found["argmax"] = found["argmax"].long()
    if stats.offsets:  # the offsets' columns lie side by side
        first = names.index("offset_mass_0")
        found["offset_mass"] = rows[..., first : first + len(stats.offsets)].reshape(*shape, -1).contiguous()
    return found


_compiled: dict[tuple, object] = {}


def cute_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, stats: StatsSpec | None
) -> tuple[torch.Tensor, AttentionStats | None]:
    """Run the CuTe kernel on a call :func:`unsupported` accepts (key mass by the Triton pass).
    q, k and v are read in place where TMA can (:func:`in_place`: head- or token-major, or rows
    of a fused projection), and the output is laid out like q
    (:func:`~kernels.spec.empty_output`). The first call of a dtype, head dim, GQA group and
    statistics settings compiles the kernel (a few seconds); later calls of any length, batch,
    head count or layout reuse it."""
    import cuda.bindings.driver as cuda_driver
    import cutlass
    import cutlass.cute as cute

    from kernels.cute_forward import kernel_arguments, library_kernel
    from kernels.triton_attention import key_mass_pass

    b, hq, n, d = q.shape
    masses = Masses.of(stats) if stats is not None else None
    views, out, rows = kernel_arguments(q, k, v, len(row_fields(masses)))
    stream = cuda_driver.CUstream(torch.cuda.current_stream(q.device).cuda_stream)
    scale = cutlass.Float32(p.scale)
    key = (q.dtype, d, p.group, masses, q.device.index)
    if key not in _compiled:
        _compiled[key] = cute.compile(library_kernel(d, p.group, masses), *views, scale, stream)
    _compiled[key](*views, scale, stream)
    if stats is None:
        return out, None
    found = stats_from_rows(rows, stats, (b, hq, n))
    key_mass = key_mass_pass(q, k, p, stats, found["lse"]) if stats.key_mass else None
    return out, AttentionStats(**found, key_mass=key_mass)
