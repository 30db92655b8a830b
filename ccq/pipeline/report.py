"""The run fingerprint (what a resume must match) and the report written beside the checkpoint."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from ..version import __version__


def fingerprint(src_dir: Path, settings: dict) -> str:
    """Hash of the inputs (file names, sizes, mtimes, config) and every option."""
    files = sorted(p for p in Path(src_dir).iterdir() if p.is_file())
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def calibration_fingerprint(path) -> list:
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q), q.stat().st_size, q.stat().st_mtime_ns] for q in files]


def versions() -> dict:
    import transformers

    return {"ccq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def summary(report: list[dict], settings, calibration, samples: int, seq_len: int, seconds: float) -> dict:
    """The report: every tensor's entry, totals by module group, fallbacks, versions."""
    groups: dict[str, dict] = {}
    for e in report:
        g = groups.setdefault(e["group"], {"tensors": 0, "weights": 0, "bytes": 0})
        g["tensors"] += 1
        n = 1
        for d in e["shape"]:
            n *= d
        g["weights"] += n
        g["bytes"] += e["bytes"]
    return {
        "bits": settings.bits,
        "options": settings.to_dict(),
        "calibration": None if calibration is None else {"path": str(calibration), "samples": samples,
                                                          "seq_len": seq_len},
        "tensors": report,
        "fallbacks": [e["tensor"] for e in report if "fallback" in e],
        "totals": {"quantized_tensors": len(report), "quantized_bytes": sum(e["bytes"] for e in report),
                   "quantize_seconds": round(sum(e["seconds"] for e in report), 3),
                   "wall_seconds": round(seconds, 3), "by_group": groups},
        "versions": versions(),
    }
