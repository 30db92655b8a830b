"""Architecture adapters (ERNIE-4.5-VL, generic nn.Linear), the quantization policy, quantized modules."""
