"""Packed checkpoint: source reader, writer, loader, quantization_config, sizes, transformers integration."""
