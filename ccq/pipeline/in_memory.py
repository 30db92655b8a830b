"""`quantize_model`: quantize a transformers model already in memory, in place.

The same sequential core as `quantize_model_dir` (`Pipeline`): layer i is calibrated on the
outputs of the already-quantized layers < i; nothing is written (`ccq.save_quantized` writes
the result).
"""

from __future__ import annotations

import torch
from torch import nn

from ..format.qconfig import make_quantization_config
from ..models.policy import quant_plan
from ..models.settings import QuantSettings
from .units import Pipeline


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 2, calibration=None, *, overrides=(), seed: int = 0,
                   rotate_output: bool = False, settings: QuantSettings | None = None, **options) -> nn.Module:
    """Quantize a loaded transformers model in place (any model made of nn.Linear layers and
    transformers' fused experts, with a decoder layer list).

    calibration: None (data-free) or an iterable of model input dicts (or input_id tensors).
    options: codec options (L, code, hadamard_block, ...), or pass `settings`. Sets
    `model.config.quantization_config` and keeps the report in `model.ccq_report`.
    """
    if settings is None:
        settings = QuantSettings.of(bits, overrides=overrides, seed=seed, rotate_output=rotate_output, **options)
    plan = quant_plan(model, settings.bits, settings.overrides)
    batches = None
    if calibration is not None:
        batches = [{"input_ids": b} if isinstance(b, torch.Tensor) else dict(b) for b in calibration]
    device = next(p.device for p in model.parameters())
    model.ccq_report = Pipeline(model, plan, settings, batches=batches, device=device).run()
    model.config.quantization_config = make_quantization_config(model, settings, plan)
    return model
