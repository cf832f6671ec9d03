"""The Hopper (Gluon) kernel: which calls it takes and why not the others (any machine), that
it builds for sm_90 with the installed Triton (any machine: Triton compiles on the CPU), and,
on an sm_90 GPU, that it matches the float64 oracle on fresh random problems."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import kernels.hopper_attention
import kernels.triton_attention
from kernels import StatsSpec, attention
from kernels.hopper_attention import (
    CONFIGS,
    GLUON_AVAILABLE,
    Rows,
    _argmax_asm,
    heads_in_l2,
    unsupported,
)
from kernels.validate import Problem, check_inputs
from tests.conftest import SEED
from tests.kernels.kernel_cases import Case, draw_hopper_case, jumping_max_case, refusal
from tests.kernels.test_kernel_accuracy import check_against_oracle
from tests.kernels.test_kernel_properties import first_max, tied_problem


def distance_rounding(dtype: torch.dtype) -> float:
    """How many positions the distance MMA may be off, whatever the length: it takes PV's own
    operand, p rounded to the input dtype (relative error: half its eps), against offsets of at
    most 63.5 keys from a block's centre."""
    return torch.finfo(dtype).eps / 2 * 63.5


ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
BF16 = torch.bfloat16


def _reason(**kind) -> str | None:
    return refusal(unsupported, **kind)


@pytest.mark.parametrize(
    "kind, because",
    [
        (dict(dtype=torch.float32), "dtype"),
        (dict(d=96), "head dim"),
        (dict(causal=False), "causal self-attention"),
        (dict(nq=64, nk=256), "causal self-attention"),
        (dict(nq=64, nk=64), "causal self-attention"),
        (dict(key_lengths=torch.tensor([200])), "padding"),
        (dict(query_lengths=torch.tensor([200])), "padding"),
        (dict(window=16), "variant"),
        (dict(softcap=30.0), "variant"),
        (dict(sinks=torch.zeros(2)), "variant"),
        (dict(alibi_slopes=torch.ones(2)), "variant"),
        (dict(scale=-0.1), "scale"),
        (dict(stats=StatsSpec(sink_tokens=129)), "sink tokens"),
        (dict(stats=StatsSpec(offsets=tuple(range(17)))), "offsets"),
    ],
)
def test_calls_it_cannot_run_say_why(kind, because):
    assert because in _reason(**kind)


def test_a_call_it_can_run_needs_only_the_hardware(monkeypatch):
    spec = StatsSpec.all(sink_tokens=4, window=64, offsets=(1, 31))
    kinds = (dict(), dict(stats=None), dict(dtype=torch.float16, d=128, stats=spec), dict(nq=129, nk=129, stats=spec))
    for kind in kinds:
        reason = _reason(**kind)
        assert reason == ("not a Hopper (sm_90) GPU" if GLUON_AVAILABLE else "this Triton has no Gluon")
    monkeypatch.setenv("KERNELS_HOPPER", "0")
    assert _reason() == ("KERNELS_HOPPER=0" if GLUON_AVAILABLE else "this Triton has no Gluon")


BUILDS = {
    "D64 bf16 plain": (64, "bfloat16", None),
    "D128 bf16 plain": (128, "bfloat16", None),
    "D128 fp16 lse": (128, "float16", "StatsSpec()"),
    "D64 bf16 row stats": (64, "bfloat16", "StatsSpec.every_row_statistic(sink_tokens=4, offsets=(1, 7))"),
    "D128 bf16 scoring": (128, "bfloat16", "StatsSpec(entropy=True, sink_tokens=1, window=200, offsets=(1,))"),
    "D128 bf16 far offsets": (128, "bfloat16", "StatsSpec(sink_tokens=128, offsets=(300, 1, 4095))"),
    "D128 fp16 argmax": (128, "float16", "StatsSpec(argmax=True)"),
    "D128 bf16 distance": (128, "bfloat16", "StatsSpec(distance=True)"),
}
# The tests run under TRITON_INTERPRET=1, whose triton.jit helpers Gluon cannot compile:
# build in a child process without it.
_BUILD = """
import json, sys, torch
from kernels import StatsSpec
from kernels.hopper_attention import compile_sm90
facts = {}
for name, (d, dtype, spec) in json.loads(sys.argv[1]).items():
    kernel = compile_sm90(d, getattr(torch, dtype), eval(spec) if spec else None)
    facts[name] = dict(ptx=kernel.asm["ptx"], cubin=len(kernel.asm["cubin"]), warps=kernel.metadata.num_warps)
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def builds() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _BUILD, json.dumps(BUILDS)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.skipif(not GLUON_AVAILABLE, reason="this Triton has no Gluon (Triton < 3.5)")
@pytest.mark.parametrize("name", BUILDS)
def test_builds_for_sm90(builds, name):
    ptx = builds[name]["ptx"]
    assert builds[name]["cubin"] > 0, "ptxas produced no binary"
    assert "wgmma.mma_async" in ptx  # Hopper tensor-core MMAs
    assert "cp.async.bulk.tensor" in ptx  # TMA loads
    d, _, spec = BUILDS[name]
    config = CONFIGS[d, spec is not None]
    assert builds[name]["warps"] == 4 * (config.consumers + 1)  # the consumer warpgroups and the loader's
    # warp specialization: registers moved from the loader to the consumers
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{config.registers[1]};" in ptx
    assert f".maxnreg {config.registers[0]}" in ptx


@pytest.mark.parametrize("config", sorted(set(CONFIGS.values()), key=str))
def test_consumers_share_the_register_file(config):
    """The launch cap over every warp, and the consumers' and the loader's (24) after setmaxnreg,
    fit the SM's 64K registers; setmaxnreg takes multiples of 8 in [24, 256]."""
    cap, each = config.registers
    warps = 4 * (config.consumers + 1)
    assert cap * warps * 32 <= 65536 and (config.consumers * each + 24) * 128 <= 65536
    assert cap % 8 == 0 and each % 8 == 0 and 24 <= each <= 256


