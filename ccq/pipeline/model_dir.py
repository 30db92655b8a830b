"""`quantize_model_dir`: quantize a model folder layer by layer, straight from its shards.

The model skeleton is built on the meta device by the family's adapter; shard 1 holds
everything outside the decoder layers (embeddings, vision tower, resampler, final norm, head),
shards 2.. hold one decoder layer each. Only the unit being processed is materialised, and the
next unit's read or the previous unit's write runs beside it (`Pipeline`), so peak memory is
about two layers plus the calibration activations. The vision tower and resampler are
calibrated on the calibration images; without images they fall back to data-free search. The
activations are saved at every layer boundary so `resume=True` continues bit-exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from ..calibration.data import model_dir_samples
from ..calibration.synthetic import SYNTHETIC
from ..format.qconfig import make_quantization_config
from ..format.source import MetaView, SourceCheckpoint
from ..format.writer import CheckpointWriter
from ..models.arch import resolve
from ..models.policy import quant_plan
from ..models.settings import QuantSettings
from ..models.skeleton import build_skeleton
from .report import calibration_fingerprint, fingerprint, summary
from .units import Pipeline, check_shape


def open_model_dir(model_dir):
    """(source checkpoint, Architecture, meta skeleton, checkpoint names) of a model folder."""
    src = SourceCheckpoint(model_dir)
    arch = resolve(src.config, str(src.dir / "config.json"))
    model = build_skeleton(arch.cls, arch.config)
    # the names get a skeleton of their own: checkpoint conversions look parameters up in it from
    # the reader thread while the pipeline swaps modules of `model` (layer 0 during input capture)
    return src, arch, model, arch.adapter.checkpoint_names(src, build_skeleton(arch.cls, arch.config))


@torch.no_grad()
def quantize_model_dir(model_dir, out_dir, bits: int = 2, *, calibration=None, samples: int = 128,
                       seq_len: int = 2048, overrides=(), resume: bool = False, overwrite: bool = False,
                       device: str = "cpu", seed: int = 0, rotate_output: bool = False, progress: bool = True,
                       settings: QuantSettings | None = None, overlap: bool = True, **options) -> dict:
    """Quantize model_dir into the packed checkpoint out_dir; returns the report dict.

    calibration: None (data-free), a local dataset path, or "synthetic": `samples` sequences of
    whole-word vocabulary tokens from the model dir's tokenizer (ccq.calibration.synthetic).

    settings: a QuantSettings; without it one is made from bits, overrides, seed, rotate_output
    and the codec options (L, code, hadamard_block, ...). overlap=False reads, quantizes and
    writes one unit after another (about one layer in memory).
    """
    t_start = time.perf_counter()
    if settings is None:  # bad codec options fail before any output
        if calibration == SYNTHETIC:  # vocabulary words: the plain objective (as quantize_model)
            options.setdefault("asymmetric", False)
        settings = QuantSettings.of(bits, overrides=overrides, seed=seed, rotate_output=rotate_output, **options)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    settings = dataclasses.replace(settings, codec=dataclasses.replace(settings.codec, device=dev.type))
    src, arch, model, names = open_model_dir(model_dir)
    plan = quant_plan(model, settings.bits, settings.overrides)
    pipe = Pipeline(model, plan, settings, get=names.get, device=dev, progress=progress,
                    overlap=overlap)
    probe = arch.adapter.checkpoint_names(MetaView(src), model)
    for unit in pipe.units:  # every tensor resolvable, with the right shape, before any output
        for name in unit.params:
            check_shape(model, name, probe.get(name))
    # synthetic: no model in memory to sample from, so whole-word vocabulary tokens
    batches = model_dir_samples(calibration, src.dir, arch.config, samples, seq_len, arch.adapter, settings.seed)
    run = {"settings": settings.to_dict(), "device": dev.type, "samples": samples, "seq_len": seq_len,
           "calibration": (None if calibration is None else SYNTHETIC if calibration == SYNTHETIC
                           else calibration_fingerprint(calibration))}
    writer = CheckpointWriter(out_dir, len(pipe.units), fingerprint(src.dir, run), overwrite=overwrite, resume=resume)
    pipe.batches, pipe.writer = batches, writer
    try:
        measure = _measure(pipe)
        if settings.target_bpw is not None:
            pipe.plan = _allocate(pipe, plan, names.get, measure)
        elif settings.guide_groups and pipe.batches is not None:
            measure(())
        report = pipe.run()
        cfg = json.loads(arch.config.to_json_string(use_diff=False))
        cfg["quantization_config"] = make_quantization_config(model, settings, pipe.plan)
        full = summary(report, settings, calibration, samples, seq_len, time.perf_counter() - t_start)
        writer.finish(cfg, full, copy_from=src.dir)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        writer.abort()
        raise e
    return full


def _measure(pipe: Pipeline):
    """names -> costs: `Pipeline.measure` once (a forward and a backward pass of the 16-bit model of their
    own, since the quantizing pass has a layer's statistics only once the layers before it are quantized,
    too late for a global budget or for the loss's gradients), its costs and token weights kept in the
    work folder, so a resumed run chooses the same bits and weights without measuring again."""
    from ..format.writer import write_json_atomic

    costs_path, guides_path = pipe.writer.path("calib-allocation-costs.json"), pipe.writer.path("calib-guides.pt")

    def measure(names):
        guided = bool(pipe.settings.guide_groups)
        if costs_path.exists() and (guides_path.exists() or not guided):
            if guided:
                pipe.guides = torch.load(guides_path, weights_only=True)
            return {k: {int(b): c for b, c in v.items()} for k, v in json.loads(costs_path.read_text()).items()}
        costs = pipe.measure(set(names))
        if guided:  # before the costs, which mark the measurement done
            torch.save(pipe.guides, guides_path.with_suffix(".tmp"))
            guides_path.with_suffix(".tmp").replace(guides_path)
        write_json_atomic(costs_path, costs)
        return costs
    return measure


def _allocate(pipe: Pipeline, plan: dict[str, int], get, measure) -> dict[str, int]:
    """Bits per module for the target bpw. Calibrated: costed with the 16-bit model's Hessians and
    outputs' Fisher on the calibration data (`measure`, see `_measure`); data-free: a pass over the source
    weights, one in memory at a time."""
    from ..calibration.allocate import allocate_model

    if pipe.batches is None:
        return allocate_model(pipe.model, plan, pipe.settings, get=get)
    return allocate_model(pipe.model, plan, pipe.settings, measure=measure)
