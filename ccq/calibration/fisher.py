"""Output-side weights of the allocator's costs: the empirical Fisher of each module's outputs.

The proxy tr(dW H dW^T) counts an error in a module's outputs the same wherever the module sits.
Weighting output channel r by F_r = mean over tokens of (dL/dy_r)^2, L the summed next-token
cross-entropy of the 16-bit model on the calibration text, turns it into the diagonal second-order
estimate of what the error adds to the loss: sum_r F_r (dW H dW^T)_rr. On SmolLM2 at a 2.1 bpw
target this moved the extra bits from the last layers' down projections to the value projections,
KL 0.619 -> 0.425 at the same size (docs/QUALITY.md). Fused experts: down's rows are the hidden
channels its output adds to (their F, shared by every expert); gate_up's outputs stay inside
transformers' expert loop, so its rows take the mean of down's F.

The same gradients also weight the quantizer's Hessians (GuidedQuant, Kim et al. 2025): with
g_t the gradient at token t of a module's outputs, rows split into G groups of whole tiles, group k
is quantized against H_k = sum_t s_tk x_t x_t^T, s_tk the mean of g_t^2 over the group's rows:
tokens whose outputs matter to the loss count more, within each output row's own error. Fused
experts take one weight per token, the mean over the hidden channels.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class OutputFisher:
    """Context manager: hooks on `modules` ({name: module}) that add up (dL/dy)^2 per output channel
    in every backward pass; `.result()` -> {weight name (as HessianCapture's): [out] tensor or float}.

    groups: {name: G} also keeps, per backward pass, each token's mean (dL/dy)^2 over each of G equal
    runs of output rows (`.saliency()`)."""

    def __init__(self, modules: dict[str, nn.Module], groups: dict[str, int] | None = None):
        self.modules, self.sums, self.tokens, self.handles = modules, {}, {}, []
        self.groups, self.per_token = groups or {}, {}

    def __enter__(self):
        for name, mod in self.modules.items():
            self.handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name):
        def add(g):
            g = g.detach().reshape(-1, g.shape[-1]).double()
            self.sums[name] = self.sums.get(name, 0) + (g * g).sum(0)
            self.tokens[name] = self.tokens.get(name, 0) + g.shape[0]
            if name in self.groups:
                self.per_token.setdefault(name, []).append(group_means(g * g, self.groups[name]).float().cpu())

        def hook(mod, args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(add)
        return hook

    def result(self) -> dict[str, torch.Tensor | float]:
        out = {}
        for name, mod in self.modules.items():
            if name not in self.sums:
                continue
            f = (self.sums[name] / self.tokens[name]).float().cpu()
            if isinstance(mod, nn.Linear):
                out[name] = f
            else:
                out[f"{name}.down_proj"], out[f"{name}.gate_up_proj"] = f, float(f.mean())
        return out

    def saliency(self) -> dict[str, list[torch.Tensor]]:
        """{name: [[tokens, G] per backward pass, in order]}, each group's weights scaled to mean 1 over
        all passes (so that tokens without a measured weight can count as 1)."""
        out = {}
        for name, per in self.per_token.items():
            mean = torch.cat(per).double().mean(0).clamp_min(1e-30)
            out[name] = [(s / mean).float() for s in per]
        return out


def group_means(sq: torch.Tensor, groups: int) -> torch.Tensor:
    """[tokens, out] -> [tokens, groups]: the mean over each of `groups` equal runs of whole 16-row tiles
    (the padded rows, absent from `sq`, not counted), as `quantize_tensor` splits row-group Hessians."""
    n, out = sq.shape
    size = -(-out // 16) * 16 // groups
    idx = torch.arange(out, device=sq.device) // size
    sums = torch.zeros(n, groups, dtype=sq.dtype, device=sq.device).index_add_(1, idx, sq)
    return sums / torch.bincount(idx, minlength=groups).to(sq.dtype)


def lm_loss(model: nn.Module, layers_name: str):
    """loss(h, input_ids) -> summed next-token cross-entropy from the last decoder layer's output h
    (the final norm and the output head), or None when the model has no such head (then no Fisher)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parent = model.get_submodule(layers_name.rpartition(".")[0]) if "." in layers_name else model
    norm = getattr(parent, "norm", None)
    if head is None or norm is None:
        return None

    def loss(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = head(norm(h))[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device),
                               reduction="sum")
    return loss
