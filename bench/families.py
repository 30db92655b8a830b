"""Every registered MoE family end to end on a tiny random model: quantize (calibrated on generated
text) at each bit width, load, and compare the logits with the 16-bit model and with
round-to-nearest (groups of 64, fp16 scale + zero) at the same bits.

    PYTHONPATH=. python bench/families.py [--families qwen3_moe mixtral ...] [--bits 2 4] [--L 12]
                                          [--out bench/results/families-cpu.json]

Prints one line per (family, bits) and writes JSON: relative logit error ||q - ref|| / ||ref|| of
ccq and of RTN g64 on held-out text, quantize wall time, packed bytes. Tiny models come from
`ccq.tiny.build_tiny_model` (transformers' 0.02 init, the family's checkpoint layout).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

FAMILIES = ["qwen3_moe", "qwen3_vl_moe", "mixtral", "deepseek_v3", "gpt_oss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--L", type=int, default=12)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", default="bench/results/families-cpu.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from ccq.demo import quantize_and_compare
    from ccq.eval.synthetic import generate_text, write_text_dataset
    from ccq.pipeline import quantize_model_dir
    from ccq.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="ccq-bench-families-"))
    calib = write_text_dataset(tmp / "calib.parquet", n_docs=16, seed=1)
    results = []
    for family in args.families:
        src = build_tiny_model(family, tmp / family / "model")
        ids = AutoTokenizer.from_pretrained(str(src))(" ".join(generate_text(2, seed=3)), return_tensors="pt")
        batches = {"text": {"input_ids": ids["input_ids"][:, :64]}}
        quantize_model_dir(src, tmp / family / "warmup", 2, L=8, overrides=[("*", 16)], progress=False)
        for bits in args.bits:
            row = quantize_and_compare(src, tmp / family / f"q{bits}", bits, batches, calibration=calib,
                                       samples=args.samples, L=args.L)
            row = {"family": family, **row}
            results.append(row)
            print(json.dumps(row), flush=True)
    out = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "models": "ccq.tiny.build_tiny_model(family): hidden 64, 2 layers (DeepSeek-V3: the first dense)",
           "calibration": {"samples": args.samples, "seq_len": 64, "rows": "16 generated text documents"},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
