"""Quantized compute: dequantize, linear and fused MoE, dispatched to Triton or torch.

`CCQ_BACKEND=torch|triton` forces a backend; by default Triton runs on CUDA tensors and
the torch reference everywhere else.
"""

from __future__ import annotations

import os

import torch

from . import reference


def backend(device: torch.device) -> str:
    """The backend for tensors on `device` ("triton" or "torch")."""
    forced = os.environ.get("CCQ_BACKEND", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    if forced:
        raise ValueError(f"CCQ_BACKEND must be 'torch' or 'triton', got {forced!r}")
    return "triton" if device.type == "cuda" else "torch"


def dequantize(qt, dtype=torch.bfloat16):
    return reference.dequantize(qt, dtype)


def qlinear(x, qt, bias=None):
    return reference.qlinear(x, qt, bias)


def qmoe(hidden, top_k_index, top_k_weights, gate_up, down, act=torch.nn.functional.silu):
    return reference.qmoe(hidden, top_k_index, top_k_weights, gate_up, down, act)


__all__ = ["backend", "dequantize", "qlinear", "qmoe"]
