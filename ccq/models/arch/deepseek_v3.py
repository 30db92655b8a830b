"""DeepSeek-V3 (`deepseek_v3`): MLA attention (low-rank q/kv projections, all nn.Linear), the
first `first_k_dense_replace` layers dense, then routed experts plus shared experts behind a
grouped top-k router; checkpoints store one tensor per expert."""

from __future__ import annotations

from .base import Adapter, text_ids


class DeepseekV3(Adapter):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def kv_values_per_token(self, config) -> int:
        """transformers caches MLA's decompressed keys (nope + rope dims) and values for every head."""
        return config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)

    def tiny_config(self, tokenizer, layers: int = 3, **overrides):
        from transformers import DeepseekV3Config

        return DeepseekV3Config(**{**dict(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=4096,
            architectures=["DeepseekV3ForCausalLM"], **text_ids(tokenizer)), **overrides})


ADAPTER = DeepseekV3()
