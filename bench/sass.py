"""Every kernel configuration the dispatcher launches for the ERNIE shapes, compiled for sm_90 without a GPU.

    python bench/sass.py [--arch 90] [--bits 2 3 4] [--codes mul1 1mad mcg 3inst] [--json] [--dump DIR]

The real dispatcher (`qlinear`, `qmoe`, `dequantize`) runs on meta-device tensors inside
`ccq.kernels.launch.record()`, so the launches compiled here are exactly those it would make
(grids sized for an H200's 132 SMs). Each distinct configuration is compiled with Triton's own
tools, and its cubin read with the nvdisasm/cuobjdump of the Triton wheel: registers, local
memory (spills), and the SASS instructions of the hot loop per weight one thread handles,
split by pipe (integer ALU / FP-FMA / memory / other). From these a throughput model
(docs/KERNELS.md, "Model") predicts the H200 time of each ERNIE shape and its ratio to bf16.
`--json` writes bench/results/sass-sm<arch>.json; `--dump DIR` writes the cubins and
DIR/manifest.json so anyone can recount with their own tools.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeMoeExperts  # noqa: E402

from ccq.codec.tensor import random_quantized  # noqa: E402
from ccq.kernels import launch, sass  # noqa: E402

# H200 (SXM): the model's constants, see docs/KERNELS.md
SMS, CLOCK = 132, 1.98e9
ISSUE = SMS * 4 * 32 * CLOCK  # thread-instructions/s: 4 warp-instructions per SM per clock
HBM = 4.3e12  # bytes/s, measured copy bandwidth
LAUNCH_S = 2e-6  # one dependent kernel in a CUDA graph: launch + drain
TENSOR = 4  # one warp-level m16n8k16 MMA per SM per clock (the dense fp16 peak): 4 issue slots' worth
BF16_FLOPS = 989e12  # dense bf16 tensor-core peak (cuBLAS GEMMs, ccq's and the baseline's, at many rows)
CODES = ("mul1", "1mad", "mcg", "3inst")
# (name, in, out) of the dense shapes: ERNIE-4.5-VL 28B experts (gate/up fused) and attention, 424B experts
DENSE = [("28B gate_up", 2560, 2 * 1536), ("28B down", 1536, 2560), ("28B vision gate_up", 2560, 2 * 512),
         ("28B vision down", 512, 2560), ("28B attention", 2560, 2560), ("424B gate_up", 8192, 2 * 3584),
         ("424B down", 3584, 8192)]
# (name, experts, top_k, hidden, intermediate): routed-expert layers
MOE = [("28B", 64, 6, 2560, 1536), ("424B", 64, 8, 8192, 3584)]
# rows of the dense shapes: decode (1), small batches (16-64, the tensor-core GEMV) and prefill (256+: from
# `gemm.decode_once` on, one decode and cuBLAS; kind "fused" is the same call kept on the fused GEMM)
DENSE_ROWS = (1, 16, 32, 64, 256, 1024, 4096)


def path_of(rec) -> str:
    c = rec.constexprs()
    if rec.name in ("_gemv_kernel", "_gemv_tc_kernel", "_gemm_kernel") and c.get("ROUTED"):
        return "moe_gate_up" if c.get("GATHER_A") else "moe_down"
    return {"_gemv_kernel": "gemv", "_gemv_tc_kernel": "gemv", "_gemm_kernel": "gemm", "_dequant_kernel": "decode",
            "_hadamard_kernel": "hadamard", "_align_kernel": "align"}[rec.name]


def per_iter_weights(rec, num_warps: int) -> float:
    """Weights (Hadamard: elements; align: (token, slot) pairs) one thread handles per iteration of the hot loop."""
    c = rec.constexprs()
    threads = num_warps * 32
    if rec.name == "_hadamard_kernel":
        return c["BR"] * c["B"] / threads
    if rec.name == "_align_kernel":
        return c["CH"] / threads
    if rec.name == "_gemv_tc_kernel":  # 16*MT rows per warp x U K steps of 128 (SwiGLU: gate and up)
        return 16 * c["MT"] * 128 * c["U"] / 32 * (2 if c["SWIGLU"] else 1)
    bk = c["BK"] if "BK" in c else 16 * c["J"]
    return c["BN"] * bk * (2 if c.get("SWIGLU") else 1) / threads


def config_key(rec) -> tuple:
    return (rec.name, tuple(sorted((k, str(v)) for k, v in rec.constexprs().items())))


def work(rec, path: str, bits: int, used_blocks: int | None) -> tuple[float, float]:
    """(units, bytes) one launch processes: weights decoded (Hadamard: elements) and HBM bytes moved."""
    a = dict(zip(rec.kernel.arg_names, rec.args)) | rec.kwargs
    if path == "hadamard":  # PAIRS: every output value written twice
        pairs = 2 if rec.kwargs.get("PAIRS") else 1
        n = a["n_rows"] * a["y_stride"] // pairs
        return n, n * (a["x_ptr"].element_size() + pairs * a["y_ptr"].element_size())
    if path == "align":  # pairs, in whole chunks; reads the routing twice, writes ids and block experts
        n, ch = a["N"], rec.kwargs["CH"]
        return -(-n // ch) * ch, 2 * n * a["idx_ptr"].element_size() + a["N_BLOCKS"] * (rec.kwargs["BM"] + 1) * 4
    if path == "decode":
        n = a["N"] * a["K"] * rec.grid[2]
        return n, n * (bits / 8 + a["out_ptr"].element_size())
    if rec.name in ("_gemv_kernel", "_gemv_tc_kernel"):
        n = a["N"] * a["KT"] * 16 * (2 if a.get("SWIGLU") else 1)
        if a.get("ROUTED"):  # one program row per slot; a skipped slot exits at once
            n *= used_blocks
            return n, n * bits / 8
        return n * rec.grid[0], n * bits / 8  # dense: each block of rows decodes the weight, HBM reads it once
    n = a["N"] * a["K"] * (2 if a["SWIGLU"] else 1)
    if used_blocks is None:  # dense: every block row decodes the whole weight, HBM reads it once (L2)
        return n * rec.grid[0], n * bits / 8
    return n * used_blocks, n * used_blocks * bits / 8  # MoE: a block per used expert


def prologue_iterations(rec) -> int:
    """Iterations of the one-launch GEMV's prologue loop over all its programs (one per row and Hadamard block
    its K slice touches, `gemv_tc.prologue_elements`); 0 for any other launch."""
    from ccq.kernels.gemv_tc import prologue_elements

    c = rec.constexprs()
    if rec.name != "_gemv_tc_kernel" or c.get("ROUTED") or not c.get("HAD"):
        return 0
    a = dict(zip(rec.kernel.arg_names, rec.args))
    return prologue_elements(a["M"], math.prod(rec.grid[:2]), a["KT"], a["T_PER_SPLIT"], c["HAD"]) // c["HAD"]


def torch_seconds(fn) -> float:
    """Time of the torch kernels fn runs (the dense prefill path): a matmul (cuBLAS) at the bf16 tensor peak or
    streaming its operands, whichever is longer; any other kernel streaming its operands (memory-bound). Views
    and allocations move nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    mms = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    class Kernels(TorchDispatchMode):
        t = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in mms:
                a, b = args[-2:]
                (m, k), n = a.shape, b.shape[1]
                Kernels.t += max(2 * m * n * k / BF16_FLOPS, (m * k + k * n + m * n) * a.element_size() / HBM)
            elif not func.is_view and "empty" not in str(func):
                tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
                Kernels.t += sum(t.numel() * t.element_size() for t in tensors) / HBM
            return out

    with Kernels():
        fn()
    return Kernels.t


