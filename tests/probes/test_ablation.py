"""Head ablation on the zoo model (TransformerLens) and a small Llama (Hugging Face)."""

from __future__ import annotations

import contextlib
import functools
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


#: A decoding budget for the needle metrics of the experiments below: the answer (a space and four
#: digits, 5 tokens) and what follows it, which is where zoo-2l says the code when it retrieves it
#: (a budget of 6 or 8 gives the same tables here as the default 50, at a fifth of the decoding).
NEEDLE_BUDGET = 8


def test_ablating_retrieval_heads_cuts_needle_accuracy_more_than_random_heads(zoo, scored):
    samples = needle_samples(zoo.tokenizer, [256], [0.2, 0.5, 0.8], 6, seed=SEED + 1)
    accuracy = ablation.needle_accuracy(samples, batch_size=len(samples), max_new_tokens=NEEDLE_BUDGET)
    logprob = ablation.answer_logprob(samples)
    ranking = ablation.rank_heads(scored, "retrieval")
    assert ranking[0][0] == 1  # the zoo's retrieval heads are in layer 1
    table = ablation.cumulative(
        zoo, accuracy, ranking, ks=[1], draws=8, seed=SEED, control="same_layers", progress=False
    )
    top = table.query("selection == 'top'")["value"].iloc[0]
    assert table.query("selection == 'none'")["value"].iloc[0] >= 0.25  # Wu et al.'s rule: 8 of 24 (test_scores)
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
    metric = ablation.needle_accuracy(samples, batch_size=len(samples), max_new_tokens=NEEDLE_BUDGET)
    table = ablation.scan_heads(zoo, metric, progress=False)
    assert len(table) == 8 and (table["value"] - table["baseline"] == table["delta"]).all()
    assert table["delta"].min() < -0.3


