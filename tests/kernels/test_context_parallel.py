"""``kernels.context_parallel``: sharding of a sequence over ranks, attention over the shards, and
decoding against a KV cache split over the ranks.

The distributed checks run once per module: this file, run as a script (``python -m
tests.kernels.test_context_parallel OUT``), forks 4 gloo ranks on the CPU. Cases of world size 2 run on
the two pairs of ranks ``{0, 1}`` and ``{2, 3}`` (process groups other than the default one, so
group ranks differ from global ranks), cases of world size 4 on all ranks. Each rank saves its
shard's output and statistics (safetensors) under ``OUT``; the tests put the shards back in
position order and compare them with one :func:`kernels.attention` call over the whole sequence.
Decoding cases save every rank's row of each step, to compare with one call over the whole cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from kernels import AttentionInputError, StatsSpec, attention
from kernels.context_parallel import (
    context_parallel_attention,
    context_parallel_decode,
    shard_indices,
    shard_ranges,
)
from tests.conftest import SEED

ROOT = Path(__file__).resolve().parents[2]
RANKS = 4
#: Seconds for the whole distributed run (about 15 s on two busy cores) and for a collective.
RUN_TIMEOUT, COLLECTIVE_TIMEOUT = 240, 90
EVERY = StatsSpec.all(sink_tokens=2, window=3, offsets=(0, 1, 4))
#: name: world size, shapes, flags, dtype, backend, statistics. ``n`` mostly not divisible by 2W.
CASES = {
    "gqa-causal": dict(world=2, b=2, hq=4, hkv=2, n=11, d=8, causal=True, dtype="float64", spec=EVERY),
    "gqa-noncausal": dict(
        world=2,
        b=1,
        hq=3,
        hkv=1,
        n=10,
        d=5,
        causal=False,
        dtype="float64",
        spec=StatsSpec.all(sink_tokens=3, window=2, offsets=(1, -2, 0)),
    ),
    "no-stats": dict(world=2, b=1, hq=2, hkv=2, n=8, d=4, causal=True, dtype="float32", spec=None),
    "float32-rows": dict(
        world=2,
        b=1,
        hq=2,
        hkv=1,
        n=9,
        d=6,
        causal=False,
        dtype="float32",
        spec=StatsSpec(entropy=True, argmax=True, distance=True),
    ),
    "list-gather": dict(
        world=2, b=1, hq=2, hkv=1, n=12, d=4, causal=True, dtype="float64", spec=EVERY, list_gather=True
    ),
    "triton-causal": dict(
        world=2, b=1, hq=2, hkv=1, n=9, d=16, causal=True, dtype="float32", spec=EVERY, backend="triton"
    ),
    "triton-noncausal": dict(
        world=2,
        b=1,
        hq=2,
        hkv=1,
        n=7,
        d=16,
        causal=False,
        dtype="float32",
        spec=StatsSpec.all(sink_tokens=1, window=2, offsets=(1, -1)),
        backend="triton",
    ),
    "world4-causal": dict(world=4, b=1, hq=4, hkv=2, n=13, d=8, causal=True, dtype="float64", spec=EVERY),
    "world4-noncausal": dict(
        world=4,
        b=2,
        hq=2,
        hkv=1,
        n=17,
        d=4,
        causal=False,
        dtype="float64",
        spec=StatsSpec.all(sink_tokens=1, window=5, offsets=(-3, 2)),
    ),
}

#: Decoding cases: a prefill of ``n`` positions sharded over ``world`` ranks, then ``steps``
#: tokens decoded one at a time (every rank holds every decoded key). The sink, window and
#: offsets reach into the decoded keys, the last chunks, and the early chunks.
DECODE_CASES = {
    "decode-gqa": dict(
        world=2, b=2, hq=4, hkv=2, n=11, steps=3, d=8, dtype="float64", spec=StatsSpec.all(2, 4, (0, 1, 5, 12))
    ),
    "decode-no-stats": dict(world=2, b=1, hq=2, hkv=1, n=8, steps=2, d=4, dtype="float32", spec=None),
    "decode-triton": dict(
        world=2,
        b=1,
        hq=2,
        hkv=1,
        n=9,
        steps=2,
        d=16,
        dtype="float32",
        spec=StatsSpec.all(1, 3, (1, 4)),
        backend="triton",
    ),
    "decode-world4": dict(
        world=4, b=1, hq=3, hkv=1, n=13, steps=2, d=4, dtype="float64", spec=StatsSpec.all(3, 9, (2, 7, 14))
    ),
}


def case_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole sequence's q ``[B, Hq, n, D]``, k, v ``[B, Hkv, n, D]`` of a case (same on every
    rank); a decoding case's sequence runs on through its decoded tokens (``n + steps``)."""
    c = {**CASES, **DECODE_CASES}[name]
    gen = torch.Generator().manual_seed(SEED + sorted({**CASES, **DECODE_CASES}).index(name))
    dtype = getattr(torch, c["dtype"])
    n = c["n"] + c.get("steps", 0)
    q = torch.randn(c["b"], c["hq"], n, c["d"], generator=gen, dtype=dtype)
    k = torch.randn(c["b"], c["hkv"], n, c["d"], generator=gen, dtype=dtype)
    return q, k, torch.randn(k.shape, generator=gen, dtype=dtype)


