"""`quantize_model`: quantize a transformers model already in memory, in place.

The same sequential core as `quantize_model_dir` (`Pipeline`): layer i is calibrated on the
outputs of the already-quantized layers < i; nothing is written (`ccq.save_quantized` writes
the result).
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.synthetic import SYNTHETIC, SYNTHETIC_DAMP
from ..format.qconfig import make_quantization_config
from ..models.policy import quant_plan
from ..models.settings import QuantSettings
from .units import Pipeline


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 2, calibration=None, *, overrides=(), seed: int = 0,
                   rotate_output: bool = False, settings: QuantSettings | None = None, tokenizer=None,
                   samples: int = 128, seq_len: int | None = None, min_len: int | None = None,
                   **options) -> nn.Module:
    """Quantize a loaded transformers model in place (any model made of nn.Linear layers and
    transformers' fused experts, with a decoder layer list).

    calibration: None (data-free), an iterable of model input dicts (or input_id tensors), or
    "synthetic": `samples` x `seq_len` tokens made without user data (ccq.calibration.synthetic):
    sampled from the model itself when it can generate (seq_len default 256), else whole-word
    vocabulary tokens inside the tokenizer's special tokens, of lengths drawn from min_len..seq_len
    (default 10..50, seq_len // 5 when only seq_len is given: on MiniLM short sequences of mixed
    length calibrated better than long or fixed ones), whose Hessians are damped by 0.1 unless
    `damp` is given (+0.03 on MiniLM: their correlations are less certain than real text's), and with
    the plain objective unless `asymmetric` is given.
    tokenizer: for "synthetic", a tokenizer or its folder (default: the folder the model was loaded from).
    options: codec options (L, code, hadamard_block, ...) and `target_bpw` / `finetune_steps`
    (see QuantSettings), or pass `settings`. Sets
    `model.config.quantization_config` and keeps the report in `model.ccq_report`.
    """
    if settings is None:
        if isinstance(calibration, str) and calibration == SYNTHETIC and not _generates(model):
            options.setdefault("damp", SYNTHETIC_DAMP)
            options.setdefault("asymmetric", False)  # toward the 16-bit outputs on words: 0.838 vs 0.847 on MiniLM
        settings = QuantSettings.of(bits, overrides=overrides, seed=seed, rotate_output=rotate_output, **options)
    plan = quant_plan(model, settings.bits, settings.overrides)
    batches = None
    if isinstance(calibration, str):
        batches = _synthetic(model, calibration, tokenizer, samples, seq_len, min_len, settings.seed)
    elif calibration is not None:
        batches = [{"input_ids": b} if isinstance(b, torch.Tensor) else dict(b) for b in calibration]
    device = next(p.device for p in model.parameters())
    pipe = Pipeline(model, plan, settings, batches=batches, device=device)
    if settings.target_bpw is not None:
        pipe.plan = _allocate(pipe)
    elif settings.guide_groups and batches is not None:
        pipe.measure(set())  # the token weights of the guided Hessians
    model.ccq_report = pipe.run()
    model.config.quantization_config = make_quantization_config(model, settings, pipe.plan)
    return model


def _synthetic(model: nn.Module, kind: str, tokenizer, samples: int, seq_len: int | None, min_len: int | None,
               seed: int) -> list[dict]:
    """Calibration batches without user data: sampled from a generating model, else vocabulary words."""
    from ..calibration.synthetic import load_tokenizer, sampled_batches, word_batches

    if kind != SYNTHETIC:
        raise ValueError(f"calibration {kind!r}: a string must be {SYNTHETIC!r} (else pass input dicts or tensors)")
    if tokenizer is None or isinstance(tokenizer, str):
        src = tokenizer or getattr(model, "name_or_path", "")
        if not src:
            raise ValueError("synthetic calibration: the model has no folder to load its tokenizer from; "
                             "pass tokenizer=")
        tokenizer = load_tokenizer(src)
    if _generates(model):
        return sampled_batches(model, tokenizer, samples, seq_len or 256, seed)
    seq_len = seq_len or 50
    return word_batches(tokenizer, samples, seq_len, seed, where=type(model).__name__,
                        min_len=seq_len // 5 if min_len is None else min_len)


def _generates(model: nn.Module) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)())


def _allocate(pipe: Pipeline) -> dict[str, int]:
    """Bits per module for `settings.target_bpw`: costed on the calibration batches with the 16-bit
    model's Hessians and outputs' Fisher (`Pipeline.measure`, as the streaming quantizer), or data-free."""
    from ..calibration.allocate import allocate_model

    if pipe.batches is None:
        return allocate_model(pipe.model, pipe.plan, pipe.settings)
    return allocate_model(pipe.model, pipe.plan, pipe.settings, measure=lambda names: pipe.measure(set(names)))
