"""Qwen3-VL-MoE (`qwen3_vl_moe`): a ViT (`model.visual`, with deepstack mergers) feeding a Qwen3-MoE
text model. Its checkpoints store each layer's experts fused and transposed ([E, H, 2I], [E, I, H]),
which transformers' mapping transposes on load. Image+text calibration samples are laid out as
the Qwen3-VL processor lays them out: <vision_start> <image_pad> * merged patches <vision_end> text,
with `mm_token_type_ids` 1 on the image tokens (what the 3-D rope positions are computed from).
"""

from __future__ import annotations

import torch

from .base import Adapter, text_ids


class Qwen3VLMoe(Adapter):
    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    takes_images = True

    def image_sample(self, pixels: dict, text_ids: torch.Tensor, config) -> dict:
        grid = pixels["image_grid_thw"]
        n = int(grid.prod()) // (config.vision_config.spatial_merge_size ** 2)
        ids = torch.cat([torch.tensor([config.vision_start_token_id] + [config.image_token_id] * n +
                                      [config.vision_end_token_id]), text_ids])[None]
        return {"input_ids": ids, "pixel_values": pixels["pixel_values"], "image_grid_thw": grid,
                "mm_token_type_ids": (ids == config.image_token_id).int()}

    def tiny_image_processor(self, patch_size: int = 4):
        """16x16..32x32-px images: a few dozen image tokens."""
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                        size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})

    def tiny_config(self, tokenizer, layers: int = 2, patch_size: int = 4, **overrides):
        """Token ids from the tiny tokenizer's named image tokens (start, placeholder, end)."""
        from transformers import Qwen3VLMoeConfig

        ids = text_ids(tokenizer)
        token = tokenizer.convert_tokens_to_ids
        return Qwen3VLMoeConfig(
            text_config=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                             num_experts_per_tok=2, max_position_embeddings=4096,
                             rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                              "mrope_section": [4, 2, 2], "mrope_interleaved": True}, **ids),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch_size,
                               out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0]),
            image_token_id=token(tokenizer.image_token), video_token_id=token(tokenizer.video_token),
            vision_start_token_id=token(tokenizer.image_start_token),
            vision_end_token_id=token(tokenizer.image_end_token),
            architectures=["Qwen3VLMoeForConditionalGeneration"], tie_word_embeddings=False, **overrides)


ADAPTER = Qwen3VLMoe()
