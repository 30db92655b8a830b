"""The quantizer: a model folder (or an in-memory model) -> quantized, unit by unit (`units.Pipeline`);
then, optionally, the packed folder fine-tuned end to end (`finetune_dir`)."""

from .finetune_dir import finetune_model_dir
from .in_memory import quantize_model
from .model_dir import quantize_model_dir

__all__ = ["finetune_model_dir", "quantize_model", "quantize_model_dir"]
