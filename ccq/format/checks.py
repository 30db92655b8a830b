"""Cheap checks of what a loader reads: a one-line error naming the file and the tensor.

- `check_shards`: every shard's header parses and the file holds every byte the header
  promises (a truncated download fails here, before any tensor is read);
- `check_packed`: every quantized weight's meta vector has this ccq's format version and a
  shape whose packed layout matches the stored trellis/scales/signs, and its scales are finite
  (a NaN scale would otherwise give NaN logits silently).
`ccq.load`, transformers' `from_pretrained` (through the ccq quantizer) and `ccq eval` all run them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from ..codec.tensor import FORMAT_VERSION, META_FIELDS, packed_layout
from ..models.quant_modules import PackedWeight


def shard_header(path: Path) -> dict:
    """The safetensors header of `path` ({tensor: {dtype, shape, data_offsets}}), checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise ValueError(f"header of {n} bytes does not fit in {size} bytes")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {path} not found") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"shard {path} is corrupt or truncated: {e}") from None
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else 0
        if end > data:
            raise ValueError(f"shard {path} is truncated: tensor {name} needs {end} data bytes, "
                             f"the file holds {data}")
    return header


def check_shards(files) -> dict[str, Path]:
    """Check every shard (see `shard_header`); returns {tensor name: shard path}."""
    where = {}
    for f in files:
        f = Path(f)
        for name in shard_header(f):
            if name != "__metadata__":
                where[name] = f
    return where


def check_packed(model: nn.Module, where: dict[str, Path] | None = None, default: str = "checkpoint"):
    """Check every quantized weight of `model` (meta version and shape vs stored fields, finite scales)."""
    where = where or {}
    for mname, mod in model.named_modules():
        if not isinstance(mod, PackedWeight):
            continue
        meta = mod.meta.detach().cpu()
        f = where.get(f"{mname}.meta", default)
        fields = dict(zip(META_FIELDS, meta.tolist()))
        if fields["version"] != FORMAT_VERSION:
            raise ValueError(f"{f}: packed tensor {mname} has format version {fields['version']} "
                             f"(this ccq reads {FORMAT_VERSION})")
        shape = ((fields["experts"],) if fields["experts"] else ()) + (fields["out"], fields["in"])
        if shape != mod.dense_shape:
            raise ValueError(f"{f}: packed tensor {mname}.meta says shape {list(shape)}, the model expects "
                             f"{list(mod.dense_shape)}")
        try:
            layout = packed_layout(shape, fields["bits"], mod.signs_out is not None)
        except ValueError as e:
            raise ValueError(f"{f}: packed tensor {mname}: its meta fields are invalid ({e})") from None
        for field, (shp, _) in layout.items():
            buf = getattr(mod, field)
            if buf is None or tuple(buf.shape) != tuple(shp):
                raise ValueError(f"{where.get(f'{mname}.{field}', f)}: packed tensor {mname}.{field} has shape "
                                 f"{None if buf is None else tuple(buf.shape)}, its stored shape {list(shape)} "
                                 f"({fields['bits']}-bit) needs {tuple(shp)}")
        if not torch.isfinite(mod.scales).all():
            raise ValueError(f"{where.get(f'{mname}.scales', f)}: packed tensor {mname}.scales has NaN/Inf values")
