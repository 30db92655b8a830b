"""Footprint planning and synthetic models: what a quantized model will weigh, where it will
sit on the given GPUs, and random-code checkpoints of the real shape to prove it."""
