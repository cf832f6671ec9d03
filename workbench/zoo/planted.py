"""A planted model: an attention-only TransformerLens model with hand-set weights whose heads
play known roles exactly, for any context up to ``context``: ground truth for the head scores.

:func:`planted` builds it; :data:`ROLES` names the ``(layer, head)`` of each role. Tokens are the
byte tokenizer's (:func:`workbench.zoo.tokenizer.byte_tokenizer`, 259 ids, BOS 256).

How it works (``docs/planted.md`` has the details). No LayerNorm, no MLPs; the residual stream is
a sum of disjoint subspaces, each written by one thing:

- ``tok``: the token's code, a ``CODE_DIM``-dimensional ±1 vector (distinct codes differ in at
  least ``CODE_DISTANCE`` places; BOS has the zero code);
- ``pos``: position features, hand-set in ``W_pos``: ``cos/sin(2 pi i / 2^m)`` for
  ``m = 1..G`` (``2^G >= context``), a first-position flag, flags ``i < k`` for each offset
  head, ``i / context`` (for the local head) and a constant 1;
- ``off[k]``, ``k = 1..MATCH``: the code of token ``i - k``, written by the offset heads;
- ``out``: the code of the token the copying head copies; the unembedding reads only this
  (``logit[v] = code(v) . out``), so greedy decoding follows the copying head alone;
- ``sink_out``: one scratch dimension the sink head writes 0.01 into (nothing reads it).

Offset heads score keys by ``A * sum_m cos(2 pi (i - k - j) / 2^m)``: ``G`` at ``j = i - k``
and at most ``G - 2`` at any other ``|i - k - j| < 2^G`` (the term whose period is twice the
largest power of two dividing the distance is -1), so with ``A = 15`` every other key is 30
nats down: previous-token attention is sharp at every position up to ``context``. A row
``i < k`` has no key ``i - k`` and attends BOS (its flag), so it writes the zero code.

Layer 0's offset heads 1..4 write the codes of tokens ``i-1 .. i-4``; layer 1's offset-5 and
offset-10 heads copy five codes each from ``i - 5`` and ``i - 10``, so that every position
holds the codes of its last ``MATCH + 1 = 15`` tokens. The copying head (layer 2) scores key
``j`` by how well the ``MATCH`` tokens before ``j`` match the ``MATCH`` tokens ending at the
query (a byte tokenizer needs about 10: " Victor is" also ends "Director is"), plus a BOS
bonus worth 2.5 matched tokens, and writes ``code(t_j)`` into ``out``: it is the induction
head on repeats and the retrieval head on needles (its top key, inside the needle, holds the
token it copies).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

#: ``(layer, head)`` of each role.
ROLES: dict[str, tuple[int, int]] = {
    "previous_token": (0, 0),  # attends i - 1, writes code(t_{i-1})
    "offset_2": (0, 1),  # attends i - 2
    "offset_3": (0, 2),  # attends i - 3
    "offset_4": (0, 3),  # attends i - 4
    "offset_5": (1, 0),  # attends i - 5, copies the codes of t_{i-5} .. t_{i-9}
    "offset_10": (1, 1),  # attends i - 10, copies the codes of t_{i-10} .. t_{i-14}
    "sink": (1, 2),  # attends position 0, writes 0.01 into a scratch dimension
    "local": (1, 3),  # ALiBi-like: weight of key i - d proportional to exp(-LOCAL_SLOPE * d)
    "induction": (2, 0),  # the copying / retrieval head
    "uniform": (2, 1),  # zero query: equal weight on every key
    "dormant": (2, 2),  # attends position 0, writes nothing
    "duplicate": (2, 3),  # attends earlier occurrences of its own token (and itself), writes nothing
}
#: Tokens of context the copying head matches (the codes of t_{i-13} .. t_i against those of
#: t_{j-14} .. t_{j-1}).
MATCH = 14
#: Dimensions of a token code, and the least number of places two codes differ in.
CODE_DIM, CODE_DISTANCE = 16, 4
#: The local head's slope: key ``i - d`` weighs ``exp(-LOCAL_SLOPE * d)``, so the last 64
#: keys hold 99% of a row's mass (all of it in the first 64 rows).
LOCAL_SLOPE = math.log(100) / 64
VOCAB = 259  # the byte tokenizer's ids: 256 bytes, <bos> 256, <pad> 257, <eos> 258
BOS = 256

_POS_SCALE = 15.0  # nats per unit of the cosine ruler (keys off target are >= 2 units down)
_SINK_SCALE = 40.0  # nats in favour of position 0 (sink, dormant heads)
_MATCH_SCALE = 2.5  # nats per unit of code dot product (a mismatched token costs >= 2 * CODE_DISTANCE)
_BOS_BONUS = 2.5 * CODE_DIM  # the copying head's BOS bonus, in code-dot units: 2.5 matched tokens
_LAYER0_OFFSETS = (1, 2, 3, 4)
_LAYER1_OFFSETS = {5: 5, 10: 5}  # offset -> codes it copies (offsets 0..4 of the key)


def token_codes(seed: int = 0) -> torch.Tensor:
    """``[VOCAB, CODE_DIM]`` ±1 codes, pairwise at least ``CODE_DISTANCE`` apart (drawn from
    ``seed``, greedily); BOS gets the zero code."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.empty(0, CODE_DIM, dtype=torch.int64)
    while len(codes) < VOCAB:
        c = torch.randint(0, 2, (CODE_DIM,), generator=gen) * 2 - 1
        if bool(((codes != c).sum(1) >= CODE_DISTANCE).all()):
            codes = torch.cat([codes, c[None]])
    out = codes.double()
    out[BOS] = 0
    return out


