"""GPT-OSS (`gpt_oss`): experts stored transposed ([E, H, 2I] and [E, I, H], x @ W), gate and up
interleaved along 2I (gate = even columns), biases on both projections, and a clamped SwiGLU
(gate <= limit, |up| <= limit, (up + 1) * gate * sigmoid(alpha * gate)).

`QuantGptOssExperts` packs the transposes ([E, 2I, H] with the interleaved rows kept, [E, H, I]) so
every expert is an ordinary [out, in] weight for the codec; its forward runs the routed experts
through `ccq.kernels.qlinear` (per expert, biases added by the kernel) and applies GPT-OSS's own
gate. The biases stay 16-bit under their checkpoint names.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from ..quant_modules import PackedWeight, QuantExperts
from .base import Adapter, text_ids


def _is_gpt_oss_experts(module: nn.Module) -> bool:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    return isinstance(module, GptOssExperts)


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's activation on interleaved [gate, up] columns."""
    gate, up = gate_up[..., ::2].clamp(max=limit), gate_up[..., 1::2].clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


class QuantGptOssExperts(QuantExperts):
    """GPT-OSS routed experts with packed weights; forward(hidden_states, router_indices, routing_weights)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bits: int, alpha: float,
                 limit: float, rotate_output: bool = False, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size, self.bits = (num_experts, hidden_size,
                                                                                 intermediate_size, bits)
        self.alpha, self.limit = alpha, limit
        self.gate_up_proj = PackedWeight((num_experts, 2 * intermediate_size, hidden_size), bits, rotate_output, device)
        self.down_proj = PackedWeight((num_experts, hidden_size, intermediate_size), bits, rotate_output, device)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, device=device,
                                                          dtype=dtype), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype),
                                           requires_grad=False)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return _is_gpt_oss_experts(module)

    @classmethod
    def like(cls, experts: nn.Module, bits: int, rotate_output: bool = False) -> "QuantGptOssExperts":
        e, h, two_i = experts.gate_up_proj.shape
        p = experts.gate_up_proj_bias
        return cls(e, h, two_i // 2, bits, experts.alpha, experts.limit, rotate_output, device=p.device,
                   dtype=p.dtype)

    @staticmethod
    def dense(experts: nn.Module) -> dict[str, torch.Tensor]:
        return {"gate_up_proj": experts.gate_up_proj.transpose(1, 2), "down_proj": experts.down_proj.transpose(1, 2)}

    @staticmethod
    def down_input(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
        gu = x.float() @ experts.gate_up_proj[e].float() + experts.gate_up_proj_bias[e].float()
        return clamped_swiglu(gu, experts.alpha, experts.limit)

    def take_params(self, experts: nn.Module):
        self.gate_up_proj_bias = nn.Parameter(experts.gate_up_proj_bias.detach(), requires_grad=False)
        self.down_proj_bias = nn.Parameter(experts.down_proj_bias.detach(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        gate_up, down = self.gate_up_proj.qt, self.down_proj.qt
        for e in torch.unique(router_indices).tolist():
            if not 0 <= e < self.num_experts:
                continue
            token, slot = torch.where(router_indices == e)
            h = kernels.qlinear(hidden_states[token], gate_up.expert(e), self.gate_up_proj_bias[e])
            y = kernels.qlinear(clamped_swiglu(h, self.alpha, self.limit), down.expert(e), self.down_proj_bias[e])
            out.index_add_(0, token, (y * routing_weights[token, slot, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, bits={self.bits}")


class GptOss(Adapter):
    name = "gpt_oss"
    model_types = ("gpt_oss",)

    def tiny_config(self, tokenizer, layers: int = 2, **overrides):
        from transformers import GptOssConfig

        return GptOssConfig(**{**dict(
            hidden_size=64, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
            max_position_embeddings=4096, architectures=["GptOssForCausalLM"], **text_ids(tokenizer)), **overrides})


ADAPTER = GptOss()
