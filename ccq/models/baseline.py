"""Round-to-nearest baseline: asymmetric min/max RTN with groups along the input dim.

With fp16 scale and zero per group of 64 it spends bits + 0.5 bits per weight; the trellis
codec has to beat it at the same nominal bit width (the acceptance test and bench use it).
"""

from __future__ import annotations

import torch
from torch import nn

from .quant_modules import experts_kind


def rtn_groupwise(w: torch.Tensor, bits: int, group: int = 64) -> torch.Tensor:
    """Dequantized RTN copy of w ([..., in]); the last group may be shorter."""
    shape = w.shape
    inp = shape[-1]
    pad = (-inp) % group
    x = torch.nn.functional.pad(w.float(), (0, pad)).reshape(*shape[:-1], -1, group)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if pad:  # the padded zeros must not widen the last group's range
        real = torch.nn.functional.pad(torch.ones(inp), (0, pad)).reshape(-1, group).bool()
        lo = torch.where(real, x, torch.inf).amin(-1, keepdim=True)
        hi = torch.where(real, x, -torch.inf).amax(-1, keepdim=True)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-12).half().float()
    zero = torch.round(-lo / scale).clamp(0, qmax)
    q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
    out = ((q - zero) * scale).reshape(*shape[:-1], -1)[..., :inp]
    return out.to(w.dtype)


@torch.no_grad()
def rtn_model(model: nn.Module, plan: dict[str, int], group: int = 64) -> nn.Module:
    """Replace every planned module's weights by their RTN copies, in place."""
    mods = dict(model.named_modules())
    for name, bits in plan.items():
        m = mods[name]
        if isinstance(m, nn.Linear):
            m.weight.copy_(rtn_groupwise(m.weight, bits, group))
        else:  # in the packed [E, out, in] orientation: groups along the input dim, as for a linear
            for w in experts_kind(m).dense(m).values():
                w.copy_(rtn_groupwise(w, bits, group))
    return model
