"""The zoo's tokenizer: one token per byte (any text, no vocabulary file), plus specials."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache

SPECIALS = ("<bos>", "<pad>", "<eos>")


@cache
def byte_tokenizer():
    """A Hugging Face fast tokenizer with 256 byte tokens and ``<bos>``, ``<pad>``, ``<eos>``.

    Built in code, so zoo models need no tokenizer download; being a real
    ``PreTrainedTokenizerFast`` it works with TransformerLens's ``to_tokens`` / ``to_string``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    built = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", eos_token="<eos>")
    # TransformerLens re-loads a model's tokenizer from its name_or_path: give it a folder,
    # kept while this process lives.
    folder = tempfile.mkdtemp(prefix="workbench-byte-tokenizer-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    built.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _byte_symbols() -> list[str]:
    """The character that byte-level BPE (GPT-2's scheme) shows for each byte 0..255: printable
    Latin-1 bytes stand for themselves, the others are moved to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


@cache
def byte_ids():
    """``[256]`` long tensor: the token id of each byte, so that ``byte_ids()[torch.frombuffer(
    text.encode(), dtype=torch.uint8).long()]`` tokenises ``text`` as :func:`byte_tokenizer` does,
    fast enough for corpora of hundreds of megabytes."""
    import torch

    return torch.tensor(byte_tokenizer().convert_tokens_to_ids(_byte_symbols()), dtype=torch.long)
