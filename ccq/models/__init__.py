"""Architecture adapters (ERNIE-4.5-VL, generic nn.Linear), the quantization policy, quantized modules,
and tiny random models for tests and examples (`ccq.models.tiny`)."""
