"""Random attention problems for the kernel tests: shapes, dtypes, layouts, padding, stats."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from kernels import StatsSpec

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float | None
    spec: StatsSpec | None
    key_lengths: torch.Tensor | None
    query_lengths: torch.Tensor | None

    def kwargs(self) -> dict:
        return dict(
            causal=self.causal,
            scale=self.scale,
            stats=self.spec,
            key_lengths=self.key_lengths,
            query_lengths=self.query_lengths,
        )

    def describe(self) -> str:
        return (
            f"q{tuple(self.q.shape)} k{tuple(self.k.shape)} {self.q.dtype} causal={self.causal} "
            f"scale={self.scale} klen={_lst(self.key_lengths)} qlen={_lst(self.query_lengths)} "
            f"strides={self.q.stride()} spec={self.spec}"
        )


def _lst(t):
    return None if t is None else t.tolist()


#: Largest key count of :func:`draw_case`; under the Triton interpreter, where each program costs
#: milliseconds, the Triton backend's cases stop at three 16-key blocks (still several query and key
#: blocks, and up to three key splits in decoding).
MAX_KEYS = 80
MAX_KEYS_INTERPRETED = 48


def max_keys_for(backend: str) -> int:
    """:data:`MAX_KEYS`, or :data:`MAX_KEYS_INTERPRETED` for ``backend="triton"`` under the interpreter."""
    from kernels.triton_attention import interpreting

    return MAX_KEYS_INTERPRETED if backend == "triton" and interpreting() else MAX_KEYS


def draw_case(rng: random.Random, device: str, max_keys: int = MAX_KEYS, dtypes=DTYPES) -> Case:
    """One random problem; every size, flag and value comes from ``rng``."""
    dtype = rng.choice(dtypes)
    d = rng.choice(HEAD_DIMS)
    hkv, group, b = rng.randint(1, 2), rng.choice((1, 2, 4)), rng.randint(1, 2)
    hq = hkv * group
    nk = rng.randint(1, max_keys)
    kind = rng.choice(("square", "square", "decode", "shorter", "longer"))
    nq = {
        "square": nk,
        "decode": rng.randint(1, min(nk, 16)),
        "shorter": rng.randint(1, nk),
        "longer": nk + rng.randint(1, 12),
    }[kind]
    causal = rng.random() < 0.7
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    magnitude = rng.choice((0.5, 1.0, 3.0))

    def tensor(heads: int, n: int) -> torch.Tensor:
        if rng.random() < 0.3:  # [B, N, H, D] storage seen through a transpose, as in HF models
            t = torch.randn(b, n, heads, d, generator=gen).transpose(1, 2)
        else:
            t = torch.randn(b, heads, n, d, generator=gen)
        return (t * magnitude).to(dtype).to(device)

    q, k, v = tensor(hq, nq), tensor(hkv, nk), tensor(hkv, nk)
    klen = qlen = None
    if rng.random() < 0.4:
        klen = torch.tensor([rng.randint(0, nk) for _ in range(b)], device=device)
    if rng.random() < 0.3:
        qlen = torch.tensor([rng.randint(0, nq) for _ in range(b)], device=device)
    spec = None
    if rng.random() < 0.85:
        low = 0 if causal else -(nk - 1)
        n_off = rng.randint(0, 3)
        spec = StatsSpec(
            entropy=rng.random() < 0.7,
            max_prob=rng.random() < 0.7,
            argmax=rng.random() < 0.7,
            sink_tokens=rng.choice((0, 1, 2, 4, 100)),
            window=rng.choice((0, 1, 3, 16, 200)),
            distance=rng.random() < 0.7,
            offsets=tuple(rng.randint(low, nk + 2) for _ in range(n_off)),
            key_mass=rng.random() < 0.6,
        )
        if spec.key_mass and rng.random() < 0.5:  # some rows only: the last ones (SnapKV), every stride-th
            spec = replace(
                spec, key_mass_queries=rng.choice((0, 1, 3, 17, nq + 5)), key_mass_stride=rng.choice((1, 2, 3, 16))
            )
    scale = None if rng.random() < 0.6 else rng.uniform(0.02, 0.5)
    return Case(q, k, v, causal, scale, spec, klen, qlen)


#: Sizes of the accuracy sweep (``N`` is the key count; queries are as many or fewer).
ACCURACY_SIZES = (1, 97, 1025, 4097)
#: What the Triton interpreter can afford on a CPU.
ACCURACY_SIZES_CPU = (1, 41, 97)
ACCURACY_HEAD_DIMS = (16, 40, 80, 96, 128, 256)
#: Work caps: (query block, key block) pairs of 16 x 16 for the interpreter; elements of one
#: ``[B, Hq, Nq, Nk]`` float64 matrix (2 GiB) for the oracle on a GPU.
_CPU_BLOCK_PAIRS = 64
_GPU_MATRIX_ELEMENTS = 1 << 28


def draw_accuracy_case(rng: random.Random, device: str, sizes=ACCURACY_SIZES) -> Case:
    """One problem of the accuracy sweep: odd sizes, GQA groups 1-8, ``Nq <= Nk`` (prefill,
    chunked prefill, decoding), padding, both masks, three dtypes, every statistic. Groups and
    batch shrink until the problem fits the work cap of ``device``."""
    dtype = rng.choice(DTYPES)
    d = rng.choice(ACCURACY_HEAD_DIMS)
    nk = rng.choice(sizes)
    kind = rng.choice(("square", "chunk", "decode"))
    nq = {"square": nk, "chunk": rng.randint(1, nk), "decode": rng.randint(1, min(nk, 16))}[kind]
    b, hkv, group = rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 8)

    def too_big() -> bool:
        if device == "cpu":
            return b * hkv * group * -(-nq // 16) * -(-nk // 16) > _CPU_BLOCK_PAIRS
        return b * hkv * group * nq * nk > _GPU_MATRIX_ELEMENTS

    while too_big() and (b, hkv, group) != (1, 1, 1):
        if b > 1:
            b -= 1
        elif hkv > 1:
            hkv -= 1
        else:
            group = max(1, group // 2)
    causal = rng.random() < 0.6
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    magnitude = rng.choice((0.5, 1.0, 3.0))

    def tensor(heads: int, n: int) -> torch.Tensor:
        if rng.random() < 0.3:  # [B, N, H, D] storage seen through a transpose
            t = torch.randn(b, n, heads, d, generator=gen).transpose(1, 2)
        else:
            t = torch.randn(b, heads, n, d, generator=gen)
        return (t * magnitude).to(dtype).to(device)

    q, k, v = tensor(hkv * group, nq), tensor(hkv, nk), tensor(hkv, nk)
    klen = torch.tensor([rng.randint(0, nk) for _ in range(b)], device=device) if rng.random() < 0.4 else None
    qlen = torch.tensor([rng.randint(0, nq) for _ in range(b)], device=device) if rng.random() < 0.3 else None
    # Two offsets always (their count is a compile-time constant: fewer kernels to compile on a GPU).
    far = rng.randint(0 if causal else -(nk - 1), nk)
    spec = StatsSpec.all(sink_tokens=rng.choice((1, 4, 100)), window=rng.choice((1, 16, 200)), offsets=(1, far))
    scale = None if rng.random() < 0.6 else rng.uniform(0.02, 0.5)
    if rng.random() < 0.3:  # key mass of some rows only: the last ones, every stride-th
        spec = replace(spec, key_mass_queries=rng.randint(0, nq + 2), key_mass_stride=rng.choice((1, 2, 5)))
    return Case(q, k, v, causal, scale, spec, klen, qlen)


def refusal(
    unsupported, dtype=torch.bfloat16, d=64, nq=256, nk=256, causal=True, stats=StatsSpec(), scale=None, **variants
):
    """What a Hopper kernel's ``unsupported`` (the Gluon or the CuTe one) says of a CPU call of
    the given kind (two query heads, one key/value head)."""
    from kernels.validate import check_inputs

    q = torch.zeros(1, 2, nq, d, dtype=dtype)
    k = torch.zeros(1, 1, nk, d, dtype=dtype)
    lengths = {name: variants.pop(name, None) for name in ("key_lengths", "query_lengths")}
    per_head = {name: variants.pop(name) for name in ("sinks", "alibi_slopes", "window_heads") if name in variants}
    p = check_inputs(q, k, k, causal=causal, scale=scale, stats=stats, **lengths, **per_head, **variants)
    return unsupported(q, p, stats, **lengths, **per_head)


def draw_hopper_case(
    rng: random.Random, lengths=(128, 129, 200, 255, 383, 640, 1000, 1300), sink_tokens=(1, 4, 128)
) -> Case:
    """A random call the Hopper kernels (Gluon, CuTe) take, on the GPU: GQA, odd lengths,
    statistics of any settings, and q, k, v each contiguous, token-major (``[B, N, H, D]``
    storage, as models hand it over) or token-major rows of a wider fused projection."""
    d, dtype = rng.choice((64, 128)), rng.choice((torch.bfloat16, torch.float16))
    b, hkv, group = rng.choice((1, 2)), rng.choice((1, 2)), rng.choice((1, 2, 4))
    n = rng.choice(lengths)
    spec = rng.choice(
        (
            None,
            StatsSpec(),
            StatsSpec.all(
                sink_tokens=rng.choice(sink_tokens),
                window=rng.choice((1, 40, 129, 300)),
                offsets=tuple(rng.sample((0, 1, 2, 7, 127, 128, 300), 2)),
            ),
            StatsSpec(entropy=True, argmax=True, distance=True),
            StatsSpec(sink_tokens=2, window=64, key_mass=True, key_mass_queries=rng.choice((1, 64, 500))),
        )
    )
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    sigma = rng.choice((0.5, 1.0, 2.0))

    def draw(heads):
        layout = rng.choice(("contiguous", "token-major", "fused"))
        if layout == "contiguous":
            return (torch.randn(b, heads, n, d, generator=gen) * sigma).to(dtype).cuda()
        extra = 3 if layout == "fused" else 0  # heads of a wider projection, around these
        t = (torch.randn(b, n, heads + extra, d, generator=gen) * sigma).to(dtype).cuda()
        return t[:, :, extra - 1 : extra - 1 + heads].transpose(1, 2) if extra else t.transpose(1, 2)

    return Case(draw(hkv * group), draw(hkv), draw(hkv), True, None, spec, None, None)


def jumping_max_case(d: int, dtype: torch.dtype, seed: int) -> tuple[Case, int, torch.Tensor]:
    """A call (on the GPU) where, in every 16 query rows (a warp's share of an accumulator),
    rows 8-15 meet one key scoring 16, where their earlier scores stay below about 3, while
    rows 0-7 see random scores whose max moves little: a kernel that rescales only where some
    row's max moved (far) must still rescale the rows that need it, whichever half of the warp
    they are in. ``(case, the key, the rows that meet it [N] bool)``."""
    n, key = 700, 300
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, generator=gen) * s for h, s in ((2, 0.5), (1, 0.5), (1, 1.0)))
    second = torch.arange(n) % 16 >= 8
    q[0, :, second, 0] = 8.0
    k[0, 0, key, 0] = 16.0 * d**0.5 / 8
    spec = StatsSpec.all(sink_tokens=4, window=64, offsets=(1, 7))
    case = Case(q.to(dtype).cuda(), k.to(dtype).cuda(), v.to(dtype).cuda(), True, None, spec, None, None)
    return case, key, second
