"""``kernels.merge.merge_attention``: results over disjoint key sets merge into the result over all keys.

A part over keys ``[lo, hi)`` is the call on ``k[:, :, lo:]`` with ``key_lengths = hi - lo``
(bottom-right alignment keeps every query's position relative to every key, as in
``tests/kernels/test_kernel_merge.py``), with ``part_spec(spec, lo)``. Problems have integer-valued q
and k (exact scores: ties are exact and distinct scores lie far apart) and come from
hypothesis, seeded from ``tests.conftest.SEED``; the reference backend computes every call.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from kernels import AttentionInputError, AttentionStats, StatsSpec, attention
from kernels.merge import attend_part, merge_attention, part_spec
from tests.conftest import SEED

_SETTINGS = dict(deadline=None, database=None)  # examples from SEED alone
DTYPES = (torch.float32, torch.float64)


@st.composite
def problems(draw):
    """Shapes (GQA groups, decoding and prefill, more queries than keys), causal flag, padding
    of keys and queries, sink/window settings, 1-4 contiguous parts, dtype and a data seed."""
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from((1, 2, 3)))
    nk, nq = draw(st.integers(1, 40)), draw(st.sampled_from((1, 1, 2, 5, 9)))

    def opt_lengths(limit: int):
        return st.one_of(st.none(), st.lists(st.integers(0, limit), min_size=b, max_size=b))

    return dict(
        b=b,
        hkv=hkv,
        group=group,
        nq=nq,
        nk=nk,
        d=draw(st.sampled_from((3, 8, 16))),
        causal=draw(st.booleans()),
        key_lengths=draw(opt_lengths(nk)),
        query_lengths=draw(opt_lengths(nq)),
        sink=draw(st.sampled_from((1, 3, 20))),
        window=draw(st.sampled_from((1, 4, 30))),
        bounds=[0, *sorted(draw(st.lists(st.integers(0, nk), max_size=3))), nk],
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _tensors(pr: dict, nk: int | None = None):
    """Integer-valued q ``[B, Hq, Nq, D]`` and k ``[B, Hkv, Nk, D]`` in [-2, 2], random v."""
    gen = torch.Generator().manual_seed(pr["seed"])
    nk = pr["nk"] if nk is None else nk
    q = torch.randint(-2, 3, (pr["b"], pr["hkv"] * pr["group"], pr["nq"], pr["d"]), generator=gen)
    k = torch.randint(-2, 3, (pr["b"], pr["hkv"], nk, pr["d"]), generator=gen)
    v = torch.randn(pr["b"], pr["hkv"], nk, pr["d"], generator=gen)
    return (t.to(pr["dtype"]) for t in (q, k, v))


def _spec(pr: dict) -> StatsSpec:
    """Every statistic; key mass only for one query row, the case where it merges."""
    offsets = (1, 3) if pr["causal"] else (1, -2)
    return StatsSpec(
        entropy=True,
        max_prob=True,
        argmax=True,
        sink_tokens=pr["sink"],
        window=pr["window"],
        distance=True,
        offsets=offsets,
        key_mass=pr["nq"] == 1,
    )


def _lengths(pr: dict, name: str):
    return None if pr[name] is None else torch.tensor(pr[name])


def _parts(pr: dict, q, k, v, spec: StatsSpec) -> list[tuple[int, torch.Tensor, AttentionStats]]:
    """``(lo, out, stats)`` of attention over each part ``[lo, hi)`` of the keys."""
    total = pr["key_lengths"] or [pr["nk"]] * pr["b"]
    found = []
    for lo, hi in zip(pr["bounds"][:-1], pr["bounds"][1:]):
        lengths = torch.tensor([max(0, min(hi, n) - lo) for n in total])
        found.append(
            (
                lo,
                *attention(
                    q,
                    k[:, :, lo:],
                    v[:, :, lo:],
                    causal=pr["causal"],
                    stats=part_spec(spec, lo),
                    backend="reference",
                    key_lengths=lengths,
                    query_lengths=_lengths(pr, "query_lengths"),
                ),
            )
        )
    return found


def _tolerance(pr: dict, name: str) -> float:
    """float64: rounding only; float32: the float32 rounding of both sides (scores up to ~20)."""
    base = 1e-11 if pr["dtype"] == torch.float64 else 2e-6
    return base * {"lse": 20, "entropy": 10, "distance": pr["nk"] + pr["nq"]}.get(name, 1)


def _assert_equal(pr: dict, got: tuple, want: tuple, spec: StatsSpec, what: str, exact: bool = False) -> None:
    """Merged ``(out, stats)`` equals ``want`` in every field of ``spec``; dtypes kept; argmax exactly."""
    (out, stats), (want_out, want_stats) = got, want
    assert out.dtype == want_out.dtype, what
    if spec.argmax:
        assert torch.equal(stats.argmax, want_stats.argmax), f"{what}: argmax"
    for name in ("out", *spec.output_fields()):
        a, b = (out, want_out) if name == "out" else (getattr(stats, name), getattr(want_stats, name))
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name} {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        tol = 0.0 if exact else _tolerance(pr, name)
        torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=lambda m, name=name: f"{what}: {name}: {m}")


@seed(SEED)
@settings(max_examples=60, **_SETTINGS)
@given(pr=problems())
def test_merge_of_parts_equals_attention_over_all_keys(pr):
    """Contiguous parts (some empty, with key and query padding, both masks, GQA) merge into
    attention over all keys, for every statistic, in either order of the parts."""
    q, k, v = _tensors(pr)
    spec = _spec(pr)
    whole = attention(
        q,
        k,
        v,
        causal=pr["causal"],
        stats=spec,
        backend="reference",
        key_lengths=_lengths(pr, "key_lengths"),
        query_lengths=_lengths(pr, "query_lengths"),
    )
    parts = _parts(pr, q, k, v, spec)
    merged = merge_attention([(o, s) for _, o, s in parts], spec, key_offsets=[lo for lo, _, _ in parts])
    _assert_equal(pr, merged, whole, spec, f"parts {pr['bounds']}")
    reverse = parts[::-1]
    merged = merge_attention([(o, s) for _, o, s in reverse], spec, key_offsets=[lo for lo, _, _ in reverse])
    _assert_equal(pr, merged, whole, spec, f"parts {pr['bounds']} reversed")


@seed(SEED)
@settings(max_examples=25, **_SETTINGS)
@given(pr=problems())
def test_merging_a_part_with_itself_adds_ln2(pr):
    """The same keys twice: lse and entropy grow by ln 2 (rows with keys), max_prob halves,
    output, masses, distance, argmax and key mass stay."""
    q, k, v = _tensors(pr)
    spec = _spec(pr)
    out, one = attention(
        q,
        k,
        v,
        causal=pr["causal"],
        stats=part_spec(spec, 0),
        backend="reference",
        key_lengths=_lengths(pr, "key_lengths"),
        query_lengths=_lengths(pr, "query_lengths"),
    )
    twice_out, twice = merge_attention([(out, one), (out, one)], spec)
    has_keys = (one.argmax >= 0).to(one.lse.dtype)
    want = {name: getattr(one, name) for name in spec.output_fields()}
    want.update(
        lse=one.lse + has_keys * math.log(2), entropy=one.entropy + has_keys * math.log(2), max_prob=one.max_prob / 2
    )
    _assert_equal(pr, (twice_out, twice), (out, AttentionStats(**want)), spec, "merged with itself")


@seed(SEED)
@settings(max_examples=25, **_SETTINGS)
@given(pr=problems())
def test_duplicated_keys_merge_like_attention_over_them(pr):
    """Non-causal attention over ``[k, k]`` equals the merge of two copies of attention over k
    at key offsets 0 and Nk (in either order): ties between the copies go to the first copy."""
    pr = {**pr, "causal": False, "key_lengths": None}
    q, k, v = _tensors(pr)
    spec = StatsSpec(entropy=True, max_prob=True, argmax=True, key_mass=pr["nq"] == 1)
    qlen = _lengths(pr, "query_lengths")
    one = attention(q, k, v, causal=False, stats=spec, backend="reference", query_lengths=qlen)
    both = attention(
        q, torch.cat([k, k], 2), torch.cat([v, v], 2), causal=False, stats=spec, backend="reference", query_lengths=qlen
    )
    nk = pr["nk"]
    _assert_equal(pr, merge_attention([one, one], spec, key_offsets=[0, nk]), both, spec, "copies")
    _assert_equal(pr, merge_attention([one, one], spec, key_offsets=[nk, 0]), both, spec, "copies reversed")


@seed(SEED)
@settings(max_examples=25, **_SETTINGS)
@given(pr=problems())
def test_an_empty_part_changes_nothing(pr):
    """A part without keys (none at all, or all padding) carries no weight: merged in, the result
    is exactly the other part's; so is a merge of that part alone."""
    q, k, v = _tensors(pr)
    spec = _spec(pr)
    qlen = _lengths(pr, "query_lengths")
    out = attention(
        q,
        k,
        v,
        causal=pr["causal"],
        stats=part_spec(spec, 0),
        backend="reference",
        key_lengths=_lengths(pr, "key_lengths"),
        query_lengths=qlen,
    )
    nk = pr["nk"]
    no_keys = attention(
        q,
        k[:, :, nk:],
        v[:, :, nk:],
        causal=pr["causal"],
        stats=part_spec(spec, nk),
        backend="reference",
        query_lengths=qlen,
    )
    padding = attention(
        q,
        k,
        v,
        causal=pr["causal"],
        stats=part_spec(spec, nk),
        backend="reference",
        key_lengths=torch.zeros(pr["b"], dtype=torch.long),
        query_lengths=qlen,
    )
    want = (out[0], AttentionStats(**{name: getattr(out[1], name) for name in spec.output_fields()}))
    for parts, offsets in (([out], [0]), ([out, no_keys], [0, nk]), ([padding, out], [0, 0])):
        _assert_equal(pr, merge_attention(parts, spec, key_offsets=offsets), want, spec, f"{len(parts)} parts", True)


