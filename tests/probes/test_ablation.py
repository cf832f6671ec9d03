"""Head ablation on the zoo model (TransformerLens) and a small Llama (Hugging Face)."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from probes import ablation
from probes.ablation import AblationSettings
from probes.cli import ablate, register
from tests.conftest import SEED
from tests.tiny_models import tiny_llama
from workbench import WorkbenchError, instrument
from workbench.adapters import adapter_for
from workbench.adapters.transformer_lens import TransformerLensAdapter
from workbench.cli import app
from workbench.console import parse_list
from workbench.runs import Run
from workbench.scoring import ScoreRunSettings, score_model
from workbench.scoring.formulas import ScoreSettings, stats_spec
from workbench.tasks import needle_samples, repeat_samples, text_samples


@pytest.fixture(scope="module")
def scored(zoo, tmp_path_factory):
    """A run of the zoo model with induction and retrieval scores."""
    settings = ScoreRunSettings(
        model="zoo-2l",
        tasks=("niah", "repeats"),
        scores=("induction", "retrieval"),
        lengths=(256,),
        samples=6,
        depths=(0.3, 0.7),
    )
    return score_model(zoo, settings, tmp_path_factory.mktemp("runs") / "zoo", progress=False)


@pytest.mark.parametrize("which", ["zoo", "llama"])
def test_zero_ablation_equals_a_model_without_that_head(which, zoo):
    """Zero-ablating head h equals zeroing the columns of the output projection that read h;
    mean and resample ablation put the reference's values in place of h's output."""
    model = zoo if which == "zoo" else tiny_llama()
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(SEED))
    layer, head = 1, int(torch.randint(0, 4, (), generator=torch.Generator().manual_seed(SEED)))
    logits = adapter_for(model).logits
    with torch.no_grad():
        clean = logits(ids)
        with ablation.ablate(model, [(layer, head)]):
            ablated = logits(ids)
        if which == "zoo":
            w = model.blocks[layer].attn.W_O
            saved = w.data[head].clone()
            w.data[head] = 0
        else:
            d = model.config.hidden_size // model.config.num_attention_heads
            w = model.model.layers[layer].self_attn.o_proj.weight
            saved = w.data[:, head * d : (head + 1) * d].clone()
            w.data[:, head * d : (head + 1) * d] = 0
        try:
            edited = logits(ids)
        finally:
            if which == "zoo":
                w.data[head] = saved
            else:
                w.data[:, head * d : (head + 1) * d] = saved
        assert not torch.allclose(clean, ablated)
        torch.testing.assert_close(ablated, edited, atol=1e-5, rtol=1e-5)
        # the reference is the input itself: a one-token mean, and a resample from the same
        # sequence, replace z by itself and change nothing; another reference changes the output
        with ablation.ablate(model, [(layer, head)], "mean", reference=ids[:1, :1]):
            torch.testing.assert_close(logits(ids[:1, :1]), clean[:1, :1], atol=1e-5, rtol=1e-5)
        with ablation.ablate(model, [(layer, head)], "mean", reference=ids[1:]):
            assert not torch.allclose(logits(ids[:1]), clean[:1], atol=1e-4)
        with ablation.ablate(model, [(layer, head)], "resample", reference=ids[:1]):
            resampled = logits(ids[:1])
        torch.testing.assert_close(resampled, clean[:1], atol=1e-5, rtol=1e-5)  # resampled from itself
    # the hooks are gone afterwards, and other hooks survive
    with torch.no_grad():
        torch.testing.assert_close(logits(ids), clean)


def test_ablation_works_while_recording_statistics(zoo):
    ids = torch.randint(3, 250, (1, 64), generator=torch.Generator().manual_seed(SEED))
    spec = stats_spec(["sink"], ScoreSettings())
    with torch.no_grad(), instrument(zoo, spec) as rec, ablation.ablate(zoo, [(0, 1)]):
        ablated = zoo(ids)
    with torch.no_grad():
        with ablation.ablate(zoo, [(0, 1)]):
            plain = zoo(ids)
    torch.testing.assert_close(ablated, plain, atol=1e-4, rtol=1e-4)
    assert rec.layer(1).sink_mass.shape == (1, 4, 64)


def test_ablating_induction_heads_cuts_induction_more_than_random_heads(zoo, scored):
    """Against random heads of the same layer. (Random heads of any layer cut induction almost
    as much in this 2-layer model: every layer-0 head feeds the induction heads; docs/zoo.md.)"""
    metric = ablation.induction_accuracy(repeat_samples(zoo.tokenizer, 80, 2, 12, seed=SEED))
    table = ablation.cumulative(
        zoo,
        metric,
        ablation.rank_heads(scored, "induction"),
        ks=[2],
        draws=6,
        seed=SEED,
        control="same_layers",
        progress=False,
    )
    base = table.query("selection == 'none'")["value"].iloc[0]
    top = table.query("selection == 'top'")["value"].iloc[0]
    random_mean = table.query("selection == 'random'")["value"].mean()
    assert base > 0.5
    assert base - top > 2 * (base - random_mean)


def test_ablating_retrieval_heads_cuts_needle_accuracy_more_than_random_heads(zoo, scored):
    samples = needle_samples(zoo.tokenizer, [256], [0.2, 0.5, 0.8], 6, seed=SEED + 1)
    accuracy, logprob = ablation.needle_accuracy(samples), ablation.answer_logprob(samples)
    ranking = ablation.rank_heads(scored, "retrieval")
    assert ranking[0][0] == 1  # the zoo's retrieval heads are in layer 1
    table = ablation.cumulative(
        zoo, accuracy, ranking, ks=[1], draws=8, seed=SEED, control="same_layers", progress=False
    )
    top = table.query("selection == 'top'")["value"].iloc[0]
    assert table.query("selection == 'none'")["value"].iloc[0] >= 0.5
    assert top < table.query("selection == 'random'")["value"].mean()
    base_lp = logprob(zoo)
    with ablation.ablate(zoo, ranking[:1]):
        assert logprob(zoo) < base_lp - 1.0


def test_metrics_measure_what_they_say(zoo):
    texts = text_samples(zoo.tokenizer, None, 128, 4)
    loss = ablation.text_loss(texts)(zoo)
    assert 0 < loss < 5.5  # below log(259) = 5.56 (uniform): the model has learned text
    ids = torch.stack([s.ids for s in texts])
    a, b = int(ids[0, -1]), int(ids[1, -1])
    diff = ablation.logit_difference(ids[:1], a, b)(zoo)
    with torch.no_grad():
        last = zoo(ids[:1])[0, -1]
    assert diff == pytest.approx(float(last[a] - last[b]), abs=1e-5)


def test_scan_finds_the_head_that_matters(zoo):
    """Scanning every head alone: the largest drop in needle accuracy is a layer-1 copying head
    or a layer-0 head feeding it, and every row has its baseline."""
    # 32 samples: with 8, an unlucky draw left the unablated accuracy at 0.25, too low for any
    # drop to pass 0.3 (over seeds 1-8 it is 0.59-0.88 with 32)
    samples = needle_samples(zoo.tokenizer, [256], [0.3, 0.7], 16, seed=SEED)
    table = ablation.scan_heads(zoo, ablation.needle_accuracy(samples), progress=False)
    assert len(table) == 8 and (table["value"] - table["baseline"] == table["delta"]).all()
    assert table["delta"].min() < -0.3


def test_bad_input(zoo, scored):
    with pytest.raises(WorkbenchError, match="empty"):
        with ablation.ablate(zoo, []):
            pass
    with pytest.raises(WorkbenchError, match=r"out of range: the model has 2 layers of 4 heads"):
        with ablation.ablate(zoo, [(2, 0)]):
            pass
    with pytest.raises(WorkbenchError, match="choose one of: zero, mean, resample"):
        with ablation.ablate(zoo, [(0, 0)], "nope"):
            pass
    with pytest.raises(WorkbenchError, match="needs reference token ids"):
        with ablation.ablate(zoo, [(0, 0)], "mean"):
            pass
    with pytest.raises(WorkbenchError, match="no 'sink' score"):
        ablation.rank_heads(scored, "sink")
    with pytest.raises(WorkbenchError, match="k must lie in"):
        ablation.cumulative(zoo, lambda m: 0.0, [(1, 1)], ks=[2])
    with pytest.raises(WorkbenchError, match="needle samples"):
        ablation.needle_accuracy(repeat_samples(zoo.tokenizer, 10, 2, 2))


def test_ablate_command(scored):
    register(app)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "ablate",
            "--run",
            str(scored.path),
            "--rank-by",
            "induction",
            "--task",
            "repeats",
            "--k",
            "1,2",
            "--samples",
            "4",
            "--draws",
            "2",
            "--length",
            "121",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "induction_accuracy" in result.output and "random" in result.output
    run = Run.open(scored.path)
    table = run.table("ablation_induction_induction_accuracy_zero_all")
    assert set(table["selection"]) == {"none", "top", "random"} and set(table["k"]) == {0, 1, 2}
    assert (scored.path / "figures" / "ablation_induction_induction_accuracy_zero_all.html").exists()
    assert run.manifest["ablations"][-1]["metric"] == "induction_accuracy"
    for args, message in (
        (["--rank-by", "sink"], "no 'sink' score"),
        (["--task", "niah", "--metric", "text_loss"], "does not fit task niah"),
        (["--k", "x"], "comma-separated integers"),
        (["--method", "resample"], "resample ablation needs"),
    ):
        result = runner.invoke(app, ["ablate", "--run", str(scored.path), *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_the_workbench_command_has_the_probes_commands():
    """`workbench` (python -m workbench) finds `ablate` and `sae` through the entry point."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "workbench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "", "HOME": "/tmp"},
    )
    assert out.returncode == 0, out.stderr
    assert "ablate" in out.stdout and "sae" in out.stdout and "score" in out.stdout


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "haystack"}, "unknown task 'haystack'; choose from: niah, repeats, text"),
        (
            {"task": "niah", "metric": "text_loss"},
            "metric 'text_loss' does not fit task niah; choose from: needle_accuracy, answer_logprob",
        ),
        ({"task": "repeats", "metric": "nope"}, "choose from: induction_accuracy"),
        ({"method": "resample"}, "resample ablation needs reference inputs"),
        ({"method": "shuffle", "task": "text"}, "unknown ablation method 'shuffle'"),
        ({"control": "nearby"}, "control must be 'all' or 'same_layers'"),
        ({"task": "repeats", "length": 4}, "--length 4 is too short for repeats samples"),
        ({"draws": 0}, "samples and draws must be at least 1"),
        ({"samples": 0}, "samples and draws must be at least 1"),
    ],
    ids=[
        "task",
        "metric-of-another-task",
        "metric-unknown",
        "resample-niah",
        "method",
        "control",
        "repeats-short",
        "draws",
        "samples",
    ],
)
def test_ablation_settings_refuse_what_the_experiment_cannot_run(kwargs, match):
    with pytest.raises(WorkbenchError, match=match):
        AblationSettings(**kwargs)


