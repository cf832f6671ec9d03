"""Training data of the zoo: a mixture that makes sinks, induction and retrieval heads appear.

- ``text``: natural-ish text: Python standard-library docstrings (available offline), or a
  larger corpus (:mod:`workbench.zoo.corpus`) given as token ids;
- ``repeat``: a random token sequence repeated; the period varies per sample (a fixed period
  lets a rotary model learn a fixed-offset head that only looks like induction), up to half
  the sample so that copying is learnt over long distances too;
- ``needle``: a haystack of text with "The secret code of NAME is DIGITS." at a random depth
  and the question "The secret code of NAME is" at the end; loss on the answer digits.

Every sample starts with ``<bos>``. Batches are a pure function of the generator's seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from workbench.errors import WorkbenchError
from workbench.tasks import NAMES, docstring_text
from workbench.zoo.tokenizer import byte_ids, byte_tokenizer


@cache
def corpus_ids() -> torch.Tensor:
    """The standard-library docstrings of :func:`workbench.tasks.docstring_text`, tokenised."""
    return bytes_to_ids(docstring_text().encode())


def bytes_to_ids(data: bytes) -> torch.Tensor:
    """``[len(data)]`` token ids of UTF-8 ``data`` (one per byte), as ``int16`` to save memory
    on large corpora (ids are below 259)."""
    table = byte_ids().to(torch.int16)
    if not data:
        return table[:0]
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return torch.cat([table[part.long()] for part in raw.split(1 << 24)])


@dataclass(frozen=True)
class Mixture:
    """Sampling weights of the three kinds of sample, and the period range of repeats (drawn
    uniformly, at most half the sample)."""

    text: float = 0.4
    repeat: float = 0.3
    needle: float = 0.3
    min_period: int = 8
    max_period: int = 96
    first_period_loss: bool = False  # also train on a repeat's unpredictable first period


def sample_batch(
    batch: int, length: int, gen: torch.Generator, mix: Mixture = Mixture(), corpus: torch.Tensor | None = None
):
    """``(ids, loss_mask)``, both ``[batch, length]``; the loss applies to next-token targets
    where ``loss_mask`` is True. Text and haystacks are windows of ``corpus`` (token ids
    ``[tokens]``; default: :func:`corpus_ids`).

    With ``first_period_loss``, repeats keep the loss on their unpredictable first period: to
    predict "anything" there, a head that copies from earlier occurrences must stay silent,
    which it learns to do by attending to ``<bos>`` (attention-sink behaviour).
    """
    tok = byte_tokenizer()
    corpus = corpus_ids() if corpus is None else corpus
    ids = torch.empty(batch, length, dtype=torch.long)
    loss = torch.ones(batch, length, dtype=torch.bool)
    weights = torch.tensor([mix.text, mix.repeat, mix.needle], dtype=torch.float64)
    kinds = torch.multinomial(weights, batch, replacement=True, generator=gen)
    for b, kind in enumerate(kinds.tolist()):
        ids[b, 0] = tok.bos_token_id
        body = length - 1
        if kind == 0:
            ids[b, 1:] = _window(corpus, body, gen)
        elif kind == 1:
            high = max(mix.min_period, min(mix.max_period, body // 2))
            period = int(torch.randint(mix.min_period, high + 1, (), generator=gen))
            seq = torch.randint(0, 256, (period,), generator=gen)
            ids[b, 1:] = seq.repeat(body // period + 1)[:body]
            if not mix.first_period_loss:
                loss[b, : period + 1] = False
        else:
            ids[b, 1:], answer = _needle_sample(body, corpus, gen)
            loss[b] = False
            loss[b, length - 1 - len(answer) : length - 1] = True  # predict the answer digits
    return ids, loss


def _window(corpus: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    start = int(torch.randint(0, len(corpus) - n, (), generator=gen))
    return corpus[start : start + n].long()


def needle_parts(gen: torch.Generator) -> tuple[str, str, str]:
    """``(needle sentence, question, answer)`` with a random name and 4-digit code."""
    name = NAMES[int(torch.randint(0, len(NAMES), (), generator=gen))]
    code = "".join(str(int(d)) for d in torch.randint(0, 10, (4,), generator=gen))
    return f" The secret code of {name} is {code}. ", f" The secret code of {name} is ", code


def _needle_sample(n: int, corpus: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, str]:
    tok = byte_tokenizer()
    needle, question, answer = needle_parts(gen)
    needle_ids = torch.tensor(tok(needle, add_special_tokens=False)["input_ids"])
    tail_ids = torch.tensor(tok(question + answer, add_special_tokens=False)["input_ids"])
    room = n - len(needle_ids) - len(tail_ids)
    if room < 1:
        raise WorkbenchError(f"a needle sample needs more than {n - room} tokens; use longer sequences")
    hay = _window(corpus, room, gen)
    depth = int(torch.randint(0, len(hay) + 1, (), generator=gen))
    return torch.cat([hay[:depth], needle_ids, hay[depth:], tail_ids]), answer
