"""The `ccq` command: a thin click layer over the Python API.

Only click is imported at start-up (`ccq --help` and `--version` stay well under a second);
every command imports what it needs when it runs.
"""

from __future__ import annotations

import sys

import click


class CcqError(click.ClickException):
    """A user-facing failure: one line on stderr, exit code 1, no traceback."""

    def show(self, file=None):
        click.echo(f"ccq: error: {self.format_message()}", err=True, file=file)


def run_guarded(fn, *args, **kwargs):
    """Call fn, turning expected failures (bad files, bad values) into a one-line CcqError."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, OSError, KeyError) as e:
        msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
        raise CcqError(msg.splitlines()[0] if msg else type(e).__name__) from None


def _check_bits(ctx, param, value):
    """--bits through the library's one bit-width check, the error naming the option."""
    from .codec.config import check_bits

    try:
        return check_bits(value)
    except ValueError as e:
        raise CcqError(f"--bits: {e}") from None


def codec_options(f):
    """The packing options `quantize` and `synth` share."""
    for opt in reversed((
        click.option("--bits", type=int, default=2, show_default=True, callback=_check_bits,
                     help="Bits per weight: 2, 3 or 4."),
        click.option("--module-bits", "module_bits", multiple=True, metavar="PATTERN=BITS",
                     help="Bits for modules matching an fnmatch pattern (2, 3, 4, or 16 to keep 16-bit); repeatable."),
        click.option("--L", "L", type=int, default=16, show_default=True, help="Trellis state bits (8..16)."),
        click.option("--code", default="mul1", show_default=True, help="Computed trellis code."),
        click.option("--seed", type=int, default=0, show_default=True),
    )):
        f = opt(f)
    return f


