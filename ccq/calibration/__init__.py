"""Calibration: Hessian capture, calibration data, layer-by-layer streaming quantization."""
