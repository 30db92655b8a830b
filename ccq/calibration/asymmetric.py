"""Asymmetric calibration: each weight is quantized toward the 16-bit model's outputs on the 16-bit model's inputs.

The plain objective searches Q minimising E||(W - Q) x_q||^2, x_q the module's inputs in the model whose
earlier modules are already quantized: Q copies W, and what the modules before it got wrong passes
through. With x the inputs the 16-bit model gives the same module on the same tokens, the objective
E||W x - Q x_q||^2 asks Q to undo that error as far as a linear map can. Up to a constant it is
||W' - Q||_H^2 with H = E[x_q x_q^T] and W' = W E[x x_q^T] H^-1, so the codec searches the target W'
under the usual H (GPTAQ's asymmetric calibration, Li et al. 2025, here for a trellis code).

The modules of a decoder layer are quantized group by group in the order the layer calls them (a group:
the linears that read the same input, e.g. q/k/v; a fused expert stack alone), and each group's
statistics come from a pass of the layer as quantized so far on the quantized stream beside a pass of its
16-bit twin on the 16-bit stream ("true sequential"). Fused experts pair as their Hessians are taken
(`ccq.calibration.hessian`): gate_up over all the modality's tokens, each expert's down over its input
act(gate x) * (up x) on all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.quant_modules import experts_kind

# Damping of the correction W' - W, relative to H's mean diagonal: G and H come from a few thousand tokens per
# module, and a weakly damped solve fits their noise (0.01, the codec's damping of H, lost to plain calibration on
# MiniLM). 0.1 was best of 0.01 / 0.1 / 1 on SmolLM2's first 5 layers and near the best on MiniLM (docs/QUALITY.md).
CORRECTION_DAMP = 0.1


def target_weight(w: torch.Tensor, h: torch.Tensor, g: torch.Tensor, damp: float = CORRECTION_DAMP) -> torch.Tensor:
    """W' = W + W (G^T - H) (H + damp * mean(diag H) I)^-1 in float32: the weight whose H-distance to a
    quantized Q is E||W x - Q x_q||^2 up to a constant (G = E[x_q x^T]); W itself when the streams agree.
    Written as a correction of W so that the damping shrinks only the correction.
    w [out, in] or an expert stack [E, out, in]; h and g [in, in], or [E, in, in] one per expert."""
    h, g, w64 = h.double(), g.double(), w.double()
    scale = damp * h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[..., None, None]
    hd = h + torch.eye(h.shape[-1], dtype=h.dtype) * scale
    if h.dim() == 2 and w.dim() == 3:  # one H for every expert: one solve for the whole stack
        flat = w64.reshape(-1, w64.shape[-1])
        return (flat + torch.linalg.solve(hd, (g - h) @ flat.T).T).reshape(w.shape).float()
    return (w64 + torch.linalg.solve(hd, (g - h) @ w64.transpose(-1, -2)).transpose(-1, -2)).float()


class _Stop(Exception):
    pass


def call_groups(mods: dict[str, nn.Module], run) -> list[list[str]]:
    """The modules `mods` in the order `run()` (one forward pass) first calls them, in groups: a fused
    expert stack alone, consecutive linears that read the same input tensor together (q/k/v, gate/up).
    Modules it never calls come last, one group each."""
    order, inputs, handles = [], {}, []

    def hook(name):
        def record(mod, args):
            if name not in inputs:
                order.append(name)
                inputs[name] = args[0]  # held, so the identity test below cannot see a reused id
        return record

    for name, mod in mods.items():
        handles.append(mod.register_forward_pre_hook(hook(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups = []
    for name in order:
        prev = groups[-1][0] if groups else None
        if prev is not None and all(isinstance(mods[n], nn.Linear) for n in (prev, name)) \
                and inputs[name] is inputs[prev]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups + [[n] for n in mods if n not in inputs]


def decoded_linear(q: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A QuantLinear's weight decoded once into a plain nn.Linear of `dtype` (the layer's), for the passes
    that follow its quantization (the packed module decodes on every call)."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight = nn.Parameter(q.qt.dequantize().to(q.qt.trellis.device, dtype), requires_grad=False)
    if q.bias is not None:
        lin.bias = nn.Parameter(q.bias.detach().to(dtype), requires_grad=False)
    return lin


class PairedCapture:
    """Hooks on the modules `q_mods` ({name: module} of the layer being quantized: linears and fused experts)
    and their 16-bit twins `fp_mods` (same names): run a sample through the twin on the 16-bit stream first,
    then through the layer on the quantized stream, and every weight accumulates H = E[x_q x_q^T] and
    G = E[x_q x^T] (keys as `HessianCapture`'s: `X`, `X.gate_up_proj`, `X.down_proj`)."""

    def __init__(self, q_mods: dict[str, nn.Module], fp_mods: dict[str, nn.Module]):
        self.q_mods, self.fp_mods = q_mods, fp_mods
        self.waiting: set[str] = set()  # the modules of this sample's pass not called yet
        self.h: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self.fp_in: dict[str, list[torch.Tensor]] = {}
        self.handles = []

    def __enter__(self):
        for name, mod in self.q_mods.items():
            self.handles.append(self.fp_mods[name].register_forward_pre_hook(self._fp_hook(name)))
            self.handles.append(mod.register_forward_pre_hook(self._q_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def run(self, module: nn.Module, *args, **kwargs):
        """module(*args, **kwargs), stopped once every captured module has had its input: the rest of
        the layer is not needed (each module is called once a pass)."""
        self.waiting = set(self.q_mods)
        try:
            module(*args, **kwargs)
        except _Stop:
            pass

    def _called(self, name):
        self.waiting.discard(name)
        if not self.waiting:
            raise _Stop

    def _fp_hook(self, name):
        def hook(mod, args):
            self.fp_in.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
            self._called(name)
        return hook

    def _add(self, key: str, xq: torch.Tensor, x: torch.Tensor):
        xq, x = xq.double(), x.double()
        self.h[key] = self.h.get(key, 0) + xq.transpose(-1, -2) @ xq
        self.g[key] = self.g.get(key, 0) + xq.transpose(-1, -2) @ x
        self.n[key] = self.n.get(key, 0) + xq.shape[-2]

    def _q_hook(self, name):
        def hook(mod, args):
            xq = args[0].detach().reshape(-1, args[0].shape[-1])
            x = self.fp_in[name].pop(0)
            if isinstance(mod, nn.Linear):
                self._add(name, xq, x)
            elif xq.shape[0]:
                kind, twin = experts_kind(mod), self.fp_mods[name]
                self._add(f"{name}.gate_up_proj", xq, x)
                experts = range(kind.dense(mod)["gate_up_proj"].shape[0])
                self._add(f"{name}.down_proj", torch.stack([kind.down_input(mod, xq, e) for e in experts]),
                          torch.stack([kind.down_input(twin, x, e) for e in experts]))
            self._called(name)
        return hook

    def hessians(self) -> dict[str, torch.Tensor]:
        """{weight key: H} of the weights that saw tokens."""
        return {k: (self.h[k] / self.n[k]).cpu() for k in self.h if self.n[k]}

    def cross(self, key: str) -> torch.Tensor:
        return (self.g[key] / self.n[key]).cpu()
