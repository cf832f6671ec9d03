"""Sparse autoencoders on attention outputs, trained and stored with sae-lens.

Following Kissane et al. ("Interpreting Attention Layer Outputs with Sparse Autoencoders"),
the SAE reads one layer's ``hook_z`` with the heads concatenated (``[n_heads * d_head]`` per
token), so each decoder row splits into one block per head: the feature's head attribution.
Activations come from the workbench's own model and tasks (no hub data set); sae-lens's own
``SAETrainer`` trains on them through a data provider, and SAEs are saved in sae-lens's format
(``cfg.json`` + ``sae_weights.safetensors``) with ``metadata.hook_name`` set.

Example:
    >>> samples = text_samples(model.tokenizer, None, 256, 64)
    >>> sae = train_sae(model, layer=1, samples=samples, architecture="topk", d_sae=128, k=8)
    >>> evaluate(model, sae, 1, samples[:8])      # l0, explained variance, CE loss recovered, dead share
    >>> head_attribution(sae, n_heads=4)          # feature, head, share of the decoder norm
    >>> train_and_evaluate(model, SAETrainSettings(layer=1), "saes/L1")  # all of it, into a folder

Every function takes a model or its :class:`~workbench.adapters.ModelAdapter`;
:func:`train_and_evaluate` resolves the adapter once and passes it along.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from probes.ablation import Model, check_length, head_outputs
from workbench.adapters import adapter_for
from workbench.errors import WorkbenchError
from workbench.tasks import TaskSample

ARCHITECTURES = ("standard", "topk")
#: Activations per SAE training step; training needs at least two steps.
SAE_BATCH = 1024


def hook_name(layer: int) -> str:
    """The TransformerLens name of the activation the SAE reads."""
    return f"blocks.{layer}.attn.hook_z"


@torch.no_grad()
def activations(model: Model, layer: int, samples: Sequence[TaskSample]) -> torch.Tensor:
    """``hook_z`` of ``layer`` with heads concatenated, every token of every sample:
    ``[tokens, n_heads * d_head]`` float32."""
    adapter = adapter_for(model)
    n_layers = adapter.n_layers
    if not 0 <= layer < n_layers:
        raise WorkbenchError(f"layer {layer} out of range: the model has {n_layers} layers")
    parts = [head_outputs(adapter, s.ids.view(1, -1))[layer][0] for s in samples]
    return torch.cat([z.reshape(z.shape[0], -1).float() for z in parts])


def _stream(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of rows of ``acts`` (a data provider for sae-lens's trainer)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(acts), generator=gen).split(batch):
            if len(idx) == batch:
                yield acts[idx]


def check_sae_settings(
    architecture: str, d_sae: int, k: int, l1_coefficient: float, training_tokens: int, batch: int, lr: float
) -> None:
    """Refuse SAE settings sae-lens could not train, or would train into nonsense
    (:class:`WorkbenchError`)."""
    if architecture not in ARCHITECTURES:
        raise WorkbenchError(f"unknown SAE architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if d_sae < 1:
        raise WorkbenchError(f"an SAE needs at least 1 feature, got d_sae {d_sae}")
    if architecture == "topk" and k < 1:
        raise WorkbenchError(f"a top-k SAE needs at least 1 active feature, got k {k}")
    if architecture == "topk" and k > d_sae:
        raise WorkbenchError(f"--k {k} active features cannot exceed --d-sae {d_sae} features")
    if not l1_coefficient >= 0:
        raise WorkbenchError(f"the L1 coefficient must be >= 0, got {l1_coefficient}")
    if batch < 1:
        raise WorkbenchError(f"the batch must hold at least 1 activation, got {batch}")
    if training_tokens < 2 * batch:
        raise WorkbenchError(
            f"{training_tokens} training tokens make fewer than two batches of {batch}: training "
            "needs at least two steps"
        )
    if not lr > 0:
        raise WorkbenchError(f"the learning rate must be > 0, got {lr}")


def train_sae(
    model: Model,
    layer: int,
    samples: Sequence[TaskSample],
    architecture: str = "topk",
    d_sae: int = 128,
    k: int = 8,
    l1_coefficient: float = 1.0,
    training_tokens: int = 400_000,
    batch: int = SAE_BATCH,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
):
    """An sae-lens training SAE (``"standard"``: ReLU with an L1 penalty; ``"topk"``: k active
    features) trained on ``layer``'s concatenated ``hook_z`` over ``samples``;
    :func:`check_sae_settings` refuses bad settings before any work."""
    from sae_lens import (
        SAETrainer,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig

    check_sae_settings(architecture, d_sae, k, l1_coefficient, training_tokens, batch, lr)
    adapter = adapter_for(model)
    acts = activations(adapter, layer, samples)
    if len(acts) < batch:
        raise WorkbenchError(f"{len(acts)} tokens of activations, fewer than one batch of {batch}: give more samples")
    torch.manual_seed(seed)
    common = {"d_in": acts.shape[1], "d_sae": d_sae, "device": device}
    if architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1_coefficient, **common))
    sae.cfg.metadata.hook_name = hook_name(layer)
    sae.cfg.metadata.model_name = str(
        getattr(getattr(adapter.model, "cfg", None), "model_name", type(adapter.model).__name__)
    )
    cfg = SAETrainerConfig(
        total_training_samples=training_tokens,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=max(1, training_tokens // batch // 20),
        device=device,
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=_stream(acts.to(device), batch, seed))
    return trainer.fit().eval()


def save_sae(sae, path: str | Path) -> Path:
    """sae-lens's inference format: ``cfg.json`` and ``sae_weights.safetensors`` in ``path``."""
    path = Path(path)
    sae.save_inference_model(path)
    return path


