"""Bad input, tried: every kind a user can cause ends in the project's own error with a message
that says what to do (or in a documented result), and a refused command writes nothing.

Grouped as docs/reliability.md's table: the kernel API, load_model, record / instrument, the CLI.
"""

from __future__ import annotations

import hashlib
import math
import socket

import pytest
import torch
from typer.testing import CliRunner

import workbench.models as models
import workbench.zoo
from kernels import AttentionInputError, StatsSpec, attention
from tests.conftest import SEED
from tests.workbench.test_instrument_transformer_lens import tiny_model
from workbench import PatternSpec, Recording, WorkbenchError, instrument, record
from workbench.models import load_model, resolve_device, resolve_dtype

BACKENDS = ("reference", "triton")
runner = CliRunner()


def qkv(b=2, hq=4, hkv=2, nq=8, nk=8, d=32, device="cpu", seed=SEED):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, nq, d, generator=gen).to(device),
        torch.randn(b, hkv, nk, d, generator=gen).to(device),
        torch.randn(b, hkv, nk, d, generator=gen).to(device),
    )


# ----------------------------------------------------------------------------- kernel API

BAD_KERNEL_CALLS = {
    "not-a-tensor": (lambda q, k, v: (q.numpy(), k, v, {}), "must be a torch.Tensor"),
    "more-kv-heads-than-q-heads": (lambda q, k, v: (q[:, :1], k, v, {}), "multiple of key/value heads"),
    "v-head-dim-differs": (lambda q, k, v: (q, k, v[..., :16], {}), "k and v must have the same shape"),
    "bool-dtype": (lambda q, k, v: (q.bool(), k.bool(), v.bool(), {}), "not supported"),
    "complex-dtype": (lambda q, k, v: (q.cfloat(), k.cfloat(), v.cfloat(), {}), "not supported"),
    "head-dim-0": (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0], {}), "head_dim and head counts must be"),
    "key-lengths-bool": (lambda q, k, v: (q, k, v, {"key_lengths": torch.tensor([True, True])}), "integer tensor"),
    "key-lengths-negative": (
        lambda q, k, v: (q, k, v, {"key_lengths": torch.tensor([-1, 3])}),
        r"key_lengths must lie in \[0, 8\]",
    ),
    "query-lengths-negative": (
        lambda q, k, v: (q, k, v, {"query_lengths": torch.tensor([2, -3])}),
        r"query_lengths must lie in \[0, 8\]",
    ),
    "key-lengths-other-device": (
        lambda q, k, v: (q, k, v, {"key_lengths": torch.tensor([3, 3], device="meta")}),
        "key_lengths is on meta",
    ),
    "scale-inf": (lambda q, k, v: (q, k, v, {"scale": math.inf}), "finite"),
    "scale-text": (lambda q, k, v: (q, k, v, {"scale": "0.1"}), "scale must be a real number"),
    "scale-bool": (lambda q, k, v: (q, k, v, {"scale": True}), "scale must be a real number"),
    "causal-none": (lambda q, k, v: (q, k, v, {"causal": None}), "causal must be True or False"),
    "backend-none": (lambda q, k, v: (q, k, v, {"backend": None}), "unknown backend None"),
}


@pytest.mark.parametrize("make, match", BAD_KERNEL_CALLS.values(), ids=BAD_KERNEL_CALLS.keys())
def test_kernel_refuses_bad_calls(make, match):
    """Each bad call raises AttentionInputError naming the problem (checked before any backend runs)."""
    q, k, v, kwargs = make(*qkv())
    with pytest.raises(AttentionInputError, match=match):
        attention(q, k, v, **{"backend": "reference", **kwargs})


