"""`ccq.save_quantized`: write an in-memory quantized model as a packed checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .qconfig import check_quantization_config
from .writer import CheckpointWriter

SHARD_BYTES = 4 << 30


def save_quantized(model, out_dir, *, overwrite: bool = False, copy_from=None) -> Path:
    """Shards of at most 4 GiB (+ index), config.json with quantization_config, the report.

    copy_from: a folder whose tokenizer/processor files are copied alongside.
    """
    qc = getattr(model.config, "quantization_config", None)
    qc = check_quantization_config(qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: qc)())
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.device, tuple(t.shape))
        if key in seen:  # tied weights are written once
            continue
        seen.add(key)
        state[name] = t
    groups, size = [[]], 0
    for name, t in state.items():
        nb = t.numel() * t.element_size()
        if groups[-1] and size + nb > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nb
    writer = CheckpointWriter(out_dir, len(groups), "in-memory", overwrite=overwrite)
    report = getattr(model, "ccq_report", [])
    for i, names in enumerate(groups):
        writer.write_shard(i, {n: state[n] for n in names}, report if i == 0 else [])
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    cfg["quantization_config"] = qc
    return writer.finish(cfg, {"bits": qc["bits"], "tensors": report, "versions": {"torch": torch.__version__}},
                         copy_from=copy_from)
