"""Attention variants of ``kernels.attention`` (issue 22): sliding window, logit soft-capping,
learned sinks (gpt-oss) and ALiBi, each alone and together, against the float64 definition of
``tests.kernels.oracle.expected_variant`` on random problems of many shapes (GQA, decoding and
prefill, key and query padding, causal or not), drawn from ``tests.conftest.SEED``, on both
backends (Triton through its interpreter without a GPU). Then the Triton paths one by one: packed
decoding with split keys (the learned sink counted once by the merge), and sliding windows that
skip whole key blocks (keys before the window hold NaN, which any read would spread)."""

from __future__ import annotations

import random

import pytest
import torch

from kernels import AttentionInputError, AttentionStats, StatsSpec, attention
from tests.conftest import SEED
from tests.kernels.oracle import expected_variant

SPEC = StatsSpec.all(sink_tokens=2, window=5, offsets=(0, 1, 3))
SPEC_SINK = StatsSpec(**{**SPEC.__dict__, "learned_sink": True})
BACKENDS = ("reference", "triton", "cpu")


def draw_case(rng: random.Random) -> dict:
    """One random problem with a random subset of the variants (``seed`` for its tensors)."""
    b, hkv, group = rng.choice((1, 2)), rng.choice((1, 2)), rng.choice((1, 2, 3))
    nq = rng.choice((1, 2, 5, 17, 24))
    causal = rng.random() < 0.7
    nk = nq + rng.choice((0, 0, 3, 30)) if causal else rng.choice((1, 9, 33))
    hq = hkv * group
    key_lengths = [rng.randint(0, nk) for _ in range(b)] if rng.random() < 0.25 else None
    query_lengths = [rng.randint(0, nq) for _ in range(b)] if rng.random() < 0.25 else None
    return dict(
        b=b,
        hq=hq,
        hkv=hkv,
        nq=nq,
        nk=nk,
        d=rng.choice((16, 32)),  # the Triton kernels take D >= 16
        causal=causal,
        window=rng.choice((None, 1, 3, 16)),
        softcap=rng.choice((None, 2.0, 30.0)),
        sinks=rng.random() < 0.5,
        alibi=rng.random() < 0.4,
        key_lengths=key_lengths,
        query_lengths=query_lengths,
        dtype=rng.choice(("float64", "float32")),
        chunk=rng.choice((None, 3)),
        seed=rng.randrange(2**31),
        scale=rng.choice((None, None, 0.5, -0.4)),  # Triton negates q for a negative scale
    )


def case_tensors(c: dict) -> dict:
    """The tensors and keyword arguments of a case (the same for every backend)."""
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = getattr(torch, c["dtype"])
    q = torch.randn(c["b"], c["hq"], c["nq"], c["d"], generator=gen, dtype=dtype) * 1.5
    k = torch.randn(c["b"], c["hkv"], c["nk"], c["d"], generator=gen, dtype=dtype) * 1.5
    v = torch.randn(c["b"], c["hkv"], c["nk"], c["d"], generator=gen, dtype=dtype)
    kwargs = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"], scale=c.get("scale"))
    if c["sinks"]:
        kwargs["sinks"] = torch.randn(c["hq"], generator=gen, dtype=dtype) * 2
    if c["alibi"]:
        kwargs["alibi_slopes"] = torch.tensor([2.0 ** -(h + 1) for h in range(c["hq"])], dtype=dtype)
    for name in ("key_lengths", "query_lengths"):
        if c[name] is not None:
            kwargs[name] = torch.tensor(c[name])
    return dict(q=q, k=k, v=v, **kwargs)


CASES = [draw_case(random.Random(SEED * 1000 + i)) for i in range(80)]


def on_device(t: dict, device: str) -> dict:
    """The tensors of ``t`` moved to ``device`` (other values as they are)."""
    return {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in t.items()}


