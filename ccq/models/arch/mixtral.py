"""Mixtral (`mixtral`): every layer MoE, fused experts; checkpoints store
`block_sparse_moe.experts.{e}.w1/w2/w3` (converted by transformers' mapping)."""

from __future__ import annotations

from .base import Adapter, text_ids


class Mixtral(Adapter):
    name = "mixtral"
    model_types = ("mixtral",)

    def tiny_config(self, tokenizer, layers: int = 2, **overrides):
        from transformers import MixtralConfig

        return MixtralConfig(**{**dict(
            hidden_size=64, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=4096, architectures=["MixtralForCausalLM"], **text_ids(tokenizer)),
            **overrides})


ADAPTER = Mixtral()
