"""`ccq.load`: a packed checkpoint folder -> a ready transformers model with ccq modules."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..models.arch import resolve
from ..models.policy import replace_with_quant_modules
from ..models.skeleton import packed_buffer_names
from .checks import check_packed, check_shards
from .qconfig import check_quantization_config
from .source import INDEX, SINGLE, read_json


def shard_files(path: Path) -> list[str]:
    if (path / INDEX).exists():
        return sorted(set(read_json(path / INDEX)["weight_map"].values()))
    if (path / SINGLE).exists():
        return [SINGLE]
    raise FileNotFoundError(f"{path} holds neither {INDEX} nor {SINGLE}")


@torch.no_grad()
def load(path, device="cpu", dtype: torch.dtype | None = None, device_map=None, max_memory: dict | None = None):
    """Load a ccq checkpoint folder.

    device: where everything goes when device_map is None. dtype: dtype of the 16-bit
    tensors (default: as stored); packed codes, scales and signs keep their own dtypes.
    device_map: None, "auto" or an accelerate device map dict (multi-GPU / GPU + CPU).
    "auto" places the packed model over the GPUs within max_memory ({0: "70GiB", "cpu":
    "200GiB"}, accelerate's format) before reading; every tensor goes straight to its device.
    Shards, format version, packed shapes and scales are checked (`ccq.format.checks`).
    """
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a folder")
    raw = read_json(path / "config.json")
    qc = check_quantization_config(raw.get("quantization_config"), str(path / "config.json"))
    arch = resolve(raw, str(path / "config.json"))
    shards = shard_files(path)
    where = check_shards(path / s for s in shards)
    with init_empty_weights():  # like from_pretrained: the config's dtype (or `dtype`), fp32 where the model asks
        model = arch.cls._from_config(arch.config, **({"dtype": dtype} if dtype is not None else {}))
    replace_with_quant_modules(model, qc["modules"], qc.get("rotate_output", False))
    model.config.quantization_config = qc
    state = model.state_dict()
    packed = packed_buffer_names(model)
    if device_map == "auto":
        model.tie_weights()  # so accelerate keeps tied weights together
        device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype or torch.bfloat16,
                                           no_split_module_classes=model._no_split_modules)
    elif device_map is not None and not isinstance(device_map, dict):
        raise ValueError(f"device_map must be None, 'auto' or a dict, got {device_map!r}")
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            for name in f.keys():
                if name not in state:
                    raise ValueError(f"{path / shard}: unexpected tensor {name}")
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(state[name].shape):
                    raise ValueError(f"{path / shard}: tensor {name} has shape {tuple(t.shape)}, the model "
                                     f"expects {tuple(state[name].shape)}")
                # 16-bit tensors take the model's dtype for them; packed fields keep their own
                target = device if device_map is None else _mapped_device(device_map, name)
                set_module_tensor_to_device(model, name, target, value=t, dtype=t.dtype if name in packed else None)
    model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
               if p is not None and p.device.type == "meta"]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    check_packed(model, where)
    model.eval()
    if device_map is not None:  # packed weights are buffers: offloaded ones must stay offloaded
        return dispatch_model(model, device_map=device_map, offload_buffers=True)
    return model.to(device)


def _mapped_device(device_map: dict, name: str):
    """Device of the longest device_map entry that is `name` or one of its parents."""
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise ValueError(f"device_map places no module holding {name}")
    return device_map[best]
