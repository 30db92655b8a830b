"""Fine-tuning of the parameters that stay 16-bit once weights are quantized: per layer, or end to end.

A packed weight is W = diag(s) B with B the decoded codes at unit scale, so during tuning each
QuantLinear is swapped for a dense twin with a trainable log-gain on s (B is decoded once), and the
tuned scales are written back in fp16; linear biases and norm weights are tuned as they are. The
trellis codes stay fixed.

- `finetune_layer`: after a decoder layer is quantized, its outputs are matched to the 16-bit
  layer's on the calibration activations (relative squared error). Memory: the layer plus one
  decoded copy of its linears.
- `finetune_model`: after the whole model is quantized, its outputs are matched to the 16-bit
  model's on the calibration samples: KL(16-bit || quantized) of the next-token distributions for a
  model with logits, else the relative squared error of the last hidden state. It corrects what the
  layer-wise pass cannot see: errors that add up across layers. Memory: the model with every linear
  decoded (4 bytes per weight) plus the 16-bit model.

Same inputs and seed, same result (one sample per step, in a seeded order); the tuned values are
kept only when the mean loss over all samples went down.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..models.quant_modules import QuantLinear

# End-to-end defaults (finetune_model, finetune_model_dir, `ccq finetune`), measured on SmolLM2 at 2.1 bpw
# in docs/QUALITY.md: at 256 steps lr 3e-4 / 1e-3 / 3e-3 / 1e-2 gave KL 0.308 / 0.285 / 0.277 / 0.297.
E2E_STEPS, E2E_LR = 256, 3e-3


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


class _Tuning:
    """The tunable twin of `root` for one tuning run: QuantLinears (not `rotate_output`, whose scales
    live in a rotated basis) swapped for `_TunedLinear`, every other parameter frozen except the
    norms'. `end(keep)` puts the QuantLinears back, with the tuned values when keep, else the old ones."""

    def __init__(self, root: nn.Module):
        self.swapped = []
        for name, mod in list(root.named_modules()):
            if isinstance(mod, QuantLinear) and mod.signs_out is None:
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                new = _TunedLinear(mod)
                setattr(parent, child, new)
                self.swapped.append((parent, child, mod, new))
        self.norms = [p for m in root.modules() if "norm" in type(m).__name__.lower()
                      for p in m.parameters(recurse=False)]
        self.saved = [p.detach().clone() for p in self.norms]
        self.flags = [(p, p.requires_grad) for p in root.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)
        self.gains = [new.gain for *_, new in self.swapped]
        self.others = [new.bias for *_, new in self.swapped if new.bias is not None] + self.norms
        for p in self.gains + self.others:
            p.requires_grad_(True)

    def optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """Adam: lr for the log-gains, lr / 10 for biases and norms; None when nothing is tunable."""
        groups = [g for g in ({"params": self.gains, "lr": lr}, {"params": self.others, "lr": lr * 0.1})
                  if g["params"]]
        return torch.optim.Adam(groups) if groups else None

    @torch.no_grad()
    def end(self, keep: bool):
        for parent, child, q, new in self.swapped:
            if keep:
                q.scales[: q.out_features] = new.scales().to(q.scales.dtype)
                if q.bias is not None:
                    q.bias.copy_(new.bias.to(q.bias.dtype))
            setattr(parent, child, q)
        if not keep:
            for p, s in zip(self.norms, self.saved):
                p.copy_(s)
        for p, f in self.flags:
            p.requires_grad_(f)