class _Layout:
    """Where each subspace sits in the residual stream."""

    def __init__(self, context: int):
        self.context = context
        self.rulers = max(1, math.ceil(math.log2(context)))  # G: 2^G >= context
        flags = _LAYER0_OFFSETS + tuple(_LAYER1_OFFSETS)
        at = 0

        def take(n: int) -> slice:
            nonlocal at
            at += n
            return slice(at - n, at)

        self.tok = take(CODE_DIM)
        self.off = {k: take(CODE_DIM) for k in range(1, MATCH + 1)}
        self.out = take(CODE_DIM)
        self.cos, self.sin = take(self.rulers), take(self.rulers)
        self.first, self.lin, self.const, self.sink_out = (take(1).start for _ in range(4))
        self.early = {k: take(1).start for k in flags}
        self.d_model = at

    def codes(self, first: int, n: int) -> list[slice]:
        """Subspaces of the codes of tokens ``i - first .. i - first - n + 1`` (0: the token)."""
        return [self.tok if k == 0 else self.off[k] for k in range(first, first + n)]


def planted(context: int = 8192, seed: int = 0) -> HookedTransformer:
    """The planted model (CPU, float32, eval), roles at :data:`ROLES`, for inputs of up to
    ``context`` tokens of the byte tokenizer; ``seed`` draws the token codes.

    Example:
        >>> model = planted(context=4096)
        >>> run = score_model(model, ScoreRunSettings(model="planted", lengths=(1024,)), "runs/planted")
    """
    if context < 2 * MATCH:
        raise WorkbenchError(f"the planted model needs a context of at least {2 * MATCH} tokens, got {context}")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from workbench.zoo.tokenizer import byte_tokenizer

    lay = _Layout(context)
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=lay.d_model,
        n_heads=4,
        d_head=MATCH * CODE_DIM + 1,
        d_mlp=None,
        attn_only=True,
        n_ctx=context,
        d_vocab=VOCAB,
        normalization_type=None,
        positional_embedding_type="standard",
        model_name="planted",
        default_prepend_bos=True,
    )
    model = HookedTransformer(cfg, tokenizer=byte_tokenizer())
    codes = token_codes(seed)
    state = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    state["embed.W_E"][:, lay.tok] = codes.float()
    state["pos_embed.W_pos"] = _positions(lay, context).float()
    state["unembed.W_U"][lay.out] = codes.T.float()
    for (layer, param), tensor in _attention_weights(lay, codes).items():
        state[f"blocks.{layer}.attn.{param}"] = tensor.float()
    for layer in range(cfg.n_layers):  # fold TransformerLens's 1/sqrt(d_head) into W_Q
        state[f"blocks.{layer}.attn.W_Q"] *= model.blocks[layer].attn.attn_scale
    model.load_state_dict(state, strict=False)
    return model.eval()


def _positions(lay: _Layout, context: int) -> torch.Tensor:
    """``W_pos [context, d_model]`` (float64): the position subspaces."""
    i = torch.arange(context, dtype=torch.float64)
    w = torch.zeros(context, lay.d_model, dtype=torch.float64)
    angles = 2 * math.pi * i[:, None] / 2.0 ** torch.arange(1, lay.rulers + 1, dtype=torch.float64)
    w[:, lay.cos], w[:, lay.sin] = torch.cos(angles), torch.sin(angles)
    w[0, lay.first] = 1
    w[:, lay.lin] = i / context
    w[:, lay.const] = 1
    for k, dim in lay.early.items():
        w[:k, dim] = 1
    return w


