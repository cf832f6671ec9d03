"""Context parallelism through the instrumented forward (issue 17): one sequence spread over 2
gloo ranks on the CPU gives the statistics and logits of a single-process run.

The ranks start once for the module: ``torchrun --standalone --nproc_per_node=2`` runs this file
as a module (``python -m torch.distributed.run ... -m tests.workbench.test_context_parallel_models
OUT``). Each rank runs every case of :data:`CASES` (a tiny random Llama through Hugging Face, the
zoo model and a TransformerLens model with learned positions), through ``instrument(...,
context_parallel=...)`` and through ``record(..., context_parallel=...)``, then prefills its shard
with a KV cache and decodes :data:`STEPS` tokens against the cache split over the ranks, and
saves what it got (safetensors) and the errors it was given (text) under ``OUT``. The tests
compare that with a single-process :func:`workbench.record` (and prefill and decoding) of the
same model and tokens, computed here.

Tolerances: float32 throughout. The shards compute each query row over the same keys, but in
matrices of other shapes (each chunk against the keys before its end), and key mass is summed
over the ranks in another order, so the sums round differently: equal within ``1e-5`` relative
and ``1e-5`` times the largest magnitude absolute (``distance``, a mean position, within
``1e-5 x n``); ``argmax`` exactly.
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

from kernels import StatsSpec
from kernels.context_parallel import shard_indices
from tests.conftest import SEED
from tests.tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
RUN_TIMEOUT, COLLECTIVE_TIMEOUT = 180, 60
SPEC = StatsSpec.all(sink_tokens=2, window=3, offsets=(0, 1, 4))
#: Tokens decoded after the prefill of each case.
STEPS = 3
#: name: model, batch, tokens (``n`` divisible by ``2W = 4`` and not).
CASES = {
    "llama-16": dict(model="llama", b=2, n=16),
    "llama-13": dict(model="llama", b=1, n=13),
    "zoo-14": dict(model="zoo", b=1, n=14),
    "zoo-20": dict(model="zoo", b=2, n=20),
    "tl-standard-11": dict(model="tl-standard", b=1, n=11),
}


def build(kind: str):
    """The model of a case, the same weights in every process (fixed seed)."""
    if kind == "llama":
        return tiny_llama(context=512)
    if kind == "zoo":
        from workbench.models import load_model

        return load_model("zoo-2l", device="cpu")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(SEED)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=50, attn_only=True, act_fn="relu"
    )
    return HookedTransformer(cfg).eval()


def vocab(model) -> int:
    from workbench.adapters import adapter_for

    return adapter_for(model).vocab_size


def case_ids(name: str, model) -> torch.Tensor:
    """The whole sequences ``[b, n]`` of a case (the same in every process)."""
    c = CASES[name]
    gen = torch.Generator().manual_seed(SEED + sorted(CASES).index(name))
    return torch.randint(0, vocab(model), (c["b"], c["n"]), generator=gen)


def case_decoded(name: str, model) -> torch.Tensor:
    """The tokens ``[b, STEPS]`` decoded after a case's sequence (the same in every process)."""
    gen = torch.Generator().manual_seed(SEED + 100 + sorted(CASES).index(name))
    return torch.randint(0, vocab(model), (CASES[name]["b"], STEPS), generator=gen)


def prefill_and_decode(model, ids: torch.Tensor, decoded: torch.Tensor, **instrumented) -> dict[str, torch.Tensor]:
    """Prefill ``ids`` with a KV cache, then decode ``decoded`` one token at a time, instrumented
    (``instrumented``: ``instrument``'s options); the last position's logits of each call
    (``prefill``, ``decode.S``) and each decoding step's statistics (``decode.S.LAYER.NAME``)."""
    from workbench.adapters import adapter_for
    from workbench.instrument import instrument

    adapter = adapter_for(model)
    found = {}
    with torch.no_grad(), instrument(model, SPEC, backend="reference", **instrumented) as rec:
        found["prefill"], cache = adapter.prefill(ids)
        for s in range(decoded.shape[1]):
            found[f"decode.{s}"], cache = adapter.decode(decoded[:, s : s + 1], cache)
    for i in rec.layers:
        for s, st in enumerate(rec.calls[i][1:]):
            found.update({f"decode.{s}.{i}.{k}": t for k, t in st.items()})
    return found