def _pair_of(name: str, pairs: list, rank: int, cases: dict):
    """The group a case of ``cases`` runs on (None: every rank), and whether this rank is in it."""
    c = cases[name]
    if c["world"] == RANKS:
        return None, True
    index = [n for n in cases if cases[n]["world"] == 2].index(name) % 2
    return pairs[index], rank // 2 == index


# ----------------------------------------------------------------------------- the ranks (script side)


def _rank_main(rank: int, out: str) -> None:
    """One rank: run every case of its groups, save each shard's results as ``NAME-GROUPRANK``."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/store",
        rank=rank,
        world_size=RANKS,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT),
    )
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    for name, c in CASES.items():
        group, member = _pair_of(name, pairs, rank, CASES)
        if not member:
            continue
        q, k, v = case_inputs(name)
        me = dist.get_rank(group)
        shard = shard_indices(c["n"], c["world"], me)
        gathers = (dist.all_gather_into_tensor, getattr(dist, "all_gather_single", None), dist.all_gather)
        if c.get("list_gather"):  # a backend without the single-tensor all-gather
            dist.all_gather_into_tensor = dist.all_gather_single = _unsupported
        else:  # make sure the single-tensor all-gather is the one used
            dist.all_gather = _unsupported
        try:
            o, st = context_parallel_attention(
                q[:, :, shard],
                k[:, :, shard],
                v[:, :, shard],
                n_total=c["n"],
                group=group,
                causal=c["causal"],
                stats=c["spec"],
                backend=c.get("backend", "reference"),
            )
        finally:
            dist.all_gather_into_tensor, dist.all_gather_single, dist.all_gather = gathers
        found = {"out": o, **dict(st.items() if st is not None else [])}
        save_file({key: t.contiguous() for key, t in found.items()}, f"{out}/{name}-{me}.safetensors")
    for name, c in DECODE_CASES.items():
        group, member = _pair_of(name, pairs, rank, DECODE_CASES)
        if member:
            _decode_case(name, c, group, out)
    try:  # a shard of the wrong length (the whole sequence) is refused before any collective
        whole = torch.zeros(1, 2, 13, 4)
        context_parallel_attention(whole, whole, whole, n_total=13)
    except AttentionInputError as exc:
        Path(f"{out}/wrong-shard-{rank}.txt").write_text(str(exc))
    dist.barrier()
    dist.destroy_process_group()


def _decode_case(name: str, c: dict, group, out: str) -> None:
    """Decode ``steps`` tokens against this rank's split cache; save each step's row."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    q, k, v = case_inputs(name)
    me, n = dist.get_rank(group), c["n"]
    shard = shard_indices(n, c["world"], me)
    for step in range(1, c["steps"] + 1):
        cache = torch.cat([shard, torch.arange(n, n + step)])  # the shard, then the decoded keys
        o, st = context_parallel_decode(
            q[:, :, n + step - 1 : n + step],
            k[:, :, cache],
            v[:, :, cache],
            n_total=n,
            group=group,
            stats=c["spec"],
            backend=c.get("backend", "reference"),
        )
        found = {"out": o, **dict(st.items() if st is not None else [])}
        save_file({key: t.contiguous() for key, t in found.items()}, f"{out}/{name}-{step}-{me}.safetensors")