def _attention_weights(lay: _Layout, codes: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """``W_Q, W_K, W_V [head, d_model, d_head]`` and ``W_O [head, d_head, d_model]`` per layer."""
    d, dh, n_heads = lay.d_model, MATCH * CODE_DIM + 1, 4
    w = {
        (layer, p): torch.zeros((n_heads, d, dh) if p != "W_O" else (n_heads, dh, d), dtype=torch.float64)
        for layer in range(3)
        for p in ("W_Q", "W_K", "W_V", "W_O")
    }
    heads = ROLES
    for k in _LAYER0_OFFSETS:
        _offset_head(w, lay, heads["previous_token" if k == 1 else f"offset_{k}"], k, [lay.tok], [lay.off[k]])
    for k, n in _LAYER1_OFFSETS.items():
        _offset_head(w, lay, heads[f"offset_{k}"], k, lay.codes(0, n), lay.codes(k, n))
    for role in ("sink", "dormant"):
        layer, h = heads[role]
        w[layer, "W_Q"][h, lay.const, 0] = _SINK_SCALE
        w[layer, "W_K"][h, lay.first, 0] = 1
    layer, h = heads["sink"]
    w[layer, "W_V"][h, lay.const, 0] = 1
    w[layer, "W_O"][h, 0, lay.sink_out] = 0.01
    layer, h = heads["local"]  # score LOCAL_SLOPE * j = -LOCAL_SLOPE * (i - j) + a constant per row
    w[layer, "W_Q"][h, lay.const, 0] = LOCAL_SLOPE * lay.context  # lin holds i / context
    w[layer, "W_K"][h, lay.lin, 0] = 1
    layer, h = heads["duplicate"]
    eye = torch.eye(CODE_DIM, dtype=torch.float64)
    w[layer, "W_Q"][h, lay.tok, :CODE_DIM] = _MATCH_SCALE * eye
    w[layer, "W_K"][h, lay.tok, :CODE_DIM] = eye
    layer, h = heads["induction"]
    for n, (q, k) in enumerate(zip(lay.codes(0, MATCH), lay.codes(1, MATCH))):
        w[layer, "W_Q"][h, q, n * CODE_DIM : (n + 1) * CODE_DIM] = _MATCH_SCALE * eye
        w[layer, "W_K"][h, k, n * CODE_DIM : (n + 1) * CODE_DIM] = eye
    w[layer, "W_Q"][h, lay.const, dh - 1] = _MATCH_SCALE * _BOS_BONUS
    w[layer, "W_K"][h, lay.first, dh - 1] = 1
    w[layer, "W_V"][h, lay.tok, :CODE_DIM] = eye
    w[layer, "W_O"][h, :CODE_DIM, lay.out] = eye
    return w


def _offset_head(w: dict, lay: _Layout, at: tuple[int, int], k: int, reads: list[slice], writes: list[slice]) -> None:
    """Head ``at`` attends key ``i - k`` (BOS for rows ``i < k``) and copies the subspaces
    ``reads`` of that key into ``writes``."""
    layer, h = at
    theta = 2 * math.pi * k / 2.0 ** torch.arange(1, lay.rulers + 1, dtype=torch.float64)
    cos, sin = torch.cos(theta), torch.sin(theta)
    q, kk = w[layer, "W_Q"][h], w[layer, "W_K"][h]
    g = lay.rulers
    # query features rotated back by k steps: (cos w(i-k), sin w(i-k)) against the key's (cos wj, sin wj)
    cs, sn = lay.cos.start, lay.sin.start
    for m in range(g):
        q[cs + m, m] = _POS_SCALE * cos[m]
        q[sn + m, m] = _POS_SCALE * sin[m]
        q[sn + m, g + m] = _POS_SCALE * cos[m]
        q[cs + m, g + m] = -_POS_SCALE * sin[m]
        kk[cs + m, m] = 1
        kk[sn + m, g + m] = 1
    q[lay.early[k], 2 * g] = _POS_SCALE * (2 * g + 10)  # rows i < k: BOS beats every key
    kk[lay.first, 2 * g] = 1
    eye = torch.eye(CODE_DIM, dtype=torch.float64)
    for n, (src, dst) in enumerate(zip(reads, writes)):
        w[layer, "W_V"][h, src, n * CODE_DIM : (n + 1) * CODE_DIM] = eye
        w[layer, "W_O"][h, n * CODE_DIM : (n + 1) * CODE_DIM, dst] = eye