# ----------------------------------------------------------------------------- the ranks (script side)


def _rank_main(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from workbench import distributed
    from workbench.context_parallel import ContextParallel
    from workbench.errors import WorkbenchError
    from workbench.instrument import instrument, record
    from workbench.recording import PatternSpec

    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    rank = dist.get_rank()
    models = {}
    for name, c in CASES.items():
        model = models.get(c["model"]) or models.setdefault(c["model"], build(c["model"]))
        ids = case_ids(name, model)
        cp = ContextParallel(c["n"])
        found = {}
        with torch.no_grad():
            with instrument(model, SPEC, backend="reference", context_parallel=cp) as rec:
                logits = model(cp.shard(ids))
            found["logits"] = getattr(logits, "logits", logits)
            found.update({f"instrument.{i}.{k}": t for i in rec.layers for k, t in rec.layer(i).items()})
            rec = record(model, ids, SPEC, backend="reference", progress=False, context_parallel=True)
            found.update({f"record.{i}.{k}": t for i in rec.layers for k, t in rec.layer(i).items()})
            found["record.tokens"] = torch.cat(rec.tokens)
            kept = ContextParallel(c["n"], gather=False)
            with instrument(model, SPEC, backend="reference", context_parallel=kept) as rec:
                model(kept.shard(ids))
            found.update({f"shard.{i}.{k}": t for i in rec.layers for k, t in rec.layer(i).items()})
        decoding = prefill_and_decode(model, cp.shard(ids), case_decoded(name, model), context_parallel=cp)
        found.update({f"split.{k}": t for k, t in decoding.items()})
        save_file({k: t.contiguous() for k, t in found.items()}, str(out / f"{name}-{rank}.safetensors"))

    # Refusals, each before any collective (every rank refuses alike, none waits for another).
    llama = models["llama"]
    ids = case_ids("llama-13", llama)
    attempts = {
        "too-short": lambda: record(llama, ids[:, :3], SPEC, progress=False, context_parallel=True),
        "padding": lambda: record(
            llama, [ids[0, :9].tolist(), ids[0].tolist()], SPEC, batch_size=2, progress=False, context_parallel=True
        ),
        "whole-sequence": lambda: _run_in(llama, ContextParallel(13), ids),
        "whole-sequence-tl": lambda: _run_in(models["zoo"], ContextParallel(13), case_ids("llama-13", models["zoo"])),
        "patterns": lambda: instrument(
            models["zoo"], SPEC, patterns=PatternSpec((0,)), context_parallel=ContextParallel(13)
        ).__enter__(),
        "not-a-group": lambda: record(llama, ids, SPEC, progress=False, context_parallel="world"),
        "mask-hf": lambda: _run_in(llama, ContextParallel(13), ids, padded=True),
        "two-tokens-hf": lambda: _decode_two(llama, ids),
        "two-tokens-tl": lambda: _decode_two(models["zoo"], case_ids("llama-13", models["zoo"])),
    }
    for key, attempt in attempts.items():
        try:
            with torch.no_grad():
                attempt()
            message = "no error"
        except WorkbenchError as exc:
            message = str(exc)
        (out / f"error-{key}-{rank}.txt").write_text(message)
    distributed.barrier()
    dist.destroy_process_group()


def _decode_two(model, ids) -> None:
    """Two tokens decoded at once after a context-parallel prefill."""
    from workbench.adapters import adapter_for
    from workbench.context_parallel import ContextParallel
    from workbench.instrument import instrument

    cp = ContextParallel(ids.shape[1])
    adapter = adapter_for(model)
    with instrument(model, SPEC, backend="reference", context_parallel=cp):
        _, cache = adapter.prefill(cp.shard(ids))
        adapter.decode(ids[:, :2], cache)


def _run_in(model, cp, ids, padded: bool = False) -> None:
    """The model called, under context parallelism, on all of ``ids`` (not the shard), or on the
    shard with a padding mask."""
    from workbench.instrument import instrument

    with instrument(model, SPEC, backend="reference", context_parallel=cp):
        if padded:
            mask = torch.ones(cp.shard(ids).shape, dtype=torch.int64)
            mask[:, -1] = 0
            model(input_ids=cp.shard(ids), attention_mask=mask)
        else:
            model(ids)


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory) -> Path:
    """Run the ranks once for the module; the folder of their results."""
    out = tmp_path_factory.mktemp("cp_models")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    cmd += ["-m", "tests.workbench.test_context_parallel_models", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks share torchrun's process group
        log, _ = proc.communicate()
        pytest.fail(f"the distributed run took over {RUN_TIMEOUT} s:\n{log[-6000:]}")
    assert proc.returncode == 0, f"the distributed run failed:\n{log[-6000:]}"
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    """Per case: the single-process statistics (``{layer}.{name}``) and logits."""
    from workbench.instrument import instrument, record

    found, models = {}, {}
    for name, c in CASES.items():
        model = models.get(c["model"]) or models.setdefault(c["model"], build(c["model"]))
        ids = case_ids(name, model)
        rec = record(model, ids, SPEC, backend="reference", progress=False)
        want = {f"{i}.{k}": t for i in rec.layers for k, t in rec.layer(i).items()}
        with torch.no_grad(), instrument(model, SPEC, backend="reference"):
            logits = model(ids)
        want["logits"] = getattr(logits, "logits", logits)
        want["tokens"] = ids
        want.update({f"split.{k}": t for k, t in prefill_and_decode(model, ids, case_decoded(name, model)).items()})
        found[name] = want
    return found


def _load(out: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / f"{name}-{rank}.safetensors"))


