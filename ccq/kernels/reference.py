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


def align(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """Sort (token, slot) pairs by expert, padding every expert's run to block_m (the contract of
    `moe.align`, which does it in one Triton launch).

    Returns ids [n_blocks*block_m] (flat index token*K + slot, T*K marks padding) and
    expert_ids [n_blocks] (-1 for unused trailing blocks). Indices >= num_experts are dropped.
    """
    flat = top_k_index.reshape(-1).long()
    n = flat.numel()
    dev = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    key_sorted = key[order]
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    n_blocks = -(-n // block_m) + min(num_experts, n)
    e_sorted = key_sorted.clamp(max=num_experts - 1)
    pos = pad_start[e_sorted] + torch.arange(n, device=dev) - cnt_start[e_sorted]
    pos = torch.where(key_sorted < num_experts, pos, n_blocks * block_m)  # dropped slots -> spare last entry
    ids = torch.full((n_blocks * block_m + 1,), n, dtype=torch.int32, device=dev)
    ids = ids.scatter_(0, pos, order.to(torch.int32))[:-1]
    e_of_block = torch.searchsorted(pad_end, torch.arange(n_blocks, device=dev) * block_m, right=True)
    expert_ids = torch.where(e_of_block < num_experts, e_of_block, -1).to(torch.int32)
    return ids, expert_ids
