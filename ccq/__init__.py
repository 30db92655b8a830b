"""ccq: trellis-coded 2/3/4-bit compression of MoE expert weights."""

from .codec import QuantizedTensor, TrellisConfig, proxy_loss, quantize_tensor

__version__ = "0.1.0"
__all__ = ["QuantizedTensor", "TrellisConfig", "proxy_loss", "quantize_tensor", "__version__"]
