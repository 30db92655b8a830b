"""`ccq plan`: bytes by module group, KV cache and a GPU placement, from a config alone.

The KV cache is placed with the layers that own it: every decoder layer of the meta model
gets a meta buffer of its cache size before accelerate's `infer_auto_device_map` runs, so
the placement accounts for weights and cache together, per GPU, as transformers allocates
them at run time (each layer's cache lives on that layer's device).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ..models.policy import ROUTER_NAMES, module_group
from ..models.skeleton import (checkpoint_tensors, decoder_layers, fp32_names, nbytes, packed_buffer_names,
                               quantized_skeleton)
from . import configs

KV_BUFFER = "ccq_kv_cache"
GROUP_ORDER = ("routed_experts", "shared_experts", "attention", "dense_mlp", "routers", "vision_tower",
               "resampler", "embeddings", "other")


def tensor_group(name: str, plan: dict[str, int], head_names: set[str]) -> str:
    """Report group of a checkpoint tensor: its quantized module's group, else by module kind."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in plan:
            return module_group(prefix)
    module = name.rpartition(".")[0]
    if module in head_names:
        return "embeddings"
    if any(p in ROUTER_NAMES for p in module.split(".")[-2:]):
        return "routers"
    return module_group(module)


def kv_cache_bytes_per_layer(config, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """K and V of one attention layer for `batch` sequences of `context` tokens (the family's
    adapter says how many K and V values a token costs)."""
    from ..models.arch import detect

    values = detect(config.to_dict()).kv_values_per_token(config)
    return batch * context * values * torch.empty((), dtype=dtype).element_size()


def place(model: nn.Module, capacities: list[int], kv_per_layer: int, reserve: int = 0,
          dtype: torch.dtype = torch.bfloat16) -> dict:
    """accelerate device map of the meta model (+ its KV cache) over GPUs of `capacities` bytes.

    Over several GPUs the layers are first spread evenly (accelerate's balanced memory, as
    transformers' device_map="auto" does), else filled in order. What does not fit goes to
    "cpu". accelerate keeps room for one offloaded layer on the first GPU; when a pass
    without that room offloads nothing, that placement is kept (no offload, no room needed).
    Returns {device_map, per-device bytes and cache bytes}.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory
    from accelerate.utils.modeling import get_max_layer_size

    layers_name, layers = decoder_layers(model)
    elems = kv_per_layer // torch.empty((), dtype=dtype).element_size()
    for layer in layers:
        layer.register_buffer(KV_BUFFER, torch.empty(elems, dtype=dtype, device="meta"), persistent=False)
    try:
        model.tie_weights()
        special = {n: torch.float32 for n in fp32_names(model)}
        no_split = list(model._no_split_modules or [])
        sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
        budget = [max(cap - reserve, 0) for cap in capacities]

        def infer(limits, first_extra=0):
            mm = {i: b + (first_extra if i == 0 else 0) for i, b in enumerate(limits)}
            mm["cpu"] = 1 << 60
            return infer_auto_device_map(model, max_memory=mm, no_split_module_classes=no_split, dtype=dtype,
                                         special_dtypes=special)

        def on_gpus(dm):
            return all(isinstance(d, int) for d in dm.values())

        with _quiet():
            dm = None
            if len(budget) > 1:
                bal = get_balanced_memory(model, max_memory=dict(enumerate(budget)), no_split_module_classes=no_split,
                                          dtype=dtype, special_dtypes=special)
                balanced = infer([min(bal[i], b) for i, b in enumerate(budget)])
                dm = balanced if on_gpus(balanced) else None
            if dm is None:
                dm = infer(budget)
            if not on_gpus(dm):
                room, _ = get_max_layer_size(list(model.named_children()), sizes, no_split)
                second = infer(budget, room)
                if on_gpus(second):
                    dm = second
    finally:
        for layer in layers:
            del layer._buffers[KV_BUFFER]
    per = {}
    for name, dev in dm.items():
        per.setdefault(dev, {"bytes": 0, "kv_cache_bytes": 0})["bytes"] += sizes[name]
    for i in range(len(layers)):
        lname = f"{layers_name}.{i}"
        owner = max((k for k in dm if k == "" or lname == k or lname.startswith(k + ".")), key=len)
        per[dm[owner]]["kv_cache_bytes"] += kv_per_layer
    return {"device_map": dict(dm), "per_device": per}


@contextmanager
def _quiet():
    """accelerate warns about devices this machine does not have: planning is for other machines."""
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def plan_footprint(spec, bits: int, *, overrides=(), gpus: list[int] | None = None, context: int = 32768,
                   batch: int = 1, reserve: int = 0, dtype: torch.dtype = torch.bfloat16, tp: int = 1) -> dict:
    """Everything `ccq plan` prints, as a JSON-able dict (see docs/SCALE.md); tp > 1 adds what each
    GPU holds under vLLM tensor parallelism (`tensor_parallel`, README "Serving with vLLM")."""
    if context < 0 or batch < 1:
        raise ValueError(f"context must be >= 0 and batch >= 1, got context={context}, batch={batch}")
    config, cls, where = configs.resolve(spec)
    model, plan = quantized_skeleton(config, cls, bits, overrides)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding) or (head is not None and m is head)}
    packed = packed_buffer_names(model)
    groups: dict[str, dict[str, int]] = {}
    for name, (shape, dt) in checkpoint_tensors(model, dtype).items():
        g = groups.setdefault(tensor_group(name, plan, heads), {"bytes": 0, "quantized_bytes": 0})
        b = nbytes(shape, dt)
        g["bytes"] += b
        if name in packed:
            g["quantized_bytes"] += b
    total = sum(g["bytes"] for g in groups.values())
    n_layers = len(decoder_layers(model)[1])
    kv_layer = kv_cache_bytes_per_layer(config, context, batch, dtype)
    out = {
        "config": where, "bits": bits, "overrides": [[p, b] for p, b in overrides],
        "total_bytes": total,
        "groups": {g: groups[g]["bytes"] for g in GROUP_ORDER if g in groups},
        "quantized_bytes": {g: groups[g]["quantized_bytes"] for g in GROUP_ORDER if g in groups},
        "quantized_modules": len(plan),
        "context": context, "batch": batch, "kv_cache_bytes": kv_layer * n_layers,
    }
    if tp > 1:
        from .tensor_parallel import tp_footprint

        t = tp_footprint(model, config, tp, dtype, out["kv_cache_bytes"])
        if gpus:
            t["fits"] = t["per_gpu_bytes"] + t["per_gpu_kv_cache_bytes"] + reserve <= min(gpus)
        out["tensor_parallel"] = t
    if gpus:
        placed = place(model, gpus, kv_layer, reserve, dtype)
        per = placed["per_device"]
        out["gpus"] = list(gpus)
        out["reserve_bytes"] = reserve
        out["devices"] = {f"cuda:{i}": per.get(i, {}).get("bytes", 0) for i in range(len(gpus))}
        out["devices_kv_cache_bytes"] = {f"cuda:{i}": per.get(i, {}).get("kv_cache_bytes", 0) for i in range(len(gpus))}
        out["offloaded_bytes"] = sum(v["bytes"] for k, v in per.items() if not isinstance(k, int))
        out["fits"] = out["offloaded_bytes"] == 0
    return out


def format_plan(p: dict) -> str:
    """The human-readable `ccq plan` table (GB = 1e9 bytes, GiB = 2**30)."""

    def gb(b):
        return f"{b / 1e9:9.2f} GB {b / 2**30:8.2f} GiB"

    lines = [f"{p['config']}: {p['bits']}-bit, {p['quantized_modules']} quantized modules",
             f"{'group':<16} {'bytes':>25}  quantized"]
    for g, b in p["groups"].items():
        q = p["quantized_bytes"][g]
        lines.append(f"{g:<16} {gb(b)}  {'all' if q == b else 'none' if q == 0 else f'{100 * q / b:.1f}%'}")
    lines.append(f"{'total':<16} {gb(p['total_bytes'])}")
    lines.append(f"{'kv cache':<16} {gb(p['kv_cache_bytes'])}  ({p['batch']} x {p['context']} tokens, bf16)")
    if "devices" in p:
        for (dev, b), cap in zip(p["devices"].items(), p["gpus"]):
            lines.append(f"{dev:<16} {gb(b)}  of {cap / 1e9:.1f} GB, kv {p['devices_kv_cache_bytes'][dev] / 1e9:.2f} GB, "
                         f"free {(cap - b) / 1e9:.2f} GB")
        if p["offloaded_bytes"]:
            lines.append(f"{'not on a GPU':<16} {gb(p['offloaded_bytes'])}")
        lines.append(f"fits: {'yes' if p['fits'] else 'no'}")
    if "tensor_parallel" in p:
        t = p["tensor_parallel"]
        lines.append(f"tensor-parallel {t['tp']} (vLLM): each GPU {gb(t['per_gpu_bytes'])}, "
                     f"packed {t['per_gpu_packed_bytes'] / 1e9:.2f} GB (shared Hadamard blocks "
                     f"{t['packed_overlap_bytes'] / 1e9:.2f} GB), kv {t['per_gpu_kv_cache_bytes'] / 1e9:.2f} GB"
                     + (f", fits: {'yes' if t['fits'] else 'no'}" if "fits" in t else ""))
    return "\n".join(lines)
