"""Bad input gets a clear error (or, for a head dim Triton cannot take, one warning)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

import kernels.dispatch as dispatch
from kernels import AttentionInputError, KernelFallbackWarning, StatsSpec, attention


def qkv(b=1, hq=4, hkv=2, nq=8, nk=8, d=32, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(b, hq, nq, d, dtype=dtype, device=device),
        torch.randn(b, hkv, nk, d, dtype=dtype, device=device),
        torch.randn(b, hkv, nk, d, dtype=dtype, device=device),
    )


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "auto"])
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(4, 8, 32),) + qkv()[1:], "4 dimensions"),
        (lambda: qkv()[:2] + (torch.randn(1, 2, 9, 32),), "same shape"),
        (lambda: qkv(hq=3, hkv=2), "multiple of key/value heads"),
        (lambda: (qkv()[0].half(),) + qkv()[1:], "share one dtype"),
        (lambda: (qkv()[0].int(),) * 3, "not supported"),
        (lambda: (qkv()[0],) + tuple(t.to("meta") for t in qkv()[1:]), "one device"),
        (lambda: (torch.randn(2, 4, 8, 32),) + qkv()[1:], "batch"),
        (lambda: (torch.randn(1, 4, 8, 16),) + qkv()[1:], "head_dim"),
    ],
)
def test_bad_tensors(backend, make, match):
    with pytest.raises(AttentionInputError, match=match):
        attention(*make(), backend=backend)


def test_without_drops_exactly_the_named_outputs():
    full = StatsSpec(
        entropy=True,
        max_prob=True,
        argmax=True,
        sink_tokens=2,
        window=8,
        distance=True,
        offsets=(1, 3),
        key_mass=True,
        key_mass_queries=4,
        learned_sink=True,
    )
    every = full.output_fields()
    for name in every[1:]:  # all but lse
        assert full.without(name).output_fields() == tuple(f for f in every if f != name), name
    assert full.without("key_mass") == replace(full, key_mass=False, key_mass_queries=0)  # no stray settings
    assert full.without().output_fields() == every
    assert full.without(*every[1:]).output_fields() == ("lse",)
    with pytest.raises(AttentionInputError, match="cannot drop lse, speed: choose from entropy"):
        full.without("lse", "speed")


def test_bad_stats_settings():
    with pytest.raises(AttentionInputError, match="window must be >= 0"):
        StatsSpec(window=-1)
    with pytest.raises(AttentionInputError, match="sink_tokens must be >= 0"):
        StatsSpec(sink_tokens=-2)
    with pytest.raises(AttentionInputError, match="must be an int"):
        StatsSpec(window=2.5)
    with pytest.raises(AttentionInputError, match="key_mass_queries must be >= 0"):
        StatsSpec(key_mass=True, key_mass_queries=-1)
    with pytest.raises(AttentionInputError, match="key_mass_queries must be an int"):
        StatsSpec(key_mass=True, key_mass_queries=True)
    with pytest.raises(AttentionInputError, match="key_mass_queries needs key_mass=True"):
        StatsSpec(key_mass_queries=8)
    with pytest.raises(AttentionInputError, match=r"key_mass_stride must be >= 1 \(1: every row\)"):
        StatsSpec(key_mass=True, key_mass_stride=0)
    with pytest.raises(AttentionInputError, match="key_mass_stride must be an int"):
        StatsSpec(key_mass=True, key_mass_stride=2.0)
    with pytest.raises(AttentionInputError, match="key_mass_stride needs key_mass=True"):
        StatsSpec(key_mass_stride=4)
    with pytest.raises(AttentionInputError, match="out of range for causal"):
        attention(*qkv(), stats=StatsSpec(offsets=(-1,)))
    with pytest.raises(AttentionInputError, match="out of range"):
        attention(*qkv(), stats=StatsSpec(offsets=(2**40,)))
    with pytest.raises(AttentionInputError, match="StatsSpec"):
        attention(*qkv(), stats={"entropy": True})
    # non-causal attention may look forward
    _, st = attention(*qkv(), causal=False, stats=StatsSpec(offsets=(-1,)))
    assert st.offset_mass.shape == (1, 4, 8, 1)


def test_bad_lengths_backend_and_options():
    q, k, v = qkv(b=2)
    with pytest.raises(AttentionInputError, match=r"key_lengths must have shape \[2\]"):
        attention(q, k, v, key_lengths=torch.tensor([3]))
    with pytest.raises(AttentionInputError, match=r"query_lengths must lie in \[0, 8\]"):
        attention(q, k, v, query_lengths=torch.tensor([3, 9]))
    with pytest.raises(AttentionInputError, match="integer tensor"):
        attention(q, k, v, key_lengths=torch.tensor([3.0, 2.0]))
    with pytest.raises(AttentionInputError, match="unknown backend 'fast'"):
        attention(q, k, v, backend="fast")
    with pytest.raises(AttentionInputError, match="reference-backend options"):
        attention(q, k, v, backend="triton", mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(AttentionInputError, match="does not broadcast"):
        attention(q, k, v, backend="reference", mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(AttentionInputError, match="boolean"):
        attention(q, k, v, backend="reference", mask=torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(AttentionInputError, match="finite"):
        attention(q, k, v, scale=float("nan"))
    with pytest.raises(AttentionInputError, match="float64"):
        attention(q.double(), k.double(), v.double(), backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    # triton.jit reads TRITON_INTERPRET when it decorates: import the kernels under the interpreter
    # first, or a later test in this process would get compiled-mode kernels.
    import kernels.triton_attention  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(AttentionInputError, match="TRITON_INTERPRET=1"):
        attention(*qkv(), backend="triton")


def test_unsupported_head_dim_falls_back_with_one_warning(monkeypatch, device):
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v = qkv(d=8, device=device)
    with pytest.warns(KernelFallbackWarning, match="head dims 16..256"):
        out, st = attention(q, k, v, backend="triton", stats=StatsSpec(entropy=True))
    want, want_st = attention(q, k, v, backend="reference", stats=StatsSpec(entropy=True))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(st.entropy, want_st.entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, backend="triton")  # second time: silent


def test_auto_picks_the_cpu_backend_on_the_cpu_and_the_reference_for_float64(monkeypatch):
    """``auto`` on CPU tensors runs the cpu backend for float16/bfloat16/float32 and the exact
    reference for float64 (mask and chunk_size included); ``backend="cpu"`` takes CPU tensors only."""
    ran = []

    def spy(name: str):
        real = getattr(dispatch, name)
        return lambda *a, **kw: ran.append(name) or real(*a, **kw)

    for name in ("cpu_attention", "reference_attention"):
        monkeypatch.setattr(dispatch, name, spy(name))
    for dtype, named in ((torch.float32, "cpu"), (torch.bfloat16, "cpu"), (torch.float64, "reference")):
        q, k, v = qkv(nq=5, nk=9, dtype=dtype)
        ran.clear()
        attention(q, k, v, stats=StatsSpec.all())
        attention(q, k, v, mask=torch.ones(5, 9, dtype=torch.bool), chunk_size=2)
        assert ran == [f"{named}_attention"] * 2, dtype
    with pytest.raises(AttentionInputError, match="backend='cpu' takes CPU tensors"):
        attention(*(t.to("meta") for t in qkv()), backend="cpu")