def bf16_kernels(kind: str, x, *args) -> int:
    """Kernels the bf16 baseline launches for one call, counted like ccq's torch kernels (meta tensors, views
    excluded): dense `x @ W.T` (cuBLAS); MoE: transformers' ERNIE-4.5-VL experts with their `grouped_mm`
    implementation (sort, gathers, offsets, two grouped GEMMs, SwiGLU, weighting, un-permuting, the sum), what
    bench/kernel_speed.py times on a GPU. A lower bound: a torch op may launch more than one kernel there."""
    if kind == "dense":
        w = torch.empty(*args, dtype=torch.bfloat16, device="meta")
        return launch.torch_kernels(lambda: torch.nn.functional.linear(x, w))
    from types import SimpleNamespace

    E, H, inter, idx, w = args
    cfg = SimpleNamespace(num_experts=E, hidden_size=H, moe_intermediate_size=inter, hidden_act="silu",
                          _experts_implementation="grouped_mm")
    with torch.device("meta"):
        experts = Ernie4_5_VLMoeMoeExperts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        return launch.torch_kernels(lambda: experts(x, idx, w))


def record_shapes(bits: int, code: str):
    """[(shape name, kind, rows, bf16 weights, [(launch, used blocks)], torch kernels, bf16 kernels)] for one
    bits/code."""
    from ccq.kernels import decode, gemm, moe

    out = []

    def run(fn):
        with launch.record(SMS):  # a first call allocates what the launches keep between calls (split-K sums)
            fn()
        with launch.record(SMS) as recs:
            n_torch = launch.torch_kernels(fn)
        with launch.record(SMS):
            torch_s = torch_seconds(fn)
        return list(recs), n_torch, torch_s

    for name, k_in, n_out in DENSE:
        qt = random_quantized((n_out, k_in), bits, code, device="meta")
        for rows in DENSE_ROWS:
            x = torch.empty(rows, k_in, dtype=torch.bfloat16, device="meta")
            for kind in ("dense", "fused") if gemm.decode_once(rows, qt) else ("dense",):
                # "fused": the same call kept on the fused GEMM (a named decode does that)
                recs, n_torch, torch_s = run(lambda: gemm.qlinear(x, qt, decode=gemm.DECODE if kind == "fused"
                                                                 else None))
                out.append((name, kind, rows, n_out * k_in, [(r, None) for r in recs], n_torch,
                            bf16_kernels("dense", x, n_out, k_in), rows * n_out * k_in, torch_s))
        if name == "28B gate_up":
            recs, n_torch, _ = run(lambda: decode.dequantize(qt))
            out.append((name, "dequantize", 0, n_out * k_in, [(r, None) for r in recs], n_torch, 1, 0, 0.0))
    for name, E, K, H, inter in MOE:
        gu = random_quantized((E, 2 * inter, H), bits, code, device="meta")
        dn = random_quantized((E, H, inter), bits, code, device="meta")
        for tokens in (1, 64, 256, 1024, 4096):
            x = torch.empty(tokens, H, dtype=torch.bfloat16, device="meta")
            idx = torch.empty(tokens, K, dtype=torch.long, device="meta")
            w = torch.empty(tokens, K, dtype=torch.bfloat16, device="meta")
            recs, n_torch, torch_s = run(lambda: moe.qmoe(x, idx, w, gu, dn))
            used = min(E, tokens * K)

            def blocks(rec):  # that decode an expert, uniform routing: each used expert's pairs padded to BM
                c = rec.constexprs()
                bm = c["NT"] if c.get("SORTED") else c["BM"] if rec.name == "_gemm_kernel" else 1
                return E * -(-tokens * K // (E * bm)) if tokens * K > E else used

            routed = ("_gemm_kernel", "_gemv_kernel", "_gemv_tc_kernel")  # the others run their whole grid
            out.append((f"{name} MoE layer", "moe", tokens, used * 3 * inter * H,
                        [(r, blocks(r) if r.name in routed else None) for r in recs], n_torch,
                        bf16_kernels("moe", x, E, H, inter, idx, w), tokens * K * 3 * inter * H, torch_s))
    return out


def predict(parts: list[tuple[dict, float, float, int]], bf16_weights: float, launches: int,
            bf16_launches: int, bf16_macs: float = 0, torch_s: float = 0.0) -> dict:
    """parts: (per-unit counts, units, bytes, programs) of each Triton launch; launches: all kernels incl.
    torch's; bf16_launches: the baseline's, whose time is its weights' bytes or its bf16_macs at the tensor
    peak, whichever is longer; torch_s: ccq's own torch kernels' time (`torch_seconds`). A launch with fewer
    programs than SMs issues on that many SMs only."""
    t_issue = t_mem = 0.0
    t = torch_s
    for n, units, nbytes, programs in parts:
        eff = max(n["total"], 2 * n["alu"], 2 * n["fma_heavy"], TENSOR * n["mma"])
        ti, tm = units * eff / ISSUE * SMS / min(SMS, programs), nbytes / HBM
        t_issue, t_mem, t = t_issue + ti, t_mem + tm, t + max(ti, tm)
    t += launches * LAUNCH_S
    t16 = max(bf16_weights * 2 / HBM, 2 * bf16_macs / BF16_FLOPS) + bf16_launches * LAUNCH_S
    kernels, kernels16 = t - launches * LAUNCH_S, t16 - bf16_launches * LAUNCH_S
    return dict(issue_us=t_issue * 1e6, memory_us=t_mem * 1e6, torch_us=torch_s * 1e6, predicted_us=t * 1e6,
                bf16_us=t16 * 1e6,
                ratio_vs_bf16=t16 / t, kernels_ratio_vs_bf16=kernels16 / kernels)


def print_tables(configs: list[dict], shapes: list[dict]) -> None:
    """The per-configuration table and the per-shape prediction table (also for a saved JSON's lists)."""
    hdr = f"{'path':<12}{'bits':>4} {'code':<6}{'config':<52}{'regs':>5}{'spill':>9}{'instr/w':>8}" \
          f"{'alu':>6}{'fma':>6}{'mem':>6}{'other':>6}{'ceil':>6}"
    print(hdr)
    for c in configs:
        st = c["stats"]
        p = st["per_weight"]
        cfg = {k: v for k, v in c["config"].items() if k in ("BM", "BN", "BK", "J", "B", "BR", "RUNS", "SWIGLU", "MT", "HB")}
        eff = max(p["total"], 2 * p["alu"], 2 * p["fma_heavy"], TENSOR * p["mma"])
        # spilled registers live in the stack frame: bytes of stack + local, and LDL/STL in the kernel
        frame = st["stack"] + st["local"]
        spill = f"{frame}B/{st['local_ops']}" if frame + st["local_ops"] else "0"
        ceil = "" if c["path"] in ("hadamard", "align") else f"{(2 / HBM) / (eff / ISSUE):.2f}x"
        print(f"{c['path']:<12}{c['bits']:>4} {c['code']:<6}{str(cfg):<52}{st['registers']:>5}{spill:>9}"
              f"{p['total']:>8.2f}{p['alu']:>6.2f}{p['fma']:>6.2f}{p['mem']:>6.2f}{p['other']:>6.2f}{ceil:>6}")
    print()
    print(f"{'shape':<20}{'rows':>5}{'bits':>5} {'code':<6}{'launches':>9}{'warps/SM':>9}{'issue us':>9}{'mem us':>8}"
          f"{'pred us':>9}{'bf16 l.':>8}{'bf16 us':>9}{'ratio':>7}{'kernels':>8}")
    for s in shapes:
        name = s["shape"] + (" fused" if s["kind"] == "fused" else "")
        print(f"{name:<20}{s['rows']:>5}{s['bits']:>5} {s['code']:<6}"
              f"{str(s['triton_launches']) + '+' + str(s['torch_launches']):>9}{s.get('warps_per_sm', 0):>9.1f}"
              f"{s['issue_us']:>9.2f}{s['memory_us']:>8.2f}"
              f"{s['predicted_us']:>9.2f}{s.get('bf16_launches', 1):>8}{s['bf16_us']:>9.2f}{s['ratio_vs_bf16']:>6.2f}x"
              f"{s.get('kernels_ratio_vs_bf16', 0):>7.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--codes", nargs="+", default=list(CODES), choices=CODES)
    ap.add_argument("--json", action="store_true", help="write bench/results/sass-sm<arch>.json")
    ap.add_argument("--dump", type=Path, help="write cubins and manifest.json here")
    args = ap.parse_args(argv)

    configs: dict[tuple, dict] = {}
    shapes = []
    for bits in args.bits:
        for code in args.codes:
            for name, kind, rows, w16, recs, n_torch, n16, macs16, torch_s in record_shapes(bits, code):
                keys, parts = [], []
                for rec, used in recs:
                    key = config_key(rec)
                    keys.append(key)
                    if key in configs:
                        continue
                    kern = sass.compile_launch(rec, args.arch)
                    st = sass.analyse(kern.asm["cubin"])
                    wpt = per_iter_weights(rec, kern.metadata.num_warps)
                    # align: the count and block passes outside its sort loop run once per launch at these
                    # sizes, so charge the whole kernel (at the loop's pipe mix) per chunk
                    wpt *= st["loop"] / st["total"] if rec.name == "_align_kernel" else 1
                    st["per_weight"] = {c: st[c] / wpt for c in (*sass.CLASSES, "fma_heavy", "mma")}
                    st["per_weight"]["total"] = st["loop"] / wpt
                    configs[key] = dict(path=path_of(rec), bits=bits, code=code, kernel=rec.name,
                                        config={k: v if isinstance(v, (int, float, bool, str)) else repr(v)
                                                for k, v in rec.constexprs().items()},
                                        num_warps=kern.metadata.num_warps, weights_per_thread_per_iter=wpt,
                                        stats=st, cubin=kern.asm["cubin"])
                    print(f"compiled {len(configs)}: {rec.name} {bits}b {code} {configs[key]['config']}",
                          file=sys.stderr)
                warps = 0.0
                for rec, used in recs:
                    key = config_key(rec)
                    progs = (used or rec.grid[0]) * math.prod(rec.grid[1:])
                    parts.append((configs[key]["stats"]["per_weight"], *work(rec, configs[key]["path"], bits, used),
                                  progs))
                    pro = prologue_iterations(rec)
                    if pro:  # the prologue's issue time, not overlapped with the loop's (its x reads hit L2)
                        parts.append((configs[key]["stats"]["prologue"], pro * configs[key]["num_warps"] * 32, 0,
                                      progs))
                    if configs[key]["path"] != "hadamard":  # warps in flight of the busiest weight launch
                        warps = max(warps, progs * configs[key]["num_warps"] / SMS)
                pred = predict(parts, w16, len(recs) + n_torch, n16, macs16, torch_s)
                shapes.append(dict(shape=name, kind=kind, rows=rows, bits=bits, code=code, triton_launches=len(recs),
                                   torch_launches=n_torch, bf16_launches=n16, warps_per_sm=round(warps, 1),
                                   paths=[configs[k]["path"] for k in keys], **pred))

    public = [{k: v for k, v in c.items() if k != "cubin"} for c in configs.values()]
    print_tables(public, shapes)
    if args.json:
        import triton

        res = ROOT / "bench" / "results" / f"sass-sm{args.arch}.json"
        res.parent.mkdir(parents=True, exist_ok=True)
        res.write_text(json.dumps(dict(arch=args.arch, triton=triton.__version__, torch=torch.__version__,
                                       model=dict(sms=SMS, clock_hz=CLOCK, thread_instr_per_s=ISSUE, hbm_Bps=HBM,
                                                  launch_s=LAUNCH_S),
                                       configs=public, shapes=shapes), indent=1, default=str))
        print(f"wrote {res}", file=sys.stderr)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        manifest = []
        for i, c in enumerate(configs.values()):
            fname = f"{i:03d}_{c['path']}_{c['bits']}b_{c['code']}.cubin"
            (args.dump / fname).write_bytes(c["cubin"])
            manifest.append(dict(path=c["path"], bits=c["bits"], config={k: str(v) if not isinstance(v, (int, float))
                                                                         else v for k, v in c["config"].items()},
                                 cubin=fname, weights_per_thread_per_iter=c["weights_per_thread_per_iter"]))
        (args.dump / "manifest.json").write_text(json.dumps(manifest, indent=1))
        print(f"wrote {len(manifest)} cubins to {args.dump}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
