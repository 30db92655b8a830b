"""Codec quality on i.i.d. N(0, 1) weights, next to the published reference points."""

from __future__ import annotations

import time

import torch

from .quantizer import quantize_tensor

# MSE per weight on i.i.d. N(0,1) data (DESIGN.md section 2); None where not published.
REFERENCE = {
    2: {"rate_distortion": 0.0625, "lloyd_max": 0.1175, "best_published": 0.0683, "baidu_wint2": 0.110},
    3: {"rate_distortion": 2.0 ** -6, "lloyd_max": 0.03454, "best_published": None, "baidu_wint2": None},
    4: {"rate_distortion": 0.00391, "lloyd_max": 0.0095, "best_published": 0.00444, "baidu_wint2": None},
}


def gaussian_quality(bits: int, rows: int = 256, cols: int = 256, seed: int = 0, **options) -> dict:
    """Quantize a seeded Gaussian matrix; return MSE, bits per weight, time and weights/s."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    t0 = time.perf_counter()
    qt = quantize_tensor(w, bits, seed=seed, **options)
    dt = time.perf_counter() - t0
    mse = float(((qt.dequantize() - w) ** 2).mean())
    return {"bits": bits, "shape": [rows, cols], "mse": mse, "bpw": qt.bits_per_weight,
            "seconds": dt, "weights_per_s": w.numel() / dt, **REFERENCE[bits]}


def format_table(rows: list[dict]) -> str:
    """Markdown table of gaussian_quality results."""
    def f(v):
        return "-" if v is None else f"{v:.5f}"

    lines = ["| bits | ccq MSE | bpw | R(D) bound | Lloyd-Max | best published |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['mse']:.5f} | {r['bpw']:.3f} | {f(r['rate_distortion'])} | "
                     f"{f(r['lloyd_max'])} | {f(r['best_published'])} |")
    return "\n".join(lines)
