"""Merging results over disjoint key sets (DESIGN.md, Scale-out), checked through the public API.

The Triton backend's own split merge runs inside its kernels (flash-decoding); here the
identities are checked on what :func:`kernels.attention` returns: attention over keys split
into contiguous parts, merged by the float64 ``tests.kernels.oracle.merge_parts``, equals attention over
all keys. Bottom-right alignment makes a part easy to express: keys ``[lo, hi)`` are the call
on ``k[:, :, lo:]`` with ``key_lengths = hi - lo``, which keeps every query's position relative
to every key (so distance, window, offset and causal masks are unchanged); only absolute
positions move, so a part asks for the sink keys it still holds and its argmax is offset by lo.

Problems have integer-valued q and k (exact scores, so ties are exact and distinct scores are
far apart) and come from hypothesis, seeded from ``tests.conftest.SEED``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from kernels import StatsSpec, attention
from tests.conftest import SEED
from tests.kernels.oracle import merge_parts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Examples per test: the Triton interpreter runs several calls per example.
EXAMPLES = {"reference": 25, "triton": 8}
MERGED = ("out", "lse", "entropy", "max_prob", "sink_mass", "local_mass", "distance", "offset_mass")
# No example database: the examples come from SEED alone, so every machine runs the same ones.
_SETTINGS = dict(deadline=None, database=None)


@st.composite
def problems(draw):
    """A small problem: shapes, causal flag, lengths, sink/window settings, cut points, seed.
    Up to 16 queries and 32+ keys is a decoding shape whose keys the Triton interpreter splits."""
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from((1, 2, 3)))
    nk = draw(st.one_of(st.integers(1, 24), st.integers(33, 64)))
    nq = draw(st.sampled_from((1, 2, 3, 7, 16, 19)))
    cuts = sorted(draw(st.lists(st.integers(0, nk), max_size=3)))
    return dict(
        b=b,
        hkv=hkv,
        group=group,
        nq=nq,
        nk=nk,
        causal=draw(st.booleans()),
        key_lengths=draw(st.one_of(st.none(), st.lists(st.integers(0, nk), min_size=b, max_size=b))),
        sink=draw(st.sampled_from((1, 3, 20))),
        window=draw(st.sampled_from((1, 4, 30))),
        bounds=[0, *cuts, nk],
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _tensors(pr: dict, dtype: torch.dtype):
    """Integer-valued q, k in [-2, 2] (``[B, Hq, Nq, 16]``, ``[B, Hkv, Nk, 16]``) and random v."""
    gen = torch.Generator().manual_seed(pr["seed"])
    q = torch.randint(-2, 3, (pr["b"], pr["hkv"] * pr["group"], pr["nq"], 16), generator=gen)
    k = torch.randint(-2, 3, (pr["b"], pr["hkv"], pr["nk"], 16), generator=gen)
    v = torch.randn(pr["b"], pr["hkv"], pr["nk"], 16, generator=gen)
    return (t.to(dtype).to(DEVICE) for t in (q, k, v))


def _spec(pr: dict, first_key: int = 0) -> StatsSpec:
    """Every statistic the merge covers (key mass is not a row statistic), for keys from ``first_key``."""
    offsets = (1, 3) if pr["causal"] else (1, -2)
    return StatsSpec(
        entropy=True,
        max_prob=True,
        argmax=True,
        sink_tokens=max(0, pr["sink"] - first_key),
        window=pr["window"],
        distance=True,
        offsets=offsets,
    )


def _lengths(pr: dict, lo: int, hi: int) -> torch.Tensor:
    """Valid keys of part ``[lo, hi)`` per batch entry, counted from lo."""
    total = pr["key_lengths"] or [pr["nk"]] * pr["b"]
    return torch.tensor([max(0, min(hi, n) - lo) for n in total], device=DEVICE)


def _parts(pr: dict, q, k, v, backend: str) -> list:
    """``(lo, out, stats)`` of attention over each part ``[lo, hi)`` of the keys."""
    bounds = pr["bounds"]
    return [
        (
            lo,
            *attention(
                q,
                k[:, :, lo:],
                v[:, :, lo:],
                causal=pr["causal"],
                stats=_spec(pr, lo),
                backend=backend,
                key_lengths=_lengths(pr, lo, hi),
            ),
        )
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]


def _tolerances(backend: str, pr: dict) -> dict[str, float]:
    """Absolute tolerances: float64 rounding (reference), float32 rounding (Triton)."""
    base = 1e-10 if backend == "reference" else 1e-5
    return {name: base * {"lse": 20, "entropy": 10, "distance": pr["nk"] + pr["nq"]}.get(name, 1) for name in MERGED}


def _assert_matches(merged: dict, out: torch.Tensor, stats, tol: dict, what: str) -> None:
    """Merged values equal a direct result (``out``, ``stats``) within ``tol``; argmax exactly."""
    assert torch.equal(merged["argmax"].cpu(), stats.argmax.cpu()), f"{what}: argmax"
    for name in MERGED:
        got = out if name == "out" else getattr(stats, name)
        torch.testing.assert_close(
            merged[name].cpu(),
            got.double().cpu(),
            rtol=0,
            atol=tol[name],
            msg=lambda m, name=name: f"{what}: {name}: {m}",
        )


def _check_union(pr: dict, backend: str) -> None:
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = _tensors(pr, dtype)
    klen = None if pr["key_lengths"] is None else torch.tensor(pr["key_lengths"], device=DEVICE)
    out, whole = attention(q, k, v, causal=pr["causal"], stats=_spec(pr), backend=backend, key_lengths=klen)
    parts = _parts(pr, q, k, v, backend)
    tol = _tolerances(backend, pr)
    _assert_matches(merge_parts(parts), out, whole, tol, f"parts {pr['bounds']}")
    _assert_matches(merge_parts(parts[::-1]), out, whole, tol, f"parts {pr['bounds']} reversed")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_union_is_merge_of_parts(backend):
    """Attention over all keys equals the merge of attention over contiguous parts of them
    (some parts empty, with padding and both masks), in either order of the parts."""

    @seed(SEED)
    @settings(max_examples=EXAMPLES[backend], **_SETTINGS)
    @given(pr=problems())
    def check(pr):
        _check_union(pr, backend)

    check()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merging_with_itself_adds_ln2(backend):
    """A result merged with itself: lse and entropy grow by ln 2, max_prob halves, output,
    masses, distance and argmax stay; and attention over every key twice (non-causal, so
    positions play no part) agrees on lse, entropy, max_prob, argmax and output."""

    @seed(SEED)
    @settings(max_examples=EXAMPLES[backend], **_SETTINGS)
    @given(pr=problems())
    def check(pr):
        dtype = torch.float64 if backend == "reference" else torch.float32
        tol = _tolerances(backend, pr)
        q, k, v = _tensors(pr, dtype)
        out, one = attention(q, k, v, causal=pr["causal"], stats=_spec(pr), backend=backend)
        merged = merge_parts([(0, out, one), (0, out, one)])
        ok = one.argmax >= 0
        shift = {"lse": ok.double() * math.log(2), "entropy": ok.double() * math.log(2)}
        assert torch.equal(merged["argmax"], one.argmax)
        for name in MERGED:
            want = (out if name == "out" else getattr(one, name)).double()
            if name == "max_prob":
                want = want / 2
            torch.testing.assert_close(merged[name], want + shift.get(name, 0), rtol=0, atol=tol[name], msg=name)
        twice = StatsSpec(entropy=True, max_prob=True, argmax=True)
        out1, st1 = attention(q, k, v, causal=False, stats=twice, backend=backend)
        out2, st2 = attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2), causal=False, stats=twice, backend=backend)
        assert torch.equal(st2.argmax, st1.argmax)
        torch.testing.assert_close(st2.lse.double(), st1.lse.double() + math.log(2), rtol=0, atol=tol["lse"])
        torch.testing.assert_close(
            st2.entropy.double(), st1.entropy.double() + math.log(2), rtol=0, atol=tol["entropy"]
        )
        torch.testing.assert_close(st2.max_prob.double(), st1.max_prob.double() / 2, rtol=0, atol=tol["max_prob"])
        torch.testing.assert_close(out2.double(), out1.double(), rtol=0, atol=tol["out"])

    check()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_part_changes_nothing(backend):
    """Merging in a part without keys (no keys at all, or all padding) changes nothing: the
    empty rows' sentinels (lse = 0, argmax = -1) carry no weight."""

    @seed(SEED)
    @settings(max_examples=EXAMPLES[backend], **_SETTINGS)
    @given(pr=problems())
    def check(pr):
        dtype = torch.float64 if backend == "reference" else torch.float32
        q, k, v = _tensors(pr, dtype)
        out, one = attention(q, k, v, causal=pr["causal"], stats=_spec(pr), backend=backend)
        nk = pr["nk"]
        no_keys = attention(q, k[:, :, nk:], v[:, :, nk:], causal=pr["causal"], stats=_spec(pr, nk), backend=backend)
        padding = attention(
            q,
            k,
            v,
            causal=pr["causal"],
            stats=_spec(pr),
            backend=backend,
            key_lengths=torch.zeros(pr["b"], dtype=torch.long, device=DEVICE),
        )
        tol = {name: 0.0 for name in MERGED}
        for parts in ([(0, out, one), (nk, *no_keys)], [(0, *padding), (0, out, one)]):
            _assert_matches(merge_parts(parts), out, one, tol, "with an empty part")

    check()
