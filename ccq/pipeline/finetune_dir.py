"""`finetune_model_dir`: end-to-end fine-tuning of a packed checkpoint against its 16-bit model.

The packed model (its 16-bit tensors in fp32: they are what is tuned) and the 16-bit reference are
loaded whole on the chosen device, the quantized model's 16-bit parameters are tuned so its outputs
match the reference's on the calibration samples (`ccq.calibration.finetune.finetune_model`), and a
new packed folder is written with the same shards, the tuned scales, norms and biases in place of the
old ones (the trellis codes are copied as they are). Output goes through `CheckpointWriter`, so a
failed run leaves nothing at `out_dir`, and the tuning state is saved in its work folder every few
steps, so `resume=True` continues an interrupted run with the same result.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open

from ..calibration.data import model_dir_samples
from ..calibration.finetune import E2E_LR, E2E_STEPS, finetune_model
from ..calibration.synthetic import SYNTHETIC
from ..format.loader import load, shard_files
from ..format.qconfig import check_quantization_config
from ..format.source import read_json
from ..format.writer import REPORT, CheckpointWriter
from ..models.arch import resolve
from .report import calibration_fingerprint, fingerprint, versions

STATE = "tuning-state.pt"


def _reference(path: Path, device: str):
    """The 16-bit model, through the class its family's adapter names (as `ccq eval` loads it): fp32
    on the CPU (bf16 matmuls are slow there), bf16 on a GPU (half the memory; only its outputs are used)."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"reference {path} is not a model folder (no config.json)")
    raw = read_json(cfg_path)
    if (raw.get("quantization_config") or {}).get("quant_method") == "ccq":
        raise ValueError(f"reference {path} is a ccq-packed checkpoint; give the 16-bit model it was made from")
    arch = resolve(raw, str(cfg_path))
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return arch.cls.from_pretrained(str(path), config=arch.config, dtype=dtype, device_map=device,
                                    local_files_only=True).eval()


def finetune_model_dir(packed_dir, reference_dir, out_dir, calibration, *, samples: int = 32, seq_len: int = 512,
                       steps: int = E2E_STEPS, lr: float = E2E_LR, seed: int = 0, device: str = "cpu",
                       resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Tune packed_dir end to end against reference_dir on the calibration data; write out_dir.

    calibration: a local dataset path (as for quantizing) or "synthetic" (the packed folder's
    tokenizer draws whole words). Returns {"loss_before", "loss_after", "steps", "kept", ...}:
    the mean loss over the samples (KL per token for a model with logits) before and after.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    packed, ref_dir = Path(packed_dir), Path(reference_dir)
    if not packed.is_dir():
        raise FileNotFoundError(f"checkpoint {packed} does not exist or is not a folder")
    if steps < 1:
        raise ValueError(f"steps must be 1 or more, got {steps}")
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    config = read_json(packed / "config.json")
    check_quantization_config(config.get("quantization_config"), str(packed / "config.json"))
    arch = resolve(config, str(packed / "config.json"))
    batches = model_dir_samples(calibration, packed, arch.config, samples, seq_len, arch.adapter, seed)
    run = {"reference": fingerprint(ref_dir, {}) if ref_dir.is_dir() else str(ref_dir), "samples": samples,
           "seq_len": seq_len, "steps": steps, "lr": lr, "seed": seed, "device": device,
           "calibration": SYNTHETIC if calibration == SYNTHETIC else calibration_fingerprint(calibration)}
    shards = shard_files(packed)
    writer = CheckpointWriter(out_dir, len(shards), fingerprint(packed, run), overwrite=overwrite, resume=resume)
    try:
        reference = _reference(ref_dir, device)
        model = load(packed, device=device, dtype=torch.float32)
        with tqdm(total=steps, desc="ccq finetune", unit="step", disable=not progress) as bar:
            stats = finetune_model(model, reference, batches, steps=steps, lr=lr, seed=seed, progress=bar.update,
                                   state_path=writer.path(STATE))
        del reference
        state = model.state_dict()
        for i, shard in enumerate(shards):
            if writer.done(i):
                continue
            with safe_open(str(packed / shard), framework="pt") as f:
                tensors = {k: state[k].to(f.get_tensor(k).dtype) for k in f.keys()}
            writer.write_shard(i, tensors, [])
        writer.path(STATE).unlink(missing_ok=True)
        record = {**stats, "lr": lr, "samples": len(batches), "seq_len": seq_len, "seed": seed,
                  "calibration": SYNTHETIC if calibration == SYNTHETIC else str(calibration),
                  "seconds": round(time.perf_counter() - t0, 1)}
        config["quantization_config"]["finetune"] = record
        report = read_json(packed / REPORT) if (packed / REPORT).exists() else {}
        report["finetune"] = {**record, "versions": versions()}
        writer.finish(config, report, copy_from=packed)
    except (ValueError, TypeError, KeyError, FileNotFoundError):
        writer.abort()
        raise
    return record