def test_triton_refuses_meta_tensors_that_the_reference_takes():
    """Meta tensors have no data: the reference backend gives outputs of the right shapes, the
    Triton backend (interpreter: CPU memory only) refuses them with a pointer to the reference."""
    q, k, v = (t.to("meta") for t in qkv())
    out, st = attention(q, k, v, backend="reference", stats=StatsSpec(entropy=True))
    assert out.is_meta and out.shape == q.shape and st.entropy.shape == (2, 4, 8)
    if not torch.cuda.is_available():  # on a GPU machine the meta check sits behind the CUDA one
        with pytest.raises(AttentionInputError, match="use backend='reference'"):
            attention(q, k, v, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_give_the_results_of_contiguous_copies(backend, device):
    """Transposed storage, a slice of a wider head dim, a stride-2 last dim and K/V heads
    expanded with stride 0 all give what the contiguous copies give."""
    gen = torch.Generator().manual_seed(SEED)
    q = torch.randn(2, 12, 4, 64, generator=gen).to(device).transpose(1, 2)[..., :32]  # [2, 4, 12, 32]
    k = torch.randn(2, 2, 12, 64, generator=gen).to(device)[..., ::2]
    v = torch.randn(2, 1, 12, 32, generator=gen).to(device).expand(2, 2, 12, 32)
    assert not any(t.is_contiguous() for t in (q, k, v))
    spec = StatsSpec.all(sink_tokens=1, window=4, offsets=(1, 2))
    out, st = attention(q, k, v, stats=spec, backend=backend)
    want, want_st = attention(q.contiguous(), k.contiguous(), v.contiguous(), stats=spec, backend=backend)
    torch.testing.assert_close(out, want)
    for name, t in want_st.items():
        torch.testing.assert_close(getattr(st, name), t, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_results(backend, device):
    """B = 0 (and Hq = 0): zero-size output and statistics of the right shapes, no error."""
    for b, hq in ((0, 4), (2, 0)):
        q, k, v = qkv(b=b, hq=hq, device=device)
        out, st = attention(q, k, v, stats=StatsSpec.all(), backend=backend)
        assert out.shape == (b, hq, 8, 32) and st.entropy.shape == (b, hq, 8) and st.key_mass.shape == (b, hq, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_settings_beyond_the_keys_are_documented_results(backend, device):
    """sink_tokens or window larger than the keys cover every key (mass 1); an offset beyond the
    first key has no target (mass 0); both backends agree with each other."""
    q, k, v = qkv(device=device)
    _, st = attention(q, k, v, stats=StatsSpec(sink_tokens=100, window=10**6, offsets=(100, 7)), backend=backend)
    torch.testing.assert_close(st.sink_mass, torch.ones_like(st.sink_mass))
    torch.testing.assert_close(st.local_mass, torch.ones_like(st.local_mass))
    assert torch.all(st.offset_mass[..., 0] == 0)  # no key 100 back
    assert torch.all(st.offset_mass[..., 1][..., :7] == 0) and torch.all(st.offset_mass[..., 1][..., 7] > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_zero_gives_uniform_attention(backend, device):
    """scale=0 is allowed: every visible key gets the same weight (output = running mean of V,
    entropy = ln(number of keys))."""
    q, k, v = qkv(b=1, hq=2, hkv=2, nq=6, nk=6, device=device)
    out, st = attention(q, k, v, scale=0.0, stats=StatsSpec(entropy=True), backend=backend)
    seen = torch.arange(1, 7, device=device, dtype=torch.float32)
    torch.testing.assert_close(out, v.cumsum(2) / seen.view(1, 1, -1, 1))
    torch.testing.assert_close(st.entropy, torch.log(seen).expand_as(st.entropy))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)  # (the interpreter's numpy warns on the NaN row)
def test_nan_or_inf_in_one_batch_row_leaves_the_others_alone(backend, device):
    """A NaN or infinity in q, k or v of batch entry 1 changes nothing, bit for bit, in entries 0
    and 2 (output and every statistic). What entry 1 gets is not specified (garbage in)."""
    q, k, v = qkv(b=3, nq=12, nk=12, device=device)
    spec = StatsSpec.all(sink_tokens=1, window=4, offsets=(1,))
    clean_out, clean = attention(q, k, v, stats=spec, backend=backend)
    others = [0, 2]
    for which in range(3):
        for bad in (math.nan, math.inf):
            tensors = [t.clone() for t in (q, k, v)]
            tensors[which][1, 0, 3, 5] = bad
            out, st = attention(*tensors, stats=spec, backend=backend)
            assert torch.equal(out[others], clean_out[others]), ("qkv"[which], bad)
            for name, t in st.items():
                assert torch.equal(t[others], getattr(clean, name)[others]), ("qkv"[which], bad, name)


# ----------------------------------------------------------------------------- load_model


@pytest.fixture
def no_zoo_loading(monkeypatch):
    """Loading a zoo model fails the test: the refusals below must come before any weights load."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad argument was refused")

    monkeypatch.setattr(workbench.zoo, "load", refuse)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device": "gpu"}, "unknown device 'gpu': use cpu, cuda or cuda:N"),
        ({"device": 3.5}, "unknown device 3.5"),
        ({"dtype": torch.int32}, "dtype must be one of float32, float16, bfloat16, float64"),
        ({"dtype": "int8"}, "got 'int8'"),
    ],
    ids=["device-name", "device-type", "dtype-int", "dtype-name"],
)
def test_bad_device_or_dtype_is_refused_before_loading(no_zoo_loading, kwargs, match):
    with pytest.raises(WorkbenchError, match=match):
        load_model("zoo-2l", **kwargs)


def test_missing_cuda_devices_are_refused(monkeypatch, no_zoo_loading):
    """The same on any machine: CUDA is switched off / limited to one GPU here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(WorkbenchError, match="no usable CUDA GPU: use cpu"):
        load_model("zoo-2l", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(WorkbenchError, match=r"has 1 CUDA GPU\(s\): use cuda:0 .. cuda:0"):
        load_model("zoo-2l", device="cuda:3")
    assert resolve_device("cpu") == torch.device("cpu")


def test_dtype_names_are_accepted():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(None) is None and resolve_dtype(torch.float64) is torch.float64


def test_a_missing_local_folder_is_named(tmp_path):
    with pytest.raises(WorkbenchError, match=f"no folder {tmp_path / 'nope'}: give the folder of a saved model"):
        load_model(str(tmp_path / "nope"))


@pytest.fixture
def hub_env(monkeypatch):
    """No offline switch and no proxy in the environment; huggingface_hub not in offline mode."""
    from huggingface_hub import constants

    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    tried = []

    def connect(address, timeout=None):
        tried.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", connect)
    return tried


def test_an_unreachable_hub_fails_at_once_in_offline_mode(hub_env, monkeypatch):
    """One failed connection attempt puts the hub libraries in offline mode for the load (no
    retries: those took ~25 s), the error says why, and the mode is restored afterwards."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    seen = []

    def from_pretrained(name, *args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        raise OSError("not in the cache")

    monkeypatch.setattr(AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(
        WorkbenchError,
        match=r"hub is unreachable \(cannot reach huggingface.co:443: network is "
        r"unreachable\), and from the local cache: not in the cache",
    ):
        load_model("hf:someone/not-a-model-xyz", device="cpu")
    assert hub_env == [("huggingface.co", 443)] and seen == [True] and constants.HF_HUB_OFFLINE is False


def test_hub_reachability_reads_the_environment_now(hub_env, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert models.hub_offline_reason() == "TRANSFORMERS_OFFLINE is set" and hub_env == []
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the proxy is what must answer
    assert "cannot reach proxy.example:3128" in models.hub_offline_reason()
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: socket.socket())
    assert models.hub_offline_reason() is None


def test_a_zoo_typo_offline_suggests_the_zoo_name(monkeypatch, no_zoo_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match=r"HF_HUB_OFFLINE is set.*\nDid you mean 'zoo-2l'\?"):
        load_model("zoo-3l", device="cpu")


# ----------------------------------------------------------------------------- record / instrument


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("standard")  # 2 layers x 4 heads, vocabulary 61, context 96


BAD_RECORD_INPUTS = {
    "none": (None, "cannot record input of type NoneType"),
    "int": (5, "cannot record input of type int"),
    "dict": ({"ids": [1, 2]}, "cannot record input of type dict"),
    "flat-list-of-ints": ([1, 2, 3], "flat list of 3 ints: pass \\[ids\\]"),
    "texts-and-ids": ([[1, 2], "ab"], "mixes texts and token ids"),
    "float-ids-in-lists": ([[1.0, 2.0]], "input 0 must be a flat sequence of integer token ids, got torch.float32"),
    "nested-ids": ([[[1, 2]], [3]], r"input 0 must be a flat sequence of integer token ids, got torch.int64 \(1, 2\)"),
    "negative-id": ([[1, -5]], r"token ids must lie in \[0, 61\)"),
    "bool-ids": (torch.ones(1, 3, dtype=torch.bool), "integer tensor"),
    "no-tokens": (torch.zeros(2, 0, dtype=torch.long), r"empty input \(2, 0\)"),
    "meta-ids": (torch.ones(1, 3, dtype=torch.long, device="meta"), "meta device hold no values"),
}


@pytest.mark.parametrize("inputs, match", BAD_RECORD_INPUTS.values(), ids=BAD_RECORD_INPUTS.keys())
def test_record_refuses_bad_inputs(tiny, inputs, match):
    with pytest.raises(WorkbenchError, match=match):
        record(tiny, inputs, progress=False)
    assert "forward" not in vars(tiny.blocks[0].attn)  # never instrumented, or restored


def test_record_takes_any_integer_id_dtype(tiny):
    ids = torch.tensor([[1, 2, 3, 60]])
    want = record(tiny, ids, progress=False).layer(1).entropy
    for dtype in (torch.int32, torch.uint8):  # uint8 would index as a mask if passed on
        torch.testing.assert_close(record(tiny, ids.to(dtype), progress=False).layer(1).entropy, want)


def test_record_refuses_batch_and_bucket_sizes_that_are_no_counts(tiny):
    for bad in (1.5, "2", True):
        with pytest.raises(WorkbenchError, match="batch_size must be an int >= 1"):
            record(tiny, [[1, 2]], batch_size=bad, progress=False)
    with pytest.raises(WorkbenchError, match="bucket_size must be >= 1, got 0"):
        record(tiny, [[1, 2]], bucket_size=0, progress=False)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: PatternSpec(layers=3), r"layers must be a sequence of indices, e.g. \(0, 2\)"),
        (lambda: PatternSpec(layers=(-1,)), r"layers must hold indices >= 0, got \[-1\]"),
        (lambda: PatternSpec(layers=(0,), heads=(1.5,)), r"heads must hold indices >= 0, got \[1.5\]"),
        (lambda: PatternSpec(layers=(0,), max_tokens=0), "max_tokens must be an int >= 1"),
    ],
    ids=["layers-int", "layer-negative", "head-float", "max-tokens-0"],
)
def test_pattern_spec_refuses_bad_values(make, match):
    with pytest.raises(WorkbenchError, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"patterns": PatternSpec(layers=(0,), heads=(4,))},
            r"pattern heads \[4\] out of range: the model has 4 heads",
        ),
        ({"patterns": {"layers": (0,)}}, "patterns= takes a workbench.PatternSpec, got dict"),
        ({"stats": "all"}, "stats must be a kernels.StatsSpec"),
        ({"backend": "fast"}, "unknown kernel backend 'fast'"),
        ({"into": []}, "into= takes a Recording, a StreamingSummary"),
    ],
    ids=["head-out-of-range", "patterns-dict", "stats-str", "backend", "into-list"],
)
def test_instrument_refuses_bad_settings_and_leaves_the_model_alone(tiny, kwargs, match):
    with pytest.raises(WorkbenchError, match=match):
        with instrument(tiny, **kwargs):
            pass
    assert "forward" not in vars(tiny.blocks[0].attn) and not hasattr(tiny, "_workbench_instrumented")
    with instrument(tiny, patterns=PatternSpec(layers=(1,), heads=(3,))) as rec:  # still usable, in range
        tiny(torch.tensor([[1, 2, 3]]))
    assert isinstance(rec, Recording) and rec.patterns[1][0].shape == (1, 1, 3, 3)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(zoo, monkeypatch):
    """The `workbench` app with the probes' commands; zoo-2l comes from the module's one load."""
    from probes.cli import register
    from workbench.cli import app

    register(app)
    monkeypatch.setattr(workbench.zoo, "load", lambda name, *args, **kwargs: zoo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub names fail at once, network or not

    def invoke(*args: str, env: dict | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    return invoke


@pytest.fixture(scope="module")
def scored_run(zoo, tmp_path_factory):
    """A small complete run (repeats, 128 tokens, 1 sample), without PNG figures."""
    import plotly.io as pio

    from workbench.scoring import ScoreRunSettings, score_model

    def no_png(*args, **kwargs):
        raise RuntimeError("PNG export switched off")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pio, "write_images", no_png)
        return score_model(
            zoo,
            ScoreRunSettings(model="zoo-2l", tasks=("repeats",), lengths=(128,), samples=1),
            tmp_path_factory.mktemp("bad-input") / "run",
            progress=False,
        ).path


def snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(result, *fragments: str) -> None:
    """Exit status 2, `error:` and the fragments in the output, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "error: " in result.output and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


SCORE_REFUSALS = {
    "device-name": (["--device", "gpu"], ["unknown device 'gpu'"]),
    "dtype-int": (["--dtype", "int32"], ["dtype must be float32, float16 or bfloat16, got 'int32'"]),
    "model-typo-offline": (["--model", "zoo-3l"], ["could not load model 'zoo-3l'", "Did you mean 'zoo-2l'?"]),
    "top-0": (["--top", "0"], ["Invalid value for '--top'", "(see `"]),
    "samples-not-a-number": (["--samples", "x"], ["Invalid value for '--samples'"]),
    "unknown-option": (["--bogus"], ["No such option: --bogus"]),
}


@pytest.mark.parametrize("args, fragments", SCORE_REFUSALS.values(), ids=SCORE_REFUSALS.keys())
def test_score_refusals_write_nothing(cli, tmp_path, args, fragments):
    out = tmp_path / "run"
    refused(cli("score", "--task", "repeats", "--lengths", "128", "--out", out, *args), *fragments)
    assert not out.exists()


def test_score_out_must_be_a_folder(cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    refused(cli("score", "--out", afile), f"{afile} is a file, not a folder: choose another --out")
    refused(cli("score", "--out", afile / "run"), f"{afile} (in --out {afile / 'run'}) is a file")
    assert afile.read_text() == "keep me"


def test_a_refused_request_leaves_an_existing_run_untouched(cli, scored_run):
    before = snapshot(scored_run)
    refused(
        cli("score", "--task", "repeats", "--lengths", "128", "--samples", "1", "--device", "gpu", "--out", scored_run),
        "unknown device",
    )
    refused(cli("runs", "show", scored_run, "--top", "0"), "Invalid value for '--top'")
    assert snapshot(scored_run) == before


def test_usage_errors_read_the_same_on_any_terminal(cli):
    for columns in ("20", "400"):
        refused(
            cli("score", "--samples", "x", env={"COLUMNS": columns}),
            "error: Invalid value for '--samples' / '-s': Input should be a valid integer",
        )
    refused(cli("demo", "--tokens", "1"), "Invalid value for '--tokens'")
    assert "Usage:" in cli("zoo").output  # a bare group still shows its help


def test_zoo_and_bench_refusals(cli, tmp_path, monkeypatch):
    import kernels.benchmark

    def too_late(*args, **kwargs):
        raise AssertionError("the work started before the bad --out was refused")

    monkeypatch.setattr(workbench.zoo, "train", too_late)
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(cli("zoo", "list", "extra"), "Got unexpected extra argument(s) (extra)")
    refused(cli("zoo", "train", "zoo-2l", "--out", afile), "is a file, not a folder")  # before any training
    with monkeypatch.context() as mp:
        mp.setattr(kernels.benchmark, "main", too_late)
        refused(cli("bench", "--smoke", "--out", afile / "bench"), "is a file, not a folder")
    result = cli("bench", "--smoke", "--heads", "0")  # argparse's own report: exit 2, no traceback
    assert result.exit_code == 2 and "error: --heads must be positive" in result.output
    assert "Traceback" not in result.output


#: A small ablation of the scored run (its folder goes between the two), each refusal's arguments after.
ABLATE_ARGS = ("ablate", "--run")
ABLATE_SETTINGS = (
    "--rank-by",
    "induction",
    "--task",
    "repeats",
    "--k",
    "1",
    "--samples",
    "1",
    "--draws",
    "1",
    "--length",
    "33",
)

ABLATE_REFUSALS = {
    "length-beyond-context": (["--length", "4096"], ["--length 4096 is longer than the model's context of 2048"]),
    "k-zero": (["--k", "0"], ["k must lie in 1..4"]),
    "draws-zero": (["--draws", "0"], ["Invalid value for '--draws'"]),
    "device-name": (["--device", "gpu"], ["unknown device 'gpu'"]),
    "model-typo-offline": (["--model", "zoo-3l"], ["Did you mean 'zoo-2l'?"]),
    "control": (["--control", "nearby"], ["control must be one of 'non_top', 'all', 'same_layers'"]),
    "length-too-short": (["--length", "4"], ["--length 4 is too short for repeats samples"]),
}


@pytest.mark.parametrize("args, fragments", ABLATE_REFUSALS.values(), ids=ABLATE_REFUSALS.keys())
def test_ablate_refusals_leave_the_run_untouched(cli, scored_run, args, fragments):
    before = snapshot(scored_run)
    refused(
        cli(*ABLATE_ARGS, scored_run, *ABLATE_SETTINGS, *args),
        *fragments,
    )
    assert snapshot(scored_run) == before


def test_ablate_needs_a_run_folder(cli, tmp_path):
    refused(cli("ablate", "--run", tmp_path / "missing"), "is not a run folder")
    refused(cli("ablate"), "Missing option '--run'")


SAE_REFUSALS = {
    "d-sae-0": (["--d-sae", "0"], ["Invalid value for '--d-sae'"]),
    "k-above-d-sae": (["--k", "64", "--d-sae", "32"], ["--k 64 active features cannot exceed --d-sae 32"]),
    "too-few-tokens": (["--tokens", "100"], ["Invalid value for '--tokens'", "2048"]),
    "negative-l1": (["--architecture", "standard", "--l1", "-1"], ["Invalid value for '--l1'"]),
    "length-1": (["--length", "1"], ["Invalid value for '--length'"]),
    "length-beyond-context": (["--length", "4096"], ["--length 4096 is longer than the model's context of 2048"]),
    "device-name": (["--device", "gpu"], ["unknown device 'gpu'"]),
}


@pytest.mark.parametrize("args, fragments", SAE_REFUSALS.values(), ids=SAE_REFUSALS.keys())
def test_sae_train_refusals_write_nothing(cli, tmp_path, args, fragments):
    out = tmp_path / "sae"
    refused(
        cli(
            "sae", "train", "--layer", "0", "--samples", "4", "--length", "64", "--tokens", "4096", "--out", out, *args
        ),
        *fragments,
    )
    assert not out.exists()


def test_sae_out_and_eval_refusals(cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(cli("sae", "train", "--layer", "0", "--out", afile), "is a file, not a folder")
    refused(cli("sae", "eval", tmp_path, "--layer", "0", "--length", "4096"), "longer than the model's context")
    refused(cli("sae", "eval", tmp_path / "missing", "--layer", "0"), "holds no sae-lens SAE (no cfg.json)")


EARLY_ABLATE_REFUSALS = {
    "method": (["--method", "shuffle"], ["unknown ablation method 'shuffle'"]),
    "control": (["--control", "nearby"], ["control must be one of 'non_top', 'all', 'same_layers'"]),
    "length-too-short": (["--length", "4"], ["--length 4 is too short for repeats samples"]),
    "metric-of-another-task": (["--metric", "needle_accuracy"], ["does not fit task repeats"]),
    "k-not-integers": (["--k", "1,two"], ["--k must be comma-separated integers, got '1,two'"]),
    "score-missing": (["--rank-by", "retrieval"], ["no 'retrieval' score"]),
}


@pytest.mark.parametrize("args, fragments", EARLY_ABLATE_REFUSALS.values(), ids=EARLY_ABLATE_REFUSALS.keys())
def test_ablate_refuses_bad_settings_before_the_model_loads(cli, scored_run, monkeypatch, args, fragments):
    def too_late(*args, **kwargs):
        raise AssertionError("the model loaded before the bad settings were refused")

    monkeypatch.setattr(workbench.zoo, "load", too_late)
    before = snapshot(scored_run)
    refused(
        cli(*ABLATE_ARGS, scored_run, *ABLATE_SETTINGS, *args),
        *fragments,
    )
    assert snapshot(scored_run) == before


EARLY_SAE_REFUSALS = {
    "architecture": (["--architecture", "gated"], ["unknown SAE architecture 'gated'; choose one of: standard, topk"]),
    "k-above-d-sae": (["--k", "9", "--d-sae", "8"], ["--k 9 active features cannot exceed --d-sae 8"]),
    "out-is-a-file": (["--out", "afile"], ["is a file, not a folder"]),
}


@pytest.mark.parametrize("args, fragments", EARLY_SAE_REFUSALS.values(), ids=EARLY_SAE_REFUSALS.keys())
def test_sae_train_refuses_bad_settings_before_the_model_loads(cli, tmp_path, monkeypatch, args, fragments):
    def too_late(*args, **kwargs):
        raise AssertionError("the model loaded before the bad settings were refused")

    monkeypatch.setattr(workbench.zoo, "load", too_late)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    refused(cli("sae", "train", "--layer", "0", "--out", "sae", *args), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "x"


def test_sae_eval_refuses_a_negative_layer_before_the_model_loads(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(workbench.zoo, "load", lambda *args, **kwargs: pytest.fail("the model loaded"))
    refused(cli("sae", "eval", tmp_path, "--layer", "-1"), "an SAE evaluation needs layer >= 0")
