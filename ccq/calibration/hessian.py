"""Capture input Hessians H = E[x x^T] of the modules about to be quantized.

nn.Linear: the running sum of x x^T over every row it sees. Routed experts (any
`QuantExperts` kind, weights seen as [E, out, in] stacks): the hook sees all tokens of the expert set's modality
(ERNIE-4.5-VL hands text tokens to `text_moe` and image tokens to `vision_moe`), so every
expert's gate/up share one Hessian, and each expert's down projection gets its own
Hessian of its input (act(gate x) * (up x) for the fused kind) computed over all those tokens, not only the routed ones:
rarely routed experts still get full statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.quant_modules import experts_kind


class _Acc:
    def __init__(self):
        self.sum, self.n = None, 0

    def add(self, xtx: torch.Tensor, n: int):
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.n += n

    def mean(self) -> torch.Tensor | None:
        return None if self.n == 0 else (self.sum / self.n).cpu()


class HessianCapture:
    """Context manager: hooks on `modules` ({name: module}); `.result()` -> {weight name: H or None}.

    Weight names are the checkpoint prefixes: `X` for a linear X, `X.gate_up_proj` /
    `X.down_proj` for fused experts X. None means the module saw no tokens.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.acc: dict[str, _Acc] = {}
        self.handles = []

    def __enter__(self):
        for name, mod in self.modules.items():
            if isinstance(mod, nn.Linear):
                self.acc[name] = _Acc()
                self.handles.append(mod.register_forward_pre_hook(self._linear_hook(name)))
            else:
                self.acc[f"{name}.gate_up_proj"] = _Acc()
                self.acc[f"{name}.down_proj"] = _Acc()
                self.handles.append(mod.register_forward_pre_hook(self._experts_hook(name, experts_kind(mod))))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _linear_hook(self, name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.acc[name].add(x.T @ x, x.shape[0])
        return hook

    def _experts_hook(self, name, kind):
        def hook(m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if x.shape[0] == 0:
                return
            xd = x.double()
            self.acc[f"{name}.gate_up_proj"].add(xd.T @ xd, x.shape[0])
            hs = []
            for e in range(kind.dense(m)["gate_up_proj"].shape[0]):
                h = kind.down_input(m, x, e).double()
                hs.append(h.T @ h)
            self.acc[f"{name}.down_proj"].add(torch.stack(hs), x.shape[0])
        return hook

    def result(self) -> dict[str, torch.Tensor | None]:
        return {k: a.mean() for k, a in self.acc.items()}
