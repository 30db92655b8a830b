"""Codec benchmark: MSE on i.i.d. N(0,1) weights at 2/3/4 bits next to the published
reference points, bits per weight of a 4096 x 4096 matrix, search speed (weights/s) on the
CPU (numba) and, when present, the GPU (Triton), plus the BlockLDLQ and incoherence checks.
bench/search.py adds the H200 prediction from the compiled search kernel.

    python bench/codec.py [--weights 131072] [--out bench/results]

Prints a table and writes bench/results/codec-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numba
import numpy as np
import torch

import ccq
from ccq.codec import packed_nbytes
from ccq.codec.codes import code_table
from ccq.codec.quality import gaussian_quality
from ccq.codec.viterbi_numba import viterbi_tiles


def quality(bits: int, n_weights: int, code: str, L: int) -> dict:
    """gaussian_quality on a (n_weights/512) x 512 matrix, timed after the one-off compile."""
    gaussian_quality(bits, 16, 256, code=code, L=L, device="cpu")
    q = gaussian_quality(bits, n_weights // 512, 512, code=code, L=L, device="cpu")
    return {**q, "code": code, "L": L, "bpw_4096x4096": packed_nbytes((4096, 4096), bits) * 8 / 4096 ** 2}


def search_speed(bits: int, L: int, tiles: int, device: str, repeats: int = 3) -> dict:
    """Weights/s of the raw tail-biting search (both passes), median of `repeats` runs."""
    x = np.random.default_rng(0).standard_normal((tiles, 256)).astype(np.float32)
    code = code_table("mul1", L)
    if device == "cpu":
        viterbi_tiles(x[:2], 1.0, code, bits, L)  # compile
        run = lambda: viterbi_tiles(x, 1.0, code, bits, L)  # noqa: E731
    else:
        from ccq.codec.viterbi_triton import viterbi_tiles_triton

        xt = torch.from_numpy(x).cuda()
        viterbi_tiles_triton(xt[:2], 1.0, "mul1", bits, L)

        def run():
            viterbi_tiles_triton(xt, 1.0, "mul1", bits, L)
            torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"device": device, "bits": bits, "L": L, "tiles": tiles, "median_s": med, "weights_per_s": tiles * 256 / med}


def ldlq_check(L: int) -> dict:
    """Proxy loss tr(dW H dW^T) of data-free vs BlockLDLQ on a matrix with correlated inputs."""
    g = torch.Generator().manual_seed(1)
    n = 512
    mix = torch.eye(n) + 0.9 * torch.randn(n, n, generator=g) / n ** 0.5
    x = torch.randn(4 * n, n, generator=g) @ mix * torch.linspace(0.2, 3.0, n)
    h = x.T @ x / x.shape[0]
    w = torch.randn(256, n, generator=g)
    free = ccq.proxy_loss(w, ccq.quantize_tensor(w, 2, L=L, device="cpu").dequantize(), h)
    ldlq = ccq.proxy_loss(w, ccq.quantize_tensor(w, 2, hessian=h, L=L, device="cpu").dequantize(), h)
    return {"bits": 2, "L": L, "proxy_loss_data_free": free, "proxy_loss_ldlq": ldlq, "ratio": ldlq / free}


def incoherence_check(L: int) -> dict:
    """MSE on a weight with outlier rows and columns: no rotation, input side, both sides."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 512, generator=g)
    w[:, torch.randint(0, 512, (6,), generator=g)] *= 20.0
    w[torch.randint(0, 256, (4,), generator=g), :] *= 6.0
    out = {}
    for name, opts in (("none", {"hadamard_block": 1}), ("input", {}), ("input+output", {"rotate_output": True})):
        qt = ccq.quantize_tensor(w, 2, L=L, device="cpu", **opts)
        out[f"mse_{name}"] = float(((qt.dequantize() - w) ** 2).mean())
    out["relative_mse_input_vs_none"] = out["mse_input"] / out["mse_none"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=int, default=131072, help="weights per bit width for the MSE (>= 65536)")
    ap.add_argument("--code", default="mul1")
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{numba.config.NUMBA_NUM_THREADS}core"
    res = {"device": device_name, "cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg(), "torch": torch.__version__, "numba": numba.__version__, "ccq": ccq.__version__,
           "python": platform.python_version(), "quality": [], "search_speed": []}
    print(f"device: {device_name}, {res['cpus']} CPUs, load average {res['load_avg'][0]:.2f}")
    print("| bits | ccq MSE | best published | R(D) | Lloyd-Max | bpw (4096x4096) | quantize w/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for bits in (2, 3, 4):
        q = quality(bits, args.weights, args.code, args.L)
        res["quality"].append(q)
        bp = "-" if q["best_published"] is None else f"{q['best_published']:.5f}"
        print(f"| {bits} | {q['mse']:.5f} | {bp} | {q['rate_distortion']:.5f} | {q['lloyd_max']:.5f} | "
              f"{q['bpw_4096x4096']:.4f} | {q['weights_per_s']:.0f} |", flush=True)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for bits in (2, 3, 4):
            s = search_speed(bits, 16, 64 if dev == "cpu" else 4096, dev)
            res["search_speed"].append(s)
            print(f"search {dev} L=16 {bits}-bit: {s['weights_per_s']:.0f} weights/s (median of 3, {s['tiles']} tiles)",
                  flush=True)
    res["ldlq"] = ldlq_check(args.L)
    print(f"BlockLDLQ proxy loss / data-free: {res['ldlq']['ratio']:.3f} "
          f"({res['ldlq']['proxy_loss_ldlq']:.1f} vs {res['ldlq']['proxy_loss_data_free']:.1f})", flush=True)
    res["incoherence"] = inc = incoherence_check(args.L)
    print(f"outlier matrix MSE: no rotation {inc['mse_none']:.4f}, input Hadamard {inc['mse_input']:.4f}, "
          f"input+output {inc['mse_input+output']:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"codec-{device_name.replace(' ', '_')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
