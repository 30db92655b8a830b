"""The quantized model on the meta device and the exact list of tensors its checkpoint holds.

`ccq plan` sums these, `ccq synth` fills them with random values: both go through the same
policy (`quant_plan`), the same quantized modules (`replace_with_quant_modules`, whose
buffers come from `codec.packed_layout`) and the same tied-weight rule as the writer.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..calibration.streaming import build_skeleton, tied_targets
from ..models.policy import quant_plan, replace_with_quant_modules
from ..models.quant_modules import PackedWeight


def quantized_skeleton(config, cls, bits: int | None, overrides=()) -> tuple[nn.Module, dict[str, int]]:
    """(meta model with empty quantized modules, plan); bits None keeps everything 16-bit."""
    model = build_skeleton(cls, config)
    plan = quant_plan(model, bits, overrides) if bits is not None else {}
    replace_with_quant_modules(model, plan)
    return model, plan


def fp32_names(model: nn.Module) -> set[str]:
    """Parameters transformers keeps in float32 whatever the model dtype (e.g. MoE routers)."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or getattr(model, "_keep_in_fp32_modules", None) or ()
    pats = [re.compile(rf"(^|\.){re.escape(k)}($|\.)") for k in keep]
    return {n for n, _ in model.named_parameters() if any(p.search(n) for p in pats)}


def packed_buffer_names(model: nn.Module) -> set[str]:
    """Names of the trellis/scales/signs/meta buffers of every quantized module."""
    names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, PackedWeight):
            names |= {f"{mname}.{b}" for b, t in mod.named_buffers(recurse=False) if t is not None}
    return names


def checkpoint_tensors(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of every tensor the packed checkpoint stores, in model order.

    Packed fields keep their own dtypes, floating parameters are `dtype` (float32 where
    transformers insists), buffers keep theirs; tied copies are stored once.
    """
    tied = tied_targets(model)
    packed, fp32 = packed_buffer_names(model), fp32_names(model)
    params = {n for n, _ in model.named_parameters()}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name in tied:
            continue
        dt = t.dtype
        if name in params and name not in packed and t.is_floating_point():
            dt = torch.float32 if name in fp32 else dtype
        out[name] = (tuple(t.shape), dt)
    return out


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()
