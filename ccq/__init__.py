"""ccq: trellis-coded 2/3/4-bit compression of MoE expert weights."""

from .codec import QuantizedTensor, TrellisConfig, proxy_loss, quantize_tensor

__version__ = "0.1.0"
__all__ = ["QuantizedTensor", "TrellisConfig", "proxy_loss", "quantize_tensor", "__version__"]

from .format.loader import load  # noqa: E402
from .format.save import save_quantized  # noqa: E402
from .models.quantize import quantize_model  # noqa: E402

__all__ += ["load", "quantize_model", "save_quantized"]

from .format.hf_quantizer import register as _register_transformers_quantizer  # noqa: E402

_register_transformers_quantizer()
