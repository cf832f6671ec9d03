"""Both backends against the float64 oracle on fresh random problems, and FlashAttention's
accuracy rule: no error larger than twice that of naive attention in the input dtype."""

from __future__ import annotations

import json
import math
import os
import random
import sys

import pytest
import torch

from kernels import attention
from tests.conftest import SEED
from tests.kernels.kernel_cases import (
    ACCURACY_SIZES,
    ACCURACY_SIZES_CPU,
    draw_accuracy_case,
    draw_case,
    max_keys_for,
)
from tests.kernels.oracle import expected, naive

N_CASES = 160
OUT_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_against_oracle(case, out, st, distance_slack: float = 0.0):
    """Assert that ``out``/``st`` equal the oracle's values within tolerance; ``distance_slack``
    widens the distance tolerance by that many positions (a kernel's documented rounding)."""
    want = expected(
        case.q.cpu(),
        case.k.cpu(),
        case.v.cpu(),
        causal=case.causal,
        spec=case.spec,
        scale=case.scale,
        key_lengths=case.key_lengths,
        query_lengths=case.query_lengths,
    )
    nq, nk = case.q.shape[2], case.k.shape[2]
    vmax = case.v.abs().max().item() if case.v.numel() else 1.0
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    # fp32 scores carry an absolute error ~1e-7 x |score| x sqrt(D), and probabilities that
    # error relatively: large scores loosen every tolerance a little.
    slack = 2e-6 * want["score_max"]
    torch.testing.assert_close(
        out.cpu().double(), want["out"], rtol=0, atol=(OUT_ATOL[case.q.dtype] + slack) * max(vmax, 1.0)
    )
    if case.spec is None:
        assert st is None
        return
    spec = case.spec
    requested = {
        "lse": True,
        "entropy": spec.entropy,
        "max_prob": spec.max_prob,
        "argmax": spec.argmax,
        "sink_mass": spec.sink_tokens > 0,
        "local_mass": spec.window > 0,
        "distance": spec.distance,
        "offset_mass": bool(spec.offsets),
        "key_mass": spec.key_mass,
    }
    for name, on in requested.items():
        got = getattr(st, name)
        assert (got is not None) == on, f"{name}: requested={on} but got {type(got)}"
    atol = {
        "lse": 1e-4 * (1 + want["lse"].abs().max().item()),
        "entropy": 2e-4 + slack,
        "max_prob": 1e-4 + slack,
        "sink_mass": 1e-4 + slack,
        "local_mass": 1e-4 + slack,
        "distance": (1e-4 + slack) * (nk + nq) + distance_slack,
        "offset_mass": 1e-4 + slack,
        "key_mass": (1e-4 + slack) * nq,
    }
    for name, tol in atol.items():
        got = getattr(st, name)
        if got is None:
            continue
        assert got.dtype == torch.float32
        torch.testing.assert_close(
            got.cpu().double(), want[name], rtol=0, atol=tol, msg=lambda m, name=name: f"{name}: {m}"
        )
    if st.argmax is not None:
        arg = st.argmax.cpu()
        assert arg.dtype == torch.int64
        empty = ~want["valid"].any(-1)
        assert torch.equal(arg[empty], torch.full_like(arg[empty], -1))
        # The chosen key must be a maximum (ties or float32 near-ties may pick another one).
        prob = want["prob"]
        chosen = prob.gather(-1, arg.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        assert torch.all((chosen >= prob.amax(-1) * (1 - 1e-4) - 1e-7)[~empty])


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("index", range(N_CASES))
def test_matches_float64_oracle(backend, index, device):
    rng = random.Random(f"{SEED}-{backend}-{index}")
    case = draw_case(rng, device, max_keys=max_keys_for(backend))
    chunks = dict(chunk_size=rng.choice((None, 1, 5))) if backend == "cpu" else {}  # several chunks too
    out, st = attention(case.q, case.k, case.v, backend=backend, **case.kwargs(), **chunks)
    try:
        check_against_oracle(case, out, st)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ncase: {case.describe()}") from None


def test_reference_float64_is_exact(device):
    rng = random.Random(f"{SEED}-float64")
    for _ in range(20):
        case = draw_case(rng, device, dtypes=(torch.float32,))
        q, k, v = (t.double() for t in (case.q, case.k, case.v))
        out, st = attention(q, k, v, backend="reference", **case.kwargs())
        want = expected(
            q.cpu(),
            k.cpu(),
            v.cpu(),
            causal=case.causal,
            spec=case.spec,
            scale=case.scale,
            key_lengths=case.key_lengths,
            query_lengths=case.query_lengths,
        )
        assert out.dtype == torch.float64
        torch.testing.assert_close(out.cpu(), want["out"], rtol=1e-10, atol=1e-10)
        if st is not None:
            for name, got in st.items():
                if name != "argmax":
                    assert got.dtype == torch.float64
                    torch.testing.assert_close(got.cpu(), want[name], rtol=1e-9, atol=1e-9 * math.prod(q.shape[2:3]))


# ----------------------------------------------------------------------------- FlashAttention's rule

#: Configurations of the accuracy sweep per backend; a GPU run affords hundreds.
N_ACCURACY = int(os.environ.get("WORKBENCH_ACCURACY_CASES") or 20)
#: File (JSON lines) that receives every configuration's errors, for :func:`summarize`.
REPORT_ENV = "WORKBENCH_ACCURACY_REPORT"
QUANTITIES = (
    "out",
    "lse",
    "entropy",
    "max_prob",
    "argmax",
    "sink_mass",
    "local_mass",
    "distance",
    "offset_mass",
    "key_mass",
)
#: Float32 ulps of slack per unit of (1 + largest |score|) and of the quantity's natural size.
ATOL_ULPS = 16
_EPS32 = torch.finfo(torch.float32).eps


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _representation_error(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """How far the exact values move when stored in ``dtype``: no kernel can do better."""
    return _max_abs(exact.to(dtype), exact)


def accuracy_errors(case, out, st) -> dict[str, tuple[float, float, float]]:
    """``{quantity: (kernel error, naive error, atol)}``, max absolute errors against float64.

    The rule is ``kernel error <= 2 * naive error + atol`` (FlashAttention's test criterion).
    ``atol`` is twice the error of merely storing the exact answer in the result's dtype, plus
    ``ATOL_ULPS`` float32 ulps times ``1 + max |score|`` (a float32 score is only that exact)
    times the quantity's natural size (``|v|`` for the output, ``1 + ln Nk`` for lse and
    entropy, ``Nk + Nq`` for distance, ``Nq`` for key mass, 1 for probabilities and masses).
    It matters only where naive attention is itself float32-exact (float32 inputs, or
    statistics that are exactly 0 or 1); in half precision the naive error is hundreds of
    times larger. For ``argmax``, the error is the float64 probability gap between the key
    chosen and the row's maximum, and the naive error that row's largest probability error.
    """
    kw = dict(
        causal=case.causal,
        spec=case.spec,
        scale=case.scale,
        key_lengths=case.key_lengths,
        query_lengths=case.query_lengths,
    )
    exact = expected(case.q, case.k, case.v, **kw)
    plain = naive(case.q, case.k, case.v, **kw)
    nq, nk = case.q.shape[2], case.k.shape[2]
    vmax = case.v.abs().max().item() if case.v.numel() else 1.0
    ulps = ATOL_ULPS * _EPS32 * (1 + exact["score_max"])
    size = {"out": vmax, "lse": 1 + math.log(nk), "entropy": 1 + math.log(nk), "distance": nk + nq, "key_mass": nq}
    errors = {}
    for name in QUANTITIES:
        if name == "argmax":
            errors[name] = _argmax_error(st.argmax, exact, plain["prob"], ulps)
            continue
        got = out if name == "out" else getattr(st, name)
        want = exact[name]
        stored = _representation_error(want, got.dtype)
        errors[name] = (_max_abs(got, want), _max_abs(plain[name], want), 2 * stored + ulps * size.get(name, 1.0))
    return errors


def _argmax_error(arg: torch.Tensor, exact: dict, naive_prob: torch.Tensor, ulps: float):
    """The row where the chosen key's float64 probability falls furthest short of the maximum,
    relative to naive attention's own probability error in that row: ``(gap, naive, atol)``.
    Rows without keys must say -1, the others must name a valid key."""
    prob, valid = exact["prob"], exact["valid"]
    row_ok = valid.any(-1)
    assert arg.dtype == torch.int64
    assert torch.equal(arg[~row_ok], torch.full_like(arg[~row_ok], -1)), "argmax of an empty row is not -1"
    idx = arg.clamp_min(0).unsqueeze(-1)
    assert bool(valid.gather(-1, idx).squeeze(-1)[row_ok].all()), "argmax names a masked key"
    gap = (prob.amax(-1) - prob.gather(-1, idx).squeeze(-1))[row_ok]
    if not gap.numel():
        return 0.0, 0.0, ulps
    row_naive = (naive_prob.double() - prob).abs().amax(-1)[row_ok]
    worst = int(torch.argmax(gap / (2 * row_naive + ulps)))
    return gap[worst].item(), row_naive[worst].item(), ulps


def _record(entry: dict) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as fh:  # one short line per write: safe across pytest-xdist workers
            fh.write(json.dumps(entry) + "\n")


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("index", range(N_ACCURACY))
def test_error_within_twice_naive(backend, index, device):
    """FlashAttention's rule for the output and every statistic, over random configurations
    (``WORKBENCH_ACCURACY_CASES`` of them; key counts up to 4097 where CUDA is present, the
    interpreter's affordable sizes on a CPU). ``WORKBENCH_ACCURACY_REPORT=<file>`` records every
    configuration's errors; ``python -m tests.kernels.test_kernel_accuracy <file>`` sums them up."""
    sizes = ACCURACY_SIZES if device == "cuda" else ACCURACY_SIZES_CPU
    case = draw_accuracy_case(random.Random(f"{SEED}-accuracy-{index}"), device, sizes)
    out, st = attention(case.q, case.k, case.v, backend=backend, **case.kwargs())
    errors = accuracy_errors(case, out, st)
    if device == "cuda":  # the float64 oracle of a large case holds GiBs; give them back to other workers
        del out, st
        torch.cuda.empty_cache()
    _record(
        {
            "seed": SEED,
            "index": index,
            "backend": backend,
            "dtype": str(case.q.dtype).removeprefix("torch."),
            "shape": list(case.q.shape),
            "n_k": case.k.shape[2],
            "errors": errors,
        }
    )
    over = {name: e for name, e in errors.items() if e[0] > 2 * e[1] + e[2]}
    assert not over, (
        "error above 2 x naive + atol (kernel, naive, atol): "
        + ", ".join(f"{name}={tuple(f'{x:.3g}' for x in e)}" for name, e in over.items())
        + f"\ncase: {case.describe()}"
    )


def summarize(path: str) -> str:
    """Per backend, dtype and quantity: configurations, worst ``kernel / naive`` error ratio where
    the naive error exceeds the atol (so the factor 2 is what binds), and the worst use of the
    budget ``kernel / (2 naive + atol)`` (must stay <= 1) over all configurations."""
    rows: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    with open(path) as fh:
        for line in fh:
            entry = json.loads(line)
            for name, e in entry["errors"].items():
                rows.setdefault((entry["backend"], entry["dtype"], name), []).append(tuple(e))
    lines = [
        "| backend | dtype | quantity | configurations | worst kernel/naive (naive > atol) | worst budget use |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (backend, dtype, name), errs in sorted(rows.items()):
        binding = [k / n for k, n, a in errs if n > a]
        worst = f"{max(binding):.3f} ({len(binding)})" if binding else "- (0)"
        budget = max(k / (2 * n + a) for k, n, a in errs)
        lines.append(f"| {backend} | {dtype} | {name} | {len(errs)} | {worst} | {budget:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
