"""Tiny random text models for the vLLM tests, quantized by ccq.

Head dim 32 (vLLM's CPU attention has no kernel for smaller heads); every dim a multiple of 16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Ernie4_5_VLMoeConfig,
                          Ernie4_5_VLMoeForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
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
    """ERNIE-4.5 text MoE: a dense layer, then 4 routed experts (top-2) with a shared expert and drawn router
    statistics."""
    torch.manual_seed(0)
    cfg = Ernie4_5_MoeConfig(intermediate_size=128, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
                             moe_layer_start_index=1, moe_num_shared_experts=1, initializer_range=0.1,
                             **dict(COMMON, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    model = Ernie4_5_MoeForCausalLM(cfg)
    _draw_router_statistics(model)
    model.save_pretrained(str(path))
    return path


def _draw_router_statistics(model) -> None:
    """transformers starts ERNIE's router statistics (`e_score_correction_bias`) at 0; draw them so
    they change which experts are picked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.5)


# the multimodal delimiters of the tiny ERNIE-4.5-VL (ids inside its vocabulary)
ERNIE_VL_TOKENS = dict(image_start_token_id=120, image_end_token_id=121, image_token_id=122, video_start_token_id=123,
                       video_end_token_id=124, video_token_id=125)


def tiny_ernie45_vl(path: Path) -> Path:
    """ERNIE-4.5-VL: a dense layer, then 4 text and 4 vision experts (top-2) with a shared expert and
    router statistics; head dim 32 with M-RoPE sections [4, 4, 8]; a 1-block vision tower."""
    torch.manual_seed(0)
    text = dict(COMMON, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                intermediate_size=128, mlp_layer_types=["dense", "sparse"], moe_intermediate_size=[32, 32], moe_k=2,
                moe_num_experts=4, moe_num_shared_experts=1, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [4, 4, 8]})
    text.pop("head_dim")
    cfg = Ernie4_5_VLMoeConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                                                    num_heads=2, patch_size=14, spatial_merge_size=2),
                               **ERNIE_VL_TOKENS)
    model = Ernie4_5_VLMoeForConditionalGeneration(cfg)
    _draw_router_statistics(model)
    model.save_pretrained(str(path))
    return path
