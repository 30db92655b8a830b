"""Tiny random text models for the vLLM tests, quantized by ccq.

Head dim 32 (vLLM's CPU attention has no kernel for smaller heads); every dim a multiple of 16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, max_position_embeddings=128, tie_word_embeddings=False)


def tiny_qwen3(path: Path) -> Path:
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(intermediate_size=128, **COMMON)).save_pretrained(str(path))
    return path


def tiny_qwen3_moe(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, **COMMON)
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(path))
    return path


def tiny_ernie45_moe(path: Path) -> Path:
    """ERNIE-4.5 text MoE: a dense layer, then 4 routed experts (top-2) with a shared expert and router statistics."""
    torch.manual_seed(0)
    cfg = Ernie4_5_MoeConfig(intermediate_size=128, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
                             moe_layer_start_index=1, moe_num_shared_experts=1, initializer_range=0.1,
                             **dict(COMMON, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    Ernie4_5_MoeForCausalLM(cfg).save_pretrained(str(path))
    return path
