"""StreamingLLM-style attention in ``kernels.attention`` (issue 20 part 4, issue 21 part 1):
``window`` plus ``keep_first`` (the first keys stay visible) and ``window_heads`` (the heads the
window restricts), on both backends (Triton through its interpreter without a GPU), against the
float64 oracle of ``tests.kernels.oracle.expected`` given the explicit boolean mask
``i - j < W or j < S`` (per head) on random problems drawn from ``tests.conftest.SEED``: causal
prefill and decoding (``Nq < Nk``, packed rows with split keys), GQA, key and query padding,
every statistic. Then edge cases, the block skipping (keys the kernels must not read hold NaN),
split decoding against one pass, the other variants together, and refusals."""

from __future__ import annotations

import random

import pytest
import torch

from kernels import AttentionInputError, AttentionStats, StatsSpec, attention
from tests.conftest import SEED
from tests.kernels.oracle import expected, validity

SPEC = StatsSpec.all(sink_tokens=3, window=5, offsets=(0, 1, 7))
BACKENDS = ("reference", "triton", "cpu")


def streaming_mask(nq: int, nk: int, hq: int, window: int, keep_first: int, heads) -> torch.Tensor:
    """Boolean ``[1, Hq, Nq, Nk]``: what the streaming restriction leaves visible (bottom-right
    aligned queries; causality and padding are the oracle's)."""
    qpos = torch.arange(nq).view(nq, 1) + (nk - nq)
    kpos = torch.arange(nk).view(1, nk)
    inside = ((qpos - kpos) < window) | (kpos < keep_first)  # [Nq, Nk]
    on = torch.ones(hq, dtype=torch.bool) if heads is None else heads.cpu()
    return (inside | ~on.view(hq, 1, 1)).unsqueeze(0)


#: Key counts of the random cases on GPUs, and under the Triton interpreter (16-key blocks; each
#: program costs milliseconds there): one key, less than a block, a block and part of another, two
#: blocks and a key, three blocks and part of a fourth (room for a skipped block between the kept
#: keys and a window).
KEY_COUNTS = {"gpu": (1, 7, 33, 70, 100), "interpreter": (1, 7, 20, 33, 50)}


def draw_case(rng: random.Random) -> dict:
    from kernels.triton_attention import interpreting

    b, hkv, group = rng.choice((1, 2)), rng.choice((1, 2)), rng.choice((1, 2, 4))
    nk = rng.choice(KEY_COUNTS["interpreter" if interpreting() else "gpu"])
    kind = rng.choice(("square", "square", "decode", "chunk"))
    nq = {"square": nk, "decode": rng.randint(1, min(nk, 4)), "chunk": rng.randint(1, nk)}[kind]
    hq = hkv * group
    heads = rng.choice(("all", "mixed", "none"))
    return dict(
        b=b,
        hq=hq,
        hkv=hkv,
        nq=nq,
        nk=nk,
        causal=rng.random() < 0.8,
        window=rng.choice((1, 3, 16, 40, 500)),
        keep_first=rng.choice((0, 1, 4, 20, 500)),
        heads=None if heads == "all" else [rng.random() < 0.5 for _ in range(hq)] if heads == "mixed" else [False] * hq,
        key_lengths=[rng.randint(0, nk) for _ in range(b)] if rng.random() < 0.3 else None,
        query_lengths=[rng.randint(0, nq) for _ in range(b)] if rng.random() < 0.2 else None,
        seed=rng.randrange(2**31),
    )


CASES = [draw_case(random.Random(SEED * 7919 + i)) for i in range(48)]


def tensors(c: dict) -> dict:
    gen = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["b"], c["hq"], c["nq"], 16, generator=gen) * 1.5
    k = torch.randn(c["b"], c["hkv"], c["nk"], 16, generator=gen) * 1.5
    v = torch.randn(c["b"], c["hkv"], c["nk"], 16, generator=gen)
    t = dict(q=q, k=k, v=v)
    for name in ("key_lengths", "query_lengths"):
        t[name] = torch.tensor(c[name]) if c[name] is not None else None
    return t


