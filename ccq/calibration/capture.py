"""Record what the first decoder layer receives, so that the layers can be calibrated one at a time.

The model runs on each calibration batch until decoder layer 0, which is replaced by a stand-in
that stores its hidden states and keyword arguments (attention mask, position embeddings, ...)
and stops the forward. Layer i is then run on the outputs of layers < i, nothing else.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0 to record its inputs, then stops the forward. Arguments
    passed by position (BERT's encoder passes the attention mask so) are stored by name."""

    def __init__(self, store: list, layer: nn.Module):
        super().__init__()
        self.store = store
        self.names = list(inspect.signature(layer.forward).parameters)[1:]

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {**dict(zip(self.names, args)), **kwargs}
        self.store.append((hidden_states.detach(), {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        raise _Stop


def to_device(kw: dict, dev) -> dict:
    """The layer keyword arguments with every tensor (also inside tuples) on `dev`."""
    def mv(v):
        if isinstance(v, torch.Tensor):
            return v.to(dev)
        if isinstance(v, tuple):
            return tuple(mv(x) for x in v)
        return v
    return {k: mv(v) for k, v in kw.items()}


def first_output(out) -> torch.Tensor:
    """The hidden states of a decoder layer's output (a tensor or a tuple led by one)."""
    return out[0] if isinstance(out, tuple) else out


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches) -> list:
    """Run the model's embedding/vision part on every batch and record layer 0's inputs (on the CPU)."""
    store = []
    first = layers[0]
    layers[0] = _Catcher(store, first)
    dev = next(p.device for p in model.parameters() if p.device.type != "meta")
    try:
        for batch in batches:
            try:
                model(**{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = first
    return [(h.cpu(), to_device(kw, "cpu")) for h, kw in store]
