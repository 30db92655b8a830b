"""The `quantization_config` block of a packed checkpoint's config.json (DESIGN.md section 5):
the `QuantSettings` that made it, the per-module bits and what stayed 16-bit."""

from __future__ import annotations

from torch import nn

from ..codec.config import check_bits
from ..codec.tensor import FORMAT_VERSION, TILE
from ..models.policy import quantizable
from ..models.settings import QuantSettings

QUANT_METHOD = "ccq"


def make_quantization_config(model: nn.Module, settings: QuantSettings, plan: dict[str, int]) -> dict:
    """Everything a loader needs: the settings (codec options, seed, overrides), per-module bits,
    what stayed 16-bit."""
    kept = [n for n in quantizable(model) if n not in plan]
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "tile": TILE,
        **settings.to_dict(),
        "modules": dict(plan),
        "modules_kept_16bit": kept,
        "not_quantized": "embeddings, norms, routers, biases, output head and modules_kept_16bit",
    }


def check_quantization_config(qc, where: str = "config.json") -> dict:
    """Validate a loaded quantization_config; errors name the file (`where`) and the offending field."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{where} has no ccq quantization_config (quant_method 'ccq')")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: quantization_config format_version {qc.get('format_version')!r} is not "
                         f"supported (this ccq reads {FORMAT_VERSION})")
    mods = qc.get("modules")
    try:
        if not isinstance(mods, dict):
            raise ValueError
        for b in mods.values():
            check_bits(b)
    except ValueError:
        raise ValueError(f"{where}: quantization_config.modules must map module names to bits 2, 3 or 4") from None
    return qc


def settings_of(qc: dict) -> QuantSettings:
    """The QuantSettings a checkpoint was made with, read back from its quantization_config."""
    return QuantSettings.from_dict(qc)
