"""Small randomly initialised models of real architectures, built the same way in every test
(and every process of a distributed test): fixed seed, fixed shapes."""

from __future__ import annotations

import torch

from tests.conftest import SEED


def tiny_llama(layers: int = 2, context: int = 256, seed: int = SEED) -> torch.nn.Module:
    """A Llama-shaped Hugging Face causal LM (vocabulary 300, width 64, 4 query and 2 key/value
    heads: grouped-query attention), random weights from ``seed``, eval mode, SDPA attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
