"""Trellis search throughput: measured on this machine's CPU (numba) and GPU (Triton, when CUDA is
present), and predicted for an H200 from the Triton kernel compiled for sm_90 here.

    python bench/search.py [--tiles 64] [--out bench/results]

The prediction (model in docs/CODEC.md): compile `_forward` for sm_90, take the SASS of its
time-step loop, count instructions per thread and step, and turn them into SM clocks per step:
issue (4 warp-instructions/clock/SM), the integer pipe (half rate), shared memory (128 B/clock)
and a stall per barrier when one CTA fills the SM. A weight costs two steps (two tail-biting
passes); HBM traffic is the packed back-pointer rows. Prints a table and writes
bench/results/codec-search-<device>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
from pathlib import Path

import numba
import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import ccq
from ccq.codec.codes import get_code
from ccq.codec.viterbi_triton import _forward, num_warps_for
from ccq.kernels import sass
from codec import search_speed  # bench/codec.py: the same timing loop

H200 = {"sms": 132, "clock_hz": 1.98e9, "issue_per_sm_clock": 4, "int_per_sm_clock": 2, "smem_bytes_per_clock": 128,
        "hbm_bytes_per_s": 4.3e12, "regs_per_sm": 65536, "smem_per_sm": 228 * 1024, "max_warps_per_sm": 64}
BARRIER_STALL_CLOCKS = 30  # a BAR.SYNC drains the SM's pipes when its only CTA waits
INT_OPS = ("IADD3", "IMAD", "IDP", "ISETP", "IABS", "LOP3", "SHF", "SEL", "PRMT", "LEA", "VIADD", "MOV", "P2R",
           "VIMNMX", "VIMNMX3", "IADD")
SMEM_OPS = ("LDS", "STS", "LDSM")


def compile_sm90(k: int, L: int, code: str = "mul1") -> tuple[list[sass.Instr], dict]:
    """Instructions and metadata of the forward kernel compiled for sm_90 (free pass, GPU layout)."""
    c = get_code(code)
    sig = {"x_ptr": "*fp32", "w_ptr": "*fp32", "ov_ptr": "*i32", "bp_ptr": "*u8", "last_ptr": "*fp32", "T": "i32",
           "SHIFT": "i32"}
    cx = {"L": L, "KB": k, "CONSTRAINED": False, "MUL": c.mul, "ADD": c.add, "BYTESUM": c.kind == "bytesum",
          "NORM": float(np.float32(c.norm)), "ASM": True, "VEC_N": False}
    sig.update({name: "constexpr" for name in cx})
    nw = num_warps_for(k, L)
    kern = triton.compile(ASTSource(fn=_forward, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": nw, "enable_fp_fusion": False})
    res = sass.resources(kern.asm["cubin"])
    return sass.disassemble(kern.asm["cubin"]), {"num_warps": nw, "registers": res["registers"],
                                                 "spill_stack_bytes": res["stack"],
                                                 "shared_bytes": kern.metadata.shared}


def loop_ops(instrs: list[sass.Instr]) -> collections.Counter:
    """Opcode counts of the time-step loop (the largest loop), plus its shared-memory bytes."""
    ops = collections.Counter()
    for ins in sass.hot_loop(instrs):
        ops[ins.op] += 1
        if ins.op in SMEM_OPS:
            mods = re.search(rf"{ins.op}((?:\.[A-Z0-9_]+)*)", ins.text).group(1)
            width = re.search(r"\.(64|128)\b", mods)
            ops["smem_bytes"] += int(width.group(1)) // 8 if width else 4
    return ops


def predict(k: int, L: int, ops: collections.Counter, meta: dict, hw: dict = H200) -> dict:
    """Weights/s on `hw` from the per-thread instruction counts of one step."""
    threads = meta["num_warps"] * 32
    instr = sum(v for o, v in ops.items() if o != "smem_bytes")
    n_int = sum(ops[o] for o in INT_OPS)
    warps = meta["num_warps"]
    ctas = min(hw["max_warps_per_sm"] // warps, hw["regs_per_sm"] // (max(meta["registers"], 1) * threads),
               hw["smem_per_sm"] // max(meta["shared_bytes"], 1))
    issue = instr * warps / hw["issue_per_sm_clock"]
    integer = n_int * warps / hw["int_per_sm_clock"]
    smem = ops["smem_bytes"] * threads / hw["smem_bytes_per_clock"]
    bars = ops["BAR"] * BARRIER_STALL_CLOCKS if ctas == 1 else 0
    clocks = max(issue, integer, smem) + bars  # SM clocks per step of one tile
    bp_bytes = (1 << (L - 2 * k)) * {2: 1, 3: 4, 4: 8}[k]  # one packed word of K back-pointers per a
    compute = hw["sms"] * hw["clock_hz"] / (2 * clocks)  # two passes: two steps per weight
    memory = hw["hbm_bytes_per_s"] / (2 * bp_bytes)
    return {"bits": k, "L": L, **meta, "ctas_per_sm": ctas, "loop_instr_per_thread": instr,
            "int_instr_per_thread": n_int, "states_per_thread": (1 << L) / threads,
            "instr_per_state": instr * threads / (1 << L), "barriers_per_step": ops["BAR"],
            "smem_bytes_per_step": ops["smem_bytes"] * threads, "hbm_bytes_per_step": bp_bytes,
            "clocks_per_step": {"issue": issue, "int": integer, "smem": smem, "barriers": bars},
            "weights_per_s_compute": compute, "weights_per_s_memory": memory,
            "weights_per_s": min(compute, memory), "opcodes": dict(ops.most_common())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=64, help="tiles per CPU measurement (GPU: 64x more)")
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{cpus}core"
    res = {"device": dev, "cpus": cpus, "load_avg": os.getloadavg(), "numba_threads": numba.config.NUMBA_NUM_THREADS,
           "torch": torch.__version__, "triton": triton.__version__, "numba": numba.__version__,
           "ccq": ccq.__version__, "python": platform.python_version(), "h200_model": H200,
           "barrier_stall_clocks": BARRIER_STALL_CLOCKS, "measured": [], "predicted_h200": []}
    print(f"device: {dev}, {cpus} CPUs, load average {res['load_avg'][0]:.2f}")
    print("| bits | SASS instr/state | int | regs | warps | CTAs/SM | clocks/step (issue, int, smem, bar) | "
          "predicted H200 weights/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for bits in (2, 3, 4):
        instrs, meta = compile_sm90(bits, args.L)
        p = predict(bits, args.L, loop_ops(instrs), meta)
        res["predicted_h200"].append(p)
        c = p["clocks_per_step"]
        print(f"| {bits} | {p['instr_per_state']:.2f} | {p['int_instr_per_thread'] / p['states_per_thread']:.2f} | "
              f"{p['registers']} (+{p['spill_stack_bytes']} B stack) | {p['num_warps']} | {p['ctas_per_sm']} | "
              f"{c['issue']:.0f}, {c['int']:.0f}, {c['smem']:.0f}, {c['barriers']:.0f} | "
              f"{p['weights_per_s'] / 1e6:.1f}M |", flush=True)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for bits in (2, 3, 4):
            m = search_speed(bits, args.L, args.tiles * (64 if device == "cuda" else 1), device)
            res["measured"].append(m)
            print(f"search {device} L={args.L} {bits}-bit: {m['weights_per_s']:,.0f} weights/s "
                  f"(median of 3, {m['tiles']} tiles)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"codec-search-{dev.replace(' ', '_')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
