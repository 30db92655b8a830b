"""The trellis codec: computed codes, tail-biting Viterbi, incoherence, BlockLDLQ, packing."""

from .config import TrellisConfig
from .quantizer import proxy_loss, quantize_tensor
from .tensor import QuantizedTensor, packed_layout, packed_nbytes

__all__ = ["QuantizedTensor", "TrellisConfig", "proxy_loss", "packed_layout", "packed_nbytes", "quantize_tensor"]