def _unsupported(*args, **kwargs):
    raise RuntimeError("this collective is switched off for the test")


def main(out: str) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        import kernels.triton_attention  # noqa: F401  (imported once, before the fork)
    torch.multiprocessing.start_processes(_rank_main, args=(out,), nprocs=RANKS, start_method="fork")


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory) -> Path:
    """Run the ranks once for the module; the folder of their results."""
    out = tmp_path_factory.mktemp("context_parallel")
    # The ranks run the Triton kernels on CPU tensors, through the interpreter, GPU or not.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kernels.test_context_parallel", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks share the script's process group
        log, _ = proc.communicate()
        pytest.fail(f"the distributed run took over {RUN_TIMEOUT} s:\n{log[-6000:]}")
    assert proc.returncode == 0, f"the distributed run failed:\n{log[-6000:]}"
    return out


def _assembled(out: Path, name: str) -> dict[str, torch.Tensor]:
    """Every rank's results of a case, put back in position order along the sequence axis."""
    from safetensors.torch import load_file

    c = CASES[name]
    found: dict[str, torch.Tensor] = {}
    for r in range(c["world"]):
        where = shard_indices(c["n"], c["world"], r)
        for key, t in load_file(out / f"{name}-{r}.safetensors").items():
            if key not in found:
                found[key] = t.new_full((*t.shape[:2], c["n"], *t.shape[3:]), -7)
            found[key][:, :, where] = t
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_shards_equal_attention_over_the_whole_sequence(ranks_out, name):
    """Output and every statistic (key mass summed over ranks) equal a single call, position by
    position: of the same backend, or of the reference where this process runs no interpreter."""
    c = CASES[name]
    q, k, v = case_inputs(name)
    backend = c.get("backend", "reference") if os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    out, st = attention(q, k, v, causal=c["causal"], stats=c["spec"], backend=backend)
    want = {"out": out, **dict(st.items() if st is not None else [])}
    got = _assembled(ranks_out, name)
    assert sorted(got) == sorted(want)
    tol = 1e-12 if c["dtype"] == "float64" else 2e-5 if "backend" in c else 2e-6
    for key, t in want.items():
        assert got[key].dtype == t.dtype, key
        if key == "argmax":
            assert torch.equal(got[key], t), name
        else:
            torch.testing.assert_close(
                got[key],
                t,
                rtol=0,
                atol=tol * (c["n"] if key == "distance" else 1),
                msg=lambda m, key=key: f"{name}: {key}: {m}",
            )


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decoding_against_a_split_cache_equals_attention_over_the_whole_cache(ranks_out, name):
    """Each decoded token's output and statistics (global argmax, key mass over every key) are the
    same on every rank, bit for bit, and equal one call over the whole cache at its position."""
    from safetensors.torch import load_file

    c = DECODE_CASES[name]
    q, k, v = case_inputs(name)
    backend = c.get("backend", "reference") if os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    tol = 1e-12 if c["dtype"] == "float64" else 2e-5 if "backend" in c else 2e-6
    for step in range(1, c["steps"] + 1):
        end = c["n"] + step
        out, st = attention(q[:, :, end - 1 : end], k[:, :, :end], v[:, :, :end], stats=c["spec"], backend=backend)
        want = {"out": out, **dict(st.items() if st is not None else [])}
        ranks = [load_file(ranks_out / f"{name}-{step}-{r}.safetensors") for r in range(c["world"])]
        for got in ranks:
            assert sorted(got) == sorted(want)
            for key in got:
                assert torch.equal(got[key], ranks[0][key]), f"{name} step {step}: ranks differ in {key}"
        for key, t in want.items():
            got = ranks[0][key]
            assert got.dtype == t.dtype and got.shape == t.shape, (name, step, key)
            if key == "argmax":
                assert torch.equal(got, t), (name, step)
            else:
                torch.testing.assert_close(
                    got, t, rtol=0, atol=tol * (end if key == "distance" else 1), msg=lambda m, key=key: f"{key}: {m}"
                )


