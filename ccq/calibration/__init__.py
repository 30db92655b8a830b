"""Calibration: samples from a local dataset, first-layer input capture, Hessian capture."""
