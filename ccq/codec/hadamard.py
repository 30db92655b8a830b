"""Incoherence processing: random signs and a block Hadamard transform along a dimension.

The input side of a weight W [out, in] is rotated as W' = (W * s) @ H (H block-diagonal,
each block the Sylvester Hadamard matrix of size b scaled by 1/sqrt(b), symmetric and
orthonormal). At run time the activations get the same map, x' = H (s * x), so W' x' = W x.
"""

from __future__ import annotations

import torch

MAX_BLOCK = 512


def hadamard_block_size(n: int, max_block: int = MAX_BLOCK) -> int:
    """Largest power of two <= max_block that divides n (n is a multiple of 16 here)."""
    b = 1
    while b * 2 <= max_block and n % (b * 2) == 0:
        b *= 2
    return b


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Orthonormal block Walsh-Hadamard transform over the last dim, O(n log block)."""
    if block == 1:
        return x
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = torch.stack((a + b, a - b), dim=3)
        h *= 2
    return (y.reshape(shape) * (block ** -0.5)).to(x.dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """Deterministic +-1 vector (int8) from a seed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)


def rotate_in(w: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """W -> (W * s) @ H along the last dim (the input features)."""
    return fwht(w * signs.to(w.dtype), block)


def unrotate_in(w: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`rotate_in`: W' -> (W' @ H) * s."""
    return fwht(w, block) * signs.to(w.dtype)


def transform_activations(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """x -> H (s * x) over the last dim: what the rotated weight expects as input."""
    return fwht(x * signs.to(x.dtype), block)