def _close(got: torch.Tensor, want: torch.Tensor, key: str, n: int) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (key, got.shape, want.shape)
    if key.endswith("argmax"):
        assert torch.equal(got, want), key
    else:
        scale = n if key.endswith("distance") else max(1.0, float(want.abs().max()))  # logits reach ~5
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_records_the_single_process_statistics(ranks_out, reference, name):
    """instrument(...) and record(...) under context parallelism give, on every rank, every
    statistic of the whole sequence in global position order, as one process records them."""
    want = {k: t for k, t in reference[name].items() if k not in ("logits", "tokens") and not k.startswith("split.")}
    assert {k.split(".")[0] for k in want} == {"0", "1"} and {"0.key_mass", "1.offset_mass"} <= set(want)
    for rank in range(WORLD):
        got = _load(ranks_out, name, rank)
        for way in ("instrument", "record"):
            mine = {k.removeprefix(f"{way}."): t for k, t in got.items() if k.startswith(f"{way}.")}
            mine.pop("tokens", None)
            assert sorted(mine) == sorted(want), (way, rank)
            for key, t in want.items():
                _close(mine[key], t, f"{name} {way} rank {rank} {key}", CASES[name]["n"])
        assert torch.equal(got["record.tokens"], reference[name]["tokens"])


@pytest.mark.parametrize("name", list(CASES))
def test_logits_are_the_shard_positions_in_shard_order(ranks_out, reference, name):
    c = CASES[name]
    for rank in range(WORLD):
        where = shard_indices(c["n"], WORLD, rank)
        got = _load(ranks_out, name, rank)["logits"]
        _close(got, reference[name]["logits"][:, where], f"{name} logits rank {rank}", c["n"])


@pytest.mark.parametrize("name", ["llama-13", "zoo-20"])
def test_without_gather_each_rank_keeps_its_rows_in_shard_order(ranks_out, reference, name):
    c = CASES[name]
    for rank in range(WORLD):
        where = shard_indices(c["n"], WORLD, rank)
        got = _load(ranks_out, name, rank)
        for key, t in reference[name].items():
            if key in ("logits", "tokens") or key.startswith("split."):
                continue
            _close(got[f"shard.{key}"], t[:, :, where], f"{name} shard rank {rank} {key}", c["n"])


