"""Properties every result must have, SDPA agreement, and behaviour at the edges."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from kernels import StatsSpec, attention
from kernels.triton_attention import interpreting, key_splits
from kernels.validate import Problem
from tests.conftest import SEED
from tests.kernels.kernel_cases import Case, draw_case, max_keys_for
from tests.kernels.oracle import attention_matrix, expected
from tests.kernels.test_kernel_accuracy import check_against_oracle

BACKENDS = ("reference", "triton", "cpu")
SDPA_ATOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(40))
def test_bounds_sums_and_sdpa(backend, index, device):
    rng = random.Random(f"{SEED}-props-{backend}-{index}")
    case = draw_case(rng, device, max_keys=max_keys_for(backend))
    spec = StatsSpec.all(sink_tokens=rng.choice((1, 3)), window=rng.choice((1, 8, 64)))
    case.spec = spec
    out, st = attention(case.q, case.k, case.v, backend=backend, **case.kwargs())
    scores, valid, _ = attention_matrix(
        case.q.cpu(), case.k.cpu(), case.causal, case.scale, case.key_lengths, case.query_lengths
    )
    finite = scores[torch.isfinite(scores)]
    slack = 2e-6 * (finite.abs().max().item() if finite.numel() else 0.0)  # see test_kernel_accuracy
    n_valid = valid.sum(-1)  # [B, H, Nq] valid keys per row
    row_ok = n_valid > 0
    ent = st.entropy.cpu()
    assert torch.all(ent >= 0)
    assert torch.all(ent <= torch.log(n_valid.clamp_min(1).double()).float() + 1e-4 + slack)
    for name in ("max_prob", "sink_mass", "local_mass", "offset_mass"):
        t = getattr(st, name).cpu()
        assert torch.all((t >= 0) & (t <= 1)), name
    # Each valid row hands out exactly one unit of attention.
    km_total = st.key_mass.cpu().double().sum(-1)
    torch.testing.assert_close(km_total, row_ok.sum(-1).double(), rtol=0, atol=(1e-4 + slack) * case.q.shape[2] + 1e-5)
    assert torch.all(torch.isfinite(st.lse)) and torch.all(torch.isfinite(st.distance))
    # SDPA on the same mask (it returns NaN on rows with no valid key: compare the others).
    g = case.q.shape[1] // case.k.shape[1]
    ref = F.scaled_dot_product_attention(
        case.q.float().cpu(),
        case.k.float().cpu().repeat_interleave(g, 1),
        case.v.float().cpu().repeat_interleave(g, 1),
        attn_mask=valid,
        scale=case.scale,
    )
    vmax = max(case.v.abs().max().item(), 1.0)
    ok = row_ok.unsqueeze(-1).expand_as(ref)
    torch.testing.assert_close(out.cpu().float()[ok], ref[ok], rtol=0, atol=(SDPA_ATOL[case.q.dtype] + slack) * vmax)
    assert torch.all(out.cpu()[~ok] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_causal_square(backend, device):
    """Nq == Nk causal: both alignments agree, so SDPA's own is_causal is the reference."""
    gen = torch.Generator().manual_seed(SEED)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(2, 4, 53, 64, generator=gen).to(dtype).to(device) for _ in range(3))
        out, _ = attention(q, k, v, causal=True, backend=backend)
        ref = F.scaled_dot_product_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), is_causal=True)
        torch.testing.assert_close(out.cpu().float(), ref, rtol=0, atol=SDPA_ATOL[dtype] * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_rows_equal_prefill_rows(backend, device):
    """Bottom-right alignment: the last Nq queries against all keys are the last rows of prefill,
    so the key mass of those rows alone (``key_mass_queries=Nq``) is the key mass of the short call."""
    gen = torch.Generator().manual_seed(SEED + 1)
    q, k, v = (torch.randn(1, 2, 47, 32, generator=gen).to(device) for _ in range(3))
    spec = StatsSpec.all(sink_tokens=2, window=5, offsets=(1, 3))
    full_out, full = attention(q, k, v, stats=spec, backend=backend)
    for nq in (1, 5, 16, 47):
        out, st = attention(q[:, :, -nq:], k, v, stats=spec, backend=backend)
        torch.testing.assert_close(out, full_out[:, :, -nq:], atol=1e-5, rtol=0)
        for name, t in st.items():
            if name != "key_mass":
                torch.testing.assert_close(t, getattr(full, name)[:, :, -nq:], atol=1e-4, rtol=0, msg=name)
        _, last = attention(q, k, v, stats=replace(spec, key_mass_queries=nq), backend=backend)
        torch.testing.assert_close(last.key_mass, st.key_mass, atol=1e-4, rtol=0)
    assert float((full.key_mass - last.key_mass).abs().max()) == 0  # nq = 47: every row


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_key_mass_is_the_key_mass_of_those_rows(backend, device):
    """Without a causal mask a row's probabilities do not depend on its position, so the key mass
    of every stride-th row counted back from the last valid one (within the last W, if set)
    equals the whole key mass of a call with just those query rows; padded rows count as absent."""
    gen = torch.Generator().manual_seed(SEED + 2)
    q = torch.randn(2, 4, 45, 32, generator=gen).to(device)
    k, v = (torch.randn(2, 2, 37, 32, generator=gen).to(device) for _ in range(2))
    valid = [45, 29]  # query_lengths
    lengths = torch.tensor(valid, device=device)
    for stride, last in ((2, 0), (3, 0), (16, 0), (4, 21), (1, 10)):
        spec = StatsSpec(key_mass=True, key_mass_queries=last, key_mass_stride=stride)
        _, st = attention(q, k, v, causal=False, stats=spec, backend=backend, query_lengths=lengths)
        for i, n in enumerate(valid):
            rows = [r for r in range(n - 1, -1, -stride) if not last or r >= n - last]
            _, alone = attention(
                q[i : i + 1, :, rows],
                k[i : i + 1],
                v[i : i + 1],
                causal=False,
                stats=StatsSpec(key_mass=True),
                backend=backend,
            )
            torch.testing.assert_close(st.key_mass[i], alone.key_mass[0], atol=1e-4, rtol=0, msg=f"stride {stride}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_rows_and_first_index_ties(backend, device):
    """Identical keys: every row is uniform over its valid keys, and ties go to the first key.

    Integer-valued q and k make every score an exact integer (times the scale), so the ties
    are exact in any summation order; random floats would tie only up to rounding, which
    differs between key blocks."""
    n, d = 37, 32  # three key blocks of 16 under the interpreter
    gen = torch.Generator().manual_seed(SEED)
    q = torch.randint(-3, 4, (1, 2, n, d), generator=gen).float().to(device)
    k = torch.randint(-3, 4, (1, 1, 1, d), generator=gen).float().expand(1, 1, n, d).contiguous().to(device)
    v = torch.randn(1, 1, n, d, generator=gen).to(device)
    spec = StatsSpec.all(sink_tokens=1, window=4, offsets=(1,))
    _, st = attention(q, k, v, stats=spec, backend=backend)
    counts = torch.arange(1, n + 1, dtype=torch.float32, device=device)  # causal: row i sees i + 1 keys
    torch.testing.assert_close(st.entropy[0, 0], torch.log(counts), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.max_prob[0, 0], 1 / counts, atol=1e-6, rtol=0)
    torch.testing.assert_close(st.sink_mass[0, 0], 1 / counts, atol=1e-6, rtol=0)
    torch.testing.assert_close(st.local_mass[0, 0], counts.clamp(max=4) / counts, atol=1e-6, rtol=0)
    torch.testing.assert_close(st.distance[0, 0], (counts - 1) / 2, atol=1e-4, rtol=0)
    assert torch.all(st.argmax == 0)
    # key j is seen by rows j..n-1, each giving it 1 / (row + 1)
    want_km = torch.flip(torch.cumsum(torch.flip(1 / counts, [0]), 0), [0])
    torch.testing.assert_close(st.key_mass[0, 0], want_km, atol=1e-5, rtol=0)


def tied_problem(b: int, hkv: int, group: int, nq: int, nk: int, ties: tuple[int, ...], seed: int, d: int = 16):
    """Integer-valued q ``[B, Hq, Nq, d]`` in {0, 1} and k in {-1, 0, 1} whose largest scores tie
    exactly: keys at positions ``ties`` are all ones, so they score ``sum(q)``, which no other
    key can exceed (another key may equal it; keys before the first tie score <= 0). One
    query head is all zeros: every score 0, all keys tied. Scores are exact small integers in
    every dtype and summation order, so these ties survive any blocking or split of the keys."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2, (b, hkv * group, nq, d), generator=gen).float()
    q[:, -1] = 0
    k = torch.randint(-1, 2, (b, hkv, nk, d), generator=gen).float()
    k[:, :, : ties[0]] = k[:, :, : ties[0]].clamp(max=0)
    k[:, :, list(ties)] = 1.0
    v = torch.randn(b, hkv, nk, d, generator=gen)
    return q, k, v


def first_max(q, k, causal, key_lengths) -> torch.Tensor:
    """The earliest valid key with the row's largest score, from exact int64 scores; -1 for rows
    without keys. ``[B, Hq, Nq]``."""
    g = q.shape[1] // k.shape[1]
    s = q.long() @ k.long().repeat_interleave(g, 1).transpose(-1, -2)
    _, valid, _ = attention_matrix(q, k, causal, key_lengths=key_lengths)
    s = s.masked_fill(~valid, torch.iinfo(torch.int64).min)
    is_max = (s == s.amax(-1, keepdim=True)) & valid
    first = torch.where(is_max, torch.arange(k.shape[2]), k.shape[2]).amin(-1)
    return torch.where(valid.any(-1), first, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["prefill", "decode-split"])
def test_exact_ties_go_to_earliest_key(shape, backend, device):
    """Exact ties go to the earliest key, across key blocks (running max updated only on a
    strictly larger block max) and across the splits of flash-decoding (the merge keeps the
    earliest split among equal maxima), in every dtype, causal or not, with padding."""
    if shape == "prefill":  # blocks of 16 keys under the interpreter: ties 1-2 blocks apart
        b, hkv, group, nq, nk, ties = 2, 1, 2, 50, 50, (17, 18, 33, 49)
        klen = torch.tensor([50, 30])
    else:  # 300 keys in 4 splits of 80 under the interpreter: ties in splits 1, 2 and 3
        b, hkv, group, nq, nk, ties = 2, 1, 4, 3, 300, (100, 150, 170, 250, 299)
        klen = torch.tensor([300, 160])
    q, k, v = tied_problem(b, hkv, group, nq, nk, ties, SEED + 7)
    spec = StatsSpec(argmax=True, max_prob=True)
    runs = (
        (True, torch.float32, None),
        (False, torch.float16, 0.3),
        (True, torch.bfloat16, 0.3),
        (False, torch.bfloat16, None),
    )
    for causal, dtype, scale in runs:
        want = first_max(q, k, causal, klen)
        assert (want[0] > 16).any() and (want[:, -1] == 0).all()  # the problem does tie
        _, st = attention(
            q.to(dtype).to(device),
            k.to(dtype).to(device),
            v.to(dtype).to(device),
            causal=causal,
            scale=scale,
            stats=spec,
            backend=backend,
            key_lengths=klen.to(device),
        )
        got = st.argmax.cpu()
        wrong = (got != want).nonzero().tolist()[:5]
        assert torch.equal(got, want), f"{dtype} causal={causal} scale={scale}: rows {wrong}"
    if interpreting() and shape != "prefill":  # the merge is exercised (a GPU picks its own splits)
        assert key_splits(b * hkv, nk, q.device)[0] == 4


def _inside_padding(t: torch.Tensor, fill: float, heads_last: bool) -> torch.Tensor:
    """``t [B, H, N, D]`` as a view into a larger tensor filled with ``fill``: 5 more rows and 8
    more head-dim columns, stored ``[B, H, N, D]`` or ``[B, N, H, D]`` (seen through a transpose)."""
    b, h, n, d = t.shape
    if heads_last:
        big = torch.full((b, n + 5, h, d + 8), fill, dtype=t.dtype, device=t.device)
        view = big[:, :n, :, :d].transpose(1, 2)
    else:
        big = torch.full((b, h, n + 5, d + 8), fill, dtype=t.dtype, device=t.device)
        view = big[:, :, :n, :d]
    view.copy_(t)
    return view


def _padded_problem(shape: str, dtype: torch.dtype, fill: float, device: str):
    """q, k, v inside ``fill``-padded storage, with ``fill`` also in every key beyond
    ``key_lengths`` and every query beyond ``query_lengths``; and those lengths."""
    if shape == "prefill":
        b, hkv, group, nq, nk = 2, 1, 2, 40, 40
        klen, qlen = torch.tensor([33, 17]), torch.tensor([40, 29])
    else:  # split into 3 parts under the interpreter
        b, hkv, group, nq, nk = 2, 1, 4, 3, 130
        klen, qlen = torch.tensor([120, 50]), torch.tensor([3, 2])
    gen = torch.Generator().manual_seed(SEED + 11)
    q = torch.randn(b, hkv * group, nq, 40, generator=gen).to(dtype)
    k, v = (torch.randn(b, hkv, nk, 40, generator=gen).to(dtype) for _ in range(2))
    for i in range(b):
        k[i, :, klen[i] :] = fill
        v[i, :, klen[i] :] = fill
        q[i, :, qlen[i] :] = fill
    q, k, v = (_inside_padding(t.to(device), fill, heads_last=j == 1) for j, t in enumerate((q, k, v)))
    return q, k, v, klen.to(device), qlen.to(device)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max of a NaN row
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["prefill", "decode-split"])
def test_nan_padding_is_never_read(shape, backend, device):
    """NaN around the valid region (storage beyond the tensor views, keys beyond key_lengths,
    queries beyond query_lengths) changes nothing, bit for bit: no out-of-bounds read, and no
    masked value that is read leaks through ``0 * NaN``."""
    for dtype, causal in ((torch.float32, True), (torch.bfloat16, False)):
        spec = StatsSpec.all(sink_tokens=2, window=5, offsets=(1, 3) if causal else (1, -2))
        results = {}
        for fill in (0.0, math.nan):
            q, k, v, klen, qlen = _padded_problem(shape, dtype, fill, device)
            results[fill] = attention(
                q, k, v, causal=causal, stats=spec, backend=backend, key_lengths=klen, query_lengths=qlen
            )
        (clean_out, clean), (out, st) = results[0.0], results[math.nan]
        assert torch.equal(out, clean_out), f"{dtype}: output changed by NaN padding"
        for name, t in st.items():
            assert torch.equal(t, getattr(clean, name)), f"{dtype}: {name} changed by NaN padding"
        q, k, v, klen, qlen = _padded_problem(shape, dtype, 0.0, device)
        check_against_oracle(Case(q, k, v, causal, None, spec, klen, qlen), clean_out, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_are_bitwise_equal(backend, device):
    """The same call twice gives the same bits: output and every statistic (no atomics, no
    order that depends on scheduling), on random problems and on a split decoding shape."""
    rng = random.Random(f"{SEED}-repeat-{backend}")
    cases = [draw_case(rng, device, max_keys=40) for _ in range(2)]
    gen = torch.Generator().manual_seed(SEED + 13)
    q = torch.randn(1, 4, 2, 32, generator=gen).to(device)
    k, v = (torch.randn(1, 1, 100, 32, generator=gen).to(device) for _ in range(2))
    cases.append(Case(q, k, v, True, None, None, None, None))
    for case in cases:
        case.spec = StatsSpec.all(sink_tokens=3, window=7, offsets=(1, 2))
        out1, st1 = attention(case.q, case.k, case.v, backend=backend, **case.kwargs())
        out2, st2 = attention(case.q, case.k, case.v, backend=backend, **case.kwargs())
        assert torch.equal(out1, out2), case.describe()
        for name, t in st1.items():
            assert torch.equal(t, getattr(st2, name)), f"{name}: {case.describe()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_get_zero_output_and_sentinels(backend, device):
    gen = torch.Generator().manual_seed(SEED + 3)
    q, k, v = (torch.randn(3, 2, 20, 32, generator=gen).to(device) for _ in range(3))
    spec = StatsSpec.all(sink_tokens=2, window=3, offsets=(0, 2))
    klen = torch.tensor([0, 20, 7], device=device)
    qlen = torch.tensor([20, 0, 5], device=device)
    out, st = attention(q, k, v, stats=spec, backend=backend, key_lengths=klen, query_lengths=qlen)
    empty = torch.zeros(3, 2, 20, dtype=torch.bool, device=device)
    empty[0] = True  # no keys
    empty[1] = True  # no queries
    empty[2, :, 5:] = True  # padded queries
    assert torch.all(out[empty] == 0) and torch.all(out[~empty] != 0)
    for name, t in st.items():
        if name == "key_mass":
            assert torch.all(t[0] == 0) and torch.all(t[1] == 0) and torch.all(t[2, :, 7:] == 0)
        elif name == "argmax":
            assert torch.all(t[empty] == -1) and torch.all(t[~empty] >= 0)
        elif name == "offset_mass":
            assert torch.all(t[empty] == 0)
        else:
            assert torch.all(t[empty] == 0), name
    # causal with more queries than keys: the first Nq - Nk rows sit before the first key
    out, st = attention(q, k[:, :, :12], v[:, :, :12], stats=spec, backend=backend)
    assert torch.all(out[:, :, :8] == 0) and torch.all(st.argmax[:, :, :8] == -1)
    assert torch.all(st.argmax[:, :, 8:] >= 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_inputs(backend, device):
    gen = torch.Generator().manual_seed(SEED + 4)
    q = torch.randn(1, 2, 0, 32, generator=gen).to(device)
    k = torch.randn(1, 2, 5, 32, generator=gen).to(device)
    out, st = attention(q, k, k, stats=StatsSpec.all(), backend=backend)
    assert out.shape == (1, 2, 0, 32) and st.key_mass.shape == (1, 2, 5) and torch.all(st.key_mass == 0)
    out, st = attention(k, q, q, stats=StatsSpec.all(), backend=backend)
    assert torch.all(out == 0) and torch.all(st.argmax == -1)
    if backend in ("reference", "cpu"):  # float64 statistics for float64 inputs, empty problems too
        _, st = attention(k.double(), q.double(), q.double(), stats=StatsSpec.all(), backend=backend)
        assert {t.dtype for name, t in st.items() if name != "argmax"} == {torch.float64}


def test_reference_chunking_does_not_change_results(device):
    rng = random.Random(f"{SEED}-chunks")
    for _ in range(10):
        case = draw_case(rng, device, dtypes=(torch.float32,))
        case.spec = StatsSpec.all(sink_tokens=2, window=5, offsets=(1,))
        whole = attention(case.q, case.k, case.v, backend="reference", **case.kwargs())
        scores, _, _ = attention_matrix(case.q.cpu(), case.k.cpu(), case.causal, case.scale)
        slack = 2e-6 * scores[torch.isfinite(scores)].abs().max().item()  # see test_kernel_accuracy
        for chunk in (1, 7):
            parts = attention(case.q, case.k, case.v, backend="reference", chunk_size=chunk, **case.kwargs())
            vmax = max(1.0, case.v.abs().max().item())
            torch.testing.assert_close(parts[0], whole[0], atol=5e-5 * vmax, rtol=1e-5)
            for name, t in whole[1].items():
                scale = 1 + t.abs().max().item()  # distance and key mass grow with length
                torch.testing.assert_close(getattr(parts[1], name), t, msg=name, atol=(1e-5 + slack) * scale, rtol=1e-5)


def test_cpu_default_chunks_fit_the_budget_and_match_the_oracle(monkeypatch):
    """The cpu backend's default chunks: as many rows as fit the score budget (at least 16), and a
    budget small enough for several chunks gives the oracle's results."""
    import kernels.cpu as cpu

    p = Problem(2, 4, 2, 300, 300, 32, 0.1, True)
    assert cpu.chunk_rows(p, 300, budget=2 * 4 * 300 * 40) == 40 and cpu.chunk_rows(p, 300, budget=1) == 16
    monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", 1024)
    rng = random.Random(f"{SEED}-cpu-chunks")
    for _ in range(12):
        case = draw_case(rng, "cpu", dtypes=(torch.float32,))
        out, st = attention(case.q, case.k, case.v, backend="cpu", **case.kwargs())
        check_against_oracle(case, out, st)


@pytest.mark.parametrize("backend", ["reference", "cpu"])  # the cpu backend hands additive masks to the reference
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_reference_takes_arbitrary_masks(kind, backend, device):
    gen = torch.Generator().manual_seed(SEED + 2)
    b, h, nq, nk, d = 2, 4, 19, 23, 32
    q = torch.randn(b, h, nq, d, generator=gen)
    k, v = (torch.randn(b, 2, nk, d, generator=gen) for _ in range(2))
    keep = torch.rand(b, 1, nq, nk, generator=gen) < 0.6
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(b, 1, nq, nk, generator=gen), -math.inf)
    spec = StatsSpec.all(sink_tokens=2, window=6, offsets=(1, 2))
    out, st = attention(q.to(device), k.to(device), v.to(device), stats=spec, backend=backend, mask=mask.to(device))
    want = expected(q, k, v, causal=True, spec=spec, mask=mask.expand(b, h, nq, nk))
    torch.testing.assert_close(out.cpu().double(), want["out"], atol=1e-5, rtol=0)
    for name in ("lse", "entropy", "max_prob", "sink_mass", "local_mass", "distance", "offset_mass", "key_mass"):
        torch.testing.assert_close(getattr(st, name).cpu().double(), want[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_split_keys_merge_exactly(causal, device):
    """Decoding shapes split the keys across programs; merging the splits gives what one
    pass over all keys gives (and the float64 oracle), statistic by statistic."""
    from kernels.triton_attention import key_splits, packed_rows, triton_attention
    from kernels.validate import check_inputs

    gen = torch.Generator().manual_seed(SEED)
    q = torch.randn(1, 8, 3, 64, generator=gen).to(device)
    k, v = (torch.randn(1, 2, 300, 64, generator=gen).to(device) for _ in range(2))
    klen = torch.tensor([290], device=device)
    spec = StatsSpec.all(sink_tokens=4, window=40, offsets=(0, 1, 7, 150))
    p = check_inputs(q, k, v, causal=causal, scale=None, stats=spec, key_lengths=klen, query_lengths=None)
    assert packed_rows(p) == 12
    if device == "cpu":  # on a GPU the split count depends on its size
        assert key_splits(2, 300, q.device)[0] > 2
    split_out, split_st = triton_attention(q, k, v, p, spec, klen)
    one_out, one_st = triton_attention(q, k, v, p, spec, klen, max_splits=1)
    torch.testing.assert_close(split_out, one_out, rtol=0, atol=2e-5)
    for name, got in split_st.items():
        want = getattr(one_st, name)
        if name == "argmax":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * (300 if name == "distance" else 1), msg=name)
    case = Case(q, k, v, causal, None, spec, klen, None)
    check_against_oracle(case, split_out, split_st)


def test_pointer_loads_match_tma_loads(monkeypatch, device):
    """Where TMA descriptors cannot be used (or USE_TMA is off) the kernel loads K/V through
    pointers; both paths give the same results."""
    import kernels.triton_attention as ta

    rng = random.Random(f"{SEED}-pointers")
    for _ in range(6):
        case = draw_case(rng, device, max_keys=max_keys_for("triton"), dtypes=(torch.float32, torch.bfloat16))
        monkeypatch.setattr(ta, "USE_TMA", True)
        out_tma, st_tma = attention(case.q, case.k, case.v, backend="triton", **case.kwargs())
        monkeypatch.setattr(ta, "USE_TMA", False)
        out_ptr, st_ptr = attention(case.q, case.k, case.v, backend="triton", **case.kwargs())
        check_against_oracle(case, out_tma, st_tma)
        check_against_oracle(case, out_ptr, st_ptr)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q", [3, 40])
def test_out_of_range_lengths_act_clamped(n_q, causal, device):
    """CUDA lengths are not checked (a check would synchronise the device); both backends
    treat values outside [0, N] as clamped to it, so bypassing the check changes nothing."""
    from kernels.reference import reference_attention
    from kernels.triton_attention import triton_attention
    from kernels.validate import check_inputs

    gen = torch.Generator().manual_seed(SEED + 5)
    q = torch.randn(3, 4, n_q, 32, generator=gen).to(device)
    k, v = (torch.randn(3, 2, 50, 32, generator=gen).to(device) for _ in range(2))
    wild_k, clamped_k = (torch.tensor(x, device=device) for x in ([-4, 50 + 9, 20], [0, 50, 20]))
    wild_q, clamped_q = (torch.tensor(x, device=device) for x in ([n_q + 3, n_q - 1, -1], [n_q, n_q - 1, 0]))
    spec = StatsSpec.all(sink_tokens=2, window=8, offsets=(1,) if causal else (1, -2))
    p = check_inputs(q, k, v, causal=causal, scale=None, stats=spec, key_lengths=clamped_k, query_lengths=clamped_q)
    want_out, want = reference_attention(q, k, v, p, spec, clamped_k, clamped_q)
    for run in (reference_attention, triton_attention):
        out, st = run(q, k, v, p, spec, wild_k, wild_q)
        torch.testing.assert_close(out, want_out, atol=1e-5, rtol=0)
        for name, t in st.items():
            torch.testing.assert_close(t, getattr(want, name), atol=1e-4, rtol=0, msg=f"{run.__name__}: {name}")


def test_offsets_reach_the_device_once():
    """The offsets' int32 tensor is made once per (offsets, device): making it on a GPU is a
    blocking copy, which on every call would stall the host until the GPU's queue drained."""
    from kernels.triton_attention import _offsets_tensor

    cpu = torch.device("cpu")
    first = _offsets_tensor((1, 5), cpu)
    assert _offsets_tensor((1, 5), cpu) is first
    assert first.dtype == torch.int32 and first.tolist() == [1, 5]
    assert _offsets_tensor((5, 1), cpu).tolist() == [5, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation happens on a GPU only")
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("key_mass", [False, True])
def test_a_call_queues_its_kernels_without_waiting(backend, key_mass):
    """After its first call (which compiles), a call with every statistic only queues work: a
    host-device synchronisation inside would leave the GPU idle while the host prepares each
    launch (an uncached offsets tensor would cost 4 %-8 % of a 16K call on an H200,
    docs/benchmarks.md). torch's sync debug mode raises on one."""
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    spec = StatsSpec.every_row_statistic(offsets=(1, 3), key_mass=key_mass)
    attention(q, k, v, causal=True, stats=spec, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention(q, k, v, causal=True, stats=spec, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("fused", [False, True])
def test_token_major_query_gives_token_major_output(fused, device):
    """A query laid out ``[B, N, H, D]`` in memory (as model projections give it, possibly heads
    of a wider fused projection) gets an output in the same token-major layout, so that
    ``out.transpose(1, 2)`` is contiguous, with the same values as from contiguous inputs;
    a head-major query gets a contiguous output."""
    gen = torch.Generator().manual_seed(SEED + 21)
    width = 6 if fused else 4  # the query heads are the last 4 of the projection's `width`
    projection = torch.randn(2, 70, width, 32, generator=gen).to(device)
    q = projection[:, :, width - 4 :].transpose(1, 2)
    k, v = (torch.randn(2, 70, 2, 32, generator=gen).to(device).transpose(1, 2) for _ in range(2))
    spec = StatsSpec(entropy=True, argmax=True)
    out, st = attention(q, k, v, stats=spec, backend="triton")
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    want_out, want_st = attention(q.contiguous(), k.contiguous(), v.contiguous(), stats=spec, backend="triton")
    assert want_out.is_contiguous()
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(st.entropy, want_st.entropy, rtol=0, atol=0)
    assert torch.equal(st.argmax, want_st.argmax)
