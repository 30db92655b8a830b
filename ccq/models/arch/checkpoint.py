"""Model tensors from checkpoint tensors, through transformers' own conversion mapping.

Checkpoints often store tensors under other names than the modules transformers builds: one
tensor per expert (`experts.3.gate_proj.weight`) where the model holds one fused stack
(`experts.gate_up_proj`), legacy prefixes, transposed stacks. transformers describes every such
rename and conversion in `conversion_mapping`; `CheckpointNames` applies the same transforms
to one model tensor at a time, so a decoder layer is materialised without reading the rest.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn


class CheckpointNames:
    """Resolve model tensor names against the names of a checkpoint (`source` has keys() and get())."""

    def __init__(self, source, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, dot_natural_key, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        self.source, self.model = source, model
        self.plain: dict[str, str] = {}  # model name -> checkpoint name
        self.sources: dict[str, tuple] = {}  # converted target key -> (converter, [(pattern, checkpoint name)])
        for key in sorted(source.keys(), key=dot_natural_key):
            new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if new not in meta and key in meta:  # already a model name
                new, pattern = key, None
            if pattern is None:
                self.plain[new] = key
            else:
                conv, keys = self.sources.setdefault(new, (by_pattern[pattern], []))
                keys.append((pattern, key))
        self.converted: dict[str, str] = {}  # model name -> converted target key that produces it
        for new, (conv, keys) in self.sources.items():
            _check_complete(keys)
            for target in conv.target_patterns:
                self.converted[new.replace(conv.target_patterns[0], target)] = new
        self._done: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.plain or name in self.converted

    def get(self, name: str) -> torch.Tensor:
        """The model tensor `name`, read (and converted) from the checkpoint."""
        if name in self._done:
            return self._done.pop(name)
        if name in self.plain:
            return self.source.get(self.plain[name])
        if name not in self.converted:
            raise ValueError(f"tensor {name} is missing from the checkpoint (no stored name maps to it)")
        key = self.converted[name]
        proto, keys = self.sources[key]
        conv = copy.deepcopy(proto)
        for pattern, ckpt in keys:
            conv.add_tensor(key, ckpt, pattern, lambda ckpt=ckpt: self.source.get(ckpt))
        try:
            out = conv.convert(key, model=self.model, config=self.model.config)
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"cannot convert checkpoint tensors {keys[0][1]}, ... into {name}: {e}") from None
        if name not in out:
            raise ValueError(f"checkpoint conversion of {keys[0][1]}, ... gave {sorted(out)}, not {name}")
        result = out.pop(name)
        self._done.update(out)  # the other targets of a one-to-many conversion, until asked for
        return result

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of a plainly renamed tensor (None for a converted one: known only once read)."""
        return tuple(self.source.shape(self.plain[name])) if name in self.plain else None


def _check_complete(keys: list[tuple[str, str]]):
    """Per-expert sources of one conversion must cover the same indices 0..n-1 for every pattern:
    name the first missing checkpoint tensor otherwise."""
    found: dict[str, dict[int, tuple[str, re.Match]]] = {}
    for pattern, key in keys:
        if "*" not in pattern:
            continue
        rx = re.escape(pattern).replace(r"\*", r"(\d+)")
        m = re.search(rx, key)
        if m:
            found.setdefault(pattern, {})[int(m.group(1))] = (key, m)
    if not found:
        return
    n = max(max(idx) for idx in found.values()) + 1
    for pattern, idx in found.items():
        for i in range(n):
            if i not in idx:
                key, m = next(iter(idx.values()))
                missing = key[:m.start(1)] + str(i) + key[m.end(1):]
                raise ValueError(f"tensor {missing} is missing from the checkpoint (the other experts of "
                                 f"{pattern} are there)")