def load_sae(path: str | Path, model: Model, layer: int):
    """An SAE saved by :func:`save_sae` (or any sae-lens SAE on disk), checked to read this
    model's ``layer`` ``hook_z``: a clear error when it was trained on another hook or width."""
    from sae_lens import SAE

    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise WorkbenchError(f"{path} holds no sae-lens SAE (no cfg.json)")
    try:
        sae = SAE.load_from_disk(path)
    except Exception as exc:  # sae-lens raises several types for bad files
        raise WorkbenchError(f"cannot load the SAE in {path}: {exc}") from exc
    n_heads, d_head = adapter_for(model).head_shape
    expected = hook_name(layer)
    found = getattr(sae.cfg.metadata, "hook_name", None)
    if found != expected:
        raise WorkbenchError(f"the SAE in {path} reads {found or 'an unnamed hook'}, not {expected}")
    if sae.cfg.d_in != n_heads * d_head:
        raise WorkbenchError(
            f"the SAE in {path} reads {sae.cfg.d_in} numbers per token; this model's "
            f"{expected} has {n_heads} x {d_head} = {n_heads * d_head}"
        )
    return sae.eval()


@torch.no_grad()
def evaluate(model: Model, sae, layer: int, samples: Sequence[TaskSample]) -> dict[str, float]:
    """L0 (mean active features per token), explained variance, dead-feature share (never
    active on these samples), and next-token cross-entropy clean / with the SAE's reconstruction
    spliced into ``hook_z`` / with the layer's ``hook_z`` zeroed, and the share of the loss
    gap the SAE recovers: ``(zero - spliced) / (zero - clean)``."""
    from probes.ablation import text_loss

    adapter = adapter_for(model)
    acts = activations(adapter, layer, samples).to(sae.device)
    features = sae.encode(acts)
    recon = sae.decode(features)
    residual = ((acts - recon) ** 2).sum()
    total = ((acts - acts.mean(0)) ** 2).sum()
    loss = text_loss(samples)

    def with_z(replace) -> float:
        remove = adapter.z_hooks(lambda l, z: replace(z) if l == layer else None)
        try:
            return loss(adapter)
        finally:
            remove()

    def spliced(z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(*z.shape[:-2], -1)
        return sae.decode(sae.encode(flat.to(sae.device).float())).to(z.dtype).reshape(z.shape)

    clean, zero, with_sae = loss(adapter), with_z(torch.zeros_like), with_z(spliced)
    return {
        "l0": float((features > 0).float().sum(-1).mean()),
        "explained_variance": float(1 - residual / total),
        "dead_fraction": float(((features > 0).sum(0) == 0).float().mean()),
        "ce_loss_clean": clean,
        "ce_loss_spliced": with_sae,
        "ce_loss_zero_ablated": zero,
        "ce_loss_recovered": (zero - with_sae) / (zero - clean) if zero != clean else float("nan"),
        "tokens": len(acts),
    }


def head_attribution(sae, n_heads: int) -> pd.DataFrame:
    """Each feature's decoder row split into per-head blocks: ``feature, head, share`` (the
    block's squared norm over the row's; shares sum to 1 per feature)."""
    w = sae.W_dec.detach().float().cpu()  # [d_sae, n_heads * d_head]
    if w.shape[1] % n_heads:
        raise WorkbenchError(f"the SAE's width {w.shape[1]} is not a multiple of {n_heads} heads")
    per_head = (w.view(w.shape[0], n_heads, -1) ** 2).sum(-1)
    share = per_head / per_head.sum(-1, keepdim=True).clamp_min(1e-12)
    features, heads = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(n_heads), indexing="ij")
    return pd.DataFrame(
        {"feature": features.reshape(-1).numpy(), "head": heads.reshape(-1).numpy(), "share": share.reshape(-1).numpy()}
    )