@pytest.mark.skipif(not GLUON_AVAILABLE, reason="this Triton has no Gluon (Triton < 3.5)")
def test_argmax_is_packed_behind_a_warp_vote(builds):
    """Wherever argmax is asked for, it is the packed min (one lop3 a score, 0xCE:
    (~p & mask) | column) inside a branch the warp's vote makes uniform; nowhere else."""
    packed = re.compile(r"lop3\.b32 [^;]*0xCE;")
    for name in ("D128 fp16 argmax", "D64 bf16 row stats"):
        ptx = builds[name]["ptx"]
        assert len(packed.findall(ptx)) >= 64, name  # a score each, per consumer loop
        assert "vote.sync.any.pred" in ptx and "bra.uni SKIP;" in ptx, name
    assert not packed.search(builds["D128 bf16 scoring"]["ptx"])  # no argmax asked for
    assert "vote.sync" not in builds["D128 bf16 scoring"]["ptx"]


def _run_argmax_ptx(ptx: str, inputs: list[int], flag: int) -> list[int]:
    """Execute :func:`kernels.hopper_attention._argmax_asm`'s PTX for one row: the few
    instructions it uses, on 32-bit unsigned values."""
    n = len(inputs)
    regs: dict[str, int] = {f"${n + i}": v for i, v in enumerate(inputs)} | {f"${2 * n + i}": flag for i in range(n)}
    value = lambda x: regs[x] if x in regs else int(x) & 0xFFFFFFFF  # noqa: E731
    lines = [line.strip().rstrip(";") for line in ptx.splitlines()]
    pc = 0
    while pc < len(lines):
        line, pc = lines[pc], pc + 1
        op, _, args = line.partition(" ")
        a = [x.strip() for x in args.split(",")]
        if op == "setp.ne.b32":
            regs[a[0]] = int(value(a[1]) != value(a[2]))
        elif op == "mov.b32":
            regs[a[0]] = value(a[1])
        elif op == "@!p":
            assert args == "bra.uni SKIP"
            if not regs["p"]:
                pc = lines.index("SKIP:")
        elif op == "lop3.b32":
            x, y, z, lut = value(a[1]), value(a[2]), value(a[3]), int(a[4], 16)
            bit = lambda i, v: (v >> i) & 1  # noqa: E731
            regs[a[0]] = sum(bit((bit(i, x) << 2) | (bit(i, y) << 1) | bit(i, z), lut) << i for i in range(32))
        elif op == "min.u32":
            regs[a[0]] = min(value(a[1]), value(a[2]))
        else:
            assert line in ("{", "}", "SKIP:") or line.startswith(".reg"), line
    return [regs[f"${i}"] for i in range(n)]


