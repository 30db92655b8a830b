"""The `quantization_config` block of a packed checkpoint's config.json (DESIGN.md section 5)."""

from __future__ import annotations

from torch import nn

from ..codec.config import TrellisConfig
from ..codec.tensor import FORMAT_VERSION, TILE
from ..models.policy import _quantizable

QUANT_METHOD = "ccq"


def make_quantization_config(model: nn.Module, bits: int, plan: dict[str, int], overrides=(), *, seed: int = 0,
                             rotate_output: bool = False, **options) -> dict:
    """Everything a loader needs: codec options, per-module bits, what stayed 16-bit."""
    cfg = TrellisConfig(bits=bits, rotate_output=rotate_output, **options)
    kept = [n for n in _quantizable(model) if n not in plan]
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits,
        "L": cfg.L,
        "code": cfg.code,
        "tile": TILE,
        "hadamard_block": cfg.hadamard_block,
        "rotate_output": cfg.rotate_output,
        "seed": seed,
        "overrides": [[p, b] for p, b in overrides],
        "modules": dict(plan),
        "modules_kept_16bit": kept,
        "not_quantized": "embeddings, norms, routers, biases, output head and modules_kept_16bit",
    }


def check_quantization_config(qc) -> dict:
    """Validate a loaded quantization_config; errors name the offending field."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError("config.json has no ccq quantization_config (quant_method 'ccq')")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"quantization_config format_version {qc.get('format_version')!r} is not supported "
                         f"(this ccq reads {FORMAT_VERSION})")
    mods = qc.get("modules")
    if not isinstance(mods, dict) or any(b not in (2, 3, 4) for b in mods.values()):
        raise ValueError("quantization_config.modules must map module names to bits 2, 3 or 4")
    return qc
