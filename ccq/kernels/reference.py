"""Torch reference path for every kernel: what the Triton kernels are tested against,
and the backend used on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..codec.hadamard import fwht, transform_activations
from ..codec.tensor import QuantizedTensor


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Full reconstruction in the original (unrotated) basis."""
    return qt.dequantize().to(dtype)


def _pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[-1] == n else F.pad(x, (0, n - x.shape[-1]))


def rotate_input(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """x [..., in] -> H (s * x_padded): the activation the rotated weight expects."""
    x = _pad_last(x, qt.signs_in.shape[0])
    return transform_activations(x.float(), qt.signs_in, qt.had_in)


def unrotate_output(y: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """Undo the optional output rotation and crop the padding: y [..., out_pad] -> [..., out]."""
    if qt.signs_out is not None:
        y = fwht(y, qt.had_out) * qt.signs_out.float()
    return y[..., : qt.shape[-2]]


def qlinear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a 2-D quantized W, computed in the rotated basis."""
    xr = rotate_input(x, qt)
    y = unrotate_output(xr @ qt.rotated_weight().T, qt)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def qmoe(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
         gate_up: QuantizedTensor, down: QuantizedTensor, act=F.silu) -> torch.Tensor:
    """Routed experts: sum_k w_k * down_e(act(gate_e(x)) * up_e(x)); gate_up rows are [gate | up].

    Same contract as transformers' fused-expert modules: hidden [T, H], top_k_index [T, K]
    (an index >= the number of experts is skipped), top_k_weights [T, K].
    """
    num_experts = gate_up.shape[0]
    inter = down.shape[-1]
    out = torch.zeros(hidden.shape[0], down.shape[-2], dtype=torch.float32, device=hidden.device)
    xr = rotate_input(hidden, gate_up)
    for e in torch.unique(top_k_index).tolist():
        if e >= num_experts:
            continue
        tok, slot = torch.where(top_k_index == e)
        w_gu = gate_up.expert(e)
        gu = unrotate_output(xr[tok] @ w_gu.rotated_weight().T, w_gu)
        h = act(gu[:, :inter]) * gu[:, inter:]
        y = qlinear(h, down.expert(e))
        out.index_add_(0, tok, y.float() * top_k_weights[tok, slot, None].float())
    return out.to(hidden.dtype)

