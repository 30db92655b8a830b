"""Quantize a tiny random ERNIE-4.5-VL end to end at 2 and 4 bits and compare its logits with
the 16-bit model and with round-to-nearest (groups of 64, fp16 scale + zero).

    PYTHONPATH=. python bench/pipeline.py [--L 12] [--bits 2 4] [--out bench/results/pipeline-cpu.json]

Prints a table and writes JSON: relative logit error ||q - ref|| / ||ref|| on a text-only and
an image+text batch, the RTN-g64 error at the same bits, wall time of the quantize run, and
the packed size. The tiny model comes from ccq.tiny, the calibration text from ccq.eval.synthetic.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=12, help="trellis state bits (16 is the codec default; 4-bit at "
                    "L=16 takes tens of minutes on 2 CPU cores even for the tiny model)")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", default="bench/results/pipeline-cpu.json")
    args = ap.parse_args()

    import datasets
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    from ccq.pipeline import quantize_model_dir
    from ccq.demo import quantize_and_compare
    from ccq.eval.synthetic import generate_text
    from ccq.tiny import PIPELINE_ERNIE_OPTIONS, build_tiny_ernie_vl, tiny_ernie_image_inputs

    tmp = Path(tempfile.mkdtemp(prefix="ccq-bench-"))
    src = build_tiny_ernie_vl(tmp / "model", **PIPELINE_ERNIE_OPTIONS)
    rng = np.random.default_rng(1)
    rows = {"text": generate_text(8, seed=1) + ["what is the red bar"] * 4,
            "image": [None] * 8 + [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(4)]}
    calib = tmp / "calib.parquet"
    datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"text": datasets.Value("string"), "image": datasets.Image()})).to_parquet(str(calib))

    text_ids = AutoTokenizer.from_pretrained(str(src))(generate_text(1, seed=3)[0], return_tensors="pt")["input_ids"]
    batches = {"text": {"input_ids": text_ids[:, :64]}, "image+text": tiny_ernie_image_inputs(src)}
    quantize_model_dir(src, tmp / "warmup", 2, L=8, overrides=[("*", 16)], progress=False)  # imports, numba compile
    results = []
    for bits in args.bits:
        row = quantize_and_compare(src, tmp / f"q{bits}", bits, batches, calibration=calib, samples=args.samples,
                                   L=args.L)
        results.append(row)
        print(json.dumps(row))
    out = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "model": "tiny ERNIE-4.5-VL (ccq.tiny: hidden 64, 3 layers, 4+4 experts)",
           "calibration": {"samples": args.samples, "seq_len": 64, "rows": "8 text + 4 image+text"},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
