"""Quantized drop-in modules: `QuantLinear` (for nn.Linear) and the routed-expert stacks,
`QuantExperts` subclasses: `QuantMoeExperts` for transformers' fused expert modules
(`Ernie4_5_VLMoeMoeExperts`, `Qwen3MoeExperts`, `MixtralExperts`, ...); a family with another
expert layout adds its own subclass (GPT-OSS: `ccq.models.arch.gpt_oss`).

The QuantizedTensor fields are registered buffers, so `.to(device)`, accelerate placement
and `state_dict()` all see them under the checkpoint names `X.trellis`, `X.scales`,
`X.signs_in`, [`X.signs_out`], `X.meta`, where X is the quantized linear
(`...self_attn.q_proj`) or the expert weight (`...experts.gate_up_proj`).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..codec.tensor import QuantizedTensor
from ..codec.tensor import packed_layout


class PackedWeight(nn.Module):
    """Holds one QuantizedTensor as buffers; `module.qt` rebuilds the tensor view."""

    def __init__(self, shape: tuple[int, ...], bits: int, rotate_output: bool = False, device=None):
        super().__init__()
        self.dense_shape = tuple(shape)
        for name, (shp, dtype) in packed_layout(shape, bits, rotate_output).items():
            self.register_buffer(name, torch.empty(shp, dtype=dtype, device=device))
        if not rotate_output:
            self.register_buffer("signs_out", None)

    def load(self, qt: QuantizedTensor):
        """Copy a freshly quantized tensor in (shapes must match the layout)."""
        for name, t in qt.state_dict().items():
            buf = getattr(self, name)
            if buf is None or tuple(buf.shape) != tuple(t.shape):
                raise ValueError(f"packed field {name} has shape {tuple(t.shape)}, expected "
                                 f"{None if buf is None else tuple(buf.shape)}")
            setattr(self, name, t.to(buf.device) if buf.device.type != "meta" else t)

    @property
    def qt(self) -> QuantizedTensor:
        return QuantizedTensor(self.trellis, self.scales, self.signs_in, self.signs_out, self._meta_on_cpu())

    def _meta_on_cpu(self) -> torch.Tensor:
        """The meta vector on the CPU, copied once per buffer: reading it on a GPU every
        forward would synchronise the device for each quantized module."""
        if self.meta.device.type == "cpu":
            return self.meta
        cached = getattr(self, "_meta_cache", None)
        if cached is None or cached[0] is not self.meta:
            cached = self._meta_cache = (self.meta, self.meta.cpu())
        return cached[1]


class QuantLinear(PackedWeight):
    """y = x W^T + b with W stored as trellis codes; forward calls `ccq.kernels.qlinear`."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False,
                 rotate_output: bool = False, device=None, dtype=None):
        super().__init__((out_features, in_features), bits, rotate_output, device)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, bits: int, rotate_output: bool = False) -> "QuantLinear":
        """An empty QuantLinear with the shape of `linear` (bias tensor kept, on its device)."""
        q = cls(linear.in_features, linear.out_features, bits, False, rotate_output, device=linear.weight.device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.qlinear(x, self.qt, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


class QuantExperts(nn.Module):
    """Routed experts as two packed stacks `gate_up_proj` and `down_proj`, each [E, out, in].

    A subclass names the transformers module it replaces (`matches`), builds its empty twin
    (`like`), exposes the source weights in the packed [E, out, in] orientation (`dense`: views
    the quantizer reads and RTN writes) and computes expert e's down-projection input (`down_input`,
    for the down Hessians).
    """

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def like(cls, experts: nn.Module, bits: int, rotate_output: bool = False) -> "QuantExperts":
        raise NotImplementedError

    @staticmethod
    def dense(experts: nn.Module) -> dict[str, torch.Tensor]:
        """{"gate_up_proj": [E, out, in], "down_proj": [E, out, in]} views of the 16-bit weights."""
        return {"gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj}

    @staticmethod
    def down_input(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
        raise NotImplementedError

    def take_params(self, experts: nn.Module):
        """Keep the source module's 16-bit parameters that are not quantized (biases); none by default."""


def expert_kinds() -> tuple[type[QuantExperts], ...]:
    """Every QuantExperts subclass, most derived first."""
    out, todo = [], list(QuantExperts.__subclasses__())
    while todo:
        k = todo.pop(0)
        out.append(k)
        todo += k.__subclasses__()
    return tuple(reversed(out))


def experts_kind(module: nn.Module) -> type[QuantExperts] | None:
    """The QuantExperts subclass for a transformers expert module (or a quantized one), else None."""
    for kind in expert_kinds():
        if type(module) is kind or kind.matches(module):
            return kind
    return None


class QuantMoeExperts(QuantExperts):
    """transformers' fused experts (gate_up [E, 2I, H] with rows [gate | up], down [E, H, I], `act_fn`).

    Same forward(hidden_states, top_k_index, top_k_weights) as the module it replaces; calls
    `ccq.kernels.qmoe`.
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, bits: int, act_fn,
                 rotate_output: bool = False, device=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.bits = num_experts, hidden_dim, intermediate_dim, bits
        self.act_fn = act_fn
        self.gate_up_proj = PackedWeight((num_experts, 2 * intermediate_dim, hidden_dim), bits, rotate_output, device)
        self.down_proj = PackedWeight((num_experts, hidden_dim, intermediate_dim), bits, rotate_output, device)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return is_fused_experts(module)

    @classmethod
    def like(cls, experts: nn.Module, bits: int, rotate_output: bool = False) -> "QuantMoeExperts":
        e, two_i, h = experts.gate_up_proj.shape
        return cls(e, h, two_i // 2, bits, experts.act_fn, rotate_output, device=experts.gate_up_proj.device)

    @staticmethod
    def down_input(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
        inter = experts.down_proj.shape[-1]
        gu = x.float() @ experts.gate_up_proj[e].float().T
        return experts.act_fn(gu[:, :inter]) * gu[:, inter:]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return kernels.qmoe(hidden_states, top_k_index, top_k_weights, self.gate_up_proj.qt, self.down_proj.qt,
                            act=self.act_fn)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, bits={self.bits}")


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused-expert layout: 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3
            and hasattr(module, "act_fn"))
