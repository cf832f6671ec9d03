"""Training and loading of zoo models: small TransformerLens models the project trains itself.

Training runs :class:`~workbench.zoo.functional.ZooModel` (the same function and parameters as
the spec's ``HookedTransformer``, with fused attention, no TransformerLens needed); loading
gives a ``HookedTransformer``.
"""

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
from workbench.zoo.data import Mixture, bytes_to_ids, sample_batch
from workbench.zoo.functional import ZooModel
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
    ``corpus``: ``None`` trains on standard-library docstrings; ``"installed"`` on a corpus
    built by :func:`workbench.zoo.corpus.build_corpus` (its folder is passed to :func:`train`).
    ``checkpoints``: steps after which a float16 copy of the weights is kept (the emergence of
    sinks over training is plotted from them).
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
    corpus: str | None = None
    checkpoints: tuple[int, ...] = ()

    @property
    def steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    @classmethod
    def from_dict(cls, data: dict) -> ZooSpec:
        """Inverse of ``dataclasses.asdict`` (as stored in ``spec.json``)."""
        stages = tuple(Stage(**{**st, "mixture": Mixture(**st["mixture"])}) for st in data["stages"])
        return cls(**{**data, "stages": stages, "checkpoints": tuple(data.get("checkpoints", ()))})

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


def functional_model(spec: ZooSpec) -> ZooModel:
    """The spec's model as :class:`ZooModel`, initialised as :func:`build` initialises it."""
    return ZooModel(spec.n_layers, spec.d_model, spec.n_heads, spec.d_mlp, spec.n_ctx, len(byte_tokenizer()), spec.seed)


def train(
    spec: ZooSpec,
    out_dir: Path = WEIGHTS_DIR,
    device: str | None = None,
    progress: bool = True,
    corpus_dir: Path | None = None,
    max_seconds: float | None = None,
) -> dict:
    """Train ``spec`` from its seed; write ``out_dir/NAME/{model.safetensors,spec.json,metrics.json}``
    and ``checkpoints/step-S.safetensors`` for the spec's checkpoints.

    On CUDA the forward runs in bfloat16 autocast. ``corpus_dir``: the corpus folder of a spec
    with ``corpus="installed"``. ``max_seconds``: stop early (the weights so far are written,
    and ``metrics.json`` says ``"stopped_at"``). Batches and initialisation come from
    ``spec.seed``; deterministic algorithms are asked for (on CUDA, fused attention's backward
    is not guaranteed to be).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    corpus, corpus_info = _corpus(spec, corpus_dir)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on CUDA
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # e.g. the embedding's scatter-add
    try:
        return _train(spec, Path(out_dir), device, progress, corpus, corpus_info, max_seconds)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _corpus(spec: ZooSpec, corpus_dir: Path | None) -> tuple[torch.Tensor | None, dict | None]:
    if spec.corpus is None:
        return None, None
    if spec.corpus != "installed":
        raise WorkbenchError(f"unknown corpus {spec.corpus!r} in the recipe of {spec.name}")
    if corpus_dir is None:
        raise WorkbenchError(
            f"{spec.name} trains on a corpus of installed documentation: build it with "
            "`workbench zoo corpus --out DIR`, then pass `--corpus DIR`"
        )
    from workbench.zoo.corpus import load_corpus

    data, manifest = load_corpus(Path(corpus_dir))
    info = {"corpus_bytes": manifest["bytes"], "corpus_sha256": manifest["sha256"]}
    return bytes_to_ids(data), info


def _train(
    spec: ZooSpec,
    out_dir: Path,
    device: str,
    progress: bool,
    corpus: torch.Tensor | None,
    corpus_info: dict | None,
    max_seconds: float | None,
) -> dict:
    model = functional_model(spec).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps)))
    )
    folder = Path(out_dir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed)
    losses, curve, tokens, stopped = [], [], 0, None
    start = time.perf_counter()
    bar = tqdm(total=spec.steps, desc=f"training {spec.name}", disable=not progress)
    step = 0
    for stage in spec.stages:
        for _ in range(stage.steps):
            if max_seconds is not None and step > 0 and time.perf_counter() - start > max_seconds:
                stopped = step
                break
            ids, mask = sample_batch(stage.batch, stage.seq_len, gen, stage.mixture, corpus)
            losses.append(_step(model, opt, ids.to(device), mask.to(device)))
            sched.step()
            step += 1
            tokens += ids.numel()
            recent = sum(losses[-20:]) / len(losses[-20:])
            if step % 50 == 0 or step == spec.steps:
                curve.append({"step": step, "tokens": tokens, "loss": round(recent, 4)})
            if step in spec.checkpoints:
                _save(model, folder / "checkpoints" / f"step-{step}.safetensors", torch.float16)
            bar.update()
            bar.set_postfix(loss=f"{recent:.3f}", seq=stage.seq_len)
        if stopped is not None:
            break
    bar.close()
    metrics = {
        "first_loss": losses[0],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "steps": step,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 1),
        "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else str(device),
        "torch": torch.__version__,
        **(corpus_info or {}),
        **({"stopped_at": stopped} if stopped is not None else {}),
        "loss_curve": curve,
    }
    _save(model, folder / "model.safetensors", torch.float32)
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _save(model: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}, str(path))


def _step(model, opt, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """One optimiser step on next-token loss where ``mask`` marks the targets; returns the loss."""
    with torch.autocast("cuda", torch.bfloat16, enabled=ids.is_cuda):
        logits = model(ids)
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    weights = mask[:, 1:].reshape(-1).float()
    loss = (per_token * weights).sum() / weights.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def load(name: str, weights_dir: Path = WEIGHTS_DIR, step: int | None = None):
    """A trained zoo model (eval mode, CPU, float32) from ``weights_dir/NAME``; ``step``: one of
    its training checkpoints instead (:func:`checkpoint_steps`)."""
    folder = Path(weights_dir) / name
    if not (folder / "model.safetensors").exists():
        raise WorkbenchError(f"zoo model {name!r} has no weights in {folder}: run `workbench zoo train {name}`")
    spec = ZooSpec.from_dict(json.loads((folder / "spec.json").read_text()))
    model = build(spec)
    file = folder / "model.safetensors"
    if step is not None:
        if step not in checkpoint_steps(name, weights_dir):
            have = ", ".join(map(str, checkpoint_steps(name, weights_dir))) or "none"
            raise WorkbenchError(f"zoo model {name!r} has no checkpoint at step {step}; it has: {have}")
        file = folder / "checkpoints" / f"step-{step}.safetensors"
    state = {k: v.float() for k, v in load_file(str(file)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
    if real_missing or unexpected:
        raise WorkbenchError(
            f"zoo weights in {folder} do not fit the spec: missing {real_missing}, unexpected {unexpected}"
        )
    return model.eval()


def checkpoint_steps(name: str, weights_dir: Path = WEIGHTS_DIR) -> list[int]:
    """The training steps at which a zoo model kept a checkpoint, ascending."""
    folder = Path(weights_dir) / name / "checkpoints"
    return sorted(int(p.stem.removeprefix("step-")) for p in folder.glob("step-*.safetensors"))