def _tune(root: nn.Module, loss_of, n: int, steps: int, lr: float, seed: int, progress=None,
          state_path=None, save_every: int = 20) -> dict:
    """Adam on `root`'s 16-bit parameters, one sample loss_of(i) per step; kept only if the mean loss fell.

    state_path: where the run's state (tuned values, Adam's moments, the sample order, the loss
    before) is saved every `save_every` steps; a run that finds one there continues from it, with
    the same result as an uninterrupted run."""
    tuning = _Tuning(root)
    params = tuning.gains + tuning.others

    def mean_loss():
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in range(n)) / n

    try:
        opt = tuning.optimizer(lr)
        steps = steps if opt else 0
        g = torch.Generator().manual_seed(seed)
        state = torch.load(state_path, weights_only=False) if state_path and Path(state_path).exists() else None
        if state is not None:
            with torch.no_grad():
                for p, v in zip(params, state["params"]):
                    p.copy_(v)
            opt.load_state_dict(state["opt"])
            g.set_state(state["generator"])
            before, order, done = state["before"], state["order"], state["step"]
        else:
            before, order, done = mean_loss(), [], 0
        if progress is not None and done:
            progress(done)
        with torch.enable_grad():
            for step in range(done, steps):
                if not order:
                    order = torch.randperm(n, generator=g).tolist()
                opt.zero_grad(set_to_none=True)
                loss_of(order.pop()).backward()
                opt.step()
                if progress is not None:
                    progress(1)
                if state_path and (step + 1) % save_every == 0 and step + 1 < steps:
                    tmp = Path(f"{state_path}.tmp")
                    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict(),
                                "generator": g.get_state(), "before": before, "order": list(order),
                                "step": step + 1}, tmp)
                    os.replace(tmp, state_path)
        after = mean_loss()
    except BaseException:
        tuning.end(False)
        raise
    keep = after < before
    tuning.end(keep)
    return {"loss_before": before, "loss_after": after if keep else before, "steps": steps, "kept": keep}


def finetune_layer(layer: nn.Module, inputs: list, targets: list[torch.Tensor], *, steps: int = 200,
                   lr: float = 1e-3, seed: int = 0, forward=None) -> dict:
    """Tune `layer`'s 16-bit parameters in place so forward(layer, inputs[i]) matches targets[i].

    inputs: per sample (hidden_states, kwargs) as the streaming loop keeps them; targets: the
    16-bit layer's outputs on them. forward(layer, (h, kw)) -> output tensor (default: the first
    output of layer(h, **kw)). Returns {"loss_before", "loss_after", "steps", "kept"}: the mean
    relative squared error over all samples before and after.
    """
    if forward is None:
        def forward(mod, sample):
            out = mod(sample[0], **sample[1])
            return out[0] if isinstance(out, tuple) else out

    def loss_of(i):
        y = forward(layer, inputs[i]).float()
        t = targets[i].float()
        return ((y - t) ** 2).mean() / (t * t).mean().clamp_min(1e-30)

    return _tune(layer, loss_of, len(inputs), steps, lr, seed)


def model_loss(out, ref) -> torch.Tensor:
    """KL(ref || out) per token of the next-token distributions when the outputs have logits,
    else the relative squared error of the last hidden state."""
    if getattr(out, "logits", None) is not None:
        t = torch.log_softmax(ref.logits.float(), -1).flatten(0, -2)
        s = torch.log_softmax(out.logits.float(), -1).flatten(0, -2)
        return (t.exp() * (t - s)).sum(-1).mean()
    y, t = out.last_hidden_state.float(), ref.last_hidden_state.float()
    return ((y - t) ** 2).mean() / (t * t).mean().clamp_min(1e-30)


def finetune_model(model: nn.Module, reference: nn.Module, batches: list[dict], *, steps: int = E2E_STEPS,
                   lr: float = E2E_LR, seed: int = 0, progress=None, state_path=None) -> dict:
    """Tune the quantized `model`'s 16-bit parameters in place so its outputs match `reference`'s
    (the 16-bit model) on `batches` (model input dicts). The reference's outputs are recomputed at
    every step rather than stored (a long sequence's logits are vocab x tokens floats).
    progress: called with the steps done (1 after every step); state_path: the resume file (`_tune`).
    Returns {"loss_before", "loss_after", "steps", "kept"}.
    """
    dev = next(model.parameters()).device
    batches = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]

    def loss_of(i):
        with torch.no_grad():
            ref = reference(**batches[i])
        return model_loss(model(**batches[i]), ref)

    return _tune(model, loss_of, len(batches), steps, lr, seed, progress, state_path)