@seed(SEED)
@settings(max_examples=60, **_SETTINGS)
@given(pr=problems(), offsets=st.lists(st.integers(0, 45), min_size=1, max_size=3))
def test_decoding_row_over_parts_of_its_keys_alone_merges_into_attention(pr, offsets):
    """A decoding row (the last of ``Nk`` positions) attended by ``attend_part`` to each
    contiguous part of its keys, every part given only its own keys, merges into attention over
    all keys: the window, offsets, distance and sinks move with the gap between a part's last
    key and the row. Windows, offsets and sinks range over parts they miss, cut and cover."""
    pr = {**pr, "nq": 1, "causal": True, "key_lengths": None, "query_lengths": None}
    q, k, v = _tensors(pr)
    spec = replace(_spec(pr), offsets=tuple(offsets))
    whole = attention(q, k, v, causal=True, stats=spec, backend="reference")
    position = pr["nk"] - 1
    bounds = pr["bounds"]
    parts = [
        attend_part(
            q, k[:, :, lo:hi], v[:, :, lo:hi], spec=spec, first_key=lo, query_position=position, backend="reference"
        )
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    merged = merge_attention(parts, spec, key_offsets=bounds[:-1])
    _assert_equal(pr, merged, whole, spec, f"parts {bounds}")


def test_attend_part_refuses_keys_after_the_row_and_several_rows():
    q, k = torch.randn(1, 2, 1, 4), torch.randn(1, 1, 5, 4)
    spec = StatsSpec(entropy=True)
    with pytest.raises(AttentionInputError, match=r"keys \[3, 8\) must all lie at or before the row's position 6"):
        attend_part(q, k, k, spec=spec, first_key=3, query_position=6)
    with pytest.raises(AttentionInputError, match="one decoding row"):
        attend_part(q.expand(1, 2, 2, 4), k, k, spec=spec, first_key=0, query_position=9)
    with pytest.raises(AttentionInputError, match="query_position must be an int >= 0"):
        attend_part(q, k, k, spec=spec, first_key=0, query_position=-1)


def test_argmax_ties_between_parts_go_to_the_lowest_global_index():
    """Equal largest scores in two parts: the earlier key wins whatever the order of the parts;
    without the tie, the part with the larger score wins."""
    spec = StatsSpec(max_prob=True, argmax=True)
    q = torch.ones(1, 1, 1, 4)
    k = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).view(1, 1, 3, 4)  # best key: 1
    v = torch.randn(1, 1, 3, 4)
    part = attention(q, k, v, causal=False, stats=spec, backend="reference")
    assert part[1].argmax.item() == 1
    for offsets in ([0, 3], [3, 0], [7, 3]):
        merged = merge_attention([part, part], spec, key_offsets=offsets)
        assert merged[1].argmax.item() == 1 + min(offsets), offsets
    weaker = attention(q, k * 0.5, v, causal=False, stats=spec, backend="reference")
    assert merge_attention([weaker, part], spec, key_offsets=[0, 10])[1].argmax.item() == 11


