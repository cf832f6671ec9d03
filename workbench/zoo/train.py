"""Training and loading of zoo models: small TransformerLens models the project trains itself."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from workbench.errors import WorkbenchError
from workbench.zoo.data import Mixture, sample_batch
from workbench.zoo.tokenizer import byte_tokenizer

#: Committed weights live here, one folder per model.
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Stage:
    """One phase of training: ``steps`` batches of ``batch`` x ``seq_len`` tokens from ``mixture``."""

    steps: int
    seq_len: int
    batch: int
    mixture: Mixture = Mixture()


@dataclass(frozen=True)
class ZooSpec:
    """Architecture and training recipe of one zoo model (rotary, pre-LayerNorm).

    Training runs the ``stages`` in order under one learning-rate schedule (linear warm-up,
    cosine decay): short samples first, where induction forms quickly, then long ones.
    """

    name: str
    description: str
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int | None  # None: attention-only
    n_ctx: int
    stages: tuple[Stage, ...]
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    @property
    def steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    @classmethod
    def from_dict(cls, data: dict) -> ZooSpec:
        """Inverse of ``dataclasses.asdict`` (as stored in ``spec.json``)."""
        stages = tuple(Stage(**{**st, "mixture": Mixture(**st["mixture"])}) for st in data["stages"])
        return cls(**{**data, "stages": stages})

    def config(self):
        from transformer_lens import HookedTransformerConfig

        return HookedTransformerConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_model // self.n_heads,
            d_mlp=self.d_mlp,
            attn_only=self.d_mlp is None,
            n_ctx=self.n_ctx,
            d_vocab=len(byte_tokenizer()),
            act_fn="gelu",
            normalization_type="LN",
            positional_embedding_type="rotary",
            rotary_dim=self.d_model // self.n_heads,
            model_name=self.name,
            seed=self.seed,
            default_prepend_bos=True,
        )


def build(spec: ZooSpec):
    """A freshly initialised model of this spec, with the byte tokenizer attached."""
    from transformer_lens import HookedTransformer

    torch.manual_seed(spec.seed)
    return HookedTransformer(spec.config(), tokenizer=byte_tokenizer())


def train(spec: ZooSpec, out_dir: Path = WEIGHTS_DIR, device: str | None = None, progress: bool = True) -> dict:
    """Train ``spec`` from its seed; write ``out_dir/NAME/{model.safetensors,spec.json,metrics.json}``.

    Deterministic on one device: batches and initialisation come from ``spec.seed``.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on CUDA
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # e.g. the embedding's scatter-add
    try:
        return _train(spec, Path(out_dir), device, progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(spec: ZooSpec, out_dir: Path, device: str, progress: bool) -> dict:
    model = build(spec).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps)))
    )
    gen = torch.Generator().manual_seed(spec.seed)
    losses, start = [], time.perf_counter()
    bar = tqdm(total=spec.steps, desc=f"training {spec.name}", disable=not progress)
    for stage in spec.stages:
        for _ in range(stage.steps):
            ids, mask = sample_batch(stage.batch, stage.seq_len, gen, stage.mixture)
            loss = _step(model, opt, ids.to(device), mask.to(device))
            sched.step()
            losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", seq=stage.seq_len)
    bar.close()
    metrics = {
        "first_loss": losses[0],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": round(time.perf_counter() - start, 1),
        "device": str(device),
        "torch": torch.__version__,
    }
    folder = Path(out_dir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _step(model, opt, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """One optimiser step on next-token loss where ``mask`` marks the targets; returns the loss."""
    logits = model(ids)
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    weights = mask[:, 1:].reshape(-1).float()
    loss = (per_token * weights).sum() / weights.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def load(name: str, weights_dir: Path = WEIGHTS_DIR):
    """A trained zoo model (eval mode, CPU) from ``weights_dir/NAME``."""
    folder = Path(weights_dir) / name
    if not (folder / "model.safetensors").exists():
        raise WorkbenchError(f"zoo model {name!r} has no weights in {folder}: run `workbench zoo train {name}`")
    spec = ZooSpec.from_dict(json.loads((folder / "spec.json").read_text()))
    model = build(spec)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
    if real_missing or unexpected:
        raise WorkbenchError(
            f"zoo weights in {folder} do not fit the spec: missing {real_missing}, unexpected {unexpected}"
        )
    return model.eval()
