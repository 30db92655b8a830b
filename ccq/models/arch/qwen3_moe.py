"""Qwen3-MoE (`qwen3_moe`): fused routed experts, no shared expert; checkpoints store one tensor
per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`), converted by transformers' mapping."""

from __future__ import annotations

from .base import Adapter, text_ids


class Qwen3Moe(Adapter):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)

    def tiny_config(self, tokenizer, layers: int = 2, **overrides):
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**{**dict(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=4096, architectures=["Qwen3MoeForCausalLM"], **text_ids(tokenizer)),
            **overrides})


ADAPTER = Qwen3Moe()
