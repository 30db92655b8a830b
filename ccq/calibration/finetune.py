"""Layer-wise fine-tuning of the parameters that stay 16-bit after a layer is quantized.

After a decoder layer's modules are packed, its per-output-channel scales (of every
QuantLinear whose output side is not rotated), linear biases and norm weights are tuned with Adam
so the quantized layer reproduces the 16-bit layer's outputs on the calibration activations; the
trellis codes stay fixed. A packed weight is W = diag(s) B with B the decoded codes at unit scale,
so during tuning each QuantLinear is swapped for a dense twin with a trainable gain on s (B is
decoded once), and the tuned scales are written back in fp16. Same inputs and seed, same result
(one sample per step, in a seeded order); memory is the layer plus one decoded copy of its linears.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.quant_modules import QuantLinear


class _TunedLinear(nn.Module):
    """F.linear(x, (s0 * exp(g))[:, None] * B, bias) with trainable log-gain g (and bias)."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        qt = q.qt
        s0 = qt.scales.float()[: q.out_features]
        self.register_buffer("basis", qt.dequantize() / torch.where(s0 == 0, 1, s0)[:, None])
        self.register_buffer("s0", s0)
        self.gain = nn.Parameter(torch.zeros_like(s0))
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().float().clone())

    def scales(self):
        return self.s0 * self.gain.exp()

    def forward(self, x):
        return nn.functional.linear(x, (self.scales()[:, None] * self.basis).to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))


def _norm_params(layer: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of the layer's norms (any module whose class name says Norm)."""
    return [p for m in layer.modules() if "norm" in type(m).__name__.lower()
            for p in m.parameters(recurse=False)]


def _swap(layer: nn.Module, make) -> dict[str, tuple[nn.Module, nn.Module]]:
    swapped = {}
    for name, mod in list(layer.named_modules()):
        if isinstance(mod, QuantLinear) and mod.signs_out is None:
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            new = make(mod)
            setattr(parent, child, new)
            swapped[name] = (parent, child, mod, new)
    return swapped


def finetune_layer(layer: nn.Module, inputs: list, targets: list[torch.Tensor], *, steps: int = 200,
                   lr: float = 1e-3, seed: int = 0, forward=None) -> dict:
    """Tune `layer`'s 16-bit parameters in place so forward(layer, inputs[i]) matches targets[i].

    inputs: per sample (hidden_states, kwargs) as the streaming loop keeps them; targets: the
    16-bit layer's outputs on them. forward(layer, (h, kw)) -> output tensor (default: the first
    output of layer(h, **kw)). Returns {"loss_before", "loss_after", "steps"}: the mean relative
    squared error over all samples before and after (the tuned values are kept only if better).
    """
    if forward is None:
        def forward(mod, sample):
            out = mod(sample[0], **sample[1])
            return out[0] if isinstance(out, tuple) else out

    swapped = _swap(layer, _TunedLinear)
    norms = _norm_params(layer)
    saved = [p.detach().clone() for p in norms]
    flags = [p.requires_grad for p in layer.parameters()]
    for p in layer.parameters():
        p.requires_grad_(False)
    gains = [new.gain for *_, new in swapped.values()]
    others = [new.bias for *_, new in swapped.values() if new.bias is not None] + norms
    for p in gains + others:
        p.requires_grad_(True)

    def loss_of(i):
        y = forward(layer, inputs[i]).float()
        t = targets[i].float()
        return ((y - t) ** 2).mean() / (t * t).mean().clamp_min(1e-30)

    def mean_loss():
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in range(len(inputs))) / len(inputs)

    before = mean_loss()
    groups = [g for g in ({"params": gains, "lr": lr}, {"params": others, "lr": lr * 0.1}) if g["params"]]
    opt = torch.optim.Adam(groups) if groups else None
    steps = steps if opt else 0
    g = torch.Generator().manual_seed(seed)
    order = []
    with torch.enable_grad():
        for step in range(steps):
            if not order:
                order = torch.randperm(len(inputs), generator=g).tolist()
            opt.zero_grad(set_to_none=True)
            loss_of(order.pop()).backward()
            opt.step()
    after = mean_loss()
    keep = after < before
    with torch.no_grad():
        for name, (parent, child, q, new) in swapped.items():
            if keep:
                q.scales[: q.out_features] = new.scales().to(q.scales.dtype)
                if q.bias is not None:
                    q.bias.copy_(new.bias.to(q.bias.dtype))
            setattr(parent, child, q)
        if not keep:
            for p, s in zip(norms, saved):
                p.copy_(s)
    for p, f in zip(layer.parameters(), flags):
        p.requires_grad_(f)
    return {"loss_before": before, "loss_after": min(after, before) if keep else before, "steps": steps,
            "kept": keep}
