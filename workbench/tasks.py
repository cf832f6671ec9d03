"""Inputs that reveal what heads do, for any tokenizer: needle in a haystack, repeated random
tokens, and plain text.

Each task returns :class:`TaskSample` objects: token ids plus the positions a score needs
(the needle's span, the answer tokens, the repeat period). Samples are built from token ids,
not from re-tokenised strings, so the spans are exact for every tokenizer.

Example:
    >>> tok = model.tokenizer
    >>> samples = needle_samples(tok, lengths=[1024, 4096], depths=[0.1, 0.5, 0.9])
    >>> samples[0].ids.shape, samples[0].needle, tok.decode(samples[0].answer)
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from workbench.errors import WorkbenchError

_DOC_MODULES = (
    "abc",
    "argparse",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http",
    "inspect",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "zipfile",
)
#: Names the needles are about.
NAMES = (
    "Alice",
    "Bob",
    "Carol",
    "Dave",
    "Erin",
    "Frank",
    "Grace",
    "Heidi",
    "Ivan",
    "Judy",
    "Mallory",
    "Niaj",
    "Olivia",
    "Peggy",
    "Rupert",
    "Sybil",
    "Trent",
    "Victor",
    "Walter",
)


@dataclass(frozen=True)
class TaskSample:
    """One input: ``ids`` ``[tokens]`` (int64, starting with :func:`start_tokens`).

    ``needle``: token positions of the needle sentence (needle task); ``answer``: the token ids
    the model should produce right after ``ids`` (needle task); ``period``: repeat period
    (repeats task); ``depth``: where the needle sits, as a fraction of the haystack.
    """

    kind: str
    ids: torch.Tensor
    needle: range | None = None
    answer: torch.Tensor | None = None
    period: int | None = None
    depth: float | None = None


@cache
def docstring_text() -> str:
    """Offline haystack and text: Python standard-library docstrings, in a fixed order."""
    docs = []
    for name in _DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for _, obj in sorted(inspect.getmembers(module), key=lambda kv: kv[0]):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(doc)
    return "\n\n".join(dict.fromkeys(docs))  # drop repeats, keep order


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def start_tokens(tokenizer) -> list[int]:
    """What every sample starts with: the tokenizer's BOS, else its CLS (encoders), else nothing."""
    for name in ("bos_token_id", "cls_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return [token]
    return []


def needle_samples(
    tokenizer, lengths: list[int], depths: list[float], per_cell: int = 1, haystack: str | None = None, seed: int = 0
) -> list[TaskSample]:
    """For every length x depth, ``per_cell`` samples: haystack text with "The secret code of NAME
    is DIGITS." at ``depth`` and the question "The secret code of NAME is" at the end;
    ``answer`` holds the tokens of " DIGITS" exactly as in the needle. ``ids`` plus ``answer``
    make exactly ``length`` tokens, so answering fits in a context of ``length``."""
    if not lengths or not depths or per_cell < 1:
        raise WorkbenchError("needle_samples needs at least one length, one depth and per_cell >= 1")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise WorkbenchError(f"needle depths are fractions of the haystack in [0, 1], got {bad}")
    gen = torch.Generator().manual_seed(seed)
    hay = _encode(tokenizer, haystack if haystack is not None else docstring_text())
    samples = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                name = NAMES[int(torch.randint(0, len(NAMES), (), generator=gen))]
                code = "".join(str(int(d)) for d in torch.randint(0, 10, (4,), generator=gen))
                question = _encode(tokenizer, f" The secret code of {name} is")
                answer = _encode(tokenizer, f" {code}")
                needle = question + answer + _encode(tokenizer, ".")
                head = start_tokens(tokenizer)
                room = length - len(head) - len(needle) - len(question) - len(answer)
                if room < 1:
                    raise WorkbenchError(
                        f"a needle sample of {length} tokens does not fit: needle and question "
                        f"and answer alone take {length - room} tokens"
                    )
                if room > len(hay):
                    raise WorkbenchError(f"the haystack has {len(hay)} tokens, too few for {length}-token samples")
                start = int(torch.randint(0, len(hay) - room + 1, (), generator=gen))
                window = hay[start : start + room]
                at = round(depth * room)
                ids = head + window[:at] + needle + window[at:] + question
                first = len(head) + at
                samples.append(
                    TaskSample(
                        "niah",
                        torch.tensor(ids),
                        needle=range(first, first + len(needle)),
                        answer=torch.tensor(answer),
                        depth=depth,
                    )
                )
    return samples


def answer_span(sample: TaskSample) -> range:
    """Token positions of the answer inside a needle sample's needle (the digits of "The secret
    code of NAME is DIGITS."): the last place inside ``needle`` that holds ``answer``'s tokens."""
    if sample.needle is None or sample.answer is None:
        raise WorkbenchError("answer_span needs a needle sample (workbench.tasks.needle_samples)")
    inside = sample.ids[sample.needle.start : sample.needle.stop]
    n = len(sample.answer)
    for at in range(len(inside) - n, -1, -1):
        if torch.equal(inside[at : at + n], sample.answer.to(inside.device)):
            return range(sample.needle.start + at, sample.needle.start + at + n)
    raise WorkbenchError("the needle does not hold the answer's tokens: not a needle sample of workbench.tasks")


def repeat_samples(tokenizer, period: int, repeats: int = 2, n: int = 8, seed: int = 0) -> list[TaskSample]:
    """``n`` samples of ``repeats`` copies of a random sequence of ``period`` tokens (after BOS),
    drawn from the tokenizer's ordinary (non-special) tokens, all different within a period
    when the vocabulary allows (so every earlier occurrence of a token is one period back)."""
    if period < 2 or repeats < 2 or n < 1:
        raise WorkbenchError(f"repeat_samples needs period >= 2, repeats >= 2, n >= 1 (got {period}, {repeats}, {n})")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    head = torch.tensor(start_tokens(tokenizer), dtype=torch.long)
    samples = []
    for _ in range(n):
        if period <= len(vocab):
            seq = vocab[torch.randperm(len(vocab), generator=gen)[:period]]
        else:
            seq = vocab[torch.randint(0, len(vocab), (period,), generator=gen)]
        samples.append(TaskSample("repeats", torch.cat([head, seq.repeat(repeats)]), period=period))
    return samples


def second_copy_start(sample: TaskSample) -> int:
    """Position of the first token of a repeats sample's second copy (its prefix, BOS or
    nothing, is shorter than a period)."""
    if sample.period is None:
        raise WorkbenchError("second_copy_start needs a repeats sample")
    return len(sample.ids) % sample.period + sample.period


def read_text(source: str | Path | None) -> str:
    """The text of a file, of every ``.txt``/``.md`` file under a directory (sorted, joined), of a
    Hugging Face dataset (``"hf:NAME"`` or ``"hf:NAME:CONFIG"``), or the built-in docstrings
    when ``source`` is None."""
    if source is None:
        return docstring_text()
    if isinstance(source, str) and source.startswith("hf:"):
        return dataset_text(source.removeprefix("hf:"))
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise WorkbenchError(f"no .txt or .md files under {path}")
        return "\n\n".join(p.read_text(errors="replace") for p in files)
    if path.is_file():
        return path.read_text(errors="replace")
    raise WorkbenchError(f"text source {path} is neither a file nor a directory")


def dataset_text(name: str, max_chars: int = 4_000_000) -> str:
    """Up to ``max_chars`` of a Hugging Face dataset's train split (``NAME`` or ``NAME:CONFIG``;
    a hub id or a local folder of data files), the first text column of each row, streamed."""
    from datasets import load_dataset

    path, _, config = name.partition(":")
    pieces, size = [], 0
    try:
        for row in load_dataset(path, config or None, split="train", streaming=True):
            text = next((v for v in row.values() if isinstance(v, str)), "")
            if text.strip():
                pieces.append(text)
                size += len(text)
            if size >= max_chars:
                break
    except Exception as exc:  # datasets raises many types: offline, unknown name, bad config
        raise WorkbenchError(
            f"cannot read the dataset {name!r}: {type(exc).__name__}: {exc}. Offline, give a "
            "file or folder instead (--text PATH)"
        ) from exc
    if not pieces:
        raise WorkbenchError(f"the dataset {name!r} has no text in its train split")
    return "\n\n".join(pieces)[:max_chars]


def text_samples(
    tokenizer, source: str | Path | None = None, length: int = 1024, n: int | None = None
) -> list[TaskSample]:
    """Consecutive ``length``-token windows (BOS included) of the text in a file, of every
    ``.txt``/``.md`` file under a directory, or of the built-in docstrings (``source=None``);
    at most ``n`` windows."""
    text = read_text(source)
    head = start_tokens(tokenizer)
    body = length - len(head)
    if body < 1:
        raise WorkbenchError(f"length {length} leaves no room for text")
    ids = _encode(tokenizer, text)
    windows = [head + ids[i : i + body] for i in range(0, len(ids) - body + 1, body)]
    if not windows:
        raise WorkbenchError(f"the text has {len(ids)} tokens, fewer than one {length}-token sample")
    return [TaskSample("text", torch.tensor(w)) for w in windows[:n]]