def assert_matches(out, st: AttentionStats, want: dict, nq: int, nk: int, atol: float, what) -> None:
    """Output and every statistic against the oracle's (argmax by the probability it picks)."""
    torch.testing.assert_close(out.cpu().double(), want["out"], rtol=0, atol=atol, msg=lambda m: f"{what}: out: {m}")
    for name, x in st.items():
        x = x.cpu()
        if name == "argmax":
            picked = want["prob"].gather(-1, x.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(torch.where(x >= 0, picked, 0.0), want["max_prob"], rtol=0, atol=atol)
            assert torch.equal(x >= 0, want["argmax"] >= 0), f"{what}: rows with keys"
            continue
        tol = atol * {"distance": nk, "key_mass": nq, "lse": 4, "entropy": 4}.get(name, 1)
        torch.testing.assert_close(
            x.double(), want[name].double(), rtol=0, atol=tol, msg=lambda m, name=name: f"{what}: {name}: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_streaming_attention_equals_the_explicit_mask(index, backend, device):
    c = CASES[index]
    t = tensors(c)
    heads = torch.tensor(c["heads"]) if c["heads"] is not None else None
    mask = streaming_mask(c["nq"], c["nk"], c["hq"], c["window"], c["keep_first"], heads)
    want = expected(
        t["q"], t["k"], t["v"], causal=c["causal"], spec=SPEC, key_lengths=t["key_lengths"],
        query_lengths=t["query_lengths"], mask=mask,
    )  # fmt: skip
    run_on = device if backend == "triton" else "cpu"
    moved = {n: x.to(run_on) if x is not None else None for n, x in t.items()}
    out, st = attention(
        **moved,
        causal=c["causal"],
        window=c["window"],
        keep_first=c["keep_first"],
        window_heads=heads.to(run_on) if heads is not None else None,
        stats=SPEC,
        backend=backend,
        **({"chunk_size": 1 + index % 7} if backend == "cpu" else {}),  # several chunks: window starts move
    )
    assert_matches(out, st, want, c["nq"], c["nk"], 5e-5, c)


def test_the_cases_cover_the_edges():
    """Kept keys none, some and all; windows narrower and wider than the keys; heads all, mixed
    and none; decoding shapes; padding."""
    assert {0, 500} <= {c["keep_first"] for c in CASES} and {1, 500} <= {c["window"] for c in CASES}
    assert any(c["heads"] is None for c in CASES) and any(c["heads"] and any(c["heads"]) for c in CASES)
    assert any(c["heads"] is not None and not any(c["heads"]) for c in CASES)
    assert any(c["nq"] < c["nk"] and c["nq"] <= 4 for c in CASES) and any(c["key_lengths"] for c in CASES)
    assert any(c["heads"] and any(c["heads"]) and not all(c["heads"]) and c["nq"] <= 4 < c["nk"] for c in CASES)


def _qkv(b, hq, hkv, nq, nk, d=16, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(SEED + seed)
    q = torch.randn(b, hq, nq, d, generator=gen) * 1.5
    k = torch.randn(b, hkv, nk, d, generator=gen) * 1.5
    v = torch.randn(b, hkv, nk, d, generator=gen)
    return q.to(device), k.to(device), v.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_settings_reduce_to_known_attention(backend, device):
    """S = 0 is the window alone; S >= N and W >= N are full causal attention; heads all False
    is full attention, all True is the window on every head."""
    dev = device if backend == "triton" else "cpu"
    q, k, v = _qkv(1, 4, 2, 40, 40, seed=1, device=dev)
    spec = StatsSpec(entropy=True, argmax=True, sink_tokens=2, key_mass=True)

    def run(**kw):
        return attention(q, k, v, stats=spec, backend=backend, **kw)

    def same(a, b):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
        for name, x in a[1].items():
            torch.testing.assert_close(x, getattr(b[1], name), rtol=0, atol=1e-5, msg=name)

    full, win = run(), run(window=8)
    same(run(window=8, keep_first=0), win)
    same(run(window=8, keep_first=40), full)
    same(run(window=8, keep_first=1000), full)
    same(run(window=40, keep_first=3), full)
    same(run(window=8, keep_first=3, window_heads=torch.zeros(4, dtype=torch.bool, device=dev)), full)
    same(run(window=8, keep_first=0, window_heads=torch.ones(4, dtype=torch.bool, device=dev)), win)
    kept = run(window=8, keep_first=3)
    assert float((kept[1].entropy - win[1].entropy).abs().max()) > 1e-3, "keeping keys changes the rows"


def _interpreting() -> bool:
    from kernels.triton_attention import interpreting

    return interpreting()


@pytest.mark.parametrize("nq", [3, 40])  # packed decoding rows (split keys), and blocks of query rows
@pytest.mark.parametrize("causal", [True, False])
def test_the_blocks_between_the_kept_keys_and_the_window_are_skipped(nq, causal, device):
    """Keys after the kept blocks and before the window's first block (16 under the interpreter,
    256 on GPUs: the split alignment) hold NaN: any read would spread it, so a finite result
    equal to the definition shows that the forward, statistics and key-mass passes skip them."""
    nk, window, keep, align = (160, 32, 5, 16) if _interpreting() else (1500, 32, 5, 256)
    first_nan, last_nan = align, (nk - nq - window + 1) // align * align
    assert last_nan - first_nan >= 2 * align
    q, k, v = _qkv(1, 4, 2, nq, nk, d=32, seed=2)
    mask = streaming_mask(nq, nk, 4, window, keep, None)
    want = expected(q, k, v, causal=causal, spec=SPEC, mask=mask)
    k[:, :, first_nan:last_nan] = float("nan")
    v[:, :, first_nan:last_nan] = float("nan")
    out, st = attention(
        q.to(device), k.to(device), v.to(device), causal=causal, window=window, keep_first=keep, stats=SPEC,
        backend="triton",
    )  # fmt: skip
    assert bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(x).all()) for _, x in st.items())
    assert_matches(out, st, want, nq, nk, 5e-5, f"nq={nq} causal={causal}")
    assert float(st.key_mass[..., first_nan:last_nan].abs().max()) == 0
    assert float(st.key_mass[..., :keep].min()) > 0


@pytest.mark.parametrize("heads", [None, "mixed"])
def test_split_decoding_with_kept_keys_equals_one_pass(heads, device):
    """Packed decoding rows with keys split across programs (split 0 also takes the kept keys
    before the window's splits; with mixed heads the splits cover every key) merge to one pass
    over the keys, and to the definition."""
    from kernels.triton_attention import key_splits, packed_rows, triton_attention, window_start
    from kernels.validate import check_inputs

    nk = 160 if _interpreting() else 3000
    q, k, v = _qkv(1, 8, 2, 3, nk, d=32, seed=3, device=device)
    klen = torch.tensor([nk - 5], device=device)
    sel = torch.tensor([True, False, True, True, False, False, True, True], device=device) if heads else None
    kw = dict(causal=True, window=24, keep_first=4, window_heads=sel)
    p = check_inputs(q, k, v, scale=None, stats=SPEC, key_lengths=klen, query_lengths=None, **kw)
    assert packed_rows(p) == 12 and window_start(p, q.device) > 0
    assert key_splits(2, nk, q.device)[0] > 1
    split_out, split_st = triton_attention(q, k, v, p, SPEC, klen, window_heads=sel)
    one_out, one_st = triton_attention(q, k, v, p, SPEC, klen, max_splits=1, window_heads=sel)
    torch.testing.assert_close(split_out, one_out, rtol=0, atol=2e-5)
    for name, got in split_st.items():
        if name == "argmax":
            assert torch.equal(got, getattr(one_st, name))
        else:
            torch.testing.assert_close(
                got, getattr(one_st, name), rtol=0, atol=2e-5 * (nk if name == "distance" else 3)
            )
    cpu = [t.cpu() for t in (q, k, v)]
    want = expected(*cpu, causal=True, spec=SPEC, key_lengths=klen.cpu(), mask=streaming_mask(3, nk, 8, 24, 4, sel))
    assert_matches(split_out, split_st, want, 3, nk, 5e-5, f"heads={heads}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", [3, 30])
def test_kept_keys_with_the_other_variants(nq, backend, device):
    """keep_first and window_heads with soft-capping, ALiBi and learned sinks: equal to the
    reference backend given the same variants and the streaming restriction as an explicit mask
    (no window)."""
    dev = device if backend == "triton" else "cpu"
    hq = 4
    q, k, v = _qkv(2, hq, 2, nq, 50, seed=4)
    gen = torch.Generator().manual_seed(SEED + 5)
    sel = torch.tensor([True, False, True, True])
    variants = dict(
        softcap=5.0,
        alibi_slopes=torch.tensor([2.0 ** -(h + 3) for h in range(hq)]),
        sinks=torch.randn(hq, generator=gen),
    )
    spec = StatsSpec(**{**SPEC.__dict__, "learned_sink": True})
    klen = torch.tensor([50, 37])
    want_out, want = attention(
        q.double(), k.double(), v.double(), stats=spec, backend="reference", key_lengths=klen,
        mask=streaming_mask(nq, 50, hq, 9, 3, sel), **{n: x.double() if isinstance(x, torch.Tensor) else x
                                                      for n, x in variants.items()},
    )  # fmt: skip
    moved = {n: x.to(dev) if isinstance(x, torch.Tensor) else x for n, x in variants.items()}
    out, st = attention(
        q.to(dev), k.to(dev), v.to(dev), stats=spec, backend=backend, key_lengths=klen.to(dev), window=9,
        keep_first=3, window_heads=sel.to(dev), **moved,
    )  # fmt: skip
    torch.testing.assert_close(out.cpu().double(), want_out, rtol=0, atol=5e-5)
    for name, x in st.items():
        if name == "argmax":
            assert float((x.cpu() == getattr(want, name)).double().mean()) > 0.99
            continue
        tol = 5e-5 * {"distance": 50, "key_mass": nq}.get(name, 1)
        torch.testing.assert_close(x.cpu().double(), getattr(want, name), rtol=0, atol=tol, msg=name)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(window=4, keep_first=-1), "keep_first must be an int >= 0"),
        (dict(window=4, keep_first=1.5), "keep_first must be an int >= 0"),
        (dict(window=4, keep_first=True), "keep_first must be an int >= 0"),
        (dict(keep_first=4), "pass window= as well"),
        (dict(window=0, keep_first=4), "window must be an int >= 1"),
        (
            dict(window=4, window_heads=torch.ones(3, dtype=torch.bool)),
            r"window_heads must be a boolean tensor of shape \[2\]",
        ),
        (dict(window=4, window_heads=torch.ones(2)), "window_heads must be a boolean tensor"),
        (dict(window=4, window_heads=torch.ones(1, 2, dtype=torch.bool)), "window_heads must be a boolean tensor"),
        (dict(window=4, window_heads=[True, False]), "window_heads must be a boolean tensor"),
        (dict(window_heads=torch.ones(2, dtype=torch.bool)), "pass window= as well"),
        (dict(window=4, window_heads=torch.ones(2, dtype=torch.bool, device="meta")), "window_heads is on meta"),
    ],
)
def test_bad_streaming_settings_are_refused(kwargs, words):
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(AttentionInputError, match=words):
        attention(q, q, q, backend="reference", **kwargs)


def test_validity_helper_agrees_with_the_oracle():
    """The test's own mask with W, S >= N is all True (the oracle then adds causality alone)."""
    assert bool(streaming_mask(5, 9, 2, 9, 0, None).all()) and bool(streaming_mask(5, 9, 2, 1, 9, None).all())
    assert torch.equal(streaming_mask(4, 4, 1, 1, 0, None)[0, 0] & validity(1, 1, 4, 4, True)[0, 0], torch.eye(4) > 0)