def test_bad_input(zoo, scored):
    with pytest.raises(WorkbenchError, match="empty"):
        with ablation.ablate(zoo, []):
            pass
    with pytest.raises(WorkbenchError, match=r"out of range: the model has 2 layers of 4 heads"):
        with ablation.ablate(zoo, [(2, 0)]):
            pass
    with pytest.raises(WorkbenchError, match="choose one of: zero, mean, resample, uniform"):
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
    table = run.table("ablation_induction_induction_accuracy_zero_non_top")
    assert set(table["selection"]) == {"none", "top", "random"} and set(table["k"]) == {0, 1, 2}
    assert (scored.path / "figures" / "ablation_induction_induction_accuracy_zero_non_top.html").exists()
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
        ({"control": "nearby"}, "control must be one of 'non_top', 'all', 'same_layers'"),
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
    assert settings.table_name == "ablation_retrieval_needle_accuracy_uniform_non_top"  # Wu et al.'s experiment
    assert settings.scan_name == "scan_needle_accuracy_uniform"
    assert settings.config == {
        "rank_by": "retrieval",
        "task": "niah",
        "metric": "needle_accuracy",
        "method": "uniform",
        "length": 128,
        "control": "non_top",
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
    for name in ("rank_by", "score_task", "task", "length", "samples", "draws", "control", "scan", "seed"):
        assert options[name] == getattr(defaults, name), name
    assert options["metric"] is None  # the task's default metric, resolved by the settings
    assert options["method"] is None  # the metric's default method, resolved by the settings


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
    name = "ablation_induction_induction_accuracy_zero_non_top"
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


# Wu et al.'s masking: uniform attention in decoding steps, the non-top control, ROUGE-scored decoding.


def _decode_steps(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Wu et al.'s decoding on a TransformerLens model: prefill all but the last prompt token,
    then ``steps`` greedy decoding steps from it. Returns the prefill's logits and each step's."""
    adapter = adapter_for(model)
    with torch.no_grad():
        prefill, cache = adapter.prefill(ids[:, :-1])
        token, out = ids[:, -1:], []
        for _ in range(steps):
            logits, cache = adapter.decode(token, cache)
            out.append(logits)
            token = logits.argmax(-1, keepdim=True)
    return prefill, out


@pytest.mark.parametrize("instrumented", [False, True])
def test_uniform_masking_equals_uniform_pattern_rows_in_decoding_steps(zoo, instrumented):
    """Masking heads the uniform way equals, computed independently, TransformerLens's own
    forward with those heads' pattern rows replaced by 1 / (keys the row sees) in the decoding
    steps only: the prefill is unchanged, every decoding step's logits agree (also while the
    statistics are recorded), and the masking changes them."""
    heads = [(1, 1), (0, 2)]
    ids = torch.randint(3, 250, (2, 48), generator=torch.Generator().manual_seed(SEED))
    clean_prefill, clean = _decode_steps(zoo, ids, 4)
    recording = instrument(zoo) if instrumented else contextlib.nullcontext()
    with recording, ablation.ablate(zoo, heads, "uniform"):
        masked_prefill, masked = _decode_steps(zoo, ids, 4)

    def uniform_rows(pattern, hook, head):  # [B, H, Nq, Nk]; a decoding step has one row, seeing every key
        n_q, n_k = pattern.shape[-2:]
        if n_q != 1:  # the prefill: unchanged
            return pattern
        pattern = pattern.clone()
        pattern[:, head] = 1.0 / n_k
        return pattern

    hooks = [(f"blocks.{l}.attn.hook_pattern", functools.partial(uniform_rows, head=h)) for l, h in heads]
    with zoo.hooks(fwd_hooks=hooks):
        by_hand_prefill, by_hand = _decode_steps(zoo, ids, 4)
    torch.testing.assert_close(masked_prefill, clean_prefill, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(by_hand_prefill, clean_prefill, atol=1e-4, rtol=1e-4)
    for step, (got, want, plain) in enumerate(zip(masked, by_hand, clean)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        assert (got - plain).abs().max() > 1e-2, f"step {step}: the masking changed nothing"


def test_uniform_masking_of_a_local_layer_averages_its_window():
    """On a model whose local layers see the last 8 keys (Gemma 2 style, GQA), a masked head of a
    local layer averages the values of its window only and one of a global layer every key: equal
    to TransformerLens's own forward with those heads' decoding rows set to 1 / (keys in view).
    Averaging the local head over every key instead gives other logits, so the window is used."""
    from tests.workbench.test_streaming_models import local_global_model

    model = local_global_model(window=8)  # layers 0 and 2 local, 1 and 3 global
    window = model.cfg.window_size
    heads = [(0, 1), (1, 3), (2, 2)]
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(SEED + 3))
    clean_prefill, _ = _decode_steps(model, ids, 3)
    with ablation.ablate(model, heads, "uniform"):
        masked_prefill, masked = _decode_steps(model, ids, 3)

    def by_hand(local_window: bool) -> list[torch.Tensor]:
        def uniform_rows(pattern, hook, head, local):  # [B, H, 1, Nk] in a decoding step
            n_q, n_k = pattern.shape[-2:]
            if n_q != 1:
                return pattern
            first = max(0, n_k - window) if local and local_window else 0
            pattern = pattern.clone()
            pattern[:, head] = 0.0
            pattern[:, head, :, first:] = 1.0 / (n_k - first)
            return pattern

        hooks = [
            (f"blocks.{l}.attn.hook_pattern", functools.partial(uniform_rows, head=h, local=l % 2 == 0))
            for l, h in heads
        ]
        with model.hooks(fwd_hooks=hooks):
            return _decode_steps(model, ids, 3)[1]

    torch.testing.assert_close(masked_prefill, clean_prefill, atol=1e-4, rtol=1e-4)
    for step, (got, want, unwindowed) in enumerate(zip(masked, by_hand(True), by_hand(False))):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        assert (got - unwindowed).abs().max() > 1e-3, f"step {step}: the local window made no difference"


def test_uniform_masking_of_the_planted_heads():
    """On the planted model (docs/planted.md), masking the copying head the uniform way destroys
    needle accuracy; masking the dormant head (writes nothing) or the uniform head (already
    uniform) leaves every generated token as it was (the full budget: to the newline, which the
    planted model reaches after 11 to 48 tokens here, or 50 tokens)."""
    from workbench.models import task_tokenizer
    from workbench.zoo.planted import ROLES, planted

    model = planted(context=1024, seed=SEED % 1000)
    samples = needle_samples(task_tokenizer(model), [300], [0.2, 0.8], 3, seed=SEED)
    accuracy = ablation.needle_accuracy(samples, max_new_tokens=NEEDLE_BUDGET)
    clean = ablation.greedy_answers(model, samples)
    assert accuracy(model) == 1.0
    with ablation.ablate(model, [ROLES["induction"]], "uniform"):
        assert accuracy(model) == 0.0
    for role in ("dormant", "uniform"):
        with ablation.ablate(model, [ROLES[role]], "uniform"):
            assert ablation.greedy_answers(model, samples) == clean, role


def test_greedy_answers_stop_at_a_newline_or_the_budget(zoo):
    """Decoding stops after the first token whose text holds a newline, else after 50 tokens or
    where the context ends; what it generates is what plain greedy decoding generates."""
    from workbench.scoring.formulas import MAX_ANSWER_TOKENS

    samples = needle_samples(zoo.tokenizer, [256], [0.1, 0.5, 0.9], 3, seed=SEED)
    answers = ablation.greedy_answers(zoo, samples, batch_size=4)
    newline = [a for a in answers if "\n" in zoo.tokenizer.decode(a)]
    assert all("\n" in zoo.tokenizer.decode(a[-1:]) and "\n" not in zoo.tokenizer.decode(a[:-1]) for a in newline)
    assert all(len(a) == MAX_ANSWER_TOKENS for a in answers if a not in newline)
    # forced: a newline after three generated tokens (zoo-2l's own choice varies with float rounding)
    nl = zoo.tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    x = zoo.tokenizer("x", add_special_tokens=False)["input_ids"][0]
    steps = []  # decoding steps so far (one-row forwards; the prefill restarts the count)

    def force(logits, hook):  # [B, N, vocab]
        if logits.shape[1] > 1:
            steps.clear()
            return logits
        logits = logits.clone()
        logits[:, -1, x if len(steps) < 3 else nl] += 1e4
        steps.append(1)
        return logits

    with zoo.hooks(fwd_hooks=[("unembed.hook_out", force)]):
        forced = ablation.greedy_answers(zoo, samples[:1])[0]
    assert forced == [x, x, x, nl]
    # a lower budget (max_new_tokens) cuts every answer to a prefix of its full one
    short = ablation.greedy_answers(zoo, samples, batch_size=4, max_new_tokens=3)
    assert short == [a[:3] for a in answers] and any(len(a) > 3 for a in answers)
    with torch.no_grad():  # the first answer again, by full forwards
        ids = samples[0].ids.unsqueeze(0)
        for token in answers[0]:
            assert int(zoo(ids)[0, -1].argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    near_end = needle_samples(zoo.tokenizer, [zoo.cfg.n_ctx], [0.5], 1, seed=SEED)
    budget = zoo.cfg.n_ctx - len(near_end[0].ids) + 1  # the row predicting a token must lie in the context
    assert budget == len(near_end[0].answer) + 1
    assert len(ablation.greedy_answers(zoo, near_end)[0]) <= budget


def test_the_non_top_control_never_draws_a_top_head(zoo):
    """Wu et al.'s control: random heads from outside the top max(k) heads, for every k."""
    ranking = [(1, 2), (1, 1), (0, 3), (0, 0), (1, 0), (0, 1), (0, 2), (1, 3)]
    table = ablation.cumulative(zoo, lambda m: 0.0, ranking, ks=[1, 3], draws=20, seed=SEED, progress=False)
    drawn = {h for heads in table.query("selection == 'random'")["heads"] for h in heads.split()}
    assert drawn == {"0.0", "1.0", "0.1", "0.2", "1.3"}  # every head outside the top 3, and only those
    assert list(table.query("selection == 'top'")["heads"]) == ["1.2", "1.2 1.1 0.3"]
    for selection, heads in table.query("selection == 'random'")[["k", "heads"]].itertuples(index=False):
        assert len(heads.split()) == selection


def test_uniform_masking_refusals(zoo):
    with pytest.raises(WorkbenchError, match="TransformerLens models only"):
        with ablation.ablate(tiny_llama(), [(0, 0)], "uniform"):
            pass
    with pytest.raises(WorkbenchError, match="does not decode"):
        AblationSettings(metric="answer_logprob", method="uniform")
    assert AblationSettings().method == "uniform" and AblationSettings().control == "non_top"
    assert AblationSettings(metric="answer_logprob").method == "zero"
    assert AblationSettings(task="repeats").method == "zero"
    samples = needle_samples(zoo.tokenizer, [128], [0.5], 1, seed=SEED)
    ids = torch.stack([s.ids for s in samples])
    for budget in (0, 2.5, True):
        with pytest.raises(WorkbenchError, match="max_new_tokens must be an int of at least 1"):
            ablation.needle_accuracy(samples, max_new_tokens=budget)
    with pytest.raises(WorkbenchError, match="resample ablation replaces z position by position"):
        with ablation.ablate(zoo, [(1, 1)], "resample", reference=ids):
            ablation.needle_accuracy(samples)(zoo)
