"""Properties every result must have, SDPA agreement, and behaviour at the edges."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from kernels import StatsSpec, attention
from tests.conftest import SEED
from tests.kernel_cases import Case, draw_case
from tests.test_kernel_accuracy import check_against_oracle
from tests.oracle import attention_matrix, expected

BACKENDS = ("reference", "triton")
SDPA_ATOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(40))
def test_bounds_sums_and_sdpa(backend, index, device):
    rng = random.Random(f"{SEED}-props-{backend}-{index}")
    case = draw_case(rng, device)
    spec = StatsSpec.all(sink_tokens=rng.choice((1, 3)), window=rng.choice((1, 8, 64)))
    case.spec = spec
    out, st = attention(case.q, case.k, case.v, backend=backend, **case.kwargs())
    scores, valid, _ = attention_matrix(case.q.cpu(), case.k.cpu(), case.causal, case.scale,
                                        case.key_lengths, case.query_lengths)
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
    torch.testing.assert_close(km_total, row_ok.sum(-1).double(), rtol=0,
                               atol=(1e-4 + slack) * case.q.shape[2] + 1e-5)
    assert torch.all(torch.isfinite(st.lse)) and torch.all(torch.isfinite(st.distance))
    # SDPA on the same mask (it returns NaN on rows with no valid key: compare the others).
    g = case.q.shape[1] // case.k.shape[1]
    ref = F.scaled_dot_product_attention(
        case.q.float().cpu(), case.k.float().cpu().repeat_interleave(g, 1),
        case.v.float().cpu().repeat_interleave(g, 1), attn_mask=valid, scale=case.scale,
    )
    vmax = max(case.v.abs().max().item(), 1.0)
    ok = row_ok.unsqueeze(-1).expand_as(ref)
    torch.testing.assert_close(out.cpu().float()[ok], ref[ok], rtol=0,
                               atol=(SDPA_ATOL[case.q.dtype] + slack) * vmax)
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
    """Bottom-right alignment: the last Nq queries against all keys are the last rows of prefill."""
    gen = torch.Generator().manual_seed(SEED + 1)
    q, k, v = (torch.randn(1, 2, 47, 32, generator=gen).to(device) for _ in range(3))
    spec = StatsSpec.all(sink_tokens=2, window=5, offsets=(1, 3))
    full_out, full = attention(q, k, v, stats=spec, backend=backend)
    for nq in (1, 5, 16):
        out, st = attention(q[:, :, -nq:], k, v, stats=spec, backend=backend)
        torch.testing.assert_close(out, full_out[:, :, -nq:], atol=1e-5, rtol=0)
        for name, t in st.items():
            if name == "key_mass":
                continue  # sums over a different set of rows
            torch.testing.assert_close(t, getattr(full, name)[:, :, -nq:], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_rows_and_first_index_ties(backend, device):
    """Identical keys: every row is uniform over its valid keys, and ties go to the first key."""
    n, d = 37, 32
    q = torch.randn(1, 2, n, d).to(device)
    k = torch.randn(1, 1, 1, d).expand(1, 1, n, d).contiguous().to(device)
    v = torch.randn(1, 1, n, d).to(device)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_get_zero_output_and_sentinels(backend, device):
    q, k, v = (torch.randn(3, 2, 20, 32).to(device) for _ in range(3))
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
    q = torch.randn(1, 2, 0, 32, device=device)
    k = torch.randn(1, 2, 5, 32, device=device)
    out, st = attention(q, k, k, stats=StatsSpec.all(), backend=backend)
    assert out.shape == (1, 2, 0, 32) and st.key_mass.shape == (1, 2, 5) and torch.all(st.key_mass == 0)
    out, st = attention(k, q, q, stats=StatsSpec.all(), backend=backend)
    assert torch.all(out == 0) and torch.all(st.argmax == -1)


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
                torch.testing.assert_close(getattr(parts[1], name), t, msg=name,
                                           atol=(1e-5 + slack) * scale, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_reference_takes_arbitrary_masks(kind, device):
    gen = torch.Generator().manual_seed(SEED + 2)
    b, h, nq, nk, d = 2, 4, 19, 23, 32
    q = torch.randn(b, h, nq, d, generator=gen)
    k, v = (torch.randn(b, 2, nk, d, generator=gen) for _ in range(2))
    keep = torch.rand(b, 1, nq, nk, generator=gen) < 0.6
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(b, 1, nq, nk, generator=gen), -math.inf)
    spec = StatsSpec.all(sink_tokens=2, window=6, offsets=(1, 2))
    out, st = attention(q.to(device), k.to(device), v.to(device), stats=spec, backend="reference",
                        mask=mask.to(device))
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
        case = draw_case(rng, device, dtypes=(torch.float32, torch.bfloat16))
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
