"""Architecture adapters: one module per model family, all registered in `ADAPTERS`.

`resolve(raw_config, where)` is the one place that decides which family a config.json belongs
to; quantize, plan, synth, load, from_pretrained and eval all go through it. Adding a family is
one module here plus its entry in `ADAPTERS` (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import NamedTuple

from . import deepseek_v3, ernie_vl, generic, gpt_oss, mixtral, qwen3_moe
from .base import Adapter

# first match wins: the generic adapter (any transformers class named by `architectures`) is last
ADAPTERS: tuple[Adapter, ...] = (ernie_vl.ADAPTER, qwen3_moe.ADAPTER, mixtral.ADAPTER, deepseek_v3.ADAPTER,
                                 gpt_oss.ADAPTER, generic.ADAPTER)
FAMILIES = {a.name: a for a in ADAPTERS}


class Architecture(NamedTuple):
    """What a config.json resolves to: its adapter, transformers config and model class."""

    adapter: Adapter
    config: object
    cls: type


def detect(raw: dict) -> Adapter:
    """The adapter of config.json `raw`."""
    return next(a for a in ADAPTERS if a.matches(raw))


def resolve(raw: dict, where: str = "config.json") -> Architecture:
    """Adapter, transformers config and model class of config.json `raw` (no weights read)."""
    adapter = detect(raw)
    config = adapter.build_config(raw, where)
    return Architecture(adapter, config, adapter.model_class(config, where))


def group_patterns() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every family's own module groups, in registry order."""
    return tuple(g for a in ADAPTERS for g in a.group_patterns)


__all__ = ["ADAPTERS", "FAMILIES", "Adapter", "Architecture", "detect", "group_patterns", "resolve"]
