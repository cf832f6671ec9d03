"""Per-KV-group views of head scores, for grouped-query attention (GQA) models.

KV-cache compression (DuoAttention, kvpress's presses, StreamingLLM per head) acts on key/value
heads: in a GQA model several query heads read one K/V head, and dropping its cache affects
all of them. So a score is also shown per KV group: for every key/value head, the mean and the
max of the score over its query heads.

Grouping convention: with ``G = n_heads // n_kv_heads`` query heads per key/value head, query
head ``h`` reads key/value head ``h // G`` (heads ``0..G-1`` share K/V head 0, the next ``G``
share K/V head 1, ...). This is what Hugging Face's ``repeat_kv`` (``expand`` of
``[B, Hkv, 1, N, D]`` to ``[B, Hkv, G, N, D]``, then ``reshape`` to ``[B, Hkv * G, N, D]``),
TransformerLens's ``GroupedQueryAttention`` (``torch.repeat_interleave(k, repeats=G, dim=2)``),
DuoAttention's per-KV-head gates (``view(Hkv, 1).expand(Hkv, G).reshape(H)``) and this project's
kernels (``q.view(B, Hkv, G, N, D)``) all do. Without GQA (``n_kv_heads == n_heads``) the view
is the identity: every group is one head, its mean and max are the head's score.

The view is computed when read (:func:`run_kv_group_scores`), not stored: it is a cheap, exact
function of the ``head_scores`` table and the model's key/value head count, so it can never
disagree with a rebuilt table, and runs written before it existed get it too.

Example:
    >>> groups = kv_group_scores(run.table("head_scores"), n_kv_heads=2)
    >>> groups[groups["score"] == "retrieval"]  # task, score, layer, kv_head, query_heads, mean, max, samples
"""

from __future__ import annotations

import math

import pandas as pd

from workbench.errors import WorkbenchError

#: The columns of :func:`kv_group_scores`.
KV_GROUP_COLUMNS = ["task", "score", "layer", "kv_head", "query_heads", "mean", "max", "samples"]
#: How a KV group's value is read from its query heads' values.
AGGREGATES = ("mean", "max")


def group_size(n_heads: int, n_kv_heads: int) -> int:
    """Query heads per key/value head, ``n_heads // n_kv_heads``; :class:`WorkbenchError` when
    ``n_kv_heads`` does not divide ``n_heads``."""
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads < 1:
        raise WorkbenchError(f"the number of key/value heads must be a positive integer, got {n_kv_heads!r}")
    if n_heads % n_kv_heads:
        raise WorkbenchError(
            f"{n_kv_heads} key/value heads cannot serve {n_heads} query heads (grouped-query attention needs "
            "the query heads to be a multiple of the key/value heads): give the model config's "
            "num_key_value_heads"
        )
    return n_heads // n_kv_heads


def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The key/value head query head ``head`` reads: ``head // (n_heads // n_kv_heads)``."""
    return head // group_size(n_heads, n_kv_heads)


def query_heads_of(kv_head: int, n_heads: int, n_kv_heads: int) -> range:
    """The query heads that read key/value head ``kv_head``."""
    g = group_size(n_heads, n_kv_heads)
    return range(kv_head * g, (kv_head + 1) * g)


