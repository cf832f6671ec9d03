"""``backend="cute"``: which calls the CuTe DSL kernel takes and why not the others, how its
rows unpack into the statistics, and that elsewhere the call falls back to the Triton path with
a warning (any machine); on an sm_90 GPU with ``nvidia-cutlass-dsl``, that it matches the
float64 oracle on fresh random problems."""

from __future__ import annotations

import random

import pytest
import torch

import kernels.dispatch
import kernels.hopper_attention
import kernels.triton_attention
from kernels import KernelFallbackWarning, StatsSpec, attention
from kernels.cute_attention import (
    CUTE_AVAILABLE,
    Masses,
    in_place,
    row_fields,
    stats_from_rows,
    tma_readable,
    unsupported,
)
from kernels.spec import empty_output
from kernels.validate import check_inputs
from tests.conftest import SEED
from tests.kernels.kernel_cases import draw_hopper_case, jumping_max_case, refusal
from tests.kernels.test_kernel_accuracy import check_against_oracle

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
BF16 = torch.bfloat16


def _reason(**kind) -> str | None:
    return refusal(unsupported, **{"stats": None, **kind})


@pytest.mark.parametrize(
    "kind, because",
    [
        (dict(dtype=torch.float32), "dtype"),
        (dict(d=96), "head dim"),
        (dict(causal=False), "not causal"),
        (dict(nq=1), "not causal self-attention"),
        (dict(key_lengths=torch.tensor([200])), "padding"),
        (dict(window=32), "variant"),
        (dict(softcap=30.0), "variant"),
        (dict(sinks=torch.zeros(2)), "variant"),
        (dict(stats=StatsSpec(sink_tokens=97)), "sink tokens"),
        # a call it takes: refused here only for what this machine lacks
        (dict(stats=StatsSpec.every_row_statistic()), "not installed" if not CUTE_AVAILABLE else "Hopper"),
        (dict(d=128, dtype=torch.float16), "not installed" if not CUTE_AVAILABLE else "Hopper"),
    ],
)
def test_unsupported_names_the_reason(kind, because):
    reason = _reason(**kind)
    assert reason is not None and because in reason, reason


