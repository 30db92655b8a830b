"""transformers integration: `import ccq` registers quant_method "ccq", so
`AutoModelForImageTextToText.from_pretrained(path)` (or any Auto class) builds the model,
swaps in the ccq modules named by `quantization_config.modules`, and loads the packed
buffers under their checkpoint names. The shards are checked before loading and the packed
weights after it, as `ccq.load` checks them (`ccq.format.checks`).
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from pathlib import Path

from ..models.policy import replace_with_quant_modules
from .checks import check_packed, check_shards
from .qconfig import QUANT_METHOD, check_quantization_config


class CcqConfig(QuantizationConfigMixin):
    """The `quantization_config` block of a ccq checkpoint (see ccq.format.qconfig)."""

    def __init__(self, modules: dict | None = None, bits: int = 2, **kwargs):
        self.quant_method = QUANT_METHOD
        self.modules = dict(modules or {})
        self.bits = bits
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class CcqHfQuantizer(HfQuantizer):
    """Loads pre-quantized ccq checkpoints (quantizing through from_pretrained is not offered)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("ccq quantizes with `ccq quantize` / ccq.quantize_model; from_pretrained only loads "
                             "ccq checkpoints")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        files = [Path(f) for f in checkpoint_files or ()]
        where = str(files[0].parent / "config.json") if files else "config.json"
        qc = check_quantization_config(self.quantization_config.to_dict(), where)
        self._where = check_shards(files)
        replace_with_quant_modules(model, qc["modules"], qc.get("rotate_output", False))

    def _process_model_after_weight_loading(self, model, **kwargs):
        check_packed(model, getattr(self, "_where", None))
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, **kwargs):
        return True

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Idempotent registration with transformers' quantizer registry."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CcqConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CcqHfQuantizer)
