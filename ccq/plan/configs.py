"""Resolve the CONFIG argument of `ccq plan` / `ccq synth`: a built-in name, a config.json
path or a model_dir, into a transformers config and model class (no weights read)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..format.source import read_json
from ..models.arch import resolve as resolve_architecture

BUILTIN_DIR = "configs"


def builtin_names() -> list[str]:
    """Names of the configs shipped in `ccq/configs/` (file name without `.json`)."""
    root = resources.files("ccq").joinpath(BUILTIN_DIR)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def read_config(spec: str | Path) -> tuple[dict, str]:
    """(raw config dict, where it came from) for a built-in name, a config.json or a model_dir."""
    p = Path(spec)
    if p.is_dir():
        return read_json(p / "config.json"), str(p / "config.json")
    if p.is_file():
        return read_json(p), str(p)
    name = str(spec)
    if name in builtin_names():
        path = resources.files("ccq").joinpath(BUILTIN_DIR, f"{name}.json")
        return read_json(Path(str(path))), f"built-in {name}"
    raise ValueError(f"config {name!r} is neither a file, a model folder nor a built-in name "
                     f"(built-in: {', '.join(builtin_names())})")


def resolve(spec: str | Path):
    """(transformers config, model class, source description) for CONFIG."""
    raw, where = read_config(spec)
    arch = resolve_architecture(raw, where)
    return arch.config, arch.cls, where
