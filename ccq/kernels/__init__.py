"""Quantized compute: dequantize, linear and fused MoE, dispatched to Triton or torch.

`CCQ_BACKEND=torch|triton` forces a backend; by default Triton runs on CUDA tensors and
the torch reference everywhere else. The Triton kernels have no backward, so a call whose
inputs need gradients (fine-tuning through the quantized model) takes the torch reference. The Triton modules are imported on first use, so
`TRITON_INTERPRET=1` set before the first call runs them on the CPU.
"""

from __future__ import annotations

import importlib
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


def _triton(module: str, device: torch.device):
    """The Triton kernel module, or a one-line error when Triton cannot run on `device`."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "") != "1":
        raise RuntimeError(f"the triton backend needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                           "to run the kernels in Triton's interpreter, or CCQ_BACKEND=torch")
    try:
        return importlib.import_module(f".{module}", __name__)
    except ImportError as e:
        raise RuntimeError(f"the triton backend is unavailable ({e}); use CCQ_BACKEND=torch") from e


def dequantize(qt, dtype=torch.bfloat16):
    """Full reconstruction of a QuantizedTensor in the original basis, as `dtype`."""
    dev = qt.trellis.device
    if backend(dev) == "torch":
        return reference.dequantize(qt, dtype)
    return _triton("decode", dev).dequantize(qt, dtype)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def qlinear(x, qt, bias=None):
    """y = x @ W^T (+ bias) for a 2-D QuantizedTensor W."""
    if backend(x.device) == "torch" or _needs_grad(x, bias):
        return reference.qlinear(x, qt, bias)
    return _triton("gemm", x.device).qlinear(x, qt, bias)


def qmoe(hidden, top_k_index, top_k_weights, gate_up, down, act=torch.nn.functional.silu):
    """Routed experts of a MoE layer on packed expert stacks (see `reference.qmoe`)."""
    if backend(hidden.device) == "torch" or _needs_grad(hidden, top_k_weights):
        return reference.qmoe(hidden, top_k_index, top_k_weights, gate_up, down, act)
    return _triton("moe", hidden.device).qmoe(hidden, top_k_index, top_k_weights, gate_up, down, act)


__all__ = ["backend", "dequantize", "qlinear", "qmoe"]