def test_ablation_settings_resolve_defaults_and_build_their_samples(zoo):
    """The metric defaults to the task's; names and config are what the manifest records; the
    needle samples come from ``depths``, with the seed offset from the experiment's."""
    assert [AblationSettings(task=t).metric for t in ("niah", "repeats", "text")] == [
        "needle_accuracy",
        "induction_accuracy",
        "text_loss",
    ]
    settings = AblationSettings(rank_by="retrieval", ks=[1, 2], length=128, samples=2, depths=[0.25, 0.75])
    assert settings.ks == (1, 2) and settings.depths == (0.25, 0.75)
    assert settings.table_name == "ablation_retrieval_needle_accuracy_zero_all"
    assert settings.scan_name == "scan_needle_accuracy_zero"
    assert settings.config == {
        "rank_by": "retrieval",
        "task": "niah",
        "metric": "needle_accuracy",
        "method": "zero",
        "length": 128,
        "control": "all",
    }
    items = settings.samples_for(zoo.tokenizer)
    want = needle_samples(zoo.tokenizer, [128], [0.25, 0.75], 2, seed=ablation.FRESH_SAMPLES)
    assert len(items) == 4 and all(torch.equal(a.ids, b.ids) for a, b in zip(items, want))
    with pytest.raises(WorkbenchError, match="length is not set"):
        AblationSettings().samples_for(zoo.tokenizer)


