"""What a zoo model does: its attention sinks, induction, previous-token and retrieval heads,
measured with the kernel statistics, and its needle accuracy."""

from __future__ import annotations

import torch

from kernels import StatsSpec
from workbench.instrument import instrument
from workbench.zoo.data import Mixture, sample_batch
from workbench.zoo.tokenizer import byte_tokenizer


def head_table(layers_by_head: torch.Tensor) -> dict[str, float]:
    """``{"L.H": value}`` of a ``[layer, head]`` tensor."""
    return {f"{l}.{h}": round(float(v), 4) for l, row in enumerate(layers_by_head) for h, v in enumerate(row)}


@torch.no_grad()
def measure(model, n_samples: int = 16, length: int = 512, periods: tuple[int, ...] = (37, 83),
            seed: int = 1234) -> dict:
    """Per head (``[layer, head]`` tables) and model-level figures on fresh samples."""
    gen = torch.Generator().manual_seed(seed)
    device = model.cfg.device
    result: dict = {}
    # Sinks and previous-token heads on natural text.
    text, _ = sample_batch(n_samples, length, gen, Mixture(text=1, repeat=0, needle=0))
    with instrument(model, StatsSpec(sink_tokens=1, offsets=(1,))) as rec:
        model(text.to(device))
    layers = range(model.cfg.n_layers)
    result["sink_mass"] = head_table(torch.stack([rec.layer(l).sink_mass[:, :, 1:].mean((0, 2)) for l in layers]))
    result["previous_token_mass"] = head_table(
        torch.stack([rec.layer(l).offset_mass[:, :, 1:, 0].mean((0, 2)) for l in layers]))
    # Induction on a random sequence shown twice, at several periods (a fixed-offset head would
    # not score at all of them): mass from the second copy on the token after the first occurrence.
    # The first copy has nothing to copy from: a copying head that parks on <bos> there is a sink.
    for period in periods:
        seq = torch.randint(0, 256, (n_samples, period), generator=gen)
        ids = torch.cat([torch.full((n_samples, 1), byte_tokenizer().bos_token_id), seq.repeat(1, 2)], 1)
        with instrument(model, StatsSpec(sink_tokens=1, offsets=(period - 1,))) as rec:
            model(ids.to(device))
        result[f"induction_mass_period_{period}"] = head_table(
            torch.stack([rec.layer(l).offset_mass[:, :, period + 1:, 0].mean((0, 2)) for l in layers]))
        result[f"sink_mass_first_copy_period_{period}"] = head_table(
            torch.stack([rec.layer(l).sink_mass[:, :, 1:period + 1].mean((0, 2)) for l in layers]))
    result.update(_needles(model, n_samples, length, gen))
    return result


def _needles(model, n: int, length: int, gen: torch.Generator) -> dict:
    """Greedy answers to needle questions; per head, how often its most-attended key, at each
    answer step, is inside the needle and holds the token being generated (copy rate)."""
    marker = torch.tensor(byte_tokenizer()(" The secret code of ", add_special_tokens=False)["input_ids"])
    correct, steps = 0, 0
    hits = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for _ in range(n):
        ids, _ = sample_batch(1, length, gen, Mixture(text=0, repeat=0, needle=1))
        prompt, answer = ids[:, :-4].to(model.cfg.device), ids[0, -4:]
        needle_span = _needle_span(ids[0, :-4], marker)
        generated = []
        with instrument(model, StatsSpec(argmax=True)) as rec:
            cur = prompt
            for _step in range(4):
                nxt = model(cur)[0, -1].argmax()
                generated.append(int(nxt))
                cur = torch.cat([cur, nxt.view(1, 1)], 1)
        correct += int(torch.equal(torch.tensor(generated), answer))
        full = cur[0].cpu()
        for step in range(4):
            for layer in range(model.cfg.n_layers):
                key = rec.calls[layer][step].argmax[0, :, -1].cpu()  # [head]: most-attended key of the last row
                for h in range(model.cfg.n_heads):
                    k = int(key[h])
                    hits[layer, h] += float(k in needle_span and int(full[k]) == generated[step])
            steps += 1
    return {"needle_accuracy": correct / n, "needle_samples": n, "copy_rate": head_table(hits / steps)}


def _needle_span(ids: torch.Tensor, marker: torch.Tensor) -> range:
    """Token positions of the needle sentence: from the first occurrence of the marker to the
    next full stop (the question at the end is the marker's last occurrence)."""
    n = len(marker)
    starts = [i for i in range(len(ids) - n + 1) if torch.equal(ids[i:i + n], marker)]
    if len(starts) < 2:
        raise ValueError("needle sample without a needle and a question")
    stop = byte_tokenizer()(".", add_special_tokens=False)["input_ids"][0]
    end = starts[0] + n
    while end < len(ids) and int(ids[end]) != stop:
        end += 1
    return range(starts[0], end)