def check_against_definition(c: dict, backend: str, device: str = "cpu") -> None:
    """Output and every statistic of one case equal the float64 definition (float64 cases run in
    float32 on Triton, which has no float64 kernels; Triton runs on ``device``)."""
    if backend == "triton" and c["dtype"] == "float64":
        c = {**c, "dtype": "float32"}
    t = case_tensors(c)
    extra = dict(chunk_size=c["chunk"]) if backend in ("reference", "cpu") and c["chunk"] else {}
    run_on = device if backend == "triton" else "cpu"
    out, st = attention(stats=SPEC_SINK, backend=backend, **on_device(t, run_on), **extra)
    out, st = out.cpu(), AttentionStats(**{name: x.cpu() for name, x in st.items()})
    want = expected_variant(**{k: t[k] for k in t if k not in ("causal",)}, causal=c["causal"], spec=SPEC_SINK)
    f64 = c["dtype"] == "float64"
    for name in ("out", *SPEC_SINK.output_fields()):
        got = out if name == "out" else getattr(st, name)
        assert got is not None, name
        if name == "argmax":
            # ties cannot be told apart in float32: compare the probability at the chosen key
            picked = want["prob"].gather(-1, got.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(
                torch.where(got >= 0, picked, 0.0), want["max_prob"], rtol=0, atol=1e-12 if f64 else 1e-5
            )
            assert torch.equal(got >= 0, want["argmax"] >= 0), "rows with keys"
            continue
        tol = (
            (1e-10 if f64 else 2e-5)
            * {"distance": c["nk"], "key_mass": c["nq"]}.get(name, 1)
            * (4 if name in ("lse", "entropy") else 1)
        )
        torch.testing.assert_close(
            got.double(), want[name].double(), rtol=0, atol=tol, msg=lambda m, name=name: f"{c}: {name}: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_variants_equal_their_definition(index, backend, device):
    check_against_definition(CASES[index], backend, device)


#: A causal, windowed, padded case with several blocks of query rows (the random cases are short).
LONG_CASE = {**CASES[0], "nq": 40, "nk": 60, "window": 16, "query_lengths": [40, 23], "key_lengths": None}


@pytest.mark.parametrize("index", [*range(0, len(CASES), 8), "long"])
def test_key_mass_of_some_rows_with_every_variant(index, device):
    """Key mass of every stride-th of the last rows (``key_mass_queries``, ``key_mass_stride``):
    the Triton kernels against the reference backend, which the float64 oracle checks, with each
    case's variants and padding."""
    c = {**(LONG_CASE if index == "long" else CASES[index]), "dtype": "float32"}
    t = case_tensors(c)
    for last, stride in ((0, 2), (5, 3), (1, 1), (7, 16)):
        spec = StatsSpec(key_mass=True, key_mass_queries=last, key_mass_stride=stride)
        _, want = attention(stats=spec, backend="reference", **t)
        _, got = attention(stats=spec, backend="triton", **on_device(t, device))
        torch.testing.assert_close(got.key_mass.cpu(), want.key_mass, atol=2e-5 * c["nq"], rtol=0, msg=str(c))


def test_every_variant_is_drawn_alone_and_together():
    """The random cases cover each variant, with and without the others, causal and not."""
    for key in ("window", "softcap", "sinks", "alibi"):
        on = [c for c in CASES if c[key]]
        assert any(c["causal"] for c in on) and any(not c["causal"] for c in on), key
        assert any(sum(bool(c[k]) for k in ("window", "softcap", "sinks", "alibi")) == 1 for c in on), key
    assert any(all(c[k] for k in ("window", "softcap", "sinks", "alibi")) for c in CASES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_of_one_attends_to_the_query_itself(backend, device):
    q, k, v = (torch.randn(1, 2, 6, 16, device=device) for _ in range(3))
    out, st = attention(q, k, v, window=1, stats=StatsSpec(argmax=True, entropy=True), backend=backend)
    torch.testing.assert_close(out, v)
    assert torch.equal(st.argmax.cpu(), torch.arange(6).expand(1, 2, 6)) and float(st.entropy.abs().max()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_sinks_take_mass_from_the_keys(backend, device):
    """A very large sink takes (nearly) all of each row; keys then sum to 1 - learned_sink_mass."""
    q, k, v = (torch.randn(1, 2, 4, 16, device=device) for _ in range(3))
    spec = StatsSpec(learned_sink=True, sink_tokens=4, key_mass=True)
    sinks = torch.tensor([0.0, 50.0], device=device)
    _, st = attention(q, k, v, causal=False, sinks=sinks, stats=spec, backend=backend)
    torch.testing.assert_close(st.sink_mass + st.learned_sink_mass, torch.ones(1, 2, 4, device=device))
    assert float(st.learned_sink_mass[0, 1].min()) > 1 - 1e-6
    _, plain = attention(q, k, v, causal=False, stats=spec, backend=backend)
    assert float(plain.learned_sink_mass.abs().max()) == 0  # no sinks: 0


def _interpreting() -> bool:
    from kernels.triton_attention import interpreting

    return interpreting()


def _tensors(b, hq, hkv, nq, nk, d, device, dtype=torch.float32, seed=0) -> dict:
    """Random q, k, v and every variant (window left to the caller), on ``device``."""
    gen = torch.Generator().manual_seed(SEED + seed)
    q = torch.randn(b, hq, nq, d, generator=gen) * 1.5
    k = torch.randn(b, hkv, nk, d, generator=gen) * 1.5
    v = torch.randn(b, hkv, nk, d, generator=gen)
    per_head = dict(
        sinks=torch.randn(hq, generator=gen) * 2, alibi_slopes=torch.tensor([2.0 ** -(h + 3) for h in range(hq)])
    )
    t = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), softcap=20.0, **per_head)
    return on_device(t, device)


def _assert_stats_close(got_out, got: AttentionStats, want: dict, atol: float, name_scale: dict) -> None:
    """Output and statistics against ``want`` (oracle names), argmax by the probability it picks."""
    torch.testing.assert_close(got_out.cpu().double(), want["out"], rtol=0, atol=atol)
    for name, x in got.items():
        x = x.cpu()
        if name == "argmax":
            picked = want["prob"].gather(-1, x.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(torch.where(x >= 0, picked, 0.0), want["max_prob"], rtol=0, atol=atol)
            continue
        tol = atol * name_scale.get(name, 1)
        torch.testing.assert_close(x.double(), want[name], rtol=0, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal, window", [(True, None), (True, "wide"), (False, "wide")])
def test_split_decoding_counts_the_learned_sink_once(causal, window, device):
    """Decoding shapes (GQA, packed rows) split the keys, within the window only; merging the
    splits, which adds the learned sink once, gives one pass over the keys and the definition."""
    from kernels.triton_attention import key_splits, packed_rows, triton_attention, window_start
    from kernels.validate import check_inputs

    nk = 160 if _interpreting() else 3000  # a GPU splits only long rows
    window = {None: None, "wide": nk // 2}[window]
    t = _tensors(1, 8, 2, 3, nk, 32, device, seed=1)
    klen = torch.tensor([nk - 7], device=device)
    q, k, v, sinks, slopes = t.pop("q"), t.pop("k"), t.pop("v"), t.pop("sinks"), t.pop("alibi_slopes")
    kw = dict(causal=causal, window=window, softcap=t["softcap"], sinks=sinks, alibi_slopes=slopes)
    p = check_inputs(q, k, v, scale=None, stats=SPEC_SINK, key_lengths=klen, query_lengths=None, **kw)
    assert packed_rows(p) == 12
    base = window_start(p, q.device)
    assert (base > 0) == (window is not None)
    assert key_splits(2, nk - base, q.device)[0] > 1
    per_head = dict(sinks=sinks, alibi_slopes=slopes)
    split_out, split_st = triton_attention(q, k, v, p, SPEC_SINK, klen, **per_head)
    one_out, one_st = triton_attention(q, k, v, p, SPEC_SINK, klen, max_splits=1, **per_head)
    torch.testing.assert_close(split_out, one_out, rtol=0, atol=2e-5)
    for name, got in split_st.items():
        want = getattr(one_st, name)
        if name == "argmax":
            assert torch.equal(got, want)
        else:
            scale = {"distance": nk, "key_mass": 3}.get(name, 1)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * scale, msg=name)
    cpu = on_device(dict(q=q, k=k, v=v, key_lengths=klen, **kw), "cpu")
    want = expected_variant(**cpu, spec=SPEC_SINK)
    _assert_stats_close(split_out, split_st, want, 5e-5, {"distance": nk, "key_mass": 3, "lse": 4, "entropy": 4})
    assert float(split_st.learned_sink_mass.min()) > 0


@pytest.mark.parametrize("nq", [3, 40])  # packed decoding rows, and blocks of query rows
@pytest.mark.parametrize("causal", [True, False])
def test_windows_skip_the_key_blocks_before_them(nq, causal, device):
    """Keys before the window's first block hold NaN (up to a multiple of every block size: 16
    under the interpreter, 256 on GPUs): any read of them would spread NaN into the output, so a
    finite result equal to the definition shows that the kernels skip those blocks (forward,
    statistics and key-mass passes)."""
    nk, window, align = (120, 32, 16) if _interpreting() else (1100, 32, 256)
    poisoned = (nk - nq - window + 1) // align * align
    assert poisoned >= 3 * align if nq == 3 else poisoned >= align
    t = _tensors(1, 4, 2, nq, nk, 32, "cpu", seed=2)
    want = expected_variant(**t, causal=causal, window=window, spec=SPEC_SINK)
    for name in ("k", "v"):
        t[name][:, :, :poisoned] = float("nan")
    out, st = attention(**on_device(t, device), causal=causal, window=window, stats=SPEC_SINK, backend="triton")
    assert bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(x).all()) for _, x in st.items())
    _assert_stats_close(out, st, want, 5e-5, {"distance": window, "key_mass": nq, "lse": 4, "entropy": 4})
    assert float(st.key_mass[..., :poisoned].abs().max()) == 0


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("nq", [3, 20])
def test_half_precision_variants_match_the_reference(nq, dtype, atol, device):
    """bfloat16 / float16 inputs with every variant: the Triton kernels against the reference
    backend on the same inputs (statistics come from float32 scores on both)."""
    t = _tensors(2, 4, 2, nq, 64, 32, device, dtype=dtype, seed=3)
    kw = dict(causal=True, window=24, stats=SPEC_SINK, key_lengths=torch.tensor([64, 41], device=device))
    out, st = attention(**t, **kw, backend="triton")
    ref_out, ref = attention(**on_device(t, "cpu"), **on_device(kw, "cpu"), backend="reference")
    torch.testing.assert_close(out.cpu().double(), ref_out.double(), rtol=0, atol=atol)
    for name, x in st.items():
        want = getattr(ref, name)
        if name == "argmax":
            assert float((x.cpu() == want).double().mean()) > 0.9, "argmax mostly agrees (ties aside)"
            continue
        tol = 2e-3 * {"distance": 24, "key_mass": nq}.get(name, 1)
        torch.testing.assert_close(x.cpu().double(), want.double(), rtol=0, atol=tol, msg=name)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(window=0), "window must be an int >= 1"),
        (dict(window=2.5), "window must be an int >= 1"),
        (dict(softcap=0.0), "softcap must be a finite number > 0"),
        (dict(softcap=float("inf")), "softcap must be a finite number > 0"),
        (dict(sinks=torch.zeros(3)), r"sinks must be a float tensor of shape \[2\]"),
        (dict(sinks=torch.zeros(2, dtype=torch.long)), "sinks must be a float tensor"),
        (dict(alibi_slopes=torch.tensor([1.0, float("nan")])), "alibi_slopes must be finite"),
    ],
)
def test_bad_variant_settings_are_refused(kwargs, words):
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(AttentionInputError, match=words):
        attention(q, q, q, backend="reference", **kwargs)