def default_device(device: str | None) -> str:
    """--device as given, else cuda when a GPU is visible, else cpu."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.group()
@click.version_option(package_name="ccq")
def main():
    """ccq: trellis-coded 2/3/4-bit compression of MoE expert weights."""


_DEVICE_HELP = ("cpu, cuda, cuda:N, or auto (spread over the visible GPUs with accelerate) "
                "[default: cuda when available, else cpu].")
_DTYPE = click.Choice(["auto", "bfloat16", "float16", "float32"])


@main.group("eval")
def eval_group():
    """Measure what compression cost: perplexity/KL and ChartQA drift against the 16-bit model."""


@eval_group.command("ppl")
@click.option("--model", "model", required=True, help="Model dir to evaluate (ccq-packed or 16-bit).")
@click.option("--reference", default=None, help="16-bit reference model dir (omit to evaluate --model alone).")
@click.option("--data", required=True, help="Local text dataset: .parquet, .json/.jsonl (column --text-column) or .txt.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--seq-len", default=2048, show_default=True, type=click.IntRange(2), help="Window length in tokens.")
@click.option("--stride", default=None, type=click.IntRange(1), help="Window start step [default: --seq-len].")
@click.option("--limit", default=None, type=click.IntRange(1), help="Evaluate at most this many windows.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1))
@click.option("--device", default=None, help=_DEVICE_HELP)
@click.option("--reference-device", default=None, help="Device of the reference [default: --device].")
@click.option("--dtype", default="auto", show_default=True, type=_DTYPE, help="auto: bfloat16 on GPU, float32 on CPU.")
@click.option("--out", default="eval-results", show_default=True, help="Folder for ppl.json, ppl.md, ppl_*.png.")
def eval_ppl(model, reference, data, text_column, seq_len, stride, limit, batch_size, device, reference_device,
             dtype, out):
    """Perplexity on a local text dataset, and KL / top-1 agreement against --reference."""
    from .eval.runs import run_ppl

    _, paths = run_guarded(run_ppl, model, data, out, reference=reference, seq_len=seq_len, stride=stride,
                           limit=limit, batch_size=batch_size, device=default_device(device), reference_device=reference_device,
                           dtype=dtype, text_column=text_column)
    click.echo(paths[1].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@eval_group.command("chartqa")
@click.option("--model", "model", required=True, help="Model dir to evaluate (ccq-packed or 16-bit).")
@click.option("--reference", default=None, help="16-bit reference model dir (omit to evaluate --model alone).")
@click.option("--data", required=True, help="ChartQA parquet/json: columns image, query, label[, human_or_machine].")
@click.option("--limit", default=None, type=click.IntRange(1), help="Evaluate the first N rows only.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--device", default=None, help=_DEVICE_HELP)
@click.option("--dtype", default="auto", show_default=True, type=_DTYPE, help="auto: bfloat16 on GPU, float32 on CPU.")
@click.option("--prompt-suffix", default=None, help="Text after each question [default: a one-word-answer instruction].")
@click.option("--out", default="eval-results", show_default=True,
              help="Folder for chartqa.json, chartqa.md, chartqa_accuracy.png, chartqa_rows.jsonl.")
def eval_chartqa(model, reference, data, limit, max_new_tokens, batch_size, device, dtype, prompt_suffix, out):
    """ChartQA relaxed accuracy (all/human/augmented), drift and answer agreement against --reference."""
    from .eval.chartqa import DEFAULT_PROMPT_SUFFIX
    from .eval.runs import run_chartqa

    _, paths = run_guarded(run_chartqa, model, data, out, reference=reference, limit=limit,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, device=default_device(device),
                           dtype=dtype,
                           prompt_suffix=DEFAULT_PROMPT_SUFFIX if prompt_suffix is None else prompt_suffix)
    click.echo(paths[1].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@main.command()
@click.option("--bits", "bits", multiple=True, type=click.IntRange(2, 4), default=(2, 4), show_default=True,
              help="Bit widths to run (repeatable).")
@click.option("--size", default=256, show_default=True, type=click.IntRange(16, 8192),
              help="The sample matrix is SIZE x SIZE i.i.d. N(0,1).")
@click.option("--L", "L", default=12, show_default=True, type=click.IntRange(8, 16),
              help="Trellis state bits for the tiny model (16 is the default of `quantize`, and slower).")
@click.option("--seed", default=0, show_default=True)
@click.option("--matrix-only", is_flag=True, help="Skip the tiny-model part.")
def demo(bits, size, L, seed, matrix_only):
    """Run the main job on built-in data: the codec on a Gaussian matrix, then a tiny random
    ERNIE-4.5-VL calibrated on generated text, quantized, loaded and compared with its 16-bit
    source and with round-to-nearest (groups of 64)."""
    from .codec.quality import format_table, gaussian_quality
    from .demo import format_model_table, tiny_model_demo

    click.echo(f"Codec on a {size}x{size} i.i.d. N(0,1) matrix (MSE per weight):")
    click.echo(format_table([run_guarded(gaussian_quality, b, size, size, seed) for b in bits]))
    if not matrix_only:
        click.echo("\nTiny ERNIE-4.5-VL, all linear layers and experts quantized (relative logit error vs 16-bit):")
        click.echo(format_model_table([run_guarded(tiny_model_demo, b, L, seed) for b in bits]))


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output folder (packed checkpoint).")
@codec_options
@click.option("--calibration", type=click.Path(), default=None,
              help="Local dataset (datasets: parquet/json/csv/text file or saved folder); text and image+text rows. "
                   "'synthetic': no data, sequences of whole-word tokens from the model's own tokenizer.")
@click.option("--samples", type=click.IntRange(1), default=128, show_default=True, help="Calibration samples.")
@click.option("--seq-len", type=click.IntRange(8), default=2048, show_default=True, help="Tokens per text sample.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same output.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where layers run and the search runs [default: cuda when available, else cpu].")
@click.option("--target-bpw", type=float, default=None,
              help="Choose 2, 3 or 4 bits per module for this average bits per weight (--bits then only sets "
                   "the bits of --module-bits patterns without their own).")
@click.option("--finetune-steps", type=click.IntRange(0), default=0, show_default=True,
              help="With --calibration: Adam steps per decoder layer tuning its 16-bit parameters (scales, norms, "
                   "biases) to the 16-bit layer's outputs; 0 = off.")
@click.option("--damp", type=float, default=0.01, show_default=True,
              help="Hessian damping relative to its mean diagonal (0.1 paid with --calibration synthetic, "
                   "docs/QUALITY.md).")
@click.option("--guide-groups", type=click.IntRange(0), default=0, show_default=True,
              help="With --calibration: weight each token of the Hessians by the 16-bit model's loss gradient at the "
                   "module's outputs, one Hessian per this many groups of output rows; 0 = off.")
@click.option("--asymmetric/--no-asymmetric", default=None,
              help="With --calibration: quantize each linear toward the 16-bit model's outputs on the 16-bit model's "
                   "inputs (undoing the error of the modules before it), a layer's modules one group at a time "
                   "[default: on, off with --guide-groups or --calibration synthetic].")
def quantize(model_dir, out, bits, calibration, samples, seq_len, module_bits, L, code, seed, resume, overwrite, device,
             target_bpw, finetune_steps, damp, guide_groups, asymmetric):
    """Quantize MODEL_DIR (ERNIE-4.5-VL, Qwen3-MoE, Mixtral, DeepSeek-V3, ... or any nn.Linear transformers
    model) into a packed checkpoint."""
    from .models.policy import parse_override
    from .models.settings import QuantSettings
    from .pipeline import quantize_model_dir

    overrides = [run_guarded(parse_override, m) for m in module_bits]
    if asymmetric is None and calibration == "synthetic":  # vocabulary words: the plain objective paid more
        asymmetric = False
    settings = run_guarded(QuantSettings.of, bits, overrides=overrides, seed=seed, L=L, code=code,
                           target_bpw=target_bpw, finetune_steps=finetune_steps, damp=damp, guide_groups=guide_groups,
                           asymmetric=asymmetric)
    report = run_guarded(quantize_model_dir, model_dir, out, calibration=calibration, samples=samples,
                         seq_len=seq_len, resume=resume, overwrite=overwrite, device=default_device(device),
                         settings=settings)
    t = report["totals"]
    bpw = t["quantized_bytes"] * 8 / max(1, sum(g["weights"] for g in t["by_group"].values()))
    click.echo(f"wrote {out}: {t['quantized_tensors']} quantized tensors, {t['quantized_bytes'] / 2**20:.1f} MiB packed "
               f"({bpw:.3f} bpw), "
               f"{len(report['fallbacks'])} data-free fallbacks, {t['wall_seconds']:.1f} s")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--reference", required=True, type=click.Path(), help="The 16-bit model dir CHECKPOINT was made from.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output folder (tuned packed checkpoint).")
@click.option("--calibration", required=True, type=click.Path(),
              help="Local dataset as for `ccq quantize --calibration`, or 'synthetic'.")
@click.option("--samples", type=click.IntRange(1), default=32, show_default=True, help="Calibration samples.")
@click.option("--seq-len", type=click.IntRange(8), default=512, show_default=True, help="Tokens per text sample.")
@click.option("--steps", type=click.IntRange(1), default=256, show_default=True, help="Adam steps, one sample each.")
@click.option("--lr", type=float, default=3e-3, show_default=True,
              help="Learning rate of the scales' log-gains (norms and biases: a tenth of it).")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample order.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same output.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available, else cpu].")
def finetune(checkpoint, reference, out, calibration, samples, seq_len, steps, lr, seed, resume, overwrite, device):
    """Tune a packed CHECKPOINT's 16-bit parameters (scales, norms, biases) end to end so its outputs match
    the 16-bit model's on the calibration data (KL of the next-token distributions); the codes stay."""
    from .pipeline import finetune_model_dir

    r = run_guarded(finetune_model_dir, checkpoint, reference, out, calibration, samples=samples, seq_len=seq_len,
                    steps=steps, lr=lr, seed=seed, device=default_device(device), resume=resume, overwrite=overwrite)
    click.echo(f"wrote {out}: loss {r['loss_before']:.4f} -> {r['loss_after']:.4f} over {r['samples']} samples"
               f"{'' if r['kept'] else ' (no gain: kept the old values)'}, {r['steps']} steps, {r['seconds']:.1f} s")


