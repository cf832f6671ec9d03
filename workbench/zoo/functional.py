"""The zoo's training model: the HookedTransformer forward in plain PyTorch, with fused attention.

Training long-context zoo models through TransformerLens materialises every ``N x N`` pattern
and needs TransformerLens on the training machine. :class:`ZooModel` holds the same parameters
under the same names and shapes (``embed.W_E``, ``blocks.L.attn.W_Q [H, d_model, d_head]``, ...),
initialises them as ``HookedTransformer`` does for the same seed (GPT-2 scheme, weights drawn in
the same order), and computes the same function: pre-LayerNorm blocks, rotary positions in
TransformerLens's convention (halves rotated, base 10000), scores scaled by ``1/sqrt(d_head)``,
exact GELU. Attention runs through ``scaled_dot_product_attention``, so flash attention serves
it on GPUs. Its ``state_dict`` loads into ``HookedTransformer`` unchanged
(``tests/workbench/test_zoo_functional.py`` checks weights and logits against TransformerLens).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

ROTARY_BASE = 10000
LN_EPS = 1e-5


class _Params(nn.Module):
    """A named group of parameters (TransformerLens's module names give the state-dict keys)."""

    def __init__(self, **shapes: tuple[int, ...]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            init = torch.ones if name == "w" else torch.zeros
            self.register_parameter(name, nn.Parameter(init(shape)))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int, d_mlp: int | None) -> None:
        super().__init__()
        self.ln1 = _Params(w=(d_model,), b=(d_model,))
        if d_mlp is not None:
            self.ln2 = _Params(w=(d_model,), b=(d_model,))
        qkv = (n_heads, d_model, d_head)
        self.attn = _Params(
            W_Q=qkv, W_O=(n_heads, d_head, d_model), b_Q=(n_heads, d_head), b_O=(d_model,), W_K=qkv, W_V=qkv,
            b_K=(n_heads, d_head), b_V=(n_heads, d_head),
        )  # fmt: skip
        mlp = {"W_in": (d_model, d_mlp), "b_in": (d_mlp,), "W_out": (d_mlp, d_model), "b_out": (d_model,)}
        self.mlp = _Params(**mlp) if d_mlp else None


class ZooModel(nn.Module):
    """Logits ``[B, N, vocab]`` of token ids ``[B, N]`` (``N <= n_ctx``), as the zoo spec's
    HookedTransformer computes them; parameters initialised from ``seed`` as TransformerLens does."""

    def __init__(
        self, n_layers: int, d_model: int, n_heads: int, d_mlp: int | None, n_ctx: int, d_vocab: int, seed: int
    ) -> None:
        super().__init__()
        self.n_heads, self.d_head, self.n_ctx = n_heads, d_model // n_heads, n_ctx
        self.embed = _Params(W_E=(d_vocab, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, self.d_head, d_mlp) for _ in range(n_layers))
        self.ln_final = _Params(w=(d_model,), b=(d_model,))
        self.unembed = _Params(W_U=(d_model, d_vocab), b_U=(d_vocab,))
        torch.manual_seed(seed)
        std = 0.8 / math.sqrt(d_model)  # TransformerLens's GPT-2 initializer_range
        with torch.no_grad():
            for name, param in self.named_parameters():  # same order as HookedTransformer's
                if "W_" in name:
                    param.normal_(std=std)
        half = torch.arange(self.d_head // 2, dtype=torch.float32)
        freq = ROTARY_BASE ** (half / (self.d_head / 2))
        angles = torch.arange(n_ctx, dtype=torch.float32)[:, None] / torch.cat([freq, freq])[None, :]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotary positions of ``x [B, H, N, d_head]`` (halves rotated, TransformerLens's default)."""
        n = x.shape[-2]
        first, second = x.chunk(2, dim=-1)
        return x * self.cos[:n].to(x.dtype) + torch.cat([-second, first], dim=-1) * self.sin[:n].to(x.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed.W_E[ids]
        for block in self.blocks:
            h = F.layer_norm(x, x.shape[-1:], block.ln1.w, block.ln1.b, LN_EPS)
            a = block.attn
            q = torch.einsum("bnd,hde->bhne", h, a.W_Q) + a.b_Q[:, None]
            k = torch.einsum("bnd,hde->bhne", h, a.W_K) + a.b_K[:, None]
            v = torch.einsum("bnd,hde->bhne", h, a.W_V) + a.b_V[:, None]
            z = F.scaled_dot_product_attention(self._rotate(q), self._rotate(k), v, is_causal=True)
            x = x + torch.einsum("bhne,hed->bnd", z, a.W_O) + a.b_O
            if block.mlp is not None:
                m = block.mlp
                h = F.layer_norm(x, x.shape[-1:], block.ln2.w, block.ln2.b, LN_EPS)
                x = x + F.gelu(h @ m.W_in + m.b_in) @ m.W_out + m.b_out
        x = F.layer_norm(x, x.shape[-1:], self.ln_final.w, self.ln_final.b, LN_EPS)
        return x @ self.unembed.W_U + self.unembed.b_U
