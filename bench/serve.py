"""Decode throughput of vLLM serving a ccq checkpoint against the bf16 model of the same shape (GPU).

The model is the ERNIE-4.5-VL config's language model as an ERNIE-4.5 text MoE
(`Ernie4_5_MoeForCausalLM`: same layers, experts and routing; the bench predates the plugin's
ERNIE-4.5-VL mapping, which serves the VL model's language model with --language-model-only)
with random weights:
`ccq synth` writes the packed checkpoint at --bits, vLLM's dummy loader makes the bf16 baseline.
Each engine runs in its own process on one GPU with vLLM's defaults (torch.compile, CUDA graphs);
for each batch size, decode tokens/s = batch * (new tokens - 1) / (generation time - prefill time),
the median of --repeats runs. Prints a table and writes --out (JSON).

    pip install -e ".[vllm]"
    python bench/serve.py --config ernie-4.5-vl-28b-a3b --bits 2 --out bench/results/serve-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
             "use_bias", "moe_k", "moe_num_experts", "moe_num_shared_experts", "moe_layer_start_index",
             "moe_layer_interval", "rope_theta", "head_dim")


def text_moe_config(spec: str) -> dict:
    """config.json of the ERNIE-4.5 text MoE with the language model of ERNIE-4.5-VL config `spec`."""
    from ccq.plan.configs import read_config

    raw, _ = read_config(spec)
    tc = raw.get("text_config", raw)
    cfg = {k: tc[k] for k in TEXT_KEYS if tc.get(k) is not None}
    inter = tc["moe_intermediate_size"]
    cfg["moe_intermediate_size"] = inter[0] if isinstance(inter, list) else inter  # the text experts
    cfg["moe_layer_start_index"] = _first(tc.get("moe_layer_start_index", 1))
    cfg["max_position_embeddings"] = min(cfg.get("max_position_embeddings", 4096), 4096)
    return {**cfg, "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "dtype": "bfloat16"}


def _first(v):
    return v[0] if isinstance(v, list) else v


def worker(args: dict) -> dict:
    """Runs in a fresh process: one engine, decode tokens/s per batch size."""
    import torch
    from vllm import LLM, SamplingParams

    extra = {"load_format": "dummy"} if args["dummy"] else {}
    llm = LLM(model=args["model"], skip_tokenizer_init=True, max_model_len=1024, gpu_memory_utilization=0.85,
              seed=0, **extra)
    vocab = json.loads((Path(args["model"]) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    out = {}
    for batch in args["batches"]:
        prompts = [{"prompt_token_ids": torch.randint(10, vocab, (args["prompt"],), generator=g).tolist()}
                   for _ in range(batch)]

        def run(n):
            t = time.perf_counter()
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - t

        run(args["new"])  # warm-up (compilation, graph capture for this batch)
        rates = []
        for _ in range(args["repeats"]):
            prefill, full = run(1), run(args["new"])
            rates.append(batch * (args["new"] - 1) / max(full - prefill, 1e-9))
        out[str(batch)] = {"decode_tokens_per_s": statistics.median(rates), "runs": rates}
    return out


def run_engine(model: Path, dummy: bool, ns) -> dict:
    args = {"model": str(model), "dummy": dummy, "batches": ns.batch, "prompt": ns.prompt, "new": ns.new,
            "repeats": ns.repeats}
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"serve.py: the vLLM run on {model} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="ernie-4.5-vl-28b-a3b")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128, help="Prompt tokens per sequence.")
    ap.add_argument("--new", type=int, default=128, help="Generated tokens per sequence.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="bench-serve-work", help="Folder for the two model folders.")
    ap.add_argument("--out", default="bench/results/serve-h200.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("serve.py: needs a CUDA GPU (vLLM serving benchmark); nothing measured")
    from ccq.plan.synth import synth_checkpoint

    work = Path(ns.work)
    bf16, packed = work / "bf16", work / f"ccq-{ns.bits}bit"
    bf16.mkdir(parents=True, exist_ok=True)
    cfg = text_moe_config(ns.config)
    (bf16 / "config.json").write_text(json.dumps(cfg, indent=2))
    if not (packed / "config.json").exists():
        synth_checkpoint(str(bf16 / "config.json"), ns.bits, packed, overwrite=True, device="cuda")
    results = {"ccq": run_engine(packed, False, ns), "bf16": run_engine(bf16, True, ns)}
    import vllm

    report = {"config": ns.config, "model": "Ernie4_5_MoeForCausalLM (the config's language model)", "bits": ns.bits,
              "gpu": torch.cuda.get_device_name(0), "vllm": vllm.__version__, "prompt_tokens": ns.prompt,
              "new_tokens": ns.new, "repeats": ns.repeats, "results": results}
    print(f"{'batch':>5} {'ccq tok/s':>10} {'bf16 tok/s':>10} {'ratio':>6}")
    for b in map(str, ns.batch):
        q, f = results["ccq"][b]["decode_tokens_per_s"], results["bf16"][b]["decode_tokens_per_s"]
        print(f"{b:>5} {q:10.1f} {f:10.1f} {q / f:6.2f}")
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