def _pair(nq: int = 2, spec: StatsSpec | None = None, nk: int = 5):
    spec = spec or StatsSpec(entropy=True, max_prob=True, argmax=True, key_mass=True)
    q, k, v = torch.randn(1, 2, nq, 4), torch.randn(1, 1, nk, 4), torch.randn(1, 1, nk, 4)
    return attention(q, k, v, causal=False, stats=spec, backend="reference")


def _bad_inputs():
    """``(parts, spec, key_offsets, words of the message)`` of calls merge_attention refuses."""
    spec = StatsSpec(entropy=True, max_prob=True, argmax=True)
    out, stats = _pair(spec=spec)
    short = (
        out[:, :, :1],
        AttentionStats(
            lse=stats.lse[:, :, :1],
            entropy=stats.entropy[:, :, :1],
            max_prob=stats.max_prob[:, :, :1],
            argmax=stats.argmax[:, :, :1],
        ),
    )
    no_entropy = (out, AttentionStats(lse=stats.lse, max_prob=stats.max_prob, argmax=stats.argmax))
    no_max_prob = (out, AttentionStats(lse=stats.lse, entropy=stats.entropy, argmax=stats.argmax))
    wrong_lse = (
        out,
        AttentionStats(lse=stats.lse[..., None], entropy=stats.entropy, max_prob=stats.max_prob, argmax=stats.argmax),
    )
    return [
        ([], spec, None, "at least one"),
        ([(out, stats), short], spec, None, "share one shape"),
        ([(out, stats), (out.double(), stats)], spec, None, "share one shape, dtype"),
        ([(out, stats), no_entropy], spec, None, "lacks entropy"),
        ([no_max_prob], spec, None, "no max_prob"),
        ([wrong_lse], spec, None, "lse has shape"),
        ([(out, stats), (out, stats)], spec, [0], "2 parts"),
        ([(out, stats)], spec, [-1], "key_offsets must be ints >= 0"),
        ([(out, stats), out], spec, None, "part 1 must be an (out, AttentionStats) pair"),
        ([(out, stats)], "entropy", None, "spec must be a kernels.StatsSpec"),
        ([_pair(nq=3)], StatsSpec(max_prob=True, key_mass=True), None, "key_mass merges only for one query row"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_is_refused_with_a_clear_error(case):
    parts, spec, offsets, words = _bad_inputs()[case]
    with pytest.raises(AttentionInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        merge_attention(parts, spec, key_offsets=offsets)


def test_part_spec_holds_the_sink_keys_of_the_part_and_max_prob():
    spec = StatsSpec(argmax=True, sink_tokens=4, window=8)
    assert part_spec(spec, 0) == StatsSpec(argmax=True, max_prob=True, sink_tokens=4, window=8)
    assert part_spec(spec, 3).sink_tokens == 1 and part_spec(spec, 4).sink_tokens == 0
    assert part_spec(spec, 9).sink_tokens == 0
    with pytest.raises(AttentionInputError, match="first_key"):
        part_spec(spec, -1)


def test_a_learned_sink_given_to_one_part_merges_exactly():
    """Keys split into two parts, the learned sinks given to the first only: the merge equals one
    call over all keys with the sinks (learned_sink_mass, lse and entropy count the sink once)."""
    gen = torch.Generator().manual_seed(SEED)
    q, k, v = (
        torch.randn(1, 4, 1, 8, generator=gen),
        torch.randn(1, 2, 9, 8, generator=gen),
        torch.randn(1, 2, 9, 8, generator=gen),
    )
    sinks = torch.randn(4, generator=gen, dtype=torch.float64).float() * 2
    spec = StatsSpec(entropy=True, max_prob=True, argmax=True, sink_tokens=2, learned_sink=True)
    whole = attention(q, k, v, stats=spec, sinks=sinks, backend="reference")
    first = attention(
        q, k[:, :, :5], v[:, :, :5], stats=part_spec(spec, 0), sinks=sinks, backend="reference", causal=False
    )
    rest = attention(q, k[:, :, 5:], v[:, :, 5:], stats=part_spec(spec, 5), backend="reference", causal=False)
    out, st = merge_attention([first, rest], spec, key_offsets=[0, 5])
    torch.testing.assert_close(out, whole[0], atol=1e-6, rtol=1e-5)
    for name in spec.output_fields():
        torch.testing.assert_close(getattr(st, name), getattr(whole[1], name), atol=1e-6, rtol=1e-5, msg=name)
    assert float(st.learned_sink_mass.min()) > 0.01
