"""`ccq demo`: the main job on built-in data (nothing downloaded): the codec on a Gaussian
matrix, then a tiny random ERNIE-4.5-VL quantized end to end and compared with its 16-bit
source and with round-to-nearest (groups of 64) at the same bit width."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def tiny_model_demo(bits: int = 2, L: int = 12, seed: int = 0) -> dict:
    """Quantize a tiny ERNIE-4.5-VL at `bits` (calibrated on generated text); relative logit
    error of ccq and of RTN g64 on held-out text."""
    from transformers import AutoTokenizer, Ernie4_5_VLMoeForConditionalGeneration

    from .eval.synthetic import generate_text, write_text_dataset

    from .calibration.streaming import quantize_model_dir
    from .format.loader import load
    from .models.baseline import rtn_model
    from .models.tiny import PIPELINE_ERNIE_OPTIONS, build_tiny_ernie_vl

    with tempfile.TemporaryDirectory(prefix="ccq-demo-") as tmp:
        src = build_tiny_ernie_vl(Path(tmp) / "tiny-ernie", seed=seed, **PIPELINE_ERNIE_OPTIONS)
        t0 = time.perf_counter()
        calib = write_text_dataset(Path(tmp) / "calibration.parquet", n_docs=16, seed=seed)
        report = quantize_model_dir(src, Path(tmp) / "packed", bits, calibration=calib, samples=8, seq_len=64,
                                    L=L, seed=seed, progress=False)
        seconds = time.perf_counter() - t0
        plan = json.loads((Path(tmp) / "packed" / "config.json").read_text())["quantization_config"]["modules"]
        ref = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(src)).eval()
        rtn = rtn_model(Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(src)).eval(), plan)
        quant = load(Path(tmp) / "packed")
        text = " ".join(generate_text(2, seed=seed + 1))
        ids = AutoTokenizer.from_pretrained(str(src))(text, return_tensors="pt")["input_ids"][:, :64]
        r, q, b = (m(input_ids=ids).logits for m in (ref, quant, rtn))
    weights = sum(g["weights"] for g in report["totals"]["by_group"].values())
    return {"bits": bits, "L": L, "quantized_weights": weights, "seconds": seconds,
            "ccq_rel_logit_err": _rel(q, r), "rtn_g64_rel_logit_err": _rel(b, r)}


def format_model_table(rows: list[dict]) -> str:
    lines = ["| bits | quantized weights | ccq logit error | RTN g64 logit error | quantize time |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['quantized_weights']} | {r['ccq_rel_logit_err']:.3f} | "
                     f"{r['rtn_g64_rel_logit_err']:.3f} | {r['seconds']:.1f} s |")
    return "\n".join(lines)
