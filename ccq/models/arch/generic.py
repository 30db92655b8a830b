"""Any transformers model named by its `architectures` (the nn.Linear path: LLaVA, Llama, ...)."""

from __future__ import annotations

from .base import Adapter


class Generic(Adapter):
    name = "generic"

    def matches(self, raw: dict) -> bool:
        return True

    def tiny_config(self, tokenizer, layers: int = 2, **overrides):
        from transformers import LlamaConfig

        from .base import text_ids

        return LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                     architectures=["LlamaForCausalLM"], **text_ids(tokenizer)), **overrides})


ADAPTER = Generic()
