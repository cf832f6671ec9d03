"""Attention on one prompt: every head's statistics at every position, the attention each key
receives (``key_mass``, summed over queries), and for short prompts the explicit pattern.

What the explorer's head-detail and live pages show; notebooks use it the same way.

Example:
    >>> seen = attend(load_model("zoo-2l"), "The secret code of Ada is 4711.")
    >>> seen.pattern(1, 1)            # [query, key] float32 (None above ``pattern_tokens``)
    >>> seen.head_statistics(1, 1)    # position, token, entropy, max_prob, sink_mass, ...
    >>> seen.top_keys(1, 1, n=5)      # the keys that receive the most attention
    >>> seen.head_means()             # layer x head means, in the columns of head_scores
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from kernels import AttentionStats, StatsSpec
from workbench.adapters import ModelAdapter, adapter_for
from workbench.errors import WorkbenchError
from workbench.instrument import instrument, record
from workbench.models import task_tokenizer
from workbench.recording import PatternSpec

#: Prompts up to this many tokens also get the explicit O(N^2) pattern of every head.
PATTERN_TOKENS = 256
#: Row statistics of :meth:`PromptAttention.head_statistics`, in display order.
ROW_STATISTICS = ("entropy", "max_prob", "sink_mass", "local_mass", "distance", "previous_token", "argmax")


@dataclass
class PromptAttention:
    """One prompt through an instrumented model (batch of one).

    ``stats[layer]``: the kernel's :class:`~kernels.AttentionStats` of that layer (row
    statistics ``[1, head, position]``, ``key_mass [1, head, key]``). ``patterns[layer]``:
    ``[head, query, key]`` float32, only for prompts of at most ``pattern_tokens`` tokens."""

    model_name: str
    ids: torch.Tensor  # [tokens]
    labels: list[str]  # one readable label per token
    stats: dict[int, AttentionStats]
    n_heads: int
    sink_tokens: int
    window: int
    patterns: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.stats)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def _check(self, layer: int, head: int) -> None:
        if layer not in self.stats or not 0 <= head < self.n_heads:
            raise WorkbenchError(
                f"head {layer}.{head} does not exist: the model has {self.n_layers} layers of "
                f"{self.n_heads} heads (counting from 0)"
            )

    def pattern(self, layer: int, head: int) -> np.ndarray | None:
        """``[query, key]`` attention probabilities of one head, or None for long prompts."""
        self._check(layer, head)
        if layer not in self.patterns:
            return None
        return self.patterns[layer][head].numpy()

    def head_statistics(self, layer: int, head: int) -> pd.DataFrame:
        """One row per query position: ``position, token`` and the statistics of
        :data:`ROW_STATISTICS` (``previous_token``: mass on the key one position back)."""
        self._check(layer, head)
        st = self.stats[layer]
        frame = pd.DataFrame({"position": np.arange(self.n_tokens), "token": self.labels})
        for name in ROW_STATISTICS:
            t = st.offset_mass[..., 0] if name == "previous_token" else getattr(st, name)
            frame[name] = t[0, head].numpy()
        return frame

    def key_mass(self, layer: int, head: int) -> pd.DataFrame:
        """``position, token, mass``: the attention each key receives, summed over queries."""
        self._check(layer, head)
        mass = self.stats[layer].key_mass[0, head].numpy()
        return pd.DataFrame({"position": np.arange(self.n_tokens), "token": self.labels, "mass": mass})

    def top_keys(self, layer: int, head: int, n: int = 10) -> pd.DataFrame:
        """The ``n`` keys that receive the most attention (rows of :meth:`key_mass`, highest first)."""
        return self.key_mass(layer, head).nlargest(n, "mass").reset_index(drop=True)

    def head_means(self) -> pd.DataFrame:
        """Every head's mean of each row statistic over the prompt, in the columns of a run's
        ``head_scores`` (``task`` is ``"prompt"``, ``score`` the statistic), so that
        :func:`workbench.plots.head_map` draws it."""
        rows = []
        for layer, st in sorted(self.stats.items()):
            for name in ROW_STATISTICS[:-1]:  # the argmax position has no meaningful mean
                t = st.offset_mass[..., 0] if name == "previous_token" else getattr(st, name)
                for head, value in enumerate(t[0].mean(-1).tolist()):
                    rows.append(("prompt", name, layer, head, value, 1))
        return pd.DataFrame(rows, columns=["task", "score", "layer", "head", "value", "samples"])


def token_labels(tokenizer, ids: torch.Tensor) -> list[str]:
    """One label per token: its text with spaces and line breaks made visible."""
    if tokenizer is None:
        return [str(i) for i in ids.tolist()]
    out = []
    for i in ids.tolist():
        text = tokenizer.decode([i])
        out.append(text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or f"[{i}]")
    return out


def attend(
    model: torch.nn.Module | ModelAdapter,
    prompt: str | torch.Tensor,
    *,
    pattern_tokens: int = PATTERN_TOKENS,
    sink_tokens: int = 1,
    window: int = 64,
    backend: str = "auto",
) -> PromptAttention:
    """Run ``model`` on one prompt (text, or token ids ``[tokens]``) under instrumentation.

    Statistics (with ``key_mass``) come from the kernels at any length the model takes; the
    explicit pattern of every head is added when the prompt has at most ``pattern_tokens``
    tokens (TransformerLens: ``hook_pattern`` through :class:`PatternSpec`; Hugging Face: eager
    attention with ``output_attentions``)."""
    adapter = adapter_for(model)
    tokenizer = task_tokenizer(adapter.model)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise WorkbenchError("the prompt is empty: type some text")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise WorkbenchError("the prompt tokenises to no tokens: type some text")
    spec = StatsSpec.all(sink_tokens=sink_tokens, window=window)
    rec = record(adapter, ids.view(1, -1), spec, backend=backend, progress=False)  # checks vocabulary and context
    stats = {layer: _cpu(rec.layer(layer)) for layer in rec.layers}
    seen = PromptAttention(
        rec.model_name, ids.cpu(), token_labels(tokenizer, ids), stats, adapter.head_shape[0], sink_tokens, window
    )
    if ids.numel() <= pattern_tokens:
        seen.patterns = _patterns(adapter, ids.view(1, -1), pattern_tokens)
    return seen


def _cpu(st: AttentionStats) -> AttentionStats:
    return AttentionStats(
        **{name: (t.float() if t.is_floating_point() else t).detach().cpu() for name, t in st.items()}
    )


@torch.no_grad()
def _patterns(adapter: ModelAdapter, ids: torch.Tensor, max_tokens: int) -> dict[int, torch.Tensor]:
    """``{layer: [head, query, key]}`` explicit patterns of one prompt ``ids [1, tokens]``."""
    ids = ids.to(adapter.device)
    if adapter.supports_patterns:
        spec = PatternSpec(layers=tuple(range(adapter.n_layers)), max_tokens=max_tokens)
        with instrument(adapter, StatsSpec(), patterns=spec) as rec:
            adapter.run(ids, None)
        return {layer: parts[0][0].float().cpu() for layer, parts in rec.patterns.items()}
    model = adapter.model  # Hugging Face: eager attention gives the patterns
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    attentions = getattr(out, "attentions", None)
    if not attentions:
        return {}
    return {layer: a[0].float().cpu() for layer, a in enumerate(attentions)}