@pytest.mark.parametrize("seed", range(SEED, SEED + 6))
def test_argmax_ptx_finds_the_first_max_column(seed):
    """The packed min of one row's probabilities in a thread (columns 8 a + b of its
    registers, 0 <= a < 16, b in {0, 1}) names the first column holding the row's max, exact
    ties included, and gives all ones when the warp's flag is clear."""
    rng = random.Random(seed)
    print(f"seed {seed}")
    ptx, _ = _argmax_asm(128)
    probs = torch.rand(32, generator=torch.Generator().manual_seed(seed)) ** 4  # float32 in [0, 1)
    for e in rng.sample(range(32), rng.choice((1, 2, 5))):  # the max, or exact ties of it
        probs[e] = 1.0 if seed % 2 else float(probs.max())
    bits = probs.view(torch.int32).tolist()
    out = _run_argmax_ptx(ptx, [b & 0xFFFFFFFF for b in bits], flag=1)
    assert len(set(out)) == 1
    columns = [(e // 2) * 8 + e % 2 for e in range(32)]
    first = min(c for c, v in zip(columns, probs.tolist()) if v == max(probs.tolist()))
    assert out[0] & 127 == first
    assert _run_argmax_ptx(ptx, [b & 0xFFFFFFFF for b in bits], flag=0) == [0xFFFFFFFF] * 32


def _mma_groups(ptx: str) -> str:
    """The PTX's MMAs in program order, one letter each, runs collapsed: ``Q`` an MMA on shared
    operands (QK), ``P`` one with its A operand in registers (PV), ``8`` an N = 8 one (distance),
    ``|`` a commit, ``w`` a wait for all but two groups."""
    letters = []
    for line in ptx.splitlines():
        if "wgmma.mma_async" in line:
            letters.append("8" if ".m64n8k16." in line else "P" if "}, {" in line else "Q")
        elif "wgmma.commit_group" in line:
            letters.append("|")
        elif "wgmma.wait_group.sync.aligned 2;" in line:
            letters.append("w")
    return re.sub(r"(.)\1+", r"\1", "".join(letters))


@pytest.mark.skipif(not GLUON_AVAILABLE, reason="this Triton has no Gluon (Triton < 3.5)")
def test_distance_mma_rides_with_pv(builds):
    """At both head dims the distance MMA (N = 8) takes PV's own operand (bfloat16 here), is
    issued just before PV and waited with it: the loop commits QK, distance and PV in that
    order and waits for QK with two groups behind it."""
    n8 = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n8k16\.f32\.(\w+)\.")
    for name in ("D128 bf16 distance", "D64 bf16 row stats"):
        ptx = builds[name]["ptx"]
        assert set(n8.findall(ptx)) == {"bf16"}, name
        assert "Q|8|P|w" in _mma_groups(ptx), name
    plain = builds["D128 fp16 argmax"]["ptx"]  # no distance asked for: PV alone behind QK
    assert not n8.search(plain)
    assert "Q|P|" in _mma_groups(plain) and "w" not in _mma_groups(plain)


def _checked_on_hopper(case: Case):
    """Run ``case`` through :func:`kernels.attention` on the Hopper kernel, which must take it,
    and check the result against the float64 oracle, and that the output is token-major where
    q is (:func:`kernels.spec.empty_output`); returns the statistics."""
    p = check_inputs(case.q, case.k, case.v, **case.kwargs())
    assert unsupported(case.q, p, case.spec) is None, case.describe()
    out, st = attention(case.q, case.k, case.v, backend="triton", **case.kwargs())
    check_against_oracle(case, out, st, distance_slack=distance_rounding(case.q.dtype))
    rows = Rows.of(case.q)
    assert out.transpose(1, 2).is_contiguous() if rows and rows.col_h else out.is_contiguous(), out.stride()
    return st


@pytest.mark.parametrize("seed", range(20))
def test_rows_address_every_element_of_a_layout_the_kernel_reads_in_place(seed):
    """:class:`Rows` of contiguous, token-major and fused-projection layouts address the
    tensor's own elements through one 2-D view; layouts TMA cannot read get None."""
    rng = random.Random(f"{SEED}-rows-{seed}")
    b, h, n, d = rng.choice((1, 2, 3)), rng.choice((1, 2, 5)), rng.choice((1, 7, 130)), rng.choice((8, 64, 128))
    layout = rng.choice(("contiguous", "token-major", "fused", "head dim strided", "misaligned"))
    extra = 2 if layout == "fused" else 0
    if layout == "contiguous":
        t = torch.randn(b, h, n, d)
    elif layout == "head dim strided":
        t = torch.randn(b, h, n, 2 * d)[..., ::2]
    elif layout == "misaligned":  # starts 4 bytes into an aligned allocation
        t = torch.randn(b * h * n * d + 1)[1:].view(b, h, n, d)
    else:
        t = torch.randn(b, n, h + extra, d)[:, :, extra : extra + h].transpose(1, 2)
    rows = Rows.of(t)
    if layout in ("head dim strided", "misaligned"):
        assert rows is None
        return
    assert rows is not None and (rows.col_h == 0) == t.is_contiguous()
    view = t.as_strided(rows.shape, (rows.stride, 1))  # raises if it reached past the storage
    bi, hi, ni, di = torch.meshgrid(*(torch.arange(s) for s in t.shape), indexing="ij")
    assert torch.equal(view[bi * rows.rows_b + hi * rows.rows_h + ni, hi * rows.col_h + di], t)


@pytest.mark.parametrize("seed", range(20))
def test_a_section_of_heads_is_the_most_whose_keys_and_values_fit_in_l2(seed):
    rng = random.Random(f"{SEED}-l2-{seed}")
    b, hkv, group = rng.choice((1, 2, 3)), rng.choice((1, 2, 5, 8)), rng.choice((1, 2, 4))
    n, d, size = rng.choice((128, 4096, 16384, 131072, 1 << 20)), rng.choice((64, 128)), rng.choice((2, 4))
    l2 = rng.choice((40, 50, 60)) * 2**20
    p = Problem(b, hkv * group, hkv, n, n, d, 1.0, True)
    heads = heads_in_l2(p, size, l2)
    kv_bytes = 2 * n * d * size  # one key/value head's keys and values
    assert 1 <= heads <= b * hkv * group
    if heads < b * hkv * group:  # not capped: a power of two
        assert heads & (heads - 1) == 0
        assert heads * 2 * kv_bytes > l2 * group  # twice as many would not fit
    assert heads * kv_bytes <= l2 * group or heads <= group  # they fit, or it is one key/value head's


@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU (H100, H200)")
@pytest.mark.parametrize("heads", [1, 3, 4])
def test_sections_of_heads_cover_every_query_tile_on_hopper(heads, monkeypatch):
    """The programs' mapping to (head, query tile) in sections of ``heads`` heads, the last
    section shorter when ``heads`` does not divide the 2 x 5 heads: every tile is computed once."""
    monkeypatch.setattr(kernels.hopper_attention, "heads_in_l2", lambda *args: heads)
    gen = torch.Generator().manual_seed(SEED + 13)
    q, k, v = (torch.randn(2, 5, 700, 64, generator=gen).to(BF16).cuda() for _ in range(3))
    _checked_on_hopper(Case(q, k, v, True, None, StatsSpec.every_row_statistic(), None, None))


@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU (H100, H200)")
@pytest.mark.parametrize("index", range(32))
def test_matches_float64_oracle_on_hopper(index, monkeypatch):
    case = draw_hopper_case(random.Random(f"{SEED}-hopper-{index}"))

    def not_here(*args, **kwargs):
        raise AssertionError("the call went to the Triton kernel")

    monkeypatch.setattr(kernels.triton_attention, "triton_attention", not_here)
    try:
        _checked_on_hopper(case)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ncase: {case.describe()}") from None


@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU (H100, H200)")
@pytest.mark.parametrize("d, dtype", [(64, BF16), (128, torch.float16)])
def test_exact_ties_go_to_earliest_key_on_hopper(d, dtype):
    """Exact ties, within a key block of 128 and across blocks, go to the earliest key (the
    kernel's argmax must not depend on how a block's scores are reduced)."""
    ties = (130, 131, 200, 300, 641, 700)
    q, k, v = tied_problem(1, 2, 2, 701, 701, ties, SEED + 11, d=d)
    want = first_max(q, k, True, None)
    assert (want[0, 0, 300:] == 130).any() and (want[:, -1] == 0).all()  # the problem does tie
    spec = StatsSpec(argmax=True)
    q, k, v = (t.to(dtype).cuda() for t in (q, k, v))
    p = check_inputs(q, k, v, causal=True, scale=None, stats=spec, key_lengths=None, query_lengths=None)
    assert unsupported(q, p, spec) is None
    _, st = attention(q, k, v, stats=spec, backend="triton")
    assert torch.equal(st.argmax.cpu(), want)


@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU (H100, H200)")
@pytest.mark.parametrize("d, dtype", [(64, BF16), (128, torch.float16)])
def test_a_max_that_jumps_in_some_rows_of_a_warp_is_rescaled_on_hopper(d, dtype):
    """:func:`jumping_max_case` (for docs/experiments/variants/lazy_rescale.patch)."""
    case, key, second = jumping_max_case(d, dtype, SEED + 12)
    st = _checked_on_hopper(case)
    assert (st.argmax[0, :, key:][:, second[key:]] == key).all()  # the planted key does win there
