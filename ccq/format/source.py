"""Read a source model_dir lazily: config.json, safetensors shards (+ index), one tensor at a time.

Everything is checked before any output is written: the folder and config exist and parse,
every shard named by the index exists and has a complete header (a truncated shard fails
here), and every tensor the index lists is in its shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_json(path: Path) -> dict:
    """Parse a JSON file, naming the file in any error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


class SourceCheckpoint:
    """The tensors of a model_dir, by their on-disk names, read on demand."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"model_dir {self.dir} does not exist or is not a folder")
        self.config = read_json(self.dir / "config.json")
        index_path = self.dir / INDEX
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no weight_map")
        elif (self.dir / SINGLE).exists():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.dir} holds neither {INDEX} nor {SINGLE}")
        self._files: dict[str, object] = {}
        if weight_map is None:
            f = self._open(SINGLE)
            self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            self.weight_map = dict(weight_map)
            for shard in sorted(set(self.weight_map.values())):
                keys = set(self._open(shard).keys())
                for name, s in self.weight_map.items():
                    if s == shard and name not in keys:
                        raise ValueError(f"tensor {name} is listed in {index_path} but missing from {self.dir / shard}")

    def _open(self, shard: str):
        if shard not in self._files:
            path = self.dir / shard
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} not found")
            try:
                self._files[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error type for corrupt files
                raise ValueError(f"shard {path} is corrupt or truncated: {e}") from None
        return self._files[shard]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self):
        return self.weight_map.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor; missing names and non-finite floats are errors that name the tensor."""
        if name not in self.weight_map:
            raise ValueError(f"tensor {name} is missing from {self.dir} (not in the index)")
        shard = self.weight_map[name]
        try:
            t = self._open(shard).get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name} from {self.dir / shard}: {e}") from None
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"tensor {name} in {self.dir / shard} has NaN/Inf values")
        return t


class MetaView:
    """The same names as a SourceCheckpoint, as meta tensors of the stored shapes: resolving and
    converting every model tensor through it checks names and shapes without reading data."""

    def __init__(self, src: SourceCheckpoint):
        self.src = src

    def keys(self):
        return self.src.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.src:
            raise ValueError(f"tensor {name} is missing from {self.src.dir} (not in the index)")
        return torch.empty(self.src.shape(name), device="meta")