@pytest.mark.parametrize("name", list(CASES))
def test_decoding_against_the_split_cache_equals_one_process(ranks_out, reference, name):
    """After the prefill of each rank's shard, every decoded token's logits and statistics (every
    statistic, argmax a global key, key mass over every key) are one process's, on every rank;
    the prefill's last logits are those of rank 0, which holds the last position."""
    want = {k: t for k, t in reference[name].items() if k.startswith("split.decode.")}
    assert len(want) == STEPS * (1 + 2 * len(SPEC.output_fields())), sorted(want)
    for rank in range(WORLD):
        got = _load(ranks_out, name, rank)
        assert sorted(k for k in got if k.startswith("split.decode.")) == sorted(want)
        for key, t in want.items():
            _close(got[key], t, f"{name} rank {rank} {key}", CASES[name]["n"] + STEPS)
    _close(_load(ranks_out, name, 0)["split.prefill"], reference[name]["split.prefill"], "prefill", 1)


ERRORS = {
    "too-short": "3 positions cannot be split into 2 x 2 ranks = 4 chunks",
    "padding": "context parallelism takes no padding",
    "whole-sequence": "holds 13 positions, but rank",
    "whole-sequence-tl": "holds 13 positions, but rank",
    "patterns": "patterns= are not available under context parallelism",
    "not-a-group": "context_parallel= takes True",
    "mask-hf": "context parallelism takes no padding",
    "two-tokens-hf": "decode one token at a time",
    "two-tokens-tl": "decode one token at a time",
}


@pytest.mark.parametrize("key", list(ERRORS))
def test_bad_input_is_refused_on_every_rank(ranks_out, key):
    for rank in range(WORLD):
        assert ERRORS[key] in (ranks_out / f"error-{key}-{rank}.txt").read_text(), (key, rank)


def test_context_parallelism_needs_an_initialised_group(zoo):
    from workbench.context_parallel import ContextParallel
    from workbench.errors import WorkbenchError
    from workbench.instrument import record

    with pytest.raises(WorkbenchError, match="needs torch.distributed initialised"):
        ContextParallel(16)
    with pytest.raises(WorkbenchError, match="needs torch.distributed initialised"):
        record(zoo, torch.zeros(1, 16, dtype=torch.int64), progress=False, context_parallel=True)


def test_transformer_lens_configs_without_global_positions_are_named():
    from transformer_lens import HookedTransformerConfig

    from workbench.adapters.transformer_lens import context_parallel_problems

    base = dict(n_layers=1, d_model=16, n_ctx=32, d_head=4, n_heads=4, d_vocab=20, attn_only=True, act_fn="relu")
    assert context_parallel_problems(HookedTransformerConfig(**base)) == []
    rotary = HookedTransformerConfig(**base, positional_embedding_type="rotary", rotary_dim=4)
    assert context_parallel_problems(rotary) == []
    ntk = HookedTransformerConfig(**base, positional_embedding_type="rotary", rotary_dim=4, use_dynamic_ntk_rope=True)
    assert any("dynamic NTK" in p for p in context_parallel_problems(ntk))
    alibi = HookedTransformerConfig(**base, positional_embedding_type="alibi")
    assert any("alibi" in p for p in context_parallel_problems(alibi))


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))


def test_attention_variants_are_refused_under_context_parallelism(tmp_path):
    """A layer with a window, soft-cap, sinks or ALiBi is refused by ContextParallel.attend (the
    one place both adapters route through), before any collective: a one-process gloo group."""
    import torch.distributed as dist

    from workbench.context_parallel import ContextParallel
    from workbench.errors import WorkbenchError
    from workbench.recording import Recording

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        cp = ContextParallel(8)
        q = torch.randn(1, 2, 8, 4)
        kwargs = dict(causal=True, scale=None, stats=SPEC, backend="reference")
        with pytest.raises(WorkbenchError, match=r"does not take window, softcap yet \(layer 3\)"):
            cp.attend(Recording(SPEC, 4), 3, q, q, q, window=4, softcap=5.0, **kwargs)
        rec = Recording(SPEC, 4)
        assert cp.attend(rec, 3, q, q, q, **kwargs).shape == q.shape and rec.layers == [3]
    finally:
        dist.destroy_process_group()
