"""The planted model (workbench/zoo/planted.py) through the normal scoring pipeline: every score
must find the head planted for it, with the value the construction implies. A model with one
role broken must fail the same check."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from kernels import StatsSpec
from tests.conftest import SEED
from workbench.instrument import instrument
from workbench.models import task_tokenizer
from workbench.scoring import ScoreRunSettings, score_model
from workbench.scoring.plan import plan
from workbench.scoring.tables import sink_values
from workbench.tasks import needle_samples, repeat_samples
from workbench.zoo.planted import LOCAL_SLOPE, MATCH, ROLES, planted

CONTEXT = 4096
SETTINGS = ScoreRunSettings(
    model="planted",
    tasks=("repeats", "niah"),
    lengths=(256, 1024),
    samples=1,
    depths=(0.1, 0.9),
    backend="reference",
    seed=SEED % 1000,
)


@pytest.fixture(scope="module")
def model():
    return planted(context=CONTEXT, seed=SEED % 1000)


def score(model, settings: ScoreRunSettings, out) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """``head_scores``, the summary and the per-(sample, layer, head) sink scores
    (:func:`~workbench.scoring.tables.sink_values`) of a scoring run (figures left out: they are slow)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("workbench.plots.save_figures", lambda figures, folder: [])
        run = score_model(model, settings, out, progress=False)
    return run.table("head_scores"), run.manifest["summary"], sink_values(run.read_parts())


@pytest.fixture(scope="module")
def scored(model, tmp_path_factory):
    return score(model, SETTINGS, tmp_path_factory.mktemp("planted") / "run")


def expected(settings: ScoreRunSettings, model, task: str) -> dict[str, float]:
    """What the construction implies, in float64 closed forms, over the prefill rows of the run's
    ``task`` samples: the uniform head's entropy (row ``p``: ``log(p + 1)``), the local head's
    entropy, distance and streaming mass (row ``p``: weights ``r^d``, ``d = 0..p``,
    ``r = exp(-LOCAL_SLOPE)``), and the previous-token score ``(N - 1) / N``."""
    r, w = math.exp(-LOCAL_SLOPE), settings.window
    sums = dict.fromkeys(("uniform_entropy", "local_entropy", "local_distance", "previous_token", "duplicate"), 0.0)
    rows, streaming, streaming_rows = 0, 0.0, 0
    for unit in (u for u in plan(settings, task_tokenizer(model)) if u.task == task):
        p = torch.arange(len(unit.sample.ids), dtype=torch.float64)
        if unit.sample.period is not None:
            sums["duplicate"] += _duplicate_tally(unit.sample.ids, unit.sample.period, settings.repeats)
        z = (1 - r ** (p + 1)) / (1 - r)  # sum of r^d
        mean_d = r * (1 - (p + 1) * r**p + p * r ** (p + 1)) / (1 - r) ** 2 / z
        sums["uniform_entropy"] += torch.log(p + 1).sum().item()
        sums["local_entropy"] += (torch.log(z) + LOCAL_SLOPE * mean_d).sum().item()
        sums["local_distance"] += mean_d.sum().item()
        sums["previous_token"] += len(p) - 1
        far = p >= w  # sink_tokens = 1: key 0 plus the last w keys, disjoint from row w on
        streaming += (((1 - r**w) / (1 - r) + r ** p[far]) / z[far]).sum().item()
        rows, streaming_rows = rows + len(p), streaming_rows + int(far.sum())
    return {**{k: v / rows for k, v in sums.items()}, "local_streaming": streaming / streaming_rows}


