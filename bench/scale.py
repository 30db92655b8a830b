"""GPU proof that the real-shape ERNIE-4.5-VL models fit and run (synthetic random codes).

    python bench/scale.py            # needs CUDA; about 5-8 minutes on one H200

1. 28B at 2 bits: `ccq synth` writes the packed checkpoint, `ccq.load` puts it on the GPU,
   generate 128 tokens after a 4096-token prompt (batch 1), then 32 after 512 (batch 8);
   peak GPU memory counts from before the load (target: within 8 GiB at batch 1).
2. 28B at 4 bits and the bf16 model of the same shape, built in GPU memory, same runs.
3. 424B at 2 bits built in GPU memory, a 32K-token static KV cache allocated, a forward
   pass of 1024 tokens into it; peak memory (target: one 141 GB GPU).

Writes bench/results/scale-<device>.json with the device name, library versions, the
`ccq plan` numbers next to what was measured, and the kernel backend that ran.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

M28, M424 = "ernie-4.5-vl-28b-a3b", "ernie-4.5-vl-424b-a47b"
GiB = 2**30


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"allocated_bytes": torch.cuda.memory_allocated(), "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def prompt(model, batch: int, length: int, device) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(batch * 100_003 + length)
    return torch.randint(0, min(vocab, 100_000), (batch, length), generator=g).to(device)


@torch.no_grad()
def generate(model, batch: int, prompt_len: int, new_tokens: int, device) -> dict:
    """Prefill time (1 new token) and decode tokens/s (the other new tokens), greedy."""
    ids = prompt(model, batch, prompt_len, device)
    kw = dict(do_sample=False, pad_token_id=0)
    sync()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync()
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync()
    total = time.perf_counter() - t0
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
    decode = max(total - prefill, 1e-9)
    return {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "prefill_seconds": round(prefill, 3),
            "generate_seconds": round(total, 3),
            "decode_tokens_per_second": round(batch * (new_tokens - 1) / decode, 3), **memory()}


def run_28b(kind: str, device, args, workdir: Path) -> dict:
    """Build (or synth + load) one 28B variant and run batch 1 and batch 8 generation."""
    import ccq
    from ccq.plan.synth import synth_checkpoint, synth_model

    reset_peak()
    entry = {"model": M28, "variant": kind}
    t0 = time.perf_counter()
    if kind == "ccq-2bit":  # the disk path: synth -> packed folder -> ccq.load
        folder = workdir / "ernie-28b-2bit"
        t = time.perf_counter()
        info = synth_checkpoint(M28, 2, folder, overwrite=True, progress=False, device=device)
        entry["synth_seconds"] = round(time.perf_counter() - t, 1)
        entry["checkpoint_tensor_bytes"] = info["tensor_bytes"]
        entry["checkpoint_file_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        reset_peak()
        t0 = time.perf_counter()
        model = ccq.load(folder, device=device)
    else:
        model = synth_model(M28, 4 if kind == "ccq-4bit" else None, device=device)
    sync()
    entry["build_seconds"] = round(time.perf_counter() - t0, 1)
    entry["after_load"] = memory()
    entry["batch1"] = generate(model, 1, args.prompt, args.new_tokens, device)  # peak includes the load
    reset_peak()
    entry["batch8"] = generate(model, 8, args.prompt8, args.new_tokens8, device)
    del model
    reset_peak()
    return entry


@torch.no_grad()
def run_424b(device, args) -> dict:
    from transformers import StaticCache

    from ccq.plan.synth import synth_model

    reset_peak()
    t0 = time.perf_counter()
    model = synth_model(M424, 2, device=device)
    sync()
    entry = {"model": M424, "variant": "ccq-2bit", "build_seconds": round(time.perf_counter() - t0, 1),
             "after_build": memory()}
    reset_peak()
    cache = StaticCache(config=model.config, max_cache_len=args.kv_context)
    ids = prompt(model, 1, args.forward_tokens, device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    sync()
    entry["forward"] = {"tokens": args.forward_tokens, "static_kv_cache_tokens": args.kv_context,
                        "seconds": round(time.perf_counter() - t0, 3),
                        "logits_finite": bool(torch.isfinite(out.logits[0, -1]).all()), **memory()}
    del model, cache, out
    reset_peak()
    return entry


def guarded(model: str, variant: str, fn, *args) -> dict:
    """Run one measurement; a failure (e.g. out of memory) is recorded, the others still run."""
    try:
        entry = fn(*args)
    except Exception as e:  # recorded in the results file, never hidden
        entry = {"model": model, "variant": variant, "error": f"{type(e).__name__}: {str(e)[:400]}", **memory()}
        reset_peak()
    print(json.dumps(entry), flush=True)
    return entry


def plan_numbers() -> dict:
    from ccq.plan.footprint import plan_footprint
    from ccq.plan.gpus import parse_gpus

    keep = ("total_bytes", "kv_cache_bytes", "devices", "fits")
    runs = {"28b-2bit-1x8GiB-4224ctx": (M28, 2, "1x8GiB", 4224), "28b-4bit": (M28, 4, None, 4224),
            "424b-2bit-1x141GB-32k": (M424, 2, "1x141GB", 32768), "424b-4bit-4x80GB-32k": (M424, 4, "4x80GB", 32768)}
    out = {}
    for key, (spec, bits, gpus, ctx) in runs.items():
        p = plan_footprint(spec, bits, gpus=parse_gpus(gpus) if gpus else None, context=ctx)
        out[key] = {k: p[k] for k in keep if k in p}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("28b", "424b"), default=None, help="Run one model only.")
    ap.add_argument("--prompt", type=int, default=4096, help="Batch-1 prompt tokens.")
    ap.add_argument("--new-tokens", type=int, default=128, help="Batch-1 generated tokens.")
    ap.add_argument("--prompt8", type=int, default=512, help="Batch-8 prompt tokens.")
    ap.add_argument("--new-tokens8", type=int, default=32, help="Batch-8 generated tokens.")
    ap.add_argument("--kv-context", type=int, default=32768, help="424B static KV cache length.")
    ap.add_argument("--forward-tokens", type=int, default=1024, help="424B forward-pass tokens.")
    ap.add_argument("--workdir", type=Path, default=None, help="Where the 28B 2-bit checkpoint is written (temp).")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/scale.py needs a CUDA GPU: none is visible here, nothing was measured", file=sys.stderr)
        return 2
    import accelerate
    import transformers

    import ccq
    from ccq import kernels

    device = torch.device("cuda:0")
    name = torch.cuda.get_device_name(device)
    t_start = time.perf_counter()
    result = {"device": name, "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory,
              "versions": {"ccq": ccq.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                           "python": platform.python_version()},
              "kernels_backend": kernels.backend(device), "plan": plan_numbers(), "runs": []}
    print(json.dumps(result["plan"], indent=1), flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.only in (None, "28b"):
            for kind in ("ccq-2bit", "ccq-4bit", "bf16"):
                result["runs"].append(guarded(M28, kind, run_28b, kind, device, args, Path(tmp)))
    if args.only in (None, "424b"):
        result["runs"].append(guarded(M424, "ccq-2bit", run_424b, device, args))
    two = next((r for r in result["runs"] if r["variant"] == "ccq-2bit" and r["model"] == M28 and "error" not in r), None)
    if two:
        result["target_28b_2bit_within_8GiB"] = two["batch1"]["peak_allocated_bytes"] <= 8 * GiB
    big = next((r for r in result["runs"] if r["model"] == M424 and "error" not in r), None)
    if big:
        result["target_424b_2bit_32k_within_141GB"] = big["forward"]["peak_allocated_bytes"] <= 141e9
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = args.out / f"scale-{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if any("error" in r for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