def test_a_shard_of_the_wrong_length_is_refused_on_every_rank(ranks_out):
    for r in range(RANKS):
        message = (ranks_out / f"wrong-shard-{r}.txt").read_text()
        assert "holds 13 positions, but rank" in message and "shard_indices" in message


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shards_partition_the_sequence_in_balanced_chunks(world):
    """Every n from 2W on: the shards partition [0, n), each the chunks r and 2W - 1 - r in
    position order; ranks hold the same number of positions within one, and the same causal work
    (query-key pairs, position + 1 per query) within n."""
    for n in range(2 * world, 2 * world + 70):
        shards = [shard_indices(n, world, r) for r in range(world)]
        assert torch.equal(torch.cat(shards).sort().values, torch.arange(n)), (n, world)
        sizes = [len(s) for s in shards]
        work = [int((s + 1).sum()) for s in shards]
        assert max(sizes) - min(sizes) <= 1, (n, world, sizes)
        assert max(work) - min(work) <= n, (n, world, work)
        for r, s in enumerate(shards):
            early, late = shard_ranges(n, world, r)
            assert torch.equal(s, torch.tensor([*early, *late])) and early.stop <= late.start
            chunk = n // (2 * world)
            assert len(early) in (chunk, chunk + 1) and len(late) in (chunk, chunk + 1)
        chunks = sorted((c for r in range(world) for c in shard_ranges(n, world, r)), key=lambda c: c.start)
        assert [c.start for c in chunks] == [0, *[c.stop for c in chunks[:-1]]]
        owner = {c.start: r for r in range(world) for c in shard_ranges(n, world, r)}
        assert [owner[c.start] for c in chunks] == [*range(world), *reversed(range(world))]


def test_too_short_a_sequence_is_refused_with_advice():
    with pytest.raises(
        AttentionInputError,
        match=r"5 positions cannot be split into 2 x 3 ranks = 6 chunks: "
        r"use at most 2 ranks",
    ):
        shard_indices(5, 3, 0)
    for n, world, rank in ((8, 2, 2), (8, 0, 0), (8, 2, -1), (8.0, 2, 0)):
        with pytest.raises(AttentionInputError):
            shard_indices(n, world, rank)


def test_padding_and_missing_process_group_are_refused():
    q = torch.randn(1, 2, 4, 8)
    lengths = torch.tensor([4])
    for extra in (dict(key_lengths=lengths), dict(query_lengths=lengths), dict(mask=torch.ones(4, 4).bool())):
        with pytest.raises(AttentionInputError, match="does not take key_lengths, query_lengths or mask"):
            context_parallel_attention(q, q, q, n_total=8, **extra)
    with pytest.raises(AttentionInputError, match="does not take StatsSpec.key_mass_queries"):
        context_parallel_attention(q, q, q, n_total=8, stats=StatsSpec(key_mass=True, key_mass_queries=2))
    with pytest.raises(AttentionInputError, match="needs torch.distributed initialised"):
        context_parallel_attention(q, q, q, n_total=8)
    with pytest.raises(AttentionInputError, match="needs torch.distributed initialised"):
        context_parallel_decode(q[:, :, :1], q, q, n_total=8)


if __name__ == "__main__":
    main(sys.argv[1])
