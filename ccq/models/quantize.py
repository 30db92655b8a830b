"""Quantize modules in place: one nn.Linear or fused-experts module at a time, and
`quantize_model` for any in-memory transformers model.
"""

from __future__ import annotations

import time
import zlib

import torch
from torch import nn

from ..codec import proxy_loss, quantize_tensor
from .policy import module_group, quant_plan
from .quant_modules import QuantLinear, QuantMoeExperts


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor sign seed: stable across runs, resumes and module order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _quantize_weight(name, w, bits, hessian, seed, options, fallback_reason):
    t0 = time.perf_counter()
    if hessian is not None and not torch.isfinite(hessian).all():
        hessian, fallback_reason = None, "non-finite calibration statistics"
    qt = quantize_tensor(w.detach().float(), bits, hessian, seed=tensor_seed(seed, name), **options)
    dt = time.perf_counter() - t0
    wf = w.detach().float()
    err = proxy_loss(wf, qt.dequantize(), hessian) / max(proxy_loss(wf, torch.zeros_like(wf), hessian), 1e-30)
    entry = {"tensor": name, "bits": bits, "shape": list(w.shape), "group": module_group(name if w.dim() == 2 else name.rsplit(".", 1)[0]),
             "relative_proxy_error": err, "seconds": round(dt, 3), "bytes": qt.nbytes,
             "hessian": hessian is not None}
    if fallback_reason:
        entry["fallback"] = fallback_reason
    return qt, entry


def quantize_module(model: nn.Module, name: str, bits: int, hessians: dict | None, seed: int = 0,
                    rotate_output: bool = False, **options) -> list[dict]:
    """Replace module `name` by its quantized twin; returns report entries (one per weight).

    hessians: None for data-free, else the HessianCapture result; a weight whose entry is
    None (no tokens seen) is quantized data-free and marked as a fallback.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    mod = getattr(parent, child)
    opts = dict(options, rotate_output=rotate_output)

    def h(key):
        if hessians is None:
            return None, None
        hv = hessians.get(key)
        return hv, (None if hv is not None else "no calibration tokens reached it")

    if isinstance(mod, nn.Linear):
        hv, why = h(name)
        qt, entry = _quantize_weight(name, mod.weight, bits, hv, seed, opts, why)
        new = QuantLinear.like(mod, bits, rotate_output)
        new.load(qt)
        entries = [entry]
    else:
        new = QuantMoeExperts.like(mod, bits, rotate_output)
        entries = []
        for wname in ("gate_up_proj", "down_proj"):
            hv, why = h(f"{name}.{wname}")
            qt, entry = _quantize_weight(f"{name}.{wname}", getattr(mod, wname), bits, hv, seed, opts, why)
            getattr(new, wname).load(qt)
            entries.append(entry)
    setattr(parent, child, new)
    return entries


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 2, calibration=None, *, overrides=(), seed: int = 0,
                   rotate_output: bool = False, target_bpw: float | None = None, **options) -> nn.Module:
    """Quantize a loaded transformers model in place (any model made of nn.Linear layers).

    calibration: None (data-free) or an iterable of model input dicts (or input_id tensors);
    Hessians are captured in one pass of the 16-bit model. options: codec options (L, code,
    hadamard_block, ...). target_bpw: choose 2, 3 or 4 bits per module (modules no override names)
    for this average bits per weight (ccq.calibration.allocate). Sets
    `model.config.quantization_config` and keeps the report in `model.ccq_report`.
    """
    from ..format.qconfig import make_quantization_config

    plan = quant_plan(model, bits, overrides)
    mods = dict(model.named_modules())
    hessians = None
    if calibration is not None:
        from ..calibration.hessian import HessianCapture

        with HessianCapture({n: mods[n] for n in plan}) as cap:
            for batch in calibration:
                if isinstance(batch, torch.Tensor):
                    model(input_ids=batch)
                else:
                    model(**batch)
        hessians = cap.result()
    if target_bpw is not None:  # the allocator's call site
        from ..calibration.allocate import allocate_model

        plan = allocate_model(model, plan, overrides, hessians, target_bpw, seed=seed, rotate_output=rotate_output,
                              **options)
    report = []
    for name, b in plan.items():
        report += quantize_module(model, name, b, hessians, seed, rotate_output, **options)
    model.config.quantization_config = make_quantization_config(model, bits, plan, overrides, seed=seed,
                                                                rotate_output=rotate_output, **options)
    if target_bpw is not None:
        model.config.quantization_config["target_bpw"] = target_bpw
    model.ccq_report = report
    return model
