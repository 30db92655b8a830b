"""`ccq demo`: the main job on built-in data (nothing downloaded): the codec on a Gaussian
matrix, then a tiny random ERNIE-4.5-VL quantized end to end and compared with its 16-bit
source and with round-to-nearest (groups of 64) at the same bit width. `bench/pipeline.py`
runs the same comparison with an image+text batch too."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch


@torch.no_grad()
def quantize_and_compare(src, out_dir, bits: int, batches: dict[str, dict], *, calibration=None,
                         samples: int = 8, seq_len: int = 64, L: int = 12, seed: int = 0, **options) -> dict:
    """Quantize the model dir `src` (any family) into `out_dir`, then the relative logit error
    ||logits - ref|| / ||ref|| of ccq and of RTN g64 on every named batch, with size and time.
    options: more of `quantize_model_dir`'s (e.g. finetune_steps, target_bpw)."""
    from .format.loader import load
    from .format.source import read_json
    from .models.arch import resolve
    from .models.baseline import rtn_model
    from .pipeline import quantize_model_dir

    t0 = time.perf_counter()
    rep = quantize_model_dir(src, out_dir, bits, calibration=calibration, samples=samples, seq_len=seq_len,
                             L=L, seed=seed, progress=False, **options)
    wall = time.perf_counter() - t0
    plan = json.loads((Path(out_dir) / "config.json").read_text())["quantization_config"]["modules"]
    cls = resolve(read_json(Path(src) / "config.json")).cls
    ref = cls.from_pretrained(str(src)).eval()
    rtn = rtn_model(cls.from_pretrained(str(src)).eval(), plan)
    quant = load(out_dir)
    weights = sum(math.prod(e["shape"]) for e in rep["tensors"])
    row = {"bits": bits, "L": L, "quantize_wall_s": round(wall, 2), "weights": weights,
           "packed_bytes": rep["totals"]["quantized_bytes"], "fallbacks": len(rep["fallbacks"]),
           "weights_per_s": round(weights / wall, 1)}
    for name, batch in batches.items():
        r = ref(**batch).logits.float()
        for label, m in (("ccq", quant), ("rtn_g64", rtn)):
            row[f"{label}_rel_logit_err_{name}"] = round(float((m(**batch).logits.float() - r).norm() / r.norm()), 4)
    return row


def tiny_model_demo(bits: int = 2, L: int = 12, seed: int = 0) -> dict:
    """Quantize a tiny ERNIE-4.5-VL at `bits` (calibrated on generated text) and compare on
    held-out text."""
    from transformers import AutoTokenizer

    from .eval.synthetic import generate_text, write_text_dataset
    from .tiny import PIPELINE_ERNIE_OPTIONS, build_tiny_ernie_vl

    with tempfile.TemporaryDirectory(prefix="ccq-demo-") as tmp:
        src = build_tiny_ernie_vl(Path(tmp) / "tiny-ernie", seed=seed, **PIPELINE_ERNIE_OPTIONS)
        calib = write_text_dataset(Path(tmp) / "calibration.parquet", n_docs=16, seed=seed)
        text = " ".join(generate_text(2, seed=seed + 1))
        ids = AutoTokenizer.from_pretrained(str(src))(text, return_tensors="pt")["input_ids"][:, :64]
        return quantize_and_compare(src, Path(tmp) / "packed", bits, {"text": {"input_ids": ids}},
                                    calibration=calib, L=L, seed=seed)


def format_model_table(rows: list[dict]) -> str:
    lines = ["| bits | quantized weights | ccq logit error | RTN g64 logit error | quantize time |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['weights']} | {r['ccq_rel_logit_err_text']:.3f} | "
                     f"{r['rtn_g64_rel_logit_err_text']:.3f} | {r['quantize_wall_s']:.1f} s |")
    return "\n".join(lines)