def _duplicate_tally(ids: torch.Tensor, period: int, repeats: int) -> float:
    """The ``duplicate_token`` tally of a repeats sample ``ids [N]`` for the planted duplicate
    head, which spreads its mass evenly over every occurrence of the row's token up to the row
    (itself included): the score counts the copies whole periods back, ``1 / occurrences`` each.
    A period longer than the vocabulary repeats tokens inside a copy, so at long lengths the
    value falls (0.25 at 256 tokens, 0.02 at 8K with the byte vocabulary)."""
    ids = ids.tolist()
    seen: dict[int, int] = {}
    start, total = len(ids) - repeats * period, 0.0
    for i, token in enumerate(ids):
        seen[token] = seen.get(token, 0) + 1
        if i >= start:
            total += ((i - start) // period) / seen[token]
    return total


def role_problems(
    head_scores: pd.DataFrame,
    summary: dict,
    sinks: pd.DataFrame,
    want: dict[str, dict[str, float]] | None = None,
) -> list[str]:
    """Each way the scores miss the planted roles (:data:`ROLES`), as sentences; [] when every
    score ranks its planted head first with the value the construction implies. Checks only
    the scores and tasks that ``head_scores`` holds; ``sinks``: the run's per-(sample, layer,
    head) sink scores; ``want``: per task, :func:`expected`."""
    problems, wanted = [], want or {}
    n_heads = head_scores.groupby(["layer", "head"]).ngroups

    def values(task: str, name: str) -> pd.Series | None:
        rows = head_scores[(head_scores["task"] == task) & (head_scores["score"] == name)]
        return None if rows.empty else rows.set_index(["layer", "head"])["value"]

    def first(task: str, name: str, role: str, low: float, high: float = math.inf, others: float = 0.1) -> None:
        v = values(task, name)
        if v is None:
            return
        at, mine = ROLES[role], float(v[ROLES[role]])
        best = v.drop(at).max()
        print(f"{task:8s} {name:15s} {role:15s} {mine:.4f} (next best {best:.4f})")
        if not low <= mine <= high:
            problems.append(f"{task} {name}: the {role} head {at} scores {mine:.4f}, not in [{low:.4f}, {high:.4f}]")
        if best > others:
            problems.append(f"{task} {name}: a head other than {role} {at} scores {best:.4f} > {others}")

    for task in ("repeats", "niah"):
        want = wanted.get(task)
        want_prev = want["previous_token"] if want else 1.0
        first(task, "previous_token", "previous_token", want_prev - 1e-4, want_prev + 1e-4)
        sink = values(task, "sink")
        if sink is not None:
            for role in ("sink", "dormant"):
                if not sink[ROLES[role]] >= 0.999:
                    problems.append(
                        f"{task} sink: the {role} head {ROLES[role]} scores {sink[ROLES[role]]:.4f} < 0.999"
                    )
            if sink[ROLES["sink"]] < sink.max() - 1e-6:
                problems.append(f"{task} sink: the sink head is not first ({sink.idxmax()} is)")
            # Gu et al.: the share of (sample, layer, head) above 0.3, the sink and dormant heads in every sample
            rate, triples = summary.get(f"sink_rate[{task}]"), sinks[sinks["task"] == task]
            planted_sinks = triples.set_index(["layer", "head"]).loc[[ROLES["sink"], ROLES["dormant"]], "value"]
            if rate is None or abs(rate - float((triples["value"] > 0.3).mean())) > 1e-9 or rate < 2 / n_heads:
                problems.append(f"{task}: sink rate {rate} is not the share of (sample, layer, head) above 0.3")
            if not (planted_sinks > 0.999).all():
                problems.append(f"{task}: the sink and dormant heads are not sinks in every sample")
        ent, norm = values(task, "entropy"), values(task, "entropy_norm")
        if ent is not None:
            mine, best = float(ent[ROLES["uniform"]]), ent.drop(ROLES["uniform"]).max()
            print(f"{task:8s} {'entropy':15s} {'uniform':15s} {mine:.4f} (next best {best:.4f})")
            if want and abs(mine - want["uniform_entropy"]) > 1e-3:
                problems.append(
                    f"{task} entropy: uniform head {mine:.4f}, uniform rows give {want['uniform_entropy']:.4f}"
                )
            if ent.idxmax() != ROLES["uniform"]:
                problems.append(f"{task} entropy: {ent.idxmax()} is first, not the uniform head {ROLES['uniform']}")
            if norm is not None and abs(float(norm[ROLES["uniform"]]) - 1) > 1e-4:
                problems.append(f"{task} entropy_norm: uniform head {float(norm[ROLES['uniform']]):.5f} != 1")
        stream = values(task, "streaming")
        if stream is not None and ent is not None:
            local, at = float(stream[ROLES["local"]]), ROLES["local"]
            recent = stream[stream >= 0.98].index  # heads whose mass stays in the sink + last 64 keys
            spread = ent[recent].idxmax() if len(recent) else None
            print(f"{task:8s} {'streaming':15s} {'local':15s} {local:.4f}, entropy {float(ent[at]):.4f}")
            if want and abs(local - want["local_streaming"]) > 1e-3:
                problems.append(f"{task} streaming: local head {local:.4f}, expected {want['local_streaming']:.4f}")
            if spread != at:
                problems.append(f"{task} streaming: the most spread recent head is {spread}, not local {at}")
            dist = values(task, "distance")
            if want and dist is not None and abs(float(dist[at]) - want["local_distance"]) > 1e-2:
                problems.append(
                    f"{task} distance: local head {float(dist[at]):.3f}, expected {want['local_distance']:.3f}"
                )
            if want and abs(float(ent[at]) - want["local_entropy"]) > 1e-3:
                problems.append(
                    f"{task} entropy: local head {float(ent[at]):.4f}, expected {want['local_entropy']:.4f}"
                )
    first("repeats", "induction", "induction", 0.95 * 0.5, 0.5)  # (R - 1) / R with R = 2
    dup = wanted["repeats"]["duplicate"] if "repeats" in wanted else None
    first("repeats", "duplicate_token", "duplicate", *((dup - 1e-3, dup + 1e-3) if dup else (0.1, 0.5)), others=0.01)
    first("niah", "retrieval", "induction", 0.999, 1.0)
    accuracy = summary.get("needle_accuracy")
    if values("niah", "retrieval") is not None and accuracy != 1.0:
        problems.append(f"needle accuracy {accuracy}, not 1.0")
    return problems


def test_every_score_finds_its_planted_head(scored, model):
    head_scores, summary, sinks = scored
    want = {task: expected(SETTINGS, model, task) for task in SETTINGS.tasks}
    print(summary, want)
    assert role_problems(head_scores, summary, sinks, want) == []


def test_a_broken_previous_token_head_is_reported(model, tmp_path):
    """The check can fail: a previous-token head with a zero query (uniform attention) is reported."""
    broken = planted(context=CONTEXT, seed=SEED % 1000)
    with torch.no_grad():
        broken.blocks[ROLES["previous_token"][0]].attn.W_Q[ROLES["previous_token"][1]] = 0  # uniform instead
    settings = ScoreRunSettings(
        model="planted", tasks=("repeats",), lengths=(256,), samples=1, backend="reference", seed=SEED % 1000
    )
    want = {"repeats": expected(settings, model, "repeats")}
    problems = role_problems(*score(broken, settings, tmp_path / "broken"), want=want)
    assert any("previous_token" in p for p in problems), problems  # the intact model passes: the first test


def _ablated(model, ids: torch.Tensor, role: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[tokens, vocab]`` and final residual ``[tokens, d_model]`` with ``role``'s
    output (``hook_z``) zeroed (TransformerLens's own attention, no instrumentation)."""
    hooks = []
    if role is not None:
        layer, head = ROLES[role]

        def zero(z, hook):
            z[:, :, head] = 0
            return z

        hooks.append((f"blocks.{layer}.attn.hook_z", zero))
    cache = {}
    hooks.append(("blocks.2.hook_resid_post", lambda x, hook: cache.setdefault("resid", x.clone())))
    logits = model.run_with_hooks(ids[None], fwd_hooks=hooks)
    return logits[0], cache["resid"][0]


def test_dormant_head_ablation_changes_nothing(model):
    sample = needle_samples(task_tokenizer(model), [512], [0.5], seed=SEED)[0]
    with torch.no_grad():
        logits, resid = _ablated(model, sample.ids, None)
        d_logits, d_resid = _ablated(model, sample.ids, "dormant")
        s_logits, s_resid = _ablated(model, sample.ids, "sink")
        i_logits, _ = _ablated(model, sample.ids, "induction")
    assert int(logits[-1].argmax()) == int(sample.answer[0])
    assert torch.equal(d_logits, logits) and torch.equal(d_resid, resid)  # writes nothing at all
    assert not torch.equal(s_resid, resid) and torch.equal(s_logits, logits)  # writes where no one reads
    assert int(i_logits[-1].argmax()) != int(sample.answer[0])  # the copying head is the answer


def test_roles_hold_at_2048_tokens(model):
    """One repeats sample of 2047 tokens through the instrumented model: previous-token attention
    is still one-hot at the last positions, the copying head still attends the token after the
    earlier copy, the sink head still holds every row. (4096 tokens take about 17 s on 2 cores.)"""
    sample = repeat_samples(task_tokenizer(model), 2047 // 2, 2, 1, seed=SEED)[0]
    period, n = sample.period, len(sample.ids)
    spec = StatsSpec(sink_tokens=1, window=64, offsets=(1, period - 1))
    with instrument(model, spec, backend="reference") as rec, torch.no_grad():
        model(sample.ids[None])
    prev = rec.layer(ROLES["previous_token"][0]).offset_mass[0, ROLES["previous_token"][1], :, 0]
    induction = rec.layer(ROLES["induction"][0]).offset_mass[0, ROLES["induction"][1], :, 1]
    sink = rec.layer(ROLES["sink"][0]).sink_mass[0, ROLES["sink"][1]]
    second = induction[n - period + MATCH :]  # second-copy rows whose whole matched context is in the copy
    print(f"previous-token mass, last 4 rows {prev[-4:].tolist()}; induction, second copy: min {second.min():.6f}")
    assert prev[1:].min() > 1 - 1e-6  # every row but the first, the last ones included
    assert second.min() > 1 - 1e-6
    assert sink.min() > 1 - 1e-6


def test_offset_heads_are_one_hot_up_to_the_default_context():
    """The position ruler at the default context of 8192: the first and last query rows of every
    layer-0 offset head put all their weight on key ``i - k`` (scores computed from the weights
    in float64, without an 8192-token forward)."""
    big = planted()
    n = big.cfg.n_ctx
    with torch.no_grad():
        ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(SEED))
        resid = (big.embed(ids[None]) + big.pos_embed(ids[None]))[0].double()  # [n, d_model]
        for k, role in enumerate(("previous_token", "offset_2", "offset_3", "offset_4"), start=1):
            layer, head = ROLES[role]
            attn = big.blocks[layer].attn
            rows = torch.tensor([k, k + 1, n // 2 + 1, n - 2, n - 1])
            q = resid[rows] @ attn.W_Q[head].double() / attn.attn_scale  # [rows, d_head]
            scores = q @ (resid @ attn.W_K[head].double()).T  # [rows, n]
            pattern = scores.masked_fill(torch.arange(n)[None] > rows[:, None], -math.inf).softmax(-1)
            off_target = 1 - pattern[torch.arange(len(rows)), rows - k]
            print(f"{role}: mass off key i - {k} at rows {rows.tolist()}: {off_target.tolist()}")
            assert off_target.max() < 1e-9


def test_load_model_names_the_planted_model():
    """``load_model("planted:<context>")`` is the planted model (so ``workbench score --model
    planted:4k`` works offline); a bad context is refused."""
    from workbench import WorkbenchError, load_model
    from workbench.zoo import planted

    model = load_model("planted:1k", device="cpu", seed=3)
    want = planted(1024, seed=3)
    assert model.cfg.n_ctx == 1024 and model.tokenizer is not None
    for name, tensor in want.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert load_model("planted", device="cpu").cfg.n_ctx == 8192
    with pytest.raises(WorkbenchError, match="planted takes a context in tokens"):
        load_model("planted:big", device="cpu")