def test_the_ablate_options_default_to_the_settings():
    """`workbench ablate` takes its defaults from AblationSettings, not from literals of its own."""
    options = {name: p.default.default for name, p in inspect.signature(ablate).parameters.items()}
    defaults = AblationSettings()
    assert parse_list(options["k"], int) == defaults.ks
    for name in ("rank_by", "score_task", "task", "method", "length", "samples", "draws", "control", "scan", "seed"):
        assert options[name] == getattr(defaults, name), name
    assert options["metric"] is None  # the task's default metric, resolved by the settings


def test_run_ablation_resolves_the_adapter_once_and_writes_what_the_explorer_reads(zoo, scored, tmp_path, monkeypatch):
    """One adapter for the whole experiment (scan included); the table, scan, figure and
    manifest entry have the names and columns `workbench ablate` gives them."""
    run = Run.open(shutil.copytree(scored.path, tmp_path / "run"))
    built = []
    init = TransformerLensAdapter.__init__

    def counting(self, model):
        built.append(model)
        init(self, model)

    monkeypatch.setattr(TransformerLensAdapter, "__init__", counting)
    settings = AblationSettings(rank_by="induction", ks=(1,), task="repeats", samples=2, draws=2, scan=True, seed=SEED)
    result = ablation.run_ablation(run.path, zoo, settings, progress=False)
    assert len(built) == 1
    assert result.settings.length == 256  # the run's shortest
    name = "ablation_induction_induction_accuracy_zero_all"
    assert result.path == run.path / f"{name}.parquet"
    reopened = Run.open(run.path)
    table = reopened.table(name)
    assert list(table.columns) == [
        "k",
        "selection",
        "draw",
        "heads",
        "value",
        "rank_by",
        "task",
        "metric",
        "method",
        "length",
        "control",
    ]
    assert len(table) == 1 + 1 + 2 and (table["value"].to_numpy() == result.table["value"].to_numpy()).all()
    assert len(reopened.table("scan_induction_accuracy_zero")) == 8
    assert (run.path / "figures" / f"{name}.html").exists()
    entry = reopened.manifest["ablations"][-1]
    assert {k: entry[k] for k in ("table", "k", "draws", "samples", "metric", "length")} == {
        "table": name,
        "k": [1],
        "draws": 2,
        "samples": 2,
        "metric": "induction_accuracy",
        "length": 256,
    }
    json.dumps(reopened.manifest)  # the manifest stays plain JSON
    # running again replaces the entry of the same table instead of adding one
    ablation.run_ablation(reopened, zoo, settings, progress=False)
    assert [a["table"] for a in Run.open(run.path).manifest["ablations"]].count(name) == 1
