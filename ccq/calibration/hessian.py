"""Capture input Hessians H = E[x x^T] of the modules about to be quantized.

nn.Linear: the running sum of x x^T over every row it sees. Routed experts (any
`QuantExperts` kind, weights seen as [E, out, in] stacks): the hook sees all tokens of the expert set's modality
(ERNIE-4.5-VL hands text tokens to `text_moe` and image tokens to `vision_moe`), so every
expert's gate/up share one Hessian, and each expert's down projection gets its own
Hessian of its input (act(gate x) * (up x) for the fused kind) computed over all those tokens, not only the routed ones:
rarely routed experts still get full statistics.

With token weights (`guides`, from `OutputFisher.saliency`), a module's Hessian is sum_t s_t x_t x_t^T
over its tokens, one per row group ([G, in, in] for G > 1 groups; see `ccq.calibration.fisher`).
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

    guides: {module name: [[tokens, G] weights of each forward pass, in order]}; set `.step` to the
    index of the pass before it runs. A pass past the list, or whose token count differs, weighs
    every token 1 (the weights' mean).
    """

    def __init__(self, modules: dict[str, nn.Module], guides: dict[str, list[torch.Tensor]] | None = None):
        self.modules = modules
        self.acc: dict[str, _Acc] = {}
        self.handles = []
        self.guides, self.step = guides or {}, 0

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

    def weights(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """[tokens, G] weights of this pass's tokens x (float64, on x's device), or None: unweighted."""
        per = self.guides.get(name)
        if per is None:
            return None
        s = per[self.step] if self.step < len(per) else None
        if s is None or s.shape[0] != x.shape[0]:
            s = torch.ones(x.shape[0], per[0].shape[1])
        return s.to(x.device, torch.float64)

    def _linear_hook(self, name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = self.weights(name, x)
            if s is None:
                self.acc[name].add(x.T @ x, x.shape[0])
            else:
                h = (s.T[:, :, None] * x).transpose(1, 2) @ x  # [G, in, in]
                self.acc[name].add(h[0] if s.shape[1] == 1 else h, x.shape[0])
        return hook

    def _experts_hook(self, name, kind):
        def hook(m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if x.shape[0] == 0:
                return
            s = self.weights(name, x)
            root = 1 if s is None else s[:, :1].sqrt()
            xd = x.double() * root
            self.acc[f"{name}.gate_up_proj"].add(xd.T @ xd, x.shape[0])
            hs = []
            for e in range(kind.dense(m)["gate_up_proj"].shape[0]):
                h = kind.down_input(m, x, e).double() * root
                hs.append(h.T @ h)
            self.acc[f"{name}.down_proj"].add(torch.stack(hs), x.shape[0])
        return hook

    def result(self) -> dict[str, torch.Tensor | None]:
        return {k: a.mean() for k, a in self.acc.items()}
