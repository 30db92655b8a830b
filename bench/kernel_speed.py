"""Speed of the ccq Triton kernels against 16-bit baselines measured in the same run.

    python bench/kernel_speed.py [--bits 2 3 4] [--batches 1 4 16 64] [--tokens 1 8 64]

Needs a CUDA GPU. Times (medians, CUDA graphs where the code allows it, so launch overhead
does not hide the kernels):
- dense: fused decode GEMV/GEMM (`ccq.kernels.qlinear`, with its Hadamard transforms, and the
  bare decode-matmul with each decode variant) vs cuBLAS bf16 `x @ W.T`, for the ERNIE expert
  and attention shapes;
- MoE: one 28B routed-expert layer (64 experts, top-6) via `ccq.kernels.qmoe` (each decode) vs transformers'
  bf16 experts with its `grouped_mm` implementation (torch grouped GEMM, the fused baseline)
  and with its eager per-expert loop.
Before timing it checks the Triton results against the torch reference on the GPU.
Prints a table and writes bench/results/kernels-<device>.json. Packed weights are random
trellis words: decode speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ccq.codec.tensor import random_quantized  # noqa: E402

# (name, in, out): ERNIE-4.5-VL-28B expert (gate/up fused as 2x) and attention shapes, the 424B's gate/up
DENSE_SHAPES = [
    ("28B text gate_up", 2560, 2 * 1536),
    ("28B text down", 1536, 2560),
    ("28B vision gate_up", 2560, 2 * 512),
    ("28B vision down", 512, 2560),
    ("28B attention", 2560, 2560),
    ("424B gate_up", 8192, 2 * 3584),
]
MOE = dict(experts=64, top_k=6, hidden=2560, inter=1536)
DECODES = ("gather", "runs")  # the two decode variants of ccq.kernels.gemm, both timed
DEVICE = "cuda"


def timer(fn, graph: bool = True) -> tuple[float, str]:
    """Median milliseconds of fn(), in a CUDA graph when it can be captured."""
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            return tt.do_bench_cudagraph(fn, rep=20, return_mode="median"), "cudagraph"
        except Exception:  # code with host syncs cannot be captured: time it eagerly
            torch.cuda.synchronize()
    return tt.do_bench(fn, warmup=10, rep=40, return_mode="median"), "eager"


def check(bits_list) -> list[dict]:
    """Triton vs torch reference on the GPU (GEMV, GEMM, MoE), so a bad compile cannot pass silently."""
    from ccq.kernels import gemm, moe, reference

    rows = []
    for bits in bits_list:
        for code in ("mul1", "1mad", "mcg", "3inst"):  # every inline-PTX decode path
            # in 520 (Hadamard block 16: CUDA-core GEMV at <= 4 rows, GEMM beyond) and 512 (tensor-core GEMV:
            # 8 MMA columns and two K steps per iteration at 1 and 7 rows, in one launch with its input transform
            # and the split-K sum kept with the weight, called again for each decode; 16 columns and one step
            # at 13, 32 columns in two row blocks at 37)
            for k_in in (520, 512):
                qt = random_quantized((200, k_in), bits, code, device=DEVICE)
                for batch, decode in product((1, 7, 13, 37), DECODES):
                    x = torch.randn(batch, k_in, device=DEVICE)
                    want = reference.qlinear(x, qt)
                    err = (gemm.qlinear(x, qt, decode=decode) - want).abs().max().item() / want.abs().max().item()
                    rows.append(dict(kind="qlinear", bits=bits, code=code, batch=batch, decode=decode, in_features=k_in,
                                     rel_err=err))
            # the prefill path (`gemm.decode_once`: W' decoded once, cuBLAS) at 1024 rows of a 1024 x 1024 weight
            qt = random_quantized((1024, 1024), bits, code, device=DEVICE)
            x = torch.randn(1024, 1024, device=DEVICE, dtype=torch.bfloat16)
            want = reference.qlinear(x.float(), qt)
            err = (gemm.qlinear(x, qt).float() - want).abs().max().item() / want.abs().max().item()
            rows.append(dict(kind="qlinear", bits=bits, code=code, batch=1024, decode="once", in_features=1024,
                             rel_err=err))
            # hidden 160 with intermediate 48 (Hadamard block 16: down's transform in its own launch) and 1024
            # (block 512: transformed by launch 1's last programs, down split over K with tickets), CUDA cores;
            # hidden 512 with intermediate 1024: the tensor-core decode step at 1 and 3 tokens, the sorted
            # tensor-core launches at 11 (33 pairs over 8 experts: blocks of 8) and 50 (150: blocks of 16), the
            # routed GEMM at 200 (600 pairs) and 500 (1500, bf16) in 64-row blocks
            for hid, inter in ((160, 48), (160, 1024), (512, 1024)):
                gu, dn = (random_quantized((8, 2 * inter, hid), bits, code, device=DEVICE),
                          random_quantized((8, hid, inter), bits, code, device=DEVICE))
                for tokens in (1, 3, 11, 50, 200, 500):
                    x = torch.randn(tokens, hid, device=DEVICE, dtype=torch.bfloat16 if tokens == 500 else None)
                    idx = torch.rand(tokens, 8, device=DEVICE).topk(3).indices
                    w = torch.rand(tokens, 3, device=DEVICE)
                    want = reference.qmoe(x.float(), idx, w, gu, dn)
                    for decode in DECODES:
                        got = moe.qmoe(x, idx, w, gu, dn, decode=decode)
                        err = (got.float() - want).abs().max().item() / want.abs().max().item()
                        rows.append(dict(kind="qmoe", bits=bits, code=code, batch=tokens, decode=decode, hidden=hid,
                                         inter=inter, rel_err=err))
    bad = [r for r in rows if not r["rel_err"] < 2e-2]
    if bad:
        raise SystemExit(f"Triton kernels disagree with the torch reference on this GPU: {bad}")
    return rows


def bench_dense(bits_list, batches) -> list[dict]:
    from ccq.kernels import gemm, gemv_tc
    from ccq.kernels.hadamard import transform

    rows = []
    for name, k_in, n_out in DENSE_SHAPES:
        w16 = torch.randn(n_out, k_in, device=DEVICE, dtype=torch.bfloat16)
        packed = {b: random_quantized((n_out, k_in), b, device=DEVICE) for b in bits_list}
        for batch in batches:
            x = torch.randn(batch, k_in, device=DEVICE, dtype=torch.bfloat16)
            t16, how16 = timer(lambda: x @ w16.T)
            base = dict(shape=name, in_features=k_in, out_features=n_out, batch=batch, bf16_ms=t16,
                        bf16_GBps=2 * n_out * k_in / t16 / 1e6, bf16_timer=how16)
            for bits, qt in packed.items():
                small = batch <= gemm.GEMV_MAX_ROWS
                xr = transform(x, qt.signs_in, qt.had_in, torch.float32 if small else torch.bfloat16)
                t_full, how = timer(lambda: gemm.qlinear(x, qt))
                kern = {d: timer(lambda: gemm.matmul(xr, qt, decode=d))[0] for d in DECODES}
                best = min(kern, key=kern.get)
                wbytes = qt.trellis.numel() * 2 + qt.scales.numel() * 2
                path = ("tensor-core GEMV, one launch" if gemv_tc.one_launch(x, qt) else "tensor-core GEMV") \
                    if gemv_tc.supported(x, qt) else "CUDA-core GEMV" if small else \
                    "decode once + cuBLAS" if gemm.decode_once(batch, qt) else "GEMM"
                rows.append(dict(base, bits=bits, ccq_ms=t_full, ccq_path=path, ccq_decode=gemm.DECODE, ccq_timer=how,
                                 **{f"ccq_kernel_ms_{d}": t for d, t in kern.items()}, best_decode=best,
                                 weight_bytes=wbytes, ccq_kernel_GBps=wbytes / kern[best] / 1e6,
                                 speedup=t16 / t_full, speedup_kernel=t16 / kern[best]))
        del w16, packed
        torch.cuda.empty_cache()
    return rows


def bench_moe(bits_list, token_counts) -> list[dict]:
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeMoeExperts

    from ccq.kernels import gemv_tc, moe

    E, K, H, inter = MOE["experts"], MOE["top_k"], MOE["hidden"], MOE["inter"]
    experts = {}
    for impl in ("grouped_mm", "eager"):
        cfg = SimpleNamespace(num_experts=E, hidden_size=H, moe_intermediate_size=inter, hidden_act="silu",
                              _experts_implementation=impl)
        experts[impl] = Ernie4_5_VLMoeMoeExperts(cfg)
    gate_up16 = torch.randn(E, 2 * inter, H, device=DEVICE, dtype=torch.bfloat16) * 0.02
    down16 = torch.randn(E, H, inter, device=DEVICE, dtype=torch.bfloat16) * 0.02
    for m in experts.values():
        m.gate_up_proj = torch.nn.Parameter(gate_up16, requires_grad=False)
        m.down_proj = torch.nn.Parameter(down16, requires_grad=False)
    packed = {b: (random_quantized((E, 2 * inter, H), b, device=DEVICE),
                  random_quantized((E, H, inter), b, device=DEVICE)) for b in bits_list}
    per_expert = 3 * inter * H
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, H, device=DEVICE, dtype=torch.bfloat16)
        idx = torch.rand(tokens, E, device=DEVICE).topk(K).indices
        wts = torch.softmax(torch.randn(tokens, K, device=DEVICE), -1)
        hit = int(torch.unique(idx).numel())
        with torch.no_grad():
            t_grp, how_grp = timer(lambda: experts["grouped_mm"](x, idx, wts))
            t_loop, how_loop = timer(lambda: experts["eager"](x, idx, wts), graph=False)
        base = dict(tokens=tokens, experts_hit=hit, bf16_grouped_ms=t_grp, bf16_grouped_timer=how_grp,
                    bf16_grouped_GBps=2 * hit * per_expert / t_grp / 1e6, transformers_loop_ms=t_loop,
                    transformers_loop_timer=how_loop)
        for bits, (gu, dn) in packed.items():
            times = {d: timer(lambda: moe.qmoe(x, idx, wts, gu, dn, decode=d)) for d in DECODES}
            best = min(times, key=lambda d: times[d][0])
            t, how = times[best]
            wbytes = hit * (gu.trellis[0].numel() + dn.trellis[0].numel()) * 2
            silu = torch.nn.functional.silu
            path = ("tensor-core decode step" if gemv_tc.moe_supported(x, gu, dn, silu)
                    else "tensor-core sorted pairs" if gemv_tc.moe_sorted_supported(x, idx, gu, dn, silu)
                    else "CUDA-core decode step" if tokens <= 4 else "routed GEMM")
            rows.append(dict(base, bits=bits, **{f"ccq_ms_{d}": times[d][0] for d in DECODES}, best_decode=best,
                             ccq_path=path, ccq_ms=t, ccq_timer=how, ccq_GBps=wbytes / t / 1e6,
                             speedup_vs_grouped=t_grp / t, speedup_vs_loop=t_loop / t))
    return rows


def print_tables(dense, moe_rows):
    print(f"\n{'shape':<20}{'in':>6}{'out':>6}{'batch':>6}{'bits':>5}{'bf16 ms':>10}{'ccq ms':>10}"
          f"{'gather ms':>10}{'runs ms':>10}{'x bf16':>8}{'x kern':>8}{'GB/s':>8}")
    for r in dense:
        print(f"{r['shape']:<20}{r['in_features']:>6}{r['out_features']:>6}{r['batch']:>6}{r['bits']:>5}"
              f"{r['bf16_ms']:>10.4f}{r['ccq_ms']:>10.4f}{r['ccq_kernel_ms_gather']:>10.4f}"
              f"{r['ccq_kernel_ms_runs']:>10.4f}{r['speedup']:>8.2f}{r['speedup_kernel']:>8.2f}"
              f"{r['ccq_kernel_GBps']:>8.0f}")
    print(f"\n{'MoE tokens':<12}{'bits':>5}{'grouped ms':>12}{'loop ms':>10}{'gather ms':>10}{'runs ms':>10}"
          f"{'x grouped':>10}{'x loop':>8}{'GB/s':>8}")
    for r in moe_rows:
        print(f"{r['tokens']:<12}{r['bits']:>5}{r['bf16_grouped_ms']:>12.4f}{r['transformers_loop_ms']:>10.4f}"
              f"{r['ccq_ms_gather']:>10.4f}{r['ccq_ms_runs']:>10.4f}{r['speedup_vs_grouped']:>10.2f}"
              f"{r['speedup_vs_loop']:>8.2f}{r['ccq_GBps']:>8.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 1024])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 1024, 4096])
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/kernels-<device>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured",
              file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}")
    checks = check(args.bits)
    print(f"Triton vs torch reference: max relative error {max(r['rel_err'] for r in checks):.2e}")
    dense = bench_dense(args.bits, args.batches)
    moe_rows = bench_moe(args.bits, args.tokens)
    print_tables(dense, moe_rows)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = args.out or ROOT / "bench" / "results" / f"kernels-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(device=device, capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
                  triton=triton.__version__, cuda=torch.version.cuda, timing="median ms (triton.testing)",
                  moe_config=MOE, check=checks, dense=dense, moe=moe_rows)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