@main.command()
@click.argument("checkpoint", type=click.Path())
def inspect(checkpoint):
    """Print what a packed checkpoint holds: bits, sizes by module group, fallbacks."""
    from .format.inspect import describe

    click.echo(run_guarded(describe, checkpoint))


@main.command()
@click.argument("config")
@click.option("--bits", type=int, default=2, show_default=True, callback=_check_bits,
              help="Bits per weight: 2, 3 or 4.")
@click.option("--gpus", default="1x141GB", show_default=True, metavar="NxSIZE",
              help="GPUs to place the model on, e.g. 1x141GB, 4x80GB, 2x80GB+1x24GiB (GB = 1e9 bytes).")
@click.option("--context", type=click.IntRange(0), default=32768, show_default=True, help="KV-cache tokens per sequence.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="Sequences in the KV cache.")
@click.option("--reserve", default="0", show_default=True, metavar="SIZE",
              help="Memory kept free on every GPU (activations, CUDA context), e.g. 1GiB.")
@click.option("--module-bits", "module_bits", multiple=True, metavar="PATTERN=BITS",
              help="Bits for modules matching an fnmatch pattern (2, 3, 4, or 16 to keep 16-bit); repeatable.")
@click.option("--tp", type=click.IntRange(1), default=1, show_default=True,
              help="Also show what each GPU holds under vLLM tensor parallelism of this size.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--target-bpw", type=float, default=None,
              help="Size of a `ccq quantize --target-bpw` run: 2, 3 or 4 bits per module averaging this.")
def plan(config, bits, gpus, context, batch, reserve, module_bits, tp, as_json, target_bpw):
    """Packed size by module group, KV cache and GPU placement of CONFIG, without weights.

    CONFIG is a config.json, a model folder or a built-in name: ernie-4.5-vl-28b-a3b,
    ernie-4.5-vl-424b-a47b, qwen3-30b-a3b, qwen3-vl-30b-a3b, mixtral-8x7b, deepseek-v3, gpt-oss-20b.
    """
    import json

    from .models.policy import parse_override
    from .plan.footprint import format_plan, plan_footprint
    from .plan.gpus import parse_gpus, parse_size

    overrides = [run_guarded(parse_override, m) for m in module_bits]
    if target_bpw is not None:
        from .calibration.allocate import target_overrides
        from .models.settings import QuantSettings

        settings = run_guarded(QuantSettings.of, bits, overrides=overrides, target_bpw=target_bpw)
        overrides = run_guarded(target_overrides, config, settings)
    sizes = run_guarded(parse_gpus, gpus)
    res = run_guarded(plan_footprint, config, bits, overrides=overrides, gpus=sizes, context=context, batch=batch,
                      reserve=run_guarded(parse_size, reserve), tp=tp)
    click.echo(json.dumps(res) if as_json else format_plan(res))


@main.command()
@click.argument("config")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output folder (packed checkpoint).")
@codec_options
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def synth(config, out, bits, module_bits, L, code, seed, overwrite):
    """Write a packed checkpoint of CONFIG's real shape with random codes (no search), for benchmarks."""
    from .models.policy import parse_override
    from .plan.synth import synth_checkpoint

    overrides = [run_guarded(parse_override, m) for m in module_bits]
    r = run_guarded(synth_checkpoint, config, bits, out, overrides=overrides, seed=seed, overwrite=overwrite, L=L,
                    code=code)
    click.echo(f"wrote {r['out']}: {r['quantized_modules']} quantized modules, {r['shards']} shards, "
               f"{r['tensor_bytes'] / 1e9:.3f} GB of tensors")


if __name__ == "__main__":
    sys.exit(main())