def kv_group_scores(head_scores: pd.DataFrame, n_kv_heads: int, n_heads: int | None = None) -> pd.DataFrame:
    """Every score of a ``head_scores`` table (``task, score, layer, head, value, samples``) per KV
    group: ``task, score, layer, kv_head, query_heads, mean, max, samples``.

    ``query_heads``: the group's query heads as text (``"2,3"``); ``mean`` / ``max``: of the
    group's values (NaN when any of them is NaN: a head no sample counted leaves its group
    unknown); ``samples``: the fewest samples any of the group's heads counted. ``n_heads``: the
    model's query heads (default: ``max(head) + 1`` of the table). Rows keep the table's score and
    task order, then layer and KV head."""
    missing = [c for c in ("task", "score", "layer", "head", "value") if c not in head_scores.columns]
    if missing:
        raise WorkbenchError(
            f"a head scores table needs the columns task, score, layer, head, value; missing {missing}"
        )
    if n_heads is None:
        n_heads = int(head_scores["head"].max()) + 1 if len(head_scores) else n_kv_heads
    g = group_size(n_heads, n_kv_heads)
    if len(head_scores) and (head_scores["head"].min() < 0 or head_scores["head"].max() >= n_heads):
        raise WorkbenchError(f"the table's heads run outside 0..{n_heads - 1}: is n_heads={n_heads} this model's?")
    frame = head_scores.assign(kv_head=head_scores["head"] // g, unknown=head_scores["value"].isna())
    if "samples" not in frame.columns:
        frame = frame.assign(samples=pd.NA)
    keys = ["task", "score", "layer", "kv_head"]
    grouped = frame.sort_values(keys + ["head"]).groupby(keys, sort=False)
    out = grouped.agg(
        heads=("head", list),
        mean=("value", "mean"),
        max=("value", "max"),
        unknown=("unknown", "any"),
        samples=("samples", "min"),
    ).reset_index()
    out.loc[out["unknown"], ["mean", "max"]] = math.nan
    out["query_heads"] = [",".join(str(int(h)) for h in heads) for heads in out["heads"]]
    order = {key: i for i, key in enumerate(dict.fromkeys(zip(head_scores["score"], head_scores["task"])))}
    out = out.assign(_order=[order[k] for k in zip(out["score"], out["task"])])
    out = out.sort_values(["_order", "layer", "kv_head"], kind="stable").drop(columns="_order")
    return out[KV_GROUP_COLUMNS].reset_index(drop=True)


def as_head_table(kv_groups: pd.DataFrame, agg: str = "max") -> pd.DataFrame:
    """A :func:`kv_group_scores` table in the ``head_scores`` shape (``task, score, layer, head,
    value, samples``, ``head`` = the KV head, ``value`` = its ``agg``), plus ``query_heads``: what
    the head map, the head tables and the CLI draw and print."""
    if agg not in AGGREGATES:
        raise WorkbenchError(f"unknown aggregate {agg!r}: choose {' or '.join(AGGREGATES)}")
    return kv_groups.rename(columns={"kv_head": "head", agg: "value"})[
        ["task", "score", "layer", "head", "value", "samples", "query_heads"]
    ]


# ----------------------------------------------------------------------------- how many KV heads


def kv_heads_of(adapter) -> int:
    """The key/value heads per layer of an adapter's model (:mod:`workbench.adapters`): its
    ``kv_heads`` where the adapter has one, else the model's config (TransformerLens
    ``cfg.n_key_value_heads``, Hugging Face ``num_key_value_heads`` / ``num_kv_heads``,
    ``multi_query``); the query heads when the config names none (no grouped-query attention)."""
    n_heads = int(adapter.head_shape[0])
    found = getattr(adapter, "kv_heads", None)
    model = adapter.model
    if found is None and getattr(model, "cfg", None) is not None:  # TransformerLens
        found = getattr(model.cfg, "n_key_value_heads", None)
    if found is None and getattr(model, "config", None) is not None:  # Hugging Face
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        for name in ("num_key_value_heads", "num_kv_heads"):
            found = found if found is not None else getattr(config, name, None)
        if found is None and getattr(config, "multi_query", False) is True:
            found = 1
    kv = int(found) if found is not None else n_heads
    group_size(n_heads, kv)
    return kv


def _kv_heads_from_name(model: str, heads: int) -> int | None:
    """Key/value heads of a model the workbench builds without a download, from its name: zoo
    models, ``planted``, ``minilm`` (no GQA) and ``random:`` shapes (their config); None else."""
    from workbench.models import RANDOM_SHAPES
    from workbench.zoo import ZOO

    if model in ZOO or model == "minilm" or model.split(":")[0] == "planted":
        return heads
    if model.startswith("random:") and model[len("random:") :] in RANDOM_SHAPES:
        config = RANDOM_SHAPES[model[len("random:") :]]()
        return int(getattr(config, "num_key_value_heads", None) or heads)
    return None


def run_kv_heads(run, kv_heads: int | None = None) -> tuple[int, int]:
    """``(heads, kv_heads)`` of a run's model (:class:`~workbench.runs.Run`): the manifest's
    ``model_info.kv_heads`` (recorded since KV-group views exist); for older runs ``kv_heads``
    when given, else the config of a model named by the run that the workbench builds offline;
    else :class:`WorkbenchError` asking for ``--kv-heads``. A given ``kv_heads`` that contradicts
    the manifest is refused."""
    info = run.manifest.get("model_info") or {}
    heads = info.get("heads")
    if not isinstance(heads, int) or isinstance(heads, bool):
        heads = int(run.table("head_scores")["head"].max()) + 1
    recorded = info.get("kv_heads")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        if kv_heads is not None and kv_heads != recorded:
            raise WorkbenchError(
                f"the run in {run.path} records {recorded} key/value heads for its model, not {kv_heads}: "
                "leave out --kv-heads"
            )
        group_size(heads, recorded)
        return heads, recorded
    if kv_heads is None:
        kv_heads = _kv_heads_from_name(str(run.manifest.get("settings", {}).get("model", "")), heads)
    if kv_heads is None:
        raise WorkbenchError(
            f"the run in {run.path} does not record how many key/value heads its model has (it was scored "
            "before the workbench recorded them): pass --kv-heads N, N = num_key_value_heads of the model's "
            f"config ({heads} when the model has no grouped-query attention)"
        )
    group_size(heads, kv_heads)
    return heads, kv_heads


def run_kv_group_scores(run, kv_heads: int | None = None, table: str = "head_scores") -> pd.DataFrame:
    """:func:`kv_group_scores` of a run's ``table`` (``head_scores`` or ``imported_scores``),
    computed on read with :func:`run_kv_heads`."""
    heads, kv = run_kv_heads(run, kv_heads)
    return kv_group_scores(run.table(table), kv, heads)
