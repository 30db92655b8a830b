"""Quantize modules in place: one nn.Linear or fused-experts module at a time (the pipeline's
"quantize" stage calls `quantize_module` for every planned module of a unit)."""

from __future__ import annotations

import time
import zlib

import torch
from torch import nn

from ..codec import proxy_loss, quantize_tensor
from .policy import module_group
from .quant_modules import QuantLinear, experts_kind
from .settings import QuantSettings


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor sign seed: stable across runs, resumes and module order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _quantize_weight(name, w, bits, hessian, settings: QuantSettings, fallback_reason):
    t0 = time.perf_counter()
    if hessian is not None and not torch.isfinite(hessian).all():
        hessian, fallback_reason = None, "non-finite calibration statistics"
    qt = quantize_tensor(w.detach().float(), bits, hessian, seed=tensor_seed(settings.seed, name),
                         config=settings.codec_for(bits))
    dt = time.perf_counter() - t0
    wf = w.detach().float()
    err = proxy_loss(wf, qt.dequantize(), hessian) / max(proxy_loss(wf, torch.zeros_like(wf), hessian), 1e-30)
    entry = {"tensor": name, "bits": bits, "shape": list(w.shape), "group": module_group(name if w.dim() == 2 else name.rsplit(".", 1)[0]),
             "relative_proxy_error": err, "seconds": round(dt, 3), "bytes": qt.nbytes,
             "hessian": hessian is not None}
    if fallback_reason:
        entry["fallback"] = fallback_reason
    return qt, entry


def quantize_module(model: nn.Module, name: str, bits: int, hessians: dict | None,
                    settings: QuantSettings, targets: dict | None = None) -> list[dict]:
    """Replace module `name` by its quantized twin; returns report entries (one per weight).

    hessians: None for data-free, else the HessianCapture result; a weight whose entry is
    None (no tokens seen) is quantized data-free and marked as a fallback. targets: {weight key:
    tensor} searched in place of the module's own weight (asymmetric calibration).
    """
    targets = targets or {}
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    mod = getattr(parent, child)
    rotate_output = settings.codec.rotate_output

    def h(key):
        if hessians is None:
            return None, None
        hv = hessians.get(key)
        return hv, (None if hv is not None else "no calibration tokens reached it")

    if isinstance(mod, nn.Linear):
        hv, why = h(name)
        qt, entry = _quantize_weight(name, targets.get(name, mod.weight), bits, hv, settings, why)
        new = QuantLinear.like(mod, bits, rotate_output)
        new.load(qt)
        entries = [entry]
    else:
        kind = experts_kind(mod)
        new = kind.like(mod, bits, rotate_output)
        new.take_params(mod)
        entries = []
        for wname, w in kind.dense(mod).items():
            hv, why = h(f"{name}.{wname}")
            qt, entry = _quantize_weight(f"{name}.{wname}", targets.get(f"{name}.{wname}", w), bits, hv, settings, why)
            getattr(new, wname).load(qt)
            entries.append(entry)
    setattr(parent, child, new)
    return entries

