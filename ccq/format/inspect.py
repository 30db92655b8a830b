"""`ccq inspect`: a readable summary of a packed checkpoint (from its headers, no weights read)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from ..models.policy import module_group
from .loader import shard_files
from .qconfig import check_quantization_config
from .source import read_json
from .writer import REPORT

PACKED_FIELDS = ("trellis", "scales", "signs_in", "signs_out", "meta")


def summarize(path) -> dict:
    """{quantization_config summary, bytes by group (packed / 16-bit), fallbacks}."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a folder")
    cfg = read_json(path / "config.json")
    qc = check_quantization_config(cfg.get("quantization_config"), str(path / "config.json"))
    packed_prefixes = set()
    for m in qc["modules"]:
        packed_prefixes |= {m, f"{m}.gate_up_proj", f"{m}.down_proj"}
    groups: dict[str, dict[str, int]] = {}
    for shard in shard_files(path):
        try:
            f = safe_open(str(path / shard), framework="pt")
        except Exception as e:
            raise ValueError(f"shard {path / shard} is corrupt or truncated: {e}") from None
        for name in f.keys():
            sl = f.get_slice(name)
            n = 1
            for d in sl.get_shape():
                n *= d
            nbytes = n * {"I8": 1, "U8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8}.get(sl.get_dtype(), 4)
            prefix, _, field = name.rpartition(".")
            is_packed = field in PACKED_FIELDS and prefix in packed_prefixes
            module = prefix.rsplit(".", 1)[0] if prefix.endswith(("gate_up_proj", "down_proj")) and \
                prefix.rsplit(".", 1)[0] in qc["modules"] else prefix
            g = groups.setdefault(module_group(module) if is_packed else "16-bit", {"bytes": 0, "tensors": 0})
            g["bytes"] += nbytes
            g["tensors"] += 0 if is_packed and field != "trellis" else 1
    report = read_json(path / REPORT) if (path / REPORT).exists() else {}
    bits_used: dict[str, int] = {}
    for b in qc["modules"].values():
        bits_used[str(b)] = bits_used.get(str(b), 0) + 1
    return {"bits": qc["bits"], "target_bpw": qc.get("target_bpw"), "L": qc["L"], "code": qc["code"], "modules_by_bits": bits_used,
            "modules_kept_16bit": qc.get("modules_kept_16bit", []), "groups": groups,
            "total_bytes": sum(g["bytes"] for g in groups.values()), "fallbacks": report.get("fallbacks", []),
            "finetune": qc.get("finetune")}


def describe(path) -> str:
    s = summarize(path)
    lines = [f"{path}: ccq {s['bits']}-bit (L={s['L']}, code={s['code']}), "
             f"quantized modules by bits: {json.dumps(s['modules_by_bits'])}"
             + (f" (chosen for a target of {s['target_bpw']} bpw)" if s["target_bpw"] is not None else ""),
             f"{'group':<16} {'tensors':>8} {'MiB':>10}"]
    for g, v in sorted(s["groups"].items()):
        lines.append(f"{g:<16} {v['tensors']:>8} {v['bytes'] / 2**20:>10.2f}")
    lines.append(f"{'total':<16} {'':>8} {s['total_bytes'] / 2**20:>10.2f}")
    if s["modules_kept_16bit"]:
        lines.append(f"kept 16-bit by override: {len(s['modules_kept_16bit'])} modules")
    fb = s["fallbacks"]
    lines.append(f"data-free fallbacks: {len(fb)}" + (": " + ", ".join(fb[:8]) + (" ..." if len(fb) > 8 else "") if fb else ""))
    ft = s["finetune"]
    if ft:
        lines.append(f"fine-tuned end to end: {ft['steps']} steps on {ft['samples']} samples, loss "
                     f"{ft['loss_before']:.4f} -> {ft['loss_after']:.4f}" + ("" if ft["kept"] else " (not kept)"))
    return "\n".join(lines)
