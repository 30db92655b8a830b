"""What ccq knows about models: the architecture adapters (`arch`), the quantization policy and
settings, the quantized modules, the meta-device skeleton and per-module quantization."""