@pytest.mark.parametrize("seed", range(12))
def test_rows_unpack_into_the_requested_statistics(seed):
    """The kernel's rows, laid out by :func:`row_fields` (here packed from the reference
    backend's statistics), unpack to exactly the fields the spec asks for, each in its place."""
    rng = random.Random(f"{SEED}-cute-rows-{seed}")
    b, h, n = rng.choice((1, 2)), rng.choice((1, 3)), rng.choice((5, 70))
    spec = rng.choice(
        (
            StatsSpec.every_row_statistic(),
            StatsSpec(entropy=True),
            StatsSpec(argmax=True, distance=True, window=rng.choice((1, 9))),
            StatsSpec(max_prob=True, sink_tokens=rng.choice((1, 4)), offsets=tuple(rng.sample((0, 1, 3, 8), 2))),
        )
    )
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    q, k, v = (torch.randn(b, h, n, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    full = StatsSpec.all(sink_tokens=spec.sink_tokens, window=spec.window, offsets=spec.offsets)
    _, want = attention(q, k, v, stats=full, backend="reference")
    columns = []
    for name in row_fields(Masses.of(spec)):
        if name.startswith("offset_mass_"):
            columns.append(want.offset_mass[..., int(name.rsplit("_", 1)[1])])
        elif getattr(want, name) is None:  # a mass the spec turns off: the kernel's sum is unused
            columns.append(torch.full((b, h, n), float("nan"), dtype=torch.float64))
        else:
            columns.append(getattr(want, name).double())
    rows = torch.stack(columns, -1).float().reshape(b * h, n, -1)

    found = stats_from_rows(rows, spec, (b, h, n))
    wanted = set(spec.output_fields())
    assert set(found) == wanted
    for name, got in found.items():
        expect = getattr(want, name)
        assert got.shape == expect.shape, name
        if name == "argmax":
            assert got.dtype == torch.int64 and torch.equal(got, expect), name
        else:
            torch.testing.assert_close(got.double(), expect, rtol=1e-6, atol=1e-6, msg=name)  # float32 rows


def _token_major(b, h, n, d, extra=0, dtype=BF16):
    """``[B, H, N, D]`` stored as ``[B, N, H + extra, D]`` (``extra`` heads of a wider fused
    projection after these)."""
    return torch.randn(b, n, h + extra, d).to(dtype)[:, :, :h].transpose(1, 2)


@pytest.mark.parametrize(
    "make, readable",
    [
        (lambda: torch.randn(2, 3, 5, 8).to(BF16), True),
        (lambda: _token_major(2, 3, 5, 8), True),
        (lambda: _token_major(2, 3, 5, 8, extra=2), True),  # rows of a fused projection
        (lambda: _token_major(1, 1, 5, 8), True),
        (lambda: torch.randn(2, 3, 5, 16).to(BF16)[..., ::2], False),  # a strided head dim
        (lambda: torch.randn(2, 3, 5, 12).to(BF16)[..., :8], False),  # rows 24 bytes apart
        (lambda: torch.randn(2 * 3 * 5 * 8 + 1).to(BF16)[1:].view(2, 3, 5, 8), False),  # misaligned
        (lambda: torch.randn(2, 1, 5, 8).to(BF16).expand(2, 3, 5, 8), False),  # heads broadcast
    ],
)
def test_tma_readable_takes_the_layouts_models_hand_over(make, readable):
    assert tma_readable(make()) is readable


@pytest.mark.parametrize("seed", range(8))
def test_in_place_keeps_readable_memory_and_copies_the_rest(seed):
    """A readable tensor comes back as a view of the same memory whose every stride (a size-1
    mode's too) is a positive multiple of 16 bytes; any other as a contiguous copy. The values
    never change."""
    rng = random.Random(f"{SEED}-cute-in-place-{seed}")
    b, h, n, d = rng.choice((1, 2)), rng.choice((1, 3)), rng.choice((1, 6)), rng.choice((8, 16))
    t = rng.choice(
        (
            lambda: torch.randn(b, h, n, d).to(BF16),
            lambda: _token_major(b, h, n, d),
            lambda: _token_major(b, h, n, d, extra=1),
            lambda: torch.randn(b, h, n, 2 * d).to(BF16)[..., ::2],
        )
    )()
    got = in_place(t)
    assert torch.equal(got, t)
    if tma_readable(t):
        assert got.data_ptr() == t.data_ptr()
        assert all(s > 0 and s * 2 % 16 == 0 for s in got.stride()[:-1]), got.stride()
    else:
        assert got.is_contiguous()


def test_in_place_gives_a_size_one_mode_a_stride_tma_takes():
    """Torch leaves a size-1 mode's stride free (here 6 bytes); TMA wants 16-byte multiples."""
    t = torch.randn(2, 3, 1, 8).to(BF16).as_strided((2, 3, 1, 8), (24, 8, 3, 1))
    got = in_place(t)
    assert tma_readable(t) and got.data_ptr() == t.data_ptr() and torch.equal(got, t)
    assert got.stride(2) > 0 and got.stride(2) * 2 % 16 == 0, got.stride()


@pytest.mark.parametrize("spec", [None, StatsSpec.every_row_statistic()])
def test_a_call_it_cannot_run_goes_to_triton_with_a_warning(spec, monkeypatch):
    """Here (no Hopper GPU, or no CuTe DSL) ``backend="cute"`` warns once and gives the Triton
    path's result (the interpreter on the CPU)."""
    if ON_HOPPER and CUTE_AVAILABLE:
        pytest.skip("the CuTe kernel runs this call on this machine")
    monkeypatch.setattr(kernels.dispatch, "_warned", set())
    gen = torch.Generator().manual_seed(SEED + 29)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(1, 2, 70, 64, generator=gen).to(BF16).to(device) for _ in range(3))
    with pytest.warns(KernelFallbackWarning, match="backend='cute' cannot run this call"):
        out, st = attention(q, k, v, stats=spec, backend="cute")
    want_out, want_st = attention(q, k, v, stats=spec, backend="triton")
    assert torch.equal(out, want_out)
    if spec is not None:
        assert torch.equal(st.entropy, want_st.entropy) and torch.equal(st.argmax, want_st.argmax)


@pytest.mark.skipif(not (ON_HOPPER and CUTE_AVAILABLE), reason="needs an sm_90 GPU and nvidia-cutlass-dsl")
@pytest.mark.parametrize("index", range(24))
def test_matches_float64_oracle_with_cute(index, monkeypatch):
    # any length from 1, sink tokens within the first (96-key) block
    rng = random.Random(f"{SEED}-cute-{index}")
    case = draw_hopper_case(rng, lengths=(1, 17, 128, 129, 200, 383, 640, 1000, 1300), sink_tokens=(1, 4, 96))
    _checked_on_cute(case, monkeypatch)


@pytest.mark.skipif(not (ON_HOPPER and CUTE_AVAILABLE), reason="needs an sm_90 GPU and nvidia-cutlass-dsl")
@pytest.mark.parametrize("d, dtype", [(64, BF16), (128, torch.float16)])
def test_a_max_that_jumps_in_some_rows_of_a_warp_is_rescaled_with_cute(d, dtype, monkeypatch):
    """:func:`jumping_max_case`: for a kernel that rescales only where a row's max moved."""
    case, key, second = jumping_max_case(d, dtype, SEED + 31)
    st = _checked_on_cute(case, monkeypatch)
    assert (st.argmax[0, :, key:][:, second[key:]] == key).all()  # the planted key does win there


def _checked_on_cute(case, monkeypatch):
    """Run ``case`` through the CuTe kernel, which must take it (neither the Triton nor the
    Gluon kernel may run), check it against the float64 oracle and that the output is laid
    out like q's (:func:`~kernels.spec.empty_output`); returns the statistics."""

    def not_here(*args, **kwargs):
        raise AssertionError("the call went to the Triton or Gluon kernel")

    monkeypatch.setattr(kernels.triton_attention, "triton_attention", not_here)
    monkeypatch.setattr(kernels.hopper_attention, "hopper_attention", not_here)
    p = check_inputs(case.q, case.k, case.v, **case.kwargs())
    assert unsupported(case.q, p, case.spec) is None, case.describe()
    out, st = attention(case.q, case.k, case.v, backend="cute", **case.kwargs())
    try:
        check_against_oracle(case, out, st)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ncase: {case.describe()}") from None
    assert out.stride() == empty_output(case.q).stride(), (out.stride(), case.describe())
    return st