@torch.no_grad()
def top_contexts(
    model: Model,
    sae,
    layer: int,
    samples: Sequence[TaskSample],
    n: int = 5,
    window: int = 12,
    features: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The ``n`` tokens that activate each feature most: ``feature, rank, activation, sample,
    position, context`` (``window`` tokens before, the token in ``[[ ]]``), for the app."""
    adapter = adapter_for(model)
    tokenizer = getattr(adapter.model, "tokenizer", None)
    acts = activations(adapter, layer, samples).to(sae.device)
    feats = sae.encode(acts).float().cpu()  # [tokens, d_sae]
    where = [(i, p) for i, s in enumerate(samples) for p in range(len(s.ids))]
    rows = []
    for f in features if features is not None else range(feats.shape[1]):
        values, idx = feats[:, f].topk(min(n, len(where)))
        for rank, (v, t) in enumerate(zip(values.tolist(), idx.tolist())):
            if v <= 0:
                break
            i, p = where[t]
            ids = samples[i].ids
            before, token = ids[max(0, p - window) : p].tolist(), [int(ids[p])]
            text = (
                (tokenizer.decode(before) + "[[" + tokenizer.decode(token) + "]]") if tokenizer else str(before + token)
            )
            rows.append((f, rank, v, i, p, text))
    return pd.DataFrame(rows, columns=["feature", "rank", "activation", "sample", "position", "context"])


@torch.no_grad()
def direct_attribution(
    model: Model, sae, layer: int, samples: Sequence[TaskSample], contexts: pd.DataFrame, n_heads: int
) -> pd.DataFrame:
    """Direct feature attribution on examples: for each row of :func:`top_contexts`, how much
    each head's output adds to the feature's pre-activation (the input's head block times the
    encoder's head block; the heads' sum plus the encoder bias is the pre-activation, which is
    the activation of an active feature of a saved SAE, :func:`load_sae`).
    Rows ``feature, rank, head, contribution``."""
    if contexts.empty:
        return pd.DataFrame(columns=["feature", "rank", "head", "contribution"])
    acts = activations(model, layer, samples).to(sae.device)
    starts = torch.tensor([0] + [len(s.ids) for s in samples]).cumsum(0)
    rows = torch.as_tensor(starts[contexts["sample"].to_numpy()] + torch.as_tensor(contexts["position"].to_numpy()))
    x = sae.process_sae_in(acts[rows])  # [examples, d_in]
    w = sae.W_enc[:, torch.as_tensor(contexts["feature"].to_numpy())].T  # [examples, d_in]
    contribution = (x.view(len(rows), n_heads, -1) * w.view(len(rows), n_heads, -1)).sum(-1).float().cpu()
    return pd.DataFrame(
        {
            "feature": contexts["feature"].to_numpy().repeat(n_heads),
            "rank": contexts["rank"].to_numpy().repeat(n_heads),
            "head": torch.arange(n_heads).repeat(len(rows)).numpy(),
            "contribution": contribution.reshape(-1).numpy(),
        }
    )


# Train, save and evaluate in one call (what ``workbench sae train`` and ``sae eval`` run).


@dataclass(frozen=True)
class SAETrainSettings:
    """One SAE on ``layer``'s ``hook_z``: trained on ``samples`` text samples of ``length``
    tokens (``text``: a file, a folder or ``hf:DATASET``; built-in docstrings when None) for
    ``training_tokens`` activations (samples are revisited), in batches of ``batch``, and
    evaluated on held-out samples from the same text. :func:`check_sae_settings` and the
    sample counts are checked at construction (:class:`WorkbenchError`)."""

    layer: int
    architecture: str = "topk"
    d_sae: int = 128
    k: int = 8
    l1_coefficient: float = 1.0
    samples: int = 48
    length: int = 256
    training_tokens: int = 400_000
    text: str | None = None
    batch: int = SAE_BATCH
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise WorkbenchError(f"layer must be >= 0, got {self.layer}")
        check_sae_settings(
            self.architecture, self.d_sae, self.k, self.l1_coefficient, self.training_tokens, self.batch, self.lr
        )
        if self.samples < 2 or self.length < 2:
            raise WorkbenchError(
                f"an SAE trains on at least 2 samples of at least 2 tokens, got {self.samples} of {self.length}"
            )

    @property
    def held_out(self) -> int:
        """Samples set aside for the evaluation."""
        return max(2, self.samples // 8)

    def default_folder(self, model_name: str) -> Path:
        """``saes/<model>-L<layer>-<architecture>`` (``/`` and ``:`` of the name as ``_``)."""
        return Path("saes") / f"{model_name.replace('/', '_').replace(':', '_')}-L{self.layer}-{self.architecture}"


@dataclass(frozen=True)
class SAEEvalSettings:
    """The evaluation of a saved SAE on ``layer``: the last ``samples`` text samples of
    ``length`` tokens of ``text`` (the end of the text, which training does not reach first)."""

    layer: int
    samples: int = 8
    length: int = SAETrainSettings.length
    text: str | None = None

    def __post_init__(self) -> None:
        if self.layer < 0 or self.samples < 1 or self.length < 2:
            raise WorkbenchError(
                f"an SAE evaluation needs layer >= 0, samples >= 1 and length >= 2, got "
                f"{self.layer}, {self.samples} and {self.length}"
            )


def train_and_evaluate(model: Model, settings: SAETrainSettings, out: str | Path) -> dict[str, float]:
    """Train an SAE, save it in ``out`` (sae-lens's format), reload it as every later reader
    sees it, and write beside it ``evaluation.json`` (:func:`evaluate` on held-out samples),
    ``head_attribution``, ``top_contexts`` and ``direct_attribution`` (Parquet). Returns the
    evaluation."""
    from workbench.console import check_output_folder
    from workbench.models import task_tokenizer
    from workbench.runs import atomic_write
    from workbench.tasks import text_samples

    out = Path(out)
    check_output_folder(out)
    adapter = adapter_for(model)
    check_length(adapter, settings.length)
    items = text_samples(
        task_tokenizer(adapter.model), settings.text, settings.length, settings.samples + settings.held_out
    )
    if len(items) < settings.samples + 2:
        raise WorkbenchError(f"the text holds only {len(items)} samples of {settings.length} tokens; lower --samples")
    train, held_out = items[: settings.samples], items[settings.samples :]
    sae = train_sae(
        adapter,
        settings.layer,
        train,
        settings.architecture,
        d_sae=settings.d_sae,
        k=settings.k,
        l1_coefficient=settings.l1_coefficient,
        training_tokens=settings.training_tokens,
        batch=settings.batch,
        lr=settings.lr,
        seed=settings.seed,
        device=str(adapter.device),
    )
    save_sae(sae, out)
    sae = load_sae(out, adapter, settings.layer)  # the inference form, as every later reader sees it
    metrics = evaluate(adapter, sae, settings.layer, held_out)
    atomic_write(out / "evaluation.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    n_heads = adapter.head_shape[0]
    head_attribution(sae, n_heads).to_parquet(out / "head_attribution.parquet", index=False)
    contexts = top_contexts(adapter, sae, settings.layer, held_out)
    contexts.to_parquet(out / "top_contexts.parquet", index=False)
    direct_attribution(adapter, sae, settings.layer, held_out, contexts, n_heads).to_parquet(
        out / "direct_attribution.parquet", index=False
    )
    return metrics


def evaluate_saved(model: Model, path: str | Path, settings: SAEEvalSettings) -> dict[str, float]:
    """:func:`evaluate` of the SAE saved in ``path`` (:func:`load_sae` checks that it reads
    this model's layer)."""
    from workbench.models import task_tokenizer
    from workbench.tasks import text_samples

    adapter = adapter_for(model)
    check_length(adapter, settings.length)
    sae = load_sae(path, adapter, settings.layer)
    items = text_samples(task_tokenizer(adapter.model), settings.text, settings.length)[-settings.samples :]
    return evaluate(adapter, sae, settings.layer, items)


# Reading what ``workbench sae train`` saved (the explorer's SAE page, notebooks).

#: Tables ``workbench sae train`` writes beside the SAE.
RESULT_TABLES = ("head_attribution", "direct_attribution", "top_contexts")


@dataclass
class SavedSAE:
    """An SAE folder: sae-lens's ``cfg.json`` and the results ``workbench sae train`` wrote
    beside it (``evaluation.json``, :data:`RESULT_TABLES` as Parquet)."""

    path: Path
    cfg: dict
    evaluation: dict

    @property
    def hook_name(self) -> str | None:
        return (self.cfg.get("metadata") or {}).get("hook_name")

    @property
    def layer(self) -> int | None:
        """The layer whose ``hook_z`` the SAE reads (from the hook name)."""
        parts = (self.hook_name or "").split(".")
        return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None

    @property
    def model_name(self) -> str | None:
        return (self.cfg.get("metadata") or {}).get("model_name")

    def has_table(self, name: str) -> bool:
        return (self.path / f"{name}.parquet").is_file()

    def table(self, name: str) -> pd.DataFrame:
        """One of :data:`RESULT_TABLES`; :class:`WorkbenchError` when it is missing or unreadable."""
        file = self.path / f"{name}.parquet"
        if not file.is_file():
            raise WorkbenchError(
                f"the SAE in {self.path} has no {name} table: train it with `workbench sae train`, which writes it"
            )
        try:
            return pd.read_parquet(file)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise WorkbenchError(f"the SAE in {self.path} is corrupt: cannot read {file.name} ({exc})") from exc

    @classmethod
    def open(cls, path: str | Path) -> SavedSAE:
        """Read an SAE folder's configuration and evaluation (``evaluation`` is empty when the
        SAE has none); :class:`WorkbenchError` with the reason when the folder is not readable."""
        path = Path(path).expanduser()
        found = {}
        for name, required in (("cfg.json", True), ("evaluation.json", False)):
            file = path / name
            if not file.is_file():
                if required:
                    raise WorkbenchError(f"{path} holds no sae-lens SAE (no cfg.json)")
                continue
            try:
                found[name] = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise WorkbenchError(f"the SAE in {path} is corrupt: {name} is not readable JSON ({exc})") from exc
            if not isinstance(found[name], dict):
                raise WorkbenchError(f"the SAE in {path} is corrupt: {name} does not hold a JSON object")
        return cls(path, found["cfg.json"], found.get("evaluation.json", {}))


def list_saes(root: str | Path) -> tuple[list[SavedSAE], list[tuple[Path, str]]]:
    """SAE folders directly under ``root`` (those with a ``cfg.json``), by name, plus
    ``(folder, reason)`` for those that cannot be read; empty when ``root`` does not exist."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return [], []
    found, broken = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "cfg.json").exists()):
        try:
            found.append(SavedSAE.open(folder))
        except WorkbenchError as exc:
            broken.append((folder, str(exc)))
    return found, broken
