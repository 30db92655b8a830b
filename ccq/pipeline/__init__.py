"""The quantizer: a model folder (or an in-memory model) -> quantized, unit by unit (`units.Pipeline`)."""

from .in_memory import quantize_model
from .model_dir import quantize_model_dir

__all__ = ["quantize_model", "quantize_model_dir"]
